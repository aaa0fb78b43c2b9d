"""Gradient accumulation over batches of unequal size equals one big batch's gradient (hetrain.models.accumulation)."""

import copy

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from hetrain.data.datamodule import SyntheticDataModule
from hetrain.data.sampler import TokenBudgetBatchSampler
from hetrain.data.synthetic import SyntheticSequences, pad_collate
from hetrain.models.bert import BertClassifier
from hetrain.models.task import ClassificationTask

ACCUMULATE = 3


class FirstWindow(pl.Callback):
    """Keeps the batches of the first optimizer step and the gradients that step would apply."""

    def __init__(self) -> None:
        self.batches: list[dict[str, torch.Tensor]] = []
        self.grads: dict[str, torch.Tensor] | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.grads is None:  # a ring batch views a slot that is refilled later: copy it
            self.batches.append({k: v.clone() for k, v in batch.items()})

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self.grads is None:
            self.grads = {n: p.grad.clone() for n, p in pl_module.model.named_parameters()}


class Batches:
    """A loader that knows nothing ahead: it hands out prepared batches (a stream's view)."""

    def __init__(self, batches: list[dict[str, torch.Tensor]]) -> None:
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)


def _task(seed: int = 0) -> ClassificationTask:
    torch.manual_seed(seed)
    model = BertClassifier(vocab_size=64, num_classes=4, hidden=32, layers=1, heads=2, max_len=64, dropout=0.0)
    return ClassificationTask(model, num_classes=4)


def _fit(task: ClassificationTask, limit_train_batches: int | None = None, **data) -> FirstWindow:
    window = FirstWindow()
    trainer = pl.Trainer(accelerator="cpu", max_steps=1, accumulate_grad_batches=ACCUMULATE, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, limit_val_batches=0, limit_train_batches=limit_train_batches,
                         callbacks=[window])
    trainer.fit(task, **data)
    return window


def _grads(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]], weigh_batches_equally: bool):
    """The window's gradient from ``model``'s weights: of the mean over all its samples, or the mean of batch means."""
    model.zero_grad()
    total = sum(len(b["labels"]) for b in batches)
    for b in batches:
        summed = F.cross_entropy(model(b["input_ids"], b["attention_mask"]), b["labels"], reduction="sum")
        (summed / len(b["labels"]) / len(batches) if weigh_batches_equally else summed / total).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def _check_window(task_before: ClassificationTask, window: FirstWindow, batches: int = ACCUMULATE) -> None:
    sizes = [len(b["labels"]) for b in window.batches]
    assert len(sizes) == batches and len(set(sizes)) > 1, sizes  # unequal batches, else the test cannot fail
    exact = _grads(copy.deepcopy(task_before.model), window.batches, weigh_batches_equally=False)
    naive = _grads(copy.deepcopy(task_before.model), window.batches, weigh_batches_equally=True)
    assert any(not torch.allclose(exact[n], naive[n], rtol=1e-3, atol=1e-6) for n in exact)
    for name, grad in window.grads.items():
        torch.testing.assert_close(grad, exact[name], rtol=1e-4, atol=1e-6, msg=name)  # float32 sums in two orders


def test_accumulated_token_budget_batches_give_the_big_batch_gradient():
    data = SyntheticDataModule(train_size=96, val_size=8, min_len=4, max_len=40, max_tokens=160, seed=2,
                               vocab_size=64, num_classes=4)
    task = _task()
    before = copy.deepcopy(task)
    window = _fit(task, datamodule=data)
    _check_window(before, window)


def test_train_loss_is_the_mean_over_the_windows_samples():
    """It was the window's last batch's own mean: under accumulation, one batch of the step."""
    data = SyntheticDataModule(train_size=96, val_size=8, min_len=4, max_len=40, max_tokens=160, seed=2,
                               vocab_size=64, num_classes=4)
    task = _task()
    before = copy.deepcopy(task).model
    window = _fit(task, datamodule=data)
    with torch.no_grad():
        losses = [F.cross_entropy(before(b["input_ids"], b["attention_mask"]), b["labels"], reduction="none")
                  for b in window.batches]
    assert len(losses) == ACCUMULATE
    logged = float(task.trainer.callback_metrics["train/loss"])
    assert logged == pytest.approx(torch.cat(losses).mean().item(), rel=1e-5)
    assert logged != pytest.approx(losses[-1].mean().item(), rel=1e-5)


