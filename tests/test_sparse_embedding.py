"""hetrain.nn.Embedding / hetrain.ops.sparse_embedding: torch's sparse lookup, with the table's gradient built
coalesced on the CPU by hetrain_C::embedding_sparse_grad (no padding copy). Against nn.Embedding(sparse=True)
and a float64 reference, with padding, repeats, any ids shape, empty batches and in a training step."""

from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from op_testing import TOLERANCES, randn
from torch._subclasses.fake_tensor import FakeTensorMode

from hetrain import _ext
from hetrain.nn import Embedding
from hetrain.ops.sparse_embedding import sparse_embedding
from hetrain.optim import SparseAwareAdamW

pytestmark = pytest.mark.skipif(_ext.load() is None, reason="the coalesced gradient is hetrain._C's kernel")

V, H = 50, 12


def table_grad_reference(ids: torch.Tensor, up: torch.Tensor, padding_idx: int | None) -> torch.Tensor:
    """The dense float64 gradient of the table: each lookup's upstream row added into its row, the padding row 0."""
    grad = torch.zeros(V, H, dtype=torch.float64)
    grad.index_add_(0, ids.flatten().long(), up.reshape(-1, H).double())
    if padding_idx is not None:
        grad[padding_idx] = 0
    return grad


def ids_with_padding(shape: tuple[int, ...], seed: int, padding_idx: int | None) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 8, shape, generator=g)  # few distinct rows: many repeats
    if padding_idx is not None and ids.numel():
        ids.view(-1)[::3] = padding_idx
    return ids


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("shape", [(4, 9), (2, 3, 5), (7,), (0, 4)])
@pytest.mark.parametrize("padding_idx", [0, 5, None])
def test_gradient_is_the_coalesced_table_gradient(dtype, shape, padding_idx):
    ids = ids_with_padding(shape, 1, padding_idx)
    up = randn(*shape, H, dtype=dtype, seed=2)
    weight = randn(V, H, dtype=dtype, seed=3, requires_grad=True)
    y = sparse_embedding(ids, weight, padding_idx)
    assert torch.equal(y, torch.nn.functional.embedding(ids, weight.detach(), padding_idx))
    y.backward(up)
    grad = weight.grad
    assert grad.is_sparse and grad.dtype == dtype and grad.shape == (V, H)
    rows = grad._indices()[0]
    assert torch.equal(rows, torch.unique(ids[ids != padding_idx] if padding_idx is not None else ids))
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(grad.to_dense().double(), table_grad_reference(ids, up, padding_idx), atol=atol,
                               rtol=rtol)


def test_int32_ids_negative_padding_and_all_padding():
    weight = randn(V, H, seed=4, requires_grad=True)
    ids = torch.tensor([[3, V - 1, 3], [V - 1, 7, 3]], dtype=torch.int32)
    sparse_embedding(ids, weight, padding_idx=-1).backward(randn(2, 3, H, seed=5))  # -1: the last row
    assert weight.grad._indices()[0].tolist() == [3, 7]
    weight.grad = None
    sparse_embedding(torch.zeros(3, 4, dtype=torch.long), weight, padding_idx=0).backward(randn(3, 4, H, seed=6))
    assert weight.grad._nnz() == 0  # every lookup was padding: an empty gradient, not an error


def test_module_is_a_drop_in_for_nn_embedding_and_steps_the_same():
    torch.manual_seed(0)
    ours = Embedding(V, H, padding_idx=0, sparse=True)
    theirs = torch.nn.Embedding(V, H, padding_idx=0, sparse=True)
    theirs.load_state_dict(ours.state_dict())
    padding_row = ours.weight[0].detach().clone()
    opts = [SparseAwareAdamW([{"params": [m.weight], "sparse": True}], lr=1e-2) for m in (ours, theirs)]
    for step in range(3):
        ids = ids_with_padding((6, 10), 10 + step, 0)
        up = randn(6, 10, H, seed=20 + step)
        for module, opt in zip((ours, theirs), opts, strict=True):
            opt.zero_grad(set_to_none=True)
            module(ids).backward(up)
            opt.step()
        torch.testing.assert_close(ours.weight, theirs.weight, atol=1e-6, rtol=1e-6)
    assert torch.equal(ours.weight[0], padding_row)  # the padding row never moves


def test_torchs_lookup_where_the_kernel_does_not_apply():
    weight = randn(V, H, seed=7, requires_grad=True)
    ids = ids_with_padding((3, 4), 8, 0)
    with torch.no_grad():
        assert torch.equal(sparse_embedding(ids, weight, 0), torch.nn.functional.embedding(ids, weight, 0))
    dense = Embedding(V, H, padding_idx=0)  # sparse=False: torch's dense gradient, as nn.Embedding
    dense(ids).sum().backward()
    assert not dense.weight.grad.is_sparse


