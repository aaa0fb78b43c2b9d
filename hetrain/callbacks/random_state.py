"""``RandomState``: checkpoints carry the random generators' state, so a resumed run draws what the run would have.

Lightning's checkpoints restore weights, optimizer, loops and the data position, but not the generators:
a resumed run's dropout masks (and anything else drawn from torch, numpy or ``random``) then differ
from the uninterrupted run's after the first resumed step. With this callback the two runs are the same
draw for draw, so on a deterministic device they end with the same weights (but in the cases ``RandomState``'s
notes name, which resume alike in distribution only).

A validation inside the fit (the sanity check too) runs off the training stream: what its steps draw (a random
augmentation, a sampled decoding) changes nothing training draws after it, and a run resumed from a checkpoint saved
at or during a validation goes on as the uninterrupted one did after it (but for the seed a torch DataLoader draws
where it makes its iterator, as ``RandomState``'s notes say).
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import torch.distributed as dist
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities import rank_zero_warn
from typing_extensions import override


class RandomState(Callback):
    """Saves torch's CPU and CUDA generators, numpy's and Python's into each checkpoint; restores them on resume.

    Notes:
        - Each process keeps its own generators, and under DDP they part ways (a rank's batch shapes decide how
          much its dropout draws): every rank gathers all ranks' states into the checkpoint (under ``"ranks"``,
          by global rank; Lightning saves on every rank and rank zero writes the file), and each restores its own.
          The top level keeps the writer's (rank zero's) state as before, so older hetrain reads it too.
        - A checkpoint from a run with another number of ranks (or a DDP one from before ``"ranks"``) gives the
          ranks it lacks rank zero's state, with a warning: the run resumes alike in distribution only.
        - Saving is then a collective: every rank must save the checkpoint, as Lightning's own callbacks do.
        - CUDA generators are saved only once CUDA is initialised, and restored only for the devices the
          checkpoint and this machine both have; a checkpoint from a GPU run resumes on a CPU and back.
        - A checkpoint written without this callback resumes with a warning: its generators start from the seed.
        - Lightning's loops draw from torch's generator for every DataLoader iterator they make (its base seed),
          and a resumed run can make a different number of them before it goes on: a checkpoint saved at the
          end of an epoch with validation, with torch's DataLoader, resumes alike in distribution only.
          hetrain's RingLoader draws nothing there.
        - A torch DataLoader with ``persistent_workers=True`` (training or validation) resumes alike in
          distribution only. Its workers' generators live in the worker processes, which no checkpoint reaches;
          and it draws its workers' base seed once a fit, not once an iterator: the resumed run's fresh workers
          draw it again (from torch's generator, for a loader without a ``generator`` of its own), which shifts
          every later draw (a ``shuffle=True`` order, dropout masks).
        - A validation inside the fit leaves the generators as it found them in ``on_validation_start``: their
          state is saved there and put back in ``on_validation_end`` (or ``on_exception``, for a validation a stop
          or an error ended). What Lightning draws before that hook (a torch DataLoader iterator's base seed, its
          first batch, fetched ahead) stays on the training stream, as a resumed run draws it again when it makes
          that loader. A checkpoint saved during a validation (GracefulStop's) holds the state the training step
          before it ended with, as its loops do. ``trainer.validate`` runs are left alone.
    """

    def __init__(self) -> None:
        super().__init__()
        self._rank, self._world_size = 0, 1  # of the run that loads a checkpoint; set in on_load_checkpoint
        # The generators when the last training step ended, kept only where a validation follows it: a checkpoint
        # saved during that validation holds them (resuming, Lightning makes the validation's loader again first).
        self._at_step_end: dict[str, Any] | None = None
        # The generators when the validation in flight began (None outside one): put back when it ends.
        self._before_validation: dict[str, Any] | None = None

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        # Lightning's own test for a validation after this batch: reading the generators at every step costs
        # ~0.1 ms (numpy's state), so only where one follows.
        loop = trainer.fit_loop
        follows = loop.epoch_loop._should_check_val_fx(loop._data_fetcher)
        self._at_step_end = _generator_state() if follows else None

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == TrainerFn.FITTING:  # the sanity check too; not trainer.validate
            self._before_validation = _generator_state()

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._end_validation()

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._end_validation()

    def _end_validation(self) -> None:
        """Puts back the generators the validation in flight began with, dropping what it drew."""
        if self._before_validation is not None:
            _set_generator_state(self._before_validation)
        self._before_validation = self._at_step_end = None

    @override
    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        self._rank, self._world_size = trainer.global_rank, trainer.world_size  # load_state_dict gets no trainer
        if self.state_key not in checkpoint.get("callbacks", {}):
            rank_zero_warn("hetrain: the checkpoint holds no RandomState (it was written without the callback): "
                           "the random generators go on from the seed, so dropout masks and shuffles differ from "
                           "the run that wrote it")

    @override
    def state_dict(self) -> dict[str, Any]:
        if self._before_validation is None:
            state = _generator_state()
        else:  # saved during a validation: the training stream, not the validation's draws
            state = self._at_step_end or self._before_validation
        if _distributed_world_size() > 1:
            ranks: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(ranks, state)  # every rank saves (Lightning's dump_checkpoint), rank 0 writes
            state = {**state, "ranks": ranks}
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        ranks = state_dict.get("ranks") or [state_dict]  # a single-process or older checkpoint: one state
        if len(ranks) != self._world_size:
            rank_zero_warn(f"hetrain: the checkpoint holds the random generators of {len(ranks)} process(es) and "
                           f"this run has {self._world_size}: each rank restores its own where the checkpoint has "
                           "it and rank 0's otherwise, so dropout masks and shuffles differ from the run that wrote "
                           f"it. Resume with {len(ranks)} process(es) for an exact resume")
        _set_generator_state(ranks[self._rank] if self._rank < len(ranks) else ranks[0])


def _distributed_world_size() -> int:
    """The number of processes in torch.distributed's default group; 1 outside a distributed run."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _generator_state() -> dict[str, Any]:
    """This process's torch (CPU, CUDA), numpy and Python generator states, readable by a weights_only load."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else []
    # numpy's key array as a tensor: torch.load(weights_only=True), how Lightning resumes, reads no numpy arrays.
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(), "cuda": cuda,
            "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
            "python": random.getstate()}


def _set_generator_state(state: dict[str, Any]) -> None:
    """Puts one process's saved generator states back; CUDA ones only for the devices this machine has."""
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available():
        for device, device_state in enumerate(cuda[:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(device_state, device)
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(state["python"])