def test_an_epoch_cut_short_by_limit_train_batches_ends_its_window_there():
    """Lightning steps after the epoch's last batch, the one limit_train_batches cuts it at: that window holds two
    batches here, and its loss was divided by the samples of a third batch that never ran."""
    data = SyntheticDataModule(train_size=96, val_size=8, min_len=4, max_len=40, max_tokens=160, seed=2,
                               vocab_size=64, num_classes=4)
    task = _task()
    before = copy.deepcopy(task)
    window = _fit(task, limit_train_batches=ACCUMULATE - 1, datamodule=data)
    _check_window(before, window, batches=ACCUMULATE - 1)


def test_a_dataloader_with_a_short_last_batch_weighs_each_sample_once():
    dataset = SyntheticSequences(10, min_len=4, max_len=30, vocab_size=64, num_classes=4, seed=5)
    task = _task(1)
    before = copy.deepcopy(task)
    loader = DataLoader(dataset, batch_size=4, collate_fn=pad_collate)  # 4, 4, then 2: one window
    window = _fit(task, train_dataloaders=loader)
    _check_window(before, window)


def test_a_loader_without_a_plan_warns_and_falls_back_to_batch_means():
    dataset = SyntheticSequences(12, min_len=4, max_len=30, vocab_size=64, num_classes=4, seed=7)
    batches = [pad_collate([dataset[i] for i in rows]) for rows in ([0, 1, 2, 3, 4], [5, 6], [7, 8, 9, 10, 11])]
    task = _task(2)
    before = copy.deepcopy(task)
    with pytest.warns(UserWarning, match="does not say ahead how many samples"):
        window = _fit(task, train_dataloaders=Batches(batches))
    naive = _grads(copy.deepcopy(before.model), window.batches, weigh_batches_equally=True)
    for name, grad in window.grads.items():
        torch.testing.assert_close(grad, naive[name], rtol=1e-4, atol=1e-6, msg=name)


