"""dropout + residual add + LayerNorm forward+backward: eager, torch.compile and hetrain's backend."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from benchmarks.cases import Case, dtype_name, with_cpp_kernels
from hetrain.ops.dropout_add_layer_norm import dropout_add_layer_norm


def _make(rows: int, hidden: int, p: float, dtype: torch.dtype, device: str):
    def make():
        x = torch.randn(rows, hidden, dtype=dtype, device=device, requires_grad=True)
        r = torch.randn(rows, hidden, dtype=dtype, device=device, requires_grad=True)
        w = torch.randn(hidden, dtype=dtype, device=device, requires_grad=True)
        b = torch.randn(hidden, dtype=dtype, device=device, requires_grad=True)
        dy = torch.randn(rows, hidden, dtype=dtype, device=device)
        eager = lambda x, r, w, b: F.layer_norm(F.dropout(x, p) + r, (hidden,), w, b)
        compiled = torch.compile(eager)
        fused = lambda x, r, w, b: dropout_add_layer_norm(x, r, w, b, p)

        def step(fn):
            return lambda: torch.autograd.grad(fn(x, r, w, b), (x, r, w, b), dy)

        impls = {"eager": step(eager), "compile": step(compiled), "hetrain": step(fused)}
        cpp = with_cpp_kernels("dropout_add_layer_norm", fused, device)
        if cpp is not None:
            impls["hetrain_cuda"] = step(cpp)
        return impls

    return make


def cpu_cases() -> list[Case]:
    rows, hidden, p = 4096, 768, 0.1
    # forward reads x and residual, writes y; backward reads dy, x and residual, writes dx and dresidual.
    return [Case("dropout_add_layer_norm", f"{rows}x{hidden} p={p}", dtype_name(dtype),
                 _make(rows, hidden, p, dtype, "cpu"), 8 * rows * hidden * dtype.itemsize)
            for dtype in (torch.float32, torch.bfloat16)]


def gpu_cases(device: str = "cuda", quick: bool = False) -> list[Case]:
    shapes = [(256, 768, torch.bfloat16)] if quick else [(16384, 768, torch.bfloat16), (16384, 768, torch.float32)]
    # forward reads x and residual, writes y; backward reads dy, x and residual, writes dx and dresidual.
    return [Case("dropout_add_layer_norm", f"{rows}x{hidden} p=0.1", dtype_name(dtype),
                 _make(rows, hidden, 0.1, dtype, device), 8 * rows * hidden * dtype.itemsize)
            for rows, hidden, dtype in shapes]
