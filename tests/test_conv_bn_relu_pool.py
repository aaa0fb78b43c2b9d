"""Conv -> BatchNorm -> ReLU -> MaxPool epilogue: backends vs torch, compile, opcheck, errors, nn, patching."""

import copy
from contextlib import contextmanager

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from op_testing import OpLog, assert_close, randn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode
from torch.utils.module_tracker import ModuleTracker

from hetrain import plugins
from hetrain.callbacks.churn import ModuleRanges
from hetrain.callbacks.module_memory import ModuleMemory
from hetrain.callbacks.throughput import TrainingFlopCounter
from hetrain.nn.conv_bn_relu_pool import ConvBNReLUPool2d, ConvReLUPool2d
from hetrain.nn.patch_sequences import FusedSequential, swap_sequences
from hetrain.ops.conv_bn_relu_pool import (
    bn_relu_pool,
    bn_relu_pool_ref,
    conv_bn_relu_pool,
    conv_relu_pool,
    relu_pool,
    relu_pool_ref,
)

BACKENDS = ["cpu", "torch"]
# (x shape, (kernel, stride, padding)): odd sizes and channel counts, the ResNet stem pool, overlapping windows.
CASES = [((2, 3, 7, 9), (2, 2, 0)), ((1, 5, 13, 13), (3, 2, 1)), ((3, 4, 6, 5), (3, 1, 1)), ((2, 5, 9, 7), (2, 1, 0))]


def layout(x, channels_last):
    x = x.detach().contiguous(memory_format=torch.channels_last) if channels_last else x.detach().contiguous()
    return x.requires_grad_()


def bn_params(c, dtype=torch.float32, seed=10):
    w = randn(c, dtype=dtype, seed=seed, shift=1.0, requires_grad=True)
    b = randn(c, dtype=dtype, seed=seed + 1, requires_grad=True)
    rm = randn(c, dtype=dtype, seed=seed + 2, scale=0.3)
    rv = randn(c, dtype=dtype, seed=seed + 3).abs() + 0.5
    return w, b, rm, rv


def grads_of(y, inputs, dy):
    return torch.autograd.grad(y, inputs, dy)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(("shape", "pool"), CASES)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("channels_last", [False, True])
