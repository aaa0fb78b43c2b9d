"""Allocator churn: the same allocations made and freed in every training step, and the modules that make them.

A step that allocates a fresh buffer of the same size every time (``torch.zeros(...)`` inside a
``forward``, a ``.contiguous()`` copy, an optimizer's scratch tensor) pays the allocator and the
first touch of the memory each step, and on a GPU it fragments the cache. :class:`ChurnTracker`
(no Trainer needed) profiles a few chosen steps with ``torch.profiler`` (``profile_memory=True``),
whose allocation and free events carry the allocator's id that pairs them, on the CPU and on CUDA
alike. Each step runs with a ``record_function`` range around every module's forward, so an
allocation belongs to the innermost module it happened in; a backward allocation belongs to the
module whose forward op created the autograd node (the node and that op share a sequence number).

An allocation freed within the step it was made in is sorted into one of five kinds:

- ``temporary``: made by an op and freed after that op returned but before the module's forward
  (or the backward node, or the optimizer step) that called it did: scratch memory, the
  allocations a person can remove.
- ``op workspace``: freed before the op that made it returned: a kernel's scratch space, or a
  composite op's intermediate; a different op, dtype or layout is the only remedy.
- ``kept for backward``: made in the forward, freed during the backward: activations autograd
  saved (or tensors the step held until then); expected.
- ``passed on``: freed later in the same phase by whoever received it: a module's output consumed
  by the next module, a gradient handed from one backward node to the next; expected.
- ``recomputed``: under activation checkpointing, made by the forward a backward node runs again
  (phase ``recompute``) and freed after that run, during the backward: the activations checkpointing
  trades compute for, and the intermediates the run leaves for torch to drop; expected.

An allocation is *churned* when its (device, module, phase, op, kind, size) recurs in every observed step.
"""

from __future__ import annotations

import bisect
import logging
import os
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.autograd.profiler import record_function
from torch.utils.hooks import RemovableHandle

from hetrain.nn._share import observer

log = logging.getLogger(__name__)

ROOT = "(root)"
OUTSIDE = "(outside modules)"
MODULE_RANGE = "hetrain.module: "
_BACKWARD_NODE = "autograd::engine::evaluate_function: "
_OPTIMIZER_RANGE = "Optimizer."  # torch's optimizers wrap step and zero_grad in "Optimizer.step#Adam.step" ranges
KINDS = ("temporary", "op workspace", "kept for backward", "passed on", "recomputed")
KIND_MEANING = {
    "temporary": "made by one op and freed before the module's forward (the backward node, the optimizer step) "
                 "that called it returned: scratch memory made anew every step, the allocations to remove",
    "op workspace": "freed before the op that made it returned: a kernel's scratch or a composite op's "
                    "intermediate; only another op, dtype or layout removes it",
    "kept for backward": "made in the forward and freed during the backward: activations autograd saved; expected",
    "passed on": "freed later in the same phase by whoever received it (a module's output, a gradient handed "
                 "between backward nodes); expected",
    "recomputed": "made by a checkpointed forward run again in the backward and freed after that run: what "
                  "activation checkpointing trades compute for; expected",
}


@dataclass(frozen=True)
class Allocation:
    """What identifies one allocation across steps."""

    device: str
    module: str  # innermost module it was made in, OUTSIDE when none
    phase: str  # forward, backward, recompute (a checkpointed forward run again in the backward) or optimizer
    op: str  # the op that asked for it (backward: "Node/op")
    kind: str  # one of KINDS
    size: int  # bytes


@dataclass(frozen=True)
class ChurnRow:
    """An allocation repeated in every observed step, ``count`` times per step (the fewest seen)."""

    allocation: Allocation
    count: int

    @property
    def bytes_per_step(self) -> int:
        return self.allocation.size * self.count


