"""The CPU op benchmark when a case fails: the other cases are measured and kept, the run still fails, and the
RESULTS.md table marks the failed case instead of breaking on it; a run cut short never replaces the day's complete
file; each row names the backend it timed, a case whose backend cannot be resolved fails alone, and a variant run's
file names the ops it sent elsewhere. No timing: each case's calls run once."""

from __future__ import annotations

import json
import re
import sys

import pytest
import torch

from benchmarks import bench_cpu, report
from benchmarks.cases import Case
from benchmarks.cli import partial_file
from hetrain import plugins
from hetrain.ops.rms_norm import rms_norm


def doubling() -> dict:
    x = torch.randn(8, 8, generator=torch.Generator().manual_seed(0))
    return {"eager": lambda: x * 2, "compile": lambda: x * 2, "hetrain": lambda: x * 2}


def failing() -> dict:
    def kernel_error():
        raise RuntimeError("simulated kernel failure | in a kernel")

    return {"eager": lambda: None, "compile": lambda: None, "hetrain": kernel_error}


CASES = [Case("first_op", "8x8", "float32", doubling, 512), Case("bad_op", "8x8", "float32", failing, 512),
         Case("last_op", "8x8", "float32", doubling, 512)]


def once_each(impls, **kwargs) -> dict[str, float]:
    """interleaved_ms without the timing: each implementation called once, each "taking" 2 ms."""
    for fn in impls.values():
        fn()
    return dict.fromkeys(impls, 2.0)


@pytest.fixture
def three_cases_one_failing(monkeypatch):
    monkeypatch.setattr(bench_cpu, "discover", lambda kind: CASES)
    monkeypatch.setattr(bench_cpu, "copy_bandwidth_gbs", lambda *args, **kwargs: 10.0)
    monkeypatch.setattr(bench_cpu, "interleaved_ms", once_each)


def test_a_failing_case_is_recorded_and_every_case_is_saved_as_it_finishes(three_cases_one_failing):
    saved = []
    result = bench_cpu.run(quick=True, cpu_malloc="system", save=lambda r: saved.append(json.loads(json.dumps(r))))
    assert [[row["op"] for row in s["rows"]] for s in saved] == [["first_op"], ["first_op", "bad_op"],
                                                                 ["first_op", "bad_op", "last_op"]]
    first, bad, last = result["rows"]
    assert bad == {"op": "bad_op", "shape": "8x8", "dtype": "float32",
                   "error": "RuntimeError: simulated kernel failure | in a kernel"}
    assert first["ms"] == last["ms"] == {"eager": 2.0, "compile": 2.0, "hetrain": 2.0}


def test_a_run_with_a_failing_case_writes_the_others_and_exits_non_zero(three_cases_one_failing, monkeypatch,
                                                                        tmp_path, capsys):
    monkeypatch.setattr(sys, "argv", ["bench_cpu", "--quick", "--out", str(tmp_path)])
    with pytest.raises(SystemExit) as exit_:
        bench_cpu.main()
    assert "1 of 3 cases failed (bad_op 8x8 float32: RuntimeError: simulated kernel failure" in str(exit_.value.code)
    (path,) = tmp_path.glob("*-ops-cpu-quick-failed.json")
    assert [row["op"] for row in json.loads(path.read_text())["rows"]] == ["first_op", "bad_op", "last_op"]
    assert "bad_op 8x8 float32: FAILED: RuntimeError: simulated kernel failure" in capsys.readouterr().err


def test_the_cpu_table_marks_a_failed_case(three_cases_one_failing):
    text = report.cpu_table(bench_cpu.run(quick=True, cpu_malloc="system"))
    failed = r"| bad_op | 8x8 | float32 | failed: RuntimeError: simulated kernel failure \| in a kernel | | | | | |"
    assert failed in text  # the | of the message escaped: it would end the cell
    assert "| first_op | 8x8 | float32 | 2.00 | 2.00 | 2.00 | 1.00x | 1.00x |" in text


