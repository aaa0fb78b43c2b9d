"""Exact placement of a chain of layers (a pipelined model) by dynamic programming.

The layers are cut into contiguous stages, each stage on one device. Two objectives:

``"sequential"``: one pass with no overlap, ``sum(stage compute) + sum(boundary transfers)``.

``"pipeline"``: GPipe-style fill and drain with ``m`` micro-batches over ``S`` stages. Every
micro-batch goes through the stages in order (forward, then backward in reverse) and a stage handles one at a
time (a flow shop), so the step takes ``sum_s t_s + (m - 1) * max_s t_s``: one micro-batch's way through every
stage, then the slowest stage once for each other micro-batch (``m * t`` for one stage; ``(m + S - 1) * t``
only where every stage takes ``t``). ``t_s`` is stage ``s``'s time per micro-batch: its layers' costs plus the
transfer of the boundary in front of it (the activation coming in and its gradient going back over the same
link, charged to the receiving stage: copies are not assumed to overlap compute). Costs are therefore read as
per micro-batch for this objective.

A transfer at boundary ``i`` (between layers ``i`` and ``i + 1``) costs nothing when both sides are
on the same device. ``distinct_devices`` says whether a device may hold only one stage; by default it
does under ``"pipeline"`` (the model has a time for a device running one stage, not two interleaved)
and not under ``"sequential"`` (a plan may go back to a device it left, e.g. CPU, GPU, CPU). With it the
search is over (layers placed, set of devices used, last device), keeping for each such state every
(sum, largest) pair of stage times that no other pair beats in both (the pipeline time grows with each), so
it is exact and takes ``O(n^2 * 2^D * D^2 * P^2)`` steps for ``n`` layers, ``D`` devices and ``P`` pairs kept per
state (one under ``"sequential"``); without it (``"sequential"`` only) it is a shortest path over (layer, device).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from hetrain.placement.heft import check_bandwidth, is_number, transfer_seconds

OBJECTIVES = ("sequential", "pipeline")

TransferTime = Callable[[int, int, int], float]  # (boundary, from device, to device) -> seconds


@dataclass
class ChainPlan:
    """Device of each layer, the stages as ``(first layer, end layer exclusive, device)``, and the predicted time."""

    devices: list[int]
    stages: list[tuple[int, int, int]]
    predicted_time: float
    objective: str
    micro_batches: int = 1

    def __post_init__(self) -> None:
        # Costs given as NumPy arrays sum to a NumPy scalar, which a saved plan (YAML, JSON) cannot hold.
        self.predicted_time = float(self.predicted_time)


def _check(costs: Sequence[Sequence[float]], boundaries: int, objective: str, micro_batches: int) -> int:
    """Validates what every chain function takes; returns the number of devices."""
    if objective not in OBJECTIVES:
        raise ValueError(f"hetrain: objective {objective!r} is not one of {OBJECTIVES}")
    if not isinstance(micro_batches, numbers.Integral) or isinstance(micro_batches, bool) or micro_batches < 1:
        raise ValueError(f"hetrain: micro_batches={micro_batches!r}; it must be an integer >= 1")
    if len(costs) == 0:  # not `not costs`: a NumPy array has no truth value
        raise ValueError("hetrain: the chain has no layers")
    widths = {len(row) for row in costs}
    if len(widths) > 1 or 0 in widths:
        raise ValueError(f"hetrain: every layer needs one cost per device; got row lengths {[len(r) for r in costs]}")
    for i, row in enumerate(costs):
        for d, c in enumerate(row):
            if not is_number(c):
                raise ValueError(f"hetrain: cost of layer {i} on device {d} is {c!r}; costs are numbers "
                                 "(inf where the layer cannot run)")
            if math.isnan(c) or c < 0:
                raise ValueError(f"hetrain: cost of layer {i} on device {d} is {c}; costs must be >= 0")
        if all(math.isinf(c) for c in row):
            raise ValueError(f"hetrain: layer {i} can run on no device (every cost is inf)")
    if boundaries != len(costs) - 1:
        raise ValueError(
            f"hetrain: {len(costs)} layers have {len(costs) - 1} boundaries; got {boundaries} transfer costs"
        )
    return widths.pop()


def _check_boundaries(values: Sequence[float], what: str, finite: bool) -> None:
    """Transfer times (inf: the boundary cannot cross devices) or byte counts (finite: inf bytes has no time)."""
    for i, value in enumerate(values):
        if not is_number(value) or math.isnan(value) or value < 0 or (finite and math.isinf(value)):
            bound = "a finite number >= 0" if finite else "a number >= 0"
            raise ValueError(f"hetrain: {what} at boundary {i} is {value!r}; it must be {bound}")


def _checked(transfer: TransferTime) -> TransferTime:
    """``transfer``, refusing a nan: it compares false with everything, so it would win or lose any choice silently."""

    def time(i: int, a: int, b: int) -> float:
        seconds = transfer(i, a, b)
        if math.isnan(seconds):
            raise ValueError(f"hetrain: transfer at boundary {i} from device {a} to {b} is nan; check the transfer "
                             "times, byte counts and bandwidths given")
        return seconds

    return time


def _byte_transfer(boundary_bytes: Sequence[float], bandwidth: Sequence[Sequence[float]]) -> TransferTime:
    return lambda i, a, b: transfer_seconds(boundary_bytes[i], bandwidth[a][b])


def _stages(devices: list[int]) -> list[tuple[int, int, int]]:
    stages: list[tuple[int, int, int]] = []
    for i, d in enumerate(devices):
        if stages and stages[-1][2] == d:
            stages[-1] = (stages[-1][0], i + 1, d)
        else:
            stages.append((i, i + 1, d))
    return stages


Pair = tuple[float, float]  # (sum of the stage times so far, the largest of them)
Parent = tuple[int, int, int, int] | None  # (layers placed, devices used, last device, index of its pair)


def _pipeline_time(total: float, longest: float, m: int) -> float:
    """``total + (m - 1) * longest``; one micro-batch adds nothing (not ``0 * inf``: nan where a stage cannot run)."""
    return total + (m - 1) * longest if m > 1 else total


def _keep(front: list[tuple[Pair, Parent]], pair: Pair, parent: Parent) -> None:
    """Adds ``pair`` to ``front`` unless a pair there is no worse in both; drops the pairs it is no worse than."""
    if any(kept[0] <= pair[0] and kept[1] <= pair[1] for kept, _ in front):
        return
    front[:] = [(kept, p) for kept, p in front if not (pair[0] <= kept[0] and pair[1] <= kept[1])]
    front.append((pair, parent))


def _distinct(costs: Sequence[Sequence[float]], transfer: TransferTime, pipeline: bool, m: int) -> ChainPlan | None:
    n, num_devices = len(costs), len(costs[0])
    # fronts[i][(mask, last)]: for layers [0, i) placed on the devices in mask, the last stage on `last`, the
    # (sum, largest) stage-time pairs no other plan of that prefix beats in both, each with its parent. The largest
    # is tracked only under "pipeline" (0 under "sequential", leaving one pair: the least sum).
    fronts: list[dict[tuple[int, int], list[tuple[Pair, Parent]]]] = [{} for _ in range(n + 1)]
    fronts[0][(0, -1)] = [((0.0, 0.0), None)]
    for i in range(n):  # every state of fronts[i] is final here: stages only end after layer i
        for (mask, last), front in sorted(fronts[i].items()):
            for d in range(num_devices):
                if mask >> d & 1:
                    continue
                into = transfer(i - 1, last, d) if i > 0 else 0.0
                compute = 0.0
                for j in range(i + 1, n + 1):
                    compute += costs[j - 1][d]
                    if math.isinf(compute + into):
                        break
                    stage = compute + into
                    target = fronts[j].setdefault((mask | 1 << d, d), [])
                    for k, ((total, longest), _) in enumerate(front):
                        _keep(target, (total + stage, max(longest, stage) if pipeline else 0.0), (i, mask, last, k))
    finals = [(_pipeline_time(total, longest, m) if pipeline else total, mask, last, k)
              for (mask, last), front in sorted(fronts[n].items()) for k, ((total, longest), _) in enumerate(front)]
    if not finals:
        return None
    predicted, mask, last, k = min(finals)
    devices = [0] * n
    j = n
    while j > 0:
        _, (i, prev_mask, prev_last, prev_k) = fronts[j][(mask, last)][k]
        devices[i:j] = [last] * (j - i)
        j, mask, last, k = i, prev_mask, prev_last, prev_k
    return ChainPlan(devices, _stages(devices), predicted, "pipeline" if pipeline else "sequential", m)


def _shared(costs: Sequence[Sequence[float]], transfer: TransferTime) -> ChainPlan | None:
    n, num_devices = len(costs), len(costs[0])
    # time[i][d]: best time for layers [0, i] with layer i on device d.
    time = [[float(c) for c in costs[0]]]
    parent: list[list[int]] = [[-1] * num_devices]
    for i in range(1, n):
        row, back = [], []
        for d in range(num_devices):
            options = [(time[i - 1][e] + (0.0 if e == d else transfer(i - 1, e, d)), e) for e in range(num_devices)]
            value, e = min(options)
            row.append(value + costs[i][d])
            back.append(e)
        time.append(row)
        parent.append(back)
    predicted, d = min((t, d) for d, t in enumerate(time[-1]))
    if math.isinf(predicted):
        return None
    devices = [0] * n
    for i in range(n - 1, -1, -1):
        devices[i] = d
        d = parent[i][d]
    return ChainPlan(devices, _stages(devices), predicted, "sequential", 1)


def _distinct_default(objective: str, distinct_devices: bool | None) -> bool:
    """One stage per device for ``"pipeline"`` (required there), any plan for ``"sequential"``, unless told."""
    distinct = objective == "pipeline" if distinct_devices is None else distinct_devices
    if objective == "pipeline" and not distinct:
        raise ValueError("hetrain: the pipeline objective needs distinct devices (two stages on one device "
                         "serialise); leave distinct_devices unset, or use objective='sequential'")
    return distinct


def _infeasible(costs: Sequence[Sequence[float]], transfer: TransferTime, objective: str, distinct: bool) -> ValueError:
    """The error for a chain with no finite plan; it suggests letting a device hold several stages only where some
    plan doing so is finite."""
    if not distinct or _shared(costs, transfer) is None:
        return ValueError("hetrain: no placement of the chain has a finite time: every way of putting the layers "
                          "on devices they can run on crosses an inf transfer; check inf costs and transfers")
    fix = ("use objective='sequential' (a device may then hold several stages)" if objective == "pipeline"
           else "pass distinct_devices=False (a device may then hold several stages)")
    return ValueError(f"hetrain: no placement with one stage per device has a finite time; {fix}, or check inf "
                      "costs and transfers")


def _solve(costs: Sequence[Sequence[float]], transfer: TransferTime, objective: str, micro_batches: int,
           distinct_devices: bool | None) -> ChainPlan:
    distinct = _distinct_default(objective, distinct_devices)
    transfer = _checked(transfer)
    if distinct:
        plan = _distinct(costs, transfer, objective == "pipeline", micro_batches)
    else:
        plan = _shared(costs, transfer)
    if plan is None:
        raise _infeasible(costs, transfer, objective, distinct)
    return plan


def chain_dp(
    costs: Sequence[Sequence[float]],
    transfer: Sequence[float],
    objective: str = "sequential",
    micro_batches: int = 1,
    distinct_devices: bool | None = None,
) -> ChainPlan:
    """Optimal stages for a chain; ``transfer[i]`` is the time to cross boundary ``i`` between two devices.

    Args:
        costs: layer -> cost on each device (forward + backward; ``inf`` where it cannot run).
        transfer: one time per boundary (``len(costs) - 1`` of them), paid when its two sides differ
            (``inf`` where they must not).
        objective: ``"sequential"`` or ``"pipeline"`` (see the module docstring for the model).
        micro_batches: ``m`` of the pipeline estimate.
        distinct_devices: each device holds at most one stage; ``None`` (default) means yes for
            ``"pipeline"`` (required there) and no for ``"sequential"``.
    """
    _check(costs, len(transfer), objective, micro_batches)
    _check_boundaries(transfer, "transfer time", finite=False)
    return _solve(costs, lambda i, a, b: transfer[i], objective, micro_batches, distinct_devices)


def chain_dp_bytes(
    costs: Sequence[Sequence[float]],
    boundary_bytes: Sequence[float],
    bandwidth: Sequence[Sequence[float]],
    objective: str = "sequential",
    micro_batches: int = 1,
    distinct_devices: bool | None = None,
) -> ChainPlan:
    """:func:`chain_dp` with boundary ``i`` costing ``boundary_bytes[i] / bandwidth[a][b]`` from device a to b
    (0 over an ``inf``, free, link); byte counts must be finite."""
    num_devices = _check(costs, len(boundary_bytes), objective, micro_batches)
    check_bandwidth(bandwidth, num_devices)
    _check_boundaries(boundary_bytes, "byte count", finite=True)
    return _solve(costs, _byte_transfer(boundary_bytes, bandwidth), objective, micro_batches, distinct_devices)


def chain_time(
    costs: Sequence[Sequence[float]],
    boundary_bytes: Sequence[float],
    bandwidth: Sequence[Sequence[float]],
    devices: Sequence[int],
    objective: str = "sequential",
    micro_batches: int = 1,
) -> float:
    """The time the model above predicts for a given ``devices`` (one per layer), e.g. a hand-written plan.

    Prices any assignment the same way the solvers do, so a plan can be held against the optimum. Under
    ``"pipeline"`` contiguous layers on one device form a stage and each device may hold one stage, as in
    :func:`chain_dp`: the model has no time for a device running two stages, so such a plan is refused.
    """
    num_devices = _check(costs, len(boundary_bytes), objective, micro_batches)
    check_bandwidth(bandwidth, num_devices)
    _check_boundaries(boundary_bytes, "byte count", finite=True)
    _check_devices(devices, len(costs), num_devices)
    stages = _stages(list(devices))
    if objective == "pipeline":
        _check_one_stage_per_device(stages)
    transfer = _checked(_byte_transfer(boundary_bytes, bandwidth))
    times = [
        (transfer(first - 1, devices[first - 1], d) if first > 0 else 0.0) + sum(costs[i][d] for i in range(first, end))
        for first, end, d in stages
    ]
    if objective == "sequential":
        return float(sum(times))
    return float(_pipeline_time(sum(times), max(times), micro_batches))


def _check_devices(devices: Sequence[int], layers: int, num_devices: int) -> None:
    if len(devices) != layers:
        raise ValueError(f"hetrain: {layers} layers need {layers} devices, got {len(devices)}")
    for i, d in enumerate(devices):
        # a bool or float would index as a number; a negative index would silently pick a device from the end
        if not isinstance(d, numbers.Integral) or isinstance(d, bool) or not 0 <= d < num_devices:
            raise ValueError(f"hetrain: device indices must be in [0, {num_devices}) (whole numbers, one per column "
                             f"of costs); layer {i} has {d!r}")


def _check_one_stage_per_device(stages: list[tuple[int, int, int]]) -> None:
    first_stage: dict[int, tuple[int, int]] = {}
    for first, end, d in stages:
        if d in first_stage:
            raise ValueError(f"hetrain: under the pipeline objective a device holds one stage, but device {d} holds "
                             f"{_layers(*first_stage[d])} and {_layers(first, end)}; keep each device's layers "
                             "contiguous, or price the plan with objective='sequential'")
        first_stage[d] = (first, end)


def _layers(first: int, end: int) -> str:
    return f"layer {first}" if end == first + 1 else f"layers {first}-{end - 1}"
