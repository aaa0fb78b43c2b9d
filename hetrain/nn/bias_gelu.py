"""``hetrain.nn.BiasGELU``: a Linear whose epilogue (bias add + GELU) is fused; same state_dict as ``nn.Linear``."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hetrain.nn._share import is_nested, sharing
from hetrain.ops.bias_gelu import APPROXIMATIONS, bias_gelu


class BiasGELU(torch.nn.Linear):
    """``gelu(linear(x))`` as ``bias_gelu(x @ W^T, b)``: the matmul runs without its bias, whose add is
    fused into the activation, so ``x @ W^T + b`` is never written out or kept for backward.

    A subclass of ``torch.nn.Linear`` with the same parameters, so Linear checkpoints load as they are.
    Without a bias, or for a nested tensor (which the fused op does not take), it is ``gelu(linear(x))`` with
    torch's own ops.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, approximate: str = "none",
                 device=None, dtype=None) -> None:
        if approximate not in APPROXIMATIONS:
            raise ValueError(f"hetrain.nn.BiasGELU: approximate must be 'none' or 'tanh', got {approximate!r}")
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.approximate = approximate

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 - nn.Linear's own argument name
        if is_nested(input):
            return F.gelu(F.linear(input, self.weight, self.bias), approximate=self.approximate)
        y = F.linear(input, self.weight)
        if self.bias is None:
            return F.gelu(y, approximate=self.approximate)
        return bias_gelu(y, self.bias, self.approximate)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, approximate={self.approximate!r}"

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear, approximate: str = "none") -> BiasGELU:
        """A fused ``gelu(linear(x))`` sharing ``linear``'s parameters (no copy of the data); ``linear`` is
        refused unless it computes as torch's does (:func:`hetrain.nn._share.refuse_unconvertible`)."""
        if approximate not in APPROXIMATIONS:
            raise ValueError(f"hetrain.nn.BiasGELU: approximate must be 'none' or 'tanh', got {approximate!r}")
        new = sharing(cls, linear, drop_in=False)  # its forward adds the GELU
        new.approximate = approximate
        return new