def test_bad_arguments_name_the_problem():
    grad = randn(2, 3, H)
    with pytest.raises(RuntimeError, match="id 60 is outside the table's 50 rows"):
        torch.ops.hetrain_C.embedding_sparse_grad(grad, torch.tensor([[1, 2, 60], [0, 1, 2]]), V, -1)
    with pytest.raises(RuntimeError, match="ids.shape \\+ \\(H,\\)"):
        torch.ops.hetrain_C.embedding_sparse_grad(grad, torch.tensor([1, 2]), V, -1)
    with pytest.raises(RuntimeError, match="int64 or int32"):
        torch.ops.hetrain_C.embedding_sparse_grad(grad, torch.ones(2, 3), V, -1)


@pytest.mark.parametrize("padding_idx", [-V - 1, V])
def test_a_padding_idx_outside_the_table_is_refused(padding_idx):
    # -V - 1 became -1, which the C++ kernel read as "no padding" and torch's lookup as the last row.
    weight = randn(V, H, seed=9, requires_grad=True)
    ids = torch.tensor([V - 1, 3])
    with pytest.raises(AssertionError, match="Padding_idx must be within num_embeddings"):
        torch.nn.functional.embedding(ids, weight, padding_idx, sparse=True)
    with pytest.raises(ValueError, match=f"Padding_idx must be within num_embeddings: got {padding_idx} for a table "
                                         f"of {V} rows; pass one in \\[-{V}, {V}\\)"):
        sparse_embedding(ids, weight, padding_idx)
    sparse_embedding(torch.tensor([0, 3]), weight, -V).sum().backward()  # -V: the first row
    assert weight.grad._indices()[0].tolist() == [3]


def test_weight_grad_has_sorted_unique_rows_and_torch_marks_it_uncoalesced():
    # What the module docstring says: hooks see the kernel's coalesced gradient; torch's gradient accumulation
    # drops the flag on weight.grad, so .indices() needs .coalesce() first. If torch keeps it, update the docstring.
    weight = randn(V, H, seed=11, requires_grad=True)
    seen = []
    weight.register_hook(lambda g: seen.append(g.is_coalesced()))
    sparse_embedding(torch.tensor([4, 1, 4, 7]), weight).sum().backward()
    assert seen == [True]
    assert not weight.grad.is_coalesced() and weight.grad._indices()[0].tolist() == [1, 4, 7]
    assert weight.grad.coalesce().indices()[0].tolist() == [1, 4, 7]


@pytest.mark.parametrize("padding_idx", [None, 2])
def test_a_second_derivative_through_the_table_gradient_is_torchs(padding_idx):
    """Under create_graph=True the kernel's gradient has no graph: d/dW |dL/dW|^2 came back zero, with a warning."""
    def second(lookup):
        weight = torch.arange(24, dtype=torch.float64).view(6, 4).div(10).requires_grad_()
        ids = torch.tensor([[1, 2, 1], [2, 5, 0]])
        (grad,) = torch.autograd.grad(lookup(ids, weight).pow(2).sum(), weight, create_graph=True)
        (hessian_vector,) = torch.autograd.grad(torch.sparse.sum(grad * grad), weight)
        return grad.to_dense(), hessian_vector.to_dense()

    ours = second(lambda ids, w: sparse_embedding(ids, w, padding_idx))
    theirs = second(lambda ids, w: torch.nn.functional.embedding(ids, w, padding_idx, sparse=True))
    for got, expected in zip(ours, theirs, strict=True):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert ours[1].abs().sum() > 0


def test_fake_tensors_take_torchs_lookup():
    """The kernel has no fake implementation: backward under FakeTensorMode raised UnsupportedOperatorException."""
    with FakeTensorMode():
        weight = torch.randn(V, H, requires_grad=True)
        sparse_embedding(torch.tensor([[1, 2, 1]]), weight).sum().backward()
        assert weight.grad.is_sparse and weight.grad.shape == (V, H)


def test_torch_func_grad_takes_torchs_lookup():
    """functorch takes no Function without setup_context: torch.func.grad raised where torch's lookup works."""
    weight, ids = randn(V, H, seed=12), torch.tensor([[4, 1, 4]])
    grad = torch.func.grad(lambda w: sparse_embedding(ids, w).square().sum())(weight)
    expected = torch.func.grad(lambda w: torch.nn.functional.embedding(ids, w, sparse=True).square().sum())(weight)
    assert grad.is_sparse
    torch.testing.assert_close(grad.to_dense(), expected.to_dense())


def test_forward_mode_ad_takes_torchs_lookup_and_carries_the_tangent():
    """The Function has no jvp: under a plain forward_ad dual level torch raised "You must implement the jvp"."""
    weight, ids, tangent = randn(V, H, seed=13, requires_grad=True), torch.tensor([[4, 1, 4]]), randn(V, H, seed=14)
    with fwAD.dual_level():
        out = fwAD.unpack_dual(sparse_embedding(ids, fwAD.make_dual(weight, tangent))).tangent
        expected = fwAD.unpack_dual(torch.nn.functional.embedding(ids, fwAD.make_dual(weight, tangent))).tangent
    torch.testing.assert_close(out, expected)
