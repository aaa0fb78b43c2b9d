"""What MemoryProfiler costs on the steps it only watches: a small BERT classifier's Lightning step, with and without.

Run: ``python -m benchmarks.bench_memory_overhead [--quick] [--device cpu|cuda|cuda:N] [--out DIR]``. Fits a
BertClassifier in which ``MemoryProfiler()`` (its defaults; no allocator history) sees every other step and
every step it instruments (per-module and churn steps), times every step from one ``on_train_batch_start`` to
the next, and compares the median of the watched steps with that of the unwatched ones, after warm-up and
leaving the instrumented steps out. It also times the profiler's own hooks: the overhead without the noise of
two medians. Target: under 3% of the step time. Writes ``benchmarks/results/<date>-memory-overhead-<device>.json``
(``--quick``: ``-quick.json``; ``.partial.json`` until the run completes).
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import Callback
from torch.utils.data import DataLoader, TensorDataset

import hetrain
from benchmarks.bench_train import Shape, build_model, make_batch, measured_on
from benchmarks.cli import (
    check_backend_settings,
    check_device,
    make_current,
    out_dir,
    positive_int,
    result_file,
    save_complete,
    save_partial,
)
from hetrain.callbacks.memory import MemoryProfiler
from hetrain.device_info import result_card

RESULTS = Path(__file__).parent / "results"
TARGET = 0.03
FULL = Shape(vocab_size=30522, hidden=256, layers=4, heads=4, seq=128, batch=32)
QUICK = Shape(vocab_size=256, hidden=64, layers=2, heads=4, seq=32, batch=8)  # the smaller the step, the larger
# the profiler's fixed per-step cost looks: a conservative check
HOOKS = ("on_train_batch_start", "on_before_backward", "on_after_backward", "on_before_optimizer_step",
         "on_train_batch_end")


class Classifier(pl.LightningModule):
    """BertClassifier under a plain cross-entropy step and AdamW."""

    def __init__(self, shape: Shape) -> None:
        super().__init__()
        self.model = build_model(shape, fused=True)

    def training_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> torch.Tensor:
        ids, mask, labels = batch
        return F.cross_entropy(self.model(ids, mask), labels)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-4)


class StepClock(Callback):
    """Wall time from one step's ``on_train_batch_start`` to the next: every hook and the step in between."""

    def __init__(self, sync: Callable[[], None]) -> None:
        self.sync = sync
        self.starts: list[float] = []

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        self.sync()
        self.starts.append(time.perf_counter())

    def intervals_ms(self) -> list[float]:
        return [(b - a) * 1e3 for a, b in zip(self.starts, self.starts[1:], strict=False)]


