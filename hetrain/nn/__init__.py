"""Drop-in fused modules and ``patch(model)``."""

from hetrain.nn.bias_gelu import BiasGELU
from hetrain.nn.conv_bn_relu_pool import ConvBNReLUPool2d, ConvReLUPool2d
from hetrain.nn.dropout import Dropout
from hetrain.nn.dropout_add_layer_norm import DropoutAddLayerNorm
from hetrain.nn.layer_norm import LayerNorm
from hetrain.nn.linear_cross_entropy import LinearCrossEntropyHead
from hetrain.nn.patch import PatchReport, patch
from hetrain.nn.rms_norm import RMSNorm
from hetrain.nn.sparse_embedding import Embedding

__all__ = [
    "BiasGELU",
    "ConvBNReLUPool2d",
    "ConvReLUPool2d",
    "Dropout",
    "DropoutAddLayerNorm",
    "Embedding",
    "LayerNorm",
    "LinearCrossEntropyHead",
    "PatchReport",
    "RMSNorm",
    "patch",
]
