"""CPU benchmark of every fused op's C++ path against torch eager and torch.compile, side by side.

Run: ``make bench-cpu`` (or ``python -m benchmarks.bench_cpu``). Writes
``benchmarks/results/<date>-ops-cpu.json`` and regenerates the CPU section of ``benchmarks/RESULTS.md``.
Every column runs on the same host allocator, by default hetrain's kept blocks as ``python train.py`` uses
(``--cpu-malloc system``: torch's own). Bandwidth is set against a copy too large for the caches (DRAM), so a
case that fits in cache can exceed 100%. A variant run names its file after itself (``-ops-cpu-quick``,
``-ops-cpu-system-malloc``, and ``-ops-cpu-backend-rms_norm-torch`` where the environment sends an op to a backend
other than the C++ kernels: HETRAIN_PREFER, a pin, hetrain._C missing or stale) and leaves RESULTS.md alone. Each
row records the backend its "hetrain" column ran, the header hetrain._C's load status. A case that raises is
recorded with its error while the others run on, as is one whose backend cannot be resolved (no available backend
serves the CPU); the run then exits with status 1 naming it, writes ``<name>-failed.json`` (never the day's
complete file) and leaves RESULTS.md alone. A setting of HETRAIN_BACKEND, HETRAIN_PREFER or HETRAIN_STRICT that
hetrain.plugins cannot use, or a pin to a backend that cannot run on the CPU, is refused before the run. Until
the run completes its result is kept in ``<name>.partial.json``: one cut short never replaces the day's complete
file.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import re
import sys
from collections.abc import Callable
from pathlib import Path

import torch

import hetrain
from benchmarks import report
from benchmarks.cases import Case, backend_of, discover, extension_status
from benchmarks.cli import (
    check_backend_settings,
    error_text,
    exit_if_any_failed,
    failed_cases,
    out_dir,
    result_file,
    save_complete,
    save_partial,
)
from benchmarks.timing import copy_bandwidth_gbs, interleaved_ms
from hetrain import cpu_memory, plugins
from hetrain.device_info import host_description

RESULTS = Path(__file__).parent / "results"
CPP = "cpu"  # hetrain.plugins' name of the C++ CPU kernels' backend, the one this benchmark is about
VARIANT_NAME_MAX = 64  # longer op-backend pairs name a variant's file by their hash


def run(quick: bool = False, cpu_malloc: str = "keep", save: Callable[[dict], None] = lambda result: None) -> dict:
    """Every case's times; ``save`` gets the result after each case, so a run cut short keeps what it measured.
    A case that raises is recorded with its error and the others still run."""
    with cpu_memory.host_memory(cpu_malloc) as setting:
        return _run(quick, setting.description, save)


def _run(quick: bool, cpu_malloc: str, save: Callable[[dict], None]) -> dict:
    copy_mib = 64 if quick else 256
    copy_gbs = copy_bandwidth_gbs("cpu", megabytes=copy_mib)
    rows: list[dict] = []
    cases = discover("cpu")
    # Resolved before any case runs, so that the file's name (after the backends) stays the same as the run goes.
    backends, unresolved = _backends(cases)
    result = {
        "date": dt.date.today().isoformat(), "device": host_description(), "torch": torch.__version__,
        "hetrain": hetrain.__version__, "extension": extension_status(), "backends": backends,
        "copy_gbs": copy_gbs, "copy_mib": copy_mib, "quick": quick, "cpu_malloc": cpu_malloc, "rows": rows,
    }
    for case in cases:
        try:
            if case.op in unresolved:
                raise unresolved[case.op]
            row = _measure(case, quick, copy_gbs, backends[case.op])
        except Exception as exc:  # a compile or kernel error of one case must not lose the others' results
            row = {"op": case.op, "shape": case.shape, "dtype": case.dtype, "error": error_text(exc)}
            print(f"{case.op} {case.shape} {case.dtype}: FAILED: {row['error']}", file=sys.stderr, flush=True)
        else:
            print(report.cpu_row_text(row), flush=True)
        rows.append(row)
        save(result)
    return result


def _backends(cases: list[Case]) -> tuple[dict[str, str | None], dict[str, plugins.BackendError]]:
    """The backend each case's op runs on the CPU, and the error of each op hetrain.plugins refuses to resolve
    (a pin to a backend that does not serve the CPU): such an op counts as its pinned backend (the run is then a
    variant), and its cases fail with that error."""
    backends: dict[str, str | None] = {}
    unresolved: dict[str, plugins.BackendError] = {}
    for case in cases:
        try:
            backends[case.op] = backend_of(case, "cpu")
        except plugins.BackendError as exc:
            backends[case.op] = plugins.pinned(case.backend_op or case.op)
            unresolved[case.op] = exc
    return backends, unresolved


def _measure(case: Case, quick: bool, copy_gbs: float, backend: str | None) -> dict:
    times = interleaved_ms(case.make(), rounds=2 if quick else 5, min_reps=3 if quick else 4,
                           budget_s=0.3 if quick else 1.5, device="cpu")
    ours, moving = times["hetrain"], report.bandwidth_ms(times)
    fraction = report.copy_fraction(case.bytes_moved, moving, copy_gbs)
    return {
        "op": case.op, "shape": case.shape, "dtype": case.dtype, "backend": backend, "ms": times,
        "speedup_vs_eager": times["eager"] / ours, "speedup_vs_compile": times["compile"] / ours,
        "bytes_moved": case.bytes_moved, "gbs": None if fraction is None else fraction * copy_gbs,
        "copy_fraction": fraction,
    }


def other_backends(result: dict) -> list[str]:
    """The backends other than the C++ kernels that ``result``'s "hetrain" column ran, sorted: a run with any is a
    variant (see :func:`variant_name`), not the C++ kernels' timing RESULTS.md shows."""
    return sorted({name for name in result.get("backends", {}).values() if name not in (None, CPP)})


