"""``swap_sequences(model)``: every ``nn.Sequential`` holding a fusable run of consecutive children
(Conv2d -> BatchNorm2d -> ReLU -> MaxPool2d, Conv2d -> ReLU -> MaxPool2d, Linear -> GELU) becomes a
:class:`FusedSequential`, in place.

A FusedSequential keeps its children exactly as they were; only its forward changes: a fusable run is
computed by hetrain's kernels from the children's own parameters and buffers, read on every call. So
whatever a model's code does with the children sees torch's modules: ``seq[0]`` is still the Linear,
``seq[1](x)`` still applies the GELU, a slice holds the same modules, and the state_dict, ``.to()`` and
checkpoints are those of the unpatched model.

Each call decides again which runs to fuse: a run whose modules carry hooks runs module by module (fused,
a Linear's hook would see the GELU's output and a GELU's would never run), as does one with a child whose
forward was replaced on the instance (a LoRA adapter patched in that way would be skipped) and one whose
children were replaced since patching. Hooks that only measure (hetrain's FLOP counter, memory and churn
profiling; see :func:`hetrain.nn._share.observer`) leave a run fused, so
measuring does not change the numbers a step computes: they see the run as part of the FusedSequential.

Only exact ``nn.Sequential`` containers and exact torch layer types are matched (a subclass may change its
forward); a run the kernels cannot take (e.g. ``MaxPool2d(ceil_mode=True)``) is left to torch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from hetrain.nn._share import called_one_by_one, forward_replaced, is_nested
from hetrain.nn.conv_bn_relu_pool import (
    ConvBNReLUPool2d,
    ConvReLUPool2d,
    conv_bn_relu_pool_forward,
    conv_relu_pool_forward,
    unfusable_reason,
)
from hetrain.ops.bias_gelu import bias_gelu


def _batched_image(x: torch.Tensor) -> bool:
    """(N, C, H, W): what the conv blocks' kernels take. An unbatched (C, H, W) image, which the torch modules also
    take, runs through them, with their own answer (the Conv2d and MaxPool2d take it, BatchNorm2d refuses it)."""
    return x.dim() == 4


@dataclass(frozen=True)
class _Run:
    """A kind of fusable run: its torch types, whether these modules' settings fit the kernel, its fused forward."""

    types: tuple[type[nn.Module], ...]
    fits: Callable[[list[nn.Module]], bool]
    forward: Callable[..., torch.Tensor]  # (x, *the run's modules)
    kernel: str
    takes: Callable[[torch.Tensor], bool] = lambda x: True  # inputs the kernel takes; others run module by module

    def describe(self) -> str:
        return " -> ".join(t.__name__ for t in self.types) + f" fused ({self.kernel})"


_RUNS = (
    _Run((nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d), lambda m: unfusable_reason(*m) is None,
         lambda x, conv, bn, _relu, pool: conv_bn_relu_pool_forward(x, conv, bn, pool), "hetrain.ops.bn_relu_pool",
         _batched_image),
    _Run((nn.Conv2d, nn.ReLU, nn.MaxPool2d), lambda m: unfusable_reason(m[0], None, m[1], m[2]) is None,
         lambda x, conv, _relu, pool: conv_relu_pool_forward(x, conv, pool), "hetrain.ops.relu_pool", _batched_image),
    _Run((nn.Linear, nn.GELU), lambda m: m[0].bias is not None,
         lambda x, linear, gelu: bias_gelu(F.linear(x, linear.weight), linear.bias, gelu.approximate),
         "hetrain.ops.bias_gelu"),
)
def _run_at(modules: list[nn.Module], i: int) -> _Run | None:
    """The run whose types and settings match ``modules`` from ``i``, none of them with its forward replaced, if any.
    Hooks are not looked at: they come and go (a FlopCounterMode, a temporary hook), so patching while some are
    registered still patches, and each call checks them."""
    for run in _RUNS:
        part = modules[i:i + len(run.types)]
        if (len(part) == len(run.types) and all(type(m) is t for m, t in zip(part, run.types, strict=True))
                and not any(forward_replaced(m) for m in part) and run.fits(part)):
            return run
    return None


class FusedSequential(nn.Sequential):
    """An ``nn.Sequential`` whose fusable runs of children run through hetrain's kernels (module docstring)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 - nn.Sequential's own argument name
        x = input
        modules = list(self._modules.values())
        i = 0
        while i < len(modules):
            run = _run_at(modules, i)
            # A nested tensor, which torch's modules take (some layouts) and the kernels do not, runs through them.
            if (run is None or is_nested(x) or not run.takes(x)
                    or called_one_by_one(modules[i:i + len(run.types)])):
                x = modules[i](x)
                i += 1
            else:
                x = run.forward(x, *modules[i:i + len(run.types)])
                i += len(run.types)
        return x


# hetrain's containers whose forward may compute some of their children without calling them.
FUSING_CONTAINERS: tuple[type[nn.Module], ...] = (ConvBNReLUPool2d, ConvReLUPool2d, FusedSequential)


def swap_sequences(model: nn.Module) -> dict[str, str]:
    """Makes every Sequential with a fusable run a FusedSequential; returns {path of each run's first child: run},
    a Sequential held at several paths listed at each."""
    report: dict[str, str] = {}
    runs: dict[int, list[tuple[str, str]]] = {}  # id of a Sequential -> its runs' (first child's name, run)
    for path, seq in list(model.named_modules(remove_duplicate=False)):
        if id(seq) not in runs:
            if type(seq) is not nn.Sequential:
                continue
            runs[id(seq)] = _fuse_runs(seq)
        for name, run in runs[id(seq)]:
            report[f"{path}.{name}" if path else name] = run
    return report


def _fuse_runs(seq: nn.Sequential) -> list[tuple[str, str]]:
    """Makes ``seq`` a FusedSequential if it holds a fusable run; returns each run's (first child's name, run)."""
    found = []
    names, modules = list(seq._modules), list(seq._modules.values())
    i = 0
    while i < len(modules):
        run = _run_at(modules, i)
        if run is None:
            i += 1
            continue
        found.append((names[i], run.describe()))
        seq.__class__ = FusedSequential
        i += len(run.types)
    return found
