"""Keeps large freed host blocks for reuse instead of handing them back to the kernel: ``keep_freed_blocks``.

torch's CPU allocator takes each tensor's memory from the C library's ``malloc``. glibc serves a request of
32 MiB or more (its highest automatic mmap threshold) with fresh pages from ``mmap`` and unmaps them on
free, so each such tensor of each step starts untouched: a page fault and a zeroed page per 4 KiB. A CPU
stage's large activations and gradients pay that every step (BERT-base's 32 x 512 x 768 token-table lookup:
benchmarks/RESULTS.md, "the token table's step on a CPU stage"). GPU memory has torch's caching allocator;
host memory has none, so hetrain installs one (``csrc/host_allocator.cpp``): requests of ``min_bytes`` or
more come from a cache of mapped blocks, smaller ones from torch's allocator as before.

glibc's own settings cannot do this safely: raising its mmap threshold keeps large blocks on the heap, where
small long-lived allocations land between them and the holes left behind never fit the next request (a
lookup loop grew to 12 GiB resident). The cost of the cache: up to ``max_cached_bytes`` of freed host memory
stays mapped, as a GPU process keeps its reserved memory. ``python train.py`` installs it unless
``cpu_malloc=system`` (:func:`host_memory`, for the run only); it needs hetrain._C.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from hetrain import _ext

GLIBC_MAX_MMAP_THRESHOLD = 32 << 20  # glibc keeps smaller freed blocks on its heap by itself


@dataclass(frozen=True)
class CpuMallocSetting:
    """What :func:`apply` did: ``applied`` and, for the run summary, a one-line ``description``."""

    applied: bool
    description: str


@dataclass(frozen=True)
class HostCacheStats:
    """The block cache's counters since it was installed, and the settings it was last given."""

    enabled: bool
    reused: int  # requests served from a kept block
    mapped: int  # requests that mapped a new block
    unmapped: int  # blocks given back to the system (over the cap, emptied, or to retry a failed mapping)
    cached_bytes: int  # freed blocks kept now
    live_bytes: int  # blocks held by tensors now
    peak_mapped_bytes: int  # most bytes mapped at once
    min_bytes: int  # keep_freed_blocks's last min_bytes (0 before the first)
    max_cached_bytes: int  # keep_freed_blocks's last cap (0 before the first; none kept while disabled)


def memory_limit_bytes(cgroup_root: Path = Path("/sys/fs/cgroup"),
                       own_cgroups: Path = Path("/proc/self/cgroup")) -> int:
    """The machine's memory, or a lower limit of a cgroup this process runs in (v2 ``memory.max``, v1
    ``limit_in_bytes``): at the mount's root (a container's own view) or on the path from there to the process's own
    cgroup (``own_cgroups``: a systemd unit's or a batch job's limit, which the root did not show)."""
    try:
        limit = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        limit = 16 << 30
    files = [cgroup_root / "memory.max", cgroup_root / "memory" / "memory.limit_in_bytes",
             *_own_limit_files(cgroup_root, own_cgroups)]
    for file in files:
        try:
            text = file.read_text().strip()
        except OSError:
            continue
        if text.isdigit():  # "max" (v2) or a huge number (v1) where no limit is set
            limit = min(limit, int(text))
    return limit


def _own_limit_files(cgroup_root: Path, own_cgroups: Path) -> list[Path]:
    """The limit files from the process's own cgroups (``/proc/self/cgroup``: ``0::<path>`` for v2,
    ``<id>:memory,...:<path>`` for v1) up to the mount's root: a limit set anywhere on the way applies."""
    try:
        lines = own_cgroups.read_text().splitlines()
    except OSError:
        return []
    files = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        if parts[1] == "":
            base, name = cgroup_root, "memory.max"
        elif "memory" in parts[1].split(","):
            base, name = cgroup_root / "memory", "memory.limit_in_bytes"
        else:
            continue
        if ".." in Path(parts[2]).parts:
            continue
        directory = base / parts[2].lstrip("/")
        while directory != base:
            files.append(directory / name)
            directory = directory.parent
    return files


def default_max_cached_bytes() -> int:
    """A quarter of the memory this process may use: enough for a step's large tensors, never most of it."""
    return memory_limit_bytes() // 4


