"""Summaries a person reads after a run or a sweep.

A run writes ``summary.json`` and ``summary.md`` into its run directory: steps, samples/s, peak
memory (resident set of the process; allocated memory of each GPU), validation metrics and the
device of each stage. A sweep writes ``summary.csv`` and ``summary.md`` into its multirun
directory: one row per job of that sweep (not of an earlier sweep into the same directory), failed jobs
with their error (type and first line of the message) and log file, and, when a signal or a failure under DDP
stopped the sweep, the jobs it never started; when the sweep varies ``seed``, the
Markdown adds each metric's mean and standard deviation over seeds for each combination of the other
overrides, failed combinations included.
"""

from __future__ import annotations

import csv
import fcntl
import json
import logging
import math
import os
import shutil
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback as HydraCallback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict, read_write
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.loggers.csv_logs import ExperimentWriter
from pytorch_lightning.loggers.logger import rank_zero_experiment
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities.rank_zero import rank_zero_only
from typing_extensions import override

from hetrain.memory_counters import erased_peak, forget_erased_peak, peak_rss_bytes, reset_peak_rss
from hetrain.placement.plan import held_device

log = logging.getLogger(__name__)

SUMMARY_JSON = "summary.json"
SUMMARY_MD = "summary.md"
SWEEP_CSV = "summary.csv"
# In a sweep directory: the id of the sweep that last started there; in a job directory: its sweep's id.
SWEEP_ID = ".hetrain_sweep_id"
# In a job directory an earlier sweep left: a copy of its config folder (.hydra/), taken when a new sweep began there.
EARLIER_CONFIG = ".hetrain_earlier_config"
# In a single run's directory: locked (flock) by the run using it, and holding its pid.
RUN_LOCK = ".hetrain_run.lock"
# A summary's device for a stage that holds no parameter or buffer (an activation): it runs where its input is.
WITH_ITS_INPUT = "with its input"


def _gpus(pl_module: pl.LightningModule) -> list[torch.device]:
    """The GPUs the stages live on; the others are left alone (touching one would create a context). A stage that
    holds no tensor (an activation) runs on a GPU another stage lives on, so it adds none."""
    devices = {held_device(stage) for stage in pl_module.stages().values()}
    return sorted((d for d in devices if d is not None and d.type == "cuda"), key=lambda d: d.index or 0)


def peak_memory_mib(gpus: list[torch.device]) -> dict[str, float]:
    """Peak resident memory of this process (``cpu_rss``) and peak allocated memory of each GPU, in MiB, since
    :class:`RunRecorder` reset them when training started (since the process started where Linux cannot reset
    the resident peak). Both include what the memory profiler read before its per-phase resets erased the
    counters."""
    peaks = {"cpu_rss": max(peak_rss_bytes(), erased_peak("cpu")) / 2**20}
    for gpu in gpus:
        peaks[str(gpu)] = max(torch.cuda.max_memory_allocated(gpu), erased_peak(str(gpu))) / 2**20
    return peaks


def _device_name(device: torch.device | None) -> str:
    return WITH_ITS_INPUT if device is None else str(device)


