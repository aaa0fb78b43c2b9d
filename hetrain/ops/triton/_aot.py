"""How a Triton kernel module describes the compilations its launchers can cause.

Each module under ``hetrain.ops.triton`` that defines ``@triton.jit`` kernels also defines
``aot_specs(shapes: BenchShapes) -> list[AotSpec]``, built from its launcher's own config function,
so ``python -m hetrain.checks.gpu_compile`` can compile every kernel ahead of time for Hopper and
Ampere on a machine without a GPU. A kernel with no spec (and not called from one that has a spec)
fails that check.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class BenchShapes:
    """The dtypes and shapes the benchmarks run: configurations a launcher picks at these must not spill."""

    dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16)  # float64 is never benchmarked
    rows: int = 16384  # BERT-base tokens per batch: 32 sequences of 512
    hidden: tuple[int, ...] = (768, 3072, 4096)  # BERT-base hidden and FFN widths, a 7B model's hidden width
    vocab: int = 30522  # BERT's vocabulary
    sm_count: int = 132  # an H100 SXM, for launchers that size their grid by the number of SMs


@dataclass(frozen=True)
class AotSpec:
    """One compilation a launcher can cause: the kernel, its typed signature, constexprs and launch options."""

    kernel: Any  # a triton.JITFunction
    signature: dict[str, str]  # parameter -> Triton type ("*fp16", "i32", "fp32") or "constexpr"
    constexprs: dict[str, Any]
    attrs: dict[tuple[int, ...], list] = field(default_factory=dict)  # divisibility hints, as Triton's launcher adds
    options: dict[str, Any] = field(default_factory=dict)  # e.g. num_warps; Triton's defaults for the rest
    dtype: str = ""  # the input dtype, for the report
    picked: bool = False  # the launcher picks this configuration at a benchmark shape


def aot_spec(kernel: Any, args: Mapping[str, Any], *, dtype: torch.dtype, picked: bool, **options: Any) -> AotSpec:
    """The compilation the launcher causes with ``kernel[grid](**args, **options)``.

    ``args`` names every parameter; tensors are given by their torch dtype. Values are typed and
    specialised by Triton's own rule (an int equal to 1 becomes a constexpr, multiples of 16 and
    tensor pointers get a divisibility hint), so the check compiles exactly what a launch would.
    """
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend
    from triton.runtime.jit import MockTensor

    names = [p.name for p in kernel.params]
    if set(args) != set(names):
        raise ValueError(f"aot_spec({kernel.__name__}): missing {sorted(set(names) - set(args))}, "
                         f"unknown {sorted(set(args) - set(names))}")
    signature: dict[str, str] = {}
    constexprs: dict[str, Any] = {}
    attrs: dict[tuple[int, ...], list] = {}
    for i, p in enumerate(kernel.params):
        value = args[p.name]
        if p.is_constexpr:
            signature[p.name], constexprs[p.name] = "constexpr", value
            continue
        if p.annotation_type:
            raise ValueError(f"aot_spec({kernel.__name__}): parameter {p.name} has a type annotation, "
                             "which this helper does not model; build its AotSpec by hand")
        ty, attr = native_specialize_impl(BaseBackend, MockTensor.wrap_dtype(value), p.is_const,
                                          not p.do_not_specialize, not p.do_not_specialize_on_alignment)
        signature[p.name] = ty
        if ty == "constexpr":
            constexprs[p.name] = attr
        elif attr:
            attrs[(i,)] = BaseBackend.parse_attr(attr)
    return AotSpec(kernel, signature, constexprs, attrs, options, str(dtype).removeprefix("torch."), picked)


def config_widths(launch_config: Any, dtype: torch.dtype, hidden: tuple[int, ...]) -> dict[int, bool]:
    """A row width for each configuration ``launch_config(n, dtype)`` can choose -> whether a benchmark width
    picks it (the benchmark width itself stands for its configuration). Widths the launcher refuses end the walk."""

    def config(n: int) -> tuple | None:
        try:
            return tuple(sorted(launch_config(n, dtype).items()))
        except ValueError:  # rows too long for the fused kernel: the launcher refuses them
            return None

    widths: dict[tuple, tuple[int, bool]] = {}
    for n in hidden:
        if (key := config(n)) is not None:
            widths.setdefault(key, (n, True))
    n = 1
    while (key := config(n)) is not None:
        widths.setdefault(key, (n, False))
        n *= 2
    return dict(widths.values())
