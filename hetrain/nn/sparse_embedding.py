"""``nn.Embedding`` whose sparse gradient is built with sorted unique rows, without the padding copy (see
ops.sparse_embedding)."""

from __future__ import annotations

import torch
from torch import nn

from hetrain.nn._share import is_nested
from hetrain.ops.sparse_embedding import sparse_embedding


class Embedding(nn.Embedding):
    """``nn.Embedding`` (same parameters, state_dict and arguments); with ``sparse=True`` and no ``max_norm`` the
    lookup is :func:`hetrain.ops.sparse_embedding.sparse_embedding`, else (and for nested ids, which the op does not
    take) torch's."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 - nn.Embedding's own argument name
        if self.sparse and self.max_norm is None and not self.scale_grad_by_freq and not is_nested(input):
            return sparse_embedding(input, self.weight, self.padding_idx)
        return super().forward(input)
