"""How a call of a fused op is routed: straight to the backend in eager mode, through the torch.library
custom op while torch.compile traces or for tensor subclasses; the same numbers either way."""

import warnings
from collections import Counter

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
import torch.utils.checkpoint
from op_testing import OpLog, randn
from torch._subclasses.fake_tensor import FakeTensorMode

import hetrain.nn
from hetrain import ops, plugins
from hetrain.ops.layer_norm import TorchBackend

H = 24


def calls(x, r, w, b, img, target, weight):
    """Every fused op's functional face on small inputs, as (name, thunk returning the output)."""
    return {
        "layer_norm": lambda: ops.layer_norm(x, w, b),
        "rms_norm": lambda: ops.rms_norm(x, w),
        "bias_gelu": lambda: ops.bias_gelu(x, b, "tanh"),
        "dropout": lambda: ops.dropout(x, 0.25),
        "dropout_add_layer_norm": lambda: ops.dropout_add_layer_norm(x, r, w, b, 0.25),
        "linear_cross_entropy": lambda: ops.linear_cross_entropy(x, weight, target),
        "bn_relu_pool": lambda: ops.bn_relu_pool(img, w[:4], b[:4], None, None, training=True),
    }


def inputs(requires_grad=True):
    x, r = randn(3, 5, H, seed=1, requires_grad=requires_grad), randn(3, 5, H, seed=2, requires_grad=requires_grad)
    w, b = randn(H, seed=3, shift=1.0, requires_grad=requires_grad), randn(H, seed=4, requires_grad=requires_grad)
    img = randn(2, 4, 6, 6, seed=5, requires_grad=requires_grad)
    weight = randn(11, H, seed=6, requires_grad=requires_grad)
    target = torch.randint(11, (3, 5), generator=torch.Generator().manual_seed(7))
    return x, r, w, b, img, target, weight


OPS = list(calls(*inputs()))


@pytest.mark.parametrize("op", OPS)
def test_eager_forward_and_backward_call_the_kernels_without_the_custom_op(op):
    args = inputs()
    leaves = [t for t in args if t.requires_grad]
    with OpLog() as log:
        y = calls(*args)[op]()
        torch.autograd.grad(y, leaves, torch.ones_like(y), allow_unused=True)
    kernels = [n for n in log.names if n.startswith("hetrain_C.")]
    assert kernels, log.names  # the C++ backend ran, forward and backward
    assert not [n for n in log.names if n.startswith("hetrain.")], log.names


@pytest.mark.parametrize("op", OPS)
def test_fake_tensors_go_through_the_custom_ops_fake_implementations(op):
    real = inputs()
    y_real = calls(*real)[op]()
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(t) for t in real]
        for f, t in zip(fake, real, strict=True):
            f.requires_grad_(t.requires_grad)
        y = calls(*fake)[op]()
        grads = torch.autograd.grad(y, [f for f in fake if f.requires_grad], torch.ones_like(y), allow_unused=True)
    assert (y.shape, y.dtype) == (y_real.shape, y_real.dtype)
    for g, t in zip(grads, [t for t in real if t.requires_grad], strict=True):
        assert g is None or g.shape == t.shape


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("requires_grad", [True, False])
def test_meta_tensors_go_through_the_custom_ops_fake_implementations(op, requires_grad):
    # They went to the backends, none of which serves meta (BackendError), as a model built on meta does.
    real = inputs(requires_grad)
    y_real = calls(*real)[op]()
    meta = [t.detach().to("meta").requires_grad_(t.requires_grad) for t in real]
    y = calls(*meta)[op]()
    assert y.is_meta and (y.shape, y.dtype) == (y_real.shape, y_real.dtype)
    if requires_grad:
        leaves = [t for t in meta if t.requires_grad]
        for g, t in zip(torch.autograd.grad(y, leaves, torch.ones_like(y), allow_unused=True), leaves, strict=True):
            assert g is None or (g.is_meta and g.shape == t.shape)


@pytest.mark.parametrize("op", OPS)
def test_without_gradients_no_autograd_node_is_made(op):
    assert calls(*inputs(requires_grad=False))[op]().grad_fn is None
    with torch.no_grad():
        assert calls(*inputs())[op]().grad_fn is None


@pytest.mark.parametrize("op", [o for o in OPS if o != "dropout" and o != "dropout_add_layer_norm"])
def test_compiled_and_eager_calls_agree_forward_and_backward(op):
    # The traced graph holds the custom op, eager calls the kernels directly: one set of numbers.
    def run(fn):
        args = inputs()
        y = fn(*args)
        return y, torch.autograd.grad(y, [t for t in args if t.requires_grad], torch.ones_like(y), allow_unused=True)

    def eager(*args):
        return calls(*args)[op]()

    y_eager, g_eager = run(eager)
    y_compiled, g_compiled = run(torch.compile(eager, fullgraph=True, backend="aot_eager"))
    torch.testing.assert_close(y_compiled, y_eager)
    for a, b in zip(g_compiled, g_eager, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b)


