"""What a call of each fused op costs beyond its kernels: forward+backward at tiny shapes, side by side.

Run: ``make bench-overhead`` (``python -m benchmarks.bench_overhead [--device cpu|cuda] [--out DIR]``).
At a few hundred elements the kernels take microseconds, so the time per call is the Python and
dispatch around them: hetrain's functional op beside the torch eager ops it replaces, on the same
inputs, taking turns over rounds, median of each (on a CUDA build also each op's C++/CUDA kernels with
their C++ autograd, ``hetrain_cuda``, where the default is Triton). At BERT-base sizes on a GPU a step
makes some 50 such calls, so this is time the GPU waits. Writes
``benchmarks/results/<date>-<device>-overhead.json``; one with other ``--rounds`` than the default
``-overhead-rounds<n>.json``, so it never overwrites the day's full run; nor does a run cut short, whose result
is kept in ``<name>.partial.json`` until it completes, nor does a run with an op that raised, written as
``<name>-failed.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

import hetrain
from benchmarks.cases import with_cpp_kernels
from benchmarks.cli import (
    check_backend_settings,
    check_device,
    error_text,
    exit_if_any_failed,
    failed_cases,
    int_at_least,
    make_current,
    out_dir,
    result_file,
    save_complete,
    save_partial,
)
from benchmarks.report import markdown_cell
from benchmarks.timing import interleaved_ms
from hetrain import ops
from hetrain.device_info import device_name, result_card

RESULTS = Path(__file__).parent / "results"
ROWS, HIDDEN, VOCAB = 8, 64, 96
MIN_ROUNDS = 3  # the median of 3 rounds leaves out one slow round; of 1 or 2 it shows it as the result
ROUNDS = 5  # a full run's; a run with other rounds is a variant, named after them


def _grad_step(fn: Callable[..., torch.Tensor], inputs: list[torch.Tensor], dy: torch.Tensor | None):
    return lambda: torch.autograd.grad(fn(*inputs), inputs, dy)


def cases(device: str) -> dict[str, dict[str, Callable[[], object]]]:
    """{op: {"torch": fwd+bwd of the unfused torch ops, "hetrain": fwd+bwd of the fused op}}."""
    g = torch.Generator(device="cpu").manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(device).requires_grad_()

    x, r, w, b = randn(ROWS, HIDDEN), randn(ROWS, HIDDEN), randn(HIDDEN), randn(HIDDEN)
    dy = torch.randn(ROWS, HIDDEN, generator=g).to(device)
    weight, target = randn(VOCAB, HIDDEN), torch.randint(VOCAB, (ROWS,), generator=g).to(device)
    img, bn_w, bn_b = randn(2, 8, 6, 6), randn(8), randn(8)
    dimg = torch.randn(2, 8, 3, 3, generator=g).to(device)
    pairs = {
        "layer_norm": ([x, w, b], dy, lambda x, w, b: F.layer_norm(x, (HIDDEN,), w, b),
                       lambda x, w, b: ops.layer_norm(x, w, b)),
        "rms_norm": ([x, w], dy, lambda x, w: F.rms_norm(x, (HIDDEN,), w, 1e-6),
                     lambda x, w: ops.rms_norm(x, w, 1e-6)),
        "bias_gelu": ([x, b], dy, lambda x, b: F.gelu(x + b, approximate="tanh"),
                      lambda x, b: ops.bias_gelu(x, b, "tanh")),
        "dropout": ([x], dy, lambda x: F.dropout(x, 0.1), lambda x: ops.dropout(x, 0.1)),
        "dropout_add_layer_norm": ([x, r, w, b], dy,
                                   lambda x, r, w, b: F.layer_norm(F.dropout(x, 0.1) + r, (HIDDEN,), w, b),
                                   lambda x, r, w, b: ops.dropout_add_layer_norm(x, r, w, b, 0.1)),
        "linear_cross_entropy": ([x, weight], None, lambda x, wt: F.cross_entropy(F.linear(x, wt).float(), target),
                                 lambda x, wt: ops.linear_cross_entropy(x, wt, target)),
        "bn_relu_pool": ([img, bn_w, bn_b], dimg,
                         lambda i, w, b: F.max_pool2d(F.relu(F.batch_norm(i, None, None, w, b, training=True)), 2),
                         lambda i, w, b: ops.bn_relu_pool(i, w, b, None, None, training=True)),
    }
    impls = {op: {"torch": _grad_step(eager, inputs, grad), "hetrain": _grad_step(fused, inputs, grad)}
             for op, (inputs, grad, eager, fused) in pairs.items()}
    for op, (inputs, grad, _eager, fused) in pairs.items():
        cpp = with_cpp_kernels(op, fused, device)
        if cpp is not None:  # on a CUDA build, beside the default (Triton): the C++/CUDA kernels, autograd in C++
            impls[op]["hetrain_cuda"] = _grad_step(cpp, inputs, grad)
    return impls


def run(device: str, rounds: int = 5, save: Callable[[dict], None] = lambda result: None) -> dict:
    """Microseconds per forward+backward call, the median over ``rounds`` of each implementation's median;
    ``save`` gets the rows so far after each op, so a run cut short keeps what it measured. An op that raises is
    recorded with its error and the others still run."""
    rows = []
    for op, impls in cases(device).items():
        try:
            ms = interleaved_ms(impls, rounds, min_reps=50, max_reps=400, budget_s=0.4 * rounds, warmup=(20, 3),
                                device=device)
        except Exception as exc:  # one op's kernel error must not lose the others' results
            rows.append({"op": op, "error": error_text(exc)})
            print(f"{op:24s} FAILED: {rows[-1]['error']}", file=sys.stderr, flush=True)
        else:
            us = {name: 1e3 * v for name, v in ms.items()}
            rows.append({"op": op, "us": us, "ratio": us["hetrain"] / us["torch"]})
            cpp = f"   hetrain_cuda {us['hetrain_cuda']:8.1f} us" if "hetrain_cuda" in us else ""
            print(f"{op:24s} torch {us['torch']:8.1f} us   hetrain {us['hetrain']:8.1f} us{cpp}   "
                  f"ratio {rows[-1]['ratio']:.2f}", flush=True)
        save({"rows": rows})
    return {"rows": rows}


def table(result: dict) -> str:
    lines = ["| op (fwd+bwd, tiny shape) | torch eager us | hetrain us | hetrain_cuda us | hetrain / torch |",
             "|---|---:|---:|---:|---:|"]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['op']} | failed: {markdown_cell(r['error'])} | | | |")
            continue
        cpp = r["us"].get("hetrain_cuda")
        lines.append(f"| {r['op']} | {r['us']['torch']:.1f} | {r['us']['hetrain']:.1f} | "
                     f"{'-' if cpp is None else f'{cpp:.1f}'} | {r['ratio']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rounds", type=int_at_least(MIN_ROUNDS), default=ROUNDS,
                        help=f"interleaved rounds, median across them; at least {MIN_ROUNDS}")
    parser.add_argument("--out", type=out_dir, default=str(RESULTS), help="results directory")
    args = parser.parse_args()
    device = check_device(parser, args.device)
    check_backend_settings(parser, device)
    make_current(device)
    rounds = args.rounds
    header = {"date": dt.date.today().isoformat(),
              "device": device_name(device), "threads": torch.get_num_threads(), "torch": torch.__version__,
              "hetrain": hetrain.__version__, "rounds": rounds,
              "shapes": {"rows": ROWS, "hidden": HIDDEN, "vocab": VOCAB}}
    path = result_file(args.out, header["date"], result_card(device), "overhead",
                       None if rounds == ROUNDS else f"rounds{rounds}")

    def save(result: dict) -> None:  # after every op, as <name>.partial.json: a run cut short keeps its ops
        save_partial(path, {**header, **result})

    result = run(device, rounds, save)
    written = save_complete(path, {**header, **result}, failed=bool(failed_cases(result["rows"])))
    print(table(result))
    print(f"wrote {written}")
    exit_if_any_failed(result["rows"], written)


if __name__ == "__main__":
    main()
