"""RingLoader under concurrency: a new epoch after a break, stalls timed per sample, not per batch, closing
while producers read, and states saved between iterations."""

from __future__ import annotations

import gc
import multiprocessing
import sys
import threading
import time
from collections import Counter
from typing import Any

import pytest
import pytorch_lightning as pl
import torch

import hetrain.data.ring as ring_module
from hetrain.data.prefetch import DevicePrefetcher
from hetrain.data.ring import LoaderError, PadInto, RingLoader, StreamBatches
from hetrain.data.sampler import TokenBudgetBatchSampler

pytest.importorskip("hetrain._C")


class Steady(torch.utils.data.Dataset):
    """Every sample takes ``delay`` seconds: quick samples, slow batches. Records which samples were read."""

    def __init__(self, n: int, delay: float = 0.0) -> None:
        self.n, self.delay, self.reads = n, delay, []

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, Any]:
        time.sleep(self.delay)
        self.reads.append(i)
        return {"input_ids": torch.arange(1 + i % 3), "label": i}


class SteadyStream(torch.utils.data.IterableDataset):
    def __init__(self, n: int, delay: float = 0.0) -> None:
        self.n, self.delay = n, delay

    def __iter__(self):
        for i in range(self.n):
            time.sleep(self.delay)
            yield {"input_ids": torch.arange(1 + i % 3), "label": i}


class Plans:
    """A batch sampler with a plan of its own for each epoch."""

    def __init__(self, *plans: list[list[int]]) -> None:
        self.size, self.plans = len(plans[0]), iter(plans)

    def __len__(self) -> int:
        return self.size

    def __iter__(self):
        return iter(next(self.plans))


class _HeldRing:
    """The ring as one producer sees it: its claim of batch ``job`` (first epoch) pauses until ``go`` is set."""

    def __init__(self, ring: Any, job: int, claimed: threading.Event, go: threading.Event) -> None:
        self._ring, self._job, self._claimed, self._go = ring, job, claimed, go

    def claim(self, producer: int, timeout: float) -> tuple[int, int]:
        job, slot = self._ring.claim(producer, timeout)
        if job == self._job and not self._claimed.is_set():
            self._claimed.set()
            self._go.wait(10)
        return job, slot

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ring, name)


class _HeldShared:
    def __init__(self, shared: Any, ring: _HeldRing) -> None:
        self._shared, self.ring = shared, ring

    def __getattr__(self, name: str) -> Any:
        return getattr(self._shared, name)


@pytest.fixture
def held_claim(monkeypatch):
    """Pauses the producer that claims batch 2 of the first epoch right after its claim, before it reads."""
    claimed, go = threading.Event(), threading.Event()
    produce = ring_module._produce

    def held(shared, *args):
        produce(_HeldShared(shared, _HeldRing(shared.ring, 2, claimed, go)), *args)

    monkeypatch.setattr(ring_module, "_produce", held)
    return claimed, go


def break_then_iterate_again(loader: RingLoader, claimed: threading.Event, go: threading.Event) -> list[int]:
    """Breaks out of the first epoch while a producer holds its batch 2, then reads a whole new epoch."""
    for batch in loader:
        del batch
        break
    assert claimed.wait(10), "no producer claimed batch 2"
    release = threading.Timer(0.3, go.set)  # the new epoch starts meanwhile
    release.start()
    try:
        return [label for batch in loader for label in batch["labels"].tolist()]
    finally:
        release.join()


def test_a_stream_iterated_again_after_a_break_loses_no_batch(held_claim):
    # The new epoch's stream was installed before the old epoch drained: the producer of old batch 2 took the
    # new stream's batch 2 and the new epoch ended there with "end of stream".
    with RingLoader(SteadyStream(30), StreamBatches(batch_size=3), collate=PadInto(9, 3), num_workers=2,
                    num_slots=4) as loader:
        assert break_then_iterate_again(loader, *held_claim) == list(range(30))


def test_a_map_style_epoch_after_a_break_leaves_the_old_batch_its_own_samples(held_claim):
    # The old batch 2 read the new plan's batch 2 (samples 21..23, read twice) instead of its own (6..8).
    ds = Steady(30)
    batches = [[i, i + 1, i + 2] for i in range(0, 30, 3)]
    sampler = Plans(batches, batches[::-1])  # the second epoch's batch 2 is samples 21..23
    with RingLoader(ds, sampler, collate=PadInto(9, 3), num_workers=2, num_slots=4) as loader:
        assert sorted(break_then_iterate_again(loader, *held_claim)) == list(range(30))
    reads = Counter(ds.reads)  # the first epoch reached batch 3 at most: every slot was taken
    assert [reads[i] for i in (6, 7, 8, 21, 22, 23)] == [2, 2, 2, 1, 1, 1]


