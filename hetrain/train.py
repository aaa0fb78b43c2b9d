"""``run(cfg)``: the main job behind ``python train.py``.

Builds data, model, task, callbacks, placement and trainer from the composed config (logging each),
fits, and writes the run summary into the run directory.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import inspect
import itertools
import json
import logging
import math
import os
import pickle
import re
import signal
import subprocess
import sys
import threading
import time
import types
import typing
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import hydra
import pytorch_lightning as pl
import torch
import torch._dynamo
import torch.distributed as dist
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationKeyError
from pytorch_lightning.callbacks import ModelCheckpoint, ProgressBar
from pytorch_lightning.utilities.exceptions import SIGTERMException
from pytorch_lightning.utilities.model_helpers import is_overridden
from pytorch_lightning.utilities.rank_zero import rank_zero_only
from typing_extensions import override

from hetrain import cpu_memory, plugins
from hetrain.callbacks.graceful_stop import steps_text
from hetrain.callbacks.precision import run_precision, trainer_precision
from hetrain.callbacks.profiling import StepTrace
from hetrain.callbacks.throughput import Throughput
from hetrain.child_watch import exit_text, watching_launched_ranks
from hetrain.data.datamodule import check_token_budget
from hetrain.host_copies import release_all
from hetrain.placement import resolve_plan
from hetrain.placement.plan import available_devices, flatten_plan, parse_device, read_plan
from hetrain.regional_compile import compile_counts, compile_stages
from hetrain.report import (
    BASIC_SWEEPER,
    SUMMARY_MD,
    RunRecorder,
    error_headline,
    write_run_summary,
    write_stopped_sweep,
)

log = logging.getLogger(__name__)

# What a collective raises on a rank whose peer has ended: gloo's words for it, then NCCL's.
_PEER_ENDED = ("Connection closed by peer", "Connection reset by peer", "remote process exited", "ncclRemoteError")
_FAILED = "hetrain: the run failed: "  # how _log_failure begins its line
_LAUNCHER_PID = "HETRAIN_LAUNCHER_PID"  # rank 0's pid, in the environment of the ranks Lightning launches from it
_PR_SET_PDEATHSIG = 1  # <sys/prctl.h>
# How long a rank that finished waits for the others to say how they ended (one killed after the last collective
# never says).
_OUTCOME_WAIT_S = 120.0
# How long rank 0 has to end its run (its summary written) from the exit of a rank it launched that failed, before
# its watch ends every rank (hetrain.child_watch): the wait for the outcomes, with a minute for the end of its fit.
_RECORD_WAIT_S = _OUTCOME_WAIT_S + 60.0
_runs = itertools.count()  # run() calls in this process: every rank of a sweep makes the same ones, in order
# The ranks Lightning launched from this process (a sweep's first fit), global ranks 1, 2, ... on rank 0, which is
# node 0's local rank 0: their exit codes tell rank 0 which never will say how they ended.
_launched: list[subprocess.Popen] = []
# How often rank 0 looks for an outcome, and for the exit of the launched rank owing it; and how long it still
# looks once that rank has exited (what it told just before may still be on its way to the store).
_OUTCOME_POLL_S = 0.1
_TOLD_BEFORE_EXIT_S = 1.0
_BROKEN_GROUP = "a DDP job failed and left its process group broken"
_SIGTERM_AFTER_FIT = "SIGTERM after training finished: the summary is complete, the run ends here (exit 143)"


@dataclass
class _FitState:
    """Where this process's current run() stands with its fit, for what a failure or a SIGTERM may end."""

    # Between the config checks and trainer.fit's return: a failure may come on one rank alone, or leave the process
    # group broken, for a sweep's next job.
    running: bool = False
    returned: bool = False  # training ended: a SIGTERM is recorded (``sigterm``), the run finishes its summary
    sigterm: bool = False
    # The signal GracefulStop took during or after the fit's last step ("SIGINT", "SIGTERM"): it stopped nothing,
    # and a single run ends ok, but it ends a sweep after this job.
    signal_after_last_step: str | None = None
    run: int = -1  # this process's count of run() calls: every rank of a DDP sweep is to be on the same
    ended: threading.Event = field(default_factory=threading.Event)  # set when run() ends: see child_watch


_fit = _FitState()  # reset by run()


def _instantiate(node: DictConfig, what: str, **kwargs: Any) -> Any:
    log.info(f"Instantiating {what} <{node._target_}>")
    # Plain lists and dicts, not OmegaConf's: they end up in saved hyperparameters, which a checkpoint must hold
    # in types torch.load(weights_only=True), Lightning's default, accepts when the run is resumed.
    return hydra.utils.instantiate(node, _convert_="all", **kwargs)


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
    compiled: dict[str, Any] | None = None  # the compile settings applied, None when off
    counts_before_compile: dict[str, int] | None = None  # dynamo's counters then: they count the whole process


def check_config(cfg: DictConfig) -> None:
    """Refuses settings that would otherwise fail deep inside a library, naming the setting to change.

    A planned device such as ``cuda:3`` that this machine lacks is fine (its stages go to the fallback);
    a string that is no device at all (``cdua:0``) is not. A sequence longer than the model's position
    table would fail as an ``IndexError`` inside the embedding lookup of the first step; a ``ckpt_path``
    that is no file, after the data and model were built.
    """
    _check_output_dir(cfg)
    entries = _planned(cfg)
    settings = {f"placement.plan.{path}": device for path, device in entries.items()} if entries != "auto" else {}
    settings["placement.fallback"] = cfg.placement.get("fallback", "cpu")
    for key, device in settings.items():
        parse_device(device, key)
    _check_data_fits_model(cfg)
    accelerator = cfg.trainer.get("accelerator", "auto")
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        why = "torch is a CPU build" if torch.version.cuda is None else "no CUDA GPU is visible"
        raise ValueError(f"hetrain: trainer.accelerator={accelerator}, but {why} (torch {torch.__version__}); use "
                         "trainer.accelerator=auto, which trains on the CPU here and places stages planned for a "
                         "GPU on the CPU with a log line")
    ckpt_path = cfg.get("ckpt_path")
    if ckpt_path is not None and not Path(ckpt_path).is_file():
        raise ValueError(f"hetrain: ckpt_path={ckpt_path} is not a file; pass a checkpoint an earlier run wrote, e.g. "
                         "<its run directory>/checkpoints/last.ckpt")
    data_len, model_len = OmegaConf.select(cfg, "data.max_len"), OmegaConf.select(cfg, "model.max_len")
    if isinstance(data_len, int) and isinstance(model_len, int) and data_len > model_len:
        raise ValueError(f"hetrain: data.max_len={data_len} is longer than model.max_len={model_len}, the model's "
                         "position table; raise model.max_len or lower data.max_len")
    _check_sizes_match_data(cfg)
    _check_seed(cfg)
    _check_counts(cfg)
    _check_windows(cfg)
    _check_types(cfg)
    _check_monitor_modes(cfg)
    _check_profile_steps(cfg)
    strategy = OmegaConf.select(cfg, "trainer.strategy")
    if isinstance(strategy, str) and strategy.startswith(("ddp_spawn", "ddp_fork", "ddp_notebook")):
        # The fit runs in processes this one starts; their callbacks' numbers never come back to it.
        raise ValueError(f"hetrain: trainer.strategy={strategy} trains in processes whose callbacks the run summary "
                         "cannot read (it would say 0 steps); use +trainer.strategy=ddp (with trainer.devices=N), "
                         "which runs this script on every rank")
    data_path = OmegaConf.select(cfg, "data.path")
    if data_path is not None and not Path(data_path).exists():
        raise ValueError(f"hetrain: data.path={data_path} does not exist (relative paths start at the directory "
                         f"train.py runs from, {Path.cwd()}); pass a .jsonl file, a directory of token files "
                         "(python -m hetrain.data.build_tokens), or data.path=null for synthetic documents")


def _check_output_dir(cfg: DictConfig) -> None:
    """``output_dir`` is Hydra's run directory, not a setting. Set to another, the run's lock, its config and log and
    the setting aside of an earlier run's files stayed in Hydra's directory while its checkpoints, CSV log and summary
    went to ``output_dir``, mixed with another run's; every job of a sweep wrote into the one folder, and the sweep's
    table, which reads each job's directory, listed jobs that trained as without a summary."""
    if not HydraConfig.initialized():  # composed in-process (tests, notebooks): output_dir is the caller's
        return
    hydra_cfg = HydraConfig.get()
    output_dir, hydra_dir = cfg.get("output_dir"), Path(hydra_cfg.runtime.output_dir)
    if output_dir is not None and Path(output_dir).resolve() == hydra_dir.resolve():
        return
    directory = "<dir>" if output_dir is None else output_dir
    setting = (f"hydra.sweep.dir={directory} (each job then writes into {directory}/<hydra.sweep.subdir>)"
               if hydra_cfg.mode == RunMode.MULTIRUN else f"hydra.run.dir={directory}")
    raise ValueError(f"hetrain: output_dir={output_dir} is not Hydra's run directory {hydra_dir}: output_dir follows "
                     "Hydra's, where the run's lock, config and log are and an earlier run's files are set aside; "
                     f"leave output_dir alone and set {setting} instead")