def test_epilogue_matches_float64_reference(backend, dtype, shape, pool, training, channels_last):
    k, s, p = pool
    x = layout(randn(*shape, dtype=dtype, seed=1, scale=2.0, shift=0.5), channels_last)
    w, b, rm, rv = bn_params(shape[1], dtype)
    # Copies: for float64 inputs .double() would return the same buffers, and the check below compare them with
    # themselves.
    rm_ref, rv_ref = rm.to(torch.float64, copy=True), rv.to(torch.float64, copy=True)
    with plugins.use_backend(bn_relu_pool=backend):
        y = bn_relu_pool(x, w, b, rm, rv, training, 0.1, 1e-5, k, s, p)
        dy = randn(*y.shape, dtype=dtype, seed=7)
        grads = grads_of(y, (x, w, b), dy)
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w, b))
    y_ref = bn_relu_pool_ref(x64, w64, b64, rm_ref, rv_ref, training, 0.1, 1e-5, k, s, p)
    grads_ref = grads_of(y_ref, (x64, w64, b64), dy.double())
    assert y.dtype == dtype and y.shape == y_ref.shape
    assert y.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    assert_close(y, y_ref, dtype, "y")
    assert_close(rm, rm_ref, dtype, "running_mean")
    assert_close(rv, rv_ref, dtype, "running_var")
    assert training != torch.equal(rm, bn_params(shape[1], dtype)[2])  # training moved the running mean
    for name, g, g_ref in zip(("dx", "dweight", "dbias"), grads, grads_ref, strict=True):
        scale = g_ref.abs().max().item() or 1.0  # sums over the batch: relative to their largest entry
        assert_close(g / scale, g_ref / scale, dtype, f"{backend} {name}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("channels_last", [False, True])
def test_bfloat16_matches_torch_in_bfloat16(backend, channels_last):
    # Same dtype on both sides, so both round the normalised values alike and break ties alike.
    x = layout(randn(2, 5, 9, 11, dtype=torch.bfloat16, seed=3, scale=2.0, shift=0.3), channels_last)
    w, b, rm, rv = bn_params(5, torch.float32)
    rm_ref, rv_ref = rm.clone(), rv.clone()
    with plugins.use_backend(bn_relu_pool=backend):
        y = bn_relu_pool(x, w, b, rm, rv, True, 0.1, 1e-5, 3, 2, 1)
    dy = randn(*y.shape, dtype=torch.bfloat16, seed=4)
    grads = grads_of(y, (x, w, b), dy)
    y_ref = bn_relu_pool_ref(x, w, b, rm_ref, rv_ref, True, 0.1, 1e-5, 3, 2, 1)
    grads_ref = grads_of(y_ref, (x, w, b), dy)
    assert y.dtype == torch.bfloat16 and grads[1].dtype == torch.float32
    assert_close(y, y_ref, torch.bfloat16, "y")
    assert_close(rm, rm_ref, torch.float32, "running_mean")
    assert_close(rv, rv_ref, torch.float32, "running_var")
    for name, g, g_ref in zip(("dx", "dweight", "dbias"), grads, grads_ref, strict=True):
        scale = max(1.0, g_ref.abs().max().item())
        assert_close(g / scale, g_ref / scale, torch.bfloat16, name)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("channels_last", [False, True])
def test_whole_block_gradients_match_torch(dtype, channels_last):
    x = layout(randn(2, 3, 12, 11, dtype=dtype, seed=5), channels_last)
    cw = randn(6, 3, 3, 3, dtype=dtype, seed=6, scale=0.3, requires_grad=True)
    cb = randn(6, dtype=dtype, seed=7, requires_grad=True)
    w, b, rm, rv = bn_params(6, dtype)
    rm_ref, rv_ref = rm.clone(), rv.clone()
    y = conv_bn_relu_pool(x, cw, cb, w, b, rm, rv, True, conv_padding=1, kernel_size=3, stride=2, padding=1)
    dy = randn(*y.shape, dtype=dtype, seed=8)
    grads = grads_of(y, (x, cw, cb, w, b), dy)
    conv = F.conv2d(x, cw, cb, padding=1)
    y_ref = bn_relu_pool_ref(conv, w, b, rm_ref, rv_ref, True, 0.1, 1e-5, 3, 2, 1)
    grads_ref = grads_of(y_ref, (x, cw, cb, w, b), dy)
    assert_close(y, y_ref, dtype, "y")
    for name, g, g_ref in zip(("dinput", "dconv_w", "dconv_b", "dbn_w", "dbn_b"), grads, grads_ref, strict=True):
        scale = max(1.0, g_ref.abs().max().item())
        assert_close(g / scale, g_ref / scale, dtype, name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [True, False])
def test_ties_route_the_gradient_as_torch_does(backend, training):
    # Small integers: many equal values per window, positive and zero, so argmax tie-breaking shows.
    g = torch.Generator().manual_seed(11)
    x = torch.randint(-2, 3, (2, 3, 8, 8), generator=g).double().requires_grad_()
    w, b = torch.ones(3, dtype=torch.float64, requires_grad=True), torch.zeros(3, dtype=torch.float64,
                                                                               requires_grad=True)
    rm, rv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    dy = randn(2, 3, 4, 4, dtype=torch.float64, seed=12)
    with plugins.use_backend(bn_relu_pool=backend):
        grads = grads_of(bn_relu_pool(x, w, b, rm.clone(), rv.clone(), training, 0.1, 1e-5, 2), (x, w, b), dy)
    grads_ref = grads_of(bn_relu_pool_ref(x, w, b, rm.clone(), rv.clone(), training, 0.1, 1e-5, 2), (x, w, b), dy)
    for g_ours, g_ref in zip(grads, grads_ref, strict=True):
        assert_close(g_ours, g_ref, torch.float64, "grad with ties")


@pytest.mark.parametrize("backend", BACKENDS)
def test_relu_pool_and_conv_relu_pool(backend):
    x = randn(2, 5, 13, 13, seed=1, requires_grad=True)
    cw = randn(4, 5, 3, 3, seed=2, scale=0.3, requires_grad=True)
    with plugins.use_backend(bn_relu_pool=backend):
        y = relu_pool(x, 3, 2, 1)
        z = conv_relu_pool(x, cw, None, conv_padding=1, kernel_size=2)
    assert_close(y, relu_pool_ref(x, 3, 2, 1), torch.float32, "relu_pool")
    dy = randn(*y.shape, seed=3)
    assert_close(grads_of(y, x, dy)[0], grads_of(relu_pool_ref(x, 3, 2, 1), x, dy)[0], torch.float32, "dx")
    z_ref = relu_pool_ref(F.conv2d(x, cw, padding=1), 2)
    dz = randn(*z.shape, seed=4)
    for g, g_ref in zip(grads_of(z, (x, cw), dz), grads_of(z_ref, (x, cw), dz), strict=True):
        assert_close(g, g_ref, torch.float32, "conv_relu_pool grad")


@pytest.mark.parametrize("backend", BACKENDS)
def test_conv_relu_pool_takes_an_unbatched_sample_and_runs_per_sample_under_vmap(backend):
    """F.conv2d takes (C, H, W), and torch.vmap hands each sample over as such; conv_relu_pool refused it,
    naming relu_pool and the convolution output's shape."""
    x = randn(3, 2, 7, 9, seed=1)
    cw, cb = randn(4, 2, 3, 3, seed=2, scale=0.3, requires_grad=True), randn(4, seed=3, requires_grad=True)

    def ours(z):
        return conv_relu_pool(z, cw, cb, conv_padding=1, kernel_size=3, stride=2, padding=1)

    def ref(z):
        return F.max_pool2d(F.relu(F.conv2d(z, cw, cb, padding=1)), 3, 2, 1)

    with plugins.use_backend(bn_relu_pool=backend):
        # One unbatched sample, then every sample under vmap.
        for fn, ref_fn, inp in ((ours, ref, x[0]), (torch.vmap(ours), torch.vmap(ref), x)):
            inp = inp.detach().requires_grad_()
            y, y_ref = fn(inp), ref_fn(inp)
            assert y.shape == y_ref.shape
            assert_close(y, y_ref, torch.float32, "unbatched conv_relu_pool")
            dy = randn(*y.shape, seed=4)
            for g, g_ref in zip(grads_of(y, (inp, cw, cb), dy), grads_of(y_ref, (inp, cw, cb), dy), strict=True):
                assert_close(g, g_ref, torch.float32, "unbatched conv_relu_pool grad")


@pytest.mark.parametrize("backend", BACKENDS)
def test_conv_relu_pool_runs_under_vmap_over_a_channels_last_batch_and_over_weights(backend):
    """The torch backend asked a batched tensor for its channels_last layout, which functorch cannot answer."""
    x = randn(3, 2, 7, 9, seed=1).contiguous(memory_format=torch.channels_last)
    ws, cb = randn(2, 4, 2, 3, 3, seed=2, scale=0.3), randn(4, seed=3)
    with plugins.use_backend(bn_relu_pool=backend):
        per_sample = torch.vmap(lambda z: conv_relu_pool(z, ws[0], cb))(x)
        per_weight = torch.vmap(lambda w: conv_relu_pool(x, w, cb))(ws)
    assert_close(per_sample, F.max_pool2d(F.relu(F.conv2d(x, ws[0], cb)), 2), torch.float32, "vmap channels_last")
    for w, y in zip(ws, per_weight, strict=True):
        assert_close(y, F.max_pool2d(F.relu(F.conv2d(x, w, cb)), 2), torch.float32, "vmap over weights")


def test_conv_bn_relu_pool_refuses_an_unbatched_sample_naming_itself_and_the_input():
    """torch's BatchNorm2d refuses (C, H, W); the refusal named relu_pool's callee and the convolution output."""
    w, b, rm, rv = (t.detach() for t in bn_params(4))
    with pytest.raises(ValueError, match=r"hetrain.ops.conv_bn_relu_pool: x must be a 4-D .* got shape \(2, 7, 9\)"):
        conv_bn_relu_pool(randn(2, 7, 9), randn(4, 2, 3, 3), None, w, b, rm, rv, True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("channels_last", [False, True])
def test_inf_and_nan_inputs_give_what_torch_gives(backend, training, channels_last):
    # Training: a channel with a NaN or an inf has NaN statistics, running ones included (a NaN variance was
    # clamped to 0). Fixed statistics: an inf input's gradient is finite, as in torch (it was 0 * inf = NaN).
    x = randn(2, 3, 7, 9, seed=1, shift=0.2)
    x[0, 0, 1, 1], x[1, 1, 2, 2], x[1, 2, 0, 0] = float("nan"), float("inf"), float("-inf")
    if training:
        x[1, 2, 0, 0] = 0.5  # leaves one channel finite, whose numbers must stay right
    x = layout(x, channels_last)
    w, b, rm, rv = bn_params(3)
    dy = randn(2, 3, 3, 4, seed=3)
    with plugins.use_backend(bn_relu_pool=backend):
        stats = rm.clone(), rv.clone()
        y = bn_relu_pool(x, w, b, *stats, training, 0.1, 1e-5, 2)
        grads = grads_of(y, (x, w, b), dy)
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w, b))
    stats64 = rm.double(), rv.double()
    y64 = F.max_pool2d(F.relu(F.batch_norm(x64, *stats64, w64, b64, training, 0.1, 1e-5)), 2)
    grads64 = grads_of(y64, (x64, w64, b64), dy.double())
    for name, got, want in zip(("y", "dx", "dw", "db", "running_mean", "running_var"), (y, *grads, *stats),
                               (y64, *grads64, *stats64), strict=True):
        finite = want.isfinite()  # non-finite where torch's is (inf or NaN alike), the same numbers elsewhere
        if name in ("dw", "db") and not training:
            # torch sums dz * xhat over every position, 0 * inf = NaN where the gradient does not reach an inf;
            # the fused kernel sums over the positions the gradient reaches.
            finite = finite | got.isfinite()
            want = torch.where(want.isfinite(), want, got.double())
        assert torch.equal(got.isfinite(), finite), f"{name}: finite at {got.isfinite()} where torch has {finite}"
        assert_close(got[finite], want[finite], torch.float32, name)
    if not training:
        assert grads[0].isfinite().all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_input_and_batch_of_one(backend):
    wide = randn(1, 4, 9, 22, dtype=torch.float64, seed=2, shift=0.2)
    x = wide[..., ::2].requires_grad_()  # (1, 4, 9, 11), neither NCHW- nor channels_last-contiguous
    assert not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)
    w, b, rm, rv = bn_params(4, torch.float64)
    with plugins.use_backend(bn_relu_pool=backend):
        y = bn_relu_pool(x, w, b, rm.clone(), rv.clone(), True, 0.1, 1e-5, 2)
        dy = randn(*y.shape, dtype=torch.float64, seed=3).transpose(2, 3).contiguous().transpose(2, 3)
        grads = grads_of(y, (x, w, b), dy)
    y_ref = bn_relu_pool_ref(x, w, b, rm.clone(), rv.clone(), True, 0.1, 1e-5, 2)
    grads_ref = grads_of(y_ref, (x, w, b), dy)
    assert_close(y, y_ref, torch.float64, "y")
    for g, g_ref in zip(grads, grads_ref, strict=True):
        assert_close(g, g_ref, torch.float64, "grad")


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_size_batch(backend):
    x = torch.empty(0, 3, 8, 8, requires_grad=True)
    w, b, rm, rv = bn_params(3)
    rm0, rv0 = rm.clone(), rv.clone()
    with plugins.use_backend(bn_relu_pool=backend):
        y = bn_relu_pool(x, w, b, rm, rv, True, 0.1, 1e-5, 2)
        dx, dw, db = grads_of(y, (x, w, b), torch.empty(0, 3, 4, 4))
    assert y.shape == (0, 3, 4, 4) and dx.shape == x.shape
    assert torch.equal(dw, torch.zeros(3)) and torch.equal(db, torch.zeros(3))
    assert torch.equal(rm, rm0) and torch.equal(rv, rv0)  # as torch: no update from an empty batch


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [True, False])
def test_gradcheck(backend, training):
    x = randn(2, 3, 5, 6, dtype=torch.float64, seed=8, shift=0.3, requires_grad=True)
    w, b, rm, rv = bn_params(3, torch.float64)

    def fn(x, w, b):
        return bn_relu_pool(x, w, b, rm.clone(), rv.clone(), training, 0.1, 1e-5, 3, 2, 1)

    with plugins.use_backend(bn_relu_pool=backend):
        assert torch.autograd.gradcheck(fn, (x, w, b))
        assert torch.autograd.gradcheck(lambda x: relu_pool(x, 2, 1), (x,))