@pytest.mark.parametrize(("workers", "readers"), [(1, 2), (2, 1)])
def test_quick_samples_in_slow_reader_batches_are_no_stall(workers, readers):
    # Progress was noted once per batch and waiting for a busy reader was silence: a 0.6-1.2 s batch of 0.06 s
    # samples was reported stalled after stall_timeout=0.4 s, though threads read it without a word.
    sampler = TokenBudgetBatchSampler([1] * 40, 20, shuffle=False)  # 2 batches of 20 samples
    with RingLoader(Steady(40, delay=0.06), sampler, collate=PadInto(60, 20), num_workers=workers,
                    reader_processes=readers, stall_timeout=0.4) as loader:
        assert [label for batch in loader for label in batch["labels"].tolist()] == list(range(40))


def test_producers_waiting_for_another_to_read_the_stream_are_no_stall():
    # The producer reading the stream held its lock for a whole batch (and those before it), and the others
    # waiting for the lock went silent: reported stalled while every 0.05 s a sample came.
    with RingLoader(SteadyStream(24, delay=0.05), StreamBatches(batch_size=6), collate=PadInto(18, 6),
                    num_workers=3, stall_timeout=0.25) as loader:
        assert [label for batch in loader for label in batch["labels"].tolist()] == list(range(24))


def join_producers() -> None:
    for t in threading.enumerate():
        if t.name.startswith("hetrain-ring-producer"):
            t.join(10)
            assert not t.is_alive(), f"{t.name} did not end"


class Gated(torch.utils.data.Dataset):
    """Sample ``gated`` is read until ``go`` is set (a slow read); sample ``fail`` raises once ``gated`` is being
    read. ``reads`` lists every read begun."""

    def __init__(self, n: int, gated: int, fail: int | None = None) -> None:
        self.n, self.gated, self.fail, self.reads = n, gated, fail, []
        self.entered, self.go = threading.Event(), threading.Event()

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, Any]:
        self.reads.append(i)
        if i == self.gated:
            self.entered.set()
            self.go.wait(10)
        if i == self.fail:
            self.entered.wait(10)
            raise ValueError(f"sample {i} is corrupt")
        return {"input_ids": torch.arange(1 + i % 3), "label": i}


def test_a_closed_loader_reads_no_further_sample_of_the_batch_in_hand():
    # The producer read the other 7 samples of its batch after the stall closed the loader, for nobody.
    ds = Gated(8, gated=0)
    loader = RingLoader(ds, [list(range(8))], collate=PadInto(24, 8), num_workers=1, stall_timeout=0.2)
    with (
        pytest.raises(LoaderError, match="made no progress"),
        pytest.warns(RuntimeWarning, match=r"still reading \(producer 0 at sample 0\)"),
    ):
        next(iter(loader))
    ds.go.set()  # the slow sample returns after the close
    join_producers()
    assert ds.reads == [0]


def test_a_producer_error_is_not_held_up_by_another_producers_slow_sample():
    # Closing after a producer error joined the others for up to stall_timeout (30 s here): the error came only
    # once the other producer's slow sample returned.
    ds = Gated(8, gated=1, fail=0)
    loader = RingLoader(ds, [[0], [1], [2], [3]], collate=PadInto(3, 1), num_workers=2, stall_timeout=30)
    let_go = threading.Timer(5.0, ds.go.set)  # only a loader that waits for the slow sample sees it end
    let_go.start()
    try:
        with (
            pytest.raises(LoaderError, match="at sample 0: ValueError: sample 0 is corrupt"),
            pytest.warns(RuntimeWarning, match=r"still reading \(producer \d at sample 1\)"),
        ):
            next(iter(loader))
        assert not ds.go.is_set(), "the error waited for another producer's slow sample"
    finally:
        let_go.cancel()
        ds.go.set()
    join_producers()


