"""Device-aware backend registry: which implementation of a fused op runs for a given device.

Each op (e.g. ``layer_norm``) has backends: ``triton`` and ``cuda`` for CUDA tensors, ``cpu``
(the C++ extension) and ``torch`` (the plain reference, also the test oracle). A call asks for the
best available backend for its inputs' device type. Users pin one per op, from the strongest to
the weakest: the :func:`use_backend` context manager, :func:`configure` (Hydra's ``backends:``
group calls it), the ``HETRAIN_BACKEND="layer_norm=torch,rms_norm=triton"`` environment variable.
Or they reorder the candidates for every op at once, again strongest first: :func:`preferring`,
``configure(prefer=["cuda"])``, ``HETRAIN_PREFER=cuda``; the named backends come first wherever they
serve the device and are available, so CUDA tensors get the C++/CUDA kernels and CPU tensors keep theirs.

A pinned backend that fails re-raises. An automatically picked one that fails warns once and
falls back to the next candidate, unless strict mode is on (``configure(strict=True)`` or
``HETRAIN_STRICT=1``; the tests use it), where it raises.

Third parties add backends without editing hetrain: call :func:`register`, or expose a callable
in the ``hetrain.backends`` entry-point group that calls it when loaded.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import os
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any

import torch
import torch.utils.checkpoint

ENV_PINS = "HETRAIN_BACKEND"
ENV_PREFER = "HETRAIN_PREFER"
ENV_STRICT = "HETRAIN_STRICT"
ENTRY_POINT_GROUP = "hetrain.backends"


class BackendError(RuntimeError):
    """No backend can run this op on this device, or a pinned backend is unusable."""


@dataclass(frozen=True)
class Backend:
    """One implementation of one op.

    ``impl`` is any object with the op's entry points as attributes (e.g. ``forward`` and
    ``backward``); ``available`` is a cheap check returning ``True`` or a string saying why not.
    ``opt_in`` lists devices it serves only when pinned (e.g. Triton's interpreter on the CPU:
    right for checking numbers, far too slow to be picked automatically).
    """

    op: str
    name: str
    devices: tuple[str, ...]
    impl: Any
    priority: int = 0
    available: Callable[[], bool | str] = field(default=lambda: True, compare=False)
    opt_in: tuple[str, ...] = ()

    def why_unavailable(self) -> str | None:
        """None where the backend can run; otherwise why not (an availability probe that raises counts as no)."""
        try:
            ok = self.available()
        except Exception as exc:  # an availability probe must never break selection
            return f"availability check raised {type(exc).__name__}: {exc}"
        if ok is True:
            return None
        return ok if isinstance(ok, str) and ok else "not available"


_registry: dict[str, dict[str, Backend]] = {}
_config_pins: dict[str, str] = {}
_config_prefer: tuple[str, ...] | None = None
_config_strict: bool | None = None
_local = threading.local()
_warned: set[tuple[str, str]] = set()

# Exceptions that are another library's control flow through an op, not a backend failing: re-raised as they are.
# Non-reentrant activation checkpointing stops its recomputation with one once it has every saved tensor back;
# caught as a failure, the op ran again on a fallback and torch's checkpoint failed with an internal assertion.
PASS_THROUGH: tuple[type[BaseException], ...] = tuple(
    e for e in (getattr(torch.utils.checkpoint, "_StopRecomputationError", None),) if e is not None)
_entry_points_loaded = False
_lock = threading.Lock()
# candidates() per (op, device type, pin, preference), availability included: a call must not pay for the lookup,
# the sort and the probes (tens of microseconds, more than a small kernel). Emptied whenever backends or pins change.
_resolved: dict[tuple[str, str, str | None, tuple[str, ...]], list[Backend]] = {}
# The same outside any use_backend/preferring block, keyed by the environment's raw settings: reading them is all
# such a call pays (pinned() and preferred() walk the scopes and parse, more than the kernel of a small op).
_unscoped: dict[tuple[str, str, str | None, str | None], list[Backend]] = {}
_scopes_open = 0  # use_backend/preferring blocks open on any thread


def _forget_resolved() -> None:
    _resolved.clear()
    _unscoped.clear()


@contextlib.contextmanager
def _scope() -> Iterator[None]:
    global _scopes_open
    with _lock:
        _scopes_open += 1
    try:
        yield
    finally:
        with _lock:
            _scopes_open -= 1


def register(
    op: str,
    name: str,
    devices: tuple[str, ...] | list[str],
    impl: Any,
    priority: int = 0,
    available: Callable[[], bool | str] | None = None,
    opt_in: tuple[str, ...] | list[str] = (),
) -> Backend:
    """Adds (or replaces) backend ``name`` of ``op``; higher ``priority`` wins among available ones."""
    backend = Backend(op, name, tuple(devices), impl, priority, available or (lambda: True), tuple(opt_in))
    with _lock:
        _registry.setdefault(op, {})[name] = backend
        _forget_resolved()
    return backend


def unregister(op: str, name: str) -> None:
    """Removes backend ``name`` of ``op`` (if registered); later calls choose among the others."""
    with _lock:
        _registry.get(op, {}).pop(name, None)
        _forget_resolved()


def _load_entry_points() -> None:
    """Imports third-party backends once; a broken plugin warns instead of breaking hetrain."""
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            hook = ep.load()
            if callable(hook):
                hook()
        except Exception as exc:
            warnings.warn(f"hetrain: backend plugin {ep.name!r} ({ep.value}) failed to load: {exc}",
                          stacklevel=2)


def ops() -> list[str]:
    """Every op some backend registers, entry-point plugins included, sorted."""
    _load_entry_points()
    return sorted(_registry)


def backends(op: str) -> list[Backend]:
    """All backends of ``op``, best first."""
    _load_entry_points()
    if op not in _registry:
        raise BackendError(f"hetrain: unknown op {op!r}; registered ops: {', '.join(sorted(_registry))}")
    return sorted(_registry[op].values(), key=lambda b: -b.priority)


def _parse_pins(text: str) -> dict[str, str]:
    """``op=backend[,op=backend...]`` as a mapping (``pinned`` keeps the result per value of the variable)."""
    pins = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        op, sep, name = item.partition("=")
        if not sep or not op.strip() or not name.strip():
            raise BackendError(
                f"hetrain: cannot read {ENV_PINS}={text!r}: expected 'op=backend[,op=backend...]', "
                f"e.g. 'layer_norm=torch'"
            )
        pins[op.strip()] = name.strip()
    return pins


def pinned(op: str) -> str | None:
    """The backend name pinned for ``op`` (context manager, then config, then environment)."""
    for scope in reversed(getattr(_local, "stack", [])):
        if op in scope:
            return scope[op]
    if op in _config_pins:
        return _config_pins[op]
    text = os.environ.get(ENV_PINS, "")
    pins = _env_pins.get(text)
    if pins is None:  # read and checked once per value, not on every call
        pins = _parse_pins(text)
        _check_op_names(pins)
        _env_pins[text] = pins
    return pins.get(op)


_env_pins: dict[str, dict[str, str]] = {}


def preferred() -> tuple[str, ...]:
    """Backend names tried first for every op, in order (context manager, then config, then environment)."""
    scoped = getattr(_local, "prefer", None)
    if scoped:
        return scoped[-1]
    if _config_prefer is not None:
        return _config_prefer
    return _parse_prefer(os.environ.get(ENV_PREFER, ""))


@functools.lru_cache(maxsize=8)
def _parse_prefer(text: str) -> tuple[str, ...]:
    return tuple(filter(None, (name.strip() for name in text.split(","))))


def strict() -> bool:
    """Whether an automatically chosen backend that fails raises rather than falls back (config, HETRAIN_STRICT)."""
    if _config_strict is not None:
        return _config_strict
    return os.environ.get(ENV_STRICT, "0").lower() in ("1", "true", "yes")


def _check_op_names(pins: Mapping[str, str]) -> None:
    """Refuses a pin for an op no backend registers: it would never apply, and the call would run unpinned."""
    if all(name in _registry for name in pins):  # the usual case, without loading plugins or sorting names
        return
    _refuse_unknown(pins, ops(), "a pin names op {!r}, which no backend registers", "ops")


def _check_backend_names(names: Iterable[str]) -> None:
    """Refuses a preferred backend that no op registers: a typo would leave the order as it was, silently."""
    known = sorted({b.name for op in ops() for b in backends(op)})
    _refuse_unknown(names, known, "a preferred backend {!r} is registered for no op", "backends")


def _refuse_unknown(names: Iterable[str], known: list[str], says: str, kind: str) -> None:
    """Raises for the first of ``names`` not in ``known``: ``says`` (formatted with the name), the nearest known
    name, and every known ``kind``."""
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1, cutoff=0.5)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise BackendError(f"hetrain: {says.format(name)}{hint}; {kind}: {', '.join(known)}")


def configure(pins: dict[str, str] | None = None, strict: bool | None = None,
              prefer: list[str] | tuple[str, ...] | None = None) -> None:
    """Sets process-wide pins (replacing earlier ones), strict mode and the preferred backends (an empty list
    falls back to ``HETRAIN_PREFER``); ``None`` leaves a setting as is."""
    global _config_strict, _config_prefer
    if pins is not None:
        _check_op_names(pins)
        _config_pins.clear()
        _config_pins.update({k: v for k, v in dict(pins).items() if v})
        _forget_resolved()
    if prefer is not None:
        _check_backend_names(prefer)
        _config_prefer = tuple(prefer) or None
        _forget_resolved()
    if strict is not None:
        _config_strict = bool(strict)


@contextlib.contextmanager
def use_backend(**pins: str) -> Iterator[None]:
    """Pins backends for the calls made inside the block, on this thread, and for their backward wherever autograd
    runs it: ``use_backend(layer_norm="torch")``."""
    _check_op_names(pins)
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    stack.append(pins)
    try:
        with _scope():
            yield
    finally:
        stack.pop()


@contextlib.contextmanager
def preferring(*names: str) -> Iterator[None]:
    """Tries the named backends first for every op called inside the block, on this thread (and their backward),
    wherever they serve the device: ``preferring("cuda")``. Pins still win."""
    scoped = getattr(_local, "prefer", None)
    if scoped is None:
        scoped = _local.prefer = []
    scoped.append(tuple(names))
    try:
        with _scope():
            yield
    finally:
        scoped.pop()


# What use_backend/preferring blocks are open on this thread: their pin dicts and preference tuples, innermost last.
Scopes = tuple[tuple[dict[str, str], ...], tuple[tuple[str, ...], ...]]


def open_scopes() -> Scopes | None:
    """The use_backend/preferring blocks open on this thread, to reopen on another (:func:`reopened`); None when
    there are none, the common case, which costs two lookups."""
    here = _local.__dict__  # one lookup: this runs on every differentiable call
    stack, prefer = here.get("stack"), here.get("prefer")
    if not stack and not prefer:
        return None
    return tuple(dict(s) for s in stack or ()), tuple(prefer or ())


@contextlib.contextmanager
def reopened(scopes: Scopes | None) -> Iterator[None]:
    """Runs the block on this thread under ``scopes`` (from :func:`open_scopes`) instead of its own.

    Why: autograd runs a CUDA tensor's backward on a device thread of its own, where blocks opened by the caller's
    thread do not exist; an op's backward reopens its forward's, so a pinned forward gets its backward pinned too.
    """
    if scopes is None:
        yield
        return
    saved = getattr(_local, "stack", None), getattr(_local, "prefer", None)
    _local.stack, _local.prefer = [dict(s) for s in scopes[0]], list(scopes[1])
    try:
        with _scope():
            yield
    finally:
        _local.stack, _local.prefer = saved


def _describe(op: str) -> str:
    parts = []
    for b in backends(op):
        why = b.why_unavailable()
        pinned_only = [d for d in b.opt_in if d in b.devices]  # an opt-in device it does not serve is no choice
        opt_in = f"; pinned only on {', '.join(pinned_only)}" if pinned_only else ""
        parts.append(f"{b.name}({', '.join(b.devices)}{opt_in}{'' if why is None else '; unavailable: ' + why})")
    return ", ".join(parts) or "none"


def candidates(op: str, device_type: str) -> list[Backend]:
    """Backends that may run ``op`` on ``device_type``, in the order they are tried.

    A pinned backend is the only candidate; it must serve the device and be available. Otherwise the
    preferred backends come first (:func:`preferred`), then the rest by priority. Availability is probed
    once per backend until the registry, the pins or the preference change.
    """
    if not _scopes_open:
        environ = os.environ
        fast_key = (op, device_type, environ.get(ENV_PINS), environ.get(ENV_PREFER))
        found = _unscoped.get(fast_key)
        if found is None:
            found = _unscoped[fast_key] = _resolve(op, device_type)
        return found
    return _resolve(op, device_type)


def _resolve(op: str, device_type: str) -> list[Backend]:
    pin = pinned(op)
    prefer = preferred()
    key = (op, device_type, pin, prefer)
    found = _resolved.get(key)
    if found is None:
        found = _resolved[key] = _candidates(op, device_type, pin, prefer)
    return found


def _candidates(op: str, device_type: str, pin: str | None, prefer: tuple[str, ...] = ()) -> list[Backend]:
    every = backends(op)
    if pin is not None:
        chosen = next((b for b in every if b.name == pin), None)
        if chosen is None:
            raise BackendError(
                f"hetrain: backend {pin!r} pinned for op {op!r} is not registered; registered: {_describe(op)}"
            )
        if device_type not in chosen.devices:
            raise BackendError(
                f"hetrain: backend {pin!r} pinned for op {op!r} does not serve device {device_type!r} "
                f"(it serves {', '.join(chosen.devices)}); unpin it or move the inputs"
            )
        why = chosen.why_unavailable()
        if why is not None:
            raise BackendError(f"hetrain: backend {pin!r} pinned for op {op!r} is unavailable: {why}")
        return [chosen]
    usable = [b for b in every
              if device_type in b.devices and device_type not in b.opt_in and b.why_unavailable() is None]
    if not usable:
        raise BackendError(
            f"hetrain: no available backend of op {op!r} serves device {device_type!r}; "
            f"registered: {_describe(op)}. Register one with hetrain.plugins.register(...) "
            f"or the '{ENTRY_POINT_GROUP}' entry-point group."
        )
    # A stable sort: the preferred in the order named, then the rest by priority as before.
    return sorted(usable, key=lambda b: prefer.index(b.name) if b.name in prefer else len(prefer))


def select(op: str, device_type: str) -> Backend:
    """The backend a call of ``op`` on ``device_type`` would use first."""
    return candidates(op, device_type)[0]


def first_choice_entry(op: str, device_type: str, entry: str) -> Callable[..., Any] | None:
    """``entry`` of the backend a call of ``op`` on ``device_type`` tries first, or None where it has none
    (or no backend serves the device: the call itself then says why)."""
    try:
        first = candidates(op, device_type)[0]
    except BackendError:
        return None
    return getattr(first.impl, entry, None)


def raises_without_fallback(op: str) -> bool:
    """Whether a failure of ``op``'s backend is raised rather than answered by the next candidate."""
    return strict() or pinned(op) is not None or _capturing()


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def call(op: str, entry: str, device_type: str, *args: Any, **kwargs: Any) -> Any:
    """Runs ``entry`` (e.g. ``"forward"``) of the best backend, falling back as the module docstring says."""
    tried = candidates(op, device_type)
    # A named range per fused op, so torch's profiler (and Nsight, under emit_nvtx) shows which ran where;
    # opened only while a profiler listens, since a range costs more than a small kernel.
    profiling = torch.autograd._profiler_enabled()
    for i, backend in enumerate(tried):
        try:
            if not profiling:
                return getattr(backend.impl, entry)(*args, **kwargs)
            with torch.profiler.record_function(f"hetrain::{op}.{entry}[{backend.name}]"):
                return getattr(backend.impl, entry)(*args, **kwargs)
        except PASS_THROUGH:
            raise
        except Exception as exc:
            last = i == len(tried) - 1
            # Inside a CUDA graph capture a failed launch has invalidated the capture: a fallback would run
            # into it and hide the cause (the capture then fails later, naming some other op).
            if last or raises_without_fallback(op):
                raise
            key = (op, backend.name)
            if key not in _warned:
                _warned.add(key)
                warnings.warn(
                    f"hetrain: backend {backend.name!r} of op {op!r} failed on {device_type} "
                    f"({type(exc).__name__}: {exc}); falling back to {tried[i + 1].name!r}. "
                    f"Set {ENV_STRICT}=1 to raise instead.",
                    stacklevel=3,
                )
    raise AssertionError("unreachable")  # pragma: no cover
