"""CostModel: the best plan over several devices, checked inputs, and a JSON file any parser reads back."""

from __future__ import annotations

import itertools
import json
import logging
import math
import random

import pytest
import torch
from torch import nn

from hetrain.placement import CostModel, PlacementPlan, measure

INF = math.inf
NAN = math.nan


def random_model(rng: random.Random, num_stages: int, num_devices: int) -> CostModel:
    devices = ["cpu"] + [f"cuda:{i}" for i in range(num_devices - 1)]
    compute = [[INF if rng.random() < 0.25 else rng.uniform(0.1, 5.0) for _ in devices] for _ in range(num_stages)]
    for row in compute:  # a stage runs somewhere (one that runs nowhere is refused)
        row[rng.randrange(num_devices)] = rng.uniform(0.1, 5.0)
    bandwidth = [[INF if a == b else rng.uniform(10.0, 1000.0) for b in devices] for a in devices]
    return CostModel([f"s{i}" for i in range(num_stages)], devices, compute,
                     [rng.randint(0, 500) for _ in range(num_stages)], bandwidth)


@pytest.mark.parametrize("seed", range(30))
def test_multi_device_plan_is_the_best_pipeline_over_two_devices_or_more(seed):
    rng = random.Random(seed)
    cm, m = random_model(rng, rng.randint(1, 4), rng.randint(1, 3)), rng.randint(1, 6)
    times = []
    for assignment in itertools.product(cm.devices, repeat=len(cm.stages)):
        if len(set(assignment)) > 1 and not _revisits(assignment):
            times.append(cm.predict(list(assignment), "pipeline", m))
    plan = cm.multi_device_plan(m)
    if not times or math.isinf(min(times)):
        assert plan is None
        return
    assert len(set(plan.devices.values())) > 1
    assert plan.predicted_step_time == pytest.approx(min(times))
    assert cm.predict(plan.devices, "pipeline", m) == pytest.approx(plan.predicted_step_time)


def _revisits(assignment: tuple[str, ...]) -> bool:
    """A device that holds two stages (the pipeline model has no time for it)."""
    runs = [device for device, _ in itertools.groupby(assignment)]
    return len(runs) != len(set(runs))



def two_stages(bandwidth: list[list[float]]) -> CostModel:
    return CostModel(["a", "b"], ["cpu", "cuda:0"], [[1.0, 5.0], [5.0, 1.0]], [1000, 4], bandwidth)


SOLVERS = {
    "chain_plan": lambda cm: cm.chain_plan(),
    "pipeline": lambda cm: cm.chain_plan("pipeline", 4),
    "heft_plan": lambda cm: cm.heft_plan(),
    "predict": lambda cm: cm.predict(["cpu", "cuda:0"]),
}


@pytest.mark.parametrize("solve", SOLVERS.values(), ids=SOLVERS.keys())
@pytest.mark.parametrize("value", [float("nan"), -1.0, 0.0, "100"], ids=["nan", "negative", "zero", "string"])
def test_a_bad_bandwidth_is_refused_in_training_as_in_inference(solve, value):
    """Before, training's round trip read a nan or negative bandwidth as a free link (1 / (1/nan + ...) fails > 0,
    so inf), and a zero or a string raised a bare ZeroDivisionError or TypeError."""
    with pytest.raises(ValueError, match=f"bandwidth from device 0 to 1 is {value!r}; it must be a number > 0"):
        solve(two_stages([[INF, value], [100.0, INF]]))


@pytest.mark.parametrize("solve", SOLVERS.values(), ids=SOLVERS.keys())
def test_the_bandwidth_diagonal_is_unread(solve):
    """A device to itself is free whatever the diagonal holds; before, a 0 there divided by zero in training."""
    assert solve(two_stages([[0.0, 100.0], [100.0, float("nan")]])) == solve(two_stages([[INF, 100.0], [100.0, INF]]))


GOOD = {"stages": ["a", "b"], "devices": ["cpu", "cuda:0"], "compute": [[1.0, 2.0], [2.0, 1.0]],
        "boundary_bytes": [5, 5], "bandwidth": [[INF, 1.0], [1.0, INF]]}


