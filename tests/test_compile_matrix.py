"""Every public op under {eager, torch.compile(fullgraph=True)} x {no autocast, bf16 autocast} x {fp32, bf16, fp16},
forward and backward against the float64 reference, output dtypes as torch gives them under the same autocast, and
no recompilation for batch sizes 8, 16 then 24.

Output dtype per op, under bf16 autocast (checked below against the unfused torch code under the same autocast):
  layer_norm, rms_norm, bias_gelu, dropout_add_layer_norm,
  dropout                                                   the input's dtype: autocast casts nothing
  linear_cross_entropy                                      float32: the projection runs in bf16, the loss in float32
  conv_bn_relu_pool, conv_relu_pool                         bf16: autocast casts the convolution

The matrix compiles with ``backend="aot_eager"``: dynamo still traces the fakes, the autograd formulas and the autocast
state through AOTAutograd, and the file stays fast on a small CPU; the recompile test compiles with inductor.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from op_testing import assert_close, largest, non_contiguous, randn
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters

from hetrain import ops
from hetrain.ops.dropout import keep_mask as dropout_keep_mask
from hetrain.ops.dropout_add_layer_norm import keep_mask

DTYPES = [torch.float32, torch.bfloat16, torch.float16]  # every dtype an op claims (the CPU kernels run fp16 too)
SEED = 1234  # torch.manual_seed before every call, so the dropout seed the op draws is known
P = 0.25
N = 13  # an odd feature size
V = 37  # linear_cross_entropy's vocabulary
IGNORE = -100


def dropped_positions(shape: torch.Size) -> torch.Tensor:
    """The kept positions dropout_add_layer_norm drew after ``torch.manual_seed(SEED)`` (its one randint)."""
    torch.manual_seed(SEED)
    seed = int(torch.randint(2**31, (1,), dtype=torch.int64).item())
    return keep_mask(seed, math.prod(shape[:-1]), shape[-1], P).view(shape)


@dataclass(frozen=True)
class Case:
    """One op as the matrix drives it: ``op(*grad_inputs, *other_inputs)`` and its torch twin ``ref``."""

    make: Callable[[int, torch.dtype], tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]]
    op: Callable[..., torch.Tensor]
    ref: Callable[..., torch.Tensor]
    autocast_casts: bool  # bf16 autocast moves the arithmetic to bf16 even for float32 inputs
    float32_loss: bool = False  # the output is a float32 loss whatever the inputs' dtype
    # Ops ending in a max-pool: the torch code before the pool at the op's precision, and the pool's
    # (kernel, stride, padding).
    pre_pool: Callable[..., torch.Tensor] | None = None
    pool: tuple[int, int, int] = (2, 2, 0)

    def out_dtype(self, dtype: torch.dtype, autocast: bool) -> torch.dtype:
        """The module docstring's table."""
        if self.float32_loss:
            return torch.float32
        return torch.bfloat16 if autocast and self.autocast_casts else dtype


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.requires_grad_()


def _norm_inputs(batch, dtype, params):
    x = non_contiguous(randn(batch, 3, N, dtype=dtype, seed=1, scale=2.0, shift=0.5))
    params = (randn(N, dtype=dtype, seed=2 + i, shift=1.0 - i, requires_grad=True) for i in range(params))
    return (_leaf(x), *params), ()


def _dal_inputs(batch, dtype):
    x = _leaf(non_contiguous(randn(batch, 3, N, dtype=dtype, seed=1, scale=2.0, shift=0.5)))
    r = randn(batch, 3, N, dtype=dtype, seed=2, requires_grad=True)
    return (x, r, randn(N, dtype=dtype, seed=3, shift=1.0, requires_grad=True),
            randn(N, dtype=dtype, seed=4, requires_grad=True)), ()


def _lce_inputs(batch, dtype):
    g = torch.Generator().manual_seed(batch)
    target = torch.randint(0, V, (batch, 3), generator=g)
    target.view(-1)[:: 4] = IGNORE
    hidden = _leaf(non_contiguous(randn(batch, 3, N, dtype=dtype, seed=1, shift=0.1)))
    return (hidden, randn(V, N, dtype=dtype, seed=2, scale=0.4, requires_grad=True),
            randn(V, dtype=dtype, seed=3, requires_grad=True)), (target,)


