"""Device-aware backend registry: which implementation of a fused op runs for a given device.

Each op (e.g. ``layer_norm``) has backends: ``triton`` and ``cuda`` for CUDA tensors, ``cpu``
(the C++ extension) and ``torch`` (the plain reference, also the test oracle). A call asks for the
best available backend for its inputs' device type. Users pin one per op, from the strongest to
the weakest: the :func:`use_backend` context manager, :func:`configure` (Hydra's ``backends:``
group calls it), the ``HETRAIN_BACKEND="layer_norm=torch,rms_norm=triton"`` environment variable.
Or they reorder the candidates for every op at once, again strongest first: :func:`preferring`,
``configure(prefer=["cuda"])``, ``HETRAIN_PREFER=cuda``; the named backends come first wherever they
serve the device and are available, so CUDA tensors get the C++/CUDA kernels and CPU tensors keep theirs.

A pinned backend that fails re-raises. An automatically picked one that fails warns once (per op and backend, in a
process) and falls back to the next candidate, unless strict mode is on (``configure(strict=True)`` or
``HETRAIN_STRICT=1``; the tests use it), where it raises.

Third parties add backends without editing hetrain: call :func:`register`, or expose a callable
in the ``hetrain.backends`` entry-point group that calls it when loaded.
"""

from __future__ import annotations

import contextlib
import difflib
import enum
import functools
import math
import os
import re
import sys
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
# Where a pin or a preference comes from, named in the errors about it (those about a variable quote its value).
USE_BACKEND = "use_backend(...)"
CONFIG_PINS = "configure(pins=...) (a recipe's backends.pins)"
PREFERRING = "preferring(...)"
CONFIG_PREFER = "configure(prefer=...) (a recipe's backends.prefer)"
# A ``devices`` entry for a backend that serves every device type torch names (the torch reference): a fixed list
# misses the types named later, as the privateuse1 backend once a vendor renames it ('npu' under torch_npu).
ANY_DEVICE = "*"


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

    def serves(self, device_type: str) -> bool:
        """Whether the backend runs on ``device_type`` (as ``tensor.device.type`` names it), pinned or chosen."""
        return device_type in self.devices or (ANY_DEVICE in self.devices and _torch_names(device_type))


def _torch_names(device_type: str) -> bool:
    """Whether torch names a device type so, at the time of asking (a renamed privateuse1 backend included): what
    :data:`ANY_DEVICE` serves. A typo ('cdua') is no device type, and stays unserved with its clear error."""
    try:
        return torch.device(device_type).type == device_type
    except (RuntimeError, TypeError, ValueError):
        return False


def _served(devices: Iterable[str]) -> str:
    return ", ".join("any device type" if d == ANY_DEVICE else d for d in devices)


_registry: dict[str, dict[str, Backend]] = {}
_config_pins: dict[str, str] = {}
_config_prefer: tuple[str, ...] | None = None
_config_strict: bool | None = None
_local = threading.local()
_SCOPE_ATTRS = ("stack", "prefer")  # the attributes of _local that use_backend and preferring keep their blocks in
_warned: set[tuple[str, str]] = set()

# Exceptions that are another library's control flow through an op, not a backend failing: re-raised as they are.
# Non-reentrant activation checkpointing stops its recomputation with one once it has every saved tensor back;
# caught as a failure, the op ran again on a fallback and torch's checkpoint failed with an internal assertion.
PASS_THROUGH: tuple[type[BaseException], ...] = tuple(
    e for e in (getattr(torch.utils.checkpoint, "_StopRecomputationError", None),) if e is not None)
_entry_points_loaded = False  # set once every hook has run: a thread seeing it unset waits for a load under way
_entry_points_loading = False  # a hook is running: its own calls into the registry must not load (nor wait) again
_entry_points_lock = threading.RLock()  # reentrant: a hook calls register, ops or backends on the loading thread
_lock = threading.Lock()
# candidates() per (op, device type, pin, preference), availability included: a call must not pay for the lookup,
# the sort and the probes (tens of microseconds, more than a small kernel). Emptied whenever backends or pins change.
_resolved: dict[tuple[str, str, str | None, tuple[str, ...]], list[Backend]] = {}
# The same outside any use_backend/preferring block, keyed by the environment's raw settings: reading them is all
# such a call pays (pinned() and preferred() walk the scopes and parse, more than the kernel of a small op).
_unscoped: dict[tuple[str, str, str | None, str | None], list[Backend]] = {}
_scopes_open = 0  # use_backend/preferring blocks open on any thread
# Bumped (under _lock) whenever the caches are emptied: a resolution computed from the registry or pins as they were
# before is not stored, or it would stay in force for good (see _store).
_generation = 0


