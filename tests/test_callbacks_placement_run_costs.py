"""RunCosts.best_plan: the fastest plan as the run executes it, one-device plans whole, split plans pipelined."""

from __future__ import annotations

import itertools
import math
import random

import pytest
from torch import nn

from hetrain.callbacks.pipeline import PipelineSplit
from hetrain.callbacks.placement import RunCosts
from hetrain.placement import CostModel

INF = math.inf


def two_devices(compute: list[list[float]]) -> CostModel:
    return CostModel(["a", "b"], ["cpu", "cuda:0"], compute, [0, 0], [[INF, 1e9], [1e9, INF]])


def test_best_plan_finds_a_split_when_the_solver_alone_prefers_one_device():
    """Before, a one-device plan winning inside the pipeline solver (4 micro-batches on cuda:0: 6.0) hid the split
    (a on the CPU, b on cuda:0: 0.1 + 0.5 + 3 x 0.5 = 2.1), and best_plan returned cuda:0 whole at 6.0."""
    micro = two_devices([[0.1, 1.0], [0.1, 0.5]])
    whole = two_devices([[10.0, 4.0], [10.0, 2.0]])
    best = RunCosts(whole, micro, 4).best_plan()
    assert best.devices == {"a": "cpu", "b": "cuda:0"}
    assert best.predicted_step_time == pytest.approx(2.1)


def test_best_plan_splits_off_a_short_cpu_stage_the_gpipe_step_hides():
    """A 0.5 ms CPU embedding stage before a 2.15 ms GPU stage, 4 micro-batches: the step takes one micro-batch
    through both and the GPU stage for each other, 0.5 + 4 x 2.155 = 9.12 ms, less than cuda:0 whole (9.8 ms).
    Before, (m + S - 1) x 2.155 = 10.77 ms priced the CPU stage as another slow one, and cuda:0 whole won."""
    ms, bw = 1e-3, [[INF, 10e9], [10e9, INF]]
    stages, devices = ["embeddings", "encoder.0", "classifier"], ["cpu", "cuda:0"]
    micro = CostModel(stages, devices, [[0.5 * ms, 0.4 * ms], [40 * ms, 2.0 * ms], [1 * ms, 0.05 * ms]],
                      [8 * 128 * 128 * 4, 8 * 128 * 128 * 4, 8 * 2 * 4], bw)
    whole = CostModel(stages, devices, [[2.0 * ms, 1.6 * ms], [160 * ms, 8.0 * ms], [4 * ms, 0.2 * ms]],
                      [32 * 128 * 128 * 4, 32 * 128 * 128 * 4, 32 * 2 * 4], bw)
    best = RunCosts(whole, micro, 4).best_plan()
    assert best.devices == {"embeddings": "cpu", "encoder.0": "cuda:0", "classifier": "cuda:0"}
    gpu = 2 * 8 * 128 * 128 * 4 / 10e9 + 2.05 * ms  # the activation over and its gradient back, then the encoder
    assert best.predicted_step_time == pytest.approx(0.5 * ms + gpu + 3 * gpu)


def test_a_split_on_one_device_is_priced_as_the_micro_batches_it_runs():
    """PipelineSplit(split_on_one_device=True) cuts the batch on one device too; before, such a plan was priced as the
    whole batch (2 + 4 = 6 on cuda:0), a step the run does not take (4 x (3 + 3.5) = 26)."""
    whole = two_devices([[1.0, 2.0], [8.0, 4.0]])
    micro = two_devices([[0.4, 3.0], [2.5, 3.5]])
    costs = RunCosts(whole, micro, 4, split_on_one_device=True)
    one = {"a": "cuda:0", "b": "cuda:0"}
    assert costs.split(one)
    assert costs.predict(one) == pytest.approx(4 * (3.0 + 3.5))
    assert costs.predict({"a": "cpu", "b": "cpu"}) == pytest.approx(4 * (0.4 + 2.5))
    best = costs.best_plan()  # the CPU in 4 micro-batches (11.6) beats either split (14.4, 13) and cuda:0 (26)
    assert best.devices == {"a": "cpu", "b": "cpu"} and best.predicted_step_time == pytest.approx(11.6)
    assert not RunCosts(whole, micro, 4).split(one)  # the default: one device runs each batch whole


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


