"""The memory report a person opens after a fit: tables in Markdown, a plot, and an HTML page holding both.

No Trainer needed: :class:`MemoryReport` renders what :class:`~hetrain.callbacks.memory.MemoryProfiler`
collected (per-step peaks per device and phase, the per-module table, allocator churn).
"""

from __future__ import annotations

import base64
import html
import io
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hetrain.callbacks.churn import KIND_MEANING, KINDS, ChurnTracker
from hetrain.callbacks.module_memory import AT_LEAST, MIB, ModuleMemory
from hetrain.report import markdown_table

log = logging.getLogger(__name__)

PHASES = ("forward", "backward", "optimizer")
REPORT_MD, REPORT_PNG, REPORT_HTML = "memory_report.md", "memory_report.png", "memory_report.html"
STEPS_CSV = "memory_steps.csv"  # every step's peaks, one row per step, device and phase
STEPS_HEADER = "step,device,phase,allocated_mib,reserved_mib"  # memory_steps.csv's first line
STATIC = ("params", "grads", "optimizer state")
BAR_COLUMNS = ("params MiB", "grads MiB", "saved for backward MiB")  # the per-module bars, stacked
READING = ("GPU: allocated tensor memory, and reserved (what the caching allocator holds: allocated plus its cache) "
           "beside it. CPU: the whole process's resident set (compare it with its value at start). n/a: not "
           "measured (no step with per-module hooks completed).")

Table = tuple[list[str], list[list[Any]]]
# Paragraphs, then titled tables.
ChurnSection = tuple[list[str], list[tuple[str, Table]]]


def churn_section(tracker: ChurnTracker | None, requested: str | None, observed: list[int], min_bytes: int,
                  top: int, dropped: list[int] | None = None, traced: list[int] | None = None) -> ChurnSection | None:
    """The allocator-churn section: what was found on the ``observed`` steps; None when no step was requested.

    ``requested`` says which steps were asked for (``"steps [2, 3]"``); ``dropped`` are churn steps a validation ran
    inside of, which are not counted; ``traced`` are steps churn left to StepTrace's trace."""
    if not requested:
        return None
    note = ([f"Not counted: step{'s' if len(dropped) > 1 else ''} {', '.join(map(str, dropped))}, as a validation "
             "ran inside (val_check_interval inside a gradient-accumulation window): its allocations are not the "
             "step's."] if dropped else [])
    if traced:
        steps = f"step {traced[0]}" if len(traced) == 1 else f"steps {min(traced)}..{max(traced)}"
        note.append(f"Not profiled: {steps}, traced by StepTrace (two torch profilers cannot record at once).")
    if not observed or tracker is None:
        # A step dropped did complete: what failed is that no step ran without a validation inside. A step traced
        # was left to the trace: none was left to churn.
        why = ("no churn step completed without a validation inside it" if dropped else
               "every churn step the fit reached was traced by StepTrace" if traced else "no churn step completed")
        return [f"Not measured ({requested} asked for): {why}.", *note], []
    totals = tracker.totals()
    paragraphs = [
        *note,
        f"Steps {', '.join(map(str, observed))}: allocations of at least {min_bytes} bytes made and freed in every "
        "one of them, by the module they were made in (in the backward: the module whose forward created the "
        "autograd node; after the backward: the optimizer's step), most bytes per step first.",
        "Per step: " + ", ".join(f"{kind} {totals[kind] / MIB:.3f} MiB" for kind in KINDS) + ".",
    ]
    tables = [("What each kind means", (["kind", "meaning"], [list(item) for item in KIND_MEANING.items()])),
              (f"Temporaries to remove (top {top})", tracker.table(["temporary"], top)),
              (f"Op workspace and the expected kinds (top {top})",
               tracker.table(["op workspace", "kept for backward", "passed on", "recomputed"], top))]
    return paragraphs, tables


def _bar_mib(cell: Any) -> float:
    """A per-module table's cell as a bar's length: a lower bound (``≥ 0.5``) as its figure, not measured as none."""
    if isinstance(cell, str) and cell.startswith(AT_LEAST):
        return float(cell.removeprefix(AT_LEAST))
    return cell if isinstance(cell, int | float) else 0


def _html_table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def steps_rows(step: dict[str, Any]) -> str:
    """One step's rows of the steps file, each ending in a newline: per phase and device its peaks in MiB."""
    rows = []
    for phase in PHASES:
        for device, peaks in sorted(step[phase].items()):
            reserved = f"{peaks['reserved'] / MIB:.3f}" if "reserved" in peaks else ""
            rows.append(f"{step['step']},{device},{phase},{peaks['allocated'] / MIB:.3f},{reserved}\n")
    return "".join(rows)


