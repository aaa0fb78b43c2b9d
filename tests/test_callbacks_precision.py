"""Per-device precision choice, per-device autocast, and NonFiniteGuard on real Lightning fits (CPU)."""

import contextlib
import csv
import functools
import gc
import math
import pickle
import random
import types
import warnings
import weakref

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.plugins.precision import MixedPrecision
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.data import DataLoader, TensorDataset

from hetrain.callbacks import precision
from hetrain.callbacks.precision import (
    DeviceMixedPrecision,
    HostSafeGradScaler,
    NonFiniteError,
    NonFiniteGuard,
    choices_by_type,
    choose_precision,
    run_precision,
    trainer_precision,
)

BATCH = 4
MARK = 1e4  # first feature of every sample of a poisoned batch: finite, but overflows exp() downstream


def _cpu_flags() -> set[str]:
    with open("/proc/cpuinfo") as f:
        return {flag for line in f if line.startswith("flags") for flag in line.split(":", 1)[1].split()}


class Exp(nn.Module):
    def forward(self, x):
        return torch.exp(x)


class _NanBackward(torch.autograd.Function):
    """Identity whose backward returns NaN for inputs holding the mark's echo (|x| > 500)."""

    @staticmethod
    def forward(ctx, x):
        ctx.bad = bool(x.abs().max() > 500)
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan") if ctx.bad else grad


class NanBackward(nn.Module):
    def forward(self, x):
        return _NanBackward.apply(x)


