"""The lazy AdamW step on CUDA in Triton: one program per (used row, column block) updates the row, its two
moments and its decay in one pass over each, where the reference gathers three tables, runs a dozen
elementwise kernels and copies three results back.

torch sums each row's repeats first (``unique`` and an accumulating ``index_put_``, deterministic under
``torch.use_deterministic_algorithms``), in the compute dtype as the reference does: summed in a bf16 table's
own dtype, a constant gradient repeated 1000 times summed to 40% of its value. ``unique`` waits for the GPU to
know how many rows there are, as the reference's ``coalesce`` does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hetrain.ops._op import compute_dtype
from hetrain.ops.triton._aot import AotSpec, BenchShapes, aot_spec
from hetrain.ops.triton._rows import tl_compute

BLOCK_H = 256  # columns per program: BERT-base's 768 in three programs per row


@triton.jit
def _sparse_adamw_rows(
    P,  # (V, H) parameter, contiguous; updated in place
    M,  # (V, H) first moment, contiguous
    S,  # (V, H) second moment, contiguous
    Rows,  # (R,) int64 distinct rows the batch used
    G,  # (R, H) COMPUTE dtype: summed gradient of each of those rows, contiguous
    Coef,  # (6,) COMPUTE dtype: 1 - lr * decay, 1 - beta1, beta2, 1 - beta2, sqrt(1 - beta2^t), -lr / (1 - beta1^t)
    Eps,  # (1,) COMPUTE dtype
    H,
    COMPUTE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    i = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < H
    at = tl.load(Rows + i) * H + cols  # int64: V * H passes 2**31 for large tables
    g = tl.load(G + i * H + cols, mask=mask, other=0.0).to(COMPUTE)
    p = tl.load(P + at, mask=mask, other=0.0).to(COMPUTE)
    m = tl.load(M + at, mask=mask, other=0.0).to(COMPUTE)
    s = tl.load(S + at, mask=mask, other=0.0).to(COMPUTE)
    keep = tl.load(Coef)
    one_minus_b1 = tl.load(Coef + 1)
    b2 = tl.load(Coef + 2)
    one_minus_b2 = tl.load(Coef + 3)
    bias2_sqrt = tl.load(Coef + 4)
    step_size = tl.load(Coef + 5)
    m = m + one_minus_b1 * (g - m)
    s = s * b2 + one_minus_b2 * g * g
    p = p * keep + step_size * m / (tl.sqrt(s) / bias2_sqrt + tl.load(Eps))
    tl.store(P + at, p.to(P.dtype.element_ty), mask=mask)
    tl.store(M + at, m.to(M.dtype.element_ty), mask=mask)
    tl.store(S + at, s.to(S.dtype.element_ty), mask=mask)


def step(param: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, indices: torch.Tensor,
         values: torch.Tensor, step: int, lr: float, beta1: float, beta2: float, eps: float,
         weight_decay: float) -> None:
    """The backend entry: the same arguments and arithmetic as :func:`hetrain.ops.sparse_adamw.sparse_adamw_ref`."""
    V, H = param.shape
    if not all(t.is_contiguous() for t in (param, exp_avg, exp_avg_sq)):
        raise ValueError("hetrain.sparse_adamw (triton): the parameter and its moments must be contiguous")
    if indices.numel() == 0 or H == 0:
        return
    rows, inverse = torch.unique(indices, return_inverse=True)
    lowest, highest = torch.stack([rows[0], rows[-1]]).tolist()  # sorted; unique has waited for the GPU already
    if lowest < 0 or highest >= V:
        raise ValueError(f"hetrain.sparse_adamw (triton): row {lowest if lowest < 0 else highest} of the gradient "
                         f"is outside the table of {V} rows")
    stats = compute_dtype(param.dtype)
    grad = values.new_zeros((rows.numel(), H), dtype=stats).index_put_((inverse,), values.to(stats), accumulate=True)
    # Coefficients in the accumulation dtype (a Python float argument would reach the kernel as float32).
    coef = torch.tensor([1 - lr * weight_decay, 1 - beta1, beta2, 1 - beta2, (1 - beta2**step) ** 0.5,
                         -lr / (1 - beta1**step)], dtype=stats).to(param.device, non_blocking=True)
    eps_t = torch.tensor([eps], dtype=stats).to(param.device, non_blocking=True)
    _sparse_adamw_rows[(rows.numel(), triton.cdiv(H, BLOCK_H))](
        param, exp_avg, exp_avg_sq, rows, grad, coef, eps_t, H, COMPUTE=tl_compute(param.dtype), BLOCK=BLOCK_H,
    )


def aot_specs(shapes: BenchShapes) -> list[AotSpec]:
    """Every compilation the launcher can cause, for the ahead-of-time check (hetrain.checks.gpu_compile):
    one per table dtype (the block is fixed); float32 is the one a training run picks."""
    specs = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        stats = compute_dtype(dtype)
        args = {"P": dtype, "M": dtype, "S": dtype, "Rows": torch.int64, "G": stats, "Coef": stats, "Eps": stats,
                "H": shapes.hidden[0], "COMPUTE": tl_compute(dtype), "BLOCK": BLOCK_H}
        specs.append(aot_spec(_sparse_adamw_rows, args, dtype=dtype, picked=dtype == torch.float32, num_warps=4))
    return specs
