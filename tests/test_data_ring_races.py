"""RingLoader under concurrency: a new epoch after a break, and stalls timed per sample, not per batch."""

from __future__ import annotations

import threading
import time
from collections import Counter
from typing import Any

import pytest
import torch

import hetrain.data.ring as ring_module
from hetrain.data.ring import PadInto, RingLoader, StreamBatches
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
