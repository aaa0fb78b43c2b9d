"""The main job under Lightning's DDP with 2 CPU processes (gloo): each process runs its own placed, split model."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from hetrain.child_watch import ChildWatch
from hetrain.data import SyntheticDataModule, TokenBudgetBatchSampler
from hetrain.models.bert import BertClassifier
from hetrain.train import _PEER_ENDED

ROOT = Path(__file__).resolve().parent.parent


def run_two_ranks(script: str, tmp_path: Path, *args: str) -> None:
    """Runs ``script`` (which starts a 2-process DDP fit writing into argv[1]) as a user would, in a subprocess."""
    path = tmp_path / "two_ranks.py"
    path.write_text(script)
    run = subprocess.run([sys.executable, str(path), str(tmp_path), *args], cwd=tmp_path, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]


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
    assert output.count("| status | ok |") == 1  # rank 0 alone writes the summary (both raced to before)
    # Samples of both ranks: each trains on its own share of the token-budget batches.
    data = SyntheticDataModule(train_size=512, val_size=64, seed=0)
    data.setup()
    lengths = [len(s) for s in data.train_set.sequences]
    batches = [list(TokenBudgetBatchSampler(lengths, 2048, shuffle=True, seed=0, num_replicas=2, rank=r))[:6]
               for r in range(2)]
    assert summary["samples"] == sum(len(b) for rank in batches for b in rank)
    assert summary["throughput"]["of_ranks"] == "rank 0 of 2"  # its rates are one device's


SEEN_PER_RANK = '''
import json, sys
import pytorch_lightning as pl
import torch
from hetrain.data.datamodule import SyntheticDataModule
from hetrain.models.bert import BertClassifier
from hetrain.models.task import ClassificationTask


class Seen(ClassificationTask):
    """Records each training batch's sample ids as the loader hands it over (the task keeps only inputs)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.ids = []

    def transfer_batch_to_device(self, batch, device, dataloader_idx):
        if self.trainer.training:
            self.ids.append(batch["sample_ids"].tolist())
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def on_train_end(self):
        with open(f"{sys.argv[1]}/seen_rank{self.trainer.global_rank}.json", "w") as f:
            json.dump(self.ids, f)


if __name__ == "__main__":
    torch.set_num_threads(1)
    pl.seed_everything(0)
    data = SyntheticDataModule(vocab_size=64, num_classes=2, min_len=8, max_len=24, train_size=150, val_size=16,
                               max_tokens=160, seed=4)
    model = BertClassifier(vocab_size=64, num_classes=2, hidden=16, layers=1, heads=2, max_len=32)
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=2, limit_val_batches=0,
                         logger=False, enable_progress_bar=False, enable_checkpointing=False,
                         enable_model_summary=False, default_root_dir=sys.argv[1])
    trainer.fit(Seen(model, num_classes=2), datamodule=data)
