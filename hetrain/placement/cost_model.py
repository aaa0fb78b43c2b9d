"""A cost model measured on the machine at hand: what each stage costs where, and what crossing devices costs.

:func:`measure` times each stage's forward + backward on each device at the run's batch shape, records
the bytes each stage hands to the next, and times copies between every pair of devices. The
:class:`CostModel` it returns is plain data (saved as JSON) and feeds the solvers::

    mask_for = lambda name: () if name == "embeddings" else (mask,)  # every stage after the first takes the mask
    cm = measure(model.stages(), lambda: ids, extra_args=mask_for)  # ids, mask: (B, T) at the run's shape
    plan = cm.chain_plan(objective="pipeline", micro_batches=4)   # or cm.heft_plan()
    plan.save("placement.yaml")
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import itertools
import json
import logging
import math
import statistics
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_leaves, tree_map_only

from hetrain.placement.chain import _distinct_default, chain_dp_bytes, chain_time
from hetrain.placement.heft import check_bandwidth, heft_bytes
from hetrain.placement.pipeline import tied_stages
from hetrain.placement.plan import (
    PlacementPlan,
    _indexed,
    available_devices,
    device_present,
    flatten_plan,
    parse_device,
    refuse_repeated_devices,
    stage_paths,
)

log = logging.getLogger(__name__)

# The most ways to put the tied groups on devices (the product over the groups of the devices each may go to) that
# the sequential and HEFT solvers try one by one, for the exact best; above it they place the groups greedily (see
# CostModel._greedy). Each way is one solve of an O(stages * devices^2) chain (HEFT alike), 0.2-0.3 ms for 8-16
# stages on 2-9 devices on a 2-core CPU, so 256 ways stay near a tenth of a second, while the count grows as
# devices^groups: an autoencoder with 6 tied layer pairs on a CPU and 8 GPUs has 9^6 = 531441.
TIED_CHOICES_SOLVED_EXACTLY = 256


@dataclass
class CostModel:
    """Measured costs of a chain of stages.

    ``compute[s][d]``: seconds for stage ``s``'s forward + backward on device ``d`` (``inf`` where it
    failed; ``errors[stage][device]`` says why). ``boundary_bytes[s]``: bytes of stage ``s``'s output.
    ``bandwidth[a][b]``: bytes/s of a copy from device ``a`` to ``b`` (``inf`` on the diagonal). ``tied``: groups of
    stages that share parameters (an embedding tied to the output head, one block at several positions), which a
    placement must put on one device: the solvers keep each group together and ``predict`` refuses a plan that
    splits one.
    """

    stages: list[str]
    devices: list[str]
    compute: list[list[float]]
    boundary_bytes: list[int]
    bandwidth: list[list[float]]
    errors: dict[str, dict[str, str]] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    tied: list[list[str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        """Checks the fields against each other: the solvers read them by position, so a short row or a repeated
        name would price the wrong stage or device, or fail naming no field."""
        _check_names(self.stages, "stages")
        _check_names(self.devices, "devices")
        # One device spelt two ways (cpu and cpu:0) would be priced from either column; refused here, not only when
        # a plan is priced, so no solver plans over it.
        refuse_repeated_devices(self.devices, "the cost model's devices")
        stages, devices = len(self.stages), len(self.devices)
        if len(self.compute) != stages:
            raise ValueError(f"hetrain: CostModel.compute has {len(self.compute)} rows for {stages} stages; give one "
                             "row per stage")
        if any(len(row) != devices for row in self.compute):
            raise ValueError(f"hetrain: CostModel.compute rows have {[len(row) for row in self.compute]} entries for "
                             f"{devices} devices ({', '.join(self.devices)}); give each stage one cost per device")
        if len(self.boundary_bytes) != stages:
            raise ValueError(f"hetrain: CostModel.boundary_bytes has {len(self.boundary_bytes)} entries for {stages} "
                             "stages; give each stage's output size, the last stage's too")
        if len(self.bandwidth) != devices or any(len(row) != devices for row in self.bandwidth):
            raise ValueError(f"hetrain: CostModel.bandwidth must be a {devices} x {devices} matrix, a row and a column "
                             f"per device ({', '.join(self.devices)}); got rows of {[len(r) for r in self.bandwidth]}")
        self._check_tied()

    def _check_tied(self) -> None:
        """Each tied group names two measured stages or more, and a stage is in one group at most."""
        grouped = [stage for group in self.tied for stage in group]
        unknown = sorted(set(grouped) - set(self.stages))
        if unknown or any(len(group) < 2 for group in self.tied):
            raise ValueError(f"hetrain: CostModel.tied is {self.tied!r}; give groups of two or more measured stages "
                             f"({', '.join(self.stages)}) that share parameters")
        repeated = sorted({stage for stage in grouped if grouped.count(stage) > 1})
        if repeated:
            raise ValueError(f"hetrain: CostModel.tied puts {repeated} in several groups; merge the groups that share "
                             "a stage into one")

    def link_bandwidth(self, training: bool = True) -> list[list[float]]:
        """Bandwidth to price one boundary with. In training, the activation goes a -> b and its
        gradient, of the same size, comes back b -> a: ``1 / (1/bw[a][b] + 1/bw[b][a])`` makes
        ``bytes / bandwidth`` that round trip. The measured matrix is checked first: a nan, negative or zero
        bandwidth would otherwise read as a free link or divide by zero; the diagonal (a device to itself) is free."""
        bw = self.bandwidth
        check_bandwidth(bw, len(self.devices))
        if not training:
            return [list(row) for row in bw]

        def round_trip(a: int, b: int) -> float:
            if a == b:
                return math.inf
            seconds_per_byte = 1.0 / bw[a][b] + 1.0 / bw[b][a]
            return 1.0 / seconds_per_byte if seconds_per_byte > 0 else math.inf

        return [[round_trip(a, b) for b in range(len(bw))] for a in range(len(bw))]

    def heft_inputs(
        self, training: bool = True
    ) -> tuple[dict[str, list[float]], dict[tuple[str, str], float], list[list[float]]]:
        """``(compute, edge_bytes, bandwidth)`` for :func:`hetrain.placement.heft_bytes`: the stages as a chain."""
        compute = {s: list(row) for s, row in zip(self.stages, self.compute, strict=True)}
        pairs = zip(self.stages[:-1], self.stages[1:], self.boundary_bytes, strict=False)  # the last output leaves
        edges = {(u, v): float(nbytes) for u, v, nbytes in pairs}
        return compute, edges, self.link_bandwidth(training)

    def chain_inputs(self, training: bool = True) -> tuple[list[list[float]], list[float], list[list[float]]]:
        """``(costs, boundary_bytes, bandwidth)`` for :func:`hetrain.placement.chain_dp_bytes`."""
        return (
            [list(row) for row in self.compute],
            [float(b) for b in self.boundary_bytes[:-1]],
            self.link_bandwidth(training),
        )

    def heft_plan(self, training: bool = True) -> PlacementPlan:
        """HEFT's plan for the stages as a chain, its makespan as the predicted step time; each tied group on one
        device (the best makespan over the ways to place the groups, or greedily where they are many: see
        :meth:`_fastest`)."""
        self._check_inputs(training)
        return self._fastest(lambda model: model._heft_plan(training))

    def _heft_plan(self, training: bool) -> PlacementPlan:
        schedule = heft_bytes(*self.heft_inputs(training))
        return PlacementPlan.from_assignment(self.stages, self.devices, schedule.assignment, "heft", schedule.makespan)

    def chain_plan(self, objective: str = "sequential", micro_batches: int = 1, training: bool = True,
                   distinct_devices: bool | None = None) -> PlacementPlan:
        """The exact chain solver's plan for ``objective`` (see :func:`hetrain.placement.chain_dp`; by default a
        sequential plan may go back to a device, a pipeline one holds one stage per device), each tied group on one
        device: exactly with one stage per device (:meth:`_merge_tied_spans`), else as :meth:`_fastest` says."""
        self._check_inputs(training, objective, micro_batches)
        solve = functools.partial(CostModel._chain_plan, objective=objective, micro_batches=micro_batches,
                                  training=training, distinct_devices=distinct_devices)
        if not _distinct_default(objective, distinct_devices):
            return self._fastest(solve)
        merged, runs_in = self._merge_tied_spans()
        self._refuse_unrunnable_spans(merged, runs_in)
        return _expanded(solve(merged), runs_in)

    def _chain_plan(self, objective: str, micro_batches: int, training: bool,
                    distinct_devices: bool | None) -> PlacementPlan:
        plan = chain_dp_bytes(*self.chain_inputs(training), objective=objective, micro_batches=micro_batches,
                              distinct_devices=distinct_devices)
        return PlacementPlan.from_assignment(self.stages, self.devices, plan.devices, "chain-dp", plan.predicted_time)

    def multi_device_plan(self, micro_batches: int = 1, training: bool = True) -> PlacementPlan | None:
        """The best pipeline plan over two devices or more (``None`` where there is none), each tied group on one
        device (exactly: see :meth:`_merge_tied_spans`): the solver's optimum may be one device, which a caller
        pricing one-device plans otherwise (as whole batches) must not take for the best split."""
        self._check_inputs(training, "pipeline", micro_batches)
        merged, runs_in = self._merge_tied_spans()
        return _expanded(merged._multi_device_plan(micro_batches, training), runs_in)

    def _multi_device_plan(self, micro_batches: int, training: bool) -> PlacementPlan | None:
        """With one stage per device a plan over several devices starts on one device and ends on another, so the
        solver runs once per first device, holding the first stage there and the last stage off it. The inputs are
        checked (:meth:`_check_inputs`), so a ValueError below only says a restricted chain has no plan (a merged span
        of tied stages that no device runs, too)."""
        costs, boundary_bytes, bandwidth = self.chain_inputs(training)
        plans = []
        for first in range(len(self.devices)):
            ends = _ends_on(costs, first)
            if ends is None:
                continue
            with contextlib.suppress(ValueError):
                plans.append(chain_dp_bytes(ends, boundary_bytes, bandwidth, "pipeline", micro_batches))
        if not plans:
            return None
        best = min(plans, key=lambda plan: plan.predicted_time)
        return PlacementPlan.from_assignment(self.stages, self.devices, best.devices, "chain-dp", best.predicted_time)

    def predict(self, devices: Mapping[str, str] | Sequence[str], objective: str = "sequential",
                micro_batches: int = 1, training: bool = True) -> float:
        """Predicted step time (seconds) of any plan: ``{path: device}`` covering every stage (a group path such
        as ``encoder`` covers its stages, as in a recipe's plan) or one device per stage.

        The same model the solvers minimise, so a hand-written plan can be set beside the optimum; under
        ``"pipeline"`` a plan that puts two stages on one device is refused, as the solver never picks one.
        """
        if isinstance(devices, str):
            raise TypeError(f"hetrain: predict takes one device per stage or a {{path: device}} plan, not the string "
                            f"{devices!r}; for every stage on it pass [{devices!r}] * {len(self.stages)}")
        index = self.device_indices(devices)
        self._refuse_splitting_tied(index)
        costs, boundary_bytes, bandwidth = self.chain_inputs(training)
        return chain_time(costs, boundary_bytes, bandwidth, index, objective, micro_batches)

    def _refuse_splitting_tied(self, index: Sequence[int]) -> None:
        """A plan that puts stages sharing a parameter on different devices has no time: the run refuses it (a
        parameter lives on one device)."""
        device_of = dict(zip(self.stages, index, strict=True))
        for group in self.tied:
            if len({device_of[stage] for stage in group}) > 1:
                where = ", ".join(f"{stage} on {self.devices[device_of[stage]]}" for stage in group)
                raise ValueError(f"hetrain: stages {', '.join(group)} share parameters, but the plan puts {where}; a "
                                 f"parameter lives on one device, so put them on one (or untie the weights)")

    def _check_inputs(self, training: bool, objective: str = "sequential", micro_batches: int = 1) -> None:
        """Checks the costs, byte counts, bandwidths and solver settings once, before any way to place the tied
        groups is solved: a bad input (a nan or negative cost) is then named as itself, not taken for a way that has
        no plan, nor hidden by one that holds its stage on another device."""
        costs, boundary_bytes, bandwidth = self.chain_inputs(training)
        chain_time(costs, boundary_bytes, bandwidth, [0] * len(costs), objective, micro_batches)

    def _group_devices(self) -> list[list[int]]:
        """Each tied group's devices that run every stage of it (a finite cost for each), the only ones it may go
        to; raises naming the groups that have none."""
        rows = [[self.compute[self.stages.index(stage)] for stage in group] for group in self.tied]
        allowed = [[d for d in range(len(self.devices)) if not any(math.isinf(row[d]) for row in group_rows)]
                   for group_rows in rows]
        stranded = "; ".join(", ".join(group) for group, devices in zip(self.tied, allowed, strict=True) if not devices)
        if stranded:
            raise ValueError(f"hetrain: stages sharing parameters must run on one device, but no device runs every "
                             f"stage of {stranded}; the cost model's errors say why each failed where (or untie the "
                             f"weights)")
        return allowed

    def _held(self, chosen: Sequence[int]) -> CostModel:
        """This model, untied, each tied group's stages held to its device in ``chosen`` (``inf`` on every other)."""
        held = {self.stages.index(stage): device for group, device in zip(self.tied, chosen, strict=True)
                for stage in group}
        compute = [[c if held.get(s, d) == d else math.inf for d, c in enumerate(row)]
                   for s, row in enumerate(self.compute)]
        return dataclasses.replace(self, compute=compute, tied=[])

    def _fastest(self, solve: Callable[[CostModel], PlacementPlan]) -> PlacementPlan:
        """``solve``'s fastest plan keeping each tied group on one device, for a solver that may put several stages
        on a device (sequential, HEFT), where no merge makes the groups one stage: it is solved once per way to put
        the groups on devices that run all their stages, made one at a time, up to
        ``TIED_CHOICES_SOLVED_EXACTLY`` ways; above that the groups are placed greedily (:meth:`_greedy`)."""
        if not self.tied:
            return solve(self)
        allowed = self._group_devices()
        if math.prod(len(devices) for devices in allowed) > TIED_CHOICES_SOLVED_EXACTLY:
            return self._greedy(solve, allowed)
        plans = (solve(self._held(chosen)) for chosen in itertools.product(*allowed))
        return min(plans, key=lambda plan: plan.predicted_step_time)

    def _greedy(self, solve: Callable[[CostModel], PlacementPlan], allowed: list[list[int]]) -> PlacementPlan:
        """Two solves where the ways to place the tied groups are too many to try: the untied chain, then the chain
        with each group held where :meth:`_pin` puts it after that plan. Exact where the untied plan keeps every
        group together; otherwise the plan may be slower than the best that does, which is logged."""
        untied = solve(dataclasses.replace(self, tied=[]))
        pins = [self._pin(group, devices, untied) for group, devices in zip(self.tied, allowed, strict=True)]
        ways = math.prod(len(devices) for devices in allowed)
        log.warning(f"placement: the {len(self.tied)} groups of stages sharing parameters have {ways} ways onto the "
                    f"devices, more than the {TIED_CHOICES_SOLVED_EXACTLY} solved one by one, so they were placed "
                    f"greedily: each on the device, of those the best untied plan gave its stages, where its stages "
                    f"compute fastest; the plan may be slower than the best that keeps them together")
        return solve(self._held(pins))

    def _pin(self, group: Sequence[str], allowed: Sequence[int], untied: PlacementPlan) -> int:
        """Where a tied group goes greedily: of the devices the untied plan gave its stages (and that run all of
        them), the one where its stages' summed compute is least; where none runs all of them, its cheapest."""
        rows = [self.compute[self.stages.index(stage)] for stage in group]
        given = {self.devices.index(untied.devices[stage]) for stage in group}
        candidates = [d for d in allowed if d in given] or list(allowed)
        return min(candidates, key=lambda d: sum(row[d] for row in rows))

    def _merge_tied_spans(self) -> tuple[CostModel, dict[str, str]]:
        """This model with each tied group's span (its first stage to its last, overlapping spans joined) merged into
        one stage, and the merged stage each stage runs in. With one stage per device a device holds one contiguous
        run of stages, so a group is on one device exactly when its whole span is: the merged chain has no ties and
        one solve places it exactly."""
        if not self.tied:
            return self, {stage: stage for stage in self.stages}
        self._group_devices()  # a group no device runs is named as such, not as a merged stage that runs nowhere
        position = {stage: i for i, stage in enumerate(self.stages)}
        span_end = {}  # a group's first position -> its last
        for group in self.tied:
            span_end[min(position[stage] for stage in group)] = max(position[stage] for stage in group)
        runs_in, head, end = {}, self.stages[0], -1
        for i, stage in enumerate(self.stages):
            if i > end:  # past every span open so far: a stage of its own, or a new span's first
                head = stage
            end = max(end, span_end.get(i, -1))
            runs_in[stage] = head
        return self._merged(runs_in), runs_in

    def _refuse_unrunnable_spans(self, merged: CostModel, runs_in: Mapping[str, str]) -> None:
        """With one stage per device, a merged span of tied stages that no device runs all of has no plan: raised
        naming the stages, not as a merged stage of the solver's that runs nowhere."""
        for head, row in zip(merged.stages, merged.compute, strict=True):
            if all(math.isinf(c) for c in row):
                span = ", ".join(stage for stage in self.stages if runs_in[stage] == head)
                raise ValueError(f"hetrain: with one stage per device (the pipeline objective, or distinct_devices) a "
                                 f"device runs one contiguous run of stages, so stages sharing parameters take the "
                                 f"stages between them onto their device too, but no device runs all of {span}; the "
                                 f"cost model's errors say why each failed where. Use the sequential objective, or "
                                 f"untie the weights")

    def device_indices(self, devices: Mapping[str, str] | Sequence[str]) -> list[int]:
        """Each stage's measured device, as its index in ``devices``, under ``{path: device}`` (group paths allowed)
        or one device per stage. One device spelt two ways (``cpu:0`` for ``cpu``, ``cuda`` for ``cuda:0``, in the
        plan or in the measured names) is one device, as the run places it; ``cuda:0`` and ``cuda:1`` are two."""
        names = self.stage_devices(devices) if isinstance(devices, Mapping) else list(devices)
        measured = [_indexed(parse_device(d, "a measured device")) for d in self.devices]
        wanted = [_as_measured(parse_device(d, "a planned device"), measured) for d in names]
        unknown = sorted({str(name) for name, device in zip(names, wanted, strict=True) if device not in measured})
        if unknown:
            raise ValueError(f"hetrain: the cost model measured {self.devices}, not {unknown}")
        return [measured.index(d) for d in wanted]

    def stage_devices(self, plan: Mapping[str, str]) -> list[str]:
        """Each measured stage's device under ``plan``, resolved as :func:`hetrain.placement.resolve_plan` does."""
        flat = flatten_plan(plan)
        paths = stage_paths(flat, self.stages)
        uncovered = [s for s in self.stages if s not in paths]
        if uncovered:
            raise ValueError(f"hetrain: the plan gives no device for stages {uncovered}; name each of the measured "
                             f"stages ({', '.join(self.stages)}) or a group of them (a prefix such as 'encoder')")
        return [str(flat[paths[s]]) for s in self.stages]

    def merge_weightless(self, weightless: Collection[str]) -> tuple[CostModel, dict[str, str]]:
        """This model with each stage of ``weightless`` (holding no parameters or buffers) merged into the stage before
        it (leading ones into the first stage after them), and the merged stage each measured stage runs in.

        A placement does not move such a stage: it runs where its input is, on its predecessor's device. Solved as a
        stage of its own, it could be planned onto a device it never runs on, and the plan priced as a placement the
        run does not execute. A merged stage costs the sum of its parts on each device, has no transfer between them,
        and hands on its last part's output."""
        unknown = sorted(set(weightless) - set(self.stages))
        if unknown:
            raise ValueError(f"hetrain: weightless stages {unknown} are not measured stages ({', '.join(self.stages)})")
        heads = [s for s in self.stages if s not in weightless] or self.stages[:1]
        runs_in, head = {}, heads[0]
        for stage in self.stages:
            head = stage if stage in heads else head
            runs_in[stage] = head
        return self._merged(runs_in), runs_in

    def _merged(self, runs_in: Mapping[str, str]) -> CostModel:
        """This model with each stage merged into the stage ``runs_in`` names (contiguous runs, each named by one
        of its stages): a merged stage costs the sum of its parts on each device, has no transfer between them, and
        hands on its last part's output; a tied group keeps the merged stages its stages run in."""
        heads = list(dict.fromkeys(runs_in[stage] for stage in self.stages))
        parts = {h: [i for i, s in enumerate(self.stages) if runs_in[s] == h] for h in heads}
        compute = [[sum(self.compute[i][d] for i in parts[h]) for d in range(len(self.devices))] for h in heads]
        errors: dict[str, dict[str, str]] = {}
        for stage, reasons in self.errors.items():
            for device, reason in reasons.items():
                errors.setdefault(runs_in[stage], {}).setdefault(device, f"{stage}: {reason}")
        tied = [list(dict.fromkeys(runs_in[stage] for stage in group)) for group in self.tied]
        return CostModel(heads, list(self.devices), compute, [self.boundary_bytes[parts[h][-1]] for h in heads],
                         [list(row) for row in self.bandwidth], errors, dict(self.meta),
                         [group for group in tied if len(group) > 1])

    def to_dict(self) -> dict[str, Any]:
        # JSON has no infinity or nan; "inf", "-inf" and "nan" keep the file readable by any parser, and load back.
        data = asdict(self)
        data["compute"] = [[_encode(c) for c in row] for row in self.compute]
        data["bandwidth"] = [[_encode(b) for b in row] for row in self.bandwidth]
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CostModel:
        fields = dict(data)
        fields["compute"] = [[float(c) for c in row] for row in data["compute"]]
        fields["bandwidth"] = [[float(b) for b in row] for row in data["bandwidth"]]
        return cls(**fields)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> CostModel:
        return cls.from_dict(json.loads(Path(path).read_text()))


def _check_names(names: Sequence[str], what: str) -> None:
    """Stages and devices are looked up by name: each a string, none repeated."""
    if isinstance(names, str) or not names or not all(isinstance(name, str) for name in names):
        raise ValueError(f"hetrain: CostModel.{what} must be a non-empty list of names, got {names!r}")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"hetrain: CostModel.{what} repeats {repeated}; each of the {what} appears once")


