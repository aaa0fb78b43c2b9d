"""Samples/s, tokens/s, step-time percentiles, time waiting for data, MFU and energy per step.

Time waiting for data is what the loader measured inside its ``next()`` (``wait_seconds``, which hetrain's
loaders keep); a callback alone sees only the time between steps, which also holds moving the batch,
Lightning's logging and the other callbacks' hooks. Both are reported, each under its own name.

:class:`ThroughputMeter` holds the numbers and reads an injectable clock, so it runs (and is tested)
without a Trainer; rolling rates and MFU come from Lightning's ``Throughput`` utility. The
:class:`Throughput` callback feeds it from Lightning's hooks, logs its metrics and keeps a summary
for the run's summary table.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from typing import Any, NamedTuple

import numpy as np
import pytorch_lightning as pl
import torch
from lightning_fabric.utilities.throughput import Throughput as RollingThroughput
from lightning_fabric.utilities.throughput import get_available_flops
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.callbacks.throughput_monitor import _plugin_to_compute_dtype
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities.model_helpers import is_overridden
from pytorch_lightning.utilities.rank_zero import rank_zero_only
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode
from typing_extensions import override

from hetrain.callbacks.profiling import instrumented
from hetrain.device_info import device_name
from hetrain.nn._share import observer
from hetrain.ops.linear_cross_entropy import recomputing_logits
from hetrain.report import loader_wait_seconds

log = logging.getLogger(__name__)

NA = "n/a"

_PEAK_FLOPS: dict[tuple[str, torch.dtype], float] = {}


def _peak_key(device: torch.device) -> str:
    """What a measured peak is cached under: the product name, and on a CPU the threads it ran on."""
    name = device_name(device)
    return f"{name} x{torch.get_num_threads()} threads" if device.type == "cpu" else name


def measure_matmul_flops(device: torch.device, dtype: torch.dtype, n: int | None = None, repeats: int = 3) -> float:
    """FLOP/s of an ``n x n`` matmul at ``dtype`` on ``device``, best of ``repeats``: a reachable peak.

    ``n`` defaults to 4096 on a GPU, whose 1024 x 1024 matmul takes microseconds, mostly launch and sync (it
    would put the peak far low and MFU far high), and 1024 elsewhere. The operands come from a generator of their
    own: drawn from the default one, they would shift every later draw of the run (its dropout masks) by whether
    and when this ran."""
    if n is None:
        n = 4096 if device.type == "cuda" else 1024
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device, dtype)
    b = torch.randn(n, n, generator=g).to(device, dtype)
    best = float("inf")
    for _ in range(repeats + 1):  # the first run warms up (kernel selection, thread pool)
        _sync(device)
        t0 = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def peak_flops(device: torch.device, dtype: torch.dtype, measure: bool = True) -> float | None:
    """Peak FLOP/s of ``device`` at ``dtype``: Lightning's datasheet table, else a matmul measurement.

    Lightning's ``get_available_flops`` knows recent NVIDIA and TPU chips; for any other device (CPUs,
    unlisted GPUs) a short matmul is timed once per device name and dtype in this process (for a dtype
    other than float32, the faster of it and a float32 matmul).
    """
    known = get_available_flops(device, dtype)
    if known:
        return float(known)
    if not measure:
        return None
    key = (_peak_key(device), dtype)
    if key not in _PEAK_FLOPS:
        # A mixed-precision run runs float32 ops too, and autocast may keep a GEMM in float32; where the device
        # has no fast path for ``dtype`` (bf16 on a CPU without AVX512-BF16 or AMX ran 0.65 GFLOP/s on a 2-core
        # EPYC VM, its float32 matmul far more), the slower figure alone put MFU above 1. The faster is reachable.
        flops = measure_matmul_flops(device, dtype)
        if dtype != torch.float32:
            flops = max(flops, measure_matmul_flops(device, torch.float32))
        _PEAK_FLOPS[key] = flops
    return _PEAK_FLOPS[key]


def compile_attempts() -> int:
    """Frames torch.compile's dynamo has set out to compile in this process: it does so on a frame's first call and
    on each recompile (a guard failed: new shapes, hooks added or removed, grad mode), and not on a call its cache
    serves. 0 where dynamo was never imported; clearing ``torch._dynamo.utils.counters`` makes it fall, so compare
    readings for change, not growth."""
    utils = sys.modules.get("torch._dynamo.utils")  # not imported here: a run that never compiles need not load it
    return 0 if utils is None else utils.counters["frames"]["total"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _sdpa_forward_flops(query: Any, key: Any, value: Any, *args: Any, **kwargs: Any) -> int:
    return flop_counter.sdpa_flop_count(query, key, value)


def _sdpa_backward_flops(grad_out: Any, query: Any, key: Any, value: Any, *args: Any, **kwargs: Any) -> int:
    return flop_counter.sdpa_backward_flop_count(grad_out, query, key, value)


# torch's CPU flash-attention ops and the formulas of their CUDA twins (same leading arguments, in shapes).
_CPU_ATTENTION = {"_scaled_dot_product_flash_attention_for_cpu": _sdpa_forward_flops,
                  "_scaled_dot_product_flash_attention_for_cpu_backward": _sdpa_backward_flops}


def cpu_attention_formulas() -> dict[Any, Callable[..., int]]:
    """FLOP formulas for the CPU attention ops this torch has and does not count itself.

    torch 2.13's ``FlopCounterMode`` knows its GPU attention kernels only: on a CPU attention counted 0 FLOPs and
    MFU missed it. The formulas are torch's own for SDPA, so a CPU counts what a GPU does (its backward includes
    the scores the flash kernel recomputes). An op another torch lacks, or already counts, is left to it."""
    ops = {getattr(torch.ops.aten, name, None): formula for name, formula in _CPU_ATTENTION.items()}
    return {op: formula for op, formula in ops.items() if op is not None and op not in flop_counter.flop_registry}


# Matmuls torch's table lacks, each counted by the formula of a twin whose leading arguments are the same shapes:
# the in-place ``addmm_`` (hetrain's fused linear cross-entropy adds its weight gradient so) and ``baddbmm_``, and
# ``addbmm``, a sum of the very products ``baddbmm`` keeps apart. ``out=`` variants are overloads torch already counts.
_MATMUL_TWINS = {"addmm_": "addmm", "baddbmm_": "baddbmm", "addbmm": "baddbmm", "addbmm_": "baddbmm"}


def matmul_formulas() -> dict[Any, Callable[..., int]]:
    """FLOP formulas for the matmuls this torch has and does not count itself: torch's own, of their twins.

    Left out, the fused head's weight gradient counted 0 FLOPs and its MFU was a third low. An op another torch
    lacks, or already counts, is left to it."""
    aten, registry = torch.ops.aten, flop_counter.flop_registry
    ops = {getattr(aten, name, None): registry.get(getattr(aten, twin)) for name, twin in _MATMUL_TWINS.items()}
    return {op: formula for op, formula in ops.items()
            if op is not None and formula is not None and op not in registry}


class _RecomputeWatch:
    """Whether the ops running now recompute a forward for activation checkpointing.

    A module's forward entered while a backward pass runs is a recompute: torch's checkpoint, reentrant or not,
    reruns the checkpointed modules there. Backward formulas themselves call no modules, so a backward that builds
    a graph (``create_graph=True``) still counts. A checkpointed function that calls no module is not seen. The
    logits hetrain's fused head recomputes in a ``reduction="none"`` backward are a recompute too
    (:func:`hetrain.ops.linear_cross_entropy.recomputing_logits`)."""

    def __init__(self) -> None:
        self._local = threading.local()  # per thread: a GPU's backward runs on autograd's device threads
        self._handles: list[Any] = []

    def _stack(self) -> list[bool]:
        if not hasattr(self._local, "stack"):
            self._local.stack = []
        return self._local.stack

    @observer
    def _enter(self, module: torch.nn.Module, args: Any) -> None:
        self._stack().append(torch._C._current_graph_task_id() != -1)

    @observer
    def _leave(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        stack = self._stack()
        if stack:
            stack.pop()

    @property
    def recomputing(self) -> bool:
        return any(self._stack()) or recomputing_logits()

    def __enter__(self) -> _RecomputeWatch:
        # always_call: checkpoint's early stop ends a recompute by raising out of the module's forward.
        self._handles = [register_module_forward_pre_hook(self._enter),
                         register_module_forward_hook(self._leave, always_call=True)]
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


class TrainingFlopCounter(FlopCounterMode):
    """torch's ``FlopCounterMode`` for a training step's forward and backward, counting what MFU counts.

    Adds the CPU attention ops and the matmuls torch does not count (:func:`cpu_attention_formulas`,
    :func:`matmul_formulas`) and leaves out the forward that activation checkpointing recomputes in backward: that
    work is the price of the memory saved, not the model's (it made a checkpointed BERT count a third more FLOPs, so
    MFU rose with checkpointing)."""

    def __init__(self) -> None:
        super().__init__(display=False, custom_mapping=cpu_attention_formulas())
        self.recompute = _RecomputeWatch()
        # torch's formulas read shapes already: added here, not through ``custom_mapping``, which would wrap them again.
        formulas = {**matmul_formulas(), **self.flop_registry}
        self.flop_registry = {op: self._unless_recomputing(formula) for op, formula in formulas.items()}

    def _unless_recomputing(self, formula: Callable[..., int]) -> Callable[..., int]:
        @functools.wraps(formula)
        def count(*args: Any, **kwargs: Any) -> int:
            return 0 if self.recompute.recomputing else formula(*args, **kwargs)

        return count

    def __enter__(self) -> TrainingFlopCounter:
        # Its ModuleTracker's hooks only measure: hetrain's fused blocks stay fused while it counts.
        observer(self.mod_tracker)
        self.recompute.__enter__()
        return super().__enter__()

    def __exit__(self, *exc: Any) -> Any:
        try:
            return super().__exit__(*exc)
        finally:
            self.recompute.__exit__(*exc)


class NvmlEnergy:
    """Energy the GPUs drew, from NVML's energy counters; ``None`` where pynvml or the counter is missing."""

    def __init__(self, devices: list[torch.device]) -> None:
        self.handles: list[Any] = []
        gpus = [d for d in devices if d.type == "cuda"]
        if not gpus:
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            # NVML numbers GPUs ignoring CUDA_VISIBLE_DEVICES; torch's own power_draw maps them this way.
            self.handles = [pynvml.nvmlDeviceGetHandleByIndex(torch.cuda._get_nvml_device_index(d)) for d in gpus]
            self._read = pynvml.nvmlDeviceGetTotalEnergyConsumption
            self.joules()
        except Exception as exc:  # no pynvml, no driver, or a GPU without the counter (pre-Volta)
            log.info(f"hetrain: no GPU energy counter ({type(exc).__name__}: {exc}); energy is {NA}")
            self.handles = []

    def joules(self) -> float | None:
        """Energy since the driver loaded, summed over the GPUs (NVML reports millijoules)."""
        if not self.handles:
            return None
        return sum(self._read(h) for h in self.handles) / 1000


