"""MemoryProfiler on real Lightning fits (CPU): per-module numbers, phase peaks, report files, OOM post-mortem."""

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from hetrain.callbacks.memory import (
    OOM_MD,
    OOM_SNAPSHOT,
    PHASES,
    REPORT_HTML,
    REPORT_MD,
    REPORT_PNG,
    MemoryProfiler,
    ModuleMemory,
    optimizer_state_bytes,
    peak_rss_bytes,
    reset_peak_rss,
    rss_bytes,
)

BATCH, IN, HIDDEN = 6, 8, 24
OOM_MESSAGE = "CUDA out of memory. Tried to allocate 20.00 GiB (GPU 0; 79.11 GiB total capacity)"


class Regressor(pl.LightningModule):
    def __init__(self, oom_at_step: int | None = None):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(IN, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, 1))
        self.oom_at_step = oom_at_step

    def training_step(self, batch, batch_idx):
        x, y = batch
        if self.global_step == self.oom_at_step:
            raise torch.cuda.OutOfMemoryError(OOM_MESSAGE)  # the exception type torch raises on a CUDA OOM
        return F.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def _loader(batches: int) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(batches * BATCH, IN, generator=g),
                                    torch.randn(batches * BATCH, 1, generator=g)), batch_size=BATCH)


def _fit(model, profiler, tmp_path, batches=3, **kwargs) -> pl.Trainer:
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=batches, logger=False, default_root_dir=tmp_path,
                         enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
                         limit_val_batches=0, callbacks=[profiler], **kwargs)
    trainer.fit(model, _loader(batches))
    return trainer


def _nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def test_module_memory_counts_params_grads_outputs_and_saved_tensors_exactly():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(IN, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, 1))
    x = torch.randn(BATCH, IN)
    tracker = ModuleMemory(model)
    tracker.start()
    loss = model(x).square().mean()
    tracker.forward_done()
    loss.backward()
    tracker.backward_done()
    tracker.stop()
    r = tracker.records
    fc1, fc2 = model[0], model[2]
    assert r["0"].params == r["0"].grads == _nbytes(fc1.weight, fc1.bias)
    assert r["2"].params == r["2"].grads == _nbytes(fc2.weight, fc2.bias)
    assert r["1"].params == r["1"].grads == 0
    assert r["0"].outputs == r["1"].outputs == 4 * BATCH * HIDDEN and r["2"].outputs == 4 * BATCH
    # Autograd keeps x for fc1's weight gradient and ReLU's result for ReLU's and fc2's backward: each storage
    # is counted once, by the first module that saved it; weights are never activations.
    assert r["0"].saved == _nbytes(x)
    assert r["1"].saved == 4 * BATCH * HIDDEN
    assert r["2"].saved == 0
    assert r["0"].cuda_delta is None  # CPU modules: no allocator delta
    # All hooks are gone: another forward changes nothing.
    model(x).sum().backward()
    assert tracker.records["0"].outputs == 4 * BATCH * HIDDEN
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