'''


@pytest.mark.parametrize("rank", [0, 1])
def test_ctrl_c_reaching_one_rank_stops_every_rank_after_the_same_step(tmp_path, rank):
    """Ranks agree each step on whether to stop: rank 0 alone stopping would leave rank 1 waiting in the next
    step's gradient all-reduce for good. A Ctrl-C that reached rank 1 alone was reported as SIGTERM (exit 143)."""
    run = subprocess.run(
        [sys.executable, "train.py", "recipe=bert_split", "trainer.accelerator=cpu", "trainer.devices=2",
         "+trainer.strategy=ddp", "trainer.max_steps=30", "trainer.val_check_interval=30", "data.train_size=512",
         "data.val_size=64", "threads=1", "callbacks.memory_profiler=null", f"hydra.run.dir={tmp_path}",
         "+callbacks.ctrl_c._target_=tests.fixtures.ctrl_c.CtrlCAt", "+callbacks.ctrl_c.steps=[3]",
         f"+callbacks.ctrl_c.rank={rank}"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    output = run.stdout + run.stderr
    assert run.returncode == 130, output[-4000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    checkpoint = tmp_path / "checkpoints" / "interrupted.ckpt"
    assert summary["status"] == "interrupted"
    assert summary["graceful_stop"] == {"at_step": 4, "checkpoint": str(checkpoint), "signal": "SIGINT"}
    assert torch.load(checkpoint, weights_only=True)["global_step"] == 4


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (from /proc: no psutil here)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # ended while listed
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in "ZX"
    except OSError:
        return False


def _wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
    return value


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a rank follows rank 0 through Linux's prctl")
@pytest.mark.parametrize("when", ["rank 1 started hetrain", "rank 1 launched"])
def test_a_rank_ends_when_rank_0_is_ended_before_its_signal_handlers(tmp_path, when):
    """A SIGTERM to rank 0 (as the README asks under DDP) before Lightning's handler was in place ended it at once,
    and left rank 1 waiting 30 minutes for it in the process group's setup; a SIGKILL at any time, the same."""
    rank0 = subprocess.Popen(
        [sys.executable, "train.py", "recipe=bert_split", "trainer.accelerator=cpu", "trainer.devices=2",
         "+trainer.strategy=ddp", "trainer.max_steps=6", "data.train_size=64", "data.val_size=16", "threads=1",
         f"hydra.run.dir={tmp_path}"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        (rank1,) = _wait_for(lambda: _children(rank0.pid), 60, "rank 0 to launch rank 1")
        os.kill(rank0.pid, signal.SIGSTOP)  # held where the fit launched rank 1, before any signal handler
        if when == "rank 1 launched":  # it is gone before rank 1 runs a line of hetrain
            os.kill(rank0.pid, signal.SIGKILL)
        else:
            log = tmp_path / "train_ddp_process_1.log"
            _wait_for(lambda: log.exists() and "Starting training" in log.read_text(), 60, "rank 1 to build its fit")
            os.kill(rank0.pid, signal.SIGTERM)
            os.kill(rank0.pid, signal.SIGCONT)
        # SIGTERM: run()'s handler ends rank 0 with its summary and 143 (128 + SIGTERM)
        assert rank0.wait(timeout=10) in (128 + signal.SIGTERM, -signal.SIGKILL)
        deadline = time.monotonic() + 30
        while _running(rank1) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _running(rank1), f"rank 1 (pid {rank1}) still runs with rank 0 gone"
    finally:
        try:
            os.killpg(rank0.pid, signal.SIGKILL)  # rank 1 too: its process group is rank 0's
        except ProcessLookupError:
            pass


def test_a_run_that_rank_1_ended_names_rank_1s_error_in_the_summary(tmp_path):
    """The summary gave rank 0's error alone, gloo's "Connection closed by peer", which says nothing of the cause."""
    run = subprocess.run(
        [sys.executable, "train.py", "recipe=bert_split", "trainer.accelerator=cpu", "trainer.devices=2",
         "+trainer.strategy=ddp", "trainer.max_steps=6", "data.train_size=64", "data.val_size=16", "threads=1",
         "callbacks.memory_profiler=null", f"hydra.run.dir={tmp_path}",
         "+callbacks.fail_at._target_=tests.fixtures.fail_at.FailAt", "+callbacks.fail_at.step=2",
         "+callbacks.fail_at.rank=1"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert run.returncode != 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "failed" and any(words in summary["error"] for words in _PEER_ENDED), summary
    assert summary["other_ranks"] == {"train_ddp_process_1.log": "RuntimeError: failure injected on rank 1 at step 2"}


def test_ddp_ranks_train_on_disjoint_shares_covering_every_sample_each_epoch(tmp_path):
    run_two_ranks(SEEN_PER_RANK, tmp_path)
    seen = [json.loads((tmp_path / f"seen_rank{r}.json").read_text()) for r in (0, 1)]
    assert len(seen[0]) == len(seen[1]) and len(seen[0]) % 2 == 0  # equal steps on both ranks, two epochs
    per_epoch = len(seen[0]) // 2
    for epoch in range(2):
        shares = [{i for batch in s[epoch * per_epoch:(epoch + 1) * per_epoch] for i in batch} for s in seen]
        counts = [sum(len(batch) for batch in s[epoch * per_epoch:(epoch + 1) * per_epoch]) for s in seen]
        assert not shares[0] & shares[1], "a sample went to both ranks"
        assert shares[0] | shares[1] == set(range(150)) and sum(counts) == 150  # every sample exactly once
    assert seen[0][:per_epoch] != seen[0][per_epoch:]  # the second epoch is shuffled anew


WINDOW_PER_RANK = '''
import sys
import pytorch_lightning as pl
import torch
from hetrain.data.datamodule import SyntheticDataModule
from hetrain.models.bert import BertClassifier
from hetrain.models.task import ClassificationTask


