"""RingLoader: batches assembled by background producers into a fixed ring of preallocated host slots.

torch's DataLoader allocates every batch anew (and pins it again when ``pin_memory=True``) and, with
workers, pickles it across processes. Here the memory is allocated once (``num_slots`` slots sized for
the largest batch, pinned when CUDA is available) and producers write straight into it:

* a :class:`~hetrain.data.windows.TokenWindows` source is gathered entirely in C++ by ``num_workers``
  threads (GIL released), tokens read from the file with pread (a file cut mid-run is an error, not SIGBUS);
* any map-style Dataset is read by ``num_workers`` Python threads whose slot collate (see
  :class:`PadInto`, :class:`CopyInto`) writes the batch into the slot;
* an ``IterableDataset`` is read in stream order, grouped by :class:`StreamBatches` (a batch size, a
  token budget or both), and collated into slots by the same threads.

A batch is a dict of tensors viewing its slot; the slot is refilled once every tensor of the batch is
freed, so keep at most ``num_slots - 1`` batches alive. Batches come in the sampler's order. A producer
error or stall ends the wait with :class:`LoaderError` naming the sample, file or byte range.
"""

from __future__ import annotations

import functools
import math
import os
import threading
import time
import types
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from itertools import chain
from typing import Any

import numpy as np
import torch

from hetrain import _ext, host_copies
from hetrain.data.readers import ReaderProcesses
from hetrain.data.wait_clock import WaitClock
from hetrain.data.windows import TokenWindows

# How long one wait inside C++ lasts before Python gets control back (Ctrl-C, closing): never a spin.
_POLL_S = 0.1
# How long Ctrl-C or a stall waits for producer threads still inside the dataset's code before it goes through.
_INTERRUPT_JOIN_S = 0.5
# The longest close(), garbage collection or exit waits for a producer inside the dataset (then it warns): bounded
# even for stall_timeout=inf, where a hung sample would otherwise hold up the process forever.
_CLOSE_JOIN_MAX_S = 60.0
# The longest the consumer waits for a free slot while it holds every one before it is told: bounded even for
# stall_timeout=inf, where list(loader) (which keeps every batch) would otherwise hang without a word.
_HELD_MAX_S = 60.0
_DTYPE_NAMES = {
    torch.int64: "int64", torch.int32: "int32", torch.int16: "int16", torch.uint8: "uint8", torch.bool: "bool",
    torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float64: "float64",
}

Spec = dict[str, tuple[torch.dtype, int]]  # field -> (dtype, capacity in elements)
_END_OF_STREAM = "hetrain: end of stream"
_IN_COLLATE = -2  # the sample a producer notes while in the slot collate (ring_buffer.h's kInCollate)
_UNBOUNDED = 2**62  # batches announced to the ring for a stream: it ends where the data does
_PAD_INTO_FIX = "PadInto writes integer token ids and labels: fix them in the dataset, or use CopyInto with a spec"


def _is_end_of_stream(exc: RuntimeError) -> bool:
    """Whether a batch failed as past the stream's end. Its first line only: with TORCH_SHOW_CPP_STACKTRACES=1
    torch appends a C++ backtrace to the message."""
    return str(exc).partition("\n")[0] == _END_OF_STREAM


class LoaderError(RuntimeError):
    """A producer failed or stalled; the message names the producer and the sample, file or byte range."""


class _Closed(Exception):
    """Raised in a producer that finds the loader closed before its next read: it reads no more of its batch."""


def _range(dtype: torch.dtype) -> tuple[float, float]:
    if dtype == torch.bool:
        return 0, 1
    info = torch.finfo(dtype) if dtype.is_floating_point else torch.iinfo(dtype)
    return info.min, info.max


def _exact_integers(dtype: torch.dtype) -> int:
    """How far from 0 a float ``dtype`` holds every integer: 2 ** (mantissa bits + 1), 2**24 for float32."""
    return 2 ** (1 - round(math.log2(torch.finfo(dtype).eps)))


@functools.cache
def _holds_all(src: torch.dtype, dst: torch.dtype) -> bool:
    """Whether ``dst`` holds every value of ``src``: then a copy needs no look at the values. Cached: PadInto asks
    once per row, and working it out again (two dtype infos, 0.9 us) was a quarter of a row's copy."""
    if src.is_floating_point and not dst.is_floating_point:
        return False
    (lo, hi), (dst_lo, dst_hi) = _range(src), _range(dst)
    if not src.is_floating_point and dst.is_floating_point and max(-lo, hi) > _exact_integers(dst):
        return False  # in range, but rounded: 2**24 + 1 becomes 2**24 in float32, 257 becomes 256 in bfloat16
    return dst_lo <= lo and hi <= dst_hi


