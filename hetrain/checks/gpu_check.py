"""``make gpu-check``: build, verify and benchmark everything in one command, with a table at the end.

On a GPU machine: build ``hetrain._C`` with its CUDA sources, print the environment, compile every
kernel for sm_90/sm_80, run every ``cuda``-marked test, then the benchmarks in a short mode; record
``benchmarks/results/<date>-<device>-check.json`` and its log (``-check-2``... for a later run the same day, which
keeps the earlier one's), and regenerate ``benchmarks/RESULTS.md``.
On a machine without a GPU the same command runs what can run there and names each skipped step
and why. A failing step does not stop the later ones; the exit code is non-zero if any failed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
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
    env: dict[str, str | None] = field(default_factory=dict)  # None unsets a variable
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
        Step("cuda-tests", [py, "-m", "pytest", "-v", "-m", "cuda", *pytest_workers(), "tests"], needs_gpu=True,
             env={"TRITON_INTERPRET": "0"}),
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


def run_step(step: Step, log: TextIO, timeout_s: float) -> Outcome:
    start = time.perf_counter()
    log.write(f"\n===== {step.name}: {' '.join(step.command)}\n")
    log.flush()
    # TRITON_INTERPRET=0 keeps the tests' default (the interpreter) off: cuda tests run the compiled kernels.
    # Unbuffered, as a step killed for its time never flushes: what it printed would be lost from the log.
    env = {k: v for k, v in {**os.environ, "PYTHONUNBUFFERED": "1", **step.env}.items() if v is not None}
    # A session of its own, so a step out of time is stopped with everything it started: a build's ninja and
    # nvcc jobs, or pytest's workers, would otherwise go on compiling or using the GPU during the next steps.
    proc = subprocess.Popen(step.command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        returncode = proc.wait(timeout=timeout_s)
        status, detail = ("passed", "") if returncode == 0 else ("failed", f"exit code {returncode}")
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        status, detail = "failed", f"timed out after {timeout_s:.0f} s"
    except BaseException:  # Ctrl-C, or SIGTERM (see stop_on_sigterm): the step's processes stop with the check
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    skipped, parts = skipped_parts(step.parts)
    if skipped:
        named = "; ".join(f"{name} skipped: {why}" for name, why in skipped.items())
        detail = f"{detail}; {named}" if detail else named
        if status == "passed" and len(skipped) == parts:  # it checked nothing
            status = "skipped"
    return Outcome(step.name, status, time.perf_counter() - start, detail)


def skipped_parts(report: Path | None) -> tuple[dict[str, str], int]:
    """The parts a step's JSON says it skipped, with why, and how many parts it holds (none without one)."""
    try:
        parts = json.loads(report.read_text()) if report is not None else {}
    except (OSError, ValueError):  # not written: the step failed or was stopped first
        return {}, 0
    return {name: part["skipped"] for name, part in parts.items() if part.get("skipped")}, len(parts)


