"""Exact loss normalisation under gradient accumulation and data parallelism.

Lightning divides each batch's loss by ``accumulate_grad_batches`` (k) and DDP averages gradients over
the R ranks, so batch means weigh a batch of 3 sequences as much as one of 300: with token-budget
batches the accumulated gradient is not the gradient of the window's mean loss. Dividing each batch's
summed loss by ``num_items``, the items of the whole window on all ranks, and multiplying by k * R
makes it exact. ``num_items`` has to be known before the window's first backward; a batch plan known
ahead (hetrain's token-budget sampler, or a DataLoader of fixed batch size) says it.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytorch_lightning as pl
from pytorch_lightning.utilities import rank_zero_warn
from torch.utils.data import DataLoader


def step_items(loader: Any, world_size: int, resumed_batches: int = 0) -> np.ndarray | None:
    """Items consumed at each step of the loader's current epoch on all ranks, indexed as Lightning numbers the
    epoch's batches; None when not known ahead.

    ``resumed_batches``: the batches of the epoch Lightning counts as run before a resume. A loader that resumes (a
    sampler with ``step_items``, a loader with a state) goes on where it stopped; a torch DataLoader starts the
    epoch's order again from its first batch, which Lightning numbers ``resumed_batches``.
    """
    for sampler in (getattr(loader, "batch_sampler", None), getattr(loader, "sampler", None)):
        if hasattr(sampler, "step_items"):
            return sampler.step_items()
    if isinstance(loader, DataLoader) and loader.batch_size is not None and hasattr(loader.sampler, "__len__"):
        # Each rank's sampler has the same length (DistributedSampler pads), so every rank's step i
        # holds the same number of samples.
        samples, size = len(loader.sampler), loader.batch_size
        sizes = [size] * (samples // size)
        if samples % size and not loader.drop_last:
            sizes.append(samples % size)
        resumes = hasattr(loader, "state_dict") and hasattr(loader, "load_state_dict")  # as Lightning tells
        skipped = [0] * (0 if resumes else resumed_batches)
        return np.asarray(skipped + sizes, dtype=np.float64) * world_size
    return None


def _share_of_batch_means(trainer: pl.Trainer, batch_idx: int, batch_items: int) -> float:
    """The factor for a window's mean of batch means: Lightning divides each batch's loss by k, but the epoch's last
    window may hold fewer batches (``num_training_batches``, where the loader has a length, says how many); without
    one, the batch mean. A batch numbered past the epoch's last (see :meth:`WindowNormaliser._beyond_the_plan`) is a
    window of its own, which Lightning still divides by k."""
    k, batches = trainer.accumulate_grad_batches, trainer.num_training_batches
    if math.isinf(batches):
        return 1.0 / batch_items
    if batch_idx >= batches:
        return k / batch_items
    start = batch_idx // k * k
    return k / ((min(start + k, int(batches)) - start) * batch_items)


class WindowNormaliser:
    """The factor that turns a batch's summed loss into its share of the window's mean loss."""

    def __init__(self) -> None:
        self._key: tuple[int, int, int] | None = None
        self._items: np.ndarray | None = None
        self._warned = False
        self._warned_beyond = False

    def scale(self, trainer: pl.Trainer, batch_idx: int, batch_items: int) -> float:
        """``k * R / num_items`` for batch ``batch_idx``; ``1 / batch_items`` (the batch mean) where unknown."""
        k, ranks = trainer.accumulate_grad_batches, trainer.world_size
        if k == 1 and ranks == 1:  # the batch is the window
            return 1.0 / batch_items
        loader = trainer.train_dataloader
        key = (id(trainer), trainer.current_epoch, id(loader))
        if key != self._key:  # the plan is the epoch's: read once per epoch, at the first batch this fit runs of it
            self._key, self._items = key, step_items(loader, ranks, resumed_batches=batch_idx)
        if self._items is None:
            if not self._warned:
                rank_zero_warn(
                    f"hetrain: the training loader ({type(loader).__name__}) does not say ahead how many samples "
                    f"each step holds, so with accumulate_grad_batches={k} on {ranks} rank(s) each batch's loss "
                    "is its mean and a window's batches weigh equally whatever their size. For exact accumulation "
                    "use a TokenBudgetBatchSampler (the ring loader) or a DataLoader with a fixed batch_size."
                )
                self._warned = True
            return _share_of_batch_means(trainer, batch_idx, batch_items)
        start = batch_idx // k * k  # Lightning steps after batches k-1, 2k-1, ... and after the epoch's last
        # The epoch's last batch is the plan's, or the one limit_train_batches cuts it at (the window ends there).
        end = min(start + k, trainer.num_training_batches)
        if batch_idx >= end:
            return self._beyond_the_plan(trainer, batch_idx, batch_items)
        num_items = float(self._items[start : int(end)].sum())
        if num_items < batch_items:
            raise RuntimeError(
                f"hetrain: the loader's batch plan gives {num_items:g} samples to the accumulation window of batch "
                f"{batch_idx}, which alone holds {batch_items}: the plan and Lightning's step count disagree (was "
                "the loader's state restored without the trainer's, or the other way round?)"
            )
        return k * ranks / num_items

    def _beyond_the_plan(self, trainer: pl.Trainer, batch_idx: int, batch_items: int) -> float:
        """A batch numbered past the epoch's last, which Lightning steps after alone: weighed by its own samples."""
        if not self._warned_beyond:
            rank_zero_warn(
                f"hetrain: Lightning numbered batch {batch_idx} past the epoch's {trainer.num_training_batches} "
                "batches, beyond the loader's batch plan (it does so for the first batch of a run resumed from one "
                "that stopped at max_steps on an epoch's last batch: Lightning issue #19367). That batch is a window "
                "of its own, so its loss is its mean over its own samples: exact where every rank's batch holds as "
                "many; under DDP with unequal batches, resume from a checkpoint saved before the epoch's last step."
            )
            self._warned_beyond = True
        return trainer.accumulate_grad_batches / batch_items
