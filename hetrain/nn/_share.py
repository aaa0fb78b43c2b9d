"""Building a fused module around a torch module's own parameters, so a swap copies no data; and when a fused
run of modules must run them one by one instead."""

from __future__ import annotations

from typing import TypeVar

import torch

M = TypeVar("M", bound=torch.nn.Module)


def require(who: str, module: object, torch_type: type[torch.nn.Module]) -> None:
    """Refuses a module of another type, naming it: its attributes would be read as if it were ``torch_type``."""
    if not isinstance(module, torch_type):
        raise ValueError(f"{who}: needs a torch.nn.{torch_type.__name__}, got {type(module).__name__}")


def sharing(cls: type[M], module: torch.nn.Module) -> M:
    """An instance of ``cls`` (a subclass of a torch module type) holding ``module``'s parameters, buffers and
    settings; ``module`` must be of that torch type."""
    torch_type = next(c for c in cls.__mro__ if c.__module__.startswith("torch.nn."))
    require(f"hetrain.nn.{cls.__name__}", module, torch_type)
    new = cls.__new__(cls)
    new.__dict__ = module.__dict__.copy()
    new._parameters = dict(module._parameters)
    new._buffers = dict(module._buffers)
    new._modules = dict(module._modules)
    return new


_HOOKS = ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks")
_GLOBAL_HOOKS = tuple(f"_global{name}" for name in _HOOKS)


def called_one_by_one(modules: list[torch.nn.Module]) -> bool:
    """Whether hooks expect each of ``modules`` to be called: their own, or hooks registered for every module
    (``register_module_forward_hook``, torch's module tracker), which a fused run would skip silently."""
    everywhere = torch.nn.modules.module
    return any(getattr(everywhere, name, None) for name in _GLOBAL_HOOKS) or any(
        getattr(m, name, None) for m in modules for name in _HOOKS)