def _min_max(t: torch.Tensor) -> tuple[int | float | bool, int | float | bool]:
    """``t``'s smallest and largest value. torch has no min/max for uint16/32/64: those go through int64, uint64
    with its top bit flipped, which maps unsigned order onto signed order (exact, values past 2**63 included)."""
    if t.dtype in (torch.uint16, torch.uint32):
        t = t.to(torch.int64)
    elif t.dtype == torch.uint64:
        lo, hi = torch.aminmax(t.view(torch.int64) ^ -(2**63))
        return lo.item() + 2**63, hi.item() + 2**63
    lo, hi = torch.aminmax(t)
    return lo.item(), hi.item()


def _check_lossless(t: torch.Tensor, dst: torch.dtype, what: str, fix: str) -> None:
    """Refuses values a ``dst`` slot field cannot hold: ``copy_`` truncates 1.5 to 1 and wraps 2**40 in int16, silently.

    Costs one min/max (and, for floats into integers, a whole-number test), and nothing when ``dst`` holds
    every value of ``t``'s dtype, as int64 token ids in an int64 field.
    """
    if t.numel() == 0 or _holds_all(t.dtype, dst):
        return
    if t.is_floating_point() and not dst.is_floating_point and not torch.equal(t, t.trunc()):
        example = t[t != t.trunc()].flatten()[0].item()
        raise ValueError(f"hetrain: {what} holds non-whole numbers (such as {example:g}), which its {dst} slot field "
                         f"would truncate; {fix}")
    lo, hi = _min_max(t)
    dst_lo, dst_hi = _range(dst)
    if t.is_floating_point() and dst.is_floating_point and not (dst_lo <= lo and hi <= dst_hi):
        # copy_ keeps +-inf (an additive attention mask's -inf) and NaN as they are: only finite values can overflow,
        # and a NaN makes min/max NaN, hiding them.
        finite = t[t.isfinite()]
        if finite.numel() == 0:
            return
        lo, hi = _min_max(finite)
    if lo < dst_lo or hi > dst_hi:
        raise ValueError(f"hetrain: {what} holds values from {lo} to {hi}, outside the range of its {dst} slot "
                         f"field [{dst_lo}, {dst_hi}], which would wrap or overflow them; {fix}")
    if not t.is_floating_point() and dst.is_floating_point:  # in range (checked above), so the round trip is exact
        rounded = t.to(dst).to(t.dtype) != t
        if bool(rounded.any()):
            example = t[rounded].flatten()[:1]
            raise ValueError(f"hetrain: {what} holds integers (such as {example.item()}) that its {dst} slot field "
                             f"would round (to {example.to(dst).item()}); {fix}")


