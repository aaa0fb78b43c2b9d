"""``hetrain.nn.Dropout``: ``torch.nn.Dropout`` whose mask is regenerated in backward instead of stored."""

from __future__ import annotations

import torch

from hetrain.nn._share import is_nested, refuse_unconvertible_anew
from hetrain.ops.dropout import dropout


class Dropout(torch.nn.Dropout):
    """A drop-in ``torch.nn.Dropout`` (same constructor, no state) running :func:`hetrain.ops.dropout`.

    Saves a byte per element of activation memory in training against torch's dropout, which keeps
    its mask for backward. ``inplace=True`` writes the result into ``x`` and returns ``x``, as torch's
    does, so code that goes on using ``x`` sees the dropout (the kernel still writes a new tensor first).
    A nested tensor (which the fused op does not take) goes through torch's dropout.
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 - nn.Dropout's own argument name
        if is_nested(input):
            return super().forward(input)
        out = dropout(input, self.p, self.training)
        return input.copy_(out) if self.inplace and out is not input else out

    @classmethod
    def from_torch(cls, module: torch.nn.Dropout) -> Dropout:
        """The fused twin of ``module``, with its ``p`` and training mode. Only a ``torch.nn.Dropout``: Dropout1d/2d/3d
        (whole channels) and AlphaDropout (SELU's statistics kept) are not element-wise dropout; ``module`` is
        refused unless it computes as torch's does, and with hooks, which the new module would not take
        (:func:`hetrain.nn._share.refuse_unconvertible_anew`)."""
        refuse_unconvertible_anew(f"hetrain.nn.{cls.__name__}", module, torch.nn.Dropout, (cls,))
        new = cls(module.p, module.inplace)
        new.train(module.training)
        return new