class _Batch(NamedTuple):
    """A timed batch's numbers, kept until its step ends timed: the gap before it (``opened_step``: between steps,
    else within its step), its loader's fetch, its own seconds, samples, tokens and FLOPs."""

    gap: float
    opened_step: bool
    wait: float | None
    seconds: float
    samples: int | None
    tokens: int | None
    flops: int | None


def _percentiles(values: list[float]) -> dict[str, float]:
    p50, p90, p99 = np.percentile(values, [50, 90, 99])  # linear interpolation between neighbours
    return {"mean": float(np.mean(values)), "p50": float(p50), "p90": float(p90), "p99": float(p99)}


class ThroughputMeter:
    """Training throughput from batch boundaries and a clock, no Trainer needed.

    Call :meth:`start` when training starts, :meth:`pause` when it stops for a while (validation, and the
    checkpoint saved after it: the time up to the next ``batch_start`` is left out, except the loader's fetch)
    and per batch :meth:`batch_start` / :meth:`batch_end`. A step (which may span several micro-batches)
    lasts from its first ``batch_start`` to the ``batch_end`` that closes it; time from that end to the next
    step's first ``batch_start`` is the time between steps, and the gaps between one step's micro-batches are
    the gaps within steps: step times and the time between steps never overlap (:meth:`drop_step` drops a step
    that will not end). Of each gap, ``batch_start(data_wait=...)`` says how much the loader spent fetching the
    batch (unknown, and reported ``n/a``, if any timed batch leaves it out). ``batch_start(instrumented=True)``
    marks a batch of a step a profiler or hooks slow down: the step and the gap before it are left out as a
    warm-up step's are, and so is the time after it up to the next batch (where those tools finish), but for the
    loader's fetch. ``batch_end(compiled=True)`` marks a batch during which torch.compile compiled: its step and
    the gap before it are left out too (counted in ``compiled_steps``). ``batch_end(flops=...)`` gives a batch's
    FLOPs (``flops_per_batch`` stands in where it gives none): MFU sums the timed batches' own, so batches of
    different shapes each count what they cost.

    A step is timed whole or left out whole: its batches' numbers are kept until it ends, and only a step all of
    whose batches were timed adds them. So every number covers the same steps: samples/s is their samples over
    their time plus the gaps before them, which the step-time percentiles leave out (``between_steps_fraction``
    is that share). Timing the rest of a step that held a warm-up batch put a compile's seconds into samples/s
    and not into the step times, 4x apart.

    Args:
        clock: returns seconds; ``time.perf_counter`` by default.
        window_size: batches in the rolling rates of Lightning's ``Throughput``.
        available_flops: peak FLOP/s of the device, for MFU.
        warmup_batches: first batches left out of every number (kernel selection, allocator growth); a step
            that holds one is left out whole.
    """

    def __init__(self, clock: Callable[[], float] = time.perf_counter, window_size: int = 20,
                 available_flops: float | None = None, warmup_batches: int = 1) -> None:
        self.clock = clock
        self.rolling = RollingThroughput(available_flops=available_flops, window_size=window_size)
        self.available_flops = available_flops
        self.warmup_batches = warmup_batches
        self.seen_batches = 0  # warm-up included
        self.batches = 0
        self.samples: int | None = 0  # None once a timed batch had no tensor to count its samples from
        self._window_samples = self._window_lengths = 0  # the counts Lightning's rolling window was last fed
        # Per reading in the window: whether its samples, its lengths were fed raised.
        self._window_raised: deque[tuple[bool, bool]] = deque(maxlen=window_size)
        self.tokens: int | None = 0  # None once a timed batch had no token count
        self.time = 0.0  # timed training time: batches plus the gaps between them, pauses left out
        self.step_times: list[float] = []  # steps whose every batch was timed
        self.between_steps: list[float] = []  # a step's last batch end to the next step's first batch start
        self.within_steps: list[float] = []  # gaps between one step's micro-batches (gradient accumulation)
        self.data_waits: list[float] | None = []  # the loader's own next(); None once a batch lacks it
        self.flops_per_batch: float | None = None  # a batch's FLOPs where batch_end gives none
        self.flops: float | None = 0  # the timed batches' FLOPs; None once a timed batch had no count
        self.instrumented_steps = 0  # steps left out because a profiler or hooks ran in them
        self.compiled_steps = 0  # steps left out because torch.compile compiled in them (past warm-up, not profiled)
        self._pending: list[_Batch] = []  # the open step's timed batches, kept until it ends
        self._last_end: float | None = None
        self._paused_at: float | None = None
        self._step_started: float | None = None
        self._step_timed = False
        self._batch_started = 0.0
        self._batch_open = False  # begun, not yet ended: its gap is recorded when it ends
        self._opened_step = False  # the open batch opened its step
        self._batch_wait: float | None = None
        self._unspent_wait = 0.0  # the loader's fetch for a batch that never ran: the next gap spans it
        self._batch_timed = False
        self._batch_instrumented = False
        self._step_past_warmup = False  # the open step began after the warm-up batches
        self._step_instrumented = self._step_compiled = False

    @property
    def in_timed_step(self) -> bool:
        """Whether a step is open all of whose batches so far were timed (one the step times will hold unless a
        later batch compiles), or none is open and the next batch, which opens one, is timed."""
        if self._step_started is None:
            return self.seen_batches >= self.warmup_batches and self._paused_at is None
        return self._step_timed

    def start(self) -> None:
        self._last_end = self.clock()
        self._paused_at = None

    def pause(self) -> None:
        """Training stops until the next ``batch_start``; that time is not training time."""
        if self._paused_at is None:
            self._paused_at = self.clock()

    def _gap(self, now: float, data_wait: float | None, step_was_open: bool) -> float:
        """Training time since the last batch ended: all of it, or after a pause the time up to the pause and the
        loader's fetch. A step open across the pause leaves the pause out too."""
        if self._paused_at is None:
            return now - self._last_end
        paused, self._paused_at = self._paused_at, None
        kept = min(now - self._last_end, max(paused - self._last_end, 0.0) + (data_wait or 0.0))
        if step_was_open:
            self._step_started += now - self._last_end - kept
        return kept

    def batch_start(self, data_wait: float | None = None, instrumented: bool = False) -> None:
        """A batch starts; ``data_wait``: seconds its loader spent fetching it, if the loader measures that;
        ``instrumented``: a profiler or hooks slow its step down, so it is not timed."""
        now = self.clock()
        if self._last_end is None:  # no start(): the time between is unknown, not counted
            self._last_end = now
        timed = self.seen_batches >= self.warmup_batches and not instrumented
        self._opened_step = self._step_started is None
        if self._opened_step:
            self._step_started, self._step_timed = now, True
            self._step_past_warmup = self.seen_batches >= self.warmup_batches  # a step holding warm-up is warm-up
            self._step_instrumented = self._step_compiled = False
        self._step_timed = self._step_timed and timed
        self._step_instrumented = self._step_instrumented or instrumented
        self._batch_timed, self._batch_instrumented = timed, instrumented
        self._batch_started, self._batch_open = now, True
        self._batch_wait = None if data_wait is None else data_wait + self._unspent_wait
        self._unspent_wait = 0.0

    def drop_step(self) -> None:
        """Drops the open step, which will not end: Lightning skipped the rest of the epoch (the LightningModule's
        ``on_train_batch_start`` returned -1) or its last batch did not step. A batch begun there never ran: the next
        batch's gap, from the last batch that ended, spans it, with its loader's fetch."""
        if self._batch_open and self._batch_wait is not None:
            self._unspent_wait = self._batch_wait
        self._step_started, self._batch_open = None, False
        self._pending = []

    def batch_end(self, samples: int | None, tokens: int | None = None, step_done: bool = True,
                  flops: float | None = None, compiled: bool = False) -> None:
        """A batch ends; ``samples``: how many it held, ``None`` where that is unknown (samples/s is then n/a);
        ``flops``: what it computed, ``None``: ``flops_per_batch``; ``compiled``: torch.compile compiled during it,
        so its step is not timed."""
        now = self.clock()
        # The gap before the batch is taken here, not at its start: a batch may never run (see drop_step).
        gap = self._gap(self._batch_started, self._batch_wait, step_was_open=not self._opened_step)
        self._batch_open = False
        self.seen_batches += 1
        self._last_end = now
        if self._batch_timed:
            flops = self.flops_per_batch if flops is None else flops
            self._pending.append(_Batch(gap, self._opened_step, self._batch_wait, now - self._batch_started, samples,
                                        tokens, int(flops) if flops else None))
        self._step_compiled = self._step_compiled or compiled
        if step_done:
            if self._step_timed and not self._step_compiled:
                for batch in self._pending:
                    self._add(batch)
                self.step_times.append(now - self._step_started)
            elif self._step_compiled and self._step_past_warmup and not self._step_instrumented:
                self.compiled_steps += 1
            self._step_started, self._pending = None, []
        if self._batch_instrumented:
            self.instrumented_steps += step_done and self._step_past_warmup
            if self._paused_at is None:
                self._paused_at = now  # what instrumented the step finishes after it

    def _add(self, batch: _Batch) -> None:
        """Adds a batch of a timed step, and the gap before it, to every number."""
        (self.between_steps if batch.opened_step else self.within_steps).append(batch.gap)
        if batch.wait is None:
            self.data_waits = None
        elif self.data_waits is not None:
            self.data_waits.append(batch.wait)
        self.time += batch.gap + batch.seconds
        self.batches += 1
        samples, tokens, flops = batch.samples, batch.tokens, batch.flops
        self.samples = None if samples is None or self.samples is None else self.samples + samples
        # Lightning's window needs lengths with every batch or none: a batch without them (a loader without the
        # tokens key in a max_size CombinedLoader) amid batches with them stopped the fit. Tokens/s is n/a from then on.
        self.tokens = None if tokens is None or self.tokens is None else self.tokens + tokens
        self.flops = None if flops is None or self.flops is None else self.flops + flops
        # Lightning's window raises a ValueError on counts that do not rise with every batch, on fewer samples than
        # batches and on fewer lengths than samples: a timed batch of an all-padding row (no tokens) or a packed batch
        # of no sequence stopped the fit. Such a count is fed raised just enough (a batch of unknown size as one
        # sample), and compute leaves out the rates it would skew; the summary keeps the counts the batches held.
        self._window_samples = max(self._window_samples + 1, self.samples or 0)
        lengths = None if self.tokens is None else max(self._window_lengths + 1, self._window_samples, self.tokens)
        self._window_lengths = lengths or 0
        self._window_raised.append((self._window_samples != self.samples, lengths != self.tokens))
        self.rolling.update(time=self.time, batches=self.batches, samples=self._window_samples, lengths=lengths,
                            flops=flops)

    def compute(self) -> dict[str, float]:
        """Rolling rates (Lightning's ``Throughput`` keys) plus the latest step time and data wait."""
        metrics = dict(self.rolling.compute()) if self.batches else {}
        if metrics:  # the counts the batches held, not the ones fed to the window
            metrics["samples"] = self.samples
            if "lengths" in metrics:
                metrics["lengths"] = self.tokens
        # A rate spans the window's first and last readings: one fed raised makes it wrong, so it is n/a there.
        for i, rate in enumerate(("samples_per_sec", "items_per_sec")):
            if self._window_raised and (self._window_raised[0][i] or self._window_raised[-1][i]):
                metrics = {k: v for k, v in metrics.items() if not k.endswith(rate)}
        if self.samples is None:  # the window's samples stand in for a count that is not known
            metrics = {k: v for k, v in metrics.items() if "samples" not in k}
        if self.tokens is None:  # the window's lengths stopped where the token count did
            metrics = {k: v for k, v in metrics.items() if "items" not in k and k != "lengths"}
        if self.step_times:
            metrics["step_time_ms"] = 1000 * self.step_times[-1]
        if self.between_steps:
            metrics["between_steps_ms"] = 1000 * self.between_steps[-1]
        if self.data_waits:
            metrics["data_wait_ms"] = 1000 * self.data_waits[-1]
        return metrics

    def summary(self) -> dict[str, Any]:
        """Whole-run numbers over the timed batches: rates, step-time percentiles, data wait, gaps, MFU."""
        if not self.batches or self.time <= 0:
            return {"batches_timed": self.batches}
        out: dict[str, Any] = {
            "batches_timed": self.batches,
            "samples_per_s": NA if self.samples is None else self.samples / self.time,
            "tokens_per_s": self.tokens / self.time if self.tokens else NA,
            "data_wait_fraction": sum(self.data_waits) / self.time if self.data_waits else NA,
            "between_steps_fraction": sum(self.between_steps) / self.time,
        }
        if self.within_steps:
            out["within_steps_fraction"] = sum(self.within_steps) / self.time
        if self.instrumented_steps:
            out["instrumented_steps_left_out"] = self.instrumented_steps
        if self.compiled_steps:
            out["compiling_steps_left_out"] = self.compiled_steps
        if self.step_times:
            out["step_time_ms"] = {k: 1000 * v for k, v in _percentiles(self.step_times).items()}
        out["data_wait_ms_mean"] = 1000 * float(np.mean(self.data_waits)) if self.data_waits else NA
        out["between_steps_ms_mean"] = 1000 * float(np.mean(self.between_steps)) if self.between_steps else NA
        if self.within_steps:
            out["within_steps_ms_mean"] = 1000 * float(np.mean(self.within_steps))
        out["mfu"] = self.flops / self.time / self.available_flops if self.flops and self.available_flops else NA
        return out


