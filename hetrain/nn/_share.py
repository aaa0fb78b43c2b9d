"""Building a fused module around a torch module's own parameters, so a swap copies no data."""

from __future__ import annotations

from typing import TypeVar

import torch

M = TypeVar("M", bound=torch.nn.Module)


def sharing(cls: type[M], module: torch.nn.Module) -> M:
    """An instance of ``cls`` (a subclass of ``type(module)``) holding ``module``'s parameters, buffers and settings."""
    new = cls.__new__(cls)
    new.__dict__ = module.__dict__.copy()
    new._parameters = dict(module._parameters)
    new._buffers = dict(module._buffers)
    new._modules = dict(module._modules)
    return new
