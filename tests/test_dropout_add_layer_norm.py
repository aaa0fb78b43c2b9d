"""dropout_add_layer_norm: every backend against the float64 torch composition with the shared mask,
every backend's mask the same, reproducibility, dropped fraction, gradcheck, compile, errors, nn."""

import pytest
import torch
from op_testing import assert_close, non_contiguous, randn

from hetrain import plugins
from hetrain.nn.dropout_add_layer_norm import DropoutAddLayerNorm
from hetrain.ops.dropout_add_layer_norm import dropout_add_layer_norm, dropout_add_layer_norm_ref
from hetrain.ops.dropout_add_layer_norm import keep_mask as stream_keep_mask
from hetrain.ops.layer_norm import layer_norm_ref
from hetrain.ops.rng import stream

BACKENDS = ["triton", "cpu", "torch"]
SHAPES = [(3, 1), (4, 7), (2, 5, 33), (6, 100), (1, 257), (2, 3, 768)]
fused_op = torch.ops.hetrain.dropout_add_layer_norm_fwd


def inputs(shape, dtype=torch.float32, affine=True):
    x = randn(*shape, dtype=dtype, seed=1, scale=2.0, shift=0.5, requires_grad=True)
    r = randn(*shape, dtype=dtype, seed=2, requires_grad=True)
    w = randn(shape[-1], dtype=dtype, seed=3, shift=1.0, requires_grad=True) if affine else None
    b = randn(shape[-1], dtype=dtype, seed=4, requires_grad=True) if affine else None
    return x, r, w, b


def keep_mask(seed, rows, cols, p):
    """The (rows, cols) mask every backend draws for the stream ``seed`` (int64 ``(seed[, offset])``) and ``p``."""
    s, offset = stream(seed)
    return stream_keep_mask(s, rows, cols, p, offset=offset)


def with_grads(fn, tensors, dy):
    y = fn()
    wanted = [t for t in tensors if t is not None]
    return y, torch.autograd.grad(y, wanted, dy)


def reference(x, r, w, b, keep, p, dy, eps=1e-5):
    """The float64 torch composition on the same values and kept positions."""
    t64 = [t.detach().double().requires_grad_() if t is not None else None for t in (x, r, w, b)]
    return with_grads(lambda: dropout_add_layer_norm_ref(*t64, keep, p, eps), t64, dy.double())


def compare(backend, got, want, dtype):
    (y, grads), (y_ref, grads_ref) = got, want
    assert y.dtype == dtype
    assert_close(y, y_ref, dtype, f"{backend} y")
    assert len(grads) == len(grads_ref)
    for name, g, g_ref in zip(("dx", "dresidual", "dw", "db"), grads, grads_ref, strict=False):
        scale = max(1.0, g_ref.abs().max().item()) if name in ("dw", "db") else 1.0  # sums over rows
        assert_close(g / scale, g_ref / scale, dtype, f"{backend} {name}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
def test_p0_matches_layer_norm_of_the_sum(backend, dtype, shape):
    x, r, w, b = inputs(shape, dtype)
    dy = randn(*shape, dtype=dtype, seed=7)
    with plugins.use_backend(dropout_add_layer_norm=backend):
        got = with_grads(lambda: dropout_add_layer_norm(x, r, w, b, 0.0), (x, r, w, b), dy)
    compare(backend, got, reference(x, r, w, b, None, 0.0, dy), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("dtype", "eps"), [(torch.float32, torch.finfo(torch.float32).max), (torch.float64, 1e39)])
def test_the_largest_eps_float32_holds_gives_torchs_output_and_a_larger_one_is_refused(backend, dtype, eps):
    """An eps past float32's range became inf where the kernels add it, and every row NaN, where F.layer_norm
    of the sum returns the bias. float64 inputs, computed in float64, take it."""
    x, r, w, b = inputs((4, 8), dtype)
    dy = randn(4, 8, dtype=dtype, seed=7)
    with plugins.use_backend(dropout_add_layer_norm=backend):
        got = with_grads(lambda: dropout_add_layer_norm(x, r, w, b, 0.0, eps=eps), (x, r, w, b), dy)
    compare(backend, got, reference(x, r, w, b, None, 0.0, dy, eps), dtype)
    x, r, w, b = inputs((4, 8))
    with plugins.use_backend(dropout_add_layer_norm=backend), pytest.raises(
            ValueError, match=r"eps must be at most 3.4028234663852886e\+38 .* for torch.float32 inputs.*got 1e\+39"):
        dropout_add_layer_norm(x, r, w, b, 0.1, eps=1e39)


def test_parameters_are_cast_to_the_inputs_dtype_before_the_float32_arithmetic():
    """As the docstring says (it said they were cast to float32): a float32 weight of a bf16 call is rounded to
    bf16 first, as layer_norm rounds it."""
    x, r = randn(4, 64, dtype=torch.bfloat16, seed=1), randn(4, 64, dtype=torch.bfloat16, seed=2)
    w, b = torch.full((64,), 1 + 2**-9), torch.full((64,), 2**-10)  # 1 + 2**-9 is 1.0 in bf16
    got = dropout_add_layer_norm(x, r, w, b, 0.0)
    torch.testing.assert_close(got, dropout_add_layer_norm(x, r, w.bfloat16(), b.bfloat16(), 0.0), rtol=0, atol=0)
    y32 = layer_norm_ref(x.float() + r.float(), w.bfloat16().float(), b.bfloat16().float())
    torch.testing.assert_close(got, y32.bfloat16(), rtol=0, atol=2**-7)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(4, 7), (2, 5, 33), (3, 300)])
