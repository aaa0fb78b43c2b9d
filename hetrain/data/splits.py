"""What the synthetic DataModules share: seeded train/val splits and torch's DataLoader over them."""

from __future__ import annotations

import functools
import os
import signal
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from lightning_fabric.utilities.seed import pl_worker_init_function
from torch.utils.data import Dataset, DistributedSampler, Sampler, default_collate

from hetrain.data.readers import sigterm_filter_missing, stop_on_the_parents_sigterm_only
from hetrain.data.wait_clock import TimedDataLoader


class EpochShuffle(Sampler[int]):
    """Every index of ``range(size)`` once per epoch, in an order drawn from ``(seed, epoch)`` alone.

    Lightning calls ``set_epoch`` before every training epoch, so a run resumed from a checkpoint shuffles epoch
    ``e`` as the uninterrupted run did (a generator seeded once started again at epoch 0's order). Under DDP
    Lightning wraps the sampler in its ``DistributedSamplerWrapper``, which forwards ``set_epoch`` and hands each
    rank a disjoint share of this order.
    """

    def __init__(self, size: int, seed: int) -> None:
        self.size = size
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[int]:
        # numpy's seeds are non-negative: a negative one (torch's generators take it) as its 64-bit pattern
        return iter(np.random.default_rng([self.seed % 2**64, self.epoch]).permutation(self.size).tolist())


class ValShares(DistributedSampler):
    """One rank's share of a validation split under DDP, in which every sample counts once.

    Like the DistributedSampler Lightning puts into a loader that has none, rank ``r`` of ``R`` takes positions
    ``r, r + R, ...`` with the last round padded up to ``R`` positions, so that every rank runs as many batches
    (GracefulStop reduces a flag across the ranks after every validation batch: a rank one batch short left the
    others waiting there for good). Unlike it, the padding is marked: position ``size + i`` repeats sample ``i``,
    which :class:`_WithRepeats` serves with the label -100, left out of ``val/loss`` and ``val/acc`` by the task
    (Lightning's padding counted it twice there). Being a DistributedSampler, Lightning leaves it in place.
    """

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False)

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.total_size, self.num_replicas))


class _WithRepeats(Dataset):
    """``dataset`` as :class:`ValShares` reads it: position ``p`` is sample ``p % len(dataset)``, with whether it
    repeats one (``p >= len(dataset)``)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, position: int) -> tuple[Any, bool]:
        size = len(self.dataset)
        return self.dataset[position % size], position >= size


def _unlabel_repeats(collate: Callable[[list[Any]], dict[str, torch.Tensor]],
                    items: list[tuple[Any, bool]]) -> dict[str, torch.Tensor]:
    """Collates :class:`_WithRepeats` items with ``collate``; a repeated sample's label becomes -100 (no label)."""
    batch = collate([item for item, _ in items])
    batch["labels"][torch.tensor([repeat for _, repeat in items])] = -100
    return batch


def ignore_interrupts_in_workers(worker_init_fn: Callable[[int], Any] | None = None,
                                 rank: int | None = None) -> Callable[[int], None]:
    """A DataLoader ``worker_init_fn`` that makes the workers ignore Ctrl-C and a SIGTERM that the main process did not
    send, then runs ``worker_init_fn``.

    A terminal's Ctrl-C reaches the whole foreground process group, and a scheduler's SIGTERM (SLURM at a time limit
    or on preemption, systemd) every process of the job: the workers died of it, and a fit that
    :class:`~hetrain.callbacks.GracefulStop` let finish its step crashed waiting for their next batch, with no
    checkpoint. The main process stops its workers itself (torch's last resort, SIGTERM, still ends them: see
    :func:`~hetrain.data.readers.stop_on_the_parents_sigterm_only`, which needs the built hetrain._C and otherwise
    warns once and leaves SIGTERM to torch). This holds from when a worker runs this function: one still starting
    (under spawn or forkserver, importing torch) dies of the job's SIGTERM. Under forkserver the job's SIGTERM also
    ends the server process, and torch's workers leave once the process they were forked from is gone.

    Without ``worker_init_fn``, under ``seed_everything(workers=True)`` the workers are seeded as Lightning seeds them
    (it adds its own function only to a loader that has none), for the global ``rank`` (by default Lightning's record
    of it, which a worker forked from its rank's process inherits). A ``functools.partial`` of a module-level
    function: workers started by spawn or forkserver unpickle it.
    """
    sigterm_filter_missing()  # warned here, in the main process
    return functools.partial(_ignore_interrupts, worker_init_fn, rank)


