"""Triton gelu(x + bias) forward and backward kernels and their launchers.

Both kernels tile (rows, features) in blocks of ``BLOCK_M x BLOCK_N``, so rows of any length work.
Forward writes only the activation. Backward recomputes gelu' from x and bias; each program walks a
contiguous band of rows for one column block and writes one partial bias-gradient row, summed
afterwards: no contended atomics, and a deterministic result.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hetrain.ops._op import compute_dtype
from hetrain.ops.triton._aot import AotSpec, BenchShapes, aot_spec
from hetrain.ops.triton._rows import multiprocessors, tl_compute

SQRT_HALF = tl.constexpr(0.7071067811865476)  # 1 / sqrt(2)
INV_SQRT_2PI = tl.constexpr(0.3989422804014327)  # 1 / sqrt(2 pi)
SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)  # sqrt(2 / pi)
CUBIC = tl.constexpr(0.044715)


@triton.jit
def _tanh(u):
    # 1 - 2 / (1 + e^(2u)) saturates to +-1 without a branch; the clamp keeps e^(2u) finite.
    return 1.0 - 2.0 / (1.0 + tl.exp(tl.minimum(u * 2.0, 80.0)))


@triton.jit
def _gelu(z, TANH: tl.constexpr):
    if TANH:
        t = _tanh((z + z * z * z * CUBIC) * SQRT_2_OVER_PI)
        y = 0.5 * z * (1.0 + t)
    else:
        y = 0.5 * z * (1.0 + tl.math.erf(z * SQRT_HALF))
    return y


@triton.jit
def _gelu_grad(z, TANH: tl.constexpr):
    if TANH:
        t = _tanh((z + z * z * z * CUBIC) * SQRT_2_OVER_PI)
        du = (1.0 + z * z * (3.0 * CUBIC)) * SQRT_2_OVER_PI
        g = 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * du
    else:
        g = 0.5 * (1.0 + tl.math.erf(z * SQRT_HALF)) + z * INV_SQRT_2PI * tl.exp(-0.5 * z * z)
    return g


@triton.jit
def _bias_gelu_fwd(
    X,  # (M, N) input, rows stride_x apart
    B,  # (N,) bias
    Y,  # (M, N) output, contiguous
    stride_x,
    M,
    N,
    TANH: tl.constexpr,
    COMPUTE: tl.constexpr,  # tl.float32, or tl.float64 for float64 inputs
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # int64: M * N may pass 2**31
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(COMPUTE)
    b = tl.load(B + cols, mask=cols < N, other=0.0).to(COMPUTE)
    y = _gelu(x + b[None, :], TANH)
    tl.store(Y + rows[:, None] * N + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _bias_gelu_bwd(
    DY,  # (M, N) upstream gradient, rows stride_dy apart
    X,  # (M, N) forward input, rows stride_x apart
    B,  # (N,) bias
    DX,  # (M, N) input gradient, contiguous
    DB_part,  # (programs, N) partial bias gradients, COMPUTE dtype
    stride_dy,
    stride_x,
    M,
    N,
    rows_per_program,  # a multiple of BLOCK_M
    TANH: tl.constexpr,
    COMPUTE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    b = tl.load(B + cols, mask=cols < N, other=0.0).to(COMPUTE)
    db = tl.zeros((BLOCK_N,), dtype=COMPUTE)
    row_start = pid.to(tl.int64) * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    for r0 in range(row_start, row_end, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        mask = (rows[:, None] < row_end) & (cols[None, :] < N)
        x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(COMPUTE)
        dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(COMPUTE)
        dx = dy * _gelu_grad(x + b[None, :], TANH)  # masked lanes have dy = 0, so dx = 0 there
        tl.store(DX + rows[:, None] * N + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        db += tl.sum(dx, axis=0)
    tl.store(DB_part + pid * N + cols, db, mask=cols < N)


def launch_config(N: int, dtype: torch.dtype) -> dict:
    """Tile and warps the launchers use for rows of ``N`` elements of ``dtype`` (4K elements per tile)."""
    block_n = min(triton.next_power_of_2(max(N, 1)), 1024 if dtype != torch.float64 else 512)
    block_m = max(1, 4096 // block_n) if dtype != torch.float64 else max(1, 2048 // block_n)
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "num_warps": 4}


def _row_programs(M: int, block_m: int, device: torch.device) -> int:
    """Programs along rows in backward: enough to fill the device, few enough to keep partial rows small."""
    target = 4 * multiprocessors(device) if device.type == "cuda" else 4
    return max(1, min(triton.cdiv(M, block_m), target))


def forward(x: torch.Tensor, bias: torch.Tensor, approximate: str) -> torch.Tensor:
    """x: (M, N), bias: (N,). Returns gelu(x + bias), (M, N)."""
    M, N = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return y
    cfg = launch_config(N, x.dtype)
    grid = (triton.cdiv(M, cfg["BLOCK_M"]), triton.cdiv(N, cfg["BLOCK_N"]))
    _bias_gelu_fwd[grid](
        x, bias.contiguous(), y, x.stride(0), M, N,
        TANH=approximate == "tanh", COMPUTE=tl_compute(x.dtype),
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], num_warps=cfg["num_warps"],
    )
    return y


def backward(
    dy: torch.Tensor, x: torch.Tensor, bias: torch.Tensor, approximate: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns dx (M, N) and dbias (N,)."""
    M, N = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    if dy.stride(-1) != 1:
        dy = dy.contiguous()
    dx = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return dx, torch.zeros_like(bias)
    cfg = launch_config(N, x.dtype)
    programs = _row_programs(M, cfg["BLOCK_M"], x.device)
    rows_per_program = triton.cdiv(triton.cdiv(M, programs), cfg["BLOCK_M"]) * cfg["BLOCK_M"]
    programs = triton.cdiv(M, rows_per_program)
    db_part = torch.empty((programs, N), dtype=compute_dtype(x.dtype), device=x.device)
    _bias_gelu_bwd[(programs, triton.cdiv(N, cfg["BLOCK_N"]))](
        dy, x, bias.contiguous(), dx, db_part, dy.stride(0), x.stride(0), M, N, rows_per_program,
        TANH=approximate == "tanh", COMPUTE=tl_compute(x.dtype),
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], num_warps=cfg["num_warps"],
    )
    return dx, db_part.sum(0).to(x.dtype)


