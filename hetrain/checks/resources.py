"""Registers, stack, shared memory and spills of compiled kernels, read from cuobjdump and ptxas's log."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

_USAGE = re.compile(r"Function (\S+):\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")
_SPILLS = re.compile(r"Function properties for (\S+)\s*\n\s*\d+ bytes stack frame, (\d+) bytes spill stores")


@dataclass(frozen=True)
class Usage:
    """Per-thread registers, stack frame and local bytes, and static shared bytes per block."""

    regs: int
    stack: int
    shared: int
    local: int


def cuobjdump() -> str | None:
    """The cuobjdump that ships inside the Triton wheel (readable without a CUDA toolkit), else one on PATH."""
    spec = importlib.util.find_spec("triton")
    if spec is not None and spec.origin is not None:
        bundled = Path(spec.origin).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        if bundled.is_file():
            return str(bundled)
    return shutil.which("cuobjdump")


def resource_usage(tool: str, binary: Path) -> dict[str, Usage]:
    """Kernel name (mangled) -> usage, from ``cuobjdump --dump-resource-usage`` on a cubin or object file."""
    out = subprocess.run([tool, "--dump-resource-usage", str(binary)], capture_output=True, text=True, check=True)
    return {m[1]: Usage(*(int(v) for v in m.groups()[1:])) for m in _USAGE.finditer(out.stdout)}


def spill_stores(ptxas_log: str) -> dict[str, int]:
    """Kernel name (mangled) -> bytes of spill stores, from a ``ptxas -v`` log.

    The stack frame that cuobjdump reports also holds call frames (a double division makes one),
    so the spill count comes from ptxas itself.
    """
    return {m[1]: int(m[2]) for m in _SPILLS.finditer(ptxas_log)}