def _ignore_interrupts(worker_init_fn: Callable[[int], Any] | None, rank: int | None, worker_id: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Replaces torch's SIGTERM handler, which ends the worker on any SIGTERM, and exits 0 on the parent's as that one
    # does: the main process reports a worker that ended otherwise as failed. Before worker_init_fn, which may set
    # its own.
    stop_on_the_parents_sigterm_only(exit_success=True)
    if worker_init_fn is not None:
        worker_init_fn(worker_id)
    elif int(os.environ.get("PL_SEED_WORKERS", 0)):  # what Lightning's seed_everything(workers=True) asks for
        pl_worker_init_function(worker_id, rank)


class SeededSplits:
    """Mixin for a LightningDataModule whose ``_split(size, seed)`` generates a dataset.

    Train is drawn from ``seed`` and validation from ``seed + 1``: the same seed, the same data, and the
    splits differ. Reads the hparams ``train_size``, ``val_size``, ``seed``, ``batch_size``, ``num_workers``
    and ``pin_memory``.
    """

    hparams: Any
    train_set: Any = None
    val_set: Any = None

    def _split(self, size: int, seed: int) -> Dataset:
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            h = self.hparams
            self.train_set = self._split(h.train_size, h.seed)
            self.val_set = self._split(h.val_size, h.seed + 1)

    def _pin(self) -> bool:
        """Pinned host batches let the copy to a GPU run asynchronously (non_blocking=True): on with CUDA."""
        return torch.cuda.is_available() if self.hparams.pin_memory is None else self.hparams.pin_memory

    def _torch_loader(self, dataset: Dataset, shuffle: bool, **kwargs: Any) -> TimedDataLoader:
        """torch's DataLoader: training shuffled from ``(seed, epoch)`` without a short last batch, validation in
        order (under DDP each rank's :class:`ValShares`).

        The training loader keeps a generator of its own: the workers' base seed is drawn from it each epoch, not
        from the global one that ``hetrain.callbacks.RandomState`` saves and restores. The workers ignore Ctrl-C
        and a scheduler's SIGTERM (:func:`ignore_interrupts_in_workers`).
        """
        h = self.hparams
        if shuffle:
            self._check_full_batch(len(dataset))
        trainer = getattr(self, "trainer", None)
        init = ignore_interrupts_in_workers(rank=trainer.global_rank if trainer is not None else None)
        sampler: Sampler[int] | None = EpochShuffle(len(dataset), h.seed) if shuffle else None
        if not shuffle and trainer is not None and trainer.world_size > 1:
            sampler = ValShares(dataset, trainer.world_size, trainer.global_rank)
            dataset = _WithRepeats(dataset)
            kwargs["collate_fn"] = functools.partial(_unlabel_repeats, kwargs.get("collate_fn") or default_collate)
        return TimedDataLoader(
            dataset, batch_size=h.batch_size, sampler=sampler, drop_last=shuffle, num_workers=h.num_workers,
            pin_memory=self._pin(), worker_init_fn=init,
            generator=torch.Generator().manual_seed(h.seed) if shuffle else None, **kwargs,
        )

    def _check_full_batch(self, size: int) -> None:
        """Refuses a training split too small for one full batch: dropping the short last batch left none, and the
        run trained nothing and reported success."""
        trainer = getattr(self, "trainer", None)
        replicas = trainer.world_size if trainer is not None else 1
        per_rank = -(-size // replicas)  # Lightning's DistributedSampler pads each rank's share up to this
        batch_size = self.hparams.batch_size
        if per_rank < batch_size:
            ranks = f" over {replicas} ranks ({per_rank} samples each)" if replicas > 1 else ""
            raise ValueError(f"hetrain: data.train_size={size}{ranks} is smaller than data.batch_size={batch_size}: "
                             "training drops its short last batch, so not one batch would train; set "
                             f"data.batch_size<={per_rank} or data.train_size>={batch_size * replicas}")
