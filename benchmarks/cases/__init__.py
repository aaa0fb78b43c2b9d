"""Benchmark cases, one module per op family; each defines ``cpu_cases()`` and ``gpu_cases(device, quick)``.

The runner walks this package, so a new op's benchmark is picked up by adding its module here.
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
    so GB/s can be set against the copy bandwidth measured in the same run.
    """

    op: str
    shape: str
    dtype: str
    make: Callable[[], dict[str, Callable[[], object]]]
    bytes_moved: int
    notes: dict[str, str] = field(default_factory=dict)


def discover(kind: str = "cpu", **options: object) -> list[Case]:
    """Every module's ``<kind>_cases(**options)``, in module order."""
    cases: list[Case] = []
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{__name__}.{info.name}")
        factory = getattr(module, f"{kind}_cases", None)
        if factory is not None:
            cases.extend(factory(**options))
    return cases


def liger(name: str, device: str) -> Callable | None:
    """A Liger-Kernel function as a baseline, on CUDA where its wheel is installed; never a dependency."""
    if not device.startswith("cuda"):
        return None
    try:
        from liger_kernel.transformers import functional
    except ImportError:
        return None
    return getattr(functional, name, None)


def dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")
