"""Puts each stage of a model on the device a plan names, and moves activations between stages.

The plan is a plain ``{module_path: device}`` mapping, e.g. ``{"embeddings": "cpu", "encoder":
"cuda:0", "classifier": "cuda:0"}``. A path names a stage (``encoder.1``) or a group of stages
(``encoder`` covers ``encoder.0``, ``encoder.1``, ...); the most specific path wins. Stages are run one
after another; a pipeline split that overlaps them builds on the same plan.

``plan="auto"`` measures every stage on every device of this machine at the run's batch shape and precision
(:mod:`hetrain.placement.cost_model`), solves the chain exactly (:func:`hetrain.placement.chain_dp`),
logs the plan with its predicted step time and saves it (and the measurements) in the run directory,
where it can be reused as an explicit plan: ``plan=<run dir>/placement_plan.yaml``. Under several processes
(DDP) global rank 0 alone measures, solves and saves, and every rank places its plan; each process splits its
share of the batch over its own devices, so rank 0 measures the CPU and its own GPU, named ``cuda`` (each rank's
own), and a plan that puts a stage on a GPU other than the process's own (``cuda:0`` in a process on ``cuda:1`` or
under ``trainer.accelerator=cpu``) is refused, in every process alike; under ``trainer.accelerator=cpu`` a stage on
``cuda`` (the process's own GPU, which it has none of) goes to the fallback, as an absent device does.
"""

from __future__ import annotations

import logging
import math
import traceback
from collections.abc import Callable, Iterator, Mapping, MutableMapping
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from torch import nn
from torch.utils._pytree import tree_leaves, tree_map_only
from torch.utils.data import DataLoader
from torch.utils.hooks import RemovableHandle
from typing_extensions import override