class FirstWindow(ClassificationTask):
    """Saves the initial weights, each rank's first window of batches and the synchronised gradients."""

    def on_train_start(self):
        self.batches = []
        torch.save(self.model.state_dict(), f"{sys.argv[1]}/initial.pt")

    def on_train_batch_start(self, batch, batch_idx):
        if self.trainer.global_step == 0:
            self.batches.append({k: batch[k].clone() for k in ("input_ids", "attention_mask", "labels")})

    def on_before_optimizer_step(self, optimizer):
        if self.trainer.global_step == 0:
            rank = self.trainer.global_rank
            torch.save(self.batches, f"{sys.argv[1]}/batches_rank{rank}.pt")
            torch.save({n: p.grad for n, p in self.model.named_parameters()}, f"{sys.argv[1]}/grads_rank{rank}.pt")


if __name__ == "__main__":
    torch.set_num_threads(1)
    pl.seed_everything(0)
    data = SyntheticDataModule(vocab_size=64, num_classes=2, min_len=4, max_len=40, train_size=120, val_size=16,
                               max_tokens=160, seed=4)
    model = BertClassifier(vocab_size=64, num_classes=2, hidden=16, layers=1, heads=2, max_len=48, dropout=0.0,
                           sparse_embeddings=sys.argv[2] == "sparse")
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=1, accumulate_grad_batches=2,
                         limit_val_batches=0, logger=False, enable_progress_bar=False, enable_checkpointing=False,
                         enable_model_summary=False, default_root_dir=sys.argv[1])
    trainer.fit(FirstWindow(model, num_classes=2), datamodule=data)
'''


@pytest.mark.parametrize("table", ["dense", "sparse"])
def test_ddp_with_accumulation_gives_the_gradient_of_the_mean_over_every_ranks_window(tmp_path, table):
    # With sparse embeddings the token table's gradient is reduced across ranks as a sparse tensor.
    run_two_ranks(WINDOW_PER_RANK, tmp_path, table)
    batches = [b for r in (0, 1) for b in torch.load(tmp_path / f"batches_rank{r}.pt")]
    sizes = [len(b["labels"]) for b in batches]
    assert len(sizes) == 4 and len(set(sizes)) > 1, sizes  # two batches per rank, of unequal size
    model = BertClassifier(vocab_size=64, num_classes=2, hidden=16, layers=1, heads=2, max_len=48, dropout=0.0)
    model.load_state_dict(torch.load(tmp_path / "initial.pt"))
    for b in batches:  # one big batch: the mean over all samples of both ranks' windows
        F.cross_entropy(model(b["input_ids"], b["attention_mask"]), b["labels"], reduction="sum").div(
            sum(sizes)).backward()
    for rank in (0, 1):
        grads = torch.load(tmp_path / f"grads_rank{rank}.pt")
        for name, p in model.named_parameters():
            assert grads[name].is_sparse == (table == "sparse" and name == "embeddings.tokens.weight")
            torch.testing.assert_close(grads[name].to_dense(), p.grad, rtol=1e-4, atol=1e-6,
                                       msg=f"rank {rank}: {name}")


NAN_ON_ONE_RANK = '''
import datetime, json, logging, os, sys
import pytorch_lightning as pl
import torch
from hetrain.callbacks.precision import DeviceMixedPrecision, NonFiniteError, NonFiniteGuard
from hetrain.data.datamodule import SyntheticDataModule
from hetrain.models.bert import BertClassifier
from hetrain.models.task import ClassificationTask


