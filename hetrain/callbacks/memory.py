"""Where training memory goes: per device and phase, per module, and a post-mortem on out-of-memory.

:class:`MemoryProfiler` runs inside a Lightning fit. Every step it reads each device's peak over forward,
backward and optimizer (:mod:`hetrain.memory_counters`); every few steps it hooks the model for
one step (:mod:`hetrain.callbacks.module_memory`); over a few steps it finds allocator churn
(:mod:`hetrain.callbacks.churn`). At the end it writes ``memory_report.{md,png,html}`` and
``memory_steps.csv`` into the run directory (:mod:`hetrain.callbacks.memory_report`), or ``oom_report.md`` and
``memory_steps.csv`` (+ an allocator snapshot; under DDP ``oom_report_rank<k>.md`` and ``memory_steps_rank<k>.csv``
from the rank that ran out) on out-of-memory. A fit resumed into the run's own directory keeps the earlier part's
``memory_report.{md,png,html}`` as ``memory_report-part<k>.{md,png,html}`` (its ``oom_report.md`` and snapshot as
``-part<k>`` files too) and goes on with its ``memory_steps.csv``.
"""

from __future__ import annotations

import io
import logging
import os
import pickle
import shutil
import tempfile
import weakref
from collections import defaultdict
from collections.abc import Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.profilers import PyTorchProfiler
from pytorch_lightning.trainer.states import TrainerFn
from torch.nn.parameter import is_lazy
from typing_extensions import override

from hetrain.callbacks.churn import ChurnTracker
from hetrain.callbacks.memory_report import (
    PHASES,
    READING,
    REPORT_HTML,
    REPORT_MD,
    REPORT_PNG,
    STEPS_CSV,
    STEPS_HEADER,
    MemoryReport,
    churn_section,
    steps_rows,
)
from hetrain.callbacks.module_memory import MIB, ModuleMemory, bytes_by_device, optimizer_state_bytes
from hetrain.callbacks.profiling import StepTrace, keep_earlier_part, parse_steps
from hetrain.memory_counters import PhaseMemory
from hetrain.report import error_headline, markdown_table

log = logging.getLogger(__name__)

OOM_MD, OOM_SNAPSHOT = "oom_report.md", "oom_snapshot.pickle"
OOM_MD_OF_RANK, OOM_SNAPSHOT_OF_RANK = "oom_report_rank{}.md", "oom_snapshot_rank{}.pickle"  # under DDP, per rank
OOM_STEPS_CSV_OF_RANK = "memory_steps_rank{}.csv"  # rank 0 may write memory_steps.csv with its own report
SNAPSHOT = "memory_snapshot.pickle"
# A churn window given as a count starts at the fit's step 2: step 0 creates optimizer state, step 1 settles.
CHURN_FIRST_STEP = 2
LOGGED_MODULES = 10  # rows of the per-module table in the log
MAX_STEP_POINTS = 4096  # points of the per-step series held (and plotted): a longer fit's hold several steps each


def out_of_memory(exception: BaseException) -> bool:
    """A GPU's ``torch.OutOfMemoryError`` (hetrain's host allocator raises it too) or the CPU allocator's error,
    which torch raises as a plain ``RuntimeError``."""
    return isinstance(exception, torch.OutOfMemoryError) or (
        isinstance(exception, RuntimeError) and "can't allocate memory" in str(exception))


def _oom_files(rank: int | None) -> tuple[str, str, str]:
    """The post-mortem's report, snapshot and steps file: under DDP (``rank`` given) the rank's own."""
    if rank is None:
        return OOM_MD, OOM_SNAPSHOT, STEPS_CSV
    return OOM_MD_OF_RANK.format(rank), OOM_SNAPSHOT_OF_RANK.format(rank), OOM_STEPS_CSV_OF_RANK.format(rank)


def _merge(into: dict[str, Any], step: dict[str, Any]) -> None:
    """Folds a step's peaks into ``into``: per phase, device and figure, the larger."""
    for phase in PHASES:
        for device, peaks in step[phase].items():
            held = into[phase].setdefault(device, {})
            for k, v in peaks.items():
                held[k] = max(v, held.get(k, v))


