"""The CUDA kernels' torch bindings (csrc/cuda/*_binding.cpp), run on CPU tensors in the emulator: each op's
CUDA kernel is reached with ``redispatch`` to the CUDA key and set against the same op's CPU kernel, for the
binding's own work: argument checks, contiguity and layouts, allocation, the partial-row workspaces and the
device's multiprocessor count (two, emulated), optional weights, empty batches. Values are compared in
float64 (the CPU kernel on upcast inputs); dtypes, shapes and memory layouts against the CPU kernel on the
same inputs, the contract both registrations share.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from op_testing import assert_close, non_contiguous, randn

from hetrain import _ext
from hetrain.checks import cuda_emulator

pytestmark = [
    pytest.mark.skipif(shutil.which("g++") is None, reason="the emulator is built with g++"),
    pytest.mark.skipif(_ext.load() is None, reason="the bindings call hetrain._C's argument checks"),
]

C = torch.ops.hetrain_C
CUDA = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
EPS = 1e-5


@pytest.fixture(scope="module", autouse=True)
def emulated():
    emu = cuda_emulator.load()
    if not emu.bindings:
        pytest.skip("hetrain._C has CUDA kernels of its own: the emulated bindings are not registered")
    return emu


def on_cuda(name: str, *args):
    """The CUDA binding of ``hetrain_C::<name>``, run on CPU tensors in the emulator."""
    return getattr(C, name).default.redispatch(CUDA, *args)


def upcast(args):
    return [a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]


def check(name: str, args, summed=(), exact=()):
    """``name``'s CUDA binding against its CPU kernel: dtype, shape and layout as the CPU kernel gives them on the
    same inputs; values against it in float64 (``summed`` outputs relative to their size, ``exact`` ones equal)."""
    got = on_cuda(name, *args)
    same = getattr(C, name)(*args)
    want = getattr(C, name)(*upcast(args))
    got, same, want = ((t,) if isinstance(t, torch.Tensor) else t for t in (got, same, want))
    dtype = next(a.dtype for a in args if isinstance(a, torch.Tensor) and a.is_floating_point())
    for i, (g, s, w) in enumerate(zip(got, same, want, strict=True)):
        what = f"{name} output {i}"
        assert (g.dtype, g.shape, g.stride()) == (s.dtype, s.shape, s.stride()), what
        if i in exact:
            assert torch.equal(g, s), what
        elif g.numel():
            scale = max(1.0, w.abs().max().item()) if i in summed else 1.0
            tol = dtype if g.dtype == dtype else torch.float64 if g.dtype == torch.float64 else torch.float32
            assert_close(g.double() / scale, w / scale, tol, what)
    return got


SHAPES = [(1, 1), (7, 300), (37, 1030), (0, 16)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("affine", [True, False])
def test_layer_norm(dtype, shape, affine):
    m, n = shape
    x, dy = randn(m, n, dtype=dtype, seed=1, shift=0.5), randn(m, n, dtype=dtype, seed=2)
    w = randn(n, dtype=dtype, seed=3, shift=1.0) if affine else None
    b = randn(n, dtype=dtype, seed=4) if affine else None
    y, mean, rstd = check("layer_norm_fwd", (x, w, b, EPS))
    check("layer_norm_bwd", (dy, x, w, mean, rstd, affine), summed=(1, 2))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("weighted", [True, False])
def test_rms_norm(dtype, shape, weighted):
    m, n = shape
    x, dy = randn(m, n, dtype=dtype, seed=5, shift=0.5), randn(m, n, dtype=dtype, seed=6)
    w = randn(n, dtype=dtype, seed=7, shift=1.0) if weighted else None
    _, rstd = check("rms_norm_fwd", (x, w, EPS))
    check("rms_norm_bwd", (dy, x, w, rstd), summed=(1,))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [*SHAPES, (3, 0), (0, 0)])  # no features: the backward refused a null workspace
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_bias_gelu(dtype, shape, approximate):
    m, n = shape
    x, dy = randn(m, n, dtype=dtype, seed=8, scale=2.0), randn(m, n, dtype=dtype, seed=9)
    b = randn(n, dtype=dtype, seed=10)
    check("bias_gelu_fwd", (x, b, approximate))
    check("bias_gelu_bwd", (dy, x, b, approximate), summed=(1,))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p", [0.0, 0.3, 1.0])
def test_dropout(dtype, p):
    x = randn(5, 7, 33, dtype=dtype, seed=11, shift=3.0)
    check("dropout_fwd", (x, torch.tensor([2024, 2**32 - 600]), p))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("affine", [True, False])
def test_dropout_add_layer_norm(dtype, shape, affine):
    m, n = shape
    x, res, dy = (randn(m, n, dtype=dtype, seed=s) for s in (12, 13, 14))
    w = randn(n, dtype=dtype, seed=15, shift=1.0) if affine else None
    b = randn(n, dtype=dtype, seed=16) if affine else None
    seed = torch.tensor([31337, 2**32 - 3 * n - 1])
    _, mean, rstd = check("dropout_add_layer_norm_fwd", (x, res, w, b, seed, 0.2, EPS))
    check("dropout_add_layer_norm_bwd", (dy, x, res, w, mean, rstd, seed, 0.2, affine), summed=(2, 3))


def test_non_contiguous_inputs_are_made_contiguous():
    x, dy = non_contiguous(randn(9, 40, seed=17)), non_contiguous(randn(9, 40, seed=18))
    w, b = randn(40, seed=19), randn(40, seed=20)
    _, mean, rstd = check("layer_norm_fwd", (x, w, b, EPS))
    check("layer_norm_bwd", (dy, x, w, mean, rstd, True), summed=(1, 2))
    _, rstd = check("rms_norm_fwd", (x, w, EPS))
    check("rms_norm_bwd", (dy, x, w, rstd), summed=(1,))
    check("bias_gelu_bwd", (dy, x, b, "tanh"), summed=(1,))
    check("dropout_fwd", (x, torch.tensor([5]), 0.5))
    _, mean, rstd = check("dropout_add_layer_norm_fwd", (x, dy, w, b, torch.tensor([6]), 0.5, EPS))
    check("dropout_add_layer_norm_bwd", (dy, x, dy, w, mean, rstd, torch.tensor([6]), 0.5, True), summed=(2, 3))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels_last", [False, True])
# The last: 48 channels split into 16-byte packs in every dtype (channels_last takes a pack a thread).
@pytest.mark.parametrize("shape,pool", [((2, 3, 9, 11), (3, 2, 1)), ((3, 33, 6, 8), (2, 2, 0)),
                                        ((2, 48, 7, 9), (3, 2, 1))])
def test_bn_relu_pool(dtype, channels_last, shape, pool):
    k, s, pad = ([v, v] for v in pool)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    x = randn(*shape, dtype=dtype, seed=21, shift=0.3)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    w, b = randn(shape[1], dtype=acc, seed=22, shift=1.0), randn(shape[1], dtype=acc, seed=23)
    rm, rv = randn(shape[1], dtype=acc, seed=24), randn(shape[1], dtype=acc, seed=25).abs() + 0.5
    # bn_stats updates the running statistics in place: each call gets its own copies.
    cuda_stats = on_cuda("bn_stats", x, cuda_rm := rm.clone(), cuda_rv := rv.clone(), 0.1, EPS)
    cpu_stats = C.bn_stats(x.double(), cpu_rm := rm.double(), cpu_rv := rv.double(), 0.1, EPS)
    for got, want, what in zip((*cuda_stats, cuda_rm, cuda_rv), (*cpu_stats, cpu_rm, cpu_rv),
                               ("mean", "invstd", "running_mean", "running_var"), strict=True):
        assert got.dtype == acc, what
        assert_close(got.double(), want, acc, what)
    mean, invstd = cuda_stats
    y, argmax = check("bn_relu_pool_fwd", (x, mean, invstd, w, b, k, s, pad), exact=(1,))
    dy = randn(*y.shape, dtype=dtype, seed=26)
    if channels_last:
        dy = dy.to(memory_format=torch.channels_last)
    for batch_stats in (True, False):
        check("bn_relu_pool_bwd", (dy, argmax, x, mean, invstd, w, b, batch_stats, k, s, pad), summed=(1, 2))
    check("bn_relu_pool_fwd", (x, None, None, None, None, k, s, pad), exact=(1,))


def bn_relu_pool_both_ways(x: torch.Tensor, k: list[int], s: list[int], pad: list[int]) -> torch.Tensor:
    """bn_relu_pool's forward and training backward through the CUDA bindings, set against the CPU kernel; the
    argmax."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    mean, invstd = C.bn_stats(x, None, None, 0.1, EPS)
    w, b = randn(x.shape[1], dtype=acc, seed=32, shift=1.0), randn(x.shape[1], dtype=acc, seed=33)
    y, argmax = check("bn_relu_pool_fwd", (x, mean, invstd, w, b, k, s, pad), exact=(1,))
    dy = randn(*y.shape, dtype=x.dtype, seed=34)
    check("bn_relu_pool_bwd", (dy, argmax, x, mean, invstd, w, b, True, k, s, pad), summed=(1, 2))
    return argmax


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("kernel", [[256, 1], [1, 256], [16, 16]])
def test_bn_relu_pool_takes_a_256_position_window(kernel, channels_last):
    # The most the shared checks accept: the uint8 argmax holds its last position, 255.
    x = randn(2, 3, kernel[0] + 1, kernel[1] + 2, seed=31)
    x[:, :, kernel[0] - 1, kernel[1] - 1] = 10.0
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    argmax = bn_relu_pool_both_ways(x, kernel, kernel, [0, 0])
    assert argmax[:, :, 0, 0].eq(255).all()