def _forget_resolved() -> None:
    """Empties the caches; called under ``_lock``."""
    global _generation
    _generation += 1
    _resolved.clear()
    _unscoped.clear()


def _store(cache: dict[Any, list[Backend]], key: Any, found: list[Backend], generation: int) -> None:
    """Caches ``found``, resolved when the generation was ``generation``, unless the caches were emptied since:
    a backend unregistered while another thread resolved would otherwise be chosen ever after."""
    with _lock:
        if generation == _generation:
            cache[key] = found


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


def _names(value: str | torch.device | Iterable[str | torch.device]) -> tuple[Any, ...]:
    """A lone string or torch.device as one name: ``devices="npu"`` would otherwise be the devices 'n', 'p' and 'u';
    an empty string as none, as an empty list (``configure(prefer="")``, a recipe's ``prefer: ''``)."""
    if isinstance(value, str):
        return (value,) if value else ()
    if isinstance(value, torch.device):
        return (value,)
    return tuple(value)


# A device type as ``tensor.device.type`` gives it, which is what a call asks for: lower case, without an index.
_DEVICE_TYPE = re.compile(r"[a-z][a-z0-9_]*")


def _device_types(entries: tuple[object, ...], what: str, where: str) -> tuple[object, ...]:
    """``entries`` of ``register``'s ``devices`` or ``opt_in`` as device types, a torch.device without an index as its
    type. Refuses one naming a single device ('cuda:1') or spelled otherwise ('CPU'): it was taken, then matched no
    call, and the backend was silently never picked (or, in ``opt_in``, picked automatically after all). Entries
    that are no string are left to ``_check_plugin``'s own refusal. :data:`ANY_DEVICE` is taken in ``devices`` only:
    no device is opt-in everywhere."""
    types = []
    for entry in entries:
        text = str(entry) if isinstance(entry, torch.device) else entry  # torch.device("cuda", 1) reads 'cuda:1'
        if (isinstance(text, str) and text and not _DEVICE_TYPE.fullmatch(text)
                and not (what == "devices" and text == ANY_DEVICE)):
            named = text.partition(":")[0].strip().lower()
            use = repr(named) if _DEVICE_TYPE.fullmatch(named) else "e.g. 'cuda'"
            raise ValueError(f"{where}: {what} entry {entry!r} is not a device type: a backend serves every device of "
                             f"a type, named as tensor.device.type names it (lower case, no index); use {use}")
        types.append(text)
    return tuple(types)


def register(
    op: str,
    name: str,
    devices: str | torch.device | tuple[str | torch.device, ...] | list[str | torch.device],
    impl: Any,
    priority: int = 0,
    available: Callable[[], bool | str] | None = None,
    opt_in: str | torch.device | tuple[str | torch.device, ...] | list[str | torch.device] = (),
) -> Backend:
    """Adds (or replaces) backend ``name`` of ``op``; higher ``priority`` wins among available ones.

    ``devices`` and ``opt_in`` name device types ('cuda', or ``torch.device("cuda")``), not single devices;
    :data:`ANY_DEVICE` in ``devices`` serves every device type torch names.
    """
    devices, opt_in = _check_plugin(op, name, _names(devices), impl, priority, available, _names(opt_in))
    backend = Backend(op, name, devices, impl, priority, available or (lambda: True), opt_in)
    with _lock:
        _registry.setdefault(op, {})[name] = backend
        _forget_resolved()
    return backend


