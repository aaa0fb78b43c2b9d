"""bias_gelu: every backend forward and backward against the float64 torch reference, compile, errors, nn."""

from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from op_testing import OpLog, assert_close, non_contiguous, randn
from torch.utils.flop_counter import FlopCounterMode

import hetrain
from hetrain import plugins
from hetrain.nn._share import observer
from hetrain.nn.bias_gelu import BiasGELU
from hetrain.ops.bias_gelu import bias_gelu, bias_gelu_ref

BACKENDS = ["triton", "cpu", "torch"]
SHAPES = [(3, 1), (4, 7), (2, 5, 33), (6, 100), (1, 257), (2, 3, 768)]


def run(backend, x, b, approximate):
    with plugins.use_backend(bias_gelu=backend):
        y = bias_gelu(x, b, approximate)
        dy = randn(*y.shape, dtype=y.dtype, seed=7)
        dx, db = torch.autograd.grad(y, (x, b), dy)
    return y, dy, dx, db


def reference(x, b, dy, approximate):
    """The float64 oracle on the same input values."""
    x64 = x.detach().double().requires_grad_()
    b64 = b.detach().double().requires_grad_()
    y = bias_gelu_ref(x64, b64, approximate)
    return (y, *torch.autograd.grad(y, (x64, b64), dy.double()))


