"""The fused norms normalise over one trailing dimension: a module's ``normalized_shape`` of several is
flattened into one, for the input and the parameters alike."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def normalized_rows(who: str, x: torch.Tensor, normalized_shape: Sequence[int]) -> torch.Tensor:
    """``x`` with its trailing ``normalized_shape`` flattened into one dimension (``x`` itself for one), refusing
    an input that does not end with it, or an empty ``normalized_shape`` (nothing to normalise over), as torch's
    norms do."""
    k = len(normalized_shape)
    if k == 0:
        raise ValueError(f"hetrain.nn.{who}: normalized_shape is empty (nothing to normalise over); give it at "
                         "least one size, e.g. (hidden,) for the input's last dimension")
    if tuple(x.shape[x.dim() - k:]) != tuple(normalized_shape):
        raise ValueError(f"hetrain.nn.{who}: input shape {tuple(x.shape)} does not end with normalized_shape "
                         f"{tuple(normalized_shape)}")
    return x if k == 1 else x.reshape(*x.shape[: x.dim() - k], math.prod(normalized_shape))


def flat(parameter: torch.Tensor | None) -> torch.Tensor | None:
    """A norm's weight or bias as one dimension, or None where the module has none."""
    return None if parameter is None else parameter.reshape(-1)
