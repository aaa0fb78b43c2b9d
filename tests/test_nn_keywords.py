"""hetrain.nn's drop-ins take what their torch twins take: the input by the keyword torch names it (``input``), so
code that calls ``layer(input=x)`` keeps working after ``hetrain.nn.patch``; nested tensors; and their constructors
refuse a parametrized torch module they could not convert."""

import copy

import pytest
import torch
import torch.nn.functional as F
from op_testing import randn
from torch.nn.utils import parametrize

import hetrain
from hetrain.nn import (
    BiasGELU,
    ConvBNReLUPool2d,
    ConvReLUPool2d,
    Dropout,
    DropoutAddLayerNorm,
    Embedding,
    LayerNorm,
    LinearCrossEntropyHead,
    RMSNorm,
)


def _patched(model: torch.nn.Module) -> torch.nn.Module:
    hetrain.nn.patch(model)
    return model


MODULES = {
    "LayerNorm": (lambda: LayerNorm(6), (3, 6)),
    "BiasGELU": (lambda: BiasGELU(6, 5), (3, 6)),
    "Dropout": (lambda: Dropout(0.25).eval(), (3, 6)),
    "ConvBNReLUPool2d": (lambda: ConvBNReLUPool2d(2, 3, 3, padding=1), (2, 2, 6, 6)),
    "ConvReLUPool2d": (lambda: ConvReLUPool2d(2, 3, 3, padding=1), (2, 2, 6, 6)),
    "patched Sequential": (lambda: _patched(torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.GELU())), (3, 6)),
}


@pytest.mark.parametrize("name", list(MODULES))
def test_a_module_takes_its_input_by_torchs_keyword(name):
    make, shape = MODULES[name]
    torch.manual_seed(0)
    module = make()
    x = randn(*shape, seed=1)
    torch.testing.assert_close(module(input=x), module(x))  # was a TypeError: no argument named 'input'


# Nested tensors: torch's modules take them (LayerNorm also the strided layout), the fused ops do not, so hetrain's
# modules compute them as their torch modules do. Each entry: the torch module, and its hetrain twin built from a copy.
NESTED = {
    "LayerNorm": (lambda: torch.nn.LayerNorm(6), LayerNorm.from_torch),
    "RMSNorm": (lambda: torch.nn.RMSNorm(6), RMSNorm.from_torch),
    "BiasGELU": (lambda: torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.GELU(approximate="tanh")),
                 lambda seq: BiasGELU.from_linear(seq[0], "tanh")),
    "Dropout": (lambda: torch.nn.Dropout(0.25), Dropout.from_torch),
    "patched Sequential": (lambda: torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.GELU()), _patched),
}