class SyncLogging(ClassificationTask):
    """Logs with sync_dist in every training_step, as many tasks do: a collective a diagnosis's rerun of
    training_step on one rank alone would wait in."""

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.log("train/synced_loss", loss, sync_dist=True)
        return loss


class NanOnOneRank(pl.Callback):
    """Makes the first encoder block of rank argv[2] put out NaN at steps 2 to 4; the other rank's loss stays
    finite."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_rank == int(sys.argv[2]) and 2 <= trainer.global_step <= 4:
            block = pl_module.model.get_submodule("encoder.0")
            self.handle = block.register_forward_hook(lambda module, args, out: out * float("nan"))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if getattr(self, "handle", None) is not None:
            self.handle.remove()
            self.handle = None


if __name__ == "__main__":
    # A log file per rank, as Hydra gives each rank Lightning launches; LOCAL_RANK is set in those alone.
    logging.basicConfig(filename=f"{sys.argv[1]}/rank{os.environ.get('LOCAL_RANK', '0')}.log")
    torch.set_num_threads(1)
    pl.seed_everything(0)
    data = SyntheticDataModule(vocab_size=64, num_classes=2, min_len=4, max_len=40, train_size=400, val_size=16,
                               max_tokens=160, seed=4)
    model = BertClassifier(vocab_size=64, num_classes=2, hidden=16, layers=1, heads=2, max_len=48)
    guard = NonFiniteGuard(max_consecutive=3)
    trainer = pl.Trainer(accelerator="cpu", devices=2, max_steps=8, limit_val_batches=0, logger=False,
                         strategy=pl.strategies.DDPStrategy(timeout=datetime.timedelta(seconds=60)),
                         enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
                         default_root_dir=sys.argv[1], callbacks=[guard, NanOnOneRank()],
                         plugins=[DeviceMixedPrecision({"cpu": "16-mixed"}, root="cpu")])  # a GradScaler
    try:
        trainer.fit(SyncLogging(model, num_classes=2), datamodule=data)
        stopped = None
    except NonFiniteError as exc:
        stopped = trainer.global_step
    with open(f"{sys.argv[1]}/rank{trainer.global_rank}.json", "w") as f:
        json.dump({"stopped_at": stopped, "nonfinite": guard.nonfinite_steps, "diagnosis": guard.diagnosis}, f)
'''


def _nan_on_one_rank(tmp_path: Path, rank: int) -> list[dict]:
    """Runs NAN_ON_ONE_RANK with the NaN on ``rank``; returns each rank's verdict."""
    path = tmp_path / "two_ranks.py"
    path.write_text(NAN_ON_ONE_RANK)
    subprocess.run([sys.executable, str(path), str(tmp_path), str(rank)], cwd=tmp_path, capture_output=True,
                   text=True, timeout=300)
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]


def test_a_nonfinite_loss_on_one_rank_stops_every_rank_under_a_loss_scaler(tmp_path):
    """Rank 1's own loss was finite: it read the reduced non-finite gradients as the scaler's overflow probe,
    counted nothing, and went on into the next all-reduce while rank 0 stopped (gloo: "Connection closed by
    peer"; NCCL would hang)."""
    verdicts = _nan_on_one_rank(tmp_path, 0)
    assert all(v["stopped_at"] == 5 and v["nonfinite"] == 3 for v in verdicts), verdicts


def test_a_nonfinite_loss_on_rank_1_is_diagnosed_by_rank_1_on_every_rank(tmp_path):
    """Rank 0, whose own loss was finite, reran its batch, found nothing and reported the step as "not reproduced
    by a rerun of training_step". No rank reruns under DDP: one rank's training_step alone would wait in its
    collectives (a sync_dist log) for ranks that never join them."""
    verdicts = _nan_on_one_rank(tmp_path, 1)
    assert verdicts[0]["diagnosis"] == verdicts[1]["diagnosis"], verdicts
    assert verdicts[0]["diagnosis"] == (
        f"Rank 1 (log {tmp_path / 'rank1.log'}): First at batch 2 (global step 2): non-finite loss; produced in "
        "forward (the inputs were finite); under DDP no rerun names the module (training_step's collectives would "
        "wait for the other ranks): resume from the last checkpoint with trainer.devices=1 to have it named."), verdicts