class Block(nn.Module):
    """Saves a tensor for backward in its own forward (tanh keeps its result), not in a child."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(IN, HIDDEN)

    def forward(self, x):
        return torch.tanh(self.fc(x))


def test_module_memory_gives_a_tensor_saved_by_a_parent_to_the_parent():
    model = nn.Sequential(Block(), nn.Linear(HIDDEN, 1))
    x = torch.randn(BATCH, IN)
    tracker = ModuleMemory(model)
    tracker.start()
    loss = model(x).sum() * 2  # mul by a constant saves nothing; sum saves nothing
    tracker.forward_done()
    loss.backward()
    tracker.backward_done()
    tracker.stop()
    r = tracker.records
    assert r["0.fc"].saved == _nbytes(x)
    assert r["0"].saved == 4 * BATCH * HIDDEN  # tanh's result, saved in Block.forward
    assert r["0"].outputs == 0 and r["0.fc"].outputs == 4 * BATCH * HIDDEN  # outputs belong to leaves only
    assert r["1"].saved == 0  # fc2's input is tanh's result, already counted
    header, rows = tracker.table()
    assert [row[0] for row in rows][-1] == "total"
    assert rows[-1][header.index("saved for backward MiB")] == round((_nbytes(x) + 4 * BATCH * HIDDEN) / 2**20, 3)


def test_optimizer_state_bytes_matches_adam_moments():
    model = nn.Linear(5, 3)
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 5)).sum().backward()
    optimizer.step()
    params = _nbytes(*model.parameters())
    # exp_avg and exp_avg_sq per parameter, plus a float32 step counter per parameter.
    assert optimizer_state_bytes([optimizer]) == {"cpu": 2 * params + 2 * 4}


def test_peak_rss_resets_and_sees_a_large_allocation():
    if not reset_peak_rss():
        pytest.skip("this kernel cannot reset the peak resident set")
    before = peak_rss_bytes()
    block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    peak = peak_rss_bytes()
    del block
    assert peak - before >= 60 * 2**20
    reset_peak_rss()
    assert peak_rss_bytes() - rss_bytes() < 8 * 2**20  # the peak fell back to about the current size


def test_profiler_writes_a_report_naming_every_module(tmp_path):
    profiler = MemoryProfiler(module_every_n_steps=2)
    model = Regressor()
    _fit(model, profiler, tmp_path, batches=3)
    assert [s["step"] for s in profiler.steps] == [0, 1, 2]
    for step in profiler.steps:
        for phase in PHASES:
            assert step[phase]["cpu"]["allocated"] > 0
    md = (tmp_path / REPORT_MD).read_text()
    page = (tmp_path / REPORT_HTML).read_text()
    for name in ("net.0", "net.1", "net.2", "Linear", "ReLU", "peak forward MiB", "optimizer state MiB"):
        assert name in md and name in page
    assert "data:image/png;base64," in page
    assert (tmp_path / REPORT_PNG).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Parameters, gradients and Adam state per device match the model's own tensors.
    params = _nbytes(*model.parameters())
    assert profiler.static == {"params": {"cpu": params}, "grads": {"cpu": params},
                               "optimizer state": {"cpu": 2 * params + 4 * 4}}
    # No hook outlives the fit.
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_profiler_under_gradient_accumulation_records_optimizer_steps(tmp_path):
    profiler = MemoryProfiler(module_every_n_steps=1)
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(accelerator="cpu", max_steps=2, accumulate_grad_batches=2, logger=False,
                         default_root_dir=tmp_path, enable_progress_bar=False, enable_checkpointing=False,
                         enable_model_summary=False, limit_val_batches=0, callbacks=[profiler])
    trainer.fit(Regressor(), _loader(4))
    assert [s["step"] for s in profiler.steps] == [0, 1]
    # Outputs are those of one micro-batch (the first of each step), not a sum over micro-batches.
    assert profiler.modules.records["net.0"].outputs == 4 * BATCH * HIDDEN


def test_out_of_memory_in_a_step_writes_the_post_mortem_and_reraises(tmp_path):
    profiler = MemoryProfiler(module_every_n_steps=1)
    model = Regressor(oom_at_step=2)
    with pytest.raises(torch.cuda.OutOfMemoryError, match="Tried to allocate 20.00 GiB"):
        _fit(model, profiler, tmp_path, batches=4)
    report = (tmp_path / OOM_MD).read_text()
    assert "Out of memory at step 2" in report
    assert "During: forward" in report
    assert OOM_MESSAGE in report
    assert "history was not recorded" in report and not (tmp_path / OOM_SNAPSHOT).exists()
    for name in ("net.0", "net.1", "net.2"):
        assert name in report
    assert not (tmp_path / REPORT_MD).exists()  # the fit did not end: no end-of-fit report
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    assert profiler.modules._saved_hooks is None


def test_out_of_memory_dump_can_be_turned_off(tmp_path):
    with pytest.raises(torch.cuda.OutOfMemoryError):
        _fit(Regressor(oom_at_step=0), MemoryProfiler(dump_on_oom=False), tmp_path, batches=2)
    assert not (tmp_path / OOM_MD).exists()


def test_other_errors_write_no_post_mortem(tmp_path):
    class Broken(Regressor):
        def training_step(self, batch, batch_idx):
            raise ValueError("not memory")

    with pytest.raises(ValueError, match="not memory"):
        _fit(Broken(), MemoryProfiler(), tmp_path, batches=2)
    assert not (tmp_path / OOM_MD).exists()


@pytest.mark.cuda
def test_cuda_numbers_agree_with_torch_counters_and_snapshot_is_written(tmp_path):
    profiler = MemoryProfiler(module_every_n_steps=1, record_history=True)
    model = Regressor()
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(accelerator="gpu", devices=1, max_steps=2, logger=False, default_root_dir=tmp_path,
                         enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
                         limit_val_batches=0, callbacks=[profiler])
    trainer.fit(model, _loader(2))
    params = _nbytes(*model.parameters())
    assert profiler.static["params"] == {"cuda:0": params}
    for step in profiler.steps:
        # The forward peak holds at least the weights, the optimizer peak at least weights, grads and Adam state.
        assert step["forward"]["cuda:0"]["allocated"] >= params
        assert step["optimizer"]["cuda:0"]["allocated"] >= 4 * params
        assert step["forward"]["cuda:0"]["reserved"] >= step["forward"]["cuda:0"]["allocated"]
    assert profiler.modules.records["net.0"].cuda_delta >= 4 * BATCH * HIDDEN
    assert (tmp_path / "memory_snapshot.pickle").stat().st_size > 0
