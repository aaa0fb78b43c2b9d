"""HEFT list scheduling of a task graph onto heterogeneous devices.

Heterogeneous Earliest Finish Time (Topcuoglu, Hariri and Wu, IEEE TPDS 13(3), 2002):

1. each task's *upward rank* is its mean compute cost (over the devices it can run on) plus the
   largest, over its successors, of the mean transfer cost of the edge (0 for an ``inf`` one, whose
   data never crosses) plus the successor's rank;
2. tasks are taken in decreasing rank order (among the tasks whose predecessors are placed, so the
   order is topological even when zero costs make ranks equal; ties go to the task given first);
3. each task goes to the device where it would finish earliest, looking for the earliest idle gap
   on that device that is long enough (insertion policy); ties go to the lower device index.

An ``inf`` transfer time means the data cannot cross devices, so both ends of that edge share one. Step 3
then looks only at devices that leave every task still to place a device it can run on and receive its
inputs on (arc consistency over the edges, narrowed again after each placement), so earliest finish
cannot strand a successor; that is exact for such all-or-nothing edges, and an error names the edges
when no device fits.

torch has no task-graph scheduler, hence this module.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field

Task = Hashable
Edge = tuple[Task, Task]

# Upward ranks closer than this (relative) count as equal, so float rounding in the means
# (43/3 vs 38/3) cannot reorder tasks whose ranks are equal in exact arithmetic.
_RANK_RTOL = 1e-9


@dataclass
class Schedule:
    """Where and when each task runs. ``order`` is the priority list HEFT placed the tasks in."""

    assignment: dict[Task, int]
    start: dict[Task, float]
    finish: dict[Task, float]
    makespan: float
    order: list[Task] = field(default_factory=list)


def is_number(value: object) -> bool:
    """A real number, not a bool (True would read as a cost of 1); the chain solver checks with it too."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def transfer_seconds(nbytes: float, bandwidth: float) -> float:
    """``nbytes / bandwidth``, with a free (inf) link costing 0 by definition rather than by ``x / inf``."""
    return 0.0 if math.isinf(bandwidth) else nbytes / bandwidth


def check_bandwidth(bandwidth: Sequence[Sequence[float]], num_devices: int) -> None:
    """A devices x devices matrix of bytes/s, > 0 off the diagonal (``inf`` for a free link); the diagonal is unread."""
    if len(bandwidth) != num_devices or any(len(row) != num_devices for row in bandwidth):
        raise ValueError(f"hetrain: bandwidth must be a {num_devices} x {num_devices} matrix (one row per device)")
    for a in range(num_devices):
        for b in range(num_devices):
            value = bandwidth[a][b]
            if a != b and (not is_number(value) or math.isnan(value) or value <= 0):
                raise ValueError(f"hetrain: bandwidth from device {a} to {b} is {value!r}; it must be a number > 0 "
                                 "in bytes/s (inf for a free link)")


def _check_costs(compute: Mapping[Task, Sequence[float]]) -> int:
    """Validates the cost table; returns the number of devices."""
    if not isinstance(compute, Mapping):
        raise ValueError(f"hetrain: compute must map each task to its per-device costs, got {type(compute).__name__}")
    widths = {len(costs) for costs in compute.values()}
    if len(widths) > 1:
        lengths = ", ".join(f"{task!r}: {len(costs)}" for task, costs in compute.items())
        raise ValueError(f"hetrain: compute cost lists differ in length (one entry per device expected): {lengths}")
    num_devices = widths.pop() if widths else 0
    if compute and num_devices == 0:
        raise ValueError("hetrain: compute cost lists are empty; give one cost per device")
    for task, costs in compute.items():
        for d, c in enumerate(costs):
            if not is_number(c):
                raise ValueError(f"hetrain: compute cost of task {task!r} on device {d} is {c!r}; costs are "
                                 "numbers (inf where the task cannot run)")
            if math.isnan(c) or c < 0:
                raise ValueError(f"hetrain: compute cost of task {task!r} on device {d} is {c}; costs must be >= 0")
        if all(math.isinf(c) for c in costs):
            raise ValueError(f"hetrain: task {task!r} can run on no device (every cost is inf)")
    return num_devices


