"""``hetrain.nn.RMSNorm``: ``torch.nn.RMSNorm`` with the fused op; same parameters and state_dict."""

from __future__ import annotations

import torch

from hetrain.nn._rows import flat, normalized_rows
from hetrain.nn._share import is_nested, sharing
from hetrain.ops.rms_norm import rms_norm


class RMSNorm(torch.nn.RMSNorm):
    """Drop-in for ``torch.nn.RMSNorm``; a multi-dimensional ``normalized_shape`` is flattened. A nested tensor
    (which the fused op does not take) goes through torch's RMSNorm."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if is_nested(x):
            return super().forward(x)
        rows = normalized_rows("RMSNorm", x, self.normalized_shape)
        if rows is x:
            return rms_norm(x, self.weight, self.eps)
        return rms_norm(rows, flat(self.weight), self.eps).view(x.shape)

    @classmethod
    def from_torch(cls, module: torch.nn.RMSNorm) -> RMSNorm:
        """A fused copy sharing ``module``'s parameters (no copy of the data); ``module`` is
        refused unless it computes as torch's does (:func:`hetrain.nn._share.refuse_unconvertible`)."""
        return sharing(cls, module)