def _jagged(offsets: torch.Tensor, seed: int, width: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    values = randn(int(offsets[-1]), width, seed=seed, requires_grad=True)
    return torch.nested.nested_tensor_from_jagged(values, offsets), values


@pytest.mark.parametrize("name", list(NESTED))
def test_a_module_computes_a_jagged_nested_tensor_as_its_torch_module(name):
    make, fuse = NESTED[name]
    torch.manual_seed(0)
    ref = make()
    fused = fuse(copy.deepcopy(ref))
    offsets = torch.tensor([0, 2, 5])
    results = []
    for module in (ref, fused):
        x, values = _jagged(offsets, seed=1)
        torch.manual_seed(2)  # the same dropout mask for both
        y = module(x)  # was NotImplementedError: hetrain.<op>_fwd.default
        assert y.is_nested
        dy = torch.nested.nested_tensor_from_jagged(randn(*y.values().shape, seed=3), y.offsets())
        y.backward(dy)
        results.append([y.values().detach(), values.grad, *(p.grad for p in module.parameters())])
    torch.testing.assert_close(results[1], results[0])


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")  # the strided layout's prototype notice
@pytest.mark.parametrize("name", ["LayerNorm", "BiasGELU", "patched Sequential"])
def test_a_module_computes_a_strided_nested_tensor_as_its_torch_module(name):
    make, fuse = NESTED[name]
    torch.manual_seed(0)
    ref = make()
    fused = fuse(copy.deepcopy(ref))
    x = torch.nested.nested_tensor([randn(2, 6, seed=1), randn(3, 6, seed=2)])
    y = fused(x)  # was RuntimeError: NestedTensorImpl doesn't support sizes
    assert y.is_nested
    torch.testing.assert_close(y.unbind(), ref(x).unbind())


def test_dropout_add_layer_norm_computes_jagged_nested_tensors_as_torchs_ops():
    torch.manual_seed(0)
    norm = torch.nn.LayerNorm(6)
    fused = DropoutAddLayerNorm.from_layer_norm(copy.deepcopy(norm), 0.25)
    offsets = torch.tensor([0, 2, 5])
    results = []
    for compute, module in ((lambda x, r: norm(F.dropout(x, 0.25) + r), norm), (fused, fused)):
        (x, x_values), (residual, r_values) = _jagged(offsets, seed=1), _jagged(offsets, seed=4)
        torch.manual_seed(2)
        y = compute(x, residual)  # was NotImplementedError: hetrain.dropout_add_layer_norm_fwd.default
        y.backward(torch.nested.nested_tensor_from_jagged(randn(*y.values().shape, seed=3), y.offsets()))
        results.append([y.values().detach(), x_values.grad, r_values.grad, module.weight.grad, module.bias.grad])
    torch.testing.assert_close(results[1], results[0])


class _Double(torch.nn.Module):
    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return 2 * w


PARAMETRIZED = {  # constructor -> the torch module it converts
    "LayerNorm.from_torch": (LayerNorm.from_torch, lambda: torch.nn.LayerNorm(4)),
    "RMSNorm.from_torch": (RMSNorm.from_torch, lambda: torch.nn.RMSNorm(4)),
    "BiasGELU.from_linear": (BiasGELU.from_linear, lambda: torch.nn.Linear(4, 4)),
    "DropoutAddLayerNorm.from_layer_norm": (lambda m: DropoutAddLayerNorm.from_layer_norm(m, 0.1),
                                            lambda: torch.nn.LayerNorm(4)),
    "LinearCrossEntropyHead.from_linear": (LinearCrossEntropyHead.from_linear, lambda: torch.nn.Linear(4, 4)),
}


@pytest.mark.parametrize("name", list(PARAMETRIZED))
def test_a_constructor_refuses_a_parametrized_module(name):
    # Accepted, it built a module failing at its first call (AttributeError: no attribute 'weight') or at once with
    # a TypeError far from the cause.
    convert, make = PARAMETRIZED[name]
    module = make()
    parametrize.register_parametrization(module, "weight", _Double())
    with pytest.raises(ValueError, match=r"has parametrizations on weight .*build the fused module before"):
        convert(module)


def test_patch_leaves_a_parametrized_module_alone():
    norm = torch.nn.LayerNorm(4)
    parametrize.register_parametrization(norm, "weight", _Double())
    model = torch.nn.Sequential(norm, torch.nn.Linear(4, 4), torch.nn.GELU())
    parametrize.register_parametrization(model[1], "weight", _Double())
    assert not hetrain.nn.patch(model).swapped
    assert model[0] is norm and type(model) is torch.nn.Sequential


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")  # the strided layout's prototype notice
@pytest.mark.parametrize("layout", [torch.strided, torch.jagged])
def test_a_sparse_embedding_looks_up_nested_ids_as_torchs(layout):
    torch.manual_seed(0)
    ref = torch.nn.Embedding(10, 4, sparse=True)
    fused = Embedding(10, 4, sparse=True)
    fused.load_state_dict(ref.state_dict())
    ids = torch.nested.nested_tensor([torch.tensor([1, 7, 3]), torch.tensor([0, 9, 9, 2, 5])], layout=layout)
    y = fused(ids)  # the strided layout was RuntimeError: NestedTensorImpl doesn't support sizes
    assert y.is_nested
    torch.testing.assert_close(y.unbind(), ref(ids).unbind())
