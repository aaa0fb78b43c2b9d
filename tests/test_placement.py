"""hetrain.placement: HEFT against the published example and invariants, the chain solver against brute
force, the measured cost model, and plans (save, load, apply, resolve)."""

from __future__ import annotations

import io
import itertools
import json
import math
import random
from collections import UserDict
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

from hetrain.placement import (
    CostModel,
    PlacementPlan,
    chain_dp,
    chain_dp_bytes,
    chain_time,
    heft,
    heft_bytes,
    measure,
    resolve_plan,
    topological_order,
    upward_ranks,
)
from hetrain.placement.plan import (
    flatten_plan,
    hook_inputs,
    refuse_other_processes_devices,
    refuse_repeated_devices,
    remove_input_hooks,
)

INF = math.inf
ROOT = Path(__file__).resolve().parent.parent

# Topcuoglu, Hariri and Wu (2002), Fig. 2: 10 tasks on 3 processors; computation costs per processor
# and transfer times of the edges.
PAPER_COMPUTE = {
    1: [14, 16, 9], 2: [13, 19, 18], 3: [11, 13, 19], 4: [13, 8, 17], 5: [12, 13, 10],
    6: [13, 16, 9], 7: [7, 15, 11], 8: [5, 11, 14], 9: [18, 12, 20], 10: [21, 7, 16],
}  # fmt: skip
PAPER_COMM = {
    (1, 2): 18, (1, 3): 12, (1, 4): 9, (1, 5): 11, (1, 6): 14, (2, 8): 19, (2, 9): 16, (3, 7): 23,
    (4, 8): 27, (4, 9): 23, (5, 9): 13, (6, 8): 15, (7, 10): 17, (8, 10): 11, (9, 10): 13,
}  # fmt: skip


def assert_valid(schedule, compute, comm_time) -> None:
    """Every task once on a device it can run on, for its cost; edges wait for the data; no overlap per device."""
    assert set(schedule.assignment) == set(compute)
    for t, d in schedule.assignment.items():
        assert compute[t][d] != INF, f"task {t} placed on device {d}, where it cannot run"
        assert schedule.start[t] >= 0
        assert schedule.finish[t] == pytest.approx(schedule.start[t] + compute[t][d])
    for (u, v), _ in comm_time.items():
        du, dv = schedule.assignment[u], schedule.assignment[v]
        delay = 0 if du == dv else comm_time[(u, v)](du, dv)
        assert schedule.start[v] >= schedule.finish[u] + delay - 1e-9, f"edge {u}->{v} starts before its data arrives"
    by_device: dict[int, list] = {}
    for t, d in schedule.assignment.items():
        by_device.setdefault(d, []).append((schedule.start[t], schedule.finish[t], t))
    for d, spans in by_device.items():
        spans.sort()
        for (_, f1, a), (s2, _, b) in itertools.pairwise(spans):
            assert s2 >= f1 - 1e-9, f"tasks {a} and {b} overlap on device {d}"
    assert schedule.makespan == max(schedule.finish.values())


def fixed(comm):
    return {e: (lambda a, b, c=c: c) for e, c in comm.items()}


def random_dag(rng: random.Random, n: int, devices: int, p_edge: float = 0.3, p_inf: float = 0.15):
    compute = {}
    for t in range(n):
        row = [float(rng.randint(1, 20)) if rng.random() > p_inf else INF for _ in range(devices)]
        if all(c == INF for c in row):
            row[rng.randrange(devices)] = float(rng.randint(1, 20))
        compute[f"t{t}"] = row
    comm = {(f"t{u}", f"t{v}"): float(rng.randint(0, 15)) for u in range(n) for v in range(u + 1, n)
            if rng.random() < p_edge}  # fmt: skip
    tasks = list(compute)
    rng.shuffle(tasks)  # the given order of tasks must not matter for validity
    return {t: compute[t] for t in tasks}, comm


def critical_path(compute, edges) -> float:
    """Longest path with each task at its cheapest cost and free transfers: no schedule can beat it."""
    longest = {}
    preds = {t: [u for u, v in edges if v == t] for t in compute}
    pending = list(compute)
    while pending:
        for t in list(pending):
            if all(u in longest for u in preds[t]):
                longest[t] = min(compute[t]) + max((longest[u] for u in preds[t]), default=0.0)
                pending.remove(t)
    return max(longest.values())


# HEFT


def test_heft_paper_example():
    schedule = heft(PAPER_COMPUTE, PAPER_COMM)
    assert schedule.makespan == 80
    assert_valid(schedule, PAPER_COMPUTE, fixed(PAPER_COMM))
    # The paper's priority list, and its upward ranks (Table in section 4.2).
    assert schedule.order == [1, 3, 4, 2, 5, 6, 9, 7, 8, 10]
    ranks = upward_ranks(PAPER_COMPUTE, PAPER_COMM, list(range(1, 11)))
    expected = {1: 108.0, 2: 77.0, 3: 80.0, 4: 80.0, 5: 69.0, 6: 63.333, 7: 42.667, 8: 35.667, 9: 44.333, 10: 14.667}
    assert ranks == pytest.approx(expected, abs=1e-3)


def test_heft_paper_example_through_bytes():
    # Bytes with a uniform 1 byte/s link are the same times: the same schedule.
    uniform = [[INF, 1.0, 1.0], [1.0, INF, 1.0], [1.0, 1.0, INF]]
    by_bytes = heft_bytes(PAPER_COMPUTE, PAPER_COMM, uniform)
    by_time = heft(PAPER_COMPUTE, PAPER_COMM)
    assert (by_bytes.assignment, by_bytes.start, by_bytes.makespan) == (
        by_time.assignment, by_time.start, by_time.makespan)  # fmt: skip


@pytest.mark.parametrize("seed", range(40))
def test_heft_random_dags_are_valid_and_bounded(seed):
    rng = random.Random(seed)
    devices = rng.randint(1, 4)
    compute, comm = random_dag(rng, rng.randint(1, 25), devices)
    schedule = heft(compute, comm)
    assert_valid(schedule, compute, fixed(comm))
    assert schedule.makespan >= critical_path(compute, comm) - 1e-9
    assert schedule.makespan >= sum(min(c) for c in compute.values()) / devices - 1e-9
    assert heft(compute, comm) == schedule  # deterministic


@pytest.mark.parametrize("seed", range(15))
def test_heft_bytes_random_dags_with_asymmetric_links(seed):
    rng = random.Random(100 + seed)
    devices = rng.randint(2, 4)
    compute, comm = random_dag(rng, rng.randint(2, 20), devices)
    edge_bytes = {e: c * 1000 for e, c in comm.items()}
    bw = [[INF if a == b else float(rng.choice([250, 500, 1000, 4000])) for b in range(devices)]
          for a in range(devices)]  # fmt: skip
    schedule = heft_bytes(compute, edge_bytes, bw)
    assert_valid(schedule, compute, {e: (lambda a, b, n=n: n / bw[a][b]) for e, n in edge_bytes.items()})
    assert schedule.makespan >= critical_path(compute, comm) - 1e-9


@pytest.mark.parametrize("seed", range(10))
def test_heft_on_one_device_is_the_sum_of_costs(seed):
    rng = random.Random(200 + seed)
    compute, comm = random_dag(rng, rng.randint(1, 30), 1, p_inf=0.0)
    schedule = heft(compute, comm)
    assert schedule.makespan == sum(c[0] for c in compute.values())
    assert set(schedule.assignment.values()) == {0}


def test_heft_keeps_a_chain_on_one_device_when_links_are_expensive():
    # Without transfers the layers would alternate between the devices; with them, splitting never pays.
    compute = {i: ([1.0, 9.0] if i % 2 else [9.0, 1.0]) for i in range(8)}
    cheap = heft(compute, {(i, i + 1): 0.0 for i in range(7)})
    assert len(set(cheap.assignment.values())) == 2
    costly = heft(compute, {(i, i + 1): 1e6 for i in range(7)})
    assert len(set(costly.assignment.values())) == 1
    assert costly.makespan == 40.0


def test_heft_inserts_a_task_into_an_idle_gap():
    # Device 1 idles until b's input arrives at 11; c, placed after b and d (lower rank), fits in that gap.
    compute = {"a": [1.0, INF], "b": [INF, 1.0], "d": [INF, 5.0], "c": [INF, 2.0]}
    schedule = heft(compute, {("a", "b"): 10.0, ("b", "d"): 0.0})
    assert schedule.order == ["a", "b", "d", "c"]
    assert (schedule.start["b"], schedule.start["c"], schedule.makespan) == (11.0, 0.0, 17.0)


def test_heft_independent_tasks_and_zero_costs():
    # No edges: tasks spread over the devices. Zero-cost chain: ranks tie, the order stays topological.
    spread = heft({t: [4.0, 4.0] for t in "abcd"}, {})
    assert spread.makespan == 8.0
    zero = heft({"c": [0.0], "b": [0.0], "a": [0.0]}, {("a", "b"): 0.0, ("b", "c"): 0.0})
    assert zero.order == ["a", "b", "c"]


