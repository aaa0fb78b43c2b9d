"""gelu(x + bias), the FFN activation of BERT/GPT: reference, backends, ``torch.library`` op, functional face.

Backends (best first): ``triton`` (CUDA tensors; CPU tensors too under ``TRITON_INTERPRET=1``),
``cuda`` and ``cpu`` (the C++/CUDA kernels in ``hetrain._C``), ``torch`` (the plain reference, the test oracle).
Forward returns only the activation; backward recomputes from the saved input and bias, so the
output is never kept for backward (eager torch keeps both ``x + bias`` and the output alive).
"""

from __future__ import annotations

import torch

from hetrain import plugins
from hetrain.ops import _args, _backends
from hetrain.ops._op import as_rows, compute_dtype, in_shape_of, op

OP = "bias_gelu"
APPROXIMATIONS = ("none", "tanh")


# --- reference ---------------------------------------------------------------------------------

def bias_gelu_ref(x: torch.Tensor, bias: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """What the op computes, in plain torch; the tests' oracle."""
    return torch.nn.functional.gelu(x + bias, approximate=approximate)


class TorchBackend:
    """The reference written as forward/backward entry points, so it can stand in for any kernel."""

    @staticmethod
    def forward(x: torch.Tensor, bias: torch.Tensor, approximate: str) -> torch.Tensor:
        """gelu(x + bias) for x (M, N) rows and bias (N,), in x's dtype."""
        # x made contiguous first: elementwise results keep their input's strides, and the op's fake promises a
        # contiguous output (a transposed x gave a column-major one that compiled graphs misread).
        z = x.contiguous().to(compute_dtype(x.dtype)) + bias.to(compute_dtype(x.dtype))
        return torch.nn.functional.gelu(z, approximate=approximate).to(x.dtype)

    @staticmethod
    def backward(dy: torch.Tensor, x: torch.Tensor, bias: torch.Tensor,
                 approximate: str) -> tuple[torch.Tensor, torch.Tensor]:
        """dx (M, N) and dbias (N,) in x's dtype, recomputed from x and bias (nothing saved but the input)."""
        stats = compute_dtype(x.dtype)
        z = x.contiguous().to(stats) + bias.to(stats)  # contiguous, so dx is too (see forward)
        dz = torch.ops.aten.gelu_backward(dy.contiguous().to(stats), z, approximate=approximate)
        return dz.to(x.dtype), dz.sum(0).to(x.dtype)


class CppBackend:
    """The kernels of hetrain._C: csrc/bias_gelu.cpp on the CPU, csrc/cuda/bias_gelu_kernel.cu on CUDA."""

    @staticmethod
    def forward(x: torch.Tensor, bias: torch.Tensor, approximate: str) -> torch.Tensor:
        return torch.ops.hetrain_C.bias_gelu_fwd(x, bias, approximate)

    @staticmethod
    def backward(dy: torch.Tensor, x: torch.Tensor, bias: torch.Tensor,
                 approximate: str) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.ops.hetrain_C.bias_gelu_bwd(dy, x, bias, approximate)

    @staticmethod
    def forward_with_grad(x: torch.Tensor, bias: torch.Tensor, approximate: str) -> torch.Tensor:
        """The op's forward with its backward in C++ (csrc/autograd.cpp), so autograd never re-enters Python."""
        return torch.ops.hetrain_C.bias_gelu(x, bias, approximate)


def _register_backends() -> None:
    _backends.register_triton(OP, "hetrain.ops.triton.bias_gelu")
    _backends.register_cpp(OP, CppBackend)
    _backends.register_torch(OP, TorchBackend)


_register_backends()


# --- torch.library op --------------------------------------------------------------------------

@op("hetrain::bias_gelu_fwd")
def _bias_gelu_fwd(x: torch.Tensor, bias: torch.Tensor, approximate: str) -> torch.Tensor:
    """``x`` of any leading shape, ``bias`` of its last dimension."""
    return in_shape_of(plugins.call(OP, "forward", x.device.type, as_rows(x), bias, approximate), x)


@_bias_gelu_fwd.register_fake
def _(x, bias, approximate):
    torch._check(bias.shape == x.shape[-1:], lambda: f"hetrain.bias_gelu: bias {bias.shape} vs x {x.shape}")
    return x.new_empty(x.shape)  # contiguous, as the kernels write it (empty_like would keep x's strides)


@op("hetrain::bias_gelu_bwd")
def _bias_gelu_bwd(
    dy: torch.Tensor, x: torch.Tensor, bias: torch.Tensor, approximate: str
) -> tuple[torch.Tensor, torch.Tensor]:
    dx, db = plugins.call(OP, "backward", x.device.type, as_rows(dy), as_rows(x), bias, approximate)
    return dx.view(x.shape), db


@_bias_gelu_bwd.register_fake
def _(dy, x, bias, approximate):
    return x.new_empty(x.shape), bias.new_empty(bias.shape)


def _setup_context(ctx, inputs, output):
    x, bias, approximate = inputs
    ctx.save_for_backward(x, bias)
    ctx.approximate = approximate


def _backward(ctx, dy):
    x, bias = ctx.saved_tensors
    dx, db = _bias_gelu_bwd(dy.contiguous(), x, bias, ctx.approximate)
    return dx, db, None


_bias_gelu_fwd.register_autograd(_backward, setup_context=_setup_context, public="bias_gelu",
                                 reference="hetrain.ops.bias_gelu_ref", family=OP)


# --- functional face ---------------------------------------------------------------------------

def bias_gelu(x: torch.Tensor, bias: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """``F.gelu(x + bias, approximate=...)`` fused, for ``x`` of any leading shape and ``bias`` of shape (N,).

    Runs in ``x``'s dtype with float32 arithmetic (float64 for float64); ``bias`` is cast to ``x``'s
    dtype. Autocast casts nothing here: a bf16 activation with a float32 bias gives bf16, as
    ``F.gelu(F.linear(h, W, bias))`` under autocast does (the Linear casts its bias with the GEMM),
    whereas a plain ``F.gelu(x + bias)`` would promote to float32.
    """
    if approximate not in APPROXIMATIONS:
        raise ValueError(f"hetrain.ops.bias_gelu: approximate must be 'none' or 'tanh', got {approximate!r}")
    op = "hetrain.ops.bias_gelu"
    _args.rows_input(op, x)
    bias = _args.vector(op, "bias", bias, x, when_missing="without a bias, torch.nn.functional.gelu(x) is the op")
    return _bias_gelu_fwd(x, bias, approximate)
