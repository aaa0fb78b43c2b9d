"""Triton RMSNorm over the last dimension: forward and backward kernels and their launchers.

One program normalises one row held whole in registers, so rows up to ``MAX_FUSED_BYTES`` (counted
in the float32/float64 compute dtype) fit; longer rows are refused with an error naming the limit.
Forward saves only rstd. Backward gives each program a contiguous block of rows and writes one
partial dW row per program, summed afterwards: no contended atomics, and a deterministic result.
"""

from __future__ import annotations

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
from hetrain.ops.triton.layer_norm import float_arg, float_value

# Row data per program, counted in the COMPUTE dtype (8192 float32 / 4096 float64 elements): the largest row
# whose backward keeps every value in registers on sm_80 and sm_90 (cuobjdump: no stack); past it, it spills.
MAX_FUSED_BYTES = 32768


# eps varies per call: never specialised on its value, so one compilation serves all.
@triton.jit(do_not_specialize=["eps_bits"])
def _rms_norm_fwd(
    X,  # (M, N) input, rows stride_x apart
    Y,  # (M, N) output, rows stride_y apart
    W,  # (N,) weight, read only if HAS_WEIGHT
    Rstd,  # (M,) saved 1/rms, COMPUTE dtype
    stride_x,
    stride_y,
    N,
    eps_bits,  # float_arg(eps): its float64 value, whatever COMPUTE is
    HAS_WEIGHT: tl.constexpr,
    COMPUTE: tl.constexpr,  # tl.float32, or tl.float64 for float64 inputs
    BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # int64 row offsets: M * N may pass 2**31
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(COMPUTE)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / N + float_value(eps_bits, COMPUTE))
    y = x * rstd
    if HAS_WEIGHT:
        y = y * tl.load(W + cols, mask=mask, other=0.0).to(COMPUTE)
    tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)
    tl.store(Rstd + row, rstd)