def _check_sizes_match_data(cfg: DictConfig) -> None:
    """A model's embedding rows must cover the data's token ids, and its outputs (and the task's metric) match the
    data's labels: token ids past the table failed as a bare IndexError in the embedding lookup (a device-side assert
    on a GPU), a label past the outputs as the loss's "Target 2 is out of bounds"; outputs past the labels are never
    trained, yet predicted."""
    data_vocab, model_vocab = OmegaConf.select(cfg, "data.vocab_size"), OmegaConf.select(cfg, "model.vocab_size")
    if _whole(data_vocab) and _whole(model_vocab) and model_vocab < data_vocab:
        raise ValueError(f"hetrain: model.vocab_size={model_vocab} is smaller than data.vocab_size={data_vocab}: the "
                         "data's token ids would run past the model's embedding table; leave model.vocab_size to "
                         "follow the data (its default) or raise it to at least data.vocab_size")
    data_classes = OmegaConf.select(cfg, "data.num_classes")
    for key in ("model.num_classes", "task.num_classes"):
        classes = OmegaConf.select(cfg, key)
        if _whole(data_classes) and _whole(classes) and classes != data_classes:
            raise ValueError(f"hetrain: {key}={classes} differs from data.num_classes={data_classes}, the labels the "
                             f"data has; leave {key} to follow the data (its default) or set it to data.num_classes")


def _check_counts(cfg: DictConfig) -> None:
    """Counts that must be positive, named before a library meets them (torch's sampler, Lightning's loop)."""
    # data.train_size and data.producers failed inside torch ("negative dimension") or the ring, naming no setting.
    # The ring's settings only where the ring loads the data (data.loader=torch leaves them unused).
    ring = OmegaConf.select(cfg, "data.loader", default="ring") == "ring"
    # data.markers_per_class=0 failed in torch's random_ ("expects 'from' to be less than 'to'"); a corpus of
    # documents (data.path) has no markers.
    synthetic = OmegaConf.select(cfg, "data.path") is None
    counts = ["threads", "data.batch_size", "data.max_tokens", "data.train_size", *(["data.producers"] if ring else []),
              *(["data.markers_per_class"] if synthetic else [])]
    for key in counts:
        value = OmegaConf.select(cfg, key)
        if value is not None and (not _whole(value) or value < 1):
            raise ValueError(f"hetrain: {key}={value!r} must be a positive whole number"
                             + (" or null (torch's default)" if key == "threads" else ""))
    val_size = OmegaConf.select(cfg, "data.val_size")
    no_validation = OmegaConf.select(cfg, "trainer.limit_val_batches") == 0
    if val_size is not None and (not _whole(val_size) or val_size < (0 if no_validation else 1)):
        raise ValueError(f"hetrain: data.val_size={val_size!r} must be a positive whole number (or 0 with "
                         "trainer.limit_val_batches=0, which trains without validation)")
    num_slots = OmegaConf.select(cfg, "data.num_slots") if ring else None
    if num_slots is not None and (not _whole(num_slots) or num_slots < 2):
        raise ValueError(f"hetrain: data.num_slots={num_slots!r} must be a whole number >= 2: the consumer holds a "
                         "batch while the producers fill another (the default is 4)")
    max_steps = OmegaConf.select(cfg, "trainer.max_steps", default=-1)  # Lightning's default
    if not _whole(max_steps) or not (max_steps == -1 or max_steps >= 1):
        # abc failed in a comparison inside Lightning's loop; 1.5 trained 2 steps.
        raise ValueError(f"hetrain: trainer.max_steps={max_steps!r} must be a whole number of optimizer steps >= 1, "
                         "or -1 for no step limit (trainer.max_epochs then ends the run)")
    lr = OmegaConf.select(cfg, "task.lr")
    if lr is not None and (not isinstance(lr, int | float) or isinstance(lr, bool) or not math.isfinite(lr) or lr < 0):
        raise ValueError(f"hetrain: task.lr={lr!r} must be a finite number >= 0 (the optimizer's learning rate, "
                         "e.g. task.lr=1e-3)")
    max_epochs = OmegaConf.select(cfg, "trainer.max_epochs")
    if max_epochs is not None and (not _whole(max_epochs) or not (max_epochs == -1 or max_epochs >= 1)):
        # Lightning skips a fit with max_epochs=0 and returns as if it had trained.
        raise ValueError(f"hetrain: trainer.max_epochs={max_epochs!r} must be a whole number of epochs >= 1, or -1 "
                         "or null for no epoch limit (trainer.max_steps then ends the run)")
    limit_train = OmegaConf.select(cfg, "trainer.limit_train_batches")
    if isinstance(limit_train, int | float) and limit_train == 0:  # skipped by Lightning as max_epochs=0 is
        raise ValueError(f"hetrain: trainer.limit_train_batches={limit_train!r} trains no batch; give a number of "
                         "batches >= 1 or a fraction of the epoch in (0, 1], or null for every batch")
    interval = OmegaConf.select(cfg, "trainer.val_check_interval")
    per_epoch = OmegaConf.select(cfg, "trainer.check_val_every_n_epoch", default=1)  # Lightning's default
    # With check_val_every_n_epoch null, validations count batches across epochs and Lightning takes no fraction.
    fraction = "a fraction of an epoch in (0, 1]" + ("" if per_epoch is not None else
                                                     " with trainer.check_val_every_n_epoch=1")
    if isinstance(interval, bool) or (isinstance(interval, int) and interval < 1) \
            or (isinstance(interval, float) and not 0 < interval <= 1):
        raise ValueError(f"hetrain: trainer.val_check_interval={interval!r} must be a number of training batches "
                         f">= 1 or {fraction}")
    if isinstance(interval, float) and per_epoch is None:
        raise ValueError(f"hetrain: trainer.val_check_interval={interval!r} is a fraction of an epoch, which "
                         "Lightning refuses with trainer.check_val_every_n_epoch=null (validations counted in "
                         "batches across epochs); set trainer.check_val_every_n_epoch=1 to validate every "
                         f"{interval} of an epoch, or give trainer.val_check_interval a number of training batches")
    accumulate = OmegaConf.select(cfg, "trainer.accumulate_grad_batches", default=1)  # Lightning's default
    if not _whole(accumulate) or accumulate < 1:
        raise ValueError(f"hetrain: trainer.accumulate_grad_batches={accumulate!r} must be a positive whole number "
                         "(batches per optimizer step; 1 steps after every batch)")
    if accumulate > 1 and interval is not None and not isinstance(interval, int | float):
        # Time-based validation starts after whichever batch is running, inside a window or not (see _WindowCheck).
        raise ValueError(f"hetrain: trainer.val_check_interval={interval!r} validates on a clock, after whichever "
                         f"batch is running, so with trainer.accumulate_grad_batches={accumulate} its validations and "
                         "checkpoints would fall inside accumulation windows; give a number of training batches, a "
                         f"multiple of {accumulate}")
    max_time = OmegaConf.select(cfg, "trainer.max_time")
    if accumulate > 1 and max_time is not None:
        # Lightning's Timer stops after whichever batch is running; so would a validation on a clock (above).
        raise ValueError(f"hetrain: trainer.max_time={max_time!r} stops the fit on a clock, after whichever batch is "
                         f"running, so with trainer.accumulate_grad_batches={accumulate} the final validation and "
                         "checkpoint may come inside an accumulation window, without the gradients of its batches so "
                         "far (a run resumed from that checkpoint loses them); bound the run with trainer.max_steps "
                         "instead and leave trainer.max_time unset")


def _whole(value: Any) -> bool:
    """Whether a setting is a whole number (Hydra reads true and false as bools, which Python counts as ints)."""
    return isinstance(value, int) and not isinstance(value, bool)


class _WindowCheck(pl.Callback):
    """Refuses, once the epoch's batch count is known, a run that would validate inside an accumulation window.

    The checkpoint saved after such a validation holds the weights before the window's step, not the gradients
    accumulated so far: a run resumed from it loses them and trains differently from the run it resumes.
    """

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.accumulate_grad_batches > 1 and trainer.enable_validation:
            problem = _validation_inside_window(trainer)
            if problem is not None:
                raise ValueError(problem)


class _RunInStep(pl.Callback):
    """Keeps every rank of a DDP sweep on one job, and says when training has ended.

    A rank that failed a job alone before its process group existed (build() in a sweep's first job) went on to the
    next job, whose fit joined rank 0's fit of the failed one: their collectives mixed two jobs' steps. Each rank's
    count of runs is compared with rank 0's once the group is up, before any step. Training's end is where a SIGTERM
    is only recorded: the fit's closing hooks (on_fit_end, teardown: the memory report) run under run()'s handler,
    and what they end is a whole training, whose summary is to be written.
    """

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if trainer.world_size > 1:
            theirs = trainer.strategy.broadcast(_fit.run, src=0)
            if theirs != _fit.run:
                raise RuntimeError(f"hetrain: this rank is on run {_fit.run} of this process and rank 0 on run "
                                   f"{theirs}: a rank failed a job alone before its fit (see that rank's log) and "
                                   "went on to the next; the sweep ends here, rerun the jobs left")

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        _fit.returned = True


class _MeasuredToTheStop(pl.Callback):
    """Closes the run's measurements when GracefulStop's stop ends the fit by an exception (SIGTERM, or a signal
    during a validation): Lightning then calls no ``on_train_end``, where the recorder times the training, sums the
    ranks' samples and reads the stages' devices, and Throughput sums its steps, and its teardown moves the module to
    the CPU. A Ctrl-C stop at a step's end returns from the fit with them; the summary of this one has them too.

    Only these measuring callbacks: the others' ``on_train_end`` (a ModelCheckpoint's last save) must not act on a
    fit stopped mid-validation. First in the Trainer's list, so they close before any callback's ``on_exception``.
    """

    def __init__(self, graceful_stop: pl.Callback | None, measures: list[pl.Callback]) -> None:
        self.graceful_stop, self.measures = graceful_stop, measures
        self.closing = False  # the measurements are being closed: by Lightning's on_train_end, or here

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.closing = False

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.closing = True

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # Under DDP every rank stopped at the same step or validation batch: the recorder's sum of samples meets
        # them all. Not on a KeyboardInterrupt (a second Ctrl-C): the other ranks were not interrupted with it.
        if isinstance(exception, SystemExit) and getattr(self.graceful_stop, "summary", None) and not self.closing:
            self.closing = True
            for callback in self.measures:
                callback.on_train_end(trainer, pl_module)


