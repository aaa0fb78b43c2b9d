"""Run and sweep summaries (hetrain.report): stages without weights, and writers of one file at once."""

import csv
import os
import threading
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf
from torch import nn
from torch.utils.data import DataLoader

from hetrain.report import (
    RUN_LOCK,
    SUMMARY_MD,
    SWEEP_CSV,
    RunDirectory,
    RunRecorder,
    _gpus,
    save_whole,
    seed_table,
    write_run_summary,
    write_sweep_summary,
)


class _Staged(pl.LightningModule):
    """Stages as placement allows them: with parameters, with buffers only (a norm without affine weights), with
    neither (an activation, which runs wherever its input is)."""

    def __init__(self, norm_device: str = "cpu") -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.act = nn.ReLU()
        self.norm = nn.BatchNorm1d(4, affine=False).to(norm_device)
        self.b = nn.Linear(4, 2)

    def stages(self) -> dict[str, nn.Module]:
        return {"a": self.a, "act": self.act, "norm": self.norm, "b": self.b}

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.b(self.norm(self.act(self.a(batch["x"])))).pow(2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_recorder_records_stages_without_parameters(tmp_path: Path) -> None:
    data = [{"x": torch.randn(2, 4), "labels": torch.zeros(2)} for _ in range(3)]
    recorder = RunRecorder()
    trainer = pl.Trainer(max_steps=2, callbacks=[recorder], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    trainer.fit(_Staged(), train_dataloaders=DataLoader(data, batch_size=None))

    summary = recorder.summary(trainer)
    assert summary["stages"] == {"a": "cpu", "act": "with its input", "norm": "cpu", "b": "cpu"}
    assert summary["samples"] == 4
    markdown = write_run_summary(summary, tmp_path)
    assert "| stages.act | with its input |" in markdown and "| stages.norm | cpu |" in markdown


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpus_counts_a_stage_holding_only_buffers() -> None:
    module = _Staged(norm_device="cuda:0")
    assert _gpus(module) == [torch.device("cuda:0")]


def test_overlapping_writers_of_one_path_each_leave_it_whole(tmp_path: Path) -> None:
    """Two writers inside save_whole at once, held there together by a barrier (no timing): each writes its own
    temporary file, so neither rename fails and the file ends as one writer's whole text."""
    target = tmp_path / "summary.json"
    both_inside = threading.Barrier(2, timeout=5)
    texts = {0: "a" * 5000, 1: "b" * 7000}
    errors: list[BaseException] = []

    def save(partial: Path, text: str) -> None:
        with open(partial, "w") as f:
            f.write(text[: len(text) // 2])
            f.flush()
            both_inside.wait()  # the other writer has opened its file and written its first half too
            f.write(text[len(text) // 2:])
        both_inside.wait()  # neither renames before both have written

    def writer(i: int) -> None:
        try:
            save_whole(target, lambda partial: save(partial, texts[i]))
        except BaseException as exc:  # reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(i,)) for i in texts]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert target.read_text() in texts.values()
    assert os.listdir(tmp_path) == [target.name]  # no temporary file left behind


def _records(writer: int) -> list[dict]:
    """A sweep table that differs from every other writer's, in length too."""
    return [{"job": j, "overrides": f"seed={j}", "status": "ok", "steps": 10, "metrics.val/acc": 0.5 + writer,
             "pad": "x" * (500 * writer)} for j in range(10 + writer)]


def test_concurrent_sweep_tables_are_whole_to_a_reader(tmp_path: Path) -> None:
    """The workers of a parallel launcher each rewrite the sweep's table after their job: none fails, and a reader
    of summary.csv or summary.md only ever finds one writer's whole table."""
    writers, rounds = 4, 60
    whole: dict[str, set[str]] = {SWEEP_CSV: set(), SUMMARY_MD: set()}
    for i in range(writers):
        alone = tmp_path / f"alone{i}"
        alone.mkdir()
        write_sweep_summary(_records(i), alone)
        for name, texts in whole.items():
            texts.add((alone / name).read_text())
    shared = tmp_path / "sweep"
    shared.mkdir()
    write_sweep_summary(_records(0), shared)

    errors: list[BaseException] = []
    cut: list[str] = []
    done = threading.Event()

    def writer(i: int) -> None:
        try:
            for _ in range(rounds):
                write_sweep_summary(_records(i), shared)
        except BaseException as exc:  # reported by the assertion below
            errors.append(exc)

    def reader() -> None:
        try:
            while not done.is_set():
                for name, texts in whole.items():
                    if (text := (shared / name).read_text()) not in texts:
                        cut.append(f"{name}: {len(text)} characters")
        except BaseException as exc:  # reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(writers)]
    watcher = threading.Thread(target=reader)
    watcher.start()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    done.set()
    watcher.join()
    assert errors == []
    assert cut == []
    assert sorted(os.listdir(shared)) == sorted([SWEEP_CSV, SUMMARY_MD])


class _Unprintable:
    def __str__(self) -> str:
        raise RuntimeError("this cell cannot be written")


def test_sweep_csv_stays_whole_when_its_writing_fails(tmp_path: Path) -> None:
    write_sweep_summary(_records(1), tmp_path)
    before = (tmp_path / SWEEP_CSV).read_text()
    broken = _records(2)
    broken[-1]["pad"] = _Unprintable()  # fails once the rows before it are written
    with pytest.raises(RuntimeError, match="cannot be written"):
        write_sweep_summary(broken, tmp_path)
    assert (tmp_path / SWEEP_CSV).read_text() == before
    assert len(list(csv.DictReader((tmp_path / SWEEP_CSV).open(newline="")))) == len(_records(1))
    assert sorted(os.listdir(tmp_path)) == sorted([SWEEP_CSV, SUMMARY_MD])


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077], ids=lambda umask: f"umask{umask:03o}")
def test_save_whole_gives_the_mode_a_plain_open_gives(tmp_path: Path, umask: int) -> None:
    old = os.umask(umask)
    try:
        with open(tmp_path / "plain.txt", "w") as f:
            f.write("x")
        save_whole(tmp_path / "whole.txt", lambda partial: partial.write_text("x"))
    finally:
        os.umask(old)
    assert (tmp_path / "whole.txt").stat().st_mode == (tmp_path / "plain.txt").stat().st_mode


def test_a_seed_mean_says_how_many_seeds_it_averages_and_names_a_finished_seed_without_metrics() -> None:
    """A seed that finished without validating was counted in ``seeds`` beside a mean of the others and named
    nowhere: ``| a=1 | 3 | 0.75 ± 0.35 |`` averaged two seeds."""
    records = [
        {"job": 0, "overrides": "a=1 seed=0", "status": "ok", "metrics.val/acc": 0.5, "metrics.val/loss": 1.0},
        {"job": 1, "overrides": "a=1 seed=1", "status": "ok", "metrics.val/acc": 1.0, "metrics.val/loss": 2.0},
        {"job": 2, "overrides": "a=1 seed=2", "status": "ok", "no_validation": "no validation ran up to step 2"},
        {"job": 3, "overrides": "a=2 seed=0", "status": "ok", "metrics.val/acc": 0.25, "metrics.val/loss": 3.0},
        {"job": 4, "overrides": "a=2 seed=1", "status": "ok", "metrics.val/acc": 0.75},  # a metric the other has
        {"job": 5, "overrides": "a=2 seed=2", "status": "failed", "error": "ValueError: boom"},
    ]
    header, rows = seed_table(records)
    assert header == ["overrides (seed aside)", "seeds", "metrics.val/acc", "metrics.val/loss", "jobs without results"]
    assert rows == [["a=1", 3, "0.75 ± 0.35 (2 of 3)", "1.5 ± 0.71 (2 of 3)", "2 (no validation)"],
                    ["a=2", 2, "0.5 ± 0.35", "3 ± n/a (1 of 2)", "4 (no val/loss), 5"]]
    records[2].pop("no_validation")  # finished without metrics, for a reason its summary does not give
    assert seed_table(records)[1][0][-1] == "2 (no metrics)"


def test_seed_means_name_the_seeds_whose_metrics_come_from_an_earlier_step() -> None:
    """Metrics of a seed that last validated before its final step were averaged with final-step ones unsaid."""
    records = [
        {"job": 0, "overrides": "seed=0", "status": "ok", "steps": 5, "metrics.val/acc": 0.5},
        {"job": 1, "overrides": "seed=1", "status": "ok", "steps": 5, "metrics.val/acc": 1.0, "metrics_at_step": 2},
    ]
    header, rows = seed_table(records)
    assert header == ["overrides (seed aside)", "seeds", "metrics.val/acc", "metrics from an earlier step"]
    assert rows == [["", 2, "0.75 ± 0.35", "1 (step 2 of 5)"]]


def test_a_run_resumed_from_a_checkpoint_set_aside_sets_aside_the_run_beside_it(tmp_path: Path, monkeypatch) -> None:
    """Run 1, then a fresh run 2 into the same directory (run 1 went to previous-1/), then run 1 resumed from its
    checkpoint in previous-1/: that counted as resuming inside the directory, so run 2's files stayed, and run 1 went
    on with run 2's memory_steps.csv and kept its memory report as an earlier part of its own. Run 2 goes aside."""
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    monkeypatch.delenv("SLURM_NTASKS", raising=False)
    run_dir = tmp_path / "run"
    run_1 = [".hydra/config.yaml", "checkpoints/step2.ckpt", "memory_steps.csv", "summary.json"]
    run_2 = [".hydra/config.yaml", "checkpoints/last.ckpt", "memory_report.md", "memory_steps.csv", "summary.json"]
    for root, names in ((run_dir / "previous-1", run_1), (run_dir, [*run_2, RUN_LOCK])):
        for name in names:
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_text(name)
    config = OmegaConf.create({"hydra": {"run": {"dir": str(run_dir)}},
                               "ckpt_path": str(run_dir / "previous-1" / "checkpoints" / "step2.ckpt")})
    callback = RunDirectory()
    callback.on_run_start(config)
    callback.on_run_end(config)

    def files(directory: Path) -> list[str]:
        return sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file())

    assert sorted(p.name for p in run_dir.iterdir()) == [RUN_LOCK, "previous-1", "previous-2"]
    assert files(run_dir / "previous-2") == sorted(run_2)
    assert files(run_dir / "previous-1") == sorted(run_1)  # the checkpoint resumed from stays where it is
