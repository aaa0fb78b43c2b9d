"""Turns recorded benchmark JSON into the tables of benchmarks/RESULTS.md."""

from __future__ import annotations

import json
import math
from pathlib import Path

from benchmarks.cli import failed_cases
from benchmarks.plots import speedup_chart

RESULTS_MD = Path(__file__).parent / "RESULTS.md"
CPU_BEGIN, CPU_END = "<!-- cpu:begin -->", "<!-- cpu:end -->"
GPU_BEGIN, GPU_END = "<!-- gpu:begin -->", "<!-- gpu:end -->"
CPU_CHART, GPU_CHART = "ops-cpu.png", "ops-gpu.png"  # in the results directory, beside the JSON they show
# Two medians of one run on a shared machine differ by a few percent: a conv block's epilogue (block minus conv)
# smaller than this share of the convolution's time is not resolved, and ratios or GB/s from it would be noise.
EPILOGUE_NOISE = 0.05


def epilogue_ms(times: dict) -> float | None:
    """A fused conv block's own work with hetrain: its block time minus the convolution's, timed in the same run;
    None where that difference is not above EPILOGUE_NOISE of the convolution's time (or either time is missing)."""
    ours, conv = times.get("hetrain"), times.get("conv")
    if not (isinstance(ours, float) and isinstance(conv, float)) or ours - conv <= EPILOGUE_NOISE * conv:
        return None
    return ours - conv


def bandwidth_ms(times: dict) -> float | None:
    """The time in which hetrain moves a case's ``bytes_moved``: its whole call, or for a conv block (timed beside
    its ``conv``) the epilogue alone, the only traffic bytes_moved counts there. None where not resolved."""
    if "conv" in times:
        return epilogue_ms(times)
    return times["hetrain"] if isinstance(times.get("hetrain"), float) else None


def copy_fraction(bytes_moved: int, ms: float | None, copy_gbs: float) -> float | None:
    """GB/s of ``bytes_moved`` in ``ms`` over the copy bandwidth of the same run; None where ``ms`` is."""
    return None if ms is None else bytes_moved / (ms * 1e-3) / 1e9 / copy_gbs


def _percent(fraction: float | None) -> str:
    return "n/a" if fraction is None else f"{100 * fraction:.0f}%"


def cpu_row_text(row: dict) -> str:
    ms = row["ms"]
    return (f"{row['op']:<24} {row['shape']:<12} {row['dtype']:<8} eager {ms['eager']:7.2f} ms  "
            f"compile {ms['compile']:7.2f} ms  hetrain {ms['hetrain']:7.2f} ms  "
            f"x{row['speedup_vs_eager']:.2f} vs eager  x{row['speedup_vs_compile']:.2f} vs compile  "
            f"{_percent(row['copy_fraction'])} of DRAM copy")


def dram_copy_text(result: dict) -> str:
    """What the CPU's "% of DRAM copy" is measured against, and why a case can pass 100%."""
    size = f"a {result['copy_mib']} MiB copy" if "copy_mib" in result else "a copy"
    return (f"DRAM copy bandwidth {result['copy_gbs']:.1f} GB/s ({size}, larger than the caches, measured in the "
            f"same run); a case whose tensors fit in the CPU's caches can exceed 100% of it")


def cpu_copy_fraction(row: dict, result: dict) -> float | None:
    """A CPU row's share of the DRAM copy by the current definition (:func:`bandwidth_ms`: a conv block's bytes
    over its epilogue's time), whatever formula its stored ``copy_fraction`` came from, so that an older result
    renders as a new one does. From the row's ``bytes_moved`` where it records them; a row of a run from before
    the epilogue's definition (no ``copy_mib`` in its header) stored its bytes over hetrain's whole call, so the
    bytes are read back from that; a later row without ``bytes_moved`` stored the current definition already."""
    ms, copy_gbs = row["ms"], result["copy_gbs"]
    if "bytes_moved" in row:
        moved = row["bytes_moved"]
    elif "copy_mib" not in result and row.get("copy_fraction") is not None:
        moved = row["copy_fraction"] * copy_gbs * 1e9 * ms["hetrain"] * 1e-3
    else:
        return row.get("copy_fraction")
    return copy_fraction(moved, bandwidth_ms(ms), copy_gbs)