class StepPeaks:
    """Every completed step's peaks per phase and device, in bounded host memory.

    One point per step up to ``limit`` points; then neighbouring points merge (the first's step, each figure's
    larger), and from then on a point holds 2, 4, ... steps. The maxima over the points, which the report's table
    shows, are those over every step exactly; the plot draws each point's peak. Every step's own rows go to a
    temporary file as it completes, for ``memory_steps.csv``, after the rows of a resumed run's earlier parts
    (:meth:`add_earlier`). (One dict per step held 1.4 KiB a step: 1.3 GiB for a million, which the CPU's resident
    set, a figure of this report, counted too.)

    The file is closed (:meth:`close`) when the fit ends, once ``memory_steps.csv`` is written (:meth:`written`), which
    holds the rows from then on; a copy or pickle leaves it out. A row that cannot be written (a full disk) stops the
    rows there, and :meth:`missing` says so: the fit goes on.
    """

    def __init__(self, limit: int = MAX_STEP_POINTS) -> None:
        if limit < 2 or limit % 2:
            raise ValueError(f"hetrain: StepPeaks needs an even limit >= 2 (points merge in pairs), got {limit}")
        self.limit = limit
        self.points: list[dict[str, Any]] = []  # {"step": its first step, phase: {device: {figure: bytes}}}
        self.steps_per_point = 1
        self.count = 0  # steps added
        self.earlier = 0  # rows of the run's earlier parts, before the steps' own
        self._in_last = 0  # steps the last point holds
        # Every step's rows, in a file the system deletes once closed; unbuffered, so a write that fails is this one.
        self._rows: IO[bytes] | None = None
        self._close_rows: weakref.finalize | None = None  # closes it when this object goes
        self._size = 0  # bytes of whole rows in it
        self._lost: str | None = None  # why the rows stop short: a write failed
        self._written: tuple[Path, tuple[int, int, int]] | None = None  # the steps file written, as it was then

    def __getstate__(self) -> dict[str, Any]:
        """A copy or pickle holds no open file: its rows are the steps file written (:meth:`written`), if any."""
        return {**self.__dict__, "_rows": None, "_close_rows": None}

    def _write(self, data: bytes) -> None:
        if self._rows is None:
            self._rows = tempfile.TemporaryFile("w+b", buffering=0, prefix="hetrain-memory-steps-")
            self._close_rows = weakref.finalize(self, self._rows.close)
        view = memoryview(data)
        try:
            while view:  # a raw write may write part: the rest fails, or goes on
                view = view[self._rows.write(view):]
        except OSError:
            with suppress(OSError):  # no part of a row: the file ends at the last whole one
                self._rows.truncate(self._size)
                self._rows.seek(self._size)
            raise
        self._size += len(data)

    def add_earlier(self, rows: str, count: int) -> None:
        """Adds ``count`` rows (text, each ending in a newline) of the run's earlier parts, before any step; raises
        the OSError of a write that fails."""
        self._write(rows.encode())
        self.earlier += count

    def add(self, step: dict[str, Any]) -> None:
        """Adds a completed step ``{"step": n, phase: {device: {figure: bytes}}}``; it may be merged into later."""
        if self._lost is None:
            try:
                self._write(steps_rows(step).encode())
            except OSError as failure:
                self._lost = (f"the rows from step {step['step']} on are missing: writing them to a temporary file "
                              f"failed ({failure!r})")
                log.warning(f"hetrain: MemoryProfiler could not write step {step['step']}'s rows of {STEPS_CSV} to a "
                            f"temporary file ({failure!r}); training goes on, and the file will hold the rows of the "
                            "steps before it only")
        self.count += 1
        if self.points and self._in_last < self.steps_per_point:
            _merge(self.points[-1], step)
            self._in_last += 1
            return
        if len(self.points) == self.limit:  # every point is full: halve the resolution
            for a, b in zip(self.points[::2], self.points[1::2], strict=True):
                _merge(a, b)
            self.points[:] = self.points[::2]
            self.steps_per_point *= 2
        self.points.append(step)
        self._in_last = 1

    def _written_intact(self) -> Path | None:
        """The steps file written from these rows, where it is as it was written."""
        if self._written is None:
            return None
        path, stamp = self._written
        try:
            return path if _stamp(path) == stamp else None
        except OSError:
            return None

    def missing(self) -> str | None:
        """Why the rows :meth:`copy_rows` gives lack some steps'; None where they are every one."""
        if self._lost is not None:
            return self._lost
        if self._rows is None and (self.count or self.earlier) and self._written_intact() is None:
            written = f", and {self._written[0]} has been written over since" if self._written else ""
            return (f"the rows were held in a temporary file, closed when the fit ended (or left out of this copy of "
                    f"the profiler){written}")
        return None

    def copy_rows(self, out: IO[bytes]) -> None:
        """Writes every row (the earlier parts', then the steps', in the order they completed, no header) to
        ``out``, a chunk at a time: from the temporary file, or once it is closed, the steps file written."""
        if self._rows is not None:
            self._rows.seek(0)
            shutil.copyfileobj(self._rows, out)
            self._rows.seek(0, os.SEEK_END)
        elif (path := self.source()) is not None:
            with open(path, "rb") as rows:
                rows.readline()  # its header
                shutil.copyfileobj(rows, out)

    def source(self) -> Path | None:
        """The steps file :meth:`copy_rows` reads, once the temporary file is closed; None while it is open."""
        return None if self._rows is not None else self._written_intact()

    def written(self, path: Path) -> None:
        """``path`` now holds these rows, after the header: it gives them once the temporary file is closed."""
        self._written = path, _stamp(path)

    def close(self) -> None:
        """Deletes the temporary file."""
        if self._close_rows is not None:
            self._close_rows()
        self._rows = self._close_rows = None


def _stamp(path: Path) -> tuple[int, int, int]:
    """What tells a file written over: its inode, size and modification time."""
    stat = path.stat()
    return stat.st_ino, stat.st_size, stat.st_mtime_ns


@dataclass
class _FitReport(MemoryReport):
    """A fit's report: its ``steps`` are the bounded points, and its steps file every step's rows."""

    peaks: StepPeaks = field(default_factory=StepPeaks)

    def _copy_steps(self, out: IO[bytes]) -> None:
        out.write(f"{STEPS_HEADER}\n".encode())
        self.peaks.copy_rows(out)

    def steps_csv(self) -> str:
        text = io.BytesIO()
        self._copy_steps(text)
        return text.getvalue().decode()

    def write_steps_csv(self, path: Path) -> None:
        """Writes the steps file a chunk at a time: a long run's rows are never one string."""
        source = self.peaks.source()
        if source is not None and path.exists() and path.samefile(source):
            return  # it holds them already: opened to write, it would be emptied before it was read
        with open(path, "wb") as out:
            self._copy_steps(out)

    def _holds_earlier_steps(self) -> bool:
        return self.peaks.earlier > 0

    def _rows_missing(self) -> str | None:
        return self.peaks.missing()

    def _plot_title(self) -> str:
        if self.peaks.steps_per_point == 1:
            return super()._plot_title()
        return f"Peak memory, each point over {self.peaks.steps_per_point} steps (CPU: process resident set)"


def _headline(exception: BaseException) -> str:
    """The error as the run summary heads it: its type and its message's first line (the type alone when it has
    no message, as Ctrl-C's KeyboardInterrupt)."""
    message = str(exception)
    return error_headline(f"{type(exception).__name__}: {message}" if message else type(exception).__name__)


