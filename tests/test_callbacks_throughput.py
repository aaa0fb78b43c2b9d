"""Throughput: exact numbers from a driven clock, on the Trainer-free meter and in real Lightning fits (CPU)."""

from collections import UserDict
from dataclasses import dataclass

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from lightning_fabric.utilities.throughput import measure_flops
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger, Logger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from hetrain.callbacks import PipelineSplit
from hetrain.callbacks import throughput as tp
from hetrain.callbacks.throughput import (
    NA,
    NvmlEnergy,
    Throughput,
    ThroughputMeter,
    batch_size,
    describe,
    peak_flops,
)
from hetrain.data.packing import PackedSequences, PackInto
from hetrain.data.synthetic import SyntheticSequences, pad_collate
from hetrain.models.bert import BertClassifier
from hetrain.models.task import ClassificationTask
from hetrain.nn import ConvBNReLUPool2d, LinearCrossEntropyHead

BATCH, LEN = 4, 6


@dataclass
class Pair:
    x: torch.Tensor
    y: torch.Tensor


class Script:
    """A clock that returns the given readings in order."""

    def __init__(self, *readings):
        self.readings = list(readings)

    def __call__(self):
        return self.readings.pop(0)


class Tick:
    """A clock that advances by ``step`` seconds each time it is read."""

    def __init__(self, step=0.5):
        self.now, self.step = 0.0, step

    def __call__(self):
        self.now += self.step
        return self.now


def test_meter_numbers_are_exact():
    # start=0 | warm-up batch 1..3 | between steps 1, 2, 0, of which the loader fetched 0.5, 1.5, 0 | steps 2, 4, 3
    meter = ThroughputMeter(Script(0, 1, 3, 4, 6, 8, 12, 12, 15), window_size=3, available_flops=1e10)
    meter.start()
    meter.batch_start(data_wait=7.0)
    meter.batch_end(samples=BATCH, tokens=99)  # warm-up: left out of every number
    meter.flops_per_batch = 6e9
    for tokens, fetch in ((10, 0.5), (20, 1.5), (30, 0.0)):
        meter.batch_start(data_wait=fetch)
        meter.batch_end(samples=BATCH, tokens=tokens)
    assert meter.time == 12 and meter.batches == 3 and meter.samples == 12 and meter.tokens == 60
    summary = meter.summary()
    assert summary["samples_per_s"] == 1.0
    assert summary["tokens_per_s"] == 5.0
    assert summary["between_steps_fraction"] == 0.25
    assert summary["between_steps_ms_mean"] == 1000.0
    assert summary["data_wait_fraction"] == 2 / 12
    assert summary["data_wait_ms_mean"] == pytest.approx(2000 / 3)
    # numpy's linear percentiles of (2, 4, 3) s
    assert summary["step_time_ms"] == pytest.approx({"mean": 3000.0, "p50": 3000.0, "p90": 3800.0, "p99": 3980.0})
    assert summary["mfu"] == pytest.approx(6e9 * 3 / 12 / 1e10)
    assert describe(summary) == ("3 batches, 1 samples/s, 5 tokens/s, step 3000.0 ms p50 (3800.0 p90, 3980.0 p99), "
                                 "data wait 16.7%, between steps 25.0%, MFU 15.0%")
    # Lightning's rolling window over the three timed batches: cumulative time 3, 9, 12.
    rolling = meter.compute()
    assert rolling["device/samples_per_sec"] == pytest.approx(8 / 9)
    assert rolling["device/batches_per_sec"] == pytest.approx(2 / 9)
    assert rolling["device/items_per_sec"] == pytest.approx(50 / 9)
    assert rolling["device/mfu"] == pytest.approx(2 * 6e9 / 9 / 1e10)
    assert rolling["step_time_ms"] == 3000.0 and rolling["between_steps_ms"] == 0.0 and rolling["data_wait_ms"] == 0.0


def test_data_wait_is_unknown_when_any_timed_batch_lacks_the_loaders_measure():
    meter = ThroughputMeter(Script(0, 1, 2, 3, 4), warmup_batches=0)
    meter.start()
    meter.batch_start(data_wait=0.5)
    meter.batch_end(samples=2)
    meter.batch_start()  # e.g. a loader that does not time its next()
    meter.batch_end(samples=2)
    summary = meter.summary()
    assert summary["data_wait_fraction"] == NA and summary["data_wait_ms_mean"] == NA
    assert summary["between_steps_fraction"] == 0.5  # 1 + 1 of 4 s
    assert "data wait n/a" in describe(summary) and "tokens/s n/a" in describe(summary)
    assert "too few" in describe(ThroughputMeter(Script(0)).summary())


def test_meter_step_spans_its_micro_batches_and_leaves_out_a_pause():
    meter = ThroughputMeter(Script(0, 1, 2, 3, 5, 6, 100, 101), warmup_batches=0)
    meter.start()
    meter.batch_start()
    meter.batch_end(samples=2, step_done=False)  # first micro-batch: 1..2
    meter.batch_start()
    meter.batch_end(samples=2, step_done=True)  # second: 3..5; the step ran 1..5
    meter.pause()  # at 6: e.g. validation and a checkpoint save, 6..100, which are not training time
    meter.batch_start()
    meter.batch_end(samples=2)
    assert meter.step_times == [4, 1]
    assert meter.between_steps == [1, 1]  # 0..1, and 5..6 before the pause
    assert meter.within_steps == [1]  # 2..3, between the first step's micro-batches
    assert meter.time == 7  # gaps 1 + 1 + 1, batches 1 + 2 + 1
    assert meter.summary()["tokens_per_s"] == NA and meter.summary()["mfu"] == NA


def test_meter_keeps_the_fetch_after_a_pause_and_leaves_the_pause_out_of_a_step_it_splits():
    # A step of two micro-batches with a pause between them (validation mid-accumulation).
    meter = ThroughputMeter(Script(0, 1, 2, 3, 50, 51), warmup_batches=0)
    meter.start()
    meter.batch_start(data_wait=0.0)
    meter.batch_end(samples=2, step_done=False)  # 1..2
    meter.pause()  # 3..50 paused, of which the loader fetched the next batch for 0.5 s
    meter.batch_start(data_wait=0.5)
    meter.batch_end(samples=2, step_done=True)  # 50..51
    assert meter.within_steps == [1.5]  # 2..3 before the pause, and the fetch
    assert meter.step_times == [3.5]  # 1..51 less the 46.5 s of the pause that were not the fetch
    assert meter.time == 4.5  # gaps 1 + 1.5, batches 1 + 1


def test_batch_size_reads_labels_first_then_any_tensor():
    assert batch_size({"input_ids": torch.zeros(3, 7), "labels": torch.zeros(5)}) == 5
    assert batch_size((torch.zeros(2, 3), torch.zeros(2))) == 2
    assert batch_size(torch.zeros(9, 1)) == 9
    assert batch_size({"name": "x"}) is None and batch_size((torch.tensor(1.0), "x")) is None


def test_batch_size_looks_through_nested_batches_and_any_mapping():
    """It looked one level deep, into dicts only: a nested batch or a UserDict (transformers' BatchEncoding) raised
    and stopped the fit."""
    x = torch.zeros(4, 6)
    assert batch_size(((torch.tensor(2.0), x), x[:, 0])) == 4  # a 0-d tensor has no batch dimension
    assert batch_size(UserDict(input_ids=torch.zeros(3, 6), labels=torch.zeros(5))) == 5
    assert batch_size([{"inputs": {"ids": x}}]) == 4
    assert batch_size(Pair(torch.zeros(7, 6), torch.zeros(7))) == 7


def test_a_mask_counts_its_ones_as_tokens_whatever_its_dtype():
    # Tokenizers return int64 masks: those counted their padding too, as if every row were full.
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    callback = Throughput(tokens_key="attention_mask")
    for dtype in (torch.bool, torch.int64, torch.int32, torch.float32):
        assert callback._tokens({"attention_mask": mask.to(dtype)}) == 4, dtype
    assert Throughput(tokens_key="input_ids")._tokens({"input_ids": torch.tensor([[5, 7, 2], [9, 3, 4]])}) == 6


def test_a_packed_batch_counts_its_sequences_as_samples():
    # 7 sequences in 3 rows: samples/s counted rows, a fraction of the sequences a packed run trains on.
    docs = [{"input_ids": list(range(1, n + 1)), "label": i % 3} for i, n in enumerate([5, 3, 4, 2, 6, 1, 3])]
    packed = PackedSequences(docs, row_len=8)
    collate = PackInto(max_tokens=64, max_rows=8, max_segments=packed.max_segments)
    out = {name: torch.empty(numel, dtype=dtype) for name, (dtype, numel) in collate.spec.items()}
    shapes = collate([packed[k] for k in range(len(packed))], out)
    batch = {name: out[name][: shape[0] * shape[1]].view(shape) for name, shape in shapes.items()}
    assert len(batch["input_ids"]) == 3
    assert batch_size(batch) == 7


