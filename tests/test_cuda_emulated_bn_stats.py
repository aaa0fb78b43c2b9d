"""The CUDA batch statistics of bn_relu_pool (csrc/cuda/bn_relu_pool_kernel.cu), run in the CPU emulator, against
float64 where an outlier makes float sums lose precision."""

from __future__ import annotations

import pytest
import test_cuda_emulated
import torch
from test_cuda_emulated import geometry, in_two_orders, memory_order

from hetrain.checks import cuda_emulator

pytestmark = test_cuda_emulated.pytestmark  # g++ and hetrain._C


@pytest.fixture(scope="module")
def emu():
    return cuda_emulator.load()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("parts", [1, 4])
def test_batch_statistics_keep_their_precision_beside_an_outlier(emu, dtype, channels_last, parts):
    # Each thread summed x - x[0, c, 0, 0] and its square in float: with that pivot an outlier, every deviation was
    # large and the variance a small difference of large sums, 1e-4 to 1e-3 off (torch: 4e-8). Merged as moments
    # (Welford, Chan), it is within a few float32 roundings.
    shape = (4, 4, 16, 16)
    n, c, h, w = shape
    x = torch.randn(shape, generator=torch.Generator().manual_seed(26)).to(dtype)
    x[0, :, 0, 0] = 300.0
    geo, _ = geometry(shape, (2, 2, 0), channels_last)

    def launch(mem):
        mean, invstd = mem.empty((c,), torch.float32), mem.empty((c,), torch.float32)
        rm, rv = mem.put(torch.zeros(c)), mem.put(torch.ones(c))
        emu.call("bn_relu_pool_stats", dtype, mem.put(memory_order(x, channels_last)), mean, invstd, rm, rv, 1.0,
                 0.0, mem.empty((2 * parts * c,), torch.float32), parts, geo)
        return [mean, invstd, rm, rv]

    mean, invstd, running_mean, running_var = (t.double() for t in in_two_orders(emu, launch))
    x64 = x.double()
    var = x64.var((0, 2, 3), correction=0)
    torch.testing.assert_close(1 / invstd**2, var, rtol=2e-6, atol=0)  # eps 0
    torch.testing.assert_close(mean, x64.mean((0, 2, 3)), rtol=0, atol=2e-6)
    torch.testing.assert_close(running_mean, x64.mean((0, 2, 3)), rtol=0, atol=2e-6)  # momentum 1
    torch.testing.assert_close(running_var, x64.var((0, 2, 3)), rtol=2e-6, atol=0)
