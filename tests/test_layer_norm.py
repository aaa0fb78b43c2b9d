"""LayerNorm: every backend forward and backward against the float64 torch reference, compile, errors, nn."""

import gc
import warnings

import pytest
import torch
from op_testing import assert_close, non_contiguous, randn

import hetrain
from hetrain import plugins
from hetrain.ops.layer_norm import layer_norm, layer_norm_ref

BACKENDS = ["triton", "cpu", "torch"]
SHAPES = [(3, 1), (4, 7), (2, 5, 33), (6, 100), (1, 257), (2, 3, 768)]


def run(backend, x, w, b, eps=1e-5):
    with plugins.use_backend(layer_norm=backend):
        y = layer_norm(x, w, b, eps)
        dy = randn(*y.shape, dtype=y.dtype, seed=7)
        grads = torch.autograd.grad(y, [t for t in (x, w, b) if t is not None], dy)
    return y, dy, grads


def reference(x, w, b, dy, eps=1e-5):
    """The float64 oracle on the same input values."""
    x64 = x.detach().double().requires_grad_()
    w64 = w.detach().double().requires_grad_() if w is not None else None
    b64 = b.detach().double().requires_grad_() if b is not None else None
    y = layer_norm_ref(x64, w64, b64, eps)
    grads = torch.autograd.grad(y, [t for t in (x64, w64, b64) if t is not None], dy.double())
    return y, grads


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("affine", ["weight+bias", "weight", "none"])
def test_forward_backward_match_float64_reference(backend, dtype, shape, affine):
    n = shape[-1]
    x = randn(*shape, dtype=dtype, seed=1, scale=2.0, shift=0.5, requires_grad=True)
    w = randn(n, dtype=dtype, seed=2, shift=1.0, requires_grad=True) if affine != "none" else None
    b = randn(n, dtype=dtype, seed=3, requires_grad=True) if affine == "weight+bias" else None
    y, dy, grads = run(backend, x, w, b)
    y_ref, grads_ref = reference(x, w, b, dy)
    assert y.dtype == dtype and y.shape == x.shape
    assert_close(y, y_ref, dtype, f"{backend} y")
    for name, g, g_ref in zip(("dx", "dw", "db"), grads, grads_ref, strict=False):
        # Weight/bias gradients are sums over rows: compare them relative to their largest entry.
        scale = max(1.0, g_ref.abs().max().item()) if name != "dx" else 1.0
        assert_close(g / scale, g_ref / scale, dtype, f"{backend} {name}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_input_and_grad(backend):
    x = non_contiguous(randn(5, 40, dtype=torch.float64, seed=4, shift=1.0, requires_grad=True))
    w = randn(40, dtype=torch.float64, seed=5, requires_grad=True)
    b = randn(40, dtype=torch.float64, seed=6, requires_grad=True)
    y, dy, grads = run(backend, x, w, b)
    y_ref, grads_ref = reference(x, w, b, dy)
    assert_close(y, y_ref, torch.float64, "y")
    for g, g_ref in zip(grads, grads_ref, strict=True):
        assert_close(g, g_ref, torch.float64, "grad")


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_and_expanded_weight_and_bias(backend):
    # The Triton kernels read weight and bias as W + cols: a strided or stride-0 vector must be made dense.
    x = randn(5, 40, dtype=torch.float64, seed=4, shift=1.0, requires_grad=True)
    w = non_contiguous(randn(40, dtype=torch.float64, seed=5, requires_grad=True))
    b = randn(1, dtype=torch.float64, seed=6).expand(40).requires_grad_()
    y, dy, grads = run(backend, x, w, b)
    y_ref, grads_ref = reference(x, w, b, dy)
    assert_close(y, y_ref, torch.float64, "y")
    for g, g_ref in zip(grads, grads_ref, strict=True):
        assert_close(g, g_ref, torch.float64, "grad")


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_size_batch(backend):
    x = torch.empty(0, 16, requires_grad=True)
    w = randn(16, seed=1, requires_grad=True)
    b = randn(16, seed=2, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's var_mean warned about degrees of freedom on no rows
        y, _dy, (dx, dw, db) = run(backend, x, w, b)
    assert y.shape == (0, 16) and dx.shape == (0, 16)
    assert torch.equal(dw, torch.zeros(16)) and torch.equal(db, torch.zeros(16))


# A row far past the rest: its variance overflows the compute dtype (float32 for the half types) from 1e20 on;
# float16 cannot hold such a row, so its case only checks that a row at float16's top stays finite.
OVERFLOWING_ROWS = [(torch.float32, 1e20), (torch.float32, 3e38), (torch.bfloat16, 1e20), (torch.float64, 1e200),
                    (torch.float16, 6e4)]


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the Triton interpreter's NumPy warns of the overflow
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype, size", OVERFLOWING_ROWS)
def test_a_row_whose_variance_overflows_is_nan_as_in_torch(backend, dtype, size):
    # rstd = 1 / sqrt(inf) = 0 gave y = bias and dx = 0 for a diverging row, hiding it from NaN checks, where
    # F.layer_norm gives NaN for that row (and at 3e38 the torch backend gave a partly-NaN row).
    n = 40
    x = randn(4, n, dtype=dtype, seed=1, requires_grad=True)
    with torch.no_grad():
        x[1] = randn(n, dtype=torch.float64, seed=2).sign() * size
    w = randn(n, dtype=dtype, seed=3, shift=1.0, requires_grad=True)
    b = randn(n, dtype=dtype, seed=4, requires_grad=True)
    y, dy, grads = run(backend, x, w, b)
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    ref_in = [t.detach().to(compute).requires_grad_() for t in (x, w, b)]
    y_ref = layer_norm_ref(*ref_in)
    grads_ref = torch.autograd.grad(y_ref, ref_in, dy.to(compute))
    for name, got, want in zip(("y", "dx", "dw", "db"), (y, *grads), (y_ref, *grads_ref), strict=True):
        assert torch.equal(got.isnan(), want.isnan()), f"{backend} {name}: NaN pattern differs from torch's"
    assert y[1].isnan().all() == (dtype != torch.float16)
    # The other rows are untouched by the overflowing one.
    rest = [0, 2, 3]
    y_rest, (dx_rest, _, _) = reference(x[rest], w, b, dy[rest])
    assert_close(y[rest], y_rest, dtype, f"{backend} y of the other rows")
    assert_close(grads[0][rest], dx_rest, dtype, f"{backend} dx of the other rows")


EPS_PAST_FLOAT32 = r"eps must be at most 3.4028234663852886e\+38 .* for torch.float32 inputs.*got 1e\+39"


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_largest_eps_float32_holds_gives_torchs_output_and_a_larger_one_is_refused(backend):
    """An eps past float32's range became inf where the kernels add it, and every row NaN, where F.layer_norm
    returns the bias. float64 inputs, computed in float64, take it."""
    for dtype, eps in ((torch.float32, torch.finfo(torch.float32).max), (torch.float64, 1e39)):
        x = randn(4, 8, dtype=dtype, seed=1, requires_grad=True)
        w, b = (randn(8, dtype=dtype, seed=seed, requires_grad=True) for seed in (2, 3))
        y, dy, grads = run(backend, x, w, b, eps)
        y_ref, grads_ref = reference(x, w, b, dy, eps)
        assert_close(y, y_ref, dtype, f"{backend} y, eps={eps}")
        for g, g_ref in zip(grads, grads_ref, strict=True):
            assert_close(g, g_ref, dtype, f"{backend} grad, eps={eps}")
    with plugins.use_backend(layer_norm=backend), pytest.raises(ValueError, match=EPS_PAST_FLOAT32):
        layer_norm(randn(4, 8), eps=1e39)


@pytest.mark.parametrize("backend", ["triton", "cpu"])
def test_gradcheck(backend):
    x = randn(3, 9, dtype=torch.float64, seed=8, shift=0.3, requires_grad=True)
    w = randn(9, dtype=torch.float64, seed=9, requires_grad=True)
    b = randn(9, dtype=torch.float64, seed=10, requires_grad=True)
    with plugins.use_backend(layer_norm=backend):
        assert torch.autograd.gradcheck(lambda *a: layer_norm(*a, eps=1e-5), (x, w, b))


def test_mixed_parameter_dtype_runs_in_activation_dtype():
    x = randn(4, 32, dtype=torch.bfloat16, seed=1, requires_grad=True)
    w = randn(32, seed=2, shift=1.0, requires_grad=True)
    b = randn(32, seed=3, requires_grad=True)
    y = layer_norm(x, w, b)
    y.float().sum().backward()
    assert y.dtype == torch.bfloat16 and w.grad.dtype == torch.float32 and x.grad.dtype == torch.bfloat16


def test_custom_ops_pass_opcheck():
    x = randn(4, 24, seed=1, shift=0.5, requires_grad=True)
    w = randn(24, seed=2, requires_grad=True)
    b = randn(24, seed=3, requires_grad=True)
    torch.library.opcheck(torch.ops.hetrain.layer_norm_fwd.default, (x, w, b, 1e-5))
    torch.library.opcheck(torch.ops.hetrain.layer_norm_fwd.default, (x, None, None, 1e-5))
    y, mean, rstd = torch.ops.hetrain.layer_norm_fwd(x.detach(), w.detach(), b.detach(), 1e-5)
    torch.library.opcheck(torch.ops.hetrain.layer_norm_bwd.default,
                          (randn(4, 24, seed=4), x.detach(), w.detach(), mean, rstd, True))


# A transposed 2-D input, and an N-D one whose leading dims merge into a strided view of rows without a copy.
STRIDED = {"transposed": lambda: randn(24, 4, seed=1, shift=0.5).t(),
           "permuted": lambda: randn(24, 2, 3, seed=1, shift=0.5).permute(1, 2, 0)}


@pytest.mark.parametrize("layout", list(STRIDED))
def test_torch_backend_outputs_have_the_fake_strides_for_strided_inputs(layout):
    # The torch backend returned a column-major y where the fake said contiguous, so inductor misread it.
    x = STRIDED[layout]()
    w, b = randn(24, seed=2), randn(24, seed=3)
    with plugins.use_backend(layer_norm="torch"):
        torch.library.opcheck(torch.ops.hetrain.layer_norm_fwd.default, (x, w, b, 1e-5), test_utils="test_faketensor")
        torch.library.opcheck(torch.ops.hetrain.layer_norm_fwd.default, (x, None, None, 1e-5),
                              test_utils="test_faketensor")
        _y, mean, rstd = torch.ops.hetrain.layer_norm_fwd(x, w, b, 1e-5)
        torch.library.opcheck(torch.ops.hetrain.layer_norm_bwd.default, (STRIDED[layout](), x, w, mean, rstd, True),
                              test_utils="test_faketensor")


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_torch_compile_fullgraph(backend):
    torch._dynamo.reset()
    x = randn(2, 5, 48, seed=1, shift=0.2, requires_grad=True)
    w = randn(48, seed=2, requires_grad=True)
    b = randn(48, seed=3, requires_grad=True)

    def block(x, w, b):
        return layer_norm(x * 2.0, w, b).relu()

    with plugins.use_backend(layer_norm=backend):
        compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
        y = compiled(x, w, b)
        grads = torch.autograd.grad(y.sum(), (x, w, b))
    y_eager = torch.relu(layer_norm_ref(x * 2.0, w, b))
    grads_eager = torch.autograd.grad(y_eager.sum(), (x, w, b))
    assert_close(y, y_eager, torch.float32, "compiled y")
    for g, ge in zip(grads, grads_eager, strict=True):
        assert_close(g, ge, torch.float32, "compiled grad")


def test_bad_inputs_raise_clear_errors():
    x = randn(4, 8)
    with pytest.raises(ValueError, match=r"weight must have shape \(8,\)"):
        layer_norm(x, randn(7))
    with pytest.raises(ValueError, match="bias must have shape"):
        layer_norm(x, None, randn(8, 1))
    with pytest.raises(ValueError, match="floating tensor"):
        layer_norm(torch.ones(4, 8, dtype=torch.int64))
    with pytest.raises(ValueError, match="on meta but x is on cpu"):
        layer_norm(x, torch.empty(8, device="meta"))
    for backend in BACKENDS:  # the torch backend alone would return NaN
        with plugins.use_backend(layer_norm=backend), pytest.raises(ValueError, match="eps must be a finite number"):
            layer_norm(x, eps=-1.0)
    with pytest.raises(RuntimeError, match="must be 2-D"):
        torch.ops.hetrain_C.layer_norm_fwd(randn(2, 3, 4), None, None, 1e-5)
    with pytest.raises(RuntimeError, match="dtype Double differs"):
        torch.ops.hetrain_C.layer_norm_fwd(x, randn(8, dtype=torch.float64), None, 1e-5)


def test_triton_refuses_rows_past_its_fused_limit():
    from hetrain.ops.triton.layer_norm import MAX_FUSED_BYTES, launch_config

    with pytest.raises(ValueError, match="exceed the fused limit"):
        launch_config(MAX_FUSED_BYTES, torch.float32)


def test_nn_layer_norm_is_a_drop_in():
    torch.manual_seed(0)
    ref = torch.nn.LayerNorm(33)
    with torch.no_grad():
        ref.weight.normal_()
        ref.bias.normal_()
    fused = hetrain.nn.LayerNorm(33)
    fused.load_state_dict(ref.state_dict())
    assert fused.state_dict().keys() == ref.state_dict().keys()
    x = randn(3, 4, 33, seed=5)
    assert_close(fused(x), ref(x), torch.float32, "module")
    two_d = hetrain.nn.LayerNorm((3, 11), elementwise_affine=True, bias=False)
    assert_close(two_d(randn(2, 3, 11)), torch.nn.functional.layer_norm(randn(2, 3, 11), (3, 11), two_d.weight),
                 torch.float32, "2-D normalized_shape")
    with pytest.raises(ValueError, match="does not end with normalized_shape"):
        fused(randn(2, 32))


def test_patch_swaps_layer_norms_and_keeps_outputs_and_grads():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.LayerNorm(32), torch.nn.GELU(),
                                torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.LayerNorm(32)))
    x = randn(5, 16, seed=3)
    y_before = model(x)
    g_before = torch.autograd.grad(y_before.sum(), model[0].weight)[0]
    report = hetrain.nn.patch(model)
    assert set(report.swapped) == {"1", "3.1"} and "LayerNorm -> hetrain.nn" in str(report)
    assert isinstance(model[1], hetrain.nn.LayerNorm) and isinstance(model[3][1], hetrain.nn.LayerNorm)
    y_after = model(x)
    g_after = torch.autograd.grad(y_after.sum(), model[0].weight)[0]
    assert_close(y_after, y_before, torch.float32, "patched y")
    assert_close(g_after, g_before, torch.float32, "patched grad")
    assert len(hetrain.nn.patch(model)) == 0


