"""RingLoader over an IterableDataset: stream order, batch size and token budget, errors, every epoch anew."""

from __future__ import annotations

import gc
import subprocess
import sys
import threading
import time

import pytest
import torch
from test_data_ring import consume_in_a_thread
from torch.utils.data import IterableDataset

from hetrain.data.ring import LoaderError, PadInto, RingLoader, StreamBatches, _Stream
from hetrain.data.synthetic import SyntheticSequences

pytest.importorskip("hetrain._C")


class Stream(IterableDataset):
    """The synthetic sequences read front to back, as a file or a network source would give them."""

    def __init__(self, size: int, fail_at: int | None = None, seed: int = 0) -> None:
        self.data = SyntheticSequences(size=size, vocab_size=64, num_classes=3, min_len=3, max_len=30, seed=seed)
        self.fail_at = fail_at

    def __iter__(self):
        for i in range(len(self.data)):
            if i == self.fail_at:
                raise OSError(f"connection reset after sample {i}")
            yield self.data[i]


@pytest.mark.parametrize(("batch_size", "max_tokens", "workers"), [(7, None, 1), (None, 96, 3), (5, 64, 2)])
def test_batches_follow_the_stream_within_their_bounds_every_epoch(batch_size, max_tokens, workers):
    stream = Stream(203)
    batcher = StreamBatches(batch_size=batch_size, max_tokens=max_tokens)
    expected = list(batcher(iter(stream)))
    with RingLoader(stream, batcher, collate=PadInto(96 if max_tokens else 7 * 30, 7 if batch_size else 96),
                    num_workers=workers) as loader:
        for _ in range(2):  # each epoch reads the stream anew
            got = [{k: v.clone() for k, v in b.items()} for b in loader]
            assert len(got) == len(expected)
            for batch, items in zip(got, expected, strict=True):
                assert batch["labels"].tolist() == [int(item["label"]) for item in items]
                for row, item in zip(batch["input_ids"], items, strict=True):
                    assert row[: len(item["input_ids"])].tolist() == torch.as_tensor(item["input_ids"]).tolist()
                rows, cols = batch["input_ids"].shape
                assert batch_size is None or rows <= batch_size
                assert max_tokens is None or rows * cols <= max_tokens
    assert sum(len(items) for items in expected) == 203


class Blank(IterableDataset):
    """Samples without tokens (blank lines of a text stream), then one with tokens."""

    def __iter__(self):
        for i in range(12):
            yield {"input_ids": torch.zeros(0, dtype=torch.int64), "label": i}
        yield {"input_ids": torch.ones(2, dtype=torch.int64), "label": 12}


def test_samples_without_tokens_close_a_batch_at_max_batch_rows():
    # A token budget never filled by empty samples: all twelve made one batch, past the slot's max_batch_rows.
    batcher = StreamBatches(max_tokens=8)
    assert [len(b) for b in batcher(iter(Blank()))] == [8, 4, 1]
    with RingLoader(Blank(), batcher, collate=PadInto(8, batcher.max_batch_rows), num_workers=1) as loader:
        assert [b["labels"].tolist() for b in loader] == [list(range(8)), list(range(8, 12)), [12]]


def test_a_stream_has_no_length_and_no_resume_position():
    with RingLoader(Stream(20), StreamBatches(batch_size=4), collate=PadInto(120, 4)) as loader:
        with pytest.raises(TypeError, match="no length"):
            len(loader)
        with pytest.raises(TypeError, match="no position to resume from"):
            loader.state_dict()
    with pytest.raises(ValueError, match="StreamBatches"):
        RingLoader(Stream(20), [[0, 1]], collate=PadInto(120, 4))


def test_an_error_in_the_stream_reaches_the_loop_after_the_batches_before_it():
    baseline = threading.active_count()
    loader = RingLoader(Stream(50, fail_at=23), StreamBatches(batch_size=4), collate=PadInto(120, 4), num_workers=2)
    seen = 0
    with pytest.raises(LoaderError, match="batch 5 reading the stream: OSError: connection reset after sample 23"):
        for batch in loader:
            seen += len(batch["labels"])
    assert seen == 20  # five whole batches came through before the one that failed
    deadline = time.monotonic() + 5
    while threading.active_count() > baseline and time.monotonic() < deadline:
        time.sleep(0.05)
    assert threading.active_count() == baseline


@pytest.mark.parametrize("workers", [1, 3])
def test_a_sample_over_the_token_budget_is_named(workers):
    # Repeated: with several producers, the one that reads the bad batch may be reading ahead for a later one.
    for _ in range(20 if workers > 1 else 1):
        with RingLoader(Stream(30), StreamBatches(max_tokens=10), collate=PadInto(10, 10),
                        num_workers=workers) as loader:
            with pytest.raises(LoaderError, match="exceeds max_tokens=10"):
                list(loader)


@pytest.mark.parametrize("error", [ValueError, SystemExit])  # SystemExit: sys.exit() in the source, not an Exception
def test_a_stream_that_raises_fails_every_batch_from_there_whoever_read_it(error):
    def batches():
        yield [1]
        yield [2]
        raise error("bad sample")

    stream = _Stream(iter(()), lambda samples: batches(), threading.Event())
    assert stream.batch(0, progress=lambda: None) == [1]
    with pytest.raises(error, match="bad sample"):
        stream.batch(3, progress=lambda: None)  # a producer reading ahead: batch 1 is kept, batch 2 raises
    assert stream.batch(1, progress=lambda: None) == [2]
    with pytest.raises(error, match="bad sample"):
        stream.batch(2, progress=lambda: None)  # not None: the broken generator is not the stream's end


