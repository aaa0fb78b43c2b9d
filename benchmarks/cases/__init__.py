"""Benchmark cases, one module per op family; each defines ``cpu_cases()`` and ``gpu_cases(device, quick)``.

The runner walks this package, so a new op's benchmark is picked up by adding its module here. On CUDA an
op with C++/CUDA kernels is also timed preferring them (``hetrain_cuda``) beside hetrain's default.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class Case:
    """One op at one shape: ``make()`` builds fresh random inputs and returns {impl name: fwd+bwd callable}.

    ``bytes_moved`` counts each input read once and each output written once, forward and backward,
    so GB/s can be set against the copy bandwidth measured in the same run. ``backend_op``: the hetrain.plugins
    op the "hetrain" column runs, where it is not named ``op`` (a conv block's epilogue is ``bn_relu_pool``).
    """

    op: str
    shape: str
    dtype: str
    make: Callable[[], dict[str, Callable[[], object]]]
    bytes_moved: int
    notes: dict[str, str] = field(default_factory=dict)
    backend_op: str | None = None


def discover(kind: str = "cpu", **options: object) -> list[Case]:
    """Every module's ``<kind>_cases(**options)``, in module order."""
    cases: list[Case] = []
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{__name__}.{info.name}")
        factory = getattr(module, f"{kind}_cases", None)
        if factory is not None:
            cases.extend(factory(**options))
    return cases


def backend_of(case: Case, device: str) -> str | None:
    """The backend hetrain.plugins picks for ``case``'s "hetrain" column on ``device``, as this process's
    environment makes it pick (HETRAIN_PREFER, HETRAIN_BACKEND, a missing or stale hetrain._C): a result names
    what it timed. None for a case that calls no plugins op (the ring's gather calls hetrain._C itself)."""
    from hetrain import plugins

    op = case.backend_op or case.op
    return plugins.select(op, device).name if op in plugins.ops() else None


def extension_status() -> str:
    """Whether hetrain._C loaded, or why not ("not built", "a stale build: ..."), for a result's header."""
    from hetrain import _ext

    return _ext.load_error() or "loaded"


def liger(name: str, device: str) -> Callable | None:
    """A Liger-Kernel function as a baseline, on CUDA where its wheel is installed; never a dependency."""
    if not device.startswith("cuda"):
        return None
    try:
        from liger_kernel.transformers import functional
    except ImportError:
        return None
    return getattr(functional, name, None)


def with_cpp_kernels(op: str, fn: Callable, device: str) -> Callable | None:
    """``fn`` on hetrain's C++/CUDA kernels (their autograd in C++), timed as ``hetrain_cuda`` beside the default;
    None where they would change nothing: off CUDA, on a build without them, or where ``op`` has none or picks
    them already. Pinned, not preferred: a preferred backend that raises falls back to the next one (Triton) with
    one warning per op, and the row would time Triton under the C++ kernels' name."""
    from hetrain import _ext, plugins

    if not device.startswith("cuda") or not _ext.built_with_cuda():
        return None
    if "cuda" not in {b.name for b in plugins.backends(op)} or plugins.select(op, "cuda").name == "cuda":
        return None

    def pinned(*args):
        with plugins.use_backend(**{op: "cuda"}):
            return fn(*args)

    return pinned


def dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")
