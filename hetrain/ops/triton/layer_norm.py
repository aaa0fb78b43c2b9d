"""Triton LayerNorm over the last dimension: forward and backward kernels and their launchers.

One program normalises one row held whole in registers, so rows up to ``MAX_FUSED_BYTES`` (counted
in the accumulation dtype) fit; longer rows are refused with an error naming the limit.
Forward saves only mean and rstd.
Backward gives each program a contiguous block of rows and writes one partial dW/dB row per
program, summed afterwards: no contended atomics, and a deterministic result.
"""

from __future__ import annotations

import itertools
import struct

import torch
import triton
import triton.language as tl

from hetrain.ops._op import compute_dtype
from hetrain.ops.triton._aot import AotSpec, BenchShapes, aot_spec, config_widths
from hetrain.ops.triton._rows import (
    backward_programs,
    dense,
    partial_rows,
    row_config,
    sum_partials,
    tl_compute,
)

# 32 KiB of fp32/fp64 row data per program: past it the backward kernel spills registers on sm_80/sm_90
# (16384 fp32 elements spill 2 KB; measured with `make gpu-compile`).
MAX_FUSED_BYTES = 32768


def float_arg(v: float) -> int:
    """A float >= 0 (eps, a dropout scale) as a kernel argument that keeps its float64 value on a GPU: the bits of
    ``-v`` as an int64, read back by :func:`float_value`.

    A Python float would be typed fp32, so float64 kernels would normalise with eps rounded to fp32 (1e-50 to 0:
    NaN on a constant row). Negated, the sign bit is set, so the int is never in int32 range and Triton types it
    i64 for every value, 0 included (the bits of 0.0 would be typed i32); ``abs`` sets it for -0.0 too.
    """
    return struct.unpack("<q", struct.pack("<d", -abs(v)))[0]


@triton.jit
def float_value(bits, COMPUTE: tl.constexpr):
    """The float :func:`float_arg` encoded in ``bits``, in the COMPUTE dtype."""
    return -bits.to(tl.float64, bitcast=True).to(COMPUTE)


@triton.jit
def _normalize_row(x, W, B, cols, mask, N, eps, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
                   COMPUTE: tl.constexpr):
    """LayerNorm of one row ``x`` (BLOCK_N values, COMPUTE dtype, zero past N): returns y, mean, rstd."""
    mean = tl.sum(x, axis=0) / N
    xc = tl.where(mask, x - mean, 0.0)
    var_eps = tl.sum(xc * xc, axis=0) / N + eps
    # NaN, not 1 / sqrt(inf) = 0, for a row whose variance overflows: y and dx then show the row as torch's do
    # (csrc/layer_norm_math.h's rstd). A NaN var_eps fails the compare too.
    rstd = tl.where(var_eps < float("inf"), 1.0 / tl.sqrt(var_eps), float("nan"))
    y = xc * rstd
    if HAS_WEIGHT:
        y = y * tl.load(W + cols, mask=mask, other=0.0).to(COMPUTE)
    if HAS_BIAS:
        y = y + tl.load(B + cols, mask=mask, other=0.0).to(COMPUTE)
    return y, mean, rstd


@triton.jit
def _row_input_grad(dy, x, w, mean, rstd, mask, N):
    """Gradient of one row's LayerNorm input, and its normalised input xhat; ``w`` is the weight or 1."""
    xhat = tl.where(mask, (x - mean) * rstd, 0.0)
    g = dy * w
    mean_g = tl.sum(g, axis=0) / N
    mean_gx = tl.sum(g * xhat, axis=0) / N
    return (g - mean_g - xhat * mean_gx) * rstd, xhat


# eps varies per call: never specialised on its value, so one compilation serves all.
@triton.jit(do_not_specialize=["eps_bits"])
def _layer_norm_fwd(
    X,  # (M, N) input, rows stride_x apart
    Y,  # (M, N) output, rows stride_y apart
    W,  # (N,) weight, read only if HAS_WEIGHT
    B,  # (N,) bias, read only if HAS_BIAS
    Mean,  # (M,) saved mean, COMPUTE dtype
    Rstd,  # (M,) saved 1/std, COMPUTE dtype
    stride_x,
    stride_y,
    N,
    eps_bits,  # float_arg(eps): its float64 value, whatever COMPUTE is
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    COMPUTE: tl.constexpr,  # tl.float32, or tl.float64 for float64 inputs
    BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(COMPUTE)
    eps = float_value(eps_bits, COMPUTE)
    y, mean, rstd = _normalize_row(x, W, B, cols, mask, N, eps, HAS_WEIGHT, HAS_BIAS, COMPUTE)
    tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)
    tl.store(Mean + row, mean)
    tl.store(Rstd + row, rstd)


