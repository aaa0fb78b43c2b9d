"""Triton per-row softmax cross-entropy over a chunk of logits: loss, and d(loss)/d(logits) in place.

One program owns one row of ``V`` logits and walks it in blocks of ``BLOCK_V``, so any vocabulary
fits: pass one keeps a running max and a running sum of exponentials (online logsumexp), pass two
rewrites the row with its gradient ``(softmax - smoothed one-hot) * scale``. The logits come from a
cuBLAS GEMM the caller ran; this kernel only replaces the softmax/loss/grad work around it.
"""

from __future__ import annotations

import itertools

import torch
import triton
import triton.language as tl

from hetrain.ops._op import compute_dtype
from hetrain.ops.triton._aot import AotSpec, BenchShapes, aot_spec
from hetrain.ops.triton._rows import tl_compute

# Largest block one program holds in registers: 4096 float32 (2048 float64) values, 16 per thread at 8 warps.
MAX_BLOCK_BYTES = 16384


@triton.jit
def _cross_entropy_rows(
    Logits,  # (M, V) logits in COMPUTE dtype, rows stride_l apart; overwritten with gradients if WRITE_GRAD
    Loss,  # (M,) per-row loss, COMPUTE dtype
    Target,  # (M,) int64 class per row; ignore_index marks a row without loss
    Scale,  # (M,) gradient scale per row, stride_s apart (0: one scale for all rows); read if WRITE_GRAD
    Coef,  # (2,) COMPUTE dtype: 1 - label_smoothing, label_smoothing / V (a float arg would be float32)
    stride_l,
    stride_s,
    V,
    ignore_index,
    WRITE_GRAD: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    COMPUTE: tl.constexpr,  # tl.float32, or tl.float64 for float64 logits
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = Logits + row * stride_l  # int64 offsets: M * V passes 2**31 at realistic vocabularies
    target = tl.load(Target + row)
    ignored = target == ignore_index
    cols = tl.arange(0, BLOCK_V)

    # Pass one: running max m and running sum s of exp(z - m); for smoothing, the sum of m - z (every logit's
    # distance below the max, per lane).
    m = tl.max(tl.load(base + cols, mask=cols < V, other=float("-inf")).to(COMPUTE), axis=0)
    s = tl.zeros((BLOCK_V,), dtype=COMPUTE)
    below = tl.zeros((BLOCK_V,), dtype=COMPUTE)
    for start in range(0, V, BLOCK_V):
        mask = start + cols < V
        z = tl.load(base + start + cols, mask=mask, other=float("-inf")).to(COMPUTE)
        m_new = tl.maximum(m, tl.max(z, axis=0))
        # While every logit so far is -inf, shift by 0: exp(-inf - -inf) would make the sum NaN.
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - shift) + tl.where(mask, tl.exp(z - shift), 0.0)
        if HAS_SMOOTHING:
            # A larger max moves each lane's start // BLOCK_V earlier logits (every block before this one is full)
            # m_new - m further below it. A logit at the max (-inf ones included) adds 0: both operands are
            # selected, so -inf - -inf is never formed.
            rose = m_new > m
            below += (tl.where(rose, m_new, 0.0) - tl.where(rose, m, 0.0)) * (start // BLOCK_V)
            under = mask & (z < m_new)
            below += tl.where(under, m_new, 0.0) - tl.where(under, z, 0.0)
        m = m_new
    log_s = tl.log(tl.sum(s, axis=0))

    keep = tl.load(Coef)  # weight of the target's log-probability, 1 - eps
    spread = tl.load(Coef + 1)  # weight of every class's log-probability, eps / V
    in_range = (target >= 0) & (target < V)
    z_target = tl.load(base + target, mask=in_range & ~ignored, other=0.0).to(COMPUTE)
    # loss = (1 - eps) * (lse - z_t) + eps * mean_j(lse - z_j), as distances below m: lse - z_t rounded a small
    # loss at the logits' magnitude, and the sum of the logits overflowed (csrc/linear_cross_entropy_math.h).
    loss = log_s + keep * (m - z_target)
    if HAS_SMOOTHING:
        loss += spread * tl.sum(below, axis=0)
    tl.store(Loss + row, tl.where(ignored, 0.0, loss))

    if WRITE_GRAD:
        scale = tl.load(Scale + row * stride_s).to(COMPUTE)
        for start in range(0, V, BLOCK_V):
            idx = start + cols
            mask = idx < V
            z = tl.load(base + idx, mask=mask, other=0.0).to(COMPUTE)
            # softmax = exp((z - m) - log_s): exp(z - (m + log_s)) rounded m + log_s at m's magnitude, 6% off at 2^20.
            g = tl.exp((z - m) - log_s) - spread
            g = tl.where(idx == target, g - keep, g)
            # An ignored row gets exact zeros, even where scale is inf (a mean over zero tokens).
            g = tl.where(ignored, 0.0, g * scale)
            tl.store(base + idx, g.to(Logits.dtype.element_ty), mask=mask)


def launch_config(V: int, dtype: torch.dtype) -> dict:
    """Block size and warps the launcher uses for rows of ``V`` logits of ``dtype``: the block is bounded in
    the accumulation dtype, which the kernel's running sums use whatever the logits' dtype."""
    cap = MAX_BLOCK_BYTES // compute_dtype(dtype).itemsize
    block_v = min(triton.next_power_of_2(max(V, 1)), cap)
    return {"BLOCK_V": block_v, "num_warps": min(max(block_v // 512, 1), 8)}


def rows(
    logits: torch.Tensor, loss: torch.Tensor, target: torch.Tensor, scale: torch.Tensor | None,
    ignore_index: int, label_smoothing: float,
) -> None:
    """logits (M, V) float32/float64, or bf16/fp16 (computed in float32), rows contiguous; writes loss (M,)
    and, if ``scale`` is given, the gradient into ``logits``. ``scale`` is (M,), any stride (0 broadcasts
    one value)."""
    M, V = logits.shape
    if logits.stride(-1) != 1:
        raise ValueError("hetrain.linear_cross_entropy (triton): logits rows must be contiguous")
    if M == 0:
        return
    cfg = launch_config(V, logits.dtype)
    # Filled by kernels, never copied from the host: a copy would sync and cannot be captured in a CUDA graph.
    coef = logits.new_full((2,), label_smoothing / V, dtype=compute_dtype(logits.dtype))
    coef[:1].fill_(1.0 - label_smoothing)
    _cross_entropy_rows[(M,)](
        logits, loss, target, scale if scale is not None else logits, coef,
        logits.stride(0), scale.stride(0) if scale is not None else 0, V, ignore_index,
        WRITE_GRAD=scale is not None, HAS_SMOOTHING=label_smoothing > 0, COMPUTE=tl_compute(logits.dtype),
        BLOCK_V=cfg["BLOCK_V"], num_warps=cfg["num_warps"],
    )


def aot_specs(shapes: BenchShapes) -> list[AotSpec]:
    """Every compilation the launcher can cause, for the ahead-of-time check (hetrain.checks.gpu_compile).

    Logits are float32 for float32 inputs, float64 for float64 ones and, on CUDA, bf16/fp16 for bf16/fp16
    ones (float32 where the CPU path copies them). One vocabulary per configuration ``launch_config`` can
    choose; the benchmark vocabulary in float32 and bf16 is marked picked and compiled in every variant
    (gradient or loss only, with or without smoothing), the others in the gradient-and-smoothing variant
    that does the most work. ``stride_s`` 1 (a per-row scale, ``reduction="none"``) is specialised by
    Triton apart from 0 (one scale), so both are compiled.
    """
    specs = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        stats = compute_dtype(dtype)
        vocabs = {tuple(sorted(launch_config(shapes.vocab, dtype).items())): (shapes.vocab, True)}
        v = 1
        while v <= MAX_BLOCK_BYTES // stats.itemsize:
            vocabs.setdefault(tuple(sorted(launch_config(v, dtype).items())), (v, False))
            v *= 2
        for V, benchmarked in vocabs.values():
            cfg = launch_config(V, dtype)
            picked = benchmarked and dtype in (torch.float32, torch.bfloat16)
            variants = itertools.product((True, False), repeat=2) if picked else [(True, True)]
            for write_grad, smoothing in variants:
                for stride_s in (0, 1) if write_grad else (0,):
                    args = {"Logits": dtype, "Loss": stats, "Target": torch.int64, "Scale": stats, "Coef": stats,
                            "stride_l": V, "stride_s": stride_s, "V": V, "ignore_index": -100,
                            "WRITE_GRAD": write_grad, "HAS_SMOOTHING": smoothing, "COMPUTE": tl_compute(dtype),
                            "BLOCK_V": cfg["BLOCK_V"]}
                    specs.append(aot_spec(_cross_entropy_rows, args, dtype=dtype, picked=picked,
                                          num_warps=cfg["num_warps"]))
    return specs