def check(backend, x, b, approximate, dtype):
    y, dy, dx, db = run(backend, x, b, approximate)
    y_ref, dx_ref, db_ref = reference(x, b, dy, approximate)
    assert y.dtype == dtype and y.shape == x.shape and dx.shape == x.shape and db.shape == b.shape
    assert_close(y, y_ref, dtype, f"{backend} y")
    assert_close(dx, dx_ref, dtype, f"{backend} dx")
    # The bias gradient is a sum over rows: compare it relative to its largest entry.
    scale = max(1.0, db_ref.abs().max().item())
    assert_close(db / scale, db_ref / scale, dtype, f"{backend} dbias")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_forward_backward_match_float64_reference(backend, dtype, shape, approximate):
    x = randn(*shape, dtype=dtype, seed=1, scale=2.0, shift=0.3, requires_grad=True)
    b = randn(shape[-1], dtype=dtype, seed=2, requires_grad=True)
    check(backend, x, b, approximate, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_saturated_and_tiny_inputs_stay_finite_and_exact(backend, approximate):
    # Far tails (gelu -> 0 and -> z), values past float32's exp range, and values near 0.
    tails = torch.tensor([-200.0, -90.0, -30.0, -9.0, -1e-6, 0.0, 1e-6, 9.0, 30.0, 90.0, 200.0])
    x = (tails[None, :] + torch.zeros(3, 1)).requires_grad_()
    b = randn(11, seed=3, scale=1e-3, requires_grad=True)
    check(backend, x, b, approximate, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_exact_form_gradient_vanishes_where_the_square_overflows(backend):
    # Past |z| ~ 1.3e19, z * z overflows float32: the density term z * exp(-z^2 / 2) must be 0 there, not exp's
    # smallest normal times z (the C++ kernel gave -0.066 at z = -1e37). The tanh form's derivative is NaN there
    # in every float32 implementation, torch's own included, so only the exact form is held to float64's values.
    tails = torch.tensor([-1e37, -1e30, -1e20, 1e20, 1e30, 1e37])
    x = (tails[None, :] + torch.zeros(3, 1)).requires_grad_()
    b = randn(len(tails), seed=3, scale=1e-3, requires_grad=True)
    check(backend, x, b, "none", torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_input_and_grad(backend):
    x = non_contiguous(randn(5, 40, dtype=torch.float64, seed=4, shift=0.5, requires_grad=True))
    b = randn(40, dtype=torch.float64, seed=5, requires_grad=True)
    with plugins.use_backend(bias_gelu=backend):
        y = bias_gelu(x, b, "tanh")
        dy = non_contiguous(randn(5, 40, dtype=torch.float64, seed=6))
        dx, db = torch.autograd.grad(y, (x, b), dy)
    y_ref, dx_ref, db_ref = reference(x, b, dy, "tanh")
    for got, want, name in ((y, y_ref, "y"), (dx, dx_ref, "dx"), (db, db_ref, "db")):
        assert_close(got, want, torch.float64, name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_size_batch(backend):
    x = torch.empty(0, 16, requires_grad=True)
    b = randn(16, seed=1, requires_grad=True)
    y, _dy, dx, db = run(backend, x, b, "none")
    assert y.shape == (0, 16) and dx.shape == (0, 16)
    assert torch.equal(db, torch.zeros(16))


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_hidden_size(backend):
    x = randn(3, 0, seed=2, requires_grad=True)
    b = torch.empty(0, requires_grad=True)
    y, _dy, dx, db = run(backend, x, b, "none")
    assert y.shape == dx.shape == (3, 0) and db.shape == (0,)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gradcheck(backend, approximate):
    x = randn(3, 9, dtype=torch.float64, seed=8, shift=0.3, requires_grad=True)
    b = randn(9, dtype=torch.float64, seed=9, requires_grad=True)
    with plugins.use_backend(bias_gelu=backend):
        assert torch.autograd.gradcheck(lambda x, b: bias_gelu(x, b, approximate), (x, b))


def test_backward_saves_the_input_not_the_output():
    x = randn(4, 32, seed=1, requires_grad=True)
    b = randn(32, seed=2, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = bias_gelu(x, b, "tanh")
    # Only the input (a view of x) and the bias are kept; the output's memory is not.
    assert [(t.data_ptr(), t.numel()) for t in saved] == [(x.data_ptr(), x.numel()), (b.data_ptr(), b.numel())]
    assert y.data_ptr() not in {t.data_ptr() for t in saved}


def test_mixed_bias_dtype_runs_in_activation_dtype():
    x = randn(4, 32, dtype=torch.bfloat16, seed=1, requires_grad=True)
    b = randn(32, seed=2, requires_grad=True)
    y = bias_gelu(x, b)
    y.float().sum().backward()
    assert y.dtype == torch.bfloat16 and b.grad.dtype == torch.float32 and x.grad.dtype == torch.bfloat16


def test_custom_ops_pass_opcheck():
    x = randn(4, 24, seed=1, shift=0.5, requires_grad=True)
    b = randn(24, seed=2, requires_grad=True)
    for approximate in ("none", "tanh"):
        torch.library.opcheck(torch.ops.hetrain.bias_gelu_fwd.default, (x, b, approximate))
        torch.library.opcheck(torch.ops.hetrain.bias_gelu_bwd.default,
                              (randn(4, 24, seed=3), x.detach(), b.detach(), approximate))


# A transposed 2-D input, and an N-D one whose leading dims merge into a strided view of rows without a copy.
STRIDED = {"transposed": lambda: randn(24, 4, seed=1, shift=0.5).t(),
           "permuted": lambda: randn(24, 2, 3, seed=1, shift=0.5).permute(1, 2, 0)}


@pytest.mark.parametrize("layout", list(STRIDED))
def test_torch_backend_outputs_have_the_fake_strides_for_strided_inputs(layout):
    # The torch backend returned a column-major output where the fake said contiguous, so inductor misread it.
    x, b = STRIDED[layout](), randn(24, seed=2)
    with plugins.use_backend(bias_gelu="torch"):
        torch.library.opcheck(torch.ops.hetrain.bias_gelu_fwd.default, (x, b, "none"), test_utils="test_faketensor")
        torch.library.opcheck(torch.ops.hetrain.bias_gelu_bwd.default, (STRIDED[layout](), x, b, "tanh"),
                              test_utils="test_faketensor")


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_torch_compile_fullgraph(backend):
    torch._dynamo.reset()
    x = randn(2, 5, 48, seed=1, shift=0.2, requires_grad=True)
    b = randn(48, seed=2, requires_grad=True)

    def block(x, b):
        return bias_gelu(x * 2.0, b, "tanh") * 3.0

    with plugins.use_backend(bias_gelu=backend):
        compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
        y = compiled(x, b)
        grads = torch.autograd.grad(y.sum(), (x, b))
    y_eager = bias_gelu_ref(x * 2.0, b, "tanh") * 3.0
    grads_eager = torch.autograd.grad(y_eager.sum(), (x, b))
    assert_close(y, y_eager, torch.float32, "compiled y")
    for g, ge in zip(grads, grads_eager, strict=True):
        assert_close(g, ge, torch.float32, "compiled grad")


def test_bad_inputs_raise_clear_errors():
    x = randn(4, 8)
    with pytest.raises(ValueError, match=r"bias must have shape \(8,\)"):
        bias_gelu(x, randn(7))
    with pytest.raises(ValueError, match="approximate must be 'none' or 'tanh'"):
        bias_gelu(x, randn(8), "sigmoid")
    with pytest.raises(ValueError, match="floating tensor"):
        bias_gelu(torch.ones(4, 8, dtype=torch.int64), randn(8))
    with pytest.raises(ValueError, match="bias must be a floating tensor"):
        bias_gelu(x, torch.ones(8, dtype=torch.int64))
    with pytest.raises(ValueError, match="on meta but x is on cpu"):
        bias_gelu(x, torch.empty(8, device="meta"))
    with pytest.raises(RuntimeError, match="must be 2-D"):
        torch.ops.hetrain_C.bias_gelu_fwd(randn(2, 3, 4), randn(4), "none")
    with pytest.raises(RuntimeError, match="dtype Double differs"):
        torch.ops.hetrain_C.bias_gelu_fwd(x, randn(8, dtype=torch.float64), "none")
    with pytest.raises(RuntimeError, match="approximate must be"):
        torch.ops.hetrain_C.bias_gelu_bwd(x, x, randn(8), "exact")
    with pytest.raises(RuntimeError, match="dy must match x"):
        torch.ops.hetrain_C.bias_gelu_bwd(randn(4, 9), x, randn(8), "none")


@pytest.mark.parametrize("has_bias", [True, False])
def test_nn_bias_gelu_is_a_linear_with_a_fused_epilogue(has_bias):
    torch.manual_seed(0)
    linear = torch.nn.Linear(16, 24, bias=has_bias)
    fused = BiasGELU(16, 24, bias=has_bias, approximate="tanh")
    fused.load_state_dict(linear.state_dict())
    assert isinstance(fused, torch.nn.Linear) and fused.state_dict().keys() == linear.state_dict().keys()
    x = randn(3, 5, 16, seed=5, requires_grad=True)
    want = F.gelu(linear(x), approximate="tanh")
    got = fused(x)
    assert_close(got, want, torch.float32, "module")
    g_want = torch.autograd.grad(want.sum(), (x, linear.weight))
    g_got = torch.autograd.grad(got.sum(), (x, fused.weight))
    for g, ge in zip(g_got, g_want, strict=True):
        assert_close(g, ge, torch.float32, "module grad")
    shared = BiasGELU.from_linear(linear)
    assert shared.weight is linear.weight and shared.bias is linear.bias and shared.approximate == "none"
    assert_close(shared(x), F.gelu(linear(x)), torch.float32, "from_linear")
    assert "approximate='none'" in repr(shared)
    with pytest.raises(ValueError, match="approximate must be"):
        BiasGELU.from_linear(linear, "fast")


def test_patch_fuses_linear_gelu_runs_in_sequentials():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(12, 20), torch.nn.GELU(approximate="tanh"), torch.nn.Linear(20, 5),
                                torch.nn.Linear(5, 5, bias=False), torch.nn.GELU())
    x = torch.randn(4, 12, requires_grad=True)
    before = model(x)
    (g_before,) = torch.autograd.grad(before.sum(), x)
    state = model.state_dict()
    report = hetrain.nn.patch(model)
    assert report.swapped == {"0": "Linear -> GELU fused (hetrain.ops.bias_gelu)"}
    assert type(model[0]) is torch.nn.Linear and type(model[1]) is torch.nn.GELU  # calls of the parts are unchanged
    with OpLog() as log:
        after = model(x)
    assert log.names.count("hetrain_C.bias_gelu_fwd") == 1, log.names
    torch.testing.assert_close(model[:2](x), torch.nn.functional.gelu(model[0](x), approximate="tanh"))
    (g_after,) = torch.autograd.grad(after.sum(), x)
    torch.testing.assert_close(after, before)
    torch.testing.assert_close(g_after, g_before)
    assert model.state_dict().keys() == state.keys()


def test_a_patched_run_calls_each_module_while_hooks_on_every_module_are_registered():
    # A user's register_module_forward_hook expects every call (hooks that only measure, hetrain's profilers and
    # torch's FLOP counter, leave the run fused: tests/test_conv_bn_relu_pool.py).
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.GELU())
    hetrain.nn.patch(model)
    seen = []
    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, _args, _out: seen.append(type(m).__name__))
    try:
        y = model(torch.randn(3, 6))
    finally:
        handle.remove()
    assert seen == ["Linear", "GELU", "FusedSequential"]
    with OpLog() as log:
        assert model(torch.randn(3, 6)).shape == y.shape
    assert log.names.count("hetrain_C.bias_gelu_fwd") == 1, log.names  # fused again once the hook is gone


@pytest.mark.parametrize("hooked", [0, 1])
def test_a_run_patched_with_a_module_hook_calls_its_modules_until_the_hook_is_removed(hooked):
    # Fused, a hook on the Linear would see the GELU's output and one on the GELU would never run. Patching looked
    # at hooks too, so a run hooked at patch time (even by a hook removed right after) was never fused.
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.GELU())
    seen = []
    handle = model[hooked].register_forward_hook(lambda _module, _args, out: seen.append(out.detach().clone()))
    x = torch.randn(3, 6)
    model(x)
    report = hetrain.nn.patch(model)
    assert report.swapped == {"0": "Linear -> GELU fused (hetrain.ops.bias_gelu)"}
    assert type(model[0]) is torch.nn.Linear and type(model[1]) is torch.nn.GELU
    with OpLog() as log:
        y = model(x)
    assert "hetrain_C.bias_gelu_fwd" not in log.names and len(seen) == 2
    torch.testing.assert_close(seen[1], seen[0])
    handle.remove()
    with OpLog() as log:
        torch.testing.assert_close(model(x), y)
    assert log.names.count("hetrain_C.bias_gelu_fwd") == 1, log.names


def test_a_run_calls_a_users_hook_object_whose_attributes_are_made_up_and_stays_fused_for_an_observer():
    # Marks were read as an attribute of the hook: a MagicMock has every attribute, so it was taken for one of
    # hetrain's measuring hooks and never called on a fused run. A hook marked with observer still leaves it fused.
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.GELU())
    hetrain.nn.patch(model)
    x = torch.randn(3, 6)
    user_hook = mock.MagicMock(return_value=None)
    handle = model[0].register_forward_hook(user_hook)
    with OpLog() as log:
        model(x)
    assert user_hook.call_count == 1  # was 0
    assert "hetrain_C.bias_gelu_fwd" not in log.names
    handle.remove()

    class Tracker:
        @observer
        def marked(self, module, args, out):
            pass

        def bound_to_a_marked_object(self, module, args, out):
            pass

    for hook in (observer(lambda module, args, out: None), Tracker().marked,
                 observer(Tracker()).bound_to_a_marked_object):
        handle = model[0].register_forward_hook(hook)
        with OpLog() as log:
            model(x)
        handle.remove()
        assert log.names.count("hetrain_C.bias_gelu_fwd") == 1, (hook, log.names)


