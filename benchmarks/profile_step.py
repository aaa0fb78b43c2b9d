"""Where a BERT training step spends its time, by kind of op: what is left to fuse, measured.

Run: ``python -m benchmarks.profile_step [--device cpu|cuda] [--shape recipe|base] [--bf16]
[--attention-dropout P] [--out DIR]``.
Profiles a few optimiser steps of the fused model (forward, cross-entropy, backward, fused AdamW) with
torch's profiler and sorts each op's self time into GEMMs, attention, hetrain's fused ops, the Python of the
model's stage ranges, the optimizer, embeddings, the loss, data movement and "other" (elementwise ops and
reductions outside any fused op: the candidates for fusion), then lists the largest "other" ops. An op whose
own name says nothing counts as attention inside attention's forward or backward (the pieces of its decomposed
form: softmax, dropout mask, scaling, the reshapes of its matmuls), elsewhere as the nearest op it runs inside (an
embedding's index_select is the embedding's; a Linear's bias gradient, a sum inside AddmmBackward0, the GEMM's).
Writes ``benchmarks/results/<date>-<card>-step-profile.json`` (``<card>``: the GPU's name, or ``cpu``), with
``-<shape>`` where the shape is not the device's default and ``-steps<n>`` where ``--steps`` is not.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import re
from collections import defaultdict
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.autograd.profiler_util import FunctionEvent

import hetrain
from benchmarks.bench_train import FULL, Mode, Shape, build_model, make_batch, train_step
from benchmarks.cli import (
    check_backend_settings,
    check_device,
    make_current,
    out_dir,
    positive_int,
    probability,
    result_file,
    save_complete,
)
from hetrain.device_info import device_name, result_card

RESULTS = Path(__file__).parent / "results"
# The bert_split recipe's model and a typical token-budget batch of it (2048 tokens).
RECIPE = Shape(vocab_size=256, hidden=128, layers=2, heads=4, seq=64, batch=32, num_classes=4)
SHAPES = {"recipe": RECIPE, "base": FULL}
STEPS = 3  # profiled steps of a run named after its shape alone
ATTENTION = "attention"
STAGE = "stage overhead"

# First match wins: (kind, substrings of the op name). A model's stages run in ``hetrain::stage <name>`` ranges
# (hetrain.placement.pipeline): their self time is the Python between ops, not fused work, so they match first.
KINDS = [
    (STAGE, ("hetrain::stage ",)),
    ("hetrain fused", ("hetrain",)),
    (ATTENTION, ("scaled_dot_product", "flash_attention", "efficient_attention", "_attention")),
    ("gemm", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "gemm", "aten::matmul", "aten::linear")),
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


BACKWARD = "autograd::engine::evaluate_function: "  # the profiler's range of one autograd node's backward


def _ancestors(event: FunctionEvent | None) -> Iterator[FunctionEvent]:
    """``event`` and the ops it runs in (its profiler parents), innermost first."""
    while event is not None:
        yield event
        event = event.cpu_parent


def _named_kind(name: str) -> str:
    """The kind ``name`` says, an autograd node's range counting as the forward op it differentiates."""
    return kind_of(_forward_op(name) if name.startswith(BACKWARD) else name)


def _in_attention(event: FunctionEvent, nodes: set[tuple[int, int]]) -> bool:
    """Whether ``event`` runs inside attention: an attention op, or in the backward a node attention's forward
    created (among ``nodes``), is it or encloses it."""
    node = _backward_node(event)
    if node is not None and (node.fwd_thread, node.sequence_nr) in nodes:
        return True
    return any(_named_kind(e.name) == ATTENTION for e in _ancestors(event))


def _forward_op(node: str) -> str:
    """The forward op an autograd node's range stands for, as aten names it: ``...: AddmmBackward0`` ->
    ``aten::addmm``, ``NllLossBackward0`` -> ``aten::nll_loss``, so that :func:`kind_of` can sort it. A C++ node
    (``torch::autograd::AccumulateGrad``, hetrain's ``CppNode<hetrain::...>``) keeps its own name."""
    name = node.removeprefix(BACKWARD)
    derivative = re.fullmatch(r"([A-Za-z0-9]+)Backward\d*", name)
    if derivative is None:
        return name
    return "aten::" + re.sub(r"(?<!^)(?=[A-Z])", "_", derivative[1]).lower()


def _backward_node(event: FunctionEvent) -> FunctionEvent | None:
    """The autograd node whose backward ``event`` runs in; None for an op of the forward or the optimizer."""
    return next((e for e in _ancestors(event) if e.name.startswith(BACKWARD)), None)