def test_peak_flops_is_measured_once_per_device_name_and_dtype(monkeypatch):
    monkeypatch.setattr(tp, "_PEAK_FLOPS", {})
    cpu = torch.device("cpu")
    assert peak_flops(cpu, torch.float32, measure=False) is None  # Lightning's table has no CPUs
    first = peak_flops(cpu, torch.float32)
    assert first > 1e8  # any CPU that runs these tests does more than 0.1 GFLOP/s in a 1024^2 matmul
    assert list(tp._PEAK_FLOPS) == [(tp._peak_key(cpu), torch.float32)]
    assert peak_flops(cpu, torch.float32) == first  # cached, not measured again


def test_measuring_the_peak_leaves_the_random_generator_as_it_was():
    torch.manual_seed(5)
    want = torch.rand(4)
    torch.manual_seed(5)
    tp.measure_matmul_flops(torch.device("cpu"), torch.float32, n=64, repeats=1)
    assert torch.equal(torch.rand(4), want)  # a run's dropout masks do not depend on whether it measured


def test_a_bf16_run_without_a_known_peak_measures_it_in_bf16(monkeypatch, tmp_path):
    monkeypatch.setattr(tp, "_PEAK_FLOPS", {})
    callback = Throughput(window_size=2)  # no peak given, and Lightning's table has no CPUs: measured
    trainer = pl.Trainer(accelerator="cpu", precision="bf16-mixed", max_steps=3, default_root_dir=tmp_path,
                         logger=False, enable_progress_bar=False, enable_checkpointing=False,
                         enable_model_summary=False, callbacks=[callback])
    trainer.fit(Tagger(), DataLoader(_samples(3 * BATCH), batch_size=BATCH))
    cpu = torch.device("cpu")
    assert list(tp._PEAK_FLOPS) == [(tp._peak_key(cpu), torch.bfloat16)]  # the run's compute dtype
    assert callback.summary["peak_flops"] == tp._PEAK_FLOPS[(tp._peak_key(cpu), torch.bfloat16)]
    # Never below float32's: where bf16 is emulated, the bf16 matmul alone put MFU above 1.
    assert callback.summary["peak_flops"] >= 0.8 * tp.measure_matmul_flops(cpu, torch.float32)
    assert 0 < callback.summary["mfu"] < 1


def test_energy_is_unavailable_without_a_gpu():
    assert NvmlEnergy([torch.device("cpu")]).joules() is None


