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

from hetrain.nn._share import forward_replaced, taking_hooks_of
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
    """What ``patch`` swapped: module path -> "OldType -> NewType"; ``also``: a further path of a module (or run)
    held at several -> the path it is listed under first."""

    swapped: dict[str, str] = field(default_factory=dict)
    also: dict[str, str] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.swapped) - len(self.also)  # modules and runs, each once however many paths hold it

    def __str__(self) -> str:
        if not self.swapped:
            return "hetrain.nn.patch: nothing to swap"
        lines = [f"hetrain.nn.patch: swapped {len(self.swapped) - len(self.also)} module(s)"]
        for path, change in self.swapped.items():
            if path not in self.also:
                others = [other for other, first in self.also.items() if first == path]
                lines.append(f"  {path}{' (also ' + ', '.join(others) + ')' if others else ''}: {change}")
        return "\n".join(lines)


def patch(model: torch.nn.Module) -> PatchReport:
    """Replaces every matching submodule of ``model`` in place and reports what changed.

    A module held at several paths (one LayerNorm shared by two parents) becomes one fused module at all of
    them, so it stays shared and a second ``patch`` finds nothing left to swap. A twin keeps its module's hooks,
    whose handles still remove them; a module whose forward was replaced on the instance is left alone (its twin
    would run that forward, not the fused one), and so is one compiled in place with ``Module.compile()`` (its
    compiled call runs that module).
    """
    convert = SWAPS.get(type(model))
    if convert is not None:
        raise ValueError(f"hetrain.nn.patch: the model itself is a torch.nn.{type(model).__name__}, which patch "
                         f"cannot replace in place (it swaps submodules); use "
                         f"hetrain.nn.{convert.__self__.__name__}.from_torch(model), which "
                         "shares its parameters")
    report = PatchReport()
    runs = swap_sequences(model)
    report.swapped.update(runs)
    fused: dict[int, torch.nn.Module] = {}  # id of a torch module -> its twin, made once
    for path, module in list(model.named_modules(remove_duplicate=False)):
        convert = SWAPS.get(type(module))
        # Compiled in place (Module.compile()): its compiled call is bound to it, so a twin would not run fused.
        if convert is None or forward_replaced(module) or module._compiled_call_impl is not None:
            continue
        if id(module) not in fused:
            fused[id(module)] = taking_hooks_of(convert(module), module)
        new = fused[id(module)]
        model.set_submodule(path, new)
        report.swapped[path] = f"{type(module).__name__} -> {type(new).__module__}.{type(new).__name__}"
    # A swapped module, or a run (its Sequential and its first child's name: two Sequentials may share that child)
    # -> the first path it is listed under.
    first: dict[tuple[int, str], str] = {}
    for path in report.swapped:
        if path in runs:
            parent, _, name = path.rpartition(".")
            key = (id(model.get_submodule(parent)), name)
        else:
            key = (id(model.get_submodule(path)), "")  # no child is named ""
        first_path = first.setdefault(key, path)
        if first_path != path:
            report.also[path] = first_path
    return report
