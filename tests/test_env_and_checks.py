"""`python -m hetrain.env`, the fallback without the compiled extension, and `make gpu-check` without a GPU."""

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def run_python(code_or_args: list[str], **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *code_or_args], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, **env})


def test_env_report_lists_versions_devices_and_chosen_backends():
    out = run_python(["-m", "hetrain.env"])
    assert out.returncode == 0, out.stderr
    text = out.stdout
    for needle in ("torch", torch.__version__, "triton", "nvcc", "hetrain._C", "devices:", "op layer_norm:",
                   "-> chosen on cpu", "warnings", "host allocator", "bf16 dot products"):
        assert needle in text, f"{needle!r} missing from:\n{text}"


def test_import_without_the_extension_warns_once_and_falls_back():
    code = (
        "import sys, warnings\n"
        "sys.modules['hetrain._C'] = None  # as if the extension was never built\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    import torch, hetrain\n"
        "    from hetrain import plugins\n"
        "    y = hetrain.ops.layer_norm(torch.randn(3, 8))\n"
        "    print(plugins.select('layer_norm', 'cpu').name)\n"
        "print(sum('hetrain._C is not available' in str(w.message) for w in caught))\n"
    )
    out = run_python(["-c", code], HETRAIN_STRICT="1")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["torch", "1"]


@pytest.fixture
def reload_ext():
    """``hetrain._ext.load()`` runs again on its next call, and again after the test (with the real hetrain._C, which
    monkeypatch puts back in sys.modules)."""
    from hetrain import _ext

    _ext.load.cache_clear()
    yield _ext
    _ext.load.cache_clear()


def test_an_extension_present_but_failing_to_load_is_not_called_unbuilt(monkeypatch, reload_ext, tmp_path):
    from hetrain import env

    monkeypatch.setitem(sys.modules, "hetrain._C", None)  # the import fails, as a broken or mislinked build's does
    with pytest.warns(UserWarning, match=r"present but failed to load: import of hetrain._C halted"):
        assert reload_ext.load() is None
    assert reload_ext.load_error().startswith("present but failed to load: import of hetrain._C halted")
    assert reload_ext.available().startswith("hetrain._C is present but failed to load: import of hetrain._C")
    assert any("present but failed to load" in w for w in env._compatibility_warnings())

    reload_ext.load.cache_clear()
    monkeypatch.setattr(reload_ext, "_PACKAGE_DIR", tmp_path, raising=False)  # no _C*.so file
    with pytest.warns(UserWarning, match=r"\(not built\).*build it with: pip install -e \."):
        assert reload_ext.load() is None
    assert reload_ext.load_error() == "not built"
    assert reload_ext.available() == "hetrain._C is not built (build it with: pip install -e . --no-build-isolation)"


def test_an_extension_built_from_other_sources_is_refused_as_stale_naming_the_rebuild(monkeypatch, reload_ext):
    real = pytest.importorskip("hetrain._C")
    monkeypatch.setitem(sys.modules, "hetrain._C", types.ModuleType("hetrain._C"))  # built before ABI_VERSION
    with pytest.warns(UserWarning, match="stale build: it has no ABI version.*rebuild it with: pip install -e ."):
        assert reload_ext.load() is None
    assert reload_ext.load_error().startswith("a stale build")
    assert "hetrain._C is a stale build" in reload_ext.available()

    reload_ext.load.cache_clear()
    monkeypatch.setitem(sys.modules, "hetrain._C", real)
    assert real.ABI_VERSION == reload_ext.ABI_VERSION  # the build these tests run against is current
    monkeypatch.setattr(reload_ext, "ABI_VERSION", real.ABI_VERSION + 1)  # the sources moved on: a git pull
    with pytest.warns(UserWarning, match=f"stale build: it has ABI version {real.ABI_VERSION}, these sources "
                                         f"expect {real.ABI_VERSION + 1}"):
        assert reload_ext.load() is None


def test_a_stale_extension_leaves_the_host_allocator_off_and_the_report_running():
    """A stale hetrain._C imports but lacks ops the sources call: cpu_memory and `python -m hetrain.env` raised
    AttributeError from torch.ops.hetrain_C."""
    code = (
        "import sys, types, warnings\n"
        "stale = types.ModuleType('hetrain._C')  # imports fine, registers none of the current ops\n"
        "stale.WITH_CUDA = 0\n"
        "sys.modules['hetrain._C'] = stale\n"
        "warnings.simplefilter('ignore')\n"
        "from hetrain import cpu_memory, env\n"
        "print(cpu_memory.stats(), cpu_memory.apply('keep').applied)\n"
        "env.main([])\n"
    )
    out = run_python(["-c", code])
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0] == "None False"
    assert "a stale build: it has no ABI version" in out.stdout


