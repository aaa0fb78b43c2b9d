"""Every fused op forward+backward beside eager PyTorch, torch.compile and Liger-Kernel (where it has the op).

Run on a GPU: ``make bench-ops`` (or ``python -m benchmarks.bench_ops``). Per case: the per-call median
(each call waited for), the time per call back to back (as a training loop runs them: the host queues the
next call while the GPU runs this one), the GPU time alone (the same call replayed from a captured CUDA graph),
peak extra memory, and bandwidth as a fraction of a device-to-device copy measured in the same run.
Writes ``benchmarks/results/<date>-<device>-ops.json`` and regenerates the GPU section of RESULTS.md.
``--quick --device cpu`` runs tiny shapes on the CPU so the script itself is checked without a GPU.
A quick run writes ``-ops-quick.json`` and one of some ops (``--ops``) ``-ops-subset-<ops>.json``: neither
replaces the day's full run nor becomes the source of RESULTS.md's table. Until the run completes its result is
kept in ``<name>.partial.json``, so one cut short never replaces the day's complete file either. Each row records
the backend its "hetrain" column ran, the header hetrain._C's load status. A case that raises is recorded with
its error while the others run on; the run then exits with status 1 naming it, writes ``<name>-failed.json``
(never the day's complete file) and leaves RESULTS.md alone. A setting of HETRAIN_BACKEND, HETRAIN_PREFER or
HETRAIN_STRICT that hetrain.plugins cannot use, or a pin to a backend that cannot run on ``--device``, is refused
before the run.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata
import sys
from collections.abc import Callable
from pathlib import Path

import torch

import hetrain
from benchmarks import report
from benchmarks.cases import Case, backend_of, discover, extension_status
from benchmarks.cli import (
    check_backend_settings,
    check_device,
    error_text,
    exit_if_any_failed,
    failed_cases,
    make_current,
    out_dir,
    positive_float,
    result_file,
    save_complete,
    save_partial,
)
from benchmarks.timing import (
    back_to_back_ms,
    copy_bandwidth_gbs,
    cuda_generator_restored_on_error,
    interleaved_ms,
    median_ms,
)
from hetrain.device_info import device_name, host_description, result_card
from hetrain.ops.rng import masks_fixed_in_cuda_graphs

RESULTS = Path(__file__).parent / "results"
MEASURE_S = 2.0  # seconds per timing of a full run
QUICK_MEASURE_S = 0.3  # of a --quick run, unless --measure-s says otherwise
# The most calls one timing makes: the budget (--measure-s, which the result records and RESULTS.md's table
# states), not a count of calls, ends a timing; timing's default of 50 would stop an op under ~6 ms short of it.
BUDGET_REPS = 10**7


def graph_ms(fn: Callable[[], object], device: str, measure_s: float) -> float | str:
    """Median replay time of ``fn`` captured in a CUDA graph: the GPU time without Python's launch overhead."""
    try:
        with cuda_generator_restored_on_error():
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):
                    fn()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph), masks_fixed_in_cuda_graphs():  # GPU time: one mask replayed serves
                fn()
        return median_ms(graph.replay, device=device, min_reps=20, max_reps=BUDGET_REPS, budget_s=measure_s)
    except Exception as exc:  # a call that syncs or allocates on the host cannot be captured
        return f"n/a ({type(exc).__name__})"


def peak_mib(fn: Callable[[], object], device: str) -> float | str:
    """Peak GPU memory ``fn`` allocates beyond what was live; "n/a" on the CPU (a GPU host's CPU run included)."""
    if torch.device(device).type != "cuda":
        return "n/a"
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def fresh_compiler() -> None:
    """Forgets every graph torch.compile made. Each case compiles its own function, but a case module's
    functions share one code object, and dynamo keys its cache and its automatic dynamic shapes on that: the
    next case of other sizes would otherwise time a dynamic-shape graph as its compile baseline."""
    torch.compiler.reset()