@pytest.mark.parametrize(("field", "value", "message"), [
    ("boundary_bytes", [5], "boundary_bytes has 1 entries for 2 stages"),
    ("compute", [[1.0, 2.0]], "compute has 1 rows for 2 stages"),
    ("compute", [[1.0], [2.0]], r"compute rows have \[1, 1\] entries for 2 devices \(cpu, cuda:0\)"),
    ("bandwidth", [[INF]], r"bandwidth must be a 2 x 2 matrix.*got rows of \[1\]"),
    ("bandwidth", [[INF, 1.0], [1.0]], r"bandwidth must be a 2 x 2 matrix.*got rows of \[2, 1\]"),
    ("stages", ["a", "a"], r"stages repeats \['a'\]"),
    ("devices", ["cpu", "cpu"], r"devices repeats \['cpu'\]"),
    ("devices", "cp", "devices must be a non-empty list of names, got 'cp'"),
    ("stages", [], "stages must be a non-empty list of names"),
])  # fmt: skip
def test_fields_that_disagree_are_refused_naming_the_field(field, value, message):
    """Before, a short boundary_bytes passed heft_plan and gave chain_plan a count of boundaries, short compute a bare
    zip() error, one cost column for two devices was solved over the first, and repeated stages differed by solver."""
    with pytest.raises(ValueError, match=f"hetrain: CostModel.{message}"):
        CostModel(**{**GOOD, field: value})


def test_predict_refuses_a_bare_device_string():
    """Before, predict('cpu') read the string as devices 'c', 'p', 'u'."""
    with pytest.raises(TypeError, match=r"not the string 'cpu'; for every stage on it pass \['cpu'\] \* 2"):
        CostModel(**GOOD).predict("cpu")


def test_save_writes_standard_json_that_loads_back_every_value(tmp_path):
    """Before, -inf was written "inf" (it loaded back +inf) and nan as the bare token NaN, which standard JSON
    parsers refuse."""
    cm = CostModel(**{**GOOD, "compute": [[-INF, float("nan")], [INF, 1.0]], "bandwidth": [[-INF, 1.0], [1.0, INF]]})
    path = cm.save(tmp_path / "costs.json")

    def refuse(token: str) -> None:
        raise ValueError(f"not standard JSON: {token}")

    raw = json.loads(path.read_text(), parse_constant=refuse)
    assert raw["compute"] == [["-inf", "nan"], ["inf", 1.0]] and raw["bandwidth"][0][0] == "-inf"
    loaded = CostModel.load(path)
    assert loaded.compute[0][0] == -INF and math.isnan(loaded.compute[0][1]) and loaded.compute[1][0] == INF
    assert loaded.bandwidth == cm.bandwidth


@pytest.mark.parametrize("devices", [["cpu", "cpu:0"], ["cpu:0", "cpu"], ["cpu", "cpu"]])
def test_measure_refuses_two_spellings_of_one_device(devices):
    """Before, cpu and cpu:0 were measured as two devices: a copy from the CPU to itself timed as a link, and a
    pipeline over them predicted a speed-up on one device."""
    with pytest.raises(ValueError, match=r"the devices to measure name cpu twice"):
        measure(nn.Sequential(nn.Linear(2, 2)), lambda: torch.randn(1, 2), devices)


def test_measure_refuses_the_meta_device_by_name():
    """The meta device is present everywhere (a plan may place a stage there), but holds no data to time."""
    with pytest.raises(ValueError, match="cannot measure on meta"):
        measure(nn.Sequential(nn.Linear(2, 2)), lambda: torch.randn(1, 2), ["cpu", "meta"])


def test_measure_takes_torch_devices_and_records_their_names():
    """Before, every stage was timed, then the CostModel refused [device(type='cpu')] as not a list of names."""
    cm = measure(nn.Sequential(nn.Linear(2, 2)), lambda: torch.randn(1, 2), [torch.device("cpu")], warmup=0,
                 repeats=1)
    assert cm.devices == ["cpu"]


def test_measure_times_a_stage_that_works_in_place_on_its_input():
    """Before, a later stage's input was a leaf that requires grad: nn.ReLU(inplace=True) as a stage failed "a leaf
    Variable that requires grad is being used in an in-place operation", and the chain ran on no device."""
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(inplace=True), nn.Linear(8, 2))
    cm = measure(model, lambda: torch.randn(4, 8), ["cpu"], warmup=1, repeats=2)
    assert not cm.errors and all(0 < row[0] < INF for row in cm.compute)
    assert cm.boundary_bytes == [4 * 8 * 4, 4 * 8 * 4, 4 * 2 * 4]