class RunRecorder(Callback):
    """Measures training throughput and makes the run end with a validation of the final weights.

    Notes:
        Samples/s counts training batches over training wall time, validation excluded; ``samples`` (of
        every rank) and the time are this run's, ``steps`` the global step (a resumed run's includes the
        steps before). Validation inside fit is left out from its start to the next training batch (or the
        end of training): ``ModelCheckpoint`` saves after every callback's ``on_validation_end``, and a
        save is not training either; of that stretch only the training loader's fetch counts, where the
        loader times it (``wait_seconds``). When ``max_steps`` ends training mid-epoch Lightning would skip
        validation; stopping through ``trainer.should_stop`` at the last step makes it validate first, so
        the summary's metrics belong to the weights the run ends with. Not so at an epoch's last batch (where
        ``max_epochs`` ends a fit): a fit resumed from the checkpoint saved at a validation forced there would not
        see that the epoch had ended and train one batch past it, so there Lightning's own schedule stands: where
        its last validation came before the last step, the summary says so (``metrics_at_step``) and a warning
        says how to validate the final weights.

    Args:
        clock: returns seconds; for tests.
    """

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self.clock = clock
        self.samples = 0
        self.train_time_s = 0.0
        self.start_step = 0  # the global step training started at: past 0 when resumed from a checkpoint
        self.resumed_from: str | None = None
        self.stages: dict[str, str] = {}
        self.gpus: list[torch.device] = []
        self._started = 0.0
        self.validated_at_step: int | None = None  # the global step of this fit's last validation
        self._paused_at: float | None = None  # when a validation inside fit began; None while training
        self._wait_at_pause: float | None = None  # the training loader's wait_seconds then
        self._paused_s = 0.0
        self.closed = False  # this fit's measurements were closed (on_train_end ran to its end)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.validated_at_step, self.closed = None, False
        self.gpus = _gpus(pl_module)
        self.start_step = trainer.global_step
        self.resumed_from = str(trainer.ckpt_path) if trainer.ckpt_path else None
        # This run's peaks, not an earlier run's in this process (a sweep's jobs).
        reset_peak_rss()
        forget_erased_peak("cpu")
        for gpu in self.gpus:
            torch.cuda.reset_peak_memory_stats(gpu)
            forget_erased_peak(str(gpu))
        self._sync()
        self._started = self.clock()

    def _sync(self) -> None:
        # GPU work is asynchronous: wait for it so the clock measures the work, not its launch.
        for gpu in self.gpus:
            torch.cuda.synchronize(gpu)

    def _resume(self, trainer: pl.Trainer) -> None:
        """Training goes on: the pause since the validation began is left out, but for the loader's fetch."""
        if self._paused_at is None:
            return
        self._sync()
        waited = loader_wait_seconds(trainer)
        fetched = waited - self._wait_at_pause if waited is not None and self._wait_at_pause is not None else 0.0
        self._paused_s += max(0.0, self.clock() - self._paused_at - max(fetched, 0.0))
        self._paused_at = None

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._resume(trainer)

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.samples += len(batch["labels"])
        # Mid-epoch only: see the class's docstring on an epoch's last batch.
        if 0 < trainer.max_steps <= trainer.global_step and batch_idx + 1 < trainer.num_training_batches:
            trainer.should_stop = True

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if _validating_inside_fit(trainer) and self._paused_at is None:
            self._sync()
            self._paused_at = self.clock()
            self._wait_at_pause = loader_wait_seconds(trainer)

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if _validating_inside_fit(trainer):
            self.validated_at_step = trainer.global_step

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # A signal's stop (GracefulStop saved a checkpoint of this step) is not a run that ended on its own. By the
        # attribute: hetrain.callbacks imports this module.
        stopped = any(getattr(c, "stopped_by_signal", False) for c in trainer.callbacks)
        if self.validated_at_step is not None and self.validated_at_step < trainer.global_step and not stopped:
            log.warning(f"hetrain: the run ended at step {trainer.global_step}, after its last validation: its "
                        f"validation metrics and last checkpoint are of step {self.validated_at_step}. A final "
                        "validation is added only where the run ends mid-epoch in an epoch that validates "
                        "(trainer.check_val_every_n_epoch); to have the final weights validated and saved, end the "
                        "run on a batch that validates (trainer.val_check_interval dividing an epoch's batches and "
                        "trainer.max_steps)")
        self._resume(trainer)  # a validation that ended training: paused up to here
        self._sync()
        self.train_time_s = self.clock() - self._started - self._paused_s
        if trainer.world_size > 1:  # each rank counted its own share; the run's summary counts them all
            mine = torch.tensor(self.samples, device=trainer.strategy.root_device)
            self.samples = int(trainer.strategy.reduce(mine, reduce_op="sum").item())
        # Read now: Lightning's teardown moves the whole module back to the CPU.
        self.stages = {name: _device_name(held_device(s)) for name, s in pl_module.stages().items()}
        self.closed = True

    def summary(self, trainer: pl.Trainer) -> dict[str, Any]:
        """The measured part of a run's summary."""
        out = {
            "steps": trainer.global_step,
            "samples": self.samples,
            "train_time_s": round(self.train_time_s, 3),
            "samples_per_s": round(self.samples / self.train_time_s, 1) if self.train_time_s > 0 else None,
            "peak_memory_mib": {k: round(v, 1) for k, v in peak_memory_mib(self.gpus).items()},
            # Unrounded: a sweep's mean and spread over seeds are computed from these (summary.md rounds for display).
            "metrics": {k: float(v) for k, v in sorted(trainer.callback_metrics.items()) if k.startswith("val/")},
            "stages": self.stages,
        }
        if self.validated_at_step is not None and self.validated_at_step < trainer.global_step:
            out["metrics_at_step"] = self.validated_at_step  # the metrics are not of the final weights
        if self.resumed_from:
            out["resumed"] = {"from": self.resumed_from, "at_step": self.start_step}
        return out


class ResumableCSVLogger(CSVLogger):
    """Lightning's ``CSVLogger`` that keeps the log an earlier part of the run left in its folder.

    With a fixed folder (``version=""``: the run directory is already unique), a run resumed into its own directory
    (``ckpt_path`` there: a requeued sweep job, a run resumed into its ``hydra.run.dir``) writes where the part
    before it wrote, and Lightning's logger deletes the ``metrics.csv`` it finds there. This one first moves that
    part's ``metrics.csv`` and ``hparams.yaml`` to ``<folder>-part<k>/`` beside it, k = 1, 2, ... in the order the
    parts ran: the folder holds this part's log, the earlier parts stay whole. Rank 0 alone writes the log.
    """

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._keep_earlier_part()
        return super().experiment

    def _keep_earlier_part(self) -> None:
        folder = Path(self.log_dir)
        if not (folder / ExperimentWriter.NAME_METRICS_FILE).is_file():
            return
        aside = _next_part(folder)
        aside.mkdir()
        for name in (ExperimentWriter.NAME_METRICS_FILE, ExperimentWriter.NAME_HPARAMS_FILE):
            if (folder / name).is_file():
                os.replace(folder / name, aside / name)
        log.info(f"hetrain: {folder} held the log of an earlier part of this run; moved it to {aside}")


def loader_wait_seconds(trainer: pl.Trainer) -> float | None:
    """Seconds the training loader has spent in its ``next()``, for one loader (not a dict or list of them) that
    times itself (``wait_seconds``); else ``None``."""
    seconds = getattr(trainer.train_dataloader, "wait_seconds", None)
    return float(seconds) if isinstance(seconds, int | float) else None


def _validating_inside_fit(trainer: pl.Trainer) -> bool:
    """Validation time inside fit is not training time (the stage is VALIDATING there, not TRAINING)."""
    return trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking


