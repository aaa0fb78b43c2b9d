"""Peak memory of each device over a phase, read cheaply enough to run several times a step.

A GPU's figure is torch's allocated bytes; the CPU's is the process's resident set (``VmRSS``/``VmHWM``),
whose peak Linux resets on request. No Trainer needed: :class:`~hetrain.callbacks.memory.MemoryProfiler`
reads these around each phase of a step.
"""

from __future__ import annotations

import os
import resource
import weakref

import torch

from hetrain import cpu_memory


def _proc_status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_bytes() -> int:
    """Resident set of this process now (Linux ``/proc``; the peak where ``/proc`` is missing)."""
    kib = _proc_status_kib("VmRSS")
    return (kib if kib is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def peak_rss_bytes() -> int:
    """Peak resident set since the last reset (:func:`reset_peak_rss`, or a :class:`PhaseMemory` phase's; since
    the process started where it cannot reset)."""
    kib = _proc_status_kib("VmHWM")
    return (kib if kib is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def reset_peak_rss() -> bool:
    """Sets the peak resident set back to the current one (Linux >= 4.0: ``5`` into ``clear_refs``)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _open(path: str, flags: int) -> int | None:
    try:
        return os.open(path, flags)
    except OSError:
        return None


class PhaseMemory:
    """Peak memory of each device over consecutive phases of a step.

    A GPU's number is torch's allocated bytes (tensors, not the allocator's cache; the reserved peak
    is kept beside it). The CPU's is the whole process's resident set: tensors on the host, but also
    Python, libraries and the allocator's free lists, so only its changes speak of the model.

    Notes:
        This runs seven times a step, so the CPU's peak is read cheaply: ``getrusage``'s peak is the
        larger of the peak since the last reset and a value left from before ``exec``; above a bound
        of the latter (taken at start, right after a reset) it is exact, and costs a quarter of reading
        ``/proc/self/status``, which is read otherwise. Both ``/proc`` files stay open.
    """

    def __init__(self, devices: list[torch.device]) -> None:
        self.devices = devices
        self._status = _open("/proc/self/status", os.O_RDONLY)
        self._clear_refs = _open("/proc/self/clear_refs", os.O_WRONLY)
        for fd in (self._status, self._clear_refs):
            if fd is not None:
                weakref.finalize(self, os.close, fd)
        self._floor: int | None = None  # getrusage peaks above this are this process's own
        if self._status is not None and self._clear_refs is not None:
            self._reset_rss()
            self._floor = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB

    def _peak_rss(self) -> int:
        if self._floor is not None:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            if peak > self._floor:
                return peak
        if self._status is not None:
            text = os.pread(self._status, 16384, 0)
            start = text.find(b"VmHWM:")
            if start >= 0:
                return int(text[start + 6:text.index(b"kB", start)]) * 1024
        return peak_rss_bytes()

    def _reset_rss(self) -> None:
        if self._clear_refs is None:
            return
        try:
            os.write(self._clear_refs, b"5")
        except OSError:  # not allowed here: peaks then run from the start of the process
            pass

    def reset(self) -> None:
        for device in self.devices:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            elif device.type == "cpu":
                self._reset_rss()

    def current(self) -> dict[str, int]:
        """Bytes in use on each device now (GPU: allocated; CPU: resident set)."""
        return {str(d): torch.cuda.memory_allocated(d) if d.type == "cuda" else rss_bytes()
                for d in self.devices if d.type in ("cuda", "cpu")}

    def peaks(self) -> dict[str, dict[str, int]]:
        """``{device: {"allocated": peak bytes, "reserved": peak bytes (GPU only), "kept": bytes (CPU only)}}``
        since the last reset; ``kept`` is what hetrain's host allocator holds now in freed blocks for reuse."""
        out: dict[str, dict[str, int]] = {}
        for device in self.devices:
            if device.type == "cuda":
                # One read of the allocator's stats: max_memory_allocated and max_memory_reserved each build
                # and flatten every statistic in Python. With them the hooks took 1.0 ms of a 10.7 ms step on
                # an H200 host (three phase ends a step).
                stats = torch.cuda.memory_stats_as_nested_dict(device)
                out[str(device)] = {"allocated": stats.get("allocated_bytes", {}).get("all", {}).get("peak", 0),
                                    "reserved": stats.get("reserved_bytes", {}).get("all", {}).get("peak", 0)}
            elif device.type == "cpu":
                out["cpu"] = {"allocated": self._peak_rss()}
                kept = kept_host_bytes()
                if kept is not None:
                    out["cpu"]["kept"] = kept
        for device, peak in out.items():
            _ERASED_PEAKS[device] = max(_ERASED_PEAKS.get(device, 0), peak["allocated"])
        return out


# The largest peak PhaseMemory read on each device ("cpu", "cuda:0"). Its resets erase the process's own peak
# counters (torch's for a GPU; VmHWM and getrusage's for the CPU), so a whole run's peak is the larger of those
# counters and this.
_ERASED_PEAKS: dict[str, int] = {}


def erased_peak(device: str) -> int:
    """The largest peak on ``device`` read before a PhaseMemory reset erased it (0 if none was)."""
    return _ERASED_PEAKS.get(device, 0)


def forget_erased_peak(device: str) -> None:
    """Drops what :func:`erased_peak` kept for ``device``: a new run (a sweep's next job) starts its peak afresh."""
    _ERASED_PEAKS.pop(device, None)


def kept_host_bytes() -> int | None:
    """Bytes of freed host blocks hetrain's allocator keeps mapped (``cpu_malloc: keep``): resident, yet no
    tensor's; None while the allocator is off."""
    stats = cpu_memory.stats()
    return stats.cached_bytes if stats is not None and stats.enabled else None