def test_the_report_names_an_unreadable_backend_setting_under_warnings(monkeypatch):
    """``HETRAIN_STRICT=maybe``, refused by every op, showed only in each op's chosen backend."""
    from hetrain import env, plugins

    monkeypatch.setenv(plugins.ENV_STRICT, "maybe")
    plugins.configure(strict=None)  # resolves every op anew, as `python -m hetrain.env` in a fresh process does
    report = env.collect()
    assert any(w.startswith("hetrain: cannot read HETRAIN_STRICT='maybe'") for w in report.warnings), report.warnings
    assert "cannot read HETRAIN_STRICT='maybe'" in report.backends["layer_norm"][-1]["status"]


def test_a_tools_output_that_is_not_utf8_does_not_end_the_report(monkeypatch, tmp_path):
    from hetrain import env

    nvcc = tmp_path / "nvcc"
    nvcc.write_bytes(b"#!/bin/sh\nprintf 'Cuda compilation tools, release 12.4, V12.4.1 \\377\\376\\n'\n")
    nvcc.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    assert env.nvcc_version() == "12.4"


@pytest.mark.skipif(torch.version.cuda is not None, reason="this torch has CUDA: the refusal cannot be provoked")
def test_a_build_that_requires_cuda_without_a_cuda_torch_says_why_and_how_to_fix_it():
    out = run_python(["setup.py", "build_ext", "--inplace", "--dry-run"], HETRAIN_CUDA="1")
    assert out.returncode != 0
    message = out.stdout + out.stderr
    assert f"HETRAIN_CUDA=1 but torch {torch.__version__} is a build without CUDA" in message, message
    assert "Fix: install a CUDA build of torch" in message, message


@pytest.mark.skipif(torch.version.cuda is not None, reason="needs a CPU build of torch")
def test_the_cuda_backends_reason_on_a_cpu_torch_says_to_install_a_cuda_torch_first():
    # Told only to rebuild with HETRAIN_CUDA=1, a user met the build's refusal of a CPU torch (the test above).
    from hetrain import _ext
    from hetrain.ops import _backends

    if _ext.load() is None:
        pytest.skip("hetrain._C is not built")
    reason = _backends._cuda_ext_available()
    assert "torch is a CPU build: install a CUDA build of torch, then rebuild with HETRAIN_CUDA=1" in reason


def test_gpu_check_without_a_gpu_names_each_skipped_step(tmp_path):
    out = run_python(["-m", "hetrain.checks.gpu_check", "--quick", "--skip", "gpu-compile", "--out", str(tmp_path)])
    assert out.returncode == 0, out.stdout + out.stderr
    record = json.loads(next(tmp_path.glob("*-check.json")).read_text())
    status = {s["name"]: (s["status"], s["detail"]) for s in record["steps"]}
    assert status["env"][0] == status["bench-loader"][0] == status["bench-train"][0] == "passed", status
    assert status["profile-step"][0] == status["bench-overhead"][0] == status["bench-embedding"][0] == "passed", status
    assert status["gpu-compile"] == ("skipped", "not selected")
    if not torch.cuda.is_available():
        for step in ("build", "cuda-tests", "bench-ops"):
            assert status[step][0] == "skipped" and ("CPU build" in status[step][1] or "no CUDA" in status[step][1])
    assert "step" in out.stdout and "status" in out.stdout  # the closing table
    assert (tmp_path / record["log"]).exists()


def test_gpu_check_within_a_time_budget_skips_what_would_not_fit_and_records_each_step(tmp_path):
    # env takes seconds of the 21 s budget; the next step would start with under 20 s left.
    out = run_python(["-m", "hetrain.checks.gpu_check", "--only", "env,bench-embedding", "--budget-s", "21",
                      "--out", str(tmp_path)])
    assert out.returncode == 0, out.stdout + out.stderr
    record = json.loads(next(tmp_path.glob("*-check.json")).read_text())
    status = {s["name"]: (s["status"], s["detail"]) for s in record["steps"]}
    assert status["env"][0] == "passed" and record["budget_s"] == 21
    assert status["bench-embedding"] == ("skipped", "out of the time budget (21 s)")


