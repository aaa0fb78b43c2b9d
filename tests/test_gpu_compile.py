"""Every kernel compiles for Hopper (sm_90) with no GPU, and the check catches what it must (on the fixtures, for
sm_90 and sm_80). ``make gpu-compile`` compiles the project's kernels for sm_80 too: here the target alone, in half
the time.

The check runs as a subprocess with TRITON_INTERPRET unset: under the interpreter (set by conftest)
``@triton.jit`` yields interpreted functions, which cannot be compiled.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import pytest
import torch

from hetrain.checks import cuda_compile, resources, triton_aot

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures"
ARCHS = {"sm_90", "sm_80"}
REAL_ARCHS = {"sm_90"}  # what the suite compiles the project's own kernels for (the fixture ``real``)


def _gpu_compile(tmp_path: Path, *args: str, interpret: bool = False) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "gpu_compile.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run([sys.executable, "-m", "hetrain.checks.gpu_compile", "--json", str(out), *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert out.exists(), f"the check wrote no JSON (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc, json.loads(out.read_text())


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """The check over the project's own kernels: every Triton module and every .cu under csrc/."""
    return _gpu_compile(tmp_path_factory.mktemp("real"), "--arch", "90")


@pytest.fixture(scope="module")
def broken(tmp_path_factory):
    """The check over the fixtures, each broken in a way it must report."""
    return _gpu_compile(
        tmp_path_factory.mktemp("broken"),
        "--triton-module", str(FIXTURES / "bad_kernel.py"),
        "--triton-module", str(FIXTURES / "spilling_kernel.py"),
        "--triton-module", str(FIXTURES / "unlisted_kernel.py"),
        "--cu", str(FIXTURES / "bad.cu"),
    )


def _problems(part: dict) -> str:
    return "\n".join(part["problems"])


def test_the_check_passes_on_the_real_kernels(real):
    proc, _ = real
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-8000:]


def test_every_triton_kernel_has_an_aot_spec(real):
    _, result = real
    missing = [p for p in result["triton"]["problems"] if "has no AotSpec" in p]
    assert not missing, "\n".join(missing)


def test_triton_kernels_compile_for_sm90_in_every_dtype(real):
    _, result = real
    rows = result["triton"]["rows"]
    errors = [f"{r['arch']} {r['kernel']} {r['dtype']} {r['config']}: {r['error']}" for r in rows if r["error"]]
    assert not errors, "\n".join(errors)
    built = {(r["arch"], r["kernel"], r["dtype"]) for r in rows}
    for arch in REAL_ARCHS:
        for kernel in ("layer_norm._layer_norm_fwd", "layer_norm._layer_norm_bwd"):
            for dtype in ("float32", "float16", "bfloat16", "float64"):
                assert (arch, kernel, dtype) in built, f"{kernel} {dtype} was not compiled for {arch}"


def test_configs_picked_at_benchmark_shapes_do_not_spill(real):
    _, result = real
    picked = [r for r in result["triton"]["rows"] if r["picked"] and not r["error"]]
    assert {r["arch"] for r in picked} == REAL_ARCHS
    spilling = [f"{r['arch']} {r['kernel']} {r['dtype']} {r['config']}: {r['spill']}" for r in picked
                if r["spill"] != 0]
    assert not spilling, "spills (bytes) in picked configurations:\n" + "\n".join(spilling)


def test_cu_files_compile_for_sm90(real):
    _, result = real
    part = result["cuda"]
    if part["skipped"]:
        pytest.skip(f"the CUDA part of the check was skipped: {part['skipped']}")
    assert not part["problems"], _problems(part)
    for path in cuda_compile.cu_files():
        shown = str(path.relative_to(ROOT))
        archs = {r["arch"] for r in part["rows"] if r["config"] == shown}
        assert archs == REAL_ARCHS, f"{shown}: kernels reported for {sorted(archs)}, expected {sorted(REAL_ARCHS)}"


def test_the_bad_kernel_runs_in_the_interpreter():
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs TRITON_INTERPRET=1 (set by conftest)")
    module = triton_aot.load_module(str(FIXTURES / "bad_kernel.py"))
    x = torch.randn(5, 7)
    torch.testing.assert_close(module.column_sums_launch(x), x.sum(0))


def test_a_kernel_the_compiler_rejects_is_reported(broken):
    proc, result = broken
    assert proc.returncode == 1
    failed = {r["arch"] for r in result["triton"]["rows"] if r["kernel"] == "bad_kernel.column_sums" and r["error"]}
    assert failed == ARCHS
    assert "column_sums" in proc.stderr and "Loop-carried variable acc" in proc.stderr


def test_spills_in_a_picked_config_are_reported(broken):
    proc, result = broken
    assert any("normalise_one_warp" in p and "spills" in p for p in result["triton"]["problems"]), \
        _problems(result["triton"])
    assert "normalise_one_warp" in proc.stderr


def test_a_kernel_without_a_spec_is_named(broken):
    proc, result = broken
    assert any("copy_block has no AotSpec" in p for p in result["triton"]["problems"]), _problems(result["triton"])
    assert "copy_block" in proc.stderr


def test_a_cu_that_does_not_compile_is_reported(broken):
    proc, result = broken
    part = result["cuda"]
    if part["skipped"]:
        pytest.skip(f"the CUDA part of the check was skipped: {part['skipped']}")
    assert {r["arch"] for r in part["rows"] if r["error"] and "bad.cu" in r["kernel"]} == ARCHS
    assert "bad.cu" in proc.stderr and "no suitable conversion" in proc.stderr


