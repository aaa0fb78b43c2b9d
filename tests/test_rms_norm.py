"""RMSNorm: every backend against the float64 reference, gradients, compile, opcheck, errors, module."""

import pytest
import torch
from op_testing import randn
from torch._dynamo.testing import CompileCounterWithBackend

import hetrain
from hetrain.nn.rms_norm import RMSNorm
from hetrain.ops.rms_norm import default_eps, rms_norm, rms_norm_ref
from hetrain.ops.triton import rms_norm as triton_rms_norm
from hetrain.plugins import backends, use_backend

BACKENDS = ["triton", "cpu", "torch"]
EPS = 1e-6
# Allowed error against the float64 reference computed from the same rounded inputs: the output's own
# rounding plus float32 accumulation (measured worst cases are a few times smaller).
TOL = {
    torch.float64: {"atol": 1e-12, "rtol": 1e-12},
    torch.float32: {"atol": 1e-5, "rtol": 1e-5},
    torch.bfloat16: {"atol": 2e-2, "rtol": 1e-2},
    torch.float16: {"atol": 2e-3, "rtol": 2e-3},
}
SHAPES = [(1,), (3, 7), (2, 3, 33), (5, 100), (2, 257)]


def _inputs(shape, dtype, weighted, seed=0):
    """Random x, weight (around 1) and upstream gradient in ``dtype``."""
    x = randn(*shape, dtype=dtype, seed=seed, shift=0.25)
    w = randn(shape[-1], dtype=dtype, seed=seed + 1, scale=0.3, shift=1.0) if weighted else None
    return x, w, randn(*shape, dtype=dtype, seed=seed + 2)


def _run(backend, x, w, dy, eps=EPS):
    """Output and gradients of the op on ``backend``."""
    x = x.detach().requires_grad_()
    w = w.detach().requires_grad_() if w is not None else None
    with use_backend(rms_norm=backend):
        y = rms_norm(x, w, eps)
        y.backward(dy)
    return y.detach(), x.grad, (w.grad if w is not None else None)


def _reference(x, w, dy, eps=EPS):
    """The oracle's output and gradients in float64."""
    x64 = x.detach().double().requires_grad_()
    w64 = w.detach().double().requires_grad_() if w is not None else None
    y = rms_norm_ref(x64, w64, eps)
    y.backward(dy.double())
    return y.detach(), x64.grad, (w64.grad if w64 is not None else None)


def _assert_matches(got, want, dtype):
    for g, r in zip(got, want, strict=True):
        if r is None:
            assert g is None
            continue
        assert g.dtype == dtype and g.shape == r.shape
        torch.testing.assert_close(g.double(), r, **TOL[dtype])


def test_backends_registered():
    assert [b.name for b in backends("rms_norm")] == ["triton", "cuda", "cpu", "torch"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("weighted", [True, False], ids=["weight", "no_weight"])
def test_matches_reference(backend, dtype, shape, weighted):
    x, w, dy = _inputs(shape, dtype, weighted)
    _assert_matches(_run(backend, x, w, dy), _reference(x, w, dy), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float32_weight_is_cast_to_input_dtype(backend):
    x, w, dy = _inputs((4, 33), torch.bfloat16, True)
    w32 = w.float().requires_grad_()
    with use_backend(rms_norm=backend):
        y = rms_norm(x, w32, EPS)
        y.backward(dy)
    assert y.dtype == torch.bfloat16 and w32.grad.dtype == torch.float32
    y_ref, _, dw_ref = _reference(x, w, dy)
    _assert_matches([y.detach(), w32.grad.bfloat16()], [y_ref, dw_ref], torch.bfloat16)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_default_eps_is_torchs(backend, dtype):
    # Tiny inputs, so eps dominates mean(x^2): a different default would be far off.
    x = _inputs((3, 40), torch.float64, False)[0].mul(1e-4).to(dtype)
    assert default_eps(dtype) == torch.finfo(torch.float32).eps
    with use_backend(rms_norm=backend):
        y = rms_norm(x)
    torch.testing.assert_close(y, rms_norm_ref(x), **TOL[dtype])


def _non_contiguous(shape):
    """Views of the same values: every other column, transposed, and rows of a wider buffer."""
    m, n = shape
    base = _inputs((m, 2 * n), torch.float64, False, seed=1)[0]
    return [base[:, ::2], base[:, :n].t().contiguous().t(), base[:, n:]]


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    _, w, dy = _inputs((6, 33), torch.float64, True)
    for x in _non_contiguous((6, 33)):
        assert not x.is_contiguous()
        dy_t = dy.t().contiguous().t()
        _assert_matches(_run(backend, x, w, dy_t), _reference(x, w, dy_t), torch.float64)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_and_expanded_weight(backend):
    # The Triton kernels read the weight as W + cols: a strided or stride-0 vector must be made dense.
    x, w, dy = _inputs((6, 33), torch.float64, True)
    for weight in (torch.stack([w.detach(), w.detach()], 1)[:, 0], w.detach()[:1].expand(33)):
        assert not weight.is_contiguous()
        _assert_matches(_run(backend, x, weight, dy), _reference(x, weight, dy), torch.float64)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(0, 7), (2, 0, 7), (3, 0)], ids=str)