class ScalesInPlace(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.mul_(2))


def test_measure_leaves_the_callers_input_as_it_was():
    """Before, a first stage that scales its input in place scaled the caller's tensor at every untimed and timed
    run (1.0 became 64.0 after six runs)."""
    x = torch.ones(2, 4)
    measure(nn.Sequential(ScalesInPlace(), nn.Linear(4, 2)), lambda: x, ["cpu"], warmup=2, repeats=3)
    assert torch.equal(x, torch.ones(2, 4))


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"devices": []}, ValueError, r"measure got no devices \(devices=\[\]\); name at least one"),
        ({"devices": "cpu"}, TypeError, r"a list of devices, not the string 'cpu'; pass \['cpu'\]"),
        ({"repeats": 0}, ValueError, r"repeats is 0; the median needs an integer >= 1 timed runs"),
        ({"repeats": 2.5}, ValueError, r"repeats is 2.5"),
    ],
)
def test_measure_refuses_bad_arguments_saying_which(kwargs, error, message):
    """Before, devices=[] failed KeyError '0', 'cpu' was read as the devices 'c', 'p', 'u', and repeats=0 was
    reported as a stage that runs on no device (StatisticsError: no median for empty data)."""
    with pytest.raises(error, match=message):
        measure(nn.Sequential(nn.Linear(2, 2)), lambda: torch.randn(1, 2), **{"devices": ["cpu"], **kwargs})


def test_predict_reads_another_spelling_of_a_measured_device():
    """Before, a plan with cpu:0 (the device measured as cpu, as placing reads it) was refused as unmeasured."""
    cm = CostModel(["a", "b"], ["cpu"], [[1.0], [2.0]], [4, 4], [[INF]])
    assert cm.predict({"a": "cpu:0", "b": "cpu"}) == cm.predict(["cpu", "cpu"]) == 3.0
    with pytest.raises(ValueError, match=r"measured \['cpu'\], not \['cuda:7'\]"):
        cm.predict(["cpu", "cuda:7"])