class Interrupted(Exception):
    """The check was asked to stop (SIGTERM, as ``timeout`` sends)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def stop_on_sigterm() -> None:
    """Makes SIGTERM raise, as Ctrl-C does, so the running step is stopped and recorded instead of left behind."""
    def handler(signum: int, frame: object) -> None:
        raise Interrupted(signum)
    signal.signal(signal.SIGTERM, handler)


def stop_signal(stop: BaseException) -> signal.Signals:
    """The signal that stopped the check: SIGTERM, or SIGINT for Ctrl-C (KeyboardInterrupt)."""
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
        if name not in names or not seconds.replace(".", "", 1).isdigit():
            raise SystemExit(f"gpu-check: --cap wants STEP=SECONDS with STEP one of {sorted(names)}; got {item!r}")
        if name in caps:  # one of the two would be dropped without a word
            raise SystemExit(f"gpu-check: --cap gives {name} twice ({caps[name]:g} s and {seconds} s); give it once")
        caps[name] = float(seconds)
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build, verify and benchmark hetrain on this machine.")
    parser.add_argument("--quick", action="store_true", help="short benchmark mode")
    parser.add_argument("--only", help="comma-separated steps to run")
    parser.add_argument("--skip", default="", help="comma-separated steps to skip")
    parser.add_argument("--out", type=Path, default=RESULTS,
                        help="where the JSON and the log go (a second run the same day adds -2, -3... to their names)")
    parser.add_argument("--budget-s", type=positive_seconds, default=None,
                        help=f"wall-clock seconds for all steps: each gets at most what is left, and steps that "
                             f"would start with under {MIN_STEP_S} s left are skipped (a GPU lent for minutes)")
    parser.add_argument("--cap", default="",
                        help=f"comma-separated STEP=SECONDS: the most a step may take, in place of the default "
                             f"{DEFAULT_STEP_TIMEOUT_S} s (higher or lower), so one slow step leaves time to the "
                             "later ones")
    args = parser.parse_args(argv)
    # The steps run in the repository root: a relative --out would put their results elsewhere than the record.
    args.out = args.out.resolve()
    names = {s.name for s in steps(args.quick, args.out)}
    only = parse_names(args.only, names, "--only") if args.only is not None else None
    skip = parse_names(args.skip, names, "--skip")
    caps = parse_caps(args.cap, names)
    stop_on_sigterm()
    args.out.mkdir(parents=True, exist_ok=True)
    record = new_record(args.out, f"{dt.date.today().isoformat()}-{card()}")
    log_path, record_path = args.out / f"{record}.log", args.out / f"{record}.json"
    outcomes: list[Outcome] = []
    stopped: BaseException | None = None
    start = time.perf_counter()
    with open(log_path, "a") as log:
        for step in steps(args.quick, args.out, record):
            if stopped is not None:
                outcome = Outcome(step.name, "skipped", 0.0, why_skipped(step, only, skip) or "interrupted")
            else:
                budget_left = None if args.budget_s is None else args.budget_s - (time.perf_counter() - start)
                step_start = time.perf_counter()
                try:
                    outcome = run_or_skip(step, why_skipped(step, only, skip), caps.get(step.name), budget_left,
                                          args.budget_s, log)
                except (KeyboardInterrupt, Interrupted) as stop:
                    stopped = stop
                    outcome = Outcome(step.name, "failed", time.perf_counter() - step_start,
                                      f"interrupted ({stop_signal(stop).name}); its processes were stopped")
                    log.write(f"\n===== gpu-check interrupted ({stop_signal(stop).name}) during {step.name}: the "
                              "later steps are not run\n")
            outcomes.append(outcome)
            print(f"[gpu-check] {outcome.name}: {outcome.status} {outcome.detail}".rstrip(), flush=True)
            # Recorded after every step, so a run cut short from outside still leaves what it did.
            write_record(record_path, args.budget_s, outcomes, log_path)
    print("\n" + table(outcomes))
    if any(o.name == "bench-ops" and o.status == "passed" for o in outcomes):
        print("\n" + headline_ratios(args.out, card()))
    print(f"\nlog: {log_path}\nrecord: {record_path}")
    if stopped is not None:
        return 128 + stop_signal(stopped)
    return 1 if any(o.status == "failed" for o in outcomes) else 0


def run_or_skip(step: Step, reason: str | None, cap: float | None, budget_left: float | None,
                budget_s: float | None, log: TextIO) -> Outcome:
    """Runs ``step`` within its time limit, or records why it was skipped (``reason``, or too little time)."""
    left = time_limit(step, cap, budget_left)
    if reason is None and left < MIN_STEP_S:
        reason = (f"capped at {cap:g} s, under the {MIN_STEP_S} s a step is given at least" if left == cap
                  else f"out of the time budget ({budget_s:g} s)")
    return Outcome(step.name, "skipped", 0.0, reason) if reason else run_step(step, log, left)


if __name__ == "__main__":
    sys.exit(main())
