"""Where hetrain's dropout ops get their randomness: one ``(seed, offset)`` stream per call.

The kernels keep element ``i`` of a call when a counter hash of ``(seed, offset + i)`` clears ``p``, so
a mask is a function of the stream and each element's place in it. Outside a pipeline split each call
draws a fresh seed from the CPU default generator (reproducible under ``torch.manual_seed``; a CUDA
input needs no device sync) with offset 0. A call on a GPU tensor captured in a CUDA graph draws its
``(seed, offset)`` on the GPU instead, inside the graph, so each replay applies a new mask.

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
# hand draws the seed on the GPU instead (:func:`dropout_stream`).
HOST_SEEDED = tuple(t for t in (getattr(torch.Tag, "cudagraph_unsafe", None),) if t is not None)


def keep_scale(p: float) -> float:
    """What a kept element is multiplied by, 1 / (1 - p); 0 at p = 1, where every element is dropped."""
    return 1.0 / (1.0 - p) if p < 1 else 0.0


def apply_mask(x: torch.Tensor, keep: torch.Tensor, p: float) -> torch.Tensor:
    """``x`` scaled where ``keep`` is true and exactly 0 elsewhere: a select, so a dropped inf or NaN gives 0, as
    every backend's kernels give (``dropout::apply`` in csrc)."""
    return torch.where(keep, x * keep_scale(p), 0.0)


class _Tape:
    """The seeds one stage's dropout sites drew on its first micro-batch, in call order."""

    def __init__(self, seeds: list[torch.Tensor], first_row: int, record: bool) -> None:
        self.seeds, self.first_row, self.record, self.calls = seeds, first_row, record, 0
        # The first row as a tensor too, for the host stream: torch.compile takes a tensor as a graph input, where it
        # would bake an int into the graph and recompile for every micro-batch's first row.
        self.first_row_tensor = torch.tensor([first_row], dtype=torch.int64)

    def next_seed(self, device: torch.device | None = None) -> torch.Tensor:
        if self.record:
            self.seeds.append(_draw(device))
        elif self.calls >= len(self.seeds):
            raise RuntimeError(
                f"hetrain: a pipeline stage made more dropout calls on a later micro-batch ({self.calls + 1}) than on "
                f"its first ({len(self.seeds)}): a stage must call dropout the same way on every micro-batch")
        seed = self.seeds[self.calls]
        self.calls += 1
        return seed

    def offset(self, x: torch.Tensor) -> int:
        """The stream index of batch-first ``x``'s first element: its micro-batch's first row in the whole batch."""
        return self.first_row * _per_row(x)

    def offset_tensor(self, x: torch.Tensor) -> torch.Tensor:
        """:meth:`offset` as an int64 ``(1,)`` tensor on the CPU, which a compiled stage reads without a guard."""
        return self.first_row_tensor * _per_row(x)


def _per_row(x: torch.Tensor) -> int:
    """Elements per row of batch-first ``x`` (0 for a 0-d or empty one)."""
    return x.numel() // x.shape[0] if x.dim() and x.shape[0] else 0


def _draw(device: torch.device | None = None) -> torch.Tensor:
    # A tensor op, not a Python int: torch.compile traces it without a graph break. On the CPU by default, so
    # the kernels get the seed by value and a CUDA input needs no device sync.
    return torch.randint(2**31, (1,), dtype=torch.int64, device=device)


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
    """``(seed, offset)`` as ints from a kernel's seed argument: int64 ``(seed,)`` or ``(seed, offset)``, on the
    CPU. A seed on a GPU (drawn by a CUDA graph being captured) is refused, naming the backends that read it there."""
    if seed.device.type != "cpu":
        raise RuntimeError(
            "hetrain: this dropout call is being captured in a CUDA graph, so its seed is drawn on the GPU by the "
            "graph itself (a new one every replay); the triton and cuda backends read it there, the torch "
            "reference does not. Use one of them for the captured region (e.g. hetrain.plugins.use_backend("
            "dropout='triton', dropout_add_layer_norm='triton')), or keep dropout out of the capture")
    if torch._C._functorch.is_batchedtensor(seed):  # vmap(randomness="different"): a seed per sample
        raise RuntimeError(
            "hetrain: a dropout backend was called directly under torch.vmap(..., randomness='different'), with a "
            "seed per sample, which a backend reads on the host one sample at a time; call hetrain.ops.dropout or "
            "hetrain.ops.dropout_add_layer_norm, which run each sample with its own seed")
    values = seed.tolist()
    return int(values[0]), int(values[1]) if len(values) > 1 else 0


