"""Command-line pieces the benchmarks share: argument types that refuse values a run cannot use, the device
check (and making the device current), the check of hetrain.plugins' environment settings, result file names,
writing a result as a run goes, and the record of a case that failed.

A mistyped number should end in one usage line naming the flag, not in a traceback after minutes of setup,
nor in a run that quietly measures something else (a step count of -3 running one step).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from hetrain import plugins
from hetrain.checks.gpu_check import writable_directory


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: a whole number of at least ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"wants a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"wants a whole number of at least {minimum}, got {value}")
        return value

    return parse


positive_int = int_at_least(1)
non_negative_int = int_at_least(0)


def positive_float(text: str) -> float:
    """An argparse type: a number above 0 (a duration, a time budget)."""
    value = _float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"wants a number above 0, got {text}")
    return value


def probability(text: str) -> float:
    """An argparse type: a dropout probability, at least 0 and below 1."""
    value = _float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"wants a probability p with 0 <= p < 1, got {text}")
    return value


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"wants a number, got {text!r}") from None


def out_dir(text: str) -> Path:
    """An argparse type: a results directory, created if missing and tried with a file, so that a path the run
    cannot write to is refused before it starts, not after it has measured everything."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: not a writable directory (a file is there); "
                                         "pass a directory for the results")
    return writable_directory(path, text)


def check_device(parser: argparse.ArgumentParser, device: str) -> str:
    """``device`` if this machine can run on it, an indexed CPU (``cpu:0``) as ``cpu``, the one CPU device there is;
    else ``parser.error`` says why and what to pass instead."""
    try:
        kind = torch.device(device)
    except RuntimeError:
        parser.error(f"--device {device}: not a device; pass cpu or cuda")
    if kind.type == "cpu":
        return "cpu"
    if kind.type != "cuda":
        parser.error(f"--device {device}: the benchmarks run on cpu or cuda")
    if not torch.cuda.is_available():
        parser.error(f"--device {device}: no GPU in use; pass --device cpu")
    if (kind.index or 0) >= torch.cuda.device_count():
        parser.error(f"--device {device}: this machine has {torch.cuda.device_count()} GPU(s)")
    return device


def check_backend_settings(parser: argparse.ArgumentParser, device: str, ops: Iterable[str] | None = None) -> None:
    """Refuses in one usage line a setting of hetrain.plugins' environment variables it cannot use (HETRAIN_BACKEND,
    HETRAIN_PREFER, HETRAIN_STRICT: malformed, or naming no op or backend), or a pin, of one of ``ops`` (the plugin
    ops the run calls; None: every op), to a backend that cannot run on ``device`` (it does not serve the device's
    type, or is unavailable, with why). Read at each op's first call, it failed every case, and the run still wrote
    its result; a pin of an op the run never calls is no concern of it."""
    try:
        plugins.preferred()
        plugins.strict()
        for op in plugins.ops():
            if plugins.pinned(op) is not None and (ops is None or op in ops):
                plugins.candidates(op, device)  # a pinned backend alone: refused where it cannot run on device
    except plugins.BackendError as exc:
        parser.error(str(exc))


def make_current(device: str) -> None:
    """Makes a CUDA ``device`` with an index (``cuda:1``) the current one: torch.cuda's synchronize, memory
    statistics and graph capture act on the current device, so a run on ``cuda:1`` would otherwise wait for and
    measure ``cuda:0``. Nothing happens for ``cpu`` or a bare ``cuda`` (the current device already)."""
    kind = torch.device(device)
    if kind.type == "cuda" and kind.index is not None:
        torch.cuda.set_device(kind)


def result_file(out: Path, *parts: str | None) -> Path:
    """``out/<part>-<part>....json`` of the parts given (None and "" left out): a variant run (quick, another
    allocator, a subset) names itself after the variant, so it neither overwrites the day's full run nor is
    taken for it by benchmarks.report."""
    return out / ("-".join(p for p in parts if p) + ".json")


PARTIAL = ".partial.json"


def partial_file(path: Path) -> Path:
    """Where a run keeps ``path``'s result until it completes: ``<name>.partial.json``, which none of
    benchmarks.report's globs (``*-ops-cpu.json``, ``*-ops.json``) matches."""
    return path.with_name(path.name.removesuffix(".json") + PARTIAL)


def save_partial(path: Path, result: dict) -> None:
    """Writes what a run has measured so far to ``partial_file(path)``, never to ``path``: a run cut short (Ctrl-C,
    gpu-check's time cap) keeps its cases there and leaves an earlier complete run's ``path`` as it was."""
    _write_json(partial_file(path), result)


FAILED = "-failed.json"


def failed_file(path: Path) -> Path:
    """Where a run with failed cases keeps ``path``'s result: ``<name>-failed.json``, which none of
    benchmarks.report's globs (``*-ops-cpu.json``, ``*-ops.json``) matches, so it neither replaces the day's
    complete run nor is taken for it."""
    return path.with_name(path.name.removesuffix(".json") + FAILED)


def save_complete(path: Path, result: dict, *, failed: bool = False) -> Path:
    """Writes a run's final result to ``path`` and removes its partial file: only a run that got this far has a
    file benchmarks.report takes for the day's run. A run with ``failed`` cases goes to ``failed_file(path)``
    instead: it would replace a good run of the same day and publish its failed rows in RESULTS.md. Returns where
    the result went."""
    final = failed_file(path) if failed else path
    _write_json(final, result)
    partial_file(path).unlink(missing_ok=True)
    return final


def _write_json(path: Path, data: dict) -> None:
    """``data`` as ``path``, atomically: a run killed mid-write leaves the file as it was, never half written.

    The temporary file is opened as ``open`` would create it (mode 0o666 less the umask), not as ``mkstemp``'s
    0o600: it becomes the result, which others sharing the results directory must be able to read."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "w") as file:
            file.write(json.dumps(data, indent=2) + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def error_text(exc: Exception) -> str:
    """A failed case's error in one line, for its result row and a table cell: the type and the message's first
    line (a compiler's error runs to pages)."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def failed_cases(rows: list[dict]) -> list[dict]:
    """The rows of cases that raised (those with an ``"error"``)."""
    return [r for r in rows if "error" in r]


def exit_if_any_failed(rows: list[dict], path: Path) -> None:
    """Exits with status 1 naming each row with an ``"error"``: the other cases' results are kept in ``path``,
    but a check that runs the benchmark (hetrain.checks.gpu_check) must still see the failure."""
    failed = failed_cases(rows)
    if failed:
        names = "; ".join(" ".join(str(r[k]) for k in ("op", "shape", "dtype") if k in r) + f": {r['error']}"
                          for r in failed)
        raise SystemExit(f"{len(failed)} of {len(rows)} cases failed ({names}); the others' results are in {path}")