def attention_nodes(events: Iterable[FunctionEvent]) -> set[tuple[int, int]]:
    """(forward thread, sequence number) of the autograd nodes that attention's forward created.

    A backward op's profiler parents are autograd nodes, not attention: the link is the sequence number a node
    shares with the forward op that created it. Every op records the number the next node will get, so the
    last op to start with a number created that node or runs inside the op that did."""
    last: dict[tuple[int, int], FunctionEvent] = {}
    for event in events:
        if event.sequence_nr >= 0 and _backward_node(event) is None:
            key = (event.thread, event.sequence_nr)
            if key not in last or event.time_range.start >= last[key].time_range.start:
                last[key] = event
    return {key for key, event in last.items() if _in_attention(event, set())}


def event_kind(event: FunctionEvent, nodes: set[tuple[int, int]]) -> str:
    """``event``'s kind, the first of: the kind its own name says (an ``aten::bmm`` is a GEMM wherever it runs);
    attention, where it runs inside attention's forward or backward (:func:`_in_attention`; ``nodes``: those
    attention's forward created), even under a GEMM op there (the reshapes of decomposed attention's
    ``aten::matmul``); else the kind of the nearest range that says one, itself included, an autograd node's
    range counting as the forward op it differentiates (``evaluate_function: AddmmBackward0`` and a Linear's bias
    gradient inside it, the GEMM's; an embedding's ``aten::index_select``, the embedding's). None of these is a
    fusion candidate of its own. A pipeline stage's range is no op: the ops in it keep their own kind."""
    kind = kind_of(event.key)
    if kind != "other":
        return kind
    if _in_attention(event, nodes):
        return ATTENTION
    for enclosing in _ancestors(event):
        kind = _named_kind(enclosing.name)
        if kind not in ("other", STAGE):
            return kind
    return "other"


def profile(shape: Shape, device: str, bf16: bool, steps: int = 3) -> dict:
    """Self time per op over ``steps`` profiled steps (after two warm-up steps), grouped by kind."""
    model = build_model(shape, fused=True).to(device).train()
    mode = Mode("bf16-mixed", autocast=torch.bfloat16) if bf16 else Mode("fp32")
    step = train_step(model, mode, make_batch(shape, device), torch.device(device).type)
    for _ in range(2):
        step()
    cuda = torch.device(device).type == "cuda"
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        if cuda:
            torch.cuda.synchronize()
    return op_times(prof.events(), cuda, steps)


def op_times(events: list[FunctionEvent], cuda: bool, steps: int) -> dict:
    """Self time per op of ``events`` (``steps`` profiled steps), grouped by kind: device time on CUDA, else CPU.

    On CUDA the profiler keeps each kernel as an event of its own and also adds its time to the op that
    launched it, so only the CPU-side ops count (as in torch's own table): the kernels would count twice and,
    named after themselves, fill "other"."""
    nodes = attention_nodes(events)
    kinds: dict[str, float] = defaultdict(float)
    other: dict[str, float] = defaultdict(float)
    for event in events:
        if cuda and event.device_type != DeviceType.CPU:
            continue
        us = event.self_device_time_total if cuda else event.self_cpu_time_total
        if us > 0 and not event.key.startswith("ProfilerStep"):
            kind = event_kind(event, nodes)
            kinds[kind] += us / steps / 1e3
            if kind == "other":
                other[event.key] += us / steps / 1e3
    total = sum(kinds.values())
    return {
        "step_ms": total,
        "kinds": {k: {"ms": ms, "share": ms / total} for k, ms in sorted(kinds.items(), key=lambda kv: -kv[1])},
        "top_other": [{"op": name, "ms": ms, "share": ms / total}
                      for name, ms in sorted(other.items(), key=lambda kv: -kv[1])[:12]],
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
    parser.add_argument("--attention-dropout", type=probability, default=None,
                        help="dropout inside SDPA; default: the model's dropout (0.1)")
    parser.add_argument("--steps", type=positive_int, default=STEPS, help="profiled steps, after two warm-up steps")
    parser.add_argument("--out", type=out_dir, default=str(RESULTS), help="results directory")
    args = parser.parse_args()
    device = check_device(parser, args.device)
    check_backend_settings(parser, device)
    make_current(device)
    default_shape = "base" if torch.device(device).type == "cuda" else "recipe"
    shape_name = args.shape or default_shape
    shape = dataclasses.replace(SHAPES[shape_name], attention_dropout=args.attention_dropout)
    result = profile(shape, device, args.bf16, args.steps)
    print(table(result))
    record = {"date": dt.date.today().isoformat(), "device": device_name(device),
              "threads": torch.get_num_threads(), "torch": torch.__version__, "hetrain": hetrain.__version__,
              "shape": shape_name, "attention_dropout": shape.attention_dropout, "bf16": args.bf16,
              "steps": args.steps, **result}
    path = result_file(args.out, record["date"], result_card(device), "step-profile",
                       None if shape_name == default_shape else shape_name, "bf16" if args.bf16 else None,
                       None if args.attention_dropout is None else f"attn{args.attention_dropout:g}",
                       None if args.steps == STEPS else f"steps{args.steps}")
    save_complete(path, record)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
