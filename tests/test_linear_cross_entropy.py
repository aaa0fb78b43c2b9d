"""Linear + cross-entropy: every backend vs the float64 torch reference, reductions, num_items, chunking, compile."""

import importlib
import re

import numpy as np
import pytest
import torch
from op_testing import TOLERANCES, assert_close, largest, non_contiguous, randn
from torch._dynamo.testing import CompileCounterWithBackend

import hetrain  # noqa: F401  (loads hetrain._C and registers the ops)
from hetrain import cpu_features, plugins
from hetrain.nn.linear_cross_entropy import LinearCrossEntropyHead
from hetrain.ops.linear_cross_entropy import (
    DEFAULT_MEMORY_BUDGET,
    TorchBackend,
    _chunked,
    bytes_per_row,
    chunk_rows,
    linear_cross_entropy,
    linear_cross_entropy_ref,
)
from hetrain.ops.triton.linear_cross_entropy import launch_config

BACKENDS = ["triton", "cpu", "torch"]
IGNORE = -100


def inputs(lead, H, V, dtype=torch.float64, seed=0, bias=True, ignored=3):
    """Seeded hidden, weight, bias and targets; ``ignored`` rows carry ignore_index."""
    hidden = randn(*lead, H, dtype=dtype, seed=seed, shift=0.1, requires_grad=True)
    weight = randn(V, H, dtype=dtype, seed=seed + 1, scale=0.4, requires_grad=True)
    b = randn(V, dtype=dtype, seed=seed + 2, requires_grad=True) if bias else None
    g = torch.Generator().manual_seed(seed + 3)
    target = torch.randint(0, V, lead, generator=g)
    flat = target.view(-1)
    flat[torch.randperm(flat.numel(), generator=g)[:ignored]] = IGNORE
    return hidden, weight, b, target


def params(hidden, weight, b):
    return [t for t in (hidden, weight, b) if t is not None]


def run(backend, hidden, weight, b, target, upstream=None, **kw):
    """Loss and gradients of the op on ``backend``."""
    with plugins.use_backend(linear_cross_entropy=backend):
        loss = linear_cross_entropy(hidden, weight, target, b, **kw)
        grads = torch.autograd.grad(loss, params(hidden, weight, b), upstream)
    return loss.detach(), grads


def reference(hidden, weight, b, target, upstream=None, **kw):
    """The float64 oracle on the same input values (memory_budget means nothing to it)."""
    kw.pop("memory_budget", None)
    h64, w64 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    b64 = b.detach().double().requires_grad_() if b is not None else None
    loss = linear_cross_entropy_ref(h64, w64, target, b64, **kw)
    grads = torch.autograd.grad(loss, params(h64, w64, b64), upstream.double() if upstream is not None else None)
    return loss, grads


def assert_grads_close(grads, grads_ref, dtype, what):
    assert len(grads) == len(grads_ref)
    for name, g, g_ref in zip(("hidden", "weight", "bias"), grads, grads_ref, strict=False):
        assert g.dtype == dtype, f"{what} grad {name} dtype {g.dtype}"
        # Sums over rows and vocab: compare relative to the largest entry (with a floor of 1, mean-reduced
        # gradients of a few hundredths passed a 16-bit dtype's tolerance even if they were all zero).
        scale = largest(g_ref)
        assert_close(g / scale, g_ref / scale, dtype, f"{what} grad {name}")


def budget_for(rows, V, H, dtype):
    """A memory budget that holds exactly ``rows`` rows of the chunk."""
    return rows * bytes_per_row(V, H, dtype)


CASES = [
    dict(reduction="mean", bias=True, label_smoothing=0.0),
    dict(reduction="sum", bias=False, label_smoothing=0.1),
    dict(reduction="mean", bias=True, label_smoothing=0.25),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c['reduction']}-bias{c['bias']}-ls{c['label_smoothing']}")
