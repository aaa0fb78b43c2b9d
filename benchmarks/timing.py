"""Timing helpers shared by the benchmarks: medians of repeated calls and the copy-bandwidth ceiling."""

from __future__ import annotations

import contextlib
import functools
import statistics
import time
from collections.abc import Callable, Iterable, Iterator

import torch

# A device a timing runs on, or several: a model placed over devices runs each step on all of them.
Devices = str | torch.device | Iterable[str | torch.device]


def no_sync() -> None:
    """What waiting for CPU work takes: nothing, it has ended when its call returns."""


def cuda_devices(devices: Devices) -> list[torch.device]:
    """The CUDA devices among ``devices`` (one device or several), each once, in the order given: those a timing on
    ``devices`` waits for."""
    named = [devices] if isinstance(devices, str | torch.device) else devices
    return list(dict.fromkeys(d for d in map(torch.device, named) if d.type == "cuda"))


def synchronizer(devices: Devices) -> Callable[[], None]:
    """What waits for the work ``fn`` queued on ``devices``: each of their GPUs' synchronize, nothing on the CPU.
    Chosen by the devices timed, not by whether the machine has a GPU: on a GPU host a CPU timing would otherwise
    wait for the whole device after every call, and count it; and by every device, not the current one alone: a
    step placed over cuda:0 and cuda:1 would otherwise be timed when one of them ends."""
    cuda = cuda_devices(devices)
    return functools.partial(synchronize_each, cuda) if cuda else no_sync


def synchronize_each(devices: list[torch.device]) -> None:
    """Waits for all work queued on each of ``devices`` (CUDA devices)."""
    for device in devices:
        torch.cuda.synchronize(device)


def median_ms(fn: Callable[[], object], *, device: Devices, warmup: int = 3, min_reps: int = 10,
              max_reps: int = 50, budget_s: float = 1.5) -> float:
    """Median wall time of ``fn`` in ms, each call waited for on ``device`` (the device ``fn`` runs on, or each of
    the devices)."""
    sync = synchronizer(device)
    for _ in range(warmup):
        fn()
    sync()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_reps and (len(times) < min_reps or time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def interleaved_ms(impls: dict[str, Callable[[], object]], rounds: int, min_reps: int, budget_s: float, *,
                   device: str | torch.device, max_reps: int = 50,
                   warmup: tuple[int, int] = (3, 1)) -> dict[str, float]:
    """Each implementation's :func:`median_ms` over ``rounds`` in which they take turns, then the median of its
    round medians: on a shared machine a slow spell then hits every column alike instead of one column's whole
    window, and one slow round of three is left out. ``budget_s`` per implementation, split over the rounds;
    ``warmup``: untimed calls in the first round and in each later one; ``device``: the one they run on."""
    per_round: dict[str, list[float]] = {name: [] for name in impls}
    for r in range(rounds):
        for name, fn in impls.items():
            per_round[name].append(median_ms(fn, device=device, warmup=warmup[r > 0], min_reps=min_reps,
                                             max_reps=max_reps, budget_s=budget_s / rounds))
    return {name: statistics.median(ms) for name, ms in per_round.items()}


def back_to_back_ms(fn: Callable[[], object], *, device: str | torch.device, budget_s: float = 1.0,
                    rounds: int = 5) -> float:
    """Time per call of ``fn`` called back to back, synchronised only around each round: what a training loop
    sees, where the host queues the next call while the GPU runs this one (max of host and GPU time per call),
    unlike :func:`median_ms`, which waits for every call. Median over ``rounds``; ``device``: the one ``fn`` runs
    on."""
    sync = synchronizer(device)
    fn()
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    calls = max(2, int(budget_s / rounds / max(time.perf_counter() - t0, 1e-6)))
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3 / calls)
    return statistics.median(times)


def copy_bandwidth_gbs(device: str = "cpu", megabytes: int = 256) -> float:
    """GB/s of a large tensor copy on ``device``, read plus write: the ceiling of a memory-bound kernel."""
    src = torch.randn(megabytes * 2**20 // 4, device=device)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), device=device, min_reps=10)
    return 2 * src.numel() * 4 / (ms * 1e-3) / 1e9


@contextlib.contextmanager
def cuda_generator_restored_on_error() -> Iterator[None]:
    """A CUDA graph capture that fails midway (a host sync or allocation inside it) leaves the device's random
    generator in capture mode, and every later random draw of the run fails: on an error, its state before the
    block is put back and the error goes on. Nothing happens without CUDA."""
    if not torch.cuda.is_available():
        yield
        return
    index = torch.cuda.current_device()  # initialises CUDA first: default_generators is empty until then
    generator = torch.cuda.default_generators[index]
    fresh = generator.clone_state()
    try:
        yield
    except BaseException:
        generator.graphsafe_set_state(fresh)
        raise
