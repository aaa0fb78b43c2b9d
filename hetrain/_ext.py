"""Loads the compiled extension ``hetrain._C`` once, or says clearly why it is missing."""

from __future__ import annotations

import functools
import importlib
import warnings
from pathlib import Path
from types import ModuleType

import torch  # noqa: F401  (loads libtorch, which hetrain._C links against)

# The version of hetrain._C's ops these sources call; csrc/bindings.cpp exports the one it was built with as
# hetrain._C.ABI_VERSION. Bump both together whenever an op is added to hetrain._C or an op's schema or meaning
# changes, so that an extension built from older sources (a git pull without a rebuild) is refused as stale
# rather than failing on every call of an op it lacks.
ABI_VERSION = 4

BUILD_COMMAND = "pip install -e . --no-build-isolation"

_PACKAGE_DIR = Path(__file__).parent
_error: str | None = None  # why load() found no usable hetrain._C


def _built() -> bool:
    """Whether a built hetrain._C file lies in the package (so a failure to load it is not "not built")."""
    return any(_PACKAGE_DIR.glob("_C*.so")) or any(_PACKAGE_DIR.glob("_C*.pyd"))


def stale_reason(module: ModuleType) -> str | None:
    """Why ``module`` (an imported hetrain._C) was built from other sources than these, or None if it was not."""
    built = getattr(module, "ABI_VERSION", None)
    if built == ABI_VERSION:
        return None
    found = "has no ABI version" if built is None else f"has ABI version {built}"
    return f"a stale build: it {found}, these sources expect {ABI_VERSION}"


@functools.cache
def load() -> ModuleType | None:
    """``hetrain._C`` if it was built from these sources, else ``None`` after one warning (:func:`load_error` says
    why); its ops live in ``torch.ops.hetrain_C``."""
    global _error
    try:
        module = importlib.import_module("hetrain._C")
        _error = stale_reason(module)
    except ImportError as exc:
        module = None
        _error = f"present but failed to load: {exc}" if _built() else "not built"
    if _error is None:
        return module
    warnings.warn(
        f"hetrain: the compiled extension hetrain._C is not available ({_error}); the C++/CUDA backends "
        f"are off and ops fall back to Triton or torch; {_fix()}",
        stacklevel=2,
    )
    return None


def load_error() -> str | None:
    """Why hetrain._C cannot be used: "not built", "present but failed to load: <error>" or "a stale build: ...";
    None where it loads."""
    load()
    return _error


def _fix() -> str:
    return f"{'build' if _error == 'not built' else 'rebuild'} it with: {BUILD_COMMAND}"


def available() -> bool | str:
    """True where ``hetrain._C`` loads; else why not and how to build it (a backend's ``available()`` answer)."""
    if load() is not None:
        return True
    return f"hetrain._C is {_error} ({_fix()})"


def built_with_cuda() -> bool:
    """Whether ``hetrain._C`` holds the CUDA kernels (built against a CUDA torch with nvcc present)."""
    ext = load()
    return bool(ext is not None and getattr(ext, "WITH_CUDA", False))