def test_heft_cycle_error_names_a_task_on_the_cycle():
    compute = {t: [1.0, 2.0] for t in "abcde"}
    comm = {("a", "b"): 1.0, ("b", "c"): 1.0, ("c", "d"): 1.0, ("d", "b"): 1.0, ("d", "e"): 1.0}
    with pytest.raises(ValueError, match="cycle") as info:
        heft(compute, comm)
    message = str(info.value)
    assert "'b'" in message and "'c'" in message and "'d'" in message
    assert "'a'" not in message and "'e'" not in message
    with pytest.raises(ValueError, match="cycle: 'a' -> 'a'"):
        heft({"a": [1.0]}, {("a", "a"): 1.0})


@pytest.mark.parametrize(
    ("compute", "comm", "message"),
    [
        ({"a": [1.0, 2.0], "b": [1.0]}, {}, "differ in length"),
        ({"a": [1.0, -2.0]}, {}, "task 'a' on device 1 is -2.0"),
        ({"a": [1.0, float("nan")]}, {}, "costs must be >= 0"),
        ({"a": [1.0]}, {("a", "z"): 1.0}, "names task 'z'"),
        ({"a": [INF, INF]}, {}, "task 'a' can run on no device"),
        ({"a": [1.0], "b": [1.0]}, {("a", "b"): -1.0}, "transfer time of edge"),
        ({"a": [1.0], "b": [1.0]}, {("a",): 1.0}, "not a \\(u, v\\) pair"),
        ({"a": [1.0, None]}, {}, "task 'a' on device 1 is None; costs are numbers"),
        ({"a": [1.0], "b": ["2"]}, {}, "task 'b' on device 0 is '2'"),
        ({"a": [1.0], "b": [1.0]}, [("a", "b")], "edges must map each \\(u, v\\) pair to its transfer time"),
        ({"a": [1.0], "b": [1.0]}, {("a", "b"): "1"}, "transfer time of edge \\('a', 'b'\\) is '1'"),
        ([1.0, 2.0], {}, "compute must map each task"),
    ],
)
def test_heft_rejects_bad_input(compute, comm, message):
    with pytest.raises(ValueError, match=message):
        heft(compute, comm)


def test_heft_bytes_rejects_bad_bandwidth():
    with pytest.raises(ValueError, match="2 x 2 matrix"):
        heft_bytes({"a": [1.0, 1.0]}, {}, [[INF]])
    with pytest.raises(ValueError, match="from device 0 to 1 is 0"):
        heft_bytes({"a": [1.0, 1.0]}, {}, [[INF, 0.0], [1.0, INF]])


def test_heft_does_not_strand_a_successor_behind_an_inf_transfer():
    # Earliest finish alone puts a on device 0; b runs only on device 1 and a's output cannot cross.
    schedule = heft({"a": [1.0, 2.0], "b": [INF, 1.0]}, {("a", "b"): INF})
    assert schedule.assignment == {"a": 1, "b": 1} and schedule.makespan == 3.0


def test_heft_keeps_a_join_behind_inf_transfers_on_one_device():
    # a and b could each go anywhere, and earliest finish spreads them; c needs both outputs uncopied.
    compute = {"a": [1.0, 1.0], "b": [1.0, 1.0], "c": [1.0, 1.0]}
    schedule = heft(compute, {("a", "c"): INF, ("b", "c"): INF})
    assert len(set(schedule.assignment.values())) == 1 and schedule.makespan == 3.0


def test_heft_names_the_inf_transfers_when_no_device_can_join_them():
    compute = {"a": [1.0, INF], "b": [INF, 1.0], "c": [1.0, 1.0]}
    with pytest.raises(ValueError, match=r"transfers of .*\('[ab]', 'c'\).* are inf.*make those transfers finite"):
        heft(compute, {("a", "c"): INF, ("b", "c"): INF})


def test_heft_ranks_count_an_inf_transfer_as_zero_so_the_order_given_does_not_matter():
    """Before, an inf (must share a device) edge made every rank upstream of it inf: the tasks went in the order
    given, and listing the short task Y first put the long X beside it on device 0 (makespan 17, not 11)."""
    cost = {"Y": [5.0, 5.1], "X": [10.0, 30.0], "Y2": [1.0, 1.0], "X2": [1.0, 1.0]}
    comm = {("Y", "Y2"): INF, ("X", "X2"): INF}
    for order in (["Y", "X", "Y2", "X2"], ["X", "Y", "X2", "Y2"]):
        schedule = heft({t: cost[t] for t in order}, comm)
        assert schedule.makespan == 11.0 and schedule.order[:2] == ["X", "Y"]
        assert schedule.assignment == {"X": 0, "X2": 0, "Y": 1, "Y2": 1}
    assert upward_ranks(cost, comm, ["X", "Y", "X2", "Y2"]) == pytest.approx({"X": 21.0, "Y": 6.05, "X2": 1.0,
                                                                              "Y2": 1.0})


def placeable_with_inf_transfers(compute, comm) -> bool:
    """Brute force: some device per task where it can run, with every inf edge inside one device."""
    tasks = list(compute)
    for devices in itertools.product(range(len(next(iter(compute.values())))), repeat=len(tasks)):
        where = dict(zip(tasks, devices, strict=True))
        if all(compute[t][where[t]] < INF for t in tasks) and all(
            where[u] == where[v] or c < INF for (u, v), c in comm.items()
        ):
            return True
    return False


@pytest.mark.parametrize("seed", range(40))
def test_heft_with_inf_transfers_schedules_whenever_brute_force_can(seed):
    rng = random.Random(1500 + seed)
    compute, comm = random_dag(rng, rng.randint(2, 7), rng.randint(2, 3), p_edge=0.4, p_inf=0.3)
    comm = {e: INF if rng.random() < 0.4 else c for e, c in comm.items()}
    if not placeable_with_inf_transfers(compute, comm):
        with pytest.raises(ValueError, match="are inf"):
            heft(compute, comm)
        return
    assert_valid(heft(compute, comm), compute, fixed(comm))


def test_heft_bytes_needs_finite_byte_counts():
    compute = {"a": [1.0, INF], "b": [INF, 1.0]}
    free = [[INF, INF], [INF, INF]]
    with pytest.raises(ValueError, match=r"byte count of edge \('a', 'b'\) is inf; give the bytes it carries"):
        heft_bytes(compute, {("a", "b"): INF}, free)  # inf bytes over a free link was inf / inf = nan
    with pytest.raises(ValueError, match="byte count of edge .* is 'x'"):
        heft_bytes(compute, {("a", "b"): "x"}, free)
    assert heft_bytes(compute, {("a", "b"): 1e300}, free).makespan == 2.0  # a free link costs 0 for any count


def test_heft_bytes_zero_bytes_cost_nothing_where_one_over_bandwidth_overflows():
    # 1 / 5e-324 is inf; 0 bytes times that mean was a nan rank, and HEFT then found no ready task.
    tiny = [[INF, 5e-324], [5e-324, INF]]
    schedule = heft_bytes({"a": [1.0, INF], "b": [INF, 1.0]}, {("a", "b"): 0.0}, tiny)
    assert schedule.assignment == {"a": 0, "b": 1} and schedule.makespan == 2.0


def test_heft_refuses_a_nan_transfer_instead_of_scheduling_with_it():
    from hetrain.placement.heft import _schedule

    nan_link = lambda edge, a, b: math.nan  # what inf / inf used to give; validation now stops it earlier
    with pytest.raises(ValueError, match=r"edge \('a', 'b'\) from device 0 to 1 is nan"):
        _schedule({"a": [1.0, INF], "b": [INF, 1.0]}, [("a", "b")], {("a", "b"): 0.0}, nan_link, 2)


def test_topological_order_refuses_repeated_tasks():
    with pytest.raises(ValueError, match=r"given more than once \('a'\); list each task once"):
        topological_order(["a", "a", "b"], [("a", "b")])


# Chain solver


def brute_force(costs, transfer_time, objective, m, distinct):
    """Best time over every device per layer, scored independently of the solver."""
    n, devices = len(costs), len(costs[0])
    best = INF
    for assignment in itertools.product(range(devices), repeat=n):
        runs = [list(g) for _, g in itertools.groupby(range(n), key=lambda i: assignment[i])]
        stage_devices = [assignment[r[0]] for r in runs]
        if distinct and len(set(stage_devices)) < len(stage_devices):
            continue
        times = []
        for k, run in enumerate(runs):
            into = transfer_time(run[0] - 1, stage_devices[k - 1], stage_devices[k]) if k else 0
            times.append(sum(costs[i][assignment[i]] for i in run) + into)
        total = sum(times) + (m - 1) * max(times) if objective == "pipeline" else sum(times)
        best = min(best, total)
    return best


def random_chain(rng: random.Random, p_inf: float = 0.1):
    n, devices = rng.randint(1, 6), rng.randint(1, 3)
    costs = [[float(rng.randint(1, 30)) if rng.random() > p_inf else INF for _ in range(devices)] for _ in range(n)]
    for row in costs:
        if all(c == INF for c in row):
            row[rng.randrange(devices)] = float(rng.randint(1, 30))
    return costs, [float(rng.randint(0, 20)) for _ in range(n - 1)]