class _HugeBackward(torch.autograd.Function):
    """Identity whose backward scales the gradient by 1e22: every value finite, their 2-norm past float32's range."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * 1e22


class HugeBackward(nn.Module):
    def forward(self, x):
        return _HugeBackward.apply(x)


class Regressor(pl.LightningModule):
    """MSE regression through ``middle``; records the learning rate each step ran with."""

    def __init__(self, middle: nn.Module, schedule=None, lr: float = 0.05):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), middle, nn.ReLU(), nn.Linear(16, 1))
        self.schedule = schedule
        self.lr = lr
        self.lrs = []
        self.scales = []
        self.dtypes = []

    def on_train_batch_start(self, batch, batch_idx):
        # Here, not in training_step, which NonFiniteGuard reruns to find where a NaN began.
        self.lrs.append(self.trainer.optimizers[0].param_groups[0]["lr"])
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        self.scales.append(scaler.get_scale() if scaler is not None else None)

    def training_step(self, batch, batch_idx):
        x, y = batch
        out = self.net(x)
        self.dtypes.append(out.dtype)
        return F.mse_loss(out.float(), y)

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=self.lr)
        if self.schedule is None:
            return optimizer
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self.schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def _loader(steps: int, poisoned=(), nan_inputs=()) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(steps * BATCH, 8, generator=g) - 0.5
    y = torch.rand(steps * BATCH, 1, generator=g)
    for b in poisoned:
        x[b * BATCH:(b + 1) * BATCH, 0] = MARK
    for b in nan_inputs:
        x[b * BATCH, 3] = float("nan")
    return DataLoader(TensorDataset(x, y), batch_size=BATCH)


def _fit(model, loader, tmp_path, callbacks=(), logger=False, **kwargs) -> pl.Trainer:
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=len(loader), logger=logger, default_root_dir=tmp_path,
                         enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
                         limit_val_batches=0, callbacks=list(callbacks), **kwargs)
    trainer.fit(model, loader)
    return trainer


def _all_finite(module: nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in module.parameters())


# --- choosing a precision ---------------------------------------------------------------------------

def test_choose_precision_cpu_follows_cpu_flags():
    flags = _cpu_flags()
    fast_bf16 = "avx512_bf16" in flags or "amx_bf16" in flags
    assert choose_precision("cpu") == ("bf16-mixed" if fast_bf16 else "32-true")
    assert choose_precision(torch.device("cpu")) == choose_precision("cpu")


def test_choose_precision_unknown_device_type_is_fp32():
    assert choose_precision("meta") == "32-true"


def test_trainer_precision_passes_explicit_values_through():
    assert trainer_precision("16-mixed", ["cpu"]) == {"precision": "16-mixed"}
    assert trainer_precision(32, ["cpu"]) == {"precision": 32}


def test_trainer_precision_auto_on_one_device_type_is_a_lightning_string():
    assert trainer_precision("auto", ["cpu"]) == {"precision": choose_precision("cpu")}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the fallback when no GPU is present")
def test_trainer_precision_auto_ignores_absent_devices():
    assert choices_by_type(["cpu", "cuda:0"]) == {"cpu": choose_precision("cpu")}
    assert trainer_precision("auto", ["cuda:0", "cpu"]) == {"precision": choose_precision("cpu")}


def test_device_mixed_precision_autocasts_each_device_type_on_its_own():
    plugin = DeviceMixedPrecision({"cpu": "bf16-mixed", "cuda": "32-true"}, root="cuda")
    assert plugin.precision == "bf16-mixed" and plugin.scaler is None
    with plugin.forward_context():
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
        assert not torch.is_autocast_enabled("cuda")
    plugin = DeviceMixedPrecision({"cpu": "16-mixed", "cuda": "32-true"}, root="cuda")
    assert plugin.precision == "16-mixed" and plugin.scaler is not None  # a scaler for the fp16 device
    # A bf16 CPU root beside an fp16 GPU (an sm_7x card): Lightning refused bf16-mixed with a scaler.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # GradScaler(device="cuda") without a GPU says it is disabled
        plugin = DeviceMixedPrecision({"cpu": "bf16-mixed", "cuda": "16-mixed"}, root="cpu")
    assert plugin.precision == "16-mixed" and plugin.scaler is not None
    with torch.autocast("cpu", dtype=torch.bfloat16), DeviceMixedPrecision(
        {"cpu": "32-true", "cuda": "bf16-mixed"}, root="cuda"
    ).forward_context():
        assert not torch.is_autocast_enabled("cpu")  # a 32-true device runs in fp32 even inside another autocast


@pytest.mark.cuda
def test_device_mixed_precision_enables_cuda_and_cpu_autocast_together():
    plugin = DeviceMixedPrecision({"cpu": "bf16-mixed", "cuda": "16-mixed"}, root="cuda")
    assert plugin.precision == "16-mixed" and plugin.scaler is not None
    with plugin.forward_context():
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
        assert torch.is_autocast_enabled("cuda") and torch.get_autocast_dtype("cuda") == torch.float16


def test_device_mixed_precision_rejects_all_fp32_and_unknown_names():
    with pytest.raises(ValueError, match="32-true"):
        DeviceMixedPrecision({"cpu": "32-true"}, root="cpu")
    with pytest.raises(ValueError, match="unknown precision"):
        DeviceMixedPrecision({"cpu": "bf16-mixed", "cuda": "8-mixed"}, root="cpu")
    with pytest.raises(ValueError, match=r"unknown precision \['fp8'\]"):  # named, not 'no device type runs ...'
        DeviceMixedPrecision({"cuda": "fp8"}, root="cuda")
    for choices, root in (({"gpu": "bf16-mixed"}, "cpu"), ({"cpu": "bf16-mixed"}, "gpu")):
        with pytest.raises(ValueError, match="'gpu' is not a device type"):
            DeviceMixedPrecision(choices, root=root)


def test_device_mixed_precision_reads_a_device_as_its_type():
    # 'cuda:1' was kept as a key: GradScaler(device="cuda:1") is not "cuda", so on a machine without a GPU it stayed
    # enabled where GradScaler(device="cuda") disables itself.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # GradScaler(device="cuda") without a GPU says it is disabled
        plugin = DeviceMixedPrecision({"cpu:0": "bf16-mixed", "cuda:1": "16-mixed"}, root="cpu:0")
    assert plugin.choices == {"cpu": "bf16-mixed", "cuda": "16-mixed"} and plugin.device == "cpu"
    assert plugin.scaler.is_enabled() == torch.cuda.is_available()
    assert DeviceMixedPrecision({"cpu": "bf16-mixed", "cpu:0": "bf16-mixed"}, root="cpu").choices == {
        "cpu": "bf16-mixed"}


def test_device_mixed_precision_rejects_two_choices_for_one_device_type():
    # Both autocasts were entered for the CPU, the later silently winning.
    with pytest.raises(ValueError, match=r"'cpu' \(bf16-mixed\) and 'cpu:0' \(32-true\) are both device type 'cpu'"):
        DeviceMixedPrecision({"cpu": "bf16-mixed", "cpu:0": "32-true"}, root="cpu")


def test_device_mixed_precision_names_each_device_types_choice(tmp_path):
    # The log showed an object address, and the run summary one name (the scaler's, 16-mixed) for both devices.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # GradScaler(device="cuda") without a GPU says it is disabled
        plugin = DeviceMixedPrecision({"cuda": "16-mixed", "cpu": "bf16-mixed"}, root="cpu")
    assert repr(plugin) == str(plugin) == "DeviceMixedPrecision(cuda=16-mixed, cpu=bf16-mixed)"
    trainer = pl.Trainer(accelerator="cpu", plugins=[plugin], logger=False, default_root_dir=tmp_path)
    assert run_precision(trainer) == {"cuda": "16-mixed", "cpu": "bf16-mixed"}
    assert run_precision(pl.Trainer(accelerator="cpu", precision="32-true", logger=False)) == "32-true"


def test_device_mixed_precision_runs_a_cpu_fit_in_bf16(tmp_path):
    model = Regressor(nn.Identity())
    _fit(model, _loader(2), tmp_path, plugins=[DeviceMixedPrecision({"cpu": "bf16-mixed"}, root="cpu")])
    assert model.dtypes == [torch.bfloat16, torch.bfloat16]


@pytest.mark.cuda
def test_cuda_stage_and_cpu_stage_each_run_under_their_own_autocast(tmp_path):
    choice = choose_precision("cuda:0")
    major, _ = torch.cuda.get_device_capability(0)
    assert choice == ("bf16-mixed" if major >= 8 else "16-mixed" if major >= 7 else "32-true")
    if choice == "32-true":
        pytest.skip("this GPU has no fast half precision")

    class Split(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.first = nn.Linear(8, 16)  # on the CPU
            self.second = nn.Linear(16, 1)  # on the GPU
            self.dtypes = []

        def training_step(self, batch, batch_idx):
            x, y = batch
            h = self.first(x.cpu())
            out = self.second(h.cuda())
            self.dtypes.append((h.dtype, out.dtype))
            return F.mse_loss(out.float(), y.cuda())

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

        def on_fit_start(self):
            self.first.cpu()

    kwargs = trainer_precision("auto", ["cuda:0", "cpu"])
    assert isinstance(kwargs["plugins"][0], DeviceMixedPrecision)
    model = Split()
    pl.Trainer(accelerator="gpu", devices=1, max_steps=2, logger=False, enable_progress_bar=False,
               enable_checkpointing=False, enable_model_summary=False, **kwargs).fit(model, _loader(2))
    cpu_dtype = torch.bfloat16 if choose_precision("cpu") == "bf16-mixed" else torch.float32
    cuda_dtype = torch.bfloat16 if choice == "bf16-mixed" else torch.float16
    assert model.dtypes == [(cpu_dtype, cuda_dtype)] * 2


# --- NonFiniteGuard ---------------------------------------------------------------------------------

def test_guard_names_the_module_whose_forward_overflowed_and_stops(tmp_path):
    model = Regressor(Exp())
    guard = NonFiniteGuard(max_consecutive=2)
    with pytest.raises(NonFiniteError) as info:
        _fit(model, _loader(6, poisoned=[2, 3, 4]), tmp_path, callbacks=[guard])
    message = str(info.value)
    assert "after non-finite global steps 2-3 (2 in a row; the limit is max_consecutive=2)" in message
    assert "module 'net.1' (Exp)" in message and "in forward" in message and "batch 2" in message
    assert (guard.skipped_steps, guard.nonfinite_steps, guard.consecutive) == (2, 2, 2)
    assert len(model.lrs) == 4  # batches 0..3 ran, batch 4 never did
    assert _all_finite(model)  # the skipped steps left the weights alone


@pytest.mark.parametrize(("limit", "steps"), [(3, "global steps 1-3 (3 in a row"), (1, "global step 1 (1 in a row")])
def test_guard_stop_names_the_non_finite_steps_and_how_to_go_on(tmp_path, limit, steps):
    # It said "stopped at global step 4", a step that never ran, and nothing of what to do next.
    with pytest.raises(NonFiniteError) as info:
        _fit(Regressor(Exp()), _loader(6, poisoned=[1, 2, 3]), tmp_path, callbacks=[NonFiniteGuard(limit)])
    message = str(info.value)
    assert f"training stopped after non-finite {steps}; the limit is max_consecutive={limit})" in message
    for way in ("task.lr", "ckpt_path=", "callbacks.nonfinite_guard.on_nonfinite=skip",
                "callbacks.nonfinite_guard.max_consecutive"):
        assert way in message


def test_guard_blames_backward_when_the_loss_is_finite(tmp_path):
    model = Regressor(NanBackward())
    guard = NonFiniteGuard(max_consecutive=1)
    with pytest.raises(NonFiniteError, match="finite loss but non-finite gradients; produced in backward") as info:
        _fit(model, _loader(4, poisoned=[1]), tmp_path, callbacks=[guard])
    # net.3 sits after the NaN in backward order and keeps finite gradients; net.0 is the first that has NaN.
    assert "module 'net.0'" in str(info.value)
    assert _all_finite(model)


def test_guard_lets_huge_but_finite_gradients_through(tmp_path):
    # The first layer's gradients are ~1e21: each finite, their sum of squares not (it was read as non-finite).
    model = Regressor(HugeBackward())
    before = [p.detach().clone() for p in model.parameters()]
    guard = NonFiniteGuard(max_consecutive=1)
    _fit(model, _loader(1), tmp_path, callbacks=[guard])
    assert (guard.skipped_steps, guard.nonfinite_steps) == (0, 0)
    assert not torch.equal(before[0], model.net[0].weight) and _all_finite(model)


def test_guard_blames_the_inputs(tmp_path):
    guard = NonFiniteGuard(max_consecutive=1)
    with pytest.raises(NonFiniteError, match="produced by the inputs"):
        _fit(Regressor(nn.Identity()), _loader(3, nan_inputs=[1]), tmp_path, callbacks=[guard])


class ParentMadeNan(nn.Module):
    """Makes NaN in its own forward, between two children: exp overflows (inf) and inf - inf is NaN."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(16, 16)
        self.norm = nn.LayerNorm(16)
        self.fc2 = nn.Linear(16, 16)

    def forward(self, x):
        h = torch.exp(self.fc1(x) * 100)
        return self.fc2(self.norm(h - h))


