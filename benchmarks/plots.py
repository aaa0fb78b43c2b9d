"""Charts of recorded benchmark JSON: hetrain's speedup over each baseline per case, for RESULTS.md.

A table of 14 rows by 8 columns answers "is any op slower than its baseline?" slowly; bars on a log axis
with lines at parity and at the 2x target answer it at a glance.
"""

from __future__ import annotations

from pathlib import Path

TARGET = 2.0  # the speedup over eager the fused ops aim at


def speedups(result: dict, times: str = "ms") -> tuple[list[str], dict[str, list[float | None]]]:
    """Case labels and, per baseline, baseline time / hetrain time from ``result["rows"][i][times]``
    (None where the case lacks either time)."""
    labels, series = [], {}
    baselines = [name for row in result["rows"] for name in row.get(times, {})
                 if name not in ("hetrain", "hetrain_cuda", "conv")]
    for name in dict.fromkeys(baselines):
        series[name] = []
    for row in result["rows"]:
        labels.append(f"{row['op']} {row['shape']} {row['dtype']}")
        measured = row.get(times, {})
        ours = measured.get("hetrain")
        for name, values in series.items():
            theirs = measured.get(name)
            ok = isinstance(theirs, float) and isinstance(ours, float) and ours > 0 and theirs > 0
            values.append(theirs / ours if ok else None)
    return labels, series


def speedup_chart(result: dict, path: Path, title: str, panels: dict[str, str] | None = None) -> Path | None:
    """Writes a PNG of hetrain's speedup over each baseline, one panel per entry of ``panels``
    (``{"ms": "per call"}`` by default: the key in each row, the panel's title). None when nothing was measured."""
    import matplotlib

    matplotlib.use("Agg")  # no display: render to a file
    import matplotlib.pyplot as plt

    panels = panels or {"ms": "per call"}
    data = {key: speedups(result, key) for key in panels}
    data = {key: value for key, value in data.items() if any(v for s in value[1].values() for v in s if v)}
    if not data:
        return None
    labels = next(iter(data.values()))[0]
    height = 0.8
    fig, axes = plt.subplots(1, len(data), figsize=(3.5 + 5 * len(data), 1.4 + 0.42 * len(labels)), sharey=True,
                             squeeze=False)
    for ax, (key, (_, series)) in zip(axes[0], data.items(), strict=True):
        width = height / max(1, len(series))
        every = [v for values in series.values() for v in values if v]
        for i, (name, values) in enumerate(series.items()):
            ys = [j - height / 2 + (i + 0.5) * width for j in range(len(labels))]
            bars = ax.barh(ys, [v or 0 for v in values], height=width, label=f"vs {name}")
            for bar, value in zip(bars, values, strict=True):
                if value:
                    ax.text(value, bar.get_y() + bar.get_height() / 2, f" {value:.2f}x", va="center", fontsize=7)
        ax.set_xscale("log")
        low, high = min(every + [0.5]), max(every + [TARGET])
        ax.set_xlim(low / 1.5, high * 2.2)
        ax.axvline(1.0, color="black", linewidth=1)
        ax.axvline(TARGET, color="gray", linestyle="--", linewidth=1)
        ax.set_title(f"{title}: {panels[key]}", fontsize=10)
        ax.set_xlabel("baseline time / hetrain time (> 1x: hetrain faster; dashed: 2x)", fontsize=8)
        ax.legend(fontsize=8, loc="best")
        ax.grid(axis="x", which="both", alpha=0.3)
        ax.xaxis.set_major_locator(matplotlib.ticker.FixedLocator([2.0**k for k in range(-6, 7)]))
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}x"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    axes[0][0].set_yticks(range(len(labels)), labels, fontsize=8)
    axes[0][0].invert_yaxis()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

