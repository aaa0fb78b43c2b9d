"""GracefulStop: Ctrl-C (a real SIGINT to this process) ends the fit after the step in flight, with a checkpoint.

The main job's side (train.py exits 130 with an "interrupted" summary, and resuming from the checkpoint logs what
the uninterrupted run logged) is tested in tests/test_train.py.
"""

import contextlib
import csv
import functools
import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from lightning_fabric.utilities.seed import pl_worker_init_function
from pytorch_lightning.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from hetrain.callbacks import GracefulStop
from hetrain.data.splits import ignore_interrupts_in_workers
from tests.fixtures.ctrl_c import CtrlCAt
from tests.fixtures.signal_in import SignalIn


class Regression(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Linear(6, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(tmp_path, callbacks, accumulate=1, max_steps=20, samples=160, **trainer_args):
    """A fit of 4 samples a batch, ``samples // 4`` batches an epoch."""
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(samples, 6, generator=g), torch.randn(samples, 1, generator=g))
    trainer = pl.Trainer(accelerator="cpu", max_steps=max_steps, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path, callbacks=callbacks,
                         accumulate_grad_batches=accumulate, num_sanity_val_steps=0, **trainer_args)
    trainer.fit(Regression(), DataLoader(data, batch_size=4))
    return trainer


def test_ctrl_c_ends_the_fit_after_the_step_in_flight_with_a_checkpoint_and_gives_the_handler_back(tmp_path):
    before = signal.getsignal(signal.SIGINT)
    stop = GracefulStop()
    trainer = _fit(tmp_path, [stop, CtrlCAt([5]), ModelCheckpoint(dirpath=tmp_path / "checkpoints")])
    assert trainer.global_step == 6  # step 5 ran to its end, none after it
    checkpoint = tmp_path / "checkpoints" / "interrupted.ckpt"
    assert stop.summary == {"at_step": 6, "checkpoint": str(checkpoint), "signal": "SIGINT"}
    assert torch.load(checkpoint, weights_only=True)["global_step"] == 6
    assert signal.getsignal(signal.SIGINT) is before
    # The next fit starts afresh: an earlier Ctrl-C does not stop it.
    again = _fit(tmp_path / "again", [stop], max_steps=8)
    assert again.global_step == 8 and stop.summary == {}


def test_ctrl_c_does_not_wait_for_a_validation_before_it_ends(tmp_path):
    class Validated(Regression):
        validated = 0

        def validation_step(self, batch, batch_idx):
            Validated.validated += 1

    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(160, 6, generator=g), torch.randn(160, 1, generator=g))
    trainer = pl.Trainer(accelerator="cpu", max_steps=20, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path, num_sanity_val_steps=0,
                         callbacks=[GracefulStop(), CtrlCAt([5])])
    trainer.fit(Validated(), DataLoader(data, batch_size=4), DataLoader(data, batch_size=4))
    # Lightning validates when a fit is told to stop: 40 batches here, which a paused run would wait for.
    assert trainer.global_step == 6 and Validated.validated == 0
    assert trainer.limit_val_batches == 1.0  # set back for a later fit


@pytest.mark.parametrize("minimum", [{"min_steps": 15}, {"min_epochs": 2}], ids=["min_steps", "min_epochs"])
def test_ctrl_c_stops_before_min_steps_or_min_epochs_are_met(tmp_path, minimum):
    """Lightning ignores should_stop until min_steps and min_epochs are met: the fit trained on to them with
    validation off, and the summary named a stale checkpoint of step 6."""
    stop = GracefulStop()
    trainer = _fit(tmp_path, [stop, CtrlCAt([5])], samples=40, **minimum)  # 10 batches an epoch
    assert trainer.global_step == 6 and stop.summary["at_step"] == 6
    assert torch.load(stop.summary["checkpoint"], weights_only=True)["global_step"] == 6
    # Set back for a later fit of this Trainer.
    assert all(getattr(trainer.fit_loop, name) == value for name, value in minimum.items())