VALIDATE_ON_TWO_RANKS = '''
import json, sys
import pytorch_lightning as pl
import torch
from hetrain.data.datamodule import SyntheticDataModule
from hetrain.models.bert import BertClassifier
from hetrain.models.task import ClassificationTask

if __name__ == "__main__":
    torch.set_num_threads(1)
    torch.manual_seed(1)
    model = BertClassifier(vocab_size=64, num_classes=3, hidden=16, layers=1, heads=2, max_len=32, dropout=0.0)
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=sys.argv[1])
    metrics = {}
    for loader in ("ring", "torch"):
        data = SyntheticDataModule(vocab_size=64, num_classes=3, min_len=8, max_len=24, train_size=16, val_size=91,
                                   max_tokens=160, loader=loader, batch_size=16, seed=4)
        (metrics[loader],) = trainer.validate(ClassificationTask(model, num_classes=3), datamodule=data)
    if trainer.global_rank == 0:
        torch.save(model.state_dict(), f"{sys.argv[1]}/model.pt")
        with open(f"{sys.argv[1]}/metrics.json", "w") as f:
            json.dump(metrics, f)
'''


def test_validation_metrics_under_ddp_cover_every_ranks_samples(tmp_path):
    """val/loss was rank 0's own mean (half the samples), then 91/90 of the mean (Lightning averaged the ranks'
    sample counts as integers, truncating the odd total's half under gloo): it is the mean over every sample, as
    one process gives; val/acc the share of samples classified right. With torch's DataLoader (data.loader=torch)
    both counted twice the sample Lightning's DistributedSampler repeated to even out the ranks' shares."""
    run_two_ranks(VALIDATE_ON_TWO_RANKS, tmp_path)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    data = SyntheticDataModule(vocab_size=64, num_classes=3, min_len=8, max_len=24, train_size=16, val_size=91,
                               max_tokens=160, seed=4)
    data.setup()
    model = BertClassifier(vocab_size=64, num_classes=3, hidden=16, layers=1, heads=2, max_len=32, dropout=0.0)
    model.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))
    model.eval()
    losses, right = [], []
    with torch.no_grad():
        for batch in data.val_dataloader():
            logits = model(batch["input_ids"], batch["attention_mask"])
            losses.append(F.cross_entropy(logits, batch["labels"], reduction="none"))
            right.append(logits.argmax(-1) == batch["labels"])
    assert len(torch.cat(losses)) == 91  # odd: the ranks' shares differ
    for loader in ("ring", "torch"):
        assert metrics[loader]["val/loss"] == pytest.approx(torch.cat(losses).mean().item(), rel=1e-5), loader
        assert metrics[loader]["val/acc"] == pytest.approx(torch.cat(right).float().mean().item(), abs=1e-6), loader


FAIL_AT_FIT_END = '''
import pytorch_lightning as pl


class FailAtFitEnd(pl.Callback):
    """Raises on rank 1 after the fit's last collective."""

    def on_fit_end(self, trainer, pl_module):
        if trainer.global_rank == 1:
            raise RuntimeError("failure injected on rank 1 in on_fit_end")
'''