@triton.jit
def _rms_norm_bwd(
    DY,  # (M, N) upstream gradient, rows stride_dy apart
    X,  # (M, N) forward input, rows stride_x apart
    W,  # (N,) weight, read only if HAS_WEIGHT
    Rstd,  # (M,) saved 1/rms
    DX,  # (M, N) input gradient, rows stride_dx apart
    DW_part,  # (programs, N) partial weight gradients, COMPUTE dtype; written only if HAS_WEIGHT
    stride_dy,
    stride_x,
    stride_dx,
    M,
    N,
    rows_per_program,
    HAS_WEIGHT: tl.constexpr,
    COMPUTE: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    if HAS_WEIGHT:
        w = tl.load(W + cols, mask=mask, other=0.0).to(COMPUTE)
    dw = tl.zeros((BLOCK_N,), dtype=COMPUTE)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    for r in range(row_start, row_end):
        x = tl.load(X + r * stride_x + cols, mask=mask, other=0.0).to(COMPUTE)
        dy = tl.load(DY + r * stride_dy + cols, mask=mask, other=0.0).to(COMPUTE)
        rstd = tl.load(Rstd + r)
        xhat = x * rstd  # masked columns load 0, so they add nothing to the sums below
        g = dy * w if HAS_WEIGHT else dy
        # sum(g * x) * rstd, not sum(g * xhat), as the C++ kernel: at float32's top g * x overflows and the row's
        # dx is NaN, as F.rms_norm's gradient, where xhat = x * 0 would hide it as 0.
        mean_gx = tl.sum(g * x, axis=0) * rstd / N
        dx = (g - xhat * mean_gx) * rstd
        tl.store(DX + r * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)
        dw += dy * xhat
    if HAS_WEIGHT:
        tl.store(DW_part + pid * N + cols, dw, mask=mask)


def launch_config(N: int, dtype: torch.dtype) -> dict:
    """Block size and warps the forward launcher uses for rows of ``N`` elements of ``dtype``."""
    return row_config("rms_norm", N, dtype, MAX_FUSED_BYTES)


def backward_config(N: int, dtype: torch.dtype) -> dict:
    """The backward's: twice the forward's warps, as it keeps x, dy, the weight and the dW partial live per
    element; with the forward's 4 warps at 1024 columns, Triton 3.7 (torch 2.13's) spilled 8 bytes per thread
    for fp16/bf16 on sm_90 (``make gpu-compile``; Triton 3.6 and 3.9 did not)."""
    cfg = launch_config(N, dtype)
    return {**cfg, "num_warps": min(2 * cfg["num_warps"], 16)}


def forward(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x: (M, N). Returns y (M, N), rstd (M,)."""
    M, N = x.shape
    weight = dense(weight)
    if x.stride(-1) != 1:
        x = x.contiguous()
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    rstd = torch.empty(M, dtype=compute_dtype(x.dtype), device=x.device)
    if M == 0 or N == 0:  # nothing to normalise; the mean square of an empty row is undefined, as in torch
        return y, rstd.fill_(float("nan"))
    cfg = launch_config(N, x.dtype)
    _rms_norm_fwd[(M,)](
        x, y, weight if weight is not None else x, rstd, x.stride(0), y.stride(0), N, float_arg(eps),
        HAS_WEIGHT=weight is not None, COMPUTE=tl_compute(x.dtype),
        BLOCK_N=cfg["BLOCK_N"], num_warps=cfg["num_warps"],
    )
    return y, rstd


def backward(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, rstd: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns dx (M, N) and dw (N,), or an empty dw without a weight."""
    M, N = x.shape
    weight = dense(weight)
    if x.stride(-1) != 1:
        x = x.contiguous()
    if dy.stride(-1) != 1:
        dy = dy.contiguous()
    dx = torch.empty((M, N), dtype=x.dtype, device=x.device)
    programs = backward_programs(M, x.device)
    parts = partial_rows(int(weight is not None), programs, N, M, compute_dtype(x.dtype), x.device)
    dw_part = parts[0] if weight is not None else parts
    if M > 0 and N > 0:
        cfg = backward_config(N, x.dtype)
        _rms_norm_bwd[(programs,)](
            dy, x, weight if weight is not None else x, rstd, dx, dw_part,
            dy.stride(0), x.stride(0), dx.stride(0), M, N, triton.cdiv(M, programs),
            HAS_WEIGHT=weight is not None, COMPUTE=tl_compute(x.dtype),
            BLOCK_N=cfg["BLOCK_N"], num_warps=cfg["num_warps"],
        )
    return dx, sum_partials(parts, x.dtype)[0] if weight is not None else x.new_empty(0)


def aot_specs(shapes: BenchShapes) -> list[AotSpec]:
    """Every compilation the launchers can cause, for the ahead-of-time check (hetrain.checks.gpu_compile).

    One row width per configuration ``launch_config`` can choose, for every dtype, marked picked where
    a benchmark width and dtype select it. At the benchmark widths both weight variants are compiled;
    elsewhere the weighted variant, which does the most work, stands for the other.
    """
    specs = []
    programs = max(1, min(shapes.rows, 4 * shapes.sm_count))  # as _programs_for_backward on a GPU
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        stats, compute = compute_dtype(dtype), tl_compute(dtype)
        for n, benchmarked in config_widths(launch_config, dtype, shapes.hidden).items():
            cfg = launch_config(n, dtype)
            picked = benchmarked and dtype in shapes.dtypes
            for has_weight in (True, False) if picked else (True,):
                flags = {"HAS_WEIGHT": has_weight, "COMPUTE": compute, "BLOCK_N": cfg["BLOCK_N"]}
                fwd = {"X": dtype, "Y": dtype, "W": dtype, "Rstd": stats, "stride_x": n, "stride_y": n, "N": n,
                       "eps_bits": float_arg(1e-6)}
                bwd = {"DY": dtype, "X": dtype, "W": dtype, "Rstd": stats, "DX": dtype, "DW_part": stats,
                       "stride_dy": n, "stride_x": n, "stride_dx": n, "M": shapes.rows, "N": n,
                       "rows_per_program": triton.cdiv(shapes.rows, programs)}
                warps = {_rms_norm_fwd: cfg["num_warps"], _rms_norm_bwd: backward_config(n, dtype)["num_warps"]}
                for kernel, args in ((_rms_norm_fwd, fwd), (_rms_norm_bwd, bwd)):
                    specs.append(aot_spec(kernel, {**args, **flags}, dtype=dtype, picked=picked,
                                          num_warps=warps[kernel]))
    return specs

