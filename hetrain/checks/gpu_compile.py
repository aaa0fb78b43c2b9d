"""``python -m hetrain.checks.gpu_compile``: every kernel compiled for Hopper (sm_90) and Ampere (sm_80), no GPU needed.

Triton kernels are compiled for every dtype and configuration their launchers can choose; ``.cu``
files with nvcc. Prints registers, spills and shared memory per kernel, dtype and configuration,
and exits 1 on a compile error, on a kernel without an AotSpec, or on spills in a configuration the
launcher picks at a benchmark shape. A part that cannot run here (no nvcc) says so and is skipped.
Run with TRITON_INTERPRET unset: ``env -u TRITON_INTERPRET python -m hetrain.checks.gpu_compile``.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from dataclasses import asdict
from pathlib import Path

from hetrain.checks import cuda_compile, triton_aot
from hetrain.checks.report import PartResult, format_table

ARCHS = (90, 80)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m hetrain.checks.gpu_compile",
                                description="Compiles every kernel for sm_90 and sm_80 and reports its resources.")
    p.add_argument("--triton", action="store_true", help="check Triton kernels only (default: both parts)")
    p.add_argument("--cuda", action="store_true", help="check .cu files only (default: both parts)")
    p.add_argument("--triton-module", action="append", metavar="MODULE",
                   help="a module name or .py path to check instead of every module of hetrain.ops.triton "
                        "(repeatable)")
    p.add_argument("--cu", action="append", type=Path, metavar="PATH",
                   help="a .cu file to check instead of every .cu under csrc/ (repeatable)")
    p.add_argument("--json", type=Path, metavar="PATH", help="also write the rows, problems and skips as JSON")
    p.add_argument("--arch", action="append", type=int, choices=ARCHS, metavar="SM",
                   help=f"an architecture to compile for instead of all of {', '.join(map(str, ARCHS))} (repeatable; "
                        "the test suite checks 90 alone, the target, in half the time)")
    return p


def run(argv: list[str] | None = None) -> int:
    """Runs the selected parts, printing each one's table and problems (and rewriting the JSON) as soon as it
    ends: a run cut off by a time limit keeps the parts it finished. Returns the exit status."""
    args = _parser().parse_args(argv)
    both = not (args.triton or args.cuda)
    archs = tuple(dict.fromkeys(args.arch)) if args.arch else ARCHS
    checks = {"triton": lambda: triton_aot.check(args.triton_module, archs),
              "cuda": lambda: cuda_compile.check(args.cu, archs)}
    chosen = [name for name in checks if both or getattr(args, name)]
    parts: dict[str, PartResult] = {}
    for name in chosen:
        try:
            parts[name] = checks[name]()
        except Exception as exc:  # a part that breaks must not take the other part, or the JSON, with it
            traceback.print_exc()
            parts[name] = PartResult(problems=[f"the {name} part stopped: {type(exc).__name__}: {exc} (traceback "
                                               "above)"])
        print_part(name, parts[name], archs)
        if args.json is not None:
            write_json(args.json, parts)
    problems = [problem for part in parts.values() for problem in part.all_problems()]
    skipped = [name for name, part in parts.items() if part.skipped is not None]
    verdict = f"FAILED, {len(problems)} problem(s)" if problems else "ok"
    print(f"gpu-compile: {verdict}" + (f" (skipped: {', '.join(skipped)})" if skipped else ""))
    return 1 if problems else 0


def print_part(name: str, part: PartResult, archs: tuple[int, ...] = ARCHS) -> None:
    """One part's table and problems, flushed: stdout is a file under gpu-check, which would hold them back until
    the process ends, and one killed for its time never does."""
    if part.skipped is not None:
        print(f"{name}: SKIPPED: {part.skipped}\n", flush=True)
        return
    names = ", ".join(f"sm_{a}" for a in archs)
    print(f"{name}: {len(part.rows)} kernel builds for {names} in {part.seconds:.1f} s")
    if part.rows:
        print(format_table(part.rows))
    print(flush=True)
    for problem in part.all_problems():
        print(f"FAILED: {problem}\n", file=sys.stderr, flush=True)


def write_json(path: Path, parts: dict[str, PartResult]) -> None:
    """The rows, problems and skips of the parts finished so far."""
    path.write_text(json.dumps({
        name: {"rows": [asdict(r) for r in part.rows], "problems": part.all_problems(),
               "skipped": part.skipped, "seconds": part.seconds}
        for name, part in parts.items()
    }, indent=1))


if __name__ == "__main__":
    sys.exit(run())