# The ops of csrc/host_allocator.cpp; an extension built from older sources may lack them.
_HOST_OPS = ("host_cache_enable", "host_cache_disable", "host_cache_empty", "host_cache_stats")


@functools.cache
def _missing_ops(names: tuple[str, ...]) -> tuple[str, ...]:
    """Which of ``names`` the loaded hetrain._C lacks: fixed once it loaded, and read at every memory phase's end."""
    return tuple(name for name in names if not hasattr(torch.ops.hetrain_C, name))


def why_unavailable() -> str | None:
    """None where hetrain._C serves the block cache; else why not (the extension is unusable or lacks its ops)."""
    ext = _ext.available()
    if ext is not True:
        return ext
    missing = _missing_ops(_HOST_OPS)
    if missing:
        return (f"hetrain._C lacks {', '.join(missing)}, so it is a stale build (rebuild it with: "
                f"{_ext.BUILD_COMMAND})")
    return None


def keep_freed_blocks(min_bytes: int = GLIBC_MAX_MMAP_THRESHOLD,
                      max_cached_bytes: int | None = None) -> CpuMallocSetting:
    """Makes host requests of ``min_bytes`` or more reuse freed blocks (at most ``max_cached_bytes`` kept)."""
    why = why_unavailable()
    if why is not None:
        return CpuMallocSetting(False, f"system (hetrain's CPU allocator is absent: {why})")
    cap = default_max_cached_bytes() if max_cached_bytes is None else max_cached_bytes
    if not torch.ops.hetrain_C.host_cache_enable(min_bytes, cap):
        return CpuMallocSetting(False, "system (another CPU allocator of higher priority is installed)")
    return CpuMallocSetting(True, f"keep (freed blocks of {_size(min_bytes)} or more reused, up to "
                                  f"{_size(cap)} kept)")


def _size(nbytes: int) -> str:
    """``nbytes`` in the largest binary unit it fills, to one decimal: 768 KiB, 1.5 MiB, 5.9 GiB. In fixed units
    a 768 KiB threshold read "0 MiB" and a 40 MiB cap "0.0 GiB"."""
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if nbytes >= 1 << shift:
            return f"{nbytes / (1 << shift):.1f}".removesuffix(".0") + f" {unit}"
    return f"{nbytes} B"


def system() -> None:
    """Back to torch's allocator for new requests; kept blocks are unmapped (blocks in use stay valid)."""
    if why_unavailable() is None:
        torch.ops.hetrain_C.host_cache_disable()


def empty_cache() -> None:
    """Unmaps every kept block, as ``torch.cuda.empty_cache`` does for GPU memory."""
    if why_unavailable() is None:
        torch.ops.hetrain_C.host_cache_empty()


def stats() -> HostCacheStats | None:
    """The cache's counters, or None where it is unavailable (:func:`why_unavailable`)."""
    if why_unavailable() is not None:
        return None
    enabled, *counts = torch.ops.hetrain_C.host_cache_stats()
    return HostCacheStats(bool(enabled), *counts)


def apply(mode: str) -> CpuMallocSetting:
    """``mode`` from a run's config: ``"keep"`` (:func:`keep_freed_blocks`) or ``"system"`` (torch's allocator)."""
    if mode == "keep":
        return keep_freed_blocks()
    if mode == "system":
        system()
        return CpuMallocSetting(False, "system (as configured)")
    raise ValueError(f"hetrain: cpu_malloc={mode!r} is not a choice: use keep (reuse freed host memory, the default) "
                     "or system (torch's CPU allocator as it is)")


@contextmanager
def host_memory(mode: str) -> Iterator[CpuMallocSetting]:
    """:func:`apply` for the ``with`` block; after it, the allocator is as before: torch's, or the cache with the
    same ``min_bytes`` and ``max_cached_bytes`` (a block nested in an enabled cache leaves it as it found it)."""
    before = stats()
    setting = apply(mode)
    try:
        yield setting
    finally:
        if before is not None and before.enabled:
            keep_freed_blocks(before.min_bytes, before.max_cached_bytes)
        elif setting.applied:
            system()