def test_a_failure_on_rank_1_after_the_last_collective_fails_the_run(tmp_path):
    """Rank 0's own outcome alone decided: the summary said ok and train.py exited 0."""
    (tmp_path / "late_failure.py").write_text(FAIL_AT_FIT_END)
    run = subprocess.run(
        [sys.executable, "train.py", "recipe=bert_split", "trainer.accelerator=cpu", "trainer.devices=2",
         "+trainer.strategy=ddp", "trainer.max_steps=2", "trainer.val_check_interval=2", "data.train_size=64",
         "data.val_size=16", "threads=1", "callbacks.memory_profiler=null", "callbacks.progress_bar=null",
         f"hydra.run.dir={tmp_path / 'run'}", "+callbacks.late._target_=late_failure.FailAtFitEnd"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(tmp_path)},
    )
    assert run.returncode == 1, (run.stdout + run.stderr)[-4000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    error = "RuntimeError: failure injected on rank 1 in on_fit_end"
    assert (summary["status"], summary["error"], summary["steps"]) == ("failed", error, 2), summary
    assert summary["other_ranks"] == {"rank 1 (train_ddp_process_1.log)": error}  # under torchrun both log to train.log


@pytest.mark.parametrize(("hook", "fail", "expected"), [
    ("on_exception", ["+callbacks.fail_at._target_=tests.fixtures.fail_at.FailAt", "+callbacks.fail_at.step=1",
                      "+callbacks.fail_at.rank=1"],
     {"train_ddp_process_1.log": "RuntimeError: failure injected on rank 1 at step 1"}),
    ("on_fit_end", ["+callbacks.late._target_=late_failure.FailAtFitEnd"],
     {"rank 1 (train_ddp_process_1.log)": "RuntimeError: failure injected on rank 1 in on_fit_end"}),
])
def test_rank_0_records_rank_1s_failure_however_long_its_fit_takes_to_end(tmp_path, hook, fail, expected):
    """Lightning's observer SIGKILLed rank 0 within 5 s of rank 1 exiting with an error: a rank 0 still in its
    on_exception hooks or its fit's end (a loaded machine, a large checkpoint) left no summary and exited -9."""
    (tmp_path / "late_failure.py").write_text(FAIL_AT_FIT_END)
    run = subprocess.run(
        [sys.executable, "train.py", "recipe=bert_split", "trainer.accelerator=cpu", "trainer.devices=2",
         "+trainer.strategy=ddp", "trainer.max_steps=2", "trainer.val_check_interval=2", "data.train_size=64",
         "data.val_size=16", "threads=1", "callbacks.memory_profiler=null", "callbacks.progress_bar=null",
         f"hydra.run.dir={tmp_path / 'run'}", "+callbacks.slow._target_=tests.fixtures.slow_rank0.Rank0Outlasts",
         f"+callbacks.slow.hook={hook}", *fail],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(tmp_path)},
    )
    assert run.returncode == 1, (run.stdout + run.stderr)[-4000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["other_ranks"] == expected, summary


def _exiting(code: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", f"raise SystemExit({code})"])


@pytest.mark.parametrize("run_ends", [True, False])
def test_the_child_watch_ends_every_rank_once_rank_0_ended_its_run_or_after_its_grace(caplog, run_ends):
    """Sleeping processes stand in for rank 0 and for a rank 2 still running, which the watch may kill."""
    rank0, rank2 = (subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) for _ in range(2))
    ended = threading.Event()
    try:
        watch = ChildWatch([_exiting(3), rank2], rank0.pid, lambda: ended, grace_s=60 if run_ends else 0.5,
                           exit_s=0.1, period_s=0.05)
        watch.start()
        if run_ends:
            _wait_for(lambda: "local rank 1 ended with code 3" in caplog.text, 10, "the watch to see rank 1 end")
            assert rank0.poll() is None and rank2.poll() is None  # rank 0 is recording the failure
            ended.set()
        watch.join(timeout=10)
        assert rank0.wait(timeout=10) == rank2.wait(timeout=10) == -signal.SIGKILL
    finally:
        for process in (rank0, rank2):
            process.kill()
            process.wait()
    said = "rank 0 did not exit within 0 s of ending its run" if run_ends else "rank 0 did not end its run within 0 s"
    assert said in caplog.text


def test_the_child_watch_leaves_rank_0_alone_when_every_rank_exits_0():
    rank0 = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        watch = ChildWatch([_exiting(0), _exiting(0)], rank0.pid, threading.Event, grace_s=0, period_s=0.05)
        watch.start()
        watch.join(timeout=10)
        assert not watch.is_alive() and rank0.poll() is None
    finally:
        rank0.kill()
        rank0.wait()
