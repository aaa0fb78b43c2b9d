"""Puts each stage of a model on the device a plan names, and moves activations between stages.

The plan is a plain ``{module_path: device}`` mapping, e.g. ``{"embeddings": "cpu", "encoder":
"cuda:0", "classifier": "cuda:0"}``. A path names a stage (``encoder.1``) or a group of stages
(``encoder`` covers ``encoder.0``, ``encoder.1``, ...); the most specific path wins. Stages are run one
after another; a pipeline split that overlaps them builds on the same plan.

``plan="auto"`` measures every stage on every device of this machine at the run's batch shape
(:mod:`hetrain.placement.cost_model`), solves the chain exactly (:func:`hetrain.placement.chain_dp`),
logs the plan with its predicted step time and saves it (and the measurements) in the run directory,
where it can be reused as an explicit plan.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from torch import nn
from torch.utils.hooks import RemovableHandle
from typing_extensions import override

from hetrain.placement import CostModel, PlacementPlan, available_devices, measure
from hetrain.placement.chain import OBJECTIVES
from hetrain.placement.pipeline import shared_across_devices, stage_device, to_device
from hetrain.placement.plan import parse_device, resolve_plan

log = logging.getLogger(__name__)


# The placement hook each stage has now, whichever StagePlacement made it: a stage keeps one, the latest
# plan's, so placing a model again (another plan, another Trainer) does not stack hooks that would move its
# inputs through every device it was ever planned on.
_INPUT_HOOKS: weakref.WeakKeyDictionary[nn.Module, RemovableHandle] = weakref.WeakKeyDictionary()


def _hook_inputs(stage: nn.Module, device: torch.device) -> RemovableHandle:
    """Replaces ``stage``'s placement hook with one that brings its inputs to ``device``."""
    previous = _INPUT_HOOKS.pop(stage, None)
    if previous is not None:
        previous.remove()
    handle = stage.register_forward_pre_hook(_inputs_to(device), with_kwargs=True)
    _INPUT_HOOKS[stage] = handle
    return handle


def _inputs_to(device: torch.device):
    """A forward pre-hook that brings a stage's tensor inputs to its device (see :func:`to_device`)."""

    def move(x):
        return to_device(x, device) if isinstance(x, torch.Tensor) else x

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return tuple(move(a) for a in args), {k: move(v) for k, v in kwargs.items()}

    return hook


