"""``patch(model)``: swaps standard submodules for their fused twins in place.

Single modules go by a table of ``torch type -> converter``: each fused twin keeps the torch module's
parameters and state_dict layout. Runs of modules inside an ``nn.Sequential`` (Conv2d -> BatchNorm2d ->
ReLU -> MaxPool2d, Linear -> GELU) go by ``patch_sequences``, which leaves the children in place and
changes only the Sequential's forward. No model code needs rewriting and checkpoints load both ways.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from hetrain.nn.layer_norm import LayerNorm
from hetrain.nn.patch_sequences import swap_sequences
from hetrain.nn.rms_norm import RMSNorm

# Exact types only: a subclass of a torch layer may change its forward, so it is left alone.
SWAPS: dict[type, Callable[[torch.nn.Module], torch.nn.Module]] = {
    torch.nn.LayerNorm: LayerNorm.from_torch,
    torch.nn.RMSNorm: RMSNorm.from_torch,
}


@dataclass
class PatchReport:
    """What ``patch`` swapped: module path -> "OldType -> NewType"."""

    swapped: dict[str, str] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.swapped)

    def __str__(self) -> str:
        if not self.swapped:
            return "hetrain.nn.patch: nothing to swap"
        lines = [f"hetrain.nn.patch: swapped {len(self.swapped)} module(s)"]
        lines += [f"  {path}: {change}" for path, change in self.swapped.items()]
        return "\n".join(lines)


def patch(model: torch.nn.Module) -> PatchReport:
    """Replaces every matching submodule of ``model`` in place and reports what changed.

    A module held at several paths (one LayerNorm shared by two parents) becomes one fused module at all of
    them, so it stays shared and a second ``patch`` finds nothing left to swap.
    """
    report = PatchReport()
    report.swapped.update(swap_sequences(model))
    fused: dict[int, torch.nn.Module] = {}  # id of a torch module -> its twin, made once
    for path, module in list(model.named_modules(remove_duplicate=False)):
        convert = SWAPS.get(type(module))
        if convert is None or not path:
            continue
        if id(module) not in fused:
            fused[id(module)] = convert(module)
        new = fused[id(module)]
        model.set_submodule(path, new)
        report.swapped[path] = f"{type(module).__name__} -> {type(new).__module__}.{type(new).__name__}"
    return report
