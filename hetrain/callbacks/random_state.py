"""``RandomState``: checkpoints carry the random generators' state, so a resumed run draws what the run would have.

Lightning's checkpoints restore weights, optimizer, loops and the data position, but not the generators:
a resumed run's dropout masks (and anything else drawn from torch, numpy or ``random``) then differ
from the uninterrupted run's after the first resumed step. With this callback the two runs are the same
draw for draw, so on a deterministic device they end with the same weights.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import torch.distributed as dist
from pytorch_lightning.callbacks import Callback
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
    """

    def __init__(self) -> None:
        super().__init__()
        self._rank, self._world_size = 0, 1  # of the run that loads a checkpoint; set in on_load_checkpoint

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
        state = _generator_state()
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