from hetrain.callbacks.pipeline import PipelineSplit
from hetrain.callbacks.random_state import _generator_state, _set_generator_state
from hetrain.placement import CostModel, PlacementPlan, available_devices, measure
from hetrain.placement.chain import OBJECTIVES
from hetrain.placement.pipeline import micro_batch_count, shared_across_devices
from hetrain.placement.plan import (
    flatten_plan,
    held_device,
    hook_inputs,
    parse_device,
    read_plan,
    refuse_other_processes_devices,
    resolve_plan,
)
from hetrain.report import save_whole

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class RunCosts:
    """Measured stage costs, read as the run will execute a plan, so a prediction is of the step that runs.

    ``whole`` holds the stages' costs on the whole batch; ``micro``, measured for the pipeline objective where
    this machine has several devices (or the split cuts a batch on one device too), on one micro-batch. There a
    plan over several devices runs as ``micro_batches`` micro-batches in a GPipe schedule, priced from ``micro``. A
    plan on one device runs each batch whole (``PipelineSplit`` does not cut a batch whose stages share a device:
    micro-batches there cannot overlap), priced from ``whole``, as is every plan under the sequential objective.
    Pricing it as pipelined micro-batches would pay per-call costs ``micro_batches`` times, and on a GPU a small
    micro-batch takes about as long as the whole batch; where the split cuts it anyway (``split_on_one_device``, the
    ``PipelineSplit``'s) it is priced so, from ``micro``. ``micro_batches`` is the count the split cuts the measured
    batch into (no more than its rows).

    ``weightless`` names the stages holding no parameters or buffers: placing does not move one, it runs where its
    input is, so a plan is read with each of them on the device of the stage it follows (leading ones: the stage
    after them), and the solver places them with that stage (:meth:`CostModel.merge_weightless`).
    """

    whole: CostModel
    micro: CostModel | None = None
    micro_batches: int = 1
    weightless: tuple[str, ...] = ()
    split_on_one_device: bool = False

    def executed(self, devices: Mapping[str, str]) -> dict[str, str]:
        """Each stage's device under ``{path: device}`` (group paths allowed) as the run places it: a stage without
        weights on the device of the stage it is merged into."""
        planned = dict(zip(self.whole.stages, self.whole.stage_devices(devices), strict=True))
        _, runs_in = self.whole.merge_weightless(self.weightless)
        return {stage: planned[runs_in[stage]] for stage in self.whole.stages}

    def split(self, devices: Mapping[str, str]) -> bool:
        """Whether the run cuts each batch into micro-batches under this plan: as ``PipelineSplit``, where the
        stages with weights are on several devices, or on any with ``split_on_one_device``. Devices are told apart
        as the run places them, not by name: ``cuda`` and ``cuda:0`` are one GPU."""
        if self.micro is None:
            return False
        return self.split_on_one_device or len(set(self.whole.device_indices(self.executed(devices)))) > 1

    def predict(self, devices: Mapping[str, str]) -> float:
        """Predicted forward + backward seconds per batch of ``{path: device}`` (group paths allowed), as executed."""
        devices = self.executed(devices)
        if self.split(devices):
            return self.micro.predict(devices, "pipeline", self.micro_batches)
        return self.whole.predict(devices)

    def best_plan(self) -> PlacementPlan:
        """The fastest plan: the exact chain solver's, or where batches may be split the fastest of every one-device
        plan (run whole) and the best plan over several devices (run in micro-batches). The solver's own pipeline
        optimum may be a one-device plan priced as micro-batches, which the run never executes. The solvers see
        each stage without weights merged into the one it runs with, so they choose among plans that run as placed."""
        whole, runs_in = self.whole.merge_weightless(self.weightless)
        if self.micro is None:
            plan = whole.chain_plan()
            return PlacementPlan(_expand(plan.devices, runs_in), plan.method, plan.predicted_step_time)
        candidates = [dict.fromkeys(self.whole.stages, device) for device in self.whole.devices]
        split = self.micro.merge_weightless(self.weightless)[0].multi_device_plan(self.micro_batches)
        if split is not None:
            candidates.append(_expand(split.devices, runs_in))
        seconds, devices = min(((self.predict(c), c) for c in candidates), key=lambda pair: pair[0])
        if math.isinf(seconds):
            raise ValueError("hetrain: no placement has a finite predicted time: every device fails a stage on the "
                             "whole batch (a one-device plan runs it whole) and no plan over several devices runs "
                             "every stage; the cost models' errors say why each stage failed where")
        return PlacementPlan(devices, "chain-dp", seconds)

    def save(self, directory: Path) -> None:
        """``placement_costs.json`` (whole batch) and, when measured, ``placement_costs_micro.json``."""
        save_whole(directory / "placement_costs.json", self.whole.save)
        if self.micro is not None:
            save_whole(directory / "placement_costs_micro.json", self.micro.save)


def _expand(merged: Mapping[str, str], runs_in: Mapping[str, str]) -> dict[str, str]:
    """A plan for merged stages as one for every stage: each on the device of the stage it runs in."""
    return {stage: merged[head] for stage, head in runs_in.items()}