def _validation_inside_window(trainer: pl.Trainer) -> str | None:
    """Why the first validation that Lightning 2.6 would start inside an accumulation window during this fit does
    so; None when every one starts after a step.

    Lightning steps after every k-th batch of an epoch and after its last batch, and validates after batch ``i`` of
    an epoch when ``i + 1`` is a multiple of ``trainer.val_check_batch``, or, with ``check_val_every_n_epoch=None``,
    when the count of batches since the fit began is. (A validation at the last step is RunRecorder's, after a step.)
    """
    every, k, batches = trainer.val_check_batch, trainer.accumulate_grad_batches, trainer.num_training_batches
    if not isinstance(every, int):  # inf: at the end of an epoch without a length; None: time-based (_check_counts)
        return None
    per_epoch = trainer.check_val_every_n_epoch is not None
    max_steps = trainer.max_steps if trainer.max_steps >= 0 else math.inf
    max_epochs = trainer.max_epochs if trainer.max_epochs not in (None, -1) else math.inf
    if math.isinf(batches):  # a loader without a length, checked as one endless epoch (where an epoch of it ends
        # mid-window, the later validations counted across epochs shift: that is not known ahead)
        positions: Iterable[tuple[int, int]] = [(0, every - 1)]  # the rest are multiples of this one
    elif per_epoch:  # the same batches in each epoch it validates in: the first such epoch tells
        positions = ((trainer.check_val_every_n_epoch - 1, i) for i in range(every - 1, batches, every))
    else:  # multiples of `every` meet every remainder they will modulo `batches` within `batches` of them
        positions = (divmod(j * every - 1, batches) for j in range(1, batches + 1))
    steps_per_epoch = -(-batches // k)
    for epoch, i in positions:
        steps_before = (epoch * steps_per_epoch if epoch else 0) + i // k  # not 0 * inf
        if epoch >= max_epochs or steps_before >= max_steps:
            return None  # the fit ends before this batch, and so before any later one
        if (i + 1) % k and i != batches - 1:
            break
    else:
        return None
    head = (f"hetrain: trainer.val_check_interval={trainer.val_check_interval} with "
            f"trainer.accumulate_grad_batches={k} would validate inside an accumulation window")
    where = (f"so the validation after batch_idx {i} of epoch {epoch} comes with the gradients of {(i + 1) % k} of the "
             f"window's {k} batches not yet applied, which a resume from the checkpoint saved there loses")
    multiple = max(every - every % k, k)
    if math.isinf(batches) or (not per_epoch and batches % k == 0):
        return (f"{head}: it validates every {every} training batches and steps every {k}, {where}. Set "
                f"trainer.val_check_interval to a multiple of {k}, e.g. {multiple} or {multiple + k}")
    example = min(multiple, batches - batches % k)
    within = f"a multiple of {k} up to {batches} (e.g. {example}) or " if k <= batches else ""
    if per_epoch:
        return (f"{head}: it validates after every {every} of an epoch's {batches} training batches and steps after "
                f"every {k} and at the epoch's end, {where}. Set trainer.val_check_interval to {within}1.0 (the "
                "epoch's end, where every window closes)")
    return (f"{head}: trainer.check_val_every_n_epoch=null counts batches across epochs, and an epoch's {batches} "
            f"training batches are not a multiple of {k} (its last window is short), {where}. Set "
            f"trainer.val_check_interval to a multiple of {batches} (epochs' ends, where every window closes), or "
            f"trainer.check_val_every_n_epoch=1 with trainer.val_check_interval {within}1.0, or make an epoch's "
            f"batch count a multiple of {k}")


def _check_monitor_modes(cfg: DictConfig) -> None:
    """A loss monitored with ``mode=max`` (the checkpoint config's default, set for ``val/acc``) counts the highest
    loss as the best: the checkpoint kept is the worst one, and nothing says so."""
    for name, node in (cfg.get("callbacks") or {}).items():
        if name != "profile_steps" and node is not None and not OmegaConf.is_dict(node):
            # False, "off" or 0 failed as "'bool' object has no attribute '_target_'", naming no setting.
            raise ValueError(f"hetrain: callbacks.{name}={node!r} is not a callback's settings; drop the callback "
                             f"with callbacks.{name}=null")
        if not OmegaConf.is_dict(node):  # profile_steps, and entries set to null
            continue
        monitor, mode = node.get("monitor"), node.get("mode")
        if isinstance(monitor, str) and re.search(r"(^|[/_.])loss$", monitor) and mode == "max":
            raise ValueError(f"hetrain: callbacks.{name}.monitor={monitor} is a loss, lower is better, but "
                             f"callbacks.{name}.mode=max counts the highest as the best (the worst checkpoint would "
                             f"be kept); set callbacks.{name}.mode=min too, and a file name that says so, e.g. "
                             f"\"callbacks.{name}.filename='step{{step}}-loss{{{monitor}:.4f}}'\". optimized_metric, "
                             "the metric a sweeper optimises, is a setting of its own")


def _check_profile_steps(cfg: DictConfig) -> None:
    """``callbacks.profile_steps`` is one step or a list: a string was read as the list of its characters
    (``10-12`` as "got ['1', '0', '-', '1', '2']"), a number with a fraction failed as "'float' object is not
    iterable". Its values are checked where the trace is made (hetrain.callbacks.profiling.parse_steps)."""
    steps = OmegaConf.select(cfg, "callbacks.profile_steps")
    if steps is not None and not (_whole(steps) or OmegaConf.is_list(steps)):
        raise ValueError(f"hetrain: callbacks.profile_steps={steps!r} must be [first, last] with 0 <= first <= last, "
                         "or one step; e.g. callbacks.profile_steps=[10,12]")


def _check_types(cfg: DictConfig) -> None:
    """Settings of the wrong type, named before a library meets them: ``backends.strict=no`` turned strict mode on
    (``bool('no')`` is true), ``model.fused=no`` built the fused model, ``compile.dynamic=maybe`` failed in an
    assertion of torch's, ``trainer.log_every_n_steps=abc`` in a comparison inside Lightning and ``data.max_len=64.5``
    in torch.randint. Besides the settings named here, every argument that a ``_target_`` of the config types as a
    bool, a whole number or a number (:func:`_typed_arguments`). Runs after the checks of particular settings, whose
    messages say more."""
    settings: list[tuple[str, tuple[type, ...]]] = [("backends.strict", (bool, type(None)))]
    if cfg.get("compile") is not None:
        settings += [("compile.enabled", (bool,)), ("compile.fullgraph", (bool,)),
                     ("compile.dynamic", (bool, type(None)))]
    settings += _typed_arguments(cfg)
    for key, kinds in settings:
        value = OmegaConf.select(cfg, key)
        if not _of_kind(value, kinds):
            raise ValueError(f"hetrain: {key}={value!r} must be {_kinds_text(kinds)}")


# The types a setting is checked against (:func:`_typed_arguments`), as a message names them, in its order.
_KIND_TEXT = {bool: "true or false", int: "a whole number", float: "a number", type(None): "null"}


def _typed_arguments(node: DictConfig, prefix: str = "") -> list[tuple[str, tuple[type, ...]]]:
    """The settings under ``node`` that its ``_target_`` callables (the model, the data, the trainer, a callback...)
    type as ``bool``, ``int`` or ``float`` (or a union of them, ``None`` included), with those types: Hydra passes
    ``no`` and ``abc`` on as strings, and ``64.5`` to an ``int``. Arguments of any other type (a string, a path, a
    sequence, a ``Literal``) are left to the target, and so are settings that are configs themselves (a nested
    ``_target_`` that makes the number). The configs inside lists (``trainer.plugins``, ``trainer.callbacks``) are
    looked into as well, their settings named as ``trainer.plugins[0].auto_requeue`` (a path OmegaConf.select reads)."""
    found: list[tuple[str, tuple[type, ...]]] = []
    target = node.get("_target_")
    if isinstance(target, str):
        try:
            obj = hydra.utils.get_object(target)
            hints = typing.get_type_hints(obj.__init__ if inspect.isclass(obj) else obj)
        except Exception:  # noqa: BLE001 - a target that cannot be read: instantiating it says why
            hints = {}
        for name, hint in hints.items():
            kinds = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
            if (name in node and not OmegaConf.is_missing(node, name) and not OmegaConf.is_dict(node._get_node(name))
                    and all(isinstance(k, type) and k in _KIND_TEXT for k in kinds)):
                found.append((f"{prefix}{name}", kinds))
    for key in node:
        found += _typed_arguments_in(node._get_node(key), f"{prefix}{key}")
    return found


def _typed_arguments_in(child: Any, path: str) -> list[tuple[str, tuple[type, ...]]]:
    """:func:`_typed_arguments` of the setting ``child`` at ``path``: a config, or a list, whose elements may be
    configs too (``+trainer.plugins=[{_target_: ..., auto_requeue: no}]`` passed ``'no'``, which is true)."""
    if OmegaConf.is_dict(child):
        return _typed_arguments(child, f"{path}.")
    if OmegaConf.is_list(child):  # len() is 0 for a list that is null or missing (???)
        return [found for index in range(len(child)) for found in _typed_arguments_in(child._get_node(index),
                                                                                     f"{path}[{index}]")]
    return []


def _of_kind(value: Any, kinds: tuple[type, ...]) -> bool:
    """Whether ``value`` is of one of ``kinds``, as a signature means them: a whole number is a number too, and a
    bool is neither (Python counts it as an int)."""
    if isinstance(value, bool):
        return bool in kinds
    if isinstance(value, int):
        return int in kinds or float in kinds
    return (isinstance(value, float) and float in kinds) or (value is None and type(None) in kinds)


def _kinds_text(kinds: tuple[type, ...]) -> str:
    """``kinds`` as a message says them: ``a number or null``."""
    shown = [kind for kind in _KIND_TEXT if kind in kinds and not (kind is int and float in kinds)]
    return " or ".join(_KIND_TEXT[kind] for kind in shown)


def _check_seed(cfg: DictConfig) -> None:
    """``seed=null`` failed in torch.manual_seed, ``seed=abc`` in int(), neither naming the setting."""
    seed = cfg.get("seed")
    if not _whole(seed) or not 0 <= seed < 2**32:
        raise ValueError(f"hetrain: seed={seed!r} must be a whole number from 0 to {2**32 - 1} (the range numpy "
                         "takes); it seeds python, numpy, torch and the synthetic data")


def _epochs_done(checkpoint: dict[str, Any]) -> int | None:
    """The epochs a Lightning checkpoint has trained, counted as a resumed fit counts them against ``max_epochs``:
    those its fit loop processed, and the epoch in flight too where its last batch's training step ran (a checkpoint
    saved at that batch's end, or in the validation after it). None where the checkpoint holds no fit loop."""
    try:
        loop = checkpoint["loops"]["fit_loop"]
        epochs, batches = loop["epoch_progress"]["current"], loop["epoch_loop.batch_progress"]
        done = epochs["processed"]
        in_flight = epochs["started"] > done
        last_batch_ran = batches["is_last_batch"] and batches["total"]["processed"] == batches["total"]["started"]
    except (KeyError, TypeError):
        return None
    return done + 1 if in_flight and last_batch_ran else done


# What every Lightning checkpoint holds, which Lightning reads first when it resumes one.
_CHECKPOINT_KEYS = ("pytorch-lightning_version", "state_dict")


# What torch's weights_only unpickler says of bytes that are no pickle, as opposed to an object it does not allow.
_NOT_A_PICKLE = ("Unsupported operand", "String is too long", "persistent_id", "Ran out of input", "EOF")


def _read_checkpoint(ckpt_path: str) -> dict[str, Any] | None:
    """The checkpoint ``ckpt_path`` as Lightning reads it to resume (``weights_only``, torch's default), its tensors
    left on disk; None where weights_only refuses what it holds (an object of a user's), in either format torch.save
    writes: Lightning then raises torch's message, which says how to allow the object, or loads it where
    TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD is set. A file that is no Lightning checkpoint is refused: a tensor, a list, a
    model's state_dict or a text file failed inside Lightning's loading with ``KeyError: 101`` or ``KeyError:
    'pytorch-lightning_version'``; one torch.load fails on otherwise (a truncated file) is refused with torch's
    message. One that cannot be read at all (no permission, an I/O error) raises an OSError that says why, not that
    the file is no checkpoint."""
    zipped = zipfile.is_zipfile(ckpt_path)  # torch.save's format since torch 1.6, the only one mmap reads
    try:  # mmap: the tensors stay on disk, only the pickled structure around them is read
        checkpoint = torch.load(ckpt_path, map_location="cpu", mmap=zipped, weights_only=True)
    except OSError as exc:  # the file, not its content: no permission, a disk's I/O error
        raise OSError(f"hetrain: ckpt_path={ckpt_path} cannot be read ({exc}); make it readable to this run, or "
                      "pass another checkpoint, or ckpt_path=null to train from the start") from exc
    except Exception as exc:  # noqa: BLE001 - named in the error below
        # torch words every weights_only failure "Weights only load failed": objects of a user's it does not allow
        # (a global, a type to build, a function to call), which are Lightning's to explain, and bytes that are no
        # pickle at all (a gzip, random data), which are no checkpoint.
        if isinstance(exc, pickle.UnpicklingError) and not any(words in str(exc) for words in _NOT_A_PICKLE):
            return None
        # torch's own line: a truncated zip "failed finding central directory"; for weights_only the unpickler's
        # ("Unsupported operand 31" for gzip), not its advice to load with weights_only=False.
        text = str(exc)
        if "WeightsUnpickler error:" in text:
            text = text.split("WeightsUnpickler error:", 1)[1]
        said = next((line.strip() for line in text.splitlines() if line.strip()), "")
        raised = f"{type(exc).__name__}: {said}" if said else type(exc).__name__
        found = f"it is no file torch.save wrote, or a damaged one (torch.load raised {raised})"
    else:
        missing = [key for key in _CHECKPOINT_KEYS if key not in checkpoint] if isinstance(checkpoint, dict) else None
        if missing == []:
            return checkpoint
        found = (f"it holds a {type(checkpoint).__name__}" if missing is None
                 else f"it holds a dict without {' or '.join(repr(key) for key in missing)}")
    keys = ", ".join(repr(key) for key in (*_CHECKPOINT_KEYS, "global_step", "loops", "optimizer_states"))
    raise ValueError(f"hetrain: ckpt_path={ckpt_path} is not a Lightning checkpoint: {found}, where Lightning saves "
                     f"a dict with the keys {keys} and more; pass a checkpoint an earlier run wrote, e.g. <its run "
                     "directory>/checkpoints/last.ckpt, or ckpt_path=null to train from the start")


def _check_checkpoint(cfg: DictConfig) -> None:
    """Refuses a ``ckpt_path`` that is no Lightning checkpoint (:func:`_read_checkpoint`), and one already at
    ``trainer.max_steps`` or past its last epoch (``trainer.max_epochs``): Lightning would skip the fit, its
    callbacks' hooks included, and the run would say ok with nothing trained or measured."""
    ckpt_path = cfg.get("ckpt_path")
    if ckpt_path is None:
        return
    checkpoint = _read_checkpoint(ckpt_path)
    max_steps, max_epochs = OmegaConf.select(cfg, "trainer.max_steps"), OmegaConf.select(cfg, "trainer.max_epochs")
    step_limit = isinstance(max_steps, int) and max_steps >= 0  # -1: no step limit
    epoch_limit = isinstance(max_epochs, int) and max_epochs >= 0  # -1 or null: none (max_steps decides)
    if checkpoint is None or not (step_limit or epoch_limit):
        return
    step = checkpoint.get("global_step", 0)
    if step_limit and step >= max_steps:
        raise ValueError(f"hetrain: ckpt_path={ckpt_path} is already at step {step} >= trainer.max_steps={max_steps}, "
                         "so there is nothing left to train; raise trainer.max_steps to the step the resumed run "
                         f"should end at, e.g. trainer.max_steps={step + max(max_steps, 1)}")
    epochs = _epochs_done(checkpoint) if epoch_limit else None
    if epochs is not None and epochs >= max_epochs:
        raise ValueError(f"hetrain: ckpt_path={ckpt_path} has already trained {epochs} epochs >= "
                         f"trainer.max_epochs={max_epochs}, so there is nothing left to train; raise "
                         "trainer.max_epochs to the epoch count the resumed run should end at, e.g. "
                         f"trainer.max_epochs={epochs + max(max_epochs, 1)}")


def _check_windows(cfg: DictConfig) -> None:
    """A token budget that holds no whole sequence, and windows that would skip tokens, named by their settings
    (the sampler and the window cutter only see numbers, after the model and the corpus were built)."""
    max_len, stride = OmegaConf.select(cfg, "data.max_len"), OmegaConf.select(cfg, "data.stride")
    max_tokens = OmegaConf.select(cfg, "data.max_tokens")
    ring = OmegaConf.select(cfg, "data.loader", default="ring") == "ring"
    if ring and isinstance(max_len, int) and isinstance(max_tokens, int):
        check_token_budget(max_tokens, max_len)  # before the corpus is built, not only when the datamodule is
    if isinstance(max_len, int) and isinstance(stride, int) and not 1 <= stride <= max_len:
        raise ValueError(f"hetrain: data.stride={stride} must be in [1, data.max_len={max_len}]: windows start "
                         f"stride tokens apart, so a larger stride skips tokens; set data.stride<={max_len} "
                         f"(e.g. data.stride={max(1, max_len * 3 // 4)} overlaps windows by a quarter)")


def _planned(cfg: DictConfig) -> dict[str, object] | str:
    """``placement.plan`` as ``{module path: device}`` (nested entries as dotted paths, a plan file read), or
    ``"auto"``; a plan file that is missing fails here, before the model is built."""
    plan = cfg.placement.get("plan")
    if OmegaConf.is_dict(plan):
        return flatten_plan(OmegaConf.to_container(plan))  # devices checked by the caller, named as settings
    return read_plan(plan)


def _check_data_fits_model(cfg: DictConfig) -> None:
    """The model and task read their sizes from the data config (``${data.vocab_size}``); one the chosen data does
    not set (a ResNet on token data) is named with the choices, not as an OmegaConf interpolation error."""
    for group in ("model", "task"):
        try:
            OmegaConf.to_container(cfg[group], resolve=True)
        except InterpolationKeyError as exc:
            key = str(exc).split("'")[1] if "'" in str(exc) else str(exc)
            choices = HydraConfig.get().runtime.choices if HydraConfig.initialized() else {}
            chosen = (f"{group}={choices[group]} with data={choices['data']}" if group in choices and "data" in choices
                      else f"the {group} config with this data config")
            raise ValueError(f"hetrain: {chosen}: the {group} reads {key}, which the data does not set; pick data "
                             f"that does (token models: data=synthetic or data=tokens; image models: data=images), "
                             f"or a recipe that pairs them (recipe=bert_split, recipe=resnet_fused_amp)") from None


def check_plan(cfg: DictConfig, model: torch.nn.Module) -> None:
    """Refuses a placement entry that names no stage of ``model`` now, not once data is ready and fit starts."""
    plan = _planned(cfg)
    if plan != "auto" and hasattr(model, "stages"):
        stages, fallback = list(model.stages()), cfg.placement.get("fallback", "cpu")
        try:
            resolve_plan(plan, stages, fallback)
        except ValueError as exc:
            # A fallback that is absent or meta fails in resolve_plan too; with the CPU in its place the plan resolves.
            setting = "placement.fallback" if _resolves(plan, stages) else "placement.plan"
            raise ValueError(f"{exc}. Fix {setting} in the recipe or on the command line") from None


def _resolves(plan: dict[str, object], stages: list[str]) -> bool:
    """Whether ``plan`` maps onto ``stages`` with the CPU as its fallback."""
    try:
        resolve_plan(plan, stages, "cpu")
    except ValueError:
        return False
    return True


def build(cfg: DictConfig) -> Parts:
    """Instantiates data, model, task, callbacks, placement, logger and trainer (logging each), after checking
    the settings and applying ``threads``."""
    check_config(cfg)
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    model = _instantiate(cfg.model, "model")
    check_plan(cfg, model)
    datamodule = _instantiate(cfg.data, "data")
    task = _instantiate(cfg.task, "task", model=model)
    compiled = counts_before = None
    if cfg.get("compile") and cfg.compile.enabled:
        settings = {k: v for k, v in OmegaConf.to_container(cfg.compile).items() if k != "enabled"}
        # A sweep's earlier jobs compiled the same stage classes in this process, and their graphs are guarded on
        # parameter sizes: each width's cache entries count against dynamo's recompile limit, past which the
        # stages run eagerly. reset() clears those caches; dynamo's counters it leaves, so counts_before still serves.
        torch._dynamo.reset()
        counts_before = compile_counts()
        compiled = compile_stages(task.stages(), **settings)
        eager = ", ".join(compiled["eager"])
        left = f"; left eager (sparse-gradient embeddings): {eager}" if eager else ""
        log.info(f"Compile: {compiled['stages']} stages with torch.compile {settings}{left}")
    # Placement first: the callbacks after it (pipeline split, profilers) see the stages on their devices.
    callbacks = {"placement": _instantiate(cfg.placement, "placement")}
    entries = dict(cfg.get("callbacks") or {})
    profile_steps = entries.pop("profile_steps", None)  # a setting, not a callback: [first, last] to trace
    callbacks.update({name: _instantiate(node, f"callback {name}")
                      for name, node in entries.items() if node is not None})
    if profile_steps is not None:  # an int or a list (_check_profile_steps)
        steps = list(profile_steps) if OmegaConf.is_list(profile_steps) else profile_steps
        callbacks["step_trace"] = StepTrace(steps, dirpath=cfg.output_dir)
    if cfg.trainer.get("enable_progress_bar") is False:
        # Lightning refuses a progress-bar callback with the bar turned off; the switch is what the person meant.
        for name in [n for n, c in callbacks.items() if isinstance(c, ProgressBar)]:
            log.info(f"trainer.enable_progress_bar=false: callback {name} left out")
            del callbacks[name]
    recorder = RunRecorder()
    logger = _instantiate(cfg.logger, "logger") if cfg.get("logger") else False
    precision = trainer_precision(cfg.trainer.precision, _devices_in_use(cfg))
    # With every ModelCheckpoint set to null Lightning would add its own, writing where the run did not ask.
    saving = {} if any(isinstance(c, ModelCheckpoint) for c in callbacks.values()) else {"enable_checkpointing": False}
    measures = [*(c for c in callbacks.values() if isinstance(c, Throughput)), recorder]
    closing = _MeasuredToTheStop(callbacks.get("graceful_stop"), measures)
    trainer = _instantiate(cfg.trainer, "trainer",
                           callbacks=[closing, _RunInStep(), _WindowCheck(), *callbacks.values(), recorder],
                           logger=logger, **precision, **saving)
    # What the Trainer runs, which Lightning may have changed: 16-mixed on a CPU becomes bf16-mixed.
    log.info(f"Precision: {precision['plugins'][0] if 'plugins' in precision else trainer.precision}")
    return Parts(datamodule, task, callbacks, recorder, trainer, compiled, counts_before)


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fits the experiment ``cfg`` describes; returns the measured part of the summary."""
    check_config(cfg)  # before the seed and the backends are applied (build() checks again, cheaply)
    _check_checkpoint(cfg)
    # Past the checks every rank makes alike: a failure from here on may come on one rank alone (a node's file,
    # device or memory in build()), which under DDP leaves the ranks out of step for a sweep's next job.
    _fit.running = True
    with cpu_memory.host_memory(cfg.get("cpu_malloc", "keep")) as cpu_malloc, _torch_threads_restored():
        log.info(f"Host memory: {cpu_malloc.description}")
        host_cache_at_start = cpu_memory.stats()
        pins, prefer = cfg.backends.pins, cfg.backends.get("prefer")
        if OmegaConf.is_list(prefer):
            prefer = OmegaConf.to_container(prefer, resolve=True)
        # null is none, as {} and []: configure's None keeps the pins and preference a sweep's earlier job set.
        plugins.configure(pins={} if pins is None else OmegaConf.to_container(pins, resolve=True),
                          strict=cfg.backends.strict, prefer=[] if prefer is None else prefer)
        pl.seed_everything(cfg.seed, workers=True)
        parts = build(cfg)

        ckpt_path = cfg.get("ckpt_path")
        log.info(f"Resuming from {ckpt_path}" if ckpt_path else "Starting training")
        os.environ[_LAUNCHER_PID] = str(os.getpid())  # inherited by the ranks the fit launches: _end_with_launcher
        fitted = False
        try:
            # Lightning launches the other ranks in a sweep's first fit only: the watch reads the run in progress.
            with watching_launched_ranks(lambda: _fit.ended, _RECORD_WAIT_S, _launched):
                parts.trainer.fit(parts.task, datamodule=parts.datamodule, ckpt_path=ckpt_path)
            fitted = True
            _fit.running, _fit.returned = False, True
        except SystemExit as exc:  # how Lightning ends a fit on SIGTERM, or on Ctrl-C pressed twice
            # A stop GracefulStop saved is summarised as a Ctrl-C stop's where the measurements were closed (by
            # _MeasuredToTheStop, or Lightning's on_train_end), the recorder last: not after a second Ctrl-C that ended
            # the fit before or while they were.
            closed = parts.recorder.closed
            _describe_stop(exc, parts, _measured(parts, cpu_malloc, host_cache_at_start) if closed else None)
            raise
        finally:
            os.environ.pop(_LAUNCHER_PID, None)
            _fit.signal_after_last_step = getattr(parts.callbacks.get("graceful_stop"), "signal_after_last_step",
                                                  None)
            if not fitted:
                _close_data(parts.datamodule)
            release_all()  # a fit ended by an exception skips the task's teardown, which lets the held batches go
        if parts.trainer.num_training_batches == 0:  # Lightning ends such a fit at once and says so at info level
            raise ValueError(_no_training_batch(cfg))
        no_step = _no_step_trained(cfg, parts)
        if no_step is not None:
            raise ValueError(no_step)
        summary = _measured(parts, cpu_malloc, host_cache_at_start)
    return summary


def _measured(parts: Parts, cpu_malloc: cpu_memory.CpuMallocSetting,
              host_cache_at_start: cpu_memory.HostCacheStats | None) -> dict[str, Any]:
    """The measured part of the summary of a fit that trained: returned, or stopped by GracefulStop."""
    summary = parts.recorder.summary(parts.trainer)
    unvalidated = _unvalidated(parts)
    if unvalidated is not None:
        log.warning(unvalidated[1])
        summary["no_validation"] = unvalidated[0]
    summary["precision"] = run_precision(parts.trainer)  # per device type under DeviceMixedPrecision
    if parts.compiled is not None:
        summary["compile"] = {**parts.compiled, **compile_counts(since=parts.counts_before_compile)}
    summary["cpu_malloc"] = {"setting": cpu_malloc.description, **_host_cache_summary(host_cache_at_start)}
    summary.update(_best_checkpoint(parts.callbacks))
    if hasattr(parts.datamodule, "loader_summary"):  # slot and pinned bytes, fixed for the whole run
        summary["data"] = parts.datamodule.loader_summary()
    summary.update({name: c.summary for name, c in parts.callbacks.items()
                    if isinstance(getattr(c, "summary", None), dict)})
    return summary


def _describe_stop(exc: SystemExit, parts: Parts, measured: dict[str, Any] | None) -> None:
    """Adds to a SystemExit that ended the fit what the stopped run's summary says: GracefulStop's checkpoint, the
    steps it trained, and ``measured`` (:func:`_measured`) where GracefulStop stopped the fit, else the progress."""
    graceful_stop = parts.callbacks.get("graceful_stop")
    exc.graceful_stop = getattr(graceful_stop, "summary", None) or {}
    exc.steps_trained = getattr(graceful_stop, "steps_trained", None)  # None: no GracefulStop counted them
    # Under DDP each rank counted its own samples, and the ranks are not in step here to sum them: left out there
    # (GracefulStop stops every rank at the same point, where the recorder summed them).
    exc.progress = measured if measured is not None else {
        "steps": parts.trainer.global_step, **({"samples": parts.recorder.samples} if parts.trainer.world_size == 1
                                               else {})}


def _close_data(datamodule: pl.LightningDataModule) -> None:
    """Tears down the data of a fit that raised: Lightning calls no teardown then, so the ring loaders' producer
    threads and slots lived on (into a sweep's next job) until the garbage collector found them. An error here is
    logged, not raised: the fit's own error is the one to report."""
    try:
        datamodule.teardown("fit")
    except Exception as exc:  # noqa: BLE001 - the fit's exception is already on its way up
        log.warning(f"hetrain: closing the data after the failed fit failed too ({type(exc).__name__}: {exc})")


@contextlib.contextmanager
def _torch_threads_restored() -> Iterator[None]:
    """Gives torch back the thread count it had: build() applies ``threads``, which the next job of a sweep, with
    ``threads=null`` (torch's default), would otherwise inherit."""
    threads = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _no_training_batch(cfg: DictConfig) -> str:
    """Why a fit trained nothing, naming the data settings that size the training loader."""
    keys = ("data.train_size", "data.batch_size", "data.max_tokens", "data.path")
    settings = ", ".join(f"{key}={value}" for key in keys if (value := OmegaConf.select(cfg, key)) is not None)
    return (f"hetrain: the training loader has no batch ({settings}), so nothing was trained; give it at least one "
            "whole batch, e.g. data.batch_size at most data.train_size (a loader that drops the last incomplete "
            "batch has none when the batch is larger than the data)")


def _no_step_trained(cfg: DictConfig, parts: Parts) -> str | None:
    """Why a fit that returned trained no step; None when it trained one, or a signal stopped it (GracefulStop's
    summary says where). Lightning skips a fit whose limits are already met (trainer.max_epochs=0,
    trainer.limit_train_batches=0, a checkpoint at its end) or that a callback stopped first, says so at info
    level, and returns as if it had trained: the run said ok with nothing trained."""
    trainer, recorder = parts.trainer, parts.recorder
    if getattr(parts.callbacks.get("graceful_stop"), "stopped_by_signal", False):
        return None
    # A skipped fit never reaches on_train_start, whose start_step a resumed fit's global_step would be past.
    if recorder.samples > 0 and trainer.global_step > recorder.start_step:
        return None
    settings = ", ".join(f"trainer.{key}={getattr(trainer, key)}"
                         for key in ("max_steps", "max_epochs", "limit_train_batches"))
    resumed = f", ckpt_path={cfg.ckpt_path}" if cfg.get("ckpt_path") else ""
    return (f"hetrain: the fit trained no step ({settings}{resumed}; at step {trainer.global_step}): Lightning "
            "skips, as if it had trained, a fit whose step or epoch limit is already reached, which may run no "
            "training batch, or which a callback stopped before its first batch (its log says which, at info "
            "level); give trainer.max_steps and trainer.max_epochs room past the step and epoch the fit starts at, "
            "and trainer.limit_train_batches a value above 0")


def _unvalidated(parts: Parts) -> tuple[str, str] | None:
    """What the summary and the warning say of a fit that trained but never validated: its metrics were empty, no
    checkpoint held its weights, and the run said ok. None when it validated, trained no step, has no validation
    step, or a signal stopped it (GracefulStop's checkpoint holds the weights and the summary names it)."""
    trainer, recorder, task = parts.trainer, parts.recorder, parts.task
    stopped = getattr(parts.callbacks.get("graceful_stop"), "summary", None)
    if (recorder.validated_at_step is not None or trainer.global_step <= recorder.start_step or stopped
            or not is_overridden("validation_step", task)):
        return None
    step = trainer.global_step
    # Lightning's own count of the step each ModelCheckpoint last saved at, this fit's (0 until it saves).
    saved = max((getattr(c, "_last_global_step_saved", 0) for c in trainer.checkpoint_callbacks), default=0)
    if saved >= step:
        checkpoint = f"the checkpoint of the final step {step} was saved without them"
    elif saved > recorder.start_step:
        checkpoint = f"the last checkpoint is of step {saved}, not of the final step {step}"
    else:
        checkpoint = "no checkpoint was written"
    brief = f"no validation ran up to step {step}: no metrics, and {checkpoint}"
    settings = ", ".join(f"trainer.{key}={getattr(trainer, key)}" for key in (
        "val_check_interval", "check_val_every_n_epoch", "max_steps", "max_epochs", "limit_val_batches"))
    warning = (f"hetrain: the fit trained to step {step} without validating once ({settings}; "
               f"{trainer.num_training_batches} training batches an epoch), so the summary has no validation metrics "
               f"and {checkpoint}. A validation runs every trainer.val_check_interval training batches, and one is "
               "added at trainer.max_steps only where that step ends mid-epoch; to have the final weights validated "
               "and saved, end the run on a batch that validates (trainer.val_check_interval dividing an epoch's "
               "batches and trainer.max_steps) and keep trainer.limit_val_batches above 0")
    return brief, warning


def _best_checkpoint(callbacks: dict[str, pl.Callback]) -> dict[str, str | None]:
    """Where the monitored ModelCheckpoint kept the best weights: its file name holds the metric, not the run, so a
    sweep's table is where one finds which job's checkpoint to take."""
    monitored = [c for c in callbacks.values() if isinstance(c, ModelCheckpoint) and c.monitor]
    return {"best_model_path": monitored[0].best_model_path or None} if monitored else {}


def _host_cache_summary(start: cpu_memory.HostCacheStats | None) -> dict[str, Any]:
    """How often hetrain's CPU allocator reused a kept block during the run rather than mapping a new one."""
    stats = cpu_memory.stats()
    if start is None or stats is None or not stats.enabled:
        return {}
    return {"reused": stats.reused - start.reused, "mapped": stats.mapped - start.mapped,
            "kept_mib": round(stats.cached_bytes / 2**20)}


def _devices_in_use(cfg: DictConfig) -> list[str]:
    """The Trainer's root device, then every stage's planned device (absent ones are ignored by the choice)."""
    accelerator = cfg.trainer.get("accelerator", "auto")
    on_gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    plan = _planned(cfg)
    if plan == "auto":  # any device the solver may pick may get a stage, the CPU included
        planned = available_devices()
    else:
        planned = [str(device) for device in plan.values()]
    return ["cuda:0" if on_gpu else "cpu", *planned]


def _root_cause(exc: BaseException) -> BaseException:
    """The error a failure is reported by: ``exc``, unwrapped from Hydra's InstantiationException, whose "Error in
    call to target ..." only repeats the error of the ``_target_`` it was raised from. Not the innermost cause: a
    hetrain error raised from a library's (``raise ValueError("hetrain: ...") from exc``) is the explanation."""
    while isinstance(exc, InstantiationException) and exc.__cause__ is not None:
        exc = exc.__cause__
    return exc


def _chain_text(exc: BaseException) -> str:
    """``exc`` and each error it was raised from, one ``Type: message`` line each: a collective's error whose peer
    ended (_PEER_ENDED) may sit under one that wraps it."""
    lines, current = [], exc
    while current is not None:
        lines.append(f"{type(current).__name__}: {current}")
        current = current.__cause__
    return "\n".join(lines)


def _peer_ended(text: str) -> bool:
    """Whether ``text`` (an error, or :func:`_chain_text`) is a collective's whose peer ended."""
    return any(words in text for words in _PEER_ENDED)


def _log_failure(exc: BaseException, error: str, log_file: str | None) -> None:
    """Logs a failure in one line, its traceback into the run's log file only.

    Hydra prints the traceback on the console itself when the exception reaches it; logged to the
    console as well, the same forty lines would show twice. Without a log file (``run`` called
    outside Hydra) the traceback is logged as usual.
    """
    files = [h for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)]
    if not files:
        log.exception("hetrain: the run failed")
        return
    where = f"; traceback in {log_file}" if log_file else ""
    log.error(f"{_FAILED}{error_headline(error)}{where}")
    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, "hetrain: traceback of the failure", None,
                            (type(exc), exc, exc.__traceback__))
    for handler in files:
        handler.handle(record)