def test_custom_ops_pass_opcheck():
    x = randn(2, 4, 7, 6, seed=1, shift=0.5)
    xl = x.contiguous(memory_format=torch.channels_last)
    w, b, rm, rv = (t.detach() for t in bn_params(4))
    for inp in (x, xl):
        torch.library.opcheck(torch.ops.hetrain.bn_stats.default, (inp, rm.clone(), rv.clone(), 0.1, 1e-5))
        torch.library.opcheck(torch.ops.hetrain.bn_stats.default, (inp, None, None, 0.1, 1e-5))
        mean, invstd = torch.ops.hetrain.bn_stats(inp, None, None, 0.1, 1e-5)
        args = (inp.clone().requires_grad_(), mean, invstd, w.clone().requires_grad_(), b, True, [3, 3], [2, 2], [1, 1])
        torch.library.opcheck(torch.ops.hetrain.bn_relu_pool_fwd.default, args)
        torch.library.opcheck(torch.ops.hetrain.bn_relu_pool_fwd.default,
                              (inp, None, None, None, None, False, [2, 2], [2, 2], [0, 0]))
        y, arg = torch.ops.hetrain.bn_relu_pool_fwd(inp, mean, invstd, w, b, True, [3, 3], [2, 2], [1, 1])
        torch.library.opcheck(torch.ops.hetrain.bn_relu_pool_bwd.default,
                              (randn(*y.shape, seed=2), arg, inp, mean, invstd, w, b, True, [3, 3], [2, 2], [1, 1]))


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_torch_compile_fullgraph_updates_running_stats(backend):
    torch._dynamo.reset()
    torch.manual_seed(0)
    block = ConvBNReLUPool2d(3, 4, 3, padding=1, pool_kernel_size=3, pool_stride=2, pool_padding=1)
    eager = copy.deepcopy(block)
    x = randn(2, 3, 9, 9, seed=1, requires_grad=True)
    with plugins.use_backend(bn_relu_pool=backend):
        compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
        y = compiled(x)
        grads = grads_of(y.sum(), (x, block[0].weight, block[1].weight), None)
    y_ref = bn_relu_pool_ref(eager[0](x), eager[1].weight, eager[1].bias, eager[1].running_mean,
                             eager[1].running_var, True, 0.1, 1e-5, 3, 2, 1)
    grads_ref = grads_of(y_ref.sum(), (x, eager[0].weight, eager[1].weight), None)
    assert_close(y, y_ref, torch.float32, "compiled y")
    assert_close(block[1].running_mean, eager[1].running_mean, torch.float32, "compiled running_mean")
    assert_close(block[1].running_var, eager[1].running_var, torch.float32, "compiled running_var")
    assert int(block[1].num_batches_tracked) == 1
    for g, g_ref in zip(grads, grads_ref, strict=True):
        assert_close(g, g_ref, torch.float32, "compiled grad")