def _as_measured(device: torch.device, measured: Sequence[torch.device]) -> torch.device:
    """``device`` as one of ``measured`` (each :func:`_indexed`) reads it. ``cuda`` with no index is this process's
    GPU where there is one; on a machine without that backend (a GPU run's costs read on a laptop) it is the only
    device of its type measured, else index 0 (the GPU a process starts on)."""
    if device.index is None and device.type != "cpu" and not device_present(device):
        of_type = [d for d in measured if d.type == device.type]
        if len(of_type) == 1:
            return of_type[0]
    return _indexed(device)


def _expanded(plan: PlacementPlan | None, runs_in: Mapping[str, str]) -> PlacementPlan | None:
    """A merged model's plan as one for every stage: each on the device of the merged stage it runs in."""
    if plan is None:
        return None
    devices = {stage: plan.devices[head] for stage, head in runs_in.items()}
    return PlacementPlan(devices, plan.method, plan.predicted_step_time)


def _ends_on(costs: list[list[float]], first: int) -> list[list[float]] | None:
    """``costs`` with the first layer held to device ``first`` and the last kept off it (``inf``); ``None`` where
    one of them could then run nowhere, or the chain has one layer."""
    if len(costs) < 2:
        return None
    ends = [list(row) for row in costs]
    ends[0] = [c if d == first else math.inf for d, c in enumerate(ends[0])]
    ends[-1][first] = math.inf
    if math.isinf(ends[0][first]) or all(math.isinf(c) for c in ends[-1]):
        return None
    return ends


