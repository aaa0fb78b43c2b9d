"""RunCosts.best_plan: the fastest plan as the run executes it, one-device plans whole, split plans pipelined."""

from __future__ import annotations

import itertools
import math
import random

import pytest

from hetrain.callbacks.placement import RunCosts
from hetrain.placement import CostModel

INF = math.inf


def two_devices(compute: list[list[float]]) -> CostModel:
    return CostModel(["a", "b"], ["cpu", "cuda:0"], compute, [0, 0], [[INF, 1e9], [1e9, INF]])


def test_best_plan_finds_a_split_when_the_solver_alone_prefers_one_device():
    """Before, a one-device plan winning inside the pipeline solver (4 micro-batches on cuda:0: 6.0) hid the split
    (a on the CPU, b on cuda:0: 5 x 0.5 = 2.5), and best_plan returned cuda:0 whole at 6.0."""
    micro = two_devices([[0.1, 1.0], [0.1, 0.5]])
    whole = two_devices([[10.0, 4.0], [10.0, 2.0]])
    best = RunCosts(whole, micro, 4).best_plan()
    assert best.devices == {"a": "cpu", "b": "cuda:0"}
    assert best.predicted_step_time == pytest.approx(2.5)


def random_model(rng: random.Random, stages: list[str], devices: list[str]) -> CostModel:
    compute = [[INF if rng.random() < 0.2 else rng.uniform(0.1, 5.0) for _ in devices] for _ in stages]
    for row in compute:  # a stage runs somewhere (one that runs nowhere is refused)
        row[rng.randrange(len(devices))] = rng.uniform(0.1, 5.0)
    bandwidth = [[INF if a == b else rng.uniform(10.0, 1000.0) for b in devices] for a in devices]
    return CostModel(stages, devices, compute, [rng.randint(0, 500) for _ in stages], bandwidth)


@pytest.mark.parametrize("weightless_share", [0.0, 0.4])
@pytest.mark.parametrize("seed", range(40))
def test_best_plan_is_the_minimum_of_predict_over_every_plan(seed, weightless_share):
    """Among plans as the run executes them: a stage without weights runs with the stage it is merged into."""
    rng = random.Random(seed)
    stages, devices = ["s0", "s1", "s2", "s3"][: rng.randint(1, 4)], ["cpu", "cuda:0", "cuda:1"]
    weightless = tuple(s for s in stages if rng.random() < weightless_share)
    costs = RunCosts(random_model(rng, stages, devices), random_model(rng, stages, devices), rng.randint(1, 6),
                     weightless)
    times = []
    for assignment in itertools.product(devices, repeat=len(stages)):
        try:
            times.append(costs.predict(dict(zip(stages, assignment, strict=True))))
        except ValueError:  # a device holding two stages of a pipeline
            continue
    if math.isinf(min(times)):
        with pytest.raises(ValueError, match="no placement has a finite predicted time"):
            costs.best_plan()
        return
    best = costs.best_plan()
    assert costs.executed(best.devices) == best.devices  # a plan the run executes as it reads
    assert best.predicted_step_time == pytest.approx(min(times))
    assert costs.predict(best.devices) == best.predicted_step_time


def test_best_plan_refuses_when_no_plan_the_run_executes_has_a_time():
    """Before, the solver's micro-batch plan on cuda:0 was returned, though the run executes it whole, where stage b
    failed on cuda:0."""
    whole = two_devices([[INF, 1.0], [1.0, INF]])
    micro = two_devices([[INF, 0.5], [INF, 0.5]])
    with pytest.raises(ValueError, match="no placement has a finite predicted time"):
        RunCosts(whole, micro, 4).best_plan()


def with_activation(compute: list[list[float]]) -> CostModel:
    """Stages a, act and c on two devices; act holds no weights, so it runs where a's output is."""
    return CostModel(["a", "act", "c"], ["cpu", "cuda:0"], compute, [100, 100, 8], [[INF, 1e3], [1e3, INF]])


def test_best_plan_puts_a_stage_without_weights_where_it_runs():
    """Before, the solver put act (10 on the CPU, 1 on cuda:0) on cuda:0 after a on the CPU and predicted 3.2, but
    placing does not move act: it ran on the CPU after a, a plan predicted at 12.2, where cuda:0 throughout is 5."""
    costs = RunCosts(with_activation([[1.0, 3.0], [10.0, 1.0], [1.0, 1.0]]), weightless=("act",))
    best = costs.best_plan()
    assert best.devices == {"a": "cuda:0", "act": "cuda:0", "c": "cuda:0"}
    assert best.predicted_step_time == pytest.approx(5.0)
    # A plan that names another device for act is priced as it runs: act after a, on the CPU.
    assert costs.predict({"a": "cpu", "act": "cuda:0", "c": "cuda:0"}) == pytest.approx(1 + 10 + 0.2 + 1)


def test_a_stage_without_weights_on_a_device_of_its_own_splits_no_batch():
    """PipelineSplit counts only the devices of stages with weights; before, a plan that named another device for a
    stage without them was priced as micro-batches over two stages, which the run never cuts."""
    whole = with_activation([[1.0, 1.0], [1.0, 1.0], [1.0, 1.0]])
    micro = with_activation([[0.5, 0.5], [0.5, 0.5], [0.5, 0.5]])
    costs = RunCosts(whole, micro, 4, weightless=("act",))
    plan = {"a": "cpu", "act": "cuda:0", "c": "cpu"}
    assert not costs.split(plan)
    assert costs.predict(plan) == pytest.approx(3.0)


def test_a_leading_stage_without_weights_runs_with_the_stage_after_it():
    costs = RunCosts(with_activation([[5.0, 1.0], [1.0, 5.0], [1.0, 5.0]]), weightless=("a",))
    best = costs.best_plan()
    assert best.devices["a"] == best.devices["act"]
    assert best.predicted_step_time == pytest.approx(7.0)
