"""``hetrain.nn.DropoutAddLayerNorm``: ``LayerNorm(Dropout(x) + residual)`` in one op, with LayerNorm's parameters."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hetrain.nn._share import is_nested, refuse_unconvertible_anew
from hetrain.nn.layer_norm import LayerNorm
from hetrain.ops import _args
from hetrain.ops.dropout_add_layer_norm import dropout_add_layer_norm


class DropoutAddLayerNorm(torch.nn.Module):
    """The post-LN sublayer output of BERT, ``norm(dropout(x) + residual)``, as one fused op.

    Holds a ``LayerNorm(hidden)``'s ``weight`` and ``bias`` under the same state_dict keys, so an
    ``nn.LayerNorm`` checkpoint loads into it. Dropout is active in ``train()`` mode only. The call
    takes two tensors, so it replaces a pattern in a model's ``forward`` (dropout, add, norm), not a
    single module: build it with :meth:`from_layer_norm` and call it where that pattern stood. Nested tensors
    (which the fused op does not take) go through torch's dropout, add and layer_norm.
    """

    def __init__(self, hidden: int, p: float = 0.1, eps: float = 1e-5, elementwise_affine: bool = True,
                 bias: bool = True, device=None, dtype=None) -> None:
        super().__init__()
        who = "hetrain.nn.DropoutAddLayerNorm"
        if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 0:
            raise ValueError(f"{who}: hidden must be a size >= 0, got {hidden!r}")
        self.hidden, self.p, self.eps = hidden, _args.probability(who, p), _args.eps_value(who, eps)
        factory = {"device": device, "dtype": dtype}
        self.register_parameter("weight", torch.nn.Parameter(torch.ones(hidden, **factory))
                                if elementwise_affine else None)
        self.register_parameter("bias", torch.nn.Parameter(torch.zeros(hidden, **factory))
                                if elementwise_affine and bias else None)

    def reset_parameters(self) -> None:
        """LayerNorm's initialisation: weight ones, bias zeros (init code that calls it on every module reaches
        this one too)."""
        if self.weight is not None:
            torch.nn.init.ones_(self.weight)
        if self.bias is not None:
            torch.nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        if is_nested(x) or is_nested(residual):
            return F.layer_norm(F.dropout(x, self.p, self.training) + residual, (self.hidden,), self.weight,
                                self.bias, self.eps)
        # Without weight and bias the op has no size to check the input against (torch's LayerNorm refuses).
        if isinstance(x, torch.Tensor) and tuple(x.shape[-1:]) != (self.hidden,):
            raise ValueError(f"hetrain.nn.DropoutAddLayerNorm: given hidden={self.hidden}, expected input with shape "
                             f"(*, {self.hidden}), got {tuple(x.shape)}; pass inputs whose last dimension is "
                             f"{self.hidden}, or build the module with the inputs' last size as hidden")
        return dropout_add_layer_norm(x, residual, self.weight, self.bias, self.p, self.eps, self.training)

    def extra_repr(self) -> str:
        return (f"{self.hidden}, p={self.p}, eps={self.eps}, elementwise_affine={self.weight is not None}, "
                f"bias={self.bias is not None}")

    @classmethod
    def from_layer_norm(cls, norm: torch.nn.LayerNorm, p: float) -> DropoutAddLayerNorm:
        """Fuses ``dropout(p)`` + add into ``norm``, sharing its parameters (no copy of the data); ``norm`` is
        refused unless it computes as torch's does, and with hooks or a pruned weight, which the new module would
        not take (:func:`hetrain.nn._share.refuse_unconvertible_anew`)."""
        who = "hetrain.nn.DropoutAddLayerNorm.from_layer_norm"
        refuse_unconvertible_anew(who, norm, torch.nn.LayerNorm, (LayerNorm,), parameters=("weight", "bias"))
        if len(norm.normalized_shape) != 1:
            raise ValueError(f"hetrain.nn.DropoutAddLayerNorm: needs a LayerNorm over one dimension, got "
                             f"normalized_shape {tuple(norm.normalized_shape)}")
        new = cls(norm.normalized_shape[0], p, norm.eps, elementwise_affine=False)
        new.train(norm.training)  # swapped into an eval model, dropout must stay off
        new.register_parameter("weight", norm.weight)
        new.register_parameter("bias", norm.bias)
        return new