@dataclass
class MemoryReport:
    """A fit's memory, per device and phase, per module and in allocator churn, rendered for a person.

    Args:
        steps: one entry per optimizer step (a fit past ``MAX_STEP_POINTS`` steps: per run of steps, their maxima):
            ``{"step": n, phase: {device: {"allocated": peak bytes, ...}}}``.
        static: parameters, gradients and optimizer state: ``{kind: {device: bytes}}``.
        at_start: bytes in use per device when training started.
        modules: the per-module records, if any step was measured.
        churn: the allocator-churn section (:func:`churn_section`), if churn was requested.
        ended_early: what ended the fit before its end (an error), said first; None when the fit ended.
        steps_file: the file every step's peaks go to, which the report names.
        earlier_rows: rows of ``memory_steps.csv`` the run's earlier parts wrote, before the step a fit resumed into
            the run's own directory began at: the file goes on with this part's, so it holds the whole run's steps.
        earlier_report: the file the earlier part's report was moved to (``memory_report-part<k>.md``), which the
            report names; None where none was moved.
    """

    steps: list[dict[str, Any]]
    static: dict[str, dict[str, int]] = field(default_factory=dict)
    at_start: dict[str, int] = field(default_factory=dict)
    modules: ModuleMemory | None = None
    churn: ChurnSection | None = None
    ended_early: str | None = None
    steps_file: str = STEPS_CSV
    earlier_rows: list[str] = field(default_factory=list)
    earlier_report: str | None = None

    def _devices(self) -> list[str]:
        return sorted({d for s in self.steps for p in PHASES for d in s[p]})

    def _module_sections(self) -> list[tuple[Table, str]]:
        """The per-module table and its notes about compiled and fused modules, when a step was measured."""
        if self.modules is None or not self.modules.records:
            return []
        notes = (self.modules.saved_note(), self.modules.compiled_note(), self.modules.fused_note())
        return [(self.modules.table(), " ".join(note for note in notes if note))]

    def _reserved(self, device: str) -> int | None:
        """The largest reserved peak of ``device`` over all steps; None where it has none (the CPU)."""
        values = [s[p][device]["reserved"] for s in self.steps for p in PHASES if "reserved" in s[p].get(device, {})]
        return max(values) if values else None

    def device_table(self) -> Table:
        """Peak MiB per device and phase over all steps (and the reserved peak where a GPU ran), with parameters,
        gradients and optimizer state (n/a when not measured)."""
        devices = self._devices()
        reserved = {d: self._reserved(d) for d in devices}
        with_reserved = any(v is not None for v in reserved.values())
        header = ["device", "at start MiB", *(f"peak {p} MiB" for p in PHASES),
                  *(["peak reserved MiB"] if with_reserved else []), *(f"{k} MiB" for k in STATIC)]
        rows = []
        for device in devices:
            peaks = [max((s[p].get(device, {}).get("allocated", 0) for s in self.steps), default=0) for p in PHASES]
            if with_reserved:
                peaks.append(reserved[device])
            held = [self.static[k].get(device, 0) if k in self.static else None for k in STATIC]
            rows.append([device, *("n/a" if v is None else round(v / MIB, 3)
                                   for v in [self.at_start.get(device, 0), *peaks, *held])])
        return header, rows

    def steps_csv(self) -> str:
        """Every step's peaks: ``step,device,phase,allocated_mib,reserved_mib`` (reserved empty on the CPU), the
        earlier parts' rows first."""
        return "".join([f"{STEPS_HEADER}\n", *(f"{row}\n" for row in self.earlier_rows), *map(steps_rows, self.steps)])

    def write_steps_csv(self, path: Path) -> None:
        """Writes :meth:`steps_csv` to ``path``."""
        path.write_text(self.steps_csv())

    def _holds_earlier_steps(self) -> bool:
        """Whether the steps file holds rows of the run's earlier parts before this report's."""
        return bool(self.earlier_rows)

    def _rows_missing(self) -> str | None:
        """Why the steps file lacks some of the steps' rows; None where it holds them all."""
        return None

    def _earlier_steps_note(self) -> str:
        """Where the steps file holds the earlier parts' steps too: from which step this report's are."""
        if not self._holds_earlier_steps() or not self.steps:
            return ""
        where = f", reported in {self.earlier_report}" if self.earlier_report else ""
        return f" (steps before {self.steps[0]['step']} are the run's earlier parts'{where})"

    def _plot_title(self) -> str:
        return "Each step's peak memory (CPU: process resident set)"

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
        out: list[tuple[str, Any]] = [("p", self.ended_early)] if self.ended_early else []
        if not self.steps:
            return [*out, ("p", "No training step completed: there is nothing to report.")]
        missing = self._rows_missing()
        out += [("h2", "Peak per device and phase"), ("p", READING), ("table", self.device_table()),
                ("p", f"Every step's peaks: {self.steps_file}{self._earlier_steps_note()}."
                      + (f" It is incomplete: {missing}." if missing else ""))]
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

    def html(self, png: bytes | None, no_plot: str = "") -> str:
        """The page: everything :meth:`markdown` says, and the plot embedded so the file stands alone (``no_plot``
        in its place when there is none)."""
        render = {"h2": lambda t: f"<h2>{html.escape(t)}</h2>", "h3": lambda t: f"<h3>{html.escape(t)}</h3>",
                  "p": lambda t: f"<p>{html.escape(t)}</p>", "table": lambda t: _html_table(*t)}
        body = "".join(render[kind](value) for kind, value in self.blocks())
        plot = (f"<p>{html.escape(no_plot)}</p>" if png is None
                else f"<img alt='memory plot' src='data:image/png;base64,{base64.b64encode(png).decode()}'>")
        return (
            "<!doctype html><html><head><meta charset='utf-8'><title>Memory report</title><style>"
            "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}td:first-child{text-align:left}</style>"
            f"</head><body><h1>Memory</h1>{body}<h2>Plot</h2>{plot}</body></html>"
        )

    def plot_png(self) -> bytes:
        """Peak memory over steps per device and phase, and per-module bars; PNG bytes."""
        # A Figure on its own Agg canvas, not pyplot: choosing pyplot's backend would switch the caller's (a
        # notebook's, a GUI's) for the whole process.
        import matplotlib
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator

        sections = self._module_sections()
        header, rows = sections[0][0] if sections else (list(BAR_COLUMNS), [])
        bars = [[r[0], *(_bar_mib(r[header.index(c)]) for c in BAR_COLUMNS)] for r in rows if r[0] != "total"]
        bars = sorted((r for r in bars if any(r[1:])), key=lambda r: -sum(r[1:]))[:25]  # kept by what they show
        # Module names are text, not markup: a ModuleDict key such as "a$\b$" is no TeX (its mathtext error failed the
        # fit). Set for the texts savefig makes too, and restored after.
        with matplotlib.rc_context({"text.parse_math": False, "text.usetex": False}):
            fig = Figure(figsize=(10, 4 + 0.3 * len(bars)))
            FigureCanvasAgg(fig)  # attaches itself: savefig renders with Agg
            top, bottom = fig.subplots(2, 1, gridspec_kw={"height_ratios": [3, max(2, 0.3 * len(bars))]})
            xs = [s["step"] for s in self.steps]
            for device in self._devices():
                for phase in PHASES:
                    ys = [s[phase].get(device, {}).get("allocated", 0) / MIB for s in self.steps]
                    top.plot(xs, ys, marker=".", label=f"{device} {phase}")
                if self._reserved(device) is not None:
                    ys = [max(s[p].get(device, {}).get("reserved", 0) for p in PHASES) / MIB for s in self.steps]
                    top.plot(xs, ys, linestyle="--", label=f"{device} reserved")
            top.set(xlabel="step", ylabel="peak MiB", title=self._plot_title())
            top.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps, never 0.5
            if top.lines:
                top.legend(fontsize="small")
            else:
                top.text(0.5, 0.5, "no training step completed", ha="center", va="center", transform=top.transAxes)
            names = [r[0] for r in bars][::-1]
            left = [0.0] * len(names)
            for i, column in enumerate(BAR_COLUMNS, start=1):
                values = [r[i] for r in bars][::-1]
                bottom.barh(names, values, left=left, label=column.removesuffix(" MiB"))
                left = [a + b for a, b in zip(left, values, strict=True)]
            bottom.set(xlabel="MiB", title="Per module")
            if names:
                bottom.legend(fontsize="small")
            fig.tight_layout()
            buffer = io.BytesIO()
            fig.savefig(buffer, format="png", dpi=90)
        return buffer.getvalue()

    def write(self, directory: str | Path) -> dict[str, Path]:
        """Writes ``memory_report.md``, ``.png``, ``.html`` (the page embeds the plot) and ``memory_steps.csv``;
        returns the paths. A plot that cannot be drawn is logged as a warning, and the rest is written without it."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        paths = {"md": directory / REPORT_MD, "png": directory / REPORT_PNG, "html": directory / REPORT_HTML,
                 "csv": directory / self.steps_file}
        paths["md"].write_text(self.markdown(), encoding="utf-8")  # "≥", module names: whatever the locale
        self.write_steps_csv(paths["csv"])
        png, no_plot = None, ""
        try:
            png = self.plot_png()
        except Exception as failure:  # noqa: BLE001 - the tables are written; a plot must not fail a finished fit
            no_plot = f"No plot: drawing it failed with {failure!r}."
            log.warning(f"hetrain: the memory report's plot {paths['png']} could not be drawn ({failure!r}); the "
                        f"tables are in {paths['md']} and {paths['html']}")
            paths.pop("png").unlink(missing_ok=True)  # an earlier run's plot is not this one's
        else:
            paths["png"].write_bytes(png)
        paths["html"].write_text(self.html(png, no_plot), encoding="utf-8")  # as its meta charset says
        return paths
