"""``torch.compile`` applied stage by stage ("regional compilation"), the ``compile`` setting of a run.

Why each placement stage and not the whole model: a stage is what placement puts on one device and what
the pipeline split calls once per micro-batch, so each compiled graph stays on one device and serves every
micro-batch, and the forward pre-hooks that move a stage's inputs between devices run around it. BERT's
encoder blocks are instances of one class: with torch inlining module calls (its default), they share one
compiled graph, so twelve blocks compile once rather than the whole model as one large graph.
"""

from __future__ import annotations

import types
from collections.abc import Mapping
from typing import Any

import torch._dynamo
from torch import nn
from torch._dynamo import trace_rules


def has_sparse_gradients(stage: nn.Module) -> bool:
    """Whether a stage holds an embedding with sparse gradients, whose backward AOT autograd cannot trace (the
    row indices it finds have a data-dependent count): compiling such a stage fails at its first backward."""
    return any(isinstance(m, nn.Embedding) and m.sparse for m in stage.modules())


def _forward(module: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """A stage's own forward called from a frame of hetrain's, which dynamo traces (inlining torch's forward)."""
    return type(module).forward(module, *args, **kwargs)


def _has_torch_forward(stage: nn.Module) -> bool:
    """Whether ``stage`` runs its class's forward and dynamo skips it, as it skips torch's own (nn.Sequential's,
    nn.Linear's). nn.Module.compile compiles the stage's _call_impl, a frame dynamo skips, and traces the forward
    called from there: such a stage would run eagerly (under fullgraph: "found no compiled frames"). A forward replaced
    on the instance (a functools.partial, a callable object) or a TorchScript method is left to nn.Module.compile."""
    forward = stage.forward
    return (isinstance(forward, types.MethodType) and forward.__self__ is stage
            and forward.__func__ is getattr(type(stage), "forward", None) and trace_rules.check(forward))


def compile_stages(stages: Mapping[str, nn.Module], mode: str = "default", backend: str = "inductor",
                   fullgraph: bool = False, dynamic: bool | None = None) -> dict[str, Any]:
    """Compiles each stage in place (``nn.Module.compile``: the module, its parameters, state dict keys and hooks stay
    as they are; a stage with torch's own forward also gets a compiled forward on the instance), except stages with
    sparse-gradient embeddings, which stay eager; returns the settings, how many stages were compiled (``stages``) and
    the names of those left eager (``eager``), for the run summary. Raises dynamo's recompile limits, for the whole
    process, to leave room for every stage (see below).

    ``mode``: inductor's (``default``, ``reduce-overhead`` for CUDA graphs, ``max-autotune``...); ``backend``:
    ``inductor`` or any of ``torch._dynamo.list_backends()`` (``aot_eager`` traces without generating code).
    """
    if not stages:
        raise ValueError("hetrain: compile: the model has no stages to compile")
    eager = [name for name, stage in stages.items() if has_sparse_gradients(stage)]
    # Dynamo caches graphs per code object, and stages of one class (a block's forward) share theirs, as stages with
    # torch's own forward share _forward's (below): each stage's parameter shapes, grad mode and train/eval mode add
    # entries to the one cache, and past recompile_limit (8) a stage runs eagerly (under fullgraph the run fails).
    # Room for eight per stage.
    limit = 8 * (len(stages) + 1)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, limit)
    torch._dynamo.config.accumulated_recompile_limit = max(torch._dynamo.config.accumulated_recompile_limit, limit)
    traced_forward = None
    for name, stage in stages.items():
        if name in eager:
            continue
        stage.compile(mode=mode, backend=backend, fullgraph=fullgraph, dynamic=dynamic)
        # A torch forward is traced from _forward, set as the stage's forward on the instance: its hooks still run
        # outside the graph, from _call_impl (tracing _call_impl would guard the graph on the hooks, and a pipeline
        # split's skip guard, removed before backward, made a checkpoint's recompute compile anew and fail). Compiled
        # in place all the same, the stage reads as compiled to hetrain (nn.patch, the module memory table).
        if _has_torch_forward(stage):
            if traced_forward is None:
                traced_forward = torch.compile(_forward, mode=mode, backend=backend, fullgraph=fullgraph,
                                               dynamic=dynamic)
                # A pickled stage's forward then loads as getattr(stage, "forward"), its class's, uncompiled as
                # nn.Module.compile's compiled call loads (under its own name it would not load at all).
                traced_forward.__name__ = "forward"
            stage.forward = types.MethodType(traced_forward, stage)  # a deepcopy binds it to the copy
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