def test_with_gradient_accumulation_it_stops_at_the_step_that_applies_the_gradients(tmp_path):
    stop = GracefulStop(filename="paused.ckpt")
    # Batches 0-2 are optimizer step 0, 3-5 step 1: Ctrl-C during step 1's first batch stops after batch 5.
    trainer = _fit(tmp_path, [stop, CtrlCAt([1])], accumulate=3)
    assert trainer.global_step == 2 and trainer.fit_loop.epoch_loop.batch_progress.current.completed == 6
    assert stop.summary["checkpoint"] == str(tmp_path / "checkpoints" / "paused.ckpt")  # Lightning's default one


def test_with_gradient_accumulation_an_epochs_last_batch_ends_a_step(tmp_path):
    """Lightning also steps at an epoch's last batch, its window incomplete; GracefulStop took only batches that
    closed a whole window for step ends: the stop came one step late and steps_trained missed those steps."""
    stop = GracefulStop()
    # 10 batches an epoch in windows of 3: batches 0-2, 3-5, 6-8 and 9 alone are steps 0-3.
    trainer = _fit(tmp_path, [stop, CtrlCAt([3])], accumulate=3, samples=40)
    assert trainer.global_step == 4 and stop.summary["at_step"] == 4 and stop.steps_trained == 4
    assert trainer.fit_loop.epoch_loop.batch_progress.current.completed == 10
    whole = GracefulStop()
    _fit(tmp_path / "whole", [whole], accumulate=3, samples=40, max_steps=8)
    assert whole.steps_trained == 8


@pytest.mark.parametrize("signal_name", ["SIGINT", "SIGTERM"])
def test_an_epoch_shorter_than_the_accumulation_window_still_stops(tmp_path, signal_name):
    """Every step ended an epoch there, and none a whole window: Ctrl-C and SIGTERM were ignored, the fit ran on
    to max_steps with nothing saved."""
    stop = GracefulStop()
    # Lightning ends a fit on SIGTERM with SIGTERMException.
    ended = pytest.raises(SystemExit) if signal_name == "SIGTERM" else contextlib.nullcontext()
    with ended:
        _fit(tmp_path, [stop, CtrlCAt([1], signal_name=signal_name)], accumulate=4, max_steps=6, samples=12)
    checkpoint = tmp_path / "checkpoints" / "interrupted.ckpt"
    assert stop.summary == {"at_step": 2, "checkpoint": str(checkpoint), "signal": signal_name}
    assert stop.steps_trained == 2 and torch.load(checkpoint, weights_only=True)["global_step"] == 2


def test_a_second_ctrl_c_stops_at_once_through_lightnings_own_shutdown(tmp_path):
    before = signal.getsignal(signal.SIGINT)
    stop = GracefulStop()
    try:
        with pytest.raises(SystemExit) as exited:  # Lightning ends a KeyboardInterrupt with exit(1)
            _fit(tmp_path, [stop, CtrlCAt([5, 5])])
        assert exited.value.code == 1
        assert stop.summary == {} and not list(tmp_path.rglob("interrupted.ckpt"))
    finally:
        assert signal.getsignal(signal.SIGINT) is before
        signal.signal(signal.SIGINT, before)


