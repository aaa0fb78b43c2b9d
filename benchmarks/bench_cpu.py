"""CPU benchmark of every fused op's C++ path against torch eager and torch.compile, side by side.

Run: ``make bench-cpu`` (or ``python -m benchmarks.bench_cpu``). Writes
``benchmarks/results/<date>-ops-cpu.json`` and regenerates the CPU section of ``benchmarks/RESULTS.md``.
Every column runs on the same host allocator, by default hetrain's kept blocks as ``python train.py`` uses
(``--cpu-malloc system``: torch's own). Bandwidth is set against a copy too large for the caches (DRAM), so a
case that fits in cache can exceed 100%. A variant run names its file after itself (``-ops-cpu-quick``,
``-ops-cpu-system-malloc``) and leaves RESULTS.md alone. A case that raises is recorded with its error while
the others run on; the run then exits with status 1 naming it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch

import hetrain
from benchmarks import report
from benchmarks.cases import Case, discover
from benchmarks.cli import error_text, exit_if_any_failed, out_dir, result_file
from benchmarks.timing import copy_bandwidth_gbs, interleaved_ms
from hetrain import cpu_memory
from hetrain.device_info import host_description

RESULTS = Path(__file__).parent / "results"


def run(quick: bool = False, cpu_malloc: str = "keep", save: Callable[[dict], None] = lambda result: None) -> dict:
    """Every case's times; ``save`` gets the result after each case, so a run cut short keeps what it measured.
    A case that raises is recorded with its error and the others still run."""
    with cpu_memory.host_memory(cpu_malloc) as setting:
        return _run(quick, setting.description, save)


def _run(quick: bool, cpu_malloc: str, save: Callable[[dict], None]) -> dict:
    copy_mib = 64 if quick else 256
    copy_gbs = copy_bandwidth_gbs("cpu", megabytes=copy_mib)
    rows: list[dict] = []
    result = {
        "date": dt.date.today().isoformat(), "device": host_description(), "torch": torch.__version__,
        "hetrain": hetrain.__version__, "copy_gbs": copy_gbs, "copy_mib": copy_mib, "quick": quick,
        "cpu_malloc": cpu_malloc, "rows": rows,
    }
    for case in discover("cpu"):
        try:
            row = _measure(case, quick, copy_gbs)
        except Exception as exc:  # a compile or kernel error of one case must not lose the others' results
            row = {"op": case.op, "shape": case.shape, "dtype": case.dtype, "error": error_text(exc)}
            print(f"{case.op} {case.shape} {case.dtype}: FAILED: {row['error']}", file=sys.stderr, flush=True)
        else:
            print(report.cpu_row_text(row), flush=True)
        rows.append(row)
        save(result)
    return result


def _measure(case: Case, quick: bool, copy_gbs: float) -> dict:
    times = interleaved_ms(case.make(), rounds=2 if quick else 5, min_reps=3 if quick else 4,
                           budget_s=0.3 if quick else 1.5)
    ours, moving = times["hetrain"], report.bandwidth_ms(times)
    fraction = report.copy_fraction(case.bytes_moved, moving, copy_gbs)
    return {
        "op": case.op, "shape": case.shape, "dtype": case.dtype, "ms": times,
        "speedup_vs_eager": times["eager"] / ours, "speedup_vs_compile": times["compile"] / ours,
        "gbs": None if fraction is None else fraction * copy_gbs, "copy_fraction": fraction,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few repeats, for a smoke test")
    parser.add_argument("--out", type=out_dir, default=str(RESULTS), help="results directory")
    parser.add_argument("--cpu-malloc", choices=["keep", "system"], default="keep",
                        help="host allocator of every column (hetrain.cpu_memory)")
    args = parser.parse_args()

    def path_of(result: dict) -> Path:
        return result_file(args.out, result["date"], "ops-cpu", "quick" if args.quick else None,
                           "system-malloc" if args.cpu_malloc == "system" else None)

    def save(result: dict) -> None:
        path_of(result).write_text(json.dumps(result, indent=2))

    result = run(quick=args.quick, cpu_malloc=args.cpu_malloc, save=save)
    save(result)  # written even where no case ran
    path = path_of(result)
    print(f"{report.dram_copy_text(result)}; wrote {path}")
    if args.quick or args.cpu_malloc != "keep":
        print("a variant run: RESULTS.md's CPU table shows full runs on the default allocator only, left alone")
    elif args.out.resolve() == RESULTS.resolve():  # RESULTS.md shows benchmarks/results only
        report.write_results_md(args.out)
    exit_if_any_failed(result["rows"], path)


if __name__ == "__main__":
    main()