def test_patch_keeps_a_norm_two_parents_share_one_module():
    norm = torch.nn.LayerNorm(8)
    model = torch.nn.Module()
    model.a, model.b = torch.nn.Sequential(norm), torch.nn.Sequential(norm)
    model.c = model.d = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU())  # one run, two paths
    paths = [name for name, _ in model.named_modules()]
    report = hetrain.nn.patch(model)
    # It was swapped at one path only: two modules where there was one, b's unfused, and a second patch not empty.
    assert set(report.swapped) == {"a.0", "b.0", "c.0", "d.0"} and model.a[0] is model.b[0]
    assert isinstance(model.a[0], hetrain.nn.LayerNorm) and model.a[0].weight is norm.weight
    assert [name for name, _ in model.named_modules()] == paths and len(hetrain.nn.patch(model)) == 0
    # Each shared thing counted and listed once, with its other paths (the run was listed at c alone, the norm at
    # both, and the count said 3).
    assert len(report) == 2 and report.also == {"b.0": "a.0", "d.0": "c.0"}
    assert str(report).splitlines()[0] == "hetrain.nn.patch: swapped 2 module(s)"
    assert "  a.0 (also b.0): LayerNorm -> " in str(report) and "  c.0 (also d.0): Linear -> GELU" in str(report)


