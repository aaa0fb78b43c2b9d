"""Drop-in fused modules and ``patch(model)``."""

from hetrain.nn.layer_norm import LayerNorm
from hetrain.nn.patch import PatchReport, patch
from hetrain.nn.rms_norm import RMSNorm

__all__ = ["LayerNorm", "PatchReport", "RMSNorm", "patch"]