def package_version(name: str) -> str | None:
    """The installed version of distribution ``name``; None where it is not installed."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def op_names(device: str) -> list[str]:
    """The ops with cases on ``device``: what ``--ops`` may name."""
    return sorted({case.op for case in discover("gpu", device=device, quick=True)})


def run(device: str, quick: bool, measure_s: float | None = None, ops: set[str] | None = None,
        save: Callable[[dict], None] = lambda result: None) -> dict:
    """Per-call times and peaks of every case first, then (on CUDA) the graph replays: a capture that fails
    cannot spoil a per-call time. ``save`` gets the result so far after each case of each pass. ``measure_s``:
    seconds per timing, by default MEASURE_S, or QUICK_MEASURE_S when ``quick``, which also times in three
    rounds taking turns: one slow spell on a shared machine is not the result. A case that raises is recorded
    with its error and the others still run."""
    on_gpu = torch.device(device).type == "cuda"
    copy_gbs = copy_bandwidth_gbs(device, megabytes=64 if quick else 1024)
    if measure_s is None:
        measure_s = QUICK_MEASURE_S if quick else MEASURE_S
    rows: list[dict] = []
    result = {"date": dt.date.today().isoformat(), "device": device_name(device) if on_gpu else host_description(),
              "torch": torch.__version__, "cuda": torch.version.cuda, "triton": package_version("triton"),
              "liger_kernel": package_version("liger-kernel"), "hetrain": hetrain.__version__,
              "extension": extension_status(), "copy_gbs": copy_gbs, "quick": quick, "measure_s": measure_s,
              "ops": None if ops is None else sorted(ops), "rows": rows}
    measured = []
    for case in discover("gpu", device=device, quick=quick):
        if ops is not None and case.op not in ops:
            continue
        try:
            fresh_compiler()
            impls = case.make()
            row = _measure(case, impls, device, quick, measure_s, copy_gbs)
        except Exception as exc:  # one case's kernel or setup error must not lose the others' results
            row = {"op": case.op, "shape": case.shape, "dtype": case.dtype, "error": error_text(exc)}
            print(f"{case.op} {case.shape} {case.dtype}: FAILED: {row['error']}", file=sys.stderr, flush=True)
        else:
            measured.append((case, impls, row))
            print(report.gpu_row_text(row), flush=True)
        rows.append(row)
        save(result)
    for case, impls, row in measured if on_gpu else ():
        fresh_compiler()  # its compile baseline recompiles here: static for its own shapes, as in the first pass
        for impl, fn in impls.items():
            row["graph_ms"][impl] = graph_ms(fn, device, measure_s)
        times = "  ".join(f"{k} {v:.3f} ms" if isinstance(v, float) else f"{k} {v}" for k, v in row["graph_ms"].items())
        print(f"{case.op} {case.shape} {case.dtype} graph replay: {times}", flush=True)
        save(result)
    return result


def _measure(case: Case, impls: dict[str, Callable[[], object]], device: str, quick: bool, measure_s: float,
             copy_gbs: float) -> dict:
    """One case's row: per-call medians, back-to-back times and peaks; its graph replays come later."""
    on_gpu = torch.device(device).type == "cuda"
    row = {"op": case.op, "shape": case.shape, "dtype": case.dtype, "notes": case.notes,
           "backend": backend_of(case, device), "bytes_moved": case.bytes_moved, "ms": {},
           "back_to_back_ms": {}, "peak_mib": {},
           "graph_ms": {name: "n/a (not measured)" if on_gpu else "n/a (no CUDA)" for name in impls}}
    row["ms"] = interleaved_ms(impls, rounds=3 if quick else 1, min_reps=3 if quick else 20, budget_s=measure_s,
                               device=device, max_reps=BUDGET_REPS)
    for impl, fn in impls.items():
        row["back_to_back_ms"][impl] = back_to_back_ms(fn, device=device,
                                                       budget_s=measure_s / 3 if quick else measure_s)
        row["peak_mib"][impl] = peak_mib(fn, device)
    ours = row["ms"]["hetrain"]
    row["speedup"] = {impl: ms / ours for impl, ms in row["ms"].items() if impl not in ("hetrain", "conv")}
    row["copy_fraction"] = report.copy_fraction(case.bytes_moved, report.bandwidth_ms(row["ms"]), copy_gbs)
    return row


def chosen_ops(parser: argparse.ArgumentParser, text: str | None, device: str) -> set[str] | None:
    """The ops ``--ops`` names (None: every op), refusing a name that has no case: a typo would time nothing."""
    if text is None:
        return None
    ops, valid = set(text.split(",")), op_names(device)
    if unknown := sorted(ops - set(valid)):
        parser.error(f"--ops: no cases for {', '.join(map(repr, unknown))}; the ops are {','.join(valid)}")
    return ops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, few repeats")
    parser.add_argument("--measure-s", type=positive_float, default=None,
                        help=f"seconds each timing repeats for (at least 20 calls; default {MEASURE_S}, "
                             f"{QUICK_MEASURE_S} with --quick); 0.3 fits a GPU lent for minutes")
    parser.add_argument("--ops", help="comma-separated ops to run (default: all); such a run is not RESULTS.md's")
    parser.add_argument("--out", type=out_dir, default=str(RESULTS), help="results directory")
    args = parser.parse_args()
    device = check_device(parser, args.device)
    ops = chosen_ops(parser, args.ops, device)
    # A case's op is its plugin op, but for the conv block, whose fused part is bn_relu_pool.
    check_backend_settings(parser, device, None if ops is None else
                           {"bn_relu_pool" if op == "conv_bn_relu_pool" else op for op in ops})
    make_current(device)
    subset = None if ops is None else "-".join(["subset", *sorted(ops)])

    def path_of(result: dict) -> Path:
        return result_file(args.out, result["date"], result_card(device), "ops", "quick" if args.quick else None,
                           subset)

    def save(result: dict) -> None:  # after every case, as <name>.partial.json: a run cut short keeps its cases
        save_partial(path_of(result), result)

    result = run(device, args.quick, args.measure_s, ops, save)
    failed = bool(failed_cases(result["rows"]))
    path = save_complete(path_of(result), result, failed=failed)
    print(f"copy bandwidth {result['copy_gbs']:.1f} GB/s; wrote {path}")
    if backends := report.backend_table(result):
        print("\nthe two CUDA backends (C++ / Triton, geometric mean over each op's cases):\n" + backends)
    if args.quick or ops is not None:
        print("a quick or --ops run: not a source of RESULTS.md's GPU table, which shows full runs only")
    elif failed:
        print("a run with failed cases: RESULTS.md's GPU table shows runs whose every case was measured, left alone")
    # RESULTS.md shows benchmarks/results only: a run written elsewhere (gpu-check's --out) leaves it alone.
    elif torch.device(device).type == "cuda" and args.out.resolve() == RESULTS.resolve():
        report.write_gpu_results_md(args.out)
    exit_if_any_failed(result["rows"], path)


if __name__ == "__main__":
    main()