class StagePlacement(Callback):
    """Moves the stages of ``pl_module.stages()`` to the devices of ``plan`` once Lightning has set up.

    Example::

        plan = {"embeddings": "cpu", "encoder": "cuda:0", "classifier": "cuda:0"}
        Trainer(callbacks=[StagePlacement(plan)])

    Notes:
        Lightning first puts the whole module on its root device; stages the plan does not cover
        stay there. Every stage gets a forward pre-hook that brings its tensor inputs to the device
        the stage is on when it runs, so the model's own forward needs no device code; placing a
        stage again (this plan or another's, or ``PlacementPlan.apply``) adds none. The hooks this
        callback added come off at teardown, or when the fit raises (TorchScript cannot script a model that has
        them); those ``PlacementPlan.apply`` added stay, until ``hetrain.placement.remove_input_hooks(model)``. A
        resumed fit's optimizer state, which Lightning restores onto its root device, goes back to each parameter's
        device at train start. A stage without weights is not moved and runs where its input is. A planned device
        that is not present (no GPU, fewer GPUs) is replaced by ``fallback``, said in one log line, as is under
        several processes on the CPU a GPU written without an index (``cuda``: the process's own, which none has);
        the meta device (shapes, no data) is refused.

    Args:
        plan: ``{module_path: device}``, paths relative to the model (``embeddings``, ``encoder.0``; nested
            mappings read as dotted paths), the path of a plan file (``.yaml``/``.yml``/``.json``, e.g. the
            ``placement_plan.yaml`` an ``"auto"`` run saved), or ``"auto"`` to measure and solve (the module
            then needs ``placement_inputs(batch)``).
        fallback: device for stages whose planned device is absent.
        objective: for ``"auto"``: ``"sequential"`` (stages one after another) or ``"pipeline"`` (a plan over
            several devices runs in micro-batches, as ``PipelineSplit`` does; see :class:`RunCosts`).
        micro_batches: for ``"auto"`` with the pipeline objective: the ``PipelineSplit``'s.
        save_dir: for ``"auto"``: where ``placement_plan.yaml`` and ``placement_costs*.json`` go.
        predict: for an explicit plan: measure too, and log and summarise the plan's predicted step time
            beside the plan ``"auto"`` would choose and its prediction, so the cost of a placement shows.
    """

    def __init__(self, plan: Mapping[str, str] | str | None = None, fallback: str = "cpu",
                 objective: str = "sequential", micro_batches: int = 1, save_dir: str | None = None,
                 predict: bool = False) -> None:
        self.plan = read_plan(plan)
        # The file an explicit plan was read from, named where the plan is refused (a plan an older run saved).
        from_file = isinstance(plan, str | Path) and plan != "auto"
        self.plan_file = str(Path(plan).expanduser().resolve()) if from_file else None
        parse_device(fallback, "placement fallback")
        if objective not in OBJECTIVES:
            raise ValueError(f"hetrain: placement objective {objective!r} is not one of {OBJECTIVES}")
        if isinstance(micro_batches, bool) or not isinstance(micro_batches, int) or micro_batches < 1:
            raise ValueError(f"hetrain: placement micro_batches must be an integer >= 1, got {micro_batches!r}")
        self.fallback = fallback
        self.objective, self.micro_batches, self.save_dir = objective, micro_batches, save_dir
        self.predict = predict
        self.devices: dict[str, torch.device] | None = None
        self.summary: dict[str, Any] = {}
        self._hooks: list[RemovableHandle] = []  # the input hooks this callback added, removed when the fit ends

    def measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> RunCosts:
        """Times every stage on every device of this machine (under DDP, this process's own: the CPU and its GPU) on
        one batch of the run's data (validation's where it has some): whole, and under the pipeline objective with
        several devices here also its first micro-batch (see :class:`RunCosts`)."""
        batch = _first_batch(_measuring_loader(trainer))
        weightless = tuple(name for name, stage in pl_module.stages().items() if held_device(stage) is None)
        split = next((c for c in trainer.callbacks if isinstance(c, PipelineSplit)), None)
        split_on_one_device = split is not None and split.split_on_one_device
        if split is not None:
            _warn_unpriced_recompute(split.checkpointed(list(pl_module.stages())))
        # placement_inputs and the stages may draw from numpy or random too: placement.measure keeps torch's only.
        with _generators_kept():
            make_input, stage_args = pl_module.placement_inputs(batch)
            whole = _time_stages(trainer, pl_module, make_input, stage_args)
            if self.objective == "sequential" or (len(whole.devices) == 1 and not split_on_one_device):
                return RunCosts(whole, weightless=weightless)
            # The split cuts a batch of fewer rows than micro_batches into one piece per row (micro_batch_count);
            # the run's PipelineSplit, where there is one, says how many micro-batches the step runs.
            wanted = self.micro_batches if split is None else split.micro_batches
            pieces = micro_batch_count(_rows(make_input()), wanted)
            micro = _time_stages(trainer, pl_module, *_first_micro_batch(make_input, stage_args, pieces))
            return RunCosts(whole, micro, pieces, weightless, split_on_one_device)

    def solve(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> PlacementPlan:
        """Measures the stages on this machine's devices and solves the chain. Under several processes global rank 0
        alone measures (the others' timings would contend with its own on shared devices), solves and saves, and its
        plan is broadcast: every rank places the same plan, and the saved files are that plan's."""
        plan, micro_batches = _on_global_zero(trainer, lambda: self._solve_here(trainer, pl_module))
        predicted_ms = _ms(plan.predicted_step_time)
        runs = f"in {micro_batches} micro-batches" if micro_batches > 1 else "whole"
        log.info(f"placement auto ({plan.method}, {self.objective}): {plan.devices}; predicted forward+backward "
                 f"{predicted_ms} ms per batch, run {runs}")
        self.summary = {"method": plan.method, "predicted_step_time_ms": predicted_ms, "micro_batches": micro_batches,
                        **{f"plan.{path}": device for path, device in plan.devices.items()}}
        return plan

    def _solve_here(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> tuple[PlacementPlan, int]:
        """This process's plan and the micro-batches it runs in, saved (with the measurements) in ``save_dir``."""
        costs = self.measure(trainer, pl_module)
        plan = costs.best_plan()
        if self.save_dir is not None:
            Path(self.save_dir).mkdir(parents=True, exist_ok=True)
            save_whole(Path(self.save_dir) / "placement_plan.yaml", plan.save)
            costs.save(Path(self.save_dir))
        return plan, costs.micro_batches if costs.split(plan.devices) else 1

    def place(self, stages: Mapping[str, nn.Module]) -> dict[str, torch.device]:
        """Moves the stages (again, if Lightning moved them back) and hooks them; returns their devices."""
        if self.devices is None:
            if self.plan == "auto":
                raise RuntimeError("hetrain: placement 'auto' is solved at fit start; call solve() first")
            self.devices = self._resolved(list(stages))
        planned = {name: self.devices.get(name) or held_device(stage) for name, stage in stages.items()}
        clashes = shared_across_devices(list(stages.items()), planned)
        if clashes:
            pairs = "; ".join(f"{a} (module {a.rpartition('.')[0]}) and {b} (module {b.rpartition('.')[0]})"
                              for a, b in clashes)
            raise ValueError(f"hetrain: parameters shared by stages placed on different devices: {pairs}. Put those "
                             f"stages on one device (the shared parameter then collects both uses' gradients), or "
                             f"untie the weights")
        placed, device = {}, torch.device("cpu")
        for name, stage in stages.items():
            if held_device(stage) is not None:  # one without weights runs on its input's device, the stage's before
                device = planned[name]
                stage.to(device)  # a no-op for a stage the plan leaves where it is
                if (handle := hook_inputs(stage)) is not None:
                    self._hooks.append(handle)
            placed[name] = device
        return placed

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # A resumed fit restores the optimizers after fit start, where the stages were placed, and Lightning then
        # moves all their state to its root device: a CPU stage's would sit on the GPU.
        for optimizer in trainer.optimizers:
            _state_to_parameter_devices(optimizer)

    def _remove_hooks(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._remove_hooks()

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # Lightning calls this, not teardown, when a fit raises: a later fit would find the hooks and keep them.
        self._remove_hooks()

    def compare(self, trainer: pl.Trainer, pl_module: pl.LightningModule, placed: Mapping[str, torch.device]) -> None:
        """Logs and summarises the placed plan's predicted step time beside the plan ``auto`` would choose. Under
        several processes global rank 0 alone measures, as for ``auto`` (:meth:`solve`), and broadcasts the times."""
        mine, best = _on_global_zero(trainer, lambda: self._compare_here(trainer, pl_module, placed))
        ms, best_ms = _ms(mine), _ms(best.predicted_step_time)
        log.info(f"placement: this plan predicts {ms} ms per batch forward+backward; auto would choose "
                 f"{best.devices} at {best_ms} ms")
        self.summary = {"method": "explicit", "predicted_step_time_ms": ms, "auto_predicted_step_time_ms": best_ms,
                        **{f"auto.{path}": device for path, device in best.devices.items()}}

    def _compare_here(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                      placed: Mapping[str, torch.device]) -> tuple[float | None, PlacementPlan]:
        """This process's predicted seconds for the placed plan (None where it has none) and the plan auto would
        choose."""
        costs = self.measure(trainer, pl_module)
        try:
            mine = costs.predict({name: str(device) for name, device in placed.items()})
        except ValueError as exc:  # a plan the model has no time for (two stages on one device in a pipeline)
            log.warning(f"placement: this plan has no predicted time: {exc}")
            mine = None
        return mine, costs.best_plan()

    def _resolved(self, stages: list[str], root_device: torch.device | None = None,
                  processes: int = 1) -> dict[str, torch.device]:
        """The plan's device for each stage it covers, an absent one (or under several processes on the CPU, a GPU
        written without an index) replaced by the fallback, said in one log line (see :func:`resolve_plan`)."""
        devices, note = resolve_plan(self.plan, stages, self.fallback, root_device, processes)
        if note:
            log.info(note)
        return devices

    def _resolved_in_this_process(self, trainer: pl.Trainer, stages: list[str]) -> dict[str, torch.device]:
        """:meth:`_resolved` for this process's root device, refusing under several processes a stage put on another
        process's GPU (see :func:`refuse_other_processes_devices`). Each process resolves to its own devices, so one
        may refuse where another does not (``cuda:0`` is rank 0's own GPU only): every process stops if one does,
        rather than the others waiting for it in the run's first collective."""
        failure, devices = None, {}
        root_device, processes = trainer.strategy.root_device, trainer.world_size
        try:
            devices = self._resolved(stages, root_device, processes)
            refuse_other_processes_devices(self.plan, devices, root_device, processes, self.plan_file)
        except ValueError as exc:
            failure = exc
        # Only a GPU named by index can be one process's own and not another's: then every process joins the
        # reduction, a refusing one too, before any of them raises. Otherwise all decide alike and no collective runs.
        may_differ = processes > 1 and _names_an_indexed_gpu(self.plan, self.fallback)
        refused_elsewhere = may_differ and trainer.strategy.reduce_boolean_decision(failure is not None, all=False)
        if failure is not None:
            raise failure
        if refused_elsewhere:
            raise ValueError("hetrain: another process (DDP) refused the placement plan, and every process stops with "
                             "it; that process's error says why")
        return devices

    def _place(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.plan == "auto" and self.devices is None:
            self.plan = self.solve(trainer, pl_module).devices
        if self.devices is None:
            self.devices = self._resolved_in_this_process(trainer, list(pl_module.stages()))
        placed = self.place(pl_module.stages())
        if self.predict and self.plan != "auto" and not self.summary and trainer.state.fn == "fit":
            self.compare(trainer, pl_module, placed)

    # Each entry point (fit, validate, test, predict) sets the module up on Lightning's root device
    # first; placing runs after that and is a no-op when nothing moved.
    on_fit_start = override(_place)
    on_validation_start = override(_place)
    on_test_start = override(_place)
    on_predict_start = override(_place)


@dataclass(frozen=True)
class _RankZeroFailure:
    """An exception raised on global rank 0, as text: the exception itself may not pickle (it holds a lambda) or not
    unpickle (its ``__init__`` takes other arguments than its ``args``), and the other ranks would raise a pickling
    error, or wait in the broadcast, instead of its message."""

    type_name: str
    message: str
    traceback: str

    @classmethod
    def of(cls, exc: BaseException) -> _RankZeroFailure:
        return cls(type(exc).__qualname__, str(exc), "".join(traceback.format_exception(exc)))

    def error(self) -> RuntimeError:
        """What the other ranks raise."""
        return RuntimeError(f"hetrain: placement failed on global rank 0 with {self.type_name}: {self.message}; "
                            f"its traceback (see rank 0's log too):\n{self.traceback}")


def _on_global_zero(trainer: pl.Trainer, work: Callable[[], T]) -> T:
    """``work()`` run on global rank 0 alone, its result broadcast to every rank. Where it fails, every rank fails
    rather than waiting in the broadcast: rank 0 with its own exception (even where the broadcast fails too), the
    others with a RuntimeError carrying rank 0's message and traceback. One process: ``work()``, as it is."""
    result: T | _RankZeroFailure | None = None
    failure: Exception | None = None
    if trainer.is_global_zero:
        try:
            result = work()
        except Exception as exc:
            failure, result = exc, _RankZeroFailure.of(exc)
    try:
        result = trainer.strategy.broadcast(result, src=0)
    except Exception:
        if failure is None:
            raise
    if failure is not None:
        raise failure
    if isinstance(result, _RankZeroFailure):
        raise result.error()
    return result


def _warn_unpriced_recompute(checkpointed: frozenset[str]) -> None:
    """The measured costs are forward + backward once; a stage ``PipelineSplit`` checkpoints runs its forward again in
    backward, which they cannot price (the forward is not timed alone), so the predictions are low by that much."""
    if checkpointed:
        log.warning(f"placement: PipelineSplit checkpoints {', '.join(sorted(checkpointed))}, whose forward runs "
                    "again in backward; the predicted step times leave that recompute out and are low by it")


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1e3, 3)


def _time_stages(trainer: pl.Trainer, pl_module: pl.LightningModule, make_input: Callable[[], Any],
                 stage_args: Callable[[str], tuple]) -> CostModel:
    """Each stage's forward + backward on each device, on the inputs ``placement_inputs`` made, under the run's
    precision: Lightning enters its plugin's forward context (autocast under ``bf16-mixed``, one per device type with
    hetrain's ``DeviceMixedPrecision``) around training's forward only, and fit start lies outside it."""
    return measure(pl_module.stages(), make_input, _devices_to_measure(trainer), stage_args, warmup=1, repeats=3,
                   forward_context=trainer.precision_plugin.forward_context)


def _names_an_indexed_gpu(plan: Mapping[str, object], fallback: str) -> bool:
    """Whether ``plan`` or ``fallback`` names an accelerator by index (``cuda:0``), the one thing processes may
    resolve differently (their own GPU in one, another's in the rest)."""
    names = [*flatten_plan(plan).values(), fallback]
    return any((device := parse_device(name, "placement")).type not in ("cpu", "meta") and device.index is not None
               for name in names)


def _devices_to_measure(trainer: pl.Trainer) -> list[str]:
    """Every device of this machine for one process. Under several (DDP) each splits its own share of the batch over
    its own devices: the CPU and its root device, the latter named by type (``cuda``), so that the plan rank 0
    solves and broadcasts puts each rank's stages on that rank's own GPU rather than on rank 0's."""
    if trainer.world_size <= 1:
        return available_devices()
    root = trainer.strategy.root_device
    return ["cpu"] if root.type == "cpu" else ["cpu", root.type]


def _rows(inputs: Any) -> int:
    """The rows (samples) of the first stage's inputs: its first tensor's first dimension."""
    return len(tree_leaves(inputs)[0])


def _state_to_parameter_devices(optimizer: torch.optim.Optimizer) -> None:
    """Puts each parameter's optimizer state on the parameter's device, but ``step``: torch's ``load_state_dict`` puts
    it where the optimizer wants it (on the CPU, or with ``fused``/``capturable`` on the parameter's device) and
    Lightning's move leaves it there."""
    for p, state in optimizer.state.items():
        move = partial(tree_map_only, torch.Tensor, partial(torch.Tensor.to, device=p.device))
        if isinstance(state, MutableMapping):
            for key in state.keys() - {"step"}:
                state[key] = move(state[key])
        else:  # a custom optimizer's state, which Lightning moves whole
            optimizer.state[p] = move(state)


def _first_micro_batch(make_input: Callable[[], Any], stage_args: Callable[[str], tuple],
                       pieces: int) -> tuple[Callable[[], Any], Callable[[str], tuple]]:
    """The stages' inputs cut to the rows the pipeline split gives its first micro-batch: it cuts the model's
    inputs with ``torch.tensor_split`` into ``pieces`` (``micro_batch_count``: at most one per row), the first
    ``ceil(rows / pieces)`` long. Only what the stages take is cut, and of it only tensors with a row per sample, as
    the split cuts them: the rest (a 0-d scale, say) every micro-batch gets whole."""
    first = make_input()
    rows = _rows(first)

    def cut(inputs: Any) -> Any:
        return tree_map_only(torch.Tensor, lambda t: torch.tensor_split(t, pieces)[0] if t.dim() and len(t) == rows
                             else t, inputs)

    first_piece = cut(first)
    return (lambda: first_piece), (lambda name: cut(stage_args(name)))


def _measuring_loader(trainer: pl.Trainer) -> Any:
    """The loader whose first batch the stages are timed on: validation's (unshuffled) where the run has one, else
    training's, else the entry point's own; given to fit as a DataModule, by the module's hooks or as loaders alike.
    At fit start Lightning has not yet set up ``trainer.val_dataloaders``: the loops' sources hold what fit got."""
    loops = (trainer.fit_loop.epoch_loop.val_loop, trainer.fit_loop, trainer.validate_loop, trainer.test_loop,
             trainer.predict_loop)
    for loop in loops:
        source = loop._data_source
        if source.instance is None or not source.is_defined():
            continue
        loaders = [loader for loader in tree_leaves(source.dataloader()) if loader is not None]
        if loaders:
            return loaders[0]
    raise ValueError("hetrain: StagePlacement times the stages on a batch of the run's data (plan='auto' or "
                     "predict=True), but the Trainer was given no dataloader: pass train_dataloaders/val_dataloaders "
                     "or a datamodule to trainer.fit() (dataloaders to validate/test/predict), or give an explicit "
                     "plan without predict")


def _first_batch(loader: Any) -> Any:
    """One batch from a loader, closing its iterator (a ring loader's producers) right after. The random generators
    are left as they were (:func:`_generators_kept`): iterating a loader draws from them (a seed for its workers, a
    shuffled order, a dataset's or collate's augmentation). A torch DataLoader with persistent workers keeps the
    iterator it makes (``_iterator``) and training would go on with it: one made here is shut down and dropped."""
    kept = getattr(loader, "_iterator", None) if isinstance(loader, DataLoader) else None
    with _generators_kept():
        iterator = iter(loader)
        try:
            return next(iterator)
        finally:
            close = getattr(iterator, "close", None) or getattr(loader, "close", None)
            if callable(close):
                close()
            if isinstance(loader, DataLoader) and kept is None and loader._iterator is iterator:
                iterator._shutdown_workers()
                loader._iterator = None


@contextmanager
def _generators_kept() -> Iterator[None]:
    """Puts torch's (CPU, and CUDA's where initialised), numpy's and Python's generators back as the block found
    them: a run must draw the same whether or not it measured, and a resumed run (``RandomState`` restores them
    before fit start, where placement measures) as the uninterrupted one. The same generators ``RandomState`` saves."""
    state = _generator_state()
    try:
        yield
    finally:
        _set_generator_state(state)
