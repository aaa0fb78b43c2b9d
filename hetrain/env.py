"""``python -m hetrain.env``: what this machine has, which backend each op would use, and what looks wrong.

Prints versions (torch, CUDA, driver, Triton, nvcc), each device with its compute capability and
memory, every op's backends with availability and the one chosen per device type, then
compatibility warnings with the fix for each.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass, field

import torch

import hetrain
from hetrain import _ext, cpu_features, cpu_memory, plugins
from hetrain.callbacks.precision import choose_precision
from hetrain.device_info import cpu_model

MIN_TRITON = (3, 0)


@dataclass
class Report:
    versions: dict[str, str] = field(default_factory=dict)
    devices: list[dict[str, str]] = field(default_factory=list)
    backends: dict[str, list[dict[str, str]]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def _run(cmd: list[str]) -> str | None:
    try:
        # errors="replace": a tool's non-UTF-8 output (a localised message, a stray byte) must not end the report.
        return subprocess.run(cmd, capture_output=True, text=True, errors="replace", timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None


def nvcc_version() -> str | None:
    """The CUDA release nvcc reports, e.g. '13.0', or None without nvcc."""
    nvcc = shutil.which("nvcc")
    out = _run([nvcc, "--version"]) if nvcc else None
    match = re.search(r"release (\d+\.\d+)", out or "")
    return match.group(1) if match else None


def driver_version() -> str | None:
    """The NVIDIA driver version nvidia-smi reports for the first GPU, or None without nvidia-smi or a GPU."""
    out = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]) if shutil.which(
        "nvidia-smi") else None
    return out.strip().splitlines()[0] if out and out.strip() else None


def triton_version() -> str | None:
    """The installed Triton's version, or None where it is not importable."""
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", text)[:2])


def _host_allocator() -> str:
    stats = cpu_memory.stats()
    if stats is None:
        return f"torch's (no host block cache: {cpu_memory.why_unavailable()})"
    if stats.enabled:
        return f"hetrain's host block cache ({stats.reused} reused, {stats.mapped} mapped)"
    return "torch's; python train.py keeps freed blocks of 32 MiB or more (cpu_malloc=keep, hetrain.cpu_memory)"


def device_types() -> list[str]:
    """The device types the report shows each op's chosen backend for: cpu, and cuda where torch sees a GPU."""
    types = ["cpu"]
    if torch.cuda.is_available():
        types.append("cuda")
    return types


def collect() -> Report:
    """Probes this machine: versions, devices, every registered op's backends and choices, and warnings."""
    report = Report()
    cuda_runtime = torch.version.cuda
    report.versions = {
        "hetrain": hetrain.__version__,
        "torch": torch.__version__,
        "torch CUDA": cuda_runtime or "none (CPU build)",
        "driver": driver_version() or "none",
        "triton": triton_version() or "not installed",
        "nvcc": nvcc_version() or "not found",
        "hetrain._C": ("built with CUDA" if _ext.built_with_cuda() else "built for CPU")
        if _ext.load() is not None else _ext.load_error(),
        "host allocator": _host_allocator(),
    }
    cpu_bf16 = "bf16 dot products" if cpu_features.has_fast_bf16() else "no bf16 dot products (precision auto: 32)"
    report.devices.append({"device": "cpu", "name": f"{cpu_model()}, {torch.get_num_threads()} threads",
                           "capability": cpu_bf16, "memory": "-"})
    for i in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
        props = torch.cuda.get_device_properties(i)
        report.devices.append({"device": f"cuda:{i}", "name": props.name, "capability": f"{props.major}.{props.minor}",
                               "memory": f"{props.total_memory / 2**30:.1f} GiB"})
        choice = choose_precision(f"cuda:{i}")  # this GPU's, not the current one's
        if choice != "bf16-mixed":
            report.warnings.append(f"cuda:{i} ({props.name}) has no fast bf16: precision 'auto' picks {choice} "
                                   "there")
    for op in plugins.ops():
        rows = []
        for b in plugins.backends(op):
            why = b.why_unavailable()
            devices = ",".join(d + ("(pinned only)" if d in b.opt_in else "") for d in b.devices
                               if d != plugins.ANY_DEVICE)
            if plugins.ANY_DEVICE in b.devices:
                pinned_elsewhere = [d for d in b.opt_in if d not in b.devices]  # served through the wildcard
                devices = ",".join(filter(None, [devices, "any device type", *(f"{d}(pinned only)"
                                                                                for d in pinned_elsewhere)]))
            rows.append({"backend": b.name, "devices": devices, "priority": str(b.priority),
                         "status": "available" if why is None else f"unavailable: {why}"})
        for dev in device_types():
            try:
                chosen = plugins.select(op, dev).name
            except plugins.BackendError as exc:
                chosen = f"none ({exc})"
            rows.append({"backend": f"-> chosen on {dev}", "devices": dev, "priority": "", "status": chosen})
        report.backends[op] = rows
    report.warnings += _setting_warnings() + _compatibility_warnings()
    return report