def test_bad_inputs_raise_clear_errors():
    x = randn(2, 4, 6, 6)
    w, b, rm, rv = (t.detach() for t in bn_params(4))
    with pytest.raises(ValueError, match=r"weight must have shape \(4,\)"):
        bn_relu_pool(x, randn(3), b, rm, rv, True)
    with pytest.raises(ValueError, match=r"running_var must have shape \(4,\)"):
        bn_relu_pool(x, w, b, rm, randn(5).abs(), False)
    with pytest.raises(ValueError, match="larger than the padded input"):
        bn_relu_pool(x, w, b, rm, rv, True, kernel_size=7)
    with pytest.raises(ValueError, match="at most half the kernel"):
        relu_pool(x, 2, 2, 2)
    with pytest.raises(ValueError, match="more than 256 positions"):
        relu_pool(randn(1, 1, 20, 20), 17)
    with pytest.raises(ValueError, match="4-D"):
        relu_pool(randn(4, 6, 6))
    for kernel in ((2, 2, 5), 2.0, (), True):  # (2, 2, 5) used its first two; the others raised torch's errors
        with pytest.raises(ValueError, match=r"kernel_size must be an integer or one or two of them \(height, width\)"):
            relu_pool(x, kernel)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        bn_relu_pool(randn(1, 4, 1, 1), w, b, rm, rv, True, kernel_size=1)
    with pytest.raises(ValueError, match="eps must be positive"):
        bn_relu_pool(x, w, b, rm, rv, True, eps=0.0)
    with pytest.raises(ValueError, match=r"momentum must be a number, got None; .* 1 / num_batches_tracked"):
        bn_relu_pool(x, w, b, rm, rv, True, momentum=None)
    with pytest.raises(ValueError, match="running_mean and running_var; none given"):
        bn_relu_pool(x, w, b, None, None, False)
    with pytest.raises(RuntimeError, match="mean must be Float for Float inputs"):
        torch.ops.hetrain_C.bn_relu_pool_fwd(x, rm.double(), rv, None, None, [2, 2], [2, 2], [0, 0])
    with pytest.raises(RuntimeError, match=r"mean must have shape \(4,\)"):
        torch.ops.hetrain_C.bn_relu_pool_fwd(x, randn(3), randn(3), None, None, [2, 2], [2, 2], [0, 0])
    with pytest.raises(RuntimeError, match="larger than the padded input"):
        torch.ops.hetrain_C.bn_relu_pool_fwd(x, None, None, None, None, [7, 7], [1, 1], [0, 0])
    with pytest.raises(RuntimeError, match="argmax must be uint8"):
        torch.ops.hetrain_C.bn_relu_pool_bwd(randn(2, 4, 3, 3), torch.zeros(2, 4, 3, 3), x, None, None, None, None,
                                             False, [2, 2], [2, 2], [0, 0])
    with pytest.raises(RuntimeError, match="more than 1 value per channel"):
        torch.ops.hetrain_C.bn_stats(randn(1, 4, 1, 1), None, None, 0.1, 1e-5)



def test_numpy_numbers_are_taken_as_torch_takes_them():
    """``momentum=np.float32(0.1)`` and ``kernel_size=np.int64(3)`` were refused, though torch's modules take them."""
    x = randn(2, 4, 9, 9, seed=5)
    w, b, rm, rv = (t.detach() for t in bn_params(4))
    rm_np, rv_np = rm.clone(), rv.clone()
    want = bn_relu_pool(x, w, b, rm, rv, True, 0.1, 1e-5, 3, 2, 1)
    torch.testing.assert_close(bn_relu_pool(x, w, b, rm_np, rv_np, True, np.float32(0.1), np.float64(1e-5), 3, 2, 1),
                               want)
    torch.testing.assert_close(rm_np, rm)
    torch.testing.assert_close(rv_np, rv)
    got = bn_relu_pool(x, w, b, None, None, True, 0.1, 1e-5, np.int64(3), (np.int64(2), np.int32(2)), [np.int64(1)])
    torch.testing.assert_close(got, bn_relu_pool(x, w, b, None, None, True, 0.1, 1e-5, 3, 2, 1))
    torch.testing.assert_close(relu_pool(x, np.int64(2), np.int64(1)), relu_pool(x, 2, 1))


BN = "bn_relu_pool: "


@pytest.mark.parametrize("empty", [(), []], ids=["tuple", "list"])
def test_an_empty_stride_is_the_kernel_as_f_max_pool2d_takes_it(empty):
    """``stride=()`` was refused ("must be an integer or one or two of them") where torch pools with the kernel."""
    x = randn(2, 4, 9, 9, seed=5)
    w, b, rm, rv = (t.detach() for t in bn_params(4))
    torch.testing.assert_close(bn_relu_pool(x, w, b, rm, rv, False, 0.1, 1e-5, 3, empty),
                               bn_relu_pool(x, w, b, rm, rv, False, 0.1, 1e-5, 3, None))
    torch.testing.assert_close(relu_pool(x, 2, empty), F.max_pool2d(F.relu(x), 2, empty))


@pytest.mark.parametrize("stride", [(), torch.tensor(2)], ids=["empty tuple", "0-d tensor"])
def test_a_swapped_block_takes_any_pool_stride_torch_takes(stride):
    """A MaxPool2d(2, stride=()) block was fused and then raised on its first call, where torch's Sequential runs;
    a stride the kernels cannot read (a 0-d tensor, which torch takes) now leaves the block to torch."""
    torch.manual_seed(0)
    nn = torch.nn
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2, stride=stride))
    original = copy.deepcopy(model)
    fused = swap_sequences(model)
    assert (fused != {}) == isinstance(stride, tuple)
    x = randn(2, 3, 8, 8, seed=1)
    torch.testing.assert_close(model(x), original(x))
    torch.testing.assert_close(model[1].running_var, original[1].running_var)


def test_training_under_vmap_is_refused_naming_the_op_and_its_reference():
    """Its statistics kernel writes the running statistics in place: vmap's batching fallback failed on it with
    "Batching rule not implemented for hetrain::bn_stats", with or without torch.func.grad. Eval mode runs."""
    xs = randn(3, 2, 4, 6, 6, dtype=torch.float64, seed=5)
    w, b, rm, rv = (t.detach().double() for t in bn_params(4))

    def loss(v, x, training):
        return bn_relu_pool(x, v, b, rm.clone(), rv.clone(), training).sin().sum()

    said = BN + (r"training \(batch statistics\) on a tensor torch.vmap batches is not supported.* "
                 "Use hetrain.ops.bn_relu_pool_ref")
    with pytest.raises(RuntimeError, match="hetrain.ops." + said):
        torch.vmap(lambda x: loss(w, x, True))(xs)
    with pytest.raises(RuntimeError, match="hetrain.ops." + said):
        torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, None))(w, xs, True)
    per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, None))(w, xs, False)
    for k in range(len(xs)):
        v = w.clone().requires_grad_()
        torch.testing.assert_close(per_sample[k], torch.autograd.grad(loss(v, xs[k], False), v)[0])


