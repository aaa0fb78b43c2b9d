"""bias + GELU(tanh) forward+backward: eager, torch.compile and hetrain's backend for the device."""

from __future__ import annotations

import torch

from benchmarks.cases import Case, dtype_name, with_cpp_kernels
from hetrain.ops.bias_gelu import bias_gelu


def _make(rows: int, hidden: int, dtype: torch.dtype, device: str, approximate: str):
    def make():
        x = torch.randn(rows, hidden, dtype=dtype, device=device, requires_grad=True)
        b = torch.randn(hidden, dtype=dtype, device=device, requires_grad=True)
        dy = torch.randn(rows, hidden, dtype=dtype, device=device)
        eager = lambda x, b: torch.nn.functional.gelu(x + b, approximate=approximate)
        compiled = torch.compile(eager)
        fused = lambda x, b: bias_gelu(x, b, approximate)

        def step(fn):
            return lambda: torch.autograd.grad(fn(x, b), (x, b), dy)

        impls = {"eager": step(eager), "compile": step(compiled), "hetrain": step(fused)}
        cpp = with_cpp_kernels("bias_gelu", fused, device)
        if cpp is not None:
            impls["hetrain_cuda"] = step(cpp)
        return impls

    return make


def cpu_cases() -> list[Case]:
    rows, hidden = 4096, 3072
    # forward reads x, writes y; backward reads dy and x, writes dx (bias reads are noise).
    return [Case("bias_gelu", f"{rows}x{hidden} tanh", dtype_name(dtype), _make(rows, hidden, dtype, "cpu", "tanh"),
                 5 * rows * hidden * dtype.itemsize) for dtype in (torch.float32, torch.bfloat16)]


def gpu_cases(device: str = "cuda", quick: bool = False) -> list[Case]:
    shapes = [(256, 3072, torch.bfloat16)] if quick else [(16384, 3072, torch.bfloat16), (16384, 3072, torch.float32)]
    return [Case("bias_gelu", f"{rows}x{hidden} tanh", dtype_name(dtype), _make(rows, hidden, dtype, device, "tanh"),
                 5 * rows * hidden * dtype.itemsize) for rows, hidden, dtype in shapes]