@pytest.mark.parametrize("affine", [True, False])
def test_dropout_matches_composition_with_the_shared_mask(backend, dtype, shape, affine):
    p, seed = 0.3, torch.tensor([1234567])
    x, r, w, b = inputs(shape, dtype, affine)
    dy = randn(*shape, dtype=dtype, seed=7)
    n = shape[-1]
    with plugins.use_backend(dropout_add_layer_norm=backend):
        got = with_grads(lambda: fused_op(x.view(-1, n), r.view(-1, n), w, b, seed, p, 1e-5)[0].view(shape),
                         (x, r, w, b), dy)
    keep = keep_mask(seed, x.numel() // n, n, p).view(shape)
    assert 0 < keep.sum() < keep.numel()
    compare(backend, got, reference(x, r, w, b, keep, p, dy), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_dropped_inf_or_nan_adds_exactly_zero(backend):
    # A dropped element contributes 0, as torch.where does in the reference: not inf * 0 = NaN, which made the
    # whole row (and its gradients) NaN in the C++ and torch backends.
    p, seed, shape = 0.5, torch.tensor([4321]), (6, 40)
    x, r, w, b = inputs(shape)
    keep = keep_mask(seed, *shape, p)
    with torch.no_grad():
        x[0, ~keep[0]] = float("inf")
        x[1, ~keep[1]] = float("-inf")
        x[2, ~keep[2]] = float("nan")
    dy = randn(*shape, seed=7)
    with plugins.use_backend(dropout_add_layer_norm=backend):
        got = with_grads(lambda: fused_op(x, r, w, b, seed, p, 1e-5)[0], (x, r, w, b), dy)
    assert got[0].isfinite().all() and all(g.isfinite().all() for g in got[1])
    compare(backend, got, reference(x, r, w, b, keep, p, dy), torch.float32)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the Triton interpreter's NumPy warns of the overflow
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype, size", [(torch.float32, 1e20), (torch.bfloat16, 1e20), (torch.float64, 1e200)])
def test_a_row_whose_variance_overflows_is_nan_as_in_torch(backend, dtype, size):
    # rstd = 1 / sqrt(inf) = 0 gave y = bias and zero gradients for a diverging row, hiding it from NaN checks,
    # where layer_norm(x + residual) in torch gives NaN for that row.
    shape = (4, 40)
    x, r, w, b = inputs(shape, dtype)
    with torch.no_grad():
        x[1] = randn(shape[1], dtype=torch.float64, seed=5).sign() * size
    dy = randn(*shape, dtype=dtype, seed=7)
    with plugins.use_backend(dropout_add_layer_norm=backend):
        y, grads = with_grads(lambda: dropout_add_layer_norm(x, r, w, b, 0.0), (x, r, w, b), dy)
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    ref_in = [t.detach().to(compute).requires_grad_() for t in (x, r, w, b)]
    y_ref, grads_ref = with_grads(lambda: layer_norm_ref(ref_in[0] + ref_in[1], *ref_in[2:]), ref_in, dy.to(compute))
    for name, got, want in zip(("y", "dx", "dresidual", "dw", "db"), (y, *grads), (y_ref, *grads_ref), strict=True):
        assert torch.equal(got.isnan(), want.isnan()), f"{backend} {name}: NaN pattern differs from torch's"
    assert y[1].isnan().all()
    assert_close(y[[0, 2, 3]], y_ref[[0, 2, 3]], dtype, f"{backend} y of the other rows")


@pytest.mark.parametrize("backend", BACKENDS)
# The last two cross 2^32 inside the call: at the start of row 40, and inside row 39.
@pytest.mark.parametrize("offset", [0, 5 * 33, 2**32 - 40 * 33, 2**32 - 40 * 33 + 7])
def test_rows_at_their_offset_draw_the_rows_of_the_whole_call(backend, offset):
    # A micro-batch of rows [r0, r1) at offset + r0 * cols: its output is those rows of the whole call's.
    seed, p, rows, cols = 777, 0.35, 48, 33
    x, r, w, b = inputs((rows, cols), torch.float32, affine=True)
    with plugins.use_backend(dropout_add_layer_norm=backend), torch.no_grad():
        whole, _, _ = fused_op(x, r, w, b, torch.tensor([seed, offset]), p, 1e-5)
        for r0, r1 in ((0, 17), (17, 48), (30, 31)):
            part, _, _ = fused_op(x[r0:r1], r[r0:r1], w, b, torch.tensor([seed, offset + r0 * cols]), p, 1e-5)
            torch.testing.assert_close(part, whole[r0:r1], rtol=0, atol=0, msg=f"{backend} rows {r0}:{r1}")
    with torch.no_grad():
        want = dropout_add_layer_norm_ref(x, r, w, b, keep_mask(torch.tensor([seed, offset]), rows, cols, p), p)
    assert_close(whole, want, torch.float32, f"{backend} at offset {offset}")


@pytest.mark.parametrize("stream_seed", [[987654], [2**40 + 7, 2**32 - 100]])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_triton_kernels_read_a_captured_stream_from_memory_as_they_take_one_by_value(stream_seed, dtype):
    # Under a CUDA graph capture the (seed, offset) lives on the GPU and the kernels load it; Triton's
    # interpreter runs those variants on a CPU tensor here.
    from hetrain.ops.triton import dropout_add_layer_norm as kernels

    x, r = randn((37, 96), dtype=dtype, seed=1), randn((37, 96), dtype=dtype, seed=2)
    w, b = randn((96,), dtype=dtype, seed=3), randn((96,), dtype=dtype, seed=4)
    dy = randn((37, 96), dtype=dtype, seed=5)
    seed = torch.tensor(stream_seed)
    outs = {}
    for in_memory in (False, True):
        y, mean, rstd = kernels.forward(x, r, w, b, seed, 0.2, 1e-5, stream_in_memory=in_memory)
        grads = kernels.backward(dy, x, r, w, mean, rstd, seed, 0.2, True, stream_in_memory=in_memory)
        outs[in_memory] = (y, mean, rstd, *grads)
    for by_value, from_memory in zip(outs[False], outs[True], strict=True):
        assert torch.equal(by_value, from_memory)
    s, offset = stream(seed)
    keep = stream_keep_mask(s, 37, 96, 0.2, offset=offset)
    assert torch.equal(outs[False][3] == 0, ~keep)  # dx is zero exactly where the shared mask drops


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9, 1.0])
def test_every_backend_draws_the_same_mask(p):
    # One mask for a stream on every device, so a pipeline stage moved between CPU and GPU drops the same
    # elements. A dropped element gets exactly zero gradient (dy is random, never zero).
    seed, rows, cols = torch.tensor([987654321, 5]), 33, 257
    x, r, w, b = inputs((rows, cols))
    dy = randn(rows, cols, seed=7)
    for backend in BACKENDS:
        with plugins.use_backend(dropout_add_layer_norm=backend):
            y = fused_op(x, r, w, b, seed, p, 1e-5)[0]
            (dx,) = torch.autograd.grad(y, x, dy)
        assert torch.equal(dx != 0, keep_mask(seed, rows, cols, p)), backend


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropped_fraction_is_p_and_matches_the_mask(backend, p):
    # A dropped element gets exactly zero gradient; the fraction of zeros estimates p (std <= 2e-3 here).
    torch.manual_seed(11)
    x, r, w, b = inputs((128, 512))
    with plugins.use_backend(dropout_add_layer_norm=backend):
        y = dropout_add_layer_norm(x, r, w, b, p)
        (dx,) = torch.autograd.grad(y, x, randn(128, 512, seed=7))
    dropped = dx == 0
    assert abs(dropped.float().mean().item() - p) < 0.01
    torch.manual_seed(11)  # the op draws its seed with one torch.randint on the CPU generator
    seed = torch.randint(2**31, (1,))
    assert torch.equal(~dropped, keep_mask(seed, 128, 512, p))
    big = keep_mask(torch.tensor([5]), 1024, 1024, p)  # std of the fraction ~5e-4
    assert abs(1 - big.float().mean().item() - p) < 3e-3


