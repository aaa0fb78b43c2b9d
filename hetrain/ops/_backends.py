"""The standard backends every op family registers, with their devices, priorities and availability."""

from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import Any

from hetrain import _ext, plugins

# Best first: Triton, then the CUDA C++ kernel, then the C++ CPU kernel, then the plain reference.
# Triton leads on CUDA until a recorded GPU benchmark says otherwise for an op.
PRIORITY = {"triton": 30, "cuda": 25, "cpu": 20, "torch": 0}
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

    return True if torch.cuda.is_available() else "no CUDA device (CPU tensors go to the C++ backend)"


def register_triton(op: str, module_name: str) -> None:
    module = _import_triton_module(module_name)
    devices = ("cuda", "cpu") if triton_interpreting() else ("cuda",)
    plugins.register(op, "triton", devices, None if isinstance(module, str) else module,
                     PRIORITY["triton"], lambda: _triton_available(module), opt_in=("cpu",))


def register_cpp(op: str, impl: Any, devices: tuple[str, ...] = ("cpu", "cuda")) -> None:
    """The C++ kernels of hetrain._C: a ``cpu`` backend (csrc/) and a ``cuda`` backend (csrc/cuda/), each
    available only where its part of the extension was built; ``devices`` names the ones the op has."""
    for device in devices:
        available = _ext.available if device == "cpu" else _cuda_ext_available
        plugins.register(op, device, (device,), impl, PRIORITY[device], available)


def _cuda_ext_available() -> bool | str:
    if _ext.load() is None:
        return _ext.available()
    return True if _ext.built_with_cuda() else "hetrain._C was built without CUDA (HETRAIN_CUDA=1 to build it)"


def register_torch(op: str, impl: Any) -> None:
    plugins.register(op, "torch", TORCH_DEVICES, impl, PRIORITY["torch"])