def _check_plugin(op: object, name: object, devices: tuple[object, ...], impl: object, priority: object,
                  available: object, opt_in: tuple[object, ...]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Refuses a malformed backend where it is registered: it would otherwise fail at the op's calls, far away.
    Returns its ``devices`` and ``opt_in`` as device types."""
    where = f"hetrain.plugins.register({op!r}, {name!r}, ...)"
    for what, value in (("op", op), ("name", name)):
        if not isinstance(value, str) or not value or _NOT_IN_A_NAME.search(value) or "," in value:
            raise ValueError(f"{where}: {what} must be a non-empty string without whitespace or any of ',;:=' "
                             f"(HETRAIN_BACKEND could not name it), got {value!r}")
    devices, opt_in = _device_types(devices, "devices", where), _device_types(opt_in, "opt_in", where)
    if not devices or not all(isinstance(d, str) and d for d in devices):
        raise ValueError(f"{where}: devices must name at least one device type, e.g. devices=('cpu',) or "
                         f"devices='npu', got {devices!r}")
    if not all(isinstance(d, str) and d for d in opt_in):
        raise ValueError(f"{where}: opt_in must name device types, e.g. opt_in=('cpu',), got {opt_in!r}")
    if impl is None and available is None:  # None is fine for a backend whose probe says why it cannot run
        raise ValueError(f"{where}: impl must provide the op's entry points (e.g. a class with forward and "
                         "backward), got None; pass available= saying why, if it cannot run here")
    if isinstance(priority, bool) or not isinstance(priority, int | float) or not math.isfinite(priority):
        raise ValueError(f"{where}: priority must be a number (higher wins), got {priority!r}")
    if available is not None and not callable(available):
        raise ValueError(f"{where}: available must be a callable returning True or a reason, got {available!r}")
    return devices, opt_in  # type: ignore[return-value]  # each checked above to be a str


def unregister(op: str, name: str) -> None:
    """Removes backend ``name`` of ``op`` (if registered); later calls choose among the others. An op left without
    backends is no longer listed by :func:`ops`."""
    with _lock:
        named = _registry.get(op, {})
        named.pop(name, None)
        if not named:
            _registry.pop(op, None)
        _forget_resolved()


def _load_entry_points() -> None:
    """Imports third-party backends once; a broken plugin warns instead of breaking hetrain.

    Another thread asking meanwhile waits for the load to end: marked loaded as it began, the registry answered it
    without the backends still loading ("unknown op")."""
    global _entry_points_loaded, _entry_points_loading
    if _entry_points_loaded:  # every call after the first: no lock taken
        return
    with _entry_points_lock:
        if _entry_points_loaded or _entry_points_loading:  # loaded while this thread waited, or asked by a hook
            return
        _entry_points_loading = True
        try:
            for ep in entry_points(group=ENTRY_POINT_GROUP):
                try:
                    hook = ep.load()
                    if callable(hook):
                        hook()
                except Exception as exc:
                    warnings.warn(f"hetrain: backend plugin {ep.name!r} ({ep.value}) failed to load: {exc}",
                                  stacklevel=2)
        finally:  # once, even if a hook ended the load (KeyboardInterrupt): hooks are never run twice
            _entry_points_loaded, _entry_points_loading = True, False


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


# Characters no op or backend name has: one of them in a name read from the environment is a separator other than
# the comma ("layer_norm=torch;rms_norm=torch", "torch cpu").
_NOT_IN_A_NAME = re.compile(r"[\s;:=]")


def _parse_pins(text: str) -> dict[str, str]:
    """``op=backend[,op=backend...]`` as a mapping (``pinned`` keeps the result per value of the variable)."""
    pins = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        op, _, name = (part.strip() for part in item.partition("="))
        if not op or not name or _NOT_IN_A_NAME.search(op) or _NOT_IN_A_NAME.search(name):
            raise BackendError(
                f"hetrain: cannot read {ENV_PINS}={text!r}: expected 'op=backend[,op=backend...]', pins separated "
                f"by commas, e.g. 'layer_norm=torch,rms_norm=torch'"
            )
        pins[op] = name
    return pins


def pinned(op: str) -> str | None:
    """The backend name pinned for ``op`` (context manager, then config, then environment)."""
    return _pin(op)[0]


def _pin(op: str) -> tuple[str | None, str]:
    """The backend name pinned for ``op`` and where the pin comes from (errors about it name that)."""
    for scope in reversed(getattr(_local, "stack", None) or ()):
        if op in scope:
            return scope[op], USE_BACKEND
    if op in _config_pins:
        return _config_pins[op], CONFIG_PINS
    text = os.environ.get(ENV_PINS, "")
    pins = _env_pins.get(text)
    if pins is None:  # read and checked once per value, not on every call
        pins = _parse_pins(text)
        _check_pins(pins, f"{ENV_PINS}={text!r}")
        _env_pins[text] = pins
    return pins.get(op), ENV_PINS


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
    """``backend[,backend...]`` as names, read and checked once per value of the variable."""
    names = tuple(filter(None, (name.strip() for name in text.split(","))))
    source = f"{ENV_PREFER}={text!r}"
    if any(_NOT_IN_A_NAME.search(name) for name in names):
        raise BackendError(f"hetrain: cannot read {source}: expected 'backend[,backend...]', names separated by "
                           f"commas, e.g. 'cuda,cpu'")
    _check_backend_names(names, source)
    return names


def strict() -> bool:
    """Whether an automatically chosen backend that fails raises rather than falls back (config, HETRAIN_STRICT)."""
    if _config_strict is not None:
        return _config_strict
    return _parse_strict(os.environ.get(ENV_STRICT, "0"))


@functools.lru_cache(maxsize=8)
def _parse_strict(text: str) -> bool:
    """``HETRAIN_STRICT``'s value as a switch, read once per value of the variable."""
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("", "0", "false", "no", "off"):
        return False
    # Read as "not strict", HETRAIN_STRICT=2 gave silent fallbacks where a failing backend was to raise.
    raise BackendError(f"hetrain: cannot read {ENV_STRICT}={text!r}: expected 1, true, yes or on (strict) or 0, "
                       "false, no or off")


def _check_pins(pins: Mapping[str, str | None], source: str) -> None:
    """Refuses a pin for an op no backend registers (it would never apply: the call would run unpinned) or for a
    backend the op does not have (it would fail only at the op's first call, far from ``source``, which is named).
    Checked against the backends registered now: a plugin's backend is pinned after its ``register`` has run."""
    if all(op in _registry and (not name or name in _registry[op]) for op, name in pins.items()):
        return  # the usual case, without loading plugins or sorting names
    _refuse_unknown(pins, ops(), source, lambda op: f"a pin names op {op!r}, which no backend registers", "ops")
    for op, name in pins.items():
        if name:
            _refuse_unknown([name], [b.name for b in backends(op)], source,
                            lambda n, op=op: f"a pin names backend {n!r} for op {op!r}, which has no such backend",
                            f"{op}'s backends registered so far")


def _check_backend_names(names: Iterable[str], source: str) -> None:
    """Refuses a preferred backend that no op registers: a typo would leave the order as it was, silently."""
    if all(any(name in named for named in _registry.values()) for name in names):  # without loading plugins
        return
    known = sorted({b.name for op in ops() for b in backends(op)})
    _refuse_unknown(names, known, source, lambda name: f"a preferred backend {name!r} is registered for no op",
                    "backends")


def _refuse_unknown(names: Iterable[str], known: list[str], source: str, says: Callable[[str], str],
                    kind: str) -> None:
    """Raises for the first of ``names`` not in ``known``: where it comes from, what ``says`` of it, the nearest
    known name, and every known ``kind``."""
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1, cutoff=0.5)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise BackendError(f"hetrain: {source}: {says(name)}{hint}; {kind}: {', '.join(known)}")