def describe(summary: dict[str, Any]) -> str:
    """One line a person reads at the end of a fit: the summary's rates, step-time percentiles, shares of the
    training time, MFU and the GPUs' energy per step, rounded; what was not measured reads n/a."""
    if "samples_per_s" not in summary:
        return f"{summary.get('batches_timed', 0)} batches timed after warm-up: too few for rates"

    def rate(value: Any, unit: str) -> str:
        return f"{value:,.0f} {unit}/s" if isinstance(value, float) else f"{unit}/s {NA}"

    def share(value: Any) -> str:
        return f"{100 * value:.1f}%" if isinstance(value, float) else NA

    parts = [f"{summary['batches_timed']} batches", rate(summary["samples_per_s"], "samples"),
             rate(summary["tokens_per_s"], "tokens")]
    steps = summary.get("step_time_ms")
    if steps:
        parts.append(f"step {steps['p50']:.1f} ms p50 ({steps['p90']:.1f} p90, {steps['p99']:.1f} p99)")
    parts += [f"data wait {share(summary['data_wait_fraction'])}",
              f"between steps {share(summary['between_steps_fraction'])}"]
    if "within_steps_fraction" in summary:
        parts.append(f"gaps within steps {share(summary['within_steps_fraction'])}")
    parts.append(f"MFU {share(summary['mfu'])}")
    energy = summary.get("energy_j_per_step", NA)
    if isinstance(energy, float):
        parts.append(f"GPU energy {energy:.2f} J/step")
    if "instrumented_steps_left_out" in summary:
        parts.append(f"{summary['instrumented_steps_left_out']} profiled steps left out")
    if "compiling_steps_left_out" in summary:
        parts.append(f"{summary['compiling_steps_left_out']} compiling steps left out")
    if "of_ranks" in summary:
        parts.append(summary["of_ranks"])
    return ", ".join(parts)