@pytest.mark.parametrize("seed", range(60))
@pytest.mark.parametrize(
    ("objective", "m", "distinct"),
    [("sequential", 1, True), ("sequential", 1, False), ("pipeline", 1, True), ("pipeline", 4, True),
     ("pipeline", 16, True)],
)  # fmt: skip
def test_chain_dp_matches_brute_force(seed, objective, m, distinct):
    costs, transfer = random_chain(random.Random(seed))
    expected = brute_force(costs, lambda i, a, b: transfer[i], objective, m, distinct)
    if expected == INF:  # distinct devices with some layers pinned by inf costs can leave no plan
        with pytest.raises(ValueError, match="no placement"):
            chain_dp(costs, transfer, objective, m, distinct_devices=distinct)
        return
    plan = chain_dp(costs, transfer, objective, m, distinct_devices=distinct)
    assert plan.predicted_time == expected
    # The plan is the one its time describes: rescoring its own stages gives the same number.
    pinned = [[c if d == plan.devices[i] else INF for d, c in enumerate(row)] for i, row in enumerate(costs)]
    rescored = brute_force(pinned, lambda i, a, b: transfer[i], objective, m, distinct)
    assert rescored == expected
    assert [d for _, _, d in plan.stages] == [plan.devices[s] for s, _, _ in plan.stages]
    assert plan.stages[0][0] == 0 and plan.stages[-1][1] == len(costs)
    if distinct:
        assert len({d for _, _, d in plan.stages}) == len(plan.stages)


@pytest.mark.parametrize("seed", range(30))
def test_chain_dp_bytes_matches_brute_force_with_asymmetric_links(seed):
    rng = random.Random(500 + seed)
    costs, _ = random_chain(rng)
    devices = len(costs[0])
    boundary_bytes = [float(rng.choice([0, 256, 1024, 4096])) for _ in range(len(costs) - 1)]
    bw = [[INF if a == b else float(rng.choice([64, 128, 512])) for b in range(devices)] for a in range(devices)]
    for objective, m in [("sequential", 1), ("pipeline", 3)]:
        # The defaults: a sequential plan may go back to a device, a pipeline holds one stage per device.
        distinct = objective == "pipeline"
        expected = brute_force(costs, lambda i, a, b: boundary_bytes[i] / bw[a][b], objective, m, distinct)
        if expected < INF:
            assert chain_dp_bytes(costs, boundary_bytes, bw, objective, m).predicted_time == expected


@pytest.mark.parametrize("seed", range(40))
def test_heft_is_never_better_than_the_chain_optimum(seed):
    rng = random.Random(900 + seed)
    costs, transfer = random_chain(rng)
    compute = {i: row for i, row in enumerate(costs)}
    schedule = heft(compute, {(i, i + 1): t for i, t in enumerate(transfer)})
    # On a chain HEFT's makespan is the sequential time of its assignment, which may revisit a device.
    assert chain_dp(costs, transfer, distinct_devices=False).predicted_time <= schedule.makespan
    devices = [schedule.assignment[i] for i in range(len(costs))]
    stage_devices = [d for d, _ in itertools.groupby(devices)]
    if len(set(stage_devices)) == len(stage_devices):
        assert chain_dp(costs, transfer, distinct_devices=True).predicted_time <= schedule.makespan


def test_chain_pipeline_prefers_balanced_stages():
    # Two equal devices, four equal layers, free links: with many micro-batches two stages of two
    # layers win; with one micro-batch nothing overlaps, so the split saves nothing (the tie keeps one device).
    costs = [[1.0, 1.0]] * 4
    many = chain_dp(costs, [0.0] * 3, "pipeline", micro_batches=16)
    assert [(s, e) for s, e, _ in many.stages] == [(0, 2), (2, 4)]
    assert many.predicted_time == (16 + 1) * 2.0  # equal stages: sum + (m - 1) * max is (m + S - 1) * max
    one = chain_dp(costs, [0.0] * 3, "pipeline", micro_batches=1)
    assert len(one.stages) == 1 and one.predicted_time == 4.0


def flow_shop_time(stage_times, m):
    """A GPipe step simulated, not read off a formula: each micro-batch through the stages in order, a stage taking
    one at a time, forward (a third of a stage's time) and then backward in reverse order."""
    def run(times, start):
        done = [[start] * m for _ in times]
        for s, t in enumerate(times):
            for j in range(m):
                done[s][j] = max(done[s - 1][j] if s else start, done[s][j - 1] if j else start) + t
        return done[-1][-1]

    forward = run([t / 3 for t in stage_times], 0.0)
    return run([t - t / 3 for t in reversed(stage_times)], forward)


@pytest.mark.parametrize("seed", range(40))
def test_chain_dp_pipeline_is_the_best_simulated_gpipe_step(seed):
    # The pipeline optimum over every plan with one stage per device, each scored by a simulated timeline. Stages
    # of unequal times are where (m + S - 1) * max overpriced a split: a cheap first stage adds its own time, not
    # another slowest stage's.
    rng = random.Random(2000 + seed)
    n, devices, m = rng.randint(2, 6), rng.randint(2, 4), rng.choice([2, 3, 4, 8])
    costs = [[float(rng.choice([3, 6, 9, 30, 60])) for _ in range(devices)] for _ in range(n)]
    transfer = [float(rng.choice([0, 3, 6])) for _ in range(n - 1)]
    best = INF
    for assignment in itertools.product(range(devices), repeat=n):
        stages = [(d, [i for i, _ in run]) for d, run in itertools.groupby(enumerate(assignment), key=lambda p: p[1])]
        if len({d for d, _ in stages}) < len(stages):
            continue
        times = [sum(costs[i][d] for i in layers) + (transfer[layers[0] - 1] if layers[0] else 0.0)
                 for d, layers in stages]
        best = min(best, flow_shop_time(times, m))
    plan = chain_dp(costs, transfer, "pipeline", m)
    assert plan.predicted_time == pytest.approx(best)
    times = [sum(costs[i][d] for i in range(a, e)) + (transfer[a - 1] if a else 0.0) for a, e, d in plan.stages]
    assert flow_shop_time(times, m) == pytest.approx(best)


def test_chain_dp_pipeline_splits_off_a_short_first_stage():
    # A cheap first layer on device 0 beside three layers on device 1: one micro-batch's way through both stages
    # and then the slow stage for each other, 1.209 by a simulated timeline, beats all on device 1 (1.28).
    costs = [[0.005, 0.02], [0.5, 0.1], [0.5, 0.1], [0.4, 0.1]]
    plan = chain_dp(costs, [0.001] * 3, "pipeline", 4)
    assert plan.devices == [0, 1, 1, 1]
    assert plan.predicted_time == pytest.approx(0.005 + 0.301 + 3 * 0.301)
    assert plan.predicted_time == pytest.approx(flow_shop_time([0.005, 0.301], 4))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"costs": [[1.0]], "transfer": [], "objective": "fast"}, "objective 'fast'"),
        ({"costs": [[1.0], [1.0]], "transfer": []}, "2 layers have 1 boundaries; got 0"),
        ({"costs": [[1.0, 2.0], [1.0]], "transfer": [0.0]}, "row lengths"),
        ({"costs": [[INF, INF]], "transfer": []}, "layer 0 can run on no device"),
        ({"costs": [[1.0], [1.0]], "transfer": [-1.0]}, "boundary 0 is -1.0"),
        ({"costs": [[1.0]], "transfer": [], "micro_batches": 0}, "micro_batches=0"),
        ({"costs": [[1.0]], "transfer": [], "objective": "pipeline", "distinct_devices": False}, "distinct devices"),
        ({"costs": [[1.0, INF], [INF, 1.0]], "transfer": [INF]}, "no placement"),
        ({"costs": [[1.0]], "transfer": [], "micro_batches": True}, "micro_batches=True; it must be an integer"),
        ({"costs": [[1.0]], "transfer": [], "micro_batches": 2.5}, "micro_batches=2.5; it must be an integer"),
        ({"costs": [["1", 1.0]], "transfer": []}, "layer 0 on device 0 is '1'; costs are numbers"),
        ({"costs": [[True, 1.0]], "transfer": []}, "layer 0 on device 0 is True; costs are numbers"),
        ({"costs": [[1.0], [1.0]], "transfer": ["1"]}, "transfer time at boundary 0 is '1'"),
    ],
)
def test_chain_dp_rejects_bad_input(kwargs, message):
    with pytest.raises(ValueError, match=message):
        chain_dp(**kwargs)


def test_sequential_chain_goes_back_to_a_device_when_that_is_faster():
    # Device 1 is fast for layers 0 and 2, device 0 for layer 1, links free: 1 + 1 + 1.
    costs = [[10.0, 1.0], [1.0, 10.0], [10.0, 1.0]]
    plan = chain_dp(costs, [0.0, 0.0])
    assert plan.devices == [1, 0, 1] and plan.predicted_time == 3.0
    assert plan.stages == [(0, 1, 1), (1, 2, 0), (2, 3, 1)]
    assert chain_dp(costs, [0.0, 0.0], distinct_devices=True).predicted_time == 12.0  # still on request