def _flatten(record: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in record.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.0f}" if abs(value) >= 1000 else f"{value:.4g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_run_summary(summary: dict[str, Any], directory: str | Path) -> str:
    """Writes ``summary.json`` and ``summary.md`` into ``directory``; returns the Markdown."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    _write_whole(directory / SUMMARY_JSON, json.dumps(_json_safe(summary), indent=2, allow_nan=False) + "\n")
    flat = _flatten(summary)
    text = markdown_table(["field", "value"], [[k, v] for k, v in flat.items()])
    if "samples_per_s" in flat and "throughput.samples_per_s" in flat:
        text += ("\n`samples_per_s`: every training batch over the training wall time, warm-up included; "
                 "`throughput.samples_per_s`: the batches timed after warm-up, so the steady rate.\n")
    if "throughput.between_steps_fraction" in flat:
        text += ("\n`throughput.data_wait_*`: time the training loader spent in `next()` fetching batches (n/a for "
                 "a loader that does not time itself); `throughput.between_steps_*`: all time from one optimizer "
                 "step's last batch end to the next step's first batch start, the fetch plus logging and "
                 "callbacks.\n")
    if "throughput.within_steps_fraction" in flat:
        text += ("\n`throughput.within_steps_*` (gradient accumulation): the same gaps between one step's batches, "
                 "which its step time holds.\n")
    if "throughput.energy_j_per_step" in flat:
        text += ("\n`throughput.energy_j_per_step`: energy the GPUs drew (NVML) per timed step, validation left "
                 "out; the CPU's energy is not in it.\n")
    _write_whole(directory / SUMMARY_MD, text)
    return text


# How summary.json writes a nan or infinite number (a diverged loss): JSON has neither, and json.dumps' bare NaN and
# Infinity are refused by strict parsers (JavaScript's, jq). The strings float() reads back, as CostModel.to_dict
# writes them.
_NON_FINITE = ("nan", "inf", "-inf")


def _json_safe(value: Any) -> Any:
    """``value`` with every nan or infinite float, in dicts and lists at any depth, as its string in _NON_FINITE."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(item) for item in value]
    return value


def _read_non_finite(record: dict[str, Any]) -> dict[str, Any]:
    """A summary.json object with the numbers _json_safe wrote as strings read back as floats: a sweep's table shows
    them as numbers (nan), and the mean over seeds takes them in."""
    return {key: float(value) if isinstance(value, str) and value in _NON_FINITE else value
            for key, value in record.items()}


def save_whole(path: Path, save: Callable[[Path], object]) -> None:
    """``save`` writes a temporary file beside ``path`` (with its suffix, which may pick the format), renamed over
    it: a full disk or a failing writer leaves the old file or none, never a cut one (an empty summary.json failed
    the sweep's table), and a reader never sees half a file.

    Each call writes its own temporary file, so writers of one path at once (a sweep's table, rewritten by the
    workers of a parallel launcher) neither move nor delete each other's; the last rename wins, whole. It is
    created with the mode a plain ``open(path, "w")`` gives a new file (0o666 less the umask), not
    ``tempfile.mkstemp``'s 0o600, which would keep the files from others the umask lets read them.
    """
    partial = path.with_name(f".{path.stem}.{uuid.uuid4().hex[:12]}.partial{path.suffix}")
    os.close(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # O_EXCL: a name no other writer has
    try:
        save(partial)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def _write_whole(path: Path, text: str) -> None:
    save_whole(path, lambda partial: partial.write_text(text))


def error_headline(error: str) -> str:
    """``Type: message`` cut to the type and the message's first non-blank line, to fit a table row; a first
    line ending in a colon (torch's ``Error(s) in loading state_dict for X:``) keeps the line it announces.

    The whole message stays in the job's ``summary.json`` and, with its traceback, in the job's log.
    """
    kind, sep, message = error.partition(": ")
    if not sep:
        kind, message = "", error
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    first = " ".join(lines[:2]) if len(lines) > 1 and lines[0].endswith(":") else (lines[0] if lines else "")
    return f"{kind}{sep}{first}"


def _sweep_id(directory: Path) -> str | None:
    """The sweep id :class:`SweepSummary` wrote into ``directory`` (a sweep's or a job's); None without one."""
    path = directory / SWEEP_ID
    return path.read_text().strip() if path.is_file() else None


def collect_jobs(sweep_dir: str | Path, output_subdir: str = ".hydra") -> list[dict[str, Any]]:
    """One flat record per job of the sweep that last started in ``sweep_dir``, ordered by job number.

    Jobs are found by the folder Hydra writes each one's config into (``hydra.output_subdir``, ``.hydra/`` unless
    set otherwise), so a job that died before writing ``summary.json`` is listed too. A directory an earlier sweep
    ran into still holds that sweep's jobs past this one's count: only job directories carrying the sweep
    directory's id count (a sweep directory without one, from a sweep run without :class:`SweepSummary`, lists
    every job). A failed job's error is cut to its headline; its log has the rest.
    """
    sweep_dir = Path(sweep_dir)
    sweep_id = _sweep_id(sweep_dir)
    depth = len(Path(output_subdir).parts)
    job_dirs = [config_dir.parents[depth - 1] for config_dir in sweep_dir.glob(f"**/{output_subdir}")]
    records = [_job_record(d, output_subdir) for d in job_dirs if sweep_id is None or _sweep_id(d) == sweep_id]
    return sorted(records, key=lambda r: r["job"])


def _job_record(job_dir: Path, output_subdir: str) -> dict[str, Any]:
    """A job's flat record: number, overrides and its ``summary.json``, or why there is none."""
    hydra_cfg = OmegaConf.load(job_dir / output_subdir / "hydra.yaml").hydra
    summary_path = job_dir / SUMMARY_JSON
    try:
        summary = json.loads(summary_path.read_text(), object_hook=_read_non_finite)
    except FileNotFoundError:
        summary = {"status": "no summary", "error": f"the job wrote no {SUMMARY_JSON} (killed?)"}
    except (OSError, ValueError) as exc:  # cut or unreadable: the job is listed, the sweep's table still written
        summary = {"status": "no summary", "error": f"its {SUMMARY_JSON} cannot be read ({type(exc).__name__}: {exc})"}
    summary.setdefault("log", str(job_dir / f"{hydra_cfg.job.name}.log"))
    if summary.get("other_ranks"):  # rank 0's own error, if any, says only that another rank ended: theirs say why
        summary["error"] = "another rank failed: " + "; ".join(
            f"{name}: {error_headline(error)}" for name, error in summary["other_ranks"].items())
    elif "error" in summary:
        summary["error"] = error_headline(summary["error"])
    overrides = " ".join(OmegaConf.load(job_dir / output_subdir / "overrides.yaml"))
    return {"job": hydra_cfg.job.num, "overrides": overrides, **_flatten(summary)}


# Columns a sweep table shows first; every other recorded field follows in the CSV only,
# except metrics and memory peaks, which the Markdown shows too.
_LEADING = ["job", "overrides", "status", "steps", "samples_per_s"]
_TRAILING = ["error", "log"]


def write_sweep_summary(records: list[dict[str, Any]], directory: str | Path) -> str:
    """Writes ``summary.csv`` (every field) and ``summary.md`` (the readable ones); returns the Markdown."""
    directory = Path(directory)
    seen = list(dict.fromkeys(k for r in records for k in r))
    middle = [k for k in seen if k not in _LEADING + _TRAILING]
    columns = _LEADING + middle + _TRAILING

    def save_csv(partial: Path) -> None:
        with open(partial, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(records)

    save_whole(directory / SWEEP_CSV, save_csv)  # whole, like summary.md: a reader may be reading the last one
    shown = _LEADING + [k for k in middle if k.startswith(("metrics.", "peak_memory_mib."))] + _TRAILING
    text = markdown_table(shown, [[r.get(k) for k in shown] for r in records])
    over_seeds = seed_table(records)
    if over_seeds is not None:
        intro = "Over seeds (mean ± standard deviation of the finished jobs; (k of n) where only k have the metric):"
        text += f"\n\n{intro}\n\n{markdown_table(*over_seeds)}"
    _write_whole(directory / SUMMARY_MD, text)
    return text


def _is_seed(override: str) -> bool:
    """``seed=1``, ``+seed=1`` or ``++seed=1``; not ``data.seed=1``, which is another setting."""
    return override.lstrip("+").startswith("seed=")


def _without_seed(overrides: str) -> str:
    return " ".join(o for o in overrides.split() if not _is_seed(o))


def seed_table(records: list[dict[str, Any]]) -> tuple[list[str], list[list[Any]]] | None:
    """When a sweep varies ``seed``: per combination of the other overrides, each metric's mean ± std over seeds.

    None when the jobs do not set at least two seeds. ``seeds`` counts the finished ones; a metric that only k of
    them have shows ``(k of n)``, so the count beside a mean is that of the values it averages. A combination
    whose seeds all failed keeps its row (0 seeds), so it does not vanish from the comparison. When jobs have no
    results (failed, interrupted, not started in a sweep a signal stopped, or finished without validating or
    without a metric the other seeds have), a column names them: their rows in the job table say why, or the
    column does. When finished jobs validated last before their final step, a column names them with that step:
    their metrics are not of the final weights the others' are of.
    """
    seeds = {o.lstrip("+") for r in records for o in str(r.get("overrides", "")).split() if _is_seed(o)}
    if len(seeds) < 2:
        return None
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault(_without_seed(str(r.get("overrides", ""))), []).append(r)
    metrics = sorted({k for r in records for k in r if k.startswith("metrics.")})
    rows, without_results, earlier = [], [], []
    for overrides, jobs in groups.items():
        finished = [j for j in jobs if j.get("status") == "ok"]
        row: list[Any] = [overrides, len(finished)]
        for m in metrics:
            values = [float(j[m]) for j in finished if _has(j, m)]
            cell = _mean_and_spread(values)
            row.append(cell if len(values) in (0, len(finished)) else f"{cell} ({len(values)} of {len(finished)})")
        rows.append(row)
        without_results.append(_without_results(jobs, metrics))
        earlier.append(", ".join(
            f"{j['job']} (step {j['metrics_at_step']}" + (f" of {j['steps']})" if "steps" in j else ")")
            for j in finished if j.get("metrics_at_step") is not None))
    header = ["overrides (seed aside)", "seeds", *metrics]
    for name, column in [("jobs without results", without_results), ("metrics from an earlier step", earlier)]:
        if any(column):
            header.append(name)
            for row, value in zip(rows, column, strict=True):
                row.append(value)
    return header, rows


def _has(job: dict[str, Any], metric: str) -> bool:
    return isinstance(job.get(metric), int | float)


def _without_results(jobs: list[dict[str, Any]], metrics: list[str]) -> str:
    """The jobs of a combination left out of its means: those that did not finish (their rows say why), and those
    that finished with none of the table's metrics, or without one another seed of theirs has (said here)."""
    in_group = [m for m in metrics if any(_has(j, m) for j in jobs if j.get("status") == "ok")]
    named = []
    for job in jobs:
        missing = [m.removeprefix("metrics.") for m in in_group if not _has(job, m)]
        if job.get("status") != "ok":
            named.append(str(job["job"]))
        elif not any(_has(job, m) for m in metrics):
            named.append(f"{job['job']} ({'no validation' if job.get('no_validation') else 'no metrics'})")
        elif missing:
            named.append(f"{job['job']} (no {', '.join(missing)})")
    return ", ".join(named)


def _mean_and_spread(values: list[float]) -> str | None:
    """``mean ± std`` (the sample standard deviation, n - 1); None (an empty cell) without values.

    One value gives no spread: n/a, where 0 would claim the seeds agree.
    """
    if not values:
        return None
    mean = sum(values) / len(values)
    if len(values) == 1:
        return f"{mean:.4g} ± n/a"
    std = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5
    return f"{mean:.4g} ± {std:.2g}"


def write_stopped_sweep(hydra: DictConfig, reason: str | None = None) -> str:
    """Writes and prints the table of a sweep that a signal (SIGTERM, Ctrl-C) ends inside job ``hydra.job.num``,
    or ``reason`` when no signal does (a failure under DDP); returns the Markdown.

    The process ends with the job: Hydra calls no callback on the way out, so without this the job's row, which
    says where to go on from, was missing. The jobs the sweep had not reached get rows ``not started``, with
    ``reason`` as their error when given; their directories, which kept their config, lose the copy of it that
    the sweep took at its start (:func:`_drop_unused_earlier_configs`).
    """
    sweep_dir = Path(hydra.sweep.dir)
    # Without saved configs (hydra.output_subdir=null, which SweepSummary refuses) no job can be found.
    left_because = None if reason is None else f"not started: {reason}; rerun these jobs"
    jobs = collect_jobs(sweep_dir, hydra.output_subdir or ".hydra") + _jobs_not_started(hydra, left_because)
    text = write_sweep_summary(jobs, sweep_dir)
    _drop_unused_earlier_configs(sweep_dir, hydra.output_subdir or ".hydra")
    _print_sweep_table(sweep_dir, text)
    left = [str(job["job"]) for job in jobs if job.get("status") == "not started"]
    ended = "the sweep was stopped" if reason is None else f"the sweep ended ({reason})"
    # A signal during the job's last step lets it finish: its row is ok, with nothing to go on from.
    finished = any(str(job["job"]) == str(hydra.job.num) and job.get("status") == "ok" for job in jobs)
    said = "that it finished" if finished else "how to go on" if reason is None else "why"
    print(f"hetrain: {ended} in job {hydra.job.num}; its row says {said}"
          + (f"; job {', '.join(left)} never started" if left else ""), file=sys.stderr, flush=True)
    return text


BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"  # Hydra's own; ignores what jobs return
# With Hydra's own launcher the jobs are known from the start and run one after another, in order.
_SEQUENTIAL = (BASIC_SWEEPER, "hydra._internal.core_plugins.basic_launcher.BasicLauncher")


def _jobs_not_started(hydra: DictConfig, error: str | None = None) -> list[dict[str, Any]]:
    """The jobs after ``hydra.job.num`` of a sweep Hydra's basic sweeper runs one by one, with ``error`` when given;
    none for other sweepers (Optuna's picks its jobs as it goes) and launchers (in parallel, the later jobs may be
    running)."""
    if (hydra.sweeper.get("_target_"), hydra.launcher.get("_target_")) != _SEQUENTIAL:
        return []
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper  # its expansion, so its job numbers
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        sweep = OmegaConf.load(Path(hydra.sweep.dir) / "multirun.yaml").hydra  # saved by the basic sweeper at its start
        arguments = [f"{k}={v}" for k, v in (sweep.sweeper.get("params") or {}).items()] + list(sweep.overrides.task)
        batches = BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(arguments), None)
    except Exception as exc:  # e.g. glob(), which needs Hydra's config loader: the table matters more than these rows
        log.warning(f"hetrain: the jobs this sweep did not start are not listed ({type(exc).__name__}: {exc})")
        return []
    jobs = [job for batch in batches for job in batch]
    return [{"job": num, "overrides": " ".join(overrides), "status": "not started",
             **({"error": error} if error is not None else {})}
            for num, overrides in enumerate(jobs) if num > hydra.job.num]


def _print_sweep_table(sweep_dir: Path, text: str) -> None:
    # Printed, not logged: after the sweep the logging setup still belongs to the last job and would file it there.
    print(f"\nSweep summary ({sweep_dir / SUMMARY_MD}, {sweep_dir / SWEEP_CSV}):\n{text}", flush=True)


def _another_rank() -> bool:
    """Whether this process is a rank other than 0 of a fit over several processes, which runs the sweep's command
    line too: a rank Lightning launched from rank 0 with the whole ``-m`` command (``hydra.output_subdir=null``
    added), or one torchrun or SLURM started. The sweep's id, its job directories and its table are rank 0's."""
    return rank_zero_only.rank != 0


def _resumes_inside(config: DictConfig, job_dir: Path) -> bool:
    """Whether the job goes on from a checkpoint in its own directory, which must then stay where it is. One under a
    ``previous-*/`` folder there is a run set aside's: the files beside it are another run's, and go aside as for a
    fresh run (:func:`_set_aside` leaves ``previous-*/`` folders, that checkpoint with them, where they are)."""
    ckpt_path = OmegaConf.select(config, "ckpt_path")
    if ckpt_path is None:
        return False
    ckpt, job_dir = Path(ckpt_path).resolve(), job_dir.resolve()
    return ckpt.is_relative_to(job_dir) and not str(ckpt.relative_to(job_dir)).startswith("previous-")


def _process_start() -> float:
    """When this process started, as a time.time() value: torchrun (or SLURM) starts all ranks at once, so no file
    another rank of this run wrote is older. Without /proc (not Linux), when this module was imported."""
    try:
        stat = Path("/proc/self/stat").read_text()
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except OSError:
        return _IMPORTED
    ticks = int(stat.rsplit(")", 1)[1].split()[19])  # field 22, starttime, in clock ticks after boot
    return time.time() - uptime + ticks / os.sysconf("SC_CLK_TCK")


_IMPORTED = time.time()


def _launched_together() -> bool:
    """Whether a launcher started this run's ranks at once (torchrun, or srun with several tasks): one of them may
    write into the run directory before this one looks. Lightning's own launcher starts the others after it."""
    return "TORCHELASTIC_RUN_ID" in os.environ or os.environ.get("SLURM_NTASKS", "1") not in ("", "1")
def _last_change(entry: Path) -> float:
    """When ``entry`` was last modified; for a directory, the newest of it and everything inside."""
    return max(p.lstat().st_mtime for p in [entry, *(entry.rglob("*") if entry.is_dir() else ())])


def _set_aside(directory: Path, aside: Path, keep: tuple[str, ...], earlier: str, since: float) -> str | None:
    """Moves what ``earlier`` (an earlier sweep's job, an earlier run) left in ``directory`` into ``aside``, all but
    the entries named ``keep`` and earlier ``previous-*`` folders; returns the line that says so, None when nothing
    was there. Left in place, its best checkpoint stayed beside the new one's, as if one run had saved both, and the
    new log went on after the earlier one's.

    Only entries last modified before ``since`` (when this run or sweep began) are the earlier one's: under DDP
    another rank of this run may already have opened its log here, and in a sweep written its job's config (torchrun
    starts the ranks together; in a sweep, rank 1 runs ahead into the next job), and a moved file would take its
    lines along.
    Hydra opens a sweep job's log before ``on_job_start``: a file a log handler of this process writes is copied
    and emptied instead, for the same reason.
    """
    open_logs = {Path(h.baseFilename) for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)}
    stale = [e for e in sorted(directory.iterdir())
             if e.name not in keep and not e.name.startswith("previous-") and _last_change(e) < since]
    if not stale:
        return None
    aside.mkdir(exist_ok=True)
    for entry in stale:
        if entry in open_logs:
            shutil.copy2(entry, aside / entry.name)
            os.truncate(entry, 0)
        else:
            os.replace(entry, aside / entry.name)
    return f"hetrain: {directory} held {earlier}; moved its {', '.join(e.name for e in stale)} to {aside}"


def _hold_lock(run_dir: Path) -> int:
    """Locks ``run_dir`` for this process (the lock goes with the process, however it ends); returns the lock's file
    descriptor. One another live run holds is refused: both would write one config, log, CSV and checkpoints."""
    fd = os.open(run_dir / RUN_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        # Not an Exception: Hydra turns a callback's into a warning and runs the job; this exits with status 1.
        raise SystemExit(f"hetrain: {run_dir} is the run directory of another run still running (pid {holder}); "
                         "give this run a directory of its own (hydra.run.dir=...), or wait for that run to "
                         "end") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def _copy_earlier_configs(sweep_dir: Path, output_subdir: str) -> None:
    """Copies the config folder (``output_subdir``) of each job an earlier sweep left in ``sweep_dir`` to
    ``EARLIER_CONFIG`` in its directory: Hydra rewrites it when a job of this sweep starts there, before any callback
    of the job runs, and the earlier job's overrides and config were lost. Under torchrun, a folder newer than this
    process is another rank's of this sweep (see :func:`_set_aside`). Copies an earlier sweep left behind are removed
    first: one that ended without on_multirun_end or :func:`write_stopped_sweep` (a job that failed outside
    :func:`hetrain.train.run`) kept them."""
    for stale in sweep_dir.glob(f"**/{EARLIER_CONFIG}"):
        shutil.rmtree(stale, ignore_errors=True)
    since = _process_start() if _launched_together() else math.inf
    depth = len(Path(output_subdir).parts)
    for config_dir in sweep_dir.glob(f"**/{output_subdir}"):
        job_dir = config_dir.parents[depth - 1]  # a previous-*/ folder holds no sweep id: left alone
        if _sweep_id(job_dir) is not None and _last_change(config_dir) < since:
            shutil.copytree(config_dir, job_dir / EARLIER_CONFIG)


def _drop_unused_earlier_configs(sweep_dir: Path, output_subdir: str) -> None:
    """Removes the copies :func:`_copy_earlier_configs` made for jobs this sweep did not reach (their config is in
    place), once it ends. A copy that differs from its job's config folder stays: Hydra rewrote that folder for a job
    whose on_job_start has not run (under a launcher running jobs in parallel, or a rank running ahead), and the copy
    is the only record of the earlier job's."""
    for copied in sweep_dir.glob(f"**/{EARLIER_CONFIG}"):
        if _files(copied) == _files(copied.parent / output_subdir):
            shutil.rmtree(copied, ignore_errors=True)


def _files(folder: Path) -> dict[Path, bytes]:
    """The files under ``folder`` (none where it does not exist), by path inside it, with their contents."""
    return {path.relative_to(folder): path.read_bytes() for path in folder.rglob("*") if path.is_file()}


def _keep_earlier_config(config_dir: Path, kept: Path) -> bool:
    """Moves ``config_dir``, the config of an earlier job or part of a run (as :func:`_copy_earlier_configs` copied
    it; a single run's before Hydra rewrites it), to ``kept``; whether there was one."""
    if not config_dir.is_dir():
        return False
    kept.parent.mkdir(parents=True, exist_ok=True)
    os.replace(config_dir, kept)
    return True


def _keep_earlier_jobs_config(job_dir: Path, kept: Path) -> None:
    """Moves the earlier job's config that :func:`_copy_earlier_configs` copied in ``job_dir`` to ``kept``."""
    if _keep_earlier_config(job_dir / EARLIER_CONFIG, kept):
        log.info(f"hetrain: {job_dir} held a job of an earlier sweep; its config is kept in {kept}")


# What a sweep writes into its directory itself (Hydra's basic sweeper its multirun.yaml), beside its jobs' folders.
_SWEEP_FILES = (SUMMARY_MD, SWEEP_CSV, "multirun.yaml")


def _set_aside_earlier_table(sweep_dir: Path) -> None:
    """Moves the table and sweep config an earlier sweep left in ``sweep_dir`` to ``previous-<its id>/`` (as its jobs'
    files go to theirs; ``previous-<k>/``, k = 1, 2, ..., for a sweep that left no id): this sweep rewrites them, and
    the earlier sweep's results were lost with its table. Under torchrun, a file newer than this process is this
    sweep's own, written by another rank's sweeper (see :func:`_set_aside`), and stays."""
    since = _process_start() if _launched_together() else math.inf
    found = [sweep_dir / name for name in _SWEEP_FILES
             if (sweep_dir / name).is_file() and _last_change(sweep_dir / name) < since]
    if not found:
        return
    earlier = _sweep_id(sweep_dir)
    if earlier is not None:
        aside = sweep_dir / f"previous-{earlier[:8]}"
    else:
        aside = _first_free(sweep_dir / "previous-")
    aside.mkdir(exist_ok=True)
    for path in found:
        os.replace(path, aside / path.name)
    log.info(f"hetrain: {sweep_dir} held an earlier sweep; moved its {', '.join(p.name for p in found)} to {aside}")


def _first_free(stem: Path) -> Path:
    """``<stem><k>`` for the first k = 1, 2, ... not taken."""
    k = 1
    while (path := stem.with_name(f"{stem.name}{k}")).exists():
        k += 1
    return path


def _next_part(folder: Path) -> Path:
    """``<folder>-part<k>`` for the first k = 1, 2, ... not taken."""
    return _first_free(folder.with_name(f"{folder.name}-part"))


class RunDirectory(HydraCallback):
    """Hydra callback: keeps a single run's directory (``hydra.run.dir``; a sweep's jobs: :class:`SweepSummary`) to
    that run.

    A run into a directory another live run is using is refused (:func:`_hold_lock`). A fresh run into one an
    earlier run used (its lock file, .hydra/ or summary there, older than this run) first moves that run's files
    (checkpoints, csv/, summaries, memory reports, its log and .hydra/; those last modified before this run began:
    :func:`_set_aside`) to ``previous-<k>/``, k = 1, 2, ... in the order the runs came:
    its best checkpoint stayed beside the new one, and its CSV log was kept as if this run resumed it. A run resumed
    from a checkpoint inside the directory (not one set aside in ``previous-<k>/``, whose run the directory no
    longer holds) leaves it as it is (its CSV logger keeps the earlier part's log:
    :class:`ResumableCSVLogger`), and so does one whose directory holds the one train.py runs from, where the
    files are the person's own. This runs before Hydra saves the run's config and opens its log; under DDP only
    rank 0 does (:func:`_another_rank`), and only rank 0 saves the config (:meth:`_leave_config_to_rank_0`).
    """

    def __init__(self) -> None:
        self._lock: int | None = None
        self._said: tuple[int, str] | None = None  # logged once the run's log is open (on_job_start)

    @override
    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        if _another_rank():
            self._leave_config_to_rank_0(config)
            return
        run_dir = Path(config.hydra.run.dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        # Files newer than this run are its own where a launcher started the ranks together (another rank wrote them
        # already); elsewhere all are an earlier run's, which may have ended after this process started.
        since = _process_start() if _launched_together() else math.inf
        used = any((run_dir / name).exists() and _last_change(run_dir / name) < since
                   for name in (RUN_LOCK, ".hydra", SUMMARY_JSON))
        self._lock = _hold_lock(run_dir)
        if not used:
            return
        if _resumes_inside(config, run_dir):
            self._keep_earlier_part_config(config, run_dir)
            return
        if Path.cwd().resolve().is_relative_to(run_dir.resolve()):
            self._said = (logging.WARNING, f"hetrain: {run_dir} holds an earlier run's files, but also the directory "
                          "train.py runs from, so nothing is moved: this run's checkpoints and logs mix with the "
                          "earlier run's; give each run a directory of its own (hydra.run.dir=...)")
            return
        aside = _first_free(run_dir / "previous-")
        moved = _set_aside(run_dir, aside, (RUN_LOCK,), "the files of an earlier run", since)
        self._said = None if moved is None else (logging.INFO, moved)

    @staticmethod
    def _leave_config_to_rank_0(config: DictConfig) -> None:
        """Has Hydra save no config folder (``.hydra/``) on a rank a launcher started together with rank 0 (torchrun,
        srun), as Lightning's launcher does for the ranks it starts (``hydra.output_subdir=null``): written into the
        shared run directory before rank 0 looked, it was taken for this run's own, and a resumed run's earlier part's
        config was overwritten instead of kept, the ``.hydra-part<k>/`` no longer those of the ``csv-part<k>/``."""
        if _launched_together():
            with read_write(config.hydra), open_dict(config.hydra):
                config.hydra.output_subdir = None

    def _keep_earlier_part_config(self, config: DictConfig, run_dir: Path) -> None:
        """Moves the config folder of the run's earlier part (``.hydra/``) to ``.hydra-part<k>/``, as a sweep's job
        resumed in place keeps its own: Hydra rewrites it after this, and the earlier part's overrides were lost. No
        other rank of this run saves one (:meth:`_leave_config_to_rank_0`): the folder there is the earlier part's."""
        output_subdir = config.hydra.get("output_subdir")
        if output_subdir is None:
            return
        config_dir = run_dir / output_subdir
        kept = _next_part(config_dir)
        if _keep_earlier_config(config_dir, kept):
            self._said = (logging.INFO, f"hetrain: {run_dir} holds the earlier part of this resumed run; its config "
                          f"is kept in {kept}")

    @override
    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        if self._said is not None:
            log.log(*self._said)
            self._said = None

    @override
    def on_run_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None


class SweepSummary(HydraCallback):
    """Hydra callback: tabulates every job of a multirun, and only those, in its sweep directory.

    Notes:
        The table is rewritten after each job. A job that fails inside :func:`hetrain.train.run` is
        written down there and returns, so the sweep goes on; at the end this prints the table and,
        if any job failed, exits with status 1 naming them. A job that dies outside it (Hydra's
        sweeper then ends the sweep with that error) still has its row from the last rewrite; one a
        signal stops writes the table itself (:func:`write_stopped_sweep`). With a launcher that runs
        jobs in parallel processes, ``on_multirun_end`` writes the complete table once all have finished.
        Under DDP every rank runs the sweep; only rank 0 does any of this (:func:`_another_rank`).
    """

    @override
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        """Gives the sweep a new id in its directory, which each of its jobs copies into its own (on_job_start).

        A sweep directory may be reused: it then still holds an earlier sweep's job directories, those past
        this sweep's job count untouched, and the summary must leave them out. Job numbers cannot tell (both
        sweeps start at 0), nor can a count (a sweeper such as Optuna's chooses its jobs as it goes), nor
        times (jobs may run on other machines, whose clocks and file timestamps need not agree); an id can.

        The jobs are found by the configs Hydra saves into them: a sweep that saves none is refused. Hydra rewrites
        a job's config folder before any callback of the job runs, so that of each job an earlier sweep left here is
        copied now (:func:`_copy_earlier_configs`), for on_job_start to keep with the rest of that job's files.
        """
        if _another_rank():
            return
        if config.hydra.output_subdir is None:
            # Not an Exception: Hydra turns a callback's into a warning and runs the sweep; this exits with status 1.
            raise SystemExit("hetrain: hydra.output_subdir=null leaves the sweep's jobs without the config folder "
                             "(.hydra/) by which its summary finds them and reads their overrides, so the table "
                             "would list no job, failed ones included; leave hydra.output_subdir at its default "
                             "(.hydra) or give it another folder name")
        sweep_dir = Path(config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        _copy_earlier_configs(sweep_dir, config.hydra.output_subdir)
        _set_aside_earlier_table(sweep_dir)
        (sweep_dir / SWEEP_ID).write_text(f"{uuid.uuid4().hex}\n")

    @override
    def on_job_start(self, config: DictConfig, *, task_function: Any, **kwargs: Any) -> None:
        """Marks the job's directory as this sweep's; what a job of an earlier sweep left there goes aside.

        The id is read from the sweep directory, not kept on this object: with a launcher that runs jobs
        in other processes, this runs there. An earlier sweep's files (checkpoints, log, summary..., and its config
        folder, ``.hydra/``, as on_multirun_start copied it) move to ``previous-<its id>/``, unless this job resumes
        from a checkpoint among them: the files then stay, and the earlier config is kept as ``.hydra-part<k>/``, k =
        1, 2, ... in the order the parts ran (the CSV log's ``csv-part<k>/``). A summary left there in any case goes,
        so that a job killed before writing its own is listed as such, not with the earlier job's results.
        """
        if config.hydra.mode != RunMode.MULTIRUN or _another_rank():
            return
        sweep_id = _sweep_id(Path(config.hydra.sweep.dir))
        if sweep_id is None:
            return
        job_dir = Path(config.hydra.runtime.output_dir)
        earlier = _sweep_id(job_dir)
        if earlier not in (None, sweep_id):
            output_subdir = config.hydra.output_subdir
            if _resumes_inside(config, job_dir):  # the job goes on in place
                _keep_earlier_jobs_config(job_dir, _next_part(job_dir / output_subdir))
            else:
                # The sweep began when its id was written (a file time, as the job files are): what changed since is
                # this sweep's, such as the log rank 1 opened here first.
                began = (Path(config.hydra.sweep.dir) / SWEEP_ID).stat().st_mtime
                aside = job_dir / f"previous-{earlier[:8]}"
                moved = _set_aside(job_dir, aside, (Path(output_subdir).parts[0], SWEEP_ID, EARLIER_CONFIG),
                                   "a job of an earlier sweep", began)
                if moved is not None:
                    log.info(moved)
                _keep_earlier_jobs_config(job_dir, aside / output_subdir)
        for stale in (SUMMARY_JSON, SUMMARY_MD):
            (job_dir / stale).unlink(missing_ok=True)
        (job_dir / SWEEP_ID).write_text(f"{sweep_id}\n")

    @staticmethod
    def _write(config: DictConfig) -> tuple[Path, str, list[dict[str, Any]]]:
        """Rewrites the sweep's table; returns its directory, its text and the jobs it lists."""
        sweep_dir = Path(config.hydra.sweep.dir)
        jobs = collect_jobs(sweep_dir, config.hydra.output_subdir)
        return sweep_dir, write_sweep_summary(jobs, sweep_dir), jobs

    @override
    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if config.hydra.mode != RunMode.MULTIRUN or _another_rank():
            return
        sweep_dir, _, _ = self._write(config)
        if job_return.status == JobStatus.FAILED:
            log.error(f"hetrain: job {config.hydra.job.num} failed; see {sweep_dir / SUMMARY_MD}")

    @override
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if _another_rank():
            return
        sweep_dir, text, jobs = self._write(config)
        _drop_unused_earlier_configs(sweep_dir, config.hydra.output_subdir)
        _print_sweep_table(sweep_dir, text)
        failed = [str(job["job"]) for job in jobs if job.get("status") != "ok"]
        if failed:
            print(f"hetrain: {len(failed)} of {len(jobs)} jobs failed (job {', '.join(failed)}); each row above "
                  "names the error and the job's log", file=sys.stderr, flush=True)
            raise SystemExit(1)  # Hydra reports an Exception with a traceback; a sweep's failures are in the table
