"""How long a training loop waited for its data: the seconds its loader's consumer spent inside ``next()``.

A callback sees only batch boundaries; the time between the end of one batch and the start of the next
holds the fetch but also moving the batch, Lightning's logging and every other callback's hooks, so it
bounds the wait for data from above without measuring it. hetrain's loaders time their own ``next()``
and expose the total as ``wait_seconds``, which :class:`~hetrain.callbacks.Throughput` reads per batch.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

from torch.utils.data import DataLoader

T = TypeVar("T")


class WaitClock:
    """Adds up the seconds spent inside ``next()`` of the iterators it wraps.

    Args:
        clock: returns seconds; ``time.perf_counter`` by default, a scripted one in tests.
    """

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self.seconds = 0.0
        self.clock = clock

    def iterate(self, iterable: Iterable[T]) -> Iterator[T]:
        """Yields ``iterable``'s items, counting the time each ``next()`` took (the last, empty one too)."""
        clock = self.clock
        iterator = iter(iterable)
        # Holds the item only until it is yielded: a local would keep it (a ring slot) alive through the
        # next ``next()``, after the consumer dropped it.
        item: list[T] = []
        while True:
            start = clock()
            try:
                item.append(next(iterator))
            except StopIteration:
                return
            finally:
                self.seconds += clock() - start
            yield item.pop()


class TimedDataLoader(DataLoader):
    """torch's ``DataLoader`` with ``wait_seconds``: the time its consumer spent waiting in ``next()``.

    A subclass rather than a wrapper, so Lightning still recognises it as a DataLoader (and re-creates it
    with a distributed sampler under DDP from the same arguments).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.wait_clock = WaitClock()

    def __iter__(self) -> Iterator[Any]:
        return self.wait_clock.iterate(super().__iter__())

    @property
    def wait_seconds(self) -> float:
        return self.wait_clock.seconds
