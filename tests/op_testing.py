"""Shared helpers for op tests: random inputs that are never zeros, and per-dtype tolerances."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# Largest allowed error against the float64 reference, per dtype of the inputs: (atol, rtol).
TOLERANCES = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (2e-5, 2e-5),
    torch.float16: (4e-3, 4e-3),
    torch.bfloat16: (4e-2, 3e-2),
}


def randn(*shape: int, dtype=torch.float32, seed: int = 0, scale: float = 1.0, shift: float = 0.0,
          requires_grad: bool = False) -> torch.Tensor:
    """Seeded normal values in ``dtype``; ``shift`` moves the mean off zero so a missing mean term shows."""
    g = torch.Generator().manual_seed(seed)
    t = (torch.randn(*shape, generator=g, dtype=torch.float64) * scale + shift).to(dtype)
    return t.requires_grad_(requires_grad)


def non_contiguous(t: torch.Tensor) -> torch.Tensor:
    """The same values in a strided view (every other column of a wider tensor)."""
    wide = torch.empty(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
    wide[..., ::2] = t.detach()
    view = wide[..., ::2]
    assert not view.is_contiguous()
    return view.requires_grad_(t.requires_grad)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


class OpLog(TorchDispatchMode):
    """Names of the ops dispatched below Python: a custom op shows as ``hetrain.*``, a kernel as ``hetrain_C.*``."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def largest(reference: torch.Tensor) -> float:
    """What a small summed gradient (a mean-reduced loss's) is compared relative to: its reference's largest entry,
    1 where that is all zero. The norms' tests divide by max(1, largest) instead: their sums are of order 1 to 50,
    and a sum that is 0 in exact arithmetic (a row of one feature) is ~1e-17 in float64, which no relative
    comparison can match; below 1, a floor of 1 would pass gradients of a few hundredths even if they were 0."""
    return (reference.abs().max().item() or 1.0) if reference.numel() else 1.0
