"""The loader benchmark runs end to end in a small size and reports what the targets are judged on."""

import numpy as np
import torch

import hetrain
from benchmarks import bench_loader
from benchmarks.bench_loader import run
from hetrain.data.sampler import TokenBudgetBatchSampler
from hetrain.data.tokens import write_token_file
from hetrain.data.windows import TokenWindows


def test_bench_loader_small_run_reports_throughput_padding_and_the_training_loop():
    saved = []  # what a run cut short after each section would have left on disk
    result = run(docs=300, max_len=64, max_tokens=512, workers=(0,), loop_steps=20, work_ms=1.0, text_samples=40,
                 save=lambda r: saved.append({k: r[k] for k in ("rows", "loop", "python_dataset")}))
    assert [(s["loop"] is None, s["python_dataset"] is None) for s in saved] == [(True, True), (False, True),
                                                                                 (False, False)]
    assert all(s["rows"] == result["rows"] for s in saved) and result["hetrain"] == hetrain.__version__
    assert {"ring", "dataloader_w0"} <= set(result["rows"]) and result["speedup_vs_best_dataloader"] > 0
    assert result["rows"]["ring"]["allocs_per_batch"] == 0  # slots are reused: nothing allocated per batch
    assert 0 <= result["padding"]["token_budget"] < result["padding"]["fixed_size"]
    loop = result["loop"]
    assert set(loop["rows"]) == {"compute_only", "ring", "dataloader_w0"}
    assert loop["rows"]["compute_only"]["data_wait"] == 0
    for name, row in loop["rows"].items():  # raw: a loader's can be below 0 by noise
        assert row["steps_s"] > 0 and row["data_wait"] < 1, (name, row)
    assert loop["rows"]["ring"]["samples_s"] > 0 and ("h2d_gb_s" in loop) == (loop["device"] == "cuda")
    text = result["python_dataset"]
    assert [k.rstrip("0123456789") for k in text["rows"]] == ["ring_threads_", "ring_readers_", "dataloader_w"]
    tokens_per_batch = {round(v["tokens_s"] / v["batches_s"], 6) for v in text["rows"].values()}
    assert len(tokens_per_batch) == 1 and tokens_per_batch.pop() > 0  # the same batches from every loader


def test_assembly_epochs_take_turns_over_rounds(monkeypatch):
    epochs = []  # which loader each pass went over, in order

    class LoggedRing(bench_loader.RingLoader):
        def __iter__(self):
            epochs.append("ring")
            return super().__iter__()

    class LoggedDataLoader(bench_loader.DataLoader):
        def __iter__(self):
            epochs.append(f"dataloader_w{self.num_workers}")
            return super().__iter__()

    monkeypatch.setattr(bench_loader, "RingLoader", LoggedRing)
    monkeypatch.setattr(bench_loader, "DataLoader", LoggedDataLoader)
    result = run(docs=100, max_len=64, max_tokens=512, workers=(0,))
    rounds = result["assembly_rounds"]
    assert rounds >= 3  # the median of 3 leaves one slow epoch out
    # an untimed epoch each, the timed rounds, then the allocation count's pass
    assert epochs == ["ring", "dataloader_w0"] * (1 + rounds + 1)


class FakeClock:
    now = 0.0

    def perf_counter(self) -> float:
        return self.now


class TimedEpochs:
    """A loader of one batch (3 + 5 real tokens) whose passes take the given seconds on ``clock``."""

    def __init__(self, clock: FakeClock, seconds: list[float]) -> None:
        self.clock, self.seconds = clock, iter(seconds)

    def __iter__(self):
        self.clock.now += next(self.seconds)
        yield {"lengths": torch.tensor([3, 5])}


def test_assembly_rates_are_at_each_loaders_median_epoch_leaving_a_slow_one_out(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(bench_loader, "time", clock)
    loaders = {"a": TimedEpochs(clock, [100.0, 2.0, 50.0, 2.0]), "b": TimedEpochs(clock, [9.0, 4.0, 4.0, 80.0])}
    rates = bench_loader.interleaved_epoch_rates(loaders, rounds=3)  # the first pass of each: warm-up, untimed
    assert rates == {"a": (0.5, 4.0), "b": (0.25, 2.0)}


def test_the_training_loop_records_the_steps_it_timed(monkeypatch, tmp_path):
    rng = np.random.default_rng(0)
    windows = TokenWindows(write_token_file(tmp_path / "corpus", [rng.integers(3, 100, n) for n in (40, 60, 20, 50)]),
                           max_len=64)
    sampler = TokenBudgetBatchSampler(windows.lengths, 128, seed=0)
    timed = []  # steps each timed loop ran, per source and round
    real_rate = bench_loader.loop_rate

    def counted(batches, work, device, steps):
        timed.append(steps)
        return real_rate(batches, work, device, steps)

    monkeypatch.setattr(bench_loader, "loop_rate", counted)
    loop = bench_loader.training_loop(windows, sampler, torch.device("cpu"), workers=0, steps=7, work_ms=0.1)
    per_source = sum(timed) // len(loop["rows"])
    assert loop["steps"] == per_source == 5  # 7 steps asked: a step per round of 5, not the 7 asked
