"""Triton layer_norm(dropout(x, p) + residual): forward and backward kernels and their launchers.

One program normalises one row held whole in registers, so rows up to ``MAX_FUSED_BYTES`` fit;
longer rows are refused with an error naming the limit. The dropout mask is never stored: element
``i`` of the flattened (rows, features) input is kept by the counter hash at ``offset + i`` of the
stream ``seed`` (``dropout.kept``, the mask of every backend), and backward draws it again. Backward
gives each program a band of rows and writes one partial dW/dB row per program, summed afterwards
(deterministic, no atomics).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hetrain.ops._op import compute_dtype
from hetrain.ops.rng import keep_scale
from hetrain.ops.triton._aot import AotSpec, BenchShapes, aot_spec, config_widths
from hetrain.ops.triton._rows import (
    backward_programs,
    dense,
    partial_rows,
    row_config,
    sum_partials,
    tl_compute,
)
from hetrain.ops.triton.dropout import STREAM_ARGS, kept, stream_args, stream_start
from hetrain.ops.triton.layer_norm import _normalize_row, _row_input_grad, float_arg, float_value

# 32 KiB of row data per program, as for LayerNorm.
MAX_FUSED_BYTES = 32768


# The stream, its place, the threshold, scale and eps vary per call: never specialised on their values, so one
# compilation serves all.
@triton.jit(do_not_specialize=[*STREAM_ARGS, "scale_bits", "eps_bits"])
def _dropout_add_layer_norm_fwd(
    X,  # (M, N) dropout input, rows stride_x apart
    R,  # (M, N) residual, rows stride_r apart
    W,  # (N,) weight, read only if HAS_WEIGHT
    B,  # (N,) bias, read only if HAS_BIAS
    Y,  # (M, N) output, contiguous
    Mean,  # (M,) saved mean, COMPUTE dtype
    Rstd,  # (M,) saved 1/std, COMPUTE dtype
    Stream,  # int64 (seed, offset), read only if stream_in_memory (else empty: a null pointer)
    stride_x,
    stride_r,
    N,
    seed_lo,  # the stream's seed, as two int32 bit patterns
    seed_hi,
    offset_lo,  # the stream index of element (0, 0), as two int32 bit patterns
    offset_hi,
    threshold,  # a 24-bit draw below this is dropped: ceil(p * 2^24)
    scale_bits,  # float_arg(keep_scale(p)): 1 / (1 - p), 0 when p = 1, in float64 whatever COMPUTE is
    eps_bits,  # float_arg(eps)
    stream_in_memory,  # 1: the seed and offset come from Stream (a call captured in a CUDA graph)
    HAS_DROPOUT: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    COMPUTE: tl.constexpr,  # tl.float32, or tl.float64 for float64 inputs
    BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # int64: M * N may pass 2**31
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(COMPUTE)
    if HAS_DROPOUT:
        seed_lo, seed_hi, first = stream_start(Stream, seed_lo, seed_hi, offset_lo, offset_hi, stream_in_memory)
        keep = kept(seed_lo, seed_hi, first + row * N, cols, threshold)
        x = tl.where(keep, x * float_value(scale_bits, COMPUTE), 0.0)
    s = x + tl.load(R + row * stride_r + cols, mask=mask, other=0.0).to(COMPUTE)
    eps = float_value(eps_bits, COMPUTE)
    y, mean, rstd = _normalize_row(s, W, B, cols, mask, N, eps, HAS_WEIGHT, HAS_BIAS, COMPUTE)
    tl.store(Y + row * N + cols, y.to(Y.dtype.element_ty), mask=mask)
    tl.store(Mean + row, mean)
    tl.store(Rstd + row, rstd)


@triton.jit(do_not_specialize=[*STREAM_ARGS, "scale_bits"])
def _dropout_add_layer_norm_bwd(
    DY,  # (M, N) upstream gradient, rows stride_dy apart
    X,  # (M, N) forward dropout input, rows stride_x apart
    R,  # (M, N) forward residual, rows stride_r apart
    W,  # (N,) weight, read only if HAS_WEIGHT
    Mean,  # (M,) saved mean
    Rstd,  # (M,) saved 1/std
    DX,  # (M, N) gradient of x, contiguous
    DR,  # (M, N) gradient of the residual, contiguous
    DW_part,  # (programs, N) partial weight gradients, COMPUTE dtype
    DB_part,  # (programs, N) partial bias gradients, COMPUTE dtype
    Stream,  # int64 (seed, offset), read only if stream_in_memory (else empty: a null pointer)
    stride_dy,
    stride_x,
    stride_r,
    M,
    N,
    rows_per_program,
    seed_lo,
    seed_hi,
    offset_lo,
    offset_hi,
    threshold,
    scale_bits,
    stream_in_memory,
    HAS_DROPOUT: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    COMPUTE: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    if HAS_DROPOUT:
        seed_lo, seed_hi, first = stream_start(Stream, seed_lo, seed_hi, offset_lo, offset_hi, stream_in_memory)
        scale = float_value(scale_bits, COMPUTE)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    if HAS_WEIGHT:
        w = tl.load(W + cols, mask=mask, other=0.0).to(COMPUTE)
    else:
        w = 1.0
    dw = tl.zeros((BLOCK_N,), dtype=COMPUTE)
    db = tl.zeros((BLOCK_N,), dtype=COMPUTE)
    row_start = pid.to(tl.int64) * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    for r in range(row_start, row_end):
        x = tl.load(X + r * stride_x + cols, mask=mask, other=0.0).to(COMPUTE)
        if HAS_DROPOUT:
            keep = kept(seed_lo, seed_hi, first + r * N, cols, threshold)
            x = tl.where(keep, x * scale, 0.0)
        s = x + tl.load(R + r * stride_r + cols, mask=mask, other=0.0).to(COMPUTE)
        dy = tl.load(DY + r * stride_dy + cols, mask=mask, other=0.0).to(COMPUTE)
        ds, xhat = _row_input_grad(dy, s, w, tl.load(Mean + r), tl.load(Rstd + r), mask, N)
        tl.store(DR + r * N + cols, ds.to(DR.dtype.element_ty), mask=mask)
        if HAS_DROPOUT:
            ds = tl.where(keep, ds * scale, 0.0)
        tl.store(DX + r * N + cols, ds.to(DX.dtype.element_ty), mask=mask)
        dw += dy * xhat
        db += dy
    if HAS_WEIGHT:
        tl.store(DW_part + pid * N + cols, dw, mask=mask)
    if HAS_BIAS:
        tl.store(DB_part + pid * N + cols, db, mask=mask)


def launch_config(N: int, dtype: torch.dtype) -> dict:
    """Block size and warps the launchers use for rows of ``N`` elements of ``dtype``."""
    return row_config("dropout_add_layer_norm", N, dtype, MAX_FUSED_BYTES)


def forward(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
    seed: torch.Tensor, p: float, eps: float, *, stream_in_memory: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x, residual: (M, N); seed: int64 (seed[, offset]), on the CPU or (under a CUDA graph capture) on x's GPU
    (``stream_in_memory``: see :func:`~hetrain.ops.triton.dropout.stream_args`). Returns y (M, N), mean (M,),
    rstd (M,)."""
    M, N = x.shape
    weight, bias = dense(weight), dense(bias)
    x = x if x.stride(-1) == 1 else x.contiguous()
    residual = residual if residual.stride(-1) == 1 else residual.contiguous()
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    stats = compute_dtype(x.dtype)
    mean = torch.empty(M, dtype=stats, device=x.device)
    rstd = torch.empty(M, dtype=stats, device=x.device)
    if M == 0:
        return y, mean, rstd
    cfg = launch_config(N, x.dtype)
    _dropout_add_layer_norm_fwd[(M,)](
        x, residual, weight if weight is not None else x, bias if bias is not None else x, y, mean, rstd,
        stride_x=x.stride(0), stride_r=residual.stride(0), N=N, **stream_args(seed, p, x.device, stream_in_memory),
        scale_bits=float_arg(keep_scale(p)), eps_bits=float_arg(eps), HAS_DROPOUT=p > 0,
        HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
        COMPUTE=tl_compute(x.dtype), BLOCK_N=cfg["BLOCK_N"], num_warps=cfg["num_warps"],
    )
    return y, mean, rstd