def _end_with_launcher() -> None:
    """Makes a rank that Lightning launched from rank 0 get SIGTERM when rank 0 ends, however it ends.

    Until its signal handlers are in place (Lightning's, then GracefulStop's) a SIGTERM ends rank 0 at once, and a
    SIGKILL does at any time; a rank it launched then waited 30 minutes for it to set up the process group,
    re-parented to init. Linux only (``prctl``); elsewhere the ranks are left as Lightning leaves them.
    """
    launcher = os.environ.get(_LAUNCHER_PID)
    if launcher is None or int(launcher) == os.getpid() or not sys.platform.startswith("linux"):
        return  # not a rank Lightning launched from hetrain.train (rank 0, one process, torchrun, SLURM)
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != int(launcher):  # rank 0 ended before the signal was asked for: none will come
        log.error(f"hetrain: rank 0 (pid {launcher}), which launched this rank, has ended; this rank stops too")
        raise SystemExit(_exit_code("SIGTERM"))


def _rank_logs(log_file: str | None) -> dict[Path, int]:
    """The other ranks' logs beside ``log_file`` (Lightning names them ``train_ddp_process_<k>.log``) and their sizes
    now: Hydra appends to the log an earlier run left in the same directory, whose lines this run's must not be
    taken for."""
    if log_file is None:
        return {}
    return {path: path.stat().st_size for path in Path(log_file).parent.glob("train_ddp_process_*.log")}