class ModuleRanges:
    """Opens a ``record_function`` range named after each module around its forward, while entered.

    The profiler only sees ops; these ranges are how an allocation learns its module. Hooks exist
    only inside the ``with`` block, so other steps run unhooked. They only measure, so a hetrain fused
    block stays fused under them: its fused kernel's allocations belong to the block, and the children that
    kernel computes without calling them have no range.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._handles: list[RemovableHandle] = []
        self._open: list[record_function] = []

    def __enter__(self) -> ModuleRanges:
        for name, module in self.model.named_modules():
            self._handles.append(module.register_forward_pre_hook(self._pre(MODULE_RANGE + (name or ROOT))))
            self._handles.append(module.register_forward_hook(self._post, always_call=True))
        return self

    def _pre(self, range_name: str):
        @observer
        def hook(module: nn.Module, args: Any) -> None:
            if torch.compiler.is_compiling():  # see _post
                return
            scope = record_function(range_name)
            scope.__enter__()
            self._open.append(scope)
        return hook

    @observer
    def _post(self, module: nn.Module, args: Any, output: Any) -> None:
        # Inside a compiled module dynamo traces the hooks: a range opened in one hook and closed in another
        # would break its graph (the step profiled would not be the step that runs). Its submodules are gone
        # in the compiled graph anyway, so its allocations go to the nearest module that runs eagerly.
        if torch.compiler.is_compiling():
            return
        if self._open:
            self._open.pop().__exit__(None, None, None)

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        while self._open:  # a forward that raised leaves its ranges open
            self._open.pop().__exit__(None, None, None)


@dataclass
class _Made:
    """An allocation event with what its ancestors say about it."""

    time: int
    device: str
    size: int
    module: str | None  # innermost module range; None outside modules and in backward (found through the node)
    recompute_end: int | None  # made in a forward run again inside a backward node (activation checkpointing):
    # when that run's outermost module range ended; None otherwise
    node_seq: int | None  # backward: the autograd node's sequence number
    op: str
    scope_end: int | None  # end of the innermost module range or backward node
    optimizer: str | None  # the innermost optimizer range, e.g. "Adam.step"
    optimizer_end: int | None  # and its end
    op_end: int  # end of the outermost op that made it (the event itself when no op did)


def _events(roots: list[Any]) -> Iterator[tuple[Any, tuple[Any, ...]]]:
    """Every event of the tree with its ancestors (outermost first), depth first."""
    stack = [(root, ()) for root in reversed(roots)]
    while stack:
        event, ancestors = stack.pop()
        yield event, ancestors
        inner = (*ancestors, event)
        stack.extend((child, inner) for child in reversed(event.children))


def _describe(event: Any, ancestors: tuple[Any, ...]) -> _Made:
    module, node, scope_end, optimizer, optimizer_end, below = None, None, None, None, None, 0
    in_backward, recompute_end = False, None
    for i, a in enumerate(ancestors):
        if a.name.startswith(MODULE_RANGE):
            module, node, scope_end, below = a.name.removeprefix(MODULE_RANGE), None, a.end_time_ns, i + 1
            if in_backward and recompute_end is None:
                recompute_end = a.end_time_ns  # the outermost module the backward node runs again
        elif a.name.startswith(_BACKWARD_NODE):
            module, node, scope_end, below = None, a, a.end_time_ns, i + 1
            in_backward, recompute_end = True, None
        elif a.name.startswith(_OPTIMIZER_RANGE):
            optimizer, optimizer_end = a.name.rpartition("#")[2], a.end_time_ns
            below = max(below, i + 1)
    # Ops as the code called them: not record_function ranges, not the node "XBackward0" itself (named apart).
    ops = [a for a in ancestors[below:]
           if a.tag.name == "TorchOp" and a.typed[1].scope.name not in ("USER_SCOPE", "BACKWARD_FUNCTION")]
    op = ops[0].name if ops else "(no op)"
    if node is not None:
        node_name = node.name.removeprefix(_BACKWARD_NODE)
        op = f"{node_name}/{ops[0].name}" if ops else node_name
    fields = event.typed[1]
    node_seq = node.typed[1].sequence_number if node is not None else None
    return _Made(time=event.start_time_ns, device=str(fields.device), size=fields.alloc_size, module=module,
                 recompute_end=recompute_end, node_seq=node_seq, op=op, scope_end=scope_end, optimizer=optimizer,
                 optimizer_end=optimizer_end,
                 op_end=ops[0].end_time_ns if ops else event.start_time_ns)


def _in_backward(ancestors: tuple[Any, ...]) -> bool:
    return any(a.name.startswith(_BACKWARD_NODE) for a in ancestors)


def _running_module(ancestors: tuple[Any, ...]) -> str | None:
    """The innermost module whose forward runs at this event: inside a backward node, only one that node runs
    again (a checkpointed forward); None when there is none."""
    for a in reversed(ancestors):
        if a.name.startswith(MODULE_RANGE):
            return a.name.removeprefix(MODULE_RANGE)
        if a.name.startswith(_BACKWARD_NODE):
            return None
    return None


def _optimizers_own(m: _Made, backward_starts: list[int]) -> bool:
    """Whether an allocation inside an optimizer's range is its own work: Lightning runs forward and backward inside
    the step (as its closure), so only what no backward node of that range follows is. Under manual optimization a
    step's range holds no backward, and a later backward (another optimizer's) is not its."""
    later = bisect.bisect_right(backward_starts, m.time)
    return later == len(backward_starts) or backward_starts[later] > m.optimizer_end


def step_allocations(roots: list[Any], min_bytes: int = 0) -> Counter[Allocation]:
    """Allocations made and freed within one profiled step (``experimental_event_tree()``), counted.

    Uses the profiler's event tree rather than ``prof.events()``: only the tree keeps the allocator's
    id that pairs an allocation with its free, and the nesting that names the module.
    """
    made: dict[int, _Made] = {}
    freed: dict[int, tuple[int, bool]] = {}  # allocation id -> (time, freed inside a backward node)
    op_module: dict[int, str] = {}  # forward op's sequence number -> its innermost module
    backward_end = None
    backward_starts: list[int] = []
    for event, ancestors in _events(roots):
        if event.tag.name == "Allocation":
            fields = event.typed[1]
            if fields.alloc_size >= max(min_bytes, 1):
                made[fields.allocation_id] = _describe(event, ancestors)
            elif fields.alloc_size < 0:
                freed[fields.allocation_id] = (event.start_time_ns, _in_backward(ancestors))
        elif event.tag.name == "TorchOp":
            if event.name.startswith(_BACKWARD_NODE):
                backward_end = max(backward_end or 0, event.end_time_ns)
                backward_starts.append(event.start_time_ns)
            elif event.typed[1].sequence_number >= 0:
                # A forward op, or one a checkpointed forward runs again (reentrant checkpointing backpropagates
                # through those, so their nodes need their module too).
                module = _running_module(ancestors)
                if module is not None:
                    op_module.setdefault(event.typed[1].sequence_number, module)
    backward_starts.sort()
    counts: Counter[Allocation] = Counter()
    for allocation_id, m in made.items():
        if allocation_id not in freed:
            continue  # outlives the step: gradients, optimizer state, caches
        free_time, freed_in_backward = freed[allocation_id]
        if m.node_seq is not None:
            phase, module, owner_end = "backward", op_module.get(m.node_seq, OUTSIDE), m.scope_end
        elif m.module is not None:
            phase, module, owner_end = "recompute" if m.recompute_end else "forward", m.module, m.scope_end
        elif (_optimizers_own(m, backward_starts) if m.optimizer_end is not None
              else backward_end is not None and m.time > backward_end):
            module = f"({m.optimizer})" if m.optimizer else OUTSIDE
            phase, owner_end = "optimizer", m.optimizer_end or m.op_end
        else:
            phase, module, owner_end = "forward", OUTSIDE, m.op_end
        if phase == "forward" and freed_in_backward:
            kind = "kept for backward"
        elif free_time <= m.op_end:
            kind = "op workspace"
        elif free_time <= owner_end:
            kind = "temporary"
        elif phase == "recompute" and free_time > m.recompute_end:
            kind = "recomputed"
        else:
            kind = "passed on"
        counts[Allocation(m.device, module, phase, m.op, kind, m.size)] += 1
    return counts


def churned(steps: list[Counter[Allocation]]) -> list[ChurnRow]:
    """Allocations present in every step, with the fewest times seen in one step; most bytes per step first."""
    if not steps:
        return []
    common = set(steps[0]).intersection(*steps[1:])
    rows = [ChurnRow(a, min(step[a] for step in steps)) for a in common]
    return sorted(rows, key=lambda r: (-r.bytes_per_step, r.allocation.module, r.allocation.op))


def _quiet_kineto_markers() -> None:
    """Keeps torch's profiler engine (Kineto) from printing its log lines to stderr at every churn step
    ("profiler_start"/"profiler_stop" markers in torch 2.13, stage lines in 2.11). The markers sit at its highest
    level, above its errors, so only a level that hides the errors too hides them: done where no GPU is visible,
    whose tracing errors (CUPTI's) are the ones worth seeing. Kineto reads the level once, at the process's first
    profile; a level already set is kept."""
    if not torch.cuda.is_available():
        os.environ.setdefault("KINETO_LOG_LEVEL", "6")


class ChurnTracker:
    """Finds allocator churn over a few steps of a model; usable without a Trainer.

    Example::

        tracker = ChurnTracker(model)
        for step in range(5):
            with tracker.step() if step >= 2 else contextlib.nullcontext():
                train_step()
        print(tracker.table(["temporary"]))

    Args:
        model: the module whose submodules name the allocations.
        min_bytes: smaller allocations (scalars, shape buffers) are not reported.
    """

    def __init__(self, model: nn.Module, min_bytes: int = 4096) -> None:
        self.model = model
        self.min_bytes = min_bytes
        self.steps: list[Counter[Allocation]] = []
        self._profiler: torch.profiler.profile | None = None
        self._ranges: ModuleRanges | None = None

    @property
    def active(self) -> bool:
        return self._profiler is not None

    def start_step(self) -> bool:
        """Starts profiling one step; False (and nothing started) when another profiler already runs."""
        if torch.autograd.profiler._is_profiler_enabled:
            log.warning("hetrain: another torch profiler is running; allocator churn is not measured this step")
            return False
        _quiet_kineto_markers()
        activities = [torch.profiler.ProfilerActivity.CPU]
        # profile_memory records every device's allocator (CPU and CUDA) from the host thread's events.
        # record_shapes makes the profiler number its allocations, pairing each with its free (allocation_id).
        self._profiler = torch.profiler.profile(activities=activities, profile_memory=True, record_shapes=True)
        self._ranges = ModuleRanges(self.model).__enter__()
        self._profiler.__enter__()
        return True

    def stop_step(self, keep: bool = True) -> None:
        """Stops profiling and, when ``keep``, adds the step's allocations (a failed step is dropped)."""
        if self._profiler is None:
            return
        profiler, self._profiler = self._profiler, None
        profiler.__exit__(None, None, None)
        self._ranges.__exit__()
        self._ranges = None
        if keep:
            roots = profiler.profiler.kineto_results.experimental_event_tree()
            self.steps.append(step_allocations(roots, self.min_bytes))

    @contextmanager
    def step(self) -> Iterator[None]:
        """Profiles the enclosed step; a step that raises is not counted."""
        started = self.start_step()
        try:
            yield
        except BaseException:
            self.stop_step(keep=False)
            raise
        if started:
            self.stop_step()

    def rows(self, kinds: Sequence[str] = KINDS) -> list[ChurnRow]:
        """Churned allocations of the given kinds over the profiled steps, most bytes per step first."""
        return [r for r in churned(self.steps) if r.allocation.kind in kinds]

    def table(self, kinds: Sequence[str] = KINDS, top: int = 20) -> tuple[list[str], list[list[Any]]]:
        """Header and the ``top`` churned allocations of the given kinds, most bytes per step first."""
        header = ["module", "phase", "op", "kind", "device", "size bytes", "count per step", "MiB per step"]
        rows = [[a.module, a.phase, a.op, a.kind, a.device, a.size, r.count, round(r.bytes_per_step / 2**20, 3)]
                for r in self.rows(kinds)[:top] for a in [r.allocation]]
        return header, rows

    def totals(self) -> dict[str, int]:
        """Churned bytes per step of each kind."""
        out = dict.fromkeys(KINDS, 0)
        for r in self.rows():
            out[r.allocation.kind] += r.bytes_per_step
        return out
