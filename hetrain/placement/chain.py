"""Exact placement of a chain of layers (a pipelined model) by dynamic programming.

The layers are cut into contiguous stages, each stage on one device. Two objectives:

``"sequential"``: one pass with no overlap, ``sum(stage compute) + sum(boundary transfers)``.

``"pipeline"``: GPipe-style fill and drain with ``m`` micro-batches over ``S`` stages. Every stage
handles each micro-batch once forward and once backward, so the step takes
``(m + S - 1) * max_s t_s``, where ``t_s`` is stage ``s``'s time per micro-batch: its layers'
costs plus the transfer of the boundary in front of it (the activation coming in and its gradient
going back over the same link, charged to the receiving stage: copies are not assumed to overlap
compute). Costs are therefore read as per micro-batch for this objective.

A transfer at boundary ``i`` (between layers ``i`` and ``i + 1``) costs nothing when both sides are
on the same device. With ``distinct_devices`` (always, for ``"pipeline"``) each device holds at
most one stage; the search is over (layers placed, set of devices used, last device), so it is
exact and takes ``O(n^2 * 2^D * D^2)`` steps for ``n`` layers and ``D`` devices. Without it
(``"sequential"`` only) a device may hold several stages and the search is a shortest path over
(layer, device).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

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


def _check(costs: Sequence[Sequence[float]], boundaries: int, objective: str, micro_batches: int) -> int:
    if objective not in OBJECTIVES:
        raise ValueError(f"hetrain: objective {objective!r} is not one of {OBJECTIVES}")
    if micro_batches < 1:
        raise ValueError(f"hetrain: micro_batches={micro_batches}; it must be >= 1")
    if not costs:
        raise ValueError("hetrain: the chain has no layers")
    widths = {len(row) for row in costs}
    if len(widths) > 1 or 0 in widths:
        raise ValueError(f"hetrain: every layer needs one cost per device; got row lengths {[len(r) for r in costs]}")
    for i, row in enumerate(costs):
        for d, c in enumerate(row):
            if math.isnan(c) or c < 0:
                raise ValueError(f"hetrain: cost of layer {i} on device {d} is {c}; costs must be >= 0")
        if all(math.isinf(c) for c in row):
            raise ValueError(f"hetrain: layer {i} can run on no device (every cost is inf)")
    if boundaries != len(costs) - 1:
        raise ValueError(
            f"hetrain: {len(costs)} layers have {len(costs) - 1} boundaries; got {boundaries} transfer costs"
        )
    return widths.pop()


def _stages(devices: list[int]) -> list[tuple[int, int, int]]:
    stages: list[tuple[int, int, int]] = []
    for i, d in enumerate(devices):
        if stages and stages[-1][2] == d:
            stages[-1] = (stages[-1][0], i + 1, d)
        else:
            stages.append((i, i + 1, d))
    return stages


def _distinct(costs: Sequence[Sequence[float]], transfer: TransferTime, pipeline: bool, m: int) -> ChainPlan | None:
    n, num_devices = len(costs), len(costs[0])
    # best[i][(mask, last)] = (value, parent state, stage device): layers [0, i) placed on the devices
    # in mask, the last stage on `last`; value is the sum so far (sequential) or the largest stage time.
    best: list[dict[tuple[int, int], tuple[float, tuple[int, int, int] | None]]] = [{} for _ in range(n + 1)]
    best[0][(0, -1)] = (0.0, None)
    for i in range(n):
        for (mask, last), (value, _) in sorted(best[i].items()):
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
                    total = max(value, stage) if pipeline else value + stage
                    key = (mask | 1 << d, d)
                    if key not in best[j] or total < best[j][key][0]:
                        best[j][key] = (total, (i, mask, last))
    finals = []
    for (mask, last), (value, _) in sorted(best[n].items()):
        stages = bin(mask).count("1")
        finals.append(((m + stages - 1) * value if pipeline else value, mask, last))
    if not finals:
        return None
    predicted, mask, last = min(finals)
    devices = [0] * n
    j = n
    while j > 0:
        _, (i, prev_mask, prev_last) = best[j][(mask, last)]
        devices[i:j] = [last] * (j - i)
        j, mask, last = i, prev_mask, prev_last
    return ChainPlan(devices, _stages(devices), predicted, "pipeline" if pipeline else "sequential", m)


def _shared(costs: Sequence[Sequence[float]], transfer: TransferTime) -> ChainPlan | None:
    n, num_devices = len(costs), len(costs[0])
    # time[i][d]: best time for layers [0, i] with layer i on device d.
    time = [list(costs[0])]
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


def _solve(costs, transfer: TransferTime, objective: str, micro_batches: int, distinct_devices: bool) -> ChainPlan:
    if objective == "pipeline" and not distinct_devices:
        raise ValueError("hetrain: the pipeline objective needs distinct devices (two stages on one device serialise)")
    if distinct_devices:
        plan = _distinct(costs, transfer, objective == "pipeline", micro_batches)
    else:
        plan = _shared(costs, transfer)
    if plan is None:
        raise ValueError("hetrain: no placement of the chain has a finite time (check inf costs and transfers)")
    return plan


def chain_dp(
    costs: Sequence[Sequence[float]],
    transfer: Sequence[float],
    objective: str = "sequential",
    micro_batches: int = 1,
    distinct_devices: bool = True,
) -> ChainPlan:
    """Optimal stages for a chain; ``transfer[i]`` is the time to cross boundary ``i`` between two devices.

    Args:
        costs: layer -> cost on each device (forward + backward; ``inf`` where it cannot run).
        transfer: one time per boundary (``len(costs) - 1`` of them), paid when its two sides differ.
        objective: ``"sequential"`` or ``"pipeline"`` (see the module docstring for the model).
        micro_batches: ``m`` of the pipeline estimate.
        distinct_devices: each device holds at most one stage (required for ``"pipeline"``).
    """
    _check(costs, len(transfer), objective, micro_batches)
    for i, t in enumerate(transfer):
        if math.isnan(t) or t < 0:
            raise ValueError(f"hetrain: transfer time at boundary {i} is {t}; it must be >= 0")
    return _solve(costs, lambda i, a, b: transfer[i], objective, micro_batches, distinct_devices)


def chain_dp_bytes(
    costs: Sequence[Sequence[float]],
    boundary_bytes: Sequence[float],
    bandwidth: Sequence[Sequence[float]],
    objective: str = "sequential",
    micro_batches: int = 1,
    distinct_devices: bool = True,
) -> ChainPlan:
    """:func:`chain_dp` with boundary ``i`` costing ``boundary_bytes[i] / bandwidth[a][b]`` from device a to b."""
    num_devices = _check(costs, len(boundary_bytes), objective, micro_batches)
    if len(bandwidth) != num_devices or any(len(row) != num_devices for row in bandwidth):
        raise ValueError(f"hetrain: bandwidth must be a {num_devices} x {num_devices} matrix (one row per device)")
    for a in range(num_devices):
        for b in range(num_devices):
            if a != b and (math.isnan(bandwidth[a][b]) or bandwidth[a][b] <= 0):
                raise ValueError(f"hetrain: bandwidth from device {a} to {b} is {bandwidth[a][b]}; it must be > 0")
    for i, nbytes in enumerate(boundary_bytes):
        if math.isnan(nbytes) or nbytes < 0:
            raise ValueError(f"hetrain: byte count at boundary {i} is {nbytes}; it must be >= 0")
    return _solve(
        costs, lambda i, a, b: boundary_bytes[i] / bandwidth[a][b], objective, micro_batches, distinct_devices
    )


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
    ``"pipeline"``, contiguous layers on one device form a stage, and a device holding two stages
    serialises them: their times add on that device.
    """
    _check(costs, len(boundary_bytes), objective, micro_batches)
    if len(devices) != len(costs):
        raise ValueError(f"hetrain: {len(costs)} layers need {len(costs)} devices, got {len(devices)}")
    n_devices = len(costs[0]) if costs else 0
    wrong = [(i, d) for i, d in enumerate(devices) if not 0 <= d < n_devices]
    if wrong:  # a negative index would silently pick a device from the end
        raise ValueError(f"hetrain: device indices must be in [0, {n_devices}) (one per column of costs); "
                         f"layer {wrong[0][0]} has {wrong[0][1]}")
    stage_times: dict[int, float] = {}
    total = 0.0
    for first, end, d in _stages(list(devices)):
        into = boundary_bytes[first - 1] / bandwidth[devices[first - 1]][d] if first > 0 else 0.0
        stage = into + sum(costs[i][d] for i in range(first, end))
        total += stage
        stage_times[d] = stage_times.get(d, 0.0) + stage
    if objective == "sequential":
        return total
    return (micro_batches + len(stage_times) - 1) * max(stage_times.values())