# Strides past the padded input: one window on that axis. The first wrapped in a 32-bit int, the others (2^30 and
# more) were refused: the kernel's window arithmetic in int would overflow.
@pytest.mark.parametrize("stride", [[2**32 + 1, 1], [2**30, 3], [1, 2**31 - 1]])
def test_bn_relu_pool_stride_past_the_input(stride):
    bn_relu_pool_both_ways(randn(2, 3, 5, 6, seed=35), [2, 2], stride, [1, 1])


def test_bn_relu_pool_of_no_channels():
    bn_relu_pool_both_ways(randn(2, 0, 4, 4), [2, 2], [2, 2], [0, 0])


@pytest.mark.parametrize("op", ["bn_stats", "bn_relu_pool_bwd"])
def test_bn_reductions_name_the_nchw_channel_limit(op):
    # One grid row of blocks a channel, and the grid has 65535 rows.
    x = randn(2, 65536, 1, 1, seed=36)
    mean, invstd = C.bn_stats(x, None, None, 0.1, EPS)
    y, argmax = C.bn_relu_pool_fwd(x, mean, invstd, None, None, [1, 1], [1, 1], [0, 0])
    args = {"bn_stats": (x, None, None, 0.1, EPS),
            "bn_relu_pool_bwd": (y, argmax, x, mean, invstd, None, None, True, [1, 1], [1, 1], [0, 0])}[op]
    with pytest.raises(RuntimeError, match=f"hetrain.{op}: .*at most 65535 channels of an NCHW x.*channels_last"):
        on_cuda(op, *args)


def test_bad_arguments_get_the_shared_errors():
    x = randn(4, 8)
    with pytest.raises(RuntimeError, match="hetrain.rms_norm"):
        on_cuda("rms_norm_fwd", x, randn(7), EPS)  # a weight of the wrong width
    with pytest.raises(RuntimeError, match="seed"):
        on_cuda("dropout_fwd", x, torch.tensor([1.5]), 0.1)
    with pytest.raises(RuntimeError, match="must be a CUDA tensor"):
        on_cuda("layer_norm_fwd", x.to("meta"), None, None, EPS)
