"""Classification as a LightningModule, for any model with ``stages()`` that maps batch entries to logits."""

from __future__ import annotations

import warnings
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.utilities import move_data_to_device
from torch import nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from hetrain.host_copies import hold_until_copied, release_all
from hetrain.models.accumulation import WindowNormaliser
from hetrain.optim import SparseAwareAdamW, sparse_parameters
from hetrain.placement.pipeline import stage_device

# Lightning warns whenever a LightningModule trained with a LightningDataModule overrides
# transfer_batch_to_device; here that is intended (see ClassificationTask.transfer_batch_to_device).
warnings.filterwarnings(
    "ignore", message="You have overridden `transfer_batch_to_device` in `LightningModule`"
)


# What a model takes when it does not say (``input_keys``): token ids and their padding mask, as BERT.
TEXT_INPUTS = ("input_ids", "attention_mask")
# A row's label that says it has none: F.cross_entropy's ignore_index, as hetrain.data's PackInto and ValShares write.
NO_LABEL = -100


class SampleMean(MeanMetric):
    """The mean over samples: each batch adds its summed values and its sample count; ranks add their sums and counts.

    Lightning's own mean (``self.log(..., batch_size=n, sync_dist=True)``) averages the ranks' sample counts as an
    integer tensor, which gloo truncates (23 samples on 2 ranks gave 23/22 of the mean). MeanMetric's update drops
    NaN values (``nan_strategy="disable"`` drops the weights instead) and reads every batch's values on the host:
    here a NaN loss stays NaN, with no host sync.
    """

    def update(self, total: torch.Tensor, count: torch.Tensor | int) -> None:
        """``count`` as a tensor where the batch has it on its device: read on the host, it would wait for it."""
        self.mean_value += total.detach().to(self.mean_value.dtype)
        self.weight += count