def _other_ranks(error: str, log_file: str | None, sizes_before: dict[Path, int],
                 wait_s: float = 10.0) -> dict[str, str]:
    """What ended each other rank, from what its log gained during this run (``sizes_before``: :func:`_rank_logs`
    at the run's start), when ``error`` (this rank's failure, with the errors it was raised from: :func:`_chain_text`)
    is a collective's whose peer ended: the rank that failed first is then another, and this one's error says no more
    than that a connection closed."""
    if log_file is None or not _peer_ended(error):
        return {}
    # The rank that failed first closed its connections while tearing down, before it logged its failure: give it
    # a moment to write that line.
    deadline = time.monotonic() + wait_s
    while True:
        # Only the logs this run wrote to: an earlier run's with more ranks left logs no rank of this one writes.
        grown = [path for path, size in _rank_logs(log_file).items() if size > sizes_before.get(path, -1)]
        ended = {path.name: _last_failure(path, sizes_before.get(path, 0)) for path in sorted(grown)}
        if all(ended.values()) or time.monotonic() > deadline:
            return {name: failure or "no failure logged (killed? see the end of the log)"
                    for name, failure in ended.items()}
        time.sleep(0.1)


def _last_failure(path: Path, start: int) -> str | None:
    """The last failure logged in ``path`` after byte ``start``."""
    with path.open("rb") as f:
        f.seek(start)
        text = f.read().decode(errors="replace")
    failures = [line.split(_FAILED, 1)[1].split("; traceback in ")[0] for line in text.splitlines() if _FAILED in line]
    return failures[-1] if failures else None