def aot_specs(shapes: BenchShapes) -> list[AotSpec]:
    """Every compilation the launchers can cause, for the ahead-of-time check (hetrain.checks.gpu_compile).

    One row width per tile ``launch_config`` can choose, for every dtype, marked picked where a
    benchmark width and dtype select it; there both approximations, elsewhere the tanh form.
    """
    specs = []
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        stats, compute = compute_dtype(dtype), tl_compute(dtype)
        widths: dict[tuple, tuple[int, bool]] = {}
        for n in shapes.hidden:
            widths.setdefault(tuple(sorted(launch_config(n, dtype).items())), (n, True))
        n = 1
        while n <= 2 * max(shapes.hidden):  # past that width the tile no longer changes
            widths.setdefault(tuple(sorted(launch_config(n, dtype).items())), (n, False))
            n *= 2
        for n, benchmarked in widths.values():
            cfg = launch_config(n, dtype)
            picked = benchmarked and dtype in shapes.dtypes
            band = triton.cdiv(shapes.rows, 4 * shapes.sm_count)  # as _row_programs on a GPU
            rows_per_program = triton.cdiv(band, cfg["BLOCK_M"]) * cfg["BLOCK_M"]
            for tanh in (True, False) if picked else (True,):
                flags = {"TANH": tanh, "COMPUTE": compute, "BLOCK_M": cfg["BLOCK_M"], "BLOCK_N": cfg["BLOCK_N"]}
                fwd = {"X": dtype, "B": dtype, "Y": dtype, "stride_x": n, "M": shapes.rows, "N": n}
                bwd = {"DY": dtype, "X": dtype, "B": dtype, "DX": dtype, "DB_part": stats, "stride_dy": n,
                       "stride_x": n, "M": shapes.rows, "N": n, "rows_per_program": rows_per_program}
                for kernel, args in ((_bias_gelu_fwd, fwd), (_bias_gelu_bwd, bwd)):
                    specs.append(aot_spec(kernel, {**args, **flags}, dtype=dtype, picked=picked,
                                          num_warps=cfg["num_warps"]))
    return specs
