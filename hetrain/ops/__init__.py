"""Fused operators: each is a ``torch.library`` custom op whose backend the registry picks per device."""

from hetrain.ops.layer_norm import layer_norm, layer_norm_ref
from hetrain.ops.rms_norm import rms_norm, rms_norm_ref

__all__ = ["layer_norm", "layer_norm_ref", "rms_norm", "rms_norm_ref"]