def test_sequential_chain_is_feasible_when_only_a_return_to_a_device_is():
    costs = [[1.0, INF], [INF, 1.0], [1.0, INF]]  # layers 0 and 2 run only on device 0, layer 1 only on 1
    bw = [[INF, 1.0], [1.0, INF]]
    plan = chain_dp_bytes(costs, [1.0, 1.0], bw)
    assert plan.devices == [0, 1, 0] and plan.predicted_time == 5.0 == chain_time(costs, [1.0, 1.0], bw, [0, 1, 0])
    with pytest.raises(ValueError, match="no placement with one stage per device.*pass distinct_devices=False"):
        chain_dp_bytes(costs, [1.0, 1.0], bw, distinct_devices=True)
    with pytest.raises(ValueError, match="no placement with one stage per device.*use objective='sequential'"):
        chain_dp_bytes(costs, [1.0, 1.0], bw, "pipeline", 4)


def test_an_infeasible_chain_suggests_a_device_holding_several_stages_only_where_that_is_feasible():
    """Before, a chain with no finite plan at all was told to try objective='sequential', as infeasible."""
    with pytest.raises(ValueError, match="no placement of the chain has a finite time") as error:
        chain_dp([[1.0, INF], [INF, 1.0]], [INF], "pipeline", 4)
    assert "sequential" not in str(error.value)
    with pytest.raises(ValueError, match="no placement of the chain has a finite time") as error:
        chain_dp([[1.0, INF], [INF, 1.0]], [INF], distinct_devices=True)
    assert "distinct_devices=False" not in str(error.value)


def test_chain_dp_takes_numpy_arrays():
    """Before, `if not costs` asked a NumPy array for its truth value and NumPy refused."""
    np = pytest.importorskip("numpy")
    plan = chain_dp(np.array([[1.0, 4.0], [4.0, 1.0]]), np.array([0.5]))
    assert plan.devices == [0, 1] and plan.predicted_time == 2.5
    with pytest.raises(ValueError, match="the chain has no layers"):
        chain_dp(np.zeros((0, 2)), np.zeros(0))


@pytest.mark.parametrize("seed", range(40))
def test_sequential_default_matches_brute_force_over_every_plan(seed):
    rng = random.Random(1700 + seed)
    costs, transfer = random_chain(rng, p_inf=0.3)
    transfer = [INF if rng.random() < 0.2 else t for t in transfer]
    expected = brute_force(costs, lambda i, a, b: transfer[i], "sequential", 1, False)
    if expected == INF:
        with pytest.raises(ValueError, match="no placement of the chain has a finite time"):
            chain_dp(costs, transfer)
        return
    plan = chain_dp(costs, transfer)
    assert plan.predicted_time == expected
    if INF not in transfer:  # chain_time takes byte counts: transfer times are bytes over 1 byte/s links
        ones = [[1.0] * len(costs[0]) for _ in costs[0]]
        assert chain_time(costs, transfer, ones, plan.devices) == pytest.approx(expected)


def test_chain_time_refuses_two_stages_on_one_device_under_pipeline():
    # The pipeline model has no time for a device running two stages, and chain_dp never picks such a plan.
    costs, bw = [[1.0, 1.0]] * 3, [[INF, 1.0], [1.0, INF]]
    with pytest.raises(ValueError, match="device 0 holds layer 0 and layer 2; keep each device's layers contiguous"):
        chain_time(costs, [0.0, 0.0], bw, [0, 1, 0], "pipeline", 4)
    assert chain_time(costs, [0.0, 0.0], bw, [0, 1, 0]) == 3.0  # the sequential objective prices it


def test_chain_bytes_must_be_finite_and_a_free_link_costs_nothing():
    costs, free = [[1.0, INF], [INF, 1.0]], [[INF, INF], [INF, INF]]
    for solve in (lambda b: chain_dp_bytes(costs, b, free), lambda b: chain_time(costs, b, free, [0, 1])):
        with pytest.raises(ValueError, match="byte count at boundary 0 is inf; it must be a finite number"):
            solve([INF])  # inf / inf was a nan predicted time
        with pytest.raises(ValueError, match="byte count at boundary 0 is -1.0"):
            solve([-1.0])
    assert chain_dp_bytes(costs, [1e300], free).predicted_time == 2.0 == chain_time(costs, [1e300], free, [0, 1])


def test_chain_refuses_a_nan_transfer_instead_of_choosing_with_it():
    from hetrain.placement.chain import _solve

    for objective in ("sequential", "pipeline"):
        with pytest.raises(ValueError, match="transfer at boundary 0 from device [01] to [01] is nan"):
            _solve([[1.0, INF], [INF, 1.0]], lambda i, a, b: math.nan, objective, 1, None)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (([[1.0, 1.0]] * 2, [1.0], [[1.0, 0.0], [0.0, 1.0]], [0, 1]), "bandwidth from device 0 to 1 is 0.0"),
        (([[1.0, 1.0]] * 2, [1.0], [[1.0, 1.0]], [0, 1]), "bandwidth must be a 2 x 2 matrix"),
        (([[1.0, 1.0]] * 2, [1.0], [[INF, 1.0], [1.0, INF]], [0, 1.0]), r"\(whole numbers.*layer 1 has 1.0"),
        (([[1.0, 1.0]] * 2, [1.0], [[INF, 1.0], [1.0, INF]], [True, 0]), "layer 0 has True"),
        (([[1.0, 1.0]], [], [[INF, 1.0], [1.0, INF]], [0], "pipeline", 2.5), "micro_batches=2.5"),
    ],
)
def test_chain_time_rejects_bad_input(args, message):
    with pytest.raises(ValueError, match=message):
        chain_time(*args)


# Cost model


def small_chain() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(7, 13), nn.GELU(), nn.Linear(13, 5), nn.Linear(5, 3))


def test_measure_on_cpu():
    model = small_chain()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(6, 7, generator=torch.Generator().manual_seed(1))
    cm = measure(model, lambda: x, devices=["cpu"], warmup=1, repeats=3)

    assert cm.stages == ["0", "1", "2", "3"] and cm.devices == ["cpu"]
    assert len(cm.compute) == 4 and all(len(row) == 1 and 0 < row[0] < INF for row in cm.compute)
    outputs, h = [], x
    for layer in model:
        h = layer(h)
        outputs.append(h.numel() * h.element_size())
    assert cm.boundary_bytes == outputs
    assert cm.bandwidth == [[INF]] and cm.errors == {}
    assert cm.meta["input_shapes"] == [[6, 7]]
    # The model itself is neither moved nor trained.
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())

    plan = cm.chain_plan()
    assert plan.devices == dict.fromkeys(cm.stages, "cpu") and plan.method == "chain-dp"
    assert plan.predicted_step_time == pytest.approx(sum(row[0] for row in cm.compute))
    assert cm.heft_plan().predicted_step_time == pytest.approx(plan.predicted_step_time)


def test_measure_on_a_device_the_machine_lacks_says_so():
    """On a CPU-only machine the README's devices=["cpu", "cuda:0"] failed in a pinned copy's allocation, with
    torch's "pin_memory=True requires a CUDA or other accelerator backend"."""
    missing = f"cuda:{torch.cuda.device_count()}"  # one past the last GPU: absent on every machine
    with pytest.raises(ValueError, match=rf"cannot measure on {missing}: not on this machine, which has cpu"):
        measure(small_chain(), lambda: torch.randn(6, 7), devices=["cpu", missing], warmup=1, repeats=1)