# A fit whose loader's processes get the signal too, during step 1 of windows of 8 batches: the stop needs 7 batches
# more than the loader fetched ahead. The loader is hetrain's torch DataLoader with workers (through SeededSplits),
# forked or started by spawn ("torch_spawn"), or a RingLoader with reader processes. The signal comes from a process
# outside the fit, as a terminal's or a scheduler's does (a SIGTERM from the main process itself is its own stop of
# its workers). On SIGTERM the script exits as hetrain.train does after GracefulStop's stop, 143.
GROUP_SIGNAL = """
import json, os, signal, subprocess, sys
import pytorch_lightning as pl, torch
from pytorch_lightning.utilities.exceptions import SIGTERMException
from torch.utils.data import Dataset, TensorDataset
from hetrain.callbacks import GracefulStop
from hetrain.data.ring import PadInto, RingLoader
from hetrain.data.sampler import TokenBudgetBatchSampler
from hetrain.data.splits import SeededSplits

SIGNAL, LOADER = signal.Signals[sys.argv[1]], sys.argv[2]
SEND = "import os, signal, sys; n = int(sys.argv[1]); signal.signal(n, signal.SIG_IGN); os.killpg(os.getpgrp(), n)"

class Regression(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Linear(6, 1)

    def training_step(self, batch, batch_idx):
        x, y = (batch["input_ids"].float(), batch["labels"].float()[:, None]) if LOADER == "ring" else batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

class Data(SeededSplits, pl.LightningDataModule):
    def __init__(self):
        super().__init__()
        self.save_hyperparameters(dict(train_size=96, val_size=8, seed=0, batch_size=4, num_workers=2,
                                       pin_memory=False))

    def _split(self, size, seed):
        return TensorDataset(torch.randn(size, 6), torch.randn(size, 1))

    def train_dataloader(self):
        return self._torch_loader(self.train_set, True, **({"multiprocessing_context": "spawn"}
                                                            if LOADER == "torch_spawn" else {}))

class Samples(Dataset):
    def __len__(self):
        return 96

    def __getitem__(self, i):
        return {"input_ids": torch.arange(6) + i, "label": i % 2}

class SignalToTheGroup(pl.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 8:
            subprocess.run([sys.executable, "-c", SEND, str(int(SIGNAL))], check=True)

if LOADER == "ring":  # 4 samples of 6 tokens a batch, as the DataModule's
    data = RingLoader(Samples(), TokenBudgetBatchSampler([6] * 96, 24, shuffle=False), collate=PadInto(24, 4),
                      num_workers=2, reader_processes=2)
else:
    data = Data()
stop = GracefulStop()
trainer = pl.Trainer(accelerator="cpu", max_steps=3, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, callbacks=[stop, SignalToTheGroup()], accumulate_grad_batches=8,
                     num_sanity_val_steps=0, limit_val_batches=0)
code = 0
try:
    trainer.fit(Regression(), data)
except SIGTERMException:  # how Lightning ends the fit on SIGTERM, once GracefulStop saved its step
    code = 128 + signal.SIGTERM
print(json.dumps({"global_step": trainer.global_step, **stop.summary}))
sys.exit(code)
"""


def _running_in_group(group: int) -> bool:
    """Whether a process of process group ``group`` still runs. One that ended after its parent stays in the group
    until init collects it: multiprocessing's resource tracker, which spawn starts, ends once the fit has; Linux's
    /proc tells it apart."""
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    if not Path("/proc/self/stat").exists():
        return True
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):  # a process that ended meanwhile
            state, _, pgrp = stat.read_text().rsplit(")", 1)[1].split()[:3]
            if int(pgrp) == group and state != "Z":
                return True
    return False


def _signal_the_group(tmp_path: Path, signal_name: str, loader: str) -> tuple[int, dict, str]:
    """Runs GROUP_SIGNAL in a process group of its own: its exit code, what it printed last and its stderr. Checks
    that it left no process of the group behind: the main process stops its loader's processes itself."""
    fit = subprocess.Popen([sys.executable, "-c", GROUP_SIGNAL, signal_name, loader], cwd=tmp_path, text=True,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, process_group=0,
                           env={**os.environ, "PYTHONPATH": str(ROOT)})
    left = True
    try:
        stdout, stderr = fit.communicate(timeout=120)
        left = _running_in_group(fit.pid)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(fit.pid, signal.SIGKILL)
    assert not left, "a process of the fit's group outlived it"
    return fit.returncode, json.loads(stdout.splitlines()[-1]) if stdout.strip() else {}, stderr


@pytest.mark.parametrize("loader", ["torch", "ring"])
def test_a_terminals_ctrl_c_to_the_process_group_leaves_the_loaders_workers_running(tmp_path, loader):
    """A terminal sends Ctrl-C to the whole foreground process group: the DataLoader workers died of it, and the
    stop, which needs more batches to end its step, crashed with "DataLoader worker ... exited unexpectedly"."""
    code, result, stderr = _signal_the_group(tmp_path, "SIGINT", loader)
    assert code == 0, stderr[-3000:]
    assert result["global_step"] == 2 and result["at_step"] == 2 and result["signal"] == "SIGINT"