def test_guard_blames_a_parents_own_forward_not_the_child_that_received_its_nan(tmp_path):
    # It named net.1.norm (LayerNorm), the first module whose output was NaN, though its input was NaN already.
    with pytest.raises(NonFiniteError) as info:
        _fit(Regressor(ParentMadeNan()), _loader(3, poisoned=[1]), tmp_path, callbacks=[NonFiniteGuard(1)])
    message = str(info.value)
    assert "made in 'net.1' (ParentMadeNan)'s own forward, outside its children" in message
    assert "net.1.norm" not in message


def test_diagnosis_names_the_caller_when_no_module_made_the_non_finite_value():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    diagnosis = precision.NonFiniteDiagnosis(model)
    assert diagnosis.first_nonfinite_output(lambda: model(torch.ones(1, 4))) is None
    assert diagnosis.first_nonfinite_output(lambda: model(torch.full((1, 4), -1.0).log())) == ("", "Sequential", True)
    with torch.no_grad():
        model[1].weight[0, 0] = math.inf
    assert diagnosis.first_nonfinite_output(lambda: model(torch.ones(1, 4))) == ("1", "Linear", False)


def test_guard_counts_streaks_and_resets_after_a_finite_step(tmp_path):
    model = Regressor(Exp())
    guard = NonFiniteGuard(max_consecutive=3)
    _fit(model, _loader(7, poisoned=[1, 2, 4, 5]), tmp_path, callbacks=[guard])  # two streaks of 2: no stop
    assert (guard.skipped_steps, guard.nonfinite_steps, guard.consecutive) == (4, 4, 0)
    assert _all_finite(model)


def test_guard_skip_mode_holds_the_lr_schedule_on_skipped_steps(tmp_path):
    model = Regressor(Exp(), schedule=lambda step: 1 / (1 + step), lr=0.1)
    guard = NonFiniteGuard(max_consecutive=1, on_nonfinite="skip")
    trainer = _fit(model, _loader(6, poisoned=[2, 3]), tmp_path, callbacks=[guard])
    # Steps 2 and 3 are skipped: the schedule stays at its third value until step 4 succeeds.
    assert model.lrs == pytest.approx([0.1, 0.1 / 2, 0.1 / 3, 0.1 / 3, 0.1 / 3, 0.1 / 4])
    assert guard.skipped_steps == 2
    assert trainer.callback_metrics["nonfinite/skipped_steps"] == 2
    assert trainer.callback_metrics["nonfinite/nonfinite_steps"] == 2
    assert _all_finite(model)


def test_guard_writes_its_metrics_at_every_logging_step_and_keeps_callback_metrics_current(tmp_path):
    # It calls log_dict only on logging steps and when a value changed (a call costs ~0.5 ms of Python).
    model = Regressor(Exp())
    guard = NonFiniteGuard(max_consecutive=3, on_nonfinite="skip")
    calls = []
    log_dict = model.log_dict
    model.log_dict = lambda metrics, **kw: (calls.append(dict(metrics)), log_dict(metrics, **kw))
    trainer = _fit(model, _loader(10, poisoned=[4]), tmp_path, callbacks=[guard], log_every_n_steps=3,
                   logger=CSVLogger(tmp_path))
    rows = list(csv.DictReader((tmp_path / "lightning_logs" / "version_0" / "metrics.csv").open()))
    logged = {int(r["step"]): float(r["nonfinite/skipped_steps"]) for r in rows if r["nonfinite/skipped_steps"]}
    assert logged == {2: 0.0, 5: 1.0, 8: 1.0}  # every third optimizer step, counted from 0, as Lightning logs
    assert trainer.callback_metrics["nonfinite/skipped_steps"] == 1
    assert trainer.callback_metrics["nonfinite/consecutive"] == 0
    # Step 0 (first), steps 2, 5, 8 (logging), step 4 (skipped) and step 5 (the streak ended) changed or logged.
    assert len(calls) == 5 < 10


def test_guard_counts_loss_scaler_overflows_without_stopping(tmp_path):
    init = 2.0**24  # far too large for fp16 gradients: the scaler backs off until they fit
    scaler = torch.amp.GradScaler("cpu", init_scale=init, growth_interval=1000)
    model = Regressor(nn.Identity(), schedule=lambda step: 1 / (1 + step), lr=0.1)
    guard = NonFiniteGuard(max_consecutive=1)
    trainer = _fit(model, _loader(8), tmp_path, callbacks=[guard],
                   plugins=[MixedPrecision("16-mixed", device="cpu", scaler=scaler)])
    halvings = round(math.log2(init / scaler.get_scale()))
    assert halvings > 0  # the test needs at least one overflow
    assert guard.skipped_steps == halvings and guard.nonfinite_steps == 0
    assert trainer.callback_metrics["nonfinite/skipped_steps"] == halvings
    assert trainer.callback_metrics["nonfinite/nonfinite_steps"] == 0  # overflows only: nothing non-finite
    assert trainer.callback_metrics["precision/loss_scale"] == model.scales[-1]  # the scale the last step ran with
    # A step was skipped iff the scaler backed off after it; the schedule advances on the others only.
    scales = [*model.scales, scaler.get_scale()]
    skipped = [after < before for before, after in zip(scales[:-1], scales[1:], strict=True)]
    assert sum(skipped) == halvings and skipped[0]
    expected = [0.1 / (1 + sum(not s for s in skipped[:i])) for i in range(len(skipped))]
    assert model.lrs == pytest.approx(expected)


def test_guard_rejects_bad_arguments():
    with pytest.raises(ValueError, match="max_consecutive"):
        NonFiniteGuard(max_consecutive=0)
    with pytest.raises(ValueError, match="on_nonfinite"):
        NonFiniteGuard(on_nonfinite="ignore")


def _scaled_step(scaler: torch.amp.GradScaler, params: list[torch.Tensor], loss: torch.Tensor,
                 fused: bool = False) -> bool:
    """One scaled backward and step (SGD, or a fused AdamW); whether the optimizer stepped (the scaler found no inf)."""
    optimizer = torch.optim.AdamW(params, lr=0.1, fused=True) if fused else torch.optim.SGD(params, lr=0.1)
    before = [p.detach().clone() for p in params]
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return not all(torch.equal(b, p) for b, p in zip(before, params, strict=True))


def test_host_safe_grad_scaler_unscales_host_gradients_and_skips_an_overflow():
    weight = torch.randn(4, generator=torch.Generator().manual_seed(0)).requires_grad_()
    scaler = HostSafeGradScaler(device="cpu", init_scale=1024.0)
    scaler.scale((weight * 3).sum()).backward()
    torch.testing.assert_close(weight.grad, torch.full((4,), 3 * 1024.0))
    scaler.unscale_(torch.optim.SGD([weight], lr=0.1))
    torch.testing.assert_close(weight.grad, torch.full((4,), 3.0))  # unscaled on the host
    scaler.update()
    weight.grad = None
    assert _scaled_step(scaler, [weight], (weight * 3).sum())
    assert not _scaled_step(scaler, [weight], (weight * float("inf")).sum())  # an overflow: the step is skipped
    assert scaler.get_scale() == 512.0


