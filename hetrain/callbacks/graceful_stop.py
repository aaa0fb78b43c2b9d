"""``GracefulStop``: Ctrl-C ends a fit after the step in flight, with a checkpoint to resume from.

Lightning's own answer to Ctrl-C stops at once: the step in flight is dropped, nothing is saved since the last
checkpoint, and the process exits. A person who presses Ctrl-C on a long run mostly wants it paused, not lost.
Here the first Ctrl-C lets the current optimizer step finish, saves a checkpoint of it (weights, optimizer, loops,
the loader's position and, with :class:`~hetrain.callbacks.RandomState`, the generators, so a resumed run goes on
exactly as this one would have) and ends the fit; a second Ctrl-C stops at once, the way Lightning does.

SIGTERM, what a scheduler sends a job it preempts, Lightning handles itself: it lets the step in flight finish and
then raises ``SIGTERMException``, again with nothing saved. Here that step's checkpoint is saved first. Under DDP
the signal should reach rank 0 alone: Lightning's handler broadcasts from inside the signal handler, and a SIGTERM
delivered to every rank at once can leave them in mismatched collectives.
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
from typing_extensions import override

from hetrain.callbacks.ranks import reduce_flags

log = logging.getLogger(__name__)


class GracefulStop(Callback):
    """The first Ctrl-C (SIGINT) stops the fit at the next optimizer step's end and saves ``filename`` there.

    Args:
        filename: the checkpoint's name, in the ModelCheckpoint's directory (the Trainer's root directory
            without one); ``ckpt_path=`` resumes from it.

    Notes:
        - With gradient accumulation the stop waits for the step that applies the accumulated gradients: a
          checkpoint between them would lose the ones gathered so far.
        - Under DDP every rank stops after the same step (the ranks agree on it each step: one boolean
          all-reduce, as Lightning's own SIGTERM check does), so none waits in a collective the others left.
        - Only the main thread can take signals: in a fit run from another thread Ctrl-C is left to Python.
        - Ctrl-C before training starts (the sanity check) stops at once, as without this callback.
        - The validation Lightning runs when a fit is told to stop is skipped: a pause does not wait for it.
        - ``summary`` holds the step, the checkpoint and the signal once the fit was stopped this way.
    """

    def __init__(self, filename: str = "interrupted.ckpt") -> None:
        self.filename = filename
        self.requested = False
        self.summary: dict[str, Any] = {}
        self._previous: Any = None
        self._installed = False
        self._limit_val_batches: int | float | None = None

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.requested, self.summary = False, {}

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Not in on_fit_start: the Trainer records the signal handlers after that hook and puts those back when
        # it tears down, which would leave this one installed after the fit.
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._on_sigint)
            self._installed = True

    def _on_sigint(self, signum: int, frame: FrameType | None) -> None:
        if self.requested:  # the second press: stop at once, through Lightning's KeyboardInterrupt handling
            self._restore()
            signal.default_int_handler(signum, frame)
        self.requested = True
        log.warning("Ctrl-C: the fit stops after this step and saves a checkpoint to resume from; press Ctrl-C "
                    "again to stop at once without one")

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if (batch_idx + 1) % trainer.accumulate_grad_batches:
            return  # gradients of this batch wait for the next ones: no step to save yet
        # Lightning raises SIGTERMException once this batch is done (every rank, it broadcasts the signal).
        sigint, sigterm = self.requested, bool(getattr(trainer, "received_sigterm", False))
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
        name = "SIGINT" if sigint else "SIGTERM"
        self.summary = {"at_step": trainer.global_step, "checkpoint": str(path), "signal": name}
        if trainer.is_global_zero:
            log.warning(f"Stopped by {'Ctrl-C' if sigint else name} after step {trainer.global_step}; "
                        f"checkpoint {path}. Resume with ckpt_path={path}")

    @staticmethod
    def _checkpoint_dir(trainer: pl.Trainer) -> Path:
        checkpoint = trainer.checkpoint_callback
        directory = getattr(checkpoint, "dirpath", None) or trainer.default_root_dir
        return Path(directory)

    def _restore(self) -> None:
        if self._installed:
            # None: the handler before was not set from Python; the default is what it did.
            signal.signal(signal.SIGINT, signal.SIG_DFL if self._previous is None else self._previous)
            self._installed = False

    def _restore_validation(self, trainer: pl.Trainer) -> None:
        if self._limit_val_batches is not None:
            trainer.limit_val_batches, self._limit_val_batches = self._limit_val_batches, None

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore()
        self._restore_validation(trainer)

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._restore()
        self._restore_validation(trainer)
