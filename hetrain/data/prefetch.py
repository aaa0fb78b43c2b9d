"""Device prefetch: the next batch's host-to-device copy runs on a side CUDA stream while this step computes.

From pinned memory a ``non_blocking`` copy returns at once and the DMA engine moves the bytes while
the GPU runs the current step; from pageable memory the same call would stall the host. An event
recorded after each copy makes the compute stream wait for exactly that copy (no device-wide sync),
and the host batch (a ring slot) is dropped only after its event completed, so a slot is never
refilled while the GPU still reads it. On a CPU device there is nothing to copy: batches pass through.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

import torch

from hetrain.data.wait_clock import WaitClock

T, S, R = TypeVar("T"), TypeVar("S"), TypeVar("R")


def _to_device(batch: Any, device: torch.device) -> Any:
    # Batches are dicts, lists or tuples of tensors; a few lines here avoid depending on a private tree utility.
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, list | tuple):
        items = [_to_device(v, device) for v in batch]
        return type(batch)(*items) if hasattr(batch, "_fields") else type(batch)(items)  # a namedtuple takes fields
    return batch


def _tensors(batch: Any) -> Iterator[torch.Tensor]:
    if isinstance(batch, torch.Tensor):
        yield batch
    elif isinstance(batch, dict):
        for v in batch.values():
            yield from _tensors(v)
    elif isinstance(batch, list | tuple):
        for v in batch:
            yield from _tensors(v)


def _one_ahead(source: Iterable[T], start: Callable[[T], S], finish: Callable[[S], R]) -> Iterator[R]:
    """Yields ``finish(start(item))`` for each of ``source``'s items, item k+1 started before item k is finished.

    An ``Exception`` fetching item k+1 arrives after item k, already started, was yielded, as it would without
    the lookahead. A ``BaseException`` (Ctrl-C, exit) goes through at once: held back behind one more item, it
    would be lost by a consumer that closes the iterator instead of asking for the next one.
    """
    iterator = iter(source)
    # Lists, emptied as their item moves on: a local would keep it (a ring slot) alive after it was dropped.
    pending: list[S] = []
    ready: list[R] = []
    while True:
        try:
            item = next(iterator)
        except StopIteration:
            break
        except Exception:
            if pending:
                yield finish(pending.pop())
            raise
        started = start(item)
        del item
        if pending:
            ready.append(finish(pending.pop()))
        pending.append(started)
        del started  # only `pending` keeps the newest item; the one handed over is released
        if ready:
            yield ready.pop()
    if pending:
        yield finish(pending.pop())


class DevicePrefetcher:
    """Yields ``loader``'s batches on ``device``, each copied one step ahead on a side stream.

    Forwards ``len()``, ``set_epoch``, ``state_dict``/``load_state_dict`` and ``sampler`` to the loader, so
    it can stand where Lightning expects a dataloader (its ``transfer_batch_to_device`` then finds the
    tensors already in place). ``lookahead`` counts batches the consumer fetches before it uses them, for
    ``state_dict()``: the batch copied ahead here is never counted as consumed.
    """

    def __init__(self, loader: Iterable, device: torch.device | str, lookahead: int = 0) -> None:
        self.loader, self.device, self.lookahead = loader, torch.device(device), lookahead
        self.sampler = getattr(loader, "sampler", None)
        self._yielded, self._exhausted = 0, False
        self._epoch = getattr(self.sampler, "epoch", None)  # the sampler's epoch that _yielded counts batches of
        self._wait = WaitClock()

    @property
    def active(self) -> bool:
        """Whether batches are copied on a side stream (a CUDA device), not passed through."""
        return self.device.type == "cuda"

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Any]:
        return self._wait.iterate(self._batches())

    @property
    def wait_seconds(self) -> float:
        """Seconds the consumer has spent waiting in ``next()``: the loader's batch plus its copy's end."""
        return self._wait.seconds

    def _batches(self) -> Iterator[Any]:
        self._yielded, self._exhausted, self._epoch = 0, False, getattr(self.sampler, "epoch", None)
        if not self.active:
            # map, not a for loop: its target variable would keep the last batch (a ring slot) through next().
            yield from map(self._count, self.loader)
            self._exhausted = True
            return
        copy_stream = torch.cuda.Stream(device=self.device)
        yield from _one_ahead(self.loader, lambda host: self._start_copy(host, copy_stream), self._hand_over)
        self._exhausted = True

    def _start_copy(self, host: Any, copy_stream: torch.cuda.Stream) -> tuple[Any, torch.cuda.Event, Any]:
        """``host``'s copy issued on ``copy_stream``: (device batch, copy-done event, host batch to keep until then)."""
        with torch.cuda.stream(copy_stream):
            moved = _to_device(host, self.device)
            done = torch.cuda.Event()
            done.record(copy_stream)
        return moved, done, host

    def _count(self, batch: Any) -> Any:
        self._yielded += 1
        return batch

    def _hand_over(self, started: tuple[Any, torch.cuda.Event, Any]) -> Any:
        """The device batch made safe for the compute stream; the caller drops the host batch afterwards."""
        moved, done, _ = started
        compute = torch.cuda.current_stream(self.device)
        compute.wait_event(done)
        for t in _tensors(moved):
            # Memory allocated on the side stream is used on the compute stream: tell the caching allocator.
            t.record_stream(compute)
        # The copy was issued a whole step ago, so this rarely waits; after it the host slot may be refilled.
        done.synchronize()
        self._yielded += 1
        return moved

    def consumed(self) -> int:
        """Batches of the current iteration whose step ran; none once the sampler moved to another epoch
        (Lightning calls the sampler's ``set_epoch`` itself, and may save before that epoch's first batch)."""
        if getattr(self.sampler, "epoch", None) != self._epoch:
            return 0
        return self._yielded if self._exhausted else max(0, self._yielded - self.lookahead)

    def state_dict(self) -> dict[str, Any]:
        return self.loader.state_dict(steps=self.consumed())

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resumes at ``state``; until the next batch, ``state_dict()`` gives back exactly that position."""
        self.loader.load_state_dict(state)
        self._yielded, self._exhausted = 0, False
        self._epoch = getattr(self.sampler, "epoch", None)

    def set_epoch(self, epoch: int) -> None:
        self.loader.set_epoch(epoch)
