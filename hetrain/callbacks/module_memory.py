"""Per-module memory of one step: parameters, gradients, outputs and the activations each module saves.

No Trainer needed: :class:`ModuleMemory` hooks a model for one forward and backward, and
:class:`~hetrain.callbacks.memory.MemoryProfiler` runs it every few steps of a fit.
"""

from __future__ import annotations

import contextlib
import math
import threading
import weakref
from bisect import bisect_right
from collections import defaultdict
from collections.abc import Iterator
from contextlib import suppress
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.nn.parameter import is_lazy
from torch.utils._pytree import tree_leaves
from torch.utils.hooks import RemovableHandle

from hetrain.callbacks.churn import ROOT
from hetrain.nn._share import observer
from hetrain.nn.patch_sequences import FUSING_CONTAINERS

MIB = 2**20
NOT_MEASURED = "not measured"
AT_LEAST = "≥ "  # before a figure that leaves out what could not be read: a lower bound
OUTSIDE = "(training_step, outside modules)"
# Autograd nodes that keep what they saved where Python cannot read it: a C++ custom autograd Function (a hetrain
# fused op's C++ backend) and an in-place op on a view, whose node holds that op's own node inside (its inputs'
# nodes are among its next_functions, so the walk goes on past it).
_OPAQUE_NODES = ("torch::autograd::CppNode<", "torch::autograd::CopySlices")
# Reading a saved tensor without unpacking it: its unpack hook and what was packed (in torch 2.13, not in every torch).
_READS_SAVED = all(hasattr(torch._C._autograd.SavedTensor, a) for a in ("unpack_hook", "data"))


@dataclass
class ModuleRecord:
    """Bytes one module holds or makes in a step (largest seen over the measured steps)."""

    params: int = 0
    grads: int = 0
    outputs: int = 0
    saved: int = 0  # saved for backward while this module ran: the activations it keeps alive
    # What it saved was not seen: a forward ran under another saved-tensors hook (save_on_cpu, activation
    # checkpointing), which decides what is kept, or compiled with no module running eagerly around it.
    saved_unseen: bool = False
    saved_partial: bool = False  # some of what it saved could not be read: ``saved`` is a lower bound
    cuda_delta: int | None = None  # allocated bytes after its forward minus before (CUDA modules)

    def merge(self, other: ModuleRecord) -> None:
        for f in fields(self):
            new, old = getattr(other, f.name), getattr(self, f.name)
            if new is not None:
                setattr(self, f.name, new if old is None else max(old, new))


def _nbytes(t: torch.Tensor) -> int:
    """Bytes ``t`` holds: for a sparse gradient (an embedding table's) its stored rows and indices, not its shape."""
    if t.is_sparse:
        return _nbytes(t._values()) + _nbytes(t._indices())
    return t.numel() * t.element_size()


def _in_functorch_transform() -> bool:
    """Whether a torch.func transform (grad, vmap, ...) runs now: what a module computes inside one is the
    transform's, and its grad and vjp refuse saved-tensors hooks."""
    return torch._C._functorch.maybe_current_level() is not None


def _unpacked(t: torch.Tensor) -> torch.Tensor:
    """The pack hook's unpack: what it packed is the tensor itself. One function, to know the tensors it packed."""
    return t


# torch.func's grad and vjp (jacrev, hessian) refuse to start under a saved-tensors hook: each disables the hooks
# with this, which fails where one is on. While a measured forward holds the pack hook, a module calling them in its
# own forward would fail the step; _disable_saved_tensors_hooks takes the pack hook off for as long as they run.
_DISABLE_SAVED_TENSORS_HOOKS = torch.autograd.graph.disable_saved_tensors_hooks
_OPENED = threading.local()  # .tracker: the ModuleMemory whose pack hook this thread's measured forward holds
_WRAPPING = threading.Lock()
_wrapped = 0  # measured forwards holding the pack hook, in any thread: torch's function is wrapped while there are any


@contextlib.contextmanager
def _disable_saved_tensors_hooks(error_message: str) -> Iterator[None]:
    """``torch.autograd.graph.disable_saved_tensors_hooks``, which takes a measured forward's pack hook off while it
    runs (see :meth:`ModuleMemory._set_aside`), where that hook alone is on: what runs under it is not seen."""
    tracker = getattr(_OPENED, "tracker", None)
    aside = tracker is not None and tracker._set_aside()
    try:
        with _DISABLE_SAVED_TENSORS_HOOKS(error_message):
            yield
    finally:
        if aside:
            tracker._put_back()


