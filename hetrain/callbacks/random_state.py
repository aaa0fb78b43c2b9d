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
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.utilities import rank_zero_warn
from typing_extensions import override


class RandomState(Callback):
    """Saves torch's CPU and CUDA generators, numpy's and Python's into each checkpoint; restores them on resume.

    Notes:
        - Each process keeps its own generators, so each rank saves and restores its own state (the
          checkpoint holds rank zero's; under DDP the other ranks resume from that one, as Lightning's
          own seeding makes them start alike).
        - CUDA generators are saved only once CUDA is initialised, and restored only for the devices the
          checkpoint and this machine both have; a checkpoint from a GPU run resumes on a CPU and back.
        - A checkpoint written without this callback resumes with a warning: its generators start from the seed.
        - Lightning's loops draw from torch's generator for every DataLoader iterator they make (its base seed),
          and a resumed run can make a different number of them before it goes on: a checkpoint saved at the
          end of an epoch with validation, with torch's DataLoader, resumes alike in distribution only.
          hetrain's RingLoader draws nothing there.
    """

    @override
    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        if self.state_key not in checkpoint.get("callbacks", {}):
            rank_zero_warn("hetrain: the checkpoint holds no RandomState (it was written without the callback): "
                           "the random generators go on from the seed, so dropout masks and shuffles differ from "
                           "the run that wrote it")

    @override
    def state_dict(self) -> dict[str, Any]:
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else []
        # numpy's key array as a tensor: torch.load(weights_only=True), how Lightning resumes, reads no numpy arrays.
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        return {"torch": torch.get_rng_state(), "cuda": cuda,
                "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
                "python": random.getstate()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        torch.set_rng_state(state_dict["torch"])
        cuda = state_dict.get("cuda") or []
        if cuda and torch.cuda.is_available():
            for device, state in enumerate(cuda[:torch.cuda.device_count()]):
                torch.cuda.set_rng_state(state, device)
        kind, keys, pos, has_gauss, cached = state_dict["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
        random.setstate(state_dict["python"])