class _Keep(enum.Enum):
    """``configure``'s default for ``strict``, where None already means "back to HETRAIN_STRICT's choice"."""

    KEEP = enum.auto()


def configure(pins: Mapping[str, str] | None = None, strict: bool | None | _Keep = _Keep.KEEP,
              prefer: str | list[str] | tuple[str, ...] | None = None) -> None:
    """Sets process-wide pins (replacing earlier ones), the preferred backends and strict mode.

    ``pins`` or ``prefer`` None leaves that setting as is; an empty ``prefer`` falls back to ``HETRAIN_PREFER``.
    ``strict`` left out leaves it as is, while ``strict=None`` falls back to ``HETRAIN_STRICT``: a recipe's
    ``backends.strict: null`` means that, and one sweep job's ``strict: true`` must not outlive the job.
    """
    global _config_strict, _config_prefer
    # Every argument checked before any is applied: a refused one left the others in force, half a recipe's settings.
    if strict is not _Keep.KEEP and strict is not None and not isinstance(strict, bool):
        # bool("false") is true: a string or a number would turn strict mode on where it was meant to be off.
        raise ValueError(f"hetrain: configure(strict={strict!r}) takes True, False or None (back to {ENV_STRICT}'s "
                         "choice); pass a bool")
    if pins is not None:
        _check_pins(pins, CONFIG_PINS)
    names = None if prefer is None else _names(prefer)
    if names is not None:
        _check_backend_names(names, CONFIG_PREFER)
    with _lock:
        if pins is not None:
            _config_pins.clear()
            _config_pins.update({k: v for k, v in dict(pins).items() if v})
        if names is not None:
            _config_prefer = names or None
        if strict is not _Keep.KEEP:
            _config_strict = strict
        _forget_resolved()  # strict=None hands the choice back to HETRAIN_STRICT: its value is checked anew