def _wrap_disable_saved_tensors_hooks(on: bool) -> None:
    """Puts :func:`_disable_saved_tensors_hooks` in torch's place while a measured forward holds the pack hook
    (``on``), and torch's own back after the last: torch.func looks it up as it runs."""
    global _wrapped
    with _WRAPPING:
        _wrapped += 1 if on else -1
        graph = torch.autograd.graph
        if _wrapped == 1 and on:
            graph.disable_saved_tensors_hooks = _disable_saved_tensors_hooks
        elif _wrapped == 0 and graph.disable_saved_tensors_hooks is _disable_saved_tensors_hooks:
            graph.disable_saved_tensors_hooks = _DISABLE_SAVED_TENSORS_HOOKS


# _raw_saved_names per node type, held weakly: each torch.compile graph has a node type of its own
# (CompiledFunctionBackward), which must be freed with its compiled code.
_RAW_SAVED_NAMES: weakref.WeakKeyDictionary[type, tuple[str, ...]] = weakref.WeakKeyDictionary()


def _raw_saved_names(node_type: type) -> tuple[str, ...]:
    """The attributes of an autograd node type that give its saved tensors as packed, without unpacking them: one
    per tensor a built-in node saves, ``_raw_saved_tensors`` for a custom autograd Function's."""
    names = _RAW_SAVED_NAMES.get(node_type)
    if names is None:  # dir() costs some 20 us a node type
        names = _RAW_SAVED_NAMES[node_type] = tuple(a for a in dir(node_type) if a.startswith("_raw_saved_"))
    return names


def _raw_saved(node: Any) -> list[Any]:
    """The SavedTensor objects of ``node`` (a list-valued attribute flattened)."""
    out = []
    for attr in _raw_saved_names(type(node)):
        value = getattr(node, attr)
        out.extend(value if isinstance(value, list | tuple) else [value])
    return [s for s in out if s is not None]


def _foreign(packed: Any) -> bool:
    """Whether a saved-tensors hook other than ModuleMemory's packed ``packed``, and so decides what is kept (what
    ``save_on_cpu`` copies): not a non-reentrant torch.utils.checkpoint's, which keeps only its inputs, saved under
    the hook on before it (ModuleMemory's, counted), and nothing for what it packs, recomputed in backward."""
    unpack = packed.unpack_hook
    return (unpack is not None and unpack is not _unpacked
            and not (getattr(unpack, "__module__", None) == "torch.utils.checkpoint"
                     and getattr(unpack, "__qualname__", "").startswith("_checkpoint_hook.")))


def _enclosing(name: str) -> list[str]:
    """The modules around module ``name``: the root and each dotted prefix."""
    if name == ROOT:
        return []
    parts = name.split(".")
    return [ROOT, *(".".join(parts[:i]) for i in range(1, len(parts)))]


def _tensor_bytes(obj: Any) -> int:
    """Bytes of the tensors in ``obj``; a lazy module's parameter not materialised yet holds none."""
    return sum(_nbytes(t) for t in tree_leaves(obj) if isinstance(t, torch.Tensor) and not is_lazy(t))