def test_a_full_run_with_a_failed_case_leaves_results_md_alone(three_cases_one_failing, monkeypatch, tmp_path,
                                                                capsys):
    """A run where 13 of 14 cases failed (HETRAIN_PREFER=nosuch) regenerated RESULTS.md's CPU table from itself."""
    monkeypatch.setattr(bench_cpu, "RESULTS", tmp_path)  # the default --out: the run RESULTS.md would show
    monkeypatch.setattr(report, "write_results_md", lambda *args: pytest.fail("RESULTS.md regenerated"))
    monkeypatch.setattr(sys, "argv", ["bench_cpu"])
    with pytest.raises(SystemExit) as exit_:
        bench_cpu.main()
    assert "1 of 3 cases failed (bad_op 8x8 float32" in str(exit_.value.code)
    assert "a run with failed cases: RESULTS.md's CPU table" in capsys.readouterr().out
    (path,) = tmp_path.glob("*.json")  # the measured cases are kept all the same, never as the day's full run
    assert path.name.endswith("-ops-cpu-failed.json") and len(json.loads(path.read_text())["rows"]) == 3


def interrupted() -> dict:
    """A case whose hetrain column is stopped as Ctrl-C (or gpu-check's time cap) stops a run."""

    def stop():
        raise KeyboardInterrupt

    return {"eager": lambda: None, "compile": lambda: None, "hetrain": stop}


def test_a_same_day_rerun_cut_short_keeps_the_days_complete_file(monkeypatch, tmp_path):
    good = [Case("first_op", "8x8", "float32", doubling, 512), Case("last_op", "8x8", "float32", doubling, 512)]
    monkeypatch.setattr(bench_cpu, "discover", lambda kind: good)
    monkeypatch.setattr(bench_cpu, "copy_bandwidth_gbs", lambda *args, **kwargs: 10.0)
    monkeypatch.setattr(bench_cpu, "interleaved_ms", once_each)
    monkeypatch.setattr(sys, "argv", ["bench_cpu", "--cpu-malloc", "system", "--out", str(tmp_path)])
    bench_cpu.main()
    (path,) = tmp_path.glob("*.json")
    complete = path.read_text()
    monkeypatch.setattr(bench_cpu, "discover", lambda kind: [good[0], Case("last_op", "8x8", "float32", interrupted,
                                                                           512)])
    with pytest.raises(KeyboardInterrupt):
        bench_cpu.main()
    assert path.read_text() == complete  # the earlier complete run, untouched
    partial = json.loads(partial_file(path).read_text())
    assert [row["op"] for row in partial["rows"]] == ["first_op"]  # what the cut-short run measured, kept apart
    assert [row["op"] for row in report.latest(tmp_path, "ops-cpu-system-malloc")["rows"]] == ["first_op", "last_op"]


def tiny_rms_norm() -> dict:
    x = torch.randn(8, 16, requires_grad=True)
    w = torch.ones(16, requires_grad=True)

    def step(fn):
        return lambda: torch.autograd.grad(fn(x, w).sum(), (x, w))

    eager = step(lambda x, w: torch.nn.functional.rms_norm(x, (16,), w))
    return {"eager": eager, "compile": eager, "hetrain": step(rms_norm)}


def test_each_row_names_the_backend_it_timed_and_a_run_off_the_cpp_kernels_is_a_variant(monkeypatch, tmp_path,
                                                                                         capsys):
    case = Case("rms_norm", "8x16", "float32", tiny_rms_norm, 5 * 8 * 16 * 4)
    monkeypatch.setattr(bench_cpu, "discover", lambda kind: [case])
    monkeypatch.setattr(bench_cpu, "copy_bandwidth_gbs", lambda *args, **kwargs: 10.0)
    monkeypatch.setattr(bench_cpu, "interleaved_ms", once_each)
    monkeypatch.setattr(sys, "argv", ["bench_cpu", "--quick", "--out", str(tmp_path / "cpp")])
    bench_cpu.main()
    (path,) = (tmp_path / "cpp").glob("*.json")
    result = json.loads(path.read_text())
    assert path.name.endswith("-ops-cpu-quick.json")
    assert result["extension"] == "loaded" and result["backends"] == {"rms_norm": "cpu"}
    assert result["rows"][0]["backend"] == "cpu"
    # As HETRAIN_PREFER=torch, a pin or a missing hetrain._C would: the hetrain column runs torch's reference.
    monkeypatch.setattr(sys, "argv", ["bench_cpu", "--out", str(tmp_path / "torch")])
    with plugins.use_backend(rms_norm="torch"):
        bench_cpu.main()
    (path,) = (tmp_path / "torch").glob("*.json")
    assert path.name.endswith("-ops-cpu-backend-rms_norm-torch.json")  # never the day's -ops-cpu.json
    assert json.loads(path.read_text())["rows"][0]["backend"] == "torch"
    assert "sends the hetrain column to backend(s) torch, not the C++ kernels" in capsys.readouterr().out