def test_empty_inputs(backend, shape):
    x, w, dy = _inputs(shape, torch.float32, True)
    y, dx, dw = _run(backend, x, w, dy)
    assert y.shape == x.shape and dx.shape == x.shape
    assert torch.equal(dw, torch.zeros_like(w))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the Triton interpreter's NumPy warns of the overflow
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype, size", [(torch.float32, 3e38), (torch.bfloat16, 3e38), (torch.float64, 1.7e308)])
@pytest.mark.parametrize("weighted", [True, False], ids=["weight", "no_weight"])
def test_a_row_at_the_dtypes_top_has_torchs_nan_gradient(backend, dtype, size, weighted):
    # dy * w * x overflows there: sum(g * x) * rstd is inf * 0 = NaN, as in F.rms_norm's gradient. Forming
    # xhat = x * rstd first (rstd = 0, the mean square having overflowed) gave dx = 0 instead, hiding the row.
    x, w, dy = _inputs((3, 16), dtype, weighted)
    with torch.no_grad():
        x[1] = randn(16, dtype=torch.float64, seed=5).sign() * size
    y, dx, dw = _run(backend, x, w, dy)
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    x_ref = x.detach().to(compute).requires_grad_()
    w_ref = w.detach().to(compute).requires_grad_() if weighted else None
    y_ref = rms_norm_ref(x_ref, w_ref, EPS)
    y_ref.backward(dy.to(compute))
    got, want = (y, dx, dw), (y_ref, x_ref.grad, w_ref.grad if weighted else None)
    for name, g, r in zip(("y", "dx", "dw"), got, want, strict=True):
        if r is not None:
            assert torch.equal(g.isnan(), r.isnan()), f"{backend} {name}: NaN pattern differs from torch's"
    assert dx[1].isnan().all()
    _assert_matches((y[[0, 2]], dx[[0, 2]]), _reference(x[[0, 2]], w, dy[[0, 2]])[:2], dtype)


@pytest.mark.parametrize("backend", ["triton", "cpu"])
@pytest.mark.parametrize("weighted", [True, False], ids=["weight", "no_weight"])
def test_gradcheck(backend, weighted):
    x, w, _ = _inputs((3, 5), torch.float64, weighted)
    args = (x.requires_grad_(), w.requires_grad_() if weighted else None)
    with use_backend(rms_norm=backend):
        assert torch.autograd.gradcheck(lambda x, w: rms_norm(x, w, EPS), args)


def test_compile_fullgraph_forward_backward():
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("inductor")
    w = _inputs((33,), torch.float32, True)[1]

    def loss(x, w):
        return rms_norm(x, w, EPS).square().sum()

    compiled = torch.compile(loss, fullgraph=True, backend=counter)
    for batch in (2, 3, 5):
        x = _inputs((batch, 3, 33), torch.float32, False, seed=batch)[0]
        got = [x.clone().requires_grad_(), w.clone().requires_grad_()]
        want = [x.clone().requires_grad_(), w.clone().requires_grad_()]
        compiled(*got).backward()
        loss(*want).backward()
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a.grad, b.grad)
    assert 1 <= counter.frame_count <= 2  # one static graph, then one dynamic in the batch size


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    x, w, dy = _inputs((4, 7), torch.float32, True)
    x64 = _inputs((3, 33), torch.float64, False)[0]
    samples = [(x, w), (x.t().contiguous().t(), w), (x, None), (x64, None)]
    with use_backend(rms_norm=backend):
        for xs, ws in samples:
            wg = ws.clone().requires_grad_() if ws is not None else None
            torch.library.opcheck(torch.ops.hetrain.rms_norm_fwd.default, (xs.clone().requires_grad_(), wg, EPS))
            _, rstd = torch.ops.hetrain.rms_norm_fwd(xs, ws, EPS)
            torch.library.opcheck(torch.ops.hetrain.rms_norm_bwd.default, (torch.randn_like(xs), xs, ws, rstd))