@contextmanager
def masks_fixed_in_cuda_graphs() -> Iterator[None]:
    """Dropout calls captured in a CUDA graph inside keep the seed drawn at capture, so every replay applies the
    same masks: for timing the kernels alone (``bench-ops`` replays each call from a graph, with no draw of its
    own), never for training."""
    previous = getattr(_active, "fixed_masks", False)
    _active.fixed_masks = True
    try:
        yield
    finally:
        _active.fixed_masks = previous


def _captured_stream(x: torch.Tensor, tape: _Tape | None) -> torch.Tensor:
    """The int64 ``(seed, offset)`` of a call captured in a CUDA graph, on ``x``'s GPU and drawn by the graph.

    torch's CUDA generator advances its state on every replay of a graph that drew from it, so each replay
    applies a new mask; the triton and cuda kernels read the stream from memory (a host-drawn seed would be baked
    into the graph, and every replay would repeat the mask of the capture).
    """
    if tape is None:
        return torch.constant_pad_nd(_draw(x.device), (0, 1), 0)
    seed = tape.next_seed(x.device)
    if seed.device != x.device:
        raise RuntimeError(
            "hetrain: a pipeline stage's later micro-batch is being captured in a CUDA graph but its first was not, "
            "so its dropout seed was drawn on the host; capture every micro-batch of the step, or none")
    return torch.constant_pad_nd(seed, (0, 1), tape.offset(x))


def dropout_stream(x: torch.Tensor) -> torch.Tensor:
    """The int64 stream of a dropout call on ``x``: ``(seed,)`` (offset 0, which the kernels assume when it is
    left out: padding it on cost more than the small kernel) or, inside a split, ``(seed, offset)``
    (batch-first ``x``); on the CPU, except for a call on a GPU tensor being captured in a CUDA graph, whose
    ``(seed, offset)`` the graph draws on the GPU (:func:`_captured_stream`)."""
    tape = getattr(_active, "tape", None)
    if x.is_cuda and _capturing():
        return _captured_stream(x, tape)
    if tape is None:
        return _draw()
    seed = tape.next_seed()
    if seed.device.type != "cpu":
        raise RuntimeError(
            "hetrain: a pipeline stage's first micro-batch was captured in a CUDA graph but this later one is not, so "
            "its dropout seed lives on the GPU, drawn by the graph; capture every micro-batch of the step, or none")
    return torch.cat([seed, tape.offset_tensor(x)])


def refuse_host_seed_in_capture(x: torch.Tensor, seed: torch.Tensor, p: float) -> None:
    """Raises where a dropout call on a GPU is captured in a CUDA graph with a seed drawn on the host, which the
    graph would keep: every replay would repeat one mask. Eager calls draw on the GPU under a capture
    (:func:`dropout_stream`); this catches compiled code (its draw traced where a trace cannot know of a capture
    to come) captured by hand. The ops' graph guard: compiled graphs run it when they run."""
    if p > 0 and x.is_cuda and seed.device.type == "cpu" and _capturing():
        raise RuntimeError(
            "hetrain: a dropout call compiled by torch.compile is being captured in a CUDA graph by hand "
            "(torch.cuda.graph, make_graphed_callables); its seed was drawn on the host when the graph was recorded, "
            "so every replay would apply the same mask. Capture the eager model (its dropout draws on the GPU "
            "inside the graph), or let torch.compile make the CUDA graphs: mode='reduce-overhead' runs these ops "
            "between them, each call with a new seed")


def _capturing() -> bool:
    """A CUDA graph capture by hand (torch.cuda.graph, make_graphed_callables), unless fixed masks were asked for.
    Inductor's CUDA graphs run these ops outside their graphs (HOST_SEEDED), so a trace draws as eager does."""
    if getattr(_active, "fixed_masks", False) or torch.compiler.is_compiling():
        return False
    return torch.cuda.is_current_stream_capturing()
