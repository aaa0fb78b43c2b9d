"""A lazy AdamW step for a row-sparse gradient: reference and backends (used by :mod:`hetrain.optim`).

An embedding table's gradient has a row for each token a batch looked up (``nn.Embedding(sparse=True)``
hands it over as one (index, row) pair per token, unsorted, with repeats). Dense AdamW reads and writes
every row of the table and its two moments each step, 94 MB of each for BERT-base's vocabulary; this
step updates the rows the batch used and leaves the others, values and moments, as they were (the
"lazy Adam" of sparse training, with AdamW's decoupled weight decay applied to the rows it updates).
On a row a batch uses, the update is exactly ``torch.optim.AdamW``'s, with the step count of the table
for the bias corrections, as torch's ``SparseAdam`` counts it.

Backends: ``triton`` (CUDA: torch sums each row's repeats, one kernel steps the rows, their moments and
decay in one pass), ``cpu`` (csrc/sparse_adamw.cpp: sorts the indices, sums each row's repeats and steps
the row in one pass, OpenMP over rows) and ``torch`` (the reference: coalesce, then the same arithmetic on
the gathered rows; any device).
"""

from __future__ import annotations

import math

import torch

from hetrain import plugins
from hetrain.ops import _backends
from hetrain.ops._op import compute_dtype

OP = "sparse_adamw"


def sparse_adamw_ref(param: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, indices: torch.Tensor,
                     values: torch.Tensor, step: int, lr: float, beta1: float, beta2: float, eps: float,
                     weight_decay: float) -> None:
    """The step in plain torch, in place: the tests' oracle and the backend of devices without a kernel."""
    # Summed and stepped in the compute dtype (float32 for a 16-bit table), as the C++ kernel and torch's fused AdamW
    # do: in fp16 the second moment of a small gradient underflows and eps=1e-8 rounds to 0, so the update divided
    # by 0. Invariants checked: coalesce() of a row outside the table corrupts the heap (a gradient built with
    # check_invariants=False, as torch's default is, can hold one).
    compute = compute_dtype(param.dtype)
    grad = torch.sparse_coo_tensor(indices[None], values.to(compute), param.shape, check_invariants=True).coalesce()
    rows, g = grad.indices()[0], grad.values()
    p, m, v = (t[rows].to(compute) for t in (param, exp_avg, exp_avg_sq))
    p.mul_(1 - lr * weight_decay)
    m.lerp_(g, 1 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    denom = (v.sqrt() / math.sqrt(1 - beta2**step)).add_(eps)
    p.addcdiv_(m, denom, value=-lr / (1 - beta1**step))
    param.index_copy_(0, rows, p.to(param.dtype))
    exp_avg.index_copy_(0, rows, m.to(exp_avg.dtype))
    exp_avg_sq.index_copy_(0, rows, v.to(exp_avg_sq.dtype))


class TorchBackend:
    step = staticmethod(sparse_adamw_ref)


class CppBackend:
    """csrc/sparse_adamw.cpp, for float32 and float64 tables; a bf16 or fp16 table (a bf16-true run) steps through
    the reference, which is not a failure to report."""

    @staticmethod
    def step(param: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, indices: torch.Tensor,
             values: torch.Tensor, step: int, lr: float, beta1: float, beta2: float, eps: float,
             weight_decay: float) -> None:
        """The same arguments and arithmetic as :func:`sparse_adamw_ref`."""
        if param.dtype not in (torch.float32, torch.float64):
            sparse_adamw_ref(param, exp_avg, exp_avg_sq, indices, values, step, lr, beta1, beta2, eps, weight_decay)
            return
        torch.ops.hetrain_C.sparse_adamw_(param, exp_avg, exp_avg_sq, indices, values, step, lr, beta1, beta2, eps,
                                          weight_decay)


_backends.register_triton(OP, "hetrain.ops.triton.sparse_adamw")
_backends.register_cpp(OP, CppBackend, devices=("cpu",))
_backends.register_torch(OP, TorchBackend)


def check_hyperparameters(lr: float, betas: tuple[float, float], eps: float, weight_decay: float,
                          caller: str = "hetrain.sparse_adamw") -> None:
    """Refuses what torch's AdamW refuses: the backends do not check (the reference would step a negative lr
    as gradient ascent), and a kernel's refusal would read as a backend failure and fall back to the reference."""
    if not 0.0 <= lr:
        raise ValueError(f"{caller}: Invalid learning rate: {lr} (lr must be >= 0)")
    if not 0.0 <= eps:
        raise ValueError(f"{caller}: Invalid epsilon value: {eps} (eps must be >= 0)")
    for i, beta in enumerate(betas):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"{caller}: Invalid beta parameter at index {i}: {beta} (each beta must be in [0, 1))")
    if not 0.0 <= weight_decay:
        raise ValueError(f"{caller}: Invalid weight_decay value: {weight_decay} (weight_decay must be >= 0)")


def sparse_adamw_(param: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, grad: torch.Tensor,
                  step: int, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                  weight_decay: float = 1e-2) -> None:
    """One lazy AdamW step of ``param`` (V, H) for the sparse COO gradient ``grad`` (what
    ``nn.Embedding(sparse=True)`` produces, coalesced or not), in place; ``step`` counts from 1."""
    if not grad.is_sparse or grad.sparse_dim() != 1 or grad.shape != param.shape:
        raise ValueError(f"hetrain.sparse_adamw: grad must be a sparse COO tensor of the parameter's shape "
                         f"{tuple(param.shape)} with one sparse dimension (nn.Embedding(sparse=True)'s), got "
                         f"{'sparse' if grad.is_sparse else 'dense'} {tuple(grad.shape)}")
    for name, t in (("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        if t.shape != param.shape or t.dtype != param.dtype or t.device != param.device:
            raise ValueError(f"hetrain.sparse_adamw: {name} must match the parameter ({tuple(param.shape)} "
                             f"{param.dtype} on {param.device}), got {tuple(t.shape)} {t.dtype} on {t.device}")
    check_hyperparameters(lr, betas, eps, weight_decay)
    if step < 1:
        raise ValueError(f"hetrain.sparse_adamw: step counts from 1 (the bias corrections divide by "
                         f"1 - beta**step), got {step}")
    # _indices/_values: the pairs as autograd accumulated them, without the sort and sum of coalesce(),
    # which the kernel does in its own pass.
    indices, values = grad._indices()[0], grad._values()
    if indices.numel():
        # Refused here, not by a backend: the C++ kernel's refusal read as a backend failure and fell back to the
        # reference. One sync on a GPU, where the backends wait for the row count anyway.
        lowest, highest = torch.stack(torch.aminmax(indices)).tolist()
        if lowest < 0 or highest >= param.shape[0]:
            raise ValueError(f"hetrain.sparse_adamw: row {lowest if lowest < 0 else highest} of the gradient is "
                             f"outside the table of {param.shape[0]} rows; build the gradient with indices in "
                             f"[0, {param.shape[0]}) (torch.sparse_coo_tensor(..., check_invariants=True) checks them)")
    with torch.no_grad():
        plugins.call(OP, "step", param.device.type, param, exp_avg, exp_avg_sq, indices, values.to(param.dtype),
                     int(step), float(lr), float(betas[0]), float(betas[1]), float(eps), float(weight_decay))
