"""hetrain.nn's ``from_*`` constructors take a torch module only when the fused module computes what it does: a
subclass with a forward of its own, or a forward replaced on the instance, is refused with a message saying what to
do (the fused module reads only parameters and settings, so that forward was dropped silently); a subclass keeping
torch's forward is taken. The constructors building a new module refuse hooks (but those that only measure) and a
pruned weight, which it would not take; those copying the module keep both. ``patch`` swaps exact types only, so it
leaves such subclasses alone."""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
import torch.nn.utils.prune
from op_testing import randn

import hetrain
from hetrain.nn import BiasGELU, Dropout, DropoutAddLayerNorm, LayerNorm, LinearCrossEntropyHead, RMSNorm


class LoraLinear(torch.nn.Linear):
    """loralib's Linear: an ``nn.Linear`` whose forward adds a low-rank path."""

    def __init__(self, in_features: int, out_features: int, rank: int = 2) -> None:
        super().__init__(in_features, out_features)
        self.lora_a = torch.nn.Parameter(randn(rank, in_features, seed=5))
        self.lora_b = torch.nn.Parameter(randn(out_features, rank, seed=6))

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 - nn.Linear's own argument name
        return super().forward(input) + input @ self.lora_a.t() @ self.lora_b.t()


class FP32LayerNorm(torch.nn.LayerNorm):
    """OpenAI CLIP's LayerNorm: computes in float32, returns the input's dtype."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 - nn.LayerNorm's own argument name
        return super().forward(input.float()).type(input.dtype)


class ScaledRMSNorm(torch.nn.RMSNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 3


class MCDropout(torch.nn.Dropout):
    """Monte Carlo dropout: drops in eval mode too."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 - nn.Dropout's own argument name
        return F.dropout(input, self.p, training=True)


RESIDUAL = randn(3, 4, seed=2)
TARGET = torch.tensor([0, 3, 1])

# constructor -> (the fused module from a torch module, its torch type, a subclass of that type with its own forward,
# what the torch module computes for x, what the fused module computes for x: the same when the conversion is right)
CONSTRUCTORS = {
    "LayerNorm.from_torch": (LayerNorm.from_torch, torch.nn.LayerNorm, FP32LayerNorm, lambda m, x: m(x),
                             lambda f, x: f(x)),
    "RMSNorm.from_torch": (RMSNorm.from_torch, torch.nn.RMSNorm, ScaledRMSNorm, lambda m, x: m(x), lambda f, x: f(x)),
    "BiasGELU.from_linear": (BiasGELU.from_linear, torch.nn.Linear, LoraLinear, lambda m, x: F.gelu(m(x)),
                             lambda f, x: f(x)),
    "DropoutAddLayerNorm.from_layer_norm": (lambda m: DropoutAddLayerNorm.from_layer_norm(m, 0.25), torch.nn.LayerNorm,
                                            FP32LayerNorm, lambda m, x: m(x + RESIDUAL), lambda f, x: f(x, RESIDUAL)),
    "LinearCrossEntropyHead.from_linear": (LinearCrossEntropyHead.from_linear, torch.nn.Linear, LoraLinear,
                                           lambda m, x: F.cross_entropy(m(x), TARGET), lambda f, x: f(x, TARGET)),
    "Dropout.from_torch": (Dropout.from_torch, torch.nn.Dropout, MCDropout, lambda m, x: m(x), lambda f, x: f(x)),
}


def _make(cls: type[torch.nn.Module]) -> torch.nn.Module:
    torch.manual_seed(0)
    return (cls(0.25) if issubclass(cls, torch.nn.Dropout) else cls(4, 4) if issubclass(cls, torch.nn.Linear)
            else cls(4)).eval()


@pytest.mark.parametrize("name", list(CONSTRUCTORS))
def test_a_constructor_refuses_a_subclass_with_a_forward_of_its_own(name):
    # Accepted, the fused module took its parameters and skipped its forward: a LoRA Linear's low-rank path (whose
    # parameters still sat in the fused module's state_dict), CLIP's float32 LayerNorm, dropout kept on in eval.
    convert, torch_type, subclass, _, _ = CONSTRUCTORS[name]
    message = (rf"{subclass.__name__} overrides torch\.nn\.{torch_type.__name__}\.forward, which the fused module "
               rf"would not run.*keep the {subclass.__name__} as it is")
    with pytest.raises(ValueError, match=message):
        convert(_make(subclass))