def _fused_adamw_steps(step, factors: list[float], dtype: torch.dtype) -> tuple[torch.Tensor, float]:
    """Steps of a fused AdamW under a CPU GradScaler, each on the scaled gradient of ``factor * w``; the weights and
    the scale after them. ``step(scaler, optimizer)`` is the scaler's step under test."""
    weight = torch.linspace(-1, 1, 8, dtype=dtype).requires_grad_()
    # eps as large as the gradients: Adam's step then follows their size, so a missed or repeated unscale shows.
    optimizer = torch.optim.AdamW([weight], lr=0.1, eps=1.0, fused=True)
    scaler = torch.amp.GradScaler(device="cpu", init_scale=1024.0)
    for factor in factors:
        scaler.scale((weight * factor).square().sum()).backward()
        step(scaler, optimizer)
        scaler.update()
        optimizer.zero_grad()
    return weight.detach(), scaler.get_scale()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # unscale_ refuses float16 gradients
def test_the_host_safe_fused_step_steps_as_torchs_and_skips_an_overflow(dtype):
    """Fused AdamW unscales in its own step: torch hands it the scale and the inf flag, which it copies to a CPU
    parameter's device without waiting for a GPU scale. The host-safe step unscales and reads the flag first."""
    factors = [3.0, -2.0, float("inf"), 0.5]
    torch_weight, torch_scale = _fused_adamw_steps(torch.amp.GradScaler.step, factors, dtype)
    weight, scale = _fused_adamw_steps(precision.step_found_inf_on_host, factors, dtype)
    torch.testing.assert_close(weight, torch_weight, rtol=0, atol=0)
    assert scale == torch_scale == 1024.0 / 2  # the overflow halved the scale
    skipped, _ = _fused_adamw_steps(precision.step_found_inf_on_host, [3.0, -2.0, float("inf")], dtype)
    two_steps, _ = _fused_adamw_steps(precision.step_found_inf_on_host, [3.0, -2.0], dtype)
    torch.testing.assert_close(skipped, two_steps, rtol=0, atol=0)  # the overflowing step left the weights alone
    assert not torch.equal(two_steps, torch.linspace(-1, 1, 8, dtype=dtype))


def test_the_host_safe_fused_step_refuses_a_closure_and_steps_plainly_when_disabled():
    """As torch's step: a closure's backward would leave scaled gradients after the unscale; a disabled scaler has
    no state to read and only steps."""
    weight = torch.nn.Parameter(torch.linspace(-1, 1, 8))
    weight.grad = torch.full_like(weight, 0.5)
    optimizer = torch.optim.AdamW([weight], fused=True)
    with pytest.raises(RuntimeError, match="Closure"):
        precision.step_found_inf_on_host(torch.amp.GradScaler("cpu"), optimizer, closure=lambda: None)
    precision.step_found_inf_on_host(torch.amp.GradScaler("cpu", enabled=False), optimizer)
    assert not torch.equal(weight.detach(), torch.linspace(-1, 1, 8))


@pytest.mark.cuda
@pytest.mark.parametrize("fused", [False, True])
def test_host_safe_grad_scaler_sees_an_overflow_on_a_cpu_stage_beside_a_gpu_loss(fused):
    """A CPU stage's gradient overflowing while the GPU is busy: torch's scaler read its inf flag's copy from the
    GPU before it landed, and the late copy could overwrite the CPU kernel's inf. A fused AdamW made the same copy of
    the scale and the flag in its own step."""
    host = torch.ones(256, requires_grad=True)
    gpu = torch.ones(256, device="cuda", requires_grad=True)
    scaler = HostSafeGradScaler(device="cuda", init_scale=2.0**16)
    for attempt in range(20):
        torch.cuda._sleep(50_000_000)  # the GPU lags the host, as in training
        loss = (gpu * 2).sum() + (host * float("inf")).sum().to("cuda")
        assert not _scaled_step(scaler, [host, gpu], loss, fused), f"attempt {attempt}: an overflow was applied"
        host.grad = gpu.grad = None


def _normed(seed: int = 0) -> Regressor:
    """A regressor whose exp() overflows on a poisoned batch and whose BatchNorm then turns the inf into NaN."""
    torch.manual_seed(seed)
    return Regressor(nn.Sequential(Exp(), nn.BatchNorm1d(16)))