@pytest.mark.parametrize("norm, fused", [(torch.nn.LayerNorm(8), "LayerNorm"), (torch.nn.RMSNorm(8), "RMSNorm")])
def test_patch_of_a_bare_norm_names_the_fused_twin_to_use(norm, fused):
    # It reported "nothing to swap" where the only thing to swap could not be replaced in place.
    with pytest.raises(ValueError, match=rf"the model itself is a torch.nn.{fused}.*hetrain.nn.{fused}.from_torch"):
        hetrain.nn.patch(norm)


def test_zero_width_rows_and_transposed_input_under_compile():
    assert layer_norm(randn(3, 0)).shape == (3, 0)
    torch._dynamo.reset()
    x = randn(16, 6, seed=2).t()  # (6, 16) with transposed strides
    compiled = torch.compile(lambda x: layer_norm(x) * 3, fullgraph=True, backend="aot_eager")
    assert_close(compiled(x), layer_norm_ref(x) * 3, torch.float32, "transposed")


def test_from_torch_has_hooks_and_buffers_of_its_own():
    # The twin shared the torch module's hook dicts and bookkeeping sets, so a hook or buffer registered on one
    # showed on the other.
    norm = torch.nn.LayerNorm(4)
    before = []
    norm.register_forward_hook(lambda _m, _args, _out: before.append("norm"))
    fused = hetrain.nn.LayerNorm.from_torch(norm)
    seen = []
    fused.register_forward_hook(lambda _m, _args, _out: seen.append("fused"))
    norm.register_forward_hook(lambda _m, _args, _out: seen.append("norm"))
    norm(randn(2, 4))
    fused(randn(2, 4))
    assert seen == ["norm", "fused"] and before == ["norm", "norm"]  # hooks from before the copy stay on both
    fused.register_buffer("extra", torch.zeros(1), persistent=False)
    assert "extra" not in norm._non_persistent_buffers_set and "extra" not in norm._buffers
    assert fused.weight is norm.weight and fused.bias is norm.bias