def _conv_inputs(batch, dtype, bn):
    x = randn(batch, 3, 7, 9, dtype=dtype, seed=1, shift=0.2, requires_grad=True)
    conv_weight = randn(4, 3, 3, 3, dtype=dtype, seed=2, scale=0.4, requires_grad=True)
    if not bn:
        return (x, conv_weight, randn(4, dtype=dtype, seed=3, requires_grad=True)), ()
    # No convolution bias before a BatchNorm, as in ResNets: the batch mean removes it, its true gradient is 0.
    bn_params = (randn(4, dtype=dtype, seed=4, shift=1.0, requires_grad=True), randn(4, dtype=dtype, seed=5,
                                                                                      requires_grad=True))
    running = (randn(4, dtype=dtype, seed=6, scale=0.3), randn(4, dtype=dtype, seed=7).abs() + 0.5)
    return (x, conv_weight, *bn_params), running


def _layer_norm(x, w, b):
    return ops.layer_norm(x, w, b)


def _rms_norm(x, w):
    return ops.rms_norm(x, w)


def _bias_gelu(x, b):
    return ops.bias_gelu(x, b)


def _dropout_add_layer_norm(x, r, w, b):
    return ops.dropout_add_layer_norm(x, r, w, b, P)


def _dropout_add_layer_norm_ref(x, r, w, b):
    return ops.dropout_add_layer_norm_ref(x, r, w, b, dropped_positions(x.shape), P)


def _dropout_inputs(batch, dtype):
    return (_leaf(non_contiguous(randn(batch, 3, N, dtype=dtype, seed=1, scale=2.0, shift=0.5))),), ()


def _dropout(x):
    return ops.dropout(x, P)


def _dropout_ref(x):
    torch.manual_seed(SEED)  # the op's one randint after the same seed
    seed = int(torch.randint(2**31, (1,), dtype=torch.int64).item())
    return ops.dropout_ref(x, dropout_keep_mask(seed, x.shape, P, x.device), P)


def _linear_cross_entropy(h, w, b, target):
    # A budget of 4 float32 rows: the 15 or more rows run in several chunks, the last one short.
    return ops.linear_cross_entropy(h, w, target, b, label_smoothing=0.1, memory_budget=4 * V * 4)


def _linear_cross_entropy_ref(h, w, b, target):
    return ops.linear_cross_entropy_ref(h, w, target, b, label_smoothing=0.1)


def _conv_bn_relu_pool(x, cw, w, b, running_mean, running_var):
    return ops.conv_bn_relu_pool(x, cw, None, w, b, running_mean.clone(), running_var.clone(), True, conv_padding=1,
                                 kernel_size=3, stride=2, padding=1)


def _conv_bn_relu_pool_ref(x, cw, w, b, running_mean, running_var):
    y = F.batch_norm(F.conv2d(x, cw, padding=1), running_mean.clone(), running_var.clone(), w, b, True)
    return F.max_pool2d(F.relu(y), 3, 2, 1)


def _conv_bn_relu(x, cw, w, b, running_mean, running_var):
    """Before the pool, at the op's precision: the convolution in its dtype, the normalisation in float32 (float64
    for float64) rounded back to the convolution's dtype, as the docstring of ``bn_relu_pool`` says."""
    conv = F.conv2d(x, cw, padding=1)
    st = torch.promote_types(conv.dtype, torch.float32)
    y = F.batch_norm(conv.to(st), running_mean.to(st, copy=True), running_var.to(st, copy=True), w.to(st), b.to(st),
                     True)
    return F.relu(y).to(conv.dtype)


def _conv_relu_pool(x, cw, cb):
    return ops.conv_relu_pool(x, cw, cb, conv_padding=1)


def _conv_relu(x, cw, cb):
    return F.relu(F.conv2d(x, cw, cb, padding=1))