class PadInto:
    """Slot collate for dict samples with a 1-D ``input_ids`` and a scalar ``label`` (``label_key``).

    Writes ``input_ids`` and ``attention_mask`` (B, T) padded to the longest sample, and ``labels`` (B,):
    the same batch as :func:`hetrain.data.synthetic.pad_collate`, without allocating it. For samples without a
    label (a language-model stream) pass ``label_key=None``: no ``labels`` field is written.
    """

    def __init__(self, max_tokens: int, max_rows: int, pad_id: int = 0, label_key: str | None = "label") -> None:
        self.pad_id, self.label_key = pad_id, label_key
        self.max_tokens, self.max_rows = max_tokens, max_rows
        self.spec: Spec = {"input_ids": (torch.int64, max_tokens), "attention_mask": (torch.bool, max_tokens)}
        if label_key is not None:
            self.spec["labels"] = (torch.int64, max_rows)

    def __call__(self, items: list[dict[str, Any]], out: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
        rows, cols = len(items), max(len(item["input_ids"]) for item in items)
        if rows * cols > out["input_ids"].numel() or (self.label_key is not None and rows > out["labels"].numel()):
            # Checked here, or the slot views below fail with a shape error that names neither.
            raise ValueError(f"hetrain: a batch of {rows} x {cols} tokens does not fit PadInto(max_tokens="
                             f"{self.max_tokens}, max_rows={self.max_rows}); size it from the batch sampler "
                             "(its max_tokens and max_batch_rows) or make the batches smaller")
        ids = out["input_ids"][: rows * cols].view(rows, cols).fill_(self.pad_id)
        mask = out["attention_mask"][: rows * cols].view(rows, cols).fill_(False)
        for r, item in enumerate(items):
            tokens = torch.as_tensor(item["input_ids"])
            if tokens.dim() != 1:
                raise ValueError(f"hetrain: PadInto takes 1-D input_ids, got shape {tuple(tokens.shape)} in row {r}; "
                                 "use CopyInto(your_collate, spec) for other shapes")
            _check_lossless(tokens, ids.dtype, f"input_ids of row {r}", _PAD_INTO_FIX)
            n = len(tokens)
            ids[r, :n] = tokens
            mask[r, :n] = True
        shapes = {"input_ids": (rows, cols), "attention_mask": (rows, cols)}
        if self.label_key is not None:
            unlabelled = next((r for r, item in enumerate(items) if self.label_key not in item), None)
            if unlabelled is not None:  # a bare KeyError named neither the setting nor the fix
                raise ValueError(f"hetrain: PadInto reads each sample's label from {self.label_key!r}, which row "
                                 f"{unlabelled} does not have (its fields: {sorted(items[unlabelled])}); pass "
                                 "label_key=<its name>, or label_key=None for samples without labels")
            labels = torch.as_tensor([item[self.label_key] for item in items])
            _check_lossless(labels, out["labels"].dtype, f"field {self.label_key!r}", _PAD_INTO_FIX)
            out["labels"][:rows] = labels
            shapes["labels"] = (rows,)
        return shapes


class CopyInto:
    """Adapts any collate that returns a dict of tensors: its result is copied into the slot.

    One extra copy per batch, in exchange for working with a collate written for torch's DataLoader.
    """

    def __init__(self, collate: Callable[[list[Any]], dict[str, torch.Tensor]], spec: Spec) -> None:
        self.collate, self.spec = collate, spec

    def __call__(self, items: list[Any], out: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
        batch = self.collate(items)
        missing = [name for name in out if name not in batch]
        if missing:  # else the consumer would get an empty tensor for it
            raise ValueError(f"hetrain: the collate returned no {missing} though the spec declares it; return it "
                             "or drop it from the spec")
        for name, t in batch.items():
            if not isinstance(t, torch.Tensor):  # a list of names or ids, as default_collate leaves strings
                raise ValueError(f"hetrain: collate output {name!r} is a {type(t).__name__}, not a tensor: slots "
                                 "hold tensors only; drop it from the collate's output, or return it as a tensor "
                                 "and declare it in spec")
            if name not in out or t.numel() > out[name].numel():
                cap = out[name].numel() if name in out else 0
                raise ValueError(f"hetrain: collate output {name!r} {tuple(t.shape)} does not fit its slot field "
                                 f"(capacity {cap} elements; declare it in spec)")
            if not torch.can_cast(t.dtype, out[name].dtype):  # copy_ would truncate 1.5 to 1 without a word
                raise ValueError(f"hetrain: collate output {name!r} is {t.dtype}, which its {out[name].dtype} slot "
                                 "field cannot hold without loss; declare that dtype in spec or cast in the collate")
            _check_lossless(t, out[name].dtype, f"collate output {name!r}", "declare a dtype that holds them in "
                            "spec, or fix the values in the collate")
            out[name][: t.numel()].view(t.shape).copy_(t)
        return {name: tuple(t.shape) for name, t in batch.items()}


class StreamBatches:
    """Groups an iterable dataset's samples into batches in stream order: the batch plan of a stream.

    A batch closes at ``batch_size`` samples, or before its padded size ``rows * longest`` would exceed
    ``max_tokens`` (``length(sample)`` tokens each; default ``len(sample["input_ids"])``), and is handed out as
    soon as no further sample could join it, without waiting for the next. Use it as a RingLoader's
    ``batch_sampler`` when the source is a ``torch.utils.data.IterableDataset``.
    """

    def __init__(self, batch_size: int | None = None, max_tokens: int | None = None,
                 length: Callable[[Any], int] | None = None) -> None:
        if batch_size is None and max_tokens is None:
            raise ValueError("hetrain: StreamBatches needs batch_size, max_tokens or both")
        if (batch_size is not None and batch_size < 1) or (max_tokens is not None and max_tokens < 1):
            # batch_size=0 would never close a batch: the whole stream would become one.
            raise ValueError(f"hetrain: StreamBatches needs positive batch_size and max_tokens, got "
                             f"batch_size={batch_size}, max_tokens={max_tokens}")
        self.batch_size, self.max_tokens = batch_size, max_tokens
        self.max_batch_rows = batch_size or max_tokens
        self.length = length or (lambda sample: len(sample["input_ids"]))

    def __call__(self, samples: Iterator[Any]) -> Iterator[list[Any]]:
        batch: list[Any] = []
        longest = 0
        for sample in samples:
            n = self.length(sample) if self.max_tokens is not None else 0
            if self.max_tokens is not None and n > self.max_tokens:
                raise ValueError(f"hetrain: a sample of {n} tokens exceeds max_tokens={self.max_tokens}; cut long "
                                 f"documents into windows (hetrain.data.windows) first")
            if batch and self.max_tokens is not None and (len(batch) + 1) * max(longest, n) > self.max_tokens:
                yield batch  # this sample, longer than the batch's, does not fit it; a shorter one might have
                batch, longest = [], 0
            batch.append(sample)
            longest = max(longest, n)
            # Closed as soon as no sample can join (one more makes the padded size at least (rows + 1) * longest),
            # not once the next sample arrives: a pausing stream held a complete batch back, and one failing on
            # that sample lost it. max_batch_rows, not batch_size: zero-length samples never fill a token budget.
            if len(batch) == self.max_batch_rows or (
                    self.max_tokens is not None and (len(batch) + 1) * longest > self.max_tokens):
                yield batch
                batch, longest = [], 0
        if batch:
            yield batch


class _Stream:
    """One epoch of a stream's batches, handed to producers by batch number, whichever thread asks first.

    Producers claim batch numbers in order but may reach here out of order; batches read ahead of the
    one asked for wait in ``pending``. After the last batch every later number gets ``None``. If the
    stream raises, every batch from the one it was reading on gets that error, whichever producer read
    it: a broken generator ends as if exhausted, and the batch before the failure would otherwise be
    taken for the stream's last. Each sample read counts as progress of the producer reading, and a
    producer waiting for another to finish reading is not stalled: a stall is a sample that does not come.
    Once ``stop`` is set, no further sample is pulled from the stream.
    """

    def __init__(self, samples: Iterator[Any], batcher: Callable[[Iterator[Any]], Iterator[list[Any]]],
                 stop: threading.Event) -> None:
        self.stop, self.samples = stop, samples
        self.batches, self.lock = batcher(self._noted(samples)), threading.Lock()
        # Batches read ahead, under a lock of their own: a producer whose batch another already read takes it
        # without waiting for the reader's lock, which a slow sample can hold for long (the consumer then waited
        # for a batch read long before).
        self.pending: dict[int, list[Any]] = {}
        self.pending_lock = threading.Lock()
        self.read = 0  # batches taken from the iterator so far
        self.end: int | None = None  # the first batch number past the stream's end, once known
        self.failure: BaseException | None = None  # what the stream raised reading batch number ``read``
        self.progress: Callable[[], None] = lambda: None  # the reading producer's, set while it holds the lock

    def _noted(self, samples: Iterator[Any]) -> Iterator[Any]:
        for sample in samples:
            self.progress()
            yield sample
            if self.stop.is_set():  # checked before the next pull: a slow source is not read on after closing
                raise _Closed

    def batch(self, job: int, progress: Callable[[], None]) -> list[Any] | None:
        while True:
            with self.pending_lock:
                if job in self.pending:  # read ahead, perhaps by a producer still reading
                    return self.pending.pop(job)
            if self.lock.acquire(timeout=_POLL_S):
                break
            if self.stop.is_set():  # closed, perhaps by the reading producer itself (a finaliser run there)
                raise _Closed
            progress()  # another producer is reading the stream for us all
        try:
            self.progress = progress
            return self._read_to(job)
        finally:
            self.lock.release()

    def _read_to(self, job: int) -> list[Any] | None:
        while self.end is None and self.read <= job:
            if self.failure is not None:
                raise self.failure
            if self.stop.is_set():
                raise _Closed
            try:
                batch = next(self.batches)
                with self.pending_lock:
                    self.pending[self.read] = batch
                self.read += 1
            except StopIteration:
                self.end = self.read
            except BaseException as exc:  # SystemExit too: the generator is finished, and its end is no real end
                self.failure = exc
                raise
        with self.pending_lock:
            return self.pending.pop(job, None)

    def close(self) -> None:
        """Finishes the batch plan and the source's iterator where they are generators (a generator's ``finally``
        closes its files and sockets) and drops them: a closed loader kept referenced held them open. Other
        iterators are only dropped: ``close()`` of an iterator that is the dataset itself may mean more. Only once
        no thread reads. A source whose own ``finally`` raises (a connection that fails to close) is warned about:
        its error replaced the loader's, which the close was on the way to raise."""
        try:
            for it in (self.batches, self.samples):
                if isinstance(it, types.GeneratorType):
                    try:
                        it.close()
                    except Exception as exc:
                        warnings.warn(f"hetrain: closing the stream loader's source raised {type(exc).__name__}: "
                                      f"{exc}", RuntimeWarning, stacklevel=2)
        finally:
            self.batches = self.samples = iter(())
            self.pending.clear()


class _Shared:
    """What producer threads and the finaliser need; holds no reference to the RingLoader itself."""

    def __init__(self, ring: Any, names: Sequence[str]) -> None:
        self.ring, self.names = ring, list(names)
        self.plan: list[list[int]] = []
        self.stream: _Stream | None = None  # an iterable source's current epoch
        self.readers: ReaderProcesses | None = None  # processes reading samples, when asked for
        self.errors: dict[int, BaseException] = {}
        self.stop = threading.Event()
        self.threads: list[threading.Thread] = []
        self.reading: dict[int, str] = {}  # producer -> where in the dataset or collate its thread is now
        self.join_timeout = 0.0  # how long closing waits for a producer inside the dataset (set at start)
        self.owner = os.getpid()  # a process forked from it holds copies of the threads and readers, not them


def _shapes(names: Sequence[str], shapes: dict[str, tuple[int, ...]]) -> list[int]:
    flat = []
    for name in names:
        shape = tuple(shapes.get(name, (0,)))
        if len(shape) > 3:
            raise ValueError(f"hetrain: slot field {name!r} has shape {shape}; at most 3 dimensions")
        flat += [len(shape), *shape, *[0] * (3 - len(shape))]
    return flat


def _produce(shared: _Shared, producer: int, dataset: Any, collate: Callable, num_slots: int) -> None:
    ring = shared.ring
    views = [dict(zip(shared.names, ring.slot_views(s), strict=True)) for s in range(num_slots)]
    while not shared.stop.is_set():
        job, slot = ring.claim(producer, _POLL_S)
        if job == -2:  # closed
            return
        if job < 0:
            continue
        sample, collating = None, False
        try:
            if shared.stream is not None:
                items = shared.stream.batch(job, lambda: ring.note(producer, -1, -1, -1))
                if items is None:  # past the stream's end: the consumer stops at this batch
                    ring.fail(producer, job, _END_OF_STREAM)
                    continue
            elif shared.readers is not None:  # progress per sample, as the threads below note it
                items = shared.readers.read(shared.plan[job], shared.stop.is_set, _POLL_S,
                                            lambda sample: ring.note(producer, sample, -1, -1))
                if items is None:  # closing
                    return
            else:
                items = []
                for sample in shared.plan[job]:
                    if shared.stop.is_set():  # closed: the rest of this batch is never handed out
                        raise _Closed
                    ring.note(producer, sample, -1, -1)
                    shared.reading[producer] = f"at sample {sample}"
                    items.append(dataset[sample])
            collating = True
            # Noted, or a slow collate was blamed on the batch's last sample.
            ring.note(producer, _IN_COLLATE, -1, -1)
            shared.reading[producer] = f"in the slot collate of batch {job}"
            # Without autograd: copying an output that requires grad into a slot view recorded history on the view,
            # reused batch after batch, so the graph (and memory) grew without bound. A batch is data: its tensors
            # never require grad.
            with torch.no_grad():
                shapes = collate(items, views[slot])
            shared.reading.pop(producer, None)
            ring.commit(producer, job, _shapes(shared.names, shapes))
        except _Closed:
            shared.reading.pop(producer, None)
            return
        except BaseException as exc:  # every failure goes to the consumer, named; sys.exit() in the dataset too,
            # which ended this thread silently: the consumer waited for its batch until stall_timeout, or forever
            shared.reading.pop(producer, None)
            shared.errors[job] = exc
            where = ("in the slot collate" if collating else "reading the stream" if shared.stream is not None
                     else "in a reader process" if shared.readers is not None else f"at sample {sample}")
            ring.fail(producer, job, f"hetrain: producer {producer} failed on batch {job} {where}: "
                                     f"{type(exc).__name__}: {exc}")


def _close(shared: _Shared) -> None:
    shared.stop.set()
    if os.getpid() != shared.owner:  # a forked child: the threads, readers and ring are the parent's to stop
        return
    shared.ring.close()  # wakes every wait and joins the C++ threads
    # One deadline for all threads: two stuck in the dataset must not double the wait.
    deadline = time.monotonic() + shared.join_timeout
    # The garbage collector may run this finaliser in a producer thread, which cannot join itself: it returns
    # to its batch, finds the loader closed and ends.
    for t in shared.threads:  # a thread waiting on the reader processes returns within _POLL_S
        if t is not threading.current_thread():
            t.join(max(0.0, deadline - time.monotonic()))
    if shared.readers is not None:
        shared.readers.stop()
    if shared.stream is not None and not any(t.is_alive() for t in shared.threads):
        shared.stream.close()  # else a thread may be inside the source: it ends with it, and the loader lets it go
    # A copy: producers whose sample just returned pop from it meanwhile ("dictionary changed size during iteration"
    # replaced the error being raised). Not the thread closing: it returns to its batch next.
    busy = {p: s for p, s in dict(shared.reading).items()
            if shared.threads[p].is_alive() and shared.threads[p] is not threading.current_thread()}
    if busy:  # a thread cannot be stopped inside the dataset's or collate's code: it ends when that returns
        where = ", ".join(f"producer {p} {s}" for p, s in sorted(busy.items()))
        warnings.warn(f"hetrain: the ring loader closed while the dataset was still reading ({where}); "
                      "those threads end as soon as their sample or collate returns", RuntimeWarning, stacklevel=2)


def _pin_slots(pin_memory: bool | None) -> bool:
    """Whether the slots are pinned: by default when CUDA is available.

    Asked for without CUDA, pinning warns and is dropped, as in torch's DataLoader (a run set up for a GPU machine
    still runs here); pinned memory only speeds up copies to a GPU.
    """
    if pin_memory and not torch.cuda.is_available():
        warnings.warn("hetrain: pin_memory=True, but CUDA is not available: the ring's slots are not pinned",
                      UserWarning, stacklevel=3)
        return False
    return torch.cuda.is_available() if pin_memory is None else pin_memory


class RingLoader:
    """Iterates batches of ``batch_sampler`` over ``source``, assembled ahead in a ring of host slots.

    Args:
        source: a :class:`TokenWindows` (gathered in C++), any map-style Dataset or an IterableDataset
            (both need ``collate``).
        batch_sampler: yields index lists, e.g. :class:`~hetrain.data.sampler.TokenBudgetBatchSampler`; for an
            IterableDataset, a :class:`StreamBatches`.
        collate: for a Dataset, a slot collate with ``spec`` (:class:`PadInto`, :class:`CopyInto`). It runs under
            ``torch.no_grad()``: a batch is data, and its tensors never require grad.
        num_slots: batches in flight; the consumer may hold ``num_slots - 1`` while producers fill the rest.
        num_workers: producer threads.
        reader_processes: for a map-style Dataset, processes that run ``dataset[i]`` (forked, one torch
            thread each; a batch's samples are spread over the idle ones) while the producer threads collate
            into the slots: for datasets whose ``__getitem__`` is Python-heavy and would hold the GIL. A
            reader that dies is named at once. 0 reads in the producer threads.
        stall_timeout: seconds without progress after which a producer is reported stalled; silence before the
            process last resumed from a stop (Ctrl-Z, SIGSTOP) does not count. ``float("inf")`` never reports
            one. A consumer that holds every slot is told after as long, but 60 s at most. Closing waits as long,
            but 60 s at most, for a producer still inside the dataset, then warns.
        pin_memory: pin the slots (default: when CUDA is available), so host-to-device copies are asynchronous;
            True without CUDA warns and leaves them unpinned.
        lookahead: batches the consumer fetches before it uses them (Lightning's loops: 0, as this loader has a
            length), so that ``state_dict()`` counts only batches whose step ran.
        pad_id, vocab_size: for token sources: the padding id, and an id bound checked per token (corrupt files).
        max_tokens, max_rows: slot size; default from the sampler (``max_tokens``, ``max_batch_rows``).
    """

    def __init__(
        self,
        source: Any,
        batch_sampler: Any,
        *,
        collate: Callable | None = None,
        num_slots: int = 4,
        num_workers: int = 2,
        reader_processes: int = 0,
        stall_timeout: float = 60.0,
        pin_memory: bool | None = None,
        lookahead: int = 0,
        pad_id: int = 0,
        vocab_size: int | None = None,
        max_tokens: int | None = None,
        max_rows: int | None = None,
    ) -> None:
        if _ext.load() is None:
            raise RuntimeError(f"hetrain: RingLoader needs the compiled extension, but {_ext.available()}. "
                               "To run without it, use data.loader=torch with train.py's recipes, or a "
                               "torch.utils.data.DataLoader in code")
        if num_slots < 2 or num_workers < 1 or reader_processes < 0:
            raise ValueError(f"hetrain: need num_slots >= 2, num_workers >= 1 and reader_processes >= 0, got "
                             f"{num_slots}, {num_workers}, {reader_processes}")
        if isinstance(lookahead, bool) or not isinstance(lookahead, int) or lookahead < 0:
            raise ValueError(f"hetrain: lookahead counts batches fetched ahead of their step, >= 0, got {lookahead!r}")
        if reader_processes and isinstance(source, TokenWindows | torch.utils.data.IterableDataset):
            raise ValueError("hetrain: reader_processes reads a map-style Dataset; token files are gathered in C++ "
                             "and a stream is read in order")
        self.batch_sampler = batch_sampler
        self.sampler = batch_sampler  # where Lightning looks for set_epoch()
        self.source, self.lookahead = source, lookahead
        self.tokens = isinstance(source, TokenWindows)
        self.streaming = isinstance(source, torch.utils.data.IterableDataset)
        if self.streaming and not callable(batch_sampler):
            raise ValueError("hetrain: an iterable dataset is batched in stream order; pass "
                             "batch_sampler=StreamBatches(batch_size=..., max_tokens=...)")
        pin = _pin_slots(pin_memory)
        if self.tokens:
            if collate is not None:
                raise ValueError("hetrain: a TokenWindows source is gathered in C++; it takes no collate")
            source.file.check_unchanged()  # the C++ reader opens the path again: not a corpus rebuilt since
            rows = max_rows or getattr(batch_sampler, "max_batch_rows", None) or max(map(len, batch_sampler))
            toks = max_tokens or getattr(batch_sampler, "max_tokens", None) or rows * int(source.lengths.max())
            spec: Spec = {"input_ids": (torch.int64, toks), "attention_mask": (torch.bool, toks),
                          "lengths": (torch.int64, rows), "sample_ids": (torch.int64, rows)}
        else:
            if collate is None or not hasattr(collate, "spec"):
                raise ValueError("hetrain: a Dataset source needs a slot collate with a `spec` "
                                 "(PadInto(...), or CopyInto(your_collate, spec))")
            spec = collate.spec
        for name, (dtype, _) in spec.items():
            if dtype not in _DTYPE_NAMES:
                raise ValueError(f"hetrain: slot field {name!r} has dtype {dtype}, which a ring slot cannot hold; "
                                 f"use one of {', '.join(str(d) for d in _DTYPE_NAMES)}")
        ring = torch.classes.hetrain_C.RingBuffer(
            [_DTYPE_NAMES[d] for d, _ in spec.values()], [int(c) for _, c in spec.values()],
            num_slots, num_workers, pin, float(stall_timeout), _HELD_MAX_S,
        )
        self._shared = _Shared(ring, list(spec))
        # Closes the ring when the loader is garbage-collected (or at exit), even if close() is never called.
        # Registered before any thread starts, so that one failing to start stops those started before it.
        self._shared.join_timeout = min(stall_timeout, _CLOSE_JOIN_MAX_S)
        self._finalizer = weakref.finalize(self, _close, self._shared)
        try:
            self._start_producers(source, collate, num_slots, num_workers, reader_processes, pad_id, vocab_size)
        except BaseException:  # a thread limit, Ctrl-C: the threads started poll on, and abort the process at exit
            self.close()
            raise
        self._yielded = 0
        self._exhausted = False
        self._epoch = getattr(batch_sampler, "epoch", None)  # the sampler's epoch that _yielded counts batches of
        self._iteration = 0  # bumped by every iteration that starts: only the newest may take batches
        self._wait = WaitClock()

    def _start_producers(self, source: Any, collate: Callable | None, num_slots: int, num_workers: int,
                         reader_processes: int, pad_id: int, vocab_size: int | None) -> None:
        shared = self._shared
        if self.tokens:
            tf = source.file
            shared.ring.attach_tokens(
                str(tf.bin_path), tf.dtype.itemsize, tf.num_tokens, torch.from_numpy(source.windows.start),
                torch.from_numpy(source.windows.length), pad_id, vocab_size or 0, num_workers, 0,
            )
            return
        if reader_processes > 0 and not self.streaming:
            # Forked before any producer thread exists, so no thread's lock is copied held.
            shared.readers = ReaderProcesses(source, reader_processes)
        for p in range(num_workers):
            t = threading.Thread(target=_produce, args=(shared, p, source, collate, num_slots),
                                 name=f"hetrain-ring-producer-{p}", daemon=True)
            t.start()
            shared.threads.append(t)

    # -- iteration -------------------------------------------------------------------------------

    def __len__(self) -> int:
        if self.streaming:
            raise TypeError("hetrain: a RingLoader over an iterable dataset has no length")
        return len(self.batch_sampler)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self._wait.iterate(self._batches())

    @property
    def wait_seconds(self) -> float:
        """Seconds the consumer has spent waiting in ``next()`` for batches, over every iteration."""
        return self._wait.seconds

    def _batches(self) -> Iterator[dict[str, torch.Tensor]]:
        if self._shared.stop.is_set():
            raise RuntimeError("hetrain: this RingLoader was closed")
        if self.streaming:
            yield from self._iter_stream()
            return
        plan = [list(b) for b in self.batch_sampler]
        self._yielded, self._exhausted, self._epoch = 0, False, getattr(self.batch_sampler, "epoch", None)
        self._iteration += 1
        iteration = self._iteration
        ring = self._shared.ring
        if self.tokens:  # the C++ gatherer installs its plan once the last epoch is drained
            ids = np.fromiter(chain.from_iterable(plan), dtype=np.int64)
            offsets = np.zeros(len(plan) + 1, dtype=np.int64)
            np.cumsum([len(b) for b in plan], out=offsets[1:])
            self._drain()
            self._call(ring.start_token_epoch, torch.from_numpy(ids), torch.from_numpy(offsets))
        else:
            self._start_epoch(len(plan), plan=plan)
        for job in range(len(plan)):
            yield self._batch(job, iteration)
        self._exhausted = True

    def _iter_stream(self) -> Iterator[dict[str, torch.Tensor]]:
        """An iterable source: batches in stream order until the stream ends (producers find the end)."""
        self._yielded, self._exhausted = 0, False
        self._iteration += 1
        iteration = self._iteration
        shared = self._shared
        self._start_epoch(_UNBOUNDED, stream=_Stream(iter(self.source), self.batch_sampler, shared.stop))
        jobs = iter(range(_UNBOUNDED))
        # iter(f, None) calls f until the stream's end and, unlike a local, keeps no batch it handed out.
        yield from iter(lambda: self._batch(next(jobs), iteration), None)
        self._exhausted = True

    def _batch(self, job: int, iteration: int) -> dict[str, torch.Tensor] | None:
        """Batch ``job``, counted as handed out; None past the end of a stream.

        Built here rather than in the generators so that their frames keep no reference to a batch across
        ``yield``: a slot is refilled once the consumer drops the batch, not after the next one arrives.
        """
        tensors = self._take(job, iteration)
        if tensors is None:
            return None
        self._yielded += 1
        return dict(zip(self._shared.names, tensors, strict=True))

    def _start_epoch(self, num_jobs: int, plan: list[list[int]] | None = None, stream: _Stream | None = None) -> None:
        """Starts the ring's epoch with this plan or stream, installed only once the last epoch is drained.

        A producer still on a batch of an abandoned iteration (after a ``break``) reads that iteration's plan
        or stream: installed before, it took the new epoch's batch (a stream then lost one: "end of stream").
        """
        shared, ring = self._shared, self._shared.ring
        self._drain()  # hands out no batch until start_epoch below
        shared.errors.clear()
        shared.plan, shared.stream = plan or [], stream
        self._call(ring.start_epoch, num_jobs)

    def _drain(self) -> None:
        """Waits until no batch of an abandoned iteration is being filled, in short waits inside C++ so that Ctrl-C
        reaches Python while a producer is inside a slow sample (a stall still ends the wait after stall_timeout)."""
        ring = self._shared.ring
        try:
            while not self._call(ring.drain, _POLL_S):
                pass
        except BaseException:  # KeyboardInterrupt and the like (a LoaderError closed already): let it through
            self._close_promptly()  # even if a sample takes long to read
            raise

    def _call(self, fn: Callable, *args: Any) -> Any:
        try:
            return fn(*args)
        except RuntimeError as exc:
            self._close_promptly()  # the ring failed while draining: a stall, or already closed
            raise LoaderError(str(exc)) from None

    def _close_promptly(self) -> None:
        """Closes without waiting ``stall_timeout`` for producers: a stalled one would only delay the error.

        A thread still inside the dataset ends when its sample returns; meanwhile it writes only into the slot
        it claimed, which the closed ring never hands out.
        """
        self._shared.join_timeout = _INTERRUPT_JOIN_S
        self.close()

    def _take(self, job: int, iteration: int) -> list[torch.Tensor] | None:
        """Batch ``job``'s tensors; None past the end of a stream."""
        if iteration != self._iteration:
            # The ring restarted its epoch for the newer iteration: this one's batches are gone, and taking
            # one the newer iteration holds would wait forever.
            raise RuntimeError("hetrain: a newer iteration of this RingLoader started, so this iterator ends; a "
                               "RingLoader serves one iterator at a time (finish or drop one before iter() again)")
        ring = self._shared.ring
        try:
            while True:  # short waits in C++, so Ctrl-C reaches Python between them
                tensors = ring.take(job, _POLL_S)
                if tensors:
                    return tensors
                # Slots held only until their copies to a GPU ran go back now: waiting here, the consumer makes no
                # later hold_until_copied call, the only other place that lets them go (else a stall).
                host_copies.release_completed()
        except RuntimeError as exc:
            stream = self._shared.stream
            if stream is not None and stream.end is not None and job >= stream.end and _is_end_of_stream(exc):
                return None
            # A producer raised, stalled, or every slot is held: no thread is worth waiting for, as one still
            # inside a slow sample would delay the error by up to stall_timeout.
            self._close_promptly()
            raise LoaderError(str(exc)) from self._shared.errors.get(job)
        except BaseException:  # KeyboardInterrupt and the like: stop the producers, then let it through
            self._close_promptly()  # even if a sample takes long to read
            raise

    # -- resume ----------------------------------------------------------------------------------

    def consumed(self) -> int:
        """Batches of the current iteration whose step ran (``lookahead`` fetched ones do not count).

        0 once the sampler moved to another epoch: Lightning calls the sampler's ``set_epoch`` itself, and
        may save a checkpoint before that epoch's first batch.
        """
        if getattr(self.batch_sampler, "epoch", None) != self._epoch:
            return 0
        return self._yielded if self._exhausted else max(0, self._yielded - self.lookahead)

    def state_dict(self, steps: int | None = None) -> dict[str, Any]:
        """The sampler's ``(epoch, seed, position)`` after ``steps`` batches (default: :meth:`consumed`)."""
        if self.streaming:
            raise TypeError("hetrain: a stream has no position to resume from; for exact resumes use a map-style "
                            "dataset or token files with a TokenBudgetBatchSampler")
        return self.batch_sampler.state_dict(steps=self.consumed() if steps is None else steps)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resumes at ``state``; until the next batch, ``state_dict()`` gives back exactly that position."""
        self.batch_sampler.load_state_dict(state)
        self._yielded, self._exhausted = 0, False
        self._epoch = getattr(self.batch_sampler, "epoch", None)

    def set_epoch(self, epoch: int) -> None:
        self.batch_sampler.set_epoch(epoch)

    # -- resources -------------------------------------------------------------------------------

    @property
    def nbytes(self) -> int:
        """Host bytes of all slots: allocated once at construction, never more."""
        return self._shared.ring.nbytes()

    @property
    def pinned_bytes(self) -> int:
        return self.nbytes if self._shared.ring.pinned() else 0

    def close(self) -> None:
        """Stops and joins every producer; batches already handed out stay valid. Safe to call twice."""
        self._finalizer()

    def __enter__(self) -> RingLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