def _encode(x: float) -> float | str:
    return x if math.isfinite(x) else str(float(x))  # "inf", "-inf", "nan": what float() reads back


def _map_tensors(obj: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    """``fn`` over every tensor of a stage's inputs or outputs (a tensor, or tuples, lists, dicts of them)."""
    return tree_map_only(torch.Tensor, fn, obj)


def _tensors(obj: Any) -> list[torch.Tensor]:
    return [t for t in tree_leaves(obj) if isinstance(t, torch.Tensor)]


def _synchronize(device: torch.device) -> None:
    # Accelerators run asynchronously (torch.cuda, torch.xpu, ... each have synchronize); the CPU and
    # the meta device (shapes only) have nothing to wait for.
    backend = getattr(torch, device.type, None) if device.type not in ("cpu", "meta") else None
    if backend is not None and hasattr(backend, "synchronize"):
        backend.synchronize(device)


# Untimed runs last at least this long (and at most WARMUP_MAX_RUNS runs) beyond the requested count: the
# first runs of a freshly copied stage are slower (allocator, cache, library plans), and with a short stage
# a run count alone left them in the median (a whole-chain prediction 12-30% over the measured step).
WARMUP_MIN_S = 0.025
WARMUP_MAX_RUNS = 100


def _median_time(fn: Callable[..., Any], devices: Sequence[torch.device], warmup: int, repeats: int,
                 clock: Callable[[], float] = time.perf_counter, prepare: Callable[[], Any] | None = None) -> float:
    # torch.utils.benchmark.Timer reports per-block means and runs with one thread unless told
    # otherwise; a placement needs the median of single runs at the process's own thread count.
    # ``prepare`` (run untimed before each run, its result passed to ``fn``) makes what a run consumes.
    def run() -> float:
        args = () if prepare is None else (prepare(),)
        for d in devices:
            _synchronize(d)
        t0 = clock()
        fn(*args)
        for d in devices:
            _synchronize(d)
        return clock() - t0

    start, runs = clock(), 0
    while runs < warmup or (runs < WARMUP_MAX_RUNS and clock() - start < WARMUP_MIN_S):
        run()
        runs += 1
    return statistics.median(run() for _ in range(repeats))


ForwardContext = Callable[[], contextlib.AbstractContextManager]


def _time_stage(
    stage: nn.Module, carried: tuple, extra: tuple, device: torch.device, needs_input_grad: bool, warmup: int,
    repeats: int, forward_context: ForwardContext,
) -> tuple[float, Any]:
    """Median forward + backward seconds of a copy of ``stage`` on ``device``, and one output (on the CPU).

    Each run gets fresh copies of the inputs, made untimed: a stage may work in place on its input (``nn.ReLU(
    inplace=True)``), which must neither change the caller's tensors nor compound from run to run. A later stage's
    floating-point ``carried`` input (the previous stage's output) is a copy of a leaf that requires grad, an
    activation as in training: in place is allowed on it, and the backward reaches the leaf, as training's sends the
    gradient upstream. The ``extra`` arguments are data (an attention mask): training computes no gradient for them,
    so neither does the timed backward."""
    module = copy.deepcopy(stage).to(device)

    def to_device(t: torch.Tensor, grad: bool) -> torch.Tensor:
        t = t.detach().to(device)
        return t.requires_grad_() if grad and t.is_floating_point() else t

    sources = (_map_tensors(carried, functools.partial(to_device, grad=needs_input_grad))
               + _map_tensors(extra, functools.partial(to_device, grad=False)))

    def fresh_inputs() -> Any:
        for t in _tensors(sources):
            t.grad = None
        return _map_tensors(sources, torch.Tensor.clone)

    grads: list[torch.Tensor] = []

    def step(inputs: Any) -> Any:
        module.zero_grad(set_to_none=True)
        with forward_context():
            out = module(*inputs)
        outs = [t for t in _tensors(out) if t.requires_grad]
        if outs:
            if not grads:
                grads.extend(torch.ones_like(t) for t in outs)
            torch.autograd.backward(outs, grads)
        return out

    seconds = _median_time(step, [device], warmup, repeats, prepare=fresh_inputs)
    with torch.no_grad(), forward_context():
        out = module(*fresh_inputs())
    return seconds, _map_tensors(out, lambda t: t.detach().cpu())


def measure_bandwidth(
    devices: Sequence[str], nbytes: int = 16 << 20, warmup: int = 1, repeats: int = 5
) -> list[list[float]]:
    """Bytes/s of a copy between each ordered pair of devices; host buffers are pinned when a GPU is on the
    other side (as the data path uses them), and a device to itself is ``inf``."""
    parsed = [torch.device(d) for d in devices]
    bandwidth = [[math.inf] * len(devices) for _ in devices]
    for a, src_device in enumerate(parsed):
        for b, dst_device in enumerate(parsed):
            if a == b:
                continue
            src = torch.ones(nbytes, dtype=torch.uint8, device=src_device, pin_memory=_pinned(src_device, dst_device))
            dst = torch.empty(nbytes, dtype=torch.uint8, device=dst_device, pin_memory=_pinned(dst_device, src_device))
            one_copy = functools.partial(dst.copy_, src, non_blocking=True)
            seconds = _median_time(one_copy, [src_device, dst_device], warmup, repeats)
            bandwidth[a][b] = nbytes / seconds if seconds > 0 else math.inf
    return bandwidth


def _pinned(here: torch.device, other: torch.device) -> bool:
    return here.type == "cpu" and other.type == "cuda"


def measure(
    stages: nn.Sequential | Mapping[str, nn.Module],
    make_input: Callable[[], Any],
    devices: Sequence[str | torch.device] | None = None,
    extra_args: Callable[[str], tuple] | None = None,
    warmup: int = 2,
    repeats: int = 5,
    copy_bytes: int = 16 << 20,
    forward_context: ForwardContext = contextlib.nullcontext,
) -> CostModel:
    """Measures a chain of stages on ``devices`` (default: the CPU and every visible GPU).

    Args:
        stages: the chain in forward order: an ``nn.Sequential`` (paths ``"0"``, ``"1"``, ...) or a
            ``{module path: module}`` mapping such as ``BertClassifier.stages()``.
        make_input: builds the first stage's input at the run's batch shape (a tensor or a tuple of
            positional arguments), on the CPU; each later stage gets the previous stage's output (a
            tuple as several arguments).
        extra_args: stage path -> further positional arguments after the carried activation (an
            attention mask, say); none by default.
        warmup, repeats: untimed runs, then the runs whose median is reported.
        copy_bytes: size of the copies that measure bandwidth.
        forward_context: entered around each forward, as training enters its precision's (a Lightning
            precision plugin's ``forward_context``: autocast under ``bf16-mixed``), so a stage is timed, and its
            output sized, in the dtypes the run computes in.

    A stage that fails on a device costs ``inf`` there, with the error in ``errors``; a stage that
    runs nowhere raises. The stages themselves are not moved: each device times a copy. The random
    generators are left as they were (the inputs and the stages' dropout draw from copies), so measuring
    before training changes none of its draws.
    """
    if isinstance(stages, nn.Sequential):
        # Every position, as the Sequential runs them: named_children() lists a module reused at several positions
        # (a shared activation, one block applied twice) once, and the chain measured would be shorter than the run's.
        named = dict(stages._modules)
    elif isinstance(stages, Mapping):
        named = dict(stages)
    else:
        raise TypeError(
            f"hetrain: stages must be an nn.Sequential or a {{path: module}} mapping in forward order, "
            f"not {type(stages).__name__}"
        )
    if not named:
        raise ValueError("hetrain: no stages to measure")
    if isinstance(devices, str):
        raise TypeError(f"hetrain: measure takes a list of devices, not the string {devices!r}; pass [{devices!r}]")
    if devices is not None and not devices:
        raise ValueError("hetrain: measure got no devices (devices=[]); name at least one, or leave devices=None to "
                         f"measure every device this machine has ({', '.join(available_devices())})")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"hetrain: measure's repeats is {repeats!r}; the median needs an integer >= 1 timed runs")
    parsed = [parse_device(d, "a device to measure") for d in (available_devices() if devices is None else devices)]
    devices = [str(device) for device in parsed]  # names, as a CostModel holds them (a torch.device is taken too)
    if any(device.type == "meta" for device in parsed):
        raise ValueError("hetrain: cannot measure on meta: it holds shapes, not data, so nothing there can be timed; "
                         "measure on cpu or a GPU")
    absent = [d for d, device in zip(devices, parsed, strict=True) if not device_present(device)]
    if absent:
        raise ValueError(f"hetrain: cannot measure on {', '.join(absent)}: not on this machine, which has "
                         f"{', '.join(available_devices())}; leave devices=None to measure every device it has")
    # Two spellings of one device (cpu and cpu:0) would time a copy to itself as a link, and price a plan over
    # them as a pipeline over two devices.
    refuse_repeated_devices(devices, "the devices to measure")

    gpus = sorted({torch.device(d).index or 0 for d in devices if torch.device(d).type == "cuda"})
    with torch.random.fork_rng(devices=gpus if torch.cuda.is_available() else []):
        return _measure(named, make_input, devices, extra_args, warmup, repeats, copy_bytes, forward_context)


