"""``make gpu-check``: build, verify and benchmark everything in one command, with a table at the end.

On a GPU machine: build ``hetrain._C`` with its CUDA sources, print the environment, compile every
kernel for sm_90/sm_80, run every ``cuda``-marked test, then the benchmarks in a short mode; record
``benchmarks/results/<date>-<device>-check.json`` and its log (``-check-2``... for a later run the same day, which
keeps the earlier one's), and regenerate ``benchmarks/RESULTS.md``.
On a machine without a GPU the same command runs what can run there and names each skipped step
and why. A failing step does not stop the later ones; the exit code is non-zero if any failed, or if none ran.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TextIO

import torch

from hetrain.checks.cuda_build import cuda_home_fallback
from hetrain.device_info import result_card

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"
# A step's time limit where no --cap gives one.
DEFAULT_STEP_TIMEOUT_S = 600


@dataclass
class Step:
    name: str
    command: list[str]
    needs_gpu: bool = False
    needs: str | None = None  # a file the step runs, skipped with a reason while it does not exist
    timeout_s: float = DEFAULT_STEP_TIMEOUT_S
    env: dict[str, str | None] = field(default_factory=dict)  # None unsets a variable; see run_step
    # The JSON the step writes of its parts (gpu-compile's): a part it skipped is named in its outcome.
    parts: Path | None = None


@dataclass
class Outcome:
    name: str
    status: str  # passed | failed | skipped
    seconds: float
    detail: str


def pytest_workers() -> list[str]:
    """``-n N`` where pytest-xdist is installed: Triton's compiles dominate the cuda tests and run per process."""
    if importlib.util.find_spec("xdist") is None:
        return []
    return ["-n", str(max(1, min(8, (os.cpu_count() or 1) // 2)))]


def steps(quick: bool, out: Path, record: str = "check") -> list[Step]:
    """The steps in order, writing under ``out``; files of the run's own (gpu-compile's JSON) are named after its
    ``record`` (see new_record)."""
    py = sys.executable
    bench_args = ["--quick", "--out", str(out)] if quick else ["--out", str(out)]
    # The op benchmark keeps the BERT/ResNet shapes when quick (tiny shapes say nothing on a GPU): it times less.
    ops_args = ["--measure-s", "0.3", "--out", str(out)] if quick else ["--out", str(out)]
    # Likewise the training step on a GPU: the full model with few repeats (the tiny one times only the host).
    train_args = ["--short" if torch.cuda.is_available() else "--quick", "--out", str(out)] if quick else bench_args
    compile_json = out / f"{record}-gpu-compile.json"
    return [
        Step("build", [py, "setup.py", "build_ext", "--inplace"], needs_gpu=True,
             env={"HETRAIN_CUDA": "1", "TORCH_CUDA_ARCH_LIST": this_gpus_arch(), **cuda_home_fallback()}),
        Step("env", [py, "-m", "hetrain.env"]),
        Step("gpu-compile", [py, "-m", "hetrain.checks.gpu_compile", "--json", str(compile_json)],
             env={"TRITON_INTERPRET": None}, parts=compile_json),
        # -v: each test is named in the log as it ends; -q named the failures only in its summary, which a step
        # stopped at its time limit never reaches.
        Step("cuda-tests", [py, "-m", "pytest", "-v", "-m", "cuda", *pytest_workers(), "tests"], needs_gpu=True),
        Step("bench-ops", [py, "-m", "benchmarks.bench_ops", *ops_args], needs_gpu=True,
             needs="benchmarks/bench_ops.py"),
        # Short by default; quick leaves out the Python-dataset section, which measures only the host.
        Step("bench-loader", [py, "-m", "benchmarks.bench_loader", "--out", str(out),
                              *(["--text-samples", "0"] if quick else [])],
             needs="benchmarks/bench_loader.py"),
        Step("bench-train", [py, "-m", "benchmarks.bench_train", *train_args], needs="benchmarks/bench_train.py"),
        Step("bench-memory", [py, "-m", "benchmarks.bench_memory_overhead", *bench_args],
             needs="benchmarks/bench_memory_overhead.py"),
        Step("profile-step", [py, "-m", "benchmarks.profile_step", "--out", str(out),
                              *(["--steps", "1"] if quick else ["--bf16"])], needs="benchmarks/profile_step.py"),
        Step("bench-overhead", [py, "-m", "benchmarks.bench_overhead", "--out", str(out),
                                *(["--rounds", "3"] if quick else [])], needs="benchmarks/bench_overhead.py"),
        Step("bench-embedding", [py, "-m", "benchmarks.bench_embedding", *bench_args],
             needs="benchmarks/bench_embedding.py"),
    ]


def this_gpus_arch() -> str | None:
    """``TORCH_CUDA_ARCH_LIST`` for this machine's first GPU alone ("9.0"; None without a GPU, where the build
    step does not run): a list the image sets more broadly would compile every kernel once per architecture."""
    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability(0)
    return f"{major}.{minor}"


def card() -> str:
    """This machine's GPU as result file names spell it; "cpu" without one."""
    return result_card("cuda:0" if torch.cuda.is_available() else "cpu")


def why_skipped(step: Step, only: set[str] | None, skip: set[str]) -> str | None:
    if step.name in skip or (only is not None and step.name not in only):
        return "not selected"
    if step.needs_gpu and not torch.cuda.is_available():
        return "no CUDA GPU visible" if torch.version.cuda else "torch is a CPU build (no CUDA)"
    if step.needs and not (ROOT / step.needs).exists():
        return f"{step.needs} does not exist yet"
    return None


def run_step(step: Step, log: TextIO, timeout_s: float, cut_off: str | None = None,
             out: Path | None = None) -> Outcome:
    """Runs ``step`` for at most ``timeout_s``; ``cut_off`` is the outcome's detail if it is stopped there (which
    limit ended it), and a ``*.partial.json`` it leaves in ``out`` (a benchmark's cases so far) is named."""
    start = time.perf_counter()
    log.write(f"\n===== {step.name}: {' '.join(step.command)}\n")
    log.flush()
    partials_before = partial_results(out)
    # Unbuffered, as a step killed for its time never flushes: what it printed would be lost from the log.
    # TRITON_INTERPRET=0 unless the step says otherwise: the tests' default (conftest's) and a shell's export would
    # have the cuda tests and the GPU benchmarks run Triton's interpreter instead of the compiled kernels.
    env = {k: v for k, v in {**os.environ, "PYTHONUNBUFFERED": "1", "TRITON_INTERPRET": "0", **step.env}.items()
           if v is not None}
    # A session of its own, so a step out of time is stopped with everything it started: a build's ninja and
    # nvcc jobs, or pytest's workers, would otherwise go on compiling or using the GPU during the next steps.
    why_read, why_write = os.pipe()  # where the launcher says why it cannot run the command
    prefix = launcher(why_write)
    try:
        proc = subprocess.Popen([*prefix, *step.command], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, pass_fds=(why_write,) if prefix else ())
    except OSError as exc:  # no launcher (not Linux): Popen runs the command itself
        os.close(why_read)
        detail = f"cannot run {step.command[0]!r}: {exc.strerror}"
        log.write(f"gpu-check: {detail}\n")
        return Outcome(step.name, "failed", time.perf_counter() - start, detail)
    finally:
        os.close(why_write)
    try:
        returncode = proc.wait(timeout=timeout_s)
        status, detail = ("passed", "") if returncode == 0 else ("failed", f"exit code {returncode}")
        if prefix and returncode in (126, 127):  # the launcher's where it said why; else the step's own
            detail = os.read(why_read, 4096).decode() or detail
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        status, detail = "failed", cut_off or f"timed out after {timeout_s:.0f} s"
    except BaseException:  # Ctrl-C, or a signal of STOP_SIGNALS: the step's processes stop with the check
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    finally:
        os.close(why_read)
    detail = with_partials(detail, partials_before, out)
    skipped, parts = skipped_parts(step.parts)
    if skipped:
        named = "; ".join(f"{name} skipped: {why}" for name, why in skipped.items())
        detail = f"{detail}; {named}" if detail else named
        if status == "passed" and len(skipped) == parts:  # it checked nothing
            status = "skipped"
    return Outcome(step.name, status, time.perf_counter() - start, detail)


# The result files a benchmark keeps apart from the day's complete ones (benchmarks.cli): its cases until it
# completes, and a run with failed cases, which never takes a complete run's name.
PARTIAL, FAILED = ".partial.json", "-failed.json"


def partial_results(out: Path | None) -> dict[Path, int]:
    """The ``*.partial.json`` and ``*-failed.json`` files in ``out``, with their mtimes."""
    if out is None:
        return {}
    return {p: p.stat().st_mtime_ns for suffix in (PARTIAL, FAILED) for p in out.glob(f"*{suffix}")}


def with_partials(detail: str, before: dict[Path, int], out: Path | None) -> str:
    """``detail`` naming the ``*.partial.json`` and ``*-failed.json`` files written in ``out`` since ``before``: what
    a benchmark measured before it was stopped, and the result of one whose cases failed (not the day's file)."""
    written = sorted(p.name for p, mtime in partial_results(out).items() if before.get(p) != mtime)
    so_far = [name for name in written if name.endswith(PARTIAL)]
    failed = [name for name in written if name.endswith(FAILED)]
    named = [f"its results so far are in {', '.join(so_far)}" if so_far else "",
             f"its results with the failed cases are in {', '.join(failed)}" if failed else ""]
    return "; ".join(filter(None, [detail, *named]))


# Runs a step on Linux; argv: the check's pid, the pipe to say why the command cannot be run on, the command. The
# command runs in a child, started as Popen would start it: Python's start-up ignores SIGPIPE and SIGXFSZ, which
# exec keeps, and under a C locale exports LC_CTYPE=C.UTF-8 (locale coercion), while /proc/self/environ keeps the
# environment the check gave. This process waits for it and exits as it did, and the kernel sends it SIGTERM when
# the check dies (PR_SET_PDEATHSIG = 1), on which (or on a SIGHUP, SIGINT or SIGQUIT sent to it) it SIGKILLs its
# process group: the step and all it started, but what moved to a session or group of its own.
_LAUNCHER = r"""
import ctypes, os, resource, signal, sys
check, why, command = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
os.set_inheritable(why, False)
stops = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT, signal.SIGQUIT)
at_start = {signum: signal.signal(signum, lambda signum, frame: os.killpg(0, signal.SIGKILL)) for signum in stops}
ctypes.CDLL(None).prctl(1, signal.SIGTERM)
if os.getppid() != check:  # the check died before: no signal will come
    os._exit(1)
step = os.fork()
if step == 0:
    for signum, handler in {signal.SIGPIPE: signal.SIG_DFL, signal.SIGXFSZ: signal.SIG_DFL, **at_start}.items():
        signal.signal(signum, handler)
    env = dict(entry.split(b"=", 1) for entry in open("/proc/self/environ", "rb").read().split(b"\0") if entry)
    try:
        os.execvpe(command[0], command, env)
    except OSError as exc:
        message = f"cannot run {command[0]!r}: {exc.strerror}"
        os.write(why, message.encode())
        print(f"gpu-check: {message}", file=sys.stderr, flush=True)
        os._exit(127 if isinstance(exc, FileNotFoundError) else 126)  # a shell's codes for these
code = os.waitstatus_to_exitcode(os.waitpid(step, 0)[1])
if code < 0:  # dies of the step's signal, leaving no core file of its own
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    signal.signal(-code, signal.SIG_DFL)
    os.kill(os.getpid(), -code)
os._exit(code)
"""


def launcher(why_fd: int) -> list[str]:
    """What a step's command is run under so that its whole process group is SIGKILLed when the check dies, by
    SIGKILL too, which no handler sees: the step, in a session of its own, would hold the GPU on, recorded nowhere.
    The launcher writes why it cannot run the command (not found, not executable) to ``why_fd``. Empty on other
    systems, where the command is run as it is.

    Not a ``preexec_fn``: the Python that runs around its fork swallows a Ctrl-C or SIGTERM arriving then, and the
    check would wait for the whole step."""
    if not sys.platform.startswith("linux"):
        return []
    return [sys.executable, "-I", "-S", "-c", _LAUNCHER, str(os.getpid()), str(why_fd)]


def skipped_parts(report: Path | None) -> tuple[dict[str, str], int]:
    """The parts a step's JSON says it skipped, with why, and how many parts it holds (none without one)."""
    try:
        parts = json.loads(report.read_text()) if report is not None else {}
    except (OSError, ValueError):  # not written: the step failed or was stopped first
        return {}, 0
    return {name: part["skipped"] for name, part in parts.items() if part.get("skipped")}, len(parts)


# SIGTERM, as ``timeout`` and ``make`` send; SIGHUP, as a closed terminal or a dropped ssh connection sends; SIGQUIT.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)


class Interrupted(Exception):
    """The check was asked to stop by a signal of STOP_SIGNALS."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def stop_on_signals() -> None:
    """Makes each of STOP_SIGNALS raise, as Ctrl-C does, so the running step is stopped and recorded instead of left
    behind: they would end the check at once, and the step, in a session of its own, would run on."""
    def handler(signum: int, frame: object) -> None:
        raise Interrupted(signum)
    for signum in STOP_SIGNALS:
        signal.signal(signum, handler)


def stop_signal(stop: BaseException) -> signal.Signals:
    """The signal that stopped the check: one of STOP_SIGNALS, or SIGINT for Ctrl-C (KeyboardInterrupt)."""
    return signal.Signals(stop.signum) if isinstance(stop, Interrupted) else signal.SIGINT


# A step is not started with less time than this left in the budget: it would only be killed.
MIN_STEP_S = 20


def table(outcomes: list[Outcome]) -> str:
    width = max(len(o.name) for o in outcomes)
    lines = [f"{'step'.ljust(width)}  status   seconds  detail"]
    lines += [f"{o.name.ljust(width)}  {o.status:<7}  {o.seconds:7.1f}  {o.detail}" for o in outcomes]
    return "\n".join(lines)


def headline_ratios(results: Path, device: str) -> str:
    """hetrain's speedup per op case from the newest op benchmark of this device, if one ran."""
    files = sorted(results.glob(f"*-{device}-ops.json"))
    if not files:
        return "headline ratios: no op benchmark recorded on this device"
    rows = json.loads(files[-1].read_text())["rows"]
    lines = [f"headline ratios ({files[-1].name}): hetrain speedup per case"]
    for r in rows:
        ratios = ", ".join(f"{k} {v:.2f}x" for k, v in r["speedup"].items())
        lines.append(f"  {r['op']} {r['shape']} {r['dtype']}: {ratios}")
    return "\n".join(lines)


def parse_names(text: str, names: set[str], option: str) -> set[str]:
    """``"env, bench-ops"`` -> those step names, refusing any that is no step (a typo would run what it meant
    to skip, or nothing at all)."""
    chosen = {item.strip() for item in text.split(",") if item.strip()}
    if not chosen and option == "--only":
        raise SystemExit(f"gpu-check: --only names no step; the steps are {sorted(names)}")
    unknown = sorted(chosen - names)
    if unknown:
        raise SystemExit(f"gpu-check: {option} names no step: {unknown}; the steps are {sorted(names)}")
    return chosen


def out_dir(text: str) -> Path:
    """An argparse type: the results directory, absolute (the steps run in the repository root: a relative one
    would put their results elsewhere than the record), created and tried with a file, so that one the check cannot
    write to is refused before any step runs."""
    path = Path(text).resolve()
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: a file, not a directory; pass a directory for the results")
    return writable_directory(path, text)


def writable_directory(path: Path, text: str) -> Path:
    """``path`` created if missing and tried with a file; else an argparse error naming ``text``, as given."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"{text}: not a writable directory ({exc.strerror or exc}); "
                                         "pass a directory for the results") from None
    return path


def positive_seconds(text: str) -> float:
    """An argparse type: seconds above 0, and finite (the record is JSON, which has no Infinity)."""
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be seconds above 0, got {text}")
    if value == math.inf:
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds, got {text} (leave it out for no budget)")
    return value


def parse_caps(text: str, names: set[str]) -> dict[str, float]:
    """``"cuda-tests=150, bench-ops=200"`` -> seconds per step, refusing names that are no step."""
    caps = {}
    for item in filter(None, (item.strip() for item in text.split(","))):
        name, _, seconds = (part.strip() for part in item.partition("="))
        try:  # float decides, not str.isdigit: "²" is a digit that float refuses
            value = float(seconds)
        except ValueError:
            value = math.nan  # refused below
        if name not in names or not 0 <= value < math.inf:
            raise SystemExit(f"gpu-check: --cap wants STEP=SECONDS with STEP one of {sorted(names)} and SECONDS a "
                             f"number of at least 0; got {item!r}")
        if name in caps:  # one of the two would be dropped without a word
            raise SystemExit(f"gpu-check: --cap gives {name} twice ({caps[name]:g} s and {seconds} s); give it once")
        caps[name] = value
    return caps


def time_limit(step: Step, cap: float | None, budget_left: float | None) -> float:
    """The most ``step`` may run: its cap where one is given (the user's explicit wish, above the default timeout
    too), else the default timeout; never more than the budget leaves."""
    limit = step.timeout_s if cap is None else cap
    return limit if budget_left is None else min(limit, budget_left)


def new_record(out: Path, stem: str) -> str:
    """The name of this run's log and JSON, ``<stem>-check``, or ``<stem>-check-2``, ``-3``... where an earlier run
    left its own: a rerun the same day (of a failed step, with --only) keeps the first run's record. Creates the
    log, so that two runs started together cannot both take one name."""
    n = 1
    while True:
        record = f"{stem}-check" + (f"-{n}" if n > 1 else "")
        try:
            if not (out / f"{record}.json").exists():
                (out / f"{record}.log").open("x").close()
                return record
        except FileExistsError:
            pass
        n += 1


def write_record(path: Path, budget_s: float | None, outcomes: list[Outcome], log_path: Path) -> None:
    """The check's JSON: the machine, the versions and every step's outcome so far."""
    record = {"date": dt.date.today().isoformat(), "device": card(), "torch": torch.__version__,
              "cuda": torch.version.cuda, "budget_s": budget_s, "steps": [asdict(o) for o in outcomes],
              "log": log_path.name}
    path.write_text(json.dumps(record, indent=2))


def chosen_steps(parser: argparse.ArgumentParser, args: argparse.Namespace,
                 names: set[str]) -> tuple[set[str] | None, set[str], dict[str, float]]:
    """``--only``, ``--skip`` and ``--cap`` read, refusing a choice under which no step would run: the check would
    pass having checked nothing."""
    only = parse_names(args.only, names, "--only") if args.only is not None else None
    skip = parse_names(args.skip, names, "--skip")
    selected = (names if only is None else only) - skip
    if not selected:
        parser.error(f"--skip {args.skip} takes out every step selected: nothing would run; skip fewer steps")
    caps = parse_caps(args.cap, names)
    if all(caps.get(name, math.inf) < MIN_STEP_S for name in selected):
        parser.error(f"--cap {args.cap}: every step selected ({', '.join(sorted(selected))}) is capped under the "
                     f"{MIN_STEP_S} s a step is given at least, so no step would run; cap one at {MIN_STEP_S} s or "
                     "more")
    return only, skip, caps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build, verify and benchmark hetrain on this machine.")
    parser.add_argument("--quick", action="store_true", help="short benchmark mode")
    parser.add_argument("--only", help="comma-separated steps to run")
    parser.add_argument("--skip", default="", help="comma-separated steps to skip")
    parser.add_argument("--out", type=out_dir, default=str(RESULTS),
                        help="where the JSON and the log go (a second run the same day adds -2, -3... to their names)")
    parser.add_argument("--budget-s", type=positive_seconds, default=None,
                        help=f"seconds for all steps together: each gets at most what the steps before it left, and "
                             f"one that would start with under {MIN_STEP_S} s left is skipped (a GPU lent for "
                             "minutes)")
    parser.add_argument("--cap", default="",
                        help=f"comma-separated STEP=SECONDS: the most a step may take, in place of the default "
                             f"{DEFAULT_STEP_TIMEOUT_S} s (higher or lower), so one slow step leaves time to the "
                             "later ones")
    args = parser.parse_args(argv)
    only, skip, caps = chosen_steps(parser, args, {s.name for s in steps(args.quick, args.out)})
    if args.budget_s is not None and args.budget_s < MIN_STEP_S:  # every step would be skipped, and the check pass
        parser.error(f"--budget-s {args.budget_s:g}: under the {MIN_STEP_S} s a step is given at least, so no step "
                     f"would run; give at least {MIN_STEP_S} s, or leave --budget-s out for no budget")
    stop_on_signals()
    record = new_record(args.out, f"{dt.date.today().isoformat()}-{card()}")
    log_path, record_path = args.out / f"{record}.log", args.out / f"{record}.json"
    outcomes: list[Outcome] = []
    stopped: BaseException | None = None
    with open(log_path, "a") as log:
        for step in steps(args.quick, args.out, record):
            if stopped is not None:
                outcome = Outcome(step.name, "skipped", 0.0, why_skipped(step, only, skip) or "interrupted")
            else:
                budget_left = budget_after(args.budget_s, outcomes)
                step_start, partials_before = time.perf_counter(), partial_results(args.out)
                try:
                    outcome = run_or_skip(step, why_skipped(step, only, skip), caps.get(step.name), budget_left,
                                          args.budget_s, log, args.out)
                except (KeyboardInterrupt, Interrupted) as stop:
                    stopped = stop
                    detail = f"interrupted ({stop_signal(stop).name}); its processes were stopped"
                    outcome = Outcome(step.name, "failed", time.perf_counter() - step_start,
                                      with_partials(detail, partials_before, args.out))
                    log.write(f"\n===== gpu-check interrupted ({stop_signal(stop).name}) during {step.name}: the "
                              "later steps are not run\n")
            outcomes.append(outcome)
            # Recorded after every step, and before it is printed, so a run cut short from outside still leaves
            # what it did.
            write_record(record_path, args.budget_s, outcomes, log_path)
            say(f"[gpu-check] {outcome.name}: {outcome.status} {outcome.detail}".rstrip())
    say("\n" + table(outcomes))
    if any(o.name == "bench-ops" and o.status == "passed" for o in outcomes):
        say("\n" + headline_ratios(args.out, card()))
    say(f"\nlog: {log_path}\nrecord: {record_path}")
    if stopped is not None:
        return 128 + stop_signal(stopped)
    if all(o.status == "skipped" for o in outcomes):  # it checked nothing: no pass
        say("\ngpu-check: no step ran, so nothing was checked; select a step this machine can run (the table says "
            "why each was skipped)")
        return 1
    return 1 if any(o.status == "failed" for o in outcomes) else 0


def budget_after(budget_s: float | None, outcomes: list[Outcome]) -> float | None:
    """What ``--budget-s`` leaves after the steps so far: the budget less the time they took (None without one).
    The check's own work around them takes milliseconds; counted too, it left a budget of exactly MIN_STEP_S
    short of it for the first step, which was skipped, and the check passed."""
    return None if budget_s is None else budget_s - sum(o.seconds for o in outcomes)


def say(text: str) -> None:
    """Prints ``text`` where the terminal may be gone (the SIGHUP of a dropped ssh connection): the check goes on
    to record the rest."""
    with contextlib.suppress(OSError):
        print(text, flush=True)


def run_or_skip(step: Step, reason: str | None, cap: float | None, budget_left: float | None,
                budget_s: float | None, log: TextIO, out: Path | None = None) -> Outcome:
    """Runs ``step`` within its time limit, or records why it was skipped (``reason``, or too little time)."""
    left = time_limit(step, cap, budget_left)
    if reason is None and left < MIN_STEP_S:
        reason = (f"capped at {cap:g} s, under the {MIN_STEP_S} s a step is given at least" if left == cap
                  else f"out of the time budget ({budget_s:g} s)")
    if reason:
        return Outcome(step.name, "skipped", 0.0, reason)
    # Which limit stops it: the budget ending is no sign of a hung step, as its own limit is.
    if left == budget_left and left < time_limit(step, cap, None):
        cut_off = f"stopped at the end of the {budget_s:g} s budget"
    else:
        cut_off = f"timed out at its {cap:g} s cap" if cap is not None else None
    return run_step(step, log, left, cut_off, out)


if __name__ == "__main__":
    sys.exit(main())