def test_a_sequential_patched_inside_a_flop_counter_is_fused_once_it_closes():
    # Its tracker's hooks on every module (a plain FlopCounterMode expects the modules called) kept patching from
    # fusing the run at all.
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.GELU())
    with FlopCounterMode(display=False):
        report = hetrain.nn.patch(model)
    assert report.swapped == {"0": "Linear -> GELU fused (hetrain.ops.bias_gelu)"}
    x = torch.randn(3, 6)
    with OpLog() as log:
        y = model(x)
    assert log.names.count("hetrain_C.bias_gelu_fwd") == 1, log.names
    torch.testing.assert_close(y, F.gelu(model[0](x)))



@pytest.mark.parametrize("replaced", [0, 1])
@pytest.mark.parametrize("when", ["before patch", "after patch"])
def test_a_run_with_a_child_whose_forward_was_replaced_runs_that_forward(replaced, when):
    # A LoRA adapter added by replacing the Linear's forward on the instance was skipped by the fused run.
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.GELU())
    original = model[replaced].forward
    adapter = torch.nn.Linear(6 if replaced == 0 else 8, 8, bias=False)

    def replace():
        model[replaced].forward = lambda inp: original(inp) + adapter(inp)

    x = torch.randn(3, 6)
    if when == "before patch":
        replace()
        want = model(x)
        assert len(hetrain.nn.patch(model)) == 0  # not reported as fused
    else:
        assert len(hetrain.nn.patch(model)) == 1
        replace()
        want = model[1](model[0](x))
    with OpLog() as log:
        got = model(x)
    assert "hetrain_C.bias_gelu_fwd" not in log.names
    torch.testing.assert_close(got, want)