def _refuse_while_compiling(block: str) -> None:
    """Refuses a block opened inside a compiled function, in hetrain's words rather than Dynamo's (it cannot enter
    the block's lock); its pins would not reach the compiled backward either.

    The advice names what does reach that backward: it calls the backward ops on the thread autograd runs it on, for
    CUDA tensors a device thread of autograd's own, where no block of the caller's is open (not even one around
    ``backward()``), and AOTAutograd runs the op's own autograd, which reopens its forward's blocks, only as it traces.
    """
    if torch.compiler.is_compiling():
        raise ValueError(
            f"hetrain: {block} cannot be opened inside a torch.compile'd function: open it around the call of the "
            "compiled function instead, where it applies to that call's forward. No block reaches the compiled "
            "backward of CUDA tensors, not even one around backward(): autograd runs it on a device thread of its "
            f"own. configure(pins=...) or {ENV_PINS} (configure(prefer=...) or {ENV_PREFER} to prefer) apply "
            "process-wide, to forward and backward alike"
        )


@contextlib.contextmanager
def use_backend(**pins: str) -> Iterator[None]:
    """Pins backends for the calls made inside the block, on this thread, and for their backward wherever autograd
    runs it: ``use_backend(layer_norm="torch")``. Not a compiled backward, nor activation checkpointing's recompute
    unless the checkpoint is given :func:`checkpoint_context`: where those run on autograd's device thread (CUDA),
    only :func:`configure` and the environment apply (README, "Choosing a backend")."""
    _refuse_while_compiling(USE_BACKEND)
    _check_pins(pins, USE_BACKEND)
    pins = {op: name for op, name in pins.items() if name}  # an empty name pins nothing, as in configure
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    stack.append(pins)
    try:
        with _scope():
            yield
    finally:
        _remove(stack, pins)


def _remove(stack: list[Any], entry: Any) -> None:
    """Takes a block's own ``entry`` off ``stack`` at its exit, wherever it is: blocks held by generators or an
    ExitStack may close out of order, and popping the innermost would drop another block's entry instead."""
    for i in range(len(stack) - 1, -1, -1):
        if stack[i] is entry:
            del stack[i]
            return


@contextlib.contextmanager
def preferring(*names: str) -> Iterator[None]:
    """Tries the named backends first for every op called inside the block, on this thread (and their backward,
    as for :func:`use_backend`), wherever they serve the device: ``preferring("cuda")``. Pins still win.
    No names change nothing, as ``use_backend()`` pins nothing: the order in force outside the block still holds."""
    _refuse_while_compiling(PREFERRING)
    _check_backend_names(names, PREFERRING)
    if not names:  # an empty entry would be the innermost preference, hiding configure's and HETRAIN_PREFER's
        yield
        return
    scoped = getattr(_local, "prefer", None)
    if scoped is None:
        scoped = _local.prefer = []
    entry = tuple(names)
    scoped.append(entry)
    try:
        with _scope():
            yield
    finally:
        _remove(scoped, entry)


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
    here = _local.__dict__
    saved = {name: here[name] for name in _SCOPE_ATTRS if name in here}
    _local.stack, _local.prefer = [dict(s) for s in scopes[0]], list(scopes[1])
    try:
        with _scope():
            yield
    finally:
        # This thread's own lists back, and no attribute it never had: restored as None, the pins' lookup raised.
        for name in _SCOPE_ATTRS:
            here.pop(name, None)
        here.update(saved)


