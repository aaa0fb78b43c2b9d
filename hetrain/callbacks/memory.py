"""Where training memory goes: per device and phase, per module, and a post-mortem on out-of-memory.

:class:`ModuleMemory` (no Trainer needed) hooks a model for one step and records, per module, its
parameter and gradient bytes, the bytes of its outputs, the bytes it saved for backward (the
activations a step keeps alive) and, on CUDA, the change in allocated memory across its forward.
:class:`PhaseMemory` reads the peak of each device over a phase: ``torch.cuda.max_memory_allocated``
on a GPU; on the CPU the process's peak resident set (``VmHWM``), which Linux resets on request.
:class:`MemoryProfiler` runs both inside a Lightning fit and writes ``memory_report.{md,png,html}``
into the run directory at the end, or ``oom_report.md`` (+ an allocator snapshot) on out-of-memory;
over a few steps it also finds allocator churn (see :mod:`hetrain.callbacks.churn`).
"""

from __future__ import annotations

import base64
import html
import io
import logging
import os
import pickle
import resource
import weakref
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.profilers import PyTorchProfiler
from pytorch_lightning.utilities.rank_zero import rank_zero_only
from torch import nn
from torch.utils._pytree import tree_leaves
from torch.utils.hooks import RemovableHandle
from typing_extensions import override

from hetrain import cpu_memory
from hetrain.callbacks.churn import KIND_MEANING, KINDS, ROOT, ChurnTracker
from hetrain.callbacks.profiling import StepTrace, parse_steps
from hetrain.report import markdown_table

log = logging.getLogger(__name__)

MIB = 2**20
PHASES = ("forward", "backward", "optimizer")
REPORT_MD, REPORT_PNG, REPORT_HTML = "memory_report.md", "memory_report.png", "memory_report.html"
OOM_MD, OOM_SNAPSHOT = "oom_report.md", "oom_snapshot.pickle"
SNAPSHOT = "memory_snapshot.pickle"
_OUTSIDE = "(training_step, outside modules)"
_READING = ("GPU: allocated tensor memory. CPU: the whole process's resident set (compare it with its value "
            "at start).")
CHURN_FIRST_STEP = 2  # a churn window given as a count starts here: step 0 creates optimizer state, step 1 settles


