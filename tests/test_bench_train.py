"""The training-step benchmark runs end to end in --quick mode on CPU and records what it measured and skipped."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import hetrain
from benchmarks.bench_train import pinned_to
from hetrain import plugins
from hetrain.placement import CostModel

REPO = Path(__file__).resolve().parents[1]


def test_bench_train_quick_cpu(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_train", "--quick", "--device", "cpu", "--out", str(tmp_path)],
        # The benchmark times the real CPU path, not the Triton interpreter the other tests run on.
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"},
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    (path,) = tmp_path.glob("*-cpu-train-quick.json")
    result = json.loads(path.read_text())
    assert result["torch"] and result["device"].startswith("cpu") and result["quick"] is True
    rows = {(r["section"], r["mode"], r["fused"]): r for r in result["rows"] if r["section"] == "precision"}
    for mode in ("fp32", "bf16-mixed"):
        for fused in (True, False):
            row = rows[("precision", mode, fused)]
            assert row["skipped"] is None and row["ms"] > 0 and row["peak_mib"] is None, row
    for mode in ("tf32", "16-mixed"):
        for fused in (True, False):
            row = rows[("precision", mode, fused)]
            assert row["ms"] is None and "CUDA" in row["skipped"], row
    for fused in (True, False):
        assert "GPU" in rows[("precision", "bf16-compile-cudagraphs", fused)]["skipped"]
    pipeline = [r for r in result["rows"] if r["section"] == "pipeline"]
    assert {r["micro_batches"] for r in pipeline} == {1, 2}
    assert all(r["ms"] is None and "GPU" in r["skipped"] for r in pipeline)
    assert "bf16-mixed" in proc.stdout and str(path) in proc.stdout
    placement = {r["method"]: r for r in result["placement"] if r["section"] == "placement"}
    assert set(placement) == {"heft", "chain-dp", "fastest-device", "round-robin"}
    for row in placement.values():  # one device here: every plan is all-CPU, predicted and measured
        assert set(row["plan"].values()) == {"cpu"} and row["predicted_ms"] > 0 and row["ms"] > 0, row
    # The same plan is measured once: the later methods show the first one's measurement and name it.
    assert "same_plan_as" not in placement["heft"]
    for method in ("chain-dp", "fastest-device", "round-robin"):
        assert placement[method]["same_plan_as"] == "heft" and placement[method]["ms"] == placement["heft"]["ms"]
    assert "(the heft plan)" in proc.stdout
    bubble = [r for r in result["placement"] if r["section"] == "bubble"]
    assert bubble and all("one device" in r["skipped"] for r in bubble)


def test_a_mode_that_fails_is_recorded_and_the_others_still_run(monkeypatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    import benchmarks.bench_train as bench

    real_step = bench.train_step

    def step(model, mode, batch, device_type):
        if mode.name != "fp32":
            return real_step(model, mode, batch, device_type)

        def fails() -> None:
            raise RuntimeError("the compiler gave up")

        return fails

    monkeypatch.setattr(bench, "train_step", step)
    rows = {(r["mode"], r["fused"]): r for r in bench.run_modes(bench.QUICK, "cpu", "--quick")}
    for fused in (True, False):
        assert rows[("fp32", fused)]["ms"] is None
        assert rows[("fp32", fused)]["failed"] == "RuntimeError: the compiler gave up"
        assert "FAILED: RuntimeError" in bench.row_text(rows[("fp32", fused)])
        assert rows[("bf16-mixed", fused)]["ms"] > 0 and "failed" not in rows[("bf16-mixed", fused)]


def test_a_run_with_a_failed_mode_keeps_the_others_exits_non_zero_and_says_the_mode_failed(monkeypatch, tmp_path,
                                                                                           capsys) -> None:
    """A failed mode exited 0, so gpu-check recorded bench-train as passed, and the verdict called it skipped."""
    import benchmarks.bench_train as bench

    def step(model, mode, batch, device_type):
        def fails() -> None:
            raise RuntimeError("inductor: compilation failed")

        return fails if mode.name == "bf16-mixed" else lambda: None

    monkeypatch.setattr(bench, "train_step", step)
    monkeypatch.setattr(bench, "run_placement", lambda shape, quick: [])  # not what this is about
    monkeypatch.setattr(sys, "argv", ["bench_train", "--quick", "--device", "cpu", "--out", str(tmp_path)])
    with pytest.raises(SystemExit) as exit_:
        bench.main()
    (path,) = tmp_path.glob("*-cpu-train-quick-failed.json")  # never the day's complete file
    assert str(exit_.value.code) == (
        "2 of 15 rows failed (bf16-mixed fused=True: RuntimeError: inductor: compilation failed; bf16-mixed "
        f"fused=False: RuntimeError: inductor: compilation failed); the others' results are in {path}")
    rows = json.loads(path.read_text())["rows"]
    assert [r["mode"] for r in rows if r.get("failed")] == ["bf16-mixed"] * 2
    assert all(r["ms"] is not None for r in rows if r["mode"] == "fp32")
    assert ("met: not measured: fused bf16 failed and bf16 + torch.compile was skipped in this run"
            in capsys.readouterr().out)


def test_the_verdict_names_a_failed_baseline_as_failed() -> None:
    from benchmarks.bench_train import BASELINE, target_verdict

    def row(mode: str, fused: bool, **state) -> dict:
        return {"section": "precision", "mode": mode, "fused": fused, "kernels": None, "skipped": None, **state}

    rows = [row("bf16-mixed", True, ms=3.0), row(*BASELINE, ms=None, failed="RuntimeError: inductor")]
    assert target_verdict({"target_met": None, "rows": rows}) == (
        "not measured: bf16 + torch.compile failed in this run (see the summary above)")
    assert target_verdict({"target_met": True, "rows": rows}) == "True"


def test_each_section_is_saved_as_it_ends(monkeypatch) -> None:
    # A GPU run stopped at its time limit keeps the sections it finished.
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    from benchmarks.bench_train import run

    saved = []
    result = run("cpu", quick=True, save=lambda r: saved.append(json.loads(json.dumps(r))))
    sections = [({r["section"] for r in s["rows"]}, len(s["placement"])) for s in saved]
    precision = sum(r["section"] == "precision" for r in result["rows"])
    # Each precision row as it ends, the section once more with its verdict, then the later sections.
    assert [len(s["rows"]) for s in saved[:precision]] == list(range(1, precision + 1))
    assert sections[precision - 1:] == [({"precision"}, 0)] * 2 + [({"precision", "pipeline"}, 0),
                                                                    ({"precision", "pipeline"},
                                                                     len(result["placement"]))]
    assert result["placement"] and saved[-1] == json.loads(json.dumps(result))


class Stopped(Exception):
    """A run stopped where a time limit would kill it."""


def test_a_run_stopped_after_its_first_precision_row_keeps_that_row(monkeypatch) -> None:
    # gpu-check caps the step: cold BERT compiles can outlast it, and the modes measured before must be kept.
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    from benchmarks.bench_train import run

    saved = []

    def save(result: dict) -> None:
        saved.append(json.loads(json.dumps(result)))
        raise Stopped

    with pytest.raises(Stopped):
        run("cpu", quick=True, save=save)
    (result,) = saved
    (row,) = result["rows"]
    assert (row["section"], row["mode"], row["fused"]) == ("precision", "fp32", True) and row["ms"] > 0, row


def _memory_overhead_first_round(monkeypatch, shape=None) -> tuple[list, dict]:
    """The profilers of a quick memory-overhead run's first round (12-step fits, of ``shape`` if given) and the
    result it saved then, the run stopped there."""
    from benchmarks import bench_memory_overhead as bench

    real_fit, profilers, saved = bench.fit, [], []

    def fit(fit_shape, device, steps, profiler):
        profilers.append(profiler)
        return real_fit(shape or fit_shape, device, 12, profiler)  # past warm-up, enough to fill every field

    def save(result: dict) -> None:
        saved.append(json.loads(json.dumps(result)))
        raise Stopped

    monkeypatch.setattr(bench, "fit", fit)
    with pytest.raises(Stopped):
        bench.run("cpu", quick=True, save=save)
    (result,) = saved
    return profilers, result


def test_a_memory_overhead_run_stopped_after_its_first_round_keeps_that_round(monkeypatch) -> None:
    _, result = _memory_overhead_first_round(monkeypatch)
    assert (result["rounds"], result["rounds_planned"]) == (1, 3)
    assert result["timed_steps"]["on"] > 0 and result["median_step_ms"]["off"] > 0, result


def test_step_profile_sorts_every_op_of_a_step_into_kinds(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.profile_step", "--device", "cpu", "--steps", "1", "--out", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"},
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    (path,) = tmp_path.glob("*-cpu-step-profile-steps1.json")  # not the default 3 steps: named after them
    result = json.loads(path.read_text())
    assert result["steps"] == 1
    kinds = result["kinds"]
    assert abs(sum(k["ms"] for k in kinds.values()) - result["step_ms"]) < 1e-6 * result["step_ms"]
    # The fused model's step: GEMMs, hetrain's ops and the fused AdamW all show up under their kinds.
    assert kinds["gemm"]["ms"] > 0 and kinds["hetrain fused"]["ms"] > 0 and kinds["optimizer"]["ms"] > 0
    assert all(r["op"] and r["share"] < 1 for r in result["top_other"])
    # Attention's dropout mask runs inside SDPA (its math path on a CPU): attention's, not a fusion candidate.
    assert "aten::bernoulli_" not in {r["op"] for r in result["top_other"]} and kinds["attention"]["ms"] > 0
    assert "| gemm |" in proc.stdout


def test_a_row_pinned_to_a_backend_that_fails_fails_instead_of_timing_another():
    def broken(*args):
        raise RuntimeError("flaky kernels")

    impl = type("Flaky", (), {"forward": staticmethod(broken), "backward": staticmethod(broken)})
    plugins.register("layer_norm", "flaky", ("cpu",), impl, priority=-1)
    try:
        x = torch.randn(3, 8)
        with pinned_to("flaky"):
            assert plugins.select("layer_norm", "cpu").name == "flaky"
            assert plugins.select("rms_norm", "cpu").name != "flaky"  # an op without it is left as it was
            with pytest.raises(RuntimeError, match="flaky kernels"):
                hetrain.ops.layer_norm(x)
        with pinned_to(None):
            assert plugins.select("layer_norm", "cpu").name != "flaky"
    finally:
        plugins.unregister("layer_norm", "flaky")



def test_bubble_rows_are_planned_and_priced_from_one_micro_batchs_costs(monkeypatch) -> None:
    # The pipeline objective takes per-micro-batch costs: priced from the whole batch's, a plan reads m times long.
    import benchmarks.bench_train as bench

    def costs_of(stages, make_input, devices, stage_args, **kwargs) -> CostModel:
        rows = len(make_input())
        assert all(len(arg) == rows for name in stages for arg in stage_args(name))  # the mask cut as the ids
        return CostModel(list(stages), list(devices), [[rows * 1e-3] * 2 for _ in stages], [rows] * len(stages),
                         [[math.inf, 1e9], [1e9, math.inf]], meta={"rows": rows})

    priced = []

    def placed_row(model, costs, plan, batch, quick, section, method, micro_batches=1) -> dict:
        priced.append((section, micro_batches, costs.meta["rows"]))
        return {"section": section, "method": method, "micro_batches": micro_batches, "skipped": "not run here"}

    monkeypatch.setattr(bench, "available_devices", lambda: ["cpu", "cuda"])  # two devices: the bubble rows run
    monkeypatch.setattr(bench, "cost_model", costs_of)
    monkeypatch.setattr(bench, "_placed_row", placed_row)
    bench.run_placement(bench.QUICK, quick=True)
    # The QUICK batch has 8 rows: m=1 runs it whole, m=2 in micro-batches of 4.
    assert [(m, rows) for section, m, rows in priced if section == "bubble"] == [(1, 8), (2, 4)]


def test_a_bubble_sets_every_micro_batch_of_the_busiest_device_against_the_step(monkeypatch) -> None:
    import benchmarks.bench_train as bench

    model = bench.build_model(bench.QUICK, fused=True).train()
    stages = list(model.stages())
    costs = CostModel(stages, ["cpu"], [[1e-3] for _ in stages], [0] * len(stages), [[math.inf]])  # 1 ms each
    monkeypatch.setattr(bench, "step_ms", lambda step, devices, quick: 10.0)  # a 10 ms step
    row = bench._placed_row(model, costs, dict.fromkeys(stages, "cpu"), bench.make_batch(bench.QUICK, "cpu"), True,
                            section="bubble", method="chain-dp pipeline", micro_batches=2)
    assert row["bubble"] == pytest.approx(1 - 2 * len(stages) * 1e-3 / 10e-3)  # the cpu busy for 2 micro-batches


class OnAnyDevice:
    """A batch tensor's stand-in: moved to a device (cuda:1 too, on a machine without one), it stays as it is."""

    def to(self, device: torch.device) -> OnAnyDevice:
        return self


