"""The GPipe schedule behind a pipeline split, free of Lightning: micro-batches through stages on devices.

A model takes part by exposing ``stages()`` (name -> module, in forward order) and ``run_stage(name, x,
*inputs)`` (one stage on the previous stage's output ``x`` and the micro-batch's own inputs), and by
calling :func:`gpipe_forward` from its forward when it is asked for more than one micro-batch (and
:func:`run_in_order` otherwise).

Forward follows the GPipe clock: at tick ``t`` stage ``s`` runs micro-batch ``t - s``. Work is issued
from one thread; a GPU stage's kernels run asynchronously on its device while the thread goes on to
issue the CPU stage's next micro-batch, so devices overlap without a thread per stage. Copies to a
GPU go through pinned memory on a side copy stream (:func:`to_device`); a copy to the host is
synchronous, because the CPU reads it next. Backward is autograd's, through the same graph, so outputs
and gradients equal the unsplit model's up to the order of floating-point sums, with hetrain's dropout on
too: each micro-batch replays the seeds of the stage's first one at its own rows (:mod:`hetrain.ops.rng`).
Every stage, micro-batch and cross-device copy runs in a named ``record_function`` range, so torch's
profiler shows them and Nsight Systems shows them as NVTX ranges under ``torch.autograd.profiler.emit_nvtx()``.

A skip connection that crosses stages travels with the activation: a stage returns a tuple (its output
and the skip) and every stage in between hands it on. A tensor that reaches a stage any other way
(kept aside by the model between ``run_stage`` calls) is refused with an error naming both stages, where the
stage runs eagerly: a stage compiled with its hooks is not checked.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Collection, Mapping, Sequence
from functools import partial
from typing import Any

import torch
import torch.utils.checkpoint
from torch import nn
from torch.nn.utils.rnn import PackedSequence
from torch.utils._pytree import tree_flatten, tree_is_leaf, tree_leaves, tree_map, tree_unflatten
from torch.utils.weak import WeakIdKeyDictionary

from hetrain import plugins
from hetrain.host_copies import hold_until_copied
from hetrain.ops import rng

RunStage = Callable[..., Any]
# What flows between stages: one tensor, or tensors in a tuple (or a NamedTuple, list, dict) when a stage hands a skip
# connection on; the split moves each tensor in it, as a placement's input hook does in the unsplit model.
Activation = torch.Tensor | tuple[Any, ...] | list[Any] | dict[str, Any] | PackedSequence


def named_range(name: str) -> contextlib.AbstractContextManager:
    """A ``record_function`` range while a profiler listens (or torch.compile traces, which keeps it), else none:
    as ``plugins.call`` does for the ops, since a range costs ~6 us of Python (14 per unsplit BERT forward)."""
    if torch.compiler.is_compiling() or torch.autograd._profiler_enabled():
        return torch.profiler.record_function(name)
    return contextlib.nullcontext()


def to_device(x: Activation, device: torch.device) -> Activation:
    """``x`` (a tensor, or tensors in tuples, NamedTuples, lists, dicts or PackedSequences) on ``device``, each copy
    in a named ``record_function`` range; containers keep their types, and what is not a tensor stays as it is.
    A PackedSequence keeps its ``batch_sizes`` on the CPU, as ``PackedSequence.to`` does and RNNs require. A tuple,
    list or mapping of a type torch's pytree does not know (a subclass not registered with
    ``torch.utils._pytree.register_pytree_node``: a ``UserDict`` batch, an OmegaConf ``DictConfig``) comes back as
    it was when none of its tensors moves, the very object, so a module still reads its attributes
    (``cfg.scale``); when one moves, it is rebuilt as its own type where its constructor takes the moved items, else
    as a plain tuple, list or dict.

    Host to GPU goes through pinned memory (torch's caching host allocator keeps the block until the copy
    has landed) on a side copy stream, so the copy runs at DMA speed and overlaps the compute stream's
    work on the previous micro-batch; the compute stream waits for it through an event. A copy to the host
    is synchronous, because the CPU reads it next. Autograd runs each copy's backward on the stream its
    forward used and syncs the streams itself.
    """
    if not isinstance(x, torch.Tensor):
        return tree_map(partial(_leaf_to_device, device=device), x, is_leaf=_moved_by_hand)
    if x.device == device:
        return x
    with named_range(f"hetrain::copy {x.device}->{device}"):
        if device.type != "cuda" or x.device.type != "cpu":
            return x.to(device, non_blocking=device.type != "cpu")
        pinned = x if x.is_pinned() else x.pin_memory()
        compute = torch.cuda.current_stream(device)
        copy = _copy_stream(device)
        with torch.cuda.stream(copy):
            y = pinned.to(device, non_blocking=True)
        if pinned is x:  # memory torch's host allocator may not own (a ring slot): held until the copy ran
            hold_until_copied([x], copy)
        compute.wait_stream(copy)
        y.record_stream(compute)  # allocated on the copy stream, used and freed on the compute stream
        return y


def _moved_by_hand(x: Any) -> bool:
    """Whether :func:`to_device` moves ``x`` itself rather than through pytree: a PackedSequence (pytree would rebuild
    it with ``batch_sizes`` moved, which it refuses) or a container pytree would take as a leaf, tensors and all."""
    return isinstance(x, PackedSequence) or (isinstance(x, tuple | list | Mapping) and tree_is_leaf(x))


def _leaf_to_device(x: Any, device: torch.device) -> Any:
    if isinstance(x, torch.Tensor):
        return to_device(x, device)
    if isinstance(x, PackedSequence):
        fields = (x.data, x.sorted_indices, x.unsorted_indices)
        moved = [to_device(t, device) if t is not None else None for t in fields]
        if all(a is b for a, b in zip(fields, moved, strict=True)):
            return x
        return x._replace(data=moved[0], sorted_indices=moved[1], unsorted_indices=moved[2])
    if isinstance(x, tuple | list):
        items = list(x)
        moved = [to_device(item, device) for item in items]
        if all(_unchanged(a, b) for a, b in zip(items, moved, strict=True)):
            return x
        return _rebuilt(x, moved, tuple if isinstance(x, tuple) else list)
    if isinstance(x, Mapping):
        keys = list(x.keys())
        values = [x[key] for key in keys]
        moved = [to_device(value, device) for value in values]
        if all(_unchanged(a, b) for a, b in zip(values, moved, strict=True)):
            return x
        return _rebuilt(x, dict(zip(keys, moved, strict=True)), dict)
    return x


def _unchanged(old: Any, new: Any) -> bool:
    """Whether :func:`to_device` left ``old`` as it was: ``new`` is ``old``, or a container pytree rebuilt around
    the very same leaves (pytree rebuilds a plain list or dict even when none of its tensors moves)."""
    if old is new:
        return True
    old_leaves = tree_leaves(old, is_leaf=_moved_by_hand)
    new_leaves = tree_leaves(new, is_leaf=_moved_by_hand)
    return len(old_leaves) == len(new_leaves) and all(a is b for a, b in zip(old_leaves, new_leaves, strict=True))


def _rebuilt(x: Any, moved: Any, plain: type) -> Any:
    """``moved`` (``x``'s items, some moved) in ``x``'s own type where its constructor takes them (a ``UserDict`` or
    ``BatchEncoding`` keeps attribute access to its keys), else in the plain container: a ``DictConfig`` holds no
    tensors, and a tuple subclass may take its fields one by one."""
    try:
        rebuilt = type(x)(moved)
    except Exception:  # any constructor that refuses the items, whatever it raises
        return plain(moved)
    # A constructor that took the items as something else (one field of a tuple subclass built field by field)
    # would hand the next stage another structure: only one holding exactly the moved items stands.
    if isinstance(moved, dict):
        kept = isinstance(rebuilt, Mapping) and list(rebuilt.keys()) == list(moved) and all(
            rebuilt[key] is value for key, value in moved.items())
    else:
        kept = len(rebuilt) == len(moved) and all(a is b for a, b in zip(rebuilt, moved, strict=True))
    return rebuilt if kept else plain(moved)


_COPY_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def _copy_stream(device: torch.device) -> torch.cuda.Stream:
    """One side stream per GPU for host-to-device copies, made on first use."""
    device = torch.device(device.type, device.index if device.index is not None else torch.cuda.current_device())
    if device not in _COPY_STREAMS:
        _COPY_STREAMS[device] = torch.cuda.Stream(device)
    return _COPY_STREAMS[device]


def stage_device(stage: nn.Module) -> torch.device | None:
    """Where a stage runs: the device of its parameters, else its buffers (a placement moves a stage whole); None
    for a stage holding neither (an activation), which runs wherever its input is."""
    from hetrain.placement.plan import held_device  # not at the top: plan imports this module

    return held_device(stage)


class _SkipGuard:
    """Refuses a tensor that reaches a stage from any stage but the one before it, in the same micro-batch.

    Such a tensor was kept aside by the model (a skip connection stashed between ``run_stage`` calls):
    with micro-batches in flight it may belong to another micro-batch, and it never crossed devices
    through the split. The split carries a skip when a stage returns it in a tuple with its output.
    The micro-batch's own inputs, which ``run_stage`` hands every stage, pass in any of its stages.
    """

    def __init__(self, stages: Sequence[tuple[str, nn.Module]]) -> None:
        self.names = [name for name, _ in stages]
        # tensor -> (stage index, micro-batch); stage None: an input of the micro-batch, made by no stage
        self.made_by: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self.current = (0, 0)
        # Prepended: a placement's input hook, registered before, would copy a stashed tensor to the stage's device
        # first, and the guard, which knows tensors by identity, would not recognise the copy.
        self.hooks = [module.register_forward_pre_hook(self._check, prepend=True, with_kwargs=True)
                      for _, module in stages]

    def _check(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        # A stage compiled with its hooks traces this hook once and reuses the graph for every micro-batch, where a
        # check by identity cannot hold (and dynamo refuses to trace the weak dictionary): eager stages alone check.
        if torch.compiler.is_compiling():
            return
        s, i = self.current
        for t in tree_leaves((args, kwargs)):
            if not isinstance(t, torch.Tensor) or t not in self.made_by:
                continue
            r, j = self.made_by[t]
            if j == i and r in (None, s - 1, s):
                continue
            if r is None:
                raise ValueError(
                    f"hetrain: stage {self.names[s]!r} (micro-batch {i}) got an input of micro-batch {j}, kept aside "
                    f"by the model between stages. Take the inputs run_stage hands each stage, which are its own "
                    f"micro-batch's")
            raise ValueError(
                f"hetrain: stage {self.names[s]!r} (micro-batch {i}) got a tensor made by stage {self.names[r]!r} "
                f"(micro-batch {j}) that did not come through the split: a skip connection across stages. Return "
                f"it from each stage in between as part of a tuple with that stage's output, so the split carries "
                f"it (and moves it between devices), or keep both ends in one stage")

    def made(self, output: Activation) -> None:
        """Marks the tensors in ``output`` as the current stage's, in the current micro-batch; not an input of a
        micro-batch a stage handed on as it was (an ``nn.Identity``), which no stage made."""
        for t in tree_leaves(output):
            if isinstance(t, torch.Tensor) and self.made_by.get(t, self.current)[0] is not None:
                self.made_by[t] = self.current

    def inputs(self, own: Sequence[Any]) -> None:
        """Marks the tensors in ``own`` as the current micro-batch's inputs, which any stage of that micro-batch may
        take (an input every micro-batch gets whole is marked again for each)."""
        for t in own:
            if isinstance(t, torch.Tensor):
                self.made_by[t] = (None, self.current[1])

    def remove(self) -> None:
        for hook in self.hooks:
            hook.remove()


def run_in_order(stages: Sequence[tuple[str, nn.Module]], run_stage: RunStage, inputs: Sequence[torch.Tensor]) -> Any:
    """The stages one after another on the whole batch, each in a named range as :func:`gpipe_forward` runs them,
    so a trace of an unsplit step shows its stages too (a placement's pre-hooks still copy across devices)."""
    x = inputs[0]
    for name, _ in stages:
        with named_range(f"hetrain::stage {name}"):
            x = run_stage(name, x, *inputs)
    return x


def micro_batch_count(rows: int, micro_batches: int) -> int:
    """How many micro-batches :func:`gpipe_forward` cuts ``rows`` into: ``micro_batches``, but no piece empty."""
    return max(1, min(micro_batches, rows))


def gpipe_forward(stages: Sequence[tuple[str, nn.Module]], run_stage: RunStage, inputs: Sequence[Any],
                  micro_batches: int, checkpoint: Collection[str] = ()) -> torch.Tensor:
    """Runs ``inputs`` through ``stages`` in ``micro_batches`` pieces; returns the whole output.

    ``inputs[0]`` is a batch-first tensor, whose first dimension counts the batch's rows. Of the other inputs (and
    the tensors inside a tuple, list or dict input), the tensors with as many rows are cut with it; the rest (a 0-d or
    one-row scale, anything not a tensor) reach every micro-batch whole, as they reach the unsplit model's stages,
    rather than being cut into pieces some micro-batches would get empty (placement measures a micro-batch cut the
    same way). An input without a batch dimension whose first dimension happens to equal the row count is cut all
    the same: give it another shape (a leading 1).

    ``run_stage(name, x, *inputs)`` runs one stage; the first stage gets ``x = inputs[0]``. A stage may
    return a tuple of tensors (its output and the skip connections later stages need): the next stage
    gets the tuple as ``x``, every tensor of it on its device; the last stage returns one tensor.
    Micro-batch sizes differ by at most one when the batch does not divide evenly. Stages named in
    ``checkpoint`` keep only their inputs and recompute the rest in backward (the same dropout masks:
    torch's checkpoint restores the RNG state, and hetrain's dropout replays its seeds). hetrain's dropout
    ops draw each element's mask as the unsplit model does (:mod:`hetrain.ops.rng`); torch's own random
    ops (``nn.Dropout``, SDPA's ``dropout_p``) draw per micro-batch, alike in distribution only.
    """
    unknown = set(checkpoint) - {name for name, _ in stages}
    if unknown:
        raise ValueError(f"hetrain: checkpoint names no stage: {sorted(unknown)}; stages: {[n for n, _ in stages]}")
    batch = inputs[0].shape[0]
    m = micro_batch_count(batch, micro_batches)
    pieces = [_cut(t, batch, m) for t in inputs]  # pieces[k][i]: input k of micro-batch i
    first_rows = [0, *itertools.accumulate(len(p) for p in pieces[0][:-1])]
    seeds: list[list[torch.Tensor]] = [[] for _ in stages]  # per stage, the dropout seeds its first micro-batch drew
    acts: list[Activation | None] = [None] * m
    devices = [stage_device(stage) for _, stage in stages]
    guard = _SkipGuard(stages)
    try:
        for tick in range(m + len(stages) - 1):
            for s in reversed(range(len(stages))):  # later stages first: they consume the previous tick's outputs
                i = tick - s
                if not 0 <= i < m:
                    continue
                name, device = stages[s][0], devices[s]
                # A stage without weights or buffers takes its inputs where they are.
                move = (lambda t: t) if device is None else partial(to_device, device=device)
                own = [move(p[i]) for p in pieces]
                x = own[0] if s == 0 else move(acts[i])
                guard.current = (s, i)
                guard.made(x)  # what crossed into this stage counts as its own input
                guard.inputs(own)  # after x: an input a stage handed on in x stays an input
                with named_range(f"hetrain::stage {name} micro-batch {i}"):
                    # Micro-batch 0 draws the stage's dropout seeds; the others (and recomputes) replay them.
                    randomness = partial(rng.micro_batch, seeds[s], first_rows[i])
                    if name in checkpoint:
                        # The recompute, run in backward, keeps the backend pins its forward ran under (use_backend...).
                        acts[i] = torch.utils.checkpoint.checkpoint(
                            run_stage, name, x, *own, use_reentrant=False,
                            context_fn=partial(plugins.checkpoint_context,
                                               lambda r=randomness, i=i: (r(record=i == 0), r(record=False))))
                    else:
                        with randomness(record=i == 0):
                            acts[i] = run_stage(name, x, *own)
                guard.made(acts[i])
    finally:
        guard.remove()
    if not all(isinstance(a, torch.Tensor) for a in acts):
        raise TypeError(f"hetrain: the last stage {stages[-1][0]!r} must return one tensor, got "
                        f"{type(acts[0]).__name__}")
    return torch.cat(acts)


def _cut(x: Any, rows: int, m: int) -> list[Any]:
    """Input ``x`` of each of ``m`` micro-batches: every tensor in it with a row per sample of a batch of ``rows``
    cut into ``m`` pieces, the rest whole in each."""
    leaves, spec = tree_flatten(x)
    cuts = [torch.tensor_split(t, m) if isinstance(t, torch.Tensor) and t.dim() and len(t) == rows else [t] * m
            for t in leaves]
    return [tree_unflatten([c[i] for c in cuts], spec) for i in range(m)]


def shared_across_devices(stages: Sequence[tuple[str, nn.Module]],
                          devices: Mapping[str, torch.device | str]) -> list[tuple[str, str]]:
    """Parameters used by two stages that ``devices`` puts on different devices, as pairs of paths.

    Checked before anything moves: one parameter object lives on one device only, and moving the
    second stage would either drag the first stage's weight along or silently untie the two (an
    input embedding tied to an output head).
    """
    first_use: dict[int, tuple[str, str]] = {}  # parameter -> (stage, path) of its first use
    clashes = []
    for name, stage in stages:
        for pname, p in stage.named_parameters(remove_duplicate=False):
            owner, path = first_use.setdefault(id(p), (name, f"{name}.{pname}"))
            if owner != name and torch.device(devices[owner]) != torch.device(devices[name]):
                clashes.append((path, f"{name}.{pname}"))
    return clashes


def tied_stages(stages: Sequence[tuple[str, nn.Module]]) -> list[list[str]]:
    """The groups of stages that share a parameter (directly, or through a chain of stages that do), each in stage
    order, as :func:`shared_across_devices` finds them: a placement must put each group on one device. A module
    reused at several positions of a chain (one block applied twice) ties its positions; one holding no parameters
    (a shared ``nn.ReLU``) ties none, as placing never moves it."""
    group_of = {name: [name] for name, _ in stages}
    first_stage: dict[int, str] = {}  # parameter -> the first stage using it
    for name, stage in stages:
        for p in stage.parameters():
            other = first_stage.setdefault(id(p), name)
            if group_of[other] is not group_of[name]:
                merged = group_of[other] + group_of[name]
                for member in merged:
                    group_of[member] = merged
    order = {name: i for i, (name, _) in enumerate(stages)}
    groups = {id(group): group for group in group_of.values() if len(group) > 1}
    return sorted((sorted(group, key=order.__getitem__) for group in groups.values()), key=lambda g: order[g[0]])