class ExitingStream(IterableDataset):
    """Calls sys.exit() at sample ``at``: a SystemExit, which is not an Exception."""

    def __init__(self, at: int) -> None:
        self.at = at

    def __iter__(self):
        for i in range(100):
            if i == self.at:
                sys.exit("the stream called sys.exit")
            yield {"input_ids": torch.arange(1 + i % 3), "label": i}


def test_sys_exit_in_the_stream_reaches_the_loop_instead_of_hanging_it():
    # It ended the reading producer's thread without a word, its batch never came: with stall_timeout=inf the
    # consumer waited forever.
    loader = RingLoader(ExitingStream(at=9), StreamBatches(batch_size=4), collate=PadInto(12, 4), num_workers=2,
                        stall_timeout=float("inf"))
    seen, raised = consume_in_a_thread(loader)
    assert len(raised) == 1, "the stream ended early, as if exhausted, without an error"
    assert "batch 2 reading the stream: SystemExit: the stream called sys.exit" in str(raised[0])
    assert seen == list(range(8))


_STREAM_TO_ITS_END = """
import torch
from torch.utils.data import IterableDataset
from hetrain.data.ring import PadInto, RingLoader, StreamBatches

class Five(IterableDataset):
    def __iter__(self):
        for i in range(5):
            yield {"input_ids": [1] * (i + 1), "label": i}

with RingLoader(Five(), StreamBatches(batch_size=2), collate=PadInto(16, 2), num_workers=2) as loader:
    print([batch["labels"].tolist() for batch in loader])
"""


def test_a_stream_ends_normally_with_cpp_stack_traces_on(monkeypatch):
    # torch then appends a C++ backtrace to every error's text: the end-of-stream marker no longer matched exactly,
    # and the end of the stream became a LoaderError. torch reads the setting once, hence a process of its own.
    monkeypatch.setenv("TORCH_SHOW_CPP_STACKTRACES", "1")
    monkeypatch.setenv("TORCH_DISABLE_ADDR2LINE", "1")  # unsymbolized frames: the backtrace, without the wait
    run = subprocess.run([sys.executable, "-c", _STREAM_TO_ITS_END], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[[0, 1], [2, 3], [4]]"


class GatedStream(IterableDataset):
    """Sample ``gated`` takes until ``go`` is set to come (a slow source); ``reads`` lists every read begun."""

    def __init__(self, n: int, gated: int) -> None:
        self.n, self.gated, self.reads, self.go = n, gated, [], threading.Event()

    def __iter__(self):
        for i in range(self.n):
            self.reads.append(i)
            if i == self.gated:
                self.go.wait(10)
            yield {"input_ids": torch.arange(1 + i % 3), "label": i}


def test_a_closed_loader_pulls_no_further_sample_from_the_stream():
    # The producer pulled the other 6 samples of its batch after the stall closed the loader, for nobody.
    stream = GatedStream(20, gated=1)
    before = set(threading.enumerate())
    loader = RingLoader(stream, StreamBatches(batch_size=8), collate=PadInto(24, 8), num_workers=1,
                        stall_timeout=0.2)
    with pytest.raises(LoaderError, match="made no progress"):
        next(iter(loader))
    stream.go.set()  # the slow sample comes after the close
    for t in set(threading.enumerate()) - before:  # this loader's producer, not those other tests left
        if t.name.startswith("hetrain-ring-producer"):
            t.join(10)
    assert stream.reads == [0, 1]


class CollectingStream(IterableDataset):
    """Runs the garbage collector in the producer reading sample 8, once ``go`` is set: the stream's lock held."""

    def __init__(self) -> None:
        self.go = threading.Event()

    def __iter__(self):
        for i in range(10_000):
            if i == 8:
                self.go.wait(10)
                gc.collect()
            yield {"input_ids": torch.arange(1 + i % 3), "label": i}


def test_a_loader_collected_by_the_producer_reading_its_stream_stops_the_others_at_once():
    # The other producer waited for the stream's lock, which the collecting producer held while it joined the
    # other: both waited until the join gave up after stall_timeout.
    stream = CollectingStream()
    before = set(threading.enumerate())  # producers other tests left reading are not this loader's
    loader = RingLoader(stream, StreamBatches(batch_size=4), collate=PadInto(12, 4), num_workers=2,
                        stall_timeout=60.0)
    loader.cycle = loader  # held in a reference cycle: only a collection frees it
    gc.disable()
    try:
        batches = iter(loader)
        assert next(batches)["labels"].tolist() == [0, 1, 2, 3]
        del batches, loader
        started = time.monotonic()
        stream.go.set()
        for t in set(threading.enumerate()) - before:
            if t.name.startswith("hetrain-ring-producer"):
                t.join(60)
    finally:
        gc.enable()
    assert time.monotonic() - started < 20  # not the 60 s of stall_timeout


def test_a_batch_read_ahead_is_handed_over_while_its_reader_waits_on_a_slow_sample():
    # The producer of batch 1 read batch 0 on its way, then waited on a slow sample holding the stream's lock: batch
    # 0's producer waited for that lock until the slow sample came, and the consumer with it (the race that also
    # made the collection test above wait 10 s for batch 0 and never collect).
    reading, release = threading.Event(), threading.Event()

    def samples():
        for i in range(12):
            if i == 4:  # batch 1's first sample
                reading.set()
                release.wait(30)
            yield i

    stream = _Stream(samples(), lambda items: iter(lambda: [next(items) for _ in range(4)], None), threading.Event())
    reader = threading.Thread(target=stream.batch, args=(1, lambda: None), daemon=True)
    reader.start()
    try:
        assert reading.wait(10)
        got = []
        taker = threading.Thread(target=lambda: got.append(stream.batch(0, lambda: None)), daemon=True)
        taker.start()
        taker.join(5)
        assert got == [[0, 1, 2, 3]]
    finally:
        release.set()
        reader.join(10)