class StagePlacement(Callback):
    """Moves the stages of ``pl_module.stages()`` to the devices of ``plan`` once Lightning has set up.

    Example::

        plan = {"embeddings": "cpu", "encoder": "cuda:0", "classifier": "cuda:0"}
        Trainer(callbacks=[StagePlacement(plan)])

    Notes:
        Lightning first puts the whole module on its root device; stages the plan does not cover
        stay there. Every stage gets a forward pre-hook that brings its tensor inputs to its
        device, so the model's own forward needs no device code; placing a stage again (this plan
        or another's) replaces its hook, and teardown removes it. A planned device that is not
        present (no GPU, fewer GPUs) is replaced by ``fallback``, said in one log line.

    Args:
        plan: ``{module_path: device}``, paths relative to the model (``embeddings``, ``encoder.0``),
            or ``"auto"`` to measure and solve (the module then needs ``placement_inputs(batch)``).
        fallback: device for stages whose planned device is absent.
        objective: for ``"auto"``: ``"sequential"`` (stages one after another) or ``"pipeline"``.
        micro_batches: for ``"auto"`` with the pipeline objective.
        save_dir: for ``"auto"``: where ``placement_plan.yaml`` and ``placement_costs.json`` go.
        predict: for an explicit plan: measure too, and log and summarise the plan's predicted step time
            beside the plan ``"auto"`` would choose and its prediction, so the cost of a placement shows.
    """

    def __init__(self, plan: Mapping[str, str] | str | None = None, fallback: str = "cpu",
                 objective: str = "sequential", micro_batches: int = 1, save_dir: str | None = None,
                 predict: bool = False) -> None:
        if isinstance(plan, str) and plan != "auto":
            raise ValueError(f"hetrain: placement plan must be a {{module_path: device}} mapping or 'auto', "
                             f"got {plan!r}")
        self.plan = plan if plan == "auto" else dict(plan or {})
        if isinstance(self.plan, dict):
            for path, device in self.plan.items():
                parse_device(device, f"placement of {path!r}")
        parse_device(fallback, "placement fallback")
        if objective not in OBJECTIVES:
            raise ValueError(f"hetrain: placement objective {objective!r} is not one of {OBJECTIVES}")
        if not isinstance(micro_batches, int) or micro_batches < 1:
            raise ValueError(f"hetrain: placement micro_batches must be an integer >= 1, got {micro_batches!r}")
        self.fallback = fallback
        self.objective, self.micro_batches, self.save_dir = objective, micro_batches, save_dir
        self.predict = predict
        self.devices: dict[str, torch.device] | None = None
        self.summary: dict[str, Any] = {}
        self._hooks: dict[str, RemovableHandle] = {}

    def measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> CostModel:
        """Times every stage on every device of this machine with one validation batch."""
        batch = _first_batch(trainer.datamodule.val_dataloader())
        make_input, stage_args = pl_module.placement_inputs(batch)
        return measure(pl_module.stages(), make_input, available_devices(), stage_args, warmup=1, repeats=3)

    def solve(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> PlacementPlan:
        """Measures the stages on this machine's devices and solves the chain."""
        costs = self.measure(trainer, pl_module)
        plan = costs.chain_plan(objective=self.objective, micro_batches=self.micro_batches)
        predicted_ms = None if plan.predicted_step_time is None else round(plan.predicted_step_time * 1e3, 3)
        log.info(f"placement auto ({plan.method}, {self.objective}): {plan.devices}; predicted forward+backward "
                 f"{predicted_ms} ms per batch")
        if self.save_dir is not None:
            plan.save(Path(self.save_dir) / "placement_plan.yaml")
            costs.save(Path(self.save_dir) / "placement_costs.json")
        self.summary = {"method": plan.method, "predicted_step_time_ms": predicted_ms, **{
            f"plan.{path}": device for path, device in plan.devices.items()}}
        return plan

    def place(self, stages: Mapping[str, nn.Module]) -> dict[str, torch.device]:
        """Moves the stages (again, if Lightning moved them back) and hooks them; returns their devices."""
        if self.devices is None:
            if self.plan == "auto":
                raise RuntimeError("hetrain: placement 'auto' is solved at fit start; call solve() first")
            self.devices, note = resolve_plan(self.plan, list(stages), self.fallback)
            if note:
                log.info(note)
        planned = {name: self.devices.get(name, stage_device(stage)) for name, stage in stages.items()}
        clashes = shared_across_devices(list(stages.items()), planned)
        if clashes:
            pairs = "; ".join(f"{a} (module {a.rpartition('.')[0]}) and {b} (module {b.rpartition('.')[0]})"
                              for a, b in clashes)
            raise ValueError(f"hetrain: parameters shared by stages placed on different devices: {pairs}. Put those "
                             f"stages on one device (the shared parameter then collects both uses' gradients), or "
                             f"untie the weights")
        placed = {}
        for name, stage in stages.items():
            device = self.devices.get(name)
            if device is None:
                device = next(stage.parameters()).device
            else:
                stage.to(device)
            self._hooks[name] = _hook_inputs(stage, device)
            placed[name] = device
        return placed

    def compare(self, trainer: pl.Trainer, pl_module: pl.LightningModule, placed: Mapping[str, torch.device]) -> None:
        """Logs and summarises the placed plan's predicted step time beside the plan ``auto`` would choose."""
        costs = self.measure(trainer, pl_module)
        try:
            mine = costs.predict({name: str(device) for name, device in placed.items()}, self.objective,
                                 self.micro_batches)
        except ValueError as exc:  # a plan the model has no time for (two stages on one device in a pipeline)
            log.warning(f"placement: this plan has no predicted time: {exc}")
            mine = None
        best = costs.chain_plan(objective=self.objective, micro_batches=self.micro_batches)
        ms = None if mine is None else round(mine * 1e3, 3)
        best_ms = None if best.predicted_step_time is None else round(best.predicted_step_time * 1e3, 3)
        log.info(f"placement: this plan predicts {ms} ms per batch forward+backward; auto would choose "
                 f"{best.devices} at {best_ms} ms")
        self.summary = {"method": "explicit", "predicted_step_time_ms": ms, "auto_predicted_step_time_ms": best_ms,
                        **{f"auto.{path}": device for path, device in best.devices.items()}}

    def _place(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.plan == "auto" and self.devices is None:
            self.plan = self.solve(trainer, pl_module).devices
        placed = self.place(pl_module.stages())
        if self.predict and self.plan != "auto" and not self.summary and trainer.state.fn == "fit":
            self.compare(trainer, pl_module, placed)

    # Each entry point (fit, validate, test, predict) sets the module up on Lightning's root device
    # first; placing runs after that and is a no-op when nothing moved.
    on_fit_start = override(_place)
    on_validation_start = override(_place)
    on_test_start = override(_place)
    on_predict_start = override(_place)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for handle in self._hooks.values():
            handle.remove()
        self._hooks.clear()


def _first_batch(loader: Any) -> Any:
    """One batch from a loader, closing its iterator (a ring loader's producers) right after."""
    iterator = iter(loader)
    try:
        return next(iterator)
    finally:
        close = getattr(iterator, "close", None) or getattr(loader, "close", None)
        if callable(close):
            close()