def test_patch_keeps_hooks_whose_handles_still_remove_them():
    # patch puts the twin in the module's place: a hook registered on the module before runs on the twin, and
    # its handle removes it there.
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    seen = []
    handle = model[1].register_forward_hook(lambda module, _args, _out: seen.append(type(module).__module__))
    hetrain.nn.patch(model)
    model(randn(2, 4))
    handle.remove()
    model(randn(2, 4))
    assert seen == ["hetrain.nn.layer_norm"]


def test_patch_leaves_a_norm_whose_forward_was_replaced_alone():
    # Its twin would have run that forward (the torch module's, bound): reported swapped, never fused.
    model = torch.nn.Sequential(torch.nn.LayerNorm(4))
    original = model[0].forward
    model[0].forward = lambda inp: original(inp) * 2
    report = hetrain.nn.patch(model)
    assert len(report) == 0 and type(model[0]) is torch.nn.LayerNorm
    x = randn(2, 4)
    torch.testing.assert_close(model(x), layer_norm_ref(x, model[0].weight, model[0].bias) * 2)


def test_patch_leaves_a_norm_compiled_in_place_alone():
    # Module.compile() binds the compiled call to that module: the twin copied it and ran torch's LayerNorm while
    # reported swapped.
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    model[1].compile(backend="eager")
    report = hetrain.nn.patch(model)
    assert len(report) == 0 and type(model[1]) is torch.nn.LayerNorm