class CollectingPad(PadInto):
    """Runs the garbage collector in the producer thread collating the batch of sample ``at``, once ``go`` is set:
    any allocation in a producer thread may start a collection."""

    def __init__(self, *args: Any, at: int) -> None:
        super().__init__(*args)
        self.at, self.go = at, threading.Event()

    def __call__(self, items: list[dict[str, Any]], out: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
        if items[0]["label"] == self.at:
            self.go.wait(10)
            gc.collect()
        return super().__call__(items, out)


def test_a_loader_collected_in_a_producer_thread_closes_completely(monkeypatch):
    # The finaliser joined the thread it ran in: "cannot join current thread", and the readers were never stopped.
    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    collate = CollectingPad(6, 2, at=2)
    loader = RingLoader(Steady(20), [[i, i + 1] for i in range(0, 20, 2)], collate=collate, num_workers=2,
                        reader_processes=1)
    loader.cycle = loader  # held in a reference cycle, as objects of a Trainer or a DataModule often are
    gc.disable()  # only the producer's collection may collect it
    try:
        batches = iter(loader)
        assert next(batches)["labels"].tolist() == [0, 1]
        del batches, loader
        collate.go.set()
        join_producers()
    finally:
        gc.enable()
    assert [u.exc_value for u in unraisable] == []
    assert multiprocessing.active_children() == []


def test_closing_while_a_producer_finishes_its_sample_raises_nothing_of_its_own(monkeypatch):
    # Closing looked through the producers still reading while one whose sample just returned dropped out of them:
    # "dictionary changed size during iteration" replaced the LoaderError or KeyboardInterrupt being raised.
    loader = RingLoader(Steady(4), [[0], [1]], collate=PadInto(3, 1), num_workers=2)
    shared = loader._shared
    shared.reading.update({0: "at sample 1", 1: "at sample 2"})

    def finishing_now() -> bool:  # producer 1's sample returns just as closing asks after producer 0
        shared.reading.pop(1, None)
        return True

    monkeypatch.setattr(shared.threads[0], "is_alive", finishing_now)
    with pytest.warns(RuntimeWarning, match=r"still reading \(producer 0 at sample 1\);"):
        loader.close()


class Tiny(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(1, 1)

    def training_step(self, batch: dict[str, torch.Tensor], index: int) -> torch.Tensor:
        return self.lin(batch["input_ids"].float().mean().view(1, 1)).sum()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)


class StatesAtEpochStart(pl.Callback):
    """What a checkpoint saved in ``on_train_epoch_start`` records for the loader, per epoch."""

    def __init__(self) -> None:
        self.states: dict[int, dict[str, Any]] = {}

    def on_train_epoch_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self.states[trainer.current_epoch] = trainer.train_dataloader.state_dict()


def steady_loader(prefetch: bool) -> RingLoader | DevicePrefetcher:
    sampler = TokenBudgetBatchSampler([1 + i % 3 for i in range(40)], 6, seed=0)
    loader = RingLoader(Steady(40), sampler, collate=PadInto(6, sampler.max_batch_rows), num_workers=1)
    return DevicePrefetcher(loader, "cpu") if prefetch else loader


def close(loader: RingLoader | DevicePrefetcher) -> None:
    (loader.loader if isinstance(loader, DevicePrefetcher) else loader).close()


@pytest.mark.parametrize("prefetch", [False, True])
def test_a_state_saved_at_an_epochs_start_resumes_that_whole_epoch(prefetch):
    # Lightning calls the sampler's set_epoch itself, then on_train_epoch_start: the loader still counted the
    # last epoch's batches, so the state said epoch 1 was over and a resume skipped it.
    loader, record = steady_loader(prefetch), StatesAtEpochStart()
    pl.Trainer(accelerator="cpu", max_epochs=2, callbacks=[record], logger=False, enable_checkpointing=False,
               enable_progress_bar=False, enable_model_summary=False).fit(Tiny(), train_dataloaders=loader)
    close(loader)
    assert [{k: s[k] for k in ("epoch", "position", "offset", "steps")} for s in record.states.values()] == \
        [{"epoch": e, "position": 0, "offset": 0, "steps": 0} for e in (0, 1)]
    resumed, fresh = steady_loader(prefetch), TokenBudgetBatchSampler([1 + i % 3 for i in range(40)], 6, seed=0)
    resumed.load_state_dict(record.states[1])
    fresh.set_epoch(1)
    assert [b["labels"].tolist() for b in resumed] == list(fresh)  # the whole of epoch 1
    close(resumed)


@pytest.mark.parametrize("prefetch", [False, True])
def test_a_state_saved_right_after_loading_one_is_that_state(prefetch):
    # It was position 0 of the epoch: a second resume replayed the batches the first run had consumed. A loader
    # that had run counted its own batches on top of the loaded position.
    first = steady_loader(prefetch)
    batches = iter(first)
    next(batches), next(batches)
    earlier = first.state_dict()
    for _ in range(3):
        next(batches)
    saved = first.state_dict()
    del batches
    assert (earlier["position"], saved["position"]) == (2, 5)
    first.load_state_dict(earlier)
    assert first.state_dict() == earlier
    close(first)
    second = steady_loader(prefetch)
    second.load_state_dict(saved)
    assert second.state_dict() == saved
    close(second)