def cpu_table(result: dict) -> str:
    lines = [
        f"CPU: {result['device']}, torch {result['torch']}, {result['date']}; forward+backward median; "
        f"{dram_copy_text(result)}; host allocator: {result.get('cpu_malloc', 'system (torch)')}.",
        "",
        "| op | shape | dtype | eager ms | compile ms | hetrain ms | vs eager | vs compile | % of DRAM copy |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        if "error" in r:  # a case that raised (benchmarks.bench_cpu): its row says so instead of times
            lines.append(f"| {r['op']} | {r['shape']} | {r['dtype']} | failed: {markdown_cell(r['error'])} | | | | | |")
            continue
        ms = r["ms"]
        lines.append(f"| {r['op']} | {r['shape']} | {r['dtype']} | {ms['eager']:.2f} | {ms['compile']:.2f} | "
                     f"{ms['hetrain']:.2f} | {r['speedup_vs_eager']:.2f}x | {r['speedup_vs_compile']:.2f}x | "
                     f"{_percent(cpu_copy_fraction(r, result))} |")
    lines += [epilogue_text(r) for r in measured_rows(result) if "conv" in r["ms"]]
    return "\n".join(lines)


def measured_rows(result: dict) -> list[dict]:
    """The rows of ``result`` that have times: a case that raised has its error instead."""
    return [r for r in result["rows"] if "error" not in r]


def markdown_cell(text: str) -> str:
    """``text`` inside a markdown table cell: a ``|`` in it would end the cell."""
    return text.replace("|", "\\|")


def epilogue_text(row: dict) -> str:
    """A fused conv block's own work: each implementation's time minus the convolution's, timed in the same run,
    and hetrain's speedup on it where its epilogue is resolved."""
    ms, conv = row["ms"], row["ms"]["conv"]
    epi = {name: ms[name] - conv for name in ("eager", "compile", "hetrain")}
    text = (f"\n{row['op']} {row['shape']}: the convolution alone takes {conv:.2f} ms; the epilogue (block minus "
            f"conv) takes eager {epi['eager']:.2f} ms, compile {epi['compile']:.2f} ms, "
            f"hetrain {epi['hetrain']:.2f} ms")
    ours = epilogue_ms(ms)
    if ours is None:
        return (text + f" (hetrain's is not above {EPILOGUE_NOISE:.0%} of the convolution's time, below what this "
                "run resolves: no ratio or bandwidth from it).")
    return text + f" ({epi['eager'] / ours:.2f}x vs eager, {epi['compile'] / ours:.2f}x vs compile)."


def _fmt(value: float | str, digits: int = 3) -> str:
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def gpu_row_text(row: dict) -> str:
    parts = [f"{name} {ms:.3f} ms" for name, ms in row["ms"].items()]
    return (f"{row['op']:<24} {row['shape']:<32} {row['dtype']:<9} " + "  ".join(parts)
            + f"  {_percent(row['copy_fraction'])} of copy bw")


def gpu_table(result: dict) -> str:
    """Per impl: the per-call median (each call waited for), the time per call back to back (a training loop's
    view) where recorded, and the GPU time alone (graph replay); hetrain's speedup by each; hetrain's share of
    the copy bandwidth per call and in GPU time."""
    lines = [
        f"GPU: {result['device']}, torch {result['torch']} (CUDA {result['cuda']}), {result['date']}; forward+backward "
        f"median per call, per call back to back, and GPU time from a CUDA-graph replay"
        + (f", each timed for {result['measure_s']} s" if "measure_s" in result else "")
        + f"; copy bandwidth {result['copy_gbs']:.0f} GB/s.",
        "",
        "| op | shape | dtype | impl | ms per call | ms back to back | ms GPU (graph) | peak MiB "
        "| hetrain speedup per call / back to back / GPU | hetrain % copy bw per call / GPU |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        if "error" in r:  # a case that raised (benchmarks.bench_ops): its row says so instead of times
            lines.append(f"| {r['op']} | {r['shape']} | {r['dtype']} | failed: {markdown_cell(r['error'])} "
                         "| | | | | | |")
            continue
        graph, b2b = r["graph_ms"], r.get("back_to_back_ms", {})
        for name, ms in r["ms"].items():
            speed = bw = ""
            if name not in ("hetrain", "conv"):
                speed = " / ".join(_ratio(times.get(name), times.get("hetrain"))
                                   for times in (r["ms"], b2b, graph))
            elif name == "hetrain":
                bw = _percent(r["copy_fraction"])
                call, gpu = bandwidth_ms(r["ms"]), bandwidth_ms(graph)
                if r["copy_fraction"] is not None and call is not None and gpu is not None:
                    bw += f" / {100 * r['copy_fraction'] * call / gpu:.0f}%"
            lines.append(f"| {r['op']} | {r['shape']} | {r['dtype']} | {name} | {ms:.3f} | "
                         f"{_fmt(b2b.get(name, 'n/a'))} | {_fmt(graph[name])} | {_fmt(r['peak_mib'][name], 1)} | "
                         f"{speed} | {bw} |")
    return "\n".join(lines)


def backend_table(result: dict) -> str:
    """Per op timed with both CUDA backends (``hetrain``: the default, Triton; ``hetrain_cuda``: the C++ kernels
    with their autograd in C++), the geometric mean over its cases of C++ time / Triton time per call, back to
    back and in GPU time, and which is faster per call: the evidence for each op's CUDA default
    (``hetrain.ops._backends.PRIORITY``). Empty when no case timed both."""
    ratios: dict[str, dict[str, list[float]]] = {}
    for r in result["rows"]:
        for key in ("ms", "back_to_back_ms", "graph_ms"):
            times = r.get(key, {})
            ours, cpp = times.get("hetrain"), times.get("hetrain_cuda")
            if isinstance(ours, float) and isinstance(cpp, float) and ours > 0:
                ratios.setdefault(r["op"], {}).setdefault(key, []).append(cpp / ours)
    if not ratios:
        return ""
    lines = ["| op | cases | C++ / Triton per call | back to back | GPU (graph) | faster per call |",
             "|---|---|---|---|---|---|"]
    for op, by in sorted(ratios.items()):
        means = {k: math.exp(sum(map(math.log, v)) / len(v)) for k, v in by.items()}
        cells = [f"{means[k]:.2f}" if k in means else "n/a" for k in ("ms", "back_to_back_ms", "graph_ms")]
        faster = "C++ (cuda)" if means["ms"] < 1 else "Triton"
        lines.append(f"| {op} | {len(by['ms'])} | {' | '.join(cells)} | {faster} |")
    return "\n".join(lines)


def _ratio(theirs: float | str | None, ours: float | str | None) -> str:
    return f"{theirs / ours:.2f}x" if isinstance(theirs, float) and isinstance(ours, float) else "-"


def _replace_section(text: str, begin: str, end: str, body: str) -> str:
    section = f"{begin}\n{body}\n{end}"
    if begin in text:
        head, rest = text.split(begin, 1)
        if end not in rest:
            raise ValueError(f"{RESULTS_MD} has {begin} but no {end} after it, so where the section ends is unknown: "
                             f"put {end} after the section's last line (or remove {begin} to append a new section)")
        return head + section + rest.split(end, 1)[1]
    return text.rstrip() + "\n\n" + section + "\n"


def gpu_source(results_dir: Path) -> Path | None:
    """The newest full GPU op benchmark: ``<date>-<card>-ops.json``. Quick and subset runs name themselves
    ``-ops-quick`` and ``-ops-subset-<ops>`` (benchmarks.bench_ops) and are not matched, nor is a run's
    ``.partial.json`` (benchmarks.cli.partial_file) or a run with failed cases (``-ops-failed.json``, or an
    older one under the full run's name): the table shows full runs only, and a partial run must not replace it."""
    return newest_fully_measured(sorted(p for p in results_dir.glob("*-ops.json")
                                        if not p.name.endswith("-cpu-ops.json")))


def write_gpu_results_md(results_dir: Path) -> None:
    """Replaces the GPU section of RESULTS.md with the newest full GPU op benchmark, keeping everything else."""
    source = gpu_source(results_dir)
    if source is None:
        return
    result = json.loads(source.read_text())
    body = gpu_table(result)
    chart = speedup_chart({**result, "rows": measured_rows(result)}, results_dir / GPU_CHART, result["device"],
                          {"ms": "per call", "back_to_back_ms": "back to back", "graph_ms": "GPU time (graph)"})
    if chart is not None:
        body = f"![hetrain's speedup per case]({_relative(chart)})\n\n" + body
    if backends := backend_table(result):
        body += "\n\nThe two CUDA backends of each op side by side (geometric mean over its cases):\n\n" + backends
    text = RESULTS_MD.read_text() if RESULTS_MD.exists() else "# hetrain benchmark results\n"
    RESULTS_MD.write_text(_replace_section(text, GPU_BEGIN, GPU_END, body))


def latest(results_dir: Path, suffix: str) -> dict | None:
    """The newest ``<date>-<suffix>.json`` whose every case was measured: variant runs (``-ops-cpu-quick``,
    ``-ops-cpu-system-malloc``) name themselves after the variant and are not matched, nor is a run's
    ``.partial.json`` until it completes, nor a run with failed cases (``-failed.json``, or an older one under the
    full run's name)."""
    source = newest_fully_measured(sorted(results_dir.glob(f"*-{suffix}.json")))
    return None if source is None else json.loads(source.read_text())


def newest_fully_measured(files: list[Path]) -> Path | None:
    """The last of ``files`` (sorted oldest first) with no failed case: a run with failed cases written under the
    full run's name (before benchmarks.cli.failed_file kept such runs apart) would put its failed rows in RESULTS.md,
    in place of the good run before it, or, on GPU, of another card's good run made later the same day."""
    return next((path for path in reversed(files) if not failed_cases(json.loads(path.read_text()).get("rows", []))),
                None)


def write_results_md(results_dir: Path) -> None:
    """Replaces the CPU section of RESULTS.md with the newest full CPU result, keeping everything else."""
    result = latest(results_dir, "ops-cpu")
    if result is None:
        return
    body = cpu_table(result)
    chart = speedup_chart({**result, "rows": measured_rows(result)}, results_dir / CPU_CHART, f"CPU, {result['date']}")
    if chart is not None:
        body = f"![hetrain's speedup per case]({_relative(chart)})\n\n" + body
    text = RESULTS_MD.read_text() if RESULTS_MD.exists() else "# hetrain benchmark results\n\n## CPU\n\n"
    RESULTS_MD.write_text(_replace_section(text, CPU_BEGIN, CPU_END, body))


def _relative(path: Path) -> str:
    """``path`` as RESULTS.md links it."""
    try:
        return path.resolve().relative_to(RESULTS_MD.parent.resolve()).as_posix()
    except ValueError:
        return path.resolve().as_posix()
