"""The benchmark scripts' arguments, result file names and derived figures, checked without timing anything.

Every script's timing function is replaced: a flag that should be refused must be refused before any run,
and a variant run (quick, another allocator, a subset, another shape) must name its file after itself, so it
neither overwrites the day's full run nor becomes the source of RESULTS.md's tables.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import stat
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import DeviceType
from torch.autograd.profiler_util import FunctionEvent
from torch.nn.attention import SDPBackend, sdpa_kernel

from benchmarks import (
    bench_cpu,
    bench_embedding,
    bench_loader,
    bench_memory_overhead,
    bench_ops,
    bench_overhead,
    bench_train,
    profile_step,
    report,
    timing,
)
from benchmarks.cases import Case
from benchmarks.cli import check_device, failed_file, partial_file, save_complete, save_partial
from hetrain import plugins
from hetrain.cpu_memory import CpuMallocSetting
from hetrain.device_info import result_card


def run_main(module: ModuleType, argv: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", [module.__name__, *argv])
    module.main()


def never_runs(*args, **kwargs):
    raise AssertionError("the benchmark ran although its arguments should have been refused")


TIMED = {bench_ops: "run", bench_overhead: "run", profile_step: "profile", bench_loader: "run",
         bench_memory_overhead: "run", bench_train: "run", bench_cpu: "run", bench_embedding: "run"}
NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")


@pytest.mark.parametrize(("module", "argv", "message"), [
    (bench_ops, ["--device", "cpu", "--ops", "layer_norm,nosuch"], "--ops: no cases for 'nosuch'; the ops are "),
    (bench_ops, ["--device", "bogus"], "--device bogus: not a device; pass cpu or cuda"),
    (bench_ops, ["--device", "cpu", "--measure-s", "0"], "wants a number above 0, got 0"),
    (bench_overhead, ["--rounds", "0"], "--rounds: wants a whole number of at least 3, got 0"),
    (bench_overhead, ["--rounds", "2"], "--rounds: wants a whole number of at least 3, got 2"),  # its median: a mean
    (bench_overhead, ["--device", "meta"], "--device meta: the benchmarks run on cpu or cuda"),
    (profile_step, ["--steps", "0"], "--steps: wants a whole number of at least 1, got 0"),
    (profile_step, ["--attention-dropout", "-0.5"], "wants a probability p with 0 <= p < 1, got -0.5"),
    (bench_loader, ["--loop-steps", "-3"], "--loop-steps: wants a whole number of at least 0, got -3"),
    (bench_loader, ["--loop-steps", "3"], "0 skips the loop, else at least 5"),
    (bench_loader, ["--work-ms", "-1"], "--work-ms: wants a number above 0, got -1"),
    (bench_loader, ["--max-len", "512", "--max-tokens", "256"],
     "--max-tokens 256: below --max-len 512, so a full window fits in no batch; pass --max-tokens of at least 512"),
    (bench_memory_overhead, ["--threads", "0"], "--threads: wants a whole number of at least 1, got 0"),
    (bench_memory_overhead, ["--threads", "-3"], "got -3"),
    *[pytest.param(module, ["--device", device], f"--device {device}: no GPU in use; pass --device cpu", marks=NO_GPU)
      for module in (bench_ops, bench_overhead, profile_step, bench_train, bench_memory_overhead, bench_loader)
      for device in ("cuda", "cuda:1")],  # cuda:1 as README says: taken, then refused for the GPU it lacks
])
def test_arguments_a_run_cannot_use_are_refused_with_how_to_fix_them(module, argv, message, monkeypatch, capsys,
                                                                     tmp_path):
    monkeypatch.setattr(module, TIMED[module], never_runs)
    with pytest.raises(SystemExit) as exit_:
        run_main(module, [*argv, "--out", str(tmp_path)], monkeypatch)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert message in err, err
    if "--ops" in argv:
        assert "layer_norm" in err.split("the ops are ")[1]  # lists what may be named
    assert not list(tmp_path.glob("*.json"))


@pytest.mark.parametrize("module", [bench_cpu, bench_overhead, bench_embedding, bench_memory_overhead,
                                    profile_step, bench_loader])
def test_an_out_that_is_no_writable_directory_is_refused_before_the_run(module, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(module, TIMED[module], never_runs)
    afile = tmp_path / "afile"
    afile.write_text("")
    with pytest.raises(SystemExit) as exit_:
        run_main(module, ["--out", str(afile)], monkeypatch)
    assert exit_.value.code == 2
    assert f"--out: {afile}: not a writable directory (a file is there)" in capsys.readouterr().err


def test_an_out_directory_that_does_not_exist_yet_is_created(tmp_path):
    from benchmarks.cli import out_dir

    nested = tmp_path / "a" / "b"
    assert out_dir(str(nested)) == nested and nested.is_dir()


def failing_rms_norm_cases(device: str) -> dict:
    """layer_norm, rms_norm and dropout of the real cases, rms_norm's fused call raising as a kernel error would."""
    impls = ORIGINAL_OVERHEAD_CASES(device)

    def kernel_error():
        raise RuntimeError("simulated kernel failure\nsecond line of its message")

    impls["rms_norm"]["hetrain"] = kernel_error
    return {op: impls[op] for op in ("layer_norm", "rms_norm", "dropout")}


ORIGINAL_OVERHEAD_CASES = bench_overhead.cases


def once_each(impls, rounds: int, **kwargs) -> dict[str, float]:
    """interleaved_ms without the timing: each implementation called once, each "taking" 1 ms."""
    for fn in impls.values():
        fn()
    return dict.fromkeys(impls, 1.0)