def test_measure_times_stages_in_the_forward_context_given():
    """A run's precision plugin's forward context (autocast under bf16-mixed): stages compute, and hand on, bf16."""
    model = small_chain()
    x = torch.randn(6, 7, generator=torch.Generator().manual_seed(1))
    cm = measure(model, lambda: x, devices=["cpu"], warmup=1, repeats=1,
                 forward_context=lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    # Linear outputs in bf16 (GELU keeps its input's dtype): 2 bytes an element where float32 takes 4.
    assert cm.boundary_bytes == [6 * 13 * 2, 6 * 13 * 2, 6 * 5 * 2, 6 * 3 * 2]


def test_cost_model_json_round_trip(tmp_path):
    cm = CostModel(
        stages=["embeddings", "encoder.0", "classifier"],
        devices=["cpu", "cuda:0"],
        compute=[[3.0, 1.0], [5.0, INF], [2.0, 0.5]],
        boundary_bytes=[4096, 4096, 64],
        bandwidth=[[INF, 1e9], [2e9, INF]],
        errors={"encoder.0": {"cuda:0": "RuntimeError: no kernel"}},
        meta={"input_shapes": [[8, 16]]},
    )
    path = cm.save(tmp_path / "cost.json")
    raw = json.loads(path.read_text())  # plain JSON: infinity is written as "inf"
    assert raw["compute"][1][1] == "inf" and raw["bandwidth"][0][0] == "inf"
    assert CostModel.load(path) == cm


def test_cost_model_feeds_the_solvers():
    cm = CostModel(
        stages=["a", "b", "c"],
        devices=["cpu", "cuda:0"],
        compute=[[1.0, 8.0], [50.0, 1.0], [50.0, 1.0]],
        boundary_bytes=[1000, 1000, 10],
        bandwidth=[[INF, 1000.0], [250.0, INF]],
    )
    # Training sends the activation forward and its gradient back: 1000/1000 + 1000/250 = 5 s a boundary.
    assert cm.link_bandwidth()[0][1] == pytest.approx(200.0)
    assert cm.link_bandwidth(training=False)[0][1] == 1000.0
    plan = cm.chain_plan()
    assert plan.devices == {"a": "cpu", "b": "cuda:0", "c": "cuda:0"}
    assert plan.predicted_step_time == pytest.approx(1.0 + 5.0 + 2.0)
    heft_plan = cm.heft_plan()
    assert heft_plan.devices == plan.devices and heft_plan.predicted_step_time == pytest.approx(8.0)


def test_cost_model_sequential_plan_goes_back_to_a_device():
    # What StagePlacement's plan: auto asks for (chain_plan with its objective): b runs only on cuda:0.
    cm = CostModel(stages=["a", "b", "c"], devices=["cpu", "cuda:0"], compute=[[1.0, INF], [INF, 1.0], [1.0, INF]],
                   boundary_bytes=[100, 100, 10], bandwidth=[[INF, 100.0], [100.0, INF]])
    plan = cm.chain_plan()
    assert plan.devices == {"a": "cpu", "b": "cuda:0", "c": "cpu"}
    assert plan.predicted_step_time == pytest.approx(3.0 + 2 * 2.0) == cm.predict(plan.devices)
    with pytest.raises(ValueError, match="one stage per device"):
        cm.chain_plan(distinct_devices=True)
    with pytest.raises(ValueError, match="device 0 holds layer 0 and layer 2"):
        cm.predict(plan.devices, "pipeline", 2)


class Masked(nn.Module):
    """A stage taking the carried activation and a mask, like an encoder block."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.proj(x) * mask[..., None]


class HostOnly(nn.Module):
    """Goes through NumPy, so it runs on the CPU and nowhere else."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(torch.from_numpy(x.detach().numpy()))


def test_measure_leaves_the_random_generator_as_it_was():
    # Random inputs and a dropout stage draw from the default generator; a run measured before training
    # must draw the same masks as one that was not.
    model = nn.Sequential(nn.Linear(7, 8), nn.Dropout(0.5), nn.Linear(8, 2))
    torch.manual_seed(3)
    want = torch.rand(4)
    torch.manual_seed(3)
    measure(model, lambda: torch.randn(6, 7), devices=["cpu"], warmup=1, repeats=2)
    assert torch.equal(torch.rand(4), want)


def test_measure_passes_extra_args_and_reports_a_stage_that_runs_nowhere():
    torch.manual_seed(0)
    mask = torch.rand(3, 5) > 0.5
    stages = {"embed": nn.Embedding(11, 4), "block": Masked(), "head": nn.Linear(4, 2)}
    ids = torch.randint(0, 11, (3, 5), generator=torch.Generator().manual_seed(2))
    cm = measure(stages, lambda: ids, ["cpu"], extra_args=lambda name: (mask,) if name == "block" else (), repeats=2)
    assert cm.stages == ["embed", "block", "head"]
    assert cm.boundary_bytes == [3 * 5 * 4 * 4, 3 * 5 * 4 * 4, 3 * 5 * 2 * 4]

    broken = {"embed": nn.Embedding(11, 4), "needs_mask": Masked()}
    with pytest.raises(ValueError, match=r"stage 'needs_mask' ran on no device \(cpu: TypeError: .*mask"):
        measure(broken, lambda: ids, ["cpu"], repeats=1)
    with pytest.raises(TypeError, match="nn.Sequential or a"):
        measure(nn.Linear(2, 2), lambda: torch.randn(1, 2))


def test_measure_bert_stages_and_apply_the_plan():
    from hetrain.models.bert import BertClassifier

    torch.manual_seed(0)
    model = BertClassifier(vocab_size=50, num_classes=3, hidden=32, layers=2, heads=2, max_len=16)
    ids = torch.randint(1, 50, (2, 9), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, 6:] = False
    cm = measure(model.stages(), lambda: ids, ["cpu"], lambda name: (mask,) if name != "embeddings" else (),
                 warmup=1, repeats=2)  # fmt: skip
    assert cm.stages == ["embeddings", "encoder.0", "encoder.1", "classifier"]
    assert cm.boundary_bytes == [2 * 9 * 32 * 4] * 3 + [2 * 3 * 4]
    plan = cm.chain_plan(objective="pipeline", micro_batches=2)
    assert plan.apply(model) is model and set(plan.devices.values()) == {"cpu"}


@pytest.mark.cuda
def test_measure_on_cpu_and_cuda():
    torch.manual_seed(0)
    stages = {"host": HostOnly(), "mlp": nn.Sequential(nn.Linear(4, 64), nn.GELU(), nn.Linear(64, 4))}
    cm = measure(stages, lambda: torch.randn(32, 4), ["cpu", "cuda:0"], repeats=3, copy_bytes=4 << 20)
    assert cm.compute[0][0] < INF and cm.compute[0][1] == INF
    assert "numpy" in cm.errors["host"]["cuda:0"]
    assert all(0 < c < INF for c in cm.compute[1])
    assert cm.bandwidth[0][0] == cm.bandwidth[1][1] == INF
    assert 0 < cm.bandwidth[0][1] < INF and 0 < cm.bandwidth[1][0] < INF
    assert cm.chain_plan().devices["host"] == "cpu"


# Plans


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embeddings = nn.Embedding(10, 4)
        self.encoder = nn.ModuleList(nn.Linear(4, 4) for _ in range(2))
        self.classifier = nn.Linear(4, 2)


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_plan_save_load_round_trip(tmp_path, suffix):
    plan = PlacementPlan({"embeddings": "cpu", "encoder": "cuda:0", "classifier": "cuda:0"}, "heft", 0.25)
    assert PlacementPlan.load(plan.save(tmp_path / f"plan{suffix}")) == plan


def test_plan_loads_a_recipe_style_mapping(tmp_path):
    path = tmp_path / "explicit.yaml"
    path.write_text("embeddings: cpu\nencoder: cuda:0\nclassifier: cuda:0\n")
    plan = PlacementPlan.load(path)
    assert plan.devices == {"embeddings": "cpu", "encoder": "cuda:0", "classifier": "cuda:0"}
    assert plan.method == "explicit" and plan.predicted_step_time is None
    path.write_text("- cpu\n")
    with pytest.raises(ValueError, match="holds no mapping"):
        PlacementPlan.load(path)


def test_a_bare_plan_file_names_the_entry_with_a_bad_device(tmp_path):
    """Before, a bare file got the generic "a placement file holds either ..." where the same under plan: named
    the entry."""
    for text in ("embeddings: 0\n", "plan:\n  embeddings: 0\n"):
        path = tmp_path / "plan.yaml"
        path.write_text(text)
        with pytest.raises(ValueError, match="placement of 'embeddings' names device 0"):
            PlacementPlan.load(path)
    path.write_text("plan: [a, b]\n")
    with pytest.raises(ValueError, match="a placement file holds either"):
        PlacementPlan.load(path)


def test_a_plan_file_without_its_plan_key_says_so(tmp_path):
    """Before, a misspelt plan: key read as a bare mapping: "placement of 'method' names device 'chain-dp'"."""
    path = tmp_path / "plan.yaml"
    path.write_text("plans:\n  embeddings: cpu\nmethod: chain-dp\npredicted_step_time: 0.012\n")
    with pytest.raises(ValueError, match="has method, predicted_step_time but no 'plan' key"):
        PlacementPlan.load(path)


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_a_plan_solved_from_numpy_costs_saves(tmp_path, suffix):
    """Before, chain_dp on NumPy arrays predicted a NumPy scalar, which YAML and JSON cannot write."""
    np = pytest.importorskip("numpy")
    solved = chain_dp(np.array([[1, 2], [2, 1]], dtype=np.float32), np.array([1], dtype=np.float32))
    assert type(solved.predicted_time) is float
    plan = PlacementPlan.from_assignment(["a", "b"], ["cpu", "cuda:0"], solved.devices, "chain-dp", np.float64(2.5))
    assert PlacementPlan.load(plan.save(tmp_path / f"plan{suffix}")) == plan


class LogsMoves:
    """A module that appends its ``label`` to ``moves`` at each ``.to`` call on it: the order a plan moves modules
    in shows with the one device of a CPU machine (apply refuses meta, which stood in for a second one)."""

    def __init__(self, label: str, moves: list[str], *args: object) -> None:
        super().__init__(*args)
        self.label, self.moves = label, moves

    def to(self, *args: object, **kwargs: object) -> nn.Module:
        self.moves.append(self.label)
        return super().to(*args, **kwargs)


class LoggedList(LogsMoves, nn.ModuleList):
    pass


class LoggedLinear(LogsMoves, nn.Linear):
    pass


def test_plan_apply_moves_submodules_most_specific_path_last():
    # Moving the group after its member would take the member along to the group's device.
    moves: list[str] = []
    model = Net()
    model.encoder = LoggedList("encoder", moves, [nn.Linear(4, 4), LoggedLinear("encoder.1", moves, 4, 4)])
    PlacementPlan({"encoder.1": "cpu", "encoder": "cpu", "classifier": "cpu"}).apply(model)
    assert moves == ["encoder", "encoder.1"]


def test_plan_apply_names_a_missing_path():
    model = Net()
    with pytest.raises(ValueError, match="'encoder.7' names no submodule of Net"):
        PlacementPlan({"embeddings": "meta", "encoder.7": "meta"}).apply(model)
    assert model.embeddings.weight.device.type == "cpu"  # nothing moved before the error


class TwoStages(nn.Module):
    """A model written for one device, whose stages a plan may put on two."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(5, 5)
        self.layers = nn.ModuleList(nn.Linear(5, 5) for _ in range(2))

    def stages(self) -> dict[str, nn.Module]:
        return {"embed": self.embed, "layers.0": self.layers[0], "layers.1": self.layers[1]}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers[1](self.layers[0](self.embed(x)))


def test_an_applied_plan_runs_the_model_across_devices():
    """Before, apply only moved the stages: a CPU input met the weights of a stage on another device (meta stands
    in for a GPU). The hooks go on the stages a group path covers, not on the group (a ModuleList, never called)."""
    model = TwoStages()
    plan = PlacementPlan({"embed": "cpu", "layers": "cpu"})
    assert plan.apply(model) is model
    plan.apply(model)  # again: no hook added
    model.layers.to("meta")  # apply refuses meta as a plan's device: moved by hand, it still stands in for a GPU
    assert model(torch.randn(4, 5)).device.type == "meta"
    assert [len(stage._forward_pre_hooks) for stage in model.stages().values()] == [1, 1, 1]
    assert len(model.layers._forward_pre_hooks) == 0
    # A model without stages(): each planned submodule takes its inputs to its device.
    chain = nn.Sequential(nn.Linear(5, 5), nn.Linear(5, 3))
    PlacementPlan({"1": "cpu"}).apply(chain)
    assert chain[1].to("meta")(torch.randn(4, 5)).device.type == "meta"


class WithActivation(TwoStages):
    """A stage with no weights (an activation) between two that have some."""

    def __init__(self) -> None:
        super().__init__()
        self.act = nn.ReLU()

    def stages(self) -> dict[str, nn.Module]:
        return {"embed": self.embed, "act": self.act, "layers.0": self.layers[0], "layers.1": self.layers[1]}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers[1](self.layers[0](self.act(self.embed(x))))


def test_a_model_an_applied_plan_placed_pickles():
    """Before, each stage's hook was a closure: torch.save(model) failed "Can't pickle local object"."""
    model = TwoStages()
    PlacementPlan({"embed": "cpu", "layers": "cpu"}).apply(model)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    loaded = torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)
    loaded.layers.to("meta")
    assert loaded(torch.randn(4, 5)).device.type == "meta"  # the loaded hooks still bring the inputs


