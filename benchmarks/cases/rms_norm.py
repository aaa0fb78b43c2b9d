"""RMSNorm forward+backward: eager, torch.compile and hetrain's backend for the device."""

from __future__ import annotations

import torch

from benchmarks.cases import Case, dtype_name, liger, with_cpp_kernels
from hetrain.ops.rms_norm import rms_norm


def _make(rows: int, hidden: int, dtype: torch.dtype, device: str):
    def make():
        x = torch.randn(rows, hidden, dtype=dtype, device=device, requires_grad=True)
        w = torch.randn(hidden, dtype=dtype, device=device, requires_grad=True)
        dy = torch.randn(rows, hidden, dtype=dtype, device=device)
        eager = lambda x, w: torch.nn.functional.rms_norm(x, (hidden,), w)
        compiled = torch.compile(eager)

        def step(fn):
            return lambda: torch.autograd.grad(fn(x, w), (x, w), dy)

        impls = {"eager": step(eager), "compile": step(compiled), "hetrain": step(rms_norm)}
        cpp = with_cpp_kernels("rms_norm", rms_norm, device)
        if cpp is not None:
            impls["hetrain_cuda"] = step(cpp)
        liger_rms = liger("liger_rms_norm", device)
        if liger_rms is not None:
            impls["liger"] = step(lambda x, w: liger_rms(x, w, 1e-6, in_place=False))
        return impls

    return make


def cpu_cases() -> list[Case]:
    rows, hidden = 4096, 768
    # forward reads x, writes y; backward reads dy and x, writes dx.
    return [Case("rms_norm", f"{rows}x{hidden}", dtype_name(dtype), _make(rows, hidden, dtype, "cpu"),
                 5 * rows * hidden * dtype.itemsize) for dtype in (torch.float32, torch.bfloat16)]


def gpu_cases(device: str = "cuda", quick: bool = False) -> list[Case]:
    shapes = [(256, 768, torch.bfloat16)] if quick else [(16384, 768, torch.bfloat16), (16384, 4096, torch.float32)]
    return [Case("rms_norm", f"{rows}x{hidden}", dtype_name(dtype), _make(rows, hidden, dtype, device),
                 5 * rows * hidden * dtype.itemsize) for rows, hidden, dtype in shapes]