def _conv_relu_pool_ref(*args):
    return F.max_pool2d(_conv_relu(*args), 2)


CASES = {
    "layer_norm": Case(lambda n, dt: _norm_inputs(n, dt, 2), _layer_norm, ops.layer_norm_ref, False),
    "rms_norm": Case(lambda n, dt: _norm_inputs(n, dt, 1), _rms_norm, ops.rms_norm_ref, False),
    "bias_gelu": Case(lambda n, dt: _norm_inputs(n, dt, 1), _bias_gelu, ops.bias_gelu_ref, False),
    "dropout_add_layer_norm": Case(_dal_inputs, _dropout_add_layer_norm, _dropout_add_layer_norm_ref, False),
    "dropout": Case(_dropout_inputs, _dropout, _dropout_ref, False),
    "linear_cross_entropy": Case(_lce_inputs, _linear_cross_entropy, _linear_cross_entropy_ref, True,
                                 float32_loss=True),
    "conv_bn_relu_pool": Case(lambda n, dt: _conv_inputs(n, dt, True), _conv_bn_relu_pool, _conv_bn_relu_pool_ref,
                              True, pre_pool=_conv_bn_relu, pool=(3, 2, 1)),
    "conv_relu_pool": Case(lambda n, dt: _conv_inputs(n, dt, False), _conv_relu_pool, _conv_relu_pool_ref, True,
                           pre_pool=_conv_relu),
}


def autocast(enabled: bool) -> contextlib.AbstractContextManager:
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled)


def upstream(out: torch.Tensor, seed: int = 9) -> torch.Tensor:
    return randn(max(out.numel(), 1), dtype=out.dtype, seed=seed).view(out.shape)


def forward_backward(fn, grad_inputs, other_inputs, enabled):
    """The output (after ``torch.manual_seed(SEED)``, under autocast when ``enabled``) and its input gradients."""
    torch.manual_seed(SEED)
    with autocast(enabled):
        out = fn(*grad_inputs, *other_inputs)
    return out, torch.autograd.grad(out, grad_inputs, upstream(out))


def float64_reference(case, grad_inputs, other_inputs, dy, amp):
    """The reference in float64 on the same input values.

    A max-pool's gradient goes to each window's winner, and rounding to bf16 can change the winner of a window whose
    top two values are within bf16's precision. So for ops ending in a max-pool the float64 values are taken at the
    winners torch code at the op's precision picks under the same autocast, as dropout's reference is given the
    kept positions: a wrongly routed gradient still shows, a near-tie decided by rounding does not.
    """
    to64 = [t.detach().double().requires_grad_() for t in grad_inputs]
    rest = [t.double() if t.is_floating_point() else t for t in other_inputs]
    if case.pre_pool is None:
        out = case.ref(*to64, *rest)
    else:
        with torch.no_grad(), autocast(amp):
            _, winners = F.max_pool2d(case.pre_pool(*grad_inputs, *other_inputs), *case.pool, return_indices=True)
        out = case.pre_pool(*to64, *rest).flatten(2).gather(2, winners.flatten(2)).view(winners.shape)
    return out, torch.autograd.grad(out, to64, dy.double())