def _check_edges(
    compute: Mapping[Task, Sequence[float]], edges: Mapping[Edge, float], what: str, finite: bool = False
) -> None:
    """Edges between known tasks with values >= 0; ``finite`` for byte counts (inf bytes has no transfer time)."""
    if not isinstance(edges, Mapping):
        raise ValueError(f"hetrain: edges must map each (u, v) pair to its {what}, got {type(edges).__name__}")
    for edge, value in edges.items():
        if not (isinstance(edge, tuple) and len(edge) == 2):
            raise ValueError(f"hetrain: edge {edge!r} is not a (u, v) pair")
        for end in edge:
            if end not in compute:
                raise ValueError(f"hetrain: edge {edge!r} names task {end!r}, which has no compute costs")
        if not is_number(value) or math.isnan(value) or value < 0:
            raise ValueError(f"hetrain: {what} of edge {edge!r} is {value!r}; it must be a number >= 0")
        if finite and math.isinf(value):
            raise ValueError(f"hetrain: {what} of edge {edge!r} is inf; give the bytes it carries (a finite number), "
                             "or use heft() with an inf transfer time for an edge that must stay on one device")


def topological_order(tasks: Sequence[Task], edges: Sequence[Edge]) -> list[Task]:
    """Tasks in an order where every edge points forward; raises naming a cycle if there is one."""
    if len(set(tasks)) != len(tasks):  # a repeated task would be ordered twice
        repeated = ", ".join(dict.fromkeys(repr(t) for t in tasks if tasks.count(t) > 1))
        raise ValueError(f"hetrain: tasks are given more than once ({repeated}); list each task once")
    succs: dict[Task, list[Task]] = {t: [] for t in tasks}
    indegree = dict.fromkeys(tasks, 0)
    for edge in edges:
        if not (isinstance(edge, tuple) and len(edge) == 2) or not all(end in succs for end in edge):
            raise ValueError(f"hetrain: edge {edge!r} is not a (u, v) pair of the tasks given")
        u, v = edge
        succs[u].append(v)
        indegree[v] += 1
    ready = [t for t in tasks if indegree[t] == 0]
    order: list[Task] = []
    while ready:
        t = ready.pop(0)
        order.append(t)
        for v in succs[t]:
            indegree[v] -= 1
            if indegree[v] == 0:
                ready.append(v)
    if len(order) < len(tasks):
        raise ValueError(f"hetrain: the task graph has a cycle: {_find_cycle(tasks, edges, set(order))}")
    return order


def _find_cycle(tasks: Sequence[Task], edges: Sequence[Edge], acyclic: set[Task]) -> str:
    # Every task Kahn's algorithm could not order has a predecessor it could not order either, so
    # walking predecessors from one of them must revisit a task: that walk's loop is a cycle.
    preds: dict[Task, list[Task]] = {t: [] for t in tasks}
    for u, v in edges:
        preds[v].append(u)
    node = next(t for t in tasks if t not in acyclic)
    seen: list[Task] = []
    while node not in seen:
        seen.append(node)
        node = next(p for p in preds[node] if p not in acyclic)
    loop = seen[seen.index(node) :][::-1]
    return " -> ".join(repr(t) for t in [*loop, loop[0]])


def upward_ranks(
    compute: Mapping[Task, Sequence[float]], mean_comm: Mapping[Edge, float], order: Sequence[Task]
) -> dict[Task, float]:
    """HEFT's upward rank of each task, from mean compute costs and mean transfer costs.

    An ``inf`` transfer counts 0: its ends share a device, so its data never crosses. As ``inf`` it would make
    every upstream rank ``inf``, and the tasks' order, hence the schedule, would follow the order they were given.
    """
    succs: dict[Task, list[Task]] = {t: [] for t in compute}
    for u, v in mean_comm:
        succs[u].append(v)
    comm = {edge: 0.0 if math.isinf(cost) else cost for edge, cost in mean_comm.items()}
    rank: dict[Task, float] = {}
    for t in reversed(order):
        finite = [c for c in compute[t] if not math.isinf(c)]
        tail = max((comm[(t, v)] + rank[v] for v in succs[t]), default=0.0)
        rank[t] = sum(finite) / len(finite) + tail
    return rank