class Wrapped(torch.Tensor):
    """A tensor subclass: calls with it take the custom op, not the eager fast path."""


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "custom-op"])
@pytest.mark.parametrize("op", OPS)
def test_double_backward_is_refused_naming_the_op_except_dropouts_whose_backward_is_its_derivative(op, compiled):
    args = inputs()
    if compiled:  # through the custom op's registered autograd, as a tensor subclass or a traced graph would go
        args = [t.detach().as_subclass(Wrapped).requires_grad_(t.requires_grad) for t in args]
    leaves = [t for t in args if t.requires_grad]
    x = args[4] if op == "bn_relu_pool" else args[0]
    loss = calls(*args)[op]().square().sum()
    plain = torch.autograd.grad(loss, leaves, retain_graph=True, allow_unused=True)
    graphed = torch.autograd.grad(loss, leaves, create_graph=True, allow_unused=True)
    for g, h in zip(plain, graphed, strict=True):  # first-order gradients under create_graph are unchanged
        assert (g is None) == (h is None) and (g is None or torch.equal(g, h))
    second = sum(h.square().sum() for h in graphed if h is not None)
    if op == "dropout":
        (hessian_vector,) = torch.autograd.grad(second, x)
        assert torch.isfinite(hessian_vector).all() and hessian_vector.abs().sum() > 0
        return
    with pytest.raises(RuntimeError, match=rf"hetrain.ops.{op}: double backward .* not supported.* Use hetrain.ops"):
        torch.autograd.grad(second, x)


@pytest.mark.parametrize("op", OPS)
def test_torch_func_grad_equals_autograds_and_nested_transforms_are_refused_naming_the_op(op):
    args = list(inputs(requires_grad=False))
    i = 4 if op == "bn_relu_pool" else 0

    def loss(x):
        return calls(*args[:i], x, *args[i + 1:])[op]().square().sum()

    torch.manual_seed(0)  # dropout draws its seed per call: the same one for both
    g = torch.func.grad(loss)(args[i])
    torch.manual_seed(0)
    x = args[i].clone().requires_grad_()
    (expected,) = torch.autograd.grad(loss(x), x)
    torch.testing.assert_close(g, expected, rtol=0, atol=0)
    if op != "dropout":  # a second derivative has no kernel: said, not silently zero
        # (dropout_add_layer_norm draws its seed first, which hessian's vmap refuses before the op is reached)
        said = "randomness" if op == "dropout_add_layer_norm" else rf"hetrain.ops.{op}: stacked derivative transforms"
        with pytest.raises(RuntimeError, match=said):
            torch.func.hessian(loss)(args[i])


_BIAS64 = randn(H, dtype=torch.float64, seed=4)
# Each op taking one sample x and a per-feature w, as (fused call, its torch reference): f(x, w).
WEIGHTED = {
    "layer_norm": (lambda x, w: ops.layer_norm(x, w, _BIAS64), lambda x, w: ops.layer_norm_ref(x, w, _BIAS64)),
    "rms_norm": (lambda x, w: ops.rms_norm(x, w), lambda x, w: ops.rms_norm_ref(x, w)),
    "bias_gelu": (lambda x, w: ops.bias_gelu(x, w, "tanh"), lambda x, w: ops.bias_gelu_ref(x, w, "tanh")),
    "dropout_add_layer_norm": (lambda x, w: ops.dropout_add_layer_norm(x, x.cos(), w, _BIAS64, 0.0),
                               lambda x, w: ops.dropout_add_layer_norm_ref(x, x.cos(), w, _BIAS64, None, 0.0)),
}


def _grad_of_vmap(f, w, xs):
    return torch.func.grad(lambda v: torch.func.vmap(lambda x: f(x, v))(xs).sin().sum())(w)


def _per_sample_grads(f, w, xs):
    return torch.func.vmap(torch.func.grad(lambda v, x: f(x, v).sin().sum()), in_dims=(None, 0))(w, xs)


FIRST_ORDER = {"grad(vmap)": _grad_of_vmap, "vmap(grad)": _per_sample_grads}
STACKED = {
    "grad(grad)": lambda f, w, xs: torch.func.grad(lambda v: torch.func.grad(
        lambda u: f(xs[0], u).sin().sum())(v).sum())(w),
    "hessian": lambda f, w, xs: torch.func.hessian(lambda v: f(xs[0], v).sin().sum())(w),
    "jvp(grad)": lambda f, w, xs: torch.func.jvp(torch.func.grad(lambda v: f(xs[0], v).sin().sum()), (w,),
                                                 (torch.ones_like(w),)),
    "grad(vmap(grad))": lambda f, w, xs: torch.func.grad(lambda v: _per_sample_grads(f, v, xs).sum())(w),
}


def _samples():
    return randn(3, 2, H, dtype=torch.float64, seed=1), randn(H, dtype=torch.float64, seed=3, shift=1.0)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("composition", list(FIRST_ORDER))
