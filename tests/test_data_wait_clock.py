"""Data wait: hetrain's loaders time their own next(), and Throughput reports it apart from the time between steps.

Sleeping producers give lower bounds that hold on any machine (a sleep never ends early); nothing here
asserts how fast anything is.
"""

from __future__ import annotations

import time
import weakref

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from hetrain.callbacks.throughput import Throughput
from hetrain.data.prefetch import DevicePrefetcher
from hetrain.data.ring import PadInto, RingLoader
from hetrain.data.sampler import TokenBudgetBatchSampler
from hetrain.data.wait_clock import TimedDataLoader, WaitClock

SLEEP = 0.02  # seconds per slow sample


class Slow(Dataset):
    """Samples that each take ``sleep`` seconds to read."""

    def __init__(self, n: int, sleep: float = SLEEP) -> None:
        self.n, self.sleep = n, sleep

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        time.sleep(self.sleep)
        return {"input_ids": torch.arange(1 + i % 4) + 1, "label": i % 3}


class FakeTime:
    """A clock that moves only when told: the producer's and the consumer's work advance it."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_wait_clock_counts_the_time_inside_next_and_not_the_consumers():
    now = FakeTime()

    def items():
        for i in range(3):
            now.now += 1.0  # the producer takes 1 s per item
            yield i

    clock = WaitClock(clock=now)
    out = []
    for item in clock.iterate(items()):
        now.now += 10.0  # the consumer's own work is not waiting for data
        out.append(item)
    assert out == [0, 1, 2]
    assert clock.seconds == 3.0


def test_wait_clock_keeps_no_item_its_consumer_dropped():
    # It kept the last item in a local through the following next(), so a dropped ring batch kept its slot.
    class Item:
        pass

    def items():
        for _ in range(3):
            yield Item()  # an expression, not a local: the source keeps none either

    handed = 0
    for item in WaitClock().iterate(items()):
        dropped = weakref.ref(item)
        del item
        assert dropped() is None, "WaitClock.iterate still references the item its consumer dropped"
        handed += 1
    assert handed == 3


def test_timed_data_loader_is_a_data_loader_that_adds_up_its_waits():
    loader = TimedDataLoader(Slow(6), batch_size=2, collate_fn=lambda items: len(items))
    assert isinstance(loader, DataLoader) and loader.wait_seconds == 0
    assert list(loader) == [2, 2, 2]
    first = loader.wait_seconds
    assert first >= 6 * SLEEP
    list(loader)  # a second epoch adds to the total
    assert loader.wait_seconds >= first + 6 * SLEEP


def test_ring_loader_and_prefetcher_report_the_wait_for_slow_producers():
    n = 24
    sampler = TokenBudgetBatchSampler([1 + i % 4 for i in range(n)], 8, shuffle=False)
    with RingLoader(Slow(n), sampler, collate=PadInto(8, 8), num_workers=2, num_slots=2) as loader:
        prefetch = DevicePrefetcher(loader, "cpu")
        assert sum(len(b["labels"]) for b in prefetch) == n
        # Two producers read n samples of SLEEP seconds each, starting at the first next(), for a consumer that
        # takes no time: it waits for at least half of the reading (a little less for the clock's own reads).
        assert loader.wait_seconds >= 0.9 * n * SLEEP / 2
        assert prefetch.wait_seconds >= loader.wait_seconds  # its next() holds the loader's


class Tagger(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.EmbeddingBag(16, 4)
        self.head = nn.Linear(4, 3)

    def training_step(self, batch, batch_idx):
        time.sleep(SLEEP)  # a step long enough that the fetch is not the whole time between steps
        return F.cross_entropy(self.head(self.embed(batch["input_ids"])), batch["labels"])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def collate(items: list[dict]) -> dict[str, torch.Tensor]:
    ids = torch.nn.utils.rnn.pad_sequence([it["input_ids"] for it in items], batch_first=True)
    return {"input_ids": ids, "labels": torch.tensor([it["label"] for it in items])}


@pytest.mark.parametrize("per_batch", [1, 3])
def test_a_fit_reports_the_loaders_wait_within_the_time_between_steps(tmp_path, per_batch):
    steps = 5
    loader = TimedDataLoader(Slow(steps * per_batch), batch_size=per_batch, collate_fn=collate)
    callback = Throughput(peak_flops=1e9)
    pl.Trainer(accelerator="cpu", max_steps=steps, default_root_dir=tmp_path, logger=False,
               enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
               callbacks=[callback]).fit(Tagger(), loader)
    s = callback.summary
    assert s["batches_timed"] == steps - 1
    # Each timed batch read per_batch slow samples inside the loader's next().
    assert s["data_wait_ms_mean"] >= 1000 * per_batch * SLEEP
    assert s["data_wait_ms_mean"] <= s["between_steps_ms_mean"]
    assert 0 < s["data_wait_fraction"] <= s["between_steps_fraction"] < 1