def _setting_warnings() -> list[str]:
    """Environment settings hetrain cannot read: every op refuses to run while one is set, so each is named here
    once, with its fix, and not only in the chosen backend of every op."""
    out = []
    for check in (plugins.strict, plugins.preferred, lambda: [plugins.pinned(op) for op in plugins.ops()]):
        try:
            check()
        except plugins.BackendError as exc:
            out.append(f"{exc}; ops refuse to run until it is fixed or unset")
    return out


def _compatibility_warnings() -> list[str]:
    """What on this machine keeps a backend off or may break the build, each with its fix."""
    out = []
    nvcc, cuda = nvcc_version(), torch.version.cuda
    if nvcc and cuda and nvcc.split(".")[0] != cuda.split(".")[0]:
        out.append(f"nvcc is CUDA {nvcc} but torch was built with CUDA {cuda}: the extension may fail to build or "
                   "load; install a matching toolkit or set CUDA_HOME to one")
    tv = triton_version()
    if tv is None:
        out.append("Triton is not installed: the triton backends are off (pip install triton)")
    elif _version_tuple(tv) < MIN_TRITON:
        out.append(f"Triton {tv} is older than {'.'.join(map(str, MIN_TRITON))}: upgrade it (pip install -U triton)")
    if _ext.load() is None:
        out.append(f"the C++/CUDA backends are off: {_ext.available()}")
    elif torch.cuda.is_available() and not _ext.built_with_cuda():
        out.append("hetrain._C was built without CUDA on a CUDA machine: rebuild with HETRAIN_CUDA=1 "
                   "pip install -e . --no-build-isolation")
    return out


def _table(rows: list[dict[str, str]]) -> str:
    if not rows:
        return "  (none)"
    keys = list(rows[0])
    widths = {k: max(len(k), *(len(r[k]) for r in rows)) for k in keys}
    lines = ["  " + "  ".join(k.ljust(widths[k]) for k in keys)]
    lines += ["  " + "  ".join(r[k].ljust(widths[k]) for k in keys) for r in rows]
    return "\n".join(lines)


def format_report(report: Report) -> str:
    """The report as the text ``python -m hetrain.env`` prints."""
    parts = ["hetrain environment", "", "versions:"]
    width = max(len(k) for k in report.versions)
    parts += [f"  {k.ljust(width)}  {v}" for k, v in report.versions.items()]
    parts += ["", "devices:", _table(report.devices)]
    for op, rows in report.backends.items():
        parts += ["", f"op {op}:", _table(rows)]
    parts += ["", "warnings:" if report.warnings else "warnings: none"]
    parts += [f"  ! {w}" for w in report.warnings]
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> None:
    """Prints the report; ``--help`` says what it holds."""
    import argparse

    argparse.ArgumentParser(description="What this machine gives hetrain: versions, devices, the compiled "
                                        "extension, and the backend each op runs on per device.").parse_args(argv)
    print(format_report(collect()))


if __name__ == "__main__":
    main()