@pytest.mark.parametrize(("call", "message"), [
    (lambda x, rm, rv: relu_pool(None),
     r"relu_pool: x must be a 4-D \(N, C, H, W\) floating tensor, got NoneType; torch.as_tensor\(x\) converts one"),
    (lambda x, rm, rv: bn_relu_pool(x.tolist(), None, None, rm, rv, True), BN + "x must be a 4-D .* got list"),
    (lambda x, rm, rv: conv_bn_relu_pool(None, torch.ones(4, 4, 1, 1), None, None, None, rm, rv, True),
     "conv_bn_relu_pool: x must be a 4-D .* got NoneType"),
    (lambda x, rm, rv: conv_relu_pool(x[0].tolist(), torch.ones(4, 4, 1, 1)),
     r"conv_relu_pool: x must be a 4-D \(N, C, H, W\) or 3-D unbatched \(C, H, W\) floating tensor, got list"),
    (lambda x, rm, rv: bn_relu_pool(x, 1.0, None, rm, rv, True),
     BN + r"weight must be a torch.Tensor of shape \(4,\), got float; torch.as_tensor\(weight\) converts one"),
    (lambda x, rm, rv: bn_relu_pool(x, None, [0.0] * 4, rm, rv, True), BN + "bias must be a torch.Tensor .* got list"),
    (lambda x, rm, rv: bn_relu_pool(x, None, None, rm, rv.tolist(), False),
     BN + "running_var must be a torch.Tensor .* got list"),
    (lambda x, rm, rv: bn_relu_pool(x, None, None, rm, rv, True, eps="a"),
     BN + "eps must be a finite number >= 0, got 'a'"),
    (lambda x, rm, rv: bn_relu_pool(x, None, None, rm, rv, False, eps="a"),
     BN + "eps must be a finite number >= 0, got 'a'"),
    (lambda x, rm, rv: bn_relu_pool(x, None, None, rm, rv, False, eps=-1.0),
     BN + "eps must be a finite number >= 0, got -1.0"),
    (lambda x, rm, rv: bn_relu_pool(x, None, None, rm, rv, True, "0.1"), BN + "momentum must be a number, got '0.1'$"),
    (lambda x, rm, rv: bn_relu_pool(x, None, None, rm, rv, True, True), BN + "momentum must be a number, got True$"),
    (lambda x, rm, rv: bn_relu_pool(x, None, None, rm, rv, True, torch.tensor(0.1)),
     BN + r"momentum must be a Python number, got a tensor; pass float\(momentum\)"),
    (lambda x, rm, rv: relu_pool(x, torch.tensor(2)),
     r"relu_pool: kernel_size must be Python integers, got a tensor; pass kernel_size.tolist\(\)"),
    (lambda x, rm, rv: relu_pool(x, 2, np.float64(2.0)), "relu_pool: stride must be an integer or one or two of them"),
    (lambda x, rm, rv: relu_pool(x, (2, np.True_)), "relu_pool: kernel_size must be an integer or one or two of them"),
])
def test_arguments_of_the_wrong_type_are_refused_naming_the_op_and_the_argument(call, message):
    """A None or a list read as a tensor was a raw AttributeError; eps="a" a TypeError from deep inside."""
    _, _, rm, rv = bn_params(4)
    with pytest.raises(ValueError, match="hetrain.ops." + message):
        call(randn(2, 4, 6, 6), rm, rv)


def test_channels_last_batch_statistics_keep_their_precision_when_the_first_pixel_is_an_outlier():
    # The moments are taken about x[0, c, 0, 0]: NHWC summed blocks of (x - pivot)^2 in float32, and an outlier there
    # made the variance a small difference of large sums (relative error 1.4e-4 here, NCHW's 9e-8).
    x = randn(4, 3, 32, 32, seed=30)
    x[0, :, 0, 0] = 1000.0
    var64, mean64 = torch.var_mean(x.double(), dim=(0, 2, 3), correction=0)
    for memory_format in (torch.contiguous_format, torch.channels_last):
        mean, invstd = torch.ops.hetrain_C.bn_stats(x.contiguous(memory_format=memory_format), None, None, 0.1, 0.0)
        torch.testing.assert_close(invstd.double() ** -2, var64, rtol=1e-6, atol=0,
                                   msg=lambda m, layout=memory_format: f"{layout}: {m}")
        torch.testing.assert_close(mean.double(), mean64, rtol=0, atol=1e-6)