def test_gpu_check_caps_a_step_and_refuses_a_cap_that_names_no_step(tmp_path):
    out = run_python(["-m", "hetrain.checks.gpu_check", "--only", "env,bench-embedding", "--cap", "bench-embedding=5",
                      "--out", str(tmp_path)])
    record = json.loads(next(tmp_path.glob("*-check.json")).read_text())
    status = {s["name"]: (s["status"], s["detail"]) for s in record["steps"]}
    assert status["env"][0] == "passed"
    assert status["bench-embedding"] == ("skipped", "capped at 5 s, under the 20 s a step is given at least")
    assert out.returncode == 0, out.stdout + out.stderr
    bad = run_python(["-m", "hetrain.checks.gpu_check", "--cap", "bench-opz=5", "--out", str(tmp_path)])
    assert bad.returncode != 0 and "--cap wants STEP=SECONDS with STEP one of" in bad.stderr, bad.stderr


@pytest.mark.parametrize("args, message", [
    (["--only", "nosuch"], "--only names no step: ['nosuch']"),  # ran nothing and passed
    (["--only", ""], "--only names no step; the steps are"),
    # Ran the step it meant to skip (the 1 s budget keeps a regression from running every step).
    (["--skip", "bench-opz", "--budget-s", "1"], "--skip names no step: ['bench-opz']"),
    (["--budget-s", "-5"], "--budget-s: must be seconds above 0, got -5"),  # skipped every step and passed
])
def test_gpu_check_refuses_selections_and_budgets_that_cannot_mean_what_was_asked(args, message, tmp_path):
    out = run_python(["-m", "hetrain.checks.gpu_check", *args, "--out", str(tmp_path)])
    assert out.returncode != 0 and message in out.stderr, out.stderr
    assert not list(tmp_path.glob("*-check.json"))  # nothing ran


def test_gpu_check_accepts_step_lists_with_spaces(tmp_path):
    out = run_python(["-m", "hetrain.checks.gpu_check", "--only", "env, build", "--out", str(tmp_path)])
    assert out.returncode == 0, out.stdout + out.stderr
    status = {s["name"]: s["status"] for s in json.loads(next(tmp_path.glob("*-check.json")).read_text())["steps"]}
    assert status["env"] == "passed"