def test_the_check_refuses_to_run_under_the_interpreter(tmp_path):
    proc, result = _gpu_compile(tmp_path, "--triton", interpret=True)
    assert proc.returncode == 1
    assert "TRITON_INTERPRET" in _problems(result["triton"])


def test_modules_of_one_file_name_in_two_folders_are_both_checked(tmp_path):
    """Modules loaded from a path were keyed on the file's name: b/kernels.py was taken for a/kernels.py, and its
    kernel without an AotSpec went unreported."""
    kernels = {"a": "scale", "b": "copy_block"}
    for folder, kernel in kernels.items():
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "kernels.py").write_text(f"import triton\n\n\n@triton.jit\ndef {kernel}(X):\n    pass\n")
    # Without the interpreter (set by conftest), @triton.jit makes the JITFunctions the check looks for.
    code = ("import sys\nfrom hetrain.checks import triton_aot\n"
            "modules = [triton_aot.load_module(path) for path in sys.argv[1:]]\n"
            "for module in modules:\n"
            "    print('uncovered:', *triton_aot.uncovered(module, []))\n"
            "print('shown as:', *(triton_aot.kernel_name(k) for m in modules for k in triton_aot.kernels_in(m)))\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code, *(str(tmp_path / f / "kernels.py") for f in kernels)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.stdout.splitlines() == ["uncovered: scale", "uncovered: copy_block",
                                        "shown as: kernels.scale kernels.copy_block"], proc.stdout + proc.stderr


@pytest.mark.parametrize("variable", ["CUDA_HOME", "CUDA_PATH"])
def test_the_cu_check_takes_nvcc_where_the_extension_build_does(variable, tmp_path, monkeypatch):
    """Only PATH was searched: the nvcc that setup.py (torch) takes from $CUDA_HOME/bin was missed, the part
    skipped."""
    nvcc = tmp_path / "toolkit" / "bin" / "nvcc"
    nvcc.parent.mkdir(parents=True)
    nvcc.write_text('#!/bin/sh\necho "the toolkit\'s nvcc ran" >&2\nexit 1\n')
    nvcc.chmod(0o755)
    for name in ("CUDA_HOME", "CUDA_PATH"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(variable, str(tmp_path / "toolkit"))
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    part = cuda_compile.check([FIXTURES / "bad.cu"], (90,))
    assert part.skipped is None
    assert [r.error for r in part.rows] == ["the toolkit's nvcc ran"]
    nvcc.unlink()  # set, CUDA_HOME is where the build looks, and where the skip says nvcc is missing
    assert cuda_compile.check([FIXTURES / "bad.cu"], (90,)).skipped == \
        f"nvcc not found in {tmp_path / 'toolkit' / 'bin'} (CUDA_HOME or CUDA_PATH)"


def test_a_compile_job_that_kills_its_process_fails_alone():
    """One Triton compile worker that crashed broke the process pool: every module's rows were lost, and the .cu part
    never ran. ``os._exit`` ends its worker as a crash inside the compiler would."""
    results = triton_aot.run_jobs([(abs, (-3,)), (os._exit, (70,)), (pow, (2, 5)), (int, ("x",))], workers=2)
    assert results[0] == 3 and results[2] == 32
    assert isinstance(results[1], BrokenProcessPool)
    assert isinstance(results[3], ValueError)


def test_a_cu_whose_resources_cannot_be_read_is_named_and_the_others_are_still_reported(tmp_path, monkeypatch):
    """cuobjdump failing on one object (run with check=True) raised out of the .cu part: none of its files was
    reported, and gpu-compile ended in a traceback."""
    if resources.cuobjdump() is None:
        pytest.skip("no cuobjdump (neither in the Triton wheel nor on PATH)")
    # An nvcc that fails on bad.cu and, for any other file, reports a kernel in an object cuobjdump cannot read.
    nvcc = tmp_path / "toolkit" / "bin" / "nvcc"
    nvcc.parent.mkdir(parents=True)
    nvcc.write_text("#!/bin/sh\n"
                    "while [ $# -gt 0 ]; do case $1 in -o) out=$2; shift;; *.cu) src=$1;; esac; shift; done\n"
                    'case $src in *bad.cu) echo "bad.cu: error: no conversion" >&2; exit 1;; esac\n'
                    'echo "not an object" > "$out"\n'
                    "printf 'ptxas info    : Function properties for _Z4copyPf\\n    0 bytes stack frame, 0 bytes "
                    "spill stores, 0 bytes spill loads\\n' >&2\n")
    nvcc.chmod(0o755)
    unreadable = tmp_path / "unreadable.cu"
    unreadable.write_text("__global__ void copy(float* x) {}\n")
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "toolkit"))
    part = cuda_compile.check([unreadable, FIXTURES / "bad.cu"], (90, 80))
    assert sorted((r.arch, r.error) for r in part.rows) == [("sm_80", "bad.cu: error: no conversion"),
                                                            ("sm_90", "bad.cu: error: no conversion")]
    assert [p.split(": ")[0] for p in part.problems] == [f"{unreadable} for sm_90", f"{unreadable} for sm_80"]
    assert all("CalledProcessError" in p and "cuobjdump" in p for p in part.problems), part.problems
