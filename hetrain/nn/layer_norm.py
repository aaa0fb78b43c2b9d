"""``hetrain.nn.LayerNorm``: ``torch.nn.LayerNorm`` with the fused op; same parameters and state_dict."""

from __future__ import annotations

import math

import torch

from hetrain.nn._share import sharing
from hetrain.ops.layer_norm import layer_norm


class LayerNorm(torch.nn.LayerNorm):
    """Drop-in for ``torch.nn.LayerNorm``; a multi-dimensional ``normalized_shape`` is flattened."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = len(self.normalized_shape)
        if tuple(x.shape[x.dim() - k:]) != tuple(self.normalized_shape):
            raise ValueError(f"hetrain.nn.LayerNorm: input shape {tuple(x.shape)} does not end with "
                             f"normalized_shape {tuple(self.normalized_shape)}")
        if k == 1:
            return layer_norm(x, self.weight, self.bias, self.eps)
        flat = x.reshape(*x.shape[: x.dim() - k], math.prod(self.normalized_shape))
        w = self.weight.reshape(-1) if self.weight is not None else None
        b = self.bias.reshape(-1) if self.bias is not None else None
        return layer_norm(flat, w, b, self.eps).view(x.shape)

    @classmethod
    def from_torch(cls, module: torch.nn.LayerNorm) -> LayerNorm:
        """A fused copy sharing ``module``'s parameters (no copy of the data)."""
        return sharing(cls, module)