def test_an_applied_plans_hooks_follow_the_model_when_it_moves_and_can_be_removed():
    """Before, a hook held the device the plan named: a model moved back after apply sent its inputs to meta."""
    model = TwoStages()
    PlacementPlan({"layers": "cpu"}).apply(model)
    model.layers.to("meta")
    assert model(torch.randn(4, 5)).device.type == "meta"
    model.to_empty(device="cpu")
    assert model(torch.randn(4, 5)).device.type == "cpu"
    assert remove_input_hooks(model) == 3
    assert not any(module._forward_pre_hooks for module in model.modules())


class TakesNested(nn.Module):
    """A stage whose inputs come nested: a (hidden, skip) tuple, and a list as a keyword argument."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(2))
        self.seen: list[torch.device] = []

    def forward(self, pair: tuple[torch.Tensor, torch.Tensor], *, extra: list[torch.Tensor]) -> torch.Tensor:
        self.seen = [t.device for t in (*pair, *extra)]
        return (pair[0] + pair[1] + extra[0]) * self.scale


def test_the_input_hook_moves_tensors_nested_in_the_inputs():
    """Before, only tensors passed as arguments themselves moved: those in a tuple, a list or a keyword argument
    stayed on the CPU while the stage was on meta."""
    stage = TakesNested().to("meta")
    hook_inputs(stage)
    out = stage((torch.ones(2), torch.ones(2)), extra=[torch.ones(2)])
    assert stage.seen == [torch.device("meta")] * 3 and out.device.type == "meta"


class TakesPacked(nn.Module):
    """A recurrent stage's inputs: a PackedSequence, and a tensor in a dict subclass pytree does not know."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(2))
        self.seen: dict[str, torch.device] = {}

    def forward(self, packed: PackedSequence, extra: dict[str, torch.Tensor]) -> torch.Tensor:
        self.seen = {"data": packed.data.device, "batch_sizes": packed.batch_sizes.device,
                     "sorted_indices": packed.sorted_indices.device, "extra": extra["bias"].device}
        return packed.data * self.scale + extra["bias"]


class Extra(dict):
    pass


def test_the_input_hook_moves_a_packed_sequence_with_its_batch_sizes_left_on_the_cpu():
    """Before, the hook moved a PackedSequence's batch_sizes with its data, and rebuilding it raised "batch_sizes
    should always be on CPU" (where an LSTM needs them); a dict subclass pytree does not know kept its tensors where
    they were. The hook moves inputs as the pipeline split moves activations (to_device)."""
    stage = TakesPacked().to("meta")
    hook_inputs(stage)
    packed = pack_padded_sequence(torch.randn(3, 4, 2), torch.tensor([2, 4, 1]), batch_first=True,
                                  enforce_sorted=False)
    out = stage(packed, Extra(bias=torch.ones(2)))
    meta, cpu = torch.device("meta"), torch.device("cpu")
    assert stage.seen == {"data": meta, "batch_sizes": cpu, "sorted_indices": meta, "extra": meta}
    assert out.device == meta