def test_matches_float64_reference(backend, dtype, case):
    H, V, lead = 24, 101, (3, 13)
    hidden, weight, b, target = inputs(lead, H, V, dtype, seed=1, bias=case["bias"], ignored=5)
    kw = dict(reduction=case["reduction"], label_smoothing=case["label_smoothing"],
              memory_budget=budget_for(16, V, H, dtype))  # 39 rows: three chunks, the last short
    loss, grads = run(backend, hidden, weight, b, target, **kw)
    loss_ref, grads_ref = reference(hidden, weight, b, target, **kw)
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32) and loss.shape == ()
    assert_close(loss, loss_ref, dtype, f"{backend} loss")
    assert_grads_close(grads, grads_ref, dtype, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_reduction_none_with_any_upstream_gradient(backend, dtype):
    H, V, lead = 16, 53, (2, 11)
    hidden, weight, b, target = inputs(lead, H, V, dtype, seed=2, ignored=4)
    loss_dtype = torch.promote_types(dtype, torch.float32)
    upstream = randn(*lead, dtype=loss_dtype, seed=9, scale=3.0)
    kw = dict(reduction="none", label_smoothing=0.1, memory_budget=budget_for(5, V, H, dtype))
    loss, grads = run(backend, hidden, weight, b, target, upstream, **kw)
    loss_ref, grads_ref = reference(hidden, weight, b, target, upstream, **kw)
    assert loss.shape == lead and loss.dtype == loss_dtype
    assert torch.all(loss[target == IGNORE] == 0)
    assert_close(loss, loss_ref, dtype, f"{backend} per-row loss")
    assert_grads_close(grads, grads_ref, dtype, backend)


@pytest.mark.parametrize("backend", ["cpu", "triton", "torch"])
def test_num_items_makes_micro_batches_add_up_to_the_batch(backend):
    H, V = 20, 47
    hidden, weight, b, target = inputs((31,), H, V, seed=3, ignored=6)
    num_items = int((target != IGNORE).sum())
    loss_sum, grad_sum = 0.0, [torch.zeros_like(p) for p in params(hidden, weight, b)]
    for lo, hi in ((0, 5), (5, 22), (22, 31)):  # uneven micro-batches
        with plugins.use_backend(linear_cross_entropy=backend):
            loss = linear_cross_entropy(hidden[lo:hi], weight, target[lo:hi], b, num_items=num_items,
                                        label_smoothing=0.1, memory_budget=budget_for(4, V, H, torch.float64))
            grads = torch.autograd.grad(loss, params(hidden, weight, b))
        loss_sum = loss_sum + loss.detach()
        grad_sum = [acc + g for acc, g in zip(grad_sum, grads, strict=True)]
    whole, grads_whole = run(backend, hidden, weight, b, target, reduction="mean", label_smoothing=0.1)
    assert_close(loss_sum, whole, torch.float64, "accumulated loss")
    for g, g_ref in zip(grad_sum, grads_whole, strict=True):
        assert_close(g, g_ref, torch.float64, "accumulated grad")
    # A tensor num_items (a count all-reduced on the device) means the same.
    for count in (torch.tensor(num_items), torch.tensor([num_items])):  # (1,): what all_reduce of a count gives
        for budget in (None, budget_for(4, V, H, torch.float64)):  # one chunk, several
            loss_t, _ = run(backend, hidden, weight, b, target, num_items=count, label_smoothing=0.1,
                            memory_budget=budget)
            assert loss_t.shape == (), count.shape
            assert_close(loss_t, whole, torch.float64, f"tensor num_items of shape {tuple(count.shape)}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_targets_ignored(backend):
    hidden, weight, b, _ = inputs((6,), 8, 37, seed=4, ignored=0)
    target = torch.full((6,), IGNORE)
    loss, grads = run(backend, hidden, weight, b, target, reduction="mean", label_smoothing=0.1)
    torch_loss = torch.nn.functional.cross_entropy(torch.randn(6, 37), target, label_smoothing=0.1)
    assert torch.isnan(loss) and torch.isnan(torch_loss)  # torch's mean over zero tokens is nan too
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)  # ... but its gradients are zeros
    for kw in (dict(reduction="sum"), dict(num_items=12)):
        loss, grads = run(backend, hidden, weight, b, target, **kw)
        assert loss.item() == 0.0, kw
        assert all(torch.equal(g, torch.zeros_like(g)) for g in grads), kw
    loss, _ = run(backend, hidden, weight, b, target, reduction="none", upstream=torch.ones(6, dtype=torch.float64))
    assert torch.equal(loss, torch.zeros(6, dtype=torch.float64))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_an_ignored_row_gives_exactly_zero_gradient_even_if_its_hidden_is_not_finite(backend, bad):
    # A padding position's hidden state may be NaN or inf; its row is ignored, so it contributes exactly zero
    # gradient on every backend. The torch backend multiplied the row's softmax by 0, which kept NaN * 0 = NaN.
    hidden, weight, b, target = inputs((5,), 8, 11, dtype=torch.float32, seed=10, ignored=0)
    target[2] = IGNORE
    with torch.no_grad():
        hidden[2] = bad
    loss, (dh, dw, db) = run(backend, hidden, weight, b, target)
    assert torch.isfinite(loss)
    assert torch.equal(dh[2], torch.zeros_like(dh[2])) and db.isfinite().all()
    kept = [0, 1, 3, 4]
    loss_ref, (dh_ref, _, db_ref) = reference(hidden[kept], weight, b, target[kept])
    assert_close(loss, loss_ref, torch.float32, f"{backend} loss")
    assert_close(dh[kept], dh_ref, torch.float32, f"{backend} dh of the kept rows")
    assert_close(db, db_ref, torch.float32, f"{backend} db")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_masked_vocabulary_and_underflowing_logits(backend, dtype):
    """A -inf bias masks a vocabulary entry: its probability, and so its logit's gradient, is exactly 0; logits
    hundreds below the row's largest underflow exp to 0 rather than to a clamped tiny value."""
    H, V = 8, 67
    hidden, weight, b, target = inputs((19,), H, V, dtype, seed=6, ignored=2)
    masked = torch.tensor([0, 5, 17, 40, 66])
    target[torch.isin(target, masked)] = 1
    with torch.no_grad():
        b[masked] = float("-inf")
        b[30:40] = -300.0
    loss, grads = run(backend, hidden, weight, b, target)
    loss_ref, grads_ref = reference(hidden, weight, b, target)
    assert torch.isfinite(loss)
    assert_close(loss, loss_ref, dtype, f"{backend} masked loss")
    grad_w, grad_b = grads[1], grads[2]
    assert torch.equal(grad_b[masked], torch.zeros_like(grad_b[masked]))
    assert torch.equal(grad_w[masked], torch.zeros_like(grad_w[masked]))
    assert_grads_close(grads, grads_ref, dtype, f"{backend} masked")


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_masked_range_filling_the_first_block_of_a_row(backend):
    """Every logit of the Triton kernel's first block is -inf (a masked range at the start of the vocabulary):
    its running max stays -inf through that block, which once made exp(-inf - -inf) and the loss NaN."""
    dtype = torch.float32
    block = launch_config(10**6, dtype)["BLOCK_V"]
    H, V = 4, block + 37
    hidden, weight, b, target = inputs((3,), H, V, dtype, seed=8, ignored=0)
    with torch.no_grad():
        b[:block] = float("-inf")
    target = torch.tensor([block, block + 5, V - 1])
    loss, grads = run(backend, hidden, weight, b, target)
    loss_ref, grads_ref = reference(hidden, weight, b, target)
    assert torch.isfinite(loss) and all(g.isfinite().all() for g in grads)
    assert_close(loss, loss_ref, dtype, f"{backend} loss")
    assert_grads_close(grads, grads_ref, dtype, f"{backend} masked first block")


def test_chunk_size_respects_the_memory_budget():
    V, H = 30522, 768
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        per_row = bytes_per_row(V, H, dtype)
        for budget in (per_row, 3 * per_row + 1, 10**7, DEFAULT_MEMORY_BUDGET):
            rows = chunk_rows(16384, V, H, dtype, budget)
            assert rows >= 1 and rows * per_row <= budget and (rows + 1) * per_row > budget
    # The default at vocab 30522 and 16384 rows: the float32 chunk plus the per-row losses fit in 128 MiB.
    rows = chunk_rows(16384, V, H, torch.float32)
    assert rows * bytes_per_row(V, H, torch.float32) + 4 * 16384 < 128 * 2**20 and rows == 824
    assert chunk_rows(10, V, H, torch.float32) == 10
    with pytest.raises(ValueError, match="less than one row"):
        chunk_rows(10, V, H, torch.float32, bytes_per_row(V, H, torch.float32) - 1)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_results_do_not_depend_on_chunk_size(backend):
    H, V = 12, 41
    hidden, weight, b, target = inputs((2, 9), H, V, seed=5, ignored=3)
    results = [run(backend, hidden, weight, b, target, label_smoothing=0.05,
                   memory_budget=budget_for(rows, V, H, torch.float64)) for rows in (1, 4, 7, 18)]
    for loss, grads in results[1:]:
        assert_close(loss, results[0][0], torch.float64, "loss across chunk sizes")
        for g, g0 in zip(grads, results[0][1], strict=True):
            assert_close(g, g0, torch.float64, "grad across chunk sizes")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("half_logits", [True, False])
@pytest.mark.parametrize("chunks", ["several", "one"])
def test_half_inputs_on_either_logits_path_match_float64(backend, dtype, half_logits, chunks):
    # CUDA, and a CPU with bf16 dot products, keep bf16/fp16 logits in their dtype (the row kernel computes in
    # float32, the weight gradient is an input-dtype GEMM added into a float32 sum, or written directly when
    # there is one chunk); a CPU that emulates bf16 copies them to float32. Every path runs here, on every
    # backend, whatever this CPU is.
    H, V, rows = 24, 53, 37
    hidden, weight, b, target = inputs((rows,), H, V, dtype=dtype, seed=8, ignored=4)
    scale = torch.tensor(1.0 / rows)
    # 8 chunks on the float32 path, more on the other; or all rows in one
    budget = budget_for(5 if chunks == "several" else rows, V, H, dtype)
    with plugins.use_backend(linear_cross_entropy=backend):
        loss, gh, gw, gb = _chunked(hidden.detach(), weight.detach(), target, b.detach(), IGNORE, 0.1, scale,
                                    budget, (True, True, True), half_logits=half_logits)
    loss_ref, grads_ref = reference(hidden, weight, b, target, reduction="sum", label_smoothing=0.1,
                                    upstream=scale.double())
    assert loss.dtype == torch.float32
    assert_close(loss.sum() * scale, loss_ref * scale.double(), dtype, "loss")
    assert_grads_close([gh, gw, gb.to(dtype)], grads_ref, dtype,
                       f"{backend} half_logits={half_logits} {chunks} chunk(s)")


def test_cpu_keeps_bf16_logits_exactly_where_it_has_bf16_dot_products():
    hidden, weight, b, target = inputs((29,), 16, 41, dtype=torch.bfloat16, seed=9, ignored=2)
    args = (hidden.detach(), weight.detach(), target, b.detach(), IGNORE, 0.0, torch.tensor(1.0 / 29),
            budget_for(8, 41, 16, torch.bfloat16), (True, True, True))
    with plugins.use_backend(linear_cross_entropy="cpu"):
        default = _chunked(*args)
        paths = {flag: _chunked(*args, half_logits=flag) for flag in (True, False)}
    assert not torch.equal(paths[True][2], paths[False][2])  # the weight gradient is rounded differently
    expected = paths[cpu_features.has_fast_bf16()]
    assert all(torch.equal(d, e) for d, e in zip(default, expected, strict=True))


def test_half_logits_hold_a_row_in_the_input_dtype_alone():
    assert bytes_per_row(30522, 768, torch.bfloat16, half_logits=True) == 30522 * 2
    assert chunk_rows(16384, 30522, 768, torch.bfloat16, half_logits=True) == DEFAULT_MEMORY_BUDGET // (30522 * 2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_hidden_and_weight(backend):
    H, V = 18, 29
    hidden, weight, b, target = inputs((3, 5), H, V, seed=6)
    hidden = non_contiguous(hidden)
    weight = randn(H, V, dtype=torch.float64, seed=7, scale=0.4).t().requires_grad_()  # a transposed view
    loss, grads = run(backend, hidden, weight, b, target, memory_budget=budget_for(4, V, H, torch.float64))
    loss_ref, grads_ref = reference(hidden, weight, b, target)
    assert_close(loss, loss_ref, torch.float64, "loss")
    assert_grads_close(grads, grads_ref, torch.float64, "non-contiguous")


def test_unbatched_and_empty_inputs():
    hidden, weight, b, _ = inputs((1,), 8, 19, seed=8, ignored=0)
    target = torch.tensor(4)
    loss, grads = run("cpu", hidden[0], weight, b, target)
    loss_ref, grads_ref = reference(hidden[0], weight, b, target)
    assert_close(loss, loss_ref, torch.float64, "unbatched")
    empty = torch.empty(0, 8, dtype=torch.float64, requires_grad=True)
    loss, grads = run("cpu", empty, weight, b, torch.empty(0, dtype=torch.int64), reduction="sum")
    assert loss.item() == 0.0 and grads[0].shape == (0, 8) and torch.equal(grads[1], torch.zeros_like(weight))


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gradcheck(reduction):
    hidden, weight, b, target = inputs((7,), 5, 11, seed=9, ignored=2)

    def fn(h, w, bb):
        return linear_cross_entropy(h, w, target, bb, reduction=reduction, label_smoothing=0.1,
                                    memory_budget=budget_for(3, 11, 5, torch.float64))

    with plugins.use_backend(linear_cross_entropy="cpu"):
        assert torch.autograd.gradcheck(fn, (hidden, weight, b))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_double_backward_raises_instead_of_a_wrong_second_derivative(reduction):
    # The gradients are computed in forward; a gradient of them used to re-enter the first-order backward and
    # return a wrong Hessian-vector product without an error. A first-order gradient with create_graph=True still works.
    hidden, weight, b, target = inputs((6,), 5, 7, seed=12)
    with plugins.use_backend(linear_cross_entropy="cpu"):
        loss = linear_cross_entropy(hidden, weight, target, b, reduction=reduction).sum()
        gh, gw = torch.autograd.grad(loss, (hidden, weight), create_graph=True)
    h64, w64 = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
    ref = linear_cross_entropy_ref(h64, w64, target, b.detach(), reduction=reduction).sum()
    gh_ref, gw_ref = torch.autograd.grad(ref, (h64, w64))
    assert_close(gh, gh_ref, torch.float64, "first-order hidden grad")
    assert_close(gw, gw_ref, torch.float64, "first-order weight grad")
    with pytest.raises(RuntimeError, match="double backward .* not supported"):
        torch.autograd.grad(gh.square().sum(), hidden)
    with pytest.raises(RuntimeError, match="double backward .* not supported"):
        torch.autograd.grad(gw.sum(), weight, allow_unused=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_jacrev_matches_the_references_for_hidden_weight_and_bias(backend, reduction):
    # reduction="none": jacrev vmaps the backward, whose chunks are written into the op's own buffers (out=, in
    # place), which vmap's batching fallback refused ("the fallback path doesn't work on out= or view ops"). The
    # custom op now runs it sample by sample on plain tensors. A budget of two rows makes several chunks.
    hidden, weight, b, target = (t.detach() for t in inputs((5,), 4, 7, seed=21, ignored=1))
    kw = dict(reduction=reduction, label_smoothing=0.1)

    def jacobian(fn, **extra):
        return torch.func.jacrev(lambda h, w, bb: fn(h, w, target, bb, **kw, **extra), argnums=(0, 1, 2))(
            hidden, weight, b)

    expected = jacobian(linear_cross_entropy_ref)
    with plugins.use_backend(linear_cross_entropy=backend):
        got = jacobian(linear_cross_entropy, memory_budget=budget_for(2, 7, 4, torch.float64))
    for name, g, e in zip(("hidden", "weight", "bias"), got, expected, strict=True):
        assert_close(g, e, torch.float64, f"jacobian for {name}")


def _per_sample_grads(fn, weight, hidden, target, **kw):
    return torch.func.vmap(torch.func.grad(lambda w, h, t: fn(h, w, t, **kw).sum()), in_dims=(None, 0, 0))(
        weight, hidden, target)


def _grad_of_vmap(fn, weight, hidden, target, **kw):
    return torch.func.grad(lambda w: torch.func.vmap(lambda h, t: fn(h, w, t, **kw))(hidden, target).sum())(weight)


@pytest.mark.parametrize("composition", [_per_sample_grads, _grad_of_vmap], ids=["vmap(grad)", "grad(vmap)"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_vmap_with_a_torch_func_gradient_is_refused_naming_the_reference_where_backward_cannot_batch(
        composition, reduction):
    """The reduced loss's backward reads its upstream gradient's value, which vmap cannot: once grad of vmap and vmap
    of grad passed the op, it failed there with vmap's ".item()" error. reduction="none" recomputes per row and
    batches: it matches the reference."""
    hidden, weight, _b, target = (t.detach() for t in inputs((4, 5), 6, 7, seed=21, ignored=1))
    with plugins.use_backend(linear_cross_entropy="cpu"):
        if reduction != "none":
            with pytest.raises(RuntimeError, match=r"hetrain.ops.linear_cross_entropy: torch.vmap .* is not "
                                                   r"supported.* Use hetrain.ops.linear_cross_entropy_ref"):
                composition(linear_cross_entropy, weight, hidden, target, reduction=reduction)
            return
        got = composition(linear_cross_entropy, weight, hidden, target, reduction=reduction)
    expected = composition(linear_cross_entropy_ref, weight, hidden, target, reduction=reduction)
    assert_close(got, expected, torch.float64, "weight gradient")


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_vmap_of_the_reduced_loss_under_autograd_is_refused_naming_the_reference(reduction):
    """A BatchedTensor says requires_grad=False for a tensor that requires grad beneath vmap: hidden's gradient was
    not asked of the kernel, so on the GPU path it came back None; on the CPU path backward failed in vmap's error
    for .item(), naming no op. With nothing to differentiate the batched loss is the reference's."""
    hidden, weight, _b, target = inputs((4, 5), 6, 7, seed=22, ignored=1)
    refused = (r"hetrain.ops.linear_cross_entropy: torch.vmap over the reduced loss .* Use "
               r"hetrain.ops.linear_cross_entropy_ref")
    with plugins.use_backend(linear_cross_entropy="cpu"):
        with pytest.raises(RuntimeError, match=refused):
            torch.vmap(lambda h, t: linear_cross_entropy(h, weight, t, reduction=reduction))(hidden, target)
        with pytest.raises(RuntimeError, match=refused):  # only the target batched: backward read the batched loss
            torch.vmap(lambda t: linear_cross_entropy(hidden[0], weight, t, reduction=reduction))(target)
        frozen = weight.detach()  # batched inference, nothing to differentiate: runs with gradients enabled
        got = torch.vmap(lambda h, t: linear_cross_entropy(h, frozen, t, reduction=reduction))(hidden.detach(), target)
    expected = torch.stack([linear_cross_entropy_ref(h, frozen, t, reduction=reduction)
                            for h, t in zip(hidden.detach(), target, strict=True)])
    assert_close(got, expected, torch.float64, "loss")


def test_gradients_skipped_when_nothing_requires_them():
    hidden, weight, b, target = inputs((9,), 8, 23, seed=10)
    with torch.no_grad():
        loss = linear_cross_entropy(hidden, weight, target, b)
    assert loss.grad_fn is None
    assert_close(loss, reference(hidden, weight, b, target)[0], torch.float64, "no-grad loss")
    scale = torch.tensor(1.0 / 9, dtype=torch.float64)
    args = (hidden.detach(), weight.detach(), target, b.detach(), scale, IGNORE, 0.0, 2**20)
    _, gh, gw, gb = torch.ops.hetrain.linear_cross_entropy(*args, False, True, False)
    assert gh.numel() == 0 and gb.numel() == 0 and gw.shape == weight.shape
    frozen_weight = weight.detach()  # a frozen head: only hidden's gradient is computed
    with plugins.use_backend(linear_cross_entropy="cpu"):
        (gh,) = torch.autograd.grad(linear_cross_entropy(hidden, frozen_weight, target), hidden)
    h64 = hidden.detach().requires_grad_()
    (gh_ref,) = torch.autograd.grad(linear_cross_entropy_ref(h64, frozen_weight, target), h64)
    assert_close(gh, gh_ref, torch.float64, "hidden grad")


def test_autocast_runs_the_projection_in_the_autocast_dtype():
    hidden, weight, b, target = inputs((10,), 16, 31, torch.float32, seed=11)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(hidden, weight, target, b)
    loss.backward()
    expected = linear_cross_entropy_ref(hidden.bfloat16(), weight.bfloat16(), target, b.bfloat16())
    assert loss.dtype == torch.float32 and weight.grad.dtype == torch.float32
    assert_close(loss, expected, torch.bfloat16, "autocast loss")
    # bf16 tolerance would also pass a float32 projection: the loss must be the bf16 one, not the float32 one.
    full = linear_cross_entropy_ref(hidden.detach(), weight.detach(), target, b.detach())
    assert (loss - expected).abs() < (loss - full).abs() / 10


def test_custom_ops_pass_opcheck():
    hidden, weight, b, target = inputs((9,), 8, 23, torch.float32, seed=12)
    h, w, bb = hidden.detach().requires_grad_(), weight.detach().requires_grad_(), b.detach().requires_grad_()
    scale = torch.tensor(1.0 / 6)
    for needs in ((True, True, True), (False, True, False)):
        torch.library.opcheck(torch.ops.hetrain.linear_cross_entropy.default,
                              (h, w, target, bb, scale, IGNORE, 0.1, 4096, *needs))
    torch.library.opcheck(torch.ops.hetrain.linear_cross_entropy_rows.default, (h, w, target, None, IGNORE, 0.0, 4096))
    torch.library.opcheck(torch.ops.hetrain.linear_cross_entropy_rows_bwd.default,
                          (randn(9, seed=13), h.detach(), w.detach(), target, bb.detach(), IGNORE, 0.1, 4096,
                           True, True, True))


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_torch_compile_fullgraph(backend, reduction):
    torch._dynamo.reset()
    hidden, weight, b, target = inputs((2, 7), 16, 37, torch.float32, seed=14)

    def head(h, w, bb, t):
        return linear_cross_entropy(torch.tanh(h), w, t, bb, reduction=reduction, label_smoothing=0.1,
                                    memory_budget=4 * 37 * 4).sum()

    with plugins.use_backend(linear_cross_entropy=backend):
        compiled = torch.compile(head, fullgraph=True, backend="aot_eager")
        loss = compiled(hidden, weight, b, target)
        grads = torch.autograd.grad(loss, (hidden, weight, b))
    expected = linear_cross_entropy_ref(torch.tanh(hidden), weight, target, b, reduction=reduction,
                                        label_smoothing=0.1).sum()
    grads_expected = torch.autograd.grad(expected, (hidden, weight, b))
    assert_close(loss, expected, torch.float32, "compiled loss")
    for g, ge in zip(grads, grads_expected, strict=True):
        assert_close(g, ge, torch.float32, "compiled grad")


def test_inductor_compiles_without_graph_breaks_or_recompiles_per_batch_size():
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("inductor")
    weight = randn(29, 16, seed=15, scale=0.4)
    compiled = torch.compile(lambda h, t: linear_cross_entropy(h, weight, t), fullgraph=True, backend=counter)
    for rows in (12, 20, 28):
        hidden, _, _, target = inputs((rows,), 16, 29, torch.float32, seed=rows)
        assert_close(compiled(hidden.detach(), target), linear_cross_entropy_ref(hidden.detach(), weight, target),
                     torch.float32, f"inductor {rows} rows")
    assert 1 <= counter.frame_count <= 2  # the first size, then one dynamic-shape graph for every other


def test_triton_rows_kernel_walks_a_vocabulary_of_several_blocks():
    from hetrain.ops.triton.linear_cross_entropy import launch_config, rows

    V = 4100  # past one 4096-wide float32 block
    assert launch_config(V, torch.float32)["BLOCK_V"] < V
    logits = randn(3, V, seed=16, scale=4.0)
    target = torch.tensor([5, IGNORE, V - 1])
    scale = randn(3, seed=17)
    expected, expected_loss = logits.clone(), torch.empty(3)
    TorchBackend.rows(expected, expected_loss, target, scale, IGNORE, 0.2)
    got, loss = logits.clone(), torch.empty(3)
    rows(got, loss, target, scale, IGNORE, 0.2)
    assert_close(loss, expected_loss, torch.float32, "loss")
    assert_close(got, expected, torch.float32, "dlogits")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_the_loss_keeps_its_precision_beside_large_logits(backend, label_smoothing):
    # The loss was lse - z_t (- eps / V * sum_j z_j) with lse = max + log(sum): beside logits of 2^24 a loss of
    # 0.145 came out 0, and with smoothing the sum of logits near 3e37 overflowed to a loss of -inf. A row's loss
    # does not change with a common offset; torch's float32 cross_entropy keeps it to float32 precision.
    from hetrain.ops.linear_cross_entropy import CppBackend
    from hetrain.ops.triton.linear_cross_entropy import rows as triton_rows

    rows = {"triton": triton_rows, "cpu": CppBackend.rows, "torch": TorchBackend.rows}[backend]
    block = launch_config(10**6, torch.float32)["BLOCK_V"]
    walk = randn(3, block + 37, seed=21, scale=3.0) + 1e5  # several blocks: the Triton kernel's max moves
    walk[0, -1] += 40.0
    walk[1, block + 5] += 40.0
    walk[2, :block] = float("-inf")  # a masked first block: inf with smoothing, as torch
    cases = [(2.0**24 + torch.tensor([[0.0, 2.0, 4.0, 6.0, 8.0]]), [4]),
             (torch.full((1, 64), 3e37) + torch.arange(64.0)[None] * 1e31, [3]),
             (walk, [block + 1, 7, block + 2])]
    for z, t in cases:
        t = torch.tensor(t)
        want = torch.nn.functional.cross_entropy(z.double(), t, label_smoothing=label_smoothing, reduction="none")
        for scale in (None, torch.ones(len(t))):
            loss = torch.empty(len(t))
            rows(z.clone(), loss, t, scale, IGNORE, label_smoothing)
            what = f"{backend} {tuple(z.shape)} scale={scale is not None}"
            torch.testing.assert_close(loss.double(), want, rtol=1e-6, atol=0, msg=lambda m, what=what: f"{what}: {m}")
    hidden, weight = torch.ones(1, 1), (2.0**24 + torch.tensor([0.0, 2.0, 4.0, 6.0, 8.0]))[:, None]
    with plugins.use_backend(linear_cross_entropy=backend):
        loss = linear_cross_entropy(hidden, weight, torch.tensor([4]), label_smoothing=label_smoothing)
    want = torch.nn.functional.cross_entropy((hidden @ weight.T).double(), torch.tensor([4]),
                                             label_smoothing=label_smoothing)
    torch.testing.assert_close(loss.double(), want, rtol=1e-6, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_the_gradient_keeps_its_precision_beside_large_logits(backend, label_smoothing):
    # The softmax was exp(z - lse): float32 rounded lse = max + log(sum) at the logits' magnitude, so beside logits
    # of 2^20 the gradient was 6% off (0.007 absolute). The exact float64 softmax of the same float32 values.
    from hetrain.ops.linear_cross_entropy import CppBackend
    from hetrain.ops.triton.linear_cross_entropy import rows as triton_rows

    rows = {"triton": triton_rows, "cpu": CppBackend.rows, "torch": TorchBackend.rows}[backend]
    base = randn(4, 50, dtype=torch.float64, seed=22)
    target = torch.tensor([3, 17, 0, 49])
    scale = torch.tensor([1.0, 0.5, 2.0, 1.0])
    for offset in (0.0, 2.0**20, 2.0**22):
        z = (base + offset).float()
        want = torch.softmax(z.double(), 1) - label_smoothing / 50
        want[torch.arange(4), target] -= 1.0 - label_smoothing
        want *= scale.double()[:, None]
        got = z.clone()
        rows(got, torch.empty(4), target, scale, IGNORE, label_smoothing)
        torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-6,
                                   msg=lambda m, offset=offset: f"{backend} at offset {offset}: {m}")


def test_bad_inputs_raise_clear_errors():
    hidden, weight, b, target = inputs((4,), 8, 13, torch.float32, seed=18, ignored=1)
    with pytest.raises(ValueError, match=r"target 13 is outside \[0, 13\)"):
        linear_cross_entropy(hidden, weight, torch.tensor([0, 1, 13, IGNORE]), b)
    with pytest.raises(ValueError, match=r"target -1 is outside"):
        linear_cross_entropy(hidden, weight, torch.tensor([0, -1, 2, 3]), b)
    with pytest.raises(ValueError, match=r"weight must be \(V, H\)"):
        linear_cross_entropy(hidden, randn(13, 7), target, b)
    with pytest.raises(ValueError, match=r"bias must have shape \(13,\)"):
        linear_cross_entropy(hidden, weight, target, randn(12))
    with pytest.raises(ValueError, match=r"target must have shape \(4,\)"):
        linear_cross_entropy(hidden, weight, target[:3], b)
    for small in (target.int(), target.clamp(min=0).to(torch.uint8)):  # int64 is documented; name the fix
        with pytest.raises(ValueError, match=rf"target must be int64 class indices, got {small.dtype}; "
                                             r"pass target.long\(\)"):
            linear_cross_entropy(hidden, weight, small, b)
    with pytest.raises(ValueError, match="weight dtype torch.float64 differs from hidden's torch.float32"):
        linear_cross_entropy(hidden, weight.double(), target, b)
    with pytest.raises(ValueError, match="weight is on meta but hidden is on cpu"):
        linear_cross_entropy(hidden, torch.empty(13, 8, device="meta"), target, b)
    with pytest.raises(ValueError, match="label_smoothing must be in"):
        linear_cross_entropy(hidden, weight, target, b, label_smoothing=1.5)
    # Raw Python errors before: AttributeError ('NoneType' object has no attribute 'dim') and TypeError ('<=' not
    # supported between instances of 'float' and 'str').
    for args, message in (
        (([[1.0] * 8] * 4, weight, target, b), "hidden must be a floating tensor with >= 1 dim, got list"),
        ((hidden, None, target, b), r"weight must be a \(V, H\) tensor, as nn.Linear's weight, got NoneType"),
        ((hidden, weight, [0, 1, 2, 3], b), "target must be an int64 tensor of class indices, got list"),
        ((hidden, weight, target, [0.0] * 13), r"bias must be a \(V,\) tensor or None, got list"),
    ):
        with pytest.raises(ValueError, match=message):
            linear_cross_entropy(*args)
    with pytest.raises(ValueError, match=r"label_smoothing must be in \[0, 1\], got '0.1', a str: pass a float"):
        linear_cross_entropy(hidden, weight, target, b, label_smoothing="0.1")
    with pytest.raises(ValueError, match="reduction must be"):
        linear_cross_entropy(hidden, weight, target, b, reduction="avg")
    for count in (0, np.int64(0), -3.0, True, "3"):
        with pytest.raises(ValueError, match="num_items must be a count > 0, got"):
            linear_cross_entropy(hidden, weight, target, b, num_items=count)
    for count in (torch.tensor(0), torch.tensor(-3)):  # an inf or negative loss, silently, before
        with pytest.raises(ValueError, match="num_items must be > 0, got"):
            linear_cross_entropy(hidden, weight, target, b, num_items=count)
    with pytest.raises(ValueError, match=r"num_items must be one number, got a torch.int64 tensor of shape \(2,\)"):
        linear_cross_entropy(hidden, weight, target, b, num_items=torch.tensor([3, 3]))
    for index in (1.5, True, np.float64(3.0), torch.tensor(3)):  # 1.5 was read as 1
        message = "ignore_index must be an integer class index, got " + re.escape(repr(index))
        with pytest.raises(ValueError, match=message):
            linear_cross_entropy(hidden, weight, target, b, ignore_index=index)
    with pytest.raises(ValueError, match="no meaning with reduction='none'"):
        linear_cross_entropy(hidden, weight, target, b, reduction="none", num_items=3)
    with pytest.raises(ValueError, match="less than one row"):
        linear_cross_entropy(hidden, weight, target, b, memory_budget=16)
    # A NaN passed a "<= 0" check and failed in int(); 0.5 passed a "> 0" one and was reported as "memory_budget=0".
    for budget in (float("nan"), float("inf"), "1e6", 0.5, 0):
        with pytest.raises(ValueError, match=rf"memory_budget must be a finite number of bytes >= 1, got {budget!r}"):
            linear_cross_entropy(hidden, weight, target, b, memory_budget=budget)
    with pytest.raises(RuntimeError, match=r"target 13 in row 0 is outside \[0, 13\)"):
        torch.ops.hetrain_C.cross_entropy_rows_(randn(1, 13), torch.empty(1), torch.tensor([13]), None, IGNORE, 0.0)
    with pytest.raises(RuntimeError, match="logits must be a floating-point tensor, got Int"):
        torch.ops.hetrain_C.cross_entropy_rows_(torch.ones(1, 13, dtype=torch.int32), torch.empty(1),
                                                torch.tensor([1]), None, IGNORE, 0.0)
    with pytest.raises(RuntimeError, match=r"loss must be a contiguous \(1,\) Float tensor for BFloat16 logits"):
        torch.ops.hetrain_C.cross_entropy_rows_(randn(1, 13).bfloat16(), torch.empty(1, dtype=torch.bfloat16),
                                                torch.tensor([1]), None, IGNORE, 0.0)


def test_numpy_integer_ignore_index_is_taken_as_by_torch_eager_and_compiled():
    # It was refused as "must be an integer class index, got np.int64(-100)".
    torch._dynamo.reset()
    hidden, weight, b, target = inputs((6,), 8, 13, torch.float32, seed=19, ignored=0)
    hidden, weight, b = (t.detach() for t in (hidden, weight, b))
    ignored = int(target[2])
    expected = linear_cross_entropy_ref(hidden, weight, target, b, ignore_index=ignored)
    index = np.int64(ignored)
    assert_close(linear_cross_entropy(hidden, weight, target, b, ignore_index=index), expected, torch.float32,
                 "eager")
    # torch.compile traces a NumPy integer as a 0-d array, which an isinstance check would refuse.
    compiled = torch.compile(lambda h, i: linear_cross_entropy(h, weight, target, b, ignore_index=i),
                             fullgraph=True, backend="eager")
    assert_close(compiled(hidden, index), expected, torch.float32, "compiled")


def test_a_zero_dim_cpu_tensor_label_smoothing_is_taken_as_by_f_cross_entropy():
    # It was refused as "label_smoothing must be in [0, 1], got tensor(0.1000), a Tensor: pass a float".
    hidden, weight, b, target = (t.detach() if t is not None else t
                                 for t in inputs((6,), 8, 13, torch.float32, seed=20, ignored=1))
    logits = torch.nn.functional.linear(hidden, weight, b)
    for smoothing in (torch.tensor(0.1), torch.tensor(0.1, dtype=torch.float64), torch.tensor(0)):
        expected = torch.nn.functional.cross_entropy(logits, target, label_smoothing=smoothing)
        assert_close(linear_cross_entropy(hidden, weight, target, b, label_smoothing=smoothing), expected,
                     torch.float32, f"label_smoothing={smoothing!r}")
    head = LinearCrossEntropyHead(8, 13, label_smoothing=torch.tensor(0.1))
    head.load_state_dict({"weight": weight, "bias": b})
    expected = torch.nn.functional.cross_entropy(logits, target, label_smoothing=0.1)
    assert_close(head(hidden, target), expected, torch.float32, "head")
    # Bools and strings stay refused; a tensor of another shape or device names the fix.
    for smoothing, message in (
        (True, "got True, a bool: pass a float"), ("0.1", "got '0.1', a str: pass a float"),
        (torch.tensor(1.5), r"label_smoothing must be in \[0, 1\], got 1.5"),
        (torch.tensor(True), r"got a torch.bool tensor of shape \(\) on cpu: pass float\(label_smoothing\)"),
        (torch.tensor([0.1]), r"got a torch.float32 tensor of shape \(1,\) on cpu"),
        (torch.tensor(0.1, device="meta"), r"or a 0-d CPU tensor holding one, got a torch.float32 tensor of shape "
                                           r"\(\) on meta: pass float\(label_smoothing\)"),
    ):
        with pytest.raises(ValueError, match=message):
            linear_cross_entropy(hidden, weight, target, b, label_smoothing=smoothing)


def test_head_module_is_state_dict_compatible_with_linear():
    torch.manual_seed(0)
    linear = torch.nn.Linear(24, 57)
    head = LinearCrossEntropyHead(24, 57, label_smoothing=0.1)
    assert head.state_dict().keys() == linear.state_dict().keys()
    head.load_state_dict(linear.state_dict())
    hidden, _, _, target = inputs((2, 6), 24, 57, torch.float32, seed=19)
    expected = linear_cross_entropy_ref(hidden, linear.weight, target, linear.bias, label_smoothing=0.1)
    assert_close(head(hidden, target), expected, torch.float32, "head loss")
    shared = LinearCrossEntropyHead.from_linear(linear, reduction="sum")
    assert shared.weight is linear.weight and shared.bias is linear.bias
    assert_close(shared(hidden, target, num_items=5),
                 linear_cross_entropy_ref(hidden, linear.weight, target, linear.bias, num_items=5), torch.float32,
                 "shared head with num_items")
    no_bias = LinearCrossEntropyHead.from_linear(torch.nn.Linear(24, 57, bias=False))
    assert no_bias.bias is None and "bias" not in no_bias.state_dict()
    with pytest.raises(TypeError, match="device"):  # it shares the Linear's parameters, so their device
        LinearCrossEntropyHead.from_linear(linear, device="cpu")
    assert "vocab=57" in repr(head)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_matches_reference(dtype):
    hidden, weight, b, target = inputs((4, 33), 64, 1000, dtype, seed=20, ignored=7)
    cuda = [t.detach().cuda().requires_grad_() for t in (hidden, weight, b)]
    loss, grads = run("triton", cuda[0], cuda[1], cuda[2], target.cuda(), label_smoothing=0.1,
                      memory_budget=budget_for(50, 1000, 64, dtype))
    loss_ref, grads_ref = reference(hidden, weight, b, target, label_smoothing=0.1)
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(loss.cpu().double(), loss_ref, atol=atol, rtol=rtol)
    assert_grads_close([g.cpu() for g in grads], grads_ref, dtype, "cuda")


def test_the_float32_weight_gradient_gemm_is_used_only_where_torch_has_it():
    lce = importlib.import_module("hetrain.ops.linear_cross_entropy")
    # The CPU has no aten::addmm.dtype_out kernel: the scratch path, as the tests above ran it.
    assert lce._gemm_adds_into_float32(torch.device("cpu")) is False
    assert lce._ADDS_INTO_FLOAT32["cpu"] is False  # tried once, then remembered


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_half_weight_gradient_sums_in_float32_on_either_path(dtype):
    lce = importlib.import_module("hetrain.ops.linear_cross_entropy")
    hidden, weight, b, target = inputs((6, 50), 64, 1000, dtype, seed=21)
    budget = budget_for(40, 1000, 64, dtype)  # eight chunks, each adding its share into the float32 sum
    _, grads_ref = reference(hidden, weight, b, target)
    direct_ok = lce._gemm_adds_into_float32(torch.device("cuda"))
    for direct in (True, False) if direct_ok else (False,):
        lce._ADDS_INTO_FLOAT32["cuda"] = direct
        try:
            _, grads = run("triton", *(t.detach().cuda().requires_grad_() for t in (hidden, weight, b)),
                           target.cuda(), memory_budget=budget)
        finally:
            lce._ADDS_INTO_FLOAT32["cuda"] = direct_ok
        assert_grads_close([g.cpu() for g in grads], grads_ref, dtype, f"cuda, GEMM into float32: {direct}")


@pytest.mark.cuda
def test_cuda_extra_memory_stays_under_128_mib():
    rows, H, V = 16384, 768, 30522
    hidden = torch.randn(rows, H, device="cuda", requires_grad=True)
    weight = torch.randn(V, H, device="cuda", requires_grad=True)
    target = torch.randint(0, V, (rows,), device="cuda")
    linear_cross_entropy(hidden[:8], weight, target[:8]).backward()  # cuBLAS workspaces exist before measuring
    hidden.grad = weight.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    loss = linear_cross_entropy(hidden, weight, target)
    torch.cuda.synchronize()
    grads_kept = (rows * H + V * H) * 4  # the stored input gradients, what autograd would allocate anyway
    extra = torch.cuda.max_memory_allocated() - before - grads_kept
    assert extra < 128 * 2**20, f"extra memory {extra / 2**20:.1f} MiB"
    loss.backward()


def test_the_weight_gradient_is_taken_without_a_copy_and_a_kept_graph_finds_it_unscaled():
    hidden, weight, b, target = inputs((5, 7), 16, 40, seed=30)
    saved = []

    def pack(t):
        saved.append(t.data_ptr())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = linear_cross_entropy(hidden, weight, target, b)
    (3 * loss).backward()  # the graph is not kept: the forward's gradients are scaled in place and taken
    assert weight.grad.data_ptr() in saved and b.grad.data_ptr() in saved
    _, grads_ref = reference(hidden, weight, b, target)
    for g, g_ref in zip((hidden.grad, weight.grad, b.grad), grads_ref, strict=True):
        torch.testing.assert_close(g, 3 * g_ref)

    for t in (hidden, weight, b):
        t.grad = None
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = linear_cross_entropy(hidden, weight, target, b)
    loss.backward()  # a loss gradient of 1 on the CPU: the forward's gradients are taken with no multiply
    assert weight.grad.data_ptr() in saved and b.grad.data_ptr() in saved
    for g, g_ref in zip((hidden.grad, weight.grad, b.grad), grads_ref, strict=True):
        torch.testing.assert_close(g, g_ref)

    for t in (hidden, weight, b):
        t.grad = None
    loss = 3 * linear_cross_entropy(hidden, weight, target, b)
    loss.backward(retain_graph=True)
    first = [t.grad.clone() for t in (hidden, weight, b)]
    loss.backward()  # through the kept graph: the saved gradients are still those of the forward
    for t, g, g_ref in zip((hidden, weight, b), first, grads_ref, strict=True):
        torch.testing.assert_close(g, 3 * g_ref)
        torch.testing.assert_close(t.grad, 6 * g_ref)


def test_a_tensor_num_items_on_the_cpu_compiles_fullgraph():
    # Its value check read the tensor, which Dynamo cannot guard on: "Could not guard on data-dependent expression".
    torch._dynamo.reset()
    hidden, weight, b, target = inputs((8,), 8, 13, torch.float32, seed=20)

    def step(h, w, bb, t):
        return linear_cross_entropy(h, w, t, bb, num_items=(t != IGNORE).sum())  # a count as a tensor

    compiled = torch.compile(step, fullgraph=True, backend="eager")
    expected = linear_cross_entropy_ref(hidden, weight, target, b, num_items=int((target != IGNORE).sum()))
    assert_close(compiled(hidden, weight, b, target), expected, torch.float32, "compiled with tensor num_items")


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_the_head_runs_forward_and_backward_on_the_meta_device(reduction):
    # Asking autocast about the meta device raised "unknown device type for autocast": a model built on meta
    # could not trace its loss.
    head = LinearCrossEntropyHead(8, 13, reduction=reduction, device="meta")
    hidden = torch.empty(2, 3, 8, device="meta", requires_grad=True)
    loss = head(hidden, torch.zeros(2, 3, dtype=torch.long, device="meta"))
    assert loss.is_meta and loss.shape == (() if reduction == "mean" else (2, 3)) and loss.dtype == torch.float32
    leaves = [hidden, head.weight, head.bias]
    for g, t in zip(torch.autograd.grad(loss, leaves, torch.ones_like(loss)), leaves, strict=True):
        assert g.is_meta and g.shape == t.shape


def test_the_head_refuses_a_non_integer_ignore_index_at_construction():
    # It was taken, and refused only at the first forward.
    for index in (1.5, True):
        with pytest.raises(ValueError, match="LinearCrossEntropyHead: ignore_index must be an integer class index"):
            LinearCrossEntropyHead(8, 13, ignore_index=index)
    assert LinearCrossEntropyHead(8, 13, ignore_index=np.int64(-1)).ignore_index == -1