@pytest.mark.parametrize("backend", BACKENDS)
def test_reproducible_under_manual_seed(backend):
    x, r, w, b = inputs((6, 100))
    outs = []
    with plugins.use_backend(dropout_add_layer_norm=backend):
        for seed in (0, 0, 1):
            torch.manual_seed(seed)
            outs.append(dropout_add_layer_norm(x, r, w, b, 0.5))
    assert torch.equal(outs[0], outs[1])
    assert not torch.equal(outs[0], outs[2])


@pytest.mark.parametrize("backend", BACKENDS)
def test_eval_mode_uses_no_randomness_and_equals_layer_norm_of_the_sum(backend):
    x, r, w, b = inputs((4, 48))
    state = torch.get_rng_state()
    with plugins.use_backend(dropout_add_layer_norm=backend):
        y = dropout_add_layer_norm(x, r, w, b, 0.5, training=False)
    assert torch.equal(torch.get_rng_state(), state)
    assert_close(y, layer_norm_ref(x + r, w, b), torch.float32, "eval")


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs_and_grad(backend):
    x = non_contiguous(randn(5, 40, dtype=torch.float64, seed=4, shift=1.0, requires_grad=True))
    r = non_contiguous(randn(5, 40, dtype=torch.float64, seed=5, requires_grad=True))
    w = randn(40, dtype=torch.float64, seed=6, requires_grad=True)
    b = randn(40, dtype=torch.float64, seed=7, requires_grad=True)
    dy = non_contiguous(randn(5, 40, dtype=torch.float64, seed=8))
    seed = torch.tensor([42])
    with plugins.use_backend(dropout_add_layer_norm=backend):
        got = with_grads(lambda: fused_op(x, r, w, b, seed, 0.25, 1e-5)[0], (x, r, w, b), dy)
    compare(backend, got, reference(x, r, w, b, keep_mask(seed, 5, 40, 0.25), 0.25, dy), torch.float64)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_and_expanded_weight_and_bias(backend):
    # The Triton kernels read weight and bias as W + cols: a strided or stride-0 vector must be made dense.
    x = randn(5, 40, dtype=torch.float64, seed=4, shift=1.0, requires_grad=True)
    r = randn(5, 40, dtype=torch.float64, seed=5, requires_grad=True)
    w = non_contiguous(randn(40, dtype=torch.float64, seed=6, requires_grad=True))
    b = randn(1, dtype=torch.float64, seed=7).expand(40).requires_grad_()
    dy = randn(5, 40, dtype=torch.float64, seed=8)
    seed = torch.tensor([42])
    with plugins.use_backend(dropout_add_layer_norm=backend):
        got = with_grads(lambda: fused_op(x, r, w, b, seed, 0.25, 1e-5)[0], (x, r, w, b), dy)
    compare(backend, got, reference(x, r, w, b, keep_mask(seed, 5, 40, 0.25), 0.25, dy), torch.float64)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_size_batch(backend):
    x, r = torch.empty(0, 16, requires_grad=True), torch.empty(0, 16, requires_grad=True)
    w, b = randn(16, seed=1, requires_grad=True), randn(16, seed=2, requires_grad=True)
    with plugins.use_backend(dropout_add_layer_norm=backend):
        y = dropout_add_layer_norm(x, r, w, b, 0.1)
        dx, dr, dw, db = torch.autograd.grad(y, (x, r, w, b), torch.empty(0, 16))
    assert y.shape == dx.shape == dr.shape == (0, 16)
    assert torch.equal(dw, torch.zeros(16)) and torch.equal(db, torch.zeros(16))


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_hidden_size(backend):
    x, r = randn(3, 0, seed=1, requires_grad=True), randn(3, 0, seed=2, requires_grad=True)
    with plugins.use_backend(dropout_add_layer_norm=backend):
        y = dropout_add_layer_norm(x, r, None, None, 0.1)
        dx, dr = torch.autograd.grad(y, (x, r), torch.empty(3, 0))
    assert y.shape == dx.shape == dr.shape == (3, 0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("p", [0.0, 0.4])
def test_gradcheck(backend, p):
    x, r, w, b = inputs((3, 9), torch.float64)
    seed = torch.tensor([77])
    with plugins.use_backend(dropout_add_layer_norm=backend):
        assert torch.autograd.gradcheck(lambda *a: fused_op(*a, seed, p, 1e-5)[0], (x, r, w, b))


def test_custom_ops_pass_opcheck():
    x, r, w, b = (t.detach() for t in inputs((4, 24)))
    seed = torch.tensor([3])
    for p in (0.0, 0.3):
        torch.library.opcheck(fused_op.default, (x.requires_grad_(), r, w, b, seed, p, 1e-5))
        torch.library.opcheck(fused_op.default, (x, r, None, None, seed, p, 1e-5))
        _y, mean, rstd = fused_op(x.detach(), r, w, b, seed, p, 1e-5)
        torch.library.opcheck(torch.ops.hetrain.dropout_add_layer_norm_bwd.default,
                              (randn(4, 24, seed=4), x.detach(), r, w, mean, rstd, seed, p, True))


# A transposed 2-D input, and an N-D one whose leading dims merge into a strided view of rows without a copy.
STRIDED = {"transposed": lambda seed: randn(24, 4, seed=seed, shift=0.5).t(),
           "permuted": lambda seed: randn(24, 2, 3, seed=seed, shift=0.5).permute(1, 2, 0)}


@pytest.mark.parametrize("layout", list(STRIDED))
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_torch_backend_outputs_have_the_fake_strides_for_strided_inputs(layout, p):
    # With p == 0 (or training=False) the torch backend's x + residual kept x's strides: a column-major y where
    # the fake said contiguous, which inductor misread.
    x, r = STRIDED[layout](1), STRIDED[layout](2)
    w, b, seed = randn(24, seed=3), randn(24, seed=4), torch.tensor([3])
    with plugins.use_backend(dropout_add_layer_norm="torch"):
        torch.library.opcheck(fused_op.default, (x, r, w, b, seed, p, 1e-5), test_utils="test_faketensor")
        torch.library.opcheck(fused_op.default, (x, r.contiguous(), None, None, seed, p, 1e-5),
                              test_utils="test_faketensor")
        _y, mean, rstd = fused_op(x, r, w, b, seed, p, 1e-5)
        torch.library.opcheck(torch.ops.hetrain.dropout_add_layer_norm_bwd.default,
                              (STRIDED[layout](5), x, r, w, mean, rstd, seed, p, True), test_utils="test_faketensor")


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_torch_compile_fullgraph_draws_the_same_seed_as_eager(backend):
    torch._dynamo.reset()
    x, r, w, b = inputs((2, 5, 48))

    def block(x, r, w, b):
        return dropout_add_layer_norm(x * 2.0, r, w, b, 0.2).relu()

    with plugins.use_backend(dropout_add_layer_norm=backend):
        compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
        torch.manual_seed(5)
        y = compiled(x, r, w, b)
        grads = torch.autograd.grad(y.sum(), (x, r, w, b))
        torch.manual_seed(5)
        y_eager = block(x, r, w, b)
        grads_eager = torch.autograd.grad(y_eager.sum(), (x, r, w, b))
    assert_close(y, y_eager, torch.float32, "compiled y")
    for g, ge in zip(grads, grads_eager, strict=True):
        assert_close(g, ge, torch.float32, "compiled grad")


def test_mixed_float_dtypes_promote_like_addition():
    x, r, w, b = (t.detach() for t in inputs((4, 8)))
    y = dropout_add_layer_norm(x.bfloat16(), r, w, b, 0.0)
    assert y.dtype == torch.float32
    assert_close(y, layer_norm_ref(x.bfloat16().float() + r, w, b), torch.float32, "promoted")


def test_bad_inputs_raise_clear_errors():
    x, r, w, b = (t.detach() for t in inputs((4, 8)))
    with pytest.raises(ValueError, match="residual must match x"):
        dropout_add_layer_norm(x, randn(4, 9), w, b, 0.1)
    with pytest.raises(ValueError, match="residual must match x"):
        dropout_add_layer_norm(x, r.long(), w, b, 0.1)
    with pytest.raises(ValueError, match=r"weight must have shape \(8,\)"):
        dropout_add_layer_norm(x, r, randn(7), b, 0.1)
    with pytest.raises(ValueError, match="bias is on meta but x is on cpu"):
        dropout_add_layer_norm(x, r, w, torch.empty(8, device="meta"), 0.1)
    with pytest.raises(ValueError, match=r"p must be a number in \[0, 1\]"):
        dropout_add_layer_norm(x, r, w, b, 1.5)
    with pytest.raises(ValueError, match=r"p must be a number in \[0, 1\], got True"):
        dropout_add_layer_norm(x, r, w, b, True)
    with pytest.raises(ValueError, match="floating tensor"):
        dropout_add_layer_norm(torch.ones(4, 8, dtype=torch.int64), torch.ones(4, 8, dtype=torch.int64), w, b, 0.1)
    seed = torch.tensor([1])
    cpp = torch.ops.hetrain_C
    with pytest.raises(RuntimeError, match="must be 2-D"):
        cpp.dropout_add_layer_norm_fwd(randn(2, 3, 4), randn(2, 3, 4), None, None, seed, 0.1, 1e-5)
    with pytest.raises(RuntimeError, match="residual must match x"):
        cpp.dropout_add_layer_norm_fwd(x, randn(4, 8, dtype=torch.float64), None, None, seed, 0.1, 1e-5)
    with pytest.raises(RuntimeError, match="dtype Double differs"):
        cpp.dropout_add_layer_norm_fwd(x, r, randn(8, dtype=torch.float64), None, seed, 0.1, 1e-5)
    with pytest.raises(RuntimeError, match=r"seed must be int64 \(seed,\) or \(seed, offset\)"):
        cpp.dropout_add_layer_norm_fwd(x, r, None, None, torch.tensor([1.0]), 0.1, 1e-5)
    with pytest.raises(RuntimeError, match=r"p must be in \[0, 1\]"):
        cpp.dropout_add_layer_norm_fwd(x, r, None, None, seed, -0.1, 1e-5)
    # The differentiable ops take any leading shape and flatten it: a residual of another shape must not pass.
    with pytest.raises(RuntimeError, match=r"residual must have x's shape \[2, 3, 4\], got \[3, 2, 4\]"):
        cpp.dropout_add_layer_norm(randn(2, 3, 4), randn(3, 2, 4), None, None, seed, 0.1, 1e-5)
    with pytest.raises(ValueError, match=r"residual \(3, 2, 4\) vs x \(2, 3, 4\)"):
        torch.ops.hetrain.dropout_add_layer_norm_fwd(randn(2, 3, 4), randn(3, 2, 4), None, None, seed, 0.1, 1e-5)


def test_triton_refuses_rows_past_its_fused_limit():
    from hetrain.ops.triton.dropout_add_layer_norm import MAX_FUSED_BYTES, launch_config

    with pytest.raises(ValueError, match="exceed the fused limit"):
        launch_config(MAX_FUSED_BYTES, torch.float32)


def test_nn_module_loads_a_layer_norm_and_matches_it_in_eval():
    torch.manual_seed(0)
    norm = torch.nn.LayerNorm(33)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    fused = DropoutAddLayerNorm(33, p=0.1)
    assert fused.state_dict().keys() == norm.state_dict().keys()
    fused.load_state_dict(norm.state_dict())
    fused.reset_parameters()  # LayerNorm's initialisation, as init code calling it on every module expects
    assert torch.equal(fused.weight, torch.ones(33)) and torch.equal(fused.bias, torch.zeros(33))
    assert repr(DropoutAddLayerNorm(8, bias=False)).endswith("elementwise_affine=True, bias=False)")
    fused.load_state_dict(norm.state_dict())
    x, r = randn(3, 4, 33, seed=5), randn(3, 4, 33, seed=6)
    assert_close(fused.eval()(x, r), norm(x + r), torch.float32, "eval module")
    shared = DropoutAddLayerNorm.from_layer_norm(norm, p=0.5)
    assert shared.weight is norm.weight and shared.bias is norm.bias and shared.eps == norm.eps
    torch.manual_seed(1)
    y = shared.train()(x, r)
    assert not torch.allclose(y, norm(x + r))
    torch.manual_seed(1)
    assert torch.equal(y, shared(x, r))
    assert "p=0.5" in repr(shared)
    with pytest.raises(ValueError, match="one dimension"):
        DropoutAddLayerNorm.from_layer_norm(torch.nn.LayerNorm((3, 11)), 0.1)


def test_nn_module_refuses_an_input_of_another_width_without_affine_as_torchs_layer_norm_does():
    # Without weight and bias the op had no size to check against: a (2, 6) input was normalised over 6.
    x, r = randn(2, 6, seed=1), randn(2, 6, seed=2)
    with pytest.raises(RuntimeError, match=r"expected input with shape \[\*, 8\]"):
        torch.nn.LayerNorm(8, elementwise_affine=False)(x + r)
    for fused in (DropoutAddLayerNorm(8, p=0.0, elementwise_affine=False),
                  DropoutAddLayerNorm.from_layer_norm(torch.nn.LayerNorm(8, elementwise_affine=False), 0.0),
                  DropoutAddLayerNorm(8, p=0.0)):
        with pytest.raises(ValueError, match=r"hidden=8, expected input with shape \(\*, 8\), got \(2, 6\)"):
            fused(x, r)
    assert DropoutAddLayerNorm(6, p=0.0, elementwise_affine=False)(x, r).shape == (2, 6)


def test_from_layer_norm_keeps_the_norms_training_mode():
    # Built in training mode always: swapped into an eval model, its dropout ran.
    norm = torch.nn.LayerNorm(8).eval()
    fused = DropoutAddLayerNorm.from_layer_norm(norm, p=0.5)
    assert not fused.training
    x = randn(4, 8, seed=3)
    assert_close(fused(x, x), norm(x + x), torch.float32, "eval-built")
    assert DropoutAddLayerNorm.from_layer_norm(torch.nn.LayerNorm(8), p=0.5).training