@pytest.mark.parametrize(
    ("x", "w", "eps", "match"),
    [
        (torch.randn(2, 7), torch.ones(8), None, r"weight must have shape \(7,\)"),
        (torch.randn(2, 7), torch.ones(7, device="meta"), None, "weight is on meta but x is on cpu"),
        (torch.ones(2, 7, dtype=torch.int64), None, None, "must be a floating tensor"),
        (torch.tensor(1.0), None, None, "must be a floating tensor with >= 1 dim"),
        (torch.randn(2, 7), torch.ones(7, dtype=torch.int32), None, "weight must be a floating tensor"),
        (torch.randn(2, 7), None, -1.0, "eps must be a finite number >= 0"),
    ],
)
def test_bad_inputs_raise(x, w, eps, match):
    with pytest.raises(ValueError, match=match):
        rms_norm(x, w, eps)


def test_cpp_checks_name_the_problem():
    ops = torch.ops.hetrain_C
    x, w = torch.randn(3, 7), torch.ones(7)
    rstd = torch.ones(3)
    cases = [
        (lambda: ops.rms_norm_fwd(torch.randn(2, 3, 7), w, EPS), "must be 2-D"),
        (lambda: ops.rms_norm_fwd(x.int(), None, EPS), "must be a floating tensor"),
        (lambda: ops.rms_norm_fwd(x, torch.ones(8), EPS), r"weight must have shape \(7,\)"),
        (lambda: ops.rms_norm_fwd(x, w.double(), EPS), "weight dtype Double differs"),
        (lambda: ops.rms_norm_fwd(x, w, -1.0), "eps must be a finite number >= 0"),
        (lambda: ops.rms_norm_bwd(x[:2], x, w, rstd), "dy must match x"),
        (lambda: ops.rms_norm_bwd(x, x, w, rstd[:2]), r"rstd must have shape \(3,\)"),
        (lambda: ops.rms_norm_bwd(x, x, w, rstd.double()), "rstd must have shape"),
    ]
    for call, match in cases:
        with pytest.raises(RuntimeError, match=match):
            call()


@pytest.mark.parametrize(("dtype", "compute_bytes"), [(torch.float32, 4), (torch.bfloat16, 4), (torch.float64, 8)],
                         ids=str)
def test_triton_refuses_rows_past_the_limit(dtype, compute_bytes):
    n = triton_rms_norm.MAX_FUSED_BYTES // compute_bytes
    assert triton_rms_norm.launch_config(n, dtype)["BLOCK_N"] == n
    with pytest.raises(ValueError, match="exceed the fused limit"):
        triton_rms_norm.launch_config(n + 1, dtype)


@pytest.mark.parametrize(
    "kwargs", [{"normalized_shape": 33}, {"normalized_shape": (3, 11), "eps": 1e-5},
               {"normalized_shape": 33, "elementwise_affine": False}], ids=["plain", "2d_eps", "no_affine"])
def test_module_state_dict_round_trip(kwargs):
    stock = torch.nn.RMSNorm(**kwargs)
    if stock.weight is not None:
        torch.nn.init.uniform_(stock.weight, 0.5, 1.5)
    fused = RMSNorm(**kwargs)
    fused.load_state_dict(stock.state_dict())
    back = torch.nn.RMSNorm(**kwargs)
    back.load_state_dict(fused.state_dict())
    assert list(fused.state_dict()) == list(stock.state_dict())
    x = _inputs((2, 4, 33), torch.float32, False)[0].reshape(2, 4, *stock.normalized_shape)
    torch.testing.assert_close(fused(x), stock(x), **TOL[torch.float32])
    torch.testing.assert_close(back(x), stock(x), **TOL[torch.float32])
    assert repr(fused).endswith(repr(stock).partition("(")[2])


def test_module_from_torch_shares_parameters():
    stock = torch.nn.RMSNorm(7)
    fused = RMSNorm.from_torch(stock)
    assert isinstance(fused, RMSNorm) and fused.weight is stock.weight
    with pytest.raises(ValueError, match="does not end with normalized_shape"):
        fused(torch.randn(2, 8))


def test_patch_swaps_rms_norm():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 24), torch.nn.RMSNorm(24))
    x = torch.randn(3, 8)
    before = model(x)
    report = hetrain.nn.patch(model)
    assert list(report.swapped) == ["1"] and isinstance(model[1], hetrain.nn.RMSNorm)
    torch.testing.assert_close(model(x), before)