@pytest.mark.parametrize("shape", [(1, 2, 0, 4), (1, 2, 4, 0)])
def test_an_input_without_pixels_is_refused_before_any_backend_runs(shape):
    # With padding the padded input fits the window: the kernel's refusal read as a backend failure (a warning, then
    # torch's unrelated max_pool2d error on the fallback).
    x = torch.randn(shape)
    w, b, rm, rv = (t.detach() for t in bn_params(2))
    with pytest.raises(ValueError, match=r"hetrain.ops.relu_pool: x has no pixels \(shape \(1, 2, [04], [04]\)\)"):
        relu_pool(x, 2, None, 1)
    with pytest.raises(ValueError, match="hetrain.ops.bn_relu_pool: x has no pixels"):
        bn_relu_pool(x, w, b, rm, rv, False, kernel_size=2, padding=1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_integer_or_bool_batchnorm_tensors_are_refused_as_torch_does(backend):
    # They were cast quietly; an int64 running mean kept only the integer part of each update.
    x = randn(2, 3, 4, 4, scale=3.0, shift=5.0)
    w, b, rm, rv = (t.detach() for t in bn_params(3))
    ints = {"weight": torch.tensor([1, 0, 2]), "bias": torch.tensor([True, False, True]),
            "running_mean": torch.zeros(3, dtype=torch.int64), "running_var": torch.ones(3, dtype=torch.int64)}
    for what, bad in ints.items():
        args = dict(weight=w, bias=b, running_mean=rm, running_var=rv) | {what: bad}
        before = bad.clone()
        for training in (True, False):
            with plugins.use_backend(bn_relu_pool=backend), \
                    pytest.raises(ValueError, match=rf"{what} must be a floating tensor, got {bad.dtype}; "
                                                    rf"pass {what}.float\(\)"):
                bn_relu_pool(x, training=training, **args)
        assert torch.equal(bad, before)
    conv_w = randn(3, 3, 1, 1)
    with pytest.raises(ValueError, match="running_mean must be a floating tensor, got torch.int64"):
        conv_bn_relu_pool(x, conv_w, None, w, b, ints["running_mean"], ints["running_var"], True)


def test_reference_gradient_with_channels_last_x_and_a_strided_weight():
    # torch's F.batch_norm eval backward got dx wrong for this pair (off by up to 3 here); the reference is the
    # tests' oracle and the double-backward error points users to it.
    x = randn(2, 3, 6, 4, dtype=torch.float64, seed=1, scale=2.0, shift=0.5)
    _, b, rm, rv = (t.detach() for t in bn_params(3, torch.float64))
    wide = randn(6, dtype=torch.float64, seed=2, shift=1.0, requires_grad=True)
    dy = randn(2, 3, 3, 2, dtype=torch.float64, seed=7)
    x_cl = layout(x, channels_last=True)
    y = bn_relu_pool_ref(x_cl, wide[::2], b, rm, rv, False)
    dx, dwide = grads_of(y, (x_cl, wide), dy)
    x_plain, w_plain = x.clone().requires_grad_(), wide.detach()[::2].contiguous().requires_grad_()
    y_plain = bn_relu_pool_ref(x_plain, w_plain, b, rm, rv, False)
    dx_expected, dw_expected = grads_of(y_plain, (x_plain, w_plain), dy)
    assert_close(y, y_plain, torch.float64, "y")
    assert_close(dx, dx_expected, torch.float64, "dx")
    assert_close(dwide[::2], dw_expected, torch.float64, "dweight")
    assert not dwide[1::2].any()


@pytest.mark.parametrize("channels_last", [False, True])
def test_the_raw_kernels_refuse_what_would_read_or_write_out_of_bounds(channels_last):
    # Each of these crashed the process (heap corruption, SIGSEGV) or returned garbage before.
    C = torch.ops.hetrain_C
    x = layout(randn(2, 4, 6, 6), channels_last).detach()
    y, argmax = C.bn_relu_pool_fwd(x, None, None, None, None, [3, 3], [2, 2], [1, 1])
    dy = randn(*y.shape)
    for bad in (torch.full_like(argmax, 9), torch.zeros_like(argmax)):  # past the window; the padding of (0, 0)
        with pytest.raises(RuntimeError, match="argmax names a position outside its pooling window or the input"):
            C.bn_relu_pool_bwd(dy, bad, x, None, None, None, None, False, [3, 3], [2, 2], [1, 1])
    C.bn_relu_pool_bwd(dy, argmax, x, None, None, None, None, False, [3, 3], [2, 2], [1, 1])  # its own is fine
    with pytest.raises(RuntimeError, match=r"x has no pixels \(shape \[1, 3, 0, 4\]\)"):
        C.bn_relu_pool_fwd(randn(1, 3, 0, 4), None, None, None, None, [2, 2], [1, 1], [1, 1])
    with pytest.raises(RuntimeError, match="padding must be >= 0 and at most half the kernel"):  # 2 * pad wrapped
        C.bn_relu_pool_fwd(x, None, None, None, None, [3, 3], [1, 1], [2**63 - 1, 0])
    with pytest.raises(RuntimeError, match="more than 256 positions"):  # 2^32 x 2^32 wrapped to 0
        C.bn_relu_pool_fwd(x, None, None, None, None, [2**32, 2**32], [1, 1], [0, 0])
    with pytest.raises(RuntimeError, match="batch_stats needs mean and invstd"):  # in forward, not only backward
        C.bn_relu_pool(x, None, None, None, None, True, [2, 2], [2, 2], [0, 0])
    with pytest.raises(ValueError, match="BatchNorm2d has 5 features"):
        ConvBNReLUPool2d.from_modules(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(5), torch.nn.ReLU(),
                                      torch.nn.MaxPool2d(2))


def torch_block(conv_bias=False):
    torch.manual_seed(0)
    seq = torch.nn.Sequential(torch.nn.Conv2d(3, 5, 3, padding=1, bias=conv_bias), torch.nn.BatchNorm2d(5),
                              torch.nn.ReLU(), torch.nn.MaxPool2d(3, 2, 1))
    with torch.no_grad():
        seq[1].weight.normal_()
        seq[1].bias.normal_()
        seq[1].running_mean.normal_()
        seq[1].running_var.uniform_(0.5, 2.0)
    return seq


@pytest.mark.parametrize("momentum", [0.1, None])
def test_module_state_dict_and_modes_match_torch_sequential(momentum):
    ref = torch_block(conv_bias=True)
    ref[1].momentum = momentum
    fused = ConvBNReLUPool2d(3, 5, 3, padding=1, bias=True, momentum=momentum, pool_kernel_size=3, pool_stride=2,
                             pool_padding=1)
    assert fused.state_dict().keys() == ref.state_dict().keys()
    fused.load_state_dict(ref.state_dict())
    x = randn(2, 3, 10, 9, seed=4).contiguous(memory_format=torch.channels_last)
    for _ in range(2):  # two training steps: momentum None is a cumulative average over them
        assert_close(fused(x), ref(x), torch.float32, "train")
    for key, value in ref.state_dict().items():
        assert_close(fused.state_dict()[key], value, torch.float32, key)
    fused.eval()
    ref.eval()
    assert_close(fused(x), ref(x), torch.float32, "eval")
    back = torch_block()
    back[0].bias = torch.nn.Parameter(torch.zeros(5))
    back.load_state_dict(fused.state_dict())  # and into the torch Sequential
    back.eval()
    assert_close(back(x), fused(x), torch.float32, "round trip")
    assert isinstance(fused[1:], torch.nn.Sequential) and not isinstance(fused[1:], ConvBNReLUPool2d)



def test_a_block_built_with_numpy_settings_trains_as_torchs_sequential():
    """torch's modules take NumPy numbers: ConvBNReLUPool2d refused np.int64 pool sizes when built and an np.float32
    momentum on every training forward, and a patched Sequential holding such a BatchNorm2d failed the same way."""
    ref = torch_block()
    ref[1].momentum = np.float32(0.1)
    ref[3] = torch.nn.MaxPool2d(np.int64(3), np.int64(2), np.int64(1))
    fused = ConvBNReLUPool2d(3, 5, 3, padding=1, momentum=np.float32(0.1), pool_kernel_size=np.int64(3),
                             pool_stride=np.int64(2), pool_padding=np.int64(1))
    fused.load_state_dict(ref.state_dict())
    patched = copy.deepcopy(ref)
    swap_sequences(patched)
    assert type(patched) is FusedSequential  # the np.int64 pool settings left it unfused
    x = randn(2, 3, 10, 9, seed=4)
    for _ in range(2):
        want = ref(x)
        with OpLog() as log:
            got = fused(x), patched(x)
        assert log.names.count("hetrain_C.bn_relu_pool_fwd") == 2, log.names
        assert_close(got[0], want, torch.float32, "ConvBNReLUPool2d")
        assert_close(got[1], want, torch.float32, "patched")
    for block in (fused, patched):
        assert_close(block[1].running_var, ref[1].running_var, torch.float32, "running_var")


@pytest.mark.parametrize("block", ["bn", "no_bn"])
def test_hooks_on_a_blocks_children_fire_as_in_the_sequential(block):
    # The fused block claims to be its Sequential: a hook on its BatchNorm (or conv) was never called.
    torch.manual_seed(0)
    fused = ConvBNReLUPool2d(3, 4, 3, padding=1) if block == "bn" else ConvReLUPool2d(3, 4, 3, padding=1)
    plain = torch.nn.Sequential(*copy.deepcopy(list(fused)))
    seen = {"fused": [], "plain": []}
    fused[1].register_forward_hook(lambda _m, _args, out: seen["fused"].append(out.detach().clone()))
    plain[1].register_forward_hook(lambda _m, _args, out: seen["plain"].append(out.detach().clone()))
    x = randn(2, 3, 8, 8, seed=1)
    torch.testing.assert_close(fused(x), plain(x))
    assert len(seen["fused"]) == len(seen["plain"]) == 1
    torch.testing.assert_close(seen["fused"][0], seen["plain"][0])


def _set(i, module):
    return lambda block: block.__setitem__(i, module)


class ScaledBatchNorm(torch.nn.BatchNorm2d):
    """A BatchNorm2d subclass with a forward of its own (as a frozen BatchNorm has): the fused kernel skipped it."""

    def forward(self, x):
        return 2 * super().forward(x)


class AveragingPool(torch.nn.MaxPool2d):
    def forward(self, x):
        return F.avg_pool2d(x, self.kernel_size, self.stride, self.padding)


@pytest.mark.parametrize(("block", "edit", "size"), [
    ("bn", _set(2, torch.nn.LeakyReLU(0.5)), 8),
    ("bn", _set(3, torch.nn.AvgPool2d(2)), 8),
    ("bn", _set(1, torch.nn.Identity()), 8),
    ("no_bn", _set(1, torch.nn.Identity()), 8),
    ("bn", lambda block: block.append(torch.nn.Flatten()), 8),
    ("bn", lambda block: setattr(block[3], "ceil_mode", True), 7),
    ("no_bn", lambda block: setattr(block[2], "dilation", 2), 8),
    ("bn", _set(1, ScaledBatchNorm(4)), 8),
    ("bn", _set(3, AveragingPool(2)), 8),
    ("bn", lambda block: setattr(block[3], "stride", ()), 8),
    ("no_bn", lambda block: setattr(block[2], "stride", torch.tensor(1)), 8),
], ids=["LeakyReLU", "AvgPool2d", "BatchNorm gone", "ReLU gone", "appended", "ceil_mode", "dilation",
        "BatchNorm2d subclass's forward", "MaxPool2d subclass's forward", "empty stride", "tensor stride"])
def test_a_block_whose_children_changed_computes_what_it_now_holds(block, edit, size):
    # The fused forward computed conv -> BN -> ReLU -> MaxPool whatever the children had become (or failed to
    # unpack an appended one): the block is a Sequential, whose children model code may replace or reconfigure.
    torch.manual_seed(0)
    fused = ConvBNReLUPool2d(3, 4, 3, padding=1) if block == "bn" else ConvReLUPool2d(3, 4, 3, padding=1)
    plain = torch.nn.Sequential(*copy.deepcopy(list(fused)))
    for b in (fused, plain):
        edit(b.eval())
    x = randn(2, 3, size, size, seed=1)
    torch.testing.assert_close(fused(x), plain(x))


def test_an_unbatched_image_or_vmap_gets_what_the_blocks_sequential_gives():
    # ConvReLUPool2d handed a (C, H, W) image (one sample under torch.vmap) to relu_pool, which takes 4-D only.
    torch.manual_seed(0)
    fused = ConvReLUPool2d(3, 4, 3, padding=1)
    plain = torch.nn.Sequential(*copy.deepcopy(list(fused)))
    x = randn(2, 3, 6, 6, seed=1)
    torch.testing.assert_close(fused(x[0]), plain(x[0]))
    torch.testing.assert_close(torch.vmap(fused)(x), torch.vmap(plain)(x))
    with pytest.raises(ValueError, match="expected 4D input"):  # torch's own BatchNorm2d refuses it, as unfused
        ConvBNReLUPool2d(3, 4, 3, padding=1)(x[0])


def test_from_modules_shares_parameters_and_buffers():
    seq = torch_block()
    fused = ConvBNReLUPool2d.from_modules(*seq)
    assert fused[0].weight is seq[0].weight and fused[1].running_mean is seq[1].running_mean
    fused(randn(2, 3, 8, 8, seed=1))
    assert int(seq[1].num_batches_tracked) == 1
    untracked = ConvBNReLUPool2d(3, 5, 3, track_running_stats=False, affine=False)
    y = untracked.eval()(randn(2, 3, 8, 8, seed=2))  # no running stats: batch statistics even in eval
    assert_close(y, bn_relu_pool_ref(F.conv2d(randn(2, 3, 8, 8, seed=2), untracked[0].weight, untracked[0].bias),
                                     None, None, None, None, True, 0.1, 1e-5, 2), torch.float32, "untracked")
    relu_block = ConvReLUPool2d.from_modules(seq[0], torch.nn.ReLU(), torch.nn.MaxPool2d(2))
    assert relu_block.state_dict().keys() == {"0.weight"}


def small_cnn():
    torch.manual_seed(0)
    nn = torch.nn
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(3, 2, 1),  # stem
        nn.Sequential(nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)),
        nn.Sequential(nn.Conv2d(6, 6, 1), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2, ceil_mode=True)),  # kept
        nn.Flatten(), nn.Linear(6, 3),
    )
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.normal_()
                m.bias.normal_()
    return model