def _in_sweep() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _missing_metric(cfg: DictConfig, metrics: dict[str, float]) -> str | None:
    """Why ``optimized_metric`` has no value though the run validated: a name no metric has, which a sweeper that
    optimises it (Optuna) met as ``Return value must be float-castable. Got 'None'``, long after this run.

    A run that validated nothing (``trainer.limit_val_batches=0``) has no metric to name and is left alone.
    """
    name = cfg.get("optimized_metric")
    if name is None or not metrics or name in metrics:
        return None
    return (f"hetrain: optimized_metric={name} is not a logged metric; choose one of {', '.join(metrics)} (or "
            "optimized_metric=null where no sweeper optimises it)")


def _exit_code(signal_name: str) -> int:
    """128 + the signal, a shell's code for a program a signal ended: `train.py && next` stops, so does a sweep."""
    return 128 + signal.Signals[signal_name]


def _go_on_from(saved: dict[str, Any]) -> str:
    """The error of a run GracefulStop stopped (its ``summary``): the signal, the step and the checkpoint to go on
    from, which a stopped sweep's table shows in the job's row."""
    return f"{saved['signal']} after {steps_text(saved['at_step'])}; go on with ckpt_path={saved['checkpoint']}"


def _record_interruption(exc: BaseException, info: dict[str, Any], output_dir: Path) -> int | None:
    """Writes the summary of a fit a signal ended by an exception; returns the exit code when GracefulStop had
    saved a checkpoint first, or the fit was ended by SIGTERM (143 then, saved or not: a scheduler requeues the
    job); None for a Ctrl-C that stopped at once (Ctrl-C twice, or before training began)."""
    saved = getattr(exc, "graceful_stop", None) or {}
    sigterm = isinstance(exc, SIGTERMException)
    if saved:
        error = _go_on_from(saved)
    elif sigterm and getattr(exc, "steps_trained", 0) == 0:  # no count: before the fit, from run()'s handler
        error = "SIGTERM before the first training step: nothing trained, nothing saved"
    elif sigterm:
        error = f"SIGTERM ({type(exc).__name__}): stopped at once, nothing saved since the last checkpoint"
    else:
        error = (f"stopped at once (Ctrl-C twice, or before training began; {type(exc).__name__}): nothing saved "
                 "since the last checkpoint")
    if rank_zero_only.rank == 0:
        write_run_summary({"status": "interrupted", **info, **getattr(exc, "progress", {}), "error": error,
                           "graceful_stop": saved}, output_dir)
    if saved:
        return _exit_code(saved["signal"])
    return _exit_code("SIGTERM") if sigterm else None


