"""Building a fused module around a torch module's own parameters, so a swap copies no data; and when a fused
run of modules must run them one by one instead."""

from __future__ import annotations

import copy
import types
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch.nn.modules.module import _WrappedHook
from torch.nn.utils import prune

M = TypeVar("M", bound=torch.nn.Module)
H = TypeVar("H")


def require(who: str, module: object, torch_type: type[torch.nn.Module]) -> None:
    """Refuses a module of another type, naming it: its attributes would be read as if it were ``torch_type``."""
    if not isinstance(module, torch_type):
        raise ValueError(f"{who}: needs a torch.nn.{torch_type.__name__}, got {type(module).__name__}")


def refuse_parametrized(who: str, module: torch.nn.Module) -> None:
    """Refuses a module with ``torch.nn.utils.parametrize`` parametrizations: its ``weight`` (etc.) is computed on
    each read from tensors under ``module.parametrizations``, which a fused module taking its parameters would not
    hold, so it would fail later far from the cause."""
    if torch.nn.utils.parametrize.is_parametrized(module):
        names = ", ".join(module.parametrizations)
        raise ValueError(f"{who}: {type(module).__name__} has parametrizations on {names} "
                         "(torch.nn.utils.parametrize), which the fused module would not compute; build the fused "
                         "module before registering them and register them on the fused module, or keep the torch "
                         "module")


def is_nested(x: object) -> bool:
    """Whether ``x`` is a nested tensor: torch's modules take them (some layouts), hetrain's fused ops do not, so a
    fused module computes it as its torch module does."""
    return isinstance(x, torch.Tensor) and x.is_nested


def refuse_own_forward(who: str, module: torch.nn.Module, torch_type: type[torch.nn.Module],
                       drop_ins: tuple[type[torch.nn.Module], ...] = ()) -> None:
    """Refuses a subclass of ``torch_type`` whose class defines a forward of its own (a LoRA Linear adding its
    low-rank path, CLIP's LayerNorm computing in float32): the fused module reads only its parameters and settings,
    so that forward would be skipped silently. A subclass keeping ``torch_type``'s forward is taken, and so is one
    keeping the forward of a class in ``drop_ins`` (hetrain's drop-ins, which compute as ``torch_type`` does)."""
    forward = type(module).forward
    if forward is torch_type.forward or any(forward is drop_in.forward for drop_in in drop_ins):
        return
    name = f"{type(module).__module__}.{type(module).__qualname__}"
    raise ValueError(f"{who}: {name} overrides torch.nn.{torch_type.__name__}.forward, which the fused module would "
                     f"not run (it takes only the parameters and settings); keep the {type(module).__name__} as it "
                     f"is, or fuse a torch.nn.{torch_type.__name__} (or a subclass keeping its forward)")


def refuse_replaced_forward(who: str, module: torch.nn.Module) -> None:
    """Refuses a module whose forward was replaced on the instance (an adapter): kept, it would run instead of the
    fused forward; dropped, the adapter would be lost."""
    if forward_replaced(module):
        raise ValueError(f"{who}: the {type(module).__name__}'s forward was replaced on the instance (an adapter or "
                         "wrapper), which the fused module would not run; keep the torch module, or build the "
                         "fused one from it before the forward is replaced and replace the fused one's")


def refuse_unconvertible(who: str, module: object, torch_type: type[torch.nn.Module],
                         drop_ins: tuple[type[torch.nn.Module], ...] = ()) -> None:
    """What every ``from_*`` constructor checks, so each refuses the same modules: one not of ``torch_type``, a
    parametrized one, one whose forward its class (:func:`refuse_own_forward`) or its instance replaced."""
    require(who, module, torch_type)
    refuse_parametrized(who, module)
    refuse_own_forward(who, module, torch_type, drop_ins)
    refuse_replaced_forward(who, module)


def refuse_unconvertible_anew(who: str, module: object, torch_type: type[torch.nn.Module],
                              drop_ins: tuple[type[torch.nn.Module], ...] = (),
                              parameters: tuple[str, ...] = ()) -> None:
    """What a ``from_*`` constructor building a new module (not :func:`sharing`) checks: what
    :func:`refuse_unconvertible` does, then what the new module would not take from ``module``: a parameter among
    ``parameters`` computed on each call (pruning) and hooks (:func:`refuse_hooks`)."""
    refuse_unconvertible(who, module, torch_type, drop_ins)
    for name in parameters:
        refuse_computed_parameter(who, module, name)
    refuse_hooks(who, module)


