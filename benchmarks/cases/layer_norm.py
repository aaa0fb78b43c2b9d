"""LayerNorm forward+backward: eager, torch.compile, Liger and hetrain's backend for the device (on CUDA also
its C++/CUDA kernels, ``hetrain_cuda``)."""

from __future__ import annotations

import torch

from benchmarks.cases import Case, dtype_name, liger, with_cpp_kernels
from hetrain.ops.layer_norm import layer_norm


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
        cpp = with_cpp_kernels("layer_norm", layer_norm, device)
        if cpp is not None:
            impls["hetrain_cuda"] = step(cpp)
        liger_ln = liger("liger_layer_norm", device)
        if liger_ln is not None:
            impls["liger"] = step(lambda x, w, b: liger_ln(x, w, b, 1e-5))
        return impls

    return make


def cpu_cases() -> list[Case]:
    rows, hidden = 4096, 768
    # forward reads x, writes y; backward reads dy and x, writes dx. bfloat16: what precision auto picks on a
    # CPU with bf16 dot products.
    return [Case("layer_norm", f"{rows}x{hidden}", dtype_name(dtype), _make(rows, hidden, dtype, "cpu"),
                 5 * rows * hidden * dtype.itemsize) for dtype in (torch.float32, torch.bfloat16)]


def gpu_cases(device: str = "cuda", quick: bool = False) -> list[Case]:
    shapes = [(256, 768, torch.bfloat16)] if quick else [
        (16384, 768, torch.bfloat16), (16384, 768, torch.float32), (16384, 4096, torch.float32)]
    return [Case("layer_norm", f"{rows}x{hidden}", dtype_name(dtype), _make(rows, hidden, dtype, device),
                 5 * rows * hidden * dtype.itemsize) for rows, hidden, dtype in shapes]
