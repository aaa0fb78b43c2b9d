"""``torch.compile`` applied stage by stage ("regional compilation"), the ``compile`` setting of a run.

Why each placement stage and not the whole model: a stage is what placement puts on one device and what
the pipeline split calls once per micro-batch, so each compiled graph stays on one device and serves every
micro-batch, and the forward pre-hooks that move a stage's inputs between devices run around it. BERT's
encoder blocks are instances of one class: with torch inlining module calls (its default), they share one
compiled graph, so twelve blocks compile once rather than the whole model as one large graph.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

import torch._dynamo
from torch import nn
from torch._dynamo import trace_rules


def has_sparse_gradients(stage: nn.Module) -> bool:
    """Whether a stage holds an embedding with sparse gradients, whose backward AOT autograd cannot trace (the
    row indices it finds have a data-dependent count): compiling such a stage fails at its first backward."""
    return any(isinstance(m, nn.Embedding) and m.sparse for m in stage.modules())


def compile_stages(stages: Mapping[str, nn.Module], mode: str = "default", backend: str = "inductor",
                   fullgraph: bool = False, dynamic: bool | None = None) -> dict[str, Any]:
    """Compiles each stage in place (``nn.Module.compile``: the module, its parameters, state dict keys and hooks stay
    as they are), except stages with sparse-gradient embeddings, which stay eager; returns the settings, how many
    stages were compiled (``stages``) and the names of those left eager (``eager``), for the run summary. Raises
    dynamo's recompile limits, for the whole process, to leave room for every stage (see below).

    ``mode``: inductor's (``default``, ``reduce-overhead`` for CUDA graphs, ``max-autotune``...); ``backend``:
    ``inductor`` or any of ``torch._dynamo.list_backends()`` (``aot_eager`` traces without generating code).
    """
    if not stages:
        raise ValueError("hetrain: compile: the model has no stages to compile")
    eager = [name for name, stage in stages.items() if has_sparse_gradients(stage)]
    # Dynamo caches graphs per code object, and stages of one class (a block's forward) share theirs, as stages with
    # torch's own forward share the wrapper's (below): each stage's parameter shapes, grad mode and train/eval mode
    # add entries to the one cache, and past recompile_limit (8) a stage runs eagerly (under fullgraph the run
    # fails). Room for eight per stage.
    limit = 8 * (len(stages) + 1)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, limit)
    torch._dynamo.config.accumulated_recompile_limit = max(torch._dynamo.config.accumulated_recompile_limit, limit)
    for name, stage in stages.items():
        if name not in eager:
            # nn.Module.compile compiles the stage's _call_impl, a frame dynamo skips, and traces the forward called
            # from there; torch's own forwards (nn.Sequential, nn.Linear) it skips too, so such a stage ran eagerly
            # (under fullgraph: "found no compiled frames"). For those, wrap_top_frame has it call _call_impl from a
            # wrapper frame dynamo traces, as torch.compile(stage) does after the same trace_rules check; unlike
            # torch.compile(stage), the stage stays the same module, its state dict keys without "_orig_mod.".
            wrap = trace_rules.check(stage.forward)
            with torch._dynamo.config.patch(wrap_top_frame=True) if wrap else contextlib.nullcontext():
                stage.compile(mode=mode, backend=backend, fullgraph=fullgraph, dynamic=dynamic)
    return {"mode": mode, "backend": backend, "fullgraph": fullgraph, "dynamic": dynamic,
            "stages": len(stages) - len(eager), "eager": eager}


def compile_counts(since: Mapping[str, int] | None = None) -> dict[str, int]:
    """Graphs compiled, graph breaks met (each a part left to eager) and frames left to eager whole (``eager_frames``:
    dynamo gave up on a call, e.g. at its recompile limit, and runs that code eagerly from then on, with no graph
    break counted), from dynamo's counters, since the counts ``since`` (an earlier call's) where given: a person sees
    whether the stages compiled whole. The counters are the process's, so a sweep's later jobs would count the
    earlier jobs' graphs too."""
    counters = torch._dynamo.utils.counters
    counts = {"graphs": int(counters["stats"]["unique_graphs"]),
              "graph_breaks": int(sum(counters["graph_break"].values())),
              "eager_frames": int(counters["frames"]["total"] - counters["frames"]["ok"])}
    return {key: value - (since or {}).get(key, 0) for key, value in counts.items()}