def _without_batches(loader: DataLoader, dropped: set[int]) -> DataLoader:
    rows = [i for i in range(len(loader.dataset)) if i // BATCH not in dropped]
    return DataLoader(torch.utils.data.Subset(loader.dataset, rows), batch_size=BATCH)


def test_guard_skipped_step_leaves_batchnorm_statistics_as_if_the_batch_never_ran(tmp_path):
    # The skipped step's forward made the running statistics NaN, and the diagnosis rerun (train mode) updated them
    # again: both are undone, so the fit equals one on the same data without the batch.
    poisoned = _loader(6, poisoned=[2])
    model, reference = _normed(), _normed()
    guard = NonFiniteGuard(on_nonfinite="skip")
    with pytest.warns(UserWarning, match=r"module 'net\.1\.0' \(Exp\)"):  # the diagnosis reran the batch
        _fit(model, poisoned, tmp_path, callbacks=[guard])
    _fit(reference, _without_batches(poisoned, {2}), tmp_path)
    assert guard.skipped_steps == 1
    norm = model.net[1][1]
    assert int(norm.num_batches_tracked) == 5  # the five batches that stepped
    for (name, value), expected in zip(model.state_dict().items(), reference.state_dict().values(), strict=True):
        assert torch.allclose(value, expected), name


def test_guard_without_batchnorm_keeps_no_statistics(tmp_path):
    guard = NonFiniteGuard(on_nonfinite="skip")
    _fit(Regressor(Exp()), _loader(3, poisoned=[1]), tmp_path, callbacks=[guard])
    assert guard.skipped_steps == 1 and guard._running_stats is None


@pytest.mark.parametrize(("loader", "expected"), [
    (_loader(6, nan_inputs=[2]), "produced by the inputs"),
    # Batch 2's memory has gone back to the loader by the step (holding the window held as many ring slots).
    (_loader(6, poisoned=[2]), "produced in forward (the inputs were finite); that batch is no longer held to rerun"),
    (_loader(6, poisoned=[3]), "First at batch 3 (global step 1): non-finite loss; produced in forward: first "
                               "non-finite output from module 'net.1' (Exp)"),
])
def test_guard_under_accumulation_diagnoses_the_window_batch_that_went_non_finite(tmp_path, loader, expected):
    # Batches 2 and 3 make one step; the window's first or last is the bad one, the other finite.
    guard = NonFiniteGuard(max_consecutive=1)
    with pytest.raises(NonFiniteError) as info:
        _fit(Regressor(Exp()), loader, tmp_path, callbacks=[guard], accumulate_grad_batches=2)
    bad = 3 if "batch 3" in expected else 2
    assert f"First at batch {bad} (global step 1): non-finite loss" in str(info.value)
    assert expected in str(info.value)


class EarlierBatchesFreed(pl.Callback):
    """Records, at each optimizer step, how many of the window's earlier batches are still referenced somewhere."""

    def __init__(self) -> None:
        self.window: list[weakref.ref] = []
        self.alive: list[int] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.window.append(weakref.ref(batch[0]))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        gc.collect()
        self.alive.append(sum(ref() is not None for ref in self.window[:-1]))
        self.window = []


def test_guard_under_accumulation_lets_earlier_batches_go(tmp_path):
    # A ring loader refills a slot once its batch's tensors are freed: a guard holding the whole window held
    # accumulate_grad_batches slots, and a run accumulating more batches than the ring has slots stalled.
    freed = EarlierBatchesFreed()
    _fit(Regressor(Exp()), _loader(6), tmp_path, callbacks=[NonFiniteGuard(), freed], accumulate_grad_batches=3)
    assert len(freed.alive) == 6 and not any(freed.alive)


def test_guard_under_accumulation_reruns_the_held_batch_when_only_another_ranks_loss_was_non_finite(tmp_path,
                                                                                                    monkeypatch):
    # This rank's losses are finite; the reduced flag says a loss of step 1 was not (as another rank's would).
    def reduce_flags(trainer, flags, op):
        return flags & torch.tensor([trainer.global_step != 1, True])

    monkeypatch.setattr(precision, "reduce_flags", reduce_flags)
    model = Regressor(nn.Identity())
    with pytest.raises(NonFiniteError) as info:
        _fit(model, _loader(6), tmp_path, callbacks=[NonFiniteGuard(max_consecutive=1)], accumulate_grad_batches=2)
    assert "First at batches 2-3 (global step 1): non-finite loss; not reproduced by a rerun" in str(info.value)
    assert len(model.dtypes) == 4 + 1  # batches 0-3, then a rerun of the window's last, the batch still held


class GradientPenalty(pl.LightningModule):
    """A training_step that needs autograd itself (a gradient penalty); batch ``MARK`` inputs overflow in exp."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        x = x.clone().requires_grad_(True)
        out = self.net(torch.exp(x))
        (gx,) = torch.autograd.grad(out.sum(), x, create_graph=True)
        return F.mse_loss(out, y) + 0.1 * gx.pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_guard_reruns_with_autograd_and_reports_a_failing_rerun(tmp_path):
    # The rerun ran under no_grad: torch.autograd.grad raised there and ended a fit that should skip the step.
    guard = NonFiniteGuard(on_nonfinite="skip")
    trainer = _fit(GradientPenalty(), _loader(3, poisoned=[2]), tmp_path, callbacks=[guard])
    assert trainer.global_step == 3 and guard.skipped_steps == 1
    # exp overflows in training_step itself, before net.0 (which an earlier diagnosis named) is called.
    assert "First at batch 2" in guard.diagnosis and "outside any module (training_step's own code" in guard.diagnosis


class FailingRerun(Regressor):
    """Raises when training_step runs twice on a batch: only the guard's rerun does."""

    def __init__(self):
        super().__init__(Exp())
        self.seen = set()

    def training_step(self, batch, batch_idx):
        if batch_idx in self.seen:
            raise ValueError("second run")
        self.seen.add(batch_idx)
        return super().training_step(batch, batch_idx)


def test_guard_reports_a_rerun_that_raises_instead_of_raising(tmp_path):
    guard = NonFiniteGuard(max_consecutive=1)
    with pytest.raises(NonFiniteError, match="the rerun failed: ValueError: second run"):
        _fit(FailingRerun(), _loader(3, poisoned=[1]), tmp_path, callbacks=[guard])


def _trainer(tmp_path, max_steps: int, callbacks) -> pl.Trainer:
    pl.seed_everything(0, verbose=False)
    return pl.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, logger=False, default_root_dir=tmp_path,
                      enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
                      limit_val_batches=0, callbacks=callbacks)


def test_guard_counters_and_streak_survive_a_resume(tmp_path):
    # They were not in the checkpoint: a resumed run counted from 0 and a streak across the resume never stopped.
    loader = _loader(3, poisoned=[0, 2])
    first = _trainer(tmp_path, 3, [NonFiniteGuard(max_consecutive=2)])
    first.fit(Regressor(Exp()), loader)  # one epoch: steps 0 and 2 skipped, the last one in a row
    first.save_checkpoint(tmp_path / "epoch.ckpt")
    guard = NonFiniteGuard(max_consecutive=2)
    with pytest.raises(NonFiniteError, match=r"global steps 2-3 \(2 in a row.*First at batch 2"):
        _trainer(tmp_path, 6, [guard]).fit(Regressor(Exp()), loader, ckpt_path=tmp_path / "epoch.ckpt")
    assert (guard.skipped_steps, guard.nonfinite_steps, guard.consecutive) == (3, 3, 2)


class OneCycleRegressor(Regressor):
    """Adam under OneCycleLR, which moves beta1 with the lr; records the betas each step ran with."""

    def __init__(self):
        super().__init__(Exp())
        self.betas = []

    def on_train_batch_start(self, batch, batch_idx):
        super().on_train_batch_start(batch, batch_idx)
        self.betas.append(self.trainer.optimizers[0].param_groups[0]["betas"])

    def configure_optimizers(self):
        optimizer = torch.optim.Adam(self.parameters(), lr=0.01)
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.01, total_steps=10, cycle_momentum=True)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def test_guard_skip_mode_holds_every_scheduled_setting_on_skipped_steps(tmp_path):
    # Only lr was put back: OneCycleLR's betas stayed a step ahead of the schedule it was set back to.
    model = OneCycleRegressor()
    _fit(model, _loader(4, poisoned=[2]), tmp_path, callbacks=[NonFiniteGuard(on_nonfinite="skip")])
    assert model.lrs[3] == model.lrs[2] and model.lrs[2] != model.lrs[1]
    assert model.betas[3] == model.betas[2] and model.betas[2] != model.betas[1]


def test_guard_sets_a_skipped_step_back_before_a_ctrl_c_checkpoint_whatever_the_callback_order(tmp_path):
    # GracefulStop listed first saved its checkpoint before the guard set the schedule back: a step ahead.
    from hetrain.callbacks import GracefulStop
    from tests.fixtures.ctrl_c import CtrlCAt

    stop, guard = GracefulStop(), NonFiniteGuard(on_nonfinite="skip")
    model = Regressor(Exp(), schedule=lambda step: 1 / (1 + step), lr=0.1)
    trainer = _fit(model, _loader(6, poisoned=[3]), tmp_path, callbacks=[stop, guard, CtrlCAt([3])])
    assert trainer.global_step == 4 and guard.skipped_steps == 1
    checkpoint = torch.load(stop.summary["checkpoint"], weights_only=False)
    assert checkpoint["lr_schedulers"][0]["last_epoch"] == 3  # steps 0-2 advanced it, the skipped step 3 did not
    assert checkpoint["optimizer_states"][0]["param_groups"][0]["lr"] == pytest.approx(0.1 / 4)
    assert checkpoint["callbacks"]["NonFiniteGuard"]["skipped_steps"] == 1