def refuse_computed_parameter(who: str, module: torch.nn.Module, name: str) -> None:
    """Refuses a module whose ``name`` is a tensor but not a parameter (a buffer, or one pruned with
    ``torch.nn.utils.prune``, computed before each call from ``<name>_orig`` and ``<name>_mask``): a new module
    takes it as its parameter, which torch refuses, and would not compute it."""
    value = getattr(module, name, None)
    if value is None or isinstance(value, torch.nn.Parameter):
        return
    kind = type(module).__name__
    if any(isinstance(hook, prune.BasePruningMethod) and hook._tensor_name == name  # this tensor's, not another's
           for hook in module._forward_pre_hooks.values()):
        raise ValueError(f"{who}: the {kind}'s {name} is pruned (torch.nn.utils.prune): a hook computes it before "
                         f"each call from {name}_orig and {name}_mask, which the fused module would not do; call "
                         f"torch.nn.utils.prune.remove(module, '{name}') first to make the pruning permanent (the "
                         f"fused module then takes the pruned {name}), or keep the {kind}")
    if isinstance(module._parameters.get(f"{name}_orig"), torch.nn.Parameter) or hasattr(module, f"{name}_g"):
        raise ValueError(f"{who}: the {kind}'s {name} is computed before each call by a hook (spectral_norm or "
                         f"weight_norm), which the fused module would not do; remove it first "
                         f"(torch.nn.utils.remove_spectral_norm(module) or remove_weight_norm(module)) to keep "
                         f"the {name} it computes, or keep the {kind}")
    raise ValueError(f"{who}: the {kind}'s {name} is a {type(value).__name__}, not a torch.nn.Parameter, which the "
                     f"fused module would hold as its parameter; register it as one "
                     f"(module.{name} = torch.nn.Parameter(...)), or keep the {kind}")


def refuse_hooks(who: str, module: torch.nn.Module) -> None:
    """Refuses a module with forward or backward hooks for a fused module that is a new module, not a copy
    (:func:`sharing` copies the hooks): those hooks would be dropped silently, and one may change what the module
    computes (a pre-hook scaling its input). Hooks that only measure (:func:`observer`) are left out, as
    :func:`called_one_by_one` leaves them."""
    registered = [register for name, register in _HOOKS.items() if _expect_calls(getattr(module, name, None))]
    if registered:
        kind = type(module).__name__
        raise ValueError(f"{who}: the {kind} has hooks ({', '.join(registered)}), which the fused module would not "
                         f"run (it is a new module, holding only the {kind}'s parameters and settings); build the "
                         f"fused module first and register the hooks on it, or keep the {kind}")


def sharing(cls: type[M], module: torch.nn.Module, *, drop_in: bool = True) -> M:
    """An instance of ``cls`` (a subclass of a torch module type) holding ``module``'s parameters, buffers and
    settings; ``module`` must be of that torch type, and is checked by :func:`refuse_unconvertible` (``drop_in``:
    ``cls`` computes as that torch type does, so a module of ``cls`` is taken too).

    Its dicts and sets (parameters, buffers, hooks, bookkeeping) are its own copies, so it starts with
    ``module``'s hooks, but a hook or buffer registered on one afterwards is not registered on the other.
    The compiled call ``module.compile()`` set is left behind: it is bound to ``module`` (kept, the new one would
    run ``module``'s forward); the new one runs uncompiled, computing its own forward, until it is compiled
    itself."""
    torch_type = next(c for c in cls.__mro__ if c.__module__.startswith("torch.nn."))
    refuse_unconvertible(f"hetrain.nn.{cls.__name__}", module, torch_type, (cls,) if drop_in else ())
    new = cls.__new__(cls)
    new.__dict__ = {name: copy.copy(value) if isinstance(value, dict | set) else value
                    for name, value in module.__dict__.items()}
    new._compiled_call_impl = None
    _rewrap_load_hooks(new, module)
    return new