class ModuleMemory:
    """Per-module memory of a model over one forward and backward, through hooks that exist only meanwhile.

    Call :meth:`start` before the forward, :meth:`forward_done` after it (before backward, with the loss),
    :meth:`backward_done` after backward, and :meth:`stop` at the end (also after an error). A step of several
    forwards, each with its backward (manual optimization), calls :meth:`resume` after each backward.

    Notes:
        No byte is counted twice: parameters and gradients go to the module that owns them (a tied weight to the
        first that does, in ``named_modules`` order), outputs to modules without children (a storage's whole size,
        once: the views ``chunk`` returns count it once, and a module's input passed on, or a view of it, adds
        nothing), the CUDA delta to modules without children too, and a tensor saved for backward (found with
        ``torch.autograd.graph.saved_tensors_hooks``, once per storage, parameters and buffers excluded) to the
        innermost module running when it was saved, e.g. an attention block for its
        ``scaled_dot_product_attention``; the model itself is ``(root)``. That hook is on only while a module's
        forward runs, so ``torch.func`` in ``training_step`` works; what ``training_step`` saves outside every module
        (a loss's inputs: cross-entropy's log-softmax over the logits) is read from the loss's autograd graph when
        :meth:`forward_done` is given the loss, and is the row ``(training_step, outside modules)``, a lower bound
        (``≥``) where a node there keeps what it saved where Python cannot read it (a hetrain fused op's C++ backend,
        an in-place op on a view). A module's saved tensors are not measured (:meth:`saved_note`) when its forward
        runs under another saved-tensors hook (the user's ``save_on_cpu``, activation checkpointing), which alone is
        called and decides what is kept, or pushes one itself, seen in the loss's graph (a non-reentrant
        ``torch.utils.checkpoint`` inside it keeps only its inputs, counted, and is measured); a module called inside a
        ``torch.func`` transform is not measured, as what it makes there is the transform's. A module whose own
        forward calls ``torch.func``'s grad or vjp (which refuse to start under a saved-tensors hook) runs them with
        the hook set aside, and is not measured where they saved tensors for the step's backward (a grad of inputs
        that require grad), seen in the loss's graph. A module compiled with
        ``torch.compile`` runs as one graph with no submodules: what it saves goes to the nearest module outside it that
        runs eagerly (:meth:`compiled_note`); with none, it is not measured, and neither is the outside row when the
        loss's graph holds a compiled graph's saved tensors outside every module (they may be that module's). Where
        torch.compile stands aside (under a dispatch mode such as a FLOP counter, or ``set_stance("force_eager")``) a
        compiled module runs eagerly and is measured as it ran, submodules included, which the note says. A hetrain
        fused block (``ConvBNReLUPool2d``, ``ConvReLUPool2d``, a patched Sequential) is measured as one module, as it
        runs: the children its kernel computes are not called, so what that kernel makes (its output, what it saves)
        goes to the block, and those children keep their parameters and gradients (:meth:`fused_note`). The hooks leave
        it fused: measuring does not change the numbers a step computes.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.rows = {name or ROOT: m for name, m in model.named_modules()}
        self.leaves = {name for name, m in self.rows.items() if not any(True for _ in m.children())}
        names = {id(m): name for name, m in self.rows.items()}
        # Fused blocks, with their children: an output of the block, or a tensor it hands a child, that no child
        # made is its fused kernel's output.
        self.fused = {name: [names[id(c)] for c in m.children()]
                      for name, m in self.rows.items() if isinstance(m, FUSING_CONTAINERS)}
        self.ran_fused: set[str] = set()  # fused blocks that ran a child fused in a measured step
        self.ran_eager: set[str] = set()  # compiled modules that ran eagerly in a measured step
        self._entered: set[str] = set()  # modules called in this step's forward
        self.records: dict[str, ModuleRecord] = {}
        self._step: dict[str, ModuleRecord] = {}
        self._handles: list[RemovableHandle] = []
        self._stack: list[str] = []
        self._before: dict[str, int] = {}
        # Storages counted as saved for backward and as outputs (parameters and buffers from the start). Weak
        # references, not addresses: a tensor freed during the step (an output the forward dropped, what a backward
        # released before the next forward) frees its address for the next, and a weak reference keeps its
        # storage's identity until it is dropped.
        self._seen: set[StorageWeakRef] = set()
        self._outputs_seen: set[StorageWeakRef] = set()
        # Modules whose parameters or buffers were lazy (nn.LazyLinear) at start: held once their forward made them.
        self._lazy: set[str] = set()
        # Autograd calls the pack hook from a compiled module's runtime too; left to dynamo, that call would be
        # compiled as a frame of its own, and a traced _pack counts nothing. One object, to know it on the stack.
        self._pack_hook = torch.compiler.disable(self._pack)
        self._saved_hooks: torch.autograd.graph.saved_tensors_hooks | None = None
        self._opened_at = 0  # depth of the module stack where the outermost measured forward opened the hooks
        # Autograd sequence numbers [first, end) of the nodes made while the pack hook was set aside (torch.func's
        # grad or vjp ran in a module's forward), and whether it is now.
        self._aside: list[list[float]] = []
        self._aside_now = False
        # Autograd sequence numbers [first, end) of the nodes made while a module's forward ran (measured or inside
        # a torch.func transform), in order: the loss's graph nodes outside them were made by training_step.
        self._module_spans: list[tuple[int, int]] = []
        self._span_start, self._depth = 0, 0  # the span open now, and how many module forwards run in it
        # Each measured module forward, in the order they began: the span [first, end) of the autograd sequence numbers
        # of the nodes made while it ran (end inf while it runs) and the module; and those running, innermost last.
        self._calls: list[list[Any]] = []
        self._open_calls: list[int] = []
        # Why the outside row is not measured: in a measured step, and in this step.
        self.outside_unseen: set[str] = set()
        self._outside_unseen: set[str] = set()
        # The nodes outside modules whose saved tensors could not be read (the outside row is a lower bound): in a
        # measured step, and in this step.
        self.outside_opaque: set[str] = set()
        self._outside_opaque: set[str] = set()
        self.transformed: set[str] = set()  # modules called inside a torch.func transform in a measured step
        self._transformed: set[str] = set()  # in this step
        self._watching = False  # during the step's forwards (not its backwards, nor later micro-batches)

    @property
    def active(self) -> bool:
        return bool(self._handles)

    def _owned_parameters(self) -> dict[str, list[nn.Parameter]]:
        """Each module's own parameters, a tied one under its first owner only."""
        seen: set[int] = set()
        owned = {}
        for name, module in self.rows.items():
            owned[name] = [p for p in module.parameters(False) if id(p) not in seen]
            seen.update(id(p) for p in owned[name])
        return owned

    def start(self) -> None:
        # Parameters are counted at stop: a lazy module's are made by its first forward.
        self._step = {name: ModuleRecord() for name in [*self.rows, OUTSIDE]}
        self._hold([*self.model.parameters(), *self.model.buffers()])
        self._lazy = {name for name, m in self.rows.items()
                      if any(is_lazy(t) for t in [*m.parameters(False), *m.buffers(False)])}
        for name, module in self.rows.items():
            self._handles.append(module.register_forward_pre_hook(self._pre(name), with_kwargs=True))
            self._handles.append(module.register_forward_hook(self._post(name), always_call=True))
        self.resume()

    def _hold(self, tensors: list[torch.Tensor]) -> None:
        """Parameters and buffers live for the whole fit: a module that uses or returns one makes no activation.
        A lazy one has no storage yet."""
        for t in tensors:
            if not is_lazy(t):
                key = StorageWeakRef(t.untyped_storage())
                self._seen.add(key)
                self._outputs_seen.add(key)

    def resume(self) -> None:
        """Watches the forward (again, after :meth:`forward_done`): under manual optimization a step runs several
        forwards, each followed by a backward, which is not watched."""
        if self.active:
            self._watching = True

    def _open_saved_hooks(self, name: str) -> None:
        """Sees what ``name``'s forward saves for backward: opens the pack hook for the outermost module's forward
        (not the whole step's: ``torch.func``'s grad refuses to run under a saved-tensors hook, and a user's hook
        pushed in ``training_step`` would sit over it), or marks ``name``'s saved tensors as not measured where
        another hook is on top, or saved-tensors hooks are disabled. A module's forward that calls torch.func's grad
        or vjp itself has the hook set aside while they run (:meth:`_set_aside`)."""
        top = torch._C._autograd._top_saved_tensors_default_hooks(False)
        if top is not None and top[0] is self._pack_hook:  # an enclosing module's forward opened them
            return
        if top is not None or not torch._C._autograd._saved_tensors_hooks_is_enabled():
            # Pushed over the user's, ours alone would be called: their offload or checkpoint would not happen.
            self._step[name].saved_unseen = True
            return
        self._saved_hooks = torch.autograd.graph.saved_tensors_hooks(self._pack_hook, _unpacked)
        self._saved_hooks.__enter__()
        self._opened_at = len(self._stack)
        _OPENED.tracker = self
        _wrap_disable_saved_tensors_hooks(True)

    def _close_saved_hooks(self) -> None:
        if self._saved_hooks is None:
            return
        if self._aside_now:  # off the stack already
            self._aside[-1][1] = torch.autograd._get_sequence_nr()
            self._aside_now = False
        else:
            self._saved_hooks.__exit__(None, None, None)
        self._saved_hooks = None
        _OPENED.tracker = None
        _wrap_disable_saved_tensors_hooks(False)

    def _set_aside(self) -> bool:
        """Takes the pack hook off for a ``disable_saved_tensors_hooks`` in a measured forward (torch.func's grad
        and vjp disable them, and fail where one is on); False where it is not on top (a user's hook pushed over it
        stays, and fails torch.func as it does unmeasured). What autograd saves meanwhile for the step's backward
        (a grad of tensors that require grad) no hook sees: :meth:`_read_graph` marks the module not measured."""
        top = torch._C._autograd._top_saved_tensors_default_hooks(False)
        if self._saved_hooks is None or self._aside_now or top is None or top[0] is not self._pack_hook:
            return False
        self._saved_hooks.__exit__(None, None, None)
        self._aside.append([torch.autograd._get_sequence_nr(), math.inf])
        self._aside_now = True
        return True

    def _put_back(self) -> None:
        """Puts the pack hook set aside back on, once hooks are enabled again."""
        if self._aside_now:
            self._aside[-1][1] = torch.autograd._get_sequence_nr()
            self._aside_now = False
            self._saved_hooks.__enter__()

    def _made_aside(self, sequence_nr: int) -> bool:
        """Whether autograd made node ``sequence_nr`` while the pack hook was set aside."""
        return any(first <= sequence_nr < end for first, end in self._aside)

    def _pre(self, name: str):
        @observer
        def hook(module: nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
            if not self._watching or torch.compiler.is_compiling():  # see _post
                return
            self._enter_span()
            if _in_functorch_transform():  # see _post
                self._transformed.add(name)
                return
            if name in self._lazy:  # its own pre-hook, registered before this one, has just made them
                self._lazy.discard(name)
                self._hold([*module.parameters(False), *module.buffers(False)])
            parent = self._stack[-1] if self._stack else None
            if parent in self.fused:  # a fused run's output handed to the next child
                self._step[parent].outputs += self._new_output_bytes((args, kwargs))
            else:
                self._mark_as_counted((args, kwargs))  # made before this module: returned on, it is not its output
            self._open_saved_hooks(name)
            self._stack.append(name)
            self._open_calls.append(len(self._calls))
            self._calls.append([torch.autograd._get_sequence_nr(), math.inf, name])
            self._entered.add(name)
            param = next(module.parameters(), None)
            if name in self.leaves and param is not None and param.is_cuda:
                self._before[name] = torch.cuda.memory_allocated(param.device)
        return hook

    def _post(self, name: str):
        @observer
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            # Inside a compiled module dynamo traces these hooks, and their allocator reads broke its graph: the
            # step measured was not the step that runs. Traced, they do nothing: the compiled graph has no
            # submodules, and what it saves for backward goes to the nearest module that runs eagerly. Inside a
            # torch.func transform (a functional_call under grad) what it makes is the transform's, freed when that
            # returns: not the step's outputs or activations.
            if not self._watching or torch.compiler.is_compiling():
                return
            self._exit_span()
            if _in_functorch_transform():
                return
            if self._stack and self._stack[-1] == name:
                self._stack.pop()
                self._calls[self._open_calls.pop()][1] = torch.autograd._get_sequence_nr()
            if len(self._stack) == self._opened_at:
                self._close_saved_hooks()
            record = self._step[name]
            if name in self.leaves or name in self.fused:  # a block run module by module adds nothing here
                record.outputs += self._new_output_bytes(output)
            else:
                # A container's own result (a residual block's x + f(x)) is no leaf's: counted now, so a fused block
                # it is handed to takes as its kernel's output only what that kernel made.
                self._mark_as_counted(output)
            if name in self._before:
                param = next(module.parameters())
                delta = torch.cuda.memory_allocated(param.device) - self._before.pop(name)
                record.cuda_delta = delta + (record.cuda_delta or 0)
        return hook

    def _enter_span(self) -> None:
        """A module's forward begins: the outermost opens a span of the nodes it makes."""
        if self._depth == 0:
            self._span_start = torch.autograd._get_sequence_nr()
        self._depth += 1

    def _exit_span(self) -> None:
        if self._depth == 0:  # its forward began before the step was watched
            return
        self._depth -= 1
        if self._depth == 0:
            self._module_spans.append((self._span_start, torch.autograd._get_sequence_nr()))

    def _made_in_a_module(self, node: Any) -> bool:
        """Whether autograd made ``node`` while a module's forward ran (an AccumulateGrad's number is past all)."""
        sequence_nr = node._sequence_nr()
        i = bisect_right(self._module_spans, (sequence_nr, math.inf)) - 1
        return i >= 0 and sequence_nr < self._module_spans[i][1]

    def _mark_as_counted(self, tensors: Any) -> None:
        for t in tree_leaves(tensors):
            if isinstance(t, torch.Tensor):
                with suppress(RuntimeError, NotImplementedError):  # sparse or otherwise storage-less tensors
                    self._outputs_seen.add(StorageWeakRef(t.untyped_storage()))

    def _new_output_bytes(self, output: Any) -> int:
        """Bytes of the storages in ``output`` not counted as an output yet, whole: the views ``chunk`` returns
        count their storage once, and a passed-on input adds 0."""
        total = 0
        for t in tree_leaves(output):
            if not isinstance(t, torch.Tensor):
                continue
            try:
                storage = t.untyped_storage()
            except (RuntimeError, NotImplementedError):  # sparse or otherwise storage-less tensors
                total += _nbytes(t)
                continue
            key = StorageWeakRef(storage)
            if key not in self._outputs_seen:
                self._outputs_seen.add(key)
                total += storage.nbytes()
        return total

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        try:
            storage = tensor.untyped_storage()
        except (RuntimeError, NotImplementedError):  # sparse or otherwise storage-less tensors
            return tensor
        key = StorageWeakRef(storage)
        if key not in self._seen:
            self._seen.add(key)
            self._step[self._stack[-1]].saved += storage.nbytes()
        return tensor

    def forward_done(self, loss: torch.Tensor | None = None) -> None:
        """Stops watching the forward; tensors already saved keep their (identity) unpack hook. Given the forward's
        ``loss``, reads its autograd graph (:meth:`_read_graph`)."""
        watched, self._watching = self._watching, False
        self._close_saved_hooks()  # a forward that raised past its module's hook
        if self._depth:  # likewise
            self._depth = 0
            self._module_spans.append((self._span_start, torch.autograd._get_sequence_nr()))
        if watched and loss is not None and loss.grad_fn is not None:
            self._read_graph(loss.grad_fn)

    def _read_graph(self, root: Any) -> None:
        """Reads what the nodes of ``root``'s graph saved: counts into the outside row what training_step saved
        outside every module's forward, and marks as not measured a module whose forward pushed a saved-tensors hook
        of its own (``save_on_cpu``), which alone saw what it saved there. Read from the graph and not with a
        saved-tensors hook over the step: ``torch.func``'s grad refuses to run under one, and a user's hook pushed in
        training_step, or in a module's forward, would sit over it. A saved tensor is read as it was packed
        (``_raw_saved_*``), never unpacked (``_saved_*``): a user's unpack (``save_on_cpu``'s) would copy it back."""
        if not _READS_SAVED:
            self._outside_unseen.add("this version of torch cannot read a saved tensor without unpacking it")
            return
        uncovered = [n for n in self._compiled() if not self._entered.intersection(_enclosing(n))]
        foreign = []  # the sequence numbers of module-made nodes that saved a tensor under another hook
        visited, todo = set(), [root]
        while todo:  # each node once; the nodes are released when this returns
            node = todo.pop()
            if node is None or node in visited:
                continue
            visited.add(node)
            todo.extend(fn for fn, _ in node.next_functions)
            in_module = self._made_in_a_module(node)
            name = node.name()
            aside = in_module and self._aside and self._made_aside(node._sequence_nr())
            if name.startswith(_OPAQUE_NODES):  # what it saved is left out; its inputs' nodes are walked on
                if aside:  # made by torch.func's grad or vjp in a module's forward: no pack hook saw it
                    foreign.append(node._sequence_nr())
                elif not in_module:  # a module's went through the pack hook
                    self._outside_opaque.add(name)
                continue
            try:
                saved = _raw_saved(node)
            except RuntimeError:  # a custom Function's, freed by an earlier backward (retain_graph=False)
                continue
            if in_module:  # the pack hook's, counted, unless a hook pushed in a module's forward packed it, or none
                if any(_foreign(packed) or (aside and packed.unpack_hook is None and packed.data is not None)
                       for packed in saved):
                    foreign.append(node._sequence_nr())
            elif not self._outside_unseen:
                self._count_saved_outside(name, saved, uncovered)
        for name in self._innermost(foreign):
            self._step[name].saved_unseen = True

    def _count_saved_outside(self, node_name: str, saved: list[Any], uncovered: list[str]) -> None:
        """Adds to the outside row the storages a node training_step made outside every module's forward saved, once
        each and not those the pack hook counted (parameters and buffers neither). The row is not measured where a
        user's hook packed a tensor, or where a compiled graph may be a compiled module's (one of ``uncovered``),
        run with no module eagerly around it; it is a lower bound where a node keeps what it saved where Python
        cannot read it (``_OPAQUE_NODES``), the rest counted. A custom autograd Function's tensors kept as ctx
        attributes, not with ``save_for_backward``, are not seen."""
        for packed in saved:
            if packed.unpack_hook is _unpacked:  # the pack hook's: counted
                continue
            if packed.unpack_hook is not None:
                self._outside_unseen.add("training_step saved tensors under its own saved-tensors hook "
                                         "(torch.autograd.graph.save_on_cpu, activation checkpointing), which "
                                         "decides what is kept")
                return
            tensor = packed.data  # not unpacked: no hook, so what was saved; None when freed or undefined
            try:
                storage = tensor.untyped_storage()
            except (AttributeError, RuntimeError, NotImplementedError):  # None, sparse or storage-less
                continue
            key = StorageWeakRef(storage)
            if key in self._seen:
                continue
            if uncovered and node_name.startswith("CompiledFunction"):
                self._outside_unseen.add(f"a compiled graph saved tensors outside every module, and "
                                         f"{', '.join(uncovered)} runs compiled with no module eagerly around it: "
                                         "they may be its")
                return
            self._seen.add(key)
            self._step[OUTSIDE].saved += storage.nbytes()

    def _innermost(self, sequence_nrs: list[int]) -> set[str]:
        """The modules whose forward was the innermost measured one running when autograd made the nodes numbered
        ``sequence_nrs``. The forwards' spans nest, and :attr:`_calls` holds them in the order they began."""
        owners: set[str] = set()
        running: list[list[Any]] = []
        calls = iter(self._calls)
        call = next(calls, None)
        for nr in sorted(sequence_nrs):
            while call is not None and call[0] <= nr:
                running.append(call)
                call = next(calls, None)
            while running and running[-1][1] <= nr:  # ended before this node: never again innermost
                running.pop()
            if running:
                owners.add(running[-1][2])
        return owners

    def backward_done(self) -> None:
        """Counts the gradients; called again (manual optimization, one call per optimizer), it keeps the most each
        module held."""
        for name, params in self._owned_parameters().items():
            grads = _tensor_bytes([p.grad for p in params if p.grad is not None])
            self._step[name].grads = max(self._step[name].grads, grads)

    def stop(self, keep: bool = True) -> None:
        """Removes every hook and, when ``keep``, folds this step into :attr:`records` (a failed step's are partial,
        so it is dropped)."""
        self.forward_done()
        self._module_spans.clear()
        self._calls.clear()
        self._aside.clear()
        self._open_calls.clear()
        outside_unseen, self._outside_unseen = self._outside_unseen, set()
        outside_opaque, self._outside_opaque = self._outside_opaque, set()
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._stack.clear()
        self._before.clear()
        self._seen.clear()
        self._outputs_seen.clear()
        self._lazy.clear()
        entered, self._entered = self._entered, set()
        transformed, self._transformed = self._transformed, set()
        if keep:
            self.transformed |= transformed
            self.outside_unseen |= outside_unseen
            self.outside_opaque |= outside_opaque
            self._step[OUTSIDE].saved_unseen = bool(outside_unseen)
            self._step[OUTSIDE].saved_partial = bool(outside_opaque)
            self.ran_fused |= {name for name, children in self.fused.items()
                               if name in entered and not entered.issuperset(children)}
            for name in self._compiled():  # no module ran eagerly around its graph to open the pack hook
                if not entered.intersection(_enclosing(name)):
                    self._step[name].saved_unseen = True
            # Run as its graph, a compiled module's hooks and its submodules' are traced and do nothing; they ran
            # where torch.compile stood aside (set_stance("force_eager"), a dispatch mode such as a FLOP counter).
            self.ran_eager |= {name for name in self._compiled()
                               if any(name == ROOT or e == name or e.startswith(f"{name}.") for e in entered)}
            for name, params in self._owned_parameters().items():
                self._step[name].params = _tensor_bytes(params)
            for name, record in self._step.items():
                self.records.setdefault(name, ModuleRecord()).merge(record)
        self._step = {}

    def _compiled(self) -> list[str]:
        """The modules compiled with torch.compile, not those inside one."""
        compiled = [name for name, m in self.rows.items() if getattr(m, "_compiled_call_impl", None) is not None]
        return [n for n in compiled if not any(n.startswith(f"{c}.") for c in compiled if c != ROOT)]

    def compiled_note(self) -> str:
        """A line naming the compiled modules, whose insides the table cannot show, and those that ran eagerly in a
        measured step, whose insides it shows as eager ran them; empty when there are none."""
        compiled = self._compiled()
        graphs = [name for name in compiled if name not in self.ran_eager]
        eager = [name for name in compiled if name in self.ran_eager]
        notes = []
        if graphs:
            notes.append(f"Compiled with torch.compile: {', '.join(graphs)}. Each runs as one graph, so its "
                         "submodules' rows hold only their parameters and gradients, and what it saves for backward "
                         "is counted under the nearest module outside it that runs eagerly.")
        if eager:
            notes.append(f"Compiled with torch.compile, but run eagerly in a measured step: {', '.join(eager)} "
                         "(torch.compile stands aside under a dispatch mode or set_stance('force_eager'), as on the "
                         "batch hetrain's Throughput counts FLOPs on, the fit's first). Their submodules' rows are "
                         "that eager run's figures, which the compiled graph's need not match.")
        return " ".join(notes)

    def fused_note(self) -> str:
        """A line naming the fused blocks that ran a child fused, whose rows the table gives differently; empty when
        none did."""
        if not self.ran_fused:
            return ""
        return (f"Fused by hetrain: {', '.join(sorted(self.ran_fused))}. Each computes some of its children in one "
                "kernel without calling them: the outputs and tensors saved for backward of those children are "
                "counted under the block, and their own rows hold only their parameters and gradients.")

    def saved_note(self) -> str:
        """Where the saved-for-backward column's figures come from, and what it leaves out: modules whose saved
        tensors another hook took, calls inside torch.func transforms, and training_step's saves it cannot read."""
        note = (f"Saved for backward: what each module saves while its forward runs; {OUTSIDE}: what training_step "
                "saved outside every module (a loss's inputs), read from the loss's autograd graph before backward.")
        if self.outside_unseen:
            note += f" {OUTSIDE} {NOT_MEASURED}: {'; '.join(sorted(self.outside_unseen))}."
        elif self.outside_opaque:
            note += (f" {OUTSIDE} is a lower bound ({AT_LEAST.strip()}): what {', '.join(sorted(self.outside_opaque))} "
                     "saved is kept where it cannot be read (a C++ autograd Function, such as a hetrain fused op's "
                     "C++ backend, or an in-place op on a view, whose own op's node is hidden inside) and is left out.")
        unseen = [name for name, r in self.records.items() if r.saved_unseen and name != OUTSIDE]
        if unseen:
            note += (f" {NOT_MEASURED.capitalize()}: {', '.join(unseen)}: their forward ran under another "
                     "saved-tensors hook (torch.autograd.graph.save_on_cpu, activation checkpointing), which decides "
                     "what is kept, called torch.func's grad or vjp (jacrev, hessian) on tensors the step's backward "
                     "goes through, which run with no such hook, or ran compiled with no module running eagerly "
                     "around it; the total leaves them out.")
        if self.transformed:
            note += (f" Called inside a torch.func transform: {', '.join(sorted(self.transformed))}. What those "
                     "calls make is the transform's, freed when it returns, and is not counted.")
        return note

    def table(self) -> tuple[list[str], list[list[Any]]]:
        """Header and rows in MiB, largest total first, with a total row last; the CUDA column only where a
        module ran on a GPU (on a CPU-only run it would be n/a throughout)."""
        cuda = any(r.cuda_delta is not None for r in self.records.values())
        header = ["module", "type", "params MiB", "grads MiB", "outputs MiB", "saved for backward MiB",
                  *(["CUDA allocated delta MiB"] if cuda else [])]
        rows, totals, partial = [], [0, 0, 0, 0], False
        types = {name: type(m).__name__ for name, m in self.rows.items()}
        for name, r in self.records.items():
            values = [r.params, r.grads, r.outputs, 0 if r.saved_unseen else r.saved]
            if not any(values) and not r.cuda_delta and not r.saved_unseen and not r.saved_partial:
                continue
            totals = [a + b for a, b in zip(totals, values, strict=True)]
            shown: list[Any] = [round(v / MIB, 3) for v in values]
            if r.saved_unseen:  # not 0: what the other hook kept is not known
                shown[-1] = NOT_MEASURED
            elif r.saved_partial:  # what could not be read is left out
                shown[-1] = f"{AT_LEAST}{shown[-1]}"
                partial = True
            delta = ["n/a" if r.cuda_delta is None else round(r.cuda_delta / MIB, 3)] if cuda else []
            rows.append([name, types.get(name, ""), *shown, *delta, sum(values)])
        rows.sort(key=lambda row: -row[-1])
        rows = [row[:-1] for row in rows]
        total: list[Any] = [round(v / MIB, 3) for v in totals]
        if partial:
            total[-1] = f"{AT_LEAST}{total[-1]}"
        rows.append(["total", "", *total, *([""] if cuda else [])])
        return header, rows


def optimizer_state_bytes(optimizers: list[torch.optim.Optimizer]) -> dict[str, int]:
    """Bytes of optimizer state (Adam's moments, ...) per device."""
    out: dict[str, int] = defaultdict(int)
    for optimizer in optimizers:
        for state in optimizer.state.values():
            for t in tree_leaves(state):
                if isinstance(t, torch.Tensor):
                    out[str(t.device)] += t.numel() * t.element_size()
    return dict(out)


def bytes_by_device(tensors: list[torch.Tensor]) -> dict[str, int]:
    out: dict[str, int] = defaultdict(int)
    for t in tensors:
        out[str(t.device)] += _nbytes(t)
    return dict(out)
