"""One verdict for every rank: a decision each rank reaches from its own flags must be the same on all, or one
rank stops (or skips) while the others wait in the next collective."""

from __future__ import annotations

import pytorch_lightning as pl
import torch
import torch.distributed


def reduce_flags(trainer: pl.Trainer, flags: torch.Tensor, op: torch.distributed.ReduceOp) -> torch.Tensor:
    """``flags`` (booleans) as every rank sees them: ``MIN`` holds where all ranks hold, ``MAX`` where any does.
    One small collective through the Trainer's strategy, on its device; the flags as they are on one process."""
    if trainer.world_size == 1:
        return flags.bool()
    reduced = trainer.strategy.reduce(flags.to(trainer.strategy.root_device, torch.float32), reduce_op=op)
    return reduced.bool()