def run(cfg: DictConfig) -> float | None:
    """Trains, writes ``summary.json`` and ``summary.md`` to ``cfg.output_dir``; returns the sweep metric.

    A failure is logged (its traceback into the run's log file) and written to the summary with
    its root cause, then re-raised; in a sweep it is not re-raised, so the other jobs run and the sweep
    ends with its table and a non-zero exit (:class:`hetrain.report.SweepSummary`), not a traceback.
    An ``optimized_metric`` that names none of the validation's metrics fails a sweep's job the same way,
    after training, its measurements kept in the summary; a single run only warns, its value going nowhere.
    A signal ends a sweep in this job: its table is written first. So does a failure under DDP, on any rank: the
    process group the next job would reuse is broken. Under DDP each rank learns every other's outcome; one that
    failed after the last collective fails the run on every rank (exit code 1).
    """
    global _fit
    _end_with_launcher()
    _fit = _FitState()  # before the handler, which reads it
    # Only the main thread may set signal handlers. The other ranks of a DDP fit keep the default: rank 0's end
    # sends them SIGTERM (_end_with_launcher), which must end one blocked in a collective or in connecting to rank
    # 0, where a Python handler would only run once that call returned.
    try:
        if threading.current_thread() is not threading.main_thread() or rank_zero_only.rank != 0:
            return _run(cfg)
        previous = signal.signal(signal.SIGTERM, _sigterm_ends_the_run)
        try:
            value = _run(cfg)
        finally:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
    finally:
        _fit.ended.set()
    if _fit.sigterm:  # recorded after _run last looked (freeing a failed job's model, returning): it ends here
        log.warning(f"hetrain: {_SIGTERM_AFTER_FIT}")
        _end_stopped_sweep()
        raise SystemExit(_exit_code("SIGTERM"))
    return value


def _sigterm_ends_the_run(signum: int, frame: FrameType | None) -> None:
    """SIGTERM outside Lightning's and GracefulStop's handlers (config checks, building the parts, the data's setup
    inside the fit): ends the run as a SIGTERM in the fit does, its summary written, exit 143. Python's default
    handler killed the process there with no summary, and a sweep's table lost this job and those after it.

    Once the fit has returned, the signal is only recorded: raised there it cut the summary short (or left none) and
    lost what was trained; _run writes the whole summary, marked interrupted, then exits 143.

    Lightning's handler, installed for the training, calls this one after its own: it is then in charge (it sets the
    flag its loops stop at), and this one does nothing.
    """
    if signal.getsignal(signal.SIGTERM) is not _sigterm_ends_the_run:
        return
    if _fit.returned:
        _fit.sigterm = True
        return
    # With the code: a SystemExit that escapes run()'s handling still exits 143, not 0.
    raise SIGTERMException(_exit_code("SIGTERM"))


def _run(cfg: DictConfig) -> float | None:
    # Hydra's directory, which a valid output_dir is (_check_output_dir): the summary of a run refused for another
    # output_dir goes where its log is and a sweep's table looks, not over another run's.
    output_dir = Path(HydraConfig.get().runtime.output_dir if HydraConfig.initialized() else cfg.output_dir)
    info = _run_info()
    rank_logs_before = _rank_logs(info.get("log"))
    run_number = _fit.run = next(_runs)
    try:
        summary = {"status": "ok", **info, **train(cfg)}
    except (KeyboardInterrupt, SystemExit) as exc:  # Lightning turns a Ctrl-C it stops at once into exit(1)
        _tell_other_ranks(run_number, f"interrupted ({type(exc).__name__})", info.get("log"), leaves_sweep=True)
        code = _record_interruption(exc, info, output_dir)
        _end_stopped_sweep()
        if code is not None:
            raise SystemExit(code) from exc  # Lightning's SIGTERMException, a SystemExit with no code, would exit 0
        raise
    except Exception as exc:
        cause = _root_cause(exc)
        error = f"{type(cause).__name__}: {cause}"
        _log_failure(exc, error, info.get("log"))
        # A failure in the config's checks happens alike on every rank, and one after the fit returned leaves the
        # others' collectives whole: only one between them (build(), the fit) ends a DDP sweep.
        in_group = _tell_other_ranks(run_number, error, info.get("log"), leaves_sweep=_fit.running)
        if rank_zero_only.rank == 0:
            # The logs name a rank that failed first; one that failed before this run looked at them (a sweep's
            # rank 1 failing its job's build while rank 0 still wrote the last job's summary) told the store.
            chain = _chain_text(exc)
            other_ranks = _other_ranks(chain, info.get("log"), rank_logs_before) or (
                _told_failures(run_number) if _peer_ended(chain) else {})
            if other_ranks:
                log.error("hetrain: another rank ended first; their logs say: "
                          + "; ".join(f"{name}: {ended}" for name, ended in other_ranks.items()))
            write_run_summary({"status": "failed", **info, "error": error,
                               **({"other_ranks": other_ranks} if other_ranks else {})}, output_dir)
        if in_group and _fit.running:
            _end_broken_sweep()
        if _fit.sigterm:  # a SIGTERM after the fit, then this failure: the run still ends as the signal asked (143)
            _end_stopped_sweep()
            raise SystemExit(_exit_code("SIGTERM")) from exc
        if _fit.signal_after_last_step and _in_sweep():  # the failed job's row is written; the signal ends the sweep
            _end_stopped_sweep()
            raise SystemExit(_exit_code(_fit.signal_after_last_step)) from exc
        if not _in_sweep():
            raise
        summary = None
    if summary is None:  # a sweep's failed job, its exception and traceback gone with the except clause
        # The failed fit's trainer, model and data hang in reference cycles: freed now, not during the next job.
        gc.collect()
        return _failed_job_value()
    failed_ranks, ranks_left = _failed_other_ranks(run_number, info.get("log"))
    stopped = summary.get("graceful_stop") or {}
    if stopped:
        summary.update(status="interrupted", error=_go_on_from(stopped))
    if failed_ranks:
        log.error("hetrain: this rank finished, but another rank failed after the last collective; they "
                  "say: " + "; ".join(f"{name}: {ended}" for name, ended in failed_ranks.items()))
        summary.update(status="failed", error=next(iter(failed_ranks.values())), other_ranks=failed_ranks)
    missing_metric = None if stopped or failed_ranks else _missing_metric(cfg, summary["metrics"])
    if _fit.sigterm and not (stopped or failed_ranks):  # the training is whole: only the run's status says so
        summary.update(status="interrupted", error=_SIGTERM_AFTER_FIT)
        missing_metric = None
    if missing_metric and not _in_sweep():  # a single run's value goes to no sweeper: said, and the run stays ok
        log.warning(f"{missing_metric} (a sweep would fail this job)")
        summary["warning"], missing_metric = missing_metric, None
    if missing_metric:  # the job trained: its measurements stay in the summary, beside the error
        summary.update(status="failed", error=f"ValueError: {missing_metric}")
    if rank_zero_only.rank == 0:  # under DDP every rank runs this; one summary per run, with every rank's samples
        text = write_run_summary(summary, output_dir)
        log.info(f"Summary ({output_dir / SUMMARY_MD}):\n{text}")
    if failed_ranks and (ranks_left or not _in_sweep()):
        _end_broken_sweep()
        raise SystemExit(1)
    if stopped:  # GracefulStop logged where the run stopped and how to go on
        _end_stopped_sweep()
        raise SystemExit(_exit_code(stopped["signal"]))
    if _fit.sigterm:  # also one that came while the summary was written, which then says ok
        log.warning(f"hetrain: {_SIGTERM_AFTER_FIT}")
        _end_stopped_sweep()
        raise SystemExit(_exit_code("SIGTERM"))
    late = _fit.signal_after_last_step
    if late and _in_sweep():  # the job completed and says so; a single run ends ok (exit 0)
        log.warning(f"hetrain: {late} during or after this job's last training step: the job completed, and the "
                    f"sweep ends here (exit {_exit_code(late)}), its later jobs not started")
        _end_stopped_sweep()
        raise SystemExit(_exit_code(late))
    if failed_ranks:  # every failed rank goes on to the sweep's next job, as this one does
        return _failed_job_value()
    if missing_metric:
        log.error(f"{_FAILED}{missing_metric}")
        return _failed_job_value()
    return summary["metrics"].get(cfg.optimized_metric)