def test_a_plan_naming_one_gpu_two_ways_runs_each_batch_whole():
    """Before, split compared names: cuda and cuda:0 (one GPU, where the run places both) counted as two devices, and
    the plan was priced as 4 micro-batches (26) though PipelineSplit runs each batch whole there (6)."""
    costs = RunCosts(two_devices([[1.0, 2.0], [8.0, 4.0]]), two_devices([[0.4, 3.0], [2.5, 3.5]]), 4)
    plan = {"a": "cuda", "b": "cuda:0"}
    assert not costs.split(plan)
    assert costs.predict(plan) == costs.predict({"a": "cuda:0", "b": "cuda:0"}) == pytest.approx(6.0)
    bandwidth = [[INF if i == j else 1e9 for j in range(3)] for i in range(3)]
    three = CostModel(["a", "b"], ["cpu", "cuda:0", "cuda:1"], [[1.0] * 3, [1.0] * 3], [0, 0], bandwidth)
    assert RunCosts(three, three, 4).split({"a": "cuda", "b": "cuda:1"})  # cuda is cuda:0: two GPUs


@pytest.mark.parametrize("names", [("cpu", "cpu:0"), ("cpu:0", "cpu"), ("cpu:0", "cpu:0"), ("cpu", "cpu")])
def test_split_decides_as_the_pipeline_split_of_the_placed_stages(names):
    """The prediction's split against the run's own: PipelineSplit over the stages placed on the plan's devices.
    Before, cpu and cpu:0 were two devices to the prediction and one to the run."""
    costs = RunCosts(two_devices([[1.0, 2.0], [8.0, 4.0]]), two_devices([[0.4, 3.0], [2.5, 3.5]]), 4)
    stages = [nn.Linear(2, 2).to(name) for name in names]
    assert costs.split(dict(zip("ab", names, strict=True))) == (PipelineSplit(4).active_micro_batches(stages) > 1)


def test_auto_keeps_an_embedding_tied_to_the_head_on_one_device():
    """The reviewer's LM-style chain, its head tied to the input embedding: the lookup is cheap on the CPU, the
    matmuls fast on the GPU. Before, best_plan put the embedding on the CPU and the head on cuda:0, a plan
    StagePlacement.place then refused at fit start with advice a user of plan auto could not act on."""
    import torch

    from hetrain.placement import measure
    from hetrain.placement.pipeline import shared_across_devices

    emb, body, head = nn.Embedding(1000, 64), nn.Linear(64, 64), nn.Linear(64, 1000, bias=False)
    head.weight = emb.weight
    stages = {"emb": emb, "body": body, "head": head}
    measured = measure(stages, lambda: torch.randint(0, 1000, (32,)), ["cpu"], warmup=0, repeats=1)
    assert measured.tied == [["emb", "head"]]  # found as place() finds them: one parameter, two stages
    costs = CostModel(list(stages), ["cpu", "cuda:0"], [[0.001, 0.004], [0.05, 0.002], [0.08, 0.003]],
                      [32 * 64 * 4, 32 * 64 * 4, 32 * 1000 * 4], [[INF, 1e10], [1e10, INF]], tied=measured.tied)
    for run_costs in RunCosts(costs), RunCosts(costs, costs, 4):  # sequential, and pipelined
        plan = run_costs.best_plan()
        assert plan.devices["emb"] == plan.devices["head"]
        assert shared_across_devices(list(stages.items()), plan.devices) == []  # what place() refuses on
    assert RunCosts(costs).best_plan().devices == {"emb": "cuda:0", "body": "cuda:0", "head": "cuda:0"}