class TimedMemoryProfiler(MemoryProfiler):
    """MemoryProfiler whose per-step hooks add up their own wall time, per global step."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.hook_s: dict[int, float] = {}  # per global step
        self.per_hook_s: dict[str, list[tuple[int, float]]] = {name: [] for name in HOOKS}  # (global step, s)
        for name in HOOKS:
            setattr(self, name, self._timed(getattr(self, name)))

    def _timed(self, hook: Callable[..., None]) -> Callable[..., None]:
        def timed(trainer: pl.Trainer, *args: Any) -> None:
            step = trainer.global_step
            start = time.perf_counter()
            hook(trainer, *args)
            # A step's last hook runs after the optimizer step has moved global_step on.
            key = step if hook.__name__ != "on_train_batch_end" else step - 1
            spent = time.perf_counter() - start
            self.hook_s[key] = self.hook_s.get(key, 0.0) + spent
            self.per_hook_s[hook.__name__].append((key, spent))
        return timed


class EveryOtherStep(Callback):
    """Lets ``profiler`` see odd steps, and the steps it instruments (per-module, churn), each with all of its hooks:
    neighbouring steps, one watched and one not, share the machine's load.

    On a machine shared with other work, two separate fits differ by more than 3% for no reason of
    their own; adjacent steps of one fit do not. Fit-level hooks always reach the profiler. An instrumented step
    is let through whatever its parity: the profiler places a churn step at the end of the step before it, the
    next step, which would otherwise be an unwatched even one every time and never be profiled.
    """

    def __init__(self, profiler: MemoryProfiler) -> None:
        self.profiler = profiler
        self.on = False
        for name in HOOKS[1:]:
            setattr(self, name, self._gated(name))

    def _gated(self, name: str) -> Callable[..., None]:
        def hook(*args: Any) -> None:
            if self.on:
                getattr(self.profiler, name)(*args)
        return hook

    def on_train_start(self, *args: Any) -> None:
        self.profiler.on_train_start(*args)

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        step = trainer.global_step
        self.on = step % 2 == 1 or self.profiler.instruments_step(step)
        if self.on:
            self.profiler.on_train_batch_start(trainer, *args)


def fit(shape: Shape, device: str, steps: int, profiler: MemoryProfiler) -> list[float]:
    """Step times in ms of one fit in which ``profiler`` watches the odd steps and those it instruments."""
    kind = torch.device(device)
    sync = torch.cuda.synchronize if kind.type == "cuda" else (lambda: None)
    clock = StepClock(sync)
    # One epoch covers the fit: an epoch's end would land in every fourth step, all odd or all even.
    batches = [make_batch(shape, "cpu", seed % 4) for seed in range(steps + 1)]
    data = TensorDataset(*(torch.cat(parts) for parts in zip(*batches, strict=True)))
    with tempfile.TemporaryDirectory() as tmp:
        pl.seed_everything(0, verbose=False)
        trainer = pl.Trainer(accelerator=kind.type, devices=1 if kind.index is None else [kind.index],
                             max_steps=steps, logger=False, default_root_dir=tmp, enable_progress_bar=False,
                             enable_checkpointing=False, enable_model_summary=False, limit_val_batches=0,
                             callbacks=[clock, EveryOtherStep(profiler)])
        trainer.fit(Classifier(shape), DataLoader(data, batch_size=shape.batch, shuffle=True))
    return clock.intervals_ms()


def ordinary(profiler: MemoryProfiler, step: int) -> bool:
    """A step the profiler does not instrument (module hooks, churn, history): it only watches, or is unwatched."""
    return not profiler.instruments_step(step)


def run(device: str, quick: bool, save: Callable[[dict], None] = lambda result: None) -> dict:
    """The medians and hook times over every fit round; ``save`` gets them after each round, from the rounds
    done so far, so a run stopped at a time limit keeps what it measured."""
    shape, rounds, steps, warmup = (QUICK, 3, 80, 6) if quick else (FULL, 3, 200, 10)
    off: list[float] = []
    on: list[float] = []
    paired: list[float] = []  # a watched step over the mean of its two unwatched neighbours: slow drifts cancel
    hooks: list[float] = []
    per_hook: dict[str, list[float]] = {name: [] for name in HOOKS}
    for done in range(1, rounds + 1):
        profiler = TimedMemoryProfiler()
        times = fit(shape, device, steps, profiler)
        plain = [s for s in range(warmup, len(times)) if ordinary(profiler, s)]  # instrumented steps left out
        off += [times[s] for s in plain if s % 2 == 0]
        kept = {s for s in plain if s % 2 == 1}
        on += [times[s] for s in sorted(kept)]
        paired += [2 * times[s] / (times[s - 1] + times[s + 1]) for s in sorted(kept)
                   if s + 1 < len(times) and ordinary(profiler, s - 1) and ordinary(profiler, s + 1)]
        hooks += [profiler.hook_s[s] * 1e3 for s in sorted(kept)]
        for name, spent in profiler.per_hook_s.items():
            per_hook[name] += [t * 1e3 for step, t in spent if step in kept]
        # Hooks: the mean, so that a slow call counts in full (the target is judged on it).
        off_ms, on_ms, hook_ms = statistics.median(off), statistics.median(on), statistics.mean(hooks)
        result = {
            "date": dt.date.today().isoformat(), "device": measured_on(device), "device_type": device,
            "torch": torch.__version__, "threads": torch.get_num_threads(), "lightning": pl.__version__,
            "hetrain": hetrain.__version__, "quick": quick,
            "shape": asdict(shape), "rounds": done, "rounds_planned": rounds, "steps_per_fit": steps,
            "warmup_steps": warmup,
            "profiler": {"module_every_n_steps": profiler.module_every_n_steps,
                         "churn_steps": profiler.churn_steps, "churn_observed": profiler.churn_observed,
                         "record_history": profiler.record_history},
            "timed_steps": {"off": len(off), "on": len(on)},
            "median_step_ms": {"off": off_ms, "on": on_ms},
            "step_time_ratio": on_ms / off_ms,
            "paired_step_time_ratio": statistics.median(paired),
            "profiler_hooks_ms_per_step": hook_ms,
            "profiler_hooks_median_ms_per_step": statistics.median(hooks),
            "profiler_hooks_share": hook_ms / off_ms,
            "median_ms_per_hook": {name: statistics.median(times) for name, times in per_hook.items()},
            "target": TARGET,
            "target_met": hook_ms / off_ms < TARGET,
        }
        save(result)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small model, few steps (under two minutes on 2 cores)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu, cuda or cuda:N (that GPU)")
    parser.add_argument("--out", type=out_dir, default=str(RESULTS), help="results directory")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="torch threads (default: torch's); 1 keeps step times steady on a shared machine")
    args = parser.parse_args()
    device = check_device(parser, args.device)
    check_backend_settings(parser, device)
    make_current(device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()

    def path_of(result: dict) -> Path:
        return result_file(args.out, result["date"], "memory-overhead", result_card(device),
                           "quick" if args.quick else None)

    def save(result: dict) -> None:  # after every fit round, as <name>.partial.json: a run cut short keeps its rounds
        save_partial(path_of(result), result)

    r = run(device, args.quick, save)
    path = path_of(r)
    save_complete(path, r)
    print(f"{r['device']}, torch {r['torch']}, shape {r['shape']}, {r['timed_steps']} ordinary steps timed")
    print(f"| profiler | median step ms | vs off | paired vs neighbours |\n|---|---|---|---|\n"
          f"| off | {r['median_step_ms']['off']:.2f} | 1.000 | 1.000 |\n"
          f"| on | {r['median_step_ms']['on']:.2f} | {r['step_time_ratio']:.3f} | {r['paired_step_time_ratio']:.3f} |")
    print(f"profiler hooks: {r['profiler_hooks_ms_per_step']:.3f} ms per step = "
          f"{100 * r['profiler_hooks_share']:.2f}% of the step (target < {100 * TARGET:.0f}%: "
          f"{'met' if r['target_met'] else 'NOT met'}); {time.perf_counter() - start:.0f} s; wrote {path}")
    print("median ms per hook: " + ", ".join(f"{k} {v:.3f}" for k, v in r["median_ms_per_hook"].items()))


if __name__ == "__main__":
    main()