def test_swap_sequences_keeps_outputs_grads_and_state_dict():
    model = small_cnn()
    original = copy.deepcopy(model)
    report = swap_sequences(model)
    assert set(report) == {"0", "4.0"}
    assert report["0"] == "Conv2d -> BatchNorm2d -> ReLU -> MaxPool2d fused (hetrain.ops.bn_relu_pool)"
    assert report["4.0"] == "Conv2d -> ReLU -> MaxPool2d fused (hetrain.ops.relu_pool)"
    assert type(model) is type(model[4]) is FusedSequential and type(model[5]) is torch.nn.Sequential
    layers = [type(m) for m in model.modules() if not isinstance(m, torch.nn.Sequential)]
    assert layers == [type(m) for m in original.modules() if not isinstance(m, torch.nn.Sequential)]  # torch's own
    assert model.state_dict().keys() == original.state_dict().keys()
    x = randn(2, 3, 9, 9, seed=5).contiguous(memory_format=torch.channels_last)
    for mode in ("train", "eval"):
        getattr(model, mode)()
        getattr(original, mode)()
        with OpLog() as log:
            y = model(x)
        assert log.names.count("hetrain_C.bn_relu_pool_fwd") == 2, log.names  # the stem and the Conv-ReLU-pool
        y_ref = original(x)
        assert_close(y, y_ref, torch.float32, f"{mode} output")
        params = [p for _, p in sorted(model.named_parameters())]
        params_ref = [p for _, p in sorted(original.named_parameters())]
        for g, g_ref in zip(grads_of(y.sum(), params, None), grads_of(y_ref.sum(), params_ref, None), strict=True):
            assert_close(g, g_ref, torch.float32, f"{mode} grad")
    for key, value in original.state_dict().items():
        assert_close(model.state_dict()[key], value, torch.float32, key)
    fresh = small_cnn()
    fresh.load_state_dict(model.state_dict())  # patched -> unpatched
    repatched = small_cnn()
    swap_sequences(repatched)
    repatched.load_state_dict(original.state_dict())  # unpatched -> patched
    repatched.load_state_dict(repatched.state_dict())  # patched -> patched
    assert_close(repatched[1].running_var, original[1].running_var, torch.float32, "loaded running_var")
    assert swap_sequences(model) == {}
    assert swap_sequences(copy.deepcopy(model)) == {} and copy.deepcopy(model).state_dict().keys() == \
        original.state_dict().keys()


