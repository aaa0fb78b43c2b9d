"""The main job under Lightning's DDP with 2 CPU processes (gloo): each process runs its own placed, split model."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_bert_split_trains_under_ddp_with_two_cpu_processes(tmp_path):
    run = subprocess.run(
        [sys.executable, "train.py", "recipe=bert_split", "trainer.accelerator=cpu", "trainer.devices=2",
         "+trainer.strategy=ddp", "trainer.max_steps=6", "trainer.val_check_interval=6", "data.train_size=512",
         "data.val_size=64", "threads=1", f"hydra.run.dir={tmp_path}"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-4000:]
    assert "MEMBER: 2/2" in output  # Lightning started the second process and joined both
    assert (tmp_path / "train_ddp_process_1.log").exists()
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "ok" and summary["steps"] == 6
    assert summary["data"]["train"]["loader"] == "ring"
