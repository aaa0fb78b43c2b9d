"""`make gpu-check` keeps every result of a run on a lent GPU: reruns, interruptions, time limits and paths."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from hetrain.checks import gpu_check

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures"


STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)


@pytest.fixture
def signals_restored() -> Iterator[None]:
    """pytest's own handling of the signals the check takes over, restored after the test."""
    previous = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
    yield
    for signum, handler in previous.items():
        signal.signal(signum, handler)


@pytest.fixture
def check(signals_restored) -> Callable[[list[str]], int]:
    """gpu_check.main in this process (it takes SIGTERM, SIGHUP and SIGQUIT over)."""
    return gpu_check.main


def running(pid: int) -> bool:
    """Not gone, nor a zombie (whoever inherits a process whose parent died reaps it, or not, in a container)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def steps_of(record: Path) -> dict[str, tuple[str, str]]:
    return {s["name"]: (s["status"], s["detail"]) for s in json.loads(record.read_text())["steps"]}


def wait_for(condition: Callable[[], bool], seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def step_started(out: Path, name: str) -> Callable[[], bool]:
    return lambda: any(f"===== {name}" in p.read_text() for p in out.glob("*-check*.log"))


@pytest.fixture
def instant_steps(monkeypatch) -> None:
    """Two steps that pass at once, on any machine, in place of the real ones."""
    monkeypatch.setattr(gpu_check, "steps", lambda quick, out, record="check": [
        gpu_check.Step(name, [sys.executable, "-c", ""]) for name in ("env", "bench-ops")])


def test_a_second_run_the_same_day_keeps_the_first_runs_record(check, instant_steps, tmp_path):
    """A rerun of one step (--only) the same day replaced the full run's JSON and log."""
    assert check(["--only", "env", "--out", str(tmp_path)]) == 0
    (first,) = tmp_path.glob("*-check.json")
    first_text = first.read_text()
    assert check(["--only", "bench-ops", "--out", str(tmp_path)]) == 0
    assert first.read_text() == first_text
    second = tmp_path / first.name.replace("-check.json", "-check-2.json")
    assert steps_of(second) == {"env": ("skipped", "not selected"), "bench-ops": ("passed", "")}
    assert json.loads(second.read_text())["log"] == second.with_suffix(".log").name
    assert {p.name for p in tmp_path.glob("*.log")} == {first.with_suffix(".log").name, second.with_suffix(".log").name}


def test_a_relative_out_is_one_absolute_directory_for_the_record_and_the_steps(check, instant_steps, tmp_path,
                                                                              monkeypatch, capsys):
    """The steps run in the repository root: a relative --out put their results there, the record under the cwd."""
    monkeypatch.chdir(tmp_path)
    assert check(["--only", "env", "--out", "rel"]) == 0
    assert f"log: {tmp_path / 'rel'}/" in capsys.readouterr().out
    assert list((tmp_path / "rel").glob("*-check.json"))


def test_a_cap_replaces_the_default_timeout_even_above_it():
    step = gpu_check.Step("env", [])
    assert gpu_check.time_limit(step, cap=None, budget_left=None) == gpu_check.DEFAULT_STEP_TIMEOUT_S == 600
    assert gpu_check.time_limit(step, cap=900, budget_left=None) == 900  # was lowered to 600
    assert gpu_check.time_limit(step, cap=900, budget_left=300) == 300


def test_a_fractional_cap_is_named_as_given_and_help_names_the_default_timeout(check, instant_steps, tmp_path,
                                                                              capsys):
    assert check(["--cap", "env=19.6", "--out", str(tmp_path)]) == 0
    (record,) = tmp_path.glob("*-check.json")
    # Was "capped at 20 s, under the 20 s a step is given at least".
    assert steps_of(record)["env"] == ("skipped", "capped at 19.6 s, under the 20 s a step is given at least")
    with pytest.raises(SystemExit):
        check(["--help"])
    assert "default 600 s" in " ".join(capsys.readouterr().out.split())