def _failed_job_value() -> None:
    """What a failed job of a sweep returns: None, which Hydra's basic sweeper ignores, so the other jobs run.

    A sweeper that optimises the value (Optuna) refuses None, and NaN, and ends the sweep with its own words,
    ``Return value must be float-castable``: the log says why just before.
    """
    hydra_cfg = HydraConfig.get()
    sweeper = hydra_cfg.sweeper.get("_target_")
    if sweeper != BASIC_SWEEPER:
        log.error(f"hetrain: this failed job gives {sweeper} no value of optimized_metric; a sweeper that "
                  "optimises it (Optuna's) then ends the sweep with 'Return value must be float-castable'. The "
                  f"job's error is above, every job's row in {Path(hydra_cfg.sweep.dir) / SUMMARY_MD}")
    return None


def _end_stopped_sweep() -> None:
    """In a sweep, a signal ends the whole process from inside this job: Hydra calls no callback on the way out
    (it catches only ``Exception``), so the sweep's table is written here, this job and those not started in it."""
    if _in_sweep() and rank_zero_only.rank == 0:
        write_stopped_sweep(HydraConfig.get())


def _end_broken_sweep() -> None:
    """Ends a sweep after a job that failed under DDP: its process group stays initialised for the next job (Lightning
    reuses it) but a connection of it is broken or a rank is gone, so every later job failed at once with a
    collective's "Connection reset by peer", hiding the first job's cause. The jobs not started are listed so."""
    if _in_sweep():
        if rank_zero_only.rank == 0:
            write_stopped_sweep(HydraConfig.get(), reason=_BROKEN_GROUP)
        raise SystemExit(1)


# How the ranks learn each other's outcome: through the process group's store (a key-value server in rank 0), not a
# collective. A rank that failed mid-step cannot join a final all-reduce: the others are inside another collective
# (the gradients'), which would take the flag's bytes for its own (gloo aborts the process on the size mismatch) or
# wait for it for good. Through the store a rank that failed only writes and never waits; one that finished reads
# every other's outcome, waiting up to _OUTCOME_WAIT_S: only an error after the last collective (in on_fit_end,
# teardown) leaves a rank finished while another failed, and that rank then says so at once.
# Whether rank 0 then ends a sweep follows what the failed rank does, as the ranks must stay in step job by job:
# one that failed inside its fit (on_fit_end), was interrupted, or never told (killed) has left the sweep, so the
# next job's collectives would wait for it: rank 0 ends the sweep (the rank ends with it). One that failed after its
# fit returned (its summary) goes on to the next job with the group whole: so does rank 0, the job failed.
def _tell_other_ranks(run_number: int, error: str | None, log_file: str | None, leaves_sweep: bool = False) -> bool:
    """Writes this rank's outcome of run ``run_number`` for the other ranks, and whether it leaves the sweep there;
    False outside a process group of several ranks (nothing to tell, and no group a failure could have broken)."""
    if not _in_group():
        return False
    rank = dist.get_rank()
    # Under torchrun every rank logs to the same file: the rank says which one failed.
    name = f"rank {rank} ({Path(log_file).name})" if log_file else f"rank {rank}"
    outcome = {"rank": name, "error": error, "leaves_sweep": leaves_sweep}
    try:
        _store().set(_outcome_key(run_number, rank), json.dumps(outcome))
    except RuntimeError as exc:  # rank 0, which holds the store, has ended: it does not need this rank's outcome
        log.warning(f"hetrain: could not tell the other ranks how this rank ended ({type(exc).__name__}: {exc})")
    return True


def _failed_other_ranks(run_number: int, log_file: str | None) -> tuple[dict[str, str], bool]:
    """Tells the other ranks this one finished run ``run_number``; on rank 0, which writes the summary and whose exit
    the run's is, returns those that failed it (their rank and log's name, and error) and whether one of them left
    the sweep. Other ranks do not wait: rank 0, holding the store, may have read their outcome and ended before they
    could read its own (a rank 0 that fails after the last collective ends the sweep, and a rank left in it ends
    with its launcher)."""
    if not _tell_other_ranks(run_number, None, log_file) or dist.get_rank() != 0:
        return {}, False
    failed, left = {}, False
    deadline = time.monotonic() + _OUTCOME_WAIT_S
    for rank in range(dist.get_world_size()):
        if rank == dist.get_rank():
            continue
        key = _outcome_key(run_number, rank)
        try:
            untold = _wait_for_outcome(key, rank, deadline)
            if untold is None:
                outcome = _read_outcome(key)
        except RuntimeError as exc:  # the store cannot be read
            untold = f"no outcome from rank {rank} ({type(exc).__name__}: {exc}; killed? see the end of its log)"
        if untold is not None:
            failed[f"rank {rank}"], left = untold, True
            continue
        if outcome["error"] is not None:
            failed[outcome["rank"]] = outcome["error"]
            left = left or outcome["leaves_sweep"]
    return failed, left


def _wait_for_outcome(key: str, rank: int, deadline: float) -> str | None:
    """Waits for ``rank``'s outcome under ``key`` until ``deadline`` (``time.monotonic()``), or, for a rank this
    process launched, until it has exited without telling it (killed: the OOM killer, SIGKILL); None once told, else
    why not. A rank this process did not launch (torchrun, another node) is waited for up to the deadline."""
    launched = _launched[rank - 1] if 0 < rank <= len(_launched) else None
    exited_at = None
    while not _store().check([key]):
        now = time.monotonic()
        if exited_at is not None and now - exited_at > _TOLD_BEFORE_EXIT_S:
            return (f"rank {rank} ended with {exit_text(launched.returncode)} without telling how its run ended "
                    "(killed? see the end of its log)")
        if now > deadline:
            return (f"no outcome from rank {rank} within {_OUTCOME_WAIT_S:.0f} s of this rank finishing (killed? "
                    "see the end of its log)")
        if exited_at is None and launched is not None and launched.poll() is not None:
            exited_at = now
        time.sleep(_OUTCOME_POLL_S)
    return None


def _told_failures(run_number: int, wait_s: float = 5.0) -> dict[str, str]:
    """The failures of run ``run_number`` other ranks have told through the store, waiting up to ``wait_s`` for the
    first: the rank whose failure closed this one's connection logs it and tells the store a moment later."""
    if not _in_group():
        return {}
    deadline = time.monotonic() + wait_s
    while True:
        told = {}
        for rank in range(dist.get_world_size()):
            key = _outcome_key(run_number, rank)
            try:
                if rank == dist.get_rank() or not _store().check([key]):
                    continue
                outcome = _read_outcome(key)
            except RuntimeError:  # the store cannot be read: the logs said what they could
                return {}
            if outcome["error"] is not None:
                told[outcome["rank"]] = outcome["error"]
        if told or time.monotonic() > deadline:
            return told
        time.sleep(0.1)


def _in_group() -> bool:
    """Whether this process is one rank of a process group of several."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _read_outcome(key: str) -> dict[str, Any]:
    """A rank's outcome as :func:`_tell_other_ranks` wrote it."""
    return json.loads(_store().get(key))


def _store() -> dist.Store:
    return dist.distributed_c10d._get_default_store()


def _outcome_key(run_number: int, rank: int) -> str:
    return f"hetrain/outcome/{run_number}/{rank}"
