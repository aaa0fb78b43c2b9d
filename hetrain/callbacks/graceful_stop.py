"""``GracefulStop``: Ctrl-C ends a fit after the step in flight, with a checkpoint to resume from.

Lightning's own answer to Ctrl-C stops at once: the step in flight is dropped, nothing is saved since the last
checkpoint, and the process exits. A person who presses Ctrl-C on a long run mostly wants it paused, not lost.
Here the first Ctrl-C lets the current optimizer step finish, saves a checkpoint of it (weights, optimizer, loops,
the loader's position and, with :class:`~hetrain.callbacks.RandomState`, the generators, so a resumed run goes on
exactly as this one would have) and ends the fit; a second Ctrl-C stops at once, the way Lightning does. A Ctrl-C
during a validation stops it as SIGTERM does (below), then raises ``SystemExit(130)``, the code of a process Ctrl-C
ended, which ``hetrain.train`` exits with as after a Ctrl-C stop at a step's end.

SIGTERM, what a scheduler sends a job it preempts, Lightning handles with a flag its loops check: it ends the fit
with ``SIGTERMException`` after the training step in flight, but also after the validation batch in flight or at the
end of an epoch, with nothing saved (and a process that exits 0, which a scheduler takes for a finished job). Once
training starts this callback takes SIGTERM over: the step in flight finishes and its checkpoint is saved, as for
Ctrl-C, before Lightning raises ``SIGTERMException``; a SIGTERM during a validation stops the validation after the
batch in flight, saves the state after the last training step (the checkpoint that step would have saved) and
raises it; ``hetrain.train`` exits 143. Before training starts (the sanity check) Lightning's
own handling stops the fit at once, with nothing to save. Under DDP the signal should reach rank 0 alone: before
training Lightning's handler broadcasts from inside the signal handler, and a SIGTERM delivered to every rank at once
can leave them in mismatched collectives; once training runs the ranks agree on it each step and each validation
batch.

A signal during the fit's last step, or after it (its last validation, the checkpoints after it), stops nothing: the
fit ends there anyway, and a checkpoint of its last step would leave nothing to resume. The fit runs to its end as
without the signal, with its last validation and checkpoints, logs that the signal came and records which in
``signal_after_last_step``; ``hetrain.train`` then reports a single run completed (status ``ok``, exit 0), so a
scheduler that sent SIGTERM takes the job for finished rather than requeueing it, and ends a sweep after that job
(exit 130 or 143), its later jobs not started.
"""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities.exceptions import SIGTERMException
from typing_extensions import override

from hetrain.callbacks.precision import NonFiniteGuard
from hetrain.callbacks.ranks import reduce_flags

log = logging.getLogger(__name__)


def steps_text(count: int) -> str:
    """``count`` steps trained, in words: counting them (as ``at_step`` and ``ckpt_path`` do) avoids the off-by-one
    against the step numbers StepTrace and the memory profiler give, which count from 0."""
    return f"{count} step" + ("" if count == 1 else "s")


