"""The standard backends every op family registers, with their devices, priorities and availability."""

from __future__ import annotations

import functools
import importlib
import logging
import os
from types import ModuleType
from typing import Any

import torch

from hetrain import _ext, plugins

log = logging.getLogger(__name__)

# Best first: Triton, then the CUDA C++ kernel, then the C++ CPU kernel, then the plain reference.
# Triton leads on CUDA until a recorded GPU benchmark says otherwise for an op.
PRIORITY = {"triton": 30, "cuda": 25, "cpu": 20, "torch": 0}
# The reference runs wherever torch does: on every device type torch names (a typo still gets a clear error), the
# privateuse1 backend under the name its vendor gives it too. The usual types are named as well, for code that reads
# Backend.devices rather than asking Backend.serves.
TORCH_DEVICES = ("cpu", "cuda", "mps", "xpu", "hpu", plugins.ANY_DEVICE)


def triton_interpreting() -> bool:
    """Under TRITON_INTERPRET=1 Triton kernels run on CPU tensors (how CI checks their numbers)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _import_triton_module(name: str) -> ModuleType | str:
    """The kernels' module, or why it cannot be imported, leaving the Triton backend unavailable rather than stopping
    ``import hetrain`` where the C++ kernels serve. Triton itself may fail with any error (one that finds no driver
    raises RuntimeError); a failure of hetrain's kernel module is a bug or a Triton API it lacks: said with its
    traceback, so that it is not taken for a missing Triton (the tests, which pin the backend, then fail on it)."""
    try:
        importlib.import_module("triton")
    except ImportError as exc:
        return f"triton is not importable ({exc})"
    except Exception as exc:
        return f"triton failed to import ({type(exc).__name__}: {exc})"
    try:
        return importlib.import_module(name)
    except Exception as exc:
        log.warning(f"hetrain: the Triton kernels of {name} failed to import; their backend is off", exc_info=True)
        return f"hetrain's Triton kernels ({name}) failed to import ({type(exc).__name__}: {exc})"


def _triton_available(module: ModuleType | str) -> bool | str:
    if isinstance(module, str):
        return module
    if triton_interpreting():
        return True
    return True if torch.cuda.is_available() else "no CUDA device (CPU tensors go to the C++ backend)"


class OnTheirDevice:
    """A Triton op module whose entry points launch on the GPU their tensors are on.

    Triton launches on the current device, on its current stream. A stage planned on ``cuda:1`` runs its forward
    on a thread whose current device is ``cuda:0``: its kernels would run in the other GPU's context with this
    GPU's pointers. (Autograd's device threads set the device for backward themselves.)
    """

    def __init__(self, module: ModuleType) -> None:
        self._module = module

    def __getattr__(self, name: str) -> Any:
        entry = getattr(self._module, name)
        if not callable(entry):
            return entry

        @functools.wraps(entry)
        def on_their_device(*args: Any, **kwargs: Any) -> Any:
            device = next((a.device for a in args if isinstance(a, torch.Tensor) and a.is_cuda), None)
            if device is None or device.index in (None, torch.cuda.current_device()):
                return entry(*args, **kwargs)
            with torch.cuda.device(device):
                return entry(*args, **kwargs)

        setattr(self, name, on_their_device)  # made once per entry point
        return on_their_device


def register_triton(op: str, module_name: str) -> None:
    """The Triton kernels of ``module_name``: CUDA, and CPU only when pinned under TRITON_INTERPRET=1."""
    module = _import_triton_module(module_name)
    devices = ("cuda", "cpu") if triton_interpreting() else ("cuda",)
    plugins.register(op, "triton", devices, None if isinstance(module, str) else OnTheirDevice(module),
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
    if _ext.built_with_cuda():
        return True
    if torch.version.cuda is None:  # HETRAIN_CUDA=1 alone would fail the build: there is no CUDA torch to build for
        return "hetrain._C was built without CUDA, and torch is a CPU build: install a CUDA build of torch, then " \
               "rebuild with HETRAIN_CUDA=1"
    return "hetrain._C was built without CUDA (HETRAIN_CUDA=1 to build it)"


def register_torch(op: str, impl: Any) -> None:
    """The plain-torch reference ``impl``: always available, on every device type, the last resort."""
    plugins.register(op, "torch", TORCH_DEVICES, impl, PRIORITY["torch"])
