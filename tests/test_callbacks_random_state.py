"""RandomState: a checkpoint holds every generator's state, and a run resumed from it draws what the run would have."""

import contextlib
import random

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from hetrain.callbacks import GracefulStop, RandomState
from tests.fixtures.ctrl_c import CtrlCAt
from tests.fixtures.signal_in import SignalIn


def draws() -> tuple:
    return torch.rand(3).tolist(), np.random.rand(3).tolist(), [random.random() for _ in range(3)]


def test_state_round_trips_through_a_weights_only_load(tmp_path):
    callback = RandomState()
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    torch.save(callback.state_dict(), tmp_path / "state.pt")
    want = draws()
    torch.manual_seed(7), np.random.seed(8), random.seed(9)  # elsewhere in between
    callback.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))  # Lightning's default
    assert draws() == want


class Noisy(pl.LightningModule):
    """Dropout at every step, and a record of the loss each step computed."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 16), nn.Dropout(0.5), nn.Linear(16, 1))
        self.losses = {}

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.mse_loss(self.net(x), y)
        self.losses[self.global_step] = loss.item()
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(tmp_path, max_steps, callbacks, ckpt_path=None):
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(64, 6, generator=g), torch.randn(64, 1, generator=g))
    pl.seed_everything(0, verbose=False)
    model = Noisy()
    trainer = pl.Trainer(accelerator="cpu", max_steps=max_steps, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path, callbacks=callbacks)
    trainer.fit(model, DataLoader(data, batch_size=8), ckpt_path=ckpt_path)
    return model


def test_a_resumed_run_draws_the_dropout_masks_of_the_uninterrupted_one(tmp_path):
    # Saved at the end of the first epoch (8 batches): a DataLoader cannot resume mid-epoch (hetrain's
    # RingLoader can, tests/test_datamodule.py), and making its iterator draws from torch's generator.
    def saver():
        return ModelCheckpoint(tmp_path / "ckpt", filename="{step}", every_n_train_steps=8, save_top_k=-1)

    full = _fit(tmp_path / "full", 14, [RandomState(), saver()])
    resumed = _fit(tmp_path / "resumed", 14, [RandomState()], ckpt_path=tmp_path / "ckpt" / "step=8.ckpt")
    assert sorted(resumed.losses) == list(range(8, 14))
    assert resumed.losses == {s: v for s, v in full.losses.items() if s >= 8}
    for a, b in zip(full.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)
    # Without it the generators restart from the seed: the masks, and so the losses, differ.
    blind = _fit(tmp_path / "blind", 14, [], ckpt_path=tmp_path / "ckpt" / "step=8.ckpt")
    assert blind.losses[8] != full.losses[8]
    # A checkpoint written without it, resumed with it, says so (it resumed silently from the seed).
    plain = tmp_path / "plain"
    _fit(plain, 8, [ModelCheckpoint(plain / "ckpt", filename="{step}", every_n_train_steps=8, save_top_k=-1)])
    with pytest.warns(UserWarning, match="the checkpoint holds no RandomState"):
        _fit(tmp_path / "warned", 9, [RandomState()], ckpt_path=plain / "ckpt" / "step=8.ckpt")


def test_a_checkpoint_of_two_ranks_resumed_by_one_process_restores_rank_zeros_state_and_warns(tmp_path):
    callback = RandomState()
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    rank0 = callback.state_dict()
    want = draws()
    torch.manual_seed(4), np.random.seed(5), random.seed(6)
    two_ranks = {**rank0, "ranks": [rank0, callback.state_dict()]}  # as a 2-process DDP run writes it
    with pytest.warns(UserWarning, match="generators of 2 process.*this run has 1"):
        callback.load_state_dict(two_ranks)
    assert draws() == want


class NoisyValidation(Noisy):
    """Its validation draws from torch's generator (a random augmentation of the input) unless ``quiet``."""

    def __init__(self, quiet=False):
        super().__init__()
        self.quiet = quiet

    def validation_step(self, batch, batch_idx):
        x, y = batch
        noise = 0 if self.quiet else torch.randn_like(x)
        self.log("val/loss", F.mse_loss(self.net(x + noise), y))


def _fit_validated(tmp_path, callbacks, ckpt_path=None, quiet=False, sanity=0):
    """14 steps of 8 batches an epoch, validated (4 batches) at each epoch's end; the module, once the fit ended."""
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(64, 6, generator=g), torch.randn(64, 1, generator=g))
    pl.seed_everything(0, verbose=False)
    model = NoisyValidation(quiet)
    trainer = pl.Trainer(accelerator="cpu", max_steps=14, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path, callbacks=callbacks,
                         num_sanity_val_steps=sanity)
    with contextlib.suppress(SystemExit):  # how a stop during a validation ends the fit
        trainer.fit(model, DataLoader(data, batch_size=8), DataLoader(data, batch_size=16), ckpt_path=ckpt_path)
    return model


def test_what_a_validation_draws_leaves_the_training_draws_alone(tmp_path):
    """Validation drew from the training stream: every dropout mask after it depended on what it drew."""
    drawing = _fit_validated(tmp_path / "drawing", [RandomState()], sanity=2)
    quiet = _fit_validated(tmp_path / "quiet", [RandomState()], quiet=True, sanity=2)
    assert sorted(drawing.losses) == list(range(14)) and drawing.losses == quiet.losses

    # trainer.validate is left alone: the generators go on from what it drew, as without RandomState.
    def after_validate(callbacks):
        torch.manual_seed(1)
        trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                             default_root_dir=tmp_path, callbacks=callbacks)
        trainer.validate(NoisyValidation(), DataLoader(TensorDataset(torch.ones(32, 6), torch.ones(32, 1)),
                                                       batch_size=16), verbose=False)
        return torch.rand(3)

    assert torch.equal(after_validate([RandomState()]), after_validate([]))


@pytest.mark.parametrize("stop", ["before", "during"])
def test_a_run_stopped_at_a_validation_that_draws_resumes_as_the_uninterrupted_one(tmp_path, stop):
    """Stopped at step 8 (the first epoch's end): Ctrl-C during step 7 saves before the validation after it,
    SIGTERM during that validation's batch 1 saves what step 8's end would have. The checkpoint held none or some
    of the validation's draws where the uninterrupted run went on after all of them: every later mask differed."""
    full = _fit_validated(tmp_path / "full", [RandomState()])
    graceful = GracefulStop()
    sender = CtrlCAt([7]) if stop == "before" else SignalIn("validation", step=8, batch=1)
    _fit_validated(tmp_path / "stopped", [graceful, sender, RandomState()])
    assert graceful.summary["at_step"] == 8
    resumed = _fit_validated(tmp_path / "resumed", [RandomState()], ckpt_path=graceful.summary["checkpoint"])
    assert sorted(resumed.losses) == list(range(8, 14))
    assert resumed.losses == {s: v for s, v in full.losses.items() if s >= 8}
