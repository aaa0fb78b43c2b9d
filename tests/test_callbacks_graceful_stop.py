"""GracefulStop: Ctrl-C (a real SIGINT to this process) ends the fit after the step in flight, with a checkpoint.

The main job's side (train.py exits 130 with an "interrupted" summary, and resuming from the checkpoint logs what
the uninterrupted run logged) is tested in tests/test_train.py.
"""

import signal

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from hetrain.callbacks import GracefulStop
from tests.fixtures.ctrl_c import CtrlCAt


class Regression(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Linear(6, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(tmp_path, callbacks, accumulate=1, max_steps=20):
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(160, 6, generator=g), torch.randn(160, 1, generator=g))
    trainer = pl.Trainer(accelerator="cpu", max_steps=max_steps, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path, callbacks=callbacks,
                         accumulate_grad_batches=accumulate, num_sanity_val_steps=0)
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


def test_with_gradient_accumulation_it_stops_at_the_step_that_applies_the_gradients(tmp_path):
    stop = GracefulStop(filename="paused.ckpt")
    # Batches 0-2 are optimizer step 0, 3-5 step 1: Ctrl-C during step 1's first batch stops after batch 5.
    trainer = _fit(tmp_path, [stop, CtrlCAt([1])], accumulate=3)
    assert trainer.global_step == 2 and trainer.fit_loop.epoch_loop.batch_progress.current.completed == 6
    assert stop.summary["checkpoint"] == str(tmp_path / "checkpoints" / "paused.ckpt")  # Lightning's default one


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


def test_sigterm_saves_the_step_in_flight_before_lightning_ends_the_fit(tmp_path):
    """A scheduler preempting the job: Lightning finishes the step and raises SIGTERMException; the step's
    checkpoint is saved first."""
    stop = GracefulStop()
    with pytest.raises(SystemExit):
        _fit(tmp_path, [stop, CtrlCAt([5], signal_name="SIGTERM")])
    checkpoint = tmp_path / "checkpoints" / "interrupted.ckpt"
    assert stop.summary == {"at_step": 6, "checkpoint": str(checkpoint), "signal": "SIGTERM"}
    assert torch.load(checkpoint, weights_only=True)["global_step"] == 6