def batch_size(batch: Any) -> int | None:
    """Samples in one loader's batch: the sequences of a packed batch (its ``segment_ids``), else the first dimension
    of a tensor, looked for level by level through mappings, lists, tuples and dataclasses (``labels`` first in a
    mapping), else the length of a list that holds one entry per sample; ``None`` where there is none of these.

    A list of mappings (torchvision's detection targets), or of tensors whose first dimensions differ (a detection
    batch's per-image labels), holds one entry per sample: looking into it counted one image's boxes or channels.
    A packed row holds several sequences, numbered 1, 2, ... within the row (0 on padding; see
    ``hetrain.data.packing``): its highest segment id is its sequence count. Counting rows made samples/s of a
    packed run a third of its sequences/s."""
    if isinstance(batch, torch.Tensor):
        return len(batch) if batch.dim() else None
    if isinstance(batch, Mapping):  # its values are fields of the batch, never one per sample
        if isinstance(batch.get("segment_ids"), torch.Tensor):
            return int(batch["segment_ids"].amax(dim=-1).sum())
        batch = [batch["labels"], *batch.values()] if "labels" in batch else list(batch.values())
    elif dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        batch = [getattr(batch, field.name) for field in dataclasses.fields(batch)]
    elif _per_sample(batch, ragged=False):  # a list of samples' mappings, uncollated
        return len(batch)
    if not isinstance(batch, list | tuple):
        return None
    # A tensor at this level first, then a per-sample list, then deeper.
    for item in batch:
        if isinstance(item, torch.Tensor) and item.dim():
            return len(item)
    for item in batch:
        if _per_sample(item):
            return len(item)
    for item in batch:
        if (size := batch_size(item)) is not None:
            return size
    return None


