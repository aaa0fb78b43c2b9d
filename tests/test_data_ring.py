"""RingLoader: exact batches, every sample once across ranks, errors named, prompt shutdown, fixed memory."""

from __future__ import annotations

import _thread
import contextlib
import gc
import multiprocessing
import os
import re
import signal
import struct
import subprocess
import sys
import threading
import time
import weakref
from collections import Counter

import numpy as np
import pytest
import torch

from hetrain import cpu_memory, host_copies
from hetrain.data import ring as ring_module
from hetrain.data.ring import CopyInto, LoaderError, PadInto, RingLoader, StreamBatches
from hetrain.data.sampler import TokenBudgetBatchSampler
from hetrain.data.synthetic import SyntheticSequences, pad_collate
from hetrain.data.tokens import TokenFile, write_token_file
from hetrain.data.windows import TokenWindows, token_collate

pytest.importorskip("hetrain._C")


def os_threads() -> int:
    """Threads of this process, C++ ones included."""
    return len(os.listdir("/proc/self/task"))


def settled_threads(target: int, within_s: float = 5.0) -> int:
    """The thread count once it reaches ``target`` (a finished Python thread leaves the OS a moment later)."""
    deadline = time.monotonic() + within_s
    while os_threads() > target and time.monotonic() < deadline:
        time.sleep(0.02)
    return os_threads()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    rng = np.random.default_rng(0)
    lengths = np.minimum(rng.zipf(1.4, 400) * 6, 700)
    docs = [rng.integers(3, 50000, n) for n in lengths]
    return write_token_file(tmp_path_factory.mktemp("tok") / "corpus", docs, itemsize=2)


@pytest.fixture(autouse=True)
def no_leaked_threads():
    # torch starts its intra-op pool and the profiler its thread on first use: start them before counting.
    torch.equal(torch.ones(1 << 18).clone(), torch.ones(1 << 18))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]):
        pass
    gc.collect()
    before = os_threads()
    yield
    gc.collect()
    assert settled_threads(before) <= before, "a loader left threads behind"


def host_allocations(prof) -> int:
    """Tensor allocations seen by the profiler: ops that allocated, none of whose children did."""
    return sum(
        1 for e in prof.events()
        if e.cpu_memory_usage > 0 and not any(c.cpu_memory_usage > 0 for c in e.cpu_children)
    )