@pytest.mark.parametrize("how", ["patch", "from_torch"])
def test_a_load_state_dict_pre_hook_is_called_with_the_fused_module(how):
    # torch wraps the hook with a weak reference to the module it was registered on: the fused module called it
    # with the torch module, and once that was collected loading a state_dict failed ("hook of a dead Module").
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    seen = []
    model[1].register_load_state_dict_pre_hook(lambda module, *_rest: seen.append(module))
    state = model.state_dict()
    if how == "patch":
        hetrain.nn.patch(model)
    else:
        model[1] = hetrain.nn.LayerNorm.from_torch(model[1])
    gc.collect()
    model.load_state_dict(state)
    assert seen == [model[1]] and type(seen[0]) is hetrain.nn.LayerNorm


@pytest.mark.parametrize("norm", [hetrain.nn.LayerNorm, hetrain.nn.RMSNorm])
def test_an_empty_normalized_shape_is_refused_as_torch_does(norm):
    # It normalised over nothing: zeros (LayerNorm) or the sign of x (RMSNorm), where torch refuses.
    with pytest.raises(ValueError, match=rf"hetrain.nn.{norm.__name__}: normalized_shape is empty"):
        norm(())(randn(2, 3))


def test_a_patched_model_built_on_meta_runs_there():
    # No backend serves meta: the fused modules failed where torch's give the output's shape.
    with torch.device("meta"):
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GELU(), torch.nn.LayerNorm(8), torch.nn.RMSNorm(8))
    assert len(hetrain.nn.patch(model)) == 3
    x = torch.empty(3, 4, device="meta", requires_grad=True)
    y = model(x)
    y.sum().backward()
    assert y.is_meta and y.shape == (3, 8) and x.grad.shape == x.shape