@pytest.fixture
def layer_norm_and_rms_norm(monkeypatch):
    cases = [Case("layer_norm", "8x8", "float32", doubling, 512),
             Case("rms_norm", "8x16", "float32", tiny_rms_norm, 5 * 8 * 16 * 4)]
    monkeypatch.setattr(bench_cpu, "discover", lambda kind: cases)
    monkeypatch.setattr(bench_cpu, "copy_bandwidth_gbs", lambda *args, **kwargs: 10.0)
    monkeypatch.setattr(bench_cpu, "interleaved_ms", once_each)


def test_a_case_whose_backend_cannot_be_resolved_is_recorded_failed_and_the_others_run(layer_norm_and_rms_norm,
                                                                                       monkeypatch):
    # main refuses this pin before the run (benchmarks.cli.check_backend_settings); the run still copes with it.
    monkeypatch.setenv(plugins.ENV_PINS, "layer_norm=cuda")  # a backend that serves no CPU
    result = bench_cpu.run(quick=True)
    assert bench_cpu.variant_name(result) == "backend-layer_norm-cuda"  # the pin makes it a variant
    assert result["backends"] == {"layer_norm": "cuda", "rms_norm": "cpu"}
    assert [(row["op"], row.get("backend"), "error" in row) for row in result["rows"]] == [
        ("layer_norm", None, True), ("rms_norm", "cpu", False)]
    assert result["rows"][0]["error"].startswith("BackendError: hetrain: backend 'cuda' pinned for op 'layer_norm' "
                                                 "(by HETRAIN_BACKEND) does not serve device 'cpu'")


def test_runs_sending_different_ops_to_the_same_backend_keep_their_own_files(layer_norm_and_rms_norm, monkeypatch,
                                                                             tmp_path):
    monkeypatch.setattr(sys, "argv", ["bench_cpu", "--out", str(tmp_path)])
    for op in ("layer_norm", "rms_norm"):
        with plugins.use_backend(**{op: "torch"}):
            bench_cpu.main()
    assert sorted(path.name.partition("-ops-cpu-")[2] for path in tmp_path.glob("*.json")) == [
        "backend-layer_norm-torch.json", "backend-rms_norm-torch.json"]


def test_a_variant_names_its_op_backend_pairs_safely_and_many_by_a_stable_hash():
    assert bench_cpu.variant_name({"backends": {"rms_norm": "cpu", "ring_gather": None}}) is None
    assert bench_cpu.variant_name({"backends": {"rms_norm": "acme/v2", "layer_norm": "torch", "dropout": "cpu"}}) \
        == "backend-layer_norm-torch-rms_norm-acme_v2"
    every = dict.fromkeys(["bias_gelu", "conv_bn_relu_pool", "dropout", "dropout_add_layer_norm", "layer_norm",
                           "linear_cross_entropy", "rms_norm"], "torch")
    name = bench_cpu.variant_name({"backends": every})
    assert re.fullmatch(r"backend-torch-[0-9a-f]{8}", name)
    assert name == bench_cpu.variant_name({"backends": dict(reversed(every.items()))})
    assert name != bench_cpu.variant_name({"backends": {**every, "dropout": "cpu"}})