def test_from_linear_has_hooks_of_its_own():
    # The twin shared the Linear's hook dicts: a pre-hook registered on one ran when the other was called.
    linear = torch.nn.Linear(4, 4)
    fused = BiasGELU.from_linear(linear)
    seen = []
    fused.register_forward_pre_hook(lambda module, _args: seen.append(type(module).__name__))
    linear(torch.randn(1, 4))
    assert seen == []
    fused(torch.randn(1, 4))
    assert seen == ["BiasGELU"] and fused.weight is linear.weight and fused.bias is linear.bias


def test_from_linear_of_a_compiled_linear_computes_the_gelu():
    # It copied the compiled call Module.compile() set, bound to the Linear: the twin returned linear(x), no GELU.
    linear = torch.nn.Linear(4, 5)
    x = torch.randn(3, 4)
    want = F.gelu(linear(x))
    linear.compile(backend="eager")
    fused = BiasGELU.from_linear(linear)
    with OpLog() as log:
        got = fused(x)
    assert "hetrain_C.bias_gelu_fwd" in log.names, log.names
    torch.testing.assert_close(got, want)


def test_from_linear_refuses_a_linear_whose_forward_was_replaced():
    # It kept the replaced forward, which ran instead of the fused one: linear(x) + adapter, no GELU.
    linear = torch.nn.Linear(4, 5)
    original = linear.forward
    linear.forward = lambda inp: original(inp) * 2
    with pytest.raises(ValueError, match="hetrain.nn.BiasGELU: the Linear's forward was replaced on the instance"):
        BiasGELU.from_linear(linear)


def test_patch_reports_two_runs_that_share_their_linear_as_two():
    # The report keyed a run on its first child: one Linear in two Sequentials (each with its own GELU) was listed
    # once, the other run as a further path of the same.
    linear = torch.nn.Linear(4, 4)
    model = torch.nn.Module()
    model.a = torch.nn.Sequential(linear, torch.nn.GELU())
    model.b = torch.nn.Sequential(linear, torch.nn.GELU(approximate="tanh"))
    report = hetrain.nn.patch(model)
    assert set(report.swapped) == {"a.0", "b.0"} and report.also == {} and len(report) == 2
