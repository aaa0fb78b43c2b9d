"""``swap_sequences(model)``: fuses Conv2d -> BatchNorm2d -> ReLU -> MaxPool2d (and Conv2d -> ReLU -> MaxPool2d,
Linear -> GELU) runs of consecutive children of any ``nn.Sequential`` in a model, in place.

Where the fused block goes: it takes the convolution's index and the modules it absorbed are replaced
by ``nn.Identity``, so no later index moves; a ``BiasGELU`` keeps the Linear's own keys. The
Sequential's state_dict keeps its unpatched layout (``3.weight``, ``4.running_mean``, ... rather than
``3.0.weight``, ``3.1.running_mean``): a state_dict hook renames the fused block's keys back to its
siblings' names, and a load hook accepts either form. Checkpoints therefore load into the patched and
the unpatched model alike, both ways.

Only exact ``nn.Sequential`` containers and exact torch layer types are matched (a subclass may change
its forward); a run the kernels cannot take (e.g. ``MaxPool2d(ceil_mode=True)``), or one with module hooks,
is left alone.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from hetrain.nn.bias_gelu import BiasGELU
from hetrain.nn.conv_bn_relu_pool import ConvBNReLUPool2d, ConvReLUPool2d, unfusable_reason


def _conv_block_ok(modules: list[nn.Module]) -> bool:
    bn = modules[1] if len(modules) == 4 else None
    return unfusable_reason(modules[0], bn, modules[-2], modules[-1]) is None


def _bias_gelu(linear: nn.Linear, gelu: nn.GELU) -> BiasGELU:
    return BiasGELU.from_linear(linear, gelu.approximate)


# (types of the run, builder of the fused module, whether the kernels can take this particular run)
_RUNS: tuple[tuple[tuple[type, ...], Callable[..., nn.Module], Callable[[list[nn.Module]], bool]], ...] = (
    ((nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d), ConvBNReLUPool2d.from_modules, _conv_block_ok),
    ((nn.Conv2d, nn.ReLU, nn.MaxPool2d), ConvReLUPool2d.from_modules, _conv_block_ok),
    ((nn.Linear, nn.GELU), _bias_gelu, lambda modules: modules[0].bias is not None),
)
_SPANS = "_hetrain_fused_spans"  # on a patched Sequential: fused child name -> the sibling names it spans


_HOOKS = ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks")


def _hooked(module: nn.Module) -> bool:
    """Whether ``module`` has hooks of its own: fused, they would see the block's tensors (a Linear's hook
    would get the GELU's output) or never run (the GELU, BatchNorm, ReLU and pool), so the run is left alone."""
    return any(getattr(module, name, None) for name in _HOOKS)


def _fusable(types: tuple[type, ...], ok: Callable[[list[nn.Module]], bool], modules: list[nn.Module]) -> bool:
    if len(modules) != len(types) or any(type(m) is not t for m, t in zip(modules, types, strict=True)):
        return False
    return not any(_hooked(m) for m in modules) and ok(modules)


def swap_sequences(model: nn.Module) -> dict[str, str]:
    """Replaces every fusable run in place; returns {path of the fused block: what it replaced}."""
    report: dict[str, str] = {}
    for path, seq in list(model.named_modules()):
        if type(seq) is not nn.Sequential:
            continue
        items = list(seq._modules.items())
        i = 0
        while i < len(items):
            for types, build, ok in _RUNS:
                names = [name for name, _ in items[i:i + len(types)]]
                modules = [m for _, m in items[i:i + len(types)]]
                if _fusable(types, ok, modules):
                    _swap(seq, names, build(*modules))
                    where = f"{path}.{names[0]}" if path else names[0]
                    report[where] = (" -> ".join(t.__name__ for t in types)
                                     + f" -> hetrain.nn.{type(seq._modules[names[0]]).__name__}")
                    i += len(types)
                    break
            else:
                i += 1
    return report


def _swap(seq: nn.Sequential, names: list[str], fused: nn.Module) -> None:
    setattr(seq, names[0], fused)
    for name in names[1:]:
        setattr(seq, name, nn.Identity())
    if not fused._modules:  # the fused module is its first part (BiasGELU is the Linear): keys unchanged
        return
    if not hasattr(seq, _SPANS):
        setattr(seq, _SPANS, {})
        seq.register_state_dict_post_hook(_flatten_keys)
        seq.register_load_state_dict_pre_hook(_nest_keys)
    getattr(seq, _SPANS)[names[0]] = list(names)


def _renames(seq: nn.Sequential, prefix: str) -> list[tuple[str, str, set[str]]]:
    """(fused child's prefix for part j, the sibling prefix it had before patching, part j's own keys)."""
    out = []
    for fused_name, siblings in getattr(seq, _SPANS).items():
        fused = seq._modules[fused_name]
        for (part_name, part), sibling in zip(fused._modules.items(), siblings, strict=True):
            keys = set(part.state_dict(keep_vars=True))
            out.append((f"{prefix}{fused_name}.{part_name}", f"{prefix}{sibling}", keys))
    return out


def _rename_in_place(state_dict: dict, mapping: Callable[[str], str]) -> None:
    """Renames keys without moving any key's place in the order (``_metadata``, module versions only, stays)."""
    items = list(state_dict.items())
    state_dict.clear()
    for key, value in items:
        state_dict[mapping(key)] = value


def _flatten_keys(seq: nn.Sequential, state_dict: dict, prefix: str, _local_metadata: dict) -> None:
    renames = _renames(seq, prefix)

    def flat(key: str) -> str:
        for nested, sibling, _keys in renames:
            if key.startswith(nested + "."):
                return sibling + key[len(nested):]
        return key

    _rename_in_place(state_dict, flat)


def _nest_keys(seq: nn.Sequential, state_dict: dict, prefix: str, *_args) -> None:
    renames = _renames(seq, prefix)

    def nested(key: str) -> str:
        for nest, sibling, keys in renames:
            if key.startswith(sibling + ".") and key[len(sibling) + 1:] in keys:
                return nest + key[len(sibling):]
        return key

    _rename_in_place(state_dict, nested)