def _measure(named: dict[str, nn.Module], make_input: Callable[[], Any], devices: list[str],
             extra_args: Callable[[str], tuple] | None, warmup: int, repeats: int, copy_bytes: int,
             forward_context: ForwardContext) -> CostModel:
    first = make_input()
    carried: Any = first if isinstance(first, tuple) else (first,)
    compute: list[list[float]] = []
    boundary_bytes: list[int] = []
    errors: dict[str, dict[str, str]] = {}
    for index, (name, stage) in enumerate(named.items()):
        extra = tuple(extra_args(name) if extra_args else ())
        row, ran, output = [], False, None  # ran: a stage may run and return None
        for device in devices:
            try:
                seconds, out = _time_stage(stage, carried, extra, torch.device(device), index > 0, warmup, repeats,
                                           forward_context)
            except torch.AcceleratorError:
                raise  # a device fault (an illegal address) poisons the context: every later call would fail too
            except Exception as exc:  # a stage that cannot run on a device is a fact of the cost model
                errors.setdefault(name, {})[device] = f"{type(exc).__name__}: {exc}".strip()
                row.append(math.inf)
                continue
            row.append(seconds)
            if not ran:
                ran, output = True, out
        if not ran:
            reasons = "; ".join(f"{d}: {r}" for d, r in errors[name].items())
            raise ValueError(f"hetrain: stage {name!r} ran on no device ({reasons})")
        if output is None:  # the next stage's input, or the model's output (the pipeline split refuses None too)
            raise ValueError(f"hetrain: stage {name!r} returned None; a stage must return its output, the next "
                             "stage's input (the last stage's: the model's output)")
        compute.append(row)
        boundary_bytes.append(sum(t.numel() * t.element_size() for t in _tensors(output)))
        carried = output if isinstance(output, tuple) else (output,)

    meta = {
        "torch": torch.__version__,
        "input_shapes": [list(t.shape) for t in _tensors(first)],
        "warmup": warmup,
        "repeats": repeats,
        "threads": torch.get_num_threads(),
    }
    bandwidth = measure_bandwidth(devices, copy_bytes, repeats=repeats)
    tied = tied_stages(list(named.items()))
    return CostModel(list(named), devices, compute, boundary_bytes, bandwidth, errors, meta, tied)
