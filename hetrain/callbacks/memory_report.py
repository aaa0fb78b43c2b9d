"""The memory report a person opens after a fit: tables in Markdown, a plot, and an HTML page holding both.

No Trainer needed: :class:`MemoryReport` renders what :class:`~hetrain.callbacks.memory.MemoryProfiler`
collected (per-step peaks per device and phase, the per-module table, allocator churn).
"""

from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hetrain.callbacks.churn import KIND_MEANING, KINDS, ChurnTracker
from hetrain.callbacks.module_memory import MIB, ModuleMemory
from hetrain.report import markdown_table

PHASES = ("forward", "backward", "optimizer")
REPORT_MD, REPORT_PNG, REPORT_HTML = "memory_report.md", "memory_report.png", "memory_report.html"
READING = ("GPU: allocated tensor memory. CPU: the whole process's resident set (compare it with its value "
           "at start).")

Table = tuple[list[str], list[list[Any]]]
# Paragraphs, then titled tables.
ChurnSection = tuple[list[str], list[tuple[str, Table]]]


def churn_section(tracker: ChurnTracker | None, requested: list[int], observed: list[int], min_bytes: int,
                  top: int) -> ChurnSection | None:
    """The allocator-churn section: what was found on the ``observed`` steps; None when no step was requested."""
    if not requested:
        return None
    if not observed or tracker is None:
        return [f"Not measured: no step of {requested} completed."], []
    totals = tracker.totals()
    paragraphs = [
        f"Steps {', '.join(map(str, observed))}: allocations of at least {min_bytes} bytes made and freed in every "
        "one of them, by the module they were made in (in the backward: the module whose forward created the "
        "autograd node; after the backward: the optimizer's step), most bytes per step first.",
        "Per step: " + ", ".join(f"{kind} {totals[kind] / MIB:.3f} MiB" for kind in KINDS) + ".",
    ]
    tables = [("What each kind means", (["kind", "meaning"], [list(item) for item in KIND_MEANING.items()])),
              (f"Temporaries to remove (top {top})", tracker.table(["temporary"], top)),
              (f"Op workspace and the expected kinds (top {top})",
               tracker.table(["op workspace", "kept for backward", "passed on"], top))]
    return paragraphs, tables


def _html_table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