def test_an_overhead_op_that_raises_is_recorded_the_others_run_on_and_the_run_fails(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(bench_overhead, "cases", failing_rms_norm_cases)
    monkeypatch.setattr(bench_overhead, "interleaved_ms", once_each)
    with pytest.raises(SystemExit) as exit_:
        run_main(bench_overhead, ["--device", "cpu", "--rounds", "3", "--out", str(tmp_path)], monkeypatch)
    (path,) = tmp_path.glob("*-overhead-rounds3-failed.json")  # a variant: named after its rounds, and failed
    rows = json.loads(path.read_text())["rows"]
    assert [r["op"] for r in rows] == ["layer_norm", "rms_norm", "dropout"]
    assert rows[1] == {"op": "rms_norm", "error": "RuntimeError: simulated kernel failure"}
    assert rows[0]["us"]["hetrain"] == rows[2]["us"]["hetrain"] == 1000.0
    assert "1 of 3 cases failed (rms_norm: RuntimeError: simulated kernel failure)" in str(exit_.value.code)
    out = capsys.readouterr()
    assert "rms_norm                 FAILED: RuntimeError" in out.err
    assert "| rms_norm | failed: RuntimeError: simulated kernel failure | | | |" in out.out


def cpu_ops_result(**_) -> dict:
    return {"date": "2030-01-02", "copy_gbs": 10.0, "copy_mib": 64, "rows": []}


MEMORY = {"date": "2030-01-02", "device": "cpu", "torch": "t", "shape": {}, "timed_steps": {}, "target_met": True,
          "median_step_ms": {"off": 1.0, "on": 1.0}, "step_time_ratio": 1.0, "paired_step_time_ratio": 1.0,
          "profiler_hooks_ms_per_step": 0.0, "profiler_hooks_share": 0.0, "median_ms_per_hook": {}}


@pytest.mark.parametrize(("module", "timed", "result", "argv", "name"), [
    (bench_cpu, "run", cpu_ops_result(), ["--quick"], "2030-01-02-ops-cpu-quick.json"),
    (bench_cpu, "run", cpu_ops_result(), ["--cpu-malloc", "system"], "2030-01-02-ops-cpu-system-malloc.json"),
    (bench_cpu, "run", cpu_ops_result(), [], "2030-01-02-ops-cpu.json"),
    (bench_embedding, "run", {"date": "2030-01-02"}, ["--quick"], "2030-01-02-embedding-cpu-quick.json"),
    (bench_train, "run", {"date": "2030-01-02", "rows": [], "placement": [], "target_met": None},
     ["--quick", "--device", "cpu"], "2030-01-02-cpu-train-quick.json"),
    (bench_train, "run", {"date": "2030-01-02", "rows": [], "placement": [], "target_met": None},
     ["--short", "--device", "cpu", "--cpu-malloc", "system"], "2030-01-02-cpu-train-short-system-malloc.json"),
    (bench_memory_overhead, "run", MEMORY, ["--quick", "--device", "cpu"], "2030-01-02-memory-overhead-cpu-quick.json"),
    (profile_step, "profile", {"step_ms": 1.0, "kinds": {}, "top_other": []}, ["--device", "cpu", "--shape", "base"],
     "-cpu-step-profile-base.json"),
    (profile_step, "profile", {"step_ms": 1.0, "kinds": {}, "top_other": []}, ["--device", "cpu"],
     "-cpu-step-profile.json"),
    (profile_step, "profile", {"step_ms": 1.0, "kinds": {}, "top_other": []}, ["--device", "cpu", "--steps", "1"],
     "-cpu-step-profile-steps1.json"),  # gpu-check --quick's: a single step is not the day's profile
    (bench_ops, "run", {**cpu_ops_result(), "device": "cpu"}, ["--device", "cpu", "--quick"],
     "2030-01-02-cpu-ops-quick.json"),
    (bench_ops, "run", {**cpu_ops_result(), "device": "cpu"}, ["--device", "cpu", "--ops", "rms_norm,layer_norm"],
     "2030-01-02-cpu-ops-subset-layer_norm-rms_norm.json"),
])
def test_a_variant_run_names_its_file_after_the_variant(module, timed, result, argv, name, monkeypatch, tmp_path):
    monkeypatch.setattr(module, timed, lambda *args, **kwargs: result)
    run_main(module, [*argv, "--out", str(tmp_path)], monkeypatch)
    (path,) = tmp_path.glob("*.json")
    assert path.name.endswith(name), path.name


@pytest.mark.parametrize(("module", "argv", "name"), [
    (bench_loader, [], "-loader-{card}.json"),
    (bench_loader, ["--text-samples", "0"], "-loader-{card}-text-samples0.json"),  # gpu-check --quick's
    (bench_loader, ["--workers", "0", "2", "--work-ms", "2.5"], "-loader-{card}-workers0-2-work-ms2.5.json"),
    (bench_overhead, ["--device", "cpu"], "-cpu-overhead.json"),
    (bench_overhead, ["--device", "cpu", "--rounds", "3"], "-cpu-overhead-rounds3.json"),  # gpu-check --quick's
])
def test_a_run_saving_as_it_goes_names_its_file_after_its_variant(module, argv, name, monkeypatch, tmp_path):
    def run(*args):  # each section saved through the last argument, as these runs save
        args[-1]({"rows": []})
        return {"rows": []}

    monkeypatch.setattr(module, "run", run)
    run_main(module, [*argv, "--out", str(tmp_path)], monkeypatch)
    (path,) = tmp_path.glob("*.json")
    assert path.name.endswith(name.format(card=result_card("cuda" if torch.cuda.is_available() else "cpu"))), path.name


GPU_RESULT = {"date": "2030-01-01", "device": "NVIDIA H200", "torch": "t", "cuda": "12", "copy_gbs": 4000.0,
              "rows": [{"op": "layer_norm", "shape": "16384x768", "dtype": "bfloat16", "copy_fraction": 0.5,
                        "ms": {"eager": 0.4, "hetrain": 0.2}, "back_to_back_ms": {}, "peak_mib": {"eager": 1.0,
                        "hetrain": 1.0}, "graph_ms": {"eager": "n/a", "hetrain": "n/a"}}]}


def test_a_subset_or_quick_op_run_never_becomes_the_gpu_tables_source(monkeypatch, tmp_path, capsys):
    full = tmp_path / "2030-01-01-nvidia-h200-ops.json"
    full.write_text(json.dumps(GPU_RESULT))
    monkeypatch.setattr(bench_ops, "result_card", lambda device: "nvidia-h200")  # as a run on that card names it
    later = {**GPU_RESULT, "date": "2030-01-02", "rows": []}
    monkeypatch.setattr(bench_ops, "run", lambda *args, **kwargs: later)
    for argv in (["--ops", "layer_norm"], ["--quick"]):
        run_main(bench_ops, [*argv, "--device", "cpu", "--out", str(tmp_path)], monkeypatch)
        assert "not a source of RESULTS.md's GPU table" in capsys.readouterr().out
    assert len(list(tmp_path.glob("*.json"))) == 3 and report.gpu_source(tmp_path) == full
    monkeypatch.setattr(report, "RESULTS_MD", tmp_path / "RESULTS.md")
    monkeypatch.setattr(report, "speedup_chart", lambda *args, **kwargs: None)
    report.write_gpu_results_md(tmp_path)
    assert "| layer_norm | 16384x768 | bfloat16 | hetrain | 0.200 |" in (tmp_path / "RESULTS.md").read_text()


def kernel_error():
    raise RuntimeError("simulated kernel failure\nsecond line of its message")


def fake_op_cases(*args, **kwargs) -> list[Case]:
    """Three cases on tiny tensors: the second's C++ column raises when called, the third's setup raises."""
    x = torch.randn(4, 4, requires_grad=True)
    step = lambda: torch.autograd.grad((x * 2).sum(), x)  # noqa: E731
    fine = {"eager": step, "compile": step, "hetrain": step}

    def no_setup():
        raise ValueError("no such kernel")

    return [Case("ok_op", "4x4", "float32", lambda: fine, 64),
            Case("cpp_op", "4x4", "float32", lambda: {**fine, "hetrain_cuda": kernel_error}, 64),
            Case("setup_op", "4x4", "float32", no_setup, 64)]


def test_an_op_case_that_raises_is_recorded_the_others_run_on_and_the_run_fails(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(bench_ops, "discover", fake_op_cases)
    monkeypatch.setattr(bench_ops, "copy_bandwidth_gbs", lambda *args, **kwargs: 1.0)
    monkeypatch.setattr(bench_ops, "interleaved_ms", once_each)
    monkeypatch.setattr(bench_ops, "back_to_back_ms", lambda fn, device, budget_s: fn() and 1.0)
    with pytest.raises(SystemExit) as exit_:
        run_main(bench_ops, ["--device", "cpu", "--quick", "--out", str(tmp_path)], monkeypatch)
    (path,) = tmp_path.glob("*-cpu-ops-quick-failed.json")
    rows = json.loads(path.read_text())["rows"]
    assert [r["op"] for r in rows] == ["ok_op", "cpp_op", "setup_op"]
    assert rows[0]["ms"]["hetrain"] == 1.0
    assert rows[1] == {"op": "cpp_op", "shape": "4x4", "dtype": "float32",
                       "error": "RuntimeError: simulated kernel failure"}
    assert rows[2]["error"] == "ValueError: no such kernel"
    assert "2 of 3 cases failed (cpp_op 4x4 float32: RuntimeError: simulated kernel failure; setup_op" in str(
        exit_.value.code)
    assert "cpp_op 4x4 float32: FAILED: RuntimeError: simulated kernel failure" in capsys.readouterr().err


def test_the_gpu_table_shows_a_failed_op_case_without_its_times():
    failed = {"op": "rms_norm", "shape": "16384x768", "dtype": "bfloat16", "error": "RuntimeError: a | b"}
    text = report.gpu_table({**GPU_RESULT, "rows": [*GPU_RESULT["rows"], failed]})
    assert "| layer_norm | 16384x768 | bfloat16 | hetrain | 0.200 |" in text
    assert "| rms_norm | 16384x768 | bfloat16 | failed: RuntimeError: a \\| b | | | | | | |" in text


def test_quick_honours_an_explicit_measure_s_and_falls_back_to_its_own_otherwise(monkeypatch, tmp_path):
    monkeypatch.setattr(bench_ops, "discover", fake_op_cases)
    monkeypatch.setattr(bench_ops, "copy_bandwidth_gbs", lambda *args, **kwargs: 1.0)
    budgets = []
    monkeypatch.setattr(bench_ops, "interleaved_ms", lambda impls, rounds, **kw: budgets.append(kw["budget_s"])
                        or dict.fromkeys(impls, 1.0))
    monkeypatch.setattr(bench_ops, "back_to_back_ms", lambda fn, device, budget_s: 1.0)
    monkeypatch.setattr(bench_ops, "chosen_ops", lambda *args: {"ok_op"})  # a subset run: RESULTS.md left alone
    for i, (argv, expected) in enumerate(((["--quick", "--measure-s", "1.5"], 1.5),
                                          (["--quick"], bench_ops.QUICK_MEASURE_S),
                                          (["--measure-s", "0.7"], 0.7), ([], 2.0))):  # 2.0: the help's default
        budgets.clear()
        run_main(bench_ops, [*argv, "--device", "cpu", "--out", str(tmp_path / str(i))], monkeypatch)
        (path,) = (tmp_path / str(i)).glob("*.json")
        assert budgets == [expected] and json.loads(path.read_text())["measure_s"] == expected, argv


def test_an_op_run_records_its_triton_and_liger_kernel_versions(monkeypatch):
    monkeypatch.setattr(bench_ops, "discover", lambda *args, **kwargs: [])
    monkeypatch.setattr(bench_ops, "copy_bandwidth_gbs", lambda *args, **kwargs: 1.0)
    result = bench_ops.run("cpu", quick=True)
    assert result["triton"] == bench_ops.package_version("triton")
    assert result["liger_kernel"] == bench_ops.package_version("liger-kernel")
    assert bench_ops.package_version("pytest") == pytest.__version__
    assert bench_ops.package_version("no-such-distribution-hetrain") is None


class Stop(Exception):
    """Ends a benchmark's main where its timing would begin."""


@pytest.mark.parametrize("module", [bench_ops, bench_overhead, profile_step, bench_train, bench_memory_overhead,
                                    bench_loader])
def test_a_benchmark_makes_its_device_current_before_it_runs(module, monkeypatch, tmp_path):
    made = []
    monkeypatch.setattr(module, "make_current", made.append)

    def timed(*args, **kwargs):
        assert made == ["cpu"], "the run began before its device was made current"
        raise Stop

    monkeypatch.setattr(module, TIMED[module], timed)
    with pytest.raises(Stop):
        run_main(module, ["--device", "cpu", "--out", str(tmp_path)], monkeypatch)


def test_making_the_cpu_or_a_bare_cuda_current_touches_no_gpu():
    from benchmarks.cli import make_current

    initialised = torch.cuda.is_initialized()
    make_current("cpu")
    if not torch.cuda.is_available():
        make_current("cuda")  # the current device already: nothing to set, so no error either without a GPU
    assert torch.cuda.is_initialized() == initialised


@pytest.mark.parametrize(("module", "device_arg"), [(bench_ops, 0), (bench_overhead, 0), (profile_step, 1),
                                                   (bench_train, 0), (bench_memory_overhead, 0), (bench_loader, 7)])
def test_an_indexed_cpu_device_runs_as_the_cpu(module, device_arg, monkeypatch, tmp_path):
    """--device cpu:0 was taken as it was written, and compared with "cpu" it was no CPU: bench_train recorded a TF32
    row and ran 16-mixed's GradScaler on the CPU, bench_memory_overhead crashed in Lightning."""
    made, timed_on = [], []
    monkeypatch.setattr(module, "make_current", made.append)

    def timed(*args, **kwargs):
        timed_on.append(args[device_arg])
        raise Stop

    monkeypatch.setattr(module, TIMED[module], timed)
    with pytest.raises(Stop):
        run_main(module, ["--device", "cpu:0", "--out", str(tmp_path)], monkeypatch)
    assert made == timed_on == ["cpu"]


def test_a_benchmark_compares_the_devices_type_not_its_name():
    parser = argparse.ArgumentParser()
    assert check_device(parser, "cpu:0") == "cpu"
    tf32 = next(m for m in bench_train.MODES if m.name == "tf32")
    assert bench_train.skip_reason(tf32, "cpu:0", None) == bench_train.skip_reason(tf32, "cpu", None) is not None


PLUGIN_SETTINGS = [
    ("HETRAIN_PREFER", "nosuch", "HETRAIN_PREFER='nosuch': a preferred backend 'nosuch' is registered for no op"),
    ("HETRAIN_BACKEND", "layer_norm:torch", "cannot read HETRAIN_BACKEND='layer_norm:torch': expected 'op=backend"),
    ("HETRAIN_BACKEND", "nosuch=torch", "a pin names op 'nosuch', which no backend registers"),
    ("HETRAIN_STRICT", "2", "cannot read HETRAIN_STRICT='2'"),
    # Each run here is on the CPU: the first call of every layer_norm case failed, and bench_train wrote its file.
    ("HETRAIN_BACKEND", "layer_norm=cuda", "backend 'cuda' pinned for op 'layer_norm' (by HETRAIN_BACKEND) does not "
                                           "serve device 'cpu' (it serves cuda)"),
    ("HETRAIN_BACKEND", "layer_norm=no_driver", "backend 'no_driver' pinned for op 'layer_norm' (by HETRAIN_BACKEND) "
                                                "is unavailable: no driver on this machine"),
]


@pytest.fixture
def unavailable_backend():
    """A CPU backend of layer_norm that cannot run here, as the CUDA ones cannot on a machine without a driver."""
    plugins.register("layer_norm", "no_driver", ("cpu",), None, priority=-1,
                     available=lambda: "no driver on this machine")
    yield
    plugins.unregister("layer_norm", "no_driver")


@pytest.mark.parametrize("module", [bench_cpu, bench_ops, bench_overhead, bench_train, bench_memory_overhead,
                                    profile_step, bench_embedding])
@pytest.mark.parametrize(("variable", "value", "message"), PLUGIN_SETTINGS)
def test_a_backend_setting_the_plugins_cannot_use_is_refused_before_the_run(module, variable, value, message,
                                                                             unavailable_backend, monkeypatch, capsys,
                                                                             tmp_path):
    """HETRAIN_PREFER=nosuch failed every case of bench_cpu, which still wrote the day's result (and RESULTS.md's
    table from it); a malformed HETRAIN_BACKEND ended in a traceback."""
    monkeypatch.setenv(variable, value)
    monkeypatch.setattr(module, TIMED[module], never_runs)
    argv = [] if module in (bench_cpu, bench_embedding) else ["--device", "cpu"]
    if module is bench_embedding and value.startswith("layer_norm="):
        pytest.skip("bench_embedding calls no layer_norm (test_a_pin_of_an_op_the_run_never_calls_is_not_refused)")
    with pytest.raises(SystemExit) as exit_:
        run_main(module, [*argv, "--out", str(tmp_path)], monkeypatch)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err
    assert not list(tmp_path.glob("*.json"))


class RunReached(Exception):
    """Raised in place of a benchmark's run: the arguments were accepted."""


def reaches_the_run(*args, **kwargs):
    raise RunReached


@pytest.mark.parametrize(("module", "argv"), [(bench_embedding, []), (bench_ops, ["--device", "cpu",
                                                                                  "--ops", "rms_norm"])])
def test_a_pin_of_an_op_the_run_never_calls_is_not_refused(module, argv, monkeypatch, tmp_path):
    """Every registered op's pin was checked: bench_embedding (no layer_norm) and an rms_norm-only bench_ops refused a
    layer_norm pin to a backend the CPU has not, and gpu-check failed its bench-embedding step under it."""
    monkeypatch.setenv("HETRAIN_BACKEND", "layer_norm=cuda")
    monkeypatch.setattr(module, TIMED[module], reaches_the_run)
    with pytest.raises(RunReached):
        run_main(module, [*argv, "--out", str(tmp_path)], monkeypatch)


def test_a_gpu_op_run_with_a_failed_case_leaves_results_md_alone(monkeypatch, tmp_path, capsys):
    failed = {**GPU_RESULT, "rows": [*GPU_RESULT["rows"], {"op": "rms_norm", "shape": "16384x768",
                                                            "dtype": "bfloat16", "error": "RuntimeError: launch"}]}
    monkeypatch.setattr(bench_ops, "check_device", lambda parser, device: "cuda")  # a full run on a GPU
    monkeypatch.setattr(bench_ops, "make_current", lambda device: None)
    monkeypatch.setattr(bench_ops, "result_card", lambda device: "nvidia-h200")
    monkeypatch.setattr(bench_ops, "RESULTS", tmp_path)
    monkeypatch.setattr(bench_ops, "run", lambda *args, **kwargs: failed)
    monkeypatch.setattr(report, "write_gpu_results_md", never_runs)
    with pytest.raises(SystemExit) as exit_:
        run_main(bench_ops, ["--out", str(tmp_path)], monkeypatch)
    assert "1 of 2 cases failed (rms_norm 16384x768 bfloat16: RuntimeError: launch)" in str(exit_.value.code)
    assert "a run with failed cases: RESULTS.md's GPU table" in capsys.readouterr().out


def test_a_cpu_timing_never_waits_for_a_gpu():
    """On a GPU host every CPU timing (bench_cpu, bench_embedding, bench_overhead --device cpu) waited for the whole
    GPU after each call: the wait was chosen by torch.cuda.is_available(), not by the device timed."""
    assert timing.synchronizer("cpu") is timing.synchronizer("cpu:0") is timing.no_sync
    on_gpu = timing.synchronizer("cuda:1")  # built, not called: no GPU needed
    assert on_gpu.func is timing.synchronize_each and on_gpu.args == ([torch.device("cuda:1")],)


def test_a_timing_over_several_devices_waits_for_each_of_their_gpus():
    """bench_train timed a placement plan over cuda:0 and cuda:1 waiting for the current GPU alone (cuda:1 with
    --device cuda:1): a step was taken to end when one of its devices did."""
    plan = [torch.device("cpu"), torch.device("cuda:0"), "cuda:1", torch.device("cuda", 1)]
    assert timing.cuda_devices(plan) == [torch.device("cuda:0"), torch.device("cuda:1")]
    assert timing.synchronizer(plan).args == ([torch.device("cuda:0"), torch.device("cuda:1")],)
    assert timing.synchronizer({"cpu"}) is timing.no_sync


def doubling_impls() -> dict:
    return {"eager": lambda: 2 * 2, "compile": lambda: 2 * 2, "hetrain": lambda: 2 * 2}


def test_each_timing_waits_as_the_device_it_times_needs(monkeypatch):
    waited_for = []

    def synchronizer(device):
        waited_for.append(device)
        return timing.no_sync

    monkeypatch.setattr(timing, "synchronizer", synchronizer)
    timing.median_ms(lambda: None, device="cpu", warmup=1, min_reps=1, max_reps=1)
    timing.back_to_back_ms(lambda: None, device="cuda:1", budget_s=1e-3, rounds=1)
    timing.copy_bandwidth_gbs("cpu", megabytes=1)
    assert waited_for == ["cpu", "cuda:1", "cpu"]


def test_the_cpu_benchmarks_time_on_the_cpu(monkeypatch):
    devices = []

    def interleaved(impls, *, device, **kwargs):
        devices.append(device)
        return dict.fromkeys(impls, 1.0)

    monkeypatch.setattr(bench_cpu, "discover", lambda kind: [Case("op", "8", "float32", doubling_impls, 8)])
    monkeypatch.setattr(bench_cpu, "copy_bandwidth_gbs", lambda *args, **kwargs: 1.0)
    monkeypatch.setattr(bench_cpu, "interleaved_ms", interleaved)
    bench_cpu.run(quick=True)
    monkeypatch.setattr(bench_embedding, "cpu_memory", host_memory_giving(KEPT, []))
    monkeypatch.setattr(bench_embedding, "table_step", lambda *args: None)
    monkeypatch.setattr(bench_embedding, "median_ms", lambda step, *, device, **kwargs: devices.append(device) or 1.0)
    bench_embedding.run(quick=True)
    assert len(devices) > 1 and set(devices) == {"cpu"}


@pytest.mark.parametrize(("module", "timed", "result", "argv", "name"), [
    (bench_train, "run", {"date": "2030-01-02", "rows": [], "placement": [], "target_met": None}, ["--device", "cpu"],
     "2030-01-02-nvidia-h200-train.json"),
    (profile_step, "profile", {"step_ms": 1.0, "kinds": {}, "top_other": []}, ["--device", "cpu"],
     "-nvidia-h200-step-profile.json"),
    (bench_loader, "run", None, [], "-loader-nvidia-h200.json"),
])
def test_a_run_names_its_file_after_the_card_so_two_cards_keep_their_own(module, timed, result, argv, name,
                                                                          monkeypatch, tmp_path):
    monkeypatch.setattr(module, "result_card", lambda device: "nvidia-h200")  # as a run on that card names it

    def saving_run(*args):  # bench_loader saves each section through its last argument
        args[-1]({"rows": []})
        return {"rows": []}

    monkeypatch.setattr(module, timed, saving_run if result is None else lambda *args, **kwargs: result)
    run_main(module, [*argv, "--out", str(tmp_path)], monkeypatch)
    (path,) = tmp_path.glob("*.json")
    assert path.name.endswith(name), path.name


def test_the_cpu_table_takes_the_newest_full_run_never_a_variant(monkeypatch, tmp_path):
    full = {**cpu_ops_result(), "date": "2030-01-01", "device": "cpu (x, 2 threads)", "torch": "t"}
    (tmp_path / "2030-01-01-ops-cpu.json").write_text(json.dumps(full))
    for variant in ("quick", "system-malloc"):
        (tmp_path / f"2030-01-02-ops-cpu-{variant}.json").write_text(json.dumps({**full, "date": "2030-01-02"}))
    assert report.latest(tmp_path, "ops-cpu")["date"] == "2030-01-01"


CONV = {"op": "conv_bn_relu_pool", "shape": "8x64x56x56 conv3s1->64 pool2s2", "dtype": "float32",
        "speedup_vs_eager": 1.0, "speedup_vs_compile": 1.0}


def test_cpu_table_names_the_dram_copy_and_leaves_an_unresolved_epilogue_out():
    resolved = {**CONV, "ms": {"eager": 5.0, "compile": 4.0, "hetrain": 3.0, "conv": 2.0}, "copy_fraction": 0.5}
    within_noise = {**CONV, "ms": {"eager": 5.0, "compile": 4.0, "hetrain": 2.0, "conv": 2.0}, "copy_fraction": None}
    text = report.cpu_table({"device": "cpu", "torch": "t", "date": "d", "copy_gbs": 10.0, "copy_mib": 256,
                             "rows": [resolved, within_noise]})
    assert "| % of DRAM copy |" in text and "DRAM copy bandwidth 10.0 GB/s (a 256 MiB copy" in text
    assert "can exceed 100%" in text
    assert "| 50% |" in text and "| n/a |" in text
    assert "hetrain 1.00 ms (3.00x vs eager, 2.00x vs compile)." in text
    assert "hetrain 0.00 ms (hetrain's is not above 5% of the convolution's time, below what this run resolves" in text
    assert "of DRAM copy" in report.cpu_row_text(within_noise)


def fake_conv_case(*args, **kwargs) -> list[Case]:
    impls = dict.fromkeys(("eager", "compile", "hetrain", "conv"))  # never called: the timings are given
    return [Case("conv_bn_relu_pool", "64x3x224x224 conv7s2->64 pool3s2", "float32", lambda: impls, 10**9)]


def test_cpu_bench_sets_a_conv_blocks_epilogue_bytes_against_the_epilogues_time(monkeypatch):
    monkeypatch.setattr(bench_cpu, "discover", fake_conv_case)
    monkeypatch.setattr(bench_cpu, "copy_bandwidth_gbs", lambda *args, **kwargs: 10.0)
    times = {"eager": 600.0, "compile": 500.0, "hetrain": 400.0, "conv": 300.0}  # epilogue: 100 ms
    monkeypatch.setattr(bench_cpu, "interleaved_ms", lambda *args, **kwargs: dict(times))
    (row,) = bench_cpu.run(quick=True, cpu_malloc="system")["rows"]
    assert row["gbs"] == pytest.approx(10.0) and row["copy_fraction"] == pytest.approx(1.0)  # 1 GB in 0.1 s
    times["hetrain"] = 301.0  # within noise of the convolution: no bandwidth, no division by ~0
    (row,) = bench_cpu.run(quick=True, cpu_malloc="system")["rows"]
    assert row["gbs"] is None and row["copy_fraction"] is None


def test_quick_op_bench_takes_turns_over_three_rounds_and_records_what_it_measured(monkeypatch):
    seen = []

    def timed(impls, rounds: int, **kwargs):
        seen.append((rounds, kwargs["budget_s"]))
        return {"eager": 600.0, "compile": 500.0, "hetrain": 400.0, "conv": 300.0}

    monkeypatch.setattr(bench_ops, "discover", fake_conv_case)
    monkeypatch.setattr(bench_ops, "copy_bandwidth_gbs", lambda *args, **kwargs: 10.0)
    monkeypatch.setattr(bench_ops, "interleaved_ms", timed)
    monkeypatch.setattr(bench_ops, "back_to_back_ms", lambda fn, device, budget_s: 1.0)
    result = bench_ops.run("cpu", quick=True)
    assert seen == [(3, bench_ops.QUICK_MEASURE_S)] and result["measure_s"] == bench_ops.QUICK_MEASURE_S
    assert result["device"].startswith("cpu (") and "threads" in result["device"]  # the model, not just "cpu"
    conv = result["rows"][0]
    assert conv["copy_fraction"] == pytest.approx(1.0)  # on the epilogue's 100 ms
    short = {**conv, "shape": "256x768"}
    assert [line.index("float32") for line in map(report.gpu_row_text, (conv, short))] == [58, 58]  # one column


def test_an_op_bench_timing_runs_for_its_measure_s_however_fast_the_op(monkeypatch):
    from benchmarks import timing

    clock = {"s": 0.0, "calls": 0}  # a clock each call moves on 1 ms: the call count, not the machine, decides

    def one_ms_op():
        clock["s"] += 1e-3
        clock["calls"] += 1

    monkeypatch.setattr(timing, "time", SimpleNamespace(perf_counter=lambda: clock["s"]))
    monkeypatch.setattr(bench_ops, "discover", lambda *args, **kwargs: [
        Case("fake", "1ms", "float32", lambda: {"hetrain": one_ms_op}, 1)])
    monkeypatch.setattr(bench_ops, "copy_bandwidth_gbs", lambda *args, **kwargs: 1.0)
    monkeypatch.setattr(bench_ops, "back_to_back_ms", lambda fn, device, budget_s: 1.0)
    result = bench_ops.run("cpu", quick=False, measure_s=2.0)
    assert result["measure_s"] == 2.0 and clock["calls"] >= 2000 + 3  # the 2 s budget after 3 warm-up calls


def test_interleaved_rounds_take_turns_and_their_median_leaves_one_slow_round_out(monkeypatch):
    from benchmarks import timing

    calls = []
    slow_round = iter([1.0, 2.0, 500.0, 2.0, 1.0, 2.0])  # a's second round hit a slow spell

    def fake_median(fn, **kwargs):
        calls.append(fn)
        return next(slow_round)

    monkeypatch.setattr(timing, "median_ms", fake_median)
    assert timing.interleaved_ms({"a": "a", "b": "b"}, rounds=3, min_reps=1, budget_s=1.0,
                                 device="cpu") == {"a": 1.0, "b": 2.0}
    assert calls == ["a", "b"] * 3


def host_memory_giving(keep: CpuMallocSetting, order: list[str]):
    """cpu_memory.host_memory as a machine gives it whose "keep" setting comes out as ``keep``."""

    @contextlib.contextmanager
    def host_memory(allocator):
        order.append(allocator)
        yield keep if allocator == "keep" else CpuMallocSetting(False, "system (as configured)")

    return SimpleNamespace(host_memory=host_memory)


KEPT = CpuMallocSetting(True, "keep (freed blocks of 32 MiB or more reused, up to 1 GiB kept)")


def test_quick_embedding_bench_runs_two_rounds_each_allocator_first_once(monkeypatch):
    order = []
    monkeypatch.setattr(bench_embedding, "cpu_memory", host_memory_giving(KEPT, order))
    monkeypatch.setattr(bench_embedding, "table_step", lambda *args: None)
    monkeypatch.setattr(bench_embedding, "median_ms", lambda *args, **kwargs: 1.0)
    bench_embedding.run(quick=True)
    # Each applied once to record its setting, then per batch shape.
    assert order == ["system", "keep"] + ["system", "keep", "keep", "system"] * 2


def test_an_embedding_run_records_each_allocators_setting_and_saves_each_batch_as_it_ends(monkeypatch):
    monkeypatch.setattr(bench_embedding, "cpu_memory", host_memory_giving(KEPT, []))
    monkeypatch.setattr(bench_embedding, "table_step", lambda *args: None)
    monkeypatch.setattr(bench_embedding, "median_ms", lambda *args, **kwargs: 1.0)
    saved = []
    result = bench_embedding.run(quick=True, save=lambda r: saved.append(json.loads(json.dumps(r))))
    assert result["allocator_settings"] == {
        "system": {"description": "system (as configured)", "applied": False},
        "keep": {"description": KEPT.description, "applied": True}}
    assert [[row["ids"] for row in s["rows"]] for s in saved] == [[[32, 128]], [[32, 128], [32, 512]]]


def test_an_embedding_run_whose_kept_blocks_are_not_applied_is_refused_before_it_times(monkeypatch):
    """Without hetrain._C the "keep" column ran on torch's allocator: ratios of torch's allocator to itself."""
    absent = CpuMallocSetting(False, "system (hetrain's CPU allocator is absent: hetrain._C is not built)")
    monkeypatch.setattr(bench_embedding, "cpu_memory", host_memory_giving(absent, []))
    monkeypatch.setattr(bench_embedding, "table_step", never_runs)
    with pytest.raises(SystemExit) as exit_:
        bench_embedding.run(quick=True)
    assert "hetrain's kept host blocks are not in use here" in str(exit_.value.code)
    assert absent.description in str(exit_.value.code)


def test_a_short_runs_skip_reason_names_short():
    compile_mode = next(m for m in bench_train.MODES if m.name == "bf16-compile")
    reason = bench_train.skip_reason(compile_mode, "cpu", "--short")
    assert "--short" in reason and "--quick" not in reason
    assert bench_train.skip_reason(compile_mode, "cpu", None) is None


def test_a_negative_data_wait_is_shown_as_measured_and_marked_as_noise():
    assert bench_loader.data_wait_text(-0.012) == "data wait -1.2% (negative: faster than compute alone, within noise)"
    assert bench_loader.data_wait_text(0.25) == "data wait 25.0%"


def event(name: str, parent=None, seq: int = -1, start: int = 0, node=None):
    """A profiler event as profile_step reads it: name, parent op, sequence number, thread, start time."""
    return SimpleNamespace(name=name, key=name, cpu_parent=parent, sequence_nr=seq, thread=1, fwd_thread=node,
                           time_range=SimpleNamespace(start=start))


def test_decomposed_attentions_pieces_count_as_attention_forward_and_backward():
    sdpa = event("aten::scaled_dot_product_attention", seq=10, start=1)
    softmax = event("aten::_softmax", event("aten::_safe_softmax", sdpa, seq=11, start=2), seq=11, start=3)
    bernoulli = event("aten::bernoulli_", event("aten::dropout", sdpa, seq=12, start=4), seq=12, start=5)
    outside = event("aten::mul", seq=13, start=6)  # after attention: the residual's scaling, say
    node = event("autograd::engine::evaluate_function: SafeSoftmaxBackward0", seq=11, start=9, node=1)
    softmax_bwd = event("aten::_softmax_backward_data", event("SafeSoftmaxBackward0", node), start=10)
    other_node = event("autograd::engine::evaluate_function: MulBackward0", seq=13, start=11, node=1)
    mul_bwd = event("aten::mul", event("MulBackward0", other_node), start=12)
    events = [sdpa, softmax.cpu_parent, softmax, bernoulli.cpu_parent, bernoulli, outside, node, softmax_bwd,
              other_node, mul_bwd]
    nodes = profile_step.attention_nodes(events)
    assert nodes == {(1, 10), (1, 11), (1, 12)}
    kinds = {e.name: profile_step.event_kind(e, nodes) for e in (softmax, bernoulli, softmax_bwd)}
    assert kinds == {"aten::_softmax": "attention", "aten::bernoulli_": "attention",
                     "aten::_softmax_backward_data": "attention"}
    assert profile_step.event_kind(outside, nodes) == "other" and profile_step.event_kind(mul_bwd, nodes) == "other"


def test_a_stage_range_counts_as_stage_overhead_not_as_a_fused_op():
    kinds = {name: profile_step.event_kind(event(name), set()) for name in (
        "hetrain::stage encoder.0", "hetrain_C::layer_norm_fwd", "hetrain::layer_norm.forward[cpu]",
        "torch::autograd::CppNode<hetrain::fused::LayerNorm>")}
    assert kinds == {"hetrain::stage encoder.0": "stage overhead", "hetrain_C::layer_norm_fwd": "hetrain fused",
                     "hetrain::layer_norm.forward[cpu]": "hetrain fused",
                     "torch::autograd::CppNode<hetrain::fused::LayerNorm>": "hetrain fused"}


def profiled(event_id: int, name: str, start_us: int, end_us: int, device_type: DeviceType = DeviceType.CPU):
    """A profiler event built as torch's kineto parser builds it from a CUDA trace."""
    return FunctionEvent(id=event_id, name=name, thread=1, start_us=start_us, end_us=end_us, fwd_thread=1,
                         input_shapes=[], stack=[], scope=0, use_device="cuda", cpu_memory_usage=0,
                         device_memory_usage=0, sequence_nr=-1, device_type=device_type, device_index=0)


def test_a_cuda_kernel_counts_once_under_the_op_that_launched_it():
    mm, ln = profiled(1, "aten::mm", 0, 10), profiled(3, "hetrain::layer_norm", 20, 30)
    gemm = profiled(2, "nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NNT", 10, 1010, DeviceType.CUDA)
    norm = profiled(4, "_layer_norm_fwd_kernel", 1010, 1510, DeviceType.CUDA)
    mm.append_kernel(gemm.name, 0, 1000)  # the parser also adds each kernel to the op that launched it
    ln.append_kernel(norm.name, 0, 500)
    result = profile_step.op_times([mm, gemm, ln, norm], cuda=True, steps=1)
    assert result["step_ms"] == pytest.approx(1.5)  # 1 ms GEMM + 0.5 ms hetrain kernel, each once
    assert {k: v["ms"] for k, v in result["kinds"].items()} == pytest.approx({"gemm": 1.0, "hetrain fused": 0.5})
    assert result["top_other"] == []


def test_a_results_md_section_begun_but_never_ended_is_refused_naming_the_missing_marker():
    text = f"intro\n{report.CPU_BEGIN}\nold table\n\nnotes after\n"
    with pytest.raises(ValueError, match=f"no {report.CPU_END} after it"):
        report._replace_section(text, report.CPU_BEGIN, report.CPU_END, "NEW")
    ended = text.replace("old table\n", f"old table\n{report.CPU_END}\n")
    assert report._replace_section(ended, report.CPU_BEGIN, report.CPU_END, "NEW") == (
        f"intro\n{report.CPU_BEGIN}\nNEW\n{report.CPU_END}\n\nnotes after\n")


def test_result_files_are_named_from_the_parts_given():
    from benchmarks.cli import result_file

    assert result_file(Path("r"), "2030-01-02", "ops-cpu", None, "", "quick") == Path("r/2030-01-02-ops-cpu-quick.json")


class CutShort(Exception):
    """A run stopped mid-way, as Ctrl-C or gpu-check's time cap stops it."""


TRAIN = {"date": "2030-01-02", "rows": [], "placement": [], "target_met": None}


@pytest.mark.parametrize(("module", "result", "argv"), [
    (bench_cpu, cpu_ops_result(), []),
    (bench_ops, {**cpu_ops_result(), "device": "cpu"}, ["--device", "cpu"]),
    (bench_train, TRAIN, ["--device", "cpu"]),
    (bench_memory_overhead, MEMORY, ["--device", "cpu"]),
    (bench_loader, {"rows": []}, []),
    (bench_overhead, {"rows": []}, ["--device", "cpu"]),
    (bench_embedding, {"date": "2030-01-02", "rows": []}, []),
])
def test_a_rerun_cut_short_keeps_its_progress_apart_and_the_complete_file_as_it_was(module, result, argv,
                                                                                    monkeypatch, tmp_path):
    def run(*args, save=None, **kwargs):  # each saves its progress through save=..., or its last argument
        (save or args[-1])(result)
        return result

    monkeypatch.setattr(module, "run", run)
    run_main(module, [*argv, "--out", str(tmp_path)], monkeypatch)
    (path,) = tmp_path.glob("*.json")  # a run that completes leaves its complete file alone
    complete = path.read_text()

    def cut_short(*args, save=None, **kwargs):
        (save or args[-1])({**result, "rows": ["measured before the stop"]})
        raise CutShort

    monkeypatch.setattr(module, "run", cut_short)
    with pytest.raises(CutShort):
        run_main(module, [*argv, "--out", str(tmp_path)], monkeypatch)
    assert path.read_text() == complete
    assert json.loads(partial_file(path).read_text())["rows"] == ["measured before the stop"]


FAILED_OP_ROW = {"op": "rms_norm", "shape": "8", "dtype": "float32", "error": "RuntimeError: launch"}
FAILED_MODE_ROW = {"section": "precision", "mode": "fp32", "fused": True, "kernels": None, "skipped": None,
                   "ms": None, "failed": "RuntimeError: launch"}


@pytest.mark.parametrize(("module", "result", "failed_row", "argv"), [
    (bench_cpu, cpu_ops_result(), FAILED_OP_ROW, []),
    (bench_ops, {**cpu_ops_result(), "device": "cpu"}, FAILED_OP_ROW, ["--device", "cpu"]),
    (bench_train, TRAIN, FAILED_MODE_ROW, ["--device", "cpu"]),
    (bench_overhead, {"rows": []}, {"op": "rms_norm", "error": "RuntimeError: launch"}, ["--device", "cpu"]),
])
def test_a_rerun_with_a_failed_case_keeps_its_result_apart_and_the_complete_file_as_it_was(
        module, result, failed_row, argv, monkeypatch, tmp_path, capsys):
    """A failed rerun replaced the day's complete file, and RESULTS.md regenerated later published its failed rows."""
    def run(*args, save=None, **kwargs):  # each saves its progress through save=..., or its last argument
        (save or args[-1])(result)
        return result

    monkeypatch.setattr(module, "run", run)
    run_main(module, [*argv, "--out", str(tmp_path)], monkeypatch)
    (path,) = tmp_path.glob("*.json")
    complete = path.read_text()
    result = {**result, "rows": [failed_row]}
    with pytest.raises(SystemExit) as exit_:
        run_main(module, [*argv, "--out", str(tmp_path)], monkeypatch)
    assert path.read_text() == complete
    assert json.loads(failed_file(path).read_text())["rows"] == [failed_row]  # kept, under a name of its own
    assert {p.name for p in tmp_path.glob("*.json")} == {path.name, failed_file(path).name}  # no partial left
    assert str(exit_.value.code).endswith(f"the others' results are in {failed_file(path)}")
    assert f"wrote {failed_file(path)}" in capsys.readouterr().out


def test_the_tables_never_take_a_run_with_failed_cases(tmp_path):
    """A failed run written as the day's file (before they were kept apart) became RESULTS.md's source, and a failed
    H200 run outranked a good H100 run made after it the same day."""
    (tmp_path / "2030-01-01-ops-cpu.json").write_text(json.dumps({"date": "2030-01-01", "rows": []}))
    (tmp_path / "2030-01-02-ops-cpu.json").write_text(json.dumps({"date": "2030-01-02", "rows": [FAILED_OP_ROW]}))
    (tmp_path / "2030-01-01-nvidia-h200-ops.json").write_text(json.dumps({**GPU_RESULT, "rows": [FAILED_OP_ROW]}))
    good = tmp_path / "2030-01-01-nvidia-h100-80gb-hbm3-ops.json"
    good.write_text(json.dumps(GPU_RESULT))
    assert report.latest(tmp_path, "ops-cpu")["date"] == "2030-01-01" and report.gpu_source(tmp_path) == good
    (tmp_path / "2030-01-01-ops-cpu.json").unlink()
    good.unlink()
    assert report.latest(tmp_path, "ops-cpu") is None and report.gpu_source(tmp_path) is None


def test_the_tables_never_take_a_partial_file_for_a_run(tmp_path):
    (tmp_path / "2030-01-01-ops-cpu.json").write_text(json.dumps({"date": "2030-01-01"}))
    partial_file(tmp_path / "2030-01-02-ops-cpu.json").write_text(json.dumps({"date": "2030-01-02"}))
    full_gpu = tmp_path / "2030-01-01-nvidia-h200-ops.json"
    full_gpu.write_text("{}")
    partial_file(tmp_path / "2030-01-02-nvidia-h200-ops.json").write_text("{}")
    assert report.latest(tmp_path, "ops-cpu")["date"] == "2030-01-01" and report.gpu_source(tmp_path) == full_gpu


def test_a_partial_file_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    path = tmp_path / "2030-01-02-ops-cpu.json"
    save_partial(path, {"rows": [1]})
    monkeypatch.setattr(json, "dumps", never_runs)  # a failure while writing: the earlier progress stays readable
    with pytest.raises(AssertionError):
        save_partial(path, {"rows": [1, 2]})
    monkeypatch.undo()
    assert json.loads(partial_file(path).read_text()) == {"rows": [1]} and [p.name for p in tmp_path.iterdir()] == [
        partial_file(path).name]  # no temporary file left behind
    save_complete(path, {"rows": [1, 2]})
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


@pytest.mark.parametrize("umask", [0o022, 0o027], ids=oct)
def test_a_result_file_gets_the_mode_the_umask_gives_any_new_file(tmp_path, umask):
    path = tmp_path / "2030-01-02-ops-cpu.json"
    previous = os.umask(umask)
    try:
        save_partial(path, {"rows": [1]})
        partial_mode = stat.S_IMODE(partial_file(path).stat().st_mode)
        save_complete(path, {"rows": [1, 2]})
    finally:
        os.umask(previous)
    assert partial_mode == stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask  # readable by others: not 0o600


def test_the_pipeline_split_runs_its_gpu_stages_on_the_device_measured():
    assert bench_train.pipeline_plan("cuda:1") == {"embeddings": "cpu", "encoder": "cuda:1", "classifier": "cuda:1"}


def test_cpu_table_sets_every_rows_bytes_against_the_current_definition_whatever_formula_stored_its_share():
    times = {"eager": 5.0, "compile": 4.0, "hetrain": 3.0, "conv": 2.0}  # the epilogue: 1 ms
    # A run from before the epilogue's definition (no copy_mib) stored 100 MB over the whole 3 ms call: 1/3 of
    # 100 GB/s. Over the epilogue's 1 ms they are all of it.
    old = {"device": "cpu", "torch": "t", "date": "d", "copy_gbs": 100.0,
           "rows": [{**CONV, "ms": times, "copy_fraction": 1 / 3, "gbs": 100 / 3}]}
    # A row recording its bytes: its share recomputed from them, whatever it stored.
    new = {**old, "copy_mib": 256, "rows": [{**CONV, "ms": times, "bytes_moved": 10**8, "copy_fraction": 0.123}]}
    # One with copy_mib but no bytes: it stored the current definition already.
    between = {**old, "copy_mib": 256, "rows": [{**CONV, "ms": times, "copy_fraction": 0.25}]}
    plain = {"op": "layer_norm", "shape": "8x8", "dtype": "float32", "ms": {"eager": 2.0, "compile": 2.0,
             "hetrain": 1.0}, "speedup_vs_eager": 2.0, "speedup_vs_compile": 2.0, "copy_fraction": 0.4}
    assert "| 1.00x | 1.00x | 100% |" in report.cpu_table(old)
    assert "| 1.00x | 1.00x | 100% |" in report.cpu_table(new)
    assert "| 1.00x | 1.00x | 25% |" in report.cpu_table(between)
    assert report.cpu_table({**old, "rows": [plain]}).endswith("| 40% |")  # a whole call: both formulas agree


def test_an_op_named_like_nothing_takes_the_kind_of_the_op_it_runs_inside():
    torch.manual_seed(0)
    embedding, linear = torch.nn.Embedding(16, 8), torch.nn.Linear(8, 4)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        with torch.profiler.record_function("hetrain::stage head"):
            loss = linear(embedding(torch.tensor([1, 2, 3]))).sum()
        loss.backward()
    events = prof.events()
    nodes = profile_step.attention_nodes(events)

    def kinds(name: str, parent: str) -> set[str]:
        return {profile_step.event_kind(e, nodes) for e in events
                if e.name == name and e.cpu_parent is not None and e.cpu_parent.name.endswith(parent)}

    assert kinds("aten::index_select", "aten::embedding") == {"embedding"}  # the lookup: no fusion candidate
    assert kinds("aten::sum", "AddmmBackward0") == {"gemm"}  # the Linear's bias gradient
    assert kinds("aten::sum", "hetrain::stage head") == {"other"}  # a stage's range is no op: the loss's sum stays
    assert kinds("aten::detach", "AccumulateGrad") == {"other"}  # a C++ node keeps its own name's kind


def test_what_runs_inside_attention_counts_as_attention_and_a_gemm_nodes_own_range_as_the_gemm():
    torch.manual_seed(0)
    linear = torch.nn.Linear(8, 8)
    q, k, v = (torch.randn(1, 2, 4, 8, requires_grad=True) for _ in range(3))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        with sdpa_kernel(SDPBackend.MATH):  # decomposed: scaling, matmuls, softmax
            attended = F.scaled_dot_product_attention(q, k, v)
        linear(attended).sum().backward()
    events = prof.events()
    nodes = profile_step.attention_nodes(events)

    def kinds(name: str, parent: str | None = None) -> set[str]:
        found = {profile_step.event_kind(e, nodes) for e in events if e.name == name
                 and (parent is None or e.cpu_parent is not None and e.cpu_parent.name == parent)}
        assert found, f"no {name} in {parent} in the trace"
        return found

    backward = profile_step.BACKWARD
    # The reshapes of attention's matmuls are attention's, though a GEMM op encloses them; its bmm is a GEMM.
    assert kinds("aten::expand", "aten::matmul") == kinds("aten::_unsafe_view", "aten::matmul") == {"attention"}
    assert kinds("aten::bmm", "aten::matmul") == {"gemm"}
    # The nodes attention's forward created, their ranges and what runs in them, are attention's.
    assert kinds(f"{backward}BmmBackward0") == kinds("BmmBackward0") == {"attention"}
    assert kinds("aten::transpose", "BmmBackward0") == kinds(f"{backward}SafeSoftmaxBackward0") == {"attention"}
    # The Linear's node: its own range's self time and what runs in it are the GEMM's.
    assert kinds(f"{backward}AddmmBackward0") == kinds("aten::sum", f"{backward}AddmmBackward0") == {"gemm"}