def test_caps_may_be_written_with_spaces_as_step_lists_are():
    names = {"env", "bench-ops"}
    assert gpu_check.parse_caps(" env=30, bench-ops = 100.5 ", names) == {"env": 30.0, "bench-ops": 100.5}


def test_the_gpu_compile_step_writes_its_json_beside_the_record(tmp_path):
    (step,) = [s for s in gpu_check.steps(False, tmp_path, "2026-01-02-cpu-check-2") if s.name == "gpu-compile"]
    assert step.command[-2:] == ["--json", str(tmp_path / "2026-01-02-cpu-check-2-gpu-compile.json")]


def test_a_step_cut_off_by_its_timeout_keeps_what_it_printed(tmp_path, monkeypatch):
    """Python's stdout to a file is block-buffered: a step killed for its time left nothing in the log."""
    monkeypatch.delenv("PYTHONUNBUFFERED", raising=False)
    step = gpu_check.Step("chatty", [sys.executable, "-c", "import time; print('parts done:', 6 * 7); time.sleep(60)"])
    with open(tmp_path / "check.log", "w") as log:
        outcome = gpu_check.run_step(step, log, timeout_s=2)
    assert outcome.detail == "timed out after 2 s"
    assert "parts done: 42" in (tmp_path / "check.log").read_text()  # the log names the command, not its output


def test_a_cuda_test_step_cut_off_names_the_test_that_failed_before(tmp_path):
    """With -q the log showed one "F": the failures are named in the summary, which a killed pytest never prints."""
    tests = tmp_path / "tests"
    tests.mkdir()
    (tests / "test_cut_off.py").write_text(
        "import os, signal\nimport pytest\n\n"
        "@pytest.mark.cuda\ndef test_fails():\n    assert 1 == 2\n\n"
        "@pytest.mark.cuda\ndef test_killed_at_the_cap():\n    os.kill(os.getpid(), signal.SIGKILL)\n")
    (step,) = [s for s in gpu_check.steps(False, tmp_path) if s.name == "cuda-tests"]
    step = dataclasses.replace(step, command=[*step.command[:-1], str(tests)])
    with open(tmp_path / "check.log", "w") as log:
        assert gpu_check.run_step(step, log, timeout_s=120).status == "failed"
    lines = (tmp_path / "check.log").read_text().splitlines()
    assert any("test_cut_off.py::test_fails" in line and "FAILED" in line for line in lines), lines