class Config(Mapping):
    """A config object as OmegaConf's DictConfig is one: a Mapping that pytree does not know, read by attribute."""

    def __init__(self, **values: object) -> None:
        self._values = values

    def __getitem__(self, key: str) -> object:
        return self._values[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __getattr__(self, key: str) -> object:
        try:
            return self._values[key]
        except KeyError:
            raise AttributeError(key) from None


class Batch(UserDict):
    """A batch as transformers' BatchEncoding is one: a UserDict whose keys read as attributes."""

    def __getattr__(self, key: str) -> object:
        try:
            return self.data[key]
        except KeyError:
            raise AttributeError(key) from None


class ReadsAttributes(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(2))
        self.seen: list[object] = []

    def forward(self, batch: Batch, cfg: Config) -> torch.Tensor:
        self.seen = [batch, cfg]
        return (batch.input_ids + cfg.bias) * self.weight * cfg.scale


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_the_input_hook_keeps_config_and_batch_objects_a_module_reads_by_attribute(device):
    """Before, the hook rebuilt a Mapping pytree does not know as a plain dict on every call, even with nothing to
    move: a placed module reading cfg.scale or batch.input_ids raised AttributeError, on one device too. Now such
    an object reaches the module itself when none of its tensors moves, and keeps its type when one does."""
    stage = ReadsAttributes().to(device)
    hook_inputs(stage)
    batch, cfg = Batch(input_ids=torch.ones(2)), Config(scale=2.0, bias=torch.ones(2).to(device))
    out = stage(batch, cfg=cfg)
    assert out.device.type == device and stage.seen[1] is cfg
    if device == "cpu":
        assert stage.seen[0] is batch
    else:
        assert type(stage.seen[0]) is Batch and stage.seen[0].input_ids.device.type == "meta"


def test_apply_takes_a_root_path_and_stages_without_weights():
    """Before, apply on a model with stages() refused "" (which it sorts first, as the root) and raised a bare
    StopIteration on a stage without parameters, which gets no hook: it runs wherever its input is."""
    model = WithActivation()
    PlacementPlan({"layers.1": "cpu"}).apply(model)
    assert [len(stage._forward_pre_hooks) for stage in model.stages().values()] == [1, 0, 1, 1]
    model.layers[1].to("meta")
    assert model(torch.randn(4, 5)).device.type == "meta"
    moves: list[str] = []
    model = WithActivation()
    model.layers[1] = LoggedLinear("layers.1", moves, 5, 5)
    PlacementPlan({"": "cpu", "layers.1": "cpu"}).apply(model)
    assert moves == ["layers.1"]
    assert [len(stage._forward_pre_hooks) for stage in model.stages().values()] == [1, 0, 1, 1]
    devices, _ = resolve_plan({"": "cpu", "layers.1": "cpu"}, list(model.stages()))
    assert set(devices) == set(model.stages())


def test_resolve_plan_refuses_the_meta_device_by_name():
    """Before, a run's plan could put a stage on meta (present everywhere): its weights were thrown away and the
    run died with "Cannot copy out of meta tensor"."""
    stages = ["embeddings", "encoder.0", "encoder.1"]
    with pytest.raises(ValueError, match="placement of 'encoder.1' names meta, which holds shapes, not data"):
        resolve_plan({"encoder.1": "meta"}, stages)
    with pytest.raises(ValueError, match="placement fallback names meta"):
        resolve_plan({"encoder": "cuda:99"}, stages, fallback="meta")


def test_plan_apply_names_an_absent_device_before_moving_anything():
    """Before, torch's bare "Torch not compiled with CUDA enabled" named neither path nor device, after the entries
    before it had moved."""
    moves: list[str] = []
    model = Net()
    model.embeddings = LoggedLinear("embeddings", moves, 4, 4)
    with pytest.raises(ValueError, match=r"places 'encoder' on cuda:99, which this machine does not have \(it has cpu"):
        PlacementPlan({"embeddings": "cpu", "encoder": "cuda:99"}).apply(model)
    assert moves == []


def test_plan_apply_refuses_the_meta_device_before_moving_anything():
    """Before, apply moved a stage to meta (as resolve_plan refuses to): its weights were gone, and the model's
    forward returned meta tensors without an error."""
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    weight = model[1].weight.detach().clone()
    with pytest.raises(ValueError, match="placement of '1' names meta, which holds shapes, not data"):
        PlacementPlan({"0": "cpu", "1": "meta"}).apply(model)
    assert model[1].weight.device.type == "cpu" and torch.equal(model[1].weight, weight)


class Tied(nn.Module):
    """An embedding tied to the output head, as language models tie them."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.head = nn.Embedding(10, 4), nn.Linear(4, 10, bias=False)
        self.head.weight = self.emb.weight

    def stages(self) -> dict[str, nn.Module]:
        return {"emb": self.emb, "head": self.head}


def test_plan_apply_refuses_to_split_a_shared_parameter_across_devices():
    """Before, apply moved the head's use of the tied weight alone, untying it from the embedding, silently. meta is
    the second device here: the shared weight is checked before it."""
    model = Tied()
    with pytest.raises(ValueError, match=r"shared by two modules on different devices: emb.weight on cpu and "
                                         r"head.weight on meta; nothing was moved"):
        PlacementPlan({"emb": "cpu", "head": "meta"}).apply(model)
    assert model.head.weight is model.emb.weight and model.emb.weight.device.type == "cpu"
    chain = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))  # without stages(): the planned submodules
    chain[1].weight = chain[0].weight
    with pytest.raises(ValueError, match=r"0.weight on cpu and 1.weight on meta"):
        PlacementPlan({"1": "meta"}).apply(chain)
    # Both uses on one device, however spelt or nested, is no split.
    PlacementPlan({"": "cpu", "head": "cpu:0"}).apply(model)
    PlacementPlan({"0": "cpu", "1": "cpu:0"}).apply(chain)
    assert model.head.weight is model.emb.weight and chain[1].weight is chain[0].weight


def test_a_plan_of_torch_devices_saves_their_names(tmp_path):
    """Before, a plan built from resolve_plan's torch.device values was accepted, but saving it failed (YAML
    "cannot represent an object", JSON "not JSON serializable")."""
    devices, _ = resolve_plan({"0": "cpu", "1": "cpu"}, ["0", "1"])
    plan = PlacementPlan(devices)
    assert plan.devices == {"0": "cpu", "1": "cpu"}
    for suffix in (".yaml", ".json"):
        assert PlacementPlan.load(plan.save(tmp_path / f"plan{suffix}")) == plan


def test_resolve_plan_refuses_an_absent_fallback_where_it_is_needed():
    """Before, stages whose device was absent were sent to an absent fallback too (cuda:98 here)."""
    stages = ["embeddings", "encoder.0", "classifier"]
    with pytest.raises(ValueError, match=r"cuda:99 not present; encoder -> cuda:98, but the fallback cuda:98 is not "
                                         r"here either"):
        resolve_plan({"embeddings": "cpu", "encoder": "cuda:99"}, stages, fallback="cuda:98")
    devices, note = resolve_plan({"embeddings": "cpu"}, stages, fallback="cuda:98")  # no stage needs it
    assert devices == {"embeddings": torch.device("cpu")} and note is None


def test_plan_from_solver_output_and_bad_input():
    schedule = heft({"embeddings": [1.0, 5.0], "encoder": [9.0, 1.0]}, {("embeddings", "encoder"): 0.5})
    plan = PlacementPlan.from_assignment(["embeddings", "encoder"], ["cpu", "cuda:0"], schedule.assignment, "heft",
                                         schedule.makespan)  # fmt: skip
    assert plan.devices == {"embeddings": "cpu", "encoder": "cuda:0"} and plan.predicted_step_time == 2.5
    with pytest.raises(ValueError, match="method 'greedy'"):
        PlacementPlan({"a": "cpu"}, "greedy")
    with pytest.raises(ValueError, match="'a' names device 'gpu0'"):
        PlacementPlan({"a": "gpu0"})
    with pytest.raises(ValueError, match=r"'encoder' is assigned device 2, but there are 2 devices \(cpu, cuda:0\)"):
        PlacementPlan.from_assignment(["embeddings", "encoder"], ["cpu", "cuda:0"], [0, 2], "heft")
    with pytest.raises(ValueError, match=r"gives no device for \['encoder'\]"):
        PlacementPlan.from_assignment(["embeddings", "encoder"], ["cpu", "cuda:0"], {"embeddings": 0}, "heft")
    with pytest.raises(ValueError, match=r"edge \('a', 'z'\) is not a \(u, v\) pair of the tasks given"):
        topological_order(["a", "b"], [("a", "z")])


@pytest.mark.parametrize("seed", range(30))
def test_chain_time_prices_any_plan_as_the_solver_does(seed):
    rng = random.Random(1300 + seed)
    costs, _ = random_chain(rng, p_inf=0.0)
    devices = len(costs[0])
    boundary_bytes = [float(rng.choice([0, 256, 1024])) for _ in range(len(costs) - 1)]
    bw = [[INF if a == b else float(rng.choice([64, 128, 512])) for b in range(devices)] for a in range(devices)]
    for objective, m in [("sequential", 1), ("pipeline", 3)]:
        plan = chain_dp_bytes(costs, boundary_bytes, bw, objective, m)
        assert chain_time(costs, boundary_bytes, bw, plan.devices, objective, m) == pytest.approx(plan.predicted_time)
    best = chain_dp_bytes(costs, boundary_bytes, bw, "sequential", distinct_devices=False).predicted_time
    for _ in range(5):  # any plan costs at least the optimum
        other = [rng.randrange(devices) for _ in costs]
        assert chain_time(costs, boundary_bytes, bw, other) >= best - 1e-9
    one = [0] * len(costs)  # all on one device: the sum of its costs, m times in a pipeline
    assert chain_time(costs, boundary_bytes, bw, one, "sequential") == sum(row[0] for row in costs)
    assert chain_time(costs, boundary_bytes, bw, one, "pipeline", 4) == 4 * sum(row[0] for row in costs)
    for wrong in (-1, devices):
        with pytest.raises(ValueError, match=rf"device indices must be in \[0, {devices}\).* has {wrong}"):
            chain_time(costs, boundary_bytes, bw, [wrong] * len(costs))


def test_cost_model_predicts_a_named_plan_and_refuses_unmeasured_devices():
    cm = CostModel(stages=["a", "b", "c"], devices=["cpu", "cuda:0"], compute=[[4.0, 1.0], [6.0, 1.0], [2.0, 3.0]],
                   boundary_bytes=[100, 100, 10], bandwidth=[[INF, 50.0], [50.0, INF]])
    # a on cpu, then b and c on cuda:0: 4 + (100 bytes there and back at 50 B/s: 4 s) + 1 + 3
    assert cm.predict({"a": "cpu", "b": "cuda:0", "c": "cuda:0"}) == pytest.approx(12.0)
    assert cm.predict(["cuda:0"] * 3) == cm.chain_plan().predicted_step_time == pytest.approx(5.0)
    with pytest.raises(ValueError, match="not \\['cuda:1'\\]"):
        cm.predict(["cpu", "cuda:1", "cpu"])


def test_cost_model_predicts_a_plan_by_group_paths_as_a_recipe_writes_it():
    """Before, a group path raised a bare KeyError naming the first stage it covers."""
    cm = CostModel(stages=["embeddings", "encoder.0", "encoder.1"], devices=["cpu", "cuda:0"],
                   compute=[[4.0, 1.0], [6.0, 1.0], [2.0, 3.0]], boundary_bytes=[100, 100, 10],
                   bandwidth=[[INF, 50.0], [50.0, INF]])
    assert cm.predict({"embeddings": "cpu", "encoder": "cuda:0"}) == cm.predict(["cpu", "cuda:0", "cuda:0"])
    assert cm.predict({"embeddings": "cpu", "encoder": {"1": "cuda:0"}, "encoder.0": "cuda:0"}) == cm.predict(
        ["cpu", "cuda:0", "cuda:0"])
    with pytest.raises(ValueError, match=r"no device for stages \['encoder.0', 'encoder.1'\]; name each of the "
                                         r"measured stages \(embeddings, encoder.0, encoder.1\) or a group"):
        cm.predict({"embeddings": "cpu"})
    with pytest.raises(ValueError, match="placement entry 'decoder' names no stage"):
        cm.predict({"embeddings": "cpu", "encoder": "cpu", "decoder": "cpu"})


def test_plans_read_nested_mappings_as_dotted_paths(tmp_path):
    from hetrain.placement import resolve_plan

    nested = {"embeddings": "cpu", "encoder": {"1": "meta"}}
    assert PlacementPlan(nested).devices == {"embeddings": "cpu", "encoder.1": "meta"}
    devices, _ = resolve_plan({"encoder": {"1": "cpu"}}, ["embeddings", "encoder.0", "encoder.1"])
    assert devices == {"encoder.1": torch.device("cpu")}
    path = tmp_path / "nested.yaml"
    path.write_text("embeddings: cpu\nencoder:\n  1: meta\n")  # a bare mapping, its nested key a YAML integer
    assert PlacementPlan.load(path).devices == {"embeddings": "cpu", "encoder.1": "meta"}


def test_timing_warms_a_short_stage_up_for_a_while_and_a_long_one_for_the_count():
    from hetrain.placement import cost_model

    def counted(seconds):
        """A stage that takes ``seconds`` of a clock that only its runs advance, and that clock."""
        calls, now = [], [0.0]

        def fn():
            calls.append(None)
            now[0] += seconds

        return fn, calls, lambda: now[0]

    short, short_calls, clock = counted(cost_model.WARMUP_MIN_S / 10)
    assert cost_model._median_time(short, [torch.device("cpu")], warmup=1, repeats=3, clock=clock) == pytest.approx(
        cost_model.WARMUP_MIN_S / 10)
    # Warmed up past the one run asked for, for WARMUP_MIN_S (ten runs, or eleven where the float sum falls short of
    # it); then 3 timed.
    assert 10 <= len(short_calls) - 3 <= 11
    long, long_calls, clock = counted(cost_model.WARMUP_MIN_S * 1.2)
    cost_model._median_time(long, [torch.device("cpu")], warmup=1, repeats=3, clock=clock)
    assert len(long_calls) == 1 + 3


def test_cuda_and_cuda_0_are_one_device_with_or_without_a_gpu():
    """cuda is the GPU a process is on, cuda:0 unless it chose another. Before, where CUDA is absent (a GPU run's plan
    read on a laptop) the two were different devices there and one where the run places them; cuda:1 stays another."""
    with pytest.raises(ValueError, match=r"name cuda:0 twice \('cuda' and 'cuda:0'\)"):
        refuse_repeated_devices(["cuda", "cuda:0"], "the devices")
    refuse_repeated_devices(["cuda", "cuda:1"], "the devices")


CPU, CUDA0, CUDA1 = torch.device("cpu"), torch.device("cuda", 0), torch.device("cuda", 1)


def test_one_process_may_place_on_any_gpu_several_only_on_their_own():
    """Under DDP every process places the same plan over its own devices: the CPU and its root device. Before, the
    plan was refused by how it wrote a device (cuda:0), not by where the device resolves in the process."""
    refuse_other_processes_devices({"embeddings": "cpu", "encoder": "cuda:1"}, {"embeddings": CPU, "encoder": CUDA1},
                                   CUDA0, processes=1)
    refuse_other_processes_devices({"embeddings": "cpu", "encoder.1": "cuda:0"},
                                   {"embeddings": CPU, "encoder.1": CUDA0}, CUDA0, processes=4)  # one GPU per node
    refuse_other_processes_devices({"embeddings": "cpu:0", "encoder.1": "cuda"},
                                   {"embeddings": torch.device("cpu", 0), "encoder.1": CUDA1}, CUDA1, processes=4)
    with pytest.raises(ValueError, match=r"under 4 processes \(DDP\) the placement plan read from /runs/a/plan.yaml "
                                         r"puts encoder.0, encoder.1 on cuda:0, not on this process's devices: .*"
                                         r"the same one in every process.* This process's own GPU is cuda:1: write "
                                         r"cuda \(each process's own GPU\) or cpu for those stages$"):
        refuse_other_processes_devices({"embeddings": "cpu", "encoder": "cuda:0"},
                                       {"embeddings": CPU, "encoder.0": CUDA0, "encoder.1": CUDA0}, CUDA1,
                                       processes=4, source="/runs/a/plan.yaml")


def test_under_ddp_a_cpu_process_refuses_a_gpu_written_by_index():
    """trainer.accelerator=cpu under DDP: no process has a GPU of its own, so cuda:0, the same GPU in every process,
    is refused, saying to write cpu (cuda, no process's own there, goes to the fallback: resolve_plan)."""
    with pytest.raises(ValueError, match=r"under 2 processes \(DDP\) the placement plan puts encoder, classifier on "
                                         r"cuda:0, not on this process's devices: .* This process has no GPU of its "
                                         r"own \(its root device is the CPU: trainer.accelerator=cpu\): write cpu for "
                                         r"those stages, or train on GPUs \(trainer.accelerator=gpu\), where cuda "
                                         r"names each process's own$"):
        refuse_other_processes_devices({"embeddings": "cpu", "encoder": "cuda:0", "classifier": "cuda:0"},
                                       {"embeddings": CPU, "encoder": CUDA0, "classifier": CUDA0}, CPU, processes=2)


def test_under_ddp_a_refused_device_is_quoted_as_the_plan_wrote_it():
    """Before, the refusal quoted the device each stage resolved to: a plan writing cuda read as one writing cuda:0,
    the device the reader is told not to write. Now each is quoted as written, and where it resolved beside it."""
    with pytest.raises(ValueError, match=r"the placement plan puts encoder on cuda \(cuda:0\); classifier on cuda:0, "
                                         r"not on this process's devices"):
        refuse_other_processes_devices({"encoder": "cuda", "classifier": "cuda:0"},
                                       {"encoder": CUDA0, "classifier": CUDA0}, CUDA1, processes=2)


def test_under_ddp_on_the_cpu_a_gpu_written_without_an_index_goes_to_the_fallback(monkeypatch):
    """cuda is the process's own GPU, and under DDP on CPU root devices (trainer.accelerator=cpu) no process has one:
    its stages go to the fallback, said in the line an absent device's are. Before, cuda resolved to cuda:0 on a
    machine with a GPU and every process refused the plan (bert_split's). cuda:0 is left to the refusal; one process
    on the CPU may still put stages on its GPU."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    plan = {"embeddings": "cpu", "encoder": "cuda", "classifier": "cuda"}
    stages = list(plan)
    devices, note = resolve_plan(plan, stages, "cpu", CPU, processes=2)
    assert devices == dict.fromkeys(stages, CPU)
    assert note == ("placement: cuda is no process's own under 2 processes on the CPU (trainer.accelerator=cpu); "
                    "encoder, classifier -> cpu")
    devices, note = resolve_plan({**plan, "encoder": "cuda:0", "classifier": "cuda:7"}, stages, "cpu", CPU, processes=2)
    assert devices == {"embeddings": CPU, "encoder": CUDA0, "classifier": CPU}
    assert note == "placement: cuda:7 not present; classifier -> cpu"
    assert resolve_plan(plan, stages, "cpu", CPU, processes=1) == ({"embeddings": CPU, "encoder": CUDA0,
                                                                    "classifier": CUDA0}, None)
    with pytest.raises(ValueError, match=r"cuda is no process's own .*; encoder, classifier -> cuda:5, but the "
                                         r"fallback cuda:5 is not here either"):
        resolve_plan(plan, stages, "cuda:5", CPU, processes=2)
    # A GPU fallback there is no process's either: refused naming the fallback (it read as the plan's cuda, refused).
    for fallback in ("cuda", "cuda:0"):
        with pytest.raises(ValueError, match=rf"-> {fallback}, but the fallback {fallback} is a GPU, which no process "
                                             r"has under 2 processes on the CPU .*placement.fallback=cpu"):
            resolve_plan(plan, stages, fallback, CPU, processes=2)


def _yaml_plans(node: object) -> Iterator[tuple[Mapping, str]]:
    """Every placement in a parsed YAML file (a mapping with a ``plan`` mapping) as (plan, fallback)."""
    if isinstance(node, Mapping):
        if isinstance(node.get("plan"), Mapping):
            yield node["plan"], node.get("fallback", "cpu")
        for value in node.values():
            yield from _yaml_plans(value)


@pytest.mark.parametrize("path", sorted(str(p.relative_to(ROOT)) for p in [*ROOT.glob("recipes/*.yaml"),
                                                                          *ROOT.glob("configs/**/*.yaml")]))
def test_every_shipped_plan_runs_under_ddp(path, monkeypatch):
    """bert_split placed its stages on cuda:0, and the README runs it with trainer.devices=2 +trainer.strategy=ddp:
    every process's stages went to the first GPU. A shipped plan writes cuda, each process's own: each of two
    processes, one GPU each (Lightning makes its root device current), places it on its own devices, and two on the
    CPU of the same machine put its stages on the fallback (before, they refused it: cuda was cuda:0 there)."""
    plans = list(_yaml_plans(yaml.safe_load((ROOT / path).read_text())))
    assert plans or path != "recipes/bert_split.yaml"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    for plan, fallback in plans:
        stages = [path for path in flatten_plan(plan) if path]
        for rank in (0, 1):
            monkeypatch.setattr(torch.cuda, "current_device", lambda rank=rank: rank)
            own = torch.device("cuda", rank)
            devices, _ = resolve_plan(plan, stages, fallback, own, processes=2)
            refuse_other_processes_devices(plan, devices, own, processes=2)
        # trainer.accelerator=cpu on the same machine (tests/test_ddp.py runs bert_split so): no GPU is current.
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        devices, _ = resolve_plan(plan, stages, fallback, CPU, processes=2)
        refuse_other_processes_devices(plan, devices, CPU, processes=2)