def backward(
    dy: torch.Tensor, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None, mean: torch.Tensor,
    rstd: torch.Tensor, seed: torch.Tensor, p: float, has_bias: bool, *, stream_in_memory: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns dx (M, N), dresidual (M, N), dw (N,) or empty, db (N,) or empty."""
    M, N = x.shape
    weight = dense(weight)
    x = x if x.stride(-1) == 1 else x.contiguous()
    residual = residual if residual.stride(-1) == 1 else residual.contiguous()
    dy = dy if dy.stride(-1) == 1 else dy.contiguous()
    dx = torch.empty((M, N), dtype=x.dtype, device=x.device)
    dres = torch.empty((M, N), dtype=x.dtype, device=x.device)
    stats = compute_dtype(x.dtype)
    programs = backward_programs(M, x.device)
    parts = partial_rows((weight is not None) + has_bias, programs, N, M, stats, x.device)
    dw_part = parts[0] if weight is not None else parts
    db_part = parts[-1] if has_bias else parts
    if M > 0:
        cfg = launch_config(N, x.dtype)
        _dropout_add_layer_norm_bwd[(programs,)](
            dy, x, residual, weight if weight is not None else x, mean, rstd, dx, dres, dw_part, db_part,
            stride_dy=dy.stride(0), stride_x=x.stride(0), stride_r=residual.stride(0), M=M, N=N,
            rows_per_program=triton.cdiv(M, programs), **stream_args(seed, p, x.device, stream_in_memory),
            scale_bits=float_arg(keep_scale(p)), HAS_DROPOUT=p > 0, HAS_WEIGHT=weight is not None,
            HAS_BIAS=has_bias, COMPUTE=tl_compute(x.dtype), BLOCK_N=cfg["BLOCK_N"], num_warps=cfg["num_warps"],
        )
    sums = sum_partials(parts, x.dtype)
    return dx, dres, sums[0] if weight is not None else x.new_empty(0), sums[-1] if has_bias else x.new_empty(0)


def aot_specs(shapes: BenchShapes) -> list[AotSpec]:
    """Every compilation the launchers can cause, for the ahead-of-time check (hetrain.checks.gpu_compile).

    One row width per configuration ``launch_config`` can choose, for every dtype, marked picked where a
    benchmark width and dtype select it; there with and without dropout, elsewhere the variant with
    dropout, weight and bias, which does the most work.
    """
    specs = []
    programs = max(1, min(shapes.rows, 4 * shapes.sm_count))  # as _programs_for_backward on a GPU
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        stats, compute = compute_dtype(dtype), tl_compute(dtype)
        for n, benchmarked in config_widths(launch_config, dtype, shapes.hidden).items():
            cfg = launch_config(n, dtype)
            picked = benchmarked and dtype in shapes.dtypes
            # With and without dropout where picked (a captured call, reading its stream from memory, runs the
            # same kernels).
            for has_dropout in (True, False) if picked else (True,):
                flags = {"HAS_DROPOUT": has_dropout, "HAS_WEIGHT": True, "HAS_BIAS": True, "COMPUTE": compute,
                         "BLOCK_N": cfg["BLOCK_N"]}
                drop = {**stream_args(torch.tensor([12345, 4096]), 0.1, torch.device("cpu")), "Stream": torch.int64,
                        "scale_bits": float_arg(keep_scale(0.1))}
                fwd = {"X": dtype, "R": dtype, "W": dtype, "B": dtype, "Y": dtype, "Mean": stats, "Rstd": stats,
                       "stride_x": n, "stride_r": n, "N": n, "eps_bits": float_arg(1e-5), **drop}
                bwd = {"DY": dtype, "X": dtype, "R": dtype, "W": dtype, "Mean": stats, "Rstd": stats, "DX": dtype,
                       "DR": dtype, "DW_part": stats, "DB_part": stats, "stride_dy": n, "stride_x": n, "stride_r": n,
                       "M": shapes.rows, "N": n, "rows_per_program": triton.cdiv(shapes.rows, programs), **drop}
                for kernel, args in ((_dropout_add_layer_norm_fwd, fwd), (_dropout_add_layer_norm_bwd, bwd)):
                    specs.append(aot_spec(kernel, {**args, **flags}, dtype=dtype, picked=picked,
                                          num_warps=cfg["num_warps"]))
    return specs