@pytest.mark.parametrize("name", list(CONSTRUCTORS))
def test_a_constructor_takes_a_subclass_keeping_torchs_forward(name):
    convert, torch_type, _, compute_torch, compute_fused = CONSTRUCTORS[name]
    tagged = type(f"Tagged{torch_type.__name__}", (torch_type,), {"__repr__": lambda self: "tagged", "tag": 1})
    module = _make(tagged)
    x = randn(3, 4, seed=1)
    torch.testing.assert_close(compute_fused(convert(module), x), compute_torch(module, x))


@pytest.mark.parametrize("name", list(CONSTRUCTORS))
def test_a_constructor_refuses_a_module_whose_forward_was_replaced(name):
    # LinearCrossEntropyHead, DropoutAddLayerNorm and Dropout took it and dropped the adapter; the others refused.
    convert, torch_type, _, _, _ = CONSTRUCTORS[name]
    module = _make(torch_type)
    original = module.forward
    module.forward = lambda inp: original(inp) * 2  # an adapter
    with pytest.raises(ValueError, match=rf"the {torch_type.__name__}'s forward was replaced on the instance"):
        convert(module)


@pytest.mark.parametrize(("convert", "module"), [
    (LayerNorm.from_torch, LayerNorm(4)),
    (RMSNorm.from_torch, RMSNorm(4)),
    (lambda m: DropoutAddLayerNorm.from_layer_norm(m, 0.25), LayerNorm(4)),
    (Dropout.from_torch, Dropout(0.25)),
], ids=["LayerNorm", "RMSNorm", "DropoutAddLayerNorm of a LayerNorm", "Dropout"])
def test_a_constructor_takes_hetrains_drop_in(convert, module):
    convert(module)  # computes as its torch module does, so it is not a subclass with a forward of its own


@pytest.mark.parametrize("convert", [BiasGELU.from_linear, LinearCrossEntropyHead.from_linear],
                         ids=["BiasGELU.from_linear", "LinearCrossEntropyHead.from_linear"])
def test_a_constructor_refuses_a_bias_gelu_as_a_linear(convert):
    # A BiasGELU is a Linear whose forward adds the GELU: the loss head took its weights and dropped the GELU.
    with pytest.raises(ValueError, match=r"hetrain\.nn\.bias_gelu\.BiasGELU overrides torch\.nn\.Linear\.forward"):
        convert(BiasGELU(4, 4))


def test_patch_leaves_a_subclass_with_a_forward_of_its_own_alone():
    # patch swaps exact types only: a fused twin (a norm, or a Linear -> GELU run) would skip the subclass's forward.
    torch.manual_seed(0)
    model = torch.nn.Sequential(FP32LayerNorm(4), LoraLinear(4, 4), torch.nn.GELU(), ScaledRMSNorm(4))
    ref = copy.deepcopy(model)
    report = hetrain.nn.patch(model)
    assert not report.swapped, str(report)
    assert type(model) is torch.nn.Sequential
    assert [type(m) for m in model] == [FP32LayerNorm, LoraLinear, torch.nn.GELU, ScaledRMSNorm]
    x = randn(3, 4, seed=1)
    torch.testing.assert_close(model(x), ref(x))


# The constructors building a new module, which takes the torch module's parameters and settings but not its hooks.
REBUILDING = ["DropoutAddLayerNorm.from_layer_norm", "LinearCrossEntropyHead.from_linear", "Dropout.from_torch"]
# The constructors copying the torch module (hetrain.nn._share.sharing), hooks included.
SHARING = ["LayerNorm.from_torch", "RMSNorm.from_torch", "BiasGELU.from_linear"]


def _doubling_input(module: torch.nn.Module, args: tuple) -> tuple:
    return (args[0] * 2,)


@pytest.mark.parametrize("name", REBUILDING)
def test_a_rebuilding_constructor_refuses_a_hooked_module(name):
    # Taken, the new module dropped the pre-hook: it computed for x what the hooked module computes for x / 2.
    convert, torch_type, _, _, _ = CONSTRUCTORS[name]
    module = _make(torch_type)
    module.register_forward_pre_hook(_doubling_input)
    with pytest.raises(ValueError, match=rf"the {torch_type.__name__} has hooks \(register_forward_pre_hook\), which "
                                         r"the fused module would not run.*register the hooks on it"):
        convert(module)


@pytest.mark.parametrize("register", ["register_forward_hook", "register_full_backward_pre_hook",
                                      "register_full_backward_hook"])
def test_a_rebuilding_constructor_refuses_each_kind_of_hook(register):
    linear = _make(torch.nn.Linear)
    getattr(linear, register)(lambda *args: None)
    with pytest.raises(ValueError, match=rf"the Linear has hooks \({register}\)"):
        LinearCrossEntropyHead.from_linear(linear)