class NanPenalty(Regressor):
    """Adds a NaN term with no gradient path to batch ``nan_at``'s loss: the loss is NaN, its gradients finite."""

    def __init__(self, nan_at: int):
        super().__init__(nn.Identity())
        self.nan_at = nan_at
        self.weights = []

    def on_train_batch_start(self, batch, batch_idx):
        super().on_train_batch_start(batch, batch_idx)
        self.weights.append([p.detach().clone() for p in self.parameters()])

    def training_step(self, batch, batch_idx):
        penalty = torch.tensor(float("nan") if batch_idx == self.nan_at else 0.0)
        return super().training_step(batch, batch_idx) + penalty


def test_guard_skips_a_non_finite_loss_with_finite_gradients_under_a_loss_scaler(tmp_path):
    # The guard left the skip to the scaler, which found the gradients finite and stepped.
    model = NanPenalty(nan_at=1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    guard = NonFiniteGuard(on_nonfinite="skip")
    _fit(model, _loader(3), tmp_path, callbacks=[guard],
         plugins=[MixedPrecision("16-mixed", device="cpu", scaler=scaler)])
    assert (guard.skipped_steps, guard.nonfinite_steps) == (1, 1)
    assert all(torch.equal(a, b) for a, b in zip(model.weights[1], model.weights[2], strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(model.weights[0], model.weights[1], strict=True))
    assert _all_finite(model)


class Stage(nn.Module):
    """A stage with a child, as compile_stages compiles them (dynamo inlines the child's call into the stage's
    graph; an nn.Sequential it treats otherwise)."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x)


def test_guard_names_the_module_inside_a_compiled_stage(tmp_path):
    """Hooks added after torch.compile do not fire in the compiled graph: the rerun named the compiled stage (net.1)
    rather than the module within it whose forward overflowed."""
    model = Regressor(Stage(Exp()))
    model.net[1].compile(backend="aot_eager")
    with pytest.raises(NonFiniteError, match=r"first non-finite output from module 'net\.1\.inner' \(Exp\)"):
        _fit(model, _loader(2, poisoned=[1]), tmp_path, callbacks=[NonFiniteGuard(max_consecutive=1)])


class ManualNanPenalty(pl.LightningModule):
    """Manual optimization with a step-interval LR schedule; batch ``nan_at``'s loss gets a NaN term with no gradient
    path (its gradients stay finite, so stepping again would move the weights)."""

    def __init__(self, nan_at: int):
        super().__init__()
        self.automatic_optimization = False
        self.net = nn.Linear(8, 1)
        self.nan_at = nan_at
        self.weights = []
        self.calls = 0

    def on_train_batch_start(self, batch, batch_idx):
        self.weights.append([p.detach().clone() for p in self.parameters()])

    def training_step(self, batch, batch_idx):
        self.calls += 1
        x, y = batch
        loss = F.mse_loss(self.net(x), y) + torch.tensor(float("nan") if batch_idx == self.nan_at else 0.0)
        optimizer = self.optimizers()
        optimizer.zero_grad()
        self.manual_backward(loss)
        optimizer.step()
        self.lr_schedulers().step()

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=0.5)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5**step)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def test_guard_under_manual_optimization_does_not_rerun_the_users_optimizer_and_scheduler_steps(tmp_path):
    # The diagnosis reran training_step, whose optimizer.step() applied the skipped update and whose scheduler.step()
    # advanced the schedule the guard had just set back.
    model = ManualNanPenalty(nan_at=3)
    guard = NonFiniteGuard(on_nonfinite="skip")
    trainer = _fit(model, _loader(4), tmp_path, callbacks=[guard])
    assert guard.skipped_steps == 1 and model.calls == 4
    assert all(torch.equal(a, b) for a, b in zip(model.weights[3], model.parameters(), strict=True))
    assert trainer.lr_scheduler_configs[0].scheduler.last_epoch == 3  # steps 0-2 advanced it, the skipped 3 did not
    assert "under manual optimization no rerun names the module" in guard.diagnosis


class ManualAccumulation(Regressor):
    """Manual optimization that accumulates over two batches itself (Lightning requires accumulate_grad_batches=1)."""

    def __init__(self):
        super().__init__(nn.Identity())
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.manual_backward(F.mse_loss(self.net(x), y) / 2)
        if batch_idx % 2 == 1:
            optimizer = self.optimizers()
            optimizer.step()
            optimizer.zero_grad()


def test_guard_under_manual_accumulation_blames_the_inputs_of_a_batch_it_let_go(tmp_path):
    # Batch 2, the first of step 1's window, is let go by the step: its inputs went unchecked and the diagnosis
    # said they were finite.
    guard = NonFiniteGuard(on_nonfinite="skip")
    _fit(ManualAccumulation(), _loader(4, nan_inputs=[2]), tmp_path, callbacks=[guard], max_epochs=1)
    assert guard.skipped_steps == 1
    assert guard.diagnosis == ("First at batch 2 (global step 1): non-finite loss; produced by the inputs: the batch "
                               "holds NaN or inf.")


class TokenLM(pl.LightningModule):
    """Batches of token ids only (no floating tensor); batch 0's loss is made NaN outside any module."""

    def __init__(self):
        super().__init__()
        self.embed, self.head = nn.Embedding(10, 4), nn.Linear(4, 10)

    def training_step(self, batch, batch_idx):
        ids = batch["input_ids"]
        loss = F.cross_entropy(self.head(self.embed(ids[:, :-1])).flatten(0, 1), ids[:, 1:].flatten())
        return loss * float("nan") if batch_idx == 0 else loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_guard_under_accumulation_counts_a_batch_of_token_ids_as_checked(tmp_path):
    # Nothing in a batch without floating tensors can be non-finite: its diagnosis said "inputs not checked".
    batches = [{"input_ids": torch.randint(0, 10, (2, 5), generator=torch.Generator().manual_seed(i))}
               for i in range(2)]
    guard = NonFiniteGuard(on_nonfinite="skip")
    _fit(TokenLM(), DataLoader(batches, batch_size=None), tmp_path, callbacks=[guard], accumulate_grad_batches=2,
         max_epochs=1)
    assert guard.skipped_steps == 1
    assert "produced in forward (the inputs were finite); that batch is no longer held" in guard.diagnosis


class IterStepNan(Regressor):
    """Takes the dataloader_iter (Lightning passes its callbacks no batch then); its loss is NaN, its inputs finite."""

    def training_step(self, dataloader_iter):
        (x, y), _, _ = next(dataloader_iter)
        return F.mse_loss(self.net(x), y) * float("nan")


@pytest.mark.parametrize("accumulate", [1, 2])
def test_guard_given_no_batch_says_its_inputs_were_not_checked(tmp_path, accumulate):
    # A batch the guard never saw read as one with NaN inputs ("produced by the inputs"), or as checked and finite.
    guard = NonFiniteGuard(on_nonfinite="skip")
    _fit(IterStepNan(nn.Identity()), _loader(accumulate), tmp_path, callbacks=[guard],
         accumulate_grad_batches=accumulate)
    assert guard.skipped_steps >= 1
    assert "non-finite loss; produced in forward (inputs not checked)" in guard.diagnosis, guard.diagnosis


class IterStepNanAt(Regressor):
    """Takes the dataloader_iter; its loss is NaN at global step ``nan_at``, its inputs finite. Records, at each
    optimizer step, how many batches the NonFiniteGuard's window holds."""

    def __init__(self, nan_at: int):
        super().__init__(nn.Identity())
        self.nan_at, self.calls, self.held = nan_at, 0, []

    def training_step(self, dataloader_iter):
        self.calls += 1
        (x, y), _, _ = next(dataloader_iter)
        loss = super().training_step((x, y), None)
        return loss * float("nan") if self.global_step == self.nan_at else loss

    def on_before_optimizer_step(self, optimizer):
        (guard,) = (c for c in self.trainer.callbacks if isinstance(c, NonFiniteGuard))
        self.held.append(sum(b.batch is not None for b in guard._window))


def test_guard_names_the_global_step_of_a_dataloader_iter_step_and_holds_and_reruns_no_batch(tmp_path):
    # Lightning hands callbacks the batch the previous training_step fetched: the guard named batch 1 for step 2,
    # said its inputs were finite, and reran training_step with that batch in place of the iterator (TypeError).
    model, guard = IterStepNanAt(nan_at=2), NonFiniteGuard(max_consecutive=1)
    with pytest.raises(NonFiniteError, match=r"after non-finite global step 2 \(1 in a row"):
        _fit(model, _loader(4), tmp_path, callbacks=[guard])
    assert guard.diagnosis == (
        "First at global step 2: non-finite loss; produced in forward (inputs not checked); training_step takes the "
        "dataloader_iter and fetches its own batches, which the guard is not given to check or rerun, so the module "
        "is not named.")
    assert model.calls == 3  # steps 0-2, no rerun
    assert model.held == [0, 0, 0]  # not the previous step's batch either


class BatchChecks(TorchFunctionMode):
    """Counts ``torch.isfinite`` calls on tensors of ``rows`` rows: checks of a batch's inputs, not of a loss."""

    def __init__(self, rows: int):
        super().__init__()
        self.rows, self.calls = rows, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.isfinite and args[0].dim() and args[0].shape[0] == self.rows:
            self.calls += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("manual", [False, True])
def test_guard_checks_no_inputs_of_a_loop_that_steps_on_every_batch(tmp_path, manual):
    # Under manual optimization every batch's inputs were checked as it arrived, though a step on every batch lets
    # none go (60 ms a 32x3x224x224 batch on a CPU): the check runs only on a batch the window lets go.
    model = ManualNanPenalty(nan_at=-1) if manual else Regressor(nn.Identity())
    with BatchChecks(BATCH) as checks:
        _fit(model, _loader(3), tmp_path, callbacks=[NonFiniteGuard()])
    assert checks.calls == 0
    with BatchChecks(BATCH) as checks:  # a window of two batches lets its first go, checked then
        _fit(Regressor(nn.Identity()), _loader(4), tmp_path, callbacks=[NonFiniteGuard()], accumulate_grad_batches=2,
             max_epochs=1)
    assert checks.calls == 2 * 2  # x and y of batches 0 and 2


class TwoOptimizers(pl.LightningModule):
    """A GAN-like manual step: the first module's loss is NaN on every batch, the second's finite; ``nan_first``
    says which of the two steps first."""

    def __init__(self, nan_first: bool):
        super().__init__()
        self.automatic_optimization = False
        self.bad, self.good = nn.Linear(8, 1), nn.Linear(8, 1)
        self.nan_first = nan_first

    def training_step(self, batch, batch_idx):
        x, y = batch
        bad_opt, good_opt = self.optimizers()
        steps = [(bad_opt, F.mse_loss(self.bad(x), y) * float("nan")), (good_opt, F.mse_loss(self.good(x), y))]
        for optimizer, loss in steps if self.nan_first else steps[::-1]:
            optimizer.zero_grad()
            self.manual_backward(loss)
            optimizer.step()

    def configure_optimizers(self):
        return [torch.optim.SGD(self.bad.parameters(), lr=0.1), torch.optim.SGD(self.good.parameters(), lr=0.1)]


@pytest.mark.parametrize("nan_first", [True, False])
def test_guard_counts_a_batch_whose_first_optimizer_step_was_non_finite(tmp_path, nan_first):
    # Each optimizer step replaced the batch's verdict (and each backward its loss flag): a NaN step followed by a
    # finite one in the same batch was never counted, and training never stopped.
    model = TwoOptimizers(nan_first)
    guard = NonFiniteGuard(max_consecutive=3)
    with pytest.raises(NonFiniteError, match="3 in a row"):
        _fit(model, _loader(6), tmp_path, callbacks=[guard])
    assert (guard.skipped_steps, guard.nonfinite_steps, guard.consecutive) == (3, 3, 3)
    assert _all_finite(model)


class AdamNanPenalty(NanPenalty):
    """NanPenalty with AdamW, whose state (step count, moments) a skipped step must leave alone too."""

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=0.05)


@pytest.mark.parametrize("algorithm", ["value", "norm"])
def test_guard_skips_a_non_finite_step_under_gradient_clipping_without_a_scaler(tmp_path, algorithm):
    # The guard dropped the gradients before Lightning clipped them, and clip_grad_value_ raised on none at all.
    model = AdamNanPenalty(nan_at=1)
    guard = NonFiniteGuard(on_nonfinite="skip")
    trainer = _fit(model, _loader(3), tmp_path, callbacks=[guard], precision="32-true", gradient_clip_val=0.5,
                   gradient_clip_algorithm=algorithm)
    assert (guard.skipped_steps, guard.nonfinite_steps, guard.consecutive) == (1, 1, 0)
    assert all(torch.equal(a, b) for a, b in zip(model.weights[1], model.weights[2], strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(model.weights[0], model.weights[1], strict=True))
    assert _all_finite(model)
    optimizer = trainer.optimizers[0]
    assert all(int(optimizer.state[p]["step"]) == 2 for p in model.parameters())  # steps 0 and 2 only
    assert "configure_gradient_clipping" not in vars(model)  # the one-step drop is gone


class Sqrt(nn.Module):
    def forward(self, x):
        return torch.sqrt(x - 10.0).mean()  # NaN for the small values it is given


class EveryOtherStepPenalty(Regressor):
    """Adds a broken regulariser (NaN) on odd global steps only: lazy regularisation, as a step-dependent term."""

    def __init__(self):
        super().__init__(nn.Identity())
        self.penalty = Sqrt()
        self.seen = []

    def training_step(self, batch, batch_idx):
        self.seen.append(self.global_step)
        loss = super().training_step(batch, batch_idx)
        return loss + self.penalty(batch[0]) if self.global_step % 2 == 1 else loss


def test_guard_reruns_training_step_at_the_failing_global_step(tmp_path):
    # The rerun ran after Lightning had counted the step: it saw global step 2, added no penalty, and reported the
    # NaN as "not reproduced by a rerun of training_step".
    model = EveryOtherStepPenalty()
    named = r"global step 1\).*first non-finite output from module 'penalty' \(Sqrt\)"
    with pytest.raises(NonFiniteError, match=named):
        _fit(model, _loader(4), tmp_path, callbacks=[NonFiniteGuard(max_consecutive=1)])
    assert model.seen == [0, 1, 1]
    assert model.trainer.global_step == 2  # set back after the rerun


class StrictClipping(Regressor):
    """Checks its gradients in its own on_before_optimizer_step, after NonFiniteGuard's: it raises on a NaN step."""

    def __init__(self):
        super().__init__(nn.Identity())
        self.strict = True

    def on_before_optimizer_step(self, optimizer):
        if self.strict:
            torch.nn.utils.clip_grad_norm_(self.parameters(), 1e9, error_if_nonfinite=True)


@pytest.mark.parametrize("own_clipping", [False, True])
def test_guard_leaves_nothing_behind_when_a_step_raises_after_it(tmp_path, own_clipping):
    # The gradient drop stayed on the module (which no longer pickled) and the NaN step's verdict on the guard: the
    # next fit dropped its first step's gradients and counted a non-finite step, on finite data.
    model, guard = StrictClipping(), NonFiniteGuard()
    own = functools.partial(pl.LightningModule.configure_gradient_clipping, model)
    if own_clipping:
        model.configure_gradient_clipping = own
    with pytest.raises(RuntimeError, match="is non-finite"):
        _fit(model, _loader(1, nan_inputs=[0]), tmp_path, callbacks=[guard])
    assert vars(model).get("configure_gradient_clipping") is (own if own_clipping else None)
    pickle.dumps(model)
    model.strict = False
    before = [p.detach().clone() for p in model.parameters()]
    _fit(model, _loader(1), tmp_path, callbacks=[guard])
    assert (guard.skipped_steps, guard.nonfinite_steps, guard.consecutive) == (0, 0, 0)
    assert not any(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


class HostAugment(nn.Module):
    """An augmentation drawing from numpy and Python's random. On batch ``poisoned`` it makes NaN from the draws that
    batch first drew: a rerun reproduces it only if it draws them again."""

    def __init__(self, poisoned: int):
        super().__init__()
        self.draws = []  # (global step, numpy's draw, Python's draw) of each call
        self.poisoned = poisoned
        self.poison = None

    def forward(self, x, step, batch_idx):
        draw = (float(np.random.rand()), random.random())
        self.draws.append((step, *draw))
        if batch_idx == self.poisoned and self.poison is None:
            self.poison = draw
        return x * float("nan") if draw == self.poison else x


class HostAugmented(Regressor):
    def __init__(self, poisoned: int = 1):
        super().__init__(nn.Identity())
        self.augment = HostAugment(poisoned)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return super().training_step((self.augment(x, self.global_step, batch_idx), y), batch_idx)

    def on_before_backward(self, loss):
        # Drawn after training_step, before the guard's rerun: a rerun from the step's generators must not draw it
        # again for the next step.
        self.augment.draws.append(("after", float(np.random.rand()), random.random()))


def test_guard_reruns_with_numpy_and_python_draws_and_leaves_the_runs_draws_alone(tmp_path):
    # The rerun set back torch's generator only: it drew another augmentation (the NaN was "not reproduced by a
    # rerun"), and every later numpy and Python draw of the run was shifted by the rerun's.
    plain = HostAugmented()
    _fit(plain, _loader(4), tmp_path)
    model, guard = HostAugmented(), NonFiniteGuard(on_nonfinite="skip")
    named = r"global step 1\): non-finite loss; produced in forward: first non-finite output from module 'augment'"
    with pytest.warns(UserWarning, match=named):
        _fit(model, _loader(4), tmp_path, callbacks=[guard])
    assert guard.skipped_steps == 1
    rerun = model.augment.draws.pop(4)
    assert rerun == model.augment.draws[2]  # the rerun drew what step 1 drew
    assert [d[0] for d in model.augment.draws] == [0, "after", 1, "after", 2, "after", 3, "after"]
    assert model.augment.draws == plain.augment.draws


def test_guard_under_accumulation_reruns_the_windows_last_batch_with_its_numpy_and_python_draws(tmp_path):
    # Batches 2 and 3 make step 1; batch 3, the one held at the step, drew the NaN.
    plain = HostAugmented(poisoned=3)
    _fit(plain, _loader(4), tmp_path, accumulate_grad_batches=2, max_epochs=1)
    model, guard = HostAugmented(poisoned=3), NonFiniteGuard(on_nonfinite="skip")
    named = (r"First at batch 3 \(global step 1\): non-finite loss; produced in forward: first non-finite output from "
             "module 'augment'")
    with pytest.warns(UserWarning, match=named):
        _fit(model, _loader(4), tmp_path, callbacks=[guard], accumulate_grad_batches=2, max_epochs=1)
    rerun = model.augment.draws.pop(8)
    assert rerun == model.augment.draws[6]  # the rerun drew what batch 3 drew
    assert model.augment.draws == plain.augment.draws


def test_guard_reads_numpy_and_python_generators_only_for_a_batch_a_rerun_can_follow(tmp_path, monkeypatch):
    # Only the window's last batch is held at the step to rerun: reading every batch's (~0.1 ms) paid for each of
    # the window's earlier ones too.
    reads = 0
    get_state = np.random.get_state

    def counted():
        nonlocal reads
        reads += 1
        return get_state()

    monkeypatch.setattr(np.random, "get_state", counted)
    fits = {}
    for guards in ((), (NonFiniteGuard(on_nonfinite="skip"),)):  # without the guard: Lightning's own reads
        reads = 0
        _fit(Regressor(nn.Identity()), _loader(7), tmp_path, callbacks=guards, accumulate_grad_batches=3,
             max_epochs=1)
        fits[bool(guards)] = reads
    assert fits[True] - fits[False] == 3  # a window's: batches 0-2, 3-5 and the epoch's last, 6, alone


def test_guard_reads_the_generators_of_every_batch_under_a_strategy_that_accumulates_itself():
    # DeepSpeed steps (and the guard checks) on every batch, accumulating in its own step.
    trainer = types.SimpleNamespace(world_size=1, strategy=types.SimpleNamespace(handles_gradient_accumulation=True),
                                    fit_loop=types.SimpleNamespace(_should_accumulate=lambda: True))
    module = types.SimpleNamespace(automatic_optimization=True)
    assert precision._can_rerun(trainer, module)
    trainer.strategy.handles_gradient_accumulation = False
    assert not precision._can_rerun(trainer, module)


def test_a_rerun_puts_back_the_generator_of_every_cuda_device(monkeypatch):
    # CUDA initialised after the batch began saved no device's state: the rerun forked none, and its CUDA draws
    # shifted every later one of the run.
    forked, set_states = [], []

    @contextlib.contextmanager
    def fork_rng(devices):
        forked.append(devices)
        yield

    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.random, "fork_rng", fork_rng)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", set_states.append)
    saved = torch.ones(1)
    for cuda in ([], [saved]):
        with precision._replaying(precision._GeneratorStates(torch.get_rng_state(), cuda, None)):
            pass
    assert forked == [[0, 1], [0, 1]]
    assert set_states == [[saved]]  # only the saved states are set


@pytest.mark.cuda
def test_a_rerun_leaves_the_cuda_generator_as_it_was_when_cuda_began_after_the_batch():
    states = precision._GeneratorStates(torch.get_rng_state(), [], None)  # as saved before CUDA was initialised
    torch.rand(1, device="cuda")
    before = torch.cuda.get_rng_state()
    with precision._replaying(states):
        torch.rand(4, device="cuda")
    assert torch.equal(torch.cuda.get_rng_state(), before)