def compare(out, grads, out_ref, grads_ref, tol_dtype, what):
    assert_close(out, out_ref, tol_dtype, f"{what} output")
    for i, (g, g_ref) in enumerate(zip(grads, grads_ref, strict=True)):
        # Parameter gradients sum over rows: compare relative to the largest entry. No floor of 1: the mean-reduced
        # cross-entropy's gradients, a few thousandths, would pass a 16-bit tolerance even if they were all zero.
        scale = largest(g_ref)
        assert_close(g / scale, g_ref / scale, tol_dtype, f"{what} grad of input {i}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("amp", [False, True], ids=["fp", "bf16-autocast"])
@pytest.mark.parametrize("mode", ["eager", "compile"])
@pytest.mark.parametrize("name", list(CASES))
def test_op_matches_float64_reference(name, mode, amp, dtype):
    case = CASES[name]
    if case.pre_pool is not None and amp and dtype == torch.float16:
        pytest.skip("torch's own BatchNorm refuses a bf16 activation with float16 parameters on the CPU: no reference")
    grad_inputs, other_inputs = case.make(5, dtype)
    fn = case.op
    if mode == "compile":
        torch._dynamo.reset()
        counters.clear()
        fn = torch.compile(case.op, fullgraph=True, backend="aot_eager")
    out, grads = forward_backward(fn, grad_inputs, other_inputs, amp)

    # The unfused torch code on the same inputs under the same autocast gives the dtype the op must give, and close
    # values: at float32 tolerance for float32 inputs and outputs, so a loss computed from float32 logits where
    # autocast computes bf16 ones would show.
    with torch.no_grad(), autocast(amp):
        torch_out = case.ref(*grad_inputs, *other_inputs)
    assert out.dtype == torch_out.dtype == case.out_dtype(dtype, amp), f"{name}: {out.dtype}, torch: {torch_out.dtype}"
    twin_tol = next((d for d in (torch.bfloat16, torch.float16) if d in (dtype, out.dtype)), torch.float32)
    assert_close(out, torch_out, twin_tol, f"{name} {mode} output vs torch's under the same autocast")
    assert all(g.dtype == t.dtype for g, t in zip(grads, grad_inputs, strict=True))
    if mode == "compile":
        assert not counters["graph_break"], dict(counters["graph_break"])

    out_ref, grads_ref = float64_reference(case, grad_inputs, other_inputs, upstream(out), amp)
    # The coarsest precision the op runs in: bf16 autocast, else a 16-bit input, else float32.
    runs_in = torch.bfloat16 if amp and case.autocast_casts else dtype if dtype.itemsize == 2 else torch.float32
    compare(out, grads, out_ref, grads_ref, runs_in,
            f"{name} {mode} {'bf16 autocast' if amp else 'no autocast'} {dtype}")


# --- bf16 activations beside float32 parameters: what a model under autocast hands the ops ----------------------

def _linear_then(name):
    """A Linear under autocast (bf16 output) feeding the op with float32 parameters, the unfused torch block, and
    how many float32 parameters (of weight, bias) the blocks take after the input and the Linear's weight."""
    if name == "layer_norm":
        return (lambda h, lw, w, b: ops.layer_norm(F.linear(h, lw), w, b),
                lambda h, lw, w, b: F.layer_norm(F.linear(h, lw), (N,), w, b), 2)
    if name == "rms_norm":
        return (lambda h, lw, w: ops.rms_norm(F.linear(h, lw), w),
                lambda h, lw, w: F.rms_norm(F.linear(h, lw), (N,), w), 1)
    if name == "bias_gelu":
        return (lambda h, lw, b: ops.bias_gelu(F.linear(h, lw), b),
                lambda h, lw, b: F.gelu(F.linear(h, lw, b)), 1)
    # dropout_add_layer_norm: the residual is the block's float32 input.
    return (lambda h, lw, w, b: ops.dropout_add_layer_norm(F.linear(h, lw), h, w, b, P),
            lambda h, lw, w, b: ops.dropout_add_layer_norm_ref(F.linear(h, lw), h, w, b, dropped_positions(h.shape),
                                                               P), 2)


@pytest.mark.parametrize("mode", ["eager", "compile"])
@pytest.mark.parametrize("name", ["layer_norm", "rms_norm", "bias_gelu", "dropout_add_layer_norm"])
def test_bf16_activation_with_float32_parameters_under_autocast(name, mode):
    op_block, torch_block, params = _linear_then(name)
    inputs = (randn(4, 3, N, seed=1, shift=0.3, requires_grad=True), randn(N, N, seed=2, scale=0.4, requires_grad=True),
              *(randn(N, seed=3 + i, shift=1.0 - i, requires_grad=True) for i in range(params)))
    if mode == "compile":
        torch._dynamo.reset()
        op_block = torch.compile(op_block, fullgraph=True, backend="aot_eager")
    out, grads = forward_backward(op_block, inputs, (), True)
    torch_out, _ = forward_backward(torch_block, inputs, (), True)
    assert out.dtype == torch_out.dtype, f"{name}: {out.dtype}, torch gives {torch_out.dtype}"
    assert all(g.dtype == torch.float32 for g in grads)
    to64 = [t.detach().double().requires_grad_() for t in inputs]
    torch.manual_seed(SEED)
    out_ref = torch_block(*to64)
    grads_ref = torch.autograd.grad(out_ref, to64, upstream(out).double())
    compare(out, grads, out_ref, grads_ref, torch.bfloat16, f"{name} {mode}")


# --- no recompiles across batch sizes ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(CASES))
def test_batch_sizes_8_16_24_compile_twice_and_never_break(name):
    """Inductor, as users compile: 8 compiles, 16 recompiles once with a dynamic batch, 24 reuses that graph."""
    case = CASES[name]
    torch._dynamo.reset()
    counters.clear()
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(case.op, fullgraph=True, backend=counter)
    frames = []
    # fallback_random: inductor draws dropout's seed from torch's generator, as eager does, so it is known.
    with torch._inductor.config.patch(fallback_random=True):
        for batch in (8, 16, 24):
            grad_inputs, other_inputs = case.make(batch, torch.float32)
            out, grads = forward_backward(compiled, grad_inputs, other_inputs, False)
            frames.append(counter.frame_count)
            out_ref, grads_ref = float64_reference(case, grad_inputs, other_inputs, upstream(out), False)
            compare(out, grads, out_ref, grads_ref, torch.float32, f"{name} inductor batch {batch}")
    assert frames == [1, 2, 2], f"{name}: compiles after batch 8, 16, 24: {frames}"
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 2


@pytest.mark.parametrize("mode", ["eager", "compile"])
def test_linear_cross_entropy_keeps_float64_under_autocast_as_f_linear_does(mode):
    """Autocast never casts float64 (torch's eligibility rule); the op's cast rule follows it."""
    (hidden, weight, bias), (target,) = _lce_inputs(3, torch.float64)
    fn = _linear_cross_entropy
    if mode == "compile":
        torch._dynamo.reset()
        fn = torch.compile(fn, fullgraph=True, backend="aot_eager")
    out, grads = forward_backward(fn, (hidden, weight, bias), (target,), True)
    with torch.no_grad(), autocast(True):
        assert out.dtype == _linear_cross_entropy_ref(hidden, weight, bias, target).dtype == torch.float64
    out_ref, grads_ref = float64_reference(CASES["linear_cross_entropy"], (hidden, weight, bias), (target,),
                                           upstream(out), False)
    compare(out, grads, out_ref, grads_ref, torch.float64, f"float64 under autocast, {mode}")


def _permuted(t: torch.Tensor) -> torch.Tensor:
    """The same values, dense but with the feature dimension outermost in memory (a transposed activation)."""
    return t.detach().permute(2, 0, 1).contiguous().permute(1, 2, 0).requires_grad_(t.requires_grad)


@pytest.mark.parametrize("name", ["layer_norm", "rms_norm", "bias_gelu", "dropout_add_layer_norm", "dropout"])
def test_inductor_takes_a_permuted_input(name):
    """The fakes give the layout the kernels write (contiguous): inductor checks the strides the fake announced, and
    a fake that kept a permuted input's strides (empty_like) failed its assertion on the real output."""
    case = CASES[name]
    grad_inputs, other_inputs = case.make(4, torch.float32)
    x = _permuted(grad_inputs[0])
    assert not x.is_contiguous() and x.stride(-1) != 1
    grad_inputs = (x, *grad_inputs[1:])
    torch._dynamo.reset()
    compiled = torch.compile(case.op, fullgraph=True, backend="inductor")
    with torch._inductor.config.patch(fallback_random=True):
        out, grads = forward_backward(compiled, grad_inputs, other_inputs, False)
    out_ref, grads_ref = float64_reference(case, grad_inputs, other_inputs, upstream(out), False)
    compare(out, grads, out_ref, grads_ref, torch.float32, f"{name} inductor, permuted input")