def _priority_list(tasks: Sequence[Task], edges: Sequence[Edge], rank: Mapping[Task, float]) -> list[Task]:
    # Highest rank among the ready tasks: the plain decreasing-rank order when ranks strictly
    # decrease along edges, and still topological when zero costs make a task tie its successor.
    index = {t: i for i, t in enumerate(tasks)}
    preds_left = dict.fromkeys(tasks, 0)
    succs: dict[Task, list[Task]] = {t: [] for t in tasks}
    for u, v in edges:
        preds_left[v] += 1
        succs[u].append(v)
    ready = {t for t in tasks if preds_left[t] == 0}
    order = []
    while ready:
        top = max(rank[t] for t in ready)
        tied = [t for t in ready if math.isclose(rank[t], top, rel_tol=_RANK_RTOL)]
        t = min(tied, key=index.__getitem__)
        ready.remove(t)
        order.append(t)
        for v in succs[t]:
            preds_left[v] -= 1
            if preds_left[v] == 0:
                ready.add(v)
    return order


def _earliest_slot(busy: list[tuple[float, float]], ready: float, duration: float) -> float:
    """Earliest start >= ``ready`` of an idle gap of ``duration`` on a device busy at ``busy`` (sorted)."""
    start = ready
    for s, f in busy:
        if start + duration <= s:
            return start
        start = max(start, f)
    return start


# task -> (edge, neighbour, whether the neighbour is the edge's source) for every edge touching it
Links = dict[Task, list[tuple[Edge, Task, bool]]]
CanCross = Callable[[Edge, int, int], bool]  # (edge, source device, target device) -> the data can get there


def _links(tasks: Sequence[Task], edges: Sequence[Edge]) -> Links:
    links: Links = {t: [] for t in tasks}
    for u, v in edges:
        links[u].append(((u, v), v, False))
        links[v].append(((u, v), u, True))
    return links


def _supported(edge: Edge, device: int, is_source: bool, others: set[int], can_cross: CanCross) -> bool:
    """Whether an end of ``edge`` on ``device`` can exchange its data with the other end on one of ``others``."""
    return any(can_cross(edge, device, o) if is_source else can_cross(edge, o, device) for o in others)


def _propagate(
    domains: Mapping[Task, set[int]], links: Links, can_cross: CanCross, changed: dict[Task, set[int]]
) -> dict[Task, set[int]]:
    """Arc consistency: the domains that shrink once ``changed`` holds, so no device is kept that strands a
    neighbour. Stops at the first task left with no device (an empty set in the result)."""
    changed = dict(changed)
    pending = list(changed)
    while pending:
        t = pending.pop()
        mine = changed.get(t, domains[t])
        for edge, other, other_is_source in links[t]:
            theirs = changed.get(other, domains[other])
            keep = {d for d in theirs if _supported(edge, d, other_is_source, mine, can_cross)}
            if keep != theirs:
                changed[other] = keep
                if not keep:
                    return changed
                pending.append(other)
    return changed


def _feasible_devices(compute: Mapping[Task, Sequence[float]], links: Links, can_cross: CanCross,
                      num_devices: int) -> dict[Task, set[int]]:
    """Each task's devices from which every neighbour can still exchange data with it on a device it can run
    on: an inf transfer pins both ends of its edge to one device, and greedy earliest finish must not strand
    a successor by ignoring that."""
    domains = {t: {d for d, c in enumerate(costs) if not math.isinf(c)} for t, costs in compute.items()}
    domains.update(_propagate(domains, links, can_cross, {t: domains[t] for t in compute}))
    stuck = [t for t, devices in domains.items() if not devices]
    if stuck:
        pairs = [(a, b) for a in range(num_devices) for b in range(num_devices) if a != b]
        blocked = [edge for edge, _, _ in links[stuck[0]] if any(not can_cross(edge, a, b) for a, b in pairs)]
        raise ValueError(
            f"hetrain: task {stuck[0]!r} has no device left: the transfers of {blocked} are inf, so the tasks they "
            "join must share a device, and no device can run all of them. Give them a common device with a "
            "finite compute cost, or make those transfers finite"
        )
    return domains


def _placeable(t: Task, domains: Mapping[Task, set[int]], links: Links, can_cross: CanCross
               ) -> dict[int, dict[Task, set[int]]]:
    """Devices for ``t`` that leave every other task a device, each with the domains placing ``t`` there narrows."""
    options = {}
    for d in sorted(domains[t]):
        narrowed = _propagate(domains, links, can_cross, {t: {d}})
        if all(narrowed.values()):
            options[d] = narrowed
    return options