ContextFn = Callable[[], tuple[contextlib.AbstractContextManager[Any], contextlib.AbstractContextManager[Any]]]


def checkpoint_context(inner: ContextFn | None = None) -> tuple[contextlib.AbstractContextManager[Any],
                                                                contextlib.AbstractContextManager[Any]]:
    """A ``context_fn`` for ``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)`` under which the
    recompute, which runs in backward, keeps the use_backend/preferring blocks open at forward, as a pinned call's
    own backward does; without it the recompute picks backends afresh. ``inner``, another ``context_fn``, is
    combined with it: ``context_fn=functools.partial(checkpoint_context, inner)``.
    """
    forward, recompute = (contextlib.nullcontext(), contextlib.nullcontext()) if inner is None else inner()
    return forward, _InScopes(open_scopes(), recompute)


class _InScopes:
    """``inner`` entered under :func:`reopened` ``scopes``, anew at each entry: a second backward of a graph kept
    with ``retain_graph=True`` recomputes again."""

    def __init__(self, scopes: Scopes | None, inner: contextlib.AbstractContextManager[Any]) -> None:
        self._scopes, self._inner = scopes, inner
        self._entered: list[contextlib.ExitStack] = []

    def __enter__(self) -> None:
        with contextlib.ExitStack() as stack:
            stack.enter_context(reopened(self._scopes))
            stack.enter_context(self._inner)
            self._entered.append(stack.pop_all())

    def __exit__(self, *exc_info: Any) -> bool:
        return self._entered.pop().__exit__(*exc_info)


def _describe(op: str) -> str:
    parts = []
    for b in backends(op):
        why = b.why_unavailable()
        pinned_only = [d for d in b.opt_in if b.serves(d)]  # an opt-in device it does not serve is no choice
        opt_in = f"; pinned only on {', '.join(pinned_only)}" if pinned_only else ""
        parts.append(f"{b.name}({_served(b.devices)}{opt_in}{'' if why is None else '; unavailable: ' + why})")
    return ", ".join(parts) or "none"


def candidates(op: str, device_type: str | torch.device) -> list[Backend]:
    """Backends that may run ``op`` on ``device_type``, in the order they are tried.

    ``device_type`` may also be a device ('cuda:1', a torch.device): its type is what backends serve.

    A pinned backend is the only candidate; it must serve the device and be available. Otherwise the
    preferred backends come first (:func:`preferred`), then the rest by priority. Availability is probed
    once per backend until the registry, the pins or the preference change.
    """
    if not _scopes_open:
        environ = os.environ
        fast_key = (op, device_type, environ.get(ENV_PINS), environ.get(ENV_PREFER))
        found = _unscoped.get(fast_key)
        if found is None:
            generation = _generation  # before anything the resolution reads
            found = _resolve(op, device_type)
            _store(_unscoped, fast_key, found, generation)
        return found
    return _resolve(op, device_type)


def _resolve(op: str, device_type: str | torch.device) -> list[Backend]:
    generation = _generation
    pin = pinned(op)
    prefer = preferred()
    key = (op, device_type, pin, prefer)
    found = _resolved.get(key)
    if found is None:
        # Read where an op is resolved, not only once a backend fails: an unreadable HETRAIN_STRICT let a run go on,
        # and its first failure then raised this error where the fallback was due. Not on every call: reading an
        # unset variable costs a call more than the rest of a cached lookup.
        strict()
        found = _candidates(op, device_type, pin, prefer)
        _store(_resolved, key, found, generation)
    return found


def _device_type(device: str | torch.device) -> str:
    """The device type a call on ``device`` asks for: ``torch.device("cuda", 1)`` and 'cuda:1' ask for 'cuda';
    anything else by its text (which no backend serves: the call then says so)."""
    return device.type if isinstance(device, torch.device) else str(device).partition(":")[0]