@pytest.mark.parametrize("loader", ["torch", "torch_spawn", "ring"])
def test_a_schedulers_sigterm_to_every_process_of_the_job_leaves_the_loaders_workers_running(tmp_path, loader):
    """SLURM (at the time limit, on preemption) and systemd send SIGTERM to every process of the job: the DataLoader
    workers and the ring loader's reader processes died of it, and the stop crashed on the next batch ("DataLoader
    worker ... exited unexpectedly", ReaderDied "killed by SIGTERM") with no checkpoint, exit 1. Workers started by
    spawn have threads (numpy's OpenBLAS pool) before their worker_init_fn runs, which took the signal."""
    code, result, stderr = _signal_the_group(tmp_path, "SIGTERM", loader)
    assert code == 128 + signal.SIGTERM, stderr[-3000:]
    checkpoint = tmp_path / "checkpoints" / "interrupted.ckpt"
    assert result == {"global_step": 2, "at_step": 2, "checkpoint": str(checkpoint), "signal": "SIGTERM"}
    assert torch.load(checkpoint, weights_only=True)["global_step"] == 2


def test_workers_that_ignore_ctrl_c_are_seeded_as_lightning_seeds_them(monkeypatch):
    """Lightning adds its seeding worker_init_fn only to a loader without one: it is run in its place."""
    class Draws(torch.utils.data.Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, index):
            return torch.tensor([torch.rand(()).item(), float(np.random.rand()), random.random()])

    def draws(worker_init_fn):
        torch.manual_seed(0)
        return torch.cat(list(DataLoader(Draws(), batch_size=2, num_workers=2, worker_init_fn=worker_init_fn)))

    monkeypatch.setenv("PL_SEED_WORKERS", "1")  # what seed_everything(workers=True) sets
    lightnings = draws(functools.partial(pl_worker_init_function, rank=3))
    assert torch.equal(draws(ignore_interrupts_in_workers(rank=3)), lightnings)
    assert not torch.equal(draws(None), lightnings)
    # A worker_init_fn of the loader's own runs instead, as Lightning then adds none.
    mine = functools.partial(pl_worker_init_function, rank=5)
    assert torch.equal(draws(ignore_interrupts_in_workers(mine)), draws(mine))


def test_sigterm_saves_the_step_in_flight_before_lightning_ends_the_fit(tmp_path):
    """A scheduler preempting the job: Lightning finishes the step and raises SIGTERMException; the step's
    checkpoint is saved first."""
    stop = GracefulStop()
    with pytest.raises(SystemExit):
        _fit(tmp_path, [stop, CtrlCAt([5], signal_name="SIGTERM")])
    checkpoint = tmp_path / "checkpoints" / "interrupted.ckpt"
    assert stop.summary == {"at_step": 6, "checkpoint": str(checkpoint), "signal": "SIGTERM"}
    assert torch.load(checkpoint, weights_only=True)["global_step"] == 6


# --- SIGTERM outside a training step ------------------------------------------------------------------------------

class Validated(Regression):
    def __init__(self):
        torch.manual_seed(0)  # the same weights in every fit
        super().__init__()
        self.validated = 0

    def validation_step(self, batch, batch_idx):
        self.validated += 1
        x, y = batch
        self.log("val/loss", F.mse_loss(self.net(x), y))


def _fit_validated(tmp_path, callbacks, model=None, samples=160, val_check_interval=None, max_steps=20, sanity=0,
                   max_epochs=None):
    """A fit with validation every ``val_check_interval`` steps (None: at each epoch's end), 4 samples a batch."""
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(samples, 6, generator=g), torch.randn(samples, 1, generator=g))
    model = model or Validated()
    trainer = pl.Trainer(accelerator="cpu", max_steps=max_steps, max_epochs=max_epochs, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                         callbacks=callbacks, val_check_interval=val_check_interval, num_sanity_val_steps=sanity)
    trainer.fit(model, DataLoader(data, batch_size=4), DataLoader(data, batch_size=4))
    return trainer


@pytest.mark.parametrize(("signal_name", "code"), [("SIGTERM", None), ("SIGINT", 130)])
@pytest.mark.parametrize(("samples", "val_check_interval", "validated"), [(160, 5, 40 + 2), (40, None, 2)],
                         ids=["mid_epoch", "epoch_end"])
