"""``run(cfg)``: the main job behind ``python train.py``.

Builds data, model, task, callbacks, placement and trainer from the composed config (logging each),
fits, and writes the run summary into the run directory.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from hetrain import plugins
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


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fits the experiment ``cfg`` describes; returns the measured part of the summary."""
    pins = cfg.backends.pins
    plugins.configure(pins=None if pins is None else OmegaConf.to_container(pins), strict=cfg.backends.strict)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    pl.seed_everything(cfg.seed, workers=True)

    datamodule = _instantiate(cfg.data, "data")
    model = _instantiate(cfg.model, "model")
    task = _instantiate(cfg.task, "task", model=model)
    callbacks = [_instantiate(node, f"callback {name}") for name, node in (cfg.get("callbacks") or {}).items()
                 if node is not None]
    callbacks.append(_instantiate(cfg.placement, "placement"))
    recorder = RunRecorder()
    logger = _instantiate(cfg.logger, "logger") if cfg.get("logger") else False
    trainer = _instantiate(cfg.trainer, "trainer", callbacks=[*callbacks, recorder], logger=logger)

    log.info("Starting training")
    trainer.fit(task, datamodule=datamodule)
    return recorder.summary(trainer)


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