class Tagger(pl.LightningModule):
    def __init__(self, clock: Tick | None = None):
        super().__init__()
        self.embed = nn.Embedding(50, 8)
        self.head = nn.Linear(8, 3)
        self.clock = clock

    def training_step(self, batch, batch_idx):
        h = self.embed(batch["input_ids"]) * batch["attention_mask"][..., None]
        return F.cross_entropy(self.head(h.sum(1)), batch["labels"])

    def validation_step(self, batch, batch_idx):
        if self.clock is not None:
            self.clock.now += 10.0  # validation takes 10 s, which must not count as training time

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _samples(n: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        mask = torch.arange(LEN) < 2 + i % (LEN - 1)  # 2..6 real tokens
        out.append({"input_ids": torch.randint(1, 50, (LEN,), generator=g) * mask, "attention_mask": mask,
                    "labels": torch.tensor(i % 3)})
    return out


class Watts:
    """An energy counter with NVML's interface: joules since the start of ``clock`` at a constant power."""

    handles = ["gpu"]

    def __init__(self, clock, watts: float = 100.0):
        self.clock, self.watts = clock, watts

    def joules(self):
        return self.watts * self.clock.now  # reads the clock without advancing it


@pytest.mark.parametrize(("joules", "want"), [(30.0, 10.0), (0.0, NA), (None, NA)])
def test_energy_per_step_is_unavailable_when_the_counter_did_not_advance(joules, want):
    # NVML refreshes its counter every few tens of ms: a short run reads the same value at both ends.
    callback = Throughput()
    callback._joules = joules  # over the training stretches; None: none was measured
    assert callback._energy_per_step(3) == want


def test_callback_in_a_fit_reports_exact_numbers_from_its_clock(tmp_path):
    steps = 5
    data = _samples(steps * BATCH)
    loader = DataLoader(data, batch_size=BATCH)
    clock = Tick(0.5)
    callback = Throughput(clock=clock, peak_flops=1e9, window_size=2)
    model = Tagger(clock)
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(accelerator="cpu", max_steps=steps, default_root_dir=tmp_path, logger=CSVLogger(tmp_path),
                         enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
                         num_sanity_val_steps=0, val_check_interval=2, limit_val_batches=1, log_every_n_steps=1,
                         callbacks=[callback])
    trainer.fit(model, loader, DataLoader(data[:BATCH], batch_size=BATCH))
    s = callback.summary
    # Every read advances 0.5 s: each timed batch waits 0.5 s for data and runs 0.5 s; the two validations
    # in between are left out, and the first batch is warm-up.
    timed = steps - 1
    tokens = sum(int(d["attention_mask"].sum()) for d in data[BATCH:])
    assert s["batches_timed"] == timed
    assert s["samples_per_s"] == BATCH  # one batch per second
    assert s["tokens_per_s"] == tokens / timed
    assert s["between_steps_fraction"] == 0.5 and s["between_steps_ms_mean"] == 500.0
    assert s["data_wait_fraction"] == NA  # torch's DataLoader does not time its next()
    assert s["step_time_ms"] == {"mean": 500.0, "p50": 500.0, "p90": 500.0, "p99": 500.0}
    # FLOPs counted during the first batch equal Lightning's measure_flops of one forward and backward.
    first = next(iter(DataLoader(data, batch_size=BATCH)))
    fresh = Tagger()
    expected_flops = measure_flops(fresh, lambda: fresh.training_step(first, 0), lambda loss: loss)
    assert s["flops_per_batch"] == expected_flops > 0
    assert s["mfu"] == pytest.approx(expected_flops / 1.0 / 1e9)  # one batch per second
    assert s["peak_flops"] == 1e9 and s["energy_j_per_step"] == NA
    logged = (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text()
    header, *rows = [line.split(",") for line in logged.splitlines()]
    column = header.index("throughput/step_time_ms")
    assert {float(r[column]) for r in rows if r[column]} == {500.0}
    assert "throughput/device/samples_per_sec" in header


def _fit(tmp_path, model, callbacks, steps, val_check_interval=None, **trainer_kwargs):
    """A CPU fit of ``steps`` optimizer steps over ``_samples``, validating one batch every ``val_check_interval``
    batches (never when ``None``); no logger, progress bar or checkpoints."""
    batches = steps * trainer_kwargs.get("accumulate_grad_batches", 1)
    data = _samples(batches * BATCH)
    val = {"val_check_interval": val_check_interval, "limit_val_batches": 1} if val_check_interval else \
        {"limit_val_batches": 0}
    trainer = pl.Trainer(accelerator="cpu", max_steps=steps, default_root_dir=tmp_path, logger=False,
                         enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
                         num_sanity_val_steps=0, callbacks=callbacks, **val, **trainer_kwargs)
    val_data = DataLoader(data[:BATCH], batch_size=BATCH) if val_check_interval else None
    trainer.fit(model, DataLoader(data, batch_size=BATCH), val_data)
    return trainer


class Attender(pl.LightningModule):
    """Embedding, a bias-free projection to queries, keys and values, SDPA over the padding mask, a bias-free head."""

    E, H, C = 8, 2, 3

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, self.E)
        self.qkv = nn.Linear(self.E, 3 * self.E, bias=False)
        self.head = nn.Linear(self.E, self.C, bias=False)

    def training_step(self, batch, batch_idx):
        b, t = batch["input_ids"].shape
        q, k, v = self.qkv(self.embed(batch["input_ids"])).view(b, t, 3, self.H, -1).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=batch["attention_mask"][:, None, None, :])
        return F.cross_entropy(self.head(y.transpose(1, 2).reshape(b, t, self.E).mean(1)), batch["labels"])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_flops_counted_on_a_cpu_include_attention(tmp_path):
    # torch's counter has no formula for its CPU flash-attention kernels: attention counted 0 FLOPs on a CPU.
    callback = Throughput(peak_flops=1e9)
    _fit(tmp_path, Attender(), [callback], steps=2)
    b, t, e, h, c = BATCH, LEN, Attender.E, Attender.H, Attender.C
    projection, head = 2 * b * t * e * 3 * e, 2 * b * e * c  # (b t, e) @ (e, 3e) and (b, e) @ (e, c)
    bmm = 2 * b * h * t * t * (e // h)  # one (t, d) @ (d, t) or (t, t) @ (t, d) product per batch row and head
    # Linear layers: forward, gradient of the input, gradient of the weight. Attention: q k^T and p v forward;
    # backward the gradients dv, dp, dq and dk, and q k^T again, which the flash kernel recomputes (torch counts
    # its GPU kernels' backward so).
    assert callback.summary["flops_per_batch"] == 3 * (projection + head) + 2 * bmm + 5 * bmm


def test_attention_ops_a_torch_lacks_or_counts_itself_are_left_to_it(monkeypatch):
    monkeypatch.setitem(tp._CPU_ATTENTION, "_no_such_attention_op", tp._sdpa_forward_flops)
    cpu_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    monkeypatch.setitem(tp.flop_counter.flop_registry, cpu_flash, lambda *args, **kwargs: 1)
    assert list(tp.cpu_attention_formulas()) == [torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward]


def test_flops_leave_out_the_forward_activation_checkpointing_recomputes(tmp_path):
    data = DataLoader(SyntheticSequences(2 * BATCH, min_len=4, max_len=12, seed=0), batch_size=BATCH,
                      collate_fn=pad_collate)
    counted = []
    for checkpoint in ((), True):
        torch.manual_seed(0)
        task = ClassificationTask(BertClassifier(hidden=16, layers=2, heads=2, dropout=0.0), num_classes=4)
        callback = Throughput(peak_flops=1e9)
        split = PipelineSplit(micro_batches=2, checkpoint=checkpoint, split_on_one_device=True)
        pl.Trainer(accelerator="cpu", max_steps=2, default_root_dir=tmp_path, logger=False, enable_progress_bar=False,
                   enable_checkpointing=False, enable_model_summary=False, limit_val_batches=0,
                   callbacks=[split, callback]).fit(task, data)
        counted.append(callback.summary["flops_per_batch"])
    # Recomputing every stage's forward in backward is the price of the memory saved, not the model's work: with
    # it counted, MFU rose by a third when checkpointing was turned on.
    assert counted[1] == counted[0] > 0


class FusedStem(pl.LightningModule):
    """A fused Conv-BatchNorm-ReLU-MaxPool block and a Linear head; keeps each step's loss."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem = ConvBNReLUPool2d(3, 8, 3, padding=1, pool_kernel_size=2)
        self.head = nn.Linear(8 * 8 * 8, 5)
        self.losses = {}

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.head(self.stem(x).flatten(1)), y)
        self.losses[self.global_step] = loss.item()
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit_fused_stem(root, steps, ckpt_path=None):
    g = torch.Generator().manual_seed(0)
    # Two batches an epoch: the checkpoint at step 2 ends an epoch, where a resumed fit's loader starts again.
    data = TensorDataset(torch.randn(2 * BATCH, 3, 16, 16, generator=g), torch.randint(0, 5, (2 * BATCH,), generator=g))
    model, callback = FusedStem(), Throughput(tokens_key=None, peak_flops=1e9)
    pl.Trainer(accelerator="cpu", max_steps=steps, default_root_dir=root, logger=False, enable_progress_bar=False,
               enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
               callbacks=[callback, ModelCheckpoint(root / "ckpt", "{step}", every_n_train_steps=2, save_top_k=-1)],
               ).fit(model, DataLoader(data, batch_size=BATCH), ckpt_path=ckpt_path)
    return model.losses, callback.summary["flops_per_batch"]


def test_a_resumed_fit_of_a_fused_block_trains_bit_for_bit_as_the_uninterrupted_one(tmp_path):
    # The FLOP counter's module hooks made the fused block call its torch modules one by one in the counted batch,
    # each fit's first: a fit resumed at step 2 computed its step 2 with other bits than the uninterrupted fit.
    whole, flops = _fit_fused_stem(tmp_path / "whole", 4)
    resumed, resumed_flops = _fit_fused_stem(tmp_path / "resumed", 4, tmp_path / "whole" / "ckpt" / "step=2.ckpt")
    assert resumed == {step: loss for step, loss in whole.items() if step >= 2}
    # Counted fused, the block still counts its convolution: forward and weight gradient (the batch needs none),
    # and the head's forward, input and weight gradients.
    conv, head = 2 * BATCH * 8 * 16 * 16 * 3 * 3 * 3, 2 * BATCH * 8 * 8 * 8 * 5
    assert flops == resumed_flops == 2 * conv + 3 * head


class SlowStart(Tagger):
    """A first batch (the warm-up: kernel selection, FLOP counting) 100 s longer on the clock."""

    def training_step(self, batch, batch_idx):
        if self.global_step == 0 and batch_idx == 0:
            self.clock.now += 100.0
        return super().training_step(batch, batch_idx)


def test_a_step_holding_the_warm_up_batch_is_left_out_of_step_times_and_energy(tmp_path, monkeypatch):
    clock = Tick(0.5)
    monkeypatch.setattr(tp, "NvmlEnergy", lambda devices: Watts(clock, 100.0))
    callback = Throughput(clock=clock, peak_flops=1e9)
    _fit(tmp_path, SlowStart(clock), [callback], steps=4, accumulate_grad_batches=2)
    s = callback.summary
    # Every read advances 0.5 s: a step runs 1.5 s (batch, gap, batch) after a 0.5 s gap. The first step holds
    # the warm-up batch; its second batch is timed, but the step is not.
    assert s["step_time_ms"] == {"mean": 1500.0, "p50": 1500.0, "p90": 1500.0, "p99": 1500.0}
    assert s["energy_j_per_step"] == 100.0 * 2.0  # 100 W over each of the 3 timed steps' 2 s


@pytest.mark.parametrize(("count_flops", "timed"), [(True, 2), (False, 3)])
def test_with_no_warm_up_the_batch_whose_flops_are_counted_is_not_timed(tmp_path, count_flops, timed):
    # The FLOP counter's batch runs far slower (here 100 s longer): with warmup_batches=0 it was timed.
    clock = Tick(0.5)
    callback = Throughput(clock=clock, peak_flops=1e9, warmup_batches=0, count_flops=count_flops)
    _fit(tmp_path, SlowStart(clock) if count_flops else Tagger(clock), [callback], steps=3)
    s = callback.summary
    assert s["batches_timed"] == timed
    assert s["step_time_ms"]["p99"] == 500.0


def test_energy_per_step_leaves_out_validation(tmp_path, monkeypatch):
    clock = Tick(0.5)
    monkeypatch.setattr(tp, "NvmlEnergy", lambda devices: Watts(clock, 100.0))
    callback = Throughput(clock=clock, peak_flops=1e9)
    _fit(tmp_path, Tagger(clock), [callback], steps=5, val_check_interval=2)
    # Each timed step waits 0.5 s and runs 0.5 s, at 100 W; each validation's 10 s is not training.
    assert callback.summary["energy_j_per_step"] == 100.0
    assert describe(callback.summary).endswith("MFU 0.0%, GPU energy 100.00 J/step")


def test_with_accumulation_between_steps_is_the_time_between_steps_only(tmp_path):
    callback = Throughput(clock=Tick(0.5), peak_flops=1e9, warmup_batches=2)  # the first step is the warm-up
    _fit(tmp_path, Tagger(), [callback], steps=4, accumulate_grad_batches=2)
    s = callback.summary
    # Each of the 3 timed steps: a 0.5 s gap before it, then batch, gap, batch, 0.5 s each: 2 s in all.
    assert s["step_time_ms"]["mean"] == 1500.0
    assert s["between_steps_ms_mean"] == 500.0 and s["between_steps_fraction"] == 0.5 / 2
    assert s["within_steps_ms_mean"] == 500.0 and s["within_steps_fraction"] == 0.5 / 2
    assert 3 * s["step_time_ms"]["mean"] / 1000 / (3 * 2) + s["between_steps_fraction"] == 1.0
    assert "between steps 25.0%, gaps within steps 25.0%" in describe(s)


class CompiledHead(nn.Module):
    """A module of this file's code (dynamo skips torch.nn's own frames as entry points), compiled in place."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(8, 3)

    def forward(self, h):
        return torch.tanh(self.linear(h))


