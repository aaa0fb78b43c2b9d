"""Dropout forward+backward: eager ``F.dropout``, torch.compile and hetrain's backend (mask regenerated, not stored)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from benchmarks.cases import Case, dtype_name, with_cpp_kernels
from hetrain.ops.dropout import dropout


def _make(rows: int, hidden: int, p: float, dtype: torch.dtype, device: str):
    def make():
        x = torch.randn(rows, hidden, dtype=dtype, device=device, requires_grad=True)
        dy = torch.randn(rows, hidden, dtype=dtype, device=device)
        eager = lambda x: F.dropout(x, p)
        compiled = torch.compile(eager)
        fused = lambda x: dropout(x, p)

        def step(fn):
            return lambda: torch.autograd.grad(fn(x), (x,), dy)

        impls = {"eager": step(eager), "compile": step(compiled), "hetrain": step(fused)}
        cpp = with_cpp_kernels("dropout", fused, device)
        if cpp is not None:
            impls["hetrain_cuda"] = step(cpp)
        return impls

    return make


def _bytes(rows: int, hidden: int, itemsize: int) -> int:
    # forward reads x, writes y; backward reads dy, writes dx (the mask is regenerated, never read).
    return 4 * rows * hidden * itemsize


def cpu_cases() -> list[Case]:
    rows, hidden, p = 4096, 768, 0.1
    return [Case("dropout", f"{rows}x{hidden} p={p}", dtype_name(dtype), _make(rows, hidden, p, dtype, "cpu"),
                 _bytes(rows, hidden, dtype.itemsize)) for dtype in (torch.float32, torch.bfloat16)]


def gpu_cases(device: str = "cuda", quick: bool = False) -> list[Case]:
    shapes = [(256, 768, torch.bfloat16)] if quick else [(16384, 768, torch.bfloat16), (16384, 768, torch.float32)]
    return [Case("dropout", f"{rows}x{hidden} p=0.1", dtype_name(dtype), _make(rows, hidden, 0.1, dtype, device),
                 _bytes(rows, hidden, dtype.itemsize)) for rows, hidden, dtype in shapes]
