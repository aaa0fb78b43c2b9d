"""StagePlacement times the stages on the run's data however fit got it: a DataModule or the loaders themselves."""

import random

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, default_collate

from hetrain.callbacks import StagePlacement
from hetrain.callbacks.placement import _first_batch
from hetrain.models.bert import BertClassifier
from hetrain.models.task import ClassificationTask
from hetrain.placement import CostModel, PlacementPlan

LENGTH, HIDDEN = 8, 16


class Tokens(Dataset):
    def __init__(self, rows: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1, 32, (rows, LENGTH), generator=g)
        self.labels = torch.randint(0, 3, (rows,), generator=g)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones(LENGTH, dtype=torch.bool),
                "labels": self.labels[i]}


def _task() -> ClassificationTask:
    torch.manual_seed(0)
    model = BertClassifier(vocab_size=32, num_classes=3, hidden=HIDDEN, layers=2, heads=2, max_len=LENGTH,
                           dropout=0.0, attention_dropout=0.0)
    return ClassificationTask(model, num_classes=3, lr=1e-2)


def _fit(placement: StagePlacement, train: DataLoader, val: DataLoader | None = None) -> ClassificationTask:
    pl.seed_everything(0, verbose=False)
    task = _task()
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=2, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         limit_val_batches=None if val is not None else 0, callbacks=[placement])
    trainer.fit(task, train, val)
    return task


def test_auto_plan_measures_on_the_validation_loader_given_to_fit(tmp_path):
    placement = StagePlacement("auto", save_dir=str(tmp_path))
    _fit(placement, DataLoader(Tokens(16), batch_size=8), DataLoader(Tokens(4, seed=1), batch_size=2))
    assert placement.summary["method"] == "chain-dp" and placement.devices is not None
    costs = CostModel.load(tmp_path / "placement_costs.json")
    assert costs.boundary_bytes[0] == 2 * LENGTH * HIDDEN * 4  # validation's batch of 2, not training's 8


def test_auto_plan_measures_on_the_training_loader_when_fit_has_no_validation_loader(tmp_path):
    placement = StagePlacement("auto", save_dir=str(tmp_path))
    _fit(placement, DataLoader(Tokens(16), batch_size=8))
    costs = CostModel.load(tmp_path / "placement_costs.json")
    assert costs.boundary_bytes[0] == 8 * LENGTH * HIDDEN * 4


def test_predict_with_loaders_trains_on_the_same_shuffled_data_as_without():
    # Fetching a batch from a shuffled loader draws from torch's generator: measuring must leave it alone.
    plan = {"embeddings": "cpu", "encoder": "cpu", "classifier": "cpu"}
    placement = StagePlacement(plan, predict=True)
    measured = _fit(placement, DataLoader(Tokens(32), batch_size=4, shuffle=True))
    plain = _fit(StagePlacement(plan), DataLoader(Tokens(32), batch_size=4, shuffle=True))
    assert placement.summary["auto_predicted_step_time_ms"] > 0
    for (name, a), b in zip(measured.state_dict().items(), plain.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_measuring_without_any_dataloader_says_what_to_pass():
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False)
    with pytest.raises(ValueError, match=r"no dataloader: pass train_dataloaders/val_dataloaders or a datamodule"):
        StagePlacement("auto").measure(trainer, _task())


def test_auto_plan_creates_the_save_dir(tmp_path):
    """Before, a save_dir that did not exist yet failed fit after measuring (FileNotFoundError)."""
    save_dir = tmp_path / "not_yet" / "run1"
    _fit(StagePlacement("auto", save_dir=str(save_dir)), DataLoader(Tokens(8), batch_size=4))
    assert PlacementPlan.load(save_dir / "placement_plan.yaml").method == "chain-dp"
    assert (save_dir / "placement_costs.json").is_file()


def _epoch(measure_first: bool) -> list[list[int]]:
    torch.manual_seed(0)
    loader = DataLoader(list(range(8)), batch_size=4, shuffle=True, num_workers=1, persistent_workers=True)
    if measure_first:
        assert _first_batch(loader).shape == (4,)
    return [batch.tolist() for batch in loader]


def test_measuring_leaves_a_loader_with_persistent_workers_as_it_was():
    """Before, the iterator made to take the batch stayed on a loader with persistent workers (its _iterator), and
    training went on with it: the shuffled order differed from a run that did not measure."""
    assert _epoch(measure_first=True) == _epoch(measure_first=False)


def _augmenting_loader(draws: list[tuple[float, float]]) -> DataLoader:
    """A loader whose collate draws from numpy and random (an augmentation), recording each batch's draws."""
    def collate(items: list) -> dict[str, torch.Tensor]:
        draws.append((float(np.random.rand()), random.random()))
        return default_collate(items)
    return DataLoader(Tokens(16), batch_size=8, collate_fn=collate)


def test_auto_plan_trains_on_the_same_numpy_and_random_draws_as_without():
    """Before, only torch's generator was kept around the measured batch's fetch: a collate (or dataset) drawing
    from numpy or random left that draw on the run's streams, so training, and a resumed run, drew otherwise."""
    plan = {"embeddings": "cpu", "encoder": "cpu", "classifier": "cpu"}
    measured: list[tuple[float, float]] = []
    plain: list[tuple[float, float]] = []
    _fit(StagePlacement("auto"), _augmenting_loader(measured))
    _fit(StagePlacement(plan), _augmenting_loader(plain))
    assert len(measured) == len(plain) + 1  # the measured batch first, then training's
    assert measured[1:] == plain


class _DrawingInputs(ClassificationTask):
    """placement_inputs whose inputs draw from numpy and random each time they are made."""

    def placement_inputs(self, batch: dict[str, torch.Tensor]) -> tuple:
        make_input, stage_args = super().placement_inputs(batch)

        def drawing() -> torch.Tensor:
            np.random.rand()
            random.random()
            return make_input()
        return drawing, stage_args


def test_measuring_leaves_numpy_and_random_as_placement_inputs_found_them():
    """Before, draws made while timing the stages (placement_inputs, a stage's forward) stayed on numpy's and random's
    streams: only torch's was kept."""
    torch.manual_seed(0)
    task = _DrawingInputs(_task().model, num_classes=3, lr=1e-2)
    seen = []

    class Probe(pl.Callback):
        def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            _, keys, position, *rest = np.random.get_state()
            seen.append((keys.tolist(), position, rest, random.getstate()))

    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         callbacks=[Probe(), StagePlacement("auto"), Probe()])
    trainer.fit(task, DataLoader(Tokens(8), batch_size=4))
    before, after = seen
    assert before == after
