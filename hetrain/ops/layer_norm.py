"""LayerNorm over the last dimension: reference, backends, ``torch.library`` op and functional face.

Backends (best first): ``triton`` (CUDA tensors; CPU tensors too under ``TRITON_INTERPRET=1``),
``cuda`` and ``cpu`` (the C++/CUDA kernels in ``hetrain._C``), ``torch`` (the plain reference, the
test oracle).
Every backend returns the same triple, ``y, mean, rstd``, with statistics in float32 (float64 for
float64 inputs), so backward can run on any backend whatever ran forward.
"""

from __future__ import annotations

import torch

from hetrain import plugins
from hetrain.ops import _args, _backends
from hetrain.ops._op import as_rows, compute_dtype, in_shape_of, op, row_count

OP = "layer_norm"


# --- reference ---------------------------------------------------------------------------------

def layer_norm_ref(
    x: torch.Tensor, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None, eps: float = 1e-5
) -> torch.Tensor:
    """What the op computes, in plain torch; the tests' oracle."""
    return torch.nn.functional.layer_norm(x, x.shape[-1:], weight, bias, eps)


class TorchBackend:
    """The reference written as forward/backward entry points, so it can stand in for any kernel."""

    @staticmethod
    def forward(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (M, N) rows -> y (M, N) in x's dtype, and the mean and rstd (M,) backward reads, in compute_dtype."""
        stats = compute_dtype(x.dtype)
        # Made contiguous first: elementwise results keep their input's strides, and the op's fake promises
        # contiguous outputs (a transposed x gave a column-major y that compiled graphs misread).
        xf = x.contiguous().to(stats)
        # No statistics to take of no values (var_mean would warn about its degrees of freedom).
        var, mean = torch.var_mean(xf, dim=-1, correction=0) if xf.numel() else (xf.sum(-1), xf.sum(-1))
        # NaN, not rsqrt(inf) = 0, for a row whose variance overflows, as the kernels (csrc/layer_norm_math.h):
        # y and dx then show that row as F.layer_norm's do instead of giving y = bias and dx = 0.
        var_eps = var + eps
        rstd = torch.rsqrt(var_eps).masked_fill_(var_eps.isinf(), float("nan"))
        y = (xf - mean[:, None]) * rstd[:, None]
        if weight is not None:
            y = y * weight.to(stats)
        if bias is not None:
            y = y + bias.to(stats)
        return y.to(x.dtype), mean, rstd

    @staticmethod
    def backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, mean: torch.Tensor,
                 rstd: torch.Tensor, has_bias: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """dx (M, N), dweight and dbias (N,) in x's dtype; an empty tensor for a parameter the call has not."""
        stats = mean.dtype
        dyf = dy.contiguous().to(stats)  # contiguous inputs, so dx is contiguous as the fake says (see forward)
        xhat = (x.contiguous().to(stats) - mean[:, None]) * rstd[:, None]
        g = dyf * weight.to(stats) if weight is not None else dyf
        dx = rstd[:, None] * (g - g.mean(-1, keepdim=True) - xhat * (g * xhat).mean(-1, keepdim=True))
        dw = (dyf * xhat).sum(0).to(x.dtype) if weight is not None else x.new_empty(0)
        db = dyf.sum(0).to(x.dtype) if has_bias else x.new_empty(0)
        return dx.to(x.dtype), dw, db


class CppBackend:
    """The kernels of hetrain._C: csrc/layer_norm.cpp on the CPU, csrc/cuda/layer_norm_kernel.cu on CUDA."""

    @staticmethod
    def forward(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return torch.ops.hetrain_C.layer_norm_fwd(x, weight, bias, eps)

    @staticmethod
    def backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, mean: torch.Tensor,
                 rstd: torch.Tensor, has_bias: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return torch.ops.hetrain_C.layer_norm_bwd(dy, x, weight, mean, rstd, has_bias)

    @staticmethod
    def forward_with_grad(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                          eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The op's forward with its backward in C++ (csrc/autograd.cpp), so autograd never re-enters Python."""
        return torch.ops.hetrain_C.layer_norm(x, weight, bias, eps)


def _register_backends() -> None:
    _backends.register_triton(OP, "hetrain.ops.triton.layer_norm")
    _backends.register_cpp(OP, CppBackend)
    _backends.register_torch(OP, TorchBackend)


_register_backends()


# --- torch.library op --------------------------------------------------------------------------

@op("hetrain::layer_norm_fwd")
def _layer_norm_fwd(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``x`` of any leading shape; ``y`` has its shape, the statistics one entry per row of ``as_rows(x)``."""
    y, mean, rstd = plugins.call(OP, "forward", x.device.type, as_rows(x), weight, bias, eps)
    return in_shape_of(y, x), mean, rstd


@_layer_norm_fwd.register_fake
def _(x, weight, bias, eps):
    stats = compute_dtype(x.dtype)
    # Backends return contiguous outputs whatever the input's strides.
    return x.new_empty(x.shape), x.new_empty(row_count(x), dtype=stats), x.new_empty(row_count(x), dtype=stats)


@op("hetrain::layer_norm_bwd")
def _layer_norm_bwd(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, mean: torch.Tensor, rstd: torch.Tensor,
    has_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dx, dw, db = plugins.call(OP, "backward", x.device.type, as_rows(dy), as_rows(x), weight, mean, rstd, has_bias)
    return dx.view(x.shape), dw, db


@_layer_norm_bwd.register_fake
def _(dy, x, weight, mean, rstd, has_bias):
    n = x.shape[-1]
    return x.new_empty(x.shape), x.new_empty(n if weight is not None else 0), x.new_empty(n if has_bias else 0)


def _setup_context(ctx, inputs, output):
    x, weight, bias, _eps = inputs
    _y, mean, rstd = output
    ctx.save_for_backward(x, weight, mean, rstd)
    ctx.has_bias = bias is not None
    ctx.mark_non_differentiable(mean, rstd)
    ctx.set_materialize_grads(False)  # no zero gradients made for the statistics, or for y where it was not used


def _backward(ctx, dy, _dmean, _drstd):
    if dy is None:
        return None, None, None, None
    x, weight, mean, rstd = ctx.saved_tensors
    dx, dw, db = _layer_norm_bwd(dy.contiguous(), x, weight, mean, rstd, ctx.has_bias)
    return dx, (dw if weight is not None else None), (db if ctx.has_bias else None), None


_layer_norm_fwd.register_autograd(_backward, setup_context=_setup_context, public="layer_norm",
                                  reference="hetrain.ops.layer_norm_ref (F.layer_norm)", family=OP)


# --- functional face ---------------------------------------------------------------------------

def layer_norm(
    x: torch.Tensor, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None, eps: float = 1e-5
) -> torch.Tensor:
    """LayerNorm over the last dimension of ``x`` (any leading shape), fused; like ``F.layer_norm``.

    Runs in ``x``'s dtype with float32 accumulation (float64 for float64); ``weight`` and ``bias``
    are cast to ``x``'s dtype. Autocast casts nothing here: a bf16 activation with float32 parameters
    gives bf16, a float32 one float32, as ``F.layer_norm`` under CPU autocast. (CUDA autocast runs
    ``F.layer_norm`` in float32 and returns float32; this op keeps the activation's dtype there too,
    its statistics being float32 already.) ``eps`` must be finite in the accumulation dtype: at most
    ``torch.finfo(torch.float32).max`` unless ``x`` is float64.
    """
    op = "hetrain.ops.layer_norm"
    _args.rows_input(op, x)
    weight, bias = _args.vector(op, "weight", weight, x), _args.vector(op, "bias", bias, x)
    # eps is checked here, not only by the C++ kernel: a fallback backend would return NaN instead.
    return _layer_norm_fwd(x, weight, bias, _args.eps_value(op, eps, x.dtype))[0]