def _proc_status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_bytes() -> int:
    """Resident set of this process now (Linux ``/proc``; the peak where ``/proc`` is missing)."""
    kib = _proc_status_kib("VmRSS")
    return (kib if kib is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def peak_rss_bytes() -> int:
    """Peak resident set since the last :func:`reset_peak_rss` (since process start where it cannot reset)."""
    kib = _proc_status_kib("VmHWM")
    return (kib if kib is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def reset_peak_rss() -> bool:
    """Sets the peak resident set back to the current one (Linux >= 4.0: ``5`` into ``clear_refs``)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _open(path: str, flags: int) -> int | None:
    try:
        return os.open(path, flags)
    except OSError:
        return None


class PhaseMemory:
    """Peak memory of each device over consecutive phases of a step.

    A GPU's number is torch's allocated bytes (tensors, not the allocator's cache; the reserved peak
    is kept beside it). The CPU's is the whole process's resident set: tensors on the host, but also
    Python, libraries and the allocator's free lists, so only its changes speak of the model.

    Notes:
        This runs seven times a step, so the CPU's peak is read cheaply: ``getrusage``'s peak is the
        larger of the peak since the last reset and a value left from before ``exec``; above a bound
        of the latter (taken at start, right after a reset) it is exact, and costs a quarter of reading
        ``/proc/self/status``, which is read otherwise. Both ``/proc`` files stay open.
    """

    def __init__(self, devices: list[torch.device]) -> None:
        self.devices = devices
        self._status = _open("/proc/self/status", os.O_RDONLY)
        self._clear_refs = _open("/proc/self/clear_refs", os.O_WRONLY)
        for fd in (self._status, self._clear_refs):
            if fd is not None:
                weakref.finalize(self, os.close, fd)
        self._floor: int | None = None  # getrusage peaks above this are this process's own
        if self._status is not None and self._clear_refs is not None:
            self._reset_rss()
            self._floor = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB

    def _peak_rss(self) -> int:
        if self._floor is not None:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            if peak > self._floor:
                return peak
        if self._status is not None:
            text = os.pread(self._status, 16384, 0)
            start = text.find(b"VmHWM:")
            if start >= 0:
                return int(text[start + 6:text.index(b"kB", start)]) * 1024
        return peak_rss_bytes()

    def _reset_rss(self) -> None:
        if self._clear_refs is None:
            return
        try:
            os.write(self._clear_refs, b"5")
        except OSError:  # not allowed here: peaks then run from the start of the process
            pass

    def reset(self) -> None:
        for device in self.devices:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            elif device.type == "cpu":
                self._reset_rss()

    def current(self) -> dict[str, int]:
        """Bytes in use on each device now (GPU: allocated; CPU: resident set)."""
        return {str(d): torch.cuda.memory_allocated(d) if d.type == "cuda" else rss_bytes()
                for d in self.devices if d.type in ("cuda", "cpu")}

    def peaks(self) -> dict[str, dict[str, int]]:
        """``{device: {"allocated": peak bytes, "reserved": peak bytes (GPU only), "kept": bytes (CPU only)}}``
        since the last reset; ``kept`` is what hetrain's host allocator holds now in freed blocks for reuse."""
        out: dict[str, dict[str, int]] = {}
        for device in self.devices:
            if device.type == "cuda":
                # One read of the allocator's stats: max_memory_allocated and max_memory_reserved each build
                # and flatten every statistic in Python. With them the hooks took 1.0 ms of a 10.7 ms step on
                # an H200 host (three phase ends a step).
                stats = torch.cuda.memory_stats_as_nested_dict(device)
                out[str(device)] = {"allocated": stats.get("allocated_bytes", {}).get("all", {}).get("peak", 0),
                                    "reserved": stats.get("reserved_bytes", {}).get("all", {}).get("peak", 0)}
            elif device.type == "cpu":
                out["cpu"] = {"allocated": self._peak_rss()}
                kept = _kept_host_bytes()
                if kept is not None:
                    out["cpu"]["kept"] = kept
        return out


def _kept_host_bytes() -> int | None:
    """Bytes of freed host blocks hetrain's allocator keeps mapped (``cpu_malloc: keep``): resident, yet no
    tensor's; None while the allocator is off."""
    stats = cpu_memory.stats()
    return stats.cached_bytes if stats is not None and stats.enabled else None


@dataclass
class ModuleRecord:
    """Bytes one module holds or makes in a step (largest seen over the measured steps)."""

    params: int = 0
    grads: int = 0
    outputs: int = 0
    saved: int = 0  # saved for backward while this module ran: the activations it keeps alive
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


def _tensor_bytes(obj: Any) -> int:
    return sum(_nbytes(t) for t in tree_leaves(obj) if isinstance(t, torch.Tensor))


class ModuleMemory:
    """Per-module memory of a model over one forward and backward, through hooks that exist only meanwhile.

    Call :meth:`start` before the forward, :meth:`forward_done` after it (before backward),
    :meth:`backward_done` after backward, and :meth:`stop` at the end (also after an error).

    Notes:
        No byte is counted twice through a parent: parameters and gradients go to the module that
        owns them, outputs and the CUDA delta to modules without children, and a tensor saved for
        backward (found with ``torch.autograd.graph.saved_tensors_hooks``, once per storage,
        parameters excluded) to the innermost module running when it was saved, e.g. an attention
        block for its ``scaled_dot_product_attention``. Tensors saved outside every module (the loss
        in ``training_step``) get their own row; the model itself is ``(root)``. A module compiled with
        ``torch.compile`` runs as one graph with no submodules: what it saves goes to the nearest module
        outside it that runs eagerly (:meth:`compiled_note`).
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.rows = {name or ROOT: m for name, m in model.named_modules()}
        self.leaves = {name for name, m in self.rows.items() if not any(True for _ in m.children())}
        self.records: dict[str, ModuleRecord] = {}
        self._step: dict[str, ModuleRecord] = {}
        self._handles: list[RemovableHandle] = []
        self._stack: list[str] = []
        self._before: dict[str, int] = {}
        self._seen: set[int] = set()
        self._saved_hooks: torch.autograd.graph.saved_tensors_hooks | None = None
        self._watching = False  # during the first forward of the step (later micro-batches are not counted)

    @property
    def active(self) -> bool:
        return bool(self._handles)

    def start(self) -> None:
        self._step = {name: ModuleRecord(params=_tensor_bytes(list(m.parameters(False))))
                      for name, m in self.rows.items()}
        self._step[_OUTSIDE] = ModuleRecord()
        self._seen = {p.untyped_storage().data_ptr() for p in self.model.parameters()}
        for name, module in self.rows.items():
            self._handles.append(module.register_forward_pre_hook(self._pre(name)))
            self._handles.append(module.register_forward_hook(self._post(name), always_call=True))
        # Autograd calls the pack hook from a compiled module's runtime too; left to dynamo, that call would be
        # compiled as a frame of its own, and a traced _pack counts nothing.
        self._saved_hooks = torch.autograd.graph.saved_tensors_hooks(torch.compiler.disable(self._pack), lambda t: t)
        self._saved_hooks.__enter__()
        self._watching = True

    def _pre(self, name: str):
        def hook(module: nn.Module, args: Any) -> None:
            if not self._watching or torch.compiler.is_compiling():  # see _post
                return
            self._stack.append(name)
            param = next(module.parameters(), None)
            if name in self.leaves and param is not None and param.is_cuda:
                self._before[name] = torch.cuda.memory_allocated(param.device)
        return hook

    def _post(self, name: str):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            # Inside a compiled module dynamo traces these hooks, and their allocator reads broke its graph: the
            # step measured was not the step that runs. Traced, they do nothing: the compiled graph has no
            # submodules, and what it saves for backward goes to the nearest module that runs eagerly.
            if not self._watching or torch.compiler.is_compiling():
                return
            if self._stack and self._stack[-1] == name:
                self._stack.pop()
            record = self._step[name]
            if name in self.leaves:
                record.outputs += _tensor_bytes(output)
            if name in self._before:
                param = next(module.parameters())
                delta = torch.cuda.memory_allocated(param.device) - self._before.pop(name)
                record.cuda_delta = delta + (record.cuda_delta or 0)
        return hook

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        try:
            storage = tensor.untyped_storage()
        except (RuntimeError, NotImplementedError):  # sparse or otherwise storage-less tensors
            return tensor
        if storage.data_ptr() not in self._seen:
            self._seen.add(storage.data_ptr())
            self._step[self._stack[-1] if self._stack else _OUTSIDE].saved += storage.nbytes()
        return tensor

    def forward_done(self) -> None:
        """Stops watching the forward; tensors already saved keep their (identity) unpack hook."""
        self._watching = False
        if self._saved_hooks is not None:
            self._saved_hooks.__exit__(None, None, None)
            self._saved_hooks = None

    def backward_done(self) -> None:
        for name, module in self.rows.items():
            self._step[name].grads = _tensor_bytes([p.grad for p in module.parameters(False) if p.grad is not None])

    def stop(self) -> None:
        """Removes every hook and folds this step into :attr:`records`."""
        self.forward_done()
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._stack.clear()
        self._before.clear()
        for name, record in self._step.items():
            self.records.setdefault(name, ModuleRecord()).merge(record)
        self._step = {}

    def compiled_note(self) -> str:
        """A line naming the compiled modules, whose insides the table cannot show; empty when there are none."""
        compiled = [name for name, m in self.rows.items() if getattr(m, "_compiled_call_impl", None) is not None]
        compiled = [n for n in compiled if not any(n.startswith(f"{c}.") for c in compiled if c != ROOT)]
        if not compiled:
            return ""
        return (f"Compiled with torch.compile: {', '.join(compiled)}. Each runs as one graph, so its submodules have "
                "no rows of their own, and what it saves for backward is counted under the nearest module outside "
                "it that runs eagerly.")

    def table(self) -> tuple[list[str], list[list[Any]]]:
        """Header and rows in MiB, largest total first, with a total row last; the CUDA column only where a
        module ran on a GPU (on a CPU-only run it would be n/a throughout)."""
        cuda = any(r.cuda_delta is not None for r in self.records.values())
        header = ["module", "type", "params MiB", "grads MiB", "outputs MiB", "saved for backward MiB",
                  *(["CUDA allocated delta MiB"] if cuda else [])]
        rows, totals = [], [0, 0, 0, 0]
        types = {name: type(m).__name__ for name, m in self.rows.items()}
        for name, r in self.records.items():
            values = [r.params, r.grads, r.outputs, r.saved]
            if not any(values) and not r.cuda_delta:
                continue
            totals = [a + b for a, b in zip(totals, values, strict=True)]
            delta = ["n/a" if r.cuda_delta is None else round(r.cuda_delta / MIB, 3)] if cuda else []
            rows.append([name, types.get(name, ""), *(round(v / MIB, 3) for v in values), *delta, sum(values)])
        rows.sort(key=lambda row: -row[-1])
        rows = [row[:-1] for row in rows]
        rows.append(["total", "", *(round(v / MIB, 3) for v in totals), *([""] if cuda else [])])
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


def _bytes_by_device(tensors: list[torch.Tensor]) -> dict[str, int]:
    out: dict[str, int] = defaultdict(int)
    for t in tensors:
        out[str(t.device)] += _nbytes(t)
    return dict(out)


def _html_table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


class MemoryProfiler(Callback):
    """Per-device, per-phase and per-module memory of a fit, in a report a person can open.

    Example::

        Trainer(callbacks=[MemoryProfiler()], default_root_dir="runs/1")
        # -> runs/1/memory_report.md, memory_report.png, memory_report.html

    Notes:
        - Every step: the peak of each device over forward, backward and optimizer (Lightning's
          ``on_before_backward``, ``on_after_backward`` and ``on_train_batch_end`` close the phases).
          That costs a few counter reads per step (CPU: a ``getrusage`` and a ``/proc`` write per phase),
          about 0.15 ms a step on a 2-core CPU (``benchmarks/bench_memory_overhead.py``).
        - Every ``module_every_n_steps`` steps (first step included): hooks on every module for that
          step only (see :class:`ModuleMemory`), so other steps run unhooked.
        - ``record_history=True`` records the CUDA allocator's history from the start of the fit
          (``torch.cuda.memory._record_memory_history``) and writes ``memory_snapshot.pickle`` at the
          end; https://pytorch.org/memory_viz opens it. ``history_steps=[first, last]`` records those
          optimizer steps only and writes ``memory_snapshot_steps_<first>-<last>.pickle`` once the last
          has run: the allocations of the steps a person asks about, not the tail of the fit.
        - On the ``churn_steps`` (a few steps after warm-up): ``torch.profiler`` memory events and a
          ``record_function`` range per module (see :class:`~hetrain.callbacks.churn.ChurnTracker`);
          allocations made and freed in every one of those steps are reported per module, the
          temporaries (made and freed inside one module's forward or backward) first. Two torch
          profilers cannot run at once: steps ``StepTrace`` records are skipped, and churn is off under
          Lightning's ``PyTorchProfiler``.
        - With ``dump_on_oom`` a ``torch.cuda.OutOfMemoryError`` in the fit writes ``oom_report.md``
          (step, error, per-device peaks, per-module table) and, when history was recorded,
          ``oom_snapshot.pickle``; Lightning then re-raises the error.

    Args:
        dirpath: where reports go; ``None`` means the Trainer's ``default_root_dir``.
        module_every_n_steps: per-module hooks run on steps 0, n, 2n, ...
        record_history: record the CUDA allocator's history over the whole fit (ignored without CUDA).
        history_steps: ``[first, last]`` (or one step): record the history of these optimizer steps only.
        max_history_entries: allocator events kept in the history.
        dump_on_oom: write the post-mortem on CUDA out-of-memory.
        churn_steps: the steps profiled for allocator churn: a count ``n`` (steps 2 .. n+1) or a list of
            global steps; 0 or an empty list turns it off.
        churn_min_bytes: smaller churned allocations are not reported.
        churn_top: rows of each churn table in the log and the report.
    """

    def __init__(self, dirpath: str | None = None, module_every_n_steps: int = 50, record_history: bool = False,
                 max_history_entries: int = 100_000, dump_on_oom: bool = True,
                 churn_steps: int | Sequence[int] = 3, churn_min_bytes: int = 4096, churn_top: int = 10,
                 history_steps: Sequence[int] | None = None) -> None:
        if record_history and history_steps:
            raise ValueError("hetrain: record_history records the whole fit and history_steps chosen steps; set one")
        self.history_steps = parse_steps(history_steps) if history_steps else None
        self._cuda = False  # a stage is on a GPU: there is an allocator history to record
        if module_every_n_steps < 1:
            raise ValueError(f"hetrain: module_every_n_steps must be >= 1, got {module_every_n_steps}")
        if isinstance(churn_steps, int):
            if churn_steps < 0:
                raise ValueError(f"hetrain: churn_steps as a count must be >= 0, got {churn_steps}")
            churn_steps = range(CHURN_FIRST_STEP, CHURN_FIRST_STEP + churn_steps)
        if any(int(step) < 0 for step in churn_steps):
            raise ValueError(f"hetrain: churn_steps must be global steps >= 0, got {list(churn_steps)}")
        self.churn_steps = sorted({int(step) for step in churn_steps})
        self.churn_min_bytes = churn_min_bytes
        self.churn_top = churn_top
        self.churn: ChurnTracker | None = None
        self.churn_observed: list[int] = []  # the churn steps that completed
        self.dirpath = dirpath
        self.module_every_n_steps = module_every_n_steps
        self.record_history = record_history
        self.max_history_entries = max_history_entries
        self.dump_on_oom = dump_on_oom
        self.steps: list[dict[str, Any]] = []  # one per step: {"step", phase: {device: {...}}}
        self.static: dict[str, dict[str, int]] = {}  # params, grads, optimizer state per device
        self.at_start: dict[str, int] = {}  # bytes in use per device when training started
        self.modules: ModuleMemory | None = None
        self.phases: PhaseMemory | None = None
        self._current: dict[str, Any] | None = None
        self._stepped = False  # the optimizer stepped during this batch (not an accumulating micro-batch)
        self._recording = False

    def _dir(self, trainer: pl.Trainer) -> Path:
        return Path(self.dirpath or trainer.default_root_dir)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After on_fit_start, where a placement moves stages: the devices are final here.
        devices = {p.device for p in pl_module.parameters()} | {torch.device("cpu")}
        self.phases = PhaseMemory(sorted(devices, key=str))
        self.at_start = self.phases.current()
        self.modules = ModuleMemory(pl_module)
        self.churn = ChurnTracker(pl_module, self.churn_min_bytes)
        self._leave_steps_to_other_profilers(trainer)
        self._cuda = any(d.type == "cuda" for d in devices)
        if self.record_history and self._cuda:
            self._start_history()
        if self.history_steps and not self._cuda:
            log.info(f"hetrain: MemoryProfiler history_steps={list(self.history_steps)}: no stage on a GPU, so no "
                     "CUDA allocator history to record")

    def _start_history(self) -> None:
        torch.cuda.memory._record_memory_history(max_entries=self.max_history_entries)
        self._recording = True

    def _snapshot_name(self) -> str:
        if self.history_steps is None:
            return SNAPSHOT
        first, last = self.history_steps
        return f"memory_snapshot_steps_{first}-{last}.pickle"

    def _dump_history(self, trainer: pl.Trainer) -> None:
        """Writes what was recorded (on rank zero) and stops recording."""
        if trainer.is_global_zero:
            path = self._dir(trainer) / self._snapshot_name()
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.cuda.memory._dump_snapshot(str(path))
            log.info(f"CUDA allocator history: {path} (open it at https://pytorch.org/memory_viz)")
        torch.cuda.memory._record_memory_history(enabled=None)
        self._recording = False

    def _leave_steps_to_other_profilers(self, trainer: pl.Trainer) -> None:
        """Drops churn steps another torch profiler records: two cannot run at once, and the second would fail."""
        if isinstance(trainer.profiler, PyTorchProfiler) and self.churn_steps:
            log.warning("hetrain: Lightning's PyTorchProfiler is on; allocator churn is not measured")
            self.churn_steps = []
        for callback in trainer.callbacks:
            if isinstance(callback, StepTrace):
                taken = [s for s in self.churn_steps if callback.first <= s <= callback.last]
                if taken:
                    log.warning(f"hetrain: steps {taken} are traced by StepTrace; allocator churn skips them")
                    self.churn_steps = [s for s in self.churn_steps if s not in taken]

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self._current is None:  # first micro-batch of an optimizer step
            chosen = self.history_steps and trainer.global_step == self.history_steps[0]
            if chosen and self._cuda and not self._recording:
                self._start_history()
            self._current = {"step": trainer.global_step, **{phase: {} for phase in PHASES}}
            if trainer.global_step % self.module_every_n_steps == 0:
                self.modules.start()
            if trainer.global_step in self.churn_steps:
                self.churn.start_step()
        self.phases.reset()

    def _close(self, phase: str) -> None:
        for device, peaks in self.phases.peaks().items():
            old = self._current[phase].get(device, {})
            self._current[phase][device] = {k: max(v, old.get(k, 0)) for k, v in peaks.items()}
        self.phases.reset()

    @override
    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        self._close("forward")
        if self.modules.active:
            self.modules.forward_done()

    @override
    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._close("backward")

    @override
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        self._stepped = True
        if self.modules.active:  # gradients are complete (all micro-batches) and unscaled here
            self.modules.backward_done()

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._current is None or not self._stepped:
            return
        self._stepped = False
        self._close("optimizer")
        self.steps.append(self._current)
        self._current = None
        if self.history_steps and self._recording and self.steps[-1]["step"] >= self.history_steps[1]:
            self._dump_history(trainer)
        if self.churn.active:
            self.churn.stop_step()
            self.churn_observed.append(self.steps[-1]["step"])  # global_step has moved on by now
        if self.modules.active:
            self.modules.stop()
            params = list(pl_module.parameters())
            self.static = {
                "params": _bytes_by_device(params),
                "grads": _bytes_by_device([p.grad for p in params if p.grad is not None]),
                "optimizer state": optimizer_state_bytes(trainer.optimizers),
            }

    def device_table(self) -> tuple[list[str], list[list[Any]]]:
        """Peak MiB per device and phase over all steps, with parameters, gradients and optimizer state."""
        header = ["device", "at start MiB", *(f"peak {p} MiB" for p in PHASES), "params MiB", "grads MiB",
                  "optimizer state MiB"]
        devices = sorted({d for s in self.steps for p in PHASES for d in s[p]})
        rows = []
        for device in devices:
            peaks = [max((s[p].get(device, {}).get("allocated", 0) for s in self.steps), default=0) for p in PHASES]
            held = [self.static.get(k, {}).get(device, 0) for k in ("params", "grads", "optimizer state")]
            rows.append([device, *(round(v / MIB, 3) for v in [self.at_start.get(device, 0), *peaks, *held])])
        return header, rows

    def churn_section(self) -> tuple[list[str], list[tuple[str, tuple[list[str], list[list[Any]]]]]] | None:
        """Paragraphs and titled tables of the allocator-churn section; None when churn is off."""
        if not self.churn_steps:
            return None
        if not self.churn_observed:
            return [f"Not measured: no step of {self.churn_steps} completed."], []
        totals = self.churn.totals()
        paragraphs = [
            f"Steps {', '.join(map(str, self.churn_observed))}: allocations of at least {self.churn_min_bytes} "
            "bytes made and freed in every one of them, by the module they were made in (in the backward: the "
            "module whose forward created the autograd node; after the backward: the optimizer's step), most "
            "bytes per step first.",
            "Per step: " + ", ".join(f"{kind} {totals[kind] / MIB:.3f} MiB" for kind in KINDS) + ".",
        ]
        tables = [("What each kind means", (["kind", "meaning"], [list(item) for item in KIND_MEANING.items()])),
                  (f"Temporaries to remove (top {self.churn_top})", self.churn.table(["temporary"], self.churn_top)),
                  (f"Op workspace and the expected kinds (top {self.churn_top})",
                   self.churn.table(["op workspace", "kept for backward", "passed on"], self.churn_top))]
        return paragraphs, tables

    def kept_host_note(self) -> str | None:
        """How much of the CPU's resident set was freed blocks kept for reuse; None where none were kept."""
        kept = max((s[p].get("cpu", {}).get("kept", 0) for s in self.steps for p in PHASES), default=0)
        if not kept:
            return None
        return (f"CPU: up to {kept / MIB:.1f} MiB of that resident set were freed blocks that hetrain's host "
                "allocator keeps for the next tensor of their size (cpu_malloc: keep), not live tensors, as a "
                "GPU's reserved memory; hetrain.cpu_memory.empty_cache() gives them back.")

    def markdown(self) -> str:
        text = "# Memory\n\n## Peak per device and phase\n\n"
        text += f"{_READING}\n\n" + markdown_table(*self.device_table())
        kept = self.kept_host_note()
        if kept:
            text += f"\n{kept}\n"
        if self.modules is not None and self.modules.records:
            text += "\n## Per module (largest over the measured steps)\n\n" + markdown_table(*self.modules.table())
            compiled = self.modules.compiled_note()
            if compiled:
                text += f"\n{compiled}\n"
        churn = self.churn_section()
        if churn is not None:
            paragraphs, tables = churn
            text += "\n## Allocator churn\n\n" + "".join(f"{p}\n\n" for p in paragraphs)
            for title, (header, rows) in tables:
                text += f"\n### {title}\n\n" + (markdown_table(header, rows) if rows else "None.\n")
        return text

    def plot_png(self) -> bytes:
        """Peak memory over steps per device and phase, and per-module bars; PNG bytes."""
        import matplotlib

        matplotlib.use("Agg")  # no display: render to a file
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator

        header, rows = self.modules.table() if self.modules and self.modules.records else ([], [])
        rows = [r for r in rows if r[0] != "total"][:25]
        fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 4 + 0.3 * len(rows)),
                                          gridspec_kw={"height_ratios": [3, max(2, 0.3 * len(rows))]})
        for device in sorted({d for s in self.steps for p in PHASES for d in s[p]}):
            for phase in PHASES:
                ys = [s[phase].get(device, {}).get("allocated", 0) / MIB for s in self.steps]
                top.plot([s["step"] for s in self.steps], ys, marker=".", label=f"{device} {phase}")
        top.set(xlabel="step", ylabel="peak MiB", title="Each step's peak memory (CPU: process resident set)")
        top.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps, never 0.5
        if top.lines:  # a run with no step has nothing to label
            top.legend(fontsize="small")
        names = [r[0] for r in rows][::-1]
        left = [0.0] * len(names)
        for column in ("params MiB", "grads MiB", "saved for backward MiB"):
            values = [r[header.index(column)] for r in rows][::-1]
            bottom.barh(names, values, left=left, label=column.removesuffix(" MiB"))
            left = [a + b for a, b in zip(left, values, strict=True)]
        bottom.set(xlabel="MiB", title="Per module")
        if names:
            bottom.legend(fontsize="small")
        fig.tight_layout()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=90)
        plt.close(fig)
        return buffer.getvalue()

    def write_report(self, directory: str | Path) -> dict[str, Path]:
        """Writes ``memory_report.md``, ``.png`` and ``.html`` (the page embeds the plot); returns the paths."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        paths = {"md": directory / REPORT_MD, "png": directory / REPORT_PNG, "html": directory / REPORT_HTML}
        paths["md"].write_text(self.markdown())
        png = self.plot_png()
        paths["png"].write_bytes(png)
        tables = "<h2>Peak per device and phase</h2>" + _html_table(*self.device_table())
        kept = self.kept_host_note()
        if kept:
            tables += f"<p>{html.escape(kept)}</p>"
        if self.modules is not None and self.modules.records:
            tables += "<h2>Per module (largest over the measured steps)</h2>" + _html_table(*self.modules.table())
            compiled = self.modules.compiled_note()
            if compiled:
                tables += f"<p>{html.escape(compiled)}</p>"
        churn = self.churn_section()
        if churn is not None:
            paragraphs, churn_tables = churn
            tables += "<h2>Allocator churn</h2>" + "".join(f"<p>{html.escape(p)}</p>" for p in paragraphs)
            for title, (header, rows) in churn_tables:
                tables += f"<h3>{html.escape(title)}</h3>" + (_html_table(header, rows) if rows else "<p>None.</p>")
        page = (
            "<!doctype html><html><head><meta charset='utf-8'><title>Memory report</title><style>"
            "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}td:first-child{text-align:left}</style>"
            f"</head><body><h1>Memory</h1><p>{html.escape(_READING)}</p>"
            f"{tables}<h2>Plot</h2><img alt='memory plot' src='data:image/png;base64,"
            f"{base64.b64encode(png).decode()}'></body></html>"
        )
        paths["html"].write_text(page)
        return paths

    @override
    @rank_zero_only
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        directory = self._dir(trainer)
        paths = self.write_report(directory)
        if self._recording:  # the whole fit's, or chosen steps the fit ended inside of
            self._dump_history(trainer)
        log.info(f"Memory report: {paths['html']} (table: {paths['md']})")
        if self.churn_observed:
            header, rows = self.churn.table(["temporary"], self.churn_top)
            log.info(f"Allocator churn, steps {self.churn_observed}: temporaries made and freed every step inside "
                     f"one module's forward or backward or the optimizer step (>= {self.churn_min_bytes} bytes)\n"
                     + (markdown_table(header, rows) if rows else "none"))

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if self.modules is not None and self.modules.active:
            self.modules.stop()  # no hook may outlive the fit, whatever ended it
        if self.churn is not None and self.churn.active:
            self.churn.stop_step(keep=False)
        if self.dump_on_oom and isinstance(exception, torch.cuda.OutOfMemoryError) and trainer.is_global_zero:
            self.write_oom_dump(self._dir(trainer), trainer.global_step, exception)
        if self._recording:
            torch.cuda.memory._record_memory_history(enabled=None)
            self._recording = False

    def write_oom_dump(self, directory: str | Path, step: int, exception: BaseException) -> Path:
        """Writes ``oom_report.md`` and, when history was recorded, ``oom_snapshot.pickle``; returns the report."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if self._recording:
            with open(directory / OOM_SNAPSHOT, "wb") as f:
                pickle.dump(torch.cuda.memory._snapshot(), f)
            snapshot = f"Allocator snapshot: {OOM_SNAPSHOT} (open it at https://pytorch.org/memory_viz)."
        else:
            snapshot = ("No allocator snapshot: history was not recorded. Set MemoryProfiler(record_history=True) "
                        "to get one on the next out-of-memory.")
        phase = next((p for p in PHASES if self._current and not self._current[p]), "optimizer")
        text = (f"# Out of memory at step {step}\n\nDuring: {phase if self._current else 'outside a step'}\n\n"
                f"Error: `{str(exception).strip().splitlines()[0] if str(exception).strip() else type(exception)}`"
                f"\n\n{snapshot}\n\n")
        if self._current:
            rows = [[p, d, round(v["allocated"] / MIB, 3)] for p in PHASES for d, v in self._current[p].items()]
            text += "## This step so far\n\n" + markdown_table(["phase", "device", "peak MiB"], rows) + "\n"
        text += self.markdown().removeprefix("# Memory\n")
        path = directory / OOM_MD
        path.write_text(text)
        log.error(f"hetrain: out of memory at step {step}; post-mortem in {path}")
        return path