@pytest.mark.parametrize("name", REBUILDING)
def test_a_rebuilding_constructor_takes_a_module_whose_hooks_only_measure(name):
    # hetrain's FLOP, memory and churn hooks (hetrain.nn._share.observer) change nothing the module computes.
    convert, torch_type, _, compute_torch, compute_fused = CONSTRUCTORS[name]
    module = _make(torch_type)
    module.register_forward_hook(hetrain.nn._share.observer(lambda *args: None))
    x = randn(3, 4, seed=1)
    torch.testing.assert_close(compute_fused(convert(module), x), compute_torch(module, x))


@pytest.mark.parametrize("name", SHARING)
def test_a_sharing_constructor_keeps_the_hooks(name):
    convert, torch_type, _, compute_torch, compute_fused = CONSTRUCTORS[name]
    module = _make(torch_type)
    module.register_forward_pre_hook(_doubling_input)
    x = randn(3, 4, seed=1)
    torch.testing.assert_close(compute_fused(convert(module), x), compute_torch(module, x))


@pytest.mark.parametrize("name", ["DropoutAddLayerNorm.from_layer_norm", "LinearCrossEntropyHead.from_linear"])
@pytest.mark.parametrize("tensor", ["weight", "bias"])
def test_a_rebuilding_constructor_refuses_a_pruned_module_until_the_pruning_is_removed(name, tensor):
    # Taken, torch raised its own "cannot assign 'torch.FloatTensor' as parameter 'weight'".
    convert, torch_type, _, compute_torch, compute_fused = CONSTRUCTORS[name]
    module = _make(torch_type)
    torch.nn.utils.prune.l1_unstructured(module, tensor, amount=0.5)
    with pytest.raises(ValueError, match=rf"the {torch_type.__name__}'s {tensor} is pruned.*"
                                         rf"torch\.nn\.utils\.prune\.remove\(module, '{tensor}'\) first"):
        convert(module)
    torch.nn.utils.prune.remove(module, tensor)
    x = randn(3, 4, seed=1)
    torch.testing.assert_close(compute_fused(convert(module), x), compute_torch(module, x))


def test_a_rebuilding_constructor_refuses_a_weight_that_is_not_a_parameter():
    norm = _make(torch.nn.LayerNorm)
    del norm.weight
    norm.register_buffer("weight", torch.ones(4))  # frozen
    with pytest.raises(ValueError, match=r"the LayerNorm's weight is a Tensor, not a torch\.nn\.Parameter"):
        DropoutAddLayerNorm.from_layer_norm(norm, 0.25)


@pytest.mark.parametrize("reparametrize", [torch.nn.utils.spectral_norm, torch.nn.utils.weight_norm])
def test_a_rebuilding_constructor_names_a_weight_a_norm_hook_computes_and_how_to_remove_it(reparametrize):
    # It was called pruned, with advice (prune.remove) that fails on such a module.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # weight_norm's: torch.nn.utils.parametrizations has its own
        linear = reparametrize(_make(torch.nn.Linear))
    with pytest.raises(ValueError, match=r"the Linear's weight is computed before each call by a hook \(spectral_norm "
                                         r"or weight_norm\).*remove_spectral_norm\(module\) or remove_weight_norm"):
        LinearCrossEntropyHead.from_linear(linear)


def test_a_weight_a_norm_hook_computes_is_named_so_when_another_parameter_is_pruned():
    # Pruning of the bias made the spectral_norm weight read as pruned, with advice that fails on it.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        linear = torch.nn.utils.spectral_norm(_make(torch.nn.Linear))
    torch.nn.utils.prune.l1_unstructured(linear, "bias", amount=0.5)
    with pytest.raises(ValueError, match=r"the Linear's weight is computed before each call by a hook"):
        LinearCrossEntropyHead.from_linear(linear)


@pytest.mark.parametrize("name", ["LayerNorm.from_torch", "BiasGELU.from_linear"])
def test_a_sharing_constructor_takes_a_pruned_module(name):
    # The copy keeps the pruning hook, which computes its weight as the torch module's does.
    convert, torch_type, _, compute_torch, compute_fused = CONSTRUCTORS[name]
    module = _make(torch_type)
    torch.nn.utils.prune.l1_unstructured(module, "weight", amount=0.5)
    x = randn(3, 4, seed=1)
    torch.testing.assert_close(compute_fused(convert(module), x), compute_torch(module, x))
