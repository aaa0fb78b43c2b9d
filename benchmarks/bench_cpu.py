"""CPU benchmark of every fused op's C++ path against torch eager and torch.compile, side by side.

Run: ``make bench-cpu`` (or ``python -m benchmarks.bench_cpu``). Writes
``benchmarks/results/<date>-ops-cpu.json`` and regenerates the CPU section of ``benchmarks/RESULTS.md``.
Every column runs on the same host allocator, by default hetrain's kept blocks as ``python train.py`` uses
(``--cpu-malloc system``: torch's own). Bandwidth is set against a copy too large for the caches (DRAM), so a
case that fits in cache can exceed 100%. A variant run names its file after itself (``-ops-cpu-quick``,
``-ops-cpu-system-malloc``) and leaves RESULTS.md alone.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
from pathlib import Path

import torch

import hetrain
from benchmarks import report
from benchmarks.cases import discover
from benchmarks.cli import result_file
from benchmarks.timing import copy_bandwidth_gbs, interleaved_ms
from hetrain import cpu_memory
from hetrain.device_info import host_description

RESULTS = Path(__file__).parent / "results"


def run(quick: bool = False, cpu_malloc: str = "keep") -> dict:
    with cpu_memory.host_memory(cpu_malloc) as setting:
        return {**_run(quick), "cpu_malloc": setting.description}


def _run(quick: bool) -> dict:
    copy_mib = 64 if quick else 256
    copy_gbs = copy_bandwidth_gbs("cpu", megabytes=copy_mib)
    rows = []
    for case in discover("cpu"):
        times = interleaved_ms(case.make(), rounds=2 if quick else 5, min_reps=3 if quick else 4,
                               budget_s=0.3 if quick else 1.5)
        ours, moving = times["hetrain"], report.bandwidth_ms(times)
        fraction = report.copy_fraction(case.bytes_moved, moving, copy_gbs)
        rows.append({
            "op": case.op, "shape": case.shape, "dtype": case.dtype, "ms": times,
            "speedup_vs_eager": times["eager"] / ours, "speedup_vs_compile": times["compile"] / ours,
            "gbs": None if fraction is None else fraction * copy_gbs, "copy_fraction": fraction,
        })
        print(report.cpu_row_text(rows[-1]), flush=True)
    return {
        "date": dt.date.today().isoformat(), "device": host_description(), "torch": torch.__version__,
        "hetrain": hetrain.__version__, "copy_gbs": copy_gbs, "copy_mib": copy_mib, "quick": quick, "rows": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few repeats, for a smoke test")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results directory")
    parser.add_argument("--cpu-malloc", choices=["keep", "system"], default="keep",
                        help="host allocator of every column (hetrain.cpu_memory)")
    args = parser.parse_args()
    result = run(quick=args.quick, cpu_malloc=args.cpu_malloc)
    args.out.mkdir(parents=True, exist_ok=True)
    variant = args.quick or args.cpu_malloc != "keep"
    path = result_file(args.out, result["date"], "ops-cpu", "quick" if args.quick else None,
                       "system-malloc" if args.cpu_malloc == "system" else None)
    path.write_text(json.dumps(result, indent=2))
    print(f"{report.dram_copy_text(result)}; wrote {path}")
    if variant:
        print("a variant run: RESULTS.md's CPU table shows full runs on the default allocator only, left alone")
    elif args.out.resolve() == RESULTS.resolve():  # RESULTS.md shows benchmarks/results only
        report.write_results_md(args.out)


if __name__ == "__main__":
    main()