def _candidates(op: str, device: str | torch.device, pin: str | None, prefer: tuple[str, ...] = ()) -> list[Backend]:
    # Read here, where a resolution is computed and then cached under the device as given, not on every call.
    device_type = _device_type(device)
    every = backends(op)
    if pin is not None:
        chosen = next((b for b in every if b.name == pin), None)
        if chosen is None:
            raise _pin_error(op, pin, f"is not registered; registered: {_describe(op)}")
        if not chosen.serves(device_type):
            raise _pin_error(op, pin, f"does not serve device {device_type!r} (it serves {_served(chosen.devices)})"
                                      f"; unpin it or move the inputs{_interpreter_hint(pin, device_type)}")
        why = chosen.why_unavailable()
        if why is not None:
            raise _pin_error(op, pin, f"is unavailable: {why}")
        return [chosen]
    usable = [b for b in every
              if b.serves(device_type) and device_type not in b.opt_in and b.why_unavailable() is None]
    if not usable:
        raise BackendError(
            f"hetrain: no available backend of op {op!r} serves device {device_type!r}; "
            f"registered: {_describe(op)}. Register one with hetrain.plugins.register(...) "
            f"or the '{ENTRY_POINT_GROUP}' entry-point group."
        )
    # A stable sort: the preferred in the order named, then the rest by priority as before.
    return sorted(usable, key=lambda b: prefer.index(b.name) if b.name in prefer else len(prefer))


def _pin_error(op: str, pin: str, problem: str) -> BackendError:
    """A pin that cannot run, naming where it was set: a pin set far from the call is otherwise hard to find."""
    return BackendError(f"hetrain: backend {pin!r} pinned for op {op!r} (by {_pin(op)[1]}) {problem}")


def _interpreter_hint(pin: str, device_type: str) -> str:
    """How the Triton kernels run on CPU tensors (hetrain.ops._backends registers them for the CPU only then)."""
    if pin == "triton" and device_type == "cpu":
        return ("; Triton kernels run on CPU tensors only in Triton's interpreter: set TRITON_INTERPRET=1 before "
                "importing hetrain")
    return ""


def select(op: str, device_type: str | torch.device) -> Backend:
    """The backend a call of ``op`` on ``device_type`` would use first (a device, as in :func:`candidates`, too)."""
    return candidates(op, device_type)[0]


def first_choice_entry(op: str, device_type: str | torch.device, entry: str) -> Callable[..., Any] | None:
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


def note_failure(exc: BaseException, op: str, backend: str, device_type: str) -> None:
    """Names the backend and op on an exception hetrain lets through: a kernel's own message rarely says which ran,
    nor why nothing else was tried."""
    add_note = getattr(exc, "add_note", None)  # Python 3.11 and later
    if add_note is not None:
        add_note(f"hetrain: raised by backend {backend!r} of op {op!r} on {device_type}; {_why_no_fallback(op)}")


def _why_no_fallback(op: str) -> str:
    pin, source = _pin(op)
    if pin is not None:
        return f"it is pinned (by {source}), so no other backend was tried"
    if strict():
        return f"strict mode ({ENV_STRICT}=1 or configure(strict=True)) raises rather than falling back"
    if _capturing():
        return "inside a CUDA graph capture no other backend can be tried"
    return "it was the last backend serving this device"


# Frames of hetrain's op machinery and of torch, between the line that called an op (or backward) and a warning.
_INTERNAL_FILES = (__file__, *(os.path.join(os.path.dirname(__file__), part) + os.sep for part in ("ops", "nn")),
                   os.path.dirname(torch.__file__) + os.sep)


def _caller_stacklevel() -> int:
    """The ``stacklevel`` for a warning its caller gives that points at the first frame outside hetrain's ops and
    torch: the user's line, not hetrain's."""
    frame, level = sys._getframe(1), 1
    while frame.f_back is not None and frame.f_code.co_filename.startswith(_INTERNAL_FILES):
        frame, level = frame.f_back, level + 1
    return level


def call(op: str, entry: str, device_type: str | torch.device, *args: Any, **kwargs: Any) -> Any:
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
                note_failure(exc, op, backend.name, device_type)
                raise
            key = (op, backend.name)
            if key not in _warned:
                _warned.add(key)
                warnings.warn(
                    f"hetrain: backend {backend.name!r} of op {op!r} failed on {device_type} "
                    f"({type(exc).__name__}: {exc}); falling back to {tried[i + 1].name!r}. This warning comes "
                    f"once per op and backend in a process; set {ENV_STRICT}=1 to raise instead.",
                    stacklevel=_caller_stacklevel(),
                )
    raise AssertionError("unreachable")  # pragma: no cover