class EveryWindow(pl.Callback):
    """Keeps each optimizer step's batches, the weights it started from and the gradients it applies."""

    def __init__(self) -> None:
        self.steps: list[tuple[torch.nn.Module, list[dict[str, torch.Tensor]], dict[str, torch.Tensor]]] = []
        self._batches: list[dict[str, torch.Tensor]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if not self._batches:
            self._weights = copy.deepcopy(pl_module.model)
        self._batches.append({k: v.clone() for k, v in batch.items()})

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        grads = {n: p.grad.clone() for n, p in pl_module.model.named_parameters()}
        self.steps.append((self._weights, self._batches, grads))
        self._batches = []


def test_a_loader_without_a_plan_weighs_the_batches_of_a_short_last_window_as_a_whole_one():
    """A batch sampler of no fixed batch size gives no plan: the epoch's last window, of one batch where k is 2, stepped
    with half its batch mean's gradient (Lightning divides by k whatever the window holds)."""
    dataset = SyntheticSequences(12, min_len=4, max_len=30, vocab_size=64, num_classes=4, seed=5)
    loader = DataLoader(dataset, batch_sampler=[[0, 1, 2, 3], [4, 5, 6], [7, 8, 9, 10, 11]], collate_fn=pad_collate)
    task, windows = _task(3), EveryWindow()
    trainer = pl.Trainer(accelerator="cpu", max_epochs=1, accumulate_grad_batches=2, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, limit_val_batches=0, callbacks=[windows])
    with pytest.warns(UserWarning, match="does not say ahead how many samples"):
        trainer.fit(task, train_dataloaders=loader)
    assert [len(batches) for _, batches, _ in windows.steps] == [2, 1]
    for weights, batches, grads in windows.steps:
        naive = _grads(weights, batches, weigh_batches_equally=True)
        for name, grad in grads.items():
            torch.testing.assert_close(grad, naive[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("replicas", [1, 3])
def test_step_items_count_what_every_rank_takes_at_each_step(replicas):
    lengths = np.random.default_rng(0).integers(1, 50, 203)
    ranks = [TokenBudgetBatchSampler(lengths, 120, seed=4, num_replicas=replicas, rank=r) for r in range(replicas)]
    for sampler in ranks:
        sampler.set_epoch(1)
    taken = [list(sampler) for sampler in ranks]
    samples = np.sum([[len(b) for b in batches] for batches in taken], axis=0)
    tokens = np.sum([[lengths[b].sum() for b in batches] for batches in taken], axis=0)
    for sampler in ranks:
        np.testing.assert_array_equal(sampler.step_items(), samples)
        np.testing.assert_array_equal(sampler.step_items(weights=lengths), tokens)
        assert len(sampler.step_items()) == len(sampler)


def test_step_items_after_a_resume_count_the_remaining_steps_in_lightnings_numbering():
    lengths = np.random.default_rng(1).integers(1, 50, 150)
    first = TokenBudgetBatchSampler(lengths, 100, seed=0)
    it = iter(first)
    for _ in range(5):
        next(it)
    resumed = TokenBudgetBatchSampler(lengths, 100, seed=0, num_replicas=2, rank=1)
    resumed.load_state_dict(first.state_dict())
    rest = list(resumed)
    items = resumed.step_items()
    # Lightning restores the saved run's 5 steps and counts on from there, two ranks' batches a step.
    assert len(items) == len(resumed) and items[:5].sum() == 0 and (items[5:] > 0).all()
    assert len(rest) == len(items) - 5
    assert items[5:].sum() == len(lengths) - sum(len(b) for b in first.global_plan()[:5])


def _fit_accumulating(root, ckpt_path=None) -> ClassificationTask:
    from pytorch_lightning.callbacks import ModelCheckpoint

    pl.seed_everything(0)
    data = SyntheticDataModule(vocab_size=64, num_classes=4, min_len=4, max_len=40, train_size=70, val_size=8,
                               max_tokens=160, seed=6)
    task = _task(3)
    saver = ModelCheckpoint(root, filename="{step}", every_n_train_steps=3, save_top_k=-1)
    trainer = pl.Trainer(accelerator="cpu", max_steps=10, accumulate_grad_batches=2, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         callbacks=[saver], default_root_dir=root)
    trainer.fit(task, datamodule=data, ckpt_path=ckpt_path)
    # The 10 steps of 2 batches cross an epoch boundary, and the epoch's last window is one batch.
    assert trainer.num_training_batches < 20 and trainer.num_training_batches % 2 == 1, trainer.num_training_batches
    return task


def test_a_run_resumed_mid_epoch_under_accumulation_ends_with_the_same_weights(tmp_path):
    full = _fit_accumulating(tmp_path)
    resumed = _fit_accumulating(tmp_path / "resumed", ckpt_path=tmp_path / "step=3.ckpt")
    for (name, a), b in zip(full.named_parameters(), resumed.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


class Windows(pl.Callback):
    """Each optimizer step's batch indices and batches, the weights its window started from, and its gradients."""

    def __init__(self) -> None:
        self.steps: list[tuple[list[int], dict[str, torch.Tensor], list[dict[str, torch.Tensor]], dict]] = []
        self._indices: list[int] = []
        self._batches: list[dict[str, torch.Tensor]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if not self._batches:
            self._weights = copy.deepcopy(pl_module.model.state_dict())
        self._indices.append(batch_idx)
        self._batches.append({k: v.clone() for k, v in batch.items()})

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        grads = {n: p.grad.clone() for n, p in pl_module.model.named_parameters()}
        self.steps.append((self._indices, self._weights, self._batches, grads))
        self._indices, self._batches = [], []


def _fit_dataloader(samples: int, max_steps: int, root, ckpt_path=None, planned: bool = True) -> Windows:
    """A torch DataLoader of batch size 4 under accumulate_grad_batches=2; the fit's checkpoint saved at its end.
    Not ``planned``: the same batches from a batch sampler, which says no batch size ahead."""
    dataset = SyntheticSequences(samples, min_len=4, max_len=20, vocab_size=64, num_classes=4, seed=5)
    batches = [list(range(i, min(i + 4, samples))) for i in range(0, samples, 4)]
    loader = (DataLoader(dataset, batch_size=4, collate_fn=pad_collate) if planned else
              DataLoader(dataset, batch_sampler=batches, collate_fn=pad_collate))
    windows = Windows()
    trainer = pl.Trainer(accelerator="cpu", max_steps=max_steps, accumulate_grad_batches=2, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, limit_val_batches=0, callbacks=[windows], default_root_dir=root)
    trainer.fit(_task(4), loader, ckpt_path=ckpt_path)
    trainer.save_checkpoint(root / "last.ckpt")
    return windows


def _check_every_window(windows: Windows, weigh_batches_equally: bool = False) -> None:
    for _, weights, batches, grads in windows.steps:
        model = _task().model
        model.load_state_dict(weights)
        exact = _grads(model, batches, weigh_batches_equally=weigh_batches_equally)
        for name, grad in grads.items():
            torch.testing.assert_close(grad, exact[name], rtol=1e-4, atol=1e-6, msg=name)


def test_a_dataloader_run_resumed_after_stopping_at_max_steps_on_an_epochs_last_batch_trains_on(tmp_path):
    """Lightning numbers the resumed run's first batch past the epoch's end (its issue #19367), beyond the batch plan:
    the resume raised "the loader's batch plan gives 0 samples". That batch is a window of its own."""
    _fit_dataloader(8, 1, tmp_path)  # one epoch of two batches: one step
    with pytest.warns(UserWarning, match="#19367"):
        windows = _fit_dataloader(8, 3, tmp_path / "resumed", ckpt_path=tmp_path / "last.ckpt")
    assert [indices for indices, *_ in windows.steps] == [[2], [0, 1]]
    _check_every_window(windows)


def test_a_loader_without_a_plan_resumed_past_the_epochs_last_batch_weighs_that_batch_as_a_whole_window(tmp_path):
    """Without a batch plan the batch Lightning numbers past the epoch's end (#19367), a window of its own that it
    still divides by k, stepped with half its mean's gradient."""
    with pytest.warns(UserWarning, match="does not say ahead"):
        _fit_dataloader(8, 1, tmp_path, planned=False)
        windows = _fit_dataloader(8, 3, tmp_path / "resumed", ckpt_path=tmp_path / "last.ckpt", planned=False)
    assert [indices for indices, *_ in windows.steps] == [[2], [0, 1]]
    _check_every_window(windows, weigh_batches_equally=True)


def test_a_dataloader_resumed_inside_an_epoch_weighs_the_batches_it_restarts_with(tmp_path):
    """A torch DataLoader resumed inside an epoch yields that epoch's first batches again, which Lightning numbers
    from the saved count: the plan's short last batch (14 samples: 4, 4, 4, 2) was taken for a full one."""
    _fit_dataloader(14, 1, tmp_path)
    windows = _fit_dataloader(14, 2, tmp_path / "resumed", ckpt_path=tmp_path / "last.ckpt")
    indices, _, batches, _ = windows.steps[0]
    assert indices == [2, 3] and [len(b["labels"]) for b in batches] == [4, 4]
    _check_every_window(windows)


@pytest.mark.parametrize("clip", [None, 1.0])
def test_a_run_that_clips_gradients_under_mixed_precision_steps_with_an_unfused_adamw(clip):
    """Lightning's mixed precision refuses to clip for a fused optimizer (it unscales inside its own step), even under
    bf16-mixed: every mixed-precision run with trainer.gradient_clip_val failed at its first step."""
    task = _task()
    data = SyntheticDataModule(train_size=16, val_size=8, min_len=4, max_len=16, max_tokens=64, seed=2,
                               vocab_size=64, num_classes=4)
    trainer = pl.Trainer(accelerator="cpu", max_steps=2, precision="bf16-mixed", gradient_clip_val=clip, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(task, datamodule=data)
    assert trainer.global_step == 2
    assert bool(trainer.optimizers[0].defaults["fused"]) == (clip is None)  # fused, the faster step, unless clipping


def test_the_validation_loss_sums_in_float32_under_a_true_half_precision():
    """bf16-true converts the module's floating tensors, the loss metric's sums with them: the sample count stopped
    growing at 2048 and val/loss read 2.0 where the mean was 1.17."""
    task = ClassificationTask(BertClassifier(hidden=16, layers=1, heads=2), num_classes=4).to(torch.bfloat16)
    task.on_validation_start()
    losses = torch.rand(500, generator=torch.Generator().manual_seed(0)).add(0.5)
    for loss in losses:
        task.val_loss.update(loss.to(torch.bfloat16) * 8, 8)  # a batch of 8 samples' summed loss
    expected = losses.to(torch.bfloat16).double().mean()
    assert task.val_loss.compute().item() == pytest.approx(expected.item(), rel=1e-5)
