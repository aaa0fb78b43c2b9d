"""The main job end to end (train.py in a subprocess, as a user runs it) and the parts it is built from."""

import csv
import io
import json
import logging
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta
from pathlib import Path

import hydra.utils
import pytest
import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import InstantiationException
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.utilities.rank_zero import rank_zero_only
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

import hetrain.nn
from hetrain import plugins
from hetrain.callbacks.placement import StagePlacement
from hetrain.callbacks.throughput import Throughput
from hetrain.data.synthetic import CLS, FIRST_MARKER, SyntheticSequences, pad_collate
from hetrain.models.bert import BertClassifier
from hetrain.models.task import ClassificationTask
from hetrain.placement import resolve_plan
from hetrain.recipes import register_recipes
from hetrain.regional_compile import compile_counts
from hetrain.report import RUN_LOCK, RunDirectory, RunRecorder, collect_jobs, error_headline
from hetrain.train import (
    _devices_in_use,
    _other_ranks,
    _rank_logs,
    _validation_inside_window,
    build,
    check_config,
    run,
)

ROOT = Path(__file__).resolve().parent.parent
SPLIT = {"embeddings": "cpu", "encoder": "cuda", "classifier": "cuda"}
# Small data, so a subprocess run spends its time training rather than generating sequences.
SMALL = ["data.train_size=640", "data.val_size=128"]


def train_py(*args: str, cwd: Path, threads: int | None = 1) -> subprocess.CompletedProcess:
    """Runs train.py as a user would: the Triton interpreter the test session turns on stays off.

    One torch thread unless told (None: the run's own ``threads`` setting): tests often share the cores with
    builds, where a thread per core is several times slower.
    """
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    thread_setting = [f"threads={threads}"] if threads is not None else []
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args, *thread_setting], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


# --- data ---------------------------------------------------------------------------------------

def test_synthetic_data_is_deterministic_and_variable_length():
    a = SyntheticSequences(200, min_len=5, max_len=40, seed=3)
    b = SyntheticSequences(200, min_len=5, max_len=40, seed=3)
    c = SyntheticSequences(200, min_len=5, max_len=40, seed=4)
    assert all(torch.equal(x, y) for x, y in zip(a.sequences, b.sequences, strict=True))
    assert torch.equal(a.labels, b.labels)
    assert [s.tolist() for s in a.sequences] != [s.tolist() for s in c.sequences]
    lengths = {len(s) for s in a.sequences}
    assert min(lengths) >= 5 and max(lengths) <= 40 and len(lengths) > 10
    assert all(s[0] == CLS for s in a.sequences)


def test_synthetic_data_of_a_negative_size_is_refused_naming_the_settings():
    """It failed inside torch.randint: "Trying to create tensor with negative dimension -5"."""
    with pytest.raises(ValueError, match=re.escape("hetrain: need size >= 0 sequences (data.train_size and "
                                                   "data.val_size; documents for token data), got size=-5")):
        SyntheticSequences(-5)
    assert len(SyntheticSequences(0)) == 0  # a val split with trainer.limit_val_batches=0