def _per_sample(items: Any, ragged: bool = True) -> bool:
    """Whether the list or tuple ``items`` holds samples, not a batch's fields: mappings, or (``ragged``, for a list
    inside a batch) tensors alike but for their first dimension (ragged labels or boxes). One mapping alone is taken
    for a batch; a batch's own tensors may differ in their first dimension (queries and their candidates)."""
    if not isinstance(items, list | tuple) or len(items) < 2:
        return False
    if all(isinstance(item, Mapping) for item in items):
        return True
    if not ragged or not all(isinstance(item, torch.Tensor) and item.dim() for item in items):
        return False
    return len({item.shape[1:] for item in items}) == 1 and len({len(item) for item in items}) > 1


def loader_batches(loaders: Any, batch: Any, may_merge: bool = True) -> list[Any]:
    """Each training loader's batch in ``batch``: Lightning combines a dict or list of loaders
    (``train_dataloaders={"a": ..., "b": ...}``) into one batch of the same shape, one entry per loader, ``None`` for
    one a ``max_size`` ``CombinedLoader`` ran out of. ``loaders`` is ``trainer.train_dataloader``.

    ``may_merge``: the batch is the one after the module's (or datamodule's) ``on_before_batch_transfer`` /
    ``transfer_batch_to_device`` / ``on_after_batch_transfer``, which may merge the loaders' batches into one: a dict
    is then split only where its keys are the loaders' own, a list or tuple only where it has one entry per loader
    and none is a bare tensor (a merged ``(x, y)`` is one batch). Otherwise the batch has the loaders' shape, bare
    tensors included. Anything else is one batch."""
    if isinstance(loaders, Mapping) and isinstance(batch, Mapping) and set(batch) == set(loaders):
        return [part for key, loader in loaders.items() for part in loader_batches(loader, batch[key], may_merge)]
    if (isinstance(loaders, list | tuple) and isinstance(batch, list | tuple) and len(loaders) == len(batch)
            and not (may_merge and any(isinstance(one, torch.Tensor) for one in batch))):
        return [part for loader, one in zip(loaders, batch, strict=True)
                for part in loader_batches(loader, one, may_merge)]
    return [] if batch is None else [batch]


_TRANSFER_HOOKS = ("on_before_batch_transfer", "transfer_batch_to_device", "on_after_batch_transfer")


def _may_merge(trainer: pl.Trainer) -> bool:
    """Whether the module or datamodule overrides a hook that may reshape a batch before the callbacks see it."""
    owners = [trainer.lightning_module, trainer.datamodule]
    return any(owner is not None and is_overridden(hook, owner) for owner in owners for hook in _TRANSFER_HOOKS)


def count_tokens(tensor: torch.Tensor) -> int:
    """Tokens ``tensor`` stands for: the ones of a 0/1 mask, whatever its dtype (bool, or the int64 masks tokenizers
    return, or a float one), else every element (token ids of a batch without padding).

    Telling a mask by its values, not its dtype, keeps an int64 mask from counting its padding as tokens."""
    if tensor.dtype == torch.bool:
        return int(tensor.count_nonzero())
    is_mask = ((tensor == 0) | (tensor == 1)).all()
    return int(torch.where(is_mask, tensor.count_nonzero(), tensor.numel()))  # one device read


def input_elements(batch: Any, tokens_key: str | None = None) -> int | None:
    """Elements of a batch's main input, what its FLOPs are taken to grow with: its tokens, rows x padded length (a
    mapping's 2-D ``tokens_key`` tensor, else its ``input_ids``), else its largest token ids (a 2-D integer tensor
    of more than one column), else its largest input (images); ``None`` where it holds no tensor. A list of tensors
    alike but for their first dimension (per-sample token ids, unpadded) is one input of all their elements.

    The first 2-D integer tensor found was taken before: labels ``(B, 1)`` or ``position_ids`` ``(1, L)`` listed
    ahead of the ids scaled FLOPs by rows or length alone, 16x apart for two batches of one token budget."""
    if isinstance(batch, Mapping):
        for key in (tokens_key, "input_ids"):
            tokens = batch.get(key) if key is not None else None
            if isinstance(tokens, torch.Tensor) and tokens.dim() == 2:
                return tokens.numel()
    ids = largest = None
    for elements, is_ids in _inputs(batch):
        largest = max(largest or 0, elements)
        if is_ids:
            ids = max(ids or 0, elements)
    return largest if ids is None else ids