def assert_batches_equal(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape, k
        assert torch.equal(got[k], want[k]), k


def test_token_batches_match_the_python_reference_every_epoch(corpus):
    ds = TokenWindows(corpus, max_len=128, stride=100)
    sampler = TokenBudgetBatchSampler(ds.lengths, 1024, seed=4)
    with RingLoader(ds, sampler, num_slots=3, num_workers=2) as loader:
        nbytes = loader.nbytes
        for epoch in range(3):
            sampler.set_epoch(epoch)
            plan = list(sampler)
            batches = list_of_copies(loader)
            assert len(batches) == len(plan) == len(loader)
            for batch, idx in zip(batches, plan, strict=True):
                assert_batches_equal(batch, token_collate([ds[i] for i in idx]))
                assert batch["input_ids"].numel() <= 1024
        assert loader.nbytes == nbytes and loader.pinned_bytes in (0, nbytes)


def list_of_copies(loader):
    """Copies each batch so the slot can be reused (a real consumer drops batches instead)."""
    return [{k: v.clone() for k, v in batch.items()} for batch in loader]


@pytest.mark.parametrize("num_replicas", [1, 3])
def test_every_window_once_per_epoch_across_ranks(corpus, num_replicas):
    ds = TokenWindows(corpus, max_len=64, stride=64)
    for epoch in (0, 1):
        seen, steps = Counter(), set()
        for rank in range(num_replicas):
            sampler = TokenBudgetBatchSampler(ds.lengths, 512, seed=1, num_replicas=num_replicas, rank=rank)
            sampler.set_epoch(epoch)
            with RingLoader(ds, sampler, num_workers=3) as loader:
                n = 0
                for batch in loader:
                    seen.update(batch["sample_ids"].tolist())
                    n += 1
                steps.add(n)
        assert len(steps) == 1
        assert sorted(seen) == list(range(len(ds))) and set(seen.values()) == {1}
    # Windows cover each document's tokens: with stride == max_len, exactly once.
    assert int(ds.lengths.sum()) == corpus.num_tokens


def test_python_collate_path_matches_pad_collate():
    ds = SyntheticSequences(300, min_len=4, max_len=40, seed=2)
    lengths = [len(ds[i]["input_ids"]) for i in range(len(ds))]
    sampler = TokenBudgetBatchSampler(lengths, 256, seed=3)
    plan = list(sampler)
    collate = PadInto(256, sampler.max_batch_rows)
    with RingLoader(ds, sampler, collate=collate, num_workers=3) as loader:
        for batch, idx in zip(list_of_copies(loader), plan, strict=True):
            assert_batches_equal(batch, pad_collate([ds[i] for i in idx]))
    spec = {"input_ids": (torch.int64, 256), "attention_mask": (torch.bool, 256), "labels": (torch.int64, 64)}
    with RingLoader(ds, sampler, collate=CopyInto(pad_collate, spec), num_workers=2) as loader:
        for batch, idx in zip(list_of_copies(loader), plan, strict=True):
            assert_batches_equal(batch, pad_collate([ds[i] for i in idx]))


class Flaky(torch.utils.data.Dataset):
    """Samples 0..n-1 as short sequences; `bad` raises, `slow` sleeps, others take `delay` seconds."""

    def __init__(self, n, bad=None, slow=None, sleep=0.0, delay=0.0):
        self.n, self.bad, self.slow, self.sleep, self.delay = n, bad, slow, sleep, delay

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if i == self.bad:
            raise ValueError(f"sample {i} is corrupt")
        if i == self.slow:
            time.sleep(self.sleep)
        elif self.delay:
            time.sleep(self.delay * (i % 3))
        return {"input_ids": torch.arange(1 + i % 5) + i, "label": i}


def test_a_producer_exception_reaches_the_loop_naming_the_sample():
    ds = Flaky(60, bad=37)
    sampler = TokenBudgetBatchSampler([1 + i % 5 for i in range(60)], 10, shuffle=False)
    loader = RingLoader(ds, sampler, collate=PadInto(10, 10), num_workers=2)
    seen = []
    with pytest.raises(LoaderError, match=r"failed on batch \d+ at sample 37: ValueError: sample 37 is corrupt") as err:
        for batch in loader:
            seen += batch["labels"].tolist()
    assert isinstance(err.value.__cause__, ValueError)
    assert 37 not in seen and len(seen) > 0  # the batches before the bad one arrived
    with pytest.raises(RuntimeError, match="closed"):
        iter(loader).__next__()


class Exits(Flaky):
    """Sample ``at`` raises ``exc``, an exception that is not an Exception (sys.exit() in a dataset, say)."""

    def __init__(self, n, at, exc):
        super().__init__(n)
        self.at, self.exc = at, exc

    def __getitem__(self, i):
        if i == self.at:
            raise self.exc
        return super().__getitem__(i)


def consume_in_a_thread(loader, wait_s: float = 10.0) -> tuple[list[int], list[LoaderError]]:
    """The labels ``loader`` yields and the LoaderError it ends with, read in a thread: a loop that still waits after
    ``wait_s`` fails the test (the loader is closed, ending the wait) instead of hanging it."""
    seen, raised = [], []

    def consume():
        try:
            for batch in loader:
                seen.extend(batch["labels"].tolist())
        except LoaderError as err:
            raised.append(err)

    consumer = threading.Thread(target=consume, daemon=True)
    consumer.start()
    consumer.join(wait_s)
    hung = consumer.is_alive()
    loader.close()
    consumer.join(wait_s)
    assert not hung, "the consumer still waits for the batch whose producer ended"
    return seen, raised


@pytest.mark.parametrize("exc", [SystemExit("the dataset called sys.exit"), KeyboardInterrupt()])
def test_a_base_exception_in_the_dataset_reaches_the_loop_instead_of_hanging_it(exc, monkeypatch):
    # It ended the producer thread without a word: the consumer waited forever (stall_timeout=inf), or reported
    # a stall after stall_timeout.
    failures = []
    monkeypatch.setattr(threading, "excepthook", failures.append)  # no producer may die with a traceback
    loader = RingLoader(Exits(8, at=3, exc=exc), [[0, 1], [2, 3], [4, 5], [6, 7]], collate=PadInto(10, 2),
                        num_workers=2, stall_timeout=float("inf"))
    seen, raised = consume_in_a_thread(loader)
    assert len(raised) == 1 and f"failed on batch 1 at sample 3: {type(exc).__name__}" in str(raised[0]), raised
    assert isinstance(raised[0].__cause__, type(exc))
    assert seen == [0, 1] and failures == []


def test_a_batch_larger_than_the_pad_into_slot_is_named():
    ds = Flaky(20)
    sampler = TokenBudgetBatchSampler([1 + i % 5 for i in range(20)], 10, shuffle=False)
    with RingLoader(ds, sampler, collate=PadInto(6, 10), num_workers=2) as loader:  # the sampler's budget is 10
        with pytest.raises(LoaderError, match=r"in the slot collate: .* does not fit PadInto\(max_tokens=6"):
            list_of_copies(loader)
    with pytest.raises(ValueError, match="positive batch_size"):
        StreamBatches(batch_size=0)


def test_a_copy_into_collate_that_would_lose_values_or_omit_a_field_is_named():
    ds = Flaky(12)
    sampler = TokenBudgetBatchSampler([3] * 12, 12, shuffle=False)

    def halves(items):  # float values for an integer field: copy_ would truncate them
        return {"x": torch.tensor([float(item["input_ids"][0]) + 0.5 for item in items])}

    def wide(items):  # int64 values an int16 field would wrap: 2**40 + i -> i, 70000 -> 4464
        return {"x": torch.tensor([[2**40 + int(item["label"]), 70000] for item in items])}

    for collate, message in ((CopyInto(halves, {"x": (torch.int64, 8)}), r"'x' is torch.float32, which its "
                              r"torch.int64 slot field cannot hold without loss"),
                             (CopyInto(wide, {"x": (torch.int16, 16)}), r"'x' holds values from 70000 to "
                              r"10995116277\d\d, outside the range of its torch.int16 slot field \[-32768, 32767\]"),
                             (CopyInto(halves, {"x": (torch.float32, 8), "y": (torch.int64, 8)}),
                              r"the collate returned no \['y'\] though the spec declares it")):
        with RingLoader(ds, sampler, collate=collate, num_workers=1) as loader:
            with pytest.raises(LoaderError, match=message):
                list_of_copies(loader)


def test_a_copy_into_collate_returning_a_field_that_is_no_tensor_is_named():
    # default_collate leaves a sample's strings a list: "AttributeError: 'list' object has no attribute 'shape'".
    def with_names(items):
        labels = [item["label"] for item in items]
        return {"x": torch.tensor(labels, dtype=torch.float32), "name": [f"doc{i}" for i in labels]}

    sampler = TokenBudgetBatchSampler([3] * 8, 12, shuffle=False)
    with RingLoader(Flaky(8), sampler, collate=CopyInto(with_names, {"x": (torch.float32, 8)}),
                    num_workers=1) as loader:
        with pytest.raises(LoaderError, match=r"collate output 'name' is a list, not a tensor: slots hold tensors "
                                              r"only; drop it from the collate's output, or return it as a tensor "
                                              r"and declare it in spec"):
            list_of_copies(loader)


def test_a_copy_into_collate_refuses_integers_a_float_field_would_round():
    # Only the range was compared: 2**24 + 1 became 16777216.0 in float32 and 257 became 256 in bfloat16, silently.
    def ids(items):
        return {"ids": torch.tensor(items, dtype=torch.int64)}

    for dtype, values, message in ((torch.float32, [5, 2**24 + 1], r"\(such as 16777217\) .* round \(to 16777216\.0\)"),
                                   (torch.bfloat16, [257, 2], r"\(such as 257\) .* round \(to 256\.0\)")):
        out = {"ids": torch.empty(4, dtype=dtype)}
        with pytest.raises(ValueError, match=f"'ids' holds integers {message}"):
            CopyInto(ids, {"ids": (dtype, 4)})(values, out)
        exact = [2**24, -(2**24), 3] if dtype == torch.float32 else [256, -256, 3]  # every integer up to here fits
        CopyInto(ids, {"ids": (dtype, 4)})(exact, out)
        assert out["ids"][:3].tolist() == exact
    out = {"ids": torch.empty(2, dtype=torch.float32)}
    int16 = CopyInto(lambda items: {"ids": torch.tensor(items, dtype=torch.int16)}, {"ids": (torch.float32, 2)})
    int16([-32768, 32767], out)
    assert out["ids"].tolist() == [-32768, 32767]  # float32 holds every int16


def test_a_copy_into_collate_checks_unsigned_integers_too():
    # torch has no min/max for uint16/32/64: every such batch failed with NotImplementedError "aminmax_cpu".
    for src, dst, exact, rounded, message in (
        (torch.uint16, torch.bfloat16, [1000, 1004, 65280], [1000, 257], r"holds integers \(such as 257\) .* round"),
        (torch.uint32, torch.float32, [5, 2**24, 2**32 - 2**8], [2**24 + 1], r"holds integers \(such as 16777217\)"),
        (torch.uint64, torch.float64, [3, 2**53, 2**64 - 2**11], [2**53 + 1],
         r"holds integers \(such as 9007199254740993\)"),
        (torch.uint16, torch.float16, [0, 65504], [65535], r"holds values from 65535 to 65535, outside the range"),
        (torch.uint64, torch.int64, [0, 2**63 - 1], [1, 2**63], r"holds values from 1 to 9223372036854775808, outside"),
    ):
        collate = CopyInto(lambda items, src=src: {"x": torch.tensor(items, dtype=src)}, {"x": (dst, 4)})
        out = {"x": torch.empty(4, dtype=dst)}
        collate(exact, out)
        assert out["x"][: len(exact)].tolist() == exact, (src, dst)
        with pytest.raises(ValueError, match=f"'x' {message}"):
            collate(rounded, out)


def test_a_copy_into_collate_keeps_infinities_and_nan_a_narrower_float_field_holds():
    # min/max of an additive attention bias is -inf: it was refused as "outside the range", though copy_ keeps it.
    inf, nan = float("inf"), float("nan")
    for src, dst, big in ((torch.float32, torch.bfloat16, 3.4e38), (torch.float64, torch.float32, 1e39),
                          (torch.float32, torch.float16, 1e5)):
        collate = CopyInto(lambda items, src=src: {"x": torch.tensor(items, dtype=src)}, {"x": (dst, 4)})
        out = {"x": torch.empty(4, dtype=dst)}
        for values in ([0.0, -inf, 1.5], [inf, -inf], [nan, 2.0, -inf]):
            collate(values, out)
            assert out["x"][: len(values)].tolist() == pytest.approx(values, nan_ok=True), (src, dst, values)
        for values in ([big, -inf], [nan, -big]):  # a finite value out of range is refused beside them too
            with pytest.raises(ValueError, match=r"'x' holds values from .* outside the range"):
                collate(values, out)


class Fractional(torch.utils.data.Dataset):
    """Float token ids or labels, whole (they fit an int64 field) unless ``fraction``."""

    def __init__(self, ids_fraction=0.0, label_fraction=0.0):
        self.ids_fraction, self.label_fraction = ids_fraction, label_fraction

    def __len__(self):
        return 8

    def __getitem__(self, i):
        return {"input_ids": torch.tensor([1.0, 2.0, 3.0]) + self.ids_fraction, "label": 2.0 + self.label_fraction}


@pytest.mark.parametrize(("ds", "message"), [
    (Fractional(ids_fraction=0.5), r"input_ids of row 0 holds non-whole numbers \(such as 1\.5\)"),
    (Fractional(label_fraction=0.9), r"field 'label' holds non-whole numbers \(such as 2\.9\)"),
])
def test_pad_into_refuses_values_it_would_truncate(ds, message):
    sampler = TokenBudgetBatchSampler([3] * 8, 24, shuffle=False)
    with RingLoader(ds, sampler, collate=PadInto(24, 8), num_workers=1) as loader:
        with pytest.raises(LoaderError, match=message):  # copied as 1 and 2 without a word
            list_of_copies(loader)
    with RingLoader(Fractional(), sampler, collate=PadInto(24, 8), num_workers=1) as loader:  # whole floats fit
        batch = list_of_copies(loader)[0]
    assert batch["input_ids"][0].tolist() == [1, 2, 3] and batch["labels"].tolist() == [2] * 8


@pytest.mark.skipif(torch.cuda.is_available(), reason="pinning without CUDA")
def test_pin_memory_without_cuda_warns_and_leaves_the_slots_unpinned():
    # As torch's DataLoader does; the ring failed with torch's raw "pin_memory=True requires a CUDA ...".
    sampler = TokenBudgetBatchSampler([1 + i % 5 for i in range(20)], 10, shuffle=False)
    with pytest.warns(UserWarning, match="pin_memory=True, but CUDA is not available: the ring's slots are not pinned"):
        loader = RingLoader(Flaky(20), sampler, collate=PadInto(10, 10), pin_memory=True)
    with loader:
        assert loader.pinned_bytes == 0 and len(list_of_copies(loader)) == len(sampler)


def test_corrupt_and_truncated_token_files_are_named(tmp_path):
    docs = [np.full(50, 7), np.array([7, 7, 60000, 7]), np.full(30, 7)]
    tf = write_token_file(tmp_path / "c", docs)
    ds = TokenWindows(tf, max_len=64)
    sampler = TokenBudgetBatchSampler(ds.lengths, 64, shuffle=False)  # one window per batch, shortest first
    with pytest.raises(LoaderError, match=r"c\.bin: sample 1 has token id 60000 >= vocab_size 1000 at byte 104"):
        for _ in RingLoader(ds, sampler, vocab_size=1000):
            pass
    data = (tmp_path / "c.bin").read_bytes()
    (tmp_path / "c.bin").write_bytes(data[: 2 * 60])  # cut inside document 1
    ds = TokenWindows(TokenFile(tmp_path / "c", validate=False), max_len=64)
    with pytest.raises(LoaderError, match=r"c\.bin: sample 2 needs tokens \[54, 84\).*truncated or corrupt"):
        for _ in RingLoader(ds, TokenBudgetBatchSampler(ds.lengths, 64, shuffle=False)):
            pass


def test_a_corpus_rebuilt_after_its_windows_were_made_is_refused(tmp_path):
    # The C++ reader opens the path again: it read the rebuilt tokens through the old windows, without an error.
    ds = TokenWindows(write_token_file(tmp_path / "c", [[1] * 6, [2] * 6]), max_len=8)
    write_token_file(tmp_path / "c", [[9] * 4, [8] * 6, [7] * 6])
    with pytest.raises(ValueError, match=r"c\.bin changed since it was opened: .* reopen it"):
        RingLoader(ds, TokenBudgetBatchSampler(ds.lengths, 8, shuffle=False), num_workers=1)


def test_a_corrupt_index_opened_without_validation_is_named_as_a_possible_cause(tmp_path):
    # The ring said only that the windows did not belong to the file, though they came from the file's own index.
    write_token_file(tmp_path / "c", [[1, 2, 3, 4], [5, 6, 7, 8, 9]])
    idx = bytearray((tmp_path / "c.idx").read_bytes())
    struct.pack_into("<Q", idx, len(idx) - 8, 12)  # the last offset, 9 tokens, now points past the tokens
    (tmp_path / "c.idx").write_bytes(bytes(idx))
    ds = TokenWindows(TokenFile(tmp_path / "c", validate=False), max_len=16)
    with pytest.raises(RuntimeError, match=r"window 1 \(start 4, length 8\) lies outside the token file's 9 tokens: "
                                           r"the windows do not belong to this file, or its index is corrupt .*"
                                           r"validate=True"):
        RingLoader(ds, TokenBudgetBatchSampler(ds.lengths, 64, shuffle=False), num_workers=1)


def test_a_stalled_producer_is_named_instead_of_hanging():
    ds = Flaky(40, slow=5, sleep=1.5)
    sampler = TokenBudgetBatchSampler([1 + i % 5 for i in range(40)], 5, shuffle=False)
    loader = RingLoader(ds, sampler, collate=PadInto(5, 5), num_workers=2, stall_timeout=0.3)
    t0 = time.monotonic()
    with (
        pytest.raises(LoaderError, match=r"producer \d made no progress for 0\.\d+ s .*while on batch \d+, sample 5"),
        pytest.warns(RuntimeWarning, match=r"still reading \(producer \d at sample 5\)"),
    ):
        for _ in loader:
            pass
    assert time.monotonic() - t0 < 1.4, "the stall must end the wait near stall_timeout"
    with pytest.raises(RuntimeError, match="closed"):  # shut down; the fixture checks no thread is left
        next(iter(loader))


def test_an_infinite_stall_timeout_never_reports_a_stall_and_closes_cleanly():
    # close() joined the threads for stall_timeout: inf raised OverflowError, spent the finaliser, and the reader
    # processes lived on.
    sampler = TokenBudgetBatchSampler([1 + i % 5 for i in range(20)], 10, shuffle=False)
    loader = RingLoader(Flaky(20), sampler, collate=PadInto(10, 10), num_workers=2, reader_processes=1,
                        stall_timeout=float("inf"))
    assert len(list_of_copies(loader)) == len(sampler)
    loader.close()
    assert multiprocessing.active_children() == []


class Hung(Flaky):
    """Sample ``hang`` waits for ``release``, as a read from a dead network mount would; ``entered`` tells when."""

    def __init__(self, n, hang):
        super().__init__(n)
        self.hang, self.entered, self.release = hang, threading.Event(), threading.Event()

    def __getitem__(self, i):
        if i == self.hang:
            self.entered.set()
            self.release.wait()
        return super().__getitem__(i)


def test_closing_with_an_infinite_stall_timeout_waits_a_bounded_time_for_a_hung_sample(monkeypatch):
    # close() (and garbage collection, and exit) joined the producers for stall_timeout: forever for a hung sample.
    monkeypatch.setattr(ring_module, "_CLOSE_JOIN_MAX_S", 0.5)
    ds = Hung(8, hang=2)
    loader = RingLoader(ds, [[0, 1], [2, 3], [4, 5], [6, 7]], collate=PadInto(10, 2), num_slots=2, num_workers=1,
                        stall_timeout=float("inf"))
    safety = threading.Timer(5.0, ds.release.set)  # ends the old, unbounded wait, so that it fails, not hangs
    safety.start()
    try:
        next(iter(loader))
        assert ds.entered.wait(5.0)
        with pytest.warns(RuntimeWarning, match=r"still reading \(producer 0 at sample 2\)"):
            loader.close()
        assert not ds.release.is_set(), "close() waited for the hung sample"
    finally:
        safety.cancel()
        ds.release.set()


def test_a_stall_is_reported_after_stall_timeout_not_twice_it_and_held_batches_stay_intact():
    # Closing used to wait stall_timeout again for the stuck thread before raising: 2x in all.
    stall = 2.0
    ds = Flaky(40, slow=17, sleep=2.5 * stall)  # still stuck when that second wait would have ended
    sampler = TokenBudgetBatchSampler([1 + i % 5 for i in range(40)], 5, shuffle=False)
    loader = RingLoader(ds, sampler, collate=PadInto(5, 5), num_slots=4, num_workers=2, stall_timeout=stall)
    held: list[tuple[dict, dict]] = []  # the last two batches, alive, with copies of what they held
    t0 = time.monotonic()
    with (
        pytest.raises(LoaderError, match=r"made no progress .* sample 17"),
        pytest.warns(RuntimeWarning, match=r"still reading \(producer \d at sample 17\)"),
    ):
        for batch in loader:
            held = [*held[-1:], (batch, {k: v.clone() for k, v in batch.items()})]
    elapsed = time.monotonic() - t0
    assert stall <= elapsed < 1.8 * stall, f"the stall was reported after {elapsed:.2f} s (stall_timeout={stall} s)"
    for t in threading.enumerate():  # the stuck thread finishes its sample and leaves
        if t.name.startswith("hetrain-ring-producer"):
            t.join(timeout=30)
    assert len(held) == 2 and held[-1][1]["labels"].tolist() == [12]  # batch 8, just before the stuck one
    for batch, copy in held:  # its late collate went into its own slot, not one handed out
        assert_batches_equal(batch, copy)


def test_a_stall_in_a_reader_process_names_the_batch_it_holds_up():
    # The other producer waits for a reader behind it and goes silent too; it was the one named (producer 0 ...
    # batch 6 for a sample of batch 5). The producer silent longest is the one stuck.
    ds = Flaky(40, slow=17, sleep=30.0)
    sampler = TokenBudgetBatchSampler([1 + i % 5 for i in range(40)], 5, shuffle=False)
    stuck = next(job for job, batch in enumerate(sampler) if 17 in batch)
    loader = RingLoader(ds, sampler, collate=PadInto(5, 5), num_workers=2, reader_processes=2, stall_timeout=1.0)
    with pytest.raises(LoaderError, match=rf"made no progress for .* while on batch {stuck}, sample "):
        for _ in loader:
            pass
    assert multiprocessing.active_children() == []


def test_a_stall_in_a_reader_process_names_the_sample_being_read():
    # Reader mode noted only the batch's first sample (16 here), whichever one was stuck.
    ds = Flaky(40, slow=19, sleep=30.0)
    sampler = TokenBudgetBatchSampler([1] * 40, 8, shuffle=False)  # batch 2 is samples 16..23
    loader = RingLoader(ds, sampler, collate=PadInto(40, 8), num_workers=2, reader_processes=2, stall_timeout=1.0)
    with pytest.raises(LoaderError, match=r"made no progress for .* while on batch 2, sample 19$"):
        for _ in loader:
            pass
    assert multiprocessing.active_children() == []


class Unpicklable(Flaky):
    """Sample `hooked` holds a lambda, which a reader process cannot send back."""

    def __init__(self, n, hooked):
        super().__init__(n)
        self.hooked = hooked

    def __getitem__(self, i):
        return {**super().__getitem__(i), "hook": (lambda: None) if i == self.hooked else None}


def test_a_sample_a_reader_cannot_send_back_is_named():
    # The message named the last sample of the reader's share of the batch (15 here), not the one that failed.
    sampler = TokenBudgetBatchSampler([1] * 40, 8, shuffle=False)  # batch 1 is samples 8..15
    loader = RingLoader(Unpicklable(40, hooked=13), sampler, collate=PadInto(40, 8), num_workers=2, reader_processes=2)
    with pytest.raises(LoaderError, match=r"batch 1 in a reader process: RuntimeError: sample 13 cannot be sent back "
                                          r"from the reader process .*: AttributeError: Can't pickle"):
        for _ in loader:
            pass
    assert multiprocessing.active_children() == []


class _FlakyStream(torch.utils.data.IterableDataset):
    """Flaky's samples read front to back."""

    def __init__(self, n):
        self.samples = Flaky(n)

    def __iter__(self):
        return (self.samples[i] for i in range(len(self.samples)))


@pytest.mark.parametrize("stream", [False, True], ids=["map", "stream"])
def test_a_consumer_keeping_all_slots_but_one_gets_every_batch_if_it_drops_each_new_one(stream):
    # The loader's generators kept the batch they last yielded until the next one was ready, so a dropped
    # batch's slot stayed taken and this consumer stalled: "still holds all 3 slots".
    n = 10
    source = _FlakyStream(n) if stream else Flaky(n)
    batches = StreamBatches(batch_size=1) if stream else [[i] for i in range(n)]
    with RingLoader(source, batches, collate=PadInto(5, 1), num_slots=3, num_workers=1, stall_timeout=1) as loader:
        kept, labels = [], []
        for batch in loader:
            labels.append(int(batch["labels"]))
            if len(kept) < 2:  # num_slots - 1, as the loader allows
                kept.append(batch)
            del batch
        assert labels == list(range(n))
        assert [int(b["labels"]) for b in kept] == [0, 1]


def test_holding_every_slot_is_reported():
    ds = Flaky(20)
    sampler = TokenBudgetBatchSampler([1 + i % 5 for i in range(20)], 5, shuffle=False)
    with RingLoader(ds, sampler, collate=PadInto(5, 5), num_slots=2, stall_timeout=0.3) as loader:
        with pytest.raises(LoaderError, match="still holds all 2 slots"):
            list(loader)  # keeps every batch alive


def test_a_second_concurrent_iterator_ends_the_first_instead_of_hanging(corpus):
    ds = TokenWindows(corpus, max_len=64)
    sampler = TokenBudgetBatchSampler(ds.lengths, 256, shuffle=False)
    with RingLoader(ds, sampler, num_workers=2, stall_timeout=5) as loader:
        first, second = iter(loader), iter(loader)
        a, b = next(first), next(second)  # the second restarts the ring's epoch
        with pytest.raises(RuntimeError, match="one iterator at a time"):
            next(first)  # took batch 1 of the second's epoch, then waited forever on batch 1 the second took
        del a
        rest = [batch["sample_ids"].tolist() for batch in second]
        assert [b["sample_ids"].tolist(), *rest] == list(sampler)


def test_close_and_garbage_collection_stop_every_thread(corpus):
    ds = TokenWindows(corpus, max_len=64)
    sampler = TokenBudgetBatchSampler(ds.lengths, 256)
    before = os_threads()
    loader = RingLoader(ds, sampler, num_workers=3)
    assert os_threads() == before + 3
    next(iter(loader))  # abandon mid-epoch with producers busy
    del loader
    gc.collect()
    assert os_threads() == before, "garbage collection must close the ring"


@pytest.fixture
def python_sigint():
    """Python's own Ctrl-C handler, as a user's interpreter has it (library code run before may have swapped it)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.mark.usefixtures("python_sigint")
def test_ctrl_c_stops_the_loader_without_waiting_for_a_slow_sample_and_names_it(monkeypatch):
    failures = []
    monkeypatch.setattr(threading, "excepthook", failures.append)  # a producer must not die with a traceback
    before = os_threads()
    slow = Flaky(30, slow=2, sleep=3.0)  # a dataset read that hangs for a while (a network file system, say)
    sampler = TokenBudgetBatchSampler([1 + i % 5 for i in range(30)], 5, shuffle=False)
    loader = RingLoader(slow, sampler, collate=PadInto(5, 5), num_workers=2, stall_timeout=30)
    timer = threading.Timer(0.2, _thread.interrupt_main)
    timer.start()
    t0 = time.monotonic()
    with pytest.raises(KeyboardInterrupt), pytest.warns(RuntimeWarning, match=r"producer \d at sample 2\b"):
        for _ in loader:
            pass
    assert time.monotonic() - t0 < 1.5, "Ctrl-C must not wait for the sample being read"
    timer.join()
    assert settled_threads(before, within_s=6.0) == before  # the reading thread ends once its sample returns
    assert failures == []


@pytest.mark.usefixtures("python_sigint")
def test_ctrl_c_while_a_new_iteration_drains_the_last_one_does_not_wait_for_its_slow_sample():
    # Iterating again waited inside C++ for the abandoned iteration's batch being filled, out of Ctrl-C's reach:
    # for as long as the sample took (forever with stall_timeout=inf).
    ds = Hung(8, hang=2)
    loader = RingLoader(ds, [[0, 1], [2, 3], [4, 5], [6, 7]], collate=PadInto(10, 2), num_slots=2, num_workers=1,
                        stall_timeout=float("inf"))
    safety = threading.Timer(8.0, ds.release.set)  # ends the old, unbounded wait, so that it fails, not hangs
    safety.start()
    try:
        for batch in loader:  # the producer goes on to batch 1 and hangs in its sample 2
            del batch
            break
        assert ds.entered.wait(5.0)
        timer = threading.Timer(0.3, _thread.interrupt_main)
        timer.start()
        t0 = time.monotonic()
        with pytest.raises(KeyboardInterrupt), pytest.warns(RuntimeWarning, match=r"producer 0 at sample 2\b"):
            next(iter(loader))
        assert time.monotonic() - t0 < 3, "Ctrl-C must not wait for the last iteration's slow sample"
        assert not ds.release.is_set(), "Ctrl-C waited for the hung sample"
        timer.join()
    finally:
        safety.cancel()
        ds.release.set()
        loader.close()


def test_stress_many_tiny_batches_with_slow_and_fast_producers(corpus):
    ds = Flaky(500, delay=0.0005)
    lengths = [1 + i % 5 for i in range(500)]
    sampler = TokenBudgetBatchSampler(lengths, 6, seed=8)
    with RingLoader(ds, sampler, collate=PadInto(6, 6), num_slots=3, num_workers=4) as loader:
        for epoch in range(2):
            sampler.set_epoch(epoch)
            plan = list(sampler)
            held = []
            for batch, idx in zip(loader, plan, strict=True):
                assert batch["labels"].tolist() == idx
                held = [batch, *held][:2]  # keep two batches alive, as a prefetching trainer does
            del held
    windows = TokenWindows(corpus, max_len=8, stride=5)
    sampler = TokenBudgetBatchSampler(windows.lengths, 16, seed=2)
    with RingLoader(windows, sampler, num_slots=2, num_workers=4) as loader:
        for epoch in range(3):
            sampler.set_epoch(epoch)
            seen = Counter(i for batch in loader for i in batch["sample_ids"].tolist())
            assert len(seen) == len(windows) and set(seen.values()) == {1}


@contextlib.contextmanager
def every_host_allocation_counted():
    """Routes every host allocation of torch's CPU allocator, from any thread, through hetrain's block cache and
    yields a function giving how many there were since (the profiler sees only the thread that opened it)."""
    was_on = cpu_memory.stats().enabled
    if not cpu_memory.keep_freed_blocks(min_bytes=1).applied:
        pytest.skip("hetrain's CPU allocator could not be installed here")
    start = cpu_memory.stats()

    def since_start() -> int:
        now = cpu_memory.stats()
        return now.reused + now.mapped - start.reused - start.mapped

    try:
        yield since_start
    finally:
        if was_on:
            cpu_memory.keep_freed_blocks()
        else:
            cpu_memory.system()


def test_no_host_allocation_per_batch_in_steady_state(corpus):
    ds = TokenWindows(corpus, max_len=128)
    sampler = TokenBudgetBatchSampler(ds.lengths, 1024)
    with RingLoader(ds, sampler, num_workers=2) as loader:
        for _ in loader:  # warm-up epoch
            pass
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
            n = sum(1 for _ in loader)
        allocations = host_allocations(prof)
        # The same count sees the allocations of torch's own collate.
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as ref:
            token_collate([ds[0], ds[1]])
        # The producers' threads too: every allocation of any thread, counted by the allocator itself.
        with every_host_allocation_counted() as counted:
            n_all = sum(1 for _ in loader)
            all_threads = counted()
            token_collate([ds[0], ds[1]])
            collate_allocations = counted() - all_threads
    assert n > 10 and allocations == 0, f"{allocations} host allocations over {n} batches"
    assert host_allocations(ref) >= 3
    assert n_all == n and all_threads == 0, f"{all_threads} host allocations over {n} batches, all threads"
    assert collate_allocations >= 3


def test_slot_memory_is_allocated_once_and_reused_over_many_epochs(corpus):
    ds = TokenWindows(corpus, max_len=64, stride=48)
    sampler = TokenBudgetBatchSampler(ds.lengths, 256, seed=1)
    with RingLoader(ds, sampler, num_slots=3, num_workers=2) as loader:
        ring = loader._shared.ring
        assert loader.nbytes == 3 * ring.slot_bytes()
        first = min(v.data_ptr() for v in ring.slot_views(0))
        addresses, batches = set(), 0
        for epoch in range(25):
            sampler.set_epoch(epoch)
            for batch in loader:
                addresses.add(batch["input_ids"].data_ptr())
                batches += 1
        assert loader.nbytes == 3 * ring.slot_bytes()  # nothing grew
    assert batches > 100 and len(addresses) <= 3, f"{len(addresses)} batch addresses over {batches} batches"
    assert all(first <= a < first + loader.nbytes for a in addresses)  # every batch lives in the one slab


def test_resume_on_another_layout_and_worker_count(corpus):
    ds = TokenWindows(corpus, max_len=96, stride=80)
    first = [TokenBudgetBatchSampler(ds.lengths, 800, seed=6, num_replicas=2, rank=r) for r in range(2)]
    states = []
    for s in first:
        s.set_epoch(1)
        with RingLoader(ds, s, num_workers=1, lookahead=1) as loader:
            it = iter(loader)
            for _ in range(5):  # four batches stepped, a fifth fetched ahead (replayed after resuming)
                next(it)
            states.append(loader.state_dict())
    assert states[0] == states[1] and states[0]["position"] == 4 * 2
    consumed = Counter()  # the batches that stepped, per the sampler's own plan
    for s in [TokenBudgetBatchSampler(ds.lengths, 800, seed=6, num_replicas=2, rank=r) for r in range(2)]:
        s.set_epoch(1)
        it = iter(s)
        for _ in range(4):
            consumed.update(next(it))
    for rank in range(3):
        s = TokenBudgetBatchSampler(ds.lengths, 800, num_replicas=3, rank=rank)
        with RingLoader(ds, s, num_workers=3) as loader:
            loader.load_state_dict(states[0])
            loader.set_epoch(1)
            for batch in loader:
                consumed.update(batch["sample_ids"].tolist())
    assert sorted(consumed) == list(range(len(ds))) and set(consumed.values()) == {1}


def test_a_token_file_truncated_while_in_use_is_an_error_not_a_crash(tmp_path):
    # A memory-mapped file cut under a reader kills the process with SIGBUS; the ring reads with pread.
    docs = [np.full(40, 5 + i % 50) for i in range(200)]
    tf = write_token_file(tmp_path / "t", docs)
    ds = TokenWindows(tf, max_len=64)
    sampler = TokenBudgetBatchSampler(ds.lengths, 80, shuffle=False)  # two documents per batch, in file order
    with RingLoader(ds, sampler, num_slots=2, num_workers=1) as loader:
        batches = iter(loader)
        first = next(batches)
        assert first["input_ids"][0, 0] == 5
        del first
        os.truncate(tmp_path / "t.bin", 2 * 40 * 20)  # keep the first 20 documents
        with pytest.raises(LoaderError, match=r"t\.bin: sample \d+ needs tokens .*holds 800 tokens.*truncated"):
            for _ in batches:
                pass


def test_reader_processes_give_the_same_batches_and_name_a_failing_sample():
    ds = SyntheticSequences(120, min_len=4, max_len=40, seed=2)
    lengths = [len(ds[i]["input_ids"]) for i in range(len(ds))]
    sampler = TokenBudgetBatchSampler(lengths, 256, seed=3)
    with RingLoader(ds, sampler, collate=PadInto(256, sampler.max_batch_rows), num_workers=2,
                    reader_processes=2) as loader:
        assert len(multiprocessing.active_children()) == 2
        for epoch in (0, 1):  # the same readers serve every epoch
            sampler.set_epoch(epoch)
            plan = list(sampler)
            for batch, idx in zip(list_of_copies(loader), plan, strict=True):
                assert_batches_equal(batch, pad_collate([ds[i] for i in idx]))
        assert len(multiprocessing.active_children()) == 2
    assert multiprocessing.active_children() == []  # closing ends the readers

    bad = Flaky(60, bad=37)
    sampler = TokenBudgetBatchSampler([1 + i % 5 for i in range(60)], 10, shuffle=False)
    loader = RingLoader(bad, sampler, collate=PadInto(10, 10), num_workers=2, reader_processes=2)
    with pytest.raises(LoaderError, match=r"RuntimeError: sample 37: ValueError: sample 37 is corrupt"):
        for _ in loader:
            pass
    assert multiprocessing.active_children() == []
    with pytest.raises(ValueError, match="reader_processes reads a map-style Dataset"):
        RingLoader(_Stream(), lambda s: iter(()), collate=PadInto(10, 10), reader_processes=1)


def test_a_dataset_error_in_a_reader_process_carries_its_traceback():
    # Only "ValueError: message" came back: where in the dataset it was raised was lost.
    sampler = TokenBudgetBatchSampler([1 + i % 5 for i in range(20)], 10, shuffle=False)
    loader = RingLoader(Flaky(20, bad=7), sampler, collate=PadInto(10, 10), num_workers=1, reader_processes=1)
    with pytest.raises(LoaderError, match=r"RuntimeError: sample 7: ValueError: sample 7 is corrupt") as err:
        list_of_copies(loader)
    cause = str(err.value.__cause__)
    assert isinstance(err.value.__cause__, RuntimeError)
    assert "\nOriginal traceback in the reader process:\nTraceback (most recent call last):\n" in cause
    assert 'in __getitem__\n    raise ValueError(f"sample {i} is corrupt")' in cause
    assert cause.endswith("ValueError: sample 7 is corrupt")


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"num_slots": 1}, "need num_slots >= 2, num_workers >= 1 and reader_processes >= 0, got 1, 2, 0"),
    ({"lookahead": -1}, "lookahead counts batches fetched ahead of their step, >= 0, got -1"),
])
def test_settings_the_ring_cannot_run_with_are_refused(kwargs, message):
    sampler = TokenBudgetBatchSampler([3] * 8, 6, shuffle=False)
    with pytest.raises(ValueError, match=re.escape(message)):
        RingLoader(Flaky(8), sampler, collate=PadInto(6, 2), num_workers=2, **kwargs)


def test_the_ring_binding_refuses_what_would_reach_out_of_bounds(tmp_path):
    # Each of these crashed the process or read out of bounds before (a wrapped slot size, a negative job index,
    # negative sizes, a gather thread as producer -1, decreasing batch offsets).
    ring_class = torch.classes.hetrain_C.RingBuffer
    with pytest.raises(RuntimeError, match="field 0 capacity must be in \\[1, "):
        ring_class(["int64"], [2**61 + 1], 1, 1, False, 5.0)
    ring = ring_class(["int64"], [16], 2, 1, False, 5.0)
    ring.start_epoch(1)
    job, _ = ring.claim(0, 1.0)
    for bad_job in (-1, -2**62 - 1):
        with pytest.raises(RuntimeError, match=f"no batch {bad_job}"):
            ring.commit(0, bad_job, [1, 1, 0, 0])
        with pytest.raises(RuntimeError, match=f"no batch {bad_job}"):
            ring.fail(0, bad_job, "x")
    with pytest.raises(RuntimeError, match="field 0 has size -1 in dim 0"):
        ring.commit(0, job, [2, -1, -1, 0])
    with pytest.raises(RuntimeError, match="holds more elements than the 16 a slot has room for"):
        ring.commit(0, job, [2, 2**32, 2**32, 0])
    ring.commit(0, job, [2, 4, 4, 0])
    assert ring.take(job, 1.0)[0].shape == (4, 4)
    ring.close()
    tokens = tmp_path / "t.bin"
    np.arange(100, dtype=np.uint16).tofile(tokens)
    fields = (["int64", "bool", "int64", "int64"], [64, 64, 4, 4], 2, 1, False, 5.0)
    ring = ring_class(*fields)
    with pytest.raises(RuntimeError, match="gather threads from producer -1 do not fit"):
        ring.attach_tokens(str(tokens), 2, 100, torch.tensor([0]), torch.tensor([5]), 0, 0, 1, -1)
    ring.close()
    ring = ring_class(*fields)
    ring.attach_tokens(str(tokens), 2, 100, torch.tensor([0, 10, 20]), torch.tensor([5, 5, 5]), 0, 0, 1, 0)
    with pytest.raises(RuntimeError, match="batch offsets must rise from 0 to the number of sample ids"):
        ring.start_token_epoch(torch.tensor([0, 1]), torch.tensor([0, 4, 2]))
    ring.close()


def test_the_ring_binding_refuses_sizes_that_would_wrap_int64(tmp_path):
    # A window past int64's end and a batch whose rows x cols wrapped passed the bounds checks: the gather read out
    # of bounds (SIGSEGV). Sizes with a 0 among them passed commit, then take() failed building the views and the
    # slot was never handed back.
    ring_class = torch.classes.hetrain_C.RingBuffer
    tokens = tmp_path / "t.bin"
    np.arange(100, dtype=np.uint16).tofile(tokens)
    fields = (["int64", "bool", "int64", "int64"], [64, 64, 4, 4], 2, 1, False, 5.0)
    for start, length in ((2**62, 2**62), (-1, 5), (96, 5), (0, -1)):
        ring = ring_class(*fields)
        with pytest.raises(RuntimeError, match=f"window 0 \\(start {start}, length {length}\\) lies outside the "
                                               "token file's 100 tokens"):
            ring.attach_tokens(str(tokens), 2, 100, torch.tensor([start]), torch.tensor([length]), 0, 0, 1, 0)
        ring.close()
    ring = ring_class(*fields)  # an index promising 2**61 tokens: 4 rows of 2**61 wrap to -2**63 tokens
    ring.attach_tokens(str(tokens), 2, 2**61, torch.tensor([0]), torch.tensor([2**61]), 0, 0, 1, 0)
    ring.start_token_epoch(torch.tensor([0, 0, 0, 0]), torch.tensor([0, 4]))
    with pytest.raises(RuntimeError, match=f"batch 0 is 4 x {2**61} tokens but a slot holds 4 rows and 64 tokens"):
        ring.take(0, 5.0)
    ring.close()

    ring = ring_class(["int64", "int64"], [16, 16], 2, 1, False, 5.0)
    ring.start_epoch(2)
    job, _ = ring.claim(0, 1.0)
    with pytest.raises(RuntimeError, match="field 0 holds more elements than the 16 a slot has room for"):
        ring.commit(0, job, [3, 0, 2**40, 2**40, 1, 4, 0, 0])
    ring.commit(0, job, [3, 0, 4, 4, 1, 4, 0, 0])  # empty, and its strides fit
    empty, _ = ring.take(job, 1.0)
    assert empty.shape == (0, 4, 4)
    ring.close()


def _in_a_while(fn, *args) -> threading.Thread:
    """Runs ``fn(*args)`` in a thread after 0.2 s, long enough for the caller to start waiting on it."""
    thread = threading.Thread(target=lambda: (time.sleep(0.2), fn(*args)))
    thread.start()
    return thread


def test_the_ring_binding_waits_without_end_for_an_infinite_or_huge_timeout():
    # The deadline wrapped converting to the steady clock: claim and take returned nothing at once.
    for timeout in (float("inf"), 1e10):
        ring = torch.classes.hetrain_C.RingBuffer(["int64"], [16], 2, 1, False, 60.0)
        try:
            starter = _in_a_while(ring.start_epoch, 1)
            claimed = ring.claim(0, timeout)  # waits for the epoch
            starter.join()
            assert claimed == (0, 0), timeout
            committer = _in_a_while(ring.commit, 0, 0, [1, 3, 0, 0])
            batch = ring.take(0, timeout)  # waits for the batch
            committer.join()
            assert [tuple(t.shape) for t in batch] == [(3,)], timeout
        finally:
            ring.close()
    ring = torch.classes.hetrain_C.RingBuffer(["int64"], [16], 2, 1, False, 60.0)
    with pytest.raises(RuntimeError, match="the timeout is NaN"):
        ring.take(0, float("nan"))
    ring.close()


def _silent_producer_ring(stall_timeout: float):
    """A ring whose producer 0 claimed batch 0 and noted sample 7, and then makes no progress."""
    ring = torch.classes.hetrain_C.RingBuffer(["int64"], [16], 2, 1, False, stall_timeout)
    ring.start_epoch(1)
    assert ring.claim(0, 1.0) == (0, 0)
    ring.note(0, 7, -1, -1)
    return ring


def test_a_process_stopped_longer_than_stall_timeout_is_no_stall_on_resume():
    # Ctrl-Z or kill -STOP froze producers and consumer alike, but the stall clock ran on: on SIGCONT the consumer
    # looked before the producer noted progress and raised "producer 0 made no progress for 1.5 s". A forked child
    # polls as RingLoader does for a batch whose producer is silent, and is stopped by a real SIGSTOP for 1.5 s.
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: sends what it was told through the pipe, whatever happens
        message = "the child named no stall"
        try:
            os.close(read_end)
            ring = _silent_producer_ring(0.8)
            os.kill(os.getpid(), signal.SIGSTOP)  # Ctrl-Z, between two polls
            try:
                deadline = time.monotonic() + 10.0
                while time.monotonic() < deadline and not ring.take(0, 0.1):
                    pass
            except RuntimeError as exc:
                message = str(exc)
            ring.close()
        except BaseException as exc:
            message = f"the child failed: {exc!r}"
        finally:
            os.write(write_end, message.encode())
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        _, status = os.waitpid(pid, os.WUNTRACED)
        if os.WIFSTOPPED(status):
            time.sleep(1.5)  # stopped
            os.kill(pid, signal.SIGCONT)
            os.waitpid(pid, 0)
        message = pipe.read().decode()
    counted = re.search(r"stopped meanwhile: only the ([\d.e+-]+) s since it resumed count", message)
    silent = re.search(r"producer 0 made no progress for ([\d.e+-]+) s .*batch 0, sample 7", message)
    assert counted and silent, message
    # Named stall_timeout after the resume, not on SIGCONT; the silence reported spans the stop.
    assert float(counted[1]) >= 0.8 and float(silent[1]) >= 1.5 + float(counted[1]), message


def test_a_stall_is_named_when_the_consumer_polls_more_than_a_second_apart():
    # RingLoader polls take() with short timeouts. A thread holding the GIL for a second or more between polls (the
    # stuck producer's own retry loop, a busy background thread) made each poll look like a return from a stop, so
    # the silent producer was never named.
    ring = _silent_producer_ring(0.5)
    try:
        with pytest.raises(RuntimeError, match=r"producer 0 made no progress for .*batch 0, sample 7"):
            for _ in range(3):
                assert ring.take(0, 0.05) == []
                time.sleep(1.2)  # away from the ring, as while another thread holds the GIL
    finally:
        ring.close()


def test_a_stall_message_reports_the_whole_silence():
    # Back from a 1.5 s step to a producer silent all along, the consumer said "made no progress for 0.5 s".
    ring = _silent_producer_ring(0.5)
    try:
        time.sleep(1.5)  # the consumer's step
        with pytest.raises(RuntimeError, match=r"producer 0 made no progress for ([\d.e+-]+) s") as raised:
            ring.take(0, 5.0)
        silent = re.search(r"made no progress for ([\d.e+-]+) s", str(raised.value))
        assert float(silent[1]) >= 1.5 and "stopped meanwhile" not in str(raised.value), str(raised.value)
    finally:
        ring.close()


def _in_a_forked_child(work) -> str:
    """What ``work()`` returned in a child forked now, or how the child ended (killed after 10 s if it hangs)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read_end)
            signal.alarm(10)
            os.write(write_end, work().encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        said = pipe.read().decode()
    _, status = os.waitpid(pid, 0)
    return said if os.WIFEXITED(status) else f"{said}; the child was killed by signal {os.WTERMSIG(status)}"


def test_a_ring_started_before_a_fork_is_closed_and_dropped_in_the_child_at_once():
    # The child held a copy of the heartbeat thread's handle and of its condition variable, with the parent's waiter:
    # dropping the ring hung destroying that condition variable, and closing it joined whatever thread of the child
    # had reused the stack (std::terminate for a detached one, as every Python thread is).
    ring = _silent_producer_ring(60.0)  # its epoch started: the heartbeat runs
    try:
        def close_and_drop() -> str:
            nonlocal ring
            busy = threading.Thread(target=time.sleep, args=(0.2,), daemon=True)
            busy.start()  # a thread of the child's own, which may take over the parent's heartbeat stack
            ring.close()
            ring = None  # freed here, in the child
            busy.join()
            return "closed and dropped"

        assert _in_a_forked_child(close_and_drop) == "closed and dropped"
    finally:
        ring.close()


def test_a_token_loader_busy_at_a_fork_is_closed_and_dropped_in_the_child_at_once(corpus):
    # The child joined copies of the gather threads' handles (a crash, or "Invalid argument"), destroyed condition
    # variables that recorded the parent's waiting threads (a hang), or locked a mutex copied while held.
    ds = TokenWindows(corpus, max_len=128, stride=100)
    loader = RingLoader(ds, TokenBudgetBatchSampler(ds.lengths, 256, seed=4), num_slots=2, num_workers=2)
    batches = iter(loader)
    try:
        assert next(batches)["input_ids"].numel() <= 256  # the gatherers wait for a free slot now

        def close_and_drop() -> str:
            nonlocal loader, batches
            busy = threading.Thread(target=time.sleep, args=(0.2,), daemon=True)
            busy.start()
            loader.close()
            batches = loader = None
            gc.collect()
            busy.join()
            return "closed and dropped"

        assert _in_a_forked_child(close_and_drop) == "closed and dropped"
        assert next(batches)["input_ids"].numel() <= 256  # the parent's loader reads on
    finally:
        loader.close()


def test_the_reader_processes_stop_once_and_serve_no_read_after():
    # A second stop() raised "process object is closed", and so did a read racing the close.
    readers = ring_module.ReaderProcesses(Flaky(4), 1)
    assert [item["label"] for item in readers.read([0, 1], lambda: False, 0.05)] == [0, 1]
    readers.stop()
    readers.stop()
    assert readers.read([2], lambda: False, 0.05) is None


@pytest.mark.parametrize("poll_s", [0.05, 1.0])
def test_a_read_the_reader_processes_are_stopped_during_returns_none(poll_s):
    # stop() from another thread closed the process objects a read was waiting on: "process object is closed"; a
    # read that woke on the reader stop() terminated called it dead ("killed by SIGTERM").
    readers = ring_module.ReaderProcesses(Flaky(4, slow=0, sleep=1.0), 1)
    got = []
    reading = threading.Thread(target=lambda: got.append(readers.read([0], lambda: False, poll_s)), daemon=True)
    reading.start()
    time.sleep(0.3)  # inside the slow sample
    readers.stop()
    reading.join(10)
    assert got == [None]


def test_a_ring_made_before_a_fork_but_first_used_in_the_child_is_the_childs():
    # Only a ring the parent used holds the parent's threads: one it only made works in the child as anywhere.
    ring = torch.classes.hetrain_C.RingBuffer(["int64"], [16], 2, 1, False, 60.0)

    def use_it() -> str:
        ring.start_epoch(6)
        taken = []
        for job in range(6):  # three times round the two slots: each batch dropped goes back
            assert ring.claim(0, 5.0)[0] == job
            ring.commit(0, job, [1, 3, 0, 0])
            taken.append(job if ring.take(job, 5.0) else -1)
        ring.close()
        return str(taken)

    try:
        assert _in_a_forked_child(use_it) == "[0, 1, 2, 3, 4, 5]"
    finally:
        ring.close()


def test_a_stall_is_named_in_a_child_forked_after_the_ring_started():
    # The child had no heartbeat, and a second after the fork took every check for the first after a stop: no stall
    # of more than a second was ever named there.
    ring = _silent_producer_ring(1.5)
    try:
        def wait_for_the_batch() -> str:
            try:
                deadline = time.monotonic() + 5.0
                while time.monotonic() < deadline and not ring.take(0, 0.1):
                    pass
            except RuntimeError as exc:
                return str(exc)
            return "no stall named"

        assert "producer 0 made no progress" in _in_a_forked_child(wait_for_the_batch)
    finally:
        ring.close()


class KilledInAReader(Flaky):
    """Sample `fatal` kills the process reading it with SIGKILL, as the OOM killer would, when that is a reader."""

    def __init__(self, n, fatal):
        super().__init__(n)
        self.fatal, self.parent = fatal, os.getpid()

    def __getitem__(self, i):
        if i == self.fatal and os.getpid() != self.parent:
            os.kill(os.getpid(), signal.SIGKILL)
        return super().__getitem__(i)


def test_a_reader_process_that_dies_is_named_at_once_instead_of_waited_for():
    sampler = TokenBudgetBatchSampler([1 + i % 5 for i in range(60)], 10, shuffle=False)
    loader = RingLoader(KilledInAReader(60, fatal=23), sampler, collate=PadInto(10, 10), num_workers=2,
                        reader_processes=2, stall_timeout=60)
    t0 = time.monotonic()
    seen = []
    with pytest.raises(LoaderError, match=r"reader process \d+ ended \(killed by SIGKILL\) while reading "
                                          r"samples \[[\d, ]*\b23\b"):
        for batch in loader:
            seen += batch["labels"].tolist()
    assert time.monotonic() - t0 < 20, "a dead reader must be named when it dies, not after the stall timeout"
    plan = list(sampler)
    fatal_batch = next(k for k, idx in enumerate(plan) if 23 in idx)
    assert seen == [i for idx in plan[:fatal_batch] for i in idx]  # every batch before it arrived, in order
    assert multiprocessing.active_children() == []  # the surviving reader is stopped too


def test_the_other_readers_go_on_after_one_dies_and_none_left_is_named():
    from hetrain.data.readers import ReaderDied, ReaderProcesses

    ds = KilledInAReader(60, fatal=7)
    readers = ReaderProcesses(ds, 2)
    try:
        def read(indices):
            return readers.read(indices, lambda: False, 0.1)

        for got, i in zip(read([1, 2, 3, 4, 5]), [1, 2, 3, 4, 5], strict=True):
            assert torch.equal(got["input_ids"], ds[i]["input_ids"]) and got["label"] == i
        for reader in readers._readers:  # Ctrl-C in a terminal signals every process of the group
            os.kill(reader.process.pid, signal.SIGINT)
        assert [s["label"] for s in read([1, 2, 3, 4, 5])] == [1, 2, 3, 4, 5]  # the loader stops readers, not Ctrl-C
        with pytest.raises(ReaderDied, match=r"killed by SIGKILL\) while reading samples \[7\]; 1 reader\(s\) left"):
            read([7])
        assert [s["label"] for s in read(list(range(10, 20)))] == list(range(10, 20))
        with pytest.raises(ReaderDied):
            read([7])
        with pytest.raises(ReaderDied, match=r"no reader process left; the last one: .* 0 reader\(s\) left"):
            read([1])
    finally:
        readers.stop()
    assert multiprocessing.active_children() == []


def test_a_reader_that_died_idle_is_named_and_counted_out_and_later_reads_get_their_own_samples():
    from hetrain.data.readers import ReaderDied, ReaderProcesses

    readers = ReaderProcesses(Flaky(60), 2)
    try:
        def labels(indices):
            return [s["label"] for s in readers.read(indices, lambda: False, 0.1)]

        assert labels([1, 2, 3, 4, 5, 6]) == [1, 2, 3, 4, 5, 6]
        victim = readers._readers[1].process
        os.kill(victim.pid, signal.SIGKILL)  # the OOM killer picks a reader between two reads
        victim.join()
        with pytest.raises(ReaderDied, match=rf"reader process {victim.pid} ended \(killed by SIGKILL\) while idle, "
                                             r"before reading samples \[[\d, ]+\]; 1 reader\(s\) left"):
            labels([1, 2, 3, 4, 5, 6])
        assert readers.alive == 1
        assert labels([10, 11]) == [10, 11] and labels([20, 21, 22]) == [20, 21, 22]
    finally:
        readers.stop()
    assert multiprocessing.active_children() == []


class HeldAfterUnpicklable(torch.utils.data.Dataset):
    """Sample 1 cannot be pickled; sample 2 is read until `release` is set, so the reader reports sample 1 while
    sample 2 is still being read."""

    def __init__(self):
        self.release = multiprocessing.get_context("fork").Event()

    def __len__(self):
        return 60

    def __getitem__(self, i):
        if i == 1:
            return {"label": i, "lock": threading.Lock()}
        if i == 2:
            self.release.wait(5)
        return {"label": i}


def test_the_sample_being_read_when_a_chunk_failed_does_not_reach_the_next_read():
    from hetrain.data.readers import ReaderProcesses

    ds = HeldAfterUnpicklable()
    readers = ReaderProcesses(ds, 1)
    try:
        with pytest.raises(RuntimeError, match="sample 1 cannot be sent back from the reader process"):
            readers.read([1, 2, 3], lambda: False, 0.1)
        ds.release.set()  # sample 2 returns after its chunk failed
        assert [s["label"] for s in readers.read([50, 51], lambda: False, 0.1)] == [50, 51]
    finally:
        readers.stop()
    assert multiprocessing.active_children() == []


class ConjugateAndNegativeViews(torch.utils.data.Dataset):
    """Samples holding a conjugate view (one of them transposed) and a negative view: tensors whose bit
    ``contiguous()`` keeps."""

    def __len__(self):
        return 4

    def __getitem__(self, i):
        z = torch.tensor([[1 + 2j, 3 - 4j * i], [5.5 + 6j, -7j]])
        return {"conj": z[0].conj(), "conj_t": z.t().conj(), "neg": z[1].conj().imag, "label": i}


def test_conjugate_and_negative_views_come_back_from_a_reader_with_their_values():
    from hetrain.data.readers import ReaderProcesses

    ds = ConjugateAndNegativeViews()
    assert ds[1]["conj"].is_conj() and ds[1]["neg"].is_neg()
    readers = ReaderProcesses(ds, 1)
    try:  # was: "sample 0 cannot be sent back ... torch.Tensor.view is not supported for conjugate view tensors"
        got = readers.read([0, 1, 2], lambda: False, 0.1)
    finally:
        readers.stop()
    for sample, i in zip(got, [0, 1, 2], strict=True):
        for name in ("conj", "conj_t", "neg"):
            want = ds[i][name]
            assert sample[name].dtype == want.dtype and sample[name].tolist() == want.tolist(), (i, name)
    assert multiprocessing.active_children() == []


class KilledBesideAHeldSample(torch.utils.data.Dataset):
    """In a reader, sample 0 kills its process (SIGKILL) and sample 1 is read until `release` is set, then sets
    `done`."""

    def __init__(self):
        context = multiprocessing.get_context("fork")
        self.release, self.done, self.parent = context.Event(), context.Event(), os.getpid()

    def __len__(self):
        return 60

    def __getitem__(self, i):
        if os.getpid() != self.parent:
            if i == 0:
                os.kill(os.getpid(), signal.SIGKILL)
            if i == 1:
                self.release.wait(5)
                self.done.set()
        return {"label": i}


def test_a_reader_death_is_raised_at_once_while_another_reader_is_still_inside_a_sample():
    from hetrain.data.readers import ReaderDied, ReaderProcesses

    ds = KilledBesideAHeldSample()
    readers = ReaderProcesses(ds, 2)
    try:
        with pytest.raises(ReaderDied, match=r"killed by SIGKILL\) while reading samples \[0\]; 1 reader\(s\) left"):
            readers.read([0, 1], lambda: False, 0.1)
        assert not ds.done.is_set(), "the death must be raised at once, not after the other reader's sample"
        ds.release.set()  # the survivor finishes sample 1 of the failed read; it must not reach the next one
        assert [s["label"] for s in readers.read([10, 11, 12], lambda: False, 0.1)] == [10, 11, 12]
        assert readers.alive == 1
    finally:
        readers.stop()
    assert multiprocessing.active_children() == []


class Assorted(torch.utils.data.Dataset):
    """Samples of every kind a reader sends back: dtypes, 0-d, empty and non-contiguous tensors, plain values."""

    def __len__(self):
        return 8

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        return {"f32": torch.randn(3, 5, generator=g).t(), "bf16": torch.randn(7, generator=g).bfloat16(),
                "f64": torch.randn(2, 2, dtype=torch.float64, generator=g), "mask": torch.rand(4, generator=g) > 0.5,
                "scalar": torch.tensor(i), "empty": torch.ones(0, 3, dtype=torch.int16),
                "grad": torch.randn(2, generator=g).requires_grad_(), "meta": ["doc", i, 0.5]}


def test_samples_come_back_from_readers_exactly():
    from hetrain.data.readers import ReaderProcesses

    ds = Assorted()
    readers = ReaderProcesses(ds, 2)
    try:
        got = readers.read(list(range(len(ds))), lambda: False, 0.1)
    finally:
        readers.stop()
    for i, sample in enumerate(got):
        want = ds[i]
        assert sample["meta"] == want["meta"]
        for key in want.keys() - {"meta"}:
            assert sample[key].dtype == want[key].dtype and sample[key].shape == want[key].shape, key
            assert torch.equal(sample[key], want[key]) and sample[key].requires_grad == want[key].requires_grad, key


def test_closing_mid_read_stops_the_readers_promptly_every_time():
    sampler = TokenBudgetBatchSampler([1 + i % 5 for i in range(60)], 10, shuffle=False)
    for _ in range(5):  # results still in flight when the readers are stopped
        loader = RingLoader(Flaky(60, slow=9, sleep=30.0, delay=0.01), sampler, collate=PadInto(10, 10),
                            num_workers=2, reader_processes=2)
        assert next(iter(loader))["labels"].tolist() == next(iter(sampler))
        t0 = time.monotonic()
        loader.close()
        assert time.monotonic() - t0 < 5, "closing must not wait for the sample being read"
        assert multiprocessing.active_children() == []


def test_ctrl_c_with_reader_processes_stops_them_without_waiting_for_a_slow_sample(monkeypatch):
    failures = []
    monkeypatch.setattr(threading, "excepthook", failures.append)
    slow = Flaky(30, slow=2, sleep=30.0)
    sampler = TokenBudgetBatchSampler([1 + i % 5 for i in range(30)], 5, shuffle=False)
    loader = RingLoader(slow, sampler, collate=PadInto(5, 5), num_workers=2, reader_processes=2, stall_timeout=60)
    timer = threading.Timer(0.3, _thread.interrupt_main)
    timer.start()
    t0 = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        for _ in loader:
            pass
    assert time.monotonic() - t0 < 3, "Ctrl-C must not wait for the sample a reader is inside"
    timer.join()
    assert multiprocessing.active_children() == [] and failures == []


class SlowInAReader(Flaky):
    """Sample ``slow`` sleeps when read in a reader process; ``entered`` (shared across the fork) tells when."""

    def __init__(self, n, slow):
        super().__init__(n)
        self.slow_in_reader, self.parent = slow, os.getpid()
        self.entered = multiprocessing.get_context("fork").Event()

    def __getitem__(self, i):
        if i == self.slow_in_reader and os.getpid() != self.parent:
            self.entered.set()
            time.sleep(10)
        return super().__getitem__(i)


def test_a_reader_stopped_inside_a_sample_runs_none_of_the_parents_signal_handlers(tmp_path, monkeypatch):
    # A forked reader kept the parent's Python SIGTERM handler (Lightning's, which on DDP rank 0 kills the other
    # ranks): stop() terminating a reader busy in a sample ran that handler in the reader, which swallowed the
    # signal and was killed with SIGKILL only after a second grace period.
    ran = tmp_path / "sigterm_handler_ran"

    def handler(signum, frame):
        with open(ran, "a") as f:
            f.write(f"{os.getpid()}\n")

    exits = []  # stop() closes each reader's process object (its pipes), after which its exitcode cannot be read
    close = multiprocessing.process.BaseProcess.close
    monkeypatch.setattr(multiprocessing.process.BaseProcess, "close",
                        lambda process: (exits.append(process.exitcode), close(process))[-1])
    previous = signal.signal(signal.SIGTERM, handler)
    try:
        ds = SlowInAReader(8, slow=5)
        loader = RingLoader(ds, [[0], [5], [1]], collate=PadInto(5, 1), num_workers=1, reader_processes=1)
        assert next(iter(loader))["labels"].tolist() == [0]
        assert ds.entered.wait(5.0)
        t0 = time.monotonic()
        loader.close()
        took = time.monotonic() - t0
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert not ran.exists(), f"the parent's SIGTERM handler ran in pid {ran.read_text().split()}"
    assert exits == [-signal.SIGTERM], "the reader must end on SIGTERM, not a later SIGKILL"
    assert took < 2.0


class _Stream(torch.utils.data.IterableDataset):
    def __iter__(self):
        return iter(())


def test_pad_into_names_a_missing_label_and_takes_unlabelled_samples_with_label_key_none():
    # A sample without the label field failed with a bare KeyError: 'label'.
    items = [{"input_ids": torch.tensor([5, 6, 7])}, {"input_ids": torch.tensor([8])}]
    labelled = PadInto(8, 2)
    out = {name: torch.empty(size, dtype=dtype) for name, (dtype, size) in labelled.spec.items()}
    with pytest.raises(ValueError, match=r"'label', which row 0 does not have .*label_key=None"):
        labelled(items, out)
    unlabelled = PadInto(8, 2, label_key=None)
    out = {name: torch.empty(size, dtype=dtype) for name, (dtype, size) in unlabelled.spec.items()}
    assert unlabelled(items, out) == {"input_ids": (2, 3), "attention_mask": (2, 3)}
    assert out["input_ids"][:6].view(2, 3).tolist() == [[5, 6, 7], [8, 0, 0]]


def test_without_the_extension_the_loader_says_why_and_how_to_train_without_it(monkeypatch):
    from hetrain import _ext

    monkeypatch.setitem(sys.modules, "hetrain._C", None)  # as if hetrain._C was missing or failed to load
    _ext.load.cache_clear()
    try:
        with pytest.warns(UserWarning, match="hetrain._C is not available"), pytest.raises(RuntimeError) as raised:
            RingLoader(SyntheticSequences(8), None)
    finally:
        _ext.load.cache_clear()  # the next call loads the real extension, which monkeypatch puts back
    message = str(raised.value)
    assert "RingLoader needs the compiled extension, but hetrain._C is present but failed to load" in message
    assert "use data.loader=torch with train.py's recipes, or a torch.utils.data.DataLoader in code" in message


def open_pipes() -> set[str]:
    """The pipes this process holds open, by their kernel names."""
    pipes = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the descriptor listdir itself used is gone by now
            target = os.readlink(f"/proc/self/fd/{fd}")
            if target.startswith("pipe:"):
                pipes.add(target)
    return pipes


def test_a_closed_loader_with_reader_processes_holds_no_pipe_while_still_referenced():
    # Each reader's process object kept the two pipe ends multiprocessing watches its exit through until the closed
    # loader was garbage-collected: five closed loaders kept by a trainer held twenty descriptors.
    ds = Flaky(30)
    sampler = TokenBudgetBatchSampler([1 + i % 5 for i in range(30)], 10, shuffle=False)
    before = open_pipes()
    loader = RingLoader(ds, sampler, collate=PadInto(10, 10), num_workers=2, reader_processes=2)
    assert sum(1 for _ in loader) == len(sampler)
    loader.close()
    assert open_pipes() - before == set()
    assert multiprocessing.active_children() == []


def test_a_closed_token_loader_holds_no_descriptor_of_its_token_file_while_still_referenced(corpus):
    # The C++ gatherers' descriptor of the .bin file was closed only when the loader was freed: a closed loader kept
    # by a trainer held it, and a deleted corpus its disk space.
    def holding() -> int:
        names = []
        for fd in os.listdir("/proc/self/fd"):
            with contextlib.suppress(OSError):
                names.append(os.readlink(f"/proc/self/fd/{fd}"))
        return sum(name.endswith(".bin") for name in names)

    ds = TokenWindows(corpus, max_len=128, stride=100)
    mapped = holding()  # the dataset's own map of the file
    loader = RingLoader(ds, TokenBudgetBatchSampler(ds.lengths, 1024, seed=4), num_slots=3, num_workers=2)
    assert sum(1 for _ in loader) == len(loader)
    assert holding() > mapped, "the open loader reads the token file through a descriptor of its own"
    loader.close()
    assert holding() == mapped and loader is not None


class _Numbers(torch.utils.data.IterableDataset):
    """Samples 0..n-1 of ``length`` tokens; ``fail_at`` raises there, ``pause_after`` waits ``pause`` s after it,
    and ``finished`` is set once the generator is finalised (its files and sockets closed)."""

    def __init__(self, n, length=2, fail_at=None, pause_after=None, pause=0.0):
        self.n, self.length, self.fail_at, self.pause_after, self.pause = n, length, fail_at, pause_after, pause
        self.pulled, self.finished = 0, threading.Event()

    def __iter__(self):
        try:
            for i in range(self.n):
                if i == self.fail_at:
                    raise OSError(f"connection reset at sample {i}")
                self.pulled = i + 1
                yield {"input_ids": torch.arange(self.length), "label": i}
                if i == self.pause_after:
                    time.sleep(self.pause)  # the source waits for new data
        finally:
            self.finished.set()


@pytest.mark.parametrize(("batcher", "rows"), [(StreamBatches(batch_size=3), 3), (StreamBatches(max_tokens=7), 3),
                                               (StreamBatches(batch_size=2, max_tokens=64), 2)])
def test_stream_batches_hands_out_a_batch_once_no_sample_fits_it_not_once_the_next_arrives(batcher, rows):
    # The batch was closed only when the sample after it was pulled: a pausing source held a complete batch back.
    source = _Numbers(9)
    batches = batcher(iter(source))
    assert [s["label"] for s in next(batches)] == list(range(rows)) and source.pulled == rows
    assert [len(b) for b in StreamBatches(max_tokens=10)(iter([{"input_ids": [0] * n} for n in (3, 3, 4, 1)]))] == [
        2, 2]  # a longer sample that does not fit still closes the batch before it, and a shorter one may still join


def test_a_stream_failing_after_a_complete_batch_delivers_it_and_a_pausing_one_does_not_hold_it_back():
    # The error on sample 6 was blamed on batch 1 (samples 3..5, complete), which never arrived.
    with RingLoader(_Numbers(12, fail_at=6), StreamBatches(batch_size=3), collate=PadInto(12, 3), num_workers=1,
                    stall_timeout=5) as loader:
        got = []
        with pytest.raises(LoaderError, match="failed on batch 2 reading the stream: OSError: connection reset at "
                                              "sample 6"):
            for batch in loader:
                got.append(batch["labels"].tolist())
        assert got == [[0, 1, 2], [3, 4, 5]]
    # A source that waits for data after a batch's last sample: that batch came only once the wait ended.
    with RingLoader(_Numbers(12, pause_after=2, pause=3.0), StreamBatches(batch_size=3), collate=PadInto(12, 3),
                    num_workers=1) as loader:
        t0 = time.monotonic()
        assert next(iter(loader))["labels"].tolist() == [0, 1, 2]
        assert time.monotonic() - t0 < 1.5


def test_a_closed_stream_loader_finishes_its_source_while_still_referenced():
    # The stream's generator (and the file or socket it reads) stayed open until the loader was garbage-collected.
    source = _Numbers(1000)
    loader = RingLoader(source, StreamBatches(batch_size=2), collate=PadInto(8, 2), num_slots=2, num_workers=1)
    for k, _ in enumerate(loader):
        if k == 3:
            break
    assert not source.finished.is_set()
    loader.close()
    assert source.finished.is_set() and loader is not None


class _FailsToClose(torch.utils.data.IterableDataset):
    """A source whose ``finally`` raises, as a connection that fails to close."""

    def __iter__(self):
        try:
            for i in range(100):
                yield {"x": i}
        finally:
            raise ConnectionResetError("the socket failed to close")


def test_a_source_failing_to_close_leaves_the_loaders_error_to_be_raised():
    # Closing the source on the way to raise a producer's error raised the source's own instead.
    def collate(items):
        if items[0]["x"] >= 4:
            raise ValueError("bad batch in collate")
        return {"x": torch.tensor([item["x"] for item in items])}

    loader = RingLoader(_FailsToClose(), StreamBatches(batch_size=2),
                        collate=CopyInto(collate, {"x": (torch.int64, 2)}), num_slots=2, num_workers=1)
    with pytest.warns(RuntimeWarning, match="closing the stream loader's source raised ConnectionResetError"):
        with pytest.raises(LoaderError, match="bad batch in collate"):
            for _ in loader:
                pass


@pytest.mark.parametrize("exc", [RuntimeError("can't start new thread"), KeyboardInterrupt()])
def test_producers_started_before_one_fails_to_start_are_stopped(exc, monkeypatch):
    # A thread limit or Ctrl-C while the producers started left those already started polling forever, and the
    # process aborted at exit ("terminate called without an active exception").
    start, started = threading.Thread.start, []

    def failing_start(thread):
        if thread.name.startswith("hetrain-ring-producer"):
            started.append(thread)
            if len(started) == 3:
                raise exc
        start(thread)

    monkeypatch.setattr(threading.Thread, "start", failing_start)
    with pytest.raises(type(exc)):
        RingLoader(Flaky(4), [[0], [1]], collate=PadInto(4, 1), num_workers=4)
    for thread in started[:2]:
        thread.join(5.0)
        assert not thread.is_alive(), "a producer started before the failure still runs"


def test_holding_every_slot_is_reported_even_with_an_infinite_stall_timeout(monkeypatch):
    # stall_timeout=inf turned the check off: list(loader), which keeps every batch, hung without a word.
    monkeypatch.setattr(ring_module, "_HELD_MAX_S", 0.5)
    loader = RingLoader(Flaky(8), [[i] for i in range(8)], collate=PadInto(5, 1), num_slots=2, num_workers=1,
                        stall_timeout=float("inf"))
    kept, raised = [], []

    def keep_all():
        try:
            kept.extend(loader)
        except LoaderError as err:
            raised.append(err)

    consumer = threading.Thread(target=keep_all, daemon=True)
    consumer.start()
    consumer.join(10.0)
    loader.close()  # ends a wait that did not end by itself
    consumer.join(5.0)
    assert len(raised) == 1 and re.search(r"no free slot for 0\.\d+ s \(stall_timeout=inf s; every slot held is "
                                          r"reported after 0\.5 s\): the consumer still holds all 2 slots",
                                          str(raised[0])), raised


def test_a_slow_slot_collate_is_named_as_the_collate_not_the_last_sample():
    # The stall named the batch's last sample ("while on batch 2, sample 5") and no thread was said to be busy.
    def collate(items):
        if 5 in items:
            time.sleep(2.0)  # tokenizing the batch, say
        return {"x": torch.tensor(items)}

    loader = RingLoader(list(range(8)), [[0, 1], [2, 3], [4, 5], [6, 7]],
                        collate=CopyInto(collate, {"x": (torch.int64, 2)}), num_slots=2, num_workers=1,
                        stall_timeout=0.5)
    with (
        pytest.raises(LoaderError, match=r"producer 0 made no progress for .* while on batch 2, in the slot collate$"),
        pytest.warns(RuntimeWarning, match=r"still reading \(producer 0 in the slot collate of batch 2\)"),
    ):
        for _ in loader:
            pass


def test_a_collate_output_that_requires_grad_records_no_history_on_the_slots():
    # copy_ into a reused slot view recorded autograd history on it, batch after batch: memory grew without bound.
    weights = torch.randn(8, 4, requires_grad=True)
    seen = []

    class Watched(CopyInto):
        def __call__(self, items, out):
            seen.append(out["x"].requires_grad)
            return super().__call__(items, out)

    coll = Watched(lambda items: {"x": weights[items[0]] * 2.0}, {"x": (torch.float32, 4)})
    with RingLoader(list(range(8)), [[i % 8] for i in range(12)], collate=coll, num_slots=2, num_workers=1) as loader:
        for i, batch in enumerate(loader):
            assert not batch["x"].requires_grad
            assert torch.equal(batch["x"], weights[i % 8].detach() * 2.0)
    assert len(seen) == 12 and not any(seen), "a slot view required grad: history was recorded on it"


def test_a_token_batch_larger_than_a_slot_names_the_settings_that_size_it(tmp_path):
    # "batch 1 is 2 x 30 tokens but a slot holds 2 rows and 32 tokens" said neither which setting nor how to fix it.
    ds = TokenWindows(write_token_file(tmp_path / "c", [np.arange(1, 1 + n) for n in (5, 30, 7, 12)]), max_len=64)
    with RingLoader(ds, [[0, 2], [1, 3]], max_tokens=32, num_workers=1) as loader:
        with pytest.raises(LoaderError, match=r"batch 1 is 2 x 30 tokens but a slot holds 2 rows and 32 tokens; size "
                                              r"the slots with RingLoader\(max_tokens=\.\.\., max_rows=\.\.\.\) \(by "
                                              r"default the batch sampler's max_tokens and max_batch_rows\)"):
            list_of_copies(loader)


class _LaggingEvent:
    """A CUDA event on a machine without CUDA: complete ``lag`` s after it was recorded, as behind a GPU a few steps
    behind the host."""

    lag = 0.2

    def record(self, stream=None):
        self.at = time.monotonic()

    def query(self):
        return time.monotonic() >= self.at + self.lag

    def synchronize(self):
        time.sleep(max(0.0, self.at + self.lag - time.monotonic()))


@pytest.fixture
def lagging_events(monkeypatch):
    """CUDA events that complete _LaggingEvent.lag s after they were recorded; no hold is left over."""
    monkeypatch.setattr(torch.cuda, "Event", _LaggingEvent)
    host_copies.release_all()
    yield
    host_copies.release_all()


@pytest.mark.usefixtures("lagging_events")
def test_release_completed_lets_go_of_copied_sources_oldest_first_and_waits_for_none():
    first, second = torch.ones(3), torch.ones(3)
    alive = [weakref.ref(first), weakref.ref(second)]
    host_copies.hold_until_copied([first], None)
    time.sleep(_LaggingEvent.lag + 0.05)
    host_copies.hold_until_copied([second], None)  # releases the first: its copy has run
    del first, second
    assert host_copies.held_count() == 1 and alive[0]() is None and alive[1]() is not None
    t0 = time.monotonic()
    host_copies.release_completed()  # the second's copy still runs: kept, and not waited for
    assert host_copies.held_count() == 1 and alive[1]() is not None and time.monotonic() - t0 < 0.05
    time.sleep(_LaggingEvent.lag + 0.05)
    host_copies.release_completed()
    assert host_copies.held_count() == 0 and alive[1]() is None


@pytest.mark.usefixtures("lagging_events")
def test_slots_held_until_their_copies_ran_go_back_to_a_loader_waiting_for_one():
    # Holds were released only by a later hold_until_copied, which a consumer waiting in the loader for a free slot
    # never makes: with the GPU a little behind, every slot stayed held, copies long done, until the stall error.
    with RingLoader(Flaky(20), [[i] for i in range(20)], collate=PadInto(5, 1), num_slots=3, num_workers=1,
                    stall_timeout=2.0) as loader:
        labels = []
        for batch in loader:
            host_copies.hold_until_copied([batch["labels"]], None)  # as a task's transfer_batch_to_device does
            labels += batch["labels"].tolist()
            del batch
    assert labels == list(range(20))


_GATHER_THREAD_LIMIT = """
import resource, sys
import numpy as np
from hetrain.data.ring import RingLoader
from hetrain.data.tokens import write_token_file
from hetrain.data.windows import TokenWindows
ds = TokenWindows(write_token_file(sys.argv[1], [np.arange(1, 9)] * 4), max_len=8)
with RingLoader(ds, [[0]], num_workers=1) as warm:  # all a loader loads, loaded before the limit
    list(warm)
size = int(next(line for line in open("/proc/self/status") if line.startswith("VmSize")).split()[1]) * 1024
resource.setrlimit(resource.RLIMIT_AS, (size + (24 << 20), resource.RLIM_INFINITY))  # about 2 threads' stacks
try:
    RingLoader(ds, [[0], [1]], num_workers=256)  # whatever the stack size, a few start and then one fails
except RuntimeError as err:
    print("refused:", err)
"""


def test_gather_threads_that_cannot_all_start_are_an_error_not_an_abort(tmp_path):
    # The C++ threads started before one failed to were destroyed unjoined: "terminate called without an active
    # exception", and the process aborted. Here an address-space limit stands for a thread limit.
    child = subprocess.run([sys.executable, "-c", _GATHER_THREAD_LIMIT, str(tmp_path / "c")], capture_output=True,
                           text=True, timeout=120)
    assert child.returncode == 0, child.stderr[-2000:]
    assert "refused:" in child.stdout, child.stdout
