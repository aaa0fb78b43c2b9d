"""LayerNorm forward+backward: eager, torch.compile and hetrain's backend for the device.

On CUDA also ``hetrain_cuda``: the C++/CUDA kernels (csrc/cuda) with their C++ autograd, pinned, beside the
Triton kernels hetrain picks by default, so a run shows which of the two a GPU should prefer.
"""

from __future__ import annotations

import torch

from benchmarks.cases import Case, dtype_name, liger
from hetrain import _ext, plugins
from hetrain.ops.layer_norm import layer_norm


def _cuda_kernels(x, w, b):
    with plugins.use_backend(layer_norm="cuda"):
        return layer_norm(x, w, b)


def _make(rows: int, hidden: int, dtype: torch.dtype, device: str):
    def make():
        x = torch.randn(rows, hidden, dtype=dtype, device=device, requires_grad=True)
        w = torch.randn(hidden, dtype=dtype, device=device, requires_grad=True)
        b = torch.randn(hidden, dtype=dtype, device=device, requires_grad=True)
        dy = torch.randn(rows, hidden, dtype=dtype, device=device)
        eager = lambda x, w, b: torch.nn.functional.layer_norm(x, (hidden,), w, b)
        compiled = torch.compile(eager)

        def step(fn):
            return lambda: torch.autograd.grad(fn(x, w, b), (x, w, b), dy)

        impls = {"eager": step(eager), "compile": step(compiled), "hetrain": step(layer_norm)}
        if x.is_cuda and _ext.built_with_cuda():
            impls["hetrain_cuda"] = step(_cuda_kernels)
        liger_ln = liger("liger_layer_norm", device)
        if liger_ln is not None:
            impls["liger"] = step(lambda x, w, b: liger_ln(x, w, b, 1e-5))
        return impls

    return make


def cpu_cases() -> list[Case]:
    rows, hidden = 4096, 768
    elem = 4
    # forward reads x, writes y; backward reads dy and x, writes dx.
    return [Case("layer_norm", f"{rows}x{hidden}", "float32", _make(rows, hidden, torch.float32, "cpu"),
                 5 * rows * hidden * elem)]


def gpu_cases(device: str = "cuda", quick: bool = False) -> list[Case]:
    shapes = [(256, 768, torch.bfloat16)] if quick else [
        (16384, 768, torch.bfloat16), (16384, 768, torch.float32), (16384, 4096, torch.float32)]
    return [Case("layer_norm", f"{rows}x{hidden}", dtype_name(dtype), _make(rows, hidden, dtype, device),
                 5 * rows * hidden * dtype.itemsize) for rows, hidden, dtype in shapes]
