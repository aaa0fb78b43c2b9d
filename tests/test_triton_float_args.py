"""The float64 Triton norms keep eps and the dropout scale in float64 when launched as on a GPU.

A GPU launch types a Python float argument fp32; the interpreter keeps it a Python float, so it could not show
the rounding. ``gpu_typed_floats`` launches the interpreted kernels with each float argument rounded to fp32,
as the GPU launch types it.
"""

from __future__ import annotations

import inspect
import os
import struct

import pytest
import torch
from op_testing import randn

from hetrain import plugins
from hetrain.ops.dropout_add_layer_norm import dropout_add_layer_norm_ref, keep_mask
from hetrain.ops.layer_norm import layer_norm, layer_norm_ref
from hetrain.ops.rms_norm import rms_norm, rms_norm_ref
from hetrain.ops.rng import stream
from hetrain.ops.triton import dropout_add_layer_norm as daln_kernels

EXACT = {"atol": 1e-12, "rtol": 1e-12}


def _gpu_type(value: object) -> str:
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    return native_specialize_impl(BaseBackend, value, False, False, False)[0]


@pytest.fixture
def gpu_typed_floats(monkeypatch):
    """Interpreted launches see each Python float argument (not constexpr) rounded to fp32, its GPU type."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs TRITON_INTERPRET=1 (set by conftest)")
    from triton.runtime.interpreter import InterpretedFunction

    assert _gpu_type(1e-5) == "fp32"
    run = InterpretedFunction.run

    def as_on_a_gpu(self, *args, grid, warmup, **kwargs):
        annotations = inspect.get_annotations(self.fn)

        def typed(name, value):
            if not isinstance(value, float) or "constexpr" in str(annotations.get(name, "")):
                return value
            return struct.unpack("<f", struct.pack("<f", value))[0]

        args = [typed(name, v) for name, v in zip(self.arg_names, args, strict=False)]
        kwargs = {name: typed(name, v) for name, v in kwargs.items()}
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    monkeypatch.setattr(InterpretedFunction, "run", as_on_a_gpu)


@pytest.mark.parametrize("v", [0.0, -0.0, 5e-324, 1e-50, 1e-5, 1.0 / 0.9, 1e300])
def test_float_arg_is_typed_i64_and_keeps_the_float64_value(v):
    from hetrain.ops.triton.layer_norm import float_arg

    bits = float_arg(v)
    assert _gpu_type(bits) == "i64"  # never i32, so 0 and denormals share the one compilation
    assert -struct.unpack("<d", struct.pack("<q", bits))[0] == v


def test_float64_norms_keep_an_eps_below_fp32s_range(gpu_typed_floats):
    # eps = 1e-50 is 0 in fp32: a constant row (layer_norm) or a zero row (rms_norm) would give 0 / 0.
    const, zeros = torch.ones(2, 8, dtype=torch.float64), torch.zeros(2, 8, dtype=torch.float64)
    w, b = randn(8, dtype=torch.float64, seed=1), randn(8, dtype=torch.float64, seed=2)
    with plugins.use_backend(layer_norm="triton", rms_norm="triton"):
        assert torch.equal(layer_norm(const, w, b, eps=1e-50), b.expand(2, 8))
        assert torch.equal(rms_norm(zeros, w, eps=1e-50), zeros)


@pytest.mark.parametrize("eps", [1e-5, 0.0])
def test_float64_norms_match_float64_torch_with_eps_near_the_variance(gpu_typed_floats, eps):
    x = randn(4, 16, dtype=torch.float64, seed=3, scale=1e-3)  # variance ~1e-6: eps rounded to fp32 shows
    w, b = randn(16, dtype=torch.float64, seed=1), randn(16, dtype=torch.float64, seed=2)
    with plugins.use_backend(layer_norm="triton", rms_norm="triton"):
        torch.testing.assert_close(layer_norm(x, w, b, eps=eps), layer_norm_ref(x, w, b, eps), **EXACT)
        torch.testing.assert_close(rms_norm(x, w, eps=eps), rms_norm_ref(x, w, eps), **EXACT)


def test_float64_dropout_add_layer_norm_scales_by_the_float64_keep_scale(gpu_typed_floats):
    p, seed = 0.1, torch.tensor([1234567])
    x, r = randn(8, 64, dtype=torch.float64, seed=1), randn(8, 64, dtype=torch.float64, seed=2)
    w, b = randn(64, dtype=torch.float64, seed=3), randn(64, dtype=torch.float64, seed=4)
    dy = randn(8, 64, dtype=torch.float64, seed=5)
    y, mean, rstd = daln_kernels.forward(x, r, w, b, seed, p, 1e-5)
    dx, dr, dw, db = daln_kernels.backward(dy, x, r, w, mean, rstd, seed, p, True)
    s, offset = stream(seed)
    keep = keep_mask(s, 8, 64, p, offset=offset)
    t64 = [t.clone().requires_grad_() for t in (x, r, w, b)]
    y_ref = dropout_add_layer_norm_ref(*t64, keep, p, 1e-5)
    grads_ref = torch.autograd.grad(y_ref, t64, dy)
    torch.testing.assert_close(y, y_ref, **EXACT)
    for got, want in zip((dx, dr, dw, db), grads_ref, strict=True):
        torch.testing.assert_close(got, want, **EXACT)