def _rewrap_load_hooks(new: torch.nn.Module, module: torch.nn.Module) -> None:
    """In ``new``'s load_state_dict pre-hooks, each registered on ``module`` with
    ``register_load_state_dict_pre_hook`` wrapped anew around ``new``: torch wraps such a hook with a weak reference
    to the module it was registered on, which it is called with, so it would see ``module`` and fail once that is
    collected. The wrapper objects are replaced, not changed, as ``module`` (or another copy) may hold them too."""
    hooks = new._load_state_dict_pre_hooks
    for key, hook in list(hooks.items()):
        if isinstance(hook, _WrappedHook) and hook.with_module and hook.module() is module:
            hooks[key] = _WrappedHook(hook.hook, new)


def taking_hooks_of(new: M, module: torch.nn.Module) -> M:
    """``new`` reading and writing ``module``'s own hook dicts, not copies: for ``patch``, whose twin takes
    ``module``'s place, so a handle from ``module.register_forward_hook`` (etc.) still removes its hook. A
    load_state_dict pre-hook registered on ``module`` is called with ``new``, the module in the model."""
    for name, value in module.__dict__.items():
        if "hooks" in name and isinstance(value, dict):
            setattr(new, name, value)
    _rewrap_load_hooks(new, module)
    return new


# Each module hook dict -> the method that registers its hooks.
_HOOKS = {"_forward_pre_hooks": "register_forward_pre_hook", "_forward_hooks": "register_forward_hook",
          "_backward_pre_hooks": "register_full_backward_pre_hook", "_backward_hooks": "register_full_backward_hook"}
_GLOBAL_HOOKS = tuple(f"_global{name}" for name in _HOOKS)


def forward_replaced(module: torch.nn.Module) -> bool:
    """Whether ``module``'s forward was replaced on the instance (a LoRA adapter patched in that way, accelerate's
    ``add_hook_to_module``, offload or cast wrappers): a fused kernel would compute its type's forward instead."""
    return "forward" in module.__dict__


# id of each marked hook (or object) -> a weak reference to it, checked to be that very object (an id is reused once
# its object is gone). Identity, not an attribute on the hook: an object whose attribute lookup forwards or invents
# names (a MagicMock, a proxy) would read as marked, and a fused run would skip the user's hook.
_OBSERVERS: dict[int, weakref.ref] = {}


def observer(hook: H) -> H:
    """Marks ``hook`` as a module hook that only measures (hetrain's FLOP, memory and churn hooks): a fused run
    goes on fused while it is registered, so turning a measurement on does not change the numbers a step computes.
    A method marked where it is defined is marked on every instance (a bound method is looked up by its function);
    an object marked (the ModuleTracker of hetrain's FLOP counter) marks the hooks bound to it. What a fused run
    computes without calling a module is measured under the fused module."""
    key = id(hook)
    _OBSERVERS[key] = weakref.ref(hook, lambda _ref: _OBSERVERS.pop(key, None))
    return hook


def _marked(obj: object) -> bool:
    ref = _OBSERVERS.get(id(obj))
    return ref is not None and ref() is obj


def _only_observes(hook: Callable[..., Any]) -> bool:
    # A hook bound to a marked object: the ModuleTracker whose global hooks hetrain's FLOP counter tracks modules
    # with. Another ModuleTracker (a user's, or a plain FlopCounterMode's) expects the modules it tracks called.
    if isinstance(hook, types.MethodType):
        return _marked(hook.__func__) or _marked(hook.__self__)
    return _marked(hook)


def _expect_calls(hooks: dict[int, Callable[..., Any]] | None) -> bool:
    # Mostly empty: checked first, as this runs in every fused block's forward.
    return bool(hooks) and any(not _only_observes(hook) for hook in hooks.values())


def called_one_by_one(modules: list[torch.nn.Module]) -> bool:
    """Whether each of ``modules`` must be called: hooks expect it (their own, or hooks registered for every module,
    ``register_module_forward_hook``), or its forward was replaced on the instance; a fused run would skip them
    silently. Hooks that only measure (:func:`observer`: hetrain's FLOP counter, memory and churn hooks) are left
    out: measuring a step must not change what it computes."""
    everywhere = torch.nn.modules.module
    return any(_expect_calls(getattr(everywhere, name, None)) for name in _GLOBAL_HOOKS) or any(
        forward_replaced(m) or any(_expect_calls(getattr(m, name, None)) for name in _HOOKS) for m in modules)
