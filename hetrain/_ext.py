"""Loads the compiled extension ``hetrain._C`` once, or says clearly why it is missing."""

from __future__ import annotations

import functools
import importlib
import warnings
from types import ModuleType

import torch  # noqa: F401  (loads libtorch, which hetrain._C links against)


@functools.cache
def load() -> ModuleType | None:
    """``hetrain._C`` if it was built, else ``None`` after one warning; its ops live in ``torch.ops.hetrain_C``."""
    try:
        return importlib.import_module("hetrain._C")
    except ImportError as exc:
        warnings.warn(
            f"hetrain: the compiled extension hetrain._C is not available ({exc}); the C++/CUDA backends "
            "are off and ops fall back to Triton or torch. Build it with: pip install -e . --no-build-isolation",
            stacklevel=2,
        )
        return None


def available() -> bool | str:
    """True where ``hetrain._C`` loads; else why not and how to build it (a backend's ``available()`` answer)."""
    return True if load() is not None else "hetrain._C is not built (pip install -e . --no-build-isolation)"


def built_with_cuda() -> bool:
    """Whether ``hetrain._C`` holds the CUDA kernels (built against a CUDA torch with nvcc present)."""
    ext = load()
    return bool(ext is not None and getattr(ext, "WITH_CUDA", False))