@pytest.mark.parametrize("op", list(WEIGHTED))
def test_grad_of_vmap_and_per_sample_gradients_match_torchs_in_float64(op, composition, backend):
    """Both were refused as nested transforms, as a hessian is; they are first order: the op's backward runs once
    per sample (torch's batching fallback), which its kernels compute."""
    xs, w = _samples()
    fused, reference = WEIGHTED[op]
    with plugins.use_backend(**{op: backend}):
        got = FIRST_ORDER[composition](fused, w, xs)
    torch.testing.assert_close(got, FIRST_ORDER[composition](reference, w, xs), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("per_sample", [False, True], ids=["grad", "vmap(grad)"])
def test_gradients_of_a_model_whose_parameters_require_grad_can_be_clipped_in_place(per_sample):
    """With parameters that still require grad (functional_call over named_parameters(), as DP-SGD loops do) the
    fused LayerNorm's gradients came out as views made inside a Function, which mul_ refused."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), hetrain.nn.LayerNorm(8), torch.nn.Linear(8, 3)).double()
    params = dict(model.named_parameters())
    x, t = torch.randn(5, 8, dtype=torch.float64), torch.randint(0, 3, (5,))

    def loss(p, x, t):
        return F.cross_entropy(torch.func.functional_call(model, p, (x,)), t)

    if per_sample:
        grads = torch.func.vmap(torch.func.grad(lambda p, x, t: loss(p, x[None], t[None])), (None, 0, 0))(params, x, t)
    else:
        grads = torch.func.grad(loss)(params, x, t)
    expected = grads["1.weight"].detach().clone()
    grads["1.weight"].mul_(0.5)
    torch.testing.assert_close(grads["1.weight"], expected * 0.5)


@pytest.mark.parametrize("how", list(STACKED))
@pytest.mark.parametrize("op", list(WEIGHTED))
def test_stacked_derivative_transforms_are_refused_naming_the_op_and_its_reference(op, how):
    """The backward kernels have no derivative: lifting the refusal, grad of grad came back silently wrong."""
    xs, w = _samples()
    said = rf"hetrain.ops.{op}: stacked derivative transforms .* not supported.* Use hetrain.ops.{op}_ref"
    with pytest.raises(RuntimeError, match=said):
        STACKED[how](WEIGHTED[op][0], w, xs)


def _gradient_penalty(loss, x):
    """torch.func.grad of a gradient penalty taken with torch.autograd.grad(create_graph=True)."""
    def penalty(v):
        (g,) = torch.autograd.grad(loss(v), v, create_graph=True)
        return g.square().sum()

    return torch.func.grad(penalty)(x)


def _grad_of_vjp_fn(f, x):
    """torch.func.grad, over the cotangent, of a vjp_fn torch.func.vjp returned: its backward differentiated."""
    y, vjp_fn = torch.func.vjp(f, x)
    return torch.func.grad(lambda c: vjp_fn(c)[0].square().sum())(torch.ones_like(y) / 2)


@pytest.mark.parametrize("how", ["gradient penalty", "grad of vjp_fn"])
@pytest.mark.parametrize("op", [o for o in OPS if o != "dropout"])
def test_a_second_derivative_inside_a_torch_func_transform_is_refused_rather_than_zero(op, how):
    """A transform runs backward with a graph whatever comes next, so the guarded backward skipped its guard there:
    a gradient of its gradient came back as zeros, silently, where eager double backward is refused."""
    args = list(inputs(requires_grad=False))
    i = 4 if op == "bn_relu_pool" else 0

    def output(x):
        return calls(*args[:i], x, *args[i + 1:])[op]()

    with pytest.raises(RuntimeError, match=rf"hetrain.ops.{op}: double backward .* not supported.* Use hetrain.ops"):
        if how == "gradient penalty":
            _gradient_penalty(lambda x: output(x).square().sum(), args[i])
        else:
            _grad_of_vjp_fn(output, args[i])


@pytest.mark.parametrize("op", list(WEIGHTED))
def test_a_vmapped_vjp_fn_differentiated_over_its_cotangents_is_refused_rather_than_zero(op):
    """Under vmap the backward gets BatchedTensors, which say requires_grad=False for cotangents that require it at
    the gradient's level below, and torch's DelayedError node refuses them ("accessing `data` under vmap")."""
    xs, w = _samples()
    cotangents = randn(4, *xs[0].shape, dtype=torch.float64, seed=6)

    def second(f):
        _, vjp_fn = torch.func.vjp(lambda v: f(xs[0], v), w)
        return torch.func.grad(lambda c: torch.func.vmap(vjp_fn)(c)[0].square().sum())(cotangents)

    assert second(WEIGHTED[op][1]).abs().sum() > 0  # the reference's: zeros would be wrong
    with pytest.raises(RuntimeError, match=rf"hetrain.ops.{op}: double backward .* Use hetrain.ops.{op}_ref"):
        second(WEIGHTED[op][0])


@pytest.mark.parametrize("op", OPS)
def test_forward_mode_ad_is_refused_naming_the_reference_rather_than_dropping_the_tangent(op):
    """The kernels have no forward derivative: without inputs needing gradients the body ran and the output's
    tangent silently lacked the op's part; with them torch's generic "implement the jvp function" was raised."""
    i = 4 if op == "bn_relu_pool" else 0
    said = rf"hetrain.ops.{op}: forward-mode AD .* not supported.* Use hetrain.ops.{op}_ref"

    def call(args, x):
        return calls(*args[:i], x, *args[i + 1:])[op]()

    for requires_grad in (False, True):
        args = inputs(requires_grad=requires_grad)
        x = args[i]
        with fwAD.dual_level():
            with pytest.raises(RuntimeError, match=said):
                call(args, fwAD.make_dual(x, torch.ones_like(x)))
            torch.manual_seed(0)
            untangled = call(args, x)  # a dual level with no tangent on the op's arguments: a plain call
        torch.manual_seed(0)
        torch.testing.assert_close(untangled, call(args, x))
    args = inputs(requires_grad=False)
    with pytest.raises(RuntimeError, match=said):
        torch.func.jvp(lambda x: call(args, x), (args[i],), (torch.ones_like(args[i]),))


@pytest.mark.parametrize(("op", "backend"), [*((o, None) for o in OPS), ("layer_norm", "cpu"), ("layer_norm", "torch")])
def test_a_tangent_on_the_upstream_gradient_is_refused_naming_the_reference(op, backend):
    """Forward over reverse: the C++ autograd's backward dropped the tangent silently, and the torch backend's
    refusal named the internal backward op with a placeholder for its reference."""
    i = 4 if op == "bn_relu_pool" else 0
    args = inputs()
    with plugins.use_backend(**({op: backend} if backend else {})), fwAD.dual_level():
        y = calls(*args)[op]()
        dy = fwAD.make_dual(torch.ones_like(y), torch.ones_like(y))
        with pytest.raises(RuntimeError, match=rf"hetrain.ops.{op}: forward-mode AD .* Use hetrain.ops.{op}_ref"):
            torch.autograd.grad(y, args[i], dy)


# vmap (randomness="error") and jit.trace refuse a random draw themselves; vmap refuses linear_cross_entropy's backward
# (it reads its upstream gradient's value) and BatchNorm's statistics kernel (running statistics written in place),
# and linear_cross_entropy's forward depends on which inputs need gradients, which jit.trace's no-grad check run sees
# as another graph.
VMAPPED = ["layer_norm", "rms_norm", "bias_gelu"]
TRACED = [o for o in OPS if "dropout" not in o and o != "linear_cross_entropy"]


def _batched_loss(op):
    """(loss of one sample's input, a batch of three samples): the op's first tensor input, one more dimension."""
    args = list(inputs(requires_grad=False))
    i = 4 if op == "bn_relu_pool" else 0

    def loss(x):
        return calls(*args[:i], x, *args[i + 1:])[op]().square().sum()

    return loss, torch.stack([args[i] * (k + 1) for k in range(3)])


@pytest.mark.parametrize("op", VMAPPED)
def test_vmap_with_gradients_on_gives_each_samples_value_and_gradient(op):
    """vmap under autograd (not inside torch.func.grad): the op's Function runs per sample (torch's batching
    fallback), as a loop over the samples would; torch refused it with no vmap rule for a Function."""
    loss, xs = _batched_loss(op)
    xs.requires_grad_()
    values = torch.vmap(loss)(xs)
    (grads,) = torch.autograd.grad(values.sum(), xs)
    for k in range(len(xs)):
        x = xs[k].detach().requires_grad_()
        value = loss(x)
        torch.testing.assert_close(values[k], value)
        torch.testing.assert_close(grads[k], torch.autograd.grad(value, x)[0])


def _transformed(x, w):
    """Each op under a torch.func transform, as (name, thunk). The vjp's function is called after vjp returned,
    outside any transform: its saved tensors are functorch wrappers that no transform unwraps any more."""
    def vjp_then_call():
        out, vjp_fn = torch.func.vjp(lambda v: ops.dropout_add_layer_norm(v, v, w, None, 0.25), x)
        return out, vjp_fn(torch.ones_like(out))[0]

    return {
        "vmap(layer_norm)": lambda: torch.vmap(lambda v: ops.layer_norm(v, w))(x),
        "vmap(bias_gelu)": lambda: torch.vmap(lambda v: ops.bias_gelu(v, w))(x),
        "jacrev(rms_norm)": lambda: torch.func.jacrev(lambda v: ops.rms_norm(v, w))(x[0]),
        "jacrev(dropout)": lambda: torch.func.jacrev(lambda v: ops.dropout(v, 0.5))(x[0]),
        "grad(layer_norm)": lambda: torch.func.grad(lambda v: ops.layer_norm(v, w).square().sum())(x),
        "vjp(dropout_add_layer_norm)": vjp_then_call,
    }


@pytest.mark.parametrize("case", list(_transformed(None, None)))
def test_the_triton_backend_runs_under_torch_func_transforms_as_the_cpu_backend_does(case):
    """The body got functorch's wrapper tensors (BatchedTensor, TensorWrapper) and handed them to the Triton
    kernels, which read their storage: "Cannot access storage of TensorWrapper". Every backend now gets plain
    tensors from the dispatcher."""
    x, w = randn(3, 4, 6, seed=1), randn(6, seed=2, shift=1.0)
    results = {}
    for backend in ("triton", "cpu"):
        pins = dict.fromkeys(("layer_norm", "rms_norm", "bias_gelu", "dropout", "dropout_add_layer_norm"), backend)
        torch.manual_seed(0)  # the dropout ops draw the same seed on both
        with plugins.use_backend(**pins):
            results[backend] = _transformed(x, w)[case]()
    torch.testing.assert_close(results["triton"], results["cpu"])


def _legacy_batched(x, w):
    """Each op where torch.autograd batches with its legacy vmap, as (name, thunk): its BatchedTensor is no functorch
    wrapper and no torch.func transform is open while it runs."""
    def batched_grads(fn):
        v = x.detach().requires_grad_()
        y = fn(v)
        return torch.autograd.grad(y, v, torch.ones(2, *y.shape) + torch.arange(2.0).view(2, 1, 1, 1),
                                   is_grads_batched=True)[0]

    return {
        "jacobian(layer_norm, vectorize=True)": lambda: torch.autograd.functional.jacobian(
            lambda v: ops.layer_norm(v, w), x[0], vectorize=True),
        "grad(layer_norm, is_grads_batched=True)": lambda: batched_grads(lambda v: ops.layer_norm(v, w)),
        "grad(dropout, is_grads_batched=True)": lambda: batched_grads(lambda v: ops.dropout(v, 0.5)),
    }


@pytest.mark.parametrize("case", list(_legacy_batched(None, None)))
def test_the_triton_backend_runs_under_torch_autograds_batched_gradients_as_the_cpu_backend_does(case):
    """The body got the legacy vmap's BatchedTensor and handed it to the Triton kernels: "Cannot access storage of
    BatchedTensorImpl". Such a tensor takes the custom op, whose dispatcher runs the body per sample."""
    x, w = randn(3, 4, 6, seed=1), randn(6, seed=2, shift=1.0)
    results = {}
    for backend in ("triton", "cpu"):
        torch.manual_seed(0)  # dropout draws the same seed on both
        with plugins.use_backend(layer_norm=backend, dropout=backend):
            results[backend] = _legacy_batched(x, w)[case]()
    torch.testing.assert_close(results["triton"], results["cpu"])


def test_jacrev_of_dropout_is_the_drawn_mask_over_one_minus_p():
    """jacrev vmaps the backward, which had no vmap rule (refused); it runs per row through torch's fallback."""
    x = randn(4, 6, dtype=torch.float64, seed=3)
    torch.manual_seed(5)
    jacobian = torch.func.jacrev(lambda x: ops.dropout(x, 0.5))(x).reshape(24, 24)
    torch.manual_seed(5)
    kept = ops.dropout(torch.ones_like(x), 0.5).reshape(24) != 0  # the same seed draws the same mask
    assert 0 < int(kept.sum()) < 24
    torch.testing.assert_close(jacobian, torch.diag(kept.double() * 2.0), rtol=0, atol=0)


@pytest.mark.parametrize("op", TRACED)
def test_jit_trace_records_the_custom_op_so_the_trace_trains(op):
    """A trace of the kernels themselves would hold no autograd (a traced module trained nothing), and one taken with
    gradients differed from torch's no-grad check run: the trace records the custom op, whose autograd is registered."""
    loss, xs = _batched_loss(op)
    x = xs[1].detach().requires_grad_()
    traced = torch.jit.trace(loss, (x,))  # checks the trace by running it again without gradients
    (grad,) = torch.autograd.grad(traced(x), x)
    (expected,) = torch.autograd.grad(loss(x), x)
    torch.testing.assert_close(grad, expected)


CPP_OPS = [o for o in OPS if o != "linear_cross_entropy"]  # its chunk loop lives in Python
CPP_NODES = {"layer_norm": "LayerNorm", "rms_norm": "RmsNorm", "bias_gelu": "BiasGelu", "dropout": "Dropout",
             "dropout_add_layer_norm": "DropoutAddLayerNorm", "bn_relu_pool": "BnReluPool"}


@pytest.mark.parametrize("op", CPP_OPS)
def test_with_the_cpp_backend_an_eager_call_records_one_cpp_autograd_node(op):
    # Forward and backward never re-enter Python (csrc/autograd.cpp); the numbers are the op tests'. The 3-D input
    # is flattened below autograd: no view or reshape node around the op's own (each costs more than its kernel).
    y = calls(*inputs())[op]()
    assert y.grad_fn.name() == f"torch::autograd::CppNode<hetrain::fused::{CPP_NODES[op]}>"


ROW_OPS = ["layer_norm", "rms_norm", "bias_gelu", "dropout_add_layer_norm"]  # any leading shape, flattened inside


def _row_op_with(op, backend, x, r):
    """``op`` on ``x`` (and residual ``r``) with ``backend`` pinned: "cpu" runs the C++ autograd, "torch" the
    Python Function; the dropout stream seeded alike."""
    _x, _r, w, b, img, target, weight = inputs()
    torch.manual_seed(0)
    with plugins.use_backend(**{op: backend}):
        return calls(x, r, w, b, img, target, weight)[op]()


@pytest.mark.parametrize("op", ROW_OPS)
def test_a_transposed_3d_input_gets_the_same_output_and_gradients_on_both_autograd_paths(op):
    results = {}
    for backend in ("cpu", "torch"):
        x, r = randn(3, 5, H, seed=1, requires_grad=True), randn(3, 5, H, seed=2, requires_grad=True)
        y = _row_op_with(op, backend, x.transpose(0, 1), r.transpose(0, 1))  # flattening copies these
        assert y.shape == (5, 3, H)
        assert "View" not in y.grad_fn.name() and "Reshape" not in y.grad_fn.name(), y.grad_fn.name()
        dy = randn(*y.shape, seed=9)
        results[backend] = (y, *torch.autograd.grad(y, [x, r], dy, allow_unused=True))
    for cpp, ref in zip(results["cpu"], results["torch"], strict=True):
        if ref is None:
            assert cpp is None
        else:
            torch.testing.assert_close(cpp, ref)


@pytest.mark.parametrize("shape", [(0, 5, H), (3, 0, H), (3, 5, 0), (2, 3, 4, H)])
@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("op", ROW_OPS)
def test_empty_and_4d_inputs_keep_their_shape_through_forward_and_backward(op, backend, shape):
    x, r = randn(*shape, seed=1, requires_grad=True), randn(*shape, seed=2, requires_grad=True)
    w, b = randn(shape[-1], seed=3, requires_grad=True), randn(shape[-1], seed=4, requires_grad=True)
    torch.manual_seed(0)
    with plugins.use_backend(**{op: backend}):
        y = calls(x, r, w, b, *inputs()[4:])[op]()
        dx, dw = torch.autograd.grad(y, [x, w] if op != "bias_gelu" else [x, b], torch.ones_like(y))
    assert y.shape == dx.shape == shape and dw.shape == (shape[-1],)
    if y.numel() == 0:
        assert torch.equal(dw, torch.zeros_like(dw))  # no rows: nothing to sum


class _DropsItsGradient(torch.autograd.Function):
    """Identity whose backward returns no gradient: the op's node then runs with an undefined one."""

    @staticmethod
    def forward(ctx, t):
        return t.clone()

    @staticmethod
    def backward(ctx, grad):
        return None


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("op", ROW_OPS)
def test_statistics_are_not_differentiable_and_no_gradient_in_gives_none_out(op, backend):
    x = randn(3, 5, H, seed=1, requires_grad=True)
    y = _row_op_with(op, backend, x, randn(3, 5, H, seed=2))
    if op != "bias_gelu":  # the custom op's other outputs: per-row statistics for backward
        _x, r, w, b, *_ = inputs()
        args = {"layer_norm": (x, w, b, 1e-5), "rms_norm": (x, w, 1e-6),
                "dropout_add_layer_norm": (x, r, w, b, torch.tensor([7]), 0.25, 1e-5)}[op]
        with plugins.use_backend(**{op: backend}):
            stats = getattr(torch.ops.hetrain, f"{op}_fwd")(*args)[1:]
        assert not any(t.requires_grad for t in stats)
    (dx,) = torch.autograd.grad(_DropsItsGradient.apply(y).sum() + x.sum(), [x])
    assert torch.equal(dx, torch.ones_like(x))  # only the other path's gradient


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("op", ROW_OPS)
def test_changing_a_3d_input_in_place_after_forward_is_caught_by_backward(op, backend):
    x = randn(3, 5, H, seed=1, requires_grad=True) * 1  # not a leaf: it may be changed in place
    y = _row_op_with(op, backend, x, randn(3, 5, H, seed=2))
    x.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


IN_PLACE = {  # (fused, its torch reference), on (x, residual, weight, bias)
    "layer_norm": (lambda x, r, w, b: ops.layer_norm(x, w, b), lambda x, r, w, b: ops.layer_norm_ref(x, w, b)),
    "rms_norm": (lambda x, r, w, b: ops.rms_norm(x, w), lambda x, r, w, b: ops.rms_norm_ref(x, w)),
    "bias_gelu": (lambda x, r, w, b: ops.bias_gelu(x, b, "tanh"), lambda x, r, w, b: ops.bias_gelu_ref(x, b, "tanh")),
    "dropout_add_layer_norm": (lambda x, r, w, b: ops.dropout_add_layer_norm(x, r, w, b, 0.0),
                               lambda x, r, w, b: ops.dropout_add_layer_norm_ref(x, r, w, b, None, 0.0)),
}


@pytest.mark.parametrize("shape", [(3, 5, H), (5, H)])
@pytest.mark.parametrize("backend", ["torch", "triton", "cpu", "custom-op"])
@pytest.mark.parametrize("op", ROW_OPS)
def test_the_output_can_be_changed_in_place_as_torchs_can(op, backend, shape):
    """nn.ReLU(inplace=True) after a norm: the Python autograd paths (torch, triton, the custom op's) returned a
    view of the kernel's rows from their Function, which autograd refuses to change in place."""
    x, r = randn(*shape, seed=1, requires_grad=True), randn(*shape, seed=2, requires_grad=True)
    w, b = randn(H, seed=3, shift=1.0, requires_grad=True), randn(H, seed=4, requires_grad=True)
    fused, reference = IN_PLACE[op]
    grads = []
    for fn, pin in ((fused, backend), (reference, None)):
        args = [x, r, w, b]
        if pin == "custom-op":  # a tensor subclass takes the custom op and its registered autograd
            args, pin = [t.as_subclass(Wrapped) for t in args], "torch"
        with plugins.use_backend(**({op: pin} if pin else {})):
            y = fn(*args)
            y.relu_()
            grads.append(torch.autograd.grad(y.sum(), [x, r, w, b], allow_unused=True))
    for got, expected in zip(*grads, strict=True):
        assert (got is None) == (expected is None)
        if got is not None:
            torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("op", CPP_OPS)
def test_under_the_profiler_the_cpp_path_runs_and_names_its_ranges_as_the_python_path_does(op):
    args = inputs()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        y = calls(*args)[op]()
        torch.autograd.grad(y, [t for t in args if t.requires_grad], torch.ones_like(y), allow_unused=True)
    names = Counter(e.name for e in prof.events())
    assert y.grad_fn.name().startswith("torch::autograd::CppNode<hetrain::fused::")  # profiled as it runs
    # One range each: a backward that applied the op again (dropout's mask) named a second forward in it.
    assert names[f"hetrain::{op}.forward[cpu]"] == 1 and names[f"hetrain::{op}.backward[cpu]"] == 1, sorted(names)


class ExplodingWithGrad:
    """A backend whose every entry point fails, the C++ autograd one included."""

    @staticmethod
    def forward_with_grad(*args):
        raise RuntimeError("kernel exploded")

    forward = backward = forward_with_grad


@pytest.fixture
def exploding_layer_norm(monkeypatch):
    monkeypatch.setenv(plugins.ENV_STRICT, "0")
    plugins.register("layer_norm", "exploding", ("cpu",), ExplodingWithGrad, priority=99)
    yield
    plugins.unregister("layer_norm", "exploding")


def test_a_failing_autograd_entry_falls_back_like_any_backend(exploding_layer_norm, monkeypatch):
    x, _r, w, b, *_ = inputs()
    with (pytest.warns(UserWarning, match="forward_with_grad of backend 'exploding' of op 'layer_norm' failed"),
          pytest.warns(UserWarning, match="'exploding' of op 'layer_norm' failed.*falling back to 'cpu'")):
        y = ops.layer_norm(x, w, b)
    expected = torch.nn.functional.layer_norm(x, (H,), w, b)
    torch.testing.assert_close(y, expected)
    torch.testing.assert_close(torch.autograd.grad(y.sum(), w), torch.autograd.grad(expected.sum(), w))
    monkeypatch.setenv(plugins.ENV_STRICT, "1")
    with pytest.raises(RuntimeError, match="kernel exploded"):
        ops.layer_norm(x, w, b)


class BrokenAutogradEntry(TorchBackend):
    """A backend whose forward and backward work but whose C++ autograd entry fails (a stale or broken build)."""

    @staticmethod
    def forward_with_grad(*args):
        raise RuntimeError("autograd entry exploded")


def test_a_failing_autograd_entry_warns_once_and_runs_the_python_autograd(monkeypatch):
    """Outside strict mode the failure was swallowed: every call paid the exception, and nothing said so."""
    monkeypatch.setenv(plugins.ENV_STRICT, "0")
    plugins.register("layer_norm", "broken_autograd", ("cpu",), BrokenAutogradEntry, priority=99)
    x, _r, w, b, *_ = inputs()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(3):
                y = ops.layer_norm(x, w, b)
            grads = torch.autograd.grad(y.sum(), w)
    finally:
        plugins.unregister("layer_norm", "broken_autograd")
    assert len(caught) == 1, [str(c.message) for c in caught]
    assert ("forward_with_grad of backend 'broken_autograd' of op 'layer_norm' failed on cpu (RuntimeError: autograd "
            "entry exploded)") in str(caught[0].message)
    assert caught[0].filename == __file__  # the caller's line
    expected = torch.nn.functional.layer_norm(x, (H,), w, b)
    torch.testing.assert_close(y, expected)
    torch.testing.assert_close(grads, torch.autograd.grad(expected.sum(), w))


def test_a_callers_error_in_the_autograd_entry_is_raised_without_blaming_the_backend(monkeypatch):
    """An inference-mode tensor saved for backward was reported as the C++ autograd entry failing, which used up
    the once-per-process warning a real failure needs."""
    monkeypatch.setenv(plugins.ENV_STRICT, "0")
    monkeypatch.setattr(plugins, "_warned", set())
    _x, _r, w, b, *_ = inputs()
    with torch.inference_mode():
        x = torch.randn(3, 5, H)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(RuntimeError, match="Inference tensors cannot be saved for backward") as raised:
            ops.layer_norm(x, w, b)
    assert not caught, [str(c.message) for c in caught]
    assert not plugins._warned
    assert raised.value.__suppress_context__  # one traceback, not the same error twice


def test_the_cpp_autograd_ops_run_in_inference_mode():
    x, _r, w, b, *_ = inputs(requires_grad=False)
    x = x.reshape(-1, H)
    with torch.inference_mode():
        y, mean, rstd = torch.ops.hetrain_C.layer_norm(x, w, b, 1e-5)
    torch.testing.assert_close(y, torch.nn.functional.layer_norm(x, (H,), w, b))
    assert mean.shape == rstd.shape == (x.shape[0],)


def test_a_preferred_backend_serves_every_op_on_the_devices_it_serves():
    plugins.configure(prefer=["torch"])
    try:
        args = inputs()
        with OpLog() as log:
            for call in calls(*args).values():
                y = call()
                torch.autograd.grad(y, [t for t in args if t.requires_grad], torch.ones_like(y), allow_unused=True)
    finally:
        plugins.configure(prefer=[])
    assert not [n for n in log.names if n.startswith("hetrain_C.")], log.names  # the reference ran, no kernel


def _row_op_cases():
    """(custom op, args) of every row op's forward and backward on a 3-D input, float64."""
    x, r = randn(3, 5, H, seed=1, dtype=torch.float64), randn(3, 5, H, seed=2, dtype=torch.float64)
    w, b = randn(H, seed=3, dtype=torch.float64), randn(H, seed=4, dtype=torch.float64)
    dy, seed = randn(3, 5, H, seed=5, dtype=torch.float64), torch.tensor([7])
    hetrain = torch.ops.hetrain
    _y, mean, rstd = hetrain.layer_norm_fwd(x, w, b, 1e-5)
    _y, rms_rstd = hetrain.rms_norm_fwd(x, w, 1e-6)
    _y, dal_mean, dal_rstd = hetrain.dropout_add_layer_norm_fwd(x, r, w, b, seed, 0.25, 1e-5)
    grad = [t.requires_grad_() for t in (x.clone(), r.clone(), w.clone(), b.clone())]
    return {
        "layer_norm_fwd": (hetrain.layer_norm_fwd, (grad[0], grad[2], grad[3], 1e-5)),
        "layer_norm_bwd": (hetrain.layer_norm_bwd, (dy, x, w, mean, rstd, True)),
        "rms_norm_fwd": (hetrain.rms_norm_fwd, (grad[0], grad[2], 1e-6)),
        "rms_norm_bwd": (hetrain.rms_norm_bwd, (dy, x, w, rms_rstd)),
        "bias_gelu_fwd": (hetrain.bias_gelu_fwd, (grad[0], grad[3], "tanh")),
        "bias_gelu_bwd": (hetrain.bias_gelu_bwd, (dy, x, b, "tanh")),
        "dropout_add_layer_norm_fwd": (hetrain.dropout_add_layer_norm_fwd,
                                       (grad[0], grad[1], grad[2], grad[3], seed, 0.25, 1e-5)),
        "dropout_add_layer_norm_bwd": (hetrain.dropout_add_layer_norm_bwd,
                                       (dy, x, r, w, dal_mean, dal_rstd, seed, 0.25, True)),
    }


@pytest.mark.parametrize("name", list(_row_op_cases()))
def test_row_ops_take_any_leading_shape_and_pass_opcheck(name):
    # Schema, fake implementation (output shapes, statistics per flattened row), autograd registration and
    # AOT dispatch, with the flattening inside the op's body.
    op, args = _row_op_cases()[name]
    torch.library.opcheck(op.default, args)


def test_a_pinned_forwards_backward_stays_pinned_on_the_thread_autograd_runs_it_on():
    """A CUDA tensor's backward runs on autograd's device thread, where use_backend blocks opened by the caller do
    not exist: a pinned forward got the default backend's backward. Here backward runs on another thread."""
    import importlib
    import threading

    reference = importlib.import_module("hetrain.ops.layer_norm").TorchBackend
    ran = []

    class Spy:
        @staticmethod
        def forward(*args):
            ran.append(("forward", threading.current_thread().name))
            return reference.forward(*args)

        @staticmethod
        def backward(*args):
            ran.append(("backward", threading.current_thread().name))
            return reference.backward(*args)

    plugins.register("layer_norm", "spy", ("cpu",), Spy)
    try:
        x, w, b = randn(4, H, seed=1, requires_grad=True), randn(H, seed=2), randn(H, seed=3)
        with plugins.use_backend(layer_norm="spy"):
            y = ops.layer_norm(x, w, b)
        grads = []
        worker = threading.Thread(target=lambda: grads.extend(torch.autograd.grad(y.sum(), x)), name="other")
        worker.start()
        worker.join()
        assert ran == [("forward", threading.current_thread().name), ("backward", "other")]
        assert grads[0].shape == x.shape
        assert plugins.open_scopes() is None  # nothing left open on either thread
    finally:
        plugins.unregister("layer_norm", "spy")


def test_the_custom_ops_backward_stays_pinned_on_another_thread_too():
    """The same through the torch.library op itself (what graphs and the cuda tests call)."""
    import importlib
    import threading

    reference = importlib.import_module("hetrain.ops.layer_norm").TorchBackend
    ran = []
    spy = type("Spy", (), {"forward": staticmethod(lambda *a: ran.append("forward") or reference.forward(*a)),
                           "backward": staticmethod(lambda *a: ran.append("backward") or reference.backward(*a))})
    plugins.register("layer_norm", "spy", ("cpu",), spy)
    try:
        x, w, b = randn(4, H, seed=1, requires_grad=True), randn(H, seed=2), randn(H, seed=3)
        with plugins.use_backend(layer_norm="spy"):
            y = torch.ops.hetrain.layer_norm_fwd(x, w, b, 1e-5)[0]
        worker = threading.Thread(target=lambda: torch.autograd.grad(y.sum(), x))
        worker.start()
        worker.join()
        assert ran == ["forward", "backward"]
    finally:
        plugins.unregister("layer_norm", "spy")


def test_a_graph_guard_runs_where_the_custom_op_is_called_and_not_on_eager_calls():
    """The dropout ops' capture check: made per call by graphs, which traced the face's checks once."""
    from hetrain.ops._op import Op

    seen = []

    def doubled(x: torch.Tensor) -> torch.Tensor:
        return x * 2

    guarded = Op("hetrain_test::doubled", doubled, graph_guard=lambda x: seen.append(tuple(x.shape)))
    guarded.register_fake(lambda x: torch.empty_like(x))
    x = randn(3, 4, seed=1)
    assert torch.equal(guarded(x), x * 2) and seen == []  # eager: the body alone
    assert torch.equal(torch.ops.hetrain_test.doubled(x), x * 2) and seen == [(3, 4)]
    compiled = torch.compile(lambda x: guarded(x) + 1, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(x), x * 2 + 1) and seen == [(3, 4), (3, 4)]


CHECKPOINTED = {
    "layer_norm": lambda x, w: ops.layer_norm(x, w, w),
    "rms_norm": lambda x, w: ops.rms_norm(x, w),
    "bias_gelu": lambda x, w: ops.bias_gelu(x, w),
    "dropout_add_layer_norm": lambda x, w: ops.dropout_add_layer_norm(x, x, w, w, 0.0),
}


@pytest.mark.parametrize("name", list(CHECKPOINTED))
def test_an_op_last_in_a_checkpointed_region_recomputes_without_falling_back(name, monkeypatch):
    """Checkpointing stops its recomputation by raising once every saved tensor is back; taken for a failure (only
    without strict mode, which the suite otherwise sets), the op ran again on a fallback backend and torch's
    checkpoint failed with 'Unexpected state: target_frame.early_stop is set'."""
    monkeypatch.setenv("HETRAIN_STRICT", "0")
    fn = CHECKPOINTED[name]
    x = randn(4, 8, seed=1, requires_grad=True)
    w = randn(8, seed=2, shift=1.0, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no backend may be reported as failed and fallen back from
        torch.utils.checkpoint.checkpoint(fn, x, w, use_reentrant=False).sum().backward()
    got = (x.grad, w.grad)
    x.grad = w.grad = None
    fn(x, w).sum().backward()
    for g, want in zip(got, (x.grad, w.grad), strict=True):
        torch.testing.assert_close(g, want)


@pytest.mark.parametrize(("value", "expected"), [("1", True), ("On", True), ("yes", True), ("0", False), ("off", False),
                                                 ("", False), ("2", None), ("abc", None)])
def test_strict_mode_from_the_environment_refuses_what_it_cannot_read(monkeypatch, value, expected):
    # HETRAIN_STRICT=2 or =on read as "not strict": a failing backend fell back where the run asked it to raise.
    monkeypatch.setenv(plugins.ENV_STRICT, value)
    if expected is None:
        with pytest.raises(plugins.BackendError, match=rf"cannot read HETRAIN_STRICT='{value}': expected 1, true"):
            plugins.strict()
    else:
        assert plugins.strict() is expected