def test_counting_flops_leaves_a_compiled_model_compiled(tmp_path):
    # Under the FLOP counter's dispatch mode dynamo marks the code it meets never to be compiled: the first batch
    # counted that way left every later batch of a compiled model eager.
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model = Tagger()
    model.head = CompiledHead()
    model.head.compile(backend="aot_eager")
    callback = Throughput(peak_flops=1e9)
    pl.Trainer(accelerator="cpu", max_steps=4, default_root_dir=tmp_path, logger=False, enable_progress_bar=False,
               enable_checkpointing=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
               callbacks=[callback]).fit(model, DataLoader(_samples(4 * BATCH), batch_size=BATCH))
    assert callback.summary["flops_per_batch"] > 0
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1


class UnhookedAtStep2(Tagger):
    """A compiled head whose linear layer's forward hook is removed at step 2: dynamo guards on a module's hooks, so
    the head recompiles there, as after ``MemoryProfiler`` removes the hooks of its step 0."""

    def __init__(self):
        super().__init__()
        self.head = CompiledHead()
        self.head.compile(backend="eager")
        self.hook = self.head.linear.register_forward_hook(lambda module, args, output: None)

    def training_step(self, batch, batch_idx):
        if self.global_step == 2:
            self.hook.remove()
        return super().training_step(batch, batch_idx)


def test_a_step_during_which_torch_compile_recompiles_is_left_out_and_counted(tmp_path, monkeypatch):
    torch._dynamo.reset()
    clock = Tick(0.5)
    monkeypatch.setattr(tp, "NvmlEnergy", lambda devices: Watts(clock, 100.0))
    callback = Throughput(clock=clock, peak_flops=1e9, count_flops=False)
    _fit(tmp_path, UnhookedAtStep2(), [callback], steps=5)
    s = callback.summary
    # Step 0 compiles (the warm-up: not counted), step 2 recompiles; steps 1, 3 and 4 are timed, 1 s each with the
    # gap before them, at 100 W.
    assert s["batches_timed"] == 3 and s["compiling_steps_left_out"] == 1
    assert s["energy_j_per_step"] == 100.0
    assert describe(s).endswith("1 compiling steps left out")


def test_a_step_that_compiles_in_its_last_micro_batch_is_left_out_whole():
    meter = ThroughputMeter(clock=Tick(0.5), warmup_batches=0)
    meter.start()
    for step in range(3):  # step 1 compiles in its second micro-batch
        for micro in range(2):
            meter.batch_start(data_wait=0.0)
            meter.batch_end(samples=BATCH, step_done=micro == 1, compiled=step == 1 and micro == 1)
    assert meter.compiled_steps == 1 and meter.batches == 4 and meter.samples == 4 * BATCH
    assert meter.step_times == [1.5, 1.5] and meter.between_steps == [0.5, 0.5] and meter.data_waits == [0.0] * 4
    assert meter.summary()["compiling_steps_left_out"] == 1


class SlowSecondBatch(Tagger):
    """A first step whose second micro-batch runs 100 s longer on the clock (where a compiled model's first compile
    lands when the warm-up batch counted FLOPs eagerly)."""

    def training_step(self, batch, batch_idx):
        if self.global_step == 0 and batch_idx == 1:
            self.clock.now += 100.0
        return super().training_step(batch, batch_idx)


def test_with_accumulation_samples_per_second_covers_the_steps_the_step_times_do(tmp_path):
    # The rest of the step holding the warm-up batch was timed for samples/s but not for the step times: its slow
    # batch put samples/s far below what the steps' times give.
    clock = Tick(0.5)
    callback = Throughput(clock=clock, peak_flops=1e9)
    _fit(tmp_path, SlowSecondBatch(clock), [callback], steps=4, accumulate_grad_batches=2)
    s = callback.summary
    # Each of the 3 timed steps: a 0.5 s gap, then batch, gap, batch, 0.5 s each.
    assert s["batches_timed"] == 6 and s["step_time_ms"]["p99"] == 1500.0
    assert s["samples_per_s"] == 2 * BATCH / 2.0


class LossTagger(Tagger):
    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.log("train_loss", loss)
        return loss