def _is_ids(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` may hold token ids, rows x length: a ``(B, 1)`` one holds a label per row."""
    return tensor.dim() == 2 and tensor.shape[1] > 1 and not tensor.is_floating_point()


def _inputs(batch: Any) -> Iterator[tuple[int, bool]]:
    """Each input of ``batch``, as its elements and whether it holds token ids, through mappings, lists, tuples and
    dataclasses. A list led by anything but a tensor or a container (a batch's raw strings) is not looked into:
    walking its thousands of items cost milliseconds a batch."""
    if isinstance(batch, torch.Tensor):
        yield batch.numel(), _is_ids(batch)
    elif isinstance(batch, Mapping):
        for value in batch.values():
            yield from _inputs(value)
    elif isinstance(batch, list | tuple):
        first = batch[0] if batch else None
        if isinstance(first, torch.Tensor) and all(
                isinstance(item, torch.Tensor) and item.dtype == first.dtype and item.dim() == first.dim()
                and item.shape[1:] == first.shape[1:] for item in batch):
            yield sum(item.numel() for item in batch), _is_ids(first)  # per-sample tensors: all of them
        elif isinstance(first, torch.Tensor | Mapping | list | tuple) or _is_dataclass(first):
            for value in batch:
                yield from _inputs(value)
    elif _is_dataclass(batch):
        for field in dataclasses.fields(batch):
            yield from _inputs(getattr(batch, field.name))


def _is_dataclass(value: Any) -> bool:
    return dataclasses.is_dataclass(value) and not isinstance(value, type)


class Throughput(Callback):
    """Logs samples/s, tokens/s, step time, data wait, MFU and energy; keeps a summary for the run.

    Example::

        meter = Throughput(tokens_key="attention_mask")
        trainer = Trainer(callbacks=[meter])
        trainer.fit(task, datamodule)
        meter.summary  # {"samples_per_s": ..., "step_time_ms": {"p50": ...}, "mfu": ..., ...}

    Notes:
        - Lightning's ``ThroughputMonitor`` reads ``time.perf_counter`` itself, leaves data wait and
          step-time spread out and needs a ``flops_per_batch`` attribute; this callback keeps its
          rolling rates (Lightning's ``Throughput``) and adds those, with a clock a test can drive.
        - FLOPs per batch: the module's ``flops_per_batch`` when it has one (Lightning's convention),
          else counted by :class:`TrainingFlopCounter` (torch's ``FlopCounterMode`` plus CPU attention, less
          the forward activation checkpointing recomputes) during the first batch that runs a backward (one whose
          ``training_step`` returns None is not counted: the next is), a warm-up batch left out of the timing (with
          ``warmup_batches=0`` too). Under manual optimization the whole batch is counted, every backward and
          optimizer step in it (torch counts no FLOPs for an optimizer's elementwise updates). Every other batch's
          FLOPs are the counted batch's scaled by its main input's elements (:func:`input_elements`: rows x padded
          length of its ``tokens_key`` or ``input_ids``, or pixels): a token-budget sampler may open an epoch on its
          small leftover batch, and that batch's count taken for every batch put MFU 14x low. Counted once, only that
          batch runs slower. The scaling is exact for work that grows with tokens (projections, MLPs, convolutions);
          attention's, which grows with the square of the length, and a per-row head's are estimated. Ops on other
          threads are missed. The summary's ``flops_per_batch`` is the mean over the batches trained. The counter's
          module hooks only measure: hetrain's fused blocks stay fused under them (counted as one module), so the
          counted batch, a resumed fit's first included, computes what it would uncounted.
        - Samples are sequences: a packed batch (``segment_ids``, see ``hetrain.data.packing``) counts the
          sequences its rows hold, not its rows. A batch of several loaders (``train_dataloaders={"a": ...,
          "b": ...}``) counts each loader's, unless the module merged them into one (see :func:`loader_batches`); in a
          batch without a tensor to count from, samples/s is ``"n/a"``. Tokens/s is ``"n/a"`` once a timed batch lacks
          ``tokens_key``.
        - Peak FLOP/s for MFU: ``peak_flops`` if given, else Lightning's table, else a short matmul
          measurement at the run's compute dtype, once per device name.
        - GPU work is waited for before each clock read, so times are of the work, not of its launch.
        - Steps another callback instruments (``MemoryProfiler``'s hooked and churn-profiled steps,
          ``StepTrace``'s traced ones: whatever their ``instruments_step`` names) are left out of every
          number, as the warm-up is; the summary counts them (``instrumented_steps_left_out``).
        - So are steps during which torch.compile compiled (:func:`compile_attempts` rose): a model's first
          compile, and recompiles, such as those after ``MemoryProfiler`` removes the hooks of its step 0 (dynamo
          guards on a module's hooks) or for a batch of a new shape; the summary counts those past the warm-up and
          not instrumented (``compiling_steps_left_out``). A compile outside a batch (validation) costs no step.
        - A step is timed whole or left out whole, its gradient-accumulation micro-batches with it, so samples/s,
          tokens/s, MFU, energy and the step-time percentiles cover the same steps. The rates divide by the steps'
          time plus the gaps before them (``between_steps_fraction`` is that share); the percentiles leave the gaps
          out.
        - Data wait is read from the training loader's ``wait_seconds`` (hetrain's ``RingLoader``,
          ``DevicePrefetcher`` and ``TimedDataLoader`` keep it); with any other loader it is ``n/a`` and
          the gaps between batches (``between_steps``, and with gradient accumulation ``within_steps``:
          fetch, batch transfer, logging, other callbacks) bound it from above.
        - Validation inside fit, and what runs after it before training goes on (``ModelCheckpoint`` saves
          there, after every other callback's ``on_validation_end``), is not training time: the pause lasts to
          the next batch's start, of which only the loader's fetch counts.
        - Energy per step (``energy_j_per_step``): what the GPUs drew, from NVML's counters, over the timed
          steps' training time (validation left out); the CPU's energy is not in it. ``"n/a"`` without pynvml
          or a GPU.

    Args:
        tokens_key: batch key whose tokens are counted (a 0/1 mask, bool, integer or float, counts its ones; any
            other tensor counts its elements); ``None`` counts no tokens.
        window_size: batches in the rolling rates.
        warmup_batches: first batches left out of the timing; at least one when FLOPs are counted.
        peak_flops: peak FLOP/s of the device; ``None`` looks it up or measures it.
        count_flops: count FLOPs during the first batch when the module does not say.
        log_every_n_steps: logging interval; ``None`` follows the Trainer's; 0 logs nothing (the summary stays).
        clock: returns seconds; for tests.
    """

    def __init__(self, tokens_key: str | None = "attention_mask", window_size: int = 20, warmup_batches: int = 1,
                 peak_flops: float | None = None, count_flops: bool = True, log_every_n_steps: int | None = None,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        if window_size < 2:  # a rate needs two batches; Lightning's own check is a bare assert at fit start
            raise ValueError(f"hetrain: Throughput window_size must be >= 2 batches, got {window_size}")
        if warmup_batches < 0:
            raise ValueError(f"hetrain: Throughput warmup_batches must be >= 0, got {warmup_batches}")
        self.tokens_key = tokens_key
        self.window_size = window_size
        self.warmup_batches = warmup_batches
        self.peak_flops = peak_flops
        self.count_flops = count_flops
        self.log_every_n_steps = log_every_n_steps
        self.clock = clock
        self.meter: ThroughputMeter | None = None
        self.energy: NvmlEnergy | None = None
        self.summary: dict[str, Any] = {}
        self._devices: list[torch.device] = []
        self._flop_counter: contextlib.ExitStack | None = None  # open while the first batch's FLOPs are counted
        self._flops: FlopCounterMode | None = None
        self._count_pending = False  # FLOPs to count and no batch counted yet
        self._counted: int | None = None  # the counter's total, closed, until its batch ends
        self._ref_flops: float | None = None  # the counted batch's FLOPs, or the module's flops_per_batch
        self._ref_elements: int | None = None  # the counted batch's input_elements; None: every batch costs the same
        self._trained_flops: float = 0  # FLOPs of this fit's batches whose FLOPs are known, and how many there were
        self._trained_batches = 0
        self._stepped = False
        self._samples_warned = False
        self._may_merge = True  # the module or datamodule may reshape batches before this callback sees them
        self._joules: float | None = None  # GPU energy of the training stretches closed so far
        self._energy_start: float | None = None  # the counter where the open stretch began
        self._energy_mark: float | None = None  # the energy measured when the last step ended
        self._compiles: int = 0  # compile_attempts() when the open batch began
        self._wait_seen: float | None = None  # the training loader's wait_seconds at the last reading

    def _tokens(self, batch: Any) -> int | None:
        if self.tokens_key is None or not isinstance(batch, Mapping) or self.tokens_key not in batch:
            return None
        return count_tokens(batch[self.tokens_key])

    def _count(self, batch: Any, parts: list[Any]) -> tuple[int | None, int | None]:
        """Samples and tokens of ``batch``, summed over the loaders' ``parts`` of it; ``None``: unknown."""
        sizes = [batch_size(part) for part in parts]
        samples = None if None in sizes or not sizes else sum(sizes)
        if samples is None and not self._samples_warned:
            self._samples_warned = True
            log.warning(f"hetrain: Throughput found no tensor with a batch dimension in a training batch "
                        f"({type(batch).__name__}) to count its samples from, so samples/s is {NA}; give each batch "
                        "one (a mapping's 'labels' is read first)")
        tokens = [self._tokens(part) for part in parts]
        return samples, None if None in tokens or not tokens else sum(tokens)

    def _sync(self) -> None:
        for device in self._devices:
            _sync(device)

    def _open_energy(self) -> None:
        """Starts a stretch of measured GPU energy where the meter's timed training time goes on."""
        if self._energy_start is None and self.energy.handles and self.meter.in_timed_step:
            self._energy_start = self.energy.joules()

    def _close_energy(self) -> None:
        if self._energy_start is not None:
            self._joules = (self._joules or 0.0) + self.energy.joules() - self._energy_start
            self._energy_start = None

    def _energy_so_far(self) -> float | None:
        if self._energy_start is None:
            return self._joules
        return (self._joules or 0.0) + self.energy.joules() - self._energy_start

    def _end_step_energy(self, timed: bool) -> None:
        """A step ended (or was dropped): the energy measured since the last one ended counts only if it was timed
        (a step found compiling at its last batch was measured as it ran)."""
        if not timed:
            self._joules = self._energy_mark
            if self._energy_start is not None:
                self._energy_start = self.energy.joules()
        self._energy_mark = self._energy_so_far()

    @override
    @rank_zero_only
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After on_fit_start, where a placement moves stages: these are the devices that work.
        self._devices = sorted({p.device for p in pl_module.parameters()}, key=str)
        self._joules = self._energy_start = None  # an earlier fit's energy is not this one's
        self._stepped = self._samples_warned = False
        self._counted = None
        self._may_merge = _may_merge(trainer)  # read once a fit, not at every batch
        root = trainer.strategy.root_device
        available = self.peak_flops or peak_flops(root, _plugin_to_compute_dtype(trainer.precision_plugin))
        self._ref_flops, self._ref_elements = getattr(pl_module, "flops_per_batch", None), None
        self._trained_flops, self._trained_batches = 0, 0
        self._count_pending = self.count_flops and self._ref_flops is None
        # The batch whose FLOPs are counted runs slower under the counter, so it is warm-up whatever warmup_batches
        # says; the counter closes inside the batch, so the time after it is timed as after any warm-up batch.
        warmup = max(self.warmup_batches, 1) if self._count_pending else self.warmup_batches
        self.meter = ThroughputMeter(self.clock, self.window_size, available, warmup)
        self.energy = NvmlEnergy(self._devices)
        self._sync()
        self._wait_seen = loader_wait_seconds(trainer)
        self.meter.start()
        self._open_energy()
        self._energy_mark = self._energy_so_far()

    @override
    @rank_zero_only
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._sync()
        seen, waited = self._wait_seen, loader_wait_seconds(trainer)
        self._wait_seen = waited
        if seen is not None and waited is not None and waited < seen:  # a new loader (reloaded per epoch)
            seen = 0.0
        if self._count_pending:  # the batch whose FLOPs are counted runs slower under the counter: warm-up
            self.meter.warmup_batches = max(self.meter.warmup_batches, self.meter.seen_batches + 1)
        self.meter.batch_start(None if seen is None or waited is None else waited - seen,
                               instrumented=instrumented(trainer, trainer.global_step))
        if self.meter.in_timed_step:
            self._open_energy()  # after a validation: training goes on here
        else:
            self._close_energy()  # a profiled step
        if self._count_pending:
            # Counted with torch.compile standing aside: dynamo meeting a frame under the counter's dispatch mode
            # marks its code never to be compiled, so a compiled model would have run eagerly all run.
            self._flop_counter = contextlib.ExitStack()
            self._flop_counter.enter_context(torch.compiler.set_stance("force_eager"))
            self._flops = self._flop_counter.enter_context(TrainingFlopCounter())
        self._compiles = compile_attempts()

    @override
    @rank_zero_only
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        self._stepped = True
        # Forward and backward are counted; the optimizer's elementwise work is not in FLOP counts. Under manual
        # optimization a batch may step several optimizers, each after a backward of its own: counted to its end.
        if pl_module.automatic_optimization:
            self._stop_counting()

    def _stop_counting(self, keep: bool = True) -> None:
        """Closes the FLOP counter, if open; ``keep``: its count may be the batch's, which its end decides (not for a
        batch that never ran)."""
        if self._flop_counter is not None:
            self._flop_counter.close()
            self._counted = self._flops.get_total_flops() if keep else None
            self._flop_counter = self._flops = None

    def _keep_count(self, pl_module: pl.LightningModule, outputs: Any, elements: int | None) -> None:
        """Makes the closed counter's total, of a batch of ``elements``, what other batches' FLOPs scale, unless the
        batch ran no backward: under automatic optimization its training_step returned None (Lightning passes ``{}``),
        and the next batch is counted. Under manual optimization the batch is counted whatever it returns: its backward
        may be a plain ``loss.backward()``, which no hook sees (waiting for one kept every batch under the counter,
        untimed)."""
        counted, self._counted = self._counted, None
        if counted is not None and (outputs or not pl_module.automatic_optimization):
            self._ref_flops, self._ref_elements = counted or None, elements
            self._count_pending = False

    def _batch_flops(self, elements: int | None) -> float | None:
        """FLOPs of a batch of ``elements`` (see :func:`input_elements`): the reference scaled, where both are known."""
        if self._ref_flops is None or not self._ref_elements or elements is None:
            return self._ref_flops
        return round(self._ref_flops * elements / self._ref_elements)

    @override
    @rank_zero_only
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._stop_counting()
        parts = loader_batches(trainer.train_dataloader, batch, self._may_merge)
        sizes = [input_elements(part, self.tokens_key) for part in parts]
        elements = None if None in sizes or not sizes else sum(sizes)
        self._keep_count(pl_module, outputs, elements)
        flops = self._batch_flops(elements)
        if flops is not None:
            self._trained_flops += flops
            self._trained_batches += 1
        self._sync()
        steps = len(self.meter.step_times)
        self.meter.batch_end(*self._count(batch, parts), step_done=self._stepped, flops=flops,
                             compiled=compile_attempts() != self._compiles)
        if self._stepped:
            self._end_step_energy(timed=len(self.meter.step_times) > steps)
        self._open_energy()  # from the end of the warm-up on: the first step all of whose batches are timed
        self._stepped = False
        # Logged where Lightning logs this batch's training_step metrics (its update_train_step_metrics and
        # should_update_logs): under its batches-that-stepped count, raised after this hook, once per batch. Not on a
        # batch that accumulates under automatic optimization: its row repeated the previous step's time under the
        # same step. global_step - 1 filed rows off the loss's steps under manual optimization, where a batch may step
        # two optimizers (global_step counts both) or none.
        loop = trainer.fit_loop
        if pl_module.automatic_optimization and loop._should_accumulate():
            return
        step = loop.epoch_loop._batches_that_stepped
        every = trainer.log_every_n_steps if self.log_every_n_steps is None else self.log_every_n_steps
        # 0: no logging, as in Lightning, which also logs the batch a stop was asked at (one asked before this hook:
        # max_time's Timer runs after it, so its stop batch gets the loss's row and not this one).
        if not trainer.loggers or not every or ((step + 1) % every and not trainer.should_stop):
            return
        metrics = {f"throughput/{k}": v for k, v in self.meter.compute().items()}
        if metrics:  # nothing yet while warming up
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)

    @override
    @rank_zero_only
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # An optimizer step never spans epochs: one open here will not end. Lightning skips the rest of an epoch when
        # the LightningModule's on_train_batch_start returns -1: timed on, the next epoch's first step held this one,
        # and a FLOP counter left open would stack a second on it and outlive the fit (a dispatch mode with global
        # module hooks). The next batch is counted instead.
        self._stop_counting(keep=False)
        self.meter.drop_step()
        self._end_step_energy(timed=False)

    @override
    @rank_zero_only
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # A validation inside fit (its stage is VALIDATING, so trainer.training is False here). The pause ends at
        # the next batch, not at on_validation_end: ModelCheckpoint saves after every callback's on_validation_end.
        if trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking and self.meter is not None:
            self._sync()
            self.meter.pause()
            self._close_energy()

    @override
    @rank_zero_only
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._stop_counting(keep=False)  # open only if its batch never ended: nothing counted is the batch's
        self._sync()
        self._close_energy()
        summary = self.meter.summary()
        summary["flops_per_batch"] = self._trained_flops / self._trained_batches if self._trained_flops else NA
        summary["peak_flops"] = self.meter.available_flops or NA
        summary["energy_j_per_step"] = self._energy_per_step(len(self.meter.step_times))
        if trainer.world_size > 1:  # these are rank 0's batches on its device; the run summary counts every rank
            summary["of_ranks"] = f"rank 0 of {trainer.world_size}"
        self.summary = summary
        log.info(f"Throughput: {describe(summary)}")

    def _energy_per_step(self, steps: int) -> float | str:
        """The GPUs' energy over the timed training stretches per timed step."""
        if self._joules is None or not steps:
            return NA
        if self._joules <= 0:
            # NVML refreshes the counter every few tens of ms (on some virtual machines never): a run shorter
            # than that reads no energy at all, which is no measurement, not zero joules.
            log.info(f"hetrain: the GPU energy counter did not advance over {steps} steps; energy is {NA}")
            return NA
        return self._joules / steps

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if self.meter is not None:
            self._stop_counting()  # the FLOP counter is a dispatch mode: it must not outlive the fit
