"""Bad arguments to the ops' functional faces: one clear error each, the same wording across ops."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hetrain import nn as hnn
from hetrain import ops, plugins

X = torch.randn(3, 8, generator=torch.Generator().manual_seed(0))
W = torch.rand(8, generator=torch.Generator().manual_seed(1)) + 0.5

NORMS = {
    "layer_norm": lambda x, w=None, eps=1e-5: ops.layer_norm(x, w, None, eps),
    "rms_norm": lambda x, w=None, eps=1e-5: ops.rms_norm(x, w, eps),
    "dropout_add_layer_norm": lambda x, w=None, eps=1e-5: ops.dropout_add_layer_norm(x, x, w, None, 0.0, eps),
}


@pytest.mark.parametrize("name", list(NORMS))
@pytest.mark.parametrize("eps", [float("nan"), float("inf"), -1e-5, "1e-5", True])
def test_an_eps_that_is_no_finite_number_is_refused(name, eps):
    """A NaN passed the old ``eps < 0`` check and every output came back NaN."""
    with pytest.raises(ValueError, match=rf"hetrain.ops.{name}: eps must be a finite number >= 0, got"):
        NORMS[name](X, eps=eps)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["layer_norm", "dropout_add_layer_norm"])
def test_an_eps_past_float32s_range_is_refused_where_the_kernels_add_it_in_float32(name, dtype):
    """It became inf there and every row NaN, where F.layer_norm returns the bias."""
    said = rf"hetrain.ops.{name}: eps must be at most 3.4028234663852886e\+38 .* for {dtype} inputs.*got 1e\+39"
    with pytest.raises(ValueError, match=said):
        NORMS[name](X.to(dtype), eps=1e39)
    torch.testing.assert_close(NORMS[name](X.double(), eps=1e39), torch.zeros_like(X.double()))  # float64 takes it


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the Triton interpreter's NumPy warns as eps becomes inf
@pytest.mark.parametrize("backend", ["triton", "cpu", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_takes_an_eps_past_float32s_range_as_torch_does(dtype, backend):
    """Its rstd is then 0, as F.rms_norm's: the output and gradients are torch's, so it is not refused."""
    x, w = X.to(dtype, copy=True).requires_grad_(), W.to(dtype, copy=True).requires_grad_()  # X, W stay as they are
    with plugins.use_backend(rms_norm=backend):
        y = ops.rms_norm(x, w, 1e39)
        grads = torch.autograd.grad(y.sum(), (x, w))
    y_ref = F.rms_norm(x, (8,), w, 1e39)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    for g, g_ref in zip(grads, torch.autograd.grad(y_ref.sum(), (x, w)), strict=True):
        torch.testing.assert_close(g, g_ref, rtol=0, atol=0)


@pytest.mark.parametrize("name", list(NORMS))
def test_a_weight_that_is_no_floating_tensor_is_refused_naming_what_it_is(name):
    with pytest.raises(ValueError, match=r"weight must be a torch.Tensor of shape \(8,\), got ndarray"):
        NORMS[name](X, W.numpy())
    with pytest.raises(ValueError, match="weight must be a floating tensor, got torch.int64"):
        NORMS[name](X, torch.ones(8, dtype=torch.int64))


@pytest.mark.parametrize("name", list(NORMS))
def test_numpy_eps_is_a_number(name):
    torch.testing.assert_close(NORMS[name](X, W, np.float32(1e-3)), NORMS[name](X, W, 1e-3))


def test_bias_gelu_without_a_bias_says_what_to_call_instead():
    with pytest.raises(ValueError, match=r"bias is required \(shape \(8,\)\); without a bias, "
                                         r"torch.nn.functional.gelu\(x\) is the op"):
        ops.bias_gelu(X, None)


@pytest.mark.parametrize("p", [np.float32(0.25), np.float64(0.25)])
def test_dropout_takes_a_numpy_probability_as_torch_does(p):
    torch.manual_seed(3)
    got = ops.dropout(X, p)
    torch.manual_seed(3)
    torch.testing.assert_close(got, ops.dropout(X, 0.25))


@pytest.mark.parametrize("call", [lambda p: ops.dropout(X, p),
                                  lambda p: ops.dropout_add_layer_norm(X, X, None, None, p, training=False)])
def test_a_tensor_probability_is_refused_naming_the_fix(call):
    with pytest.raises(ValueError, match=r"p must be a Python number in \[0, 1\], got a tensor; pass float\(p\)"):
        call(torch.tensor(0.1))
    with pytest.raises(ValueError, match=r"p must be a number in \[0, 1\], got nan"):
        call(float("nan"))


@pytest.mark.parametrize(("make", "message"), [
    (lambda: hnn.LayerNorm.from_torch(torch.nn.Linear(2, 2)), "nn.LayerNorm: needs a torch.nn.LayerNorm, got Linear"),
    (lambda: hnn.RMSNorm.from_torch(torch.nn.LayerNorm(3)), "nn.RMSNorm: needs a torch.nn.RMSNorm, got LayerNorm"),
    (lambda: hnn.BiasGELU.from_linear(torch.nn.LayerNorm(2)), "BiasGELU: needs a torch.nn.Linear, got LayerNorm"),
    (lambda: hnn.LinearCrossEntropyHead.from_linear(torch.nn.Conv1d(2, 2, 1)), "needs a torch.nn.Linear, got Conv1d"),
    (lambda: hnn.DropoutAddLayerNorm.from_layer_norm(torch.nn.Linear(2, 2), 0.1), "needs a torch.nn.LayerNorm"),
    (lambda: hnn.LinearCrossEntropyHead(8, 10, reduction="avg"), "reduction must be 'mean', 'sum' or 'none'"),
    (lambda: hnn.LinearCrossEntropyHead(8, 10, label_smoothing=2.0), r"label_smoothing must be in \[0, 1\]"),
    (lambda: hnn.LinearCrossEntropyHead(8, 0), "vocab must be a size >= 1, got 0"),
    (lambda: hnn.DropoutAddLayerNorm(8, p=None), r"p must be a number in \[0, 1\], got None"),
    (lambda: hnn.DropoutAddLayerNorm(8, eps=float("nan")), "eps must be a finite number >= 0"),
    (lambda: hnn.DropoutAddLayerNorm(-1), "hidden must be a size >= 0, got -1"),
])
def test_modules_refuse_what_they_cannot_be_made_from_when_made(make, message):
    """A wrong module type was read as the right one (garbage or an AttributeError); a bad setting failed only at
    the first forward."""
    with pytest.raises(ValueError, match=message):
        make()
