"""``PipelineSplit``: a Lightning callback that runs a placed model's stages on micro-batches (GPipe).

The schedule itself lives in :mod:`hetrain.placement.pipeline`; this callback checks the split at fit
start and switches the model to it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.utilities import rank_zero_warn
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from typing_extensions import override

from hetrain.placement.pipeline import stage_device

log = logging.getLogger(__name__)


def _held_devices(stages: Iterable[nn.Module]) -> dict[torch.device, None]:
    """The devices the stages hold their weights and buffers on, in stage order (a dict as an ordered set); a stage
    holding neither runs on its input's device and adds none."""
    return dict.fromkeys(d for d in map(stage_device, stages) if d is not None)


class PipelineSplit(Callback):
    """Runs the model's stages on their devices with the batch cut into micro-batches (GPipe schedule).

    Example::

        Trainer(callbacks=[StagePlacement({"embeddings": "cpu", "encoder": "cuda:0"}), PipelineSplit(4)])

    Notes:
        Place the stages first (:class:`StagePlacement` before this callback, which refuses a
        parameter shared by stages on different devices, naming both); the split only changes how
        the batch flows through them. Composes with Lightning's DDP: each process splits its own
        batch over its own devices.

    Args:
        micro_batches: pieces each batch is cut into (at most the batch size; uneven sizes allowed). A
            BatchNorm sees each micro-batch alone, so a model with one trains differently (a warning says so).
        checkpoint: stages (module paths, or a prefix such as ``encoder``) whose activations are
            recomputed in backward instead of kept, trading compute for memory; ``True`` means all, one string
            one path.
        split_on_one_device: cut the batch even when every stage ended up on one device (a recipe's GPU
            missing, say). There micro-batches cannot overlap and only add per-call cost, so by default each
            batch then runs whole: the bert_split recipe's CPU step took 47.5 ms in 4 micro-batches and
            37.0 ms whole. The results are the same either way (up to float rounding).
    """

    def __init__(self, micro_batches: int = 4, checkpoint: bool | str | Sequence[str] = (),
                 split_on_one_device: bool = False) -> None:
        # A bool is an int to Python: True ran unsplit without a word.
        if not isinstance(micro_batches, int) or isinstance(micro_batches, bool) or micro_batches < 1:
            raise ValueError(f"hetrain: pipeline micro_batches must be >= 1 and an integer, got {micro_batches!r}")
        self.micro_batches = micro_batches
        # One path alone (``checkpoint=encoder`` on the command line) is a list of one, not of its letters.
        self.checkpoint = [checkpoint] if isinstance(checkpoint, str) else checkpoint
        self.split_on_one_device = split_on_one_device
        self._before: tuple[nn.Module, int, frozenset[str]] | None = None  # the model's settings before the fit

    def active_micro_batches(self, stages: Sequence[nn.Module]) -> int:
        """The micro-batches a batch is cut into over these placed stages (see ``split_on_one_device``); a stage
        without weights runs on its input's device and adds none."""
        if self.split_on_one_device or len(_held_devices(stages)) > 1:
            return self.micro_batches
        return 1

    def checkpointed(self, stages: Sequence[str]) -> frozenset[str]:
        """The stages ``checkpoint`` names; a path that names none is an error listing the stages."""
        if self.checkpoint is True:
            return frozenset(stages)
        if not self.checkpoint:
            return frozenset()
        chosen = set()
        for path in self.checkpoint:
            covered = {s for s in stages if s == path or s.startswith(path + ".")}
            if not covered:
                raise ValueError(f"hetrain: checkpoint entry {path!r} names no stage; stages: {', '.join(stages)}")
            chosen |= covered
        return frozenset(chosen)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        model = getattr(pl_module, "model", pl_module)
        if not (hasattr(model, "micro_batches") and hasattr(model, "run_stage")):
            raise TypeError(f"hetrain: PipelineSplit needs a model with stages(), run_stage() and a micro_batches "
                            f"attribute; {type(model).__name__} lacks them")
        self._before = (model, model.micro_batches, getattr(model, "checkpoint_stages", frozenset()))
        micro_batches = self.active_micro_batches(list(model.stages().values()))
        if micro_batches < self.micro_batches:
            device = next(iter(_held_devices(model.stages().values())), "one device")
            log.info(f"pipeline split: every stage is on {device}, where micro-batches cannot overlap: each batch "
                     f"runs whole instead of in {self.micro_batches} (PipelineSplit(split_on_one_device=True) "
                     "cuts it anyway)")
        model.micro_batches = micro_batches
        model.checkpoint_stages = self.checkpointed(list(model.stages()))
        for name in sorted(model.checkpoint_stages):
            # A frozen BatchNorm (eval mode) or one without running statistics updates none in the recompute.
            norms = [path for path, m in model.stages()[name].named_modules()
                     if isinstance(m, _BatchNorm) and m.training and m.track_running_stats]
            if norms:
                raise ValueError(f"hetrain: checkpointing stage {name!r} would update the running statistics of its "
                                 f"BatchNorm {name}.{norms[0]} twice per step (again in the recompute); leave that "
                                 f"stage out of checkpoint, or freeze that BatchNorm (.eval())")
        norms = [f"{name}.{path}" for name, stage in model.stages().items()
                 for path, m in stage.named_modules() if isinstance(m, _BatchNorm) and m.training]
        if norms and micro_batches > 1:
            # The split's outputs equal the unsplit model's only for layers that treat rows independently.
            rank_zero_warn(f"hetrain: BatchNorm {norms[0]} ({len(norms)} in all) normalises each of the "
                           f"{micro_batches} micro-batches by its own statistics and updates its running "
                           "statistics once per micro-batch, so training differs from the unsplit model; use "
                           "micro_batches=1 or a per-row norm (LayerNorm, GroupNorm) for equal results")
        chosen = model.checkpoint_stages
        checkpointed = f"; checkpointing {', '.join(sorted(chosen))}" if chosen else ""
        placed = {n: stage_device(s) for n, s in model.stages().items()}  # stages without weights run anywhere
        log.info(f"pipeline split: {micro_batches} micro-batch{'es' if micro_batches > 1 else ''} over "
                 f"{', '.join(f'{n}@{d}' for n, d in placed.items() if d is not None)}{checkpointed}")

    def _put_back(self) -> None:
        """The model runs as before the fit again: a later fit without this callback must not run split, nor
        recompute stages without this callback's BatchNorm checks."""
        if self._before is not None:
            model, micro_batches, checkpointed = self._before
            model.micro_batches, model.checkpoint_stages = micro_batches, checkpointed
            self._before = None

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._put_back()

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._put_back()
