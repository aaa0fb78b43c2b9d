"""Where a BERT training step spends its time, by kind of op: what is left to fuse, measured.

Run: ``python -m benchmarks.profile_step [--device cpu|cuda] [--shape recipe|base] [--bf16]
[--attention-dropout P] [--out DIR]``.
Profiles a few optimiser steps of the fused model (forward, cross-entropy, backward, fused AdamW) with
torch's profiler and sorts each op's self time into GEMMs, attention, hetrain's fused ops, the optimizer,
embeddings, the loss, data movement and "other" (elementwise ops and reductions outside any fused op:
the candidates for fusion), then lists the largest "other" ops. Writes
``benchmarks/results/<date>-<device>-step-profile.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
from collections import defaultdict
from pathlib import Path

import torch

import hetrain
from benchmarks.bench_train import FULL, Mode, Shape, build_model, make_batch, train_step
from hetrain.device_info import device_name

RESULTS = Path(__file__).parent / "results"
# The bert_split recipe's model and a typical token-budget batch of it (2048 tokens).
RECIPE = Shape(vocab_size=256, hidden=128, layers=2, heads=4, seq=64, batch=32, num_classes=4)
SHAPES = {"recipe": RECIPE, "base": FULL}

# First match wins: (kind, substrings of the op name).
KINDS = [
    ("hetrain fused", ("hetrain",)),
    ("attention", ("scaled_dot_product", "flash_attention", "efficient_attention", "_attention")),
    ("gemm", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "gemm", "aten::matmul")),
    ("optimizer", ("adamw", "_foreach_", "adam")),
    ("embedding", ("embedding",)),
    ("loss", ("cross_entropy", "log_softmax", "nll_loss")),
    ("data movement", ("aten::copy_", "aten::to", "aten::clone", "aten::contiguous", "aten::cat", "memcpy",
                       "aten::fill_", "aten::zero_", "aten::empty", "aten::zeros", "Memset", "Memcpy")),
]


def kind_of(name: str) -> str:
    low = name.lower()
    for kind, needles in KINDS:
        if any(n.lower() in low for n in needles):
            return kind
    return "other"


def profile(shape: Shape, device: str, bf16: bool, steps: int = 3) -> dict:
    """Self time per op over ``steps`` profiled steps (after two warm-up steps), grouped by kind."""
    model = build_model(shape, fused=True).to(device).train()
    mode = Mode("bf16-mixed", autocast=torch.bfloat16) if bf16 else Mode("fp32")
    step = train_step(model, mode, make_batch(shape, device), torch.device(device).type)
    for _ in range(2):
        step()
    cuda = device.startswith("cuda")
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        if cuda:
            torch.cuda.synchronize()
    ops: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        us = event.self_device_time_total if cuda else event.self_cpu_time_total
        if us > 0 and not event.key.startswith("ProfilerStep"):
            ops[event.key] += us / steps / 1e3
    total = sum(ops.values())
    kinds: dict[str, float] = defaultdict(float)
    for name, ms in ops.items():
        kinds[kind_of(name)] += ms
    other = sorted(((ms, name) for name, ms in ops.items() if kind_of(name) == "other"), reverse=True)
    return {
        "step_ms": total,
        "kinds": {k: {"ms": ms, "share": ms / total} for k, ms in sorted(kinds.items(), key=lambda kv: -kv[1])},
        "top_other": [{"op": name, "ms": ms, "share": ms / total} for ms, name in other[:12]],
    }


def table(result: dict) -> str:
    lines = [f"step (sum of op self times): {result['step_ms']:.2f} ms", "", "| kind | ms | share |",
             "|---|---:|---:|"]
    lines += [f"| {k} | {v['ms']:.2f} | {v['share']:.1%} |" for k, v in result["kinds"].items()]
    lines += ["", "largest ops outside any fused op, GEMM, attention or optimizer:", "", "| op | ms | share |",
              "|---|---:|---:|"]
    lines += [f"| `{r['op']}` | {r['ms']:.3f} | {r['share']:.1%} |" for r in result["top_other"]]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shape", choices=sorted(SHAPES), default=None,
                        help="model and batch; default: base on a GPU, recipe on the CPU")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (the recipes' choice where it is fast)")
    parser.add_argument("--attention-dropout", type=float, default=None,
                        help="dropout inside SDPA; default: the model's dropout (0.1)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS, help="results directory")
    args = parser.parse_args()
    shape_name = args.shape or ("base" if args.device.startswith("cuda") else "recipe")
    shape = dataclasses.replace(SHAPES[shape_name], attention_dropout=args.attention_dropout)
    result = profile(shape, args.device, args.bf16, args.steps)
    print(table(result))
    record = {"date": dt.date.today().isoformat(), "device": device_name(args.device),
              "threads": torch.get_num_threads(), "torch": torch.__version__, "hetrain": hetrain.__version__,
              "shape": shape_name, "attention_dropout": shape.attention_dropout, "bf16": args.bf16, **result}
    args.out.mkdir(parents=True, exist_ok=True)
    tag = "cpu" if args.device == "cpu" else "cuda"
    suffix = ("-bf16" if args.bf16 else "") + ("" if args.attention_dropout is None
                                               else f"-attn{args.attention_dropout:g}")
    path = args.out / f"{record['date']}-{tag}-step-profile{suffix}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
