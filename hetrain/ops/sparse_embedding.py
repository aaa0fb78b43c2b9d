"""An embedding lookup whose table gradient is row-sparse, its rows sorted and unique: ``sparse_embedding``.

``F.embedding(ids, weight, padding_idx, sparse=True)`` hands the table a gradient of one (index, row) pair
per lookup; with a padding index it first copies every non-padding row of the upstream gradient into a new
tensor, which at BERT's 32 x 512 x 768 took 22 of the 24 ms of the table's backward on a 2-core CPU
(benchmarks/RESULTS.md). On the CPU, ``hetrain_C::embedding_sparse_grad`` (csrc/embedding_grad.cpp) reads
each upstream row once and writes each looked-up table row once: the gradient is built coalesced (sorted
unique rows, repeats summed, the padding row absent), the same tensor as torch's after ``coalesce()``, and
gradient hooks see it so. ``weight.grad`` does not keep the flag (torch's gradient accumulation drops it), so
``weight.grad.is_coalesced()`` is False: call ``weight.grad.coalesce()`` before ``.indices()``. Elsewhere
(CUDA, without hetrain._C, tensor subclasses such as FakeTensorMode's, ``torch.func`` transforms, an open
``torch.autograd.forward_ad`` dual level), and while a graph is traced, it is torch's sparse lookup. A backward
that records its graph (``create_graph=True``) builds torch's gradient, whose graph gives second derivatives; the
kernel's has none.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.autograd import forward_ad

from hetrain import _ext
from hetrain.ops._op import _route


class _SparseEmbedding(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, ids: torch.Tensor, weight: torch.Tensor, padding_idx: int) -> torch.Tensor:
        ctx.save_for_backward(ids)
        ctx.table_shape, ctx.padding_idx = weight.shape, padding_idx
        return F.embedding(ids, weight, padding_idx if padding_idx >= 0 else None)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[None, torch.Tensor, None]:
        (ids,) = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: torch's gradient, whose graph gives second derivatives
            return None, torch.ops.aten.embedding_backward(grad, ids, ctx.table_shape[0], ctx.padding_idx,
                                                           scale_grad_by_freq=False, sparse=True), None
        rows, values = torch.ops.hetrain_C.embedding_sparse_grad(grad, ids, ctx.table_shape[0], ctx.padding_idx)
        # Built here from sorted unique rows in range: torch's invariant checks would only repeat that work.
        table_grad = torch.sparse_coo_tensor(rows, values, ctx.table_shape, is_coalesced=True, check_invariants=False)
        return None, table_grad, None


def sparse_embedding(ids: torch.Tensor, weight: torch.Tensor, padding_idx: int | None = None) -> torch.Tensor:
    """``F.embedding(ids, weight, padding_idx, sparse=True)``, whose gradient for ``weight`` has sorted unique rows
    (on the CPU kernel's path; see the module's docstring for ``weight.grad.is_coalesced()``)."""
    rows = weight.shape[0]
    if padding_idx is not None and not -rows <= padding_idx < rows:
        # Checked before -rows..-1 is made 0..rows-1: one below would become -1, "no padding" to the C++ kernel.
        raise ValueError(f"hetrain.sparse_embedding: Padding_idx must be within num_embeddings: got {padding_idx} "
                         f"for a table of {rows} rows; pass one in [{-rows}, {rows}) or None for no padding row")
    if padding_idx is not None and padding_idx < 0:
        padding_idx += rows  # as nn.Embedding normalises it
    # Where the fused ops take their plain autograd.Function ("function": plain tensors, a gradient wanted, no graph
    # traced, outside torch.func transforms): the kernel has no fake implementation (FakeTensorMode's tensors are a
    # subclass) and functorch takes no Function without setup_context. Nor under forward-mode AD at all (a plain int
    # check): the Function has no jvp, and its backward kernel would drop a tangent on the upstream gradient.
    fused = (weight.device.type == "cpu" and forward_ad._current_level < 0 and _route((ids, weight)) == "function"
             and _ext.load() is not None)
    if not fused:
        return F.embedding(ids, weight, padding_idx, sparse=True)
    return _SparseEmbedding.apply(ids, weight, -1 if padding_idx is None else padding_idx)
