"""``run(cfg)``: the main job behind ``python train.py``.

Builds data, model, task, callbacks, placement and trainer from the composed config (logging each),
fits, and writes the run summary into the run directory.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from hetrain import plugins
from hetrain.callbacks.precision import trainer_precision
from hetrain.callbacks.profiling import StepTrace
from hetrain.report import SUMMARY_MD, RunRecorder, write_run_summary

log = logging.getLogger(__name__)


def _instantiate(node: DictConfig, what: str, **kwargs: Any) -> Any:
    log.info(f"Instantiating {what} <{node._target_}>")
    return hydra.utils.instantiate(node, **kwargs)


def _run_info() -> dict[str, Any]:
    """Which recipe and overrides made this run, and where its log is (when Hydra started it)."""
    if not HydraConfig.initialized():
        return {}
    hc = HydraConfig.get()
    return {
        "recipe": hc.runtime.choices.get("recipe"),
        "overrides": " ".join(hc.overrides.task),
        "log": OmegaConf.select(hc, "job_logging.handlers.file.filename"),
    }


@dataclass
class Parts:
    """Everything a run instantiates from its config, ready to fit."""

    datamodule: pl.LightningDataModule
    task: pl.LightningModule
    callbacks: dict[str, pl.Callback]
    recorder: RunRecorder
    trainer: pl.Trainer


def build(cfg: DictConfig) -> Parts:
    """Instantiates data, model, task, callbacks, placement, logger and trainer (logging each)."""
    datamodule = _instantiate(cfg.data, "data")
    model = _instantiate(cfg.model, "model")
    task = _instantiate(cfg.task, "task", model=model)
    # Placement first: the callbacks after it (pipeline split, profilers) see the stages on their devices.
    callbacks = {"placement": _instantiate(cfg.placement, "placement")}
    entries = dict(cfg.get("callbacks") or {})
    profile_steps = entries.pop("profile_steps", None)  # a setting, not a callback: [first, last] to trace
    callbacks.update({name: _instantiate(node, f"callback {name}")
                      for name, node in entries.items() if node is not None})
    if profile_steps is not None:
        callbacks["step_trace"] = StepTrace(list(profile_steps), dirpath=cfg.output_dir)
    recorder = RunRecorder()
    logger = _instantiate(cfg.logger, "logger") if cfg.get("logger") else False
    precision = trainer_precision(cfg.trainer.precision, _devices_in_use(cfg))
    log.info(f"Precision: {precision.get('precision') or precision['plugins'][0]}")
    trainer = _instantiate(cfg.trainer, "trainer", callbacks=[*callbacks.values(), recorder], logger=logger,
                           **precision)
    return Parts(datamodule, task, callbacks, recorder, trainer)


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fits the experiment ``cfg`` describes; returns the measured part of the summary."""
    pins = cfg.backends.pins
    plugins.configure(pins=None if pins is None else OmegaConf.to_container(pins), strict=cfg.backends.strict)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    pl.seed_everything(cfg.seed, workers=True)
    parts = build(cfg)

    log.info("Starting training")
    parts.trainer.fit(parts.task, datamodule=parts.datamodule)
    summary = parts.recorder.summary(parts.trainer)
    summary["precision"] = str(parts.trainer.precision)
    if hasattr(parts.datamodule, "loader_summary"):  # slot and pinned bytes, fixed for the whole run
        summary["data"] = parts.datamodule.loader_summary()
    summary.update({name: c.summary for name, c in parts.callbacks.items()
                    if isinstance(getattr(c, "summary", None), dict)})
    return summary


def _devices_in_use(cfg: DictConfig) -> list[str]:
    """The Trainer's root device, then every stage's planned device (absent ones are ignored by the choice)."""
    accelerator = cfg.trainer.get("accelerator", "auto")
    on_gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    plan = cfg.placement.get("plan")
    planned = list(OmegaConf.to_container(plan).values()) if OmegaConf.is_dict(plan) else []
    if plan == "auto":  # any device of this machine may get a stage
        planned = [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    return ["cuda:0" if on_gpu else "cpu", *planned]


def _root_cause(exc: BaseException) -> BaseException:
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return exc


def run(cfg: DictConfig) -> float | None:
    """Trains, writes ``summary.json`` and ``summary.md`` to ``cfg.output_dir``; returns the sweep metric.

    A failure is logged with its traceback (into the run's log file) and written to the summary
    with its root cause, then re-raised.
    """
    output_dir = Path(cfg.output_dir)
    info = _run_info()
    try:
        summary = {"status": "ok", **info, **train(cfg)}
    except Exception as exc:
        log.exception("hetrain: the run failed")
        cause = _root_cause(exc)
        error = f"{type(cause).__name__}: {cause}"
        write_run_summary({"status": "failed", **info, "error": error}, output_dir)
        raise
    text = write_run_summary(summary, output_dir)
    log.info(f"Summary ({output_dir / SUMMARY_MD}):\n{text}")
    return summary["metrics"].get(cfg.optimized_metric)
