"""Fused operators: each is a ``torch.library`` custom op whose backend the registry picks per device."""

from hetrain.ops.bias_gelu import bias_gelu, bias_gelu_ref
from hetrain.ops.conv_bn_relu_pool import (
    bn_relu_pool,
    bn_relu_pool_ref,
    conv_bn_relu_pool,
    conv_relu_pool,
    relu_pool,
    relu_pool_ref,
)
from hetrain.ops.dropout import dropout, dropout_ref
from hetrain.ops.dropout_add_layer_norm import dropout_add_layer_norm, dropout_add_layer_norm_ref
from hetrain.ops.layer_norm import layer_norm, layer_norm_ref
from hetrain.ops.linear_cross_entropy import linear_cross_entropy, linear_cross_entropy_ref
from hetrain.ops.rms_norm import rms_norm, rms_norm_ref

# Imported so its backends register (hetrain.env lists them); an optimizer step for hetrain.optim, not an op:
# left out of __all__, which hetrain.checks.tolerances reads as the list of ops.
from hetrain.ops.sparse_adamw import sparse_adamw_ as sparse_adamw_

__all__ = [
    "bias_gelu", "bias_gelu_ref", "bn_relu_pool", "bn_relu_pool_ref", "conv_bn_relu_pool", "conv_relu_pool",
    "relu_pool", "relu_pool_ref", "dropout", "dropout_ref", "dropout_add_layer_norm", "dropout_add_layer_norm_ref",
    "layer_norm", "layer_norm_ref", "linear_cross_entropy", "linear_cross_entropy_ref", "rms_norm", "rms_norm_ref",
]
