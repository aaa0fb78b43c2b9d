"""Drop-in fused modules and ``patch(model)``."""

from hetrain.nn.layer_norm import LayerNorm
from hetrain.nn.patch import PatchReport, patch

__all__ = ["LayerNorm", "PatchReport", "patch"]
