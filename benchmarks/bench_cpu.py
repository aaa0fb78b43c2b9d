"""CPU benchmark of every fused op's C++ path against torch eager and torch.compile, side by side.

Run: ``make bench-cpu`` (or ``python -m benchmarks.bench_cpu``). Writes
``benchmarks/results/<date>-ops-cpu.json`` and regenerates the CPU section of ``benchmarks/RESULTS.md``.
Every column runs on the same host allocator, by default hetrain's kept blocks as ``python train.py`` uses
(``--cpu-malloc system``: torch's own).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
from pathlib import Path

import torch

import hetrain
from benchmarks import report
from benchmarks.cases import discover
from benchmarks.timing import copy_bandwidth_gbs, median_ms
from hetrain import cpu_memory
from hetrain.device_info import host_description

RESULTS = Path(__file__).parent / "results"


def run(quick: bool = False, cpu_malloc: str = "keep") -> dict:
    with cpu_memory.host_memory(cpu_malloc) as setting:
        return {**_run(quick), "cpu_malloc": setting.description}


def _run(quick: bool) -> dict:
    copy_gbs = copy_bandwidth_gbs("cpu", megabytes=64 if quick else 256)
    rows = []
    for case in discover("cpu"):
        impls = case.make()
        # Rounds that take turns between the implementations, then the median of each one's round medians:
        # on a shared machine a slow spell then hits every column alike instead of one column's whole window.
        rounds = 2 if quick else 5
        per_round: dict[str, list[float]] = {name: [] for name in impls}
        for r in range(rounds):
            for name, fn in impls.items():
                per_round[name].append(median_ms(fn, warmup=3 if r == 0 else 1, min_reps=3 if quick else 4,
                                                 budget_s=(0.3 if quick else 1.5) / rounds))
        times = {name: statistics.median(ms) for name, ms in per_round.items()}
        ours = times["hetrain"]
        rows.append({
            "op": case.op, "shape": case.shape, "dtype": case.dtype, "ms": times,
            "speedup_vs_eager": times["eager"] / ours, "speedup_vs_compile": times["compile"] / ours,
            "gbs": case.bytes_moved / (ours * 1e-3) / 1e9,
            "copy_fraction": case.bytes_moved / (ours * 1e-3) / 1e9 / copy_gbs,
        })
        print(report.cpu_row_text(rows[-1]), flush=True)
    return {
        "date": dt.date.today().isoformat(), "device": host_description(), "torch": torch.__version__,
        "hetrain": hetrain.__version__, "copy_gbs": copy_gbs, "quick": quick, "rows": rows,
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
    path = args.out / f"{result['date']}-ops-cpu.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"copy bandwidth {result['copy_gbs']:.1f} GB/s; wrote {path}")
    if not args.quick and args.out.resolve() == RESULTS.resolve():  # RESULTS.md shows benchmarks/results only
        report.write_results_md(args.out)


if __name__ == "__main__":
    main()
