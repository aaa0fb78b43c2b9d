"""``hetrain.nn.LayerNorm``: ``torch.nn.LayerNorm`` with the fused op; same parameters and state_dict."""

from __future__ import annotations

import torch

from hetrain.nn._rows import flat, normalized_rows
from hetrain.nn._share import is_nested, sharing
from hetrain.ops.layer_norm import layer_norm


class LayerNorm(torch.nn.LayerNorm):
    """Drop-in for ``torch.nn.LayerNorm``; a multi-dimensional ``normalized_shape`` is flattened. A nested tensor
    (which the fused op does not take) goes through torch's LayerNorm."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 - nn.LayerNorm's own argument name
        if is_nested(input):
            return super().forward(input)
        rows = normalized_rows("LayerNorm", input, self.normalized_shape)
        if rows is input:
            return layer_norm(input, self.weight, self.bias, self.eps)
        return layer_norm(rows, flat(self.weight), flat(self.bias), self.eps).view(input.shape)

    @classmethod
    def from_torch(cls, module: torch.nn.LayerNorm) -> LayerNorm:
        """A fused copy sharing ``module``'s parameters (no copy of the data); ``module`` is
        refused unless it computes as torch's does (:func:`hetrain.nn._share.refuse_unconvertible`)."""
        return sharing(cls, module)