def test_an_unbatched_image_gets_what_the_unpatched_model_gives():
    """(C, H, W): the kernels take batches, so those runs go module by module, as torch's modules take it."""
    block, original = (torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2))
                       for _ in range(2))
    original.load_state_dict(block.state_dict())
    assert swap_sequences(block) == {"0": "Conv2d -> ReLU -> MaxPool2d fused (hetrain.ops.relu_pool)"}
    image = randn(3, 8, 8, seed=8)
    with OpLog() as log:
        y = block(image)
    assert "hetrain_C.bn_relu_pool_fwd" not in log.names
    assert_close(y, original(image), torch.float32, "unbatched")
    model = small_cnn()
    swap_sequences(model)
    with pytest.raises(ValueError, match="expected 4D input"):  # torch's own BatchNorm2d refuses it, as unpatched
        model(randn(3, 9, 9, seed=9))


def test_code_that_calls_a_patched_sequentials_children_one_by_one_sees_torchs_modules():
    model, original = small_cnn(), small_cnn()
    swap_sequences(model)
    x = randn(2, 3, 9, 9, seed=7)
    for name, call in {"children one by one": lambda m: m[3](m[2](m[1](m[0](x)))),
                       "a slice": lambda m: m[:4](x),
                       "the conv alone, then the whole": lambda m: m[0](x).sum() + m(x).sum(),
                       "the BatchNorm shared by a direct call": lambda m: m[1](m[0](x)).sum() + m(x).sum()}.items():
        assert_close(call(model), call(original), torch.float32, name)
        assert_close(model[1].running_mean, original[1].running_mean, torch.float32, f"{name}: running_mean")
        assert int(model[1].num_batches_tracked) == int(original[1].num_batches_tracked), name
    model.double()  # replaces the BatchNorm's buffers: the fused run reads the live ones
    original.double()
    assert_close(model(x.double()), original(x.double()), torch.float64, "after .double()")
    seen = []
    model[0].register_forward_hook(lambda _m, _args, out: seen.append(tuple(out.shape)))
    with OpLog() as log:  # a hook added after patching: that run goes module by module, the other stays fused
        y = model(x.double())
    assert seen == [(2, 4, 9, 9)] and log.names.count("hetrain_C.bn_relu_pool_fwd") == 1
    assert_close(y, original(x.double()), torch.float64, "with a hook")
    clone = copy.deepcopy(model)
    assert type(clone) is FusedSequential
    assert_close(clone(x.double()), original(x.double()), torch.float64, "deep copy")


@contextmanager
def _module_memory(model):
    tracker = ModuleMemory(model)
    tracker.start()
    yield
    tracker.stop()


MEASURING = {"Throughput's FLOP counter": lambda model: TrainingFlopCounter(),
             "MemoryProfiler's module hooks": _module_memory,
             "churn's module ranges": ModuleRanges}


@pytest.mark.parametrize("tool", list(MEASURING))
@pytest.mark.parametrize("model", ["ConvBNReLUPool2d", "patched Sequential"])
def test_measuring_a_step_leaves_its_fused_blocks_fused_and_its_numbers_bit_for_bit(tool, model):
    # Their module hooks made the blocks call their torch modules one by one: a measured step (the FLOP-counted
    # first step of every fit, resumed ones too; a memory-profiled one) computed other bits than an unmeasured one.
    if model == "ConvBNReLUPool2d":
        measured = torch.nn.Sequential(ConvBNReLUPool2d.from_modules(*torch_block()), torch.nn.Flatten())
    else:
        measured = small_cnn()
        swap_sequences(measured)
    plain = copy.deepcopy(measured)
    x = randn(2, 3, 9, 9, seed=5)
    y = plain(x)
    y.square().sum().backward()
    with MEASURING[tool](measured), OpLog() as log:
        y_measured = measured(x)
        y_measured.square().sum().backward()
    assert log.names.count("hetrain_C.bn_relu_pool_fwd") == (1 if model == "ConvBNReLUPool2d" else 2), log.names
    assert torch.equal(y_measured, y)
    for p, q in zip(measured.parameters(), plain.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad)


class _ParentsSeen(TorchDispatchMode):
    """The modules a ModuleTracker has entered, at each op that runs."""

    def __init__(self, tracker: ModuleTracker):
        super().__init__()
        self.tracker, self.seen = tracker, set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen |= self.tracker.parents
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("tracker", ["ModuleTracker", "FlopCounterMode"])
def test_a_users_module_tracker_sees_the_children_a_fused_block_calls(tracker):
    # Every ModuleTracker was taken for a measuring hook, so a user's saw the patched Sequential alone. Only the
    # tracker of hetrain's own FLOP counter leaves a block fused; a user's (or a plain FlopCounterMode's) expects
    # the modules it tracks called.
    model = small_cnn()
    swap_sequences(model)
    with ModuleTracker() if tracker == "ModuleTracker" else FlopCounterMode(display=False) as opened:
        with _ParentsSeen(getattr(opened, "mod_tracker", opened)) as watch:
            model(randn(2, 3, 9, 9, seed=5))
    assert {"FusedSequential.1", "FusedSequential.2", "FusedSequential.3"} <= watch.seen, watch.seen


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("shape", "pool"), CASES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_cuda_matches_torch(dtype, shape, pool, channels_last):
    k, s, p = pool
    x = layout(randn(*shape, dtype=dtype, seed=1, scale=2.0, shift=0.5).cuda(), channels_last)
    w, b, rm, rv = (t.detach().cuda().requires_grad_(t.requires_grad) for t in bn_params(shape[1]))
    rm_ref, rv_ref = rm.clone(), rv.clone()
    with plugins.use_backend(bn_relu_pool="cuda"):
        y = bn_relu_pool(x, w, b, rm, rv, True, 0.1, 1e-5, k, s, p)
    dy = randn(*y.shape, dtype=dtype, seed=7).cuda()
    grads = grads_of(y, (x, w, b), dy)
    with plugins.use_backend(bn_relu_pool="torch"):  # same dtype and tie rule, computed by torch
        y_ref = bn_relu_pool(x, w, b, rm_ref, rv_ref, True, 0.1, 1e-5, k, s, p)
    grads_ref = grads_of(y_ref, (x, w, b), dy)
    assert_close(y, y_ref, dtype, "y")
    assert_close(rm, rm_ref, torch.float32, "running_mean")
    for g, g_ref in zip(grads, grads_ref, strict=True):
        scale = max(1.0, g_ref.abs().max().item())
        assert_close(g / scale, g_ref / scale, dtype, "grad")