def test_a_signal_during_a_validation_stops_it_and_saves_what_the_step_before_it_would_have(
        tmp_path, samples, val_check_interval, validated, signal_name, code):
    """On SIGTERM Lightning ended the fit after the validation batch in flight with nothing saved (and train.py
    exited 0); Ctrl-C ran the whole validation and one more step. The checkpoint is the one the step before the
    validation saves on Ctrl-C: the same loops, weights and optimizer."""
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    stop, model = GracefulStop(), Validated()
    with pytest.raises(SystemExit) as ended:  # Lightning's SIGTERMException (no code) on SIGTERM
        _fit_validated(tmp_path / "signal", [stop, SignalIn("validation", step=10, batch=1, signal_name=signal_name)],
                       model, samples=samples, val_check_interval=val_check_interval)
    assert ended.value.code == code
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
    checkpoint = tmp_path / "signal" / "checkpoints" / "interrupted.ckpt"
    assert stop.summary == {"at_step": 10, "checkpoint": str(checkpoint), "signal": signal_name}
    assert model.validated == validated  # the interrupted validation stopped after its batch 1
    # Ctrl-C during step 9 saves the checkpoint of step 10's end, before the validation after it.
    ctrl_c = GracefulStop()
    _fit_validated(tmp_path / "ctrl_c", [ctrl_c, CtrlCAt([9])], samples=samples,
                   val_check_interval=val_check_interval)
    assert ctrl_c.summary["at_step"] == 10
    saved = torch.load(checkpoint, weights_only=True)
    paused = torch.load(tmp_path / "ctrl_c" / "checkpoints" / "interrupted.ckpt", weights_only=True)
    assert saved["global_step"] == 10 and saved["loops"] == paused["loops"]
    assert all(torch.equal(saved["state_dict"][k], v) for k, v in paused["state_dict"].items())
    assert str(saved["optimizer_states"]) == str(paused["optimizer_states"])


def test_sigterm_at_an_epochs_end_stops_after_the_next_step_with_its_checkpoint(tmp_path):
    """Lightning raised SIGTERMException at the epoch's end with nothing saved."""
    stop = GracefulStop()
    with pytest.raises(SystemExit):
        _fit(tmp_path, [stop, SignalIn("epoch_end", step=40)], max_steps=60)  # 40 batches an epoch
    checkpoint = tmp_path / "checkpoints" / "interrupted.ckpt"
    assert stop.summary == {"at_step": 41, "checkpoint": str(checkpoint), "signal": "SIGTERM"}
    assert torch.load(checkpoint, weights_only=True)["global_step"] == 41


@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGINT"])
@pytest.mark.parametrize("when", ["last_step", "last_validation"])
@pytest.mark.parametrize("end", ["max_steps", "max_epochs"])
def test_a_signal_in_the_fits_last_step_or_its_last_validation_lets_the_fit_end_complete(
        tmp_path, caplog, signal_name, when, end):
    """The stop saved interrupted.ckpt at the last step, which no resume could go on from (no step left), skipped
    (or cut short) the last validation and its checkpoint, and on SIGTERM ended the fit with SIGTERMException: train.py
    reported the finished run interrupted, exit 143, and told to resume from a checkpoint it then refused."""
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    stop, model = GracefulStop(), Validated()
    sender = (CtrlCAt([19], signal_name=signal_name) if when == "last_step"
              else SignalIn("validation", step=20, batch=1, signal_name=signal_name))
    # 20 batches an epoch, validated (20 batches) after steps 10 and 20; the fit ends at step 20 either way.
    limit = {"max_steps": 20} if end == "max_steps" else {"max_steps": -1, "max_epochs": 1}
    trainer = _fit_validated(tmp_path, [stop, sender, ModelCheckpoint(dirpath=tmp_path / "checkpoints")], model,
                             samples=80, val_check_interval=10, **limit)  # returns: no SystemExit
    assert trainer.global_step == 20 and model.validated == 2 * 20
    assert stop.summary == {}  # what train.py reads: the run completed
    assert stop.signal_after_last_step == signal_name  # what ends a sweep after this job (only logged before)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["epoch=0-step=20.ckpt"]
    assert "during or after the fit's last training step" in caplog.text
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_sigterm_in_the_sanity_check_stops_at_once_with_nothing_trained(tmp_path):
    stop = GracefulStop()
    with pytest.raises(SystemExit):
        _fit_validated(tmp_path, [stop, SignalIn("sanity_check", batch=0)], sanity=2)
    assert stop.summary == {} and stop.steps_trained == 0 and not list(tmp_path.rglob("*.ckpt"))