class GracefulStop(Callback):
    """The first Ctrl-C (SIGINT) or SIGTERM stops the fit at the next optimizer step's end and saves ``filename`` there.

    Args:
        filename: the checkpoint's name, in the ModelCheckpoint's directory (the Trainer's root directory
            without one); ``ckpt_path=`` resumes from it.

    Notes:
        - With gradient accumulation the stop waits for the step that applies the accumulated gradients: a
          checkpoint between them would lose the ones gathered so far.
        - Under DDP every rank stops after the same step (the ranks agree on it each step: one boolean
          all-reduce, as Lightning's own SIGTERM check does), so none waits in a collective the others left.
        - Only the main thread can take signals: in a fit run from another thread Ctrl-C is left to Python and
          SIGTERM to Lightning.
        - Ctrl-C or SIGTERM before training starts (the sanity check) stops at once, as without this callback.
        - The fit stops even before the Trainer's ``min_steps`` or ``min_epochs`` are met (Lightning's own stops
          wait for them); they are set back when the fit ends.
        - A terminal's Ctrl-C reaches DataLoader worker processes too, as a scheduler's SIGTERM (SLURM at a time
          limit or on preemption, systemd) reaches every process of the job, and a worker that dies of it ends the
          fit with an error, and no checkpoint, where the stop needs more batches (with gradient accumulation).
          hetrain's loaders' workers and reader processes ignore both (a SIGTERM from the main process, its own
          stop of them, still ends them; ignoring the job's SIGTERM needs the built hetrain._C, a worker still
          starting dies of it, and under the forkserver start method, Python 3.14's default on Linux, so does the
          server process, with which torch's workers end); give a DataLoader of your own with ``num_workers>0``
          ``worker_init_fn=hetrain.data.ignore_interrupts_in_workers(your_init_fn)``.
        - The validation Lightning runs when a fit is told to stop is skipped: a pause does not wait for it.
        - Ctrl-C or SIGTERM during a validation inside the fit stops it after the batch in flight (under DDP every
          rank after the same batch) and saves the checkpoint of the training step before it, then raises
          ``SystemExit(130)`` (Ctrl-C) or Lightning's ``SIGTERMException``; resuming from it goes on with the next
          step, leaving out that validation, as from a Ctrl-C stop at that step. A validation in the middle of a
          gradient accumulation window is not stopped: the stop waits for the step that applies the gradients.
        - SIGTERM at the end of an epoch stops after the next epoch's first step (after the last one, the fit
          simply ends).
        - Ctrl-C or SIGTERM during the fit's last step (``max_steps``, or the last batch of the last epoch) or after
          it does not stop the fit: it runs to its end (its last validation, its checkpoints), ``summary`` stays
          empty, the log says the signal came and ``signal_after_last_step`` names it (``"SIGINT"`` or
          ``"SIGTERM"``). A second Ctrl-C still stops at once.
        - ``summary`` holds the step, the checkpoint and the signal once the fit was stopped this way;
          ``steps_trained`` counts the optimizer steps of this fit.
    """

    def __init__(self, filename: str = "interrupted.ckpt") -> None:
        self.filename = filename
        self.requested = False
        self.sigterm = False
        self.steps_trained = 0
        self.summary: dict[str, Any] = {}
        self.signal_after_last_step: str | None = None
        self._step_at_batch_start = 0  # global_step when the batch in flight began: it grows when the batch steps
        self._previous: Any = None
        self._previous_sigterm: Any = None
        self._installed = False
        # The training and validation loops' progress when the last optimizer step ended (None in the middle of an
        # accumulation window): a stop during the validation after it saves these, as that step's end would have.
        self._at_step_end: tuple[dict[str, Any], dict[str, Any]] | None = None
        self._limit_val_batches: int | float | None = None
        self._minimums: tuple[int | None, int | None] | None = None  # the fit loop's min_epochs and min_steps
        self._last_step_done = False  # the fit's last step has ended: a signal now lets the fit run to its end

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # NonFiniteGuard sets a skipped step's LR schedule back in its on_train_batch_end: the checkpoint this one saves
        # there must come after it, whatever order the callbacks were listed in (as Lightning moves its checkpoint
        # callbacks last). A new list, not an edit: Lightning is going through the current one.
        callbacks = trainer.callbacks
        last_guard = max((i for i, c in enumerate(callbacks) if isinstance(c, NonFiniteGuard)), default=-1)
        here = callbacks.index(self)
        if here < last_guard:
            trainer.callbacks = [*callbacks[:here], *callbacks[here + 1:last_guard + 1], self,
                                 *callbacks[last_guard + 1:]]

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.requested, self.sigterm, self.steps_trained, self.summary = False, False, 0, {}
        self._at_step_end, self._last_step_done, self.signal_after_last_step = None, False, None

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Not in on_fit_start: the Trainer records the signal handlers after that hook and puts those back when
        # it tears down, which would leave this one installed after the fit.
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._on_sigint)
            # Lightning's own handler is what is replaced: its flag makes the loops raise wherever they check it
            # (after a validation batch, at an epoch's end) with nothing saved.
            self._previous_sigterm = signal.signal(signal.SIGTERM, self._on_sigterm)
            self._installed = True

    @property
    def stopped_by_signal(self) -> bool:
        """Whether this fit was stopped by a signal, its checkpoint saved (``summary`` says where)."""
        return bool(self.summary)

    def _on_sigint(self, signum: int, frame: FrameType | None) -> None:
        if self.requested:  # the second press: stop at once, through Lightning's KeyboardInterrupt handling
            self._restore()
            signal.default_int_handler(signum, frame)
        self.requested = True
        if self._last_step_done:
            self._came_after_last_step("SIGINT")
        else:
            log.warning("Ctrl-C: the fit stops after this step (a validation after the batch in flight) and saves a "
                        "checkpoint to resume from; press Ctrl-C again to stop at once without one")

    def _on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        if self.sigterm:
            return
        self.sigterm = True
        if self._last_step_done:
            self._came_after_last_step("SIGTERM")
        else:
            log.warning("SIGTERM: the fit stops after this step (a validation after the batch in flight) and saves a "
                        "checkpoint to resume from")

    def _came_after_last_step(self, signal_name: str) -> None:
        """Records a signal that stops nothing, for the fit's caller: a sweep, unlike a single run, ends after it."""
        self.signal_after_last_step = self.signal_after_last_step or signal_name
        name = "Ctrl-C" if signal_name == "SIGINT" else signal_name
        log.warning(f"{name} during or after the fit's last training step: the fit runs to its end (its last "
                    "validation and checkpoints) rather than stopping, and is then complete, with nothing to resume")

    @staticmethod
    def _ends_the_fit(trainer: pl.Trainer) -> bool:
        """Whether the fit ends after the training batch just run (and the validation after it) anyway: its
        ``max_steps`` reached, or the last batch of its last epoch."""
        if trainer.max_steps != -1 and trainer.global_step >= trainer.max_steps:
            return True
        last_epoch = trainer.max_epochs not in (None, -1) and trainer.current_epoch + 1 >= trainer.max_epochs
        return last_epoch and trainer.fit_loop.epoch_loop._num_ready_batches_reached()

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._step_at_batch_start = trainer.global_step

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        loop = trainer.fit_loop.epoch_loop
        # Not batch_idx against accumulate_grad_batches: Lightning also steps at an epoch's last batch, its window
        # incomplete (every step, in an epoch shorter than the window).
        stepped = trainer.global_step - self._step_at_batch_start
        if not stepped:
            self._at_step_end = None
            return  # gradients of this batch wait for the next ones: no step to save yet
        self.steps_trained += stepped
        self._at_step_end = (loop.batch_progress.state_dict(), loop.val_loop.batch_progress.state_dict())
        if self._ends_the_fit(trainer):  # the same on every rank: none waits in the all-reduce below
            # A stop here would save a checkpoint with no step left to resume and skip the last validation.
            self._last_step_done = True
            if self.requested or self.sigterm:
                self._came_after_last_step("SIGINT" if self.requested else "SIGTERM")
            return
        # A SIGTERM that came before on_train_start set Lightning's flag: Lightning raises SIGTERMException once this
        # batch is done.
        sigint, sigterm = self.requested, self.sigterm or bool(getattr(trainer, "received_sigterm", False))
        if trainer.world_size > 1:  # any rank's signal stops every rank, each naming the signal that came
            signals = reduce_flags(trainer, torch.tensor([sigint, sigterm]), torch.distributed.ReduceOp.MAX)
            sigint, sigterm = signals.tolist()
        if not (sigint or sigterm) or self.summary:
            return
        path = self._checkpoint_dir(trainer) / self.filename
        trainer.save_checkpoint(path)
        trainer.should_stop = True
        # Lightning validates once more when should_stop is set (for early stopping); a paused run should not wait
        # for a whole validation. Set back when the fit ends, for a later fit of this Trainer.
        self._limit_val_batches, trainer.limit_val_batches = trainer.limit_val_batches, 0
        # Lightning trains on past should_stop until min_steps and min_epochs are met; a signal's stop does not wait
        # for them. Set back when the fit ends, as limit_val_batches.
        fit_loop = trainer.fit_loop
        self._minimums = fit_loop.min_epochs, fit_loop.epoch_loop.min_steps
        fit_loop.min_epochs, fit_loop.epoch_loop.min_steps = None, None
        if sigterm and not sigint:
            # The fit ends as Lightning ends it on SIGTERM, with SIGTERMException once this batch is done: the flag
            # its handler would have set (this one took the signal; under DDP the ranks agreed on it above).
            trainer._signal_connector.received_sigterm = True
        name = "SIGINT" if sigint else "SIGTERM"
        self.summary = {"at_step": trainer.global_step, "checkpoint": str(path), "signal": name}
        if trainer.is_global_zero:
            log.warning(f"Stopped by {'Ctrl-C' if sigint else name} after {steps_text(trainer.global_step)}; "
                        f"checkpoint {path}. Resume with ckpt_path={path}")

    @override
    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        if trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING or self.summary or self._last_step_done:
            return  # after the fit's last step the validation runs to its end, and so does the fit
        sigint, sigterm = self.requested, self.sigterm
        if trainer.world_size > 1:  # every rank stops after the same validation batch, each naming the signal that came
            signals = reduce_flags(trainer, torch.tensor([sigint, sigterm]), torch.distributed.ReduceOp.MAX)
            sigint, sigterm = signals.tolist()
        if not (sigint or sigterm) or self._at_step_end is None:
            return  # no signal, or one inside an accumulation window: the stop waits for the step that ends it
        path = self._checkpoint_dir(trainer) / self.filename
        self._save_as_at_step_end(trainer, path)
        name = "SIGINT" if sigint else "SIGTERM"
        self.summary = {"at_step": trainer.global_step, "checkpoint": str(path), "signal": name}
        if trainer.is_global_zero:
            log.warning(f"Stopped by {'Ctrl-C' if sigint else name} during the validation after "
                        f"{steps_text(trainer.global_step)}; checkpoint {path}. Resume with ckpt_path={path}")
        # The fit cannot end normally here: the validation would run to its end (and its callbacks would act on
        # the batches run so far).
        if sigint:
            raise SystemExit(128 + signal.SIGINT)
        raise SIGTERMException

    def _save_as_at_step_end(self, trainer: pl.Trainer, path: Path) -> None:
        """Saves the checkpoint the last step's end would have saved: validation changes nothing but the loops'
        progress (the training batch counted complete, the validation batches run), which are put back for it."""
        assert self._at_step_end is not None
        loop = trainer.fit_loop.epoch_loop
        now = (loop.batch_progress.state_dict(), loop.val_loop.batch_progress.state_dict())
        loop.batch_progress.load_state_dict(self._at_step_end[0])
        loop.val_loop.batch_progress.load_state_dict(self._at_step_end[1])
        try:
            trainer.save_checkpoint(path)
        finally:
            loop.batch_progress.load_state_dict(now[0])
            loop.val_loop.batch_progress.load_state_dict(now[1])

    @staticmethod
    def _checkpoint_dir(trainer: pl.Trainer) -> Path:
        checkpoint = trainer.checkpoint_callback
        directory = getattr(checkpoint, "dirpath", None) or trainer.default_root_dir
        return Path(directory)

    def _restore(self) -> None:
        if self._installed:
            # None: the handler before was not set from Python; the default is what it did.
            signal.signal(signal.SIGINT, signal.SIG_DFL if self._previous is None else self._previous)
            signal.signal(signal.SIGTERM,
                          signal.SIG_DFL if self._previous_sigterm is None else self._previous_sigterm)
            self._installed = False

    def _restore_trainer(self, trainer: pl.Trainer) -> None:
        """Sets back what the stop changed, for a later fit of this Trainer."""
        if self._limit_val_batches is not None:
            trainer.limit_val_batches, self._limit_val_batches = self._limit_val_batches, None
        if self._minimums is not None:
            (trainer.fit_loop.min_epochs, trainer.fit_loop.epoch_loop.min_steps), self._minimums = self._minimums, None

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._last_step_done and trainer.world_size > 1:
            # A signal after the last step reached the rank whose handler ran (rank 0 alone, as asked under DDP): every
            # rank reaches this hook after the last validation, so all learn of it and a sweep ends on every rank.
            came = [self.signal_after_last_step == "SIGINT", self.signal_after_last_step == "SIGTERM"]
            sigint, sigterm = reduce_flags(trainer, torch.tensor(came), torch.distributed.ReduceOp.MAX).tolist()
            self.signal_after_last_step = "SIGINT" if sigint else "SIGTERM" if sigterm else None
        self._restore()
        self._restore_trainer(trainer)

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._restore()
        self._restore_trainer(trainer)
