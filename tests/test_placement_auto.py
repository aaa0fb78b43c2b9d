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
