"""hetrain.nn's drop-ins take their input by the keyword their torch twin names it (``input``), so code that calls
``layer(input=x)`` keeps working after ``hetrain.nn.patch``."""

import pytest
import torch
from op_testing import randn

import hetrain
from hetrain.nn import BiasGELU, ConvBNReLUPool2d, ConvReLUPool2d, Dropout, LayerNorm


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
