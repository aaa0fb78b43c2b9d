"""The standard backends every op family registers, with their devices, priorities and availability."""

from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import Any

from hetrain import _ext, plugins

# Best first: a GPU kernel, then the C++ kernel, then the plain reference.
PRIORITY = {"triton": 30, "cuda": 30, "cpu": 20, "torch": 0}
# The reference runs wherever torch does; the list is explicit so an unserved device gets a clear error.
TORCH_DEVICES = ("cpu", "cuda", "mps", "xpu", "hpu", "privateuseone")


def triton_interpreting() -> bool:
    """Under TRITON_INTERPRET=1 Triton kernels run on CPU tensors (how CI checks their numbers)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _import_triton_module(name: str) -> ModuleType | str:
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        return f"triton is not importable ({exc})"


def _triton_available(module: ModuleType | str) -> bool | str:
    if isinstance(module, str):
        return module
    if triton_interpreting():
        return True
    import torch

    return True if torch.cuda.is_available() else "no CUDA device (set TRITON_INTERPRET=1 to run on the CPU)"


def register_triton(op: str, module_name: str) -> None:
    module = _import_triton_module(module_name)
    devices = ("cuda", "cpu") if triton_interpreting() else ("cuda",)
    plugins.register(op, "triton", devices, None if isinstance(module, str) else module,
                     PRIORITY["triton"], lambda: _triton_available(module), opt_in=("cpu",))


def register_cpp(op: str, impl: Any, devices: tuple[str, ...]) -> None:
    name = "cuda" if devices == ("cuda",) else "cpu"
    plugins.register(op, name, devices, impl, PRIORITY[name], _ext.available)


def register_torch(op: str, impl: Any) -> None:
    plugins.register(op, "torch", TORCH_DEVICES, impl, PRIORITY["torch"])