@pytest.mark.parametrize(("accumulate", "every"), [(1, 1), (1, 2), (2, 1)])
def test_logged_rows_share_the_step_of_the_loss(tmp_path, accumulate, every):
    # Lightning files training_step metrics under the optimizer step a batch belongs to; so do these.
    trainer = pl.Trainer(accelerator="cpu", max_steps=6, default_root_dir=tmp_path, logger=CSVLogger(tmp_path),
                         enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
                         log_every_n_steps=every, accumulate_grad_batches=accumulate, callbacks=[Throughput()])
    trainer.fit(LossTagger(), DataLoader(_samples(6 * accumulate * BATCH), batch_size=BATCH))
    logged = (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text()
    header, *rows = [line.split(",") for line in logged.splitlines()]
    step, loss, rate = header.index("step"), header.index("train_loss"), header.index("throughput/step_time_ms")
    loss_steps = {int(r[step]) for r in rows if r[loss]}
    rate_steps = {int(r[step]) for r in rows if r[rate]}
    assert rate_steps and rate_steps <= loss_steps, (loss_steps, rate_steps)
    assert loss_steps - rate_steps <= {0}  # only the warm-up step has a loss and no rate
    assert all(any(r[i] for i in range(len(r)) if i != step and header[i] != "epoch") for r in rows)  # no empty rows


def test_with_accumulation_one_row_is_logged_per_optimizer_step(tmp_path):
    # Each micro-batch wrote a row under the same step, repeating the previous step's time. Step 0 holds the
    # warm-up batch and is left out whole: no row until a step is timed.
    trainer = pl.Trainer(accelerator="cpu", max_steps=3, default_root_dir=tmp_path, logger=CSVLogger(tmp_path),
                         enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
                         log_every_n_steps=1, accumulate_grad_batches=4, callbacks=[Throughput(window_size=2)])
    trainer.fit(Tagger(), DataLoader(_samples(3 * 4 * BATCH), batch_size=BATCH))
    logged = (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text()
    header, *rows = [line.split(",") for line in logged.splitlines()]
    step, batches = header.index("step"), header.index("throughput/batches")
    assert [(int(r[step]), float(r[batches])) for r in rows if r[batches]] == [(1, 4.0), (2, 8.0)]


def test_log_every_n_steps_zero_logs_nothing_and_keeps_the_summary(tmp_path):
    callback = Throughput(peak_flops=1e9)
    trainer = pl.Trainer(accelerator="cpu", max_steps=3, default_root_dir=tmp_path, logger=CSVLogger(tmp_path),
                         enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
                         log_every_n_steps=0, callbacks=[callback])  # Lightning's "never log": was ZeroDivisionError
    trainer.fit(Tagger(), DataLoader(_samples(3 * BATCH), batch_size=BATCH))
    assert callback.summary["batches_timed"] == 2
    metrics = tmp_path / "lightning_logs" / "version_0" / "metrics.csv"
    assert not metrics.exists() or "throughput/" not in metrics.read_text()


@pytest.mark.cuda
def test_callback_on_a_gpu_times_real_work(tmp_path):
    data = _samples(6 * BATCH)
    callback = Throughput()
    pl.Trainer(accelerator="gpu", devices=1, max_steps=6, logger=False, default_root_dir=tmp_path,
               enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
               limit_val_batches=0, callbacks=[callback]).fit(Tagger(), DataLoader(data, batch_size=BATCH))
    s = callback.summary
    assert s["batches_timed"] == 5 and s["samples_per_s"] > 0 and s["step_time_ms"]["p50"] > 0
    assert s["peak_flops"] > 1e12 and 0 < s["mfu"] < 1
    assert s["energy_j_per_step"] == NA or s["energy_j_per_step"] > 0


@pytest.mark.parametrize(("kwargs", "message"), [({"window_size": 1}, "window_size must be >= 2 batches, got 1"),
                                                 ({"warmup_batches": -1}, "warmup_batches must be >= 0, got -1")])
def test_settings_that_cannot_measure_are_refused_when_made(kwargs, message):
    """window_size=1 met a bare AssertionError inside Lightning at fit start."""
    with pytest.raises(ValueError, match=message):
        tp.Throughput(**kwargs)


def test_steps_a_profiler_instruments_are_left_out_of_every_number(tmp_path):
    from hetrain.callbacks import MemoryProfiler
    from hetrain.callbacks.profiling import StepTrace

    callback = Throughput(clock=Tick(0.5), peak_flops=1e9)
    # The memory profiler hooks step 0 (the warm-up) and profiles step 2 for churn; StepTrace traces step 4.
    others = [MemoryProfiler(module_every_n_steps=100, churn_steps=[2]), StepTrace(4, dirpath=tmp_path)]
    _fit(tmp_path, Tagger(), [callback, *others], steps=6)
    s = callback.summary
    # Timed: steps 1, 3 and 5, each 0.5 s. Each follows a profiled step (the warm-up step is hooked too), and
    # of the time after one only the loader's fetch counts, which torch's DataLoader does not time: 0.
    assert s["batches_timed"] == 3 and s["instrumented_steps_left_out"] == 2  # the warm-up step is not counted
    assert s["step_time_ms"]["mean"] == 500.0 and s["step_time_ms"]["p99"] == 500.0
    assert s["samples_per_s"] == 3 * BATCH / 1.5
    assert s["between_steps_fraction"] == 0.0
    assert "2 profiled steps left out" in describe(s)


def test_a_profiled_step_holding_the_warm_up_batch_is_not_counted_as_left_out():
    """Under accumulation a step's last batch was past the warm-up while the step held it, and the step counted."""
    meter = ThroughputMeter(clock=Tick(0.5), warmup_batches=1)
    meter.start()
    for step in range(3):  # step 0 holds the warm-up batch; steps 0 and 2 are profiled
        for micro in range(2):
            meter.batch_start(instrumented=step != 1)
            meter.batch_end(samples=BATCH, step_done=micro == 1)
    assert meter.instrumented_steps == 1 and len(meter.step_times) == 1


def test_a_first_batch_the_module_skips_leaves_no_flop_counter_after_the_fit(tmp_path):
    """Lightning skips the rest of an epoch when the LightningModule's on_train_batch_start returns -1: the FLOP
    counter opened for epoch 0's first batch was never closed, and epoch 1 stacked a second one on it, so a
    dispatch mode, torch.compile's force_eager stance and global module hooks outlived the fit."""
    from torch.nn.modules import module as torch_module
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

    class SkipsFirstEpoch(Tagger):
        def on_train_batch_start(self, batch, batch_idx):
            return -1 if self.current_epoch == 0 else None

    counted = []
    for model in (Tagger(), SkipsFirstEpoch()):
        callback = Throughput(peak_flops=1e9)
        _fit(tmp_path, model, [callback], steps=2)
        counted.append(callback.summary["flops_per_batch"])
        assert _get_current_dispatch_mode_stack() == []
        assert torch._dynamo.eval_frame._stance.stance == "default"  # torch has no public getter
        assert not torch_module._global_forward_hooks and not torch_module._global_forward_pre_hooks
    assert counted[1] == counted[0] != NA  # the batch that ran was counted, the skipped one not


class TwoLoaders(Tagger):
    """Trains on a batch of several loaders: Lightning gives one entry per loader, shaped as its loaders are."""

    def training_step(self, batch, batch_idx):
        parts = batch.values() if isinstance(batch, dict) else batch
        return sum(Tagger.training_step(self, part, batch_idx) for part in parts)


@pytest.mark.parametrize("combine", [lambda a, b: {"a": a, "b": b}, lambda a, b: [a, b]], ids=["dict", "list"])
def test_a_batch_of_several_loaders_counts_the_samples_and_tokens_of_each(tmp_path, combine):
    """Samples were looked for one level deep: the batch of train_dataloaders={"a": ..., "b": ...} stopped the fit."""
    steps, other = 3, 2  # loader b's batches hold 2 samples
    data_a, data_b = _samples(steps * BATCH), _samples(steps * other)
    callback = Throughput(clock=Tick(0.5), peak_flops=1e9, count_flops=False)
    trainer = pl.Trainer(accelerator="cpu", max_steps=steps, default_root_dir=tmp_path, logger=False,
                         enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
                         limit_val_batches=0, callbacks=[callback])
    trainer.fit(TwoLoaders(), combine(DataLoader(data_a, batch_size=BATCH), DataLoader(data_b, batch_size=other)))
    s = callback.summary
    # Every read advances 0.5 s: each timed batch (not the first, warm-up) takes 1 s with the gap before it.
    assert s["batches_timed"] == steps - 1
    assert s["samples_per_s"] == BATCH + other
    tokens = sum(int(d["attention_mask"].sum()) for d in data_a[BATCH:] + data_b[other:])
    assert s["tokens_per_s"] == tokens / (steps - 1)


class Wrapped:
    """A batch of a type nothing looks into (a graph library's batch, say)."""

    def __init__(self, batch):
        self.batch = batch


class Unwrapping(Tagger):
    def training_step(self, batch, batch_idx):
        return super().training_step(batch.batch, batch_idx)


def test_a_batch_with_nothing_to_count_samples_from_trains_on_and_says_so_once(tmp_path, caplog):
    """A measuring callback stopped the fit: no tensor in the batch to count samples from."""
    steps = 4
    callback = Throughput(clock=Tick(0.5), peak_flops=1e9, count_flops=False, window_size=2)
    loader = DataLoader(_samples(steps * BATCH), batch_size=BATCH,
                        collate_fn=lambda rows: Wrapped(torch.utils.data.default_collate(rows)))
    trainer = pl.Trainer(accelerator="cpu", max_steps=steps, default_root_dir=tmp_path, logger=CSVLogger(tmp_path),
                         log_every_n_steps=1, enable_progress_bar=False, enable_checkpointing=False,
                         enable_model_summary=False, limit_val_batches=0, callbacks=[callback])
    with caplog.at_level("WARNING"):
        trainer.fit(Unwrapping(), loader)
    assert trainer.global_step == steps
    s = callback.summary
    assert s["batches_timed"] == steps - 1 and s["step_time_ms"]["p99"] == 500.0
    assert s["samples_per_s"] == NA and "samples/s n/a" in describe(s)
    assert len([r for r in caplog.records if "no tensor with a batch dimension" in r.message]) == 1
    header = (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "throughput/device/batches_per_sec" in header and not [h for h in header if "samples" in h]


class SkipsFirstBatch(Tagger):
    """Skips its first batch (returns None, as for a bad batch): no backward runs there."""

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return None if batch_idx == 0 else loss


@pytest.mark.parametrize("accumulate", [1, 2])
def test_flops_are_counted_on_the_first_batch_that_runs_a_backward(tmp_path, accumulate):
    """A first batch without a backward gave its forward alone as every batch's FLOPs (MFU a third too low)."""
    steps = 3
    callback = Throughput(clock=Tick(0.5), peak_flops=1e9)
    _fit(tmp_path, SkipsFirstBatch(), [callback], steps=steps, accumulate_grad_batches=accumulate)
    first = next(iter(DataLoader(_samples(BATCH), batch_size=BATCH)))
    fresh = Tagger()
    expected = measure_flops(fresh, lambda: fresh.training_step(first, 0), lambda loss: loss)
    assert callback.summary["flops_per_batch"] == expected > 0
    # The counted batch, the second, runs under the counter: warm-up too.
    assert callback.summary["batches_timed"] == steps * accumulate - 2


class TinyLM(pl.LightningModule):
    """Embedding, a projection and a vocabulary head: torch's ``nn.Linear`` + ``F.cross_entropy`` or hetrain's fused
    ``LinearCrossEntropyHead``, the same matmuls either way. ``reduction="none"``: per-token losses, averaged."""

    H, V = 8, 40

    def __init__(self, fused, reduction="mean"):
        super().__init__()
        self.fused, self.reduction = fused, reduction
        self.embed, self.proj = nn.Embedding(self.V, self.H), nn.Linear(self.H, self.H)
        self.head = LinearCrossEntropyHead(self.H, self.V, reduction=reduction) if fused else nn.Linear(self.H, self.V)

    def training_step(self, batch, batch_idx):
        ids = batch["input_ids"]
        hidden = torch.tanh(self.proj(self.embed(ids[:, :-1]))).flatten(0, 1)
        target = ids[:, 1:].flatten()
        if self.fused:
            return self.head(hidden, target).mean()
        return F.cross_entropy(self.head(hidden), target, reduction=self.reduction).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_flops_of_the_fused_linear_cross_entropy_head_are_those_of_linear_and_cross_entropy(tmp_path, reduction):
    # Its float32 weight gradient is an in-place addmm_, which torch's counter has no formula for: MFU a third low.
    # reduction="none" recomputes the logits in backward: left out, as activation checkpointing's recompute is.
    batch = {"input_ids": torch.randint(0, TinyLM.V, (BATCH, LEN), generator=torch.Generator().manual_seed(0))}
    counted = []
    for fused in (False, True):
        callback = Throughput(peak_flops=1e9, tokens_key=None)
        pl.Trainer(accelerator="cpu", max_steps=2, default_root_dir=tmp_path, logger=False, enable_progress_bar=False,
                   enable_checkpointing=False, enable_model_summary=False, limit_val_batches=0,
                   callbacks=[callback]).fit(TinyLM(fused, reduction), DataLoader([batch, batch], batch_size=None))
        counted.append(callback.summary["flops_per_batch"])
    rows, h, v = BATCH * (LEN - 1), TinyLM.H, TinyLM.V
    # Each linear layer: forward, gradient of its input, gradient of its weight.
    assert counted[1] == counted[0] == 3 * 2 * rows * h * (h + v)


@pytest.mark.parametrize(("op", "twin"), [
    (lambda c, a, b: c.addmm_(a[0], b[0]), lambda c, a, b: torch.addmm(c, a[0], b[0])),
    (lambda c, a, b: c.expand(3, 4, 6).clone().baddbmm_(a, b), lambda c, a, b: torch.baddbmm(c, a, b)),
    (lambda c, a, b: torch.addbmm(c, a, b), lambda c, a, b: torch.baddbmm(c, a, b)),
    (lambda c, a, b: c.addbmm_(a, b), lambda c, a, b: torch.baddbmm(c, a, b)),
])
def test_matmuls_torch_does_not_count_are_counted_as_their_counted_twins(op, twin):
    c, a, b = torch.zeros(4, 6), torch.randn(3, 4, 5), torch.randn(3, 5, 6)
    counts = []
    for f in (op, twin):
        with tp.TrainingFlopCounter() as counter:
            f(c.clone(), a, b)
        counts.append(counter.get_total_flops())
    assert counts[0] == counts[1] > 0


def test_matmuls_a_torch_lacks_or_counts_itself_are_left_to_it(monkeypatch):
    monkeypatch.setitem(tp._MATMUL_TWINS, "_no_such_matmul_", "addmm")
    monkeypatch.setitem(tp.flop_counter.flop_registry, torch.ops.aten.addmm_, lambda *args, **kwargs: 1)
    assert set(tp.matmul_formulas()) == {torch.ops.aten.baddbmm_, torch.ops.aten.addbmm, torch.ops.aten.addbmm_}


class PerToken(pl.LightningModule):
    """FLOPs in proportion to rows x length: a projection and a head applied to every token."""

    def __init__(self):
        super().__init__()
        self.embed, self.proj, self.head = nn.Embedding(50, 8), nn.Linear(8, 16), nn.Linear(16, 3)

    def training_step(self, batch, batch_idx):
        logits = self.head(torch.relu(self.proj(self.embed(batch["input_ids"]))))
        return F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _token_batch(rows, length):
    g = torch.Generator().manual_seed(rows * 100 + length)
    return {"input_ids": torch.randint(1, 50, (rows, length), generator=g),
            "labels": torch.randint(0, 3, (rows, length), generator=g)}


@pytest.mark.parametrize("shapes", [[(2, 3), (4, 6), (4, 6), (2, 3), (4, 6)],
                                    [(4, 6), (2, 3), (4, 6), (4, 6), (2, 3)]])
def test_flops_and_mfu_sum_each_batch_own_flops_whatever_shape_came_first(tmp_path, shapes):
    """A token-budget sampler's small leftover batch, counted first, gave its FLOPs to every batch: MFU 14x low."""
    batches = [_token_batch(*shape) for shape in shapes]
    callback = Throughput(clock=Tick(0.5), peak_flops=1e9, tokens_key=None)
    trainer = pl.Trainer(accelerator="cpu", max_steps=len(batches), default_root_dir=tmp_path, logger=False,
                         enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
                         limit_val_batches=0, callbacks=[callback])
    trainer.fit(PerToken(), DataLoader(batches, batch_size=None))
    fresh = PerToken()
    each = [measure_flops(fresh, lambda b=b: fresh.training_step(b, 0), lambda loss: loss) for b in batches]
    assert each[0] != each[1]
    s = callback.summary
    assert s["flops_per_batch"] == pytest.approx(sum(each) / len(each))
    # The first batch, counted, is warm-up; every other batch is timed for 1 s.
    assert s["batches_timed"] == len(batches) - 1
    assert s["mfu"] == pytest.approx(sum(each[1:]) / (len(batches) - 1) / 1e9)


def test_input_elements_are_the_token_ids_else_the_largest_tensor():
    ids = torch.zeros(3, 7, dtype=torch.long)
    assert tp.input_elements({"labels": torch.zeros(3), "input_ids": ids, "mask": ids.float()}) == 21
    assert tp.input_elements(Pair(torch.zeros(2, 3, 4, 4), torch.zeros(2, dtype=torch.long))) == 96
    assert tp.input_elements(["no tensor"]) is None


@pytest.mark.parametrize("first", [{"labels": torch.zeros(4, 1, dtype=torch.long)},
                                   {"position_ids": torch.arange(512)[None]}])
def test_input_elements_are_the_token_ids_whatever_tensor_is_listed_first(first):
    """Labels (B, 1) or position_ids (1, L) listed ahead of the ids were taken for them: two batches of one token
    budget, 64 x 32 and 4 x 512, got FLOPs 16x apart."""
    for rows, length in [(64, 32), (4, 512)]:
        ids = torch.zeros(rows, length, dtype=torch.long)
        assert tp.input_elements({**first, "input_ids": ids}) == 2048
        assert tp.input_elements({**first, "ids": ids}) == 2048  # no key known: the largest token ids
        assert tp.input_elements({**first, "tokens": ids.float()}, tokens_key="tokens") == 2048


def test_input_elements_of_images_and_a_label_column_are_the_pixels():
    assert tp.input_elements((torch.zeros(4, 3, 64, 64), torch.zeros(4, 1, dtype=torch.long))) == 4 * 3 * 64 * 64


def test_input_elements_of_per_sample_token_ids_are_all_of_their_tokens():
    """A list of unpadded samples counted its longest alone."""
    assert tp.input_elements([torch.zeros(100, dtype=torch.long), torch.zeros(300, dtype=torch.long)]) == 400
    assert tp.input_elements({"input_ids": [torch.zeros(5, dtype=torch.long)] * 3, "labels": torch.zeros(3)}) == 15


class Unwalked(list):
    """A batch's list of raw strings that fails when walked item by item."""

    def __iter__(self):
        raise AssertionError("walked a list of strings")


def test_input_elements_do_not_walk_a_list_of_strings():
    """Each of a batch's 4096 raw strings was visited, milliseconds a batch."""
    ids = torch.zeros(4, 7, dtype=torch.long)
    assert tp.input_elements({"ids": ids, "text": Unwalked(["some text"] * 4096)}) == 28


class NamedTokens(PerToken):
    """PerToken reading its ids under ``tokens``, beside each row's candidates: more columns than the ids."""

    def training_step(self, batch, batch_idx):
        return super().training_step({"input_ids": batch["tokens"], "labels": batch["labels"]}, batch_idx)


def test_flops_scale_with_the_callback_tokens_key(tmp_path):
    """Without the callback's tokens_key, the largest 2-D integer tensor (the candidates, B x 40) scaled FLOPs by rows
    alone."""
    batches = []
    for rows, length in [(2, 3), (4, 6), (2, 3)]:
        batch = _token_batch(rows, length)
        batches.append({"candidates": torch.zeros(rows, 40, dtype=torch.long), "tokens": batch["input_ids"],
                        "labels": batch["labels"]})
    callback = Throughput(clock=Tick(0.5), peak_flops=1e9, tokens_key="tokens")
    trainer = pl.Trainer(accelerator="cpu", max_steps=len(batches), default_root_dir=tmp_path, logger=False,
                         enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
                         limit_val_batches=0, callbacks=[callback])
    trainer.fit(NamedTokens(), DataLoader(batches, batch_size=None))
    fresh = NamedTokens()
    each = [measure_flops(fresh, lambda b=b: fresh.training_step(b, 0), lambda loss: loss) for b in batches]
    assert callback.summary["flops_per_batch"] == pytest.approx(sum(each) / len(each))


class TwoOptimizers(pl.LightningModule):
    """Manual optimization, as a GAN steps: two backward passes and two optimizer steps in every batch."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False
        self.g, self.d = nn.Linear(6, 16), nn.Linear(16, 1)

    def losses(self, batch, optimizers=None):
        x, y = batch
        critic = self.d(self.g(x).detach()).pow(2).mean()
        if optimizers:
            optimizers[1].zero_grad()
            self.manual_backward(critic)
            optimizers[1].step()
        fit = F.mse_loss(self.d(self.g(x)), y)
        if optimizers:
            optimizers[0].zero_grad()
            self.manual_backward(fit)
            optimizers[0].step()
        return critic + fit

    def training_step(self, batch, batch_idx):
        self.losses(batch, self.optimizers())

    def configure_optimizers(self):
        return torch.optim.SGD(self.g.parameters(), lr=0.01), torch.optim.SGD(self.d.parameters(), lr=0.01)


def test_under_manual_optimization_every_backward_of_the_batch_is_counted(tmp_path):
    """The counter closed at the batch's first optimizer step: the second backward, and the forward before it, were
    left out."""
    data = TensorDataset(torch.randn(16, 6), torch.randn(16, 1))
    callback = Throughput(peak_flops=1e9, tokens_key=None)
    trainer = pl.Trainer(accelerator="cpu", max_steps=4, default_root_dir=tmp_path, logger=False,
                         enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
                         limit_val_batches=0, callbacks=[callback])
    trainer.fit(TwoOptimizers(), DataLoader(data, batch_size=BATCH))
    fresh, first = TwoOptimizers(), next(iter(DataLoader(data, batch_size=BATCH)))
    expected = measure_flops(fresh, lambda: fresh.losses(first), lambda loss: loss)
    assert callback.summary["flops_per_batch"] == expected > 0


class SkipsRestOfEpoch(Tagger):
    def on_train_batch_start(self, batch, batch_idx):
        return -1 if batch_idx == 3 else None  # each epoch: batches 0..2 train, then Lightning ends the epoch


def test_a_step_skipped_with_the_rest_of_its_epoch_is_not_timed_into_the_next(tmp_path):
    """The skipped batch's step stayed open: the next epoch's first step was timed from it (twice as long) and its
    batch counted as a gap within a step."""
    callback = Throughput(clock=Tick(0.5), peak_flops=1e9, count_flops=False)
    trainer = _fit(tmp_path, SkipsRestOfEpoch(), [callback], steps=6)
    assert trainer.global_step == 6
    meter = callback.meter
    assert meter.step_times == [0.5] * 5 and meter.within_steps == []
    # Step 2 ends, the skipped batch begins 0.5 s later, and the next epoch's first batch 0.5 s after that.
    assert meter.between_steps == [0.5, 0.5, 1.0, 0.5, 0.5]
    assert "gaps within steps" not in describe(callback.summary)


def test_a_dropped_step_leaves_its_gap_and_fetch_to_the_next_batch():
    # start 0 | batch 1..2 | pause at 3 (validation) | at 10 a batch begins (fetched in 0.5 s) that never runs: its
    # step is dropped | at 20 the next batch begins (fetched in 0.25 s), ends at 21
    meter = ThroughputMeter(Script(0, 1, 2, 3, 10, 20, 21), warmup_batches=0)
    meter.start()
    meter.batch_start(data_wait=0.0)
    meter.batch_end(samples=2)
    meter.pause()
    meter.batch_start(data_wait=0.5)
    meter.drop_step()
    meter.batch_start(data_wait=0.25)
    meter.batch_end(samples=2)
    assert meter.step_times == [1, 1]
    assert meter.between_steps == [1, 1.75]  # 2..3 before the pause, then both fetches
    assert meter.data_waits == [0.0, 0.75]
    assert meter.time == 4.75 and meter.samples == 4


def test_a_second_fit_measures_its_own_energy(tmp_path, monkeypatch):
    """The energy of an earlier fit with the same callback was carried into the next fit's energy per step."""
    clock = Tick(0.5)
    monkeypatch.setattr(tp, "NvmlEnergy", lambda devices: Watts(clock, 100.0))
    callback = Throughput(clock=clock, peak_flops=1e9)
    for fit in range(2):
        _fit(tmp_path / str(fit), Tagger(clock), [callback], steps=3)
        assert callback.summary["energy_j_per_step"] == 100.0, fit  # 100 W over each timed step's 1 s


def test_a_list_of_per_sample_entries_counts_its_length():
    """A dict's labels that are a list of per-image tensors counted the first image's labels (3 for 4 images), and
    torchvision's (images, targets) counted an image's channels."""
    labels = [torch.tensor([1, 2, 7]), torch.tensor([0]), torch.tensor([4, 4]), torch.tensor([5])]
    assert batch_size({"images": torch.zeros(4, 3, 8, 8), "labels": labels}) == 4
    assert batch_size({"labels": labels}) == 4
    targets = [{"boxes": torch.zeros(2, 4), "labels": torch.tensor([1, 2])}] * 4
    assert batch_size(([torch.zeros(3, 8, 8)] * 4, targets)) == 4
    assert batch_size({"x": torch.zeros(4, 6), "extra": torch.zeros(10)}) == 4  # a mapping's values are fields
    # A batch's own tensors may differ in their first dimension: a query's candidates, a broadcast weight.
    assert batch_size((torch.zeros(4, 7), torch.zeros(12, 7))) == 4
    assert batch_size([torch.zeros(4, 5), torch.zeros(1, 5)]) == 4


@pytest.mark.parametrize("sizes", [(BATCH, 2), (BATCH, BATCH)])
def test_loaders_that_yield_bare_tensors_count_each(tmp_path, sizes):
    """Lightning's batch of train_dataloaders=[a, b], each yielding a tensor, is [tensor_a, tensor_b]: taken for a
    merged (x, y), it counted 2 samples a batch, or loader a's alone."""

    class TwoTensors(Tagger):
        def training_step(self, batch, batch_idx):
            return sum(self.head(x).sum() for x in batch)

    steps = 3
    loaders = [DataLoader(torch.randn(steps * n, 8), batch_size=n) for n in sizes]
    callback = Throughput(clock=Tick(0.5), peak_flops=1e9, count_flops=False)
    trainer = pl.Trainer(accelerator="cpu", max_steps=steps, default_root_dir=tmp_path, logger=False,
                         enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
                         limit_val_batches=0, callbacks=[callback])
    trainer.fit(TwoTensors(), loaders)
    assert callback.summary["samples_per_s"] == sum(sizes)  # each timed batch takes 1 s


class MergesLoaders(Tagger):
    """Merges its two loaders' batches into one in on_after_batch_transfer, as the batch the hooks then see."""

    def on_after_batch_transfer(self, batch, dataloader_idx):
        if isinstance(batch, dict):
            return {k: torch.cat([batch["a"][k], batch["b"][k]]) for k in batch["a"]}
        (x_a, y_a), (x_b, y_b) = batch
        return torch.cat([x_a, x_b]), torch.cat([y_a, y_b])

    def training_step(self, batch, batch_idx):
        if isinstance(batch, dict):
            return super().training_step(batch, batch_idx)
        x, y = batch
        return F.cross_entropy(self.head(x), y)


@pytest.mark.parametrize("kind", ["dict", "list"])
def test_loaders_the_module_merges_into_one_batch_count_as_one(tmp_path, kind):
    """The batch was split by the loaders' shape, not its own: a flat dict merged from {"a", "b"} counted 0 samples
    (Lightning stopped the fit) and a merged (x, y) from two loaders counted x and y as two loaders' batches."""
    steps = 3
    if kind == "dict":
        loaders = {"a": DataLoader(_samples(steps * BATCH), batch_size=BATCH),
                   "b": DataLoader(_samples(steps * BATCH), batch_size=BATCH)}
    else:
        data = TensorDataset(torch.randn(steps * BATCH, 8), torch.randint(0, 3, (steps * BATCH,)))
        loaders = [DataLoader(data, batch_size=BATCH), DataLoader(data, batch_size=BATCH)]
    callback = Throughput(clock=Tick(0.5), peak_flops=1e9, count_flops=False)
    trainer = pl.Trainer(accelerator="cpu", max_steps=steps, default_root_dir=tmp_path, logger=False,
                         enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
                         limit_val_batches=0, callbacks=[callback])
    trainer.fit(MergesLoaders(), loaders)
    assert callback.summary["samples_per_s"] == 2 * BATCH  # each timed batch takes 1 s


class PlainBackward(pl.LightningModule):
    """Manual optimization calling loss.backward() itself, not manual_backward: no on_after_backward hook runs."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False
        self.lin = nn.Linear(6, 1)

    def training_step(self, batch, batch_idx):
        optimizer = self.optimizers()
        optimizer.zero_grad()
        x, y = batch
        F.mse_loss(self.lin(x), y).backward()
        optimizer.step()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_under_manual_optimization_a_plain_backward_is_counted_on_the_first_batch(tmp_path):
    """The count waited for on_after_backward, which a plain loss.backward() never calls: every batch ran under the
    FLOP counter and force_eager, none was timed."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

    modes = []

    class Look(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # after the meter's: counting or not
            modes.append(len(_get_current_dispatch_mode_stack()))

    steps = 4
    data = TensorDataset(torch.randn(steps * BATCH, 6), torch.randn(steps * BATCH, 1))
    callback = Throughput(clock=Tick(0.5), peak_flops=1e9, tokens_key=None)
    trainer = pl.Trainer(accelerator="cpu", max_steps=steps, default_root_dir=tmp_path, logger=False,
                         enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
                         limit_val_batches=0, callbacks=[callback, Look()])
    trainer.fit(PlainBackward(), DataLoader(data, batch_size=BATCH))
    assert modes == [1] + [0] * (steps - 1)  # the first batch alone is counted
    assert callback.summary["batches_timed"] == steps - 1
    fresh = PlainBackward()
    x, y = next(iter(DataLoader(data, batch_size=BATCH)))
    assert callback.summary["flops_per_batch"] == measure_flops(fresh, lambda: F.mse_loss(fresh.lin(x), y),
                                                                lambda loss: loss)


def test_loaders_of_which_only_some_have_the_tokens_key_train_on(tmp_path):
    """Lightning's rolling window was given lengths for some batches only (a max_size CombinedLoader whose longer
    loader has the tokens key), and stopped the fit."""
    from pytorch_lightning.utilities import CombinedLoader

    no_mask = [{k: v for k, v in s.items() if k != "attention_mask"} for s in _samples(2 * BATCH)]

    class Either(Tagger):
        def training_step(self, batch, batch_idx):
            parts = [p for p in batch.values() if p is not None]
            return sum(F.cross_entropy(self.head(self.embed(p["input_ids"]).sum(1)), p["labels"]) for p in parts)

    loaders = CombinedLoader({"text": DataLoader(_samples(4 * BATCH), batch_size=BATCH),
                              "ids": DataLoader(no_mask, batch_size=BATCH)}, "max_size")
    callback = Throughput(clock=Tick(0.5), peak_flops=1e9, count_flops=False, window_size=2)
    trainer = pl.Trainer(accelerator="cpu", max_epochs=1, default_root_dir=tmp_path, logger=False,
                         enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
                         limit_val_batches=0, callbacks=[callback])
    trainer.fit(Either(), loaders)
    assert trainer.global_step == 4
    assert callback.summary["tokens_per_s"] == NA
    assert not [k for k in callback.meter.compute() if "items" in k]  # no stale token rate in the logged metrics


def test_the_meter_stops_counting_tokens_at_a_timed_batch_without_them():
    meter = ThroughputMeter(clock=Tick(0.5), window_size=2, warmup_batches=0)
    meter.start()
    for tokens in (8, None, 8):
        meter.batch_start()
        meter.batch_end(4, tokens)
    assert meter.tokens is None and meter.summary()["tokens_per_s"] == NA


@pytest.mark.parametrize(("samples", "tokens", "skewed"), [
    ((1, 1, 1, 1), (0, 3, 3, 3), "device/items_per_sec"),  # the first timed row all padding: fewer tokens than samples
    ((1, 1, 1, 1), (3, 0, 3, 3), "device/items_per_sec"),  # a later one: the tokens did not rise
    ((0, 4, 4, 4), (5, 5, 5, 5), "device/samples_per_sec"),  # a packed batch of no sequence: fewer samples than batches
    ((4, 0, 4, 4), (5, 5, 5, 5), "device/samples_per_sec"),  # a later one: the samples did not rise
])
def test_a_batch_of_no_token_or_no_sample_leaves_out_only_the_rates_it_skews(samples, tokens, skewed):
    """Lightning's window raised a ValueError on counts like these (fewer lengths than samples, fewer samples than
    batches, a count that did not rise): a timed all-padding row, or a packed batch of no sequence, stopped the fit."""
    meter = ThroughputMeter(clock=Tick(0.5), window_size=2, warmup_batches=0)
    meter.start()
    seen = []
    for n, t in zip(samples, tokens, strict=True):
        meter.batch_start()
        meter.batch_end(n, t)  # the batch and the gap before it take 1 s
        seen.append(meter.compute())
    # A rate, where given, is over the counts the window's batches held: the last batch's, per second.
    for i, rates in enumerate(seen[1:], start=1):
        assert rates.get("device/samples_per_sec", samples[i]) == samples[i]
        assert rates.get("device/items_per_sec", tokens[i]) == tokens[i]
    assert skewed not in seen[1] or skewed not in seen[2]  # n/a while the window holds a count fed raised
    assert seen[-1]["device/samples_per_sec"] == samples[-1] and seen[-1]["device/items_per_sec"] == tokens[-1]
    assert seen[-1]["samples"] == sum(samples) and seen[-1]["lengths"] == sum(tokens)
    assert meter.summary()["tokens_per_s"] == sum(tokens) / len(tokens)


def test_a_fit_whose_first_timed_row_is_all_padding_trains_on(tmp_path):
    data = _samples(4)
    data[1]["attention_mask"] = torch.zeros(LEN, dtype=torch.bool)  # the first batch after the warm-up one
    callback = Throughput(peak_flops=1e9, window_size=2)
    trainer = pl.Trainer(accelerator="cpu", max_epochs=1, default_root_dir=tmp_path, logger=False,
                         enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
                         limit_val_batches=0, callbacks=[callback])
    trainer.fit(Tagger(), DataLoader(data, batch_size=1))
    assert trainer.global_step == 4
    assert callback.meter.tokens == sum(int(d["attention_mask"].sum()) for d in data[1:])
    assert callback.summary["tokens_per_s"] > 0


class Rows(Logger):
    """A Lightning logger keeping each row's step and metric names."""

    def __init__(self):
        super().__init__()
        self.rows: list[tuple[int, set[str]]] = []

    @property
    def name(self):
        return "rows"

    @property
    def version(self):
        return 0

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        self.rows.append((step, set(metrics)))

    def steps(self, prefix: str) -> list[int]:
        return [step for step, names in self.rows if any(n.startswith(prefix) for n in names)]


class ManualSteps(pl.LightningModule):
    """Manual optimization stepping ``optimizers`` optimizers (one per layer) on every ``every``-th batch."""

    def __init__(self, optimizers: int, every: int):
        super().__init__()
        self.automatic_optimization = False
        self.a, self.b = nn.Linear(6, 1), nn.Linear(6, 1)
        self.optimizer_count, self.every = optimizers, every

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.mse_loss(self.a(x) + self.b(x), y)
        self.manual_backward(loss)
        self.log("train_loss", loss)
        if (batch_idx + 1) % self.every == 0:
            optimizers = self.optimizers()
            for optimizer in optimizers if isinstance(optimizers, list) else [optimizers]:
                optimizer.step()
                optimizer.zero_grad()

    def configure_optimizers(self):
        if self.optimizer_count == 1:
            return torch.optim.SGD(self.parameters(), lr=0.01)
        return torch.optim.SGD(self.a.parameters(), lr=0.01), torch.optim.SGD(self.b.parameters(), lr=0.01)


@pytest.mark.parametrize("every", [1, 2])
@pytest.mark.parametrize(("optimizers", "step_every"), [(2, 1), (1, 2)])
def test_under_manual_optimization_rows_share_the_step_of_the_loss(tmp_path, optimizers, step_every, every):
    """Rows were filed under global_step - 1, which counts optimizer steps: at steps 3, 5, .. 15 with two optimizers
    and 0..3 stepping every other batch, where the loss of the same 8 batches was at 0..7."""
    logger = Rows()
    data = TensorDataset(torch.randn(8 * BATCH, 6), torch.randn(8 * BATCH, 1))
    trainer = pl.Trainer(accelerator="cpu", max_epochs=1, default_root_dir=tmp_path, logger=logger,
                         log_every_n_steps=every, enable_progress_bar=False, enable_checkpointing=False,
                         enable_model_summary=False, limit_val_batches=0,
                         callbacks=[Throughput(tokens_key=None, peak_flops=1e9, window_size=2)])
    trainer.fit(ManualSteps(optimizers, step_every), DataLoader(data, batch_size=BATCH))
    assert trainer.global_step == 8 * optimizers // step_every
    loss_steps = logger.steps("train_loss")
    assert loss_steps == list(range(every - 1, 8, every))
    # The first step holds the warm-up batch: rows begin when the next step ends, at its last batch.
    assert logger.steps("throughput/") == [s for s in loss_steps if s >= 2 * step_every - 1]
