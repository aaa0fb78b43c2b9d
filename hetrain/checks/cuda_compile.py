"""Compiles every ``.cu`` file under ``csrc/`` with nvcc for given architectures, as the extension build would.

The flags are the build's own (torch's nvcc defaults, -O3) under C++17, the oldest standard a supported
torch builds with (torch 2.13 builds with C++20), and no torch include path is given: a kernel file must
build from its raw-pointer header alone (see DESIGN.md, "Kernels in layers").
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from hetrain.checks import resources
from hetrain.checks.report import PartResult, Row

CSRC = Path(__file__).resolve().parents[2] / "csrc"
_KERNEL_NAME = re.compile(r"(\w+)(?:<(.*?)>)?\(")


def cu_files(root: Path = CSRC) -> list[Path]:
    """Every ``.cu`` file under ``root``, recursively."""
    return sorted(root.rglob("*.cu"))


def nvcc_flags() -> list[str]:
    """The flags setup.py's CUDAExtension passes nvcc, among them torch's (half conversions off)."""
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS

    return ["-std=c++17", "-O3", "-lineinfo", *COMMON_NVCC_FLAGS]


def _demangle(names: list[str]) -> list[str]:
    """``void ns::kernel<T>(args)`` for each mangled name, or the names unchanged without c++filt."""
    tool = shutil.which("c++filt")
    if tool is None or not names:
        return names
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True, check=True).stdout
    return out.splitlines()


def _display(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def compile_cu(nvcc: str, path: Path, arch: int, workdir: Path, tool: str | None) -> list[Row]:
    """Compiles one file for ``sm_<arch>``: a row per kernel it defines, or one row holding nvcc's error."""
    obj = Path(tempfile.mkdtemp(dir=workdir)) / f"{path.stem}.sm_{arch}.o"  # files may share a name
    cmd = [nvcc, "-c", str(path), "-o", str(obj), f"-arch=sm_{arch}", *nvcc_flags(), "-Xptxas", "-v"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    shown = _display(path)
    if proc.returncode != 0:
        return [Row(f"sm_{arch}", shown, "-", "nvcc", True, error=(proc.stdout + proc.stderr).strip())]
    spills = resources.spill_stores(proc.stdout + proc.stderr)
    usage = resources.resource_usage(tool, obj) if tool is not None else {}
    rows = []
    for mangled, readable in zip(spills, _demangle(list(spills)), strict=True):
        match = _KERNEL_NAME.search(readable)
        kernel, dtype = (match[1], match[2] or "-") if match else (readable, "-")
        row = Row(f"sm_{arch}", f"{path.name}:{kernel}", dtype, shown, True, spill=spills[mangled])
        if mangled in usage:
            u = usage[mangled]
            row.regs, row.stack, row.smem = u.regs, u.stack + u.local, u.shared
        rows.append(row)
    return rows


def _failure(exc: Exception) -> str:
    """An exception in one line, and a failed tool's own error output after it."""
    stderr = getattr(exc, "stderr", None)
    return f"{type(exc).__name__}: {exc}" + (f"\n{stderr.strip()}" if stderr and stderr.strip() else "")


def find_nvcc() -> str | None:
    """nvcc where torch's extension build (setup.py) takes it from: ``$CUDA_HOME/bin`` (or ``$CUDA_PATH/bin``)
    where either is set, else nvcc on PATH, else ``/usr/local/cuda/bin``."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    candidates = [Path(home, "bin", "nvcc")] if home else [shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"]
    return next((str(c) for c in candidates if c and Path(c).is_file() and os.access(c, os.X_OK)), None)


def check(files: list[Path] | None, archs: tuple[int, ...]) -> PartResult:
    """Compiles ``files`` (default: every ``.cu`` under csrc/) for ``archs``; skipped without nvcc."""
    nvcc = find_nvcc()
    if nvcc is None:
        home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
        where = f"{Path(home, 'bin')} (CUDA_HOME or CUDA_PATH)" if home else "PATH or /usr/local/cuda/bin"
        return PartResult(skipped=f"nvcc not found in {where}")
    if files is None:
        if not CSRC.is_dir():
            return PartResult(skipped=f"no csrc/ at {CSRC} (hetrain is installed, not a source checkout)")
        files = cu_files()
    start = time.perf_counter()
    result = PartResult()
    tool = resources.cuobjdump()
    if tool is None:
        result.problems.append("cuobjdump not found (neither in the Triton wheel nor on PATH): registers and "
                               "shared memory of .cu kernels are not reported")
    with tempfile.TemporaryDirectory(prefix="hetrain-nvcc-") as tmp, ThreadPoolExecutor(os.cpu_count()) as pool:
        jobs = [(Path(f), arch, pool.submit(compile_cu, nvcc, Path(f), arch, Path(tmp), tool))
                for f in files for arch in archs]
        for path, arch, job in jobs:
            try:
                result.rows += job.result()
            except Exception as exc:  # cuobjdump failing on one object, say: the other files are still reported
                result.problems.append(f"{_display(path)} for sm_{arch}: {_failure(exc)}")
    result.seconds = time.perf_counter() - start
    return result
