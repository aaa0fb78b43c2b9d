"""Host memory that a non-blocking copy to a GPU still reads stays alive until that copy has run.

torch keeps the source of such a copy alive only when its caching host allocator made the block. A ring
slot is a view into one pinned slab (``from_blob``), so for torch the copy has no owner: once the batch is
dropped the slot goes back to its producer, which may refill it before the GPU has read it (the copy waits
behind the step's kernels), and the step trains on the next batch's bytes. :func:`hold_until_copied` keeps
the sources referenced until an event recorded after their copies has completed; :func:`release_all` lets the
last ones go where a run ends.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

import torch

# Past this many copies in flight the oldest is waited for: a bound on memory held, never reached in practice
# (a step's copies complete within a step or two).
MAX_HELD = 64

_held: deque[tuple[torch.cuda.Event, tuple[torch.Tensor, ...]]] = deque()


def hold_until_copied(sources: Iterable[torch.Tensor], stream: torch.cuda.Stream) -> None:
    """Keeps ``sources`` (host tensors just copied to a GPU on ``stream``) alive until ``stream`` has run the
    copies; earlier holds are released oldest first while their copies have run (one still running keeps those
    after it held, even where theirs have run: copies from one stream complete in order)."""
    held = tuple(t for t in sources if t.device.type == "cpu")
    if held:
        event = torch.cuda.Event()
        event.record(stream)
        _held.append((event, held))
    while _held:
        event = _held[0][0]
        if not event.query():
            if len(_held) <= MAX_HELD:
                break
            event.synchronize()  # over the bound: wait for the oldest
        _held.popleft()


def held_count() -> int:
    """Copies whose host sources are still held."""
    return len(_held)


def release_all() -> None:
    """Waits for every held copy to run and drops its sources. Holds are otherwise released only by a later
    :func:`hold_until_copied`: where a fit ends, the last batches' ring slots, and through them the loader's whole
    pinned slab, would stay referenced until the next run's first copy."""
    while _held:
        _held[0][0].synchronize()
        _held.popleft()
