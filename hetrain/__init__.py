"""hetrain: fused ops, ring-buffer data loading, Lightning callbacks and placement for heterogeneous machines."""

from hetrain import _ext, plugins

__version__ = "0.1.0"

_ext.load()  # registers torch.ops.hetrain_C, or warns once that the C++ backends are off

from hetrain import nn, ops  # noqa: E402

__all__ = ["nn", "ops", "plugins", "__version__"]