def test_a_terminated_gpu_check_stops_its_running_step_and_records_it(tmp_path):
    """``timeout`` sends SIGTERM: the check died and left the step (in a session of its own) running."""
    import signal
    import time

    check = subprocess.Popen([sys.executable, "-m", "hetrain.checks.gpu_check", "--only", "bench-train", "--quick",
                              "--out", str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True)
    deadline = time.monotonic() + 60
    while not any("===== bench-train" in p.read_text() for p in tmp_path.glob("*-check.log")):
        assert time.monotonic() < deadline and check.poll() is None, "the step never started"
        time.sleep(0.1)
    time.sleep(1)
    step_pids = subprocess.run(["pgrep", "-f", f"benchmarks.bench_train.*{tmp_path}"], capture_output=True,
                               text=True).stdout.split()
    assert step_pids, "the step's process is not running"
    check.send_signal(signal.SIGTERM)
    output = check.communicate(timeout=60)[0]
    assert check.returncode != 0, output
    record = json.loads(next(tmp_path.glob("*-check.json")).read_text())
    (step,) = [s for s in record["steps"] if s["name"] == "bench-train"]
    assert step["status"] == "failed" and "interrupted" in step["detail"], step
    deadline = time.monotonic() + 10
    while any(Path(f"/proc/{pid}").exists() and "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]
              for pid in step_pids):
        assert time.monotonic() < deadline, "the step outlived the check"
        time.sleep(0.1)


def test_bench_ops_runs_every_case_in_its_cpu_smoke_mode(tmp_path):
    out = run_python(["-m", "benchmarks.bench_ops", "--quick", "--device", "cpu", "--out", str(tmp_path)])
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    record = json.loads(next(tmp_path.glob("*-cpu-ops-quick.json")).read_text())  # a quick run names itself
    ops = {r["op"] for r in record["rows"]}
    families = {p.stem for p in (ROOT / "benchmarks" / "cases").glob("*.py") if "def gpu_cases" in p.read_text()}
    assert ops == families and "dropout" in ops  # every family with GPU cases ran (ring_gather is bench-cpu's)
    for row in record["rows"]:
        assert {"eager", "compile", "hetrain"} <= set(row["ms"]) and all(ms > 0 for ms in row["ms"].values())
        b2b = row["back_to_back_ms"]
        assert b2b.keys() == row["ms"].keys() and all(ms > 0 for ms in b2b.values())
    from benchmarks.report import gpu_table

    table = gpu_table(record).splitlines()
    eager = next(line for line in table if line.startswith("| layer_norm |") and "| eager |" in line)
    row = next(r for r in record["rows"] if r["op"] == "layer_norm")
    assert f"{row['ms']['eager'] / row['ms']['hetrain']:.2f}x / " in eager  # per call, then back to back, GPU
    assert eager.endswith(" / - |  |")  # no graph replay on the CPU


def test_cuda_build_check_binds_only_declared_ops_and_refuses_a_cpu_torch_naming_the_fix():
    from hetrain.checks.cuda_build import bound_ops, differentiable_ops

    ops = bound_ops()
    assert {"layer_norm_fwd", "layer_norm_bwd", "bn_relu_pool_fwd", "bn_relu_pool_bwd", "rms_norm_fwd",
            "bias_gelu_bwd", "dropout_fwd", "dropout_add_layer_norm_bwd"} <= set(ops)
    undeclared = [op for op in ops if not hasattr(torch.ops.hetrain_C, op)]
    assert not undeclared, f"csrc/cuda bindings register ops no schema declares: {undeclared}"
    differentiable = differentiable_ops()
    assert {"layer_norm", "rms_norm", "bias_gelu", "dropout", "dropout_add_layer_norm", "bn_relu_pool"} == set(
        differentiable)
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    assert all(has(f"hetrain_C::{op}", "Autograd") for op in differentiable)  # as the CUDA build checks them
    if torch.version.cuda is None:
        out = run_python(["hetrain/checks/cuda_build.py"])
        assert out.returncode == 2
        assert "is a CPU build" in out.stderr and "make cuda-build" in out.stderr, out.stderr


def test_cuda_home_fallback_leaves_a_chosen_toolkit_alone_and_only_names_a_root_with_headers(monkeypatch):
    from hetrain.checks.cuda_build import cuda_home_fallback

    guess = cuda_home_fallback()
    assert guess == {} or Path(guess["CUDA_HOME"], "include", "cuda_runtime.h").exists()
    monkeypatch.setenv("CUDA_HOME", "/opt/my-cuda")
    assert cuda_home_fallback() == {}


def test_backend_table_sets_each_ops_two_cuda_backends_side_by_side():
    from benchmarks.report import backend_table

    def row(op, ms, graph):
        return {"op": op, "ms": ms, "back_to_back_ms": ms, "graph_ms": graph}

    record = {"rows": [
        row("layer_norm", {"hetrain": 0.5, "hetrain_cuda": 0.1}, {"hetrain": 0.1, "hetrain_cuda": 0.2}),
        row("layer_norm", {"hetrain": 0.4, "hetrain_cuda": 0.4}, {"hetrain": "n/a", "hetrain_cuda": 0.2}),
        row("bias_gelu", {"hetrain": 0.2, "hetrain_cuda": 0.3}, {"hetrain": 0.2, "hetrain_cuda": 0.3}),
        row("linear_cross_entropy", {"hetrain": 5.0}, {"hetrain": 4.0}),  # one CUDA backend: no row
    ]}
    lines = backend_table(record).splitlines()
    assert lines[2] == "| bias_gelu | 1 | 1.50 | 1.50 | 1.50 | Triton |"
    # per call: sqrt(0.2 * 1.0); in GPU time the one case with both timed
    assert lines[3] == "| layer_norm | 2 | 0.45 | 0.45 | 2.00 | C++ (cuda) |"
    assert len(lines) == 4
    assert backend_table({"rows": [record["rows"][3]]}) == ""


def test_a_gpu_check_step_out_of_time_is_stopped_with_every_process_it_started(tmp_path):
    """A build's ninja and nvcc jobs (or pytest's workers) outlived a step killed for its time, and went on using
    the machine during the next steps."""
    import time

    from hetrain.checks.gpu_check import Step, run_step

    pid_file = tmp_path / "grandchild.pid"
    step = Step("slow", ["bash", "-c", f"sleep 60 & echo $! > {pid_file}; wait"])
    with open(tmp_path / "check.log", "w") as log:
        started = time.perf_counter()
        outcome = run_step(step, log, timeout_s=1)
    assert outcome.status == "failed" and outcome.detail == "timed out after 1 s"
    assert time.perf_counter() - started < 10
    stat = Path(f"/proc/{int(pid_file.read_text())}/stat")

    def running() -> bool:  # not gone, nor a zombie (killed, and its parent too; whoever inherits it reaps it)
        try:
            return stat.read_text().rsplit(")", 1)[-1].split()[0] != "Z"
        except FileNotFoundError:
            return False

    deadline = time.monotonic() + 5
    while running():
        assert time.monotonic() < deadline, "the step's own child outlived it"
        time.sleep(0.05)