# --- train.py: SIGTERM outside a training step exits 143, with a checkpoint to go on from once a step was trained --

ROOT = Path(__file__).resolve().parent.parent
SMALL = ["recipe=bert_split", "model.hidden=32", "model.layers=1", "model.heads=2", "data.train_size=640",
         "data.val_size=128", "callbacks.memory_profiler=null", "threads=1"]
SIGNAL_IN = "+callbacks.signal_in._target_=tests.fixtures.signal_in.SignalIn"


def _train_py(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *SMALL, *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def _logged_from(run: Path, step: int) -> list[dict[str, str]]:
    """The run's CSV rows from ``step`` on, without the columns that are times or counts of this process's batches."""
    rows = list(csv.DictReader((run / "csv" / "metrics.csv").open()))
    rows = [{k: v for k, v in r.items() if v and not k.startswith(("throughput/", "epoch"))} for r in rows]
    return [r for r in rows if int(r["step"]) >= step]


def test_train_py_preempted_during_a_validation_exits_143_and_goes_on_from_the_step_before_it(tmp_path):
    """Lightning's SIGTERMException, a SystemExit with no code, made the run exit 0 with nothing saved, and the
    summary blamed Ctrl-C: a scheduler took the preempted job for a finished one."""
    common = ["trainer.val_check_interval=6", "trainer.log_every_n_steps=2", "trainer.max_steps=12"]
    whole = _train_py(*common, f"hydra.run.dir={tmp_path}/whole", cwd=tmp_path)
    assert whole.returncode == 0, whole.stderr[-3000:]

    preempted = _train_py(*common, SIGNAL_IN, "+callbacks.signal_in.phase=validation", "+callbacks.signal_in.step=6",
                          f"hydra.run.dir={tmp_path}/preempted", cwd=tmp_path)
    assert preempted.returncode == 143, preempted.stderr[-3000:]
    checkpoint = tmp_path / "preempted" / "checkpoints" / "interrupted.ckpt"
    summary = json.loads((tmp_path / "preempted" / "summary.json").read_text())
    assert summary["status"] == "interrupted"
    assert summary["error"] == f"SIGTERM after 6 steps; go on with ckpt_path={checkpoint}"
    assert summary["graceful_stop"] == {"at_step": 6, "checkpoint": str(checkpoint), "signal": "SIGTERM"}
    assert torch.load(checkpoint, weights_only=False)["global_step"] == 6

    # It goes on with step 7 on the batches step 7 had: what the whole run logged from there, bit for bit.
    went_on = _train_py(*common, f"ckpt_path={checkpoint}", f"hydra.run.dir={tmp_path}/went_on", cwd=tmp_path)
    assert went_on.returncode == 0, went_on.stderr[-3000:]
    assert json.loads((tmp_path / "went_on" / "summary.json").read_text())["steps"] == 12
    after = _logged_from(tmp_path / "whole", 6)
    assert any("train/loss" in r for r in after) and any("val/loss" in r for r in after)
    assert _logged_from(tmp_path / "went_on", 6) == after


def test_train_py_preempted_in_the_sanity_check_exits_143_saying_nothing_was_trained(tmp_path):
    run = _train_py("trainer.max_steps=4", SIGNAL_IN, "+callbacks.signal_in.phase=sanity_check",
                    "+callbacks.signal_in.batch=0", f"hydra.run.dir={tmp_path}", cwd=tmp_path)
    assert run.returncode == 143, run.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "interrupted"
    assert summary["error"] == "SIGTERM before the first training step: nothing trained, nothing saved"
    assert not list(tmp_path.rglob("*.ckpt"))