def _arrival(edge: Edge, finish: float, a: int, b: int, comm_time: Callable[[Edge, int, int], float]) -> float:
    """When ``edge``'s data reaches device ``b`` from a task on ``a`` that finished at ``finish``."""
    delay = 0.0 if a == b else comm_time(edge, a, b)
    if math.isnan(delay):  # nan compares false with everything: it would win or lose every choice silently
        raise ValueError(f"hetrain: transfer time of edge {edge!r} from device {a} to {b} is nan; check the "
                         "transfer times, byte counts and bandwidths given")
    return finish + delay


def _schedule(
    compute: Mapping[Task, Sequence[float]],
    edges: Sequence[Edge],
    mean_comm: Mapping[Edge, float],
    comm_time: Callable[[Edge, int, int], float],
    num_devices: int,
) -> Schedule:
    tasks = list(compute)
    order = _priority_list(tasks, edges, upward_ranks(compute, mean_comm, topological_order(tasks, edges)))
    links = _links(tasks, edges)
    can_cross: CanCross = lambda edge, a, b: a == b or not math.isinf(comm_time(edge, a, b))
    domains = _feasible_devices(compute, links, can_cross, num_devices)
    preds: dict[Task, list[Task]] = {t: [] for t in tasks}
    for u, v in edges:
        preds[v].append(u)
    busy: list[list[tuple[float, float]]] = [[] for _ in range(num_devices)]
    assignment: dict[Task, int] = {}
    start: dict[Task, float] = {}
    finish: dict[Task, float] = {}
    for t in order:
        options = _placeable(t, domains, links, can_cross)
        best: tuple[float, float, int] | None = None
        for d in options:
            cost = compute[t][d]
            ready = max((_arrival((u, t), finish[u], assignment[u], d, comm_time) for u in preds[t]), default=0.0)
            if math.isinf(ready):
                continue
            s = _earliest_slot(busy[d], ready, cost)
            if best is None or s + cost < best[0]:
                best = (s + cost, s, d)
        if best is None:
            raise ValueError(f"hetrain: task {t!r} cannot receive its inputs on any device it can run on without "
                             "leaving a later task none (inf transfers between them); make those transfers finite")
        f, s, d = best
        domains.update(options[d])
        assignment[t], start[t], finish[t] = d, s, f
        busy[d].append((s, f))
        busy[d].sort()
    return Schedule(assignment, start, finish, max(finish.values(), default=0.0), order)


def heft(compute: Mapping[Task, Sequence[float]], comm: Mapping[Edge, float]) -> Schedule:
    """Schedules a task graph with HEFT.

    Args:
        compute: task -> its cost on each device (``inf`` where it cannot run); every list has one
            entry per device.
        comm: edge ``(u, v)`` -> transfer time when ``u`` and ``v`` run on different devices (none on
            the same device; ``inf`` where they must share one). The edges define the graph; tasks with
            no edges are allowed.
    """
    num_devices = _check_costs(compute)
    _check_edges(compute, comm, "transfer time")
    return _schedule(compute, list(comm), comm, lambda edge, a, b: comm[edge], num_devices)


def heft_bytes(
    compute: Mapping[Task, Sequence[float]],
    edge_bytes: Mapping[Edge, float],
    bandwidth: Sequence[Sequence[float]],
) -> Schedule:
    """HEFT with transfers priced per device pair: ``edge_bytes[(u, v)] / bandwidth[d_u][d_v]`` seconds.

    ``bandwidth`` is a devices x devices matrix in bytes/s (``inf`` for a free link, which costs 0 for
    any count); its diagonal is not read, since a transfer within a device costs nothing. Byte counts
    must be finite. An edge's mean cost for the ranks is its bytes times the mean of ``1 / bandwidth``
    over ordered pairs of different devices.
    """
    num_devices = _check_costs(compute)
    _check_edges(compute, edge_bytes, "byte count", finite=True)
    check_bandwidth(bandwidth, num_devices)
    pairs = [(a, b) for a in range(num_devices) for b in range(num_devices) if a != b]
    mean_inverse = sum(transfer_seconds(1.0, bandwidth[a][b]) for a, b in pairs) / len(pairs) if pairs else 0.0
    # 0 bytes cost nothing even where 1 / bandwidth overflows to inf (0 * inf would be a nan rank).
    mean_comm = {edge: nbytes * mean_inverse if nbytes else 0.0 for edge, nbytes in edge_bytes.items()}
    return _schedule(
        compute,
        list(edge_bytes),
        mean_comm,
        lambda edge, a, b: transfer_seconds(edge_bytes[edge], bandwidth[a][b]),
        num_devices,
    )