def variant_name(result: dict) -> str | None:
    """The file name's part of a run whose "hetrain" column ran backends other than the C++ kernels: its sorted
    op-backend pairs (``backend-layer_norm-torch``), so that runs sending different ops elsewhere keep their own
    files; where they run long, the backends and a hash of the pairs. None for a run on the C++ kernels only."""
    pairs = sorted((op, name) for op, name in result.get("backends", {}).items() if name not in (None, CPP))
    if not pairs:
        return None
    name = "-".join(["backend", *(_file_safe(part) for pair in pairs for part in pair)])
    if len(name) <= VARIANT_NAME_MAX:
        return name
    digest = hashlib.sha1(repr(pairs).encode()).hexdigest()[:8]
    return "-".join(["backend", *map(_file_safe, other_backends(result)), digest])


def _file_safe(name: str) -> str:
    """``name`` with every character but letters, digits, ``_`` and ``.`` made ``_``: ``-`` separates the pairs."""
    return re.sub(r"[^A-Za-z0-9_.]", "_", name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few repeats, for a smoke test")
    parser.add_argument("--out", type=out_dir, default=str(RESULTS), help="results directory")
    parser.add_argument("--cpu-malloc", choices=["keep", "system"], default="keep",
                        help="host allocator of every column (hetrain.cpu_memory)")
    args = parser.parse_args()
    check_backend_settings(parser, "cpu")

    def path_of(result: dict) -> Path:
        return result_file(args.out, result["date"], "ops-cpu", "quick" if args.quick else None,
                           "system-malloc" if args.cpu_malloc == "system" else None, variant_name(result))

    def save(result: dict) -> None:  # after every case, as <name>.partial.json: a run cut short keeps its cases
        save_partial(path_of(result), result)

    result = run(quick=args.quick, cpu_malloc=args.cpu_malloc, save=save)
    failed = bool(failed_cases(result["rows"]))
    path = save_complete(path_of(result), result, failed=failed)  # written even where no case ran
    print(f"{report.dram_copy_text(result)}; wrote {path}")
    if others := other_backends(result):
        print(f"a variant run: the environment sends the hetrain column to backend(s) {', '.join(others)}, not the "
              f"C++ kernels ({CPP!r}; hetrain._C: {result['extension']}); RESULTS.md's CPU table left alone")
    elif args.quick or args.cpu_malloc != "keep":
        print("a variant run: RESULTS.md's CPU table shows full runs on the default allocator only, left alone")
    elif failed:
        print("a run with failed cases: RESULTS.md's CPU table shows runs whose every case was measured, left alone")
    elif args.out.resolve() == RESULTS.resolve():  # RESULTS.md shows benchmarks/results only
        report.write_results_md(args.out)
    exit_if_any_failed(result["rows"], path)


if __name__ == "__main__":
    main()
