"""RMSNorm over the last dimension: reference, backends, ``torch.library`` op and functional face.

Backends (best first): ``triton`` (CUDA tensors; CPU tensors too under ``TRITON_INTERPRET=1``),
``cuda`` and ``cpu`` (the C++/CUDA kernels in ``hetrain._C``), ``torch`` (the plain reference, the test oracle).
Every backend returns the same pair, ``y, rstd``, with rstd in float32 (float64 for float64
inputs), so backward can run on any backend whatever ran forward.
"""

from __future__ import annotations

import torch

from hetrain import plugins
from hetrain.ops import _args, _backends
from hetrain.ops._op import as_rows, compute_dtype, in_shape_of, op, row_count

OP = "rms_norm"


def default_eps(dtype: torch.dtype) -> float:
    """torch's ``eps=None``: the machine epsilon of the accumulation type (float32's for half types)."""
    return torch.finfo(compute_dtype(dtype)).eps


# --- reference ---------------------------------------------------------------------------------

def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor | None = None, eps: float | None = None) -> torch.Tensor:
    """What the op computes, in plain torch; the tests' oracle."""
    return torch.nn.functional.rms_norm(x, x.shape[-1:], weight, eps)


class TorchBackend:
    """The reference written as forward/backward entry points, so it can stand in for any kernel."""

    @staticmethod
    def forward(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """x (M, N) rows -> y (M, N) in x's dtype, and the rstd (M,) backward reads, in compute_dtype."""
        xf = x.to(compute_dtype(x.dtype)).contiguous()
        rstd = torch.rsqrt(xf.square().mean(-1) + eps)
        y = xf * rstd[:, None]
        if weight is not None:
            y = y * weight.to(xf.dtype)
        return y.to(x.dtype), rstd

    @staticmethod
    def backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None,
                 rstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """dx (M, N) and dweight (N,) in x's dtype; an empty dweight without a weight."""
        dyf = dy.to(rstd.dtype).contiguous()
        xf = x.to(rstd.dtype).contiguous()
        xhat = xf * rstd[:, None]
        g = dyf * weight.to(rstd.dtype) if weight is not None else dyf
        # mean(g * x) * rstd, not mean(g * xhat), as the C++ kernel: at float32's top g * x overflows and the
        # row's dx is NaN, as F.rms_norm's gradient, where xhat = x * 0 would hide it as 0.
        dx = rstd[:, None] * (g - xhat * ((g * xf).mean(-1, keepdim=True) * rstd[:, None]))
        dw = (dyf * xhat).sum(0).to(x.dtype) if weight is not None else x.new_empty(0)
        return dx.to(x.dtype), dw


class CppBackend:
    """The kernels of hetrain._C: csrc/rms_norm.cpp on the CPU, csrc/cuda/rms_norm_kernel.cu on CUDA."""

    @staticmethod
    def forward(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.ops.hetrain_C.rms_norm_fwd(x, weight, eps)

    @staticmethod
    def backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None,
                 rstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.ops.hetrain_C.rms_norm_bwd(dy, x, weight, rstd)

    @staticmethod
    def forward_with_grad(x: torch.Tensor, weight: torch.Tensor | None,
                          eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """The op's forward with its backward in C++ (csrc/autograd.cpp), so autograd never re-enters Python."""
        return torch.ops.hetrain_C.rms_norm(x, weight, eps)


def _register_backends() -> None:
    _backends.register_triton(OP, "hetrain.ops.triton.rms_norm")
    _backends.register_cpp(OP, CppBackend)
    _backends.register_torch(OP, TorchBackend)


_register_backends()


# --- torch.library op --------------------------------------------------------------------------

@op("hetrain::rms_norm_fwd")
def _rms_norm_fwd(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` of any leading shape; ``y`` has its shape, ``rstd`` one entry per row of ``as_rows(x)``."""
    y, rstd = plugins.call(OP, "forward", x.device.type, as_rows(x), weight, eps)
    return in_shape_of(y, x), rstd


@_rms_norm_fwd.register_fake
def _(x, weight, eps):
    # Every backend returns contiguous outputs, whatever the input's strides.
    return x.new_empty(x.shape), x.new_empty(row_count(x), dtype=compute_dtype(x.dtype))


@op("hetrain::rms_norm_bwd")
def _rms_norm_bwd(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, rstd: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    dx, dw = plugins.call(OP, "backward", x.device.type, as_rows(dy), as_rows(x), weight, rstd)
    return dx.view(x.shape), dw


@_rms_norm_bwd.register_fake
def _(dy, x, weight, rstd):
    return x.new_empty(x.shape), x.new_empty(x.shape[-1] if weight is not None else 0)


def _setup_context(ctx, inputs, output):
    x, weight, _eps = inputs
    _y, rstd = output
    ctx.save_for_backward(x, weight, rstd)
    ctx.mark_non_differentiable(rstd)
    ctx.set_materialize_grads(False)  # no zero gradient made for rstd, or for y where it was not used


def _backward(ctx, dy, _drstd):
    if dy is None:
        return None, None, None
    x, weight, rstd = ctx.saved_tensors
    dx, dw = _rms_norm_bwd(dy.contiguous(), x, weight, rstd)
    return dx, (dw if weight is not None else None), None


_rms_norm_fwd.register_autograd(_backward, setup_context=_setup_context, public="rms_norm",
                                reference="hetrain.ops.rms_norm_ref", family=OP)


# --- functional face ---------------------------------------------------------------------------

def rms_norm(x: torch.Tensor, weight: torch.Tensor | None = None, eps: float | None = None) -> torch.Tensor:
    """RMSNorm over the last dimension of ``x`` (any leading shape), fused; like ``F.rms_norm``.

    Runs in ``x``'s dtype with float32 accumulation (float64 for float64); ``weight`` is cast to
    ``x``'s dtype. Autocast casts nothing here: a bf16 activation with a float32 weight gives bf16,
    a float32 one float32, as ``F.rms_norm`` under CPU autocast. ``eps=None``
    means what it means to torch: :func:`default_eps` of ``x``'s dtype.
    """
    op = "hetrain.ops.rms_norm"
    _args.rows_input(op, x)
    weight = _args.vector(op, "weight", weight, x)
    return _rms_norm_fwd(x, weight, default_eps(x.dtype) if eps is None else _args.eps_value(op, eps))[0]