def test_synthetic_label_is_the_majority_marker_class():
    data = SyntheticSequences(300, num_classes=4, markers_per_class=8, seed=0)
    for seq, label in zip(data.sequences, data.labels.tolist(), strict=True):
        markers = seq[(seq >= FIRST_MARKER) & (seq < FIRST_MARKER + 4 * 8)]
        counts = torch.bincount((markers - FIRST_MARKER) // 8, minlength=4)
        assert int(counts.argmax()) == label and int(counts.max()) > int(counts.sort().values[-2])


def test_pad_collate_masks_padding():
    data = SyntheticSequences(8, min_len=3, max_len=12, seed=1)
    batch = pad_collate([data[i] for i in range(8)])
    lengths = torch.tensor([len(s) for s in data.sequences])
    assert batch["input_ids"].shape == (8, int(lengths.max()))
    assert torch.equal(batch["attention_mask"].sum(1), lengths)
    assert torch.equal(batch["labels"], data.labels)
    assert (batch["input_ids"][~batch["attention_mask"]] == 0).all()


# --- model --------------------------------------------------------------------------------------

def test_stages_are_module_paths_covering_every_parameter():
    model = BertClassifier(hidden=32, layers=3, heads=2)
    stages = model.stages()
    assert list(stages) == ["embeddings", "encoder.0", "encoder.1", "encoder.2", "classifier"]
    assert all(model.get_submodule(name) is stage for name, stage in stages.items())
    in_stages = sum(p.numel() for stage in stages.values() for p in stage.parameters())
    assert in_stages == sum(p.numel() for p in model.parameters())
    assert any(isinstance(m, hetrain.nn.LayerNorm) for m in model.modules())


def test_padding_does_not_change_logits():
    torch.manual_seed(0)
    model = BertClassifier(hidden=32, layers=2, heads=4).eval()
    ids = torch.tensor([[CLS, 40, 41, 42, 43]])
    padded = torch.cat([ids, torch.zeros(1, 6, dtype=torch.long)], dim=1)
    with torch.no_grad():
        short = model(ids, torch.ones_like(ids, dtype=torch.bool))
        long = model(padded, padded != 0)
    torch.testing.assert_close(short, long)


# --- placement ----------------------------------------------------------------------------------

STAGES = ["embeddings", "encoder.0", "encoder.1", "classifier"]
ABSENT = f"cuda:{torch.cuda.device_count()}"  # one past the last GPU: absent on any machine


def test_plan_resolves_most_specific_path():
    devices, note = resolve_plan({"encoder": "cpu", "encoder.1": ABSENT, "classifier": "cpu"}, STAGES)
    assert devices == {name: torch.device("cpu") for name in STAGES[1:]}
    assert note == f"placement: {ABSENT} not present; encoder.1 -> cpu"


def test_plan_rejects_paths_that_name_no_stage():
    with pytest.raises(ValueError, match="'decoder' names no stage"):
        resolve_plan({"decoder": "cpu"}, STAGES)
    with pytest.raises(ValueError, match="inside stage 'encoder.0'"):
        resolve_plan({"encoder.0.attention": "cpu"}, STAGES)


def test_absent_gpu_falls_back_to_cpu_with_one_log_line(caplog):
    plan = {"embeddings": "cpu", "encoder": ABSENT, "classifier": ABSENT}
    model = BertClassifier(hidden=32, layers=2, heads=2)
    placement = StagePlacement(plan)
    with caplog.at_level(logging.INFO, logger="hetrain.callbacks.placement"):
        devices = placement.place(model.stages())
        placement.place(model.stages())  # placing again (as each Lightning entry point does) says nothing new
    assert set(devices.values()) == {torch.device("cpu")}
    messages = [r.getMessage() for r in caplog.records]
    assert messages == [f"placement: {ABSENT} not present; encoder, classifier -> cpu"]
    ids = torch.tensor([[CLS, 40, 41]])
    assert model(ids, ids != 0).shape == (1, 4)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message printed where there is no GPU")
def test_bert_split_plan_without_gpu_says_so():
    devices, note = resolve_plan(SPLIT, STAGES)
    assert set(devices.values()) == {torch.device("cpu")}
    assert note == "placement: cuda not present; encoder, classifier -> cpu"


@pytest.mark.cuda
def test_split_model_trains_across_cpu_and_gpu():
    torch.manual_seed(0)
    model = BertClassifier(hidden=32, layers=2, heads=2)
    task = ClassificationTask(model, num_classes=4)
    devices = StagePlacement(SPLIT).place(task.stages())
    assert devices["embeddings"].type == "cpu" and devices["encoder.1"] == torch.device("cuda:0")
    batch = pad_collate([SyntheticSequences(8, seed=0)[i] for i in range(8)])
    batch = task.transfer_batch_to_device(batch, torch.device("cuda:0"), 0)
    assert batch["input_ids"].device.type == "cpu" and batch["labels"].device.type == "cuda"
    loss, logits = task._loss(batch)
    assert logits.device == torch.device("cuda:0")
    loss.backward()
    assert model.embeddings.tokens.weight.grad.device.type == "cpu"
    assert model.encoder[0].attention.qkv.weight.grad.device.type == "cuda"
    # The fused AdamW step serves both devices.
    torch.optim.AdamW(model.parameters(), fused=True).step()


# --- the main job -------------------------------------------------------------------------------

def test_bert_split_trains_and_writes_summary(tmp_path):
    # At hidden 64 the model learns the task in about 100 steps, a third of the recipe's time.
    result = train_py("recipe=bert_split", "trainer.max_steps=100", "model.hidden=64", "data.train_size=3200",
                      "data.val_size=256", "callbacks.profile_steps=[5,6]", f"hydra.run.dir={tmp_path}/run",
                      cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "ok" and summary["recipe"] == "bert_split"
    assert summary["steps"] == 100 and 100 * 16 < summary["samples"] <= 100 * 128  # token-budget batches
    assert summary["data"]["train"]["loader"] == "ring" and summary["data"]["train"]["ring_bytes"] > 0
    assert summary["samples_per_s"] > 0 and summary["peak_memory_mib"]["cpu_rss"] > 0
    # The ring loader times its own next(): its wait is part of the time between steps.
    throughput = summary["throughput"]
    assert 0 < throughput["data_wait_fraction"] <= throughput["between_steps_fraction"] < 1
    assert summary["metrics"]["val/acc"] > 0.8, summary  # chance is 0.25
    # The final validation's loss as logged, unrounded (a sweep's spread over seeds is computed from it).
    last_val_loss = [float(r["val/loss"]) for r in _logged(run) if "val/loss" in r][-1]
    assert summary["metrics"]["val/loss"] == pytest.approx(last_val_loss, rel=1e-7, abs=0)
    assert list(summary["stages"]) == ["embeddings", "encoder.0", "encoder.1", "classifier"]
    assert summary["cpu_malloc"]["setting"].startswith("keep (freed blocks of 32 MiB or more reused")
    trace = json.loads((run / "trace_steps_5-6.json").read_text())["traceEvents"]  # callbacks.profile_steps
    assert {e["name"] for e in trace if e.get("name", "").startswith("hetrain::train step")} == {
        "hetrain::train step 5", "hetrain::train step 6"}
    assert summary["step_trace"]["trace"] == str(run / "trace_steps_5-6.json")
    markdown = (run / "summary.md").read_text()
    assert "samples_per_s" in markdown and "metrics.val/acc" in markdown and "stages.encoder.0" in markdown
    assert "`throughput.samples_per_s`: the batches timed after warm-up" in markdown  # why the two rates differ
    assert "Epoch 0" in result.stdout  # Lightning's progress bar
    log = (run / "train.log").read_text()
    assert "Instantiating model <hetrain.models.bert.BertClassifier>" in log
    if not torch.cuda.is_available():
        assert log.count("placement: cuda not present; encoder, classifier -> cpu") == 1
        assert set(summary["stages"].values()) == {"cpu"}


class _Clock:
    """Seconds that pass only when the test moves them on; reading them moves nothing."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class _Fetching(DataLoader):
    """torch's DataLoader whose every fetch takes ``fetch`` seconds of ``clock``, counted in ``wait_seconds`` as
    hetrain's loaders count the time spent in their ``next()``."""

    def __init__(self, *args, clock: _Clock, fetch: float, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.clock, self.fetch, self.wait_seconds = clock, fetch, 0.0

    def __iter__(self):
        for batch in super().__iter__():
            self.clock.now += self.fetch
            self.wait_seconds += self.fetch
            yield batch


class _Work(pl.Callback):
    """A training batch takes 1 s of the clock, a validation batch 10 s."""

    def __init__(self, clock: _Clock) -> None:
        self.clock = clock

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.clock.now += 1.0

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self.clock.now += 10.0


class _SlowCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint, whose saves after a validation take 50 s of the clock."""

    def __init__(self, clock: _Clock, **kwargs) -> None:
        super().__init__(**kwargs)
        self.clock = clock

    def on_validation_end(self, trainer, pl_module) -> None:
        super().on_validation_end(trainer, pl_module)
        self.clock.now += 50.0


def test_run_summary_rates_leave_out_validation_and_the_checkpoint_saved_after_it(tmp_path):
    """Lightning runs ModelCheckpoint after every other callback's on_validation_end: its save, 64 MB of weights,
    landed in the training time of both rates, and samples/s read a fifth of the rate training ran at."""
    clock, steps = _Clock(), 6
    data = SyntheticSequences(4 * steps, min_len=4, max_len=12, seed=0)
    train = _Fetching(data, batch_size=4, collate_fn=pad_collate, clock=clock, fetch=0.25)
    throughput, recorder = Throughput(clock=clock, peak_flops=1e9), RunRecorder(clock=clock)
    trainer = pl.Trainer(accelerator="cpu", max_steps=steps, val_check_interval=2, limit_val_batches=1,
                         num_sanity_val_steps=0, default_root_dir=tmp_path, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[_Work(clock), throughput, recorder,
                                                                _SlowCheckpoint(clock, dirpath=tmp_path)])
    torch.manual_seed(0)
    task = ClassificationTask(BertClassifier(hidden=16, layers=1, heads=2), num_classes=4)
    trainer.fit(task, train, DataLoader(data, batch_size=4, collate_fn=pad_collate))
    # Each batch is fetched in 0.25 s and trains 1 s; the three validations, 10 s each, and the saves after them,
    # 50 s each, are not training time (the fetch after each is).
    assert recorder.train_time_s == steps * 1.25 and recorder.summary(trainer)["samples_per_s"] == 4 / 1.25
    s = throughput.summary
    assert s["samples_per_s"] == 4 / 1.25 and s["between_steps_ms_mean"] == 250.0 and s["data_wait_fraction"] == 0.2


class _Batches(pl.Callback):
    """(epoch, batch_idx) of every training batch of the fit."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, int]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.seen.append((trainer.current_epoch, batch_idx))


def test_a_fit_resumed_from_where_max_steps_ended_an_epoch_trains_no_batch_past_it(tmp_path):
    """A validation forced at an epoch's last batch (max_steps reached there) saved a last.ckpt from which a resumed
    fit, not seeing that the epoch had ended, trained a sixth batch of a five-batch epoch."""
    data = SyntheticSequences(4 * 7, min_len=4, max_len=12, seed=0)
    loader = DataLoader(data, batch_size=4, collate_fn=pad_collate)

    recorders: list[RunRecorder] = []
    trainers: list[pl.Trainer] = []

    def fit(max_steps: int, ckpt_path: Path | None) -> list[tuple[int, int]]:
        batches = _Batches()
        recorders.append(RunRecorder())
        trainer = pl.Trainer(accelerator="cpu", max_steps=max_steps, limit_train_batches=5, val_check_interval=2,
                             limit_val_batches=1, num_sanity_val_steps=0, logger=False, enable_progress_bar=False,
                             enable_model_summary=False, callbacks=[recorders[-1], batches,
                                                                    ModelCheckpoint(dirpath=tmp_path, save_last=True)])
        trainers.append(trainer)
        torch.manual_seed(0)
        task = ClassificationTask(BertClassifier(hidden=16, layers=1, heads=2), num_classes=4)
        trainer.fit(task, loader, loader, ckpt_path=ckpt_path)
        return batches.seen

    fit(5, None)  # ends on epoch 0's last batch, which is no validation's
    assert recorders[-1].summary(trainers[-1])["metrics_at_step"] == 4  # said, not hidden
    resumed = fit(8, tmp_path / "last.ckpt")
    assert all(batch_idx < 5 for _, batch_idx in resumed) and resumed[-3:] == [(1, 0), (1, 1), (1, 2)]
    assert "metrics_at_step" not in recorders[-1].summary(trainers[-1])  # ended mid-epoch: validated there


def test_a_run_resumed_into_its_own_directory_keeps_the_earlier_parts_csv_log(tmp_path):
    """Lightning's CSVLogger deletes the metrics.csv it finds in its folder, which the run's config fixes (csv/): a
    sweep job requeued from its own last.ckpt, or a run resumed into its hydra.run.dir, lost the steps before."""
    from hydra.utils import instantiate

    cfg = compose_train(output_dir=tmp_path)
    for part, steps in enumerate([(0, 1), (2, 3), (4,)]):  # the run, then two resumes into the same directory
        logger = instantiate(cfg.logger)
        logger.log_hyperparams({"part": part})
        for step in steps:
            logger.log_metrics({"train/loss": 1.0 / (step + 1)}, step=step)
        logger.save()

    def logged(folder: str) -> list[str]:
        return [row["step"] for row in csv.DictReader((tmp_path / folder / "metrics.csv").open())]

    assert (logged("csv-part1"), logged("csv-part2"), logged("csv")) == (["0", "1"], ["2", "3"], ["4"])
    assert "part: 0" in (tmp_path / "csv-part1" / "hparams.yaml").read_text()


def _logged(run: Path) -> list[dict[str, str]]:
    """The run's CSV rows, without the columns that are times or counts of this process's batches."""
    rows = list(csv.DictReader((run / "csv" / "metrics.csv").open()))
    return [{k: v for k, v in r.items() if v and not k.startswith(("throughput/", "epoch"))} for r in rows]


def test_a_run_resumed_from_a_checkpoint_of_its_middle_goes_on_exactly_as_it_did(tmp_path):
    """ckpt_path= restores weights, optimizer, the ring loader's position mid-epoch and the generators: a job
    preempted after its step-20 checkpoint, or stopped by Ctrl-C, and resumed from its checkpoint logs what the
    uninterrupted job logged."""
    common = ["recipe=bert_split", "model.hidden=32", *SMALL, "trainer.val_check_interval=10",
              "trainer.log_every_n_steps=5", "trainer.max_steps=30", "callbacks.memory_profiler=null"]
    whole = train_py(*common, "callbacks.model_checkpoint.save_top_k=-1", f"hydra.run.dir={tmp_path}/whole",
                     cwd=tmp_path)
    assert whole.returncode == 0, whole.stderr[-3000:]
    (checkpoint,) = (tmp_path / "whole" / "checkpoints").glob("step20-*.ckpt")
    resumed = train_py(*common, f"ckpt_path={checkpoint}", f"hydra.run.dir={tmp_path}/resumed", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = json.loads((tmp_path / "resumed" / "summary.json").read_text())
    assert summary["steps"] == 30 and summary["resumed"] == {"from": str(checkpoint), "at_step": 20}
    after = [r for r in _logged(tmp_path / "whole") if int(r["step"]) >= 20]
    assert len(after) >= 3 and any("train/loss" in r for r in after) and any("val/loss" in r for r in after)
    assert [r for r in _logged(tmp_path / "resumed") if int(r["step"]) >= 20] == after  # the same values, bit for bit

    # Ctrl-C during step 17: that step ends, its checkpoint is saved, the run exits 130 saying how to go on.
    ctrl_c = ["+callbacks.ctrl_c._target_=tests.fixtures.ctrl_c.CtrlCAt"]
    stopped = train_py(*common, *ctrl_c, "+callbacks.ctrl_c.steps=[17]", f"hydra.run.dir={tmp_path}/stopped",
                       cwd=tmp_path)
    assert stopped.returncode == 130, stopped.stderr[-3000:]
    checkpoint = tmp_path / "stopped" / "checkpoints" / "interrupted.ckpt"
    summary = json.loads((tmp_path / "stopped" / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["steps"] == 18
    assert summary["graceful_stop"] == {"at_step": 18, "checkpoint": str(checkpoint), "signal": "SIGINT"}
    assert f"Resume with ckpt_path={checkpoint}" in (tmp_path / "stopped" / "train.log").read_text()
    went_on = train_py(*common, f"ckpt_path={checkpoint}", f"hydra.run.dir={tmp_path}/went_on", cwd=tmp_path)
    assert went_on.returncode == 0, went_on.stderr[-3000:]
    after = [r for r in _logged(tmp_path / "whole") if int(r["step"]) >= 18]
    assert [r for r in _logged(tmp_path / "went_on") if int(r["step"]) >= 18] == after

    # SIGTERM (a preempted job): the same checkpoint of the step in flight, exit 143.
    preempted = train_py(*common, *ctrl_c, "+callbacks.ctrl_c.steps=[17]", "+callbacks.ctrl_c.signal_name=SIGTERM",
                         f"hydra.run.dir={tmp_path}/preempted", cwd=tmp_path)
    assert preempted.returncode == 143, preempted.stderr[-3000:]
    checkpoint = tmp_path / "preempted" / "checkpoints" / "interrupted.ckpt"
    summary = json.loads((tmp_path / "preempted" / "summary.json").read_text())
    assert summary["status"] == "interrupted" and f"ckpt_path={checkpoint}" in summary["error"]
    assert torch.load(checkpoint, weights_only=False)["global_step"] == 18

    # Twice: it stops at once, as Lightning does, and the summary says nothing was saved.
    twice = train_py(*common, *ctrl_c, "+callbacks.ctrl_c.steps=[3,3]", f"hydra.run.dir={tmp_path}/twice",
                     cwd=tmp_path)
    assert twice.returncode == 1, twice.stderr[-3000:]
    summary = json.loads((tmp_path / "twice" / "summary.json").read_text())
    assert summary["status"] == "interrupted" and "nothing saved since the last checkpoint" in summary["error"]
    assert not (tmp_path / "twice" / "checkpoints" / "interrupted.ckpt").exists()


def test_last_ckpt_holds_the_newest_validation_even_when_it_was_not_the_best(tmp_path):
    """Lightning's save_last copies only a step it saved a best checkpoint at: after a validation that did not
    improve val/acc, last.ckpt held an older step, and resuming from it trained steps over again."""
    common = ["recipe=bert_split", "model.hidden=32", *SMALL, "trainer.max_steps=4", "trainer.val_check_interval=2",
              "task.lr=0", "callbacks.memory_profiler=null"]  # no learning: the second validation is no better
    result = train_py(*common, f"hydra.run.dir={tmp_path}/run", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoints = tmp_path / "run" / "checkpoints"
    assert [p.name.split("-")[0] for p in checkpoints.glob("step*.ckpt")] == ["step2"]  # the best
    assert torch.load(checkpoints / "last.ckpt", weights_only=False)["global_step"] == 4

    # With both checkpoint callbacks dropped, nothing is saved: Lightning adds no checkpoint of its own.
    dropped = train_py(*common, "callbacks.model_checkpoint=null", "callbacks.last_checkpoint=null",
                       f"hydra.run.dir={tmp_path}/none", cwd=tmp_path)
    assert dropped.returncode == 0, dropped.stderr[-3000:]
    assert not list((tmp_path / "none").rglob("*.ckpt"))


def test_compiled_stages_train_as_the_eager_ones_do(tmp_path):
    """compile.enabled=true compiles each stage (aot_eager here: dynamo and AOT autograd trace every stage, forward
    and backward, without inductor's C++ build); the losses it logs are the eager run's."""
    common = ["recipe=bert_split", "model.hidden=32", *SMALL, "trainer.max_steps=8", "trainer.log_every_n_steps=2",
              "trainer.precision=32", "callbacks.memory_profiler=null", "trainer.val_check_interval=4"]
    eager = train_py(*common, f"hydra.run.dir={tmp_path}/eager", cwd=tmp_path)
    compiled = train_py(*common, "compile.enabled=true", "compile.backend=aot_eager",
                        f"hydra.run.dir={tmp_path}/compiled", cwd=tmp_path)
    assert eager.returncode == 0, eager.stderr[-3000:]
    assert compiled.returncode == 0, compiled.stderr[-3000:]
    summary = json.loads((tmp_path / "compiled" / "summary.json").read_text())
    compile_summary = summary["compile"]
    assert {k: compile_summary[k] for k in ("mode", "backend", "fullgraph", "dynamic", "stages", "eager")} == {
        "mode": "default", "backend": "aot_eager", "fullgraph": False, "dynamic": None, "stages": 3,
        "eager": ["embeddings"]}  # the recipe's token table has sparse gradients, which AOT autograd cannot trace
    assert compile_summary["graphs"] >= 2 and compile_summary["graph_breaks"] == 0  # the stages ran compiled
    assert "compile" not in json.loads((tmp_path / "eager" / "summary.json").read_text())
    assert ("Compile: 3 stages with torch.compile {'mode': 'default', 'backend': 'aot_eager', 'fullgraph': False, "
            "'dynamic': None}; left eager (sparse-gradient embeddings): embeddings"
            in (tmp_path / "compiled" / "train.log").read_text())
    losses = {name: [(r["step"], float(r[key])) for r in _logged(tmp_path / name) for key in ("train/loss", "val/loss")
                     if key in r] for name in ("eager", "compiled")}
    assert len(losses["eager"]) >= 5 and [s for s, _ in losses["compiled"]] == [s for s, _ in losses["eager"]]
    for (_, a), (_, b) in zip(losses["eager"], losses["compiled"], strict=True):
        assert a == pytest.approx(b, rel=1e-4)


@pytest.mark.parametrize(("overrides", "key"), [(["model=resnet"], "data.channels"),
                                                (["recipe=resnet_fused_amp", "data=synthetic"], "data.channels"),
                                                (["data=images"], "data.vocab_size")])
def test_data_that_lacks_what_the_model_reads_is_refused_naming_the_key(tmp_path, overrides, key):
    """It failed as omegaconf's InterpolationKeyError, which names the key but not the choice to change."""
    with pytest.raises(ValueError, match=rf"the model reads {key}, which the data does not set; .*data=images"):
        build(compose_train(*overrides, output_dir=tmp_path))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_a_gpu_accelerator_without_a_gpu_is_refused_naming_the_setting(tmp_path):
    """It failed as "precision 'auto' found none of ['cuda:0'] present", naming neither the setting nor the fix."""
    with pytest.raises(ValueError, match=r"trainer.accelerator=gpu, but .*use trainer.accelerator=auto"):
        build(compose_train("trainer.accelerator=gpu", output_dir=tmp_path))


def test_a_checkpoint_path_that_is_no_file_is_refused_naming_it(tmp_path):
    cfg = compose_train("recipe=bert_split", f"ckpt_path={tmp_path}/nope.ckpt", output_dir=tmp_path)
    with pytest.raises(ValueError, match=r"ckpt_path=.*nope.ckpt is not a file.*checkpoints/last.ckpt"):
        build(cfg)


@pytest.mark.parametrize("content, found", [
    (torch.zeros(3), "it holds a Tensor"),
    ([1, 2], "it holds a list"),
    ({"weight": torch.zeros(2)}, "it holds a dict without 'pytorch-lightning_version' or 'state_dict'"),
    ("hello\n", "it is no file torch.save wrote, or a damaged one (torch.load raised KeyError: 101)"),
    # A gzipped checkpoint: left to Lightning, whose torch error advised weights_only=False.
    (b"\x1f\x8b\x08\x00" + bytes(range(256)), "it is no file torch.save wrote, or a damaged one (torch.load raised "
     "UnpicklingError: Unsupported operand 31)"),
])
def test_a_checkpoint_path_that_is_no_lightning_checkpoint_is_refused_naming_it(tmp_path, content, found):
    """It failed with a bare "KeyError: 101" (a text file), "KeyError: 'pytorch-lightning_version'" (a state_dict)
    or "'Tensor' object has no attribute 'get'", after the model and data were built or inside Lightning."""
    ckpt = tmp_path / "weights.ckpt"
    if isinstance(content, str):
        ckpt.write_text(content)
    elif isinstance(content, bytes):
        ckpt.write_bytes(content)
    else:
        torch.save(content, ckpt)
    for limits in (["trainer.max_steps=2"], ["trainer.max_steps=-1", "trainer.max_epochs=null"]):
        cfg = compose_train("recipe=bert_split", *limits, f"ckpt_path={ckpt}", output_dir=tmp_path)
        with pytest.raises(ValueError, match=re.escape(
                f"hetrain: ckpt_path={ckpt} is not a Lightning checkpoint: {found}, where Lightning saves a dict "
                "with the keys 'pytorch-lightning_version', 'state_dict', 'global_step', 'loops', 'optimizer_states' "
                "and more; pass a checkpoint an earlier run wrote, e.g. <its run directory>/checkpoints/last.ckpt")):
            run(cfg)


class _Unlisted:
    """An object torch.load(weights_only=True) refuses, as a user's hyperparameters may hold."""


@pytest.mark.parametrize("zipped", [True, False])
def test_a_checkpoint_with_an_object_weights_only_refuses_is_left_to_lightning(tmp_path, zipped):
    """torch's message, which Lightning raises, says how to allow the object. One in torch.save's format before
    torch 1.6 (not a zip) was refused as "not a Lightning checkpoint"."""
    from hetrain.train import _read_checkpoint

    torch.save({"pytorch-lightning_version": "2.6.0", "state_dict": {}, "hyper_parameters": _Unlisted()},
               tmp_path / "last.ckpt", _use_new_zipfile_serialization=zipped)
    assert _read_checkpoint(str(tmp_path / "last.ckpt")) is None


def test_a_truncated_checkpoint_is_refused_with_torchs_words(tmp_path):
    """The refusal said only "torch.load raised RuntimeError", not what torch found wrong."""
    from hetrain.train import _read_checkpoint

    saved = io.BytesIO()
    torch.save({"pytorch-lightning_version": "2.6.0", "state_dict": {"w": torch.zeros(256)}}, saved)
    ckpt = tmp_path / "last.ckpt"
    ckpt.write_bytes(saved.getvalue()[:len(saved.getvalue()) // 2])  # a copy cut short
    with pytest.raises(ValueError, match=r"or a damaged one \(torch.load raised RuntimeError: .*failed finding "
                                         r"central directory"):
        _read_checkpoint(str(ckpt))


@pytest.mark.parametrize("cause", ["Permission denied", "Input/output error"])
def test_a_checkpoint_that_cannot_be_read_is_named_so_not_as_no_checkpoint(tmp_path, cause):
    """An unreadable file was refused as "not a Lightning checkpoint: it is no file torch.save wrote", the cause
    (its permissions, the disk) unsaid."""
    from hetrain.train import _read_checkpoint

    if cause == "Permission denied":
        ckpt = tmp_path / "last.ckpt"
        torch.save({"pytorch-lightning_version": "2.6.0", "state_dict": {}}, ckpt)
        ckpt.chmod(0)
        if os.access(ckpt, os.R_OK):
            pytest.skip("this user (root) reads a file without read permission")
    else:
        ckpt = Path("/proc/self/mem")  # a file whose start cannot be read: nothing is mapped at address 0
        if not ckpt.is_file():
            pytest.skip("needs Linux's /proc")
    with pytest.raises(OSError, match=re.escape(f"hetrain: ckpt_path={ckpt} cannot be read (") + rf".*{cause}"):
        _read_checkpoint(str(ckpt))


def test_failed_run_records_its_error(tmp_path):
    # A pin to a backend that does not exist is refused by hetrain.plugins.configure, before the fit.
    result = train_py("recipe=bert_split", "+backends.pins.layer_norm=nope", *SMALL,
                      f"hydra.run.dir={tmp_path}/run", cwd=tmp_path)
    assert result.returncode != 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "failed"
    assert "BackendError" in summary["error"] and "'nope'" in summary["error"]
    assert "Traceback" in Path(summary["log"]).read_text()


def compose_train(*overrides: str, output_dir: Path) -> DictConfig:
    """The config ``python train.py *overrides`` would run, composed in this process, recipes registered."""
    register_recipes(ROOT / "recipes")
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return compose("train", overrides=[*overrides, f"output_dir={output_dir}"])


@pytest.mark.parametrize("override, key", [
    ("placement.plan.encoder=cdua:0", "placement.plan.encoder names device 'cdua:0'"),
    ("placement.fallback=cdua", "placement.fallback names device 'cdua'"),
    ("placement.plan.encoder=0", "placement.plan.encoder names device 0"),
])
def test_a_setting_that_names_no_device_is_refused_naming_it(override, key, tmp_path):
    """A typo in a device reaches torch.device inside the precision choice otherwise: a RuntimeError naming neither."""
    cfg = compose_train("recipe=bert_split", override, output_dir=tmp_path)
    with pytest.raises(ValueError, match=re.escape(f"hetrain: {key}, unknown to torch; write cpu, cuda or")):
        build(cfg)


@pytest.mark.parametrize("overrides, message", [
    (["threads=-1"], "threads=-1 must be a positive whole number or null"),
    (["threads=0"], "threads=0 must be a positive whole number or null"),  # was silently ignored
    (["recipe=resnet_fused_amp", "data.batch_size=-4"], "data.batch_size=-4 must be a positive whole number"),
    (["trainer.val_check_interval=0"], "trainer.val_check_interval=0 must be a number of training batches >= 1"),
    (["trainer.val_check_interval=1.5"], "trainer.val_check_interval=1.5 must be a number of training batches "
     ">= 1 or a fraction of an epoch in (0, 1] with trainer.check_val_every_n_epoch=1"),
    # Lightning's MisconfigurationException: no fraction of an epoch with check_val_every_n_epoch=null (the default).
    (["trainer.val_check_interval=0.5"], "trainer.val_check_interval=0.5 is a fraction of an epoch, which Lightning "
     "refuses with trainer.check_val_every_n_epoch=null (validations counted in batches across epochs); set "
     "trainer.check_val_every_n_epoch=1 to validate every 0.5 of an epoch, or give trainer.val_check_interval a "
     "number of training batches"),
    (["trainer.val_check_interval=1.5", "trainer.check_val_every_n_epoch=1"],
     "trainer.val_check_interval=1.5 must be a number of training batches >= 1 or a fraction of an epoch in (0, 1]"),
    # Lightning skipped these fits and the run said ok, 0 steps.
    (["trainer.max_steps=-1", "trainer.max_epochs=0"], "trainer.max_epochs=0 must be a whole number of epochs >= 1, "
     "or -1 or null for no epoch limit"),
    # The README's trainer.limit_train_batches=0 failed in Hydra as "Key 'limit_train_batches' is not in struct".
    (["trainer.limit_train_batches=0"], "trainer.limit_train_batches=0 trains no batch; give a number of batches"),
    (["trainer.limit_train_batches=0.0"], "trainer.limit_train_batches=0.0 trains no batch"),
    # torch's "Trying to create tensor with negative dimension -5", a ring's message naming num_workers.
    (["recipe=bert_split", "data.train_size=-5"], "data.train_size=-5 must be a positive whole number"),
    (["recipe=bert_split", "data.val_size=-3"], "data.val_size=-3 must be a positive whole number (or 0 with "
     "trainer.limit_val_batches=0, which trains without validation)"),
    (["recipe=longseq_ringbuffer", "data.train_size=-5"], "data.train_size=-5 must be a positive whole number"),
    (["recipe=resnet_fused_amp", "data.val_size=0"], "data.val_size=0 must be a positive whole number"),
    (["recipe=bert_split", "data.producers=0"], "data.producers=0 must be a positive whole number"),
    (["recipe=longseq_ringbuffer", "data.num_slots=1"], "data.num_slots=1 must be a whole number >= 2"),
    # A ZeroDivisionError in the task, a loader's message, a TypeError about slice indices.
    (["trainer.accumulate_grad_batches=0"], "trainer.accumulate_grad_batches=0 must be a positive whole number"),
    (["trainer.accumulate_grad_batches=-1"], "trainer.accumulate_grad_batches=-1 must be a positive whole number"),
    (["trainer.accumulate_grad_batches=2.5"], "trainer.accumulate_grad_batches=2.5 must be a positive whole number"),
    # Validations on a clock start inside accumulation windows (those counted in batches: _WindowCheck).
    (["trainer.val_check_interval='00:00:05:00'", "trainer.accumulate_grad_batches=2"],
     "trainer.val_check_interval='00:00:05:00' validates on a clock, after whichever batch is running"),
    (["+trainer.strategy=ddp_spawn"], "trainer.strategy=ddp_spawn trains in processes whose callbacks the run "
     "summary cannot read (it would say 0 steps); use +trainer.strategy=ddp (with trainer.devices=N)"),
    (["recipe=longseq_ringbuffer", "data.path=/nonexistent/corpus.jsonl"],
     "data.path=/nonexistent/corpus.jsonl does not exist"),
    # The sampler's advice was to cut documents into windows, which they were; the recipe's stride was not named.
    (["recipe=longseq_ringbuffer", "data.max_tokens=64"],
     "data.max_tokens=64 is smaller than data.max_len=128: a batch must hold at least one whole sequence"),
    (["recipe=longseq_ringbuffer", "data.max_len=64"], "data.stride=96 must be in [1, data.max_len=64]"),
    # A bare IndexError in the embedding lookup (a device-side assert on a GPU); the loss's "Target 2 is out of
    # bounds"; the accuracy metric's, on labels past its classes.
    (["recipe=bert_split", "model.vocab_size=64"], "model.vocab_size=64 is smaller than data.vocab_size=256"),
    (["recipe=bert_split", "model.num_classes=2"], "model.num_classes=2 differs from data.num_classes=4"),
    (["recipe=resnet_fused_amp", "task.num_classes=4"], "task.num_classes=4 differs from data.num_classes=10"),
    (["compile.dynamic=maybe"], "compile.dynamic='maybe' must be true or false or null"),  # torch's AssertionError
    (["compile.fullgraph=1"], "compile.fullgraph=1 must be true or false"),
    (["backends.strict=no"], "backends.strict='no' must be true or false or null"),  # bool('no'): strict mode on
    # Hydra passes no, off, yes on as strings, which are true: model.fused=no built the fused model.
    (["model.fused=no"], "model.fused='no' must be true or false"),
    (["model.sparse_embeddings=yes"], "model.sparse_embeddings='yes' must be true or false"),
    (["recipe=resnet_fused_amp", "model.channels_last=off"], "model.channels_last='off' must be true or false"),
    (["recipe=resnet_fused_amp", "model.zero_init_residual=0"], "model.zero_init_residual=0 must be true or false"),
    (["trainer.enable_progress_bar=no"], "trainer.enable_progress_bar='no' must be true or false or null"),
    # A config inside a list: the plugin got 'no', which is true.
    (["+trainer.plugins=[{_target_:pytorch_lightning.plugins.environments.SLURMEnvironment,auto_requeue:no}]"],
     "trainer.plugins[0].auto_requeue='no' must be true or false"),
    # A bare TypeError inside Lightning's loop; 1.5 trained 2 steps.
    (["trainer.max_steps=abc"], "trainer.max_steps='abc' must be a whole number of optimizer steps >= 1, or -1"),
    (["trainer.max_steps=1.5"], "trainer.max_steps=1.5 must be a whole number of optimizer steps >= 1, or -1"),
    (["trainer.max_steps=0"], "trainer.max_steps=0 must be a whole number of optimizer steps >= 1, or -1"),
    (["task.lr=abc"], "task.lr='abc' must be a finite number >= 0"),  # a bare TypeError in the optimizer
    (["task.lr=nan"], "task.lr=nan must be a finite number >= 0"),
    (["seed=-1"], "seed=-1 must be a whole number from 0 to 4294967295"),
    # Lightning's Timer stops after whichever batch is running: the final checkpoint lacked the window's gradients.
    (["+trainer.max_time='00:00:05:00'", "trainer.accumulate_grad_batches=2"],
     "trainer.max_time='00:00:05:00' stops the fit on a clock, after whichever batch is running, so with "
     "trainer.accumulate_grad_batches=2 the final validation and checkpoint may come inside an accumulation window"),
    # Arguments a _target_ types as a number, of the wrong type: a comparison inside Lightning, torch.randint's
    # "received an invalid combination of arguments", torch's random_ "expects 'from' to be less than 'to'".
    (["recipe=bert_split", "trainer.log_every_n_steps=abc"], "trainer.log_every_n_steps='abc' must be a whole "
     "number or null"),
    (["recipe=bert_split", "data.signal=abc"], "data.signal='abc' must be a number"),
    (["recipe=bert_split", "data.max_len=64.5"], "data.max_len=64.5 must be a whole number"),
    (["recipe=bert_split", "data.markers_per_class=0"], "data.markers_per_class=0 must be a positive whole number"),
    (["recipe=longseq_ringbuffer", "data.max_doc_len=true"], "data.max_doc_len=True must be a whole number"),
    (["+trainer.gradient_clip_val=abc"], "trainer.gradient_clip_val='abc' must be a number or null"),
    (["recipe=resnet_fused_amp", "data.noise=null"], "data.noise=None must be a number"),
    # A callback switched off with false failed as "'bool' object has no attribute '_target_'".
    (["callbacks.throughput=false"], "callbacks.throughput=False is not a callback's settings; drop the callback "
     "with callbacks.throughput=null"),
    # Read as the list of its characters: "got ['1', '0', '-', '1', '2']"; a fraction as "'float' object is not
    # iterable".
    (["callbacks.profile_steps=10-12"], "callbacks.profile_steps='10-12' must be [first, last] with 0 <= first <= "
     "last, or one step; e.g. callbacks.profile_steps=[10,12]"),
    (["callbacks.profile_steps=10.5"], "callbacks.profile_steps=10.5 must be [first, last]"),
])
def test_settings_a_library_would_fail_on_deep_inside_are_refused_naming_them(overrides, message, tmp_path):
    """Each failed inside torch's sampler, Lightning's loop (ZeroDivisionError) or a tokenizer, after the model was
    built, without naming the setting."""
    cfg = compose_train(*overrides, output_dir=tmp_path)
    with pytest.raises(ValueError, match=re.escape(f"hetrain: {message}")):
        check_config(cfg)
    if overrides == ["threads=0"]:  # and the run itself, which applied threads before its checks
        result = train_py(*overrides, f"hydra.run.dir={tmp_path}/run", cwd=tmp_path, threads=None)
        assert result.returncode != 0 and f"hetrain: {message}" in result.stderr + result.stdout, result.stderr


def test_the_limits_of_the_new_checks_are_accepted(tmp_path):
    for overrides in (["trainer.max_steps=-1", "trainer.max_epochs=1"], ["task.lr=0"], ["task.lr=1"],
                      ["trainer.enable_progress_bar=null"], ["recipe=resnet_fused_amp", "model.fused=false"],
                      ["trainer.val_check_interval=0.5", "trainer.check_val_every_n_epoch=1"],
                      ["trainer.max_steps=-1", "trainer.max_epochs=-1"], ["trainer.limit_train_batches=0.5"],
                      ["data.val_size=0", "trainer.limit_val_batches=0"], ["data.num_slots=2", "data.producers=1"],
                      ["data.loader=torch", "data.producers=0", "data.num_slots=1"],  # the ring's, unused there
                      ["model.vocab_size=512"], ["data.vocab_size=64"], ["callbacks.throughput=null"],
                      ["callbacks.profile_steps=[2,3]"],  # rows to spare; the model following
                      # null where the type allows it, whole numbers for numbers, interpolations
                      ["trainer.log_every_n_steps=null", "model.ffn=null", "model.attention_dropout=null"],
                      ["data.signal=0", "data.distractors=0", "task.weight_decay=0", "+trainer.gradient_clip_val=1"],
                      ["trainer.log_every_n_steps=${trainer.val_check_interval}", "data.max_len=${model.max_len}"],
                      ["+trainer.plugins=[{_target_:pytorch_lightning.plugins.environments.SLURMEnvironment,"
                       "auto_requeue:false}]"],
                      # a corpus (data.path) has no class markers
                      ["recipe=longseq_ringbuffer", f"data.path={ROOT / 'tests'}", "data.markers_per_class=0"]):
        check_config(compose_train(*overrides, output_dir=tmp_path))


def test_the_trainers_default_limit_of_training_batches_is_every_batch(tmp_path):
    """trainer.limit_train_batches is in the trainer config, so the README's override needs no +; null passes
    Lightning's default on, every batch of the epoch."""
    cfg = compose_train("trainer.accelerator=cpu", "trainer.precision=32-true", "trainer.enable_progress_bar=false",
                        output_dir=tmp_path)
    assert cfg.trainer.limit_train_batches is None
    assert hydra.utils.instantiate(cfg.trainer, logger=False).limit_train_batches == 1.0


def test_runs_started_in_the_same_second_get_directories_of_their_own():
    """outputs/<date>/<H-M-S>: two runs started in the same second wrote one directory, their configs, CSV rows,
    checkpoints and summaries mixed; so did two sweeps."""
    register_recipes(ROOT / "recipes")
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        hydra_cfg = compose("train", return_hydra_config=True).hydra
    start = datetime(2025, 5, 1, 12, 30, 45, 1000)
    for mode in ("run", "sweep"):
        pattern = hydra_cfg[mode]._get_node("dir")._value()  # as written, ${now:...} unresolved

        def at(time: datetime, pattern: str = pattern) -> str:
            return re.sub(r"\$\{now:([^}]*)\}", lambda m: time.strftime(m.group(1)), pattern)

        assert at(start) != at(start + timedelta(milliseconds=1)), pattern
    assert hydra_cfg.callbacks.run_directory._target_ == "hetrain.report.RunDirectory"


def _run_config(run_dir: Path, ckpt_path: Path | None = None, output_subdir: str | None = None) -> DictConfig:
    """The part of a single run's config RunDirectory reads."""
    return OmegaConf.create({"hydra": {"run": {"dir": str(run_dir)}, "output_subdir": output_subdir},
                             "ckpt_path": None if ckpt_path is None else str(ckpt_path)})


def _files(directory: Path) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file())


def write_dated(root: Path, names: list[str], when: float) -> None:
    """Writes the files ``names`` under ``root``, dated ``when`` with the folders they make there."""
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(name)
        for made in (path, *path.parents[:len(Path(name).parts) - 1]):
            os.utime(made, (when, when))


def test_a_fresh_run_into_a_used_run_directory_sets_the_earlier_runs_files_aside(tmp_path):
    """A second run into one hydra.run.dir kept the first's best checkpoint beside its own (save_top_k=1 left two),
    and its CSV logger moved the first's csv/ aside as "an earlier part of this run". A run resumed from a
    checkpoint in the directory keeps it as it is."""
    run_dir = tmp_path / "run"
    earlier = [".hydra/config.yaml", "checkpoints/last.ckpt", "checkpoints/step6-acc0.5000.ckpt", "csv/metrics.csv",
               "memory_report.md", "summary.json", "train.log"]
    for name in earlier:
        (run_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (run_dir / name).write_text(name)
    callback = RunDirectory()
    callback.on_run_start(_run_config(run_dir, ckpt_path=run_dir / "checkpoints" / "last.ckpt"))  # resumed in place
    callback.on_run_end(_run_config(run_dir))
    assert _files(run_dir) == sorted([*earlier, RUN_LOCK])

    for k in (1, 2):  # a fresh run, then another
        callback.on_run_start(_run_config(run_dir))
        assert sorted(p.name for p in run_dir.iterdir()) == [RUN_LOCK, *(f"previous-{i}" for i in range(1, k + 1))]
        assert _files(run_dir / f"previous-{k}") == (earlier if k == 1 else ["summary.json"])
        (run_dir / "summary.json").write_text("{}")  # what the fresh run writes
        callback.on_run_end(_run_config(run_dir))
    assert (run_dir / "previous-1" / "checkpoints" / "step6-acc0.5000.ckpt").read_text() == \
        "checkpoints/step6-acc0.5000.ckpt"


def test_a_run_resumed_into_its_own_directory_keeps_each_earlier_parts_config(tmp_path, caplog, monkeypatch):
    """Hydra rewrites .hydra/ after on_run_start: the earlier part's overrides and config were lost, where a sweep's
    job resumed in place kept them as .hydra-part<k>/."""
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)  # files older than this process are not all earlier
    monkeypatch.delenv("SLURM_NTASKS", raising=False)
    run_dir = tmp_path / "run"
    last = run_dir / "checkpoints" / "last.ckpt"
    write_dated(run_dir, [".hydra/overrides.yaml", "checkpoints/last.ckpt", "summary.json"], time.time() - 60)
    for k in (1, 2):
        (run_dir / ".hydra" / "overrides.yaml").write_text(f"- trainer.max_steps={2 * k}\n")  # part k's
        config = _run_config(run_dir, ckpt_path=last, output_subdir=".hydra")
        run = RunDirectory()
        run.on_run_start(config)
        with caplog.at_level(logging.INFO, logger="hetrain.report"):
            run.on_job_start(config)
        run.on_run_end(config)
        assert not (run_dir / ".hydra").exists()  # Hydra writes this part's
        assert (run_dir / f".hydra-part{k}" / "overrides.yaml").read_text() == f"- trainer.max_steps={2 * k}\n"
        assert f"its config is kept in {run_dir / f'.hydra-part{k}'}" in caplog.text
        (run_dir / ".hydra").mkdir()
    assert not list(run_dir.glob("previous-*")) and last.exists()


def test_a_run_into_the_directory_of_a_run_still_running_is_refused(tmp_path):
    """Two runs started in one directory (the same second, or one hydra.run.dir) wrote into each other's files; a
    fresh run would now move the live run's checkpoints aside."""
    run_dir = tmp_path / "run"
    live = RunDirectory()
    live.on_run_start(_run_config(run_dir))
    (run_dir / "checkpoints").mkdir()
    (run_dir / "checkpoints" / "last.ckpt").write_text("live")
    refused = f"hetrain: {run_dir} is the run directory of another run still running (pid {os.getpid()}); give"
    with pytest.raises(SystemExit, match=re.escape(refused)):
        RunDirectory().on_run_start(_run_config(run_dir))
    assert (run_dir / "checkpoints" / "last.ckpt").read_text() == "live"
    live.on_run_end(_run_config(run_dir))
    after = RunDirectory()
    after.on_run_start(_run_config(run_dir))  # once that run has ended, the directory is free
    after.on_run_end(_run_config(run_dir))
    assert _files(run_dir / "previous-1") == ["checkpoints/last.ckpt"]


def test_a_run_leaves_in_place_what_another_rank_torchrun_started_with_it_wrote_first(tmp_path, monkeypatch):
    """torchrun starts the ranks together: rank 1's Hydra had saved .hydra/ and opened train.log in the shared
    hydra.run.dir before rank 0's RunDirectory ran, which took them for an earlier run's and moved them into
    previous-1/, a fresh directory's too; rank 1 then logged into previous-1/train.log."""
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "test")
    rank_1s = [".hydra/config.yaml", "train.log"]
    fresh = tmp_path / "fresh"
    write_dated(fresh, rank_1s, time.time())
    run = RunDirectory()
    run.on_run_start(_run_config(fresh))
    run.on_run_end(_run_config(fresh))
    assert _files(fresh) == sorted([*rank_1s, RUN_LOCK])

    used = tmp_path / "used"  # an earlier run's files, then this run's rank 1's
    earlier = [RUN_LOCK, "checkpoints/last.ckpt", "csv/metrics.csv", "summary.json"]
    write_dated(used, earlier, time.time() - 3600)
    write_dated(used, rank_1s, time.time())
    run.on_run_start(_run_config(used))
    run.on_run_end(_run_config(used))
    assert _files(used / "previous-1") == earlier[1:]
    assert sorted(p.name for p in used.iterdir()) == sorted([".hydra", RUN_LOCK, "previous-1", "train.log"])


RANK_1_FIRST = '''
import os
import time
from pathlib import Path

from hetrain.report import RunDirectory


class Rank1First(RunDirectory):
    """Rank 0 looks at the run directory once rank 1's Hydra has set up its job (saved its config, where it saves
    one), the order in which torchrun's ranks lost the earlier part's config."""

    def on_run_start(self, config, **kwargs):
        started = Path(os.environ["RANK_1_STARTED"])
        if os.environ["RANK"] == "0":
            deadline = time.monotonic() + 120
            while not started.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            started.unlink(missing_ok=True)
        super().on_run_start(config, **kwargs)

    def on_job_start(self, config, **kwargs):
        if os.environ["RANK"] == "1":
            Path(os.environ["RANK_1_STARTED"]).touch()
        super().on_job_start(config, **kwargs)
'''


def test_under_torchrun_a_run_resumed_into_its_own_directory_keeps_each_earlier_parts_config(tmp_path):
    """torchrun starts the ranks together: rank 1's Hydra saved .hydra/ into the shared run directory before rank 0's
    RunDirectory looked, which took it for this run's own and kept no earlier part's: their overrides were lost and
    the .hydra-part<k>/ no longer those of the csv-part<k>/. Rank 1 here always sets up its job first."""
    (tmp_path / "rank_order.py").write_text(RANK_1_FIRST)
    run_dir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env |= {"PYTHONPATH": str(tmp_path), "RANK_1_STARTED": str(tmp_path / "rank_1_started")}
    for part, max_steps in enumerate((2, 4, 6)):  # the run, then two resumes into its directory
        resume = [f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}"] if part else []
        run = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
             str(ROOT / "train.py"), "recipe=bert_split", "trainer.accelerator=cpu", "trainer.devices=2",
             "+trainer.strategy=ddp", f"trainer.max_steps={max_steps}", "trainer.val_check_interval=2",
             "trainer.num_sanity_val_steps=0", "data.train_size=64", "data.val_size=16", "data.loader=torch",
             "model.hidden=32", "threads=1", "callbacks.memory_profiler=null", "callbacks.progress_bar=null",
             f"hydra.run.dir={run_dir}", "hydra.callbacks.run_directory._target_=rank_order.Rank1First", *resume],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
        )
        assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    assert sorted(p.name for p in run_dir.glob("csv-part*")) == ["csv-part1", "csv-part2"]
    configs = {p.name: (p / "overrides.yaml").read_text() for p in run_dir.glob(".hydra*")}
    assert sorted(configs) == [".hydra", ".hydra-part1", ".hydra-part2"]
    for name, max_steps in ((".hydra-part1", 2), (".hydra-part2", 4), (".hydra", 6)):
        assert f"- trainer.max_steps={max_steps}\n" in configs[name], (name, configs[name])


def test_an_earlier_run_that_ended_after_this_process_started_is_set_aside(tmp_path, monkeypatch):
    """Files were told apart by this process's start: a run launched while the earlier one in its directory was
    still ending kept that run's newer files (its checkpoints beside its own) as if they were this run's."""
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    monkeypatch.delenv("SLURM_NTASKS", raising=False)
    run_dir = tmp_path / "run"
    earlier = [RUN_LOCK, ".hydra/config.yaml", "checkpoints/last.ckpt", "summary.json", "train.log"]
    write_dated(run_dir, earlier, time.time() + 60)  # written after this process started
    run = RunDirectory()
    run.on_run_start(_run_config(run_dir))
    run.on_run_end(_run_config(run_dir))
    assert _files(run_dir / "previous-1") == sorted(earlier[1:])


@pytest.mark.parametrize("prefer, names", [("torch", ("torch",)), ("[torch,cpu]", ("torch", "cpu")),
                                           ("[${oc.env:HETRAIN_TEST_PREFER},cpu]", ("torch", "cpu"))])
def test_backends_prefer_reaches_the_plugins_as_written_alone_or_in_a_list(prefer, names, tmp_path, monkeypatch):
    """backends.prefer=torch went through list(): configure was given the backends 't', 'o', 'r', 'c' and 'h', and
    refused 't'; a list's interpolations must still be resolved. The run below fails checking its plan, after the
    backends are configured."""
    monkeypatch.setenv("HETRAIN_TEST_PREFER", "torch")
    try:
        with pytest.raises(ValueError, match="placement entry 'pooler' names no stage"):
            run(compose_train("recipe=bert_split", "+placement.plan.pooler=cpu", f"backends.prefer={prefer}",
                              output_dir=tmp_path))
        assert plugins.preferred() == names
    finally:
        plugins.configure(prefer=())


def test_null_backend_pins_and_preference_leave_a_job_none_of_an_earlier_jobs(tmp_path, monkeypatch):
    """configure() takes None as "leave as is": backends.pins=null and backends.prefer=null kept, for a sweep's later
    job in the same process, the pins and preference an earlier job had set. The runs fail checking their plan,
    after the backends are configured."""
    monkeypatch.delenv("HETRAIN_BACKEND", raising=False)
    monkeypatch.delenv("HETRAIN_PREFER", raising=False)
    bad_plan = ["recipe=bert_split", "+placement.plan.pooler=cpu"]
    try:
        for settings, pin, prefer in [(["+backends.pins.layer_norm=torch", "backends.prefer=[torch]"], "torch",
                                       ("torch",)),
                                      (["backends.pins=null", "backends.prefer=null"], None, ())]:
            with pytest.raises(ValueError, match="placement entry 'pooler' names no stage"):
                run(compose_train(*bad_plan, *settings, output_dir=tmp_path))
            assert (plugins.pinned("layer_norm"), plugins.preferred()) == (pin, prefer), settings
    finally:
        plugins.configure(pins={}, prefer=())


@pytest.mark.parametrize("seed, shown", [("null", "None"), ("abc", "'abc'")])
def test_a_seed_that_is_no_whole_number_fails_the_run_naming_it(seed, shown, tmp_path):
    """seed=abc failed with int()'s bare "invalid literal" in pl.seed_everything, which train() called before build()
    checked the config; seed=null with "manual_seed expected a long, but got NoneType" while the data was built."""
    with pytest.raises(ValueError, match=re.escape(f"hetrain: seed={shown} must be a whole number from 0 to ")):
        run(compose_train(f"seed={seed}", output_dir=tmp_path))
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == "failed"


def test_a_sweeps_later_jobs_still_compile_their_stages(tmp_path):
    """A sweep's jobs build their models in one process: each width's compiled graphs stayed in dynamo's caches, and
    once they reached its recompile limit a later job's stages ran eagerly, its summary saying they compiled. Each
    build starts from empty caches: a later job's entries are its own alone."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    from hetrain.models.bert import EncoderBlock

    ids, mask = torch.randint(1, 64, (2, 8)), torch.ones(2, 8, dtype=torch.bool)
    for hidden in (8, 16):
        parts = build(compose_train("recipe=bert_split", f"model.hidden={hidden}", "model.heads=2",
                                    "compile.enabled=true", "compile.backend=eager", output_dir=tmp_path))
        assert _debug_get_cache_entry_list(EncoderBlock.forward.__code__) == [], hidden  # the last job's are gone
        parts.task(ids, mask).sum().backward()
        assert _debug_get_cache_entry_list(EncoderBlock.forward.__code__), hidden
        counts = compile_counts(since=parts.counts_before_compile)
        assert counts["graphs"] >= 2 and counts["eager_frames"] == 0, (hidden, counts)


def test_resuming_a_checkpoint_already_at_max_steps_fails_naming_the_fix(tmp_path):
    """Lightning skipped the whole fit, callbacks included: the run said ok with no metrics, stages or 'resumed'."""
    settings = ["recipe=bert_split", "data.loader=torch", "data.train_size=32", "data.val_size=16", "model.hidden=16",
                "trainer.max_steps=1", "trainer.val_check_interval=1", "trainer.num_sanity_val_steps=0",
                "trainer.enable_progress_bar=false", "callbacks.memory_profiler=null"]
    run(compose_train(*settings, output_dir=tmp_path / "a"))
    ckpt = tmp_path / "a" / "checkpoints" / "last.ckpt"
    with pytest.raises(ValueError, match=re.escape(
            f"hetrain: ckpt_path={ckpt} is already at step 1 >= trainer.max_steps=1, so there is nothing left to "
            "train; raise trainer.max_steps")):
        run(compose_train(*settings, f"ckpt_path={ckpt}", output_dir=tmp_path / "b"))
    summary = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert summary["status"] == "failed" and "is already at step 1" in summary["error"]


# Two epochs of 2 batches, each batch validated and saved (last.ckpt and step<k>-acc<a>.ckpt).
TWO_EPOCHS = ["recipe=bert_split", "data.loader=torch", "data.train_size=32", "data.batch_size=16", "data.val_size=16",
              "model.hidden=16", "trainer.val_check_interval=1", "trainer.num_sanity_val_steps=0",
              "trainer.enable_progress_bar=false", "callbacks.memory_profiler=null",
              "callbacks.model_checkpoint.save_top_k=-1", "trainer.max_steps=-1", "trainer.max_epochs=2"]


@pytest.fixture(scope="module")
def two_epochs_checkpoints(tmp_path_factory) -> Path:
    """The checkpoint folder of a finished :data:`TWO_EPOCHS` run."""
    directory = tmp_path_factory.mktemp("two_epochs")
    run(compose_train(*TWO_EPOCHS, output_dir=directory))
    return directory / "checkpoints"


@pytest.mark.parametrize("max_steps", [-1, 100])  # no step limit; one the epoch limit comes before
def test_resuming_a_checkpoint_past_its_last_epoch_fails_naming_the_fix(tmp_path, two_epochs_checkpoints, max_steps):
    """Lightning skipped the whole fit: the run said ok, its summary without metrics, its memory report emptied."""
    ckpt = two_epochs_checkpoints / "last.ckpt"  # saved in the validation after the last epoch's last batch
    with pytest.raises(ValueError, match=re.escape(
            f"hetrain: ckpt_path={ckpt} has already trained 2 epochs >= trainer.max_epochs=2, so there is nothing "
            "left to train; raise trainer.max_epochs to the epoch count the resumed run should end at, e.g. "
            "trainer.max_epochs=4")):
        run(compose_train(*TWO_EPOCHS, f"trainer.max_steps={max_steps}", f"ckpt_path={ckpt}", output_dir=tmp_path))
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "failed" and "has already trained 2 epochs" in summary["error"]


def test_resuming_a_checkpoint_of_the_last_epochs_middle_trains_the_rest_of_it(tmp_path, two_epochs_checkpoints):
    """Not refused as past its last epoch: the epoch's second batch is still to train."""
    middle = next(two_epochs_checkpoints.glob("step3-*.ckpt"))  # the last epoch's first batch
    run(compose_train(*TWO_EPOCHS, f"ckpt_path={middle}", output_dir=tmp_path))
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "ok" and summary["steps"] == 4 and summary["metrics"]


@pytest.mark.parametrize("overrides", [
    ["trainer.max_steps=-1", "trainer.max_epochs=1"],  # ends at the epoch's last batch: no validation is added there
    ["trainer.max_steps=3", "trainer.limit_val_batches=0"],
])
def test_a_run_that_never_validated_warns_and_its_summary_says_so(tmp_path, caplog, overrides):
    """Such a run saved no checkpoint and reported empty metrics with status ok, and nothing said why."""
    settings = ["recipe=bert_split", "data.loader=torch", "data.train_size=32", "data.val_size=16", "model.hidden=16",
                "trainer.val_check_interval=100", "trainer.num_sanity_val_steps=0", "trainer.enable_progress_bar=false",
                "callbacks.memory_profiler=null", *overrides]
    with caplog.at_level(logging.WARNING, logger="hetrain.train"):
        run(compose_train(*settings, output_dir=tmp_path))
    summary = json.loads((tmp_path / "summary.json").read_text())
    steps = summary["steps"]
    assert summary["status"] == "ok" and steps > 0 and summary["metrics"] == {}
    assert summary["no_validation"] == (f"no validation ran up to step {steps}: no metrics, and no checkpoint was "
                                        "written")
    assert not (tmp_path / "checkpoints").exists()
    assert f"hetrain: the fit trained to step {steps} without validating once (trainer.val_check_interval=100" in \
        caplog.text and "trainer.limit_val_batches=" in caplog.text


@pytest.mark.parametrize("signal_name, code", [("SIGINT", 130), ("SIGTERM", 143)])
def test_a_stopped_runs_summary_names_the_checkpoint_and_counts_its_steps_and_samples(tmp_path, signal_name, code):
    """Ctrl-C's summary had no error naming the checkpoint to go on from; SIGTERM's had neither steps nor samples."""
    cfg = compose_train("recipe=bert_split", "data.loader=torch", "data.train_size=64", "data.val_size=16",
                        "model.hidden=16", "trainer.max_steps=6", "trainer.val_check_interval=100",
                        "trainer.num_sanity_val_steps=0", "trainer.enable_progress_bar=false",
                        "callbacks.memory_profiler=null", "+callbacks.ctrl_c._target_=tests.fixtures.ctrl_c.CtrlCAt",
                        "+callbacks.ctrl_c.steps=[1]", f"+callbacks.ctrl_c.signal_name={signal_name}",
                        output_dir=tmp_path)
    with pytest.raises(SystemExit) as stopped:
        run(cfg)
    assert stopped.value.code == code
    summary = json.loads((tmp_path / "summary.json").read_text())
    checkpoint = tmp_path / "checkpoints" / "interrupted.ckpt"
    assert summary["status"] == "interrupted" and checkpoint.is_file()
    assert summary["error"] == f"{signal_name} after 2 steps; go on with ckpt_path={checkpoint}"
    assert summary["steps"] == 2 and summary["samples"] > 0


def _stopped_summary(run_dir: Path, *signal_at: str) -> dict:
    """The summary of a small run that ``signal_at`` (a callback's overrides) stops, after it exited as a stop does."""
    cfg = compose_train("recipe=bert_split", "data.loader=torch", "data.train_size=64", "data.val_size=16",
                        "data.batch_size=4", "model.hidden=16", "trainer.max_steps=6", "trainer.val_check_interval=2",
                        "trainer.num_sanity_val_steps=0", "trainer.enable_progress_bar=false",
                        "callbacks.memory_profiler=null", *signal_at, output_dir=run_dir)
    with pytest.raises(SystemExit):
        run(cfg)
    return json.loads((run_dir / "summary.json").read_text())


@pytest.mark.parametrize("where", ["step", "validation"])
def test_a_sigterm_stops_summary_has_the_measurements_of_a_ctrl_c_stops(tmp_path, where):
    """GracefulStop ends a SIGTERM stop (and any stop during a validation) by an exception, which skips the training's
    closing hooks and train()'s summary: it held the steps and samples alone, no samples/s, peak memory, stages nor
    precision."""
    ctrl_c = ["+callbacks.ctrl_c._target_=tests.fixtures.ctrl_c.CtrlCAt", "+callbacks.ctrl_c.steps=[1]"]
    paused = _stopped_summary(tmp_path / "ctrl_c", *ctrl_c)
    sigterm = [*ctrl_c, "+callbacks.ctrl_c.signal_name=SIGTERM"] if where == "step" else [
        "+callbacks.sigterm._target_=tests.fixtures.signal_in.SignalIn", "+callbacks.sigterm.phase=validation",
        "+callbacks.sigterm.step=2"]
    preempted = _stopped_summary(tmp_path / "sigterm", *sigterm)
    assert preempted["graceful_stop"]["signal"] == "SIGTERM" and preempted["steps"] == paused["steps"] == 2
    assert sorted(preempted) == sorted(paused)
    assert preempted["samples_per_s"] > 0 and preempted["train_time_s"] > 0 and preempted["peak_memory_mib"]
    assert preempted["stages"] == paused["stages"] != {} and preempted["precision"] == paused["precision"]
    assert preempted["throughput"]["batches_timed"] >= 1


def test_a_stop_during_a_validation_gives_no_advice_on_where_a_run_ends(tmp_path, caplog):
    """The recorder's warning that a run ended past its last validation (end it on a batch that validates) was given
    for a signal's stop, whose checkpoint is of the step it stopped at."""
    with caplog.at_level(logging.WARNING):
        summary = _stopped_summary(tmp_path, "+callbacks.sigterm._target_=tests.fixtures.signal_in.SignalIn",
                                   "+callbacks.sigterm.phase=validation", "+callbacks.sigterm.step=4")
    assert summary["graceful_stop"]["at_step"] == 4 and summary["metrics_at_step"] == 2  # the summary still says
    assert "after its last validation" not in caplog.text


@pytest.mark.parametrize("again", ["epoch_end", "train_end"])
def test_a_second_ctrl_c_before_the_fit_closed_its_measurements_keeps_the_progress_alone(tmp_path, again):
    """The second press ends the fit (KeyboardInterrupt) before or inside its closing hooks: the summary took the
    unclosed measurements, a training time of 0.0 and no stages."""
    summary = _stopped_summary(tmp_path, "+callbacks.twice._target_=tests.fixtures.ctrl_c.CtrlCTwice",
                               "+callbacks.twice.step=2", f"+callbacks.twice.again={again}")
    assert summary["status"] == "interrupted" and summary["steps"] == 3 and summary["samples"] > 0
    assert "train_time_s" not in summary and "stages" not in summary


class _SigtermIn(pl.Callback):
    """Sends SIGTERM to this process before training starts: when built (``"build"``, in build(), before the fit) or
    in its setup hook (``"setup"``, inside the fit beside the data's setup, before Lightning's handler is in place);
    or after the fit, when train() reads the callbacks' summaries (``"summary"``); ``"none"`` sends nothing."""

    def __init__(self, where: str) -> None:
        self.where = where
        if where == "build":
            os.kill(os.getpid(), signal.SIGTERM)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.where == "setup":
            os.kill(os.getpid(), signal.SIGTERM)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.where == "fit_end":
            os.kill(os.getpid(), signal.SIGTERM)

    @property
    def summary(self) -> dict | None:
        if self.where != "summary":
            return None
        os.kill(os.getpid(), signal.SIGTERM)
        return {}


@pytest.mark.parametrize("where", ["build", "setup"])
def test_a_sigterm_before_training_ends_the_run_with_its_summary_and_143(tmp_path, where):
    """Python's default handler was in charge until Lightning's: the process died at once, exit 143 with no summary.
    The handler in place before run() stands in for it here (raising, so this process lives); run() restores it."""

    def default(signum, frame):
        raise RuntimeError("SIGTERM reached the handler in place before run()")

    cfg = compose_train("recipe=bert_split", "data.train_size=32", "data.val_size=16", "model.hidden=16",
                        "trainer.max_steps=1", "trainer.enable_progress_bar=false", "callbacks.memory_profiler=null",
                        f"+callbacks.sigterm._target_={__name__}.{_SigtermIn.__qualname__}",
                        f"+callbacks.sigterm.where={where}", output_dir=tmp_path)
    previous = signal.signal(signal.SIGTERM, default)
    try:
        with pytest.raises(SystemExit) as stopped:
            run(cfg)
        assert signal.getsignal(signal.SIGTERM) is default
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert stopped.value.code == 143
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert (summary["status"], summary["error"]) == (
        "interrupted", "SIGTERM before the first training step: nothing trained, nothing saved")


class _FailInSummaryOnRank(pl.Callback):
    """Raises on rank ``rank`` when train() reads the callbacks' summaries, after the fit returned."""

    def __init__(self, rank: int) -> None:
        self.rank = rank

    @property
    def summary(self) -> None:
        if self.rank == rank_zero_only.rank:
            raise RuntimeError(f"failure injected on rank {self.rank} after the fit")


def _sigterm_then(fn):
    def sigterm_first(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return fn(*args, **kwargs)

    return sigterm_first


@pytest.mark.parametrize("where", ["fit_end", "best_checkpoint", "loader_summary", "callback_summary",
                                   "missing_metric"])
def test_a_sigterm_after_the_fit_writes_the_whole_summary_marked_interrupted_and_exits_143(tmp_path, monkeypatch,
                                                                                           where):
    """Raised from run()'s handler, the SIGTERM cut the summary short: after the fit's own summary it said "before
    the first training step" with no steps, and in run()'s tail (the missing metric's check) none was written."""
    import hetrain.train as train_module
    from hetrain.data.datamodule import RingDataModule

    if where == "best_checkpoint":
        monkeypatch.setattr(train_module, "_best_checkpoint", _sigterm_then(train_module._best_checkpoint))
    elif where == "loader_summary":
        monkeypatch.setattr(RingDataModule, "loader_summary", _sigterm_then(RingDataModule.loader_summary))
    elif where == "missing_metric":
        monkeypatch.setattr(train_module, "_missing_metric", _sigterm_then(train_module._missing_metric))
    sigterm_in = {"callback_summary": "summary", "fit_end": "fit_end"}.get(where, "none")
    cfg = compose_train("recipe=bert_split", "data.train_size=32", "data.val_size=16", "model.hidden=16",
                        "trainer.max_steps=2", "trainer.enable_progress_bar=false", "callbacks.memory_profiler=null",
                        f"+callbacks.sigterm._target_={__name__}.{_SigtermIn.__qualname__}",
                        f"+callbacks.sigterm.where={sigterm_in}", output_dir=tmp_path)
    with pytest.raises(SystemExit) as stopped:
        run(cfg)
    assert stopped.value.code == 143
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert (summary["status"], summary["error"], summary["steps"]) == (
        "interrupted", "SIGTERM after training finished: the summary is complete, the run ends here (exit 143)", 2)
    assert "data" in summary and "cpu_malloc" in summary  # the summary train() builds after the fit, whole


class _SigtermThenFail(pl.Callback):
    """Sends SIGTERM, then fails, when train() reads the callbacks' summaries after the fit."""

    @property
    def summary(self) -> None:
        os.kill(os.getpid(), signal.SIGTERM)
        raise RuntimeError("summary failed after the SIGTERM")


def test_a_sigterm_after_the_fit_still_ends_the_run_143_when_a_failure_follows(tmp_path):
    """Recorded after the fit, the SIGTERM was lost when the summary then failed: the run exited 1 (a sweep went on
    to its next job) where the scheduler's signal asked it to end, 143."""
    cfg = compose_train("recipe=bert_split", "data.train_size=32", "data.val_size=16", "model.hidden=16",
                        "trainer.max_steps=2", "trainer.enable_progress_bar=false", "callbacks.memory_profiler=null",
                        f"+callbacks.late._target_={__name__}.{_SigtermThenFail.__qualname__}", output_dir=tmp_path)
    with pytest.raises(SystemExit) as stopped:
        run(cfg)
    assert stopped.value.code == 143
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert (summary["status"], summary["error"]) == ("failed", "RuntimeError: summary failed after the SIGTERM")


class _FailInBuildOnRank(pl.Callback):
    """Raises on rank ``rank`` when built (in build(), before the fit): a failure on one rank alone."""

    def __init__(self, rank: int) -> None:
        if rank == rank_zero_only.rank:
            raise RuntimeError(f"failure injected on rank {rank} in build")


def test_a_fit_that_fails_closes_its_ring_loaders(tmp_path):
    """Lightning calls no datamodule teardown when the fit raises: the ring's producer threads and slots lived on,
    into a sweep's next job, until the garbage collector found them (not called here)."""
    cfg = compose_train("recipe=bert_split", "data.loader=ring", "data.producers=1", "data.train_size=64",
                        "data.val_size=16", "model.hidden=16", "trainer.max_steps=4",
                        "trainer.num_sanity_val_steps=0", "trainer.enable_progress_bar=false",
                        "callbacks.memory_profiler=null", "+callbacks.fail_at._target_=tests.fixtures.fail_at.FailAt",
                        "+callbacks.fail_at.step=1", "+callbacks.fail_at.rank=0", output_dir=tmp_path)
    with pytest.raises(RuntimeError, match="failure injected on rank 0 at step 1") as failed:
        run(cfg)
    producers = [t.name for t in threading.enumerate() if t.name.startswith("hetrain-ring-producer")]
    assert producers == [], f"{producers} outlived the failed fit ({failed.value})"


class _Linear(pl.LightningModule):
    """The least a fit needs: what is checked here is when Lightning steps and validates."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).sum()

    def validation_step(self, batch, batch_idx) -> None:
        pass

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class _WindowProbe(pl.Callback):
    """The check's verdict at train start, and whether each validation started with gradients not yet applied."""

    def __init__(self) -> None:
        self.verdict: str | None = None
        self.pending: list[bool] = []

    def on_train_start(self, trainer, pl_module) -> None:
        self.verdict = _validation_inside_window(trainer)

    def on_validation_start(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:  # Lightning sets a gradient to None at each step
            self.pending.append(any(p.grad is not None for p in pl_module.parameters()))


class _Stream(IterableDataset):
    def __iter__(self):
        return iter([(torch.ones(1, 2),)] * 8)


@pytest.mark.parametrize("accumulate, cases", [
    (2, [  # (batches an epoch, val_check_interval, check_val_every_n_epoch, max_steps)
        (3, 2, None, 9),  # an epoch's short last window shifts later validations into windows
        (3, 2, None, 2),  # the fit ends before the first such validation
        (3, 3, None, 9), (3, 6, None, 9),  # every validation at an epoch's end: safe though not a multiple of 2
        (3, 4, None, 9), (4, 2, None, 9), (4, 3, None, 9), (2, 3, None, 9),
        (4, 0.25, 1, 9),  # a fraction of an epoch was not checked at all
        (4, 0.5, 1, 9), (3, 0.5, 1, 9), (3, 1.0, 1, 9), (3, 2, 1, 9),
        (None, 3, None, 9), (None, 2, None, 9),  # a loader without a length
    ]),
    (3, [(5, 3, 1, 9), (5, 2, 2, 2), (5, 2, 2, 9),  # check_val_every_n_epoch=2: epoch 0 does not validate
         (5, 6, None, 2), (5, 6, None, 9), (6, 0.5, 1, 9), (2, 2, None, 9), (2, 3, None, 9)]),
])
def test_a_validation_inside_an_accumulation_window_is_found_where_lightning_runs_one(accumulate, cases):
    """The check refuses exactly the fits in which Lightning would validate, and save, with gradients pending."""
    refused = []
    for batches, every, epochs_apart, max_steps in cases:
        loader = DataLoader(TensorDataset(torch.ones(batches, 2)), batch_size=1) if batches else \
            DataLoader(_Stream(), batch_size=None)
        probe = _WindowProbe()
        trainer = pl.Trainer(accelerator="cpu", max_steps=max_steps, accumulate_grad_batches=accumulate,
                             val_check_interval=every, check_val_every_n_epoch=epochs_apart, logger=False,
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                             num_sanity_val_steps=0, callbacks=[probe])
        trainer.fit(_Linear(), train_dataloaders=loader, val_dataloaders=DataLoader(TensorDataset(torch.ones(1, 2))))
        assert (probe.verdict is not None) == any(probe.pending), (batches, every, epochs_apart, probe.pending)
        refused.append(probe.verdict is not None)
    assert any(refused) and not all(refused)


def test_a_run_that_would_validate_inside_an_accumulation_window_fails_naming_the_settings(tmp_path):
    """An epoch of 3 batches with accumulate_grad_batches=2: the validation after epoch 1's first batch, and its
    checkpoint, came with a batch's gradients pending; a run resumed from it trained differently."""
    cfg = compose_train("recipe=bert_split", "data.train_size=96", "data.val_size=16", "model.hidden=16",
                        "trainer.max_steps=6", "trainer.accumulate_grad_batches=2", "trainer.val_check_interval=2",
                        "trainer.enable_progress_bar=false", "callbacks.memory_profiler=null",
                        output_dir=tmp_path)
    with pytest.raises(ValueError, match=re.escape(
            "hetrain: trainer.val_check_interval=2 with trainer.accumulate_grad_batches=2 would validate inside an "
            "accumulation window: trainer.check_val_every_n_epoch=null counts batches across epochs, and an epoch's "
            "3 training batches are not a multiple of 2 (its last window is short), so the validation after "
            "batch_idx 0 of epoch 1 comes with the gradients of 1 of the window's 2 batches not yet applied, which a "
            "resume from the checkpoint saved there loses. Set trainer.val_check_interval to a multiple of 3")):
        run(cfg)
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == "failed"
    assert not list(tmp_path.rglob("*.ckpt"))


class _NoTrainingBatch(pl.LightningDataModule):
    """Data whose training loader is empty, as one that drops an incomplete last batch larger than the data was."""

    def __init__(self, **settings) -> None:
        super().__init__()

    def train_dataloader(self) -> DataLoader:
        return DataLoader([], batch_size=1)

    val_dataloader = train_dataloader


def test_a_run_with_no_training_batch_fails_naming_the_data_settings(tmp_path):
    """Such a run trained nothing and said status ok, steps 0."""
    cfg = compose_train("recipe=resnet_fused_amp", f"data._target_={__name__}.{_NoTrainingBatch.__qualname__}",
                        "data.train_size=64", "data.batch_size=100", "trainer.enable_progress_bar=false",
                        "callbacks.memory_profiler=null", output_dir=tmp_path)
    with pytest.raises(ValueError, match=re.escape(
            "hetrain: the training loader has no batch (data.train_size=64, data.batch_size=100), so nothing was "
            "trained")):
        run(cfg)
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == "failed"


class _StopBeforeTraining(pl.Callback):
    """Stops the fit before its first batch, as a user's callback may: Lightning then skips the whole fit."""

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        trainer.should_stop = True


def test_a_fit_that_trains_no_step_fails_the_run_naming_the_limits(tmp_path):
    """Lightning skipped the fit (as it does at max_epochs=0 or limit_train_batches=0) and the run said ok, 0 steps."""
    cfg = compose_train("recipe=bert_split", "data.loader=torch", "data.train_size=32", "data.val_size=16",
                        "model.hidden=16", "trainer.max_steps=2", "trainer.val_check_interval=1",
                        "trainer.num_sanity_val_steps=0", "trainer.enable_progress_bar=false",
                        "callbacks.memory_profiler=null",
                        f"+callbacks.stop._target_={__name__}.{_StopBeforeTraining.__qualname__}", output_dir=tmp_path)
    with pytest.raises(ValueError, match=re.escape(
            "hetrain: the fit trained no step (trainer.max_steps=2, trainer.max_epochs=-1, "
            "trainer.limit_train_batches=1.0; at step 0): Lightning skips")):
        run(cfg)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "failed" and "the fit trained no step" in summary["error"]


def test_threads_apply_to_their_own_run_only(tmp_path):
    """A sweep's job with threads=1 left torch at one thread for the next job, whose threads=null means torch's
    default."""
    before = torch.get_num_threads()
    torch.set_num_threads(before + 1)  # a count the run's threads=1 differs from
    try:
        cfg = compose_train("recipe=bert_split", "threads=1", "data.train_size=64", "data.val_size=16",
                            "model.hidden=16", "trainer.max_steps=1", "trainer.val_check_interval=1",
                            "trainer.enable_progress_bar=false", "callbacks.memory_profiler=null",
                            output_dir=tmp_path)
        run(cfg)
        assert json.loads((tmp_path / "summary.json").read_text())["status"] == "ok"
        assert torch.get_num_threads() == before + 1
    finally:
        torch.set_num_threads(before)


def test_a_checkpoint_monitoring_a_loss_with_mode_max_is_refused_naming_the_fix(tmp_path):
    """``monitor=val/loss`` alone kept the accuracy's ``mode: max``: the highest loss, the worst weights, was kept."""
    with pytest.raises(ValueError, match=re.escape(
            "hetrain: callbacks.model_checkpoint.monitor=val/loss is a loss, lower is better, but "
            "callbacks.model_checkpoint.mode=max counts the highest as the best")) as refused:
        check_config(compose_train("callbacks.model_checkpoint.monitor=val/loss", output_dir=tmp_path))
    filename = re.search(r'"(callbacks.model_checkpoint.filename=.*?)"', str(refused.value)).group(1)
    cfg = compose_train("callbacks.model_checkpoint.monitor=val/loss", "callbacks.model_checkpoint.mode=min",
                        filename, output_dir=tmp_path)  # the advice, as it is written on a command line
    check_config(cfg)
    assert cfg.callbacks.model_checkpoint.filename == "step{step}-loss{val/loss:.4f}"
    for not_a_loss in ("val/closs_acc", "val/glossary_f1"):  # a name holding "loss" is not always one
        check_config(compose_train(f"callbacks.model_checkpoint.monitor={not_a_loss}", output_dir=tmp_path))


def test_a_plan_from_a_nested_override_or_a_file_is_read_before_the_model_is_built(tmp_path):
    """``+placement.plan.encoder.1=cpu`` reached the device check as a device named {'1': 'cpu'}, and a plan file
    that does not exist failed only once the model was built."""
    cfg = compose_train("recipe=bert_split", "+placement.plan.encoder.1=cpu", output_dir=tmp_path)
    check_config(cfg)  # was: "placement.plan.encoder names device {'1': 'cpu'}, unknown to torch"
    # Embeddings, encoder.1 (Hydra replaced the entry "encoder" with its nested one) and the classifier.
    assert _devices_in_use(cfg)[1:] == ["cpu", "cpu", "cuda"]
    missing = compose_train("recipe=bert_split", f"placement.plan={tmp_path}/nope.yaml", output_dir=tmp_path)
    with pytest.raises(ValueError, match=r"placement plan file .*nope.yaml does not exist"):
        check_config(missing)


def test_an_auto_plan_counts_the_cpu_among_the_devices_precision_auto_chooses_for(tmp_path):
    """The auto solver may put a stage on the CPU: only the GPUs were counted, so on a GPU host precision=auto gave
    plain bf16-mixed and a CPU stage ran in fp32, not under its own device's precision."""
    cfg = compose_train("recipe=bert_auto", output_dir=tmp_path)
    assert "cpu" in _devices_in_use(cfg)[1:]


def test_a_plan_entry_that_names_no_stage_is_refused_before_the_data_is_built(tmp_path):
    """Otherwise it surfaced at fit start, after the datamodule and the trainer were made."""
    cfg = compose_train("recipe=bert_split", "+placement.plan.pooler=cpu", output_dir=tmp_path)
    with pytest.raises(ValueError, match=r"placement entry 'pooler' names no stage .*Fix placement.plan"):
        build(cfg)


@pytest.mark.parametrize("fallback", [
    "meta",
    # Not id "cuda", which conftest skips without a GPU.
    pytest.param("cuda", id="absent", marks=pytest.mark.skipif(torch.cuda.is_available(), reason="it is present")),
])
def test_a_fallback_resolve_plan_refuses_is_named_not_the_plan(tmp_path, fallback):
    """The stages bert_split plans for cuda go to the fallback on a CPU host; a fallback that is absent too, or meta,
    which resolve_plan refuses, was followed by "Fix placement.plan", a setting that was not wrong."""
    cfg = compose_train("recipe=bert_split", f"placement.fallback={fallback}", output_dir=tmp_path)
    with pytest.raises(ValueError, match=r"fallback.*\. Fix placement\.fallback in the recipe or on the command line"):
        build(cfg)


def test_one_profile_step_may_be_given_alone(tmp_path):
    """``callbacks.profile_steps=10`` failed with "'int' object is not iterable"; one step traces that step."""
    parts = build(compose_train("recipe=bert_split", "callbacks.profile_steps=10", output_dir=tmp_path))
    trace = parts.callbacks["step_trace"]
    assert (trace.first, trace.last) == (10, 10)


@pytest.mark.skipif(torch.cuda.is_available(), reason="Lightning changes 16-mixed only on a CPU")
def test_the_precision_logged_is_the_one_the_trainer_runs(tmp_path, caplog):
    """Lightning runs 16-mixed on a CPU as bf16-mixed (no loss scaling); the log said 16-mixed."""
    with caplog.at_level(logging.INFO, logger="hetrain.train"):
        parts = build(compose_train("recipe=bert_split", "trainer.precision=16-mixed", output_dir=tmp_path))
    assert parts.trainer.precision == "bf16-mixed" and "Precision: bf16-mixed" in caplog.text


def test_turning_the_progress_bar_off_leaves_its_callback_out(tmp_path):
    """Lightning refuses a TQDMProgressBar callback with enable_progress_bar=False: the run failed at start."""
    parts = build(compose_train("recipe=bert_split", "trainer.enable_progress_bar=false", output_dir=tmp_path))
    assert "progress_bar" not in parts.callbacks and parts.trainer.progress_bar_callback is None
    assert "progress_bar" in build(compose_train("recipe=bert_split", output_dir=tmp_path)).callbacks


def test_sequences_longer_than_the_position_table_are_refused_before_training(tmp_path):
    """Otherwise the first step fails inside the embedding lookup: 'IndexError: index out of range in self'."""
    cfg = compose_train("recipe=bert_split", "model.max_len=32", output_dir=tmp_path)
    with pytest.raises(ValueError, match="data.max_len=64 is longer than model.max_len=32"):
        build(cfg)


def test_failed_run_logs_one_line_on_the_console_and_its_traceback_in_the_log_file(tmp_path):
    """Hydra prints the traceback on the console once; logged there too, a failure showed it twice."""
    cfg = compose_train("recipe=bert_split", "placement.fallback=cdua", output_dir=tmp_path)
    console = io.StringIO()
    handlers = [logging.StreamHandler(console), logging.FileHandler(tmp_path / "train.log")]
    root = logging.getLogger()
    for handler in handlers:
        root.addHandler(handler)
    try:
        with pytest.raises(ValueError):
            run(cfg)
    finally:
        for handler in handlers:
            root.removeHandler(handler)
            handler.close()
    assert "hetrain: the run failed: ValueError: hetrain: placement.fallback names device 'cdua'" in console.getvalue()
    assert "Traceback" not in console.getvalue()
    assert "Traceback" in (tmp_path / "train.log").read_text()
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == "failed"


class _ExplainedFailure(pl.Callback):
    """Fails when built as hetrain code does on a library's error: an explanation raised from that error."""

    def __init__(self) -> None:
        try:
            {}["step"]
        except KeyError as exc:
            raise ValueError("hetrain: the explanation, naming the setting to change") from exc


def test_a_failure_is_reported_by_hetrains_explanation_not_the_library_error_it_was_raised_from(tmp_path):
    """The summary gave the innermost cause, the library's bare "KeyError: 'step'"; Hydra's "Error in call to
    target" wrapper is still left out."""
    target = f"{__name__}.{_ExplainedFailure.__qualname__}"
    cfg = compose_train("recipe=bert_split", f"+callbacks.explained._target_={target}", output_dir=tmp_path)
    with pytest.raises(InstantiationException, match="Error in call to target"):
        run(cfg)
    error = json.loads((tmp_path / "summary.json").read_text())["error"]
    assert error == "ValueError: hetrain: the explanation, naming the setting to change"


def test_a_collectives_peer_error_is_found_under_an_error_that_wraps_it(tmp_path):
    """Rank 0 reads the other ranks' logs when its failure was a collective's whose peer ended, which may sit under
    an error raised from it: the one reported (the outer) no longer says so."""
    from hetrain.train import _chain_text, _peer_ended

    try:
        try:
            raise RuntimeError("[gloo] Connection closed by peer [127.0.0.1]:29500")
        except RuntimeError as exc:
            raise ValueError("hetrain: the step's gradients were not reduced") from exc
    except ValueError as exc:
        wrapped = exc
    assert not _peer_ended(f"ValueError: {wrapped}") and _peer_ended(_chain_text(wrapped))
    rank0, rank1 = tmp_path / "train.log", tmp_path / "train_ddp_process_1.log"
    rank0.write_text("")
    before = _rank_logs(str(rank0))
    rank1.write_text("hetrain: the run failed: ValueError: rank 1's own; traceback in x\n")
    assert _other_ranks(_chain_text(wrapped), str(rank0), before, wait_s=0) == {rank1.name: "ValueError: rank 1's own"}


def _sweep_rows(sweep: Path) -> list[dict]:
    with open(sweep / "summary.csv") as f:
        return list(csv.DictReader(f))


def test_sweep_writes_one_row_per_job(tmp_path):
    sweep = tmp_path / "sweep"
    result = train_py("-m", "recipe=bert_split", "trainer.max_steps=5", *SMALL, "model.hidden=32,64",
                      f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = _sweep_rows(sweep)
    assert [r["job"] for r in rows] == ["0", "1"]
    assert "model.hidden=32" in rows[0]["overrides"] and "model.hidden=64" in rows[1]["overrides"]
    assert all(r["status"] == "ok" and r["steps"] == "5" and float(r["metrics.val/acc"]) >= 0 for r in rows)
    table = (sweep / "summary.md").read_text().splitlines()
    assert len(table) == 2 + 2 and "samples_per_s" in table[0]
    assert "Sweep summary" in result.stdout


def test_sweep_lists_failed_jobs_with_error_and_log(tmp_path):
    """A failed job keeps its row: error type and the first line of a multi-line message, and its log for the rest."""
    sweep = tmp_path / "sweep"
    # Job 0 adds a callback that parses malformed YAML: a ScannerError whose message spans four lines.
    bad_callback = '+callbacks.parse={_target_:yaml.safe_load,stream:"a: b: c"},null'
    result = train_py("-m", "recipe=bert_split", "trainer.max_steps=5", *SMALL, bad_callback,
                      f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert result.returncode == 1  # the sweep still reports the failure, after running every job
    console = result.stdout + result.stderr
    assert "1 of 2 jobs failed (job 0)" in result.stderr and "Sweep summary" in result.stdout, console[-3000:]
    assert "Traceback" not in console, console[-3000:]  # the traceback is in the job's log, once
    failed, ok = _sweep_rows(sweep)
    headline = "ScannerError: mapping values are not allowed here"
    assert failed["status"] == "failed" and failed["error"] == headline
    log_text = Path(failed["log"]).read_text()
    assert "Traceback" in log_text and "line 1, column 5" in log_text  # the message's later lines
    assert ok["status"] == "ok" and ok["steps"] == "5"
    markdown = (sweep / "summary.md").read_text()
    assert f" {headline} | {failed['log']} |" in markdown and "column 5" not in markdown


@pytest.mark.parametrize("sweep", [False, True])
def test_an_output_dir_apart_from_hydras_directory_is_refused_naming_the_hydra_setting(tmp_path, sweep):
    """output_dir was taken as a setting: the run's checkpoints, CSV log and summary went there, its lock, config and
    log to Hydra's directory; a sweep's jobs all wrote into the one folder, and the table, reading the jobs'
    directories, listed them as killed (no summary) after they had trained. The refused run's summary is Hydra's."""
    elsewhere = tmp_path / "elsewhere"
    hydra_dir, job_dir = ((["-m", f"hydra.sweep.dir={tmp_path}/sweep"], tmp_path / "sweep" / "0") if sweep else
                          ([f"hydra.run.dir={tmp_path}/run"], tmp_path / "run"))
    result = train_py(*hydra_dir, "recipe=bert_split", "data.train_size=128", "data.val_size=32", "model.hidden=32",
                      "trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.num_sanity_val_steps=0",
                      "trainer.enable_progress_bar=false", f"output_dir={elsewhere}", cwd=tmp_path)
    assert result.returncode == 1, result.stderr[-3000:]
    setting = f"hydra.sweep.dir={elsewhere}" if sweep else f"hydra.run.dir={elsewhere}"
    summary = json.loads((job_dir / "summary.json").read_text())
    assert summary["status"] == "failed", summary
    assert summary["error"].startswith(f"ValueError: hetrain: output_dir={elsewhere} is not Hydra's run directory "
                                       f"{job_dir}") and f"set {setting}" in summary["error"], summary["error"]
    assert not elsewhere.exists()
    if sweep:
        assert [row["status"] for row in _sweep_rows(tmp_path / "sweep")] == ["failed"]


def _markdown_table(text: str, first_header: str) -> list[list[str]]:
    """The cells of the Markdown table whose header starts with ``first_header``: header row, then body rows."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header} |"))
    table = [lines[start]]
    for line in lines[start + 2:]:  # past the rule
        if not line.startswith("|"):
            break
        table.append(line)
    return [line[2:-2].split(" | ") for line in table]


def test_sweep_over_seeds_tabulates_mean_and_std_per_combination(tmp_path):
    """A seed sweep's summary.md gives, per combination of the other overrides, each metric's mean ± std over seeds."""
    sweep = tmp_path / "sweep"
    result = train_py("-m", "recipe=bert_split", "trainer.max_steps=2", *SMALL, "seed=0,1", "model.hidden=32,64",
                      f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = _sweep_rows(sweep)
    assert len(jobs) == 4 and all(j["status"] == "ok" for j in jobs)
    metrics = sorted(k for k in jobs[0] if k.startswith("metrics."))
    assert {"metrics.val/acc", "metrics.val/loss"} <= set(metrics)
    header, *rows = _markdown_table((sweep / "summary.md").read_text(), "overrides (seed aside)")
    assert header == ["overrides (seed aside)", "seeds", *metrics]
    combinations = []
    for overrides, seeds, *cells in rows:
        others = overrides.split()
        # The jobs of this combination: the two seeds, as nothing else varies.
        group = [j for j in jobs if [o for o in j["overrides"].split() if not o.startswith("seed=")] == others]
        assert seeds == "2" and len(group) == 2
        for metric, cell in zip(metrics, cells, strict=True):
            values = [float(j[metric]) for j in group]
            assert cell == f"{statistics.mean(values):.4g} ± {statistics.stdev(values):.2g}", (overrides, metric)
        combinations += [o for o in others if o.startswith("model.hidden=")]
    assert combinations == ["model.hidden=32", "model.hidden=64"]


def test_sweep_into_a_reused_directory_lists_only_its_own_jobs(tmp_path):
    """An earlier sweep's jobs in the same directory were listed, averaged over seeds and failed the new sweep."""
    sweep = tmp_path / "sweep"
    # The earlier sweep: three jobs that fail at once (128 hidden units do not split into 3 heads).
    old = train_py("-m", "recipe=bert_split", *SMALL, "seed=0,1,2", "model.heads=3", f"hydra.sweep.dir={sweep}",
                   cwd=tmp_path)
    assert "3 of 3 jobs failed (job 0, 1, 2)" in old.stderr, (old.stdout + old.stderr)[-3000:]
    result = train_py("-m", "recipe=bert_split", "trainer.max_steps=2", *SMALL, "seed=0,1",
                      f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]  # job 2, the earlier sweep's, failed
    rows = _sweep_rows(sweep)
    assert [(r["job"], r["status"], r["steps"]) for r in rows] == [("0", "ok", "2"), ("1", "ok", "2")]
    markdown = (sweep / "summary.md").read_text()
    assert "heads=3" not in markdown
    _, *over_seeds = _markdown_table(markdown, "overrides (seed aside)")
    assert [seeds for _, seeds, *_ in over_seeds] == ["2"]
    # A job that dies before run() writes its summary (a callback that ends the process as it is built), in a reused
    # job directory: not the earlier job's results.
    killed = train_py("-m", "recipe=bert_split", "+callbacks.die={_target_:os._exit,status:1}",
                      f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert killed.returncode == 1
    assert [(r["job"], r["status"]) for r in collect_jobs(sweep)] == [(0, "no summary")]


def test_sweep_summary_aggregates_over_seeds():
    from hetrain.report import seed_table

    records = [
        {"job": 0, "overrides": "model.hidden=64 seed=0", "status": "ok", "metrics.val/acc": 0.8},
        {"job": 1, "overrides": "model.hidden=64 seed=1", "status": "ok", "metrics.val/acc": 0.9},
        {"job": 2, "overrides": "model.hidden=128 seed=0", "status": "ok", "metrics.val/acc": 0.95},
    ]
    header, rows = seed_table(records)
    assert header == ["overrides (seed aside)", "seeds", "metrics.val/acc"]
    # One finished seed shows no spread: n/a, where 0 claimed the seeds agreed.
    assert rows == [["model.hidden=64", 2, "0.85 ± 0.071"], ["model.hidden=128", 1, "0.95 ± n/a"]]
    assert seed_table([{"job": 0, "overrides": "model.hidden=64", "status": "ok"}]) is None
    one_seed = [{"job": i, "overrides": f"seed=3 data.seed={i}", "status": "ok"} for i in range(2)]
    assert seed_table(one_seed) is None  # seed is fixed, not varied (data.seed is another setting)


def test_a_summary_is_written_whole_or_not_at_all_and_a_cut_one_is_listed(tmp_path, monkeypatch):
    """A full disk left an empty summary.json, on which the sweep's table failed (JSONDecodeError) for every job."""
    from hetrain.report import collect_jobs, write_run_summary

    job = tmp_path / "sweep" / "0"
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "hydra.yaml").write_text("hydra:\n  job:\n    num: 0\n    name: train\n")
    (job / ".hydra" / "overrides.yaml").write_text("- seed=0\n")
    write_run_summary({"status": "ok", "steps": 3}, job)
    write_text = Path.write_text

    def disk_full(path, text, *args, **kwargs):
        write_text(path, text[: len(text) // 2], *args, **kwargs)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", disk_full)
    with pytest.raises(OSError, match="No space left"):
        write_run_summary({"status": "ok", "steps": 4}, job)
    monkeypatch.undo()
    assert json.loads((job / "summary.json").read_text())["steps"] == 3  # the whole earlier one
    assert sorted(p.name for p in job.iterdir()) == [".hydra", "summary.json", "summary.md"]  # no partial left
    (job / "summary.json").write_text("")  # as the earlier writer left it
    (record,) = collect_jobs(tmp_path / "sweep")
    assert record["status"] == "no summary" and "summary.json cannot be read (JSONDecodeError" in record["error"]


def test_a_nan_metric_is_written_as_json_and_read_back_as_nan(tmp_path):
    """json.dumps wrote a diverged loss as a bare NaN, which is no JSON: strict parsers (JavaScript's, jq) refused
    summary.json. The sweep's table and the mean over seeds still read it as the number nan."""
    from hetrain.report import collect_jobs, write_run_summary, write_sweep_summary

    for job, loss in enumerate([math.nan, 1.5]):
        job_dir = tmp_path / "sweep" / str(job)
        (job_dir / ".hydra").mkdir(parents=True)
        (job_dir / ".hydra" / "hydra.yaml").write_text(f"hydra:\n  job:\n    num: {job}\n    name: train\n")
        (job_dir / ".hydra" / "overrides.yaml").write_text(f"- seed={job}\n")
        write_run_summary({"status": "ok", "metrics": {"val/loss": loss}, "grad": [math.inf, -math.inf]}, job_dir)

    def refuse(constant):
        raise ValueError(f"{constant} is no JSON")

    text = (tmp_path / "sweep" / "0" / "summary.json").read_text()
    written = json.loads(text, parse_constant=refuse)
    assert written["metrics"] == {"val/loss": "nan"} and written["grad"] == ["inf", "-inf"]
    records = collect_jobs(tmp_path / "sweep")
    assert math.isnan(records[0]["metrics.val/loss"]) and records[1]["metrics.val/loss"] == 1.5
    table = write_sweep_summary(records, tmp_path / "sweep")
    assert "| 0 | seed=0 | ok |  |  | nan |" in table and "| 2 | nan ± nan |" in table
    with open(tmp_path / "sweep" / "summary.csv") as f:
        assert [row["metrics.val/loss"] for row in csv.DictReader(f)] == ["nan", "1.5"]


def test_a_combination_whose_seeds_all_failed_keeps_its_over_seeds_row():
    """It vanished from the table, which then compared only the combinations that worked."""
    from hetrain.report import seed_table

    records = [
        {"job": 0, "overrides": "model.hidden=64 seed=0", "status": "ok", "metrics.val/acc": 0.8},
        {"job": 1, "overrides": "model.heads=3 seed=0", "status": "failed", "error": "ValueError: boom"},
        {"job": 2, "overrides": "model.hidden=64 seed=1", "status": "ok", "metrics.val/acc": 0.9},
        {"job": 3, "overrides": "model.heads=3 seed=1", "status": "no summary", "error": "the job wrote no ..."},
    ]
    header, rows = seed_table(records)
    assert header == ["overrides (seed aside)", "seeds", "metrics.val/acc", "jobs without results"]
    assert rows == [["model.hidden=64", 2, "0.85 ± 0.071", ""], ["model.heads=3", 0, None, "1, 3"]]


def test_an_error_headline_keeps_the_line_a_colon_announces():
    """A resume with other model overrides read ``RuntimeError: Error(s) in loading state_dict for X:`` in the
    sweep table, the line saying what did not match cut off."""
    error = ("RuntimeError: Error(s) in loading state_dict for ClassificationTask:\n\tsize mismatch for "
             "model.embed.weight: copying a param with shape [259, 32] ...\n\tsize mismatch for model.head")
    assert error_headline(error) == ("RuntimeError: Error(s) in loading state_dict for ClassificationTask: size "
                                     "mismatch for model.embed.weight: copying a param with shape [259, 32] ...")
    assert error_headline("ValueError: bad value\nmore detail") == "ValueError: bad value"
    assert error_headline("plain text") == "plain text"


def test_another_ranks_failure_is_read_from_what_its_log_gained_in_this_run(tmp_path):
    # Hydra appends to the log an earlier run left in the run directory: its failure line was taken for this run's.
    rank0, rank1 = tmp_path / "train.log", tmp_path / "train_ddp_process_1.log"
    rank0.write_text("")
    rank1.write_text("hetrain: the run failed: OutOfMemoryError: yesterday's\n")
    before = _rank_logs(str(rank0))
    peer_closed = "RuntimeError: [gloo] Connection closed by peer"
    with rank1.open("a") as f:
        f.write("Resuming from last.ckpt\n")
    assert _other_ranks(peer_closed, str(rank0), before, wait_s=0) == {
        rank1.name: "no failure logged (killed? see the end of the log)"}
    with rank1.open("a") as f:
        f.write("hetrain: the run failed: ValueError: today's; traceback in x\n")
    assert _other_ranks(peer_closed, str(rank0), before, wait_s=0) == {rank1.name: "ValueError: today's"}
    assert _other_ranks("ValueError: our own", str(rank0), before, wait_s=0) == {}
    (tmp_path / "train_ddp_process_2.log").write_text("")  # an earlier run's third rank: this run has two
    before = _rank_logs(str(rank0))
    with rank1.open("a") as f:
        f.write("hetrain: the run failed: ValueError: later\n")
    assert _other_ranks(peer_closed, str(rank0), before, wait_s=0) == {rank1.name: "ValueError: later"}
