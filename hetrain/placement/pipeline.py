"""The GPipe schedule behind a pipeline split, free of Lightning: micro-batches through stages on devices.

A model takes part by exposing ``stages()`` (name -> module, in forward order) and ``run_stage(name, x,
*inputs)`` (one stage on the previous stage's output ``x`` and the micro-batch's own inputs), and by
calling :func:`gpipe_forward` from its forward when it is asked for more than one micro-batch.

Forward follows the GPipe clock: at tick ``t`` stage ``s`` runs micro-batch ``t - s``. Work is issued
from one thread; a GPU stage's kernels run asynchronously on its device while the thread goes on to
issue the CPU stage's next micro-batch, so devices overlap without a thread per stage. Copies to a
GPU are ``non_blocking``; a copy to the host is synchronous, because the CPU reads it next. Backward is
autograd's, through the same graph, so outputs and gradients equal the unsplit model's up to the
order of floating-point sums. Every stage and micro-batch runs in a named ``record_function`` range.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

RunStage = Callable[..., torch.Tensor]


def _to(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    return x.to(device, non_blocking=device.type != "cpu")


def stage_device(stage: nn.Module) -> torch.device:
    return next(stage.parameters()).device


def gpipe_forward(stages: Sequence[tuple[str, nn.Module]], run_stage: RunStage, inputs: Sequence[torch.Tensor],
                  micro_batches: int) -> torch.Tensor:
    """Runs ``inputs`` (batch-first tensors) through ``stages`` in ``micro_batches`` pieces; returns the whole output.

    ``run_stage(name, x, *inputs)`` runs one stage; the first stage gets ``x = inputs[0]``. Micro-batch
    sizes differ by at most one when the batch does not divide evenly.
    """
    batch = inputs[0].shape[0]
    m = max(1, min(micro_batches, batch))
    pieces = [torch.tensor_split(t, m) for t in inputs]  # pieces[k][i]: input k of micro-batch i
    acts: list[torch.Tensor | None] = [None] * m
    devices = [stage_device(stage) for _, stage in stages]
    for tick in range(m + len(stages) - 1):
        for s in reversed(range(len(stages))):  # later stages first: they consume the previous tick's outputs
            i = tick - s
            if not 0 <= i < m:
                continue
            name, device = stages[s][0], devices[s]
            own = [_to(p[i], device) for p in pieces]
            x = own[0] if s == 0 else _to(acts[i], device)
            with torch.profiler.record_function(f"hetrain::stage {name} micro-batch {i}"):
                acts[i] = run_stage(name, x, *own)
    return torch.cat(acts)


def shared_across_devices(stages: Sequence[tuple[str, nn.Module]],
                          devices: Mapping[str, torch.device | str]) -> list[tuple[str, str]]:
    """Parameters used by two stages that ``devices`` puts on different devices, as pairs of paths.

    Checked before anything moves: one parameter object lives on one device only, and moving the
    second stage would either drag the first stage's weight along or silently untie the two (an
    input embedding tied to an output head).
    """
    first_use: dict[int, tuple[str, str]] = {}  # parameter -> (stage, path) of its first use
    clashes = []
    for name, stage in stages:
        for pname, p in stage.named_parameters(remove_duplicate=False):
            owner, path = first_use.setdefault(id(p), (name, f"{name}.{pname}"))
            if owner != name and torch.device(devices[owner]) != torch.device(devices[name]):
                clashes.append((path, f"{name}.{pname}"))
    return clashes