class ClassificationTask(pl.LightningModule):
    """Cross-entropy training with AdamW; validation loss and accuracy as ``val/loss`` and ``val/acc``; ``predict``
    gives the logits.

    Batches are dicts holding ``labels`` (B,), which predicting does without, and the model's inputs: the entries
    its ``input_keys`` names, in order (``images`` for :class:`~hetrain.models.resnet.ResNet`), or else
    ``input_ids`` and ``attention_mask`` (B, T). A validation row labelled -100 (``NO_LABEL``, as
    :class:`~hetrain.data.splits.ValShares` labels the padding that evens out the ranks' shares) counts in neither
    ``val/loss`` nor ``val/acc``; training refuses such a row. The training loss stays exact under gradient
    accumulation and across ranks with batches of unequal size (:mod:`hetrain.models.accumulation`); ``train/loss``
    is the mean loss over the optimizer step's samples on this rank (under accumulation all the window's batches,
    not its last).
    """

    def __init__(
        self,
        model: nn.Module,
        num_classes: int,
        lr: float = 1e-3,
        weight_decay: float = 0.01,
        betas: tuple[float, float] = (0.9, 0.999),
    ) -> None:
        super().__init__()
        if len(betas) != 2 or not all(isinstance(b, int | float) and 0 <= b < 1 for b in betas):
            # Else an IndexError, or torch's "Invalid beta parameter at index 0", when the optimizer is built.
            raise ValueError(f"hetrain: betas={list(betas)!r} must be two numbers in [0, 1), AdamW's decay rates of "
                             "its gradient averages (task.betas; the default is [0.9, 0.999])")
        self.save_hyperparameters(ignore=["model"])
        self.model = model
        self.input_keys = tuple(getattr(model, "input_keys", TEXT_INPUTS))
        # The share of sequences classified right (torchmetrics' default is the mean over classes, which
        # differs whenever the classes are unbalanced, as windows of long documents are).
        self.val_acc = MulticlassAccuracy(num_classes=num_classes, average="micro", ignore_index=NO_LABEL)
        self.val_loss = SampleMean()
        self._window = WindowNormaliser()
        self._window_loss: torch.Tensor | None = None  # summed over the accumulation window's batches so far
        self._window_rows = 0

    def stages(self) -> dict[str, nn.Module]:
        return self.model.stages()

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.model(*inputs)

    def model_inputs(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """The batch entries the model takes, in the order it takes them."""
        missing = [key for key in self.input_keys if key not in batch]
        if missing:
            raise KeyError(f"hetrain: {type(self.model).__name__} takes {list(self.input_keys)} but the batch has "
                           f"no {missing} (it has {list(batch)}); do the data and the model belong together?")
        return tuple(batch[key] for key in self.input_keys)

    def placement_inputs(self, batch: dict[str, torch.Tensor]) -> tuple[Any, Any]:
        """What measuring each stage alone needs: the first stage's input, and each stage's extra inputs.

        The first stage takes the first input; every later stage takes the rest too (BERT's mask).
        """
        first, *rest = self.model_inputs(batch)
        first_stage = next(iter(self.stages()))
        return (lambda: first), (lambda name: () if name == first_stage else tuple(rest))

    def _end_device(self, front: bool) -> torch.device:
        """The device of the first (or last) stage holding weights or buffers: a weightless stage (an
        activation) runs where its input is; the module's own device where no stage holds any."""
        stages = list(self.stages().values())
        devices = (stage_device(stage) for stage in (stages if front else reversed(stages)))
        return next((d for d in devices if d is not None), self.device)

    def transfer_batch_to_device(self, batch: dict[str, torch.Tensor], device: torch.device,
                                 dataloader_idx: int) -> dict[str, torch.Tensor]:
        # Lightning would copy the batch to its root device; inputs go straight to the first stage's
        # device and labels to the last stage's, so no batch tensor crosses devices twice. The batch's
        # other entries (sample_ids, lengths, segment_ids) go with the inputs, which they describe: the
        # whole batch reaches training_step and the callbacks (Throughput counts a packed batch's
        # segment_ids), on the host where the first stage is there. The batch comes from host memory,
        # so the copies may be asynchronous.
        self.model_inputs(batch)  # names a missing input
        if self._trainer is not None and self.trainer.training:
            _check_labelled(batch.get("labels"))
        inputs, outputs = self._end_device(front=True), self._end_device(front=False)
        targets = {key: outputs if key == "labels" else inputs for key in batch}
        moved = {key: move_data_to_device(value, targets[key]) for key, value in batch.items()}
        for gpu in {d for d in targets.values() if d.type == "cuda"}:
            # A ring slot is not torch's to keep alive until the copy ran: hold it (hetrain.host_copies).
            sources = (batch[k] for k, d in targets.items() if d == gpu and isinstance(batch[k], torch.Tensor))
            hold_until_copied(sources, torch.cuda.current_stream(gpu))
        return moved

    def teardown(self, stage: str) -> None:
        # The last batches' holds would keep their ring slots, and the loader's pinned slab, past the fit (or
        # validate, predict) until the next run's first copy.
        release_all()

    def _loss(self, batch: dict[str, torch.Tensor], reduction: str = "mean") -> tuple[torch.Tensor, torch.Tensor]:
        """The batch's cross-entropy over its labelled rows, and its logits."""
        logits = self(*self.model_inputs(batch))
        return F.cross_entropy(logits, batch["labels"], ignore_index=NO_LABEL, reduction=reduction), logits

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        logits = self(*self.model_inputs(batch))
        summed = F.cross_entropy(logits, batch["labels"], reduction="sum")
        rows = len(batch["labels"])
        loss = summed.detach()
        self._window_loss = loss if self._window_loss is None else self._window_loss + loss  # no sync: on the device
        self._window_rows += rows
        # The summed loss over the accumulation window's num_items: exact whatever the batch sizes.
        return summed * self._window.scale(self.trainer, batch_idx, rows)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if batch_idx % self.trainer.accumulate_grad_batches == 0:  # a window starts (a rerun of the last one, e.g.
            self._window_loss, self._window_rows = None, 0         # NonFiniteGuard's, does not count in it)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # Logged once a step, over the window's samples: a batch's own mean under accumulation was one batch's.
        if self._window_loss is not None:
            self.log("train/loss", self._window_loss / self._window_rows, prog_bar=True, batch_size=self._window_rows)

    def on_validation_start(self) -> None:
        # The metric's state lives where the logits come out, which a placement may have moved.
        self.val_acc.to(self._end_device(front=False))
        # In float32 whatever the module's dtype: a true-half precision converts the module's floating tensors, the
        # metric's sums with them, and a bf16 count stops growing past 256 samples' worth of steps.
        self.val_loss.to(self._end_device(front=False)).set_dtype(torch.float32)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        summed, logits = self._loss(batch, reduction="sum")
        self.val_acc(logits, batch["labels"])
        n = len(batch["labels"])
        # Every rank's labelled samples count, each once, whatever the ranks' shares (SampleMean); counted on the
        # device, with no wait for it.
        self.val_loss.update(summed, (batch["labels"] != NO_LABEL).sum())
        self.log("val/loss", self.val_loss, prog_bar=True, batch_size=n)
        self.log("val/acc", self.val_acc, prog_bar=True, batch_size=n)

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        """The logits (B, num_classes) of a batch, labelled or not (Lightning's default passed the dict whole)."""
        return self(*self.model_inputs(batch))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        # No weight decay on biases and norm scales, as in BERT.
        sparse = sparse_parameters(self)
        params = [p for p in self.parameters() if p.requires_grad and id(p) not in {id(q) for q in sparse}]
        groups = [
            {"params": [p for p in params if p.ndim >= 2], "weight_decay": self.hparams.weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
        ]
        betas = tuple(self.hparams.betas)
        # torch's fused AdamW has CPU and CUDA kernels and groups parameters by device, so stages placed on
        # different devices step together; on the CPU it is about 2.8x faster than the foreach step
        # (24 x 768^2 parameters, 2 cores) and allocates no per-parameter temporaries.
        clipping = self._trainer is not None and bool(self._trainer.gradient_clip_val)
        # A frozen sparse table needs the SparseAwareAdamW too, which steps the group that unfreezing it adds
        # (Lightning's BaseFinetuning), unless the run clips: clipping refuses its gradients either way.
        if not sparse and (clipping or not sparse_parameters(self, frozen=True)):
            # Lightning's mixed precision refuses to clip for a fused optimizer (it unscales inside its step, even
            # under bf16-mixed, where nothing is scaled), so a clipping run steps with foreach instead.
            return torch.optim.AdamW(groups, lr=self.hparams.lr, betas=betas, fused=not clipping, foreach=clipping)
        # Tables with sparse gradients (sparse_embeddings) step lazily; the rest as above.
        if clipping:
            raise ValueError("hetrain: gradient clipping (trainer.gradient_clip_val) cannot take the sparse gradients "
                             "of model.sparse_embeddings (torch's clip_grad_norm_ refuses them); set one of "
                             "model.sparse_embeddings=false or trainer.gradient_clip_val=null")
        if sparse:
            groups.append({"params": sparse, "weight_decay": self.hparams.weight_decay, "sparse": True})
        return SparseAwareAdamW(groups, lr=self.hparams.lr, betas=betas, fused=True)


def _check_labelled(labels: Any) -> None:
    """Refuses a training batch with a row labelled -100 (no label), read where the batch is still on the host.

    The loss would leave the row out while the exact accumulation (:mod:`hetrain.models.accumulation`) divides by
    sample counts planned before any batch is read, so the row would count as one of loss 0. A batch already on a
    device is not read here: that would wait for the device every step.
    """
    if isinstance(labels, torch.Tensor) and labels.device.type == "cpu" and bool((labels == NO_LABEL).any()):
        raise ValueError(f"hetrain: a training batch has {int((labels == NO_LABEL).sum())} of its {labels.numel()} "
                         f"labels {NO_LABEL} (no label), which training cannot leave out: its loss is normalised by "
                         "sample counts planned before the batches are read. Drop the unlabelled samples from the "
                         "training split (validation leaves them out of val/loss and val/acc)")
