"""`placement.plan: auto` in a real run: measured, solved, logged, saved, and reusable as an explicit plan."""

import json
import subprocess
import sys
from pathlib import Path

import yaml

from hetrain.placement import PlacementPlan

ROOT = Path(__file__).resolve().parent.parent


def test_auto_placement_measures_solves_and_saves_a_reusable_plan(tmp_path):
    run = subprocess.run(
        [sys.executable, "train.py", "recipe=bert_auto", "trainer.max_steps=4", "trainer.val_check_interval=4",
         "data.train_size=256", "data.val_size=64", "threads=1", f"hydra.run.dir={tmp_path}"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "placement auto (chain-dp" in run.stdout + run.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["placement"]["method"] == "chain-dp"
    assert summary["placement"]["predicted_step_time_ms"] > 0
    assert summary["throughput"]["step_time_ms"]["p50"] > 0  # the measured time beside the prediction
    plan = PlacementPlan.load(tmp_path / "placement_plan.yaml")
    assert set(plan.devices) == {"embeddings", "encoder.0", "encoder.1", "classifier"}
    assert set(summary["stages"].values()) == set(plan.devices.values())
    # The saved file's mapping is what a recipe's placement.plan takes.
    assert yaml.safe_load((tmp_path / "placement_plan.yaml").read_text())["plan"] == plan.devices


def test_an_explicit_plan_is_shown_beside_what_auto_would_predict(tmp_path, caplog):
    import pytorch_lightning as pl

    from hetrain.callbacks import StagePlacement
    from hetrain.data.datamodule import SyntheticDataModule
    from hetrain.models.bert import BertClassifier
    from hetrain.models.task import ClassificationTask

    data = SyntheticDataModule(vocab_size=64, num_classes=2, min_len=8, max_len=24, train_size=64, val_size=16,
                               max_tokens=192)
    task = ClassificationTask(BertClassifier(vocab_size=64, num_classes=2, hidden=16, layers=1, heads=2, max_len=32),
                              num_classes=2)
    placement = StagePlacement({"embeddings": "cpu", "encoder": "cuda:0"}, predict=True)
    trainer = pl.Trainer(max_steps=1, callbacks=[placement], logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0,
                         default_root_dir=tmp_path)
    with caplog.at_level("INFO"):
        trainer.fit(task, datamodule=data)
    summary = placement.summary
    assert summary["method"] == "explicit" and summary["predicted_step_time_ms"] > 0
    assert summary["auto_predicted_step_time_ms"] <= summary["predicted_step_time_ms"] * 1.0001  # auto is optimal
    assert {k for k in summary if k.startswith("auto.")} == {"auto.embeddings", "auto.encoder.0", "auto.classifier"}
    assert "this plan predicts" in caplog.text and "auto would choose" in caplog.text


def test_a_plan_the_pipeline_model_cannot_price_is_logged_not_fatal(caplog):
    import torch

    from hetrain.callbacks import StagePlacement
    from hetrain.placement import CostModel

    # Two devices as a GPU machine measures them; the plan goes back to the CPU, which a pipeline cannot price.
    costs = CostModel(["embeddings", "encoder", "classifier"], ["cpu", "cuda:0"], [[1e-3, 2e-3], [9e-3, 1e-3],
                      [1e-3, 2e-3]], [4096, 4096, 64], [[float("inf"), 1e9], [1e9, float("inf")]])

    class Measured(StagePlacement):
        def measure(self, trainer, pl_module):
            return costs

    placement = Measured({"embeddings": "cpu", "encoder": "cuda:0", "classifier": "cpu"}, objective="pipeline",
                         micro_batches=4, predict=True)
    placed = {"embeddings": torch.device("cpu"), "encoder": torch.device("cuda:0"), "classifier": torch.device("cpu")}
    with caplog.at_level("INFO"):
        placement.compare(None, None, placed)
    assert "this plan has no predicted time" in caplog.text and "device 0 holds" in caplog.text
    assert placement.summary["predicted_step_time_ms"] is None
    assert placement.summary["auto_predicted_step_time_ms"] > 0
