"""Turns recorded benchmark JSON into the tables of benchmarks/RESULTS.md."""

from __future__ import annotations

import json
import math
from pathlib import Path

from benchmarks.plots import speedup_chart

RESULTS_MD = Path(__file__).parent / "RESULTS.md"
CPU_BEGIN, CPU_END = "<!-- cpu:begin -->", "<!-- cpu:end -->"
GPU_BEGIN, GPU_END = "<!-- gpu:begin -->", "<!-- gpu:end -->"
CPU_CHART, GPU_CHART = "ops-cpu.png", "ops-gpu.png"  # in the results directory, beside the JSON they show


def cpu_row_text(row: dict) -> str:
    ms = row["ms"]
    return (f"{row['op']:<24} {row['shape']:<12} {row['dtype']:<8} eager {ms['eager']:7.2f} ms  "
            f"compile {ms['compile']:7.2f} ms  hetrain {ms['hetrain']:7.2f} ms  "
            f"x{row['speedup_vs_eager']:.2f} vs eager  x{row['speedup_vs_compile']:.2f} vs compile  "
            f"{100 * row['copy_fraction']:.0f}% of copy bw")


def cpu_table(result: dict) -> str:
    lines = [
        f"CPU: {result['device']}, torch {result['torch']}, {result['date']}; forward+backward median; "
        f"copy bandwidth {result['copy_gbs']:.1f} GB/s measured in the same run; host allocator: "
        f"{result.get('cpu_malloc', 'system (torch)')}.",
        "",
        "| op | shape | dtype | eager ms | compile ms | hetrain ms | vs eager | vs compile | % copy bw |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        ms = r["ms"]
        lines.append(f"| {r['op']} | {r['shape']} | {r['dtype']} | {ms['eager']:.2f} | {ms['compile']:.2f} | "
                     f"{ms['hetrain']:.2f} | {r['speedup_vs_eager']:.2f}x | {r['speedup_vs_compile']:.2f}x | "
                     f"{100 * r['copy_fraction']:.0f}% |")
    lines += [epilogue_text(r) for r in result["rows"] if "conv" in r["ms"]]
    return "\n".join(lines)


def epilogue_text(row: dict) -> str:
    """A fused conv block's own work: each implementation's time minus the convolution's, timed in the same run."""
    ms, conv = row["ms"], row["ms"]["conv"]
    epi = {name: ms[name] - conv for name in ("eager", "compile", "hetrain")}
    ours = epi["hetrain"]
    return (f"\n{row['op']} {row['shape']}: the convolution alone takes {conv:.2f} ms; the epilogue (block minus "
            f"conv) takes eager {epi['eager']:.2f} ms, compile {epi['compile']:.2f} ms, hetrain {ours:.2f} ms "
            f"({epi['eager'] / ours:.2f}x vs eager, {epi['compile'] / ours:.2f}x vs compile).")


def _fmt(value: float | str, digits: int = 3) -> str:
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def gpu_row_text(row: dict) -> str:
    parts = [f"{name} {ms:.3f} ms" for name, ms in row["ms"].items()]
    return (f"{row['op']:<24} {row['shape']:<18} {row['dtype']:<9} " + "  ".join(parts)
            + f"  {100 * row['copy_fraction']:.0f}% of copy bw")


def gpu_table(result: dict) -> str:
    """Per impl: the per-call median (each call waited for), the time per call back to back (a training loop's
    view) where recorded, and the GPU time alone (graph replay); hetrain's speedup by each; hetrain's share of
    the copy bandwidth per call and in GPU time."""
    lines = [
        f"GPU: {result['device']}, torch {result['torch']} (CUDA {result['cuda']}), {result['date']}; forward+backward "
        f"median per call, per call back to back, and GPU time from a CUDA-graph replay; copy bandwidth "
        f"{result['copy_gbs']:.0f} GB/s.",
        "",
        "| op | shape | dtype | impl | ms per call | ms back to back | ms GPU (graph) | peak MiB "
        "| hetrain speedup per call / back to back / GPU | hetrain % copy bw per call / GPU |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        graph, b2b = r["graph_ms"], r.get("back_to_back_ms", {})
        for name, ms in r["ms"].items():
            speed = bw = ""
            if name not in ("hetrain", "conv"):
                speed = " / ".join(_ratio(times.get(name), times.get("hetrain"))
                                   for times in (r["ms"], b2b, graph))
            elif name == "hetrain":
                bw = f"{100 * r['copy_fraction']:.0f}%"
                if isinstance(graph.get(name), float):
                    bw += f" / {100 * r['copy_fraction'] * ms / graph[name]:.0f}%"
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
        return head + section + rest.split(end, 1)[1]
    return text.rstrip() + "\n\n" + section + "\n"


def write_gpu_results_md(results_dir: Path) -> None:
    """Replaces the GPU section of RESULTS.md with the newest GPU op benchmark, keeping everything else."""
    files = sorted(p for p in results_dir.glob("*-ops.json") if not p.name.endswith("-cpu-ops.json"))
    if not files:
        return
    result = json.loads(files[-1].read_text())
    body = gpu_table(result)
    chart = speedup_chart(result, results_dir / GPU_CHART, result["device"],
                          {"ms": "per call", "back_to_back_ms": "back to back", "graph_ms": "GPU time (graph)"})
    if chart is not None:
        body = f"![hetrain's speedup per case]({_relative(chart)})\n\n" + body
    if backends := backend_table(result):
        body += "\n\nThe two CUDA backends of each op side by side (geometric mean over its cases):\n\n" + backends
    text = RESULTS_MD.read_text() if RESULTS_MD.exists() else "# hetrain benchmark results\n"
    RESULTS_MD.write_text(_replace_section(text, GPU_BEGIN, GPU_END, body))


def latest(results_dir: Path, suffix: str) -> dict | None:
    files = sorted(results_dir.glob(f"*-{suffix}.json"))
    return json.loads(files[-1].read_text()) if files else None


def write_results_md(results_dir: Path) -> None:
    """Replaces the CPU section of RESULTS.md with the newest CPU result, keeping everything else."""
    result = latest(results_dir, "ops-cpu")
    if result is None:
        return
    body = cpu_table(result)
    chart = speedup_chart(result, results_dir / CPU_CHART, f"CPU, {result['date']}")
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
