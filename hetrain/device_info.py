"""What a device is called, for reports and result files: a GPU's product name, a CPU's model name.

``platform.processor()`` says only "x86_64" on Linux, which tells two CPUs' results apart no better than
nothing; the model name comes from ``/proc/cpuinfo`` instead.
"""

from __future__ import annotations

import platform
import re

import torch


def cpu_model() -> str:
    """The CPU's model name ("Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz"); the architecture where unknown."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device | str) -> str:
    """The product name of ``device``: the GPU's for CUDA, the CPU's model for the CPU, else the device type."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        return cpu_model()
    return device.type


def host_description(count: int | None = None, unit: str = "threads") -> str:
    """``cpu (<model>, <count> <unit>)``: the CPU a host-side measurement ran on and how many threads (or
    cores, or workers) it used; ``count`` defaults to torch's intra-op threads."""
    return f"cpu ({cpu_model()}, {torch.get_num_threads() if count is None else count} {unit})"


def result_card(device: torch.device | str) -> str:
    """How a result file names the device a run measured: the GPU's :func:`card_slug`, or ``cpu``."""
    return card_slug(device_name(device)) if torch.device(device).type == "cuda" else "cpu"


def card_slug(name: str) -> str:
    """A device's name as it goes into result file names ("NVIDIA H100 80GB HBM3" -> "nvidia-h100-80gb-hbm3"), so
    runs on two cards the same day are kept apart."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