@dataclass
class MemoryReport:
    """A fit's memory, per device and phase, per module and in allocator churn, rendered for a person.

    Args:
        steps: one entry per optimizer step: ``{"step": n, phase: {device: {"allocated": peak bytes, ...}}}``.
        static: parameters, gradients and optimizer state: ``{kind: {device: bytes}}``.
        at_start: bytes in use per device when training started.
        modules: the per-module records, if any step was measured.
        churn: the allocator-churn section (:func:`churn_section`), if churn was requested.
    """

    steps: list[dict[str, Any]]
    static: dict[str, dict[str, int]] = field(default_factory=dict)
    at_start: dict[str, int] = field(default_factory=dict)
    modules: ModuleMemory | None = None
    churn: ChurnSection | None = None

    def _devices(self) -> list[str]:
        return sorted({d for s in self.steps for p in PHASES for d in s[p]})

    def _module_sections(self) -> list[tuple[Table, str]]:
        """The per-module table and its note about compiled modules, when a step was measured."""
        if self.modules is None or not self.modules.records:
            return []
        return [(self.modules.table(), self.modules.compiled_note())]

    def device_table(self) -> Table:
        """Peak MiB per device and phase over all steps, with parameters, gradients and optimizer state."""
        header = ["device", "at start MiB", *(f"peak {p} MiB" for p in PHASES), "params MiB", "grads MiB",
                  "optimizer state MiB"]
        rows = []
        for device in self._devices():
            peaks = [max((s[p].get(device, {}).get("allocated", 0) for s in self.steps), default=0) for p in PHASES]
            held = [self.static.get(k, {}).get(device, 0) for k in ("params", "grads", "optimizer state")]
            rows.append([device, *(round(v / MIB, 3) for v in [self.at_start.get(device, 0), *peaks, *held])])
        return header, rows

    def kept_host_note(self) -> str | None:
        """How much of the CPU's resident set was freed blocks kept for reuse; None where none were kept."""
        kept = max((s[p].get("cpu", {}).get("kept", 0) for s in self.steps for p in PHASES), default=0)
        if not kept:
            return None
        return (f"CPU: up to {kept / MIB:.1f} MiB of that resident set were freed blocks that hetrain's host "
                "allocator keeps for the next tensor of their size (cpu_malloc: keep), not live tensors, as a "
                "GPU's reserved memory; hetrain.cpu_memory.empty_cache() gives them back.")

    def blocks(self) -> list[tuple[str, Any]]:
        """The report's content once, for both renderings: ``("h2" | "h3" | "p", text)`` and ``("table", table)``."""
        out: list[tuple[str, Any]] = [("h2", "Peak per device and phase"), ("p", READING),
                                      ("table", self.device_table())]
        kept = self.kept_host_note()
        if kept:
            out.append(("p", kept))
        for table, note in self._module_sections():
            out += [("h2", "Per module (largest over the measured steps)"), ("table", table)]
            if note:
                out.append(("p", note))
        if self.churn is not None:
            paragraphs, tables = self.churn
            out += [("h2", "Allocator churn"), *(("p", p) for p in paragraphs)]
            for title, table in tables:
                out += [("h3", title), ("table", table) if table[1] else ("p", "None.")]
        return out

    def markdown(self) -> str:
        render = {"h2": lambda t: f"## {t}\n\n", "h3": lambda t: f"### {t}\n\n", "p": lambda t: f"{t}\n\n",
                  "table": lambda t: markdown_table(*t) + "\n"}
        return "# Memory\n\n" + "".join(render[kind](value) for kind, value in self.blocks())

    def html(self, png: bytes) -> str:
        """The page: everything :meth:`markdown` says, and the plot embedded so the file stands alone."""
        render = {"h2": lambda t: f"<h2>{html.escape(t)}</h2>", "h3": lambda t: f"<h3>{html.escape(t)}</h3>",
                  "p": lambda t: f"<p>{html.escape(t)}</p>", "table": lambda t: _html_table(*t)}
        body = "".join(render[kind](value) for kind, value in self.blocks())
        return (
            "<!doctype html><html><head><meta charset='utf-8'><title>Memory report</title><style>"
            "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}td:first-child{text-align:left}</style>"
            f"</head><body><h1>Memory</h1>{body}<h2>Plot</h2><img alt='memory plot' src='data:image/png;base64,"
            f"{base64.b64encode(png).decode()}'></body></html>"
        )

    def plot_png(self) -> bytes:
        """Peak memory over steps per device and phase, and per-module bars; PNG bytes."""
        import matplotlib

        matplotlib.use("Agg")  # no display: render to a file
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator

        sections = self._module_sections()
        header, rows = sections[0][0] if sections else ([], [])
        rows = [r for r in rows if r[0] != "total"][:25]
        fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 4 + 0.3 * len(rows)),
                                          gridspec_kw={"height_ratios": [3, max(2, 0.3 * len(rows))]})
        for device in self._devices():
            for phase in PHASES:
                ys = [s[phase].get(device, {}).get("allocated", 0) / MIB for s in self.steps]
                top.plot([s["step"] for s in self.steps], ys, marker=".", label=f"{device} {phase}")
        top.set(xlabel="step", ylabel="peak MiB", title="Each step's peak memory (CPU: process resident set)")
        top.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps, never 0.5
        if top.lines:  # a run with no step has nothing to label
            top.legend(fontsize="small")
        names = [r[0] for r in rows][::-1]
        left = [0.0] * len(names)
        for column in ("params MiB", "grads MiB", "saved for backward MiB"):
            values = [r[header.index(column)] for r in rows][::-1]
            bottom.barh(names, values, left=left, label=column.removesuffix(" MiB"))
            left = [a + b for a, b in zip(left, values, strict=True)]
        bottom.set(xlabel="MiB", title="Per module")
        if names:
            bottom.legend(fontsize="small")
        fig.tight_layout()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=90)
        plt.close(fig)
        return buffer.getvalue()

    def write(self, directory: str | Path) -> dict[str, Path]:
        """Writes ``memory_report.md``, ``.png`` and ``.html`` (the page embeds the plot); returns the paths."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        paths = {"md": directory / REPORT_MD, "png": directory / REPORT_PNG, "html": directory / REPORT_HTML}
        paths["md"].write_text(self.markdown())
        png = self.plot_png()
        paths["png"].write_bytes(png)
        paths["html"].write_text(self.html(png))
        return paths
