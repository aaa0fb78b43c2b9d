"""Drop-in fused modules and ``patch(model)``."""

from hetrain.nn.layer_norm import LayerNorm
from hetrain.nn.linear_cross_entropy import LinearCrossEntropyHead
from hetrain.nn.patch import PatchReport, patch
from hetrain.nn.rms_norm import RMSNorm

__all__ = ["LayerNorm", "LinearCrossEntropyHead", "PatchReport", "RMSNorm", "patch"]
