"""Argument checks the ops' functional faces share, so one mistake gets one wording whichever op it reaches.

They run on every eager call, so they read only Python attributes: no tensor value is looked at (on a GPU that
would wait for the device).
"""

from __future__ import annotations

import math
import numbers

import torch

from hetrain.ops._op import compute_dtype


def rows_input(op: str, x: object, what: str = "x") -> int:
    """The last dimension of ``x``, a floating tensor with at least one dimension."""
    if not isinstance(x, torch.Tensor) or x.dim() == 0 or not x.is_floating_point():
        got = f"shape {tuple(x.shape)} {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{op}: {what} must be a floating tensor with >= 1 dim, got {got}")
    return x.shape[-1]


def require_tensor(op: str, what: str, v: object, expected: str) -> None:
    """Refuses a ``v`` that is no tensor (``expected`` says what it must be) before any ``.dim()``/``.shape`` is read:
    a list or None was an AttributeError naming neither op nor argument."""
    if not isinstance(v, torch.Tensor):
        raise ValueError(f"{op}: {what} must be {expected}, got {type(v).__name__}; torch.as_tensor({what}) "
                         "converts one")


def floating_input(op: str, x: object, what: str = "x") -> torch.Tensor:
    """``x``, a floating tensor of any shape (0-d included)."""
    require_tensor(op, what, x, "a floating tensor")
    if not x.is_floating_point():
        raise ValueError(f"{op}: {what} must be a floating tensor, got {x.dtype}")
    return x


def vector(op: str, what: str, t: object, x: torch.Tensor, when_missing: str | None = None) -> torch.Tensor | None:
    """``t``, a per-feature parameter of ``x`` (shape ``(x.shape[-1],)``, floating, on x's device), in x's dtype.

    ``None`` is returned as it is, unless ``when_missing`` is given: then it is an error saying that.
    """
    n = x.shape[-1]
    if t is None:
        if when_missing is not None:
            raise ValueError(f"{op}: {what} is required (shape ({n},)); {when_missing}")
        return None
    require_tensor(op, what, t, f"a torch.Tensor of shape ({n},)")
    if t.dim() != 1 or t.shape[0] != n:
        raise ValueError(f"{op}: {what} must have shape ({n},) to match x's last dimension, got {tuple(t.shape)} "
                         f"(x is {tuple(x.shape)})")
    if not t.is_floating_point():
        raise ValueError(f"{op}: {what} must be a floating tensor, got {t.dtype}")
    if t.device != x.device:
        raise ValueError(f"{op}: {what} is on {t.device} but x is on {x.device}")
    return t.to(x.dtype) if t.dtype != x.dtype else t


def is_number(value: object) -> bool:
    """A plain or NumPy real number; not a bool (True would read as 1), not a tensor (its value needs a sync)."""
    kind = type(value)
    if kind is float or kind is int:  # the usual case first: the ABC check costs 0.3 us a call
        return True
    return isinstance(value, numbers.Real) and not isinstance(value, bool | torch.Tensor)


_FLOAT32_MAX = torch.finfo(torch.float32).max


def eps_value(op: str, eps: object, dtype: torch.dtype | None = None) -> float:
    """``eps`` as a float: a finite number >= 0. A NaN used to pass a ``< 0`` check and give NaN outputs.

    With ``dtype``, the input's, also finite in the dtype the kernels add it in (``compute_dtype``: float32 unless
    float64): an eps past float32's range became inf there, and every row of a float32, bf16 or fp16 input NaN.
    """
    # Comparisons, not math.isfinite: under torch.compile(dynamic=True) eps may be a symbolic float, which they guard
    # on and isfinite cannot trace (a graph break). NaN fails both.
    if not is_number(eps) or not 0 <= eps < math.inf:
        raise ValueError(f"{op}: eps must be a finite number >= 0, got {eps!r}")
    if dtype is not None and compute_dtype(dtype) == torch.float32 and eps > _FLOAT32_MAX:
        raise ValueError(f"{op}: eps must be at most {_FLOAT32_MAX!r} (torch.finfo(torch.float32).max) for {dtype} "
                         f"inputs, whose statistics are computed in float32, got {eps!r}; pass a smaller eps, or "
                         "float64 inputs")
    return float(eps)


def probability(op: str, p: object) -> float:
    """A dropout probability as a float in [0, 1]; NumPy numbers are taken, a tensor is refused naming the fix."""
    if isinstance(p, torch.Tensor):
        raise ValueError(f"{op}: p must be a Python number in [0, 1], got a tensor; pass float(p)")
    if not is_number(p) or not 0.0 <= p <= 1.0:  # a NaN fails both comparisons
        raise ValueError(f"{op}: p must be a number in [0, 1], got {p!r}")
    return float(p)