@triton.jit
def _layer_norm_bwd(
    DY,  # (M, N) upstream gradient, rows stride_dy apart
    X,  # (M, N) forward input, rows stride_x apart
    W,  # (N,) weight, read only if HAS_WEIGHT
    Mean,  # (M,) saved mean
    Rstd,  # (M,) saved 1/std
    DX,  # (M, N) input gradient, rows stride_dx apart
    DW_part,  # (programs, N) partial weight gradients, COMPUTE dtype
    DB_part,  # (programs, N) partial bias gradients, COMPUTE dtype
    stride_dy,
    stride_x,
    stride_dx,
    M,
    N,
    rows_per_program,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    COMPUTE: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    if HAS_WEIGHT:
        w = tl.load(W + cols, mask=mask, other=0.0).to(COMPUTE)
    else:
        w = 1.0
    dw = tl.zeros((BLOCK_N,), dtype=COMPUTE)
    db = tl.zeros((BLOCK_N,), dtype=COMPUTE)
    row_start = pid.to(tl.int64) * rows_per_program  # int64 row offsets: M * N may pass 2**31
    row_end = tl.minimum(row_start + rows_per_program, M)
    for r in range(row_start, row_end):
        x = tl.load(X + r * stride_x + cols, mask=mask, other=0.0).to(COMPUTE)
        dy = tl.load(DY + r * stride_dy + cols, mask=mask, other=0.0).to(COMPUTE)
        dx, xhat = _row_input_grad(dy, x, w, tl.load(Mean + r), tl.load(Rstd + r), mask, N)
        tl.store(DX + r * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)
        dw += dy * xhat
        db += dy
    if HAS_WEIGHT:
        tl.store(DW_part + pid * N + cols, dw, mask=mask)
    if HAS_BIAS:
        tl.store(DB_part + pid * N + cols, db, mask=mask)


def launch_config(N: int, dtype: torch.dtype) -> dict:
    """Block size and warps the launchers use for rows of ``N`` elements of ``dtype``."""
    return row_config("layer_norm", N, dtype, MAX_FUSED_BYTES)


def forward(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x: (M, N). Returns y (M, N), mean (M,), rstd (M,)."""
    M, N = x.shape
    weight, bias = dense(weight), dense(bias)
    if x.stride(-1) != 1:
        x = x.contiguous()
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    stats = compute_dtype(x.dtype)
    mean = torch.empty(M, dtype=stats, device=x.device)
    rstd = torch.empty(M, dtype=stats, device=x.device)
    if M == 0:
        return y, mean, rstd
    cfg = launch_config(N, x.dtype)
    _layer_norm_fwd[(M,)](
        x, y, weight if weight is not None else x, bias if bias is not None else x, mean, rstd,
        x.stride(0), y.stride(0), N, float_arg(eps),
        HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, COMPUTE=tl_compute(x.dtype),
        BLOCK_N=cfg["BLOCK_N"], num_warps=cfg["num_warps"],
    )
    return y, mean, rstd


def backward(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, mean: torch.Tensor, rstd: torch.Tensor,
    has_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns dx (M, N), dw (N,) or empty, db (N,) or empty."""
    M, N = x.shape
    weight = dense(weight)
    if x.stride(-1) != 1:
        x = x.contiguous()
    if dy.stride(-1) != 1:
        dy = dy.contiguous()
    dx = torch.empty((M, N), dtype=x.dtype, device=x.device)
    stats = compute_dtype(x.dtype)
    programs = backward_programs(M, x.device)
    parts = partial_rows((weight is not None) + has_bias, programs, N, M, stats, x.device)
    dw_part = parts[0] if weight is not None else parts
    db_part = parts[-1] if has_bias else parts
    if M > 0:
        cfg = launch_config(N, x.dtype)
        _layer_norm_bwd[(programs,)](
            dy, x, weight if weight is not None else x, mean, rstd, dx, dw_part, db_part,
            dy.stride(0), x.stride(0), dx.stride(0), M, N, triton.cdiv(M, programs),
            HAS_WEIGHT=weight is not None, HAS_BIAS=has_bias, COMPUTE=tl_compute(x.dtype),
            BLOCK_N=cfg["BLOCK_N"], num_warps=cfg["num_warps"],
        )
    sums = sum_partials(parts, x.dtype)
    return dx, sums[0] if weight is not None else x.new_empty(0), sums[-1] if has_bias else x.new_empty(0)


def aot_specs(shapes: BenchShapes) -> list[AotSpec]:
    """Every compilation the launchers can cause, for the ahead-of-time check (hetrain.checks.gpu_compile).

    One row width per configuration ``launch_config`` can choose, for every dtype, marked picked where
    a benchmark width and dtype select it. At the benchmark widths all four weight/bias variants are compiled;
    elsewhere the weight-and-bias variant, which does the most work, stands for the others.
    """
    specs = []
    programs = max(1, min(shapes.rows, 4 * shapes.sm_count))  # as _programs_for_backward on a GPU
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        stats, compute = compute_dtype(dtype), tl_compute(dtype)
        for n, benchmarked in config_widths(launch_config, dtype, shapes.hidden).items():
            cfg = launch_config(n, dtype)
            picked = benchmarked and dtype in shapes.dtypes
            variants = itertools.product((True, False), repeat=2) if picked else [(True, True)]
            for has_weight, has_bias in variants:
                flags = {"HAS_WEIGHT": has_weight, "HAS_BIAS": has_bias, "COMPUTE": compute, "BLOCK_N": cfg["BLOCK_N"]}
                fwd = {"X": dtype, "Y": dtype, "W": dtype, "B": dtype, "Mean": stats, "Rstd": stats,
                       "stride_x": n, "stride_y": n, "N": n, "eps_bits": float_arg(1e-5)}
                bwd = {"DY": dtype, "X": dtype, "W": dtype, "Mean": stats, "Rstd": stats, "DX": dtype,
                       "DW_part": stats, "DB_part": stats, "stride_dy": n, "stride_x": n, "stride_dx": n,
                       "M": shapes.rows, "N": n, "rows_per_program": triton.cdiv(shapes.rows, programs)}
                for kernel, args in ((_layer_norm_fwd, fwd), (_layer_norm_bwd, bwd)):
                    specs.append(aot_spec(kernel, {**args, **flags}, dtype=dtype, picked=picked,
                                          num_warps=cfg["num_warps"]))
    return specs