def test_a_placed_step_is_timed_waiting_for_every_gpu_its_plan_uses(monkeypatch) -> None:
    """It waited for the current GPU alone ("cuda"): with --device cuda:1 current, a plan's stages on cuda:0 were
    taken to have ended when cuda:1's had."""
    import benchmarks.bench_train as bench
    from benchmarks.timing import cuda_devices

    plan = {"embeddings": "cpu", "encoder": "cuda:0", "classifier": "cuda:1"}

    class Placement:  # places no module: this checks what the step's timing waits for
        def __init__(self, plan: dict[str, str]) -> None:
            self.plan = plan

        def place(self, stages: list[str]) -> dict[str, torch.device]:
            return {s: torch.device(self.plan[s]) for s in stages}

    timed_on = []
    monkeypatch.setattr(bench, "StagePlacement", Placement)
    monkeypatch.setattr(bench, "forward_backward", lambda model, batch: lambda: None)
    monkeypatch.setattr(bench, "median_ms", lambda step, *, device, **kwargs: timed_on.append(device) or 10.0)
    model = type("Placed", (), {"micro_batches": 1, "stages": lambda self: list(plan)})()
    costs = type("Costs", (), {"predict": lambda self, plan, objective, micro_batches: 0.01})()
    row = bench._placed_row(model, costs, plan, (OnAnyDevice(),) * 3, True, section="placement", method="heft")
    (devices,) = timed_on
    assert sorted(map(str, cuda_devices(devices))) == ["cuda:0", "cuda:1"]
    assert row["ms"] == 10.0


def test_the_memory_overhead_runs_churn_steps_are_watched_and_recorded_as_observed(monkeypatch) -> None:
    # The profiler places a churn step at the end of the step before it; were the next step an unwatched even one,
    # churn would never run and the result would list churn steps none of which was profiled.
    from benchmarks import bench_memory_overhead as bench

    tiny = bench.Shape(vocab_size=32, hidden=16, layers=1, heads=2, seq=8, batch=2)
    (profiler,), result = _memory_overhead_first_round(monkeypatch, tiny)
    assert profiler.churn_steps and profiler.churn_observed == profiler.churn_steps
    churn = result["profiler"]
    assert (churn["churn_steps"], churn["churn_observed"]) == (profiler.churn_steps, profiler.churn_observed)
    assert result["timed_steps"]["on"] > 0 and result["timed_steps"]["off"] > 0
