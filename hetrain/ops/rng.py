"""Where hetrain's dropout ops get their randomness: one ``(seed, offset)`` stream per call.

The kernels keep element ``i`` of a call when a counter hash of ``(seed, offset + i)`` clears ``p``, so
a mask is a function of the stream and each element's place in it. Outside a pipeline split each call
draws a fresh seed from the CPU default generator (reproducible under ``torch.manual_seed``; a CUDA
input needs no device sync) with offset 0.

A pipeline split runs each stage once per micro-batch, so an unsplit model's one call per dropout site
becomes several, in another order. Under :func:`micro_batch` the first micro-batch's calls draw the
seeds (in the unsplit model's order, stage by stage) and record them; the later micro-batches replay
them, site by site, each at the offset of its first row in the whole batch. Every element then gets
the random number it gets in the unsplit model, and the split's outputs and gradients equal the
unsplit model's with dropout on. Inputs to dropout inside a split stage must be batch-first.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch

_active = threading.local()

# The custom-op tag of ops whose kernels take a seed read on the host: a CUDA graph would keep the value read at
# capture, so every replay would repeat one dropout mask. Inductor's CUDA graphs (torch.compile(mode=
# "reduce-overhead")) run ops with this tag outside the graphs, eagerly, each call with its own seed. (Older torch
# builds lack the tag; their compiled graphs with these ops' CPU seeds take no CUDA graph at all.) A capture by
# hand is refused instead (:func:`dropout_stream`).
HOST_SEEDED = tuple(t for t in (getattr(torch.Tag, "cudagraph_unsafe", None),) if t is not None)


class _Tape:
    """The seeds one stage's dropout sites drew on its first micro-batch, in call order."""

    def __init__(self, seeds: list[torch.Tensor], first_row: int, record: bool) -> None:
        self.seeds, self.first_row, self.record, self.calls = seeds, first_row, record, 0

    def next_seed(self) -> torch.Tensor:
        if self.record:
            self.seeds.append(_draw())
        elif self.calls >= len(self.seeds):
            raise RuntimeError(
                f"hetrain: a pipeline stage made more dropout calls on a later micro-batch ({self.calls + 1}) than on "
                f"its first ({len(self.seeds)}): a stage must call dropout the same way on every micro-batch")
        seed = self.seeds[self.calls]
        self.calls += 1
        return seed


def _draw() -> torch.Tensor:
    # A tensor op, not a Python int: torch.compile traces it without a graph break.
    return torch.randint(2**31, (1,), dtype=torch.int64)


@contextmanager
def micro_batch(seeds: list[torch.Tensor], first_row: int, record: bool) -> Iterator[None]:
    """Dropout calls inside draw into ``seeds`` (``record``) or replay them, offset to row ``first_row``."""
    previous = getattr(_active, "tape", None)
    _active.tape = _Tape(seeds, first_row, record)
    try:
        yield
    finally:
        _active.tape = previous


def stream(seed: torch.Tensor) -> tuple[int, int]:
    """``(seed, offset)`` as ints from a kernel's seed argument: int64 ``(seed,)`` or ``(seed, offset)``."""
    values = seed.tolist()
    return int(values[0]), int(values[1]) if len(values) > 1 else 0


@contextmanager
def masks_fixed_in_cuda_graphs() -> Iterator[None]:
    """Lets dropout calls be captured in a CUDA graph, every replay applying the masks drawn at capture: for
    timing the kernels (``bench-ops`` replays each call from a graph), never for training."""
    previous = getattr(_active, "fixed_masks", False)
    _active.fixed_masks = True
    try:
        yield
    finally:
        _active.fixed_masks = previous


def _refuse_capture(op: str) -> None:
    """A dropout call captured in a CUDA graph would bake its host-drawn seed into the graph: every replay the
    same mask, silently. Refused unless :func:`masks_fixed_in_cuda_graphs` asks for exactly that."""
    if getattr(_active, "fixed_masks", False) or torch.compiler.is_compiling():
        return
    if torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            f"hetrain.ops.{op}: called while a CUDA graph is being captured. Its seed is drawn on the host, so every "
            f"replay would apply the same dropout mask. Capture the model in eval mode (or with p=0), use "
            f"torch.nn.functional.dropout inside captured regions, or keep dropout outside the graph")


def dropout_stream(x: torch.Tensor, op: str = "dropout") -> torch.Tensor:
    """The int64 stream of a dropout call on ``x``: ``(seed,)`` (offset 0, which the kernels assume when it is
    left out: padding it on cost more than the small kernel) or, inside a split, ``(seed, offset)``
    (batch-first ``x``). ``op`` names the caller in the error refusing a CUDA graph capture."""
    if x.is_cuda:
        _refuse_capture(op)
    tape = getattr(_active, "tape", None)
    if tape is None:
        return _draw()
    per_row = x.numel() // x.shape[0] if x.dim() and x.shape[0] else 0
    return torch.cat([tape.next_seed(), torch.tensor([tape.first_row * per_row], dtype=torch.int64)])