class MemoryProfiler(Callback):
    """Per-device, per-phase and per-module memory of a fit, in a report a person can open.

    Example::

        Trainer(callbacks=[MemoryProfiler()], default_root_dir="runs/1")
        # -> runs/1/memory_report.md, memory_report.png, memory_report.html, memory_steps.csv

    Notes:
        - Every step: the peak of each device over forward, backward and optimizer (Lightning's
          ``on_before_backward``, ``on_after_backward`` and ``on_train_batch_end`` close the phases).
          That costs a few counter reads per step (CPU: a ``getrusage`` and a ``/proc`` write per phase),
          about 0.15 ms a step on a 2-core CPU (``benchmarks/bench_memory_overhead.py``).
        - Every ``module_every_n_steps`` steps (the fit's first step included, also when resumed): hooks on
          every module for that step only (see :class:`ModuleMemory`), so other steps run unhooked. These hooks,
          and churn's, only measure: hetrain's fused blocks stay fused under them and are measured as one
          module, so a measured step computes what it would unmeasured.
        - ``record_history=True`` records the CUDA allocator's history from the start of the fit
          (``torch.cuda.memory._record_memory_history``) and writes ``memory_snapshot.pickle`` at the
          end; https://pytorch.org/memory_viz opens it. ``history_steps=[first, last]`` records those
          optimizer steps only and writes ``memory_snapshot_steps_<first>-<last>.pickle`` once the last
          has run: the allocations of the steps a person asks about, not the tail of the fit.
        - On the ``churn_steps`` (a few steps after warm-up): ``torch.profiler`` memory events and a
          ``record_function`` range per module (see :class:`~hetrain.callbacks.churn.ChurnTracker`);
          allocations made and freed in every one of those steps are reported per module, the
          temporaries (made and freed inside one module's forward or backward) first. Two torch
          profilers cannot run at once: steps ``StepTrace`` records are skipped, churn is off under
          Lightning's ``PyTorchProfiler``, and a churn step that begins where another torch profiler records (a
          ``torch.profiler.profile`` or ``emit_nvtx``, for a few steps or around the fit) is refused, as the report
          says, and not instrumented. A validation that runs inside a churn step (``val_check_interval``
          inside a gradient-accumulation window) drops that step: its allocations are not the step's. Given as a
          count, the steps are the fit's steps (optimizer steps in automatic optimization, batches that step an
          optimizer in manual), and a step skipped or refused is made up for by a later one where no other profiler
          records, as is a step dropped, for as many drops as the count.
        - The steps this callback instruments (module hooks, churn, chosen history) run slower;
          :meth:`instruments_step` names them, and :class:`~hetrain.callbacks.Throughput` leaves them out.
        - The report is written when the fit ends, and also when it stops with an error (the steps so far,
          the error named first); an out-of-memory error with ``dump_on_oom`` writes ``oom_report.md``
          instead. A fit resumed from a checkpoint into the directory an earlier part of the run wrote its report
          to keeps that part's: its ``memory_report.{md,png,html}`` go to ``memory_report-part<k>.{md,png,html}``
          (k = 1, 2, ... in the order the parts ran, as the CSV logger's ``csv-part<k>/``), and ``memory_steps.csv``
          keeps its rows before the step this fit resumed at, this fit's following them: one file of the whole
          run's steps. The allocator history it writes keeps an earlier part's the same way (``-part<k>.pickle``),
          and so does an earlier part's out-of-memory post-mortem (``oom_report-part<k>.md``; under DDP the rank
          that runs out keeps its own earlier one, as ``oom_report_rank<r>-part<j>.md``, j counting its own).
          An earlier part is known by its ``memory_steps.csv``, whose steps lead up to the one resumed at; a file
          whose steps do not (another run's) is written over, as a fresh fit writes over it.
        - With ``dump_on_oom`` an out-of-memory error in the fit (``torch.OutOfMemoryError`` on a GPU, or the
          CPU allocator's "can't allocate memory") writes ``oom_report.md`` (step, error, per-device peaks of
          the step so far, per-module table), ``memory_steps.csv`` (the completed steps' peaks) and, when GPU
          history was recorded, ``oom_snapshot.pickle``; Lightning then re-raises the error. Under DDP the rank
          that ran out writes them, as ``oom_report_rank<k>.md``, ``memory_steps_rank<k>.csv`` and
          ``oom_snapshot_rank<k>.pickle`` (the other ranks see only a collective that failed).
        - Host memory stays bounded over a long fit: the per-step series the plot draws holds at most
          ``MAX_STEP_POINTS`` points, a longer fit's each the peaks of several steps (:class:`StepPeaks`); the tables
          are the exact maxima, and ``memory_steps.csv`` holds every step: its rows (a resumed fit's earlier parts'
          too) wait in a temporary file until it is written, a chunk at a time. Where that file cannot be written
          (a full disk) training goes on, and the report says from which step the rows are missing.

    Args:
        dirpath: where reports go; ``None`` means the Trainer's ``default_root_dir``.
        module_every_n_steps: per-module hooks run on the fit's steps 0, n, 2n, ... (counted from where a
            resumed fit starts).
        record_history: record the CUDA allocator's history over the whole fit (ignored without CUDA).
        history_steps: ``[first, last]`` (or one step): record the history of these optimizer steps only.
        max_history_entries: allocator events kept in the history.
        dump_on_oom: write the post-mortem on out-of-memory, a GPU's or the CPU allocator's.
        churn_steps: the steps profiled for allocator churn: a count ``n`` (the fit's steps 2 .. n+1, counted
            from where a resumed fit starts, in batches: under manual optimization with several optimizers the
            global step advances once per optimizer) or a list of global steps; 0 or an empty list turns it off.
        churn_min_bytes: smaller churned allocations are not reported.
        churn_top: rows of each churn table in the log and the report.
    """

    def __init__(self, dirpath: str | None = None, module_every_n_steps: int = 50, record_history: bool = False,
                 max_history_entries: int = 100_000, dump_on_oom: bool = True,
                 churn_steps: int | Sequence[int] = 3, churn_min_bytes: int = 4096, churn_top: int = 10,
                 history_steps: int | Sequence[int] | None = None) -> None:
        if record_history and history_steps is not None:
            raise ValueError("hetrain: record_history records the whole fit and history_steps chosen steps; set one")
        self.history_steps = (parse_steps(history_steps, "callbacks.memory_profiler.history_steps")
                              if history_steps is not None else None)
        self._cuda = False  # a stage is on a GPU: there is an allocator history to record
        if module_every_n_steps < 1:
            raise ValueError(f"hetrain: module_every_n_steps must be >= 1, got {module_every_n_steps}")
        # A count: steps of the fit, placed one at a time as it runs (0 for a list of global steps).
        self._churn_count = churn_steps if isinstance(churn_steps, int) else 0
        self._churn_wanted = self._churn_count  # this fit's count: 0 where another profiler takes the steps
        if isinstance(churn_steps, int):
            if churn_steps < 0:
                raise ValueError(f"hetrain: churn_steps as a count must be >= 0, got {churn_steps}")
            churn_steps = range(CHURN_FIRST_STEP, CHURN_FIRST_STEP + churn_steps)
        if any(int(step) < 0 for step in churn_steps):
            raise ValueError(f"hetrain: churn_steps must be global steps >= 0, got {list(churn_steps)}")
        self._churn_asked = sorted({int(step) for step in churn_steps})
        # Global steps. A count's, before a fit, as one optimizer would place them; in a fit, those placed so far.
        self.churn_steps = list(self._churn_asked)
        self.churn_min_bytes = churn_min_bytes
        self.churn_top = churn_top
        self.churn: ChurnTracker | None = None
        self.churn_observed: list[int] = []  # the churn steps that completed
        self.churn_dropped: list[int] = []  # churn steps a validation ran inside of: not counted
        self._churn_taken: set[int] = set()  # churn steps left to StepTrace, whose trace records them
        # Churn steps not profiled because another torch profiler was recording as they began, as [first, last] runs:
        # a list's steps one each, a count's steps in a row (each made up for by a later one) one run.
        self._churn_refused: list[list[int]] = []
        # The churn step about to begin, taken out of churn_steps as another profiler recorded (_defer_churn_step).
        self._churn_deferred: int | None = None
        self._churn_refusing = False  # the last churn step that began was refused
        self.churn_traced: list[int] = []  # those of them that began
        self.dirpath = dirpath
        self.module_every_n_steps = module_every_n_steps
        self.record_history = record_history
        self.max_history_entries = max_history_entries
        self.dump_on_oom = dump_on_oom
        self._peaks = StepPeaks(MAX_STEP_POINTS)
        self.static: dict[str, dict[str, int]] = {}  # params, grads, optimizer state per device
        # The hooked step's gradients: the most bytes (on its device) each parameter's held at an optimizer step, by
        # id(parameter): holding the parameters kept a failed fit's model and gradients alive into the next fit.
        self._step_grads: dict[int, tuple[str, int]] = {}
        self.at_start: dict[str, int] = {}  # bytes in use per device when training started
        self.modules: ModuleMemory | None = None
        self.phases: PhaseMemory | None = None
        self._current: dict[str, Any] | None = None
        # The phase running now, which an out-of-memory error names. _current cannot tell: under gradient
        # accumulation the step's first micro-batch has filled its forward and backward already.
        self._phase = PHASES[0]
        self._stepped = False  # the optimizer stepped during this batch (not an accumulating micro-batch)
        # The hooked step's forwards are still to be measured: until the first backward in automatic optimization
        # (later micro-batches are not counted), until the batch ends in manual (a forward may follow a backward).
        self._measuring_forwards = False
        self._recording = False
        self._history_done = False  # the chosen history steps were written
        self.start_step = 0  # the global step the fit started at: past 0 when resumed from a checkpoint
        # This fit reached on_fit_start: what this callback holds is this fit's, not an earlier fit's.
        self._fit_started = False
        self._report_kept = False  # this fit moved the earlier part's report aside (or found none): once per fit
        self._earlier_report: str | None = None  # where it moved the earlier part's memory_report.md (or oom_report.md)

    @property
    def steps(self) -> list[dict[str, Any]]:
        """The completed steps' peaks, ``{"step", phase: {device: {...}}}``: one per step, up to ``MAX_STEP_POINTS``
        (then each holds several steps' maxima, see :class:`StepPeaks`)."""
        return self._peaks.points

    def _dir(self, trainer: pl.Trainer) -> Path:
        return Path(self.dirpath or trainer.default_root_dir)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._forget_earlier_fit()
        self._fit_started = True

    def _forget_earlier_fit(self) -> None:
        """What an earlier fit of this callback measured is not this fit's: a fit that fails before training starts
        (in its sanity check, or before on_fit_start, in configure_optimizers) must not report it as its own steps.
        Nor may its hooks measure this one."""
        self._stop_open_step()
        self.phases, self.modules, self.churn, self._current = None, None, None, None
        self._peaks.close()
        self._peaks = StepPeaks(MAX_STEP_POINTS)
        self.churn_observed, self.churn_dropped, self.static, self.at_start = [], [], {}, {}
        self.churn_traced, self._churn_taken, self._report_kept = [], set(), False
        self._churn_refused, self._churn_deferred, self._churn_refusing = [], None, False
        self._earlier_report = None
        self._cuda = False

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After on_fit_start, where a placement moves stages: the devices are final here.
        devices = {p.device for p in pl_module.parameters()} | {torch.device("cpu")}
        self.start_step = trainer.global_step
        self._stepped = self._history_done = False
        self.phases = PhaseMemory(sorted(devices, key=str))
        self.at_start = self.phases.current()
        steps_csv = self._dir(trainer) / STEPS_CSV
        if trainer.is_global_zero and trainer.ckpt_path is not None and steps_csv.is_file():
            self._copy_rows_of_earlier_parts(steps_csv, max(1, len(trainer.optimizers)))
        self.modules = ModuleMemory(pl_module)
        self.churn = ChurnTracker(pl_module, self.churn_min_bytes)
        self.churn_steps = [] if self._churn_count else list(self._churn_asked)
        self._churn_wanted = self._churn_count
        self._churn_refused, self._churn_deferred, self._churn_refusing = [], None, False
        self._leave_steps_to_other_profilers(trainer)
        self._defer_churn_step(trainer, None)
        self._cuda = any(d.type == "cuda" for d in devices)
        if self.record_history and self._cuda:
            self._start_history()
        if self.history_steps and not self._cuda:
            log.info(f"hetrain: MemoryProfiler history_steps={list(self.history_steps)}: no stage on a GPU, so no "
                     "CUDA allocator history to record")
        elif self.history_steps and self.history_steps[1] < self.start_step:
            log.warning(f"hetrain: MemoryProfiler history_steps={list(self.history_steps)} come before step "
                        f"{self.start_step}, where this resumed fit starts: no allocator history is recorded")

    def _copy_rows_of_earlier_parts(self, steps_csv: Path, steps_per_batch: int) -> None:
        """Copies the rows of ``steps_csv`` before this resumed fit's first step into the fit's rows
        (:meth:`StepPeaks.add_earlier`), where they are this run's earlier parts': their steps lead up to it, in the
        order the file holds them, without a gap (at most ``steps_per_batch`` apart, as manual optimization with
        several optimizers steps). Otherwise (another run's file, or a part that ended unmeasured) the file is kept
        aside with the earlier report (:meth:`_keep_earlier_report`) and this fit's steps start a new one. The file
        alone cannot tell another run whose steps lead up to this one from an earlier part: that is taken as one.
        Read and copied a chunk of rows at a time: a long run's file holds millions, which a list of them held for
        the whole fit."""
        first = last = previous = None
        leads_up, chunk = True, []
        try:
            with open(steps_csv, encoding="utf-8") as rows:
                next(rows, None)  # the header
                for row in rows:
                    if not (text := row.partition(",")[0]).isdigit() or (step := int(text)) >= self.start_step:
                        continue  # not a row, or a step this fit trains again
                    first = step if first is None else min(first, step)
                    last = step if last is None else max(last, step)
                    leads_up = leads_up and (previous is None or 0 <= step - previous <= steps_per_batch)
                    previous = step
                    if leads_up:
                        chunk.append(row if row.endswith("\n") else f"{row}\n")
                        if len(chunk) == 65536:
                            self._peaks.add_earlier("".join(chunk), len(chunk))
                            chunk.clear()
            leads_up = leads_up and previous is not None and self.start_step - previous <= steps_per_batch
            if leads_up:
                self._peaks.add_earlier("".join(chunk), len(chunk))
                return
            held = f"steps {first}..{last} before it, with a gap" if first is not None else "no step before it"
            log.info(f"hetrain: {steps_csv} does not lead up to step {self.start_step}, where this fit resumes (it "
                     f"holds {held}); it is kept aside with the earlier report, and this fit's steps start a new one")
        except OSError as failure:
            log.warning(f"hetrain: the rows of {steps_csv} could not be carried into this resumed fit's ({failure!r}); "
                        "it is kept aside with the earlier report, and this fit's steps start a new one")
        self._peaks.close()  # rows copied before a gap, or a failed write: this fit's steps start a new file
        self._peaks = StepPeaks(MAX_STEP_POINTS)

    def _history_step(self, step: int) -> bool:
        """Whether ``step`` is one of the chosen history steps this fit records."""
        return bool(self.history_steps) and self._cuda and self.history_steps[0] <= step <= self.history_steps[1]

    def _module_step(self, step: int) -> bool:
        return (step - self.start_step) % self.module_every_n_steps == 0

    def instruments_step(self, step: int) -> bool:
        """Whether global step ``step`` runs with this callback's hooks, profiler or allocator history: slower
        than the others, so not one to time."""
        # A step left to StepTrace is traced or, where the trace ended before it, profiled by churn: slow either way.
        return (self._module_step(step) or step in self.churn_steps or step in self._churn_taken
                or self._history_step(step))

    def _start_history(self) -> None:
        torch.cuda.memory._record_memory_history(max_entries=self.max_history_entries)
        self._recording = True

    def _snapshot_name(self) -> str:
        if self.history_steps is None:
            return SNAPSHOT
        first, last = self.history_steps
        return f"memory_snapshot_steps_{first}-{last}.pickle"

    def _dump_history(self, trainer: pl.Trainer) -> None:
        """Writes what was recorded (on rank zero) and stops recording."""
        if trainer.is_global_zero:
            path = self._dir(trainer) / self._snapshot_name()
            path.parent.mkdir(parents=True, exist_ok=True)
            if trainer.ckpt_path is not None:  # a resumed fit: an earlier part's history stays
                keep_earlier_part(path)
            torch.cuda.memory._dump_snapshot(str(path))
            log.info(f"CUDA allocator history: {path} (open it at https://pytorch.org/memory_viz)")
        torch.cuda.memory._record_memory_history(enabled=None)
        self._recording = False

    def _leave_steps_to_other_profilers(self, trainer: pl.Trainer) -> None:
        """Drops churn steps another torch profiler records: two cannot run at once, and the second would fail."""
        if isinstance(trainer.profiler, PyTorchProfiler) and (self.churn_steps or self._churn_wanted):
            log.warning("hetrain: Lightning's PyTorchProfiler is on; allocator churn is not measured")
            self.churn_steps, self._churn_wanted = [], 0
        taken = [s for s in self.churn_steps if self._traced(trainer, s)]
        if taken:
            log.warning(f"hetrain: steps {taken} are traced by StepTrace; allocator churn skips them")
            self.churn_steps = [s for s in self.churn_steps if s not in taken]
            self._churn_taken = set(taken)

    @staticmethod
    def _traced(trainer: pl.Trainer, step: int) -> bool:
        """Whether StepTrace traces the batch beginning at ``step``: under manual optimization that may be a batch
        beginning before its first step."""
        return any(isinstance(cb, StepTrace) and cb.traces_batch(step) for cb in trainer.callbacks)

    def _drop_made_up(self) -> bool:
        """Whether a dropped churn step is made up for by a later one: up to the count's worth of drops, so a count of
        one is made up too, and a validation inside every step does not have every step profiled."""
        return len(self.churn_dropped) <= self._churn_wanted

    def _place_churn_step(self, trainer: pl.Trainer) -> None:
        """A count's next churn step: the step about to start, from the fit's step CHURN_FIRST_STEP on, until the
        count is observed. Counted in steps of the fit, not global steps (which advance once per optimizer under
        manual optimization); a step skipped or traced by StepTrace is made up for by a later one, and so is a step
        dropped (see _drop_made_up) or refused (see _refuse_churn_step)."""
        step = trainer.global_step
        if (self._peaks.count >= CHURN_FIRST_STEP and len(self.churn_observed) < self._churn_wanted
                and self._drop_made_up() and step not in self.churn_steps):
            if self._traced(trainer, step):
                self._churn_taken.add(step)
            else:
                self.churn_steps.append(step)

    def _defer_churn_step(self, trainer: pl.Trainer, ended: int | None) -> None:
        """Takes the churn step about to start out of :attr:`churn_steps` while another torch profiler records (one
        StepTrace's trace of ``ended``, the step that just ended, may end after this: not that one). Its batch start
        refuses it, or profiles it if that profiler stopped since; meanwhile it is not instrumented: under a profiler
        around the whole fit a count's steps placed were, every one."""
        step = trainer.global_step
        if (step in self.churn_steps and torch.autograd.profiler._is_profiler_enabled
                and (ended is None or not self._traced(trainer, ended))):
            self.churn_steps.remove(step)
            self._churn_deferred = step

    def _refuse_churn_step(self, step: int) -> None:
        """Another torch profiler records as churn step ``step`` begins (two cannot record at once): the step is not
        profiled, nor instrumented, and the report names it. A count makes it up with a later step, where no profiler
        records: a profiler tracing a few steps leaves it the others, and one around the whole fit refuses each in
        turn, warned of once."""
        if step in self.churn_steps:
            self.churn_steps.remove(step)
        if self._churn_wanted and self._churn_refusing:  # the count's step before was refused too: one run
            self._churn_refused[-1][1] = step
        else:
            self._churn_refused.append([step, step])
        self._churn_refusing = True
        if self._churn_refused == [[step, step]]:  # the fit's first
            later = ", and profiles a later step instead" if self._churn_wanted else ""
            log.warning(f"hetrain: another torch profiler (a torch.profiler.profile or autograd's emit_nvtx) is "
                        f"recording at step {step}, a churn step; two cannot record at once, so allocator churn does "
                        f"not profile it{later}. Set churn_steps=0 to leave the steps to that profiler")

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self._current is None:  # first micro-batch of an optimizer step
            if self._history_step(trainer.global_step) and not self._recording and not self._history_done:
                self._start_history()
            self._current = {"step": trainer.global_step, **{phase: {} for phase in PHASES}}
            if self._module_step(trainer.global_step):
                self.modules.start()
                self._step_grads = {}
                self._measuring_forwards = True
            step = trainer.global_step
            if step in self._churn_taken and not self._traced(trainer, step):
                # Left to StepTrace ahead of time, but its trace ended before this step (a validation ended it):
                # churn profiles the step after all.
                self._churn_taken.discard(step)
                self.churn_steps.append(step)
            if step == self._churn_deferred:  # the profiler recording when it was deferred may have stopped since
                self._churn_deferred = None
                self.churn_steps.append(step)
            if step in self.churn_steps:
                if torch.autograd.profiler._is_profiler_enabled or not self.churn.start_step():
                    self._refuse_churn_step(step)
                else:
                    self._churn_refusing = False
            elif step in self._churn_taken and step not in self.churn_traced:
                self.churn_traced.append(step)  # the report says why churn has no such step
        # What ran since the last phase closed (the loader's collate, a validation, a checkpoint save) is no phase's,
        # but the run's peak holds it: read, it is kept (memory_counters.erased_peak) before the reset erases it.
        self.phases.peaks()
        self.phases.reset()
        self._phase = "forward"

    def _stop_open_step(self) -> None:
        """Drops a step that never reached on_train_batch_end, with its module hooks and churn profiler: Lightning
        skips the rest of an epoch when the LightningModule's on_train_batch_start returns -1, and a last batch whose
        training_step returned None does not step. Its numbers are partial; its hooks must not outlive it."""
        if self.modules is not None and self.modules.active:
            self.modules.stop(keep=False)
        if self.churn is not None and self.churn.active:
            self.churn.stop_step(keep=False)
        self._current, self._stepped, self._measuring_forwards = None, False, False
        self._step_grads = {}

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # A validation inside a step (val_check_interval inside a gradient-accumulation window): its allocations,
        # profiled, would count as the step's forward. The step is dropped; a count makes it up with a later one.
        if self.churn is not None and self.churn.active:
            self.churn.stop_step(keep=False)
            step = self._current["step"]
            self.churn_dropped.append(step)
            instead = " (a later step is profiled instead)" if self._churn_wanted and self._drop_made_up() else ""
            log.warning(f"hetrain: a validation ran inside step {step}, a churn step: its allocations are not the "
                        f"step's, so allocator churn does not count step {step}{instead}. Set val_check_interval "
                        "to a multiple of accumulate_grad_batches to validate between steps")

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # An optimizer step never spans epochs: one still open here was skipped.
        self._stop_open_step()

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._stop_open_step()  # whatever ended the fit, no hook or profiler of this callback outlives it
        self._fit_started = False

    def _close(self, phase: str) -> None:
        for device, peaks in self.phases.peaks().items():
            old = self._current[phase].get(device, {})
            self._current[phase][device] = {k: max(v, old.get(k, 0)) for k, v in peaks.items()}
        self.phases.reset()

    @override
    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        self._close("forward")
        self._phase = "backward"
        if self.modules.active:  # what the loss's graph saved outside every module is counted now, before backward
            self.modules.forward_done(loss)
        if pl_module.automatic_optimization:
            self._measuring_forwards = False

    @override
    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._close("backward")
        self._phase = "optimizer"  # until on_train_batch_end, as _close("optimizer") counts it
        if self._measuring_forwards:  # manual optimization: the next forward of the step is measured too
            self.modules.resume()

    @override
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        self._stepped = True
        if self.modules.active:  # gradients are complete (all micro-batches) and unscaled here
            self.modules.backward_done()
            self._note_grads(pl_module)

    def _note_grads(self, pl_module: pl.LightningModule) -> None:
        """Keeps the most bytes each parameter's gradient held at this step's optimizer steps, as the module table
        does: at the batch's end a manual step may have zeroed them after stepping, and one optimizer's step may
        have zeroed its gradients before another's backward."""
        for p in pl_module.parameters():
            if p.grad is not None and not is_lazy(p):
                n = sum(bytes_by_device([p.grad]).values())
                self._step_grads[id(p)] = (str(p.grad.device), max(n, self._step_grads.get(id(p), ("", 0))[1]))

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._measuring_forwards:  # the step's later batches, if the optimizer has not stepped, are not counted
            self._measuring_forwards = False
            self.modules.forward_done()
        if self._current is None or not self._stepped:
            return
        self._stepped = False
        self._close("optimizer")
        step = self._current["step"]  # global_step has moved on by now
        self._peaks.add(self._current)
        self._current = None
        if self.history_steps and self._recording and step >= self.history_steps[1]:
            self._dump_history(trainer)
            self._history_done = True
        if self.churn.active:
            self.churn.stop_step()
            self.churn_observed.append(step)
        if self.modules.active:
            self._keep_module_step(trainer, pl_module)
        if self._churn_wanted:
            self._place_churn_step(trainer)
        self._defer_churn_step(trainer, step)

    def _keep_module_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Folds the hooked step into the per-module records, and keeps what the parameters, gradients and
        optimizer state hold after it."""
        self.modules.stop()
        params = [p for p in pl_module.parameters() if not is_lazy(p)]  # a lazy module that never ran has none
        grads: dict[str, int] = defaultdict(int)
        for device, n in self._step_grads.values():
            grads[device] += n
        self._step_grads = {}
        self.static = {
            "params": bytes_by_device(params),
            "grads": dict(grads),
            "optimizer state": optimizer_state_bytes(trainer.optimizers),
        }

    def report(self, ended_early: str | None = None) -> MemoryReport:
        """What was measured so far, ready to render; ``ended_early`` says what stopped the fit, if anything did."""
        if self._churn_wanted:
            count = self._churn_wanted
            asked = f"{count} step{'s' if count > 1 else ''} from the fit's step {CHURN_FIRST_STEP}"
        else:  # the steps asked for, those left to StepTrace or refused included
            steps = sorted({*self.churn_steps, *self._churn_taken, *(first for first, _ in self._churn_refused)})
            asked = f"steps {steps}" if steps else None
        churn = churn_section(self.churn, asked, self.churn_observed, self.churn_min_bytes, self.churn_top,
                              self.churn_dropped, self.churn_traced)
        if churn is not None and self._churn_refused:
            paragraphs, tables = churn
            runs = [f"{a}" if a == b else f"{a}..{b}" for a, b in self._churn_refused]
            where = f"step{'s' if len(runs) > 1 or '..' in runs[0] else ''} {', '.join(runs)}"
            other = "another torch profiler (a torch.profiler.profile or autograd's emit_nvtx) was recording"
            # Nothing observed: churn_section's first paragraph is its "Not measured" line, which this reason replaces.
            paragraphs = ([f"Not measured ({asked} asked for): {other} at {where}, and two cannot record at once.",
                           *paragraphs[1:]] if not self.churn_observed else
                          [f"Not profiled: {where}, where {other} (two cannot record at once).", *paragraphs])
            churn = paragraphs, tables
        return _FitReport(self.steps, self.static, self.at_start, self.modules, churn, ended_early,
                          earlier_report=self._earlier_report, peaks=self._peaks)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            report_md = self._dir(trainer) / REPORT_MD
            if self.steps or trainer.ckpt_path is None or not report_md.exists():
                self._write_report(trainer)
            else:  # a resumed fit with nothing left to train: the earlier part's report is the one that measured
                log.info(f"hetrain: this fit resumed from {trainer.ckpt_path} ran no training step; the memory report "
                         f"{report_md} of the run's earlier part is left as it was")
        # The whole fit's history, or chosen steps the fit ended inside of: every rank records, so every rank stops
        # (rank zero writes it).
        if self._recording:
            self._dump_history(trainer)
        self._peaks.close()  # the steps file holds its rows now

    def _keep_earlier_report(self, trainer: pl.Trainer) -> None:
        """A resumed fit moves the report it finds in its directory aside (:func:`keep_earlier_part`), once: not its
        own. Never written over: a part that ended without a report of its steps (killed, or run without this
        callback) leaves a gap, which does not make the files another run's. An earlier part's out-of-memory
        post-mortem goes with it (a rank's own under DDP is kept by that rank, see on_exception), and the steps file
        where this fit does not go on with its rows (``StepPeaks.earlier``). The new report names the file moved."""
        if trainer.ckpt_path is None or self._report_kept:
            return
        self._report_kept = True
        directory = self._dir(trainer)
        goes_on = self._peaks.earlier > 0
        names = (REPORT_MD, REPORT_PNG, REPORT_HTML, OOM_MD, OOM_SNAPSHOT, *([] if goes_on else [STEPS_CSV]))
        moved = keep_earlier_part(*(directory / name for name in names))
        if moved:
            self._earlier_report = next((p.name for p in moved if p.suffix == ".md"), None)
            steps = (f"{STEPS_CSV} goes on with this part's steps" if goes_on else
                     f"{STEPS_CSV} starts anew, its steps not leading up to step {self.start_step}")
            log.info(f"hetrain: {directory} held the memory report (or out-of-memory post-mortem) of an earlier part "
                     f"of this run, or of another run; moved it to {', '.join(p.name for p in moved)}; {steps}")

    def _write_report(self, trainer: pl.Trainer, ended_early: str | None = None) -> None:
        """Writes the report files and logs their tables: per device, the largest modules, the churn. A resumed
        fit first moves the earlier part's report aside (:meth:`_keep_earlier_report`)."""
        self._keep_earlier_report(trainer)
        report = self.report(ended_early)
        directory = self._dir(trainer)
        paths = report.write(directory)
        self._peaks.written(paths["csv"])
        if report.steps:
            log.info(f"Memory per device, MiB ({READING})\n{markdown_table(*report.device_table())}")
        if self.modules is not None and self.modules.records:
            header, rows = self.modules.table()
            shown = rows[:-1][:LOGGED_MODULES] + rows[-1:]  # the largest, and the total row
            log.info(f"Memory per module, the largest {LOGGED_MODULES} (all in the report)\n"
                     f"{markdown_table(header, shown)}")
        log.info(f"Memory report: {paths['html']} (table: {paths['md']})")
        if self.churn_observed:
            header, rows = self.churn.table(["temporary"], self.churn_top)
            what = (f"Allocator churn, steps {self.churn_observed}: temporaries made and freed every step inside "
                    f"one module's forward or backward or the optimizer step (>= {self.churn_min_bytes} bytes)")
            log.info(f"{what}\n{markdown_table(header, rows)}" if rows else f"{what}: none")

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if trainer.state.fn != TrainerFn.FITTING:
            return  # trainer.test() or validate() after a fit: that fit's report and steps stand
        if not self._fit_started:  # failed before on_fit_start (configure_optimizers, strategy setup)
            self._forget_earlier_fit()  # an out-of-memory's post-mortem then says no step completed
        self._fit_started = False  # Lightning calls no teardown after an error
        # A later callback's on_train_batch_end can fail after the optimizer stepped (global_step has moved on):
        # that step completed, and is reported. Any other step stopped part way, and its numbers are dropped.
        finished = self._current is not None and trainer.global_step > self._current["step"]
        if finished:
            self._close("optimizer")
            self._peaks.add(self._current)
            self._current = None
        self._stepped = self._measuring_forwards = False
        if self.modules is not None and self.modules.active:  # no hook may outlive the fit, whatever ended it
            if finished:
                self._keep_module_step(trainer, pl_module)
            else:
                self.modules.stop(keep=False)
        self._step_grads = {}  # a step that stopped part way: its ids may be another model's by the next fit
        if self.churn is not None and self.churn.active:
            self.churn.stop_step(keep=False)
        oom = out_of_memory(exception)
        if self.dump_on_oom and oom:
            if trainer.is_global_zero:  # the post-mortem names the earlier part's report where it will stay
                self._keep_earlier_report(trainer)
            rank = trainer.global_rank if trainer.world_size > 1 else None
            if rank is not None and trainer.ckpt_path is not None:
                # Under DDP only the rank that runs out knows it writes its files: it keeps its own earlier ones.
                moved = keep_earlier_part(*(self._dir(trainer) / name for name in _oom_files(rank)))
                if moved:
                    log.info(f"hetrain: moved rank {rank}'s post-mortem of an earlier part of this run, or of another "
                             f"run, to {', '.join(p.name for p in moved)}")
            self.write_oom_dump(self._dir(trainer), trainer.global_step, exception, rank)
        elif trainer.is_global_zero and self.phases is not None:  # what the steps before the error measured
            ended = (f"The fit stopped at step {trainer.global_step} with {_headline(exception).removesuffix('.')}. "
                     "These are the steps before it.")
            try:
                self._write_report(trainer, ended)
            except Exception as failure:  # noqa: BLE001 - the fit's own error is the one to raise
                log.error(f"hetrain: the memory report could not be written after the fit's error: {failure!r}")
        if self._recording:
            torch.cuda.memory._record_memory_history(enabled=None)
            self._recording = False
        self._peaks.close()  # the steps file written above holds its rows now

    def write_oom_dump(self, directory: str | Path, step: int, exception: BaseException,
                       rank: int | None = None) -> Path:
        """Writes ``oom_report.md``, the completed steps' peaks in ``memory_steps.csv`` and, when history was
        recorded, ``oom_snapshot.pickle`` (with ``rank``: ``oom_report_rank<rank>.md``, ``memory_steps_rank<rank>.csv``
        and ``oom_snapshot_rank<rank>.pickle``); returns the report."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        report_name, snapshot_name, steps_name = _oom_files(rank)
        if self._recording:
            with open(directory / snapshot_name, "wb") as f:
                pickle.dump(torch.cuda.memory._snapshot(), f)
            snapshot = f"Allocator snapshot: {snapshot_name} (open it at https://pytorch.org/memory_viz)."
        elif self._cuda:
            snapshot = ("No allocator snapshot: history was not recorded. Set MemoryProfiler(record_history=True) "
                        "to get one on the next out-of-memory.")
        else:
            snapshot = "No allocator snapshot: that is the CUDA allocator's history, and no stage is on a GPU."
        if self._current and self.phases is not None:
            self._close(self._phase)  # the peaks of the phase that failed, so far
        on_rank = "" if rank is None else f" on rank {rank}"
        text = (f"# Out of memory{on_rank} at step {step}\n\n"
                f"During: {self._phase if self._current else 'outside a step'}\n\nError: `{_headline(exception)}`"
                f"\n\n{snapshot}\n\n")
        if self._current:
            rows = [[p, d, round(v["allocated"] / MIB, 3)] for p in PHASES for d, v in self._current[p].items()]
            text += "## This step so far\n\n" + markdown_table(["phase", "device", "peak MiB"], rows) + "\n"
        report = self.report()
        report.steps_file = steps_name
        text += report.markdown().removeprefix("# Memory\n")
        report.write_steps_csv(directory / steps_name)
        self._peaks.written(directory / steps_name)
        path = directory / report_name
        path.write_text(text, encoding="utf-8")  # "≥", module names: whatever the locale
        log.error(f"hetrain: out of memory at step {step}; post-mortem in {path}")
        return path