def test_measure_computes_no_gradient_for_a_stages_extra_arguments():
    """Before, an extra argument (data such as an additive mask) required grad too, so every timed backward also
    computed its gradient, which training never does; the carried activation still gets one."""
    seen = []

    class Biased(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
            seen.append((x.requires_grad, bias.requires_grad))
            return self.linear(x) + bias

    measure(nn.Sequential(nn.Linear(4, 4), Biased()), lambda: torch.randn(3, 4), devices=["cpu"],
            extra_args=lambda name: () if name == "0" else (torch.randn(3, 4),), warmup=1, repeats=1)
    assert (True, False) in seen and not any(bias for _, bias in seen)  # x: a timed run's activation


def test_measure_names_a_stage_that_returns_none():
    """Before, a stage that ran but returned None was taken for one that failed everywhere: a bare KeyError."""

    class Probe(nn.Module):
        def forward(self, x: torch.Tensor) -> None:
            x.sum()

    with pytest.raises(ValueError, match="stage '1' returned None; a stage must return its output"):
        measure(nn.Sequential(nn.Linear(4, 4), Probe()), lambda: torch.randn(3, 4), devices=["cpu"], warmup=1,
                repeats=1)


def test_predict_reads_cuda_as_the_gpu_measured_on_a_machine_without_one():
    """Before, a GPU run's costs read where CUDA is absent refused 'cuda' (there it stays un-indexed) though the model
    measured cuda:0, the GPU it means; with CUDA present it is the current GPU, cuda:0 here too."""
    cm = CostModel(["emb", "enc"], ["cpu", "cuda:0"], [[1.0, 2.0], [5.0, 1.0]], [10, 10], [[INF, 100.0], [100.0, INF]])
    assert cm.predict({"emb": "cpu", "enc": "cuda"}) == cm.predict({"emb": "cpu", "enc": "cuda:0"})
    two = CostModel(["a"], ["cuda:0", "cuda:1"], [[1.0, 2.0]], [4], [[INF, 1.0], [1.0, INF]])
    assert two.predict(["cuda"]) == 1.0


def test_predict_reads_cuda_measured_as_the_gpu_a_plan_names_cuda_0(tmp_path):
    """measure(devices=['cuda']) keeps the name 'cuda'. Before, its costs read where CUDA is absent refused a plan
    naming cuda:0 (the GPU measured), as a saved plan from the same machine names it, while cuda:1 stays another GPU."""
    bandwidth = [[INF, 100.0], [100.0, INF]]
    path = CostModel(["emb", "enc"], ["cpu", "cuda"], [[1.0, 2.0], [5.0, 1.0]], [10, 10], bandwidth).save(
        tmp_path / "placement_costs.json")
    cm = CostModel.load(path)
    plan = PlacementPlan.load(PlacementPlan({"emb": "cpu", "enc": "cuda:0"}).save(tmp_path / "placement_plan.yaml"))
    assert cm.predict(plan.devices) == cm.predict({"emb": "cpu", "enc": "cuda"}) == pytest.approx(2.2)
    assert cm.predict(["cuda:0", "cuda"]) == cm.predict(["cuda", "cuda"]) == 3.0
    with pytest.raises(ValueError, match=r"measured \['cpu', 'cuda'\], not \['cuda:1'\]"):
        cm.predict({"emb": "cpu", "enc": "cuda:1"})
    other = CostModel(["a"], ["cpu", "cuda:1"], [[1.0, 2.0]], [4], bandwidth)
    with pytest.raises(ValueError, match=r"measured \['cpu', 'cuda:1'\], not \['cuda:0'\]"):
        other.predict(["cuda:0"])


@pytest.mark.parametrize(("devices", "device"), [(["cuda", "cuda:0"], "cuda:0"), (["cpu", "cpu:0"], "cpu")])
def test_a_cost_model_that_names_one_device_twice_is_refused(devices, device):
    """Before, a model measured on cuda and on cuda:0 (one GPU, two names) priced a plan on it from either column;
    then it was refused only in predict, after the solvers had planned over it."""
    with pytest.raises(ValueError, match=rf"the cost model's devices name {device} twice"):
        CostModel(["a"], devices, [[1.0, 2.0]], [4], [[INF, 1.0], [1.0, INF]])


def shared_positions() -> nn.Sequential:
    """The reviewer's chain: one ReLU instance at three positions and one block applied three times."""
    torch.manual_seed(0)
    block, act = nn.Linear(16, 16), nn.ReLU()
    return nn.Sequential(nn.Linear(8, 16), act, block, act, block, act, block)


def test_measure_times_every_position_of_a_sequential_that_reuses_a_module():
    """Before, named_children() listed a reused module once: 3 of the chain's 7 positions were measured, the solvers
    and predict worked on that shorter chain, and a plan naming position 6 was refused."""
    seq = shared_positions()
    cm = measure(seq, lambda: torch.randn(4, 8), ["cpu"], warmup=0, repeats=1)
    assert cm.stages == ["0", "1", "2", "3", "4", "5", "6"] and len(cm.boundary_bytes) == len(seq)
    assert cm.tied == [["2", "4", "6"]]  # the block's positions share its weights; the ReLU holds none
    assert cm.predict({"": "cpu", "6": "cpu"}) > 0
    assert set(cm.chain_plan().devices) == set(cm.stages)


def test_a_plan_putting_one_module_on_two_devices_is_refused():
    """With every position measured, a plan may name two positions of one module: it has no predicted time (the
    run refuses it), and apply refuses it before moving anything."""
    seq = shared_positions()
    cm = CostModel([str(i) for i in range(7)], ["cpu", "cuda:0"], [[1.0, 1.0]] * 7, [64] * 7,
                   [[INF, 1e9], [1e9, INF]], tied=[["2", "4", "6"]])
    with pytest.raises(ValueError, match=r"stages 2, 4, 6 share parameters, but the plan puts 2 on cpu, 4 on cuda:0, "
                                         r"6 on cpu; a parameter lives on one device"):
        cm.predict({"": "cpu", "4": "cuda:0"})
    with pytest.raises(ValueError, match=r"2.weight on cpu and 4.weight on meta; 2.bias on cpu and 4.bias on meta; "
                                         r"nothing was moved"):
        PlacementPlan({"": "cpu", "4": "meta"}).apply(seq)
    with pytest.raises(ValueError, match=r"its children: 0, 1, 2, 3, 4, 5, 6\)"):  # every position, not 0, 1, 2
        PlacementPlan({"7": "cpu"}).apply(seq)


def _tied_model(rng: random.Random) -> CostModel:
    cm = random_model(rng, rng.randint(2, 5), rng.randint(2, 3))
    stages = rng.sample(cm.stages, len(cm.stages))
    cut = rng.randint(2, len(stages))
    groups = [sorted(stages[:cut])] + ([sorted(stages[cut:])] if len(stages) - cut >= 2 and rng.random() < 0.5 else [])
    return CostModel(cm.stages, cm.devices, cm.compute, cm.boundary_bytes, cm.bandwidth, tied=groups)


def _keeps_tied(cm: CostModel, assignment: tuple[str, ...]) -> bool:
    device_of = dict(zip(cm.stages, assignment, strict=True))
    return all(len({device_of[stage] for stage in group}) == 1 for group in cm.tied)


@pytest.mark.parametrize("seed", range(40))
def test_the_solvers_keep_each_tied_group_on_one_device_at_the_best_time(seed):
    """Before, the solvers split stages sharing a parameter (an embedding tied to the output head) across devices,
    a plan the run then refused. The chain solver's plans are the best of those keeping every group together."""
    rng = random.Random(seed)
    cm, m = _tied_model(rng), rng.randint(1, 4)
    kept = [a for a in itertools.product(cm.devices, repeat=len(cm.stages)) if _keeps_tied(cm, a)]
    sequential = min(cm.predict(list(a)) for a in kept)
    if math.isinf(sequential):  # no device runs a whole group
        for solve in (cm.chain_plan, cm.heft_plan, lambda: cm.multi_device_plan(m)):
            with pytest.raises(ValueError, match="stages sharing parameters must run on one device"):
                solve()
        return
    plan = cm.chain_plan()
    assert _keeps_tied(cm, tuple(plan.devices[s] for s in cm.stages))
    assert plan.predicted_step_time == pytest.approx(sequential)
    heft_plan = cm.heft_plan()
    assert _keeps_tied(cm, tuple(heft_plan.devices[s] for s in cm.stages))
    split = [cm.predict(list(a), "pipeline", m) for a in kept if len(set(a)) > 1 and not _revisits(a)]
    plan = cm.multi_device_plan(m)
    if not split or math.isinf(min(split)):
        assert plan is None
    else:
        assert _keeps_tied(cm, tuple(plan.devices[s] for s in cm.stages))
        assert plan.predicted_step_time == pytest.approx(min(split))


def _interleaved_model(rng: random.Random) -> CostModel:
    """Tied groups whose spans overlap or nest (s0 with s3, s2 with s5), as a tied autoencoder's layers do."""
    cm = random_model(rng, rng.randint(4, 7), rng.randint(2, 3))
    stages = rng.sample(cm.stages, len(cm.stages))
    groups = [sorted(stages[i:i + 2]) for i in range(0, rng.choice([2, 4]), 2)]
    return CostModel(cm.stages, cm.devices, cm.compute, cm.boundary_bytes, cm.bandwidth, tied=groups)


@pytest.mark.parametrize("seed", range(25))
def test_pipeline_plans_with_overlapping_tied_spans_are_the_best_that_keep_them(seed):
    """With one stage per device a tied group takes the stages between its ends onto its device: solved once on the
    chain with each span merged, the plans are the brute force's best."""
    rng = random.Random(seed)
    cm, m = _interleaved_model(rng), rng.randint(1, 4)
    rows = [[cm.compute[cm.stages.index(stage)] for stage in group] for group in cm.tied]
    if not all(any(all(math.isfinite(row[d]) for row in group) for d in range(len(cm.devices))) for group in rows):
        for solve in (lambda: cm.multi_device_plan(m), lambda: cm.chain_plan("pipeline", m)):
            with pytest.raises(ValueError, match="stages sharing parameters must run on one device"):
                solve()
        return
    kept = [a for a in itertools.product(cm.devices, repeat=len(cm.stages)) if _keeps_tied(cm, a) and not _revisits(a)]
    times = {a: cm.predict(list(a), "pipeline", m) for a in kept}
    split = [t for a, t in times.items() if len(set(a)) > 1]
    plan = cm.multi_device_plan(m)
    if not split or math.isinf(min(split)):
        assert plan is None
    else:
        assert plan.predicted_step_time == pytest.approx(min(split))
        assert _keeps_tied(cm, tuple(plan.devices[s] for s in cm.stages))
    if math.isinf(min(times.values(), default=INF)):
        with pytest.raises(ValueError, match="one stage per device"):
            cm.chain_plan("pipeline", m)
    else:
        assert cm.chain_plan("pipeline", m).predicted_step_time == pytest.approx(min(times.values()))


def test_a_tied_span_no_device_runs_whole_has_no_pipeline_plan():
    """a and c share parameters and run together on cuda:0 only, where b fails: a sequential plan goes back to the
    CPU for b; with one stage per device b would have to run on cuda:0 too."""
    cm = CostModel(["a", "b", "c"], ["cpu", "cuda:0"], [[1.0, 1.0], [1.0, INF], [INF, 1.0]], [8, 8, 8],
                   [[INF, 1e9], [1e9, INF]], tied=[["a", "c"]])
    assert cm.chain_plan().devices == {"a": "cuda:0", "b": "cpu", "c": "cuda:0"}
    assert cm.multi_device_plan(2) is None
    with pytest.raises(ValueError, match=r"stages sharing parameters take the stages between them onto their device "
                                         r"too, but no device runs all of a, b, c"):
        cm.chain_plan("pipeline", 2)


def _mirrored(groups: int, devices: int, neighbours: bool = False) -> CostModel:
    """The reviewer's tied autoencoder: layer i shares its weight with layer 2 * groups - 1 - i (or, with
    ``neighbours``, layer 2k with 2k + 1), on a CPU and ``devices - 1`` GPUs."""
    n = 2 * groups
    stages = [f"s{i}" for i in range(n)]
    compute = [[1.0 + 0.1 * ((i * 7 + d * 3) % 5) for d in range(devices)] for i in range(n)]
    bandwidth = [[INF if a == b else 1e9 for b in range(devices)] for a in range(devices)]
    pairs = [[stages[2 * k], stages[2 * k + 1]] if neighbours else [stages[k], stages[n - 1 - k]]
             for k in range(groups)]
    return CostModel(stages, ["cpu"] + [f"cuda:{i}" for i in range(devices - 1)], compute, [1 << 20] * n,
                     bandwidth, tied=pairs)


def _count_solves(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Counts the chain and HEFT solver runs the cost model makes."""
    from hetrain.placement import cost_model

    calls = {"chain": 0, "heft": 0}

    def counted(name, solver):
        def solve(*args, **kwargs):
            calls[name] += 1
            return solver(*args, **kwargs)
        return solve

    monkeypatch.setattr(cost_model, "chain_dp_bytes", counted("chain", cost_model.chain_dp_bytes))
    monkeypatch.setattr(cost_model, "heft_bytes", counted("heft", cost_model.heft_bytes))
    return calls


@pytest.mark.parametrize(("groups", "devices"), [(16, 2), (6, 5), (6, 9)])
def test_many_tied_groups_are_placed_in_a_few_solves(groups, devices, monkeypatch, caplog):
    """Before, the solvers built every one of the devices^groups ways to place the groups up front and solved each:
    16 groups on 2 devices made 65536 cost models (605 MiB) before solving, and auto stalled at fit start. Past
    TIED_CHOICES_SOLVED_EXACTLY ways the sequential and HEFT solvers place the groups greedily, in two solves, and
    say so; with one stage per device each span is merged and solved once."""
    calls = _count_solves(monkeypatch)
    cm = _mirrored(groups, devices)
    with caplog.at_level(logging.WARNING, logger="hetrain.placement.cost_model"):
        for solve in (cm.chain_plan, cm.heft_plan):
            plan = solve()
            assert _keeps_tied(cm, tuple(plan.devices[s] for s in cm.stages))
            assert plan.predicted_step_time == pytest.approx(cm.predict(plan.devices))
    assert calls == {"chain": 2, "heft": 2}
    assert caplog.text.count(f"{devices ** groups} ways onto the devices, more than the 256 solved one by one, so "
                             f"they were placed greedily") == 2
    assert cm.multi_device_plan(4) is None  # s0 and the last layer tie the whole chain to one device
    calls["chain"] = 0
    cm = _mirrored(groups, devices, neighbours=True)
    plan = cm.multi_device_plan(4)
    assert _keeps_tied(cm, tuple(plan.devices[s] for s in cm.stages)) and len(set(plan.devices.values())) > 1
    assert plan.predicted_step_time == pytest.approx(cm.predict(plan.devices, "pipeline", 4))
    assert cm.chain_plan("pipeline", 4).predicted_step_time <= plan.predicted_step_time
    assert calls["chain"] <= devices + 1  # one solve per first device, then one


def test_up_to_the_cap_every_way_to_place_the_tied_groups_is_solved(monkeypatch, caplog):
    """4 groups on 2 devices: 16 ways, each solved, for the exact best, up to the cap; one over it, two solves."""
    from hetrain.placement import cost_model

    calls = _count_solves(monkeypatch)
    cm = _mirrored(4, 2)
    kept = [a for a in itertools.product(cm.devices, repeat=len(cm.stages)) if _keeps_tied(cm, a)]
    monkeypatch.setattr(cost_model, "TIED_CHOICES_SOLVED_EXACTLY", 16)
    assert cm.chain_plan().predicted_step_time == pytest.approx(min(cm.predict(list(a)) for a in kept))
    assert calls["chain"] == 16 and "greedily" not in caplog.text
    monkeypatch.setattr(cost_model, "TIED_CHOICES_SOLVED_EXACTLY", 15)
    calls["chain"] = 0
    with caplog.at_level(logging.WARNING, logger="hetrain.placement.cost_model"):
        cm.chain_plan()
    assert calls["chain"] == 2 and "placed greedily" in caplog.text


def test_tied_groups_only_try_the_devices_that_run_all_their_stages(monkeypatch):
    """s0 and s3 fail on the CPU, s1 and s2 on cuda:0: each group has one device, so one way is solved."""
    calls = _count_solves(monkeypatch)
    cm = _mirrored(2, 2)
    cm.compute[0][0] = cm.compute[3][0] = cm.compute[1][1] = cm.compute[2][1] = INF
    assert cm.chain_plan().devices == {"s0": "cuda:0", "s1": "cpu", "s2": "cpu", "s3": "cuda:0"}
    assert calls["chain"] == 1


BAD_INPUTS = {  # (compute, bandwidth) each with one bad value, and what the error says
    "nan cost of a tied stage": ([[1.0, NAN], [1.0, 1.0], [1.0, 1.0]], [[INF, 1e9], [1e9, INF]],
                                 "cost of layer 0 on device 1 is nan; costs must be >= 0"),
    "negative cost of an untied stage": ([[1.0, 1.0], [-1.0, 1.0], [1.0, 1.0]], [[INF, 1e9], [1e9, INF]],
                                         r"cost of layer 1 on device 0 is -1.0; costs must be >= 0"),
    "negative bandwidth": ([[1.0, 1.0]] * 3, [[INF, -1.0], [1e9, INF]],
                           r"bandwidth from device 0 to 1 is -1.0; it must be a number > 0"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
@pytest.mark.parametrize("solve", ["chain_plan", "heft_plan", "multi_device_plan", "pipeline"])
def test_a_bad_input_is_refused_as_itself_with_stages_tied(case, solve):
    """Before, each way to place the tied groups was solved with its ValueError caught: a nan cost of a tied stage
    was masked by the way holding the stage on the other device (an all-CPU plan came back), and a negative cost of
    an untied one was reported as no plan keeping the tied groups together."""
    compute, bandwidth, error = BAD_INPUTS[case]
    cm = CostModel(["a", "b", "c"], ["cpu", "cuda:0"], compute, [8, 8, 8], bandwidth, tied=[["a", "c"]])
    run = {"chain_plan": cm.chain_plan, "heft_plan": cm.heft_plan, "multi_device_plan": cm.multi_device_plan,
           "pipeline": lambda: cm.chain_plan("pipeline", 2)}[solve]
    with pytest.raises(ValueError, match=rf"^hetrain: {error}"):
        run()


def test_tied_groups_save_and_load_and_follow_merged_stages(tmp_path):
    cm = CostModel(["emb", "act", "head"], ["cpu", "cuda:0"], [[1.0, 2.0], [0.0, 0.0], [3.0, 1.0]], [8, 8, 8],
                   [[INF, 1e9], [1e9, INF]], tied=[["emb", "head"]])
    assert CostModel.load(cm.save(tmp_path / "costs.json")).tied == [["emb", "head"]]
    assert cm.merge_weightless(["act"])[0].tied == [["emb", "head"]]
    with pytest.raises(ValueError, match=r"CostModel.tied is \[\['emb', 'body'\]\]; give groups of two or more"):
        CostModel(cm.stages, cm.devices, cm.compute, cm.boundary_bytes, cm.bandwidth, tied=[["emb", "body"]])
