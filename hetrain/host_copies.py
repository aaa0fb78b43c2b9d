"""Host memory that a non-blocking copy to a GPU still reads stays alive until that copy has run.

torch keeps the source of such a copy alive only when its caching host allocator made the block. A ring
slot is a view into one pinned slab (``from_blob``), so for torch the copy has no owner: once the batch is
dropped the slot goes back to its producer, which may refill it before the GPU has read it (the copy waits
behind the step's kernels), and the step trains on the next batch's bytes. :func:`hold_until_copied` keeps
the sources referenced until an event recorded after their copies has completed; :func:`release_completed` lets
those go without a new hold (a loader waiting for a free slot calls it); :func:`release_all` lets the last ones go
where a run ends.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterable

import torch

# Past this many copies in flight the oldest is waited for: a bound on memory held, never reached in practice
# (a step's copies complete within a step or two).
MAX_HELD = 64

_held: deque[tuple[torch.cuda.Event, tuple[torch.Tensor, ...]]] = deque()
# A loader may release from another thread than the one that holds: the oldest hold is looked at, then dropped.
# Re-entrant: dropping a hold frees tensors, and a garbage collection run then may end up here again.
_lock = threading.RLock()


def hold_until_copied(sources: Iterable[torch.Tensor], stream: torch.cuda.Stream) -> None:
    """Keeps ``sources`` (host tensors just copied to a GPU on ``stream``) alive until ``stream`` has run the
    copies; earlier holds are released oldest first while their copies have run (one still running keeps those
    after it held, even where theirs have run: copies from one stream complete in order)."""
    held = tuple(t for t in sources if t.device.type == "cpu")
    with _lock:
        if held:
            event = torch.cuda.Event()
            event.record(stream)
            _held.append((event, held))
        _release(MAX_HELD)


def release_completed() -> None:
    """Releases, oldest first, the holds whose copies have run; waits for none. Holds were otherwise released only by
    a later :func:`hold_until_copied`: a consumer waiting for a ring slot, which makes no such call, kept slots whose
    copies had long run until its loader reported a stall."""
    with _lock:
        _release(None)


def _release(bound: int | None) -> None:
    """Drops the oldest holds while their copies have run, and past ``bound`` holds waits for the oldest (0: for
    every one)."""
    while _held:
        event = _held[0][0]
        if not event.query():
            if bound is None or len(_held) <= bound:
                break
            event.synchronize()  # over the bound: wait for the oldest
        _held.popleft()


def held_count() -> int:
    """Copies whose host sources are still held."""
    return len(_held)


def release_all() -> None:
    """Waits for every held copy to run and drops its sources. Holds are otherwise released only by a later
    :func:`hold_until_copied` or :func:`release_completed`: where a fit ends, the last batches' ring slots, and
    through them the loader's whole pinned slab, would stay referenced until the next run's first copy."""
    with _lock:
        _release(0)
