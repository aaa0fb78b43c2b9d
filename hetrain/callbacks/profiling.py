"""``StepTrace``: a Chrome trace of chosen training steps, every device on one timeline.

Each pipeline stage, micro-batch, cross-device copy and hetrain op already runs in a named
``record_function`` range; this callback records training steps ``first..last`` with torch's profiler
(CPU, plus CUDA when present) and writes ``trace_steps_<first>-<last>.json`` into the run directory,
for chrome://tracing or ui.perfetto.dev. Every step is itself a range, ``hetrain::train step <n>``. A fit resumed
into the directory an earlier part of the run traced into keeps that part's trace, as
``trace_steps_<first>-<last>-part<k>.json`` (:func:`keep_earlier_part`), and writes its own under the usual name.
The trace holds training steps only: a validation that begins inside the range, or training that ends before its last
step, ends it, and the log names the steps written (in a fit resumed inside the range, from the step it resumed at).
The trace holds whole batches: under manual optimization a batch that steps two optimizers runs two steps, so it may
begin before the first step asked for and end after the last. Two torch profilers cannot record at once: a batch
another one records is not traced, and the log says so; beside Lightning's ``PyTorchProfiler``
(``Trainer(profiler="pytorch")``), which may switch on at any batch under its schedule, no step of the fit is traced.

Lightning's ``PyTorchProfiler`` profiles the Trainer's actions under a schedule counted per action and
writes one file per action; what a person asks for here is one file holding exactly the steps named,
so the callback drives ``torch.profiler.profile`` itself at batch boundaries.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.profilers import PyTorchProfiler
from pytorch_lightning.trainer.states import TrainerFn
from torch.profiler import ProfilerActivity, profile, record_function
from typing_extensions import override

log = logging.getLogger(__name__)


def parse_steps(steps: int | Sequence[int], setting: str = "callbacks.profile_steps") -> tuple[int, int]:
    """``[first, last]``, or one step (alone or in a list), as a checked pair of optimizer steps counted from 0;
    an error names ``setting``, the option that gave them."""
    steps = [steps] if isinstance(steps, int) else list(steps)  # a bool too, refused below
    if len(steps) == 1:
        steps = steps * 2
    whole = all(isinstance(s, int) and not isinstance(s, bool) for s in steps)  # true would read as step 1
    if len(steps) != 2 or not whole or not 0 <= steps[0] <= steps[1]:
        name = setting.rsplit(".", 1)[-1]
        raise ValueError(f"hetrain: {name} must be [first, last] with 0 <= first <= last, got {steps}; "
                         f"e.g. {setting}=[10,12]")
    return steps[0], steps[1]


def keep_earlier_part(*paths: Path) -> list[Path]:
    """Moves those of ``paths`` an earlier part of the run wrote (a fit resumed into the run's own directory writes
    the same names) to ``<stem>-part<k><suffix>`` beside them, e.g. ``memory_report-part1.md``, k = 1, 2, ... in the
    order the parts ran, one k for all of them, as hetrain's CSV logger keeps an earlier part's log in
    ``csv-part<k>/``; returns where they went."""
    present = [p for p in paths if p.is_file()]
    if not present:
        return []
    k = 1
    while any(_part(p, k).exists() for p in paths):
        k += 1
    for p in present:
        os.replace(p, _part(p, k))
    return [_part(p, k) for p in present]


def _part(path: Path, k: int) -> Path:
    return path.with_name(f"{path.stem}-part{k}{path.suffix}")


def instrumented(trainer: pl.Trainer, step: int) -> bool:
    """Whether a callback profiles or hooks global step ``step`` (its ``instruments_step`` says so): such a step
    runs slower than the others, so timing callbacks leave it out."""
    return any(cb.instruments_step(step) for cb in trainer.callbacks if hasattr(cb, "instruments_step"))


def training_ends_after_validation(trainer: pl.Trainer) -> bool:
    """Whether the validation beginning now is the fit's last, as Lightning's loops decide after it: at ``max_steps``,
    at the last batch (``limit_train_batches`` included) of the last of ``max_epochs``, or at a stop asked for
    (``trainer.should_stop``: early stopping, ``max_time``) that ``min_epochs`` and ``min_steps`` allow."""
    loop = trainer.fit_loop
    if loop.max_steps != -1 and trainer.global_step >= loop.max_steps:
        return True
    epochs = loop.epoch_progress.current.processed + 1  # this epoch, counted once its validation ends
    if loop.max_epochs not in (None, -1) and epochs >= loop.max_epochs and loop.epoch_loop._num_ready_batches_reached():
        return True
    return trainer.should_stop and loop._can_stop_early


class StepTrace(Callback):
    """Records training steps ``first..last`` (optimizer steps from 0) into one Chrome trace.

    Example::

        Trainer(callbacks=[StepTrace([10, 12], dirpath="runs/x")])  # or callbacks.profile_steps=[10,12]

    Args:
        steps: ``[first, last]``, both included; one value traces one step.
        dirpath: where ``trace_steps_<first>-<last>.json`` goes (under DDP ``..._rank<k>.json``, one per rank). In a
            fit resumed from a checkpoint an earlier part's trace of that name is kept as ``...-part<k>.json``.
        record_shapes: also record each op's input shapes (larger trace).
    """

    def __init__(self, steps: int | Sequence[int], dirpath: str | Path, record_shapes: bool = False) -> None:
        self.first, self.last = parse_steps(steps)
        self._named_path = Path(dirpath) / f"trace_steps_{self.first}-{self.last}.json"
        self.path = self._named_path  # under DDP, once written: one file per rank
        self.record_shapes = record_shapes
        self.summary: dict[str, Any] = {}
        self._profiler: profile | None = None
        self._step_range: record_function | None = None
        self._open_step = -1  # the optimizer step whose range is open
        self._first_traced = self.first  # where the trace began: its first batch's first step
        self._last_traced = self.last  # once written, its last batch's last step (or where it was cut short)
        self._fit_began_at = 0  # the global step training began at (above 0 when resumed, or in a second fit)
        self._training = False  # this fit's training has begun: a fit failing in its sanity check trained no step
        self._began_how = ""  # how the fit came to begin there, said where steps before it were asked for
        self._batch_began_at = 0  # the global step the current batch began at
        self._steps_per_batch = 1  # the most optimizer steps one batch has run (manual optimization may run several)
        self._missed = ""  # why steps from first on ran untraced, other than a resume past them
        self._missed_fix = ""  # what to change so that they are traced
        self._beside_pytorch_profiler = False  # Lightning's PyTorchProfiler is on in this fit: nothing is traced

    def traces_batch(self, step: int) -> bool:
        """Whether a batch beginning at global step ``step`` runs under this trace. It runs steps
        step..step + steps_per_batch - 1 (several under manual optimization): traced if they reach first..last, so a
        trace may begin before ``first``. Another torch profiler must stay off for such a batch: two at once crash."""
        return (not self._beside_pytorch_profiler and not self.summary and step <= self.last
                and step + self._steps_per_batch > self.first)

    def instruments_step(self, step: int) -> bool:
        """Whether the batch beginning at global step ``step`` is traced (and so runs slower). Asked at a batch's
        start, before this callback's own hook may begin the trace there: until it begins, the batches it will."""
        if self._profiler is None and not self.summary:
            return self.traces_batch(step)
        return self._first_traced <= step <= self._last_traced

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Each fit traces its own steps: an earlier fit's trace kept a second one from tracing any, while timing
        # callbacks still left that fit's traced steps out.
        self.path, self.summary = self._named_path, {}
        self._first_traced, self._last_traced = self.first, self.last
        self._missed = self._missed_fix = ""
        self._training = False
        # Lightning's PyTorchProfiler is off while its schedule waits or warms up (torch.autograd._profiler_enabled()
        # says False), and starting then, it would find this trace recording: it raises or crashes the process.
        self._beside_pytorch_profiler = isinstance(trainer.profiler, PyTorchProfiler)
        if self._beside_pytorch_profiler:
            log.warning(f"profile: steps {self.first}..{self.last} are not traced in this fit: Lightning's "
                        "PyTorchProfiler is on (Trainer(profiler=...)), and two torch profilers cannot record at once; "
                        "use one or the other (drop the Trainer's profiler, or callbacks.profile_steps)")
        # Under manual optimization each optimizer's step counts one: a batch stepping two optimizers runs two steps.
        # Set here, where the optimizers are (not on_train_start): callbacks ask traces_batch from their on_train_start.
        self._steps_per_batch = max(1, len(trainer.optimizers))

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        step = self._fit_began_at = trainer.global_step
        self._training = True
        # A second fit of the same Trainer goes on from the first one's step: nothing was resumed.
        self._began_how = f"the fit resumed at step {step}" if trainer.ckpt_path else \
            f"the fit began at step {step} (where this Trainer's previous fit ended)"

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        step = self._batch_began_at = trainer.global_step
        # A batch runs steps step..step + steps_per_batch - 1 (none, under accumulation, until its window's last):
        # trace it if they reach the range, or a range that falls inside one batch is never traced.
        if self._profiler is None and self.traces_batch(step):
            if torch.autograd._profiler_enabled():  # two torch profilers at once crash writing the trace
                log.warning(f"profile: batch {batch_idx} (from step {step}) is not traced: another torch profiler "
                            "records it; turn that one off for the steps traced")
                if not self._missed:
                    self._missed = (f"batch {batch_idx} (from step {step}) ran under another torch profiler, and two "
                                    "cannot record at once")
                    self._missed_fix = "turn that profiler off for the steps traced, or off altogether"
            else:
                activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
                self._profiler = profile(activities=activities, record_shapes=self.record_shapes)
                self._profiler.__enter__()
                self._first_traced = step
        if self._profiler is not None and self._step_range is None:
            self._step_range, self._open_step = record_function(f"hetrain::train step {step}"), step
            self._step_range.__enter__()

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        began, ended = self._batch_began_at, trainer.global_step
        self._steps_per_batch = max(self._steps_per_batch, ended - began)
        if self._profiler is None and not self.summary and not self._missed and began <= self.last \
                and ended > self.first:
            self._missed = (f"batch {batch_idx} ran steps {began}..{ended - 1} untraced: more optimizer steps than "
                            "any batch before it, and a trace begins at a batch's start")
            self._missed_fix = "trace steps of a later batch"
        # Under gradient accumulation a step spans several batches; its range closes with its optimizer step.
        if self._step_range is not None and trainer.global_step > self._open_step:
            self._step_range.__exit__(None, None, None)
            self._step_range = None
        if self._profiler is not None and trainer.global_step > self.last:
            self._write(trainer)

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # A trace holds training steps: recording on would add the validation and the checkpoint saved after it (at
        # the end of training, with steps asked for past it, they filled most of the trace).
        if self._profiler is not None:
            # Ended by max_epochs too: the last epoch's validation blamed itself and advised moving the steps.
            ended = training_ends_after_validation(trainer)
            self._write(trainer, f"training ended after step {trainer.global_step - 1}" if ended else
                        f"a validation began after step {trainer.global_step - 1} (a trace holds training steps only: "
                        "choose steps between validations)")

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._end(trainer, failed=False)

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # trainer.validate() or test(), or a fit failing in its sanity check: no step trained, none went untraced.
        if trainer.state.fn != TrainerFn.FITTING or not self._training:
            return
        self._end(trainer, failed=True)

    def _end(self, trainer: pl.Trainer, failed: bool) -> None:
        """Writes what was recorded, or says why no trace was; ``failed``: the fit raised during its training."""
        self._training = False
        if self._beside_pytorch_profiler:  # said at the fit's start
            return
        step = trainer.global_step
        if self._profiler is not None:  # training ended before the last step: keep what was recorded
            ended = f"the fit failed at step {step}" if failed else f"training ended after step {step - 1}"
            self._write(trainer, ended)
        elif not self.summary and self._fit_began_at > self.last:
            log.warning(f"profile: no trace written: {self._began_how}, after step {self.last}; trace later steps")
        elif not self.summary and step <= self.first and failed:  # more steps would not have helped
            log.warning(f"profile: no trace written: the fit failed at step {step}, before step {self.first}")
        elif not self.summary and step <= self.first:
            log.warning(f"profile: no trace written: training ended at step {step}, before step {self.first}; "
                        "trace earlier steps or train longer")
        elif not self.summary and self._missed:
            log.warning(f"profile: no trace written: {self._missed}; {self._missed_fix}")

    def _write(self, trainer: pl.Trainer, cut_short_by: str = "") -> None:
        """Writes the trace; ``cut_short_by`` says why steps asked for are missing from it."""
        # At least the first step: a validation inside an accumulation window may end the trace during it. Past the
        # last step asked for where the batch that ran it ran more (manual optimization).
        self._last_traced = max(self._first_traced, trainer.global_step - 1)
        if self._step_range is not None:
            self._step_range.__exit__(None, None, None)
            self._step_range = None
        profiler, self._profiler = self._profiler, None
        profiler.__exit__(None, None, None)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if trainer.world_size > 1:  # one trace per process
            self.path = self._named_path.with_name(f"{self._named_path.stem}_rank{trainer.global_rank}.json")
        if trainer.ckpt_path is not None:  # resumed into its own directory: an earlier part's trace stays whole
            for aside in keep_earlier_part(self.path):
                log.info(f"profile: {self.path} held the trace of an earlier part of this run; moved it to {aside}")
        profiler.export_chrome_trace(str(self.path))
        self.summary = {"trace": str(self.path)}
        missing = []
        if self._first_traced > self.first:
            why = self._began_how if self._fit_began_at > self.first else self._missed
            missing.append(f"steps {self.first}..{self._first_traced - 1} are not in it: {why}")
        if self._last_traced < self.last:
            missing.append(f"steps {self._last_traced + 1}..{self.last} are not in it: {cut_short_by}")
        log.info(f"profile: steps {self._first_traced}..{self._last_traced} written to {self.path}"
                 f"{''.join(f'; {m}' for m in missing)} (open in chrome://tracing or ui.perfetto.dev)")