def test_gpu_compile_reports_each_part_as_soon_as_it_ends(tmp_path):
    """gpu-compile printed (and wrote as JSON) both parts only at the end: cut off during the .cu part, it left
    nothing of the Triton part it had finished. An nvcc that never ends holds it in the .cu part here."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    nvcc_started = tmp_path / "nvcc-started"
    (bin_dir / "nvcc").write_text(f"#!/bin/sh\ntouch {nvcc_started}\nexec sleep 60\n")
    (bin_dir / "nvcc").chmod(0o755)
    # No CUDA_HOME or CUDA_PATH: nvcc is then taken from PATH.
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PYTHONUNBUFFERED", "CUDA_HOME",
                                                            "CUDA_PATH")}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    report, output = tmp_path / "gpu_compile.json", tmp_path / "output"
    with open(output, "w") as sink:
        command = [sys.executable, "-m", "hetrain.checks.gpu_compile", "--json", str(report),
                   "--triton-module", str(FIXTURES / "unlisted_kernel.py"), "--cu", str(FIXTURES / "bad.cu")]
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        wait_for(lambda: nvcc_started.exists() or proc.poll() is not None, 60, "the .cu part never started")
        assert proc.poll() is None, output.read_text()
        assert report.exists(), "the finished Triton part is not in the JSON yet"
        parts = json.loads(report.read_text())
        assert list(parts) == ["triton"]
        text = output.read_text()
        assert "triton: " in text, text
        for problem in parts["triton"]["problems"]:  # the unlisted kernel's, where Triton can compile here
            assert f"FAILED: {problem}" in text, text
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT])
def test_a_stopped_check_records_every_step_prints_its_table_and_exits_128_plus_the_signal(stop, tmp_path):
    """SIGTERM or Ctrl-C ended the check in a traceback with exit 1, no table, the later steps absent from the JSON."""
    proc = subprocess.Popen([sys.executable, "-m", "hetrain.checks.gpu_check", "--only", "bench-train,bench-embedding",
                             "--quick", "--out", str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True,
                            # A test run in the background ignores SIGINT, and its children would inherit that.
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        wait_for(step_started(tmp_path, "bench-train"), 60, "the step never started")
        proc.send_signal(stop)
        output = proc.communicate(timeout=60)[0]
    finally:
        proc.kill()
    assert proc.returncode == 128 + stop, output
    assert "Traceback" not in output and "step" in output and "status" in output, output
    status = steps_of(next(tmp_path.glob("*-check.json")))
    assert list(status) == [s.name for s in gpu_check.steps(True, tmp_path)]
    assert status["bench-train"] == ("failed", f"interrupted ({stop.name}); its processes were stopped")
    assert status["bench-embedding"] == ("skipped", "interrupted")
    assert status["env"] == ("skipped", "not selected")
    assert f"gpu-check interrupted ({stop.name}) during bench-train" in next(tmp_path.glob("*-check.log")).read_text()


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_sigterm_to_make_gpu_check_reaches_the_check(tmp_path):
    """make passes SIGTERM to the shell of its recipe: the shell died, and the check it had forked ran on."""
    make = subprocess.Popen(["make", "-s", "gpu-check", f"PYTHON={sys.executable}",
                             f"ARGS=--only bench-train --quick --out {tmp_path}"], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    check_pids: list[str] = []
    try:
        wait_for(step_started(tmp_path, "bench-train"), 60, "the step never started")
        check_pids = subprocess.run(["pgrep", "-f", f"hetrain.checks.gpu_check .*{tmp_path}"], capture_output=True,
                                    text=True).stdout.split()
        make.send_signal(signal.SIGTERM)
        make.wait(timeout=30)
        wait_for(lambda: not any(Path(f"/proc/{pid}").exists() for pid in check_pids), 30, "the check outlived make")
    finally:
        make.kill()
        for pid in check_pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
    detail = steps_of(next(tmp_path.glob("*-check.json")))["bench-train"][1]
    assert detail.startswith("interrupted (SIGTERM)"), f"the check never got the signal: {detail}"


def test_a_gpu_compile_that_skipped_every_part_is_recorded_skipped_naming_why(tmp_path, monkeypatch):
    """gpu-compile exits 0 when it skips a part (no nvcc): the check recorded it passed, as if every kernel compiled."""
    host_only = tmp_path / "host_only.cu"
    host_only.write_text("int host_only(int x) { return x + 1; }\n")
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "no-toolkit"))  # where nvcc is looked for, and not found
    (step,) = [s for s in gpu_check.steps(True, tmp_path, "2026-01-02-cpu-check") if s.name == "gpu-compile"]
    step = dataclasses.replace(step, command=[*step.command, "--cuda", "--cu", str(host_only)])
    with open(tmp_path / "check.log", "w") as log:
        outcome = gpu_check.run_step(step, log, timeout_s=300)
    missing = f"nvcc not found in {tmp_path / 'no-toolkit' / 'bin'} (CUDA_HOME or CUDA_PATH)"
    assert (outcome.status, outcome.detail) == ("skipped", f"cuda skipped: {missing}")


def test_a_passed_step_names_the_part_it_skipped(tmp_path):
    report = tmp_path / "parts.json"
    report.write_text(json.dumps({"triton": {"skipped": None}, "cuda": {"skipped": "no nvcc"}}))
    step = gpu_check.Step("two-parts", [sys.executable, "-c", "pass"], parts=report)
    with open(tmp_path / "check.log", "w") as log:
        outcome = gpu_check.run_step(step, log, timeout_s=60)
    assert (outcome.status, outcome.detail) == ("passed", "cuda skipped: no nvcc")


def test_a_cap_given_twice_is_refused():
    """--cap env=5,env=30 kept the last value without a word."""
    with pytest.raises(SystemExit, match=r"--cap gives env twice \(5 s and 30 s\); give it once"):
        gpu_check.parse_caps("env=5, env=30", {"env", "bench-ops"})


def test_an_infinite_budget_is_refused(check, tmp_path, capsys):
    """--budget-s inf was taken, and written to the record as Infinity, which is not JSON."""
    with pytest.raises(SystemExit):
        check(["--budget-s", "inf", "--only", "env", "--cap", "env=1", "--out", str(tmp_path)])
    assert "--budget-s: must be a finite number of seconds, got inf" in capsys.readouterr().err
    assert not list(tmp_path.glob("*-check.json"))


@pytest.mark.parametrize("stop", [signal.SIGHUP, signal.SIGQUIT])
def test_a_hangup_or_quit_stops_the_running_step_as_sigterm_does(stop, signals_restored, tmp_path):
    """SIGHUP (a closed terminal, a dropped ssh connection) or SIGQUIT ended the check at once: the step, in a
    session of its own, ran on holding the GPU, and was recorded nowhere."""
    pid_file = tmp_path / "step.pid"
    # The step sends the signal itself once it runs: the check is then waiting for it, as during a real step.
    code = (f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); "
            f"os.kill({os.getpid()}, {int(stop)}); time.sleep(60)")
    gpu_check.stop_on_signals()
    with open(tmp_path / "check.log", "w") as log, pytest.raises(gpu_check.Interrupted) as stopped:
        gpu_check.run_step(gpu_check.Step("sleepy", [sys.executable, "-c", code]), log, timeout_s=60)
    assert gpu_check.stop_signal(stopped.value) == stop
    # SIGKILLed with its group; the launcher, which the check waits for, may end a moment before it.
    wait_for(lambda: not running(int(pid_file.read_text())), 10, "the step outlived its stop")


def test_a_check_whose_terminal_hung_up_records_every_step_and_stops_its_step(tmp_path):
    """Closing the ssh connection (SIGHUP) killed the check: the running step was neither stopped nor recorded. Its
    terminal gone, the check must record everything without printing a line."""
    proc = subprocess.Popen([sys.executable, "-m", "hetrain.checks.gpu_check", "--only", "bench-train,bench-embedding",
                             "--quick", "--out", str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    step_pids: list[str] = []

    def step_running() -> bool:
        step_pids[:] = subprocess.run(["pgrep", "-f", f"benchmarks.bench_train .*{tmp_path}"], capture_output=True,
                                      text=True).stdout.split()
        return bool(step_pids)

    try:
        wait_for(step_running, 60, "the step never started")
        proc.stdout.close()  # as the terminal of a dropped connection: printing fails
        proc.send_signal(signal.SIGHUP)
        proc.wait(timeout=60)
    finally:
        proc.kill()
        for pid in step_pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
    status = steps_of(next(tmp_path.glob("*-check.json")))
    assert status["bench-train"] == ("failed", "interrupted (SIGHUP); its processes were stopped"), status
    assert status["bench-embedding"] == ("skipped", "interrupted"), status
    wait_for(lambda: not any(running(int(pid)) for pid in step_pids), 10, "the step outlived the check")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal (prctl) is Linux's")
def test_a_check_killed_outright_takes_its_running_step_and_what_it_started_with_it(tmp_path):
    """SIGKILL (the OOM killer, a lent machine taken back) reaches no handler: the step, in a session of its own, ran
    on holding the GPU; then its leader alone was killed, and what it had started (pytest's workers) ran on."""
    pids = tmp_path / "pids"
    step = gpu_check.Step("sleepy", ["sh", "-c", f"sleep 60 & echo $$ $! > {pids}.tmp && mv {pids}.tmp {pids}; wait"])
    check = os.fork()  # a check of its own, which this test kills
    if check == 0:
        try:
            with open(tmp_path / "check.log", "w") as log:
                gpu_check.run_step(step, log, timeout_s=60)
        finally:
            os._exit(0)
    try:
        wait_for(pids.exists, 30, "the step never started")
        os.kill(check, signal.SIGKILL)
        os.waitpid(check, 0)
        for pid in pids.read_text().split():
            wait_for(lambda: not running(int(pid)), 10, f"process {pid} of the step outlived the check")  # noqa: B023
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(check, signal.SIGKILL)
        for pid in pids.read_text().split() if pids.exists() else []:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the launcher runs on Linux alone")
def test_a_step_starts_with_the_signals_and_locale_it_would_have_without_the_launcher(tmp_path, monkeypatch):
    """The launcher's Python ignores SIGPIPE and SIGXFSZ at start-up and, under the C locale, exports LC_CTYPE=C.UTF-8:
    its exec kept both, so a shell step's `yes | head` wrote "Broken pipe" errors and its locale changed."""
    monkeypatch.delenv("LC_ALL", raising=False)
    monkeypatch.delenv("LC_CTYPE", raising=False)
    monkeypatch.setenv("LANG", "C")
    command = ["sh", "-c", "grep SigIgn /proc/$$/status; echo LC_CTYPE=${LC_CTYPE-unset}"]
    with open(tmp_path / "check.log", "w") as log:
        assert gpu_check.run_step(gpu_check.Step("shell", command), log, timeout_s=60).status == "passed"
    without = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    assert (tmp_path / "check.log").read_text().split("\n", 2)[2] == without


@pytest.mark.parametrize("missing", [True, False])
def test_a_step_command_that_cannot_be_run_is_named_in_its_outcome(missing, tmp_path):
    """A command not found, or not executable, was recorded as "exit code 1", with an unnamed traceback in the log."""
    command = str(tmp_path / "no-such-tool") if missing else str(FIXTURES)  # a directory: not executable
    reason = "No such file or directory" if missing else "Permission denied"
    with open(tmp_path / "check.log", "w") as log:
        outcome = gpu_check.run_step(gpu_check.Step("tool", [command, "--flag"]), log, timeout_s=60)
    assert (outcome.status, outcome.detail) == ("failed", f"cannot run {command!r}: {reason}")
    text = (tmp_path / "check.log").read_text()
    assert text.splitlines()[-1] == f"gpu-check: {outcome.detail}" and "Traceback" not in text, text


def test_a_command_not_found_is_named_where_the_check_runs_it_without_the_launcher(tmp_path, monkeypatch):
    """Off Linux, Popen itself raised FileNotFoundError, and the check ended in a traceback."""
    monkeypatch.setattr(sys, "platform", "darwin")
    with open(tmp_path / "check.log", "w") as log:
        outcome = gpu_check.run_step(gpu_check.Step("tool", ["no-such-hetrain-tool"]), log, timeout_s=60)
    assert (outcome.status, outcome.detail) == ("failed",
                                                "cannot run 'no-such-hetrain-tool': No such file or directory")


def test_a_step_that_exits_127_itself_is_not_taken_for_one_that_could_not_be_run(tmp_path):
    with open(tmp_path / "check.log", "w") as log:
        outcome = gpu_check.run_step(gpu_check.Step("shell", ["sh", "-c", "exit 127"]), log, timeout_s=60)
    assert (outcome.status, outcome.detail) == ("failed", "exit code 127")


def test_every_step_runs_without_the_triton_interpreter_unless_it_asks_for_it(tmp_path, monkeypatch):
    """TRITON_INTERPRET=1 exported (the tests' default) reached every step but gpu-compile and cuda-tests: the GPU
    benchmarks timed Triton's interpreter instead of the compiled kernels."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    show = [sys.executable, "-c", "import os; print(os.environ.get('TRITON_INTERPRET'))"]
    seen = {}
    for step in gpu_check.steps(True, tmp_path):
        with open(tmp_path / "check.log", "w") as log:
            gpu_check.run_step(dataclasses.replace(step, command=show, parts=None), log, timeout_s=60)
        seen[step.name] = (tmp_path / "check.log").read_text().split()[-1]
    assert seen == {**dict.fromkeys(seen, "0"), "gpu-compile": "None"}  # gpu-compile unsets it


@pytest.mark.parametrize("args, message", [
    (["--out", "{file}"], "argument --out: {file}: a file, not a directory; pass a directory for the results"),
    (["--out", "{file}/results"], "argument --out: {file}/results: not a writable directory (Not a directory)"),
    (["--cap", "env=²"], "--cap wants STEP=SECONDS with STEP one of"),  # "²".isdigit(), which float refuses
    (["--only", "env", "--skip", "env"], "--skip env takes out every step selected: nothing would run"),  # passed
    (["--budget-s", "5"], f"--budget-s 5: under the {gpu_check.MIN_STEP_S} s a step is given at least, so no step "
                          "would run"),  # every step skipped, and the check passed
    (["--only", "env", "--cap", "env=10"], "--cap env=10: every step selected (env) is capped under the 20 s a step "
                                           "is given at least, so no step would run"),  # passed, having run nothing
    (["--skip", "env,build", "--cap", "gpu-compile=1,cuda-tests=0,bench-ops=2,bench-loader=3,bench-train=4,"
                                      "bench-memory=5,profile-step=6,bench-overhead=7,bench-embedding=19.9"],
     "every step selected (bench-embedding, bench-loader, bench-memory, bench-ops, bench-overhead, bench-train, "
     "cuda-tests, gpu-compile, profile-step) is capped under"),
])
def test_arguments_the_check_cannot_use_end_in_one_line_before_any_step(args, message, check, tmp_path, capsys):
    """A file or an unwritable path as --out, or a cap that is no number, ended in a traceback."""
    afile = tmp_path / "afile"
    afile.touch()
    argv = [*(a.format(file=afile) for a in args), *([] if "--out" in args else ["--out", str(tmp_path / "out")])]
    with pytest.raises(SystemExit) as stopped:
        check(argv)
    assert stopped.value.code not in (0, None)
    assert message.format(file=afile) in f"{capsys.readouterr().err}{stopped.value.code}"
    assert not list(tmp_path.rglob("*-check.json"))


def test_a_budget_of_the_least_a_step_is_given_runs_the_first_step(check, tmp_path, monkeypatch):
    """--budget-s 20 passed the refusal of a budget under 20 s, yet the first step saw 20 s less the check's own
    milliseconds and was skipped "out of the time budget", and the check passed having run nothing."""
    limits = []

    def run_step(step, log, timeout_s, cut_off=None, out=None):
        limits.append((step.name, timeout_s))
        return gpu_check.Outcome(step.name, "passed", 0.5, "")

    monkeypatch.setattr(gpu_check, "run_step", run_step)
    assert check(["--budget-s", str(gpu_check.MIN_STEP_S), "--only", "env,bench-loader", "--out", str(tmp_path)]) == 0
    # The budget less the time the steps took: the second step is left 19.5 s, under the 20 s a step is given.
    assert limits == [("env", gpu_check.MIN_STEP_S)]
    assert steps_of(next(tmp_path.glob("*-check.json")))["bench-loader"] == (
        "skipped", f"out of the time budget ({gpu_check.MIN_STEP_S} s)")


def test_a_check_that_ran_no_step_fails(check, tmp_path, monkeypatch, capsys):
    """Every step selected skipped (no GPU for it, its file missing) and the check passed, having checked nothing."""
    monkeypatch.setattr(gpu_check, "steps", lambda quick, out, record="check": [
        gpu_check.Step("bench-ops", [sys.executable, "-c", ""], needs="benchmarks/no_such_bench.py")])
    assert check(["--out", str(tmp_path)]) == 1
    assert "no step ran, so nothing was checked" in capsys.readouterr().out
    assert steps_of(next(tmp_path.glob("*-check.json"))) == {
        "bench-ops": ("skipped", "benchmarks/no_such_bench.py does not exist yet")}


def test_a_step_stopped_by_the_budget_is_not_recorded_as_one_out_of_time(tmp_path, monkeypatch):
    """A step stopped because --budget-s ran out was recorded "timed out after N s", as a hung step is."""
    monkeypatch.setattr(gpu_check, "MIN_STEP_S", 0)  # a limit of half a second, not of the 20 s a step is given
    step = gpu_check.Step("sleepy", [sys.executable, "-c", "import time; time.sleep(60)"])
    with open(tmp_path / "check.log", "w") as log:
        by_budget = gpu_check.run_or_skip(step, None, None, budget_left=0.5, budget_s=90, log=log)
        by_cap = gpu_check.run_or_skip(step, None, 0.5, budget_left=None, budget_s=None, log=log)
    assert (by_budget.status, by_budget.detail) == ("failed", "stopped at the end of the 90 s budget")
    assert (by_cap.status, by_cap.detail) == ("failed", "timed out at its 0.5 s cap")


@pytest.mark.parametrize(("earlier", "written", "code", "detail"), [
    # A run cut short keeps <name>.partial.json.
    ("earlier-ops.partial.json", "day-train.partial.json", 3, "its results so far are in day-train.partial.json"),
    # A benchmark with failed cases writes <name>-failed.json (benchmarks.cli.failed_file), not the day's file.
    ("earlier-cpu-train-failed.json", "day-cpu-train-failed.json", 1,
     "its results with the failed cases are in day-cpu-train-failed.json"),
])
def test_a_step_that_did_not_complete_names_the_results_it_left(tmp_path, earlier, written, code, detail):
    out = tmp_path / "out"
    out.mkdir()
    (out / earlier).write_text("{}")  # an earlier run's, not this step's
    script = f"import pathlib; pathlib.Path({str(out / written)!r}).write_text('{{}}'); exit({code})"
    with open(tmp_path / "check.log", "w") as log:
        outcome = gpu_check.run_step(gpu_check.Step("bench-train", [sys.executable, "-c", script]), log, timeout_s=60,
                                     out=out)
    assert (outcome.status, outcome.detail) == ("failed", f"exit code {code}; {detail}")


def test_an_interrupted_step_names_the_partial_results_it_left(check, tmp_path, monkeypatch):
    """A budget or cap stop named the benchmark's partial results; SIGTERM, SIGHUP or Ctrl-C during it did not."""
    partial = tmp_path / "day-cpu-train.partial.json"
    code = (f"import os, pathlib, time; pathlib.Path({str(partial)!r}).write_text('{{}}'); "
            f"os.kill({os.getpid()}, {int(signal.SIGTERM)}); time.sleep(60)")
    monkeypatch.setattr(gpu_check, "steps", lambda quick, out, record="check": [
        gpu_check.Step("bench-train", [sys.executable, "-c", code])])
    assert check(["--out", str(tmp_path)]) == 128 + signal.SIGTERM
    assert steps_of(next(tmp_path.glob("*-check.json")))["bench-train"] == (
        "failed", f"interrupted (SIGTERM); its processes were stopped; its results so far are in {partial.name}")
