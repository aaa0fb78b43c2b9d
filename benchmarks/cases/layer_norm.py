"""LayerNorm forward+backward: eager, torch.compile and hetrain's backend for the device."""

from __future__ import annotations

import torch

from benchmarks.cases import Case
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

        return {"eager": step(eager), "compile": step(compiled), "hetrain": step(layer_norm)}

    return make


def cpu_cases() -> list[Case]:
    rows, hidden = 4096, 768
    elem = 4
    # forward reads x, writes y; backward reads dy and x, writes dx.
    return [Case("layer_norm", f"{rows}x{hidden}", "float32", _make(rows, hidden, torch.float32, "cpu"),
                 5 * rows * hidden * elem)]
