"""layer_norm(dropout(x, p) + residual), the post-LN sublayer output of BERT: reference, backends,
``torch.library`` op and functional face.

Backends (best first): ``triton`` (CUDA tensors; CPU tensors too under ``TRITON_INTERPRET=1``),
``cuda`` and ``cpu`` (the C++/CUDA kernels in ``hetrain._C``), ``torch`` (the plain reference, the test oracle). Every
backend returns ``y, mean, rstd`` with statistics in float32 (float64 for float64 inputs).

The dropout mask is never stored. Each call takes a stream ``(seed, offset)`` from
:mod:`hetrain.ops.rng` (a fresh seed from the CPU default generator, so ``torch.manual_seed`` makes
runs reproducible and a CUDA input needs no device sync to launch; in a pipeline split, the unsplit
call's seed at the micro-batch's offset); element ``i`` of the flattened (rows, features) input is
then kept or dropped by the keyed counter hash of csrc/dropout_math.h at ``(seed, offset + i)``,
which backward evaluates again. Every backend computes the same hash (Triton and C++ in 32-bit
unsigned arithmetic, the ``torch`` backend with integer tensor ops), so a stream drops the same
elements on every device: a pipeline stage moved between CPU and GPU keeps its masks. ``keep_mask``
gives that mask.

Backward needs the pre-norm sum; it is rebuilt from ``x`` and ``residual`` rather than saved.
Both cost one (rows, features) tensor of memory (``residual`` is usually held anyway, as the input
of the sublayer's first Linear), but forward then writes only ``y``, which also keeps inference
free of an extra write; backward re-derives the mask in any case, so the re-add costs one read.
"""

from __future__ import annotations

import math

import torch

from hetrain import plugins
from hetrain.ops import _args, _backends
from hetrain.ops._op import as_rows, compute_dtype, in_shape_of, op, row_count
from hetrain.ops.layer_norm import TorchBackend as _LayerNormTorch
from hetrain.ops.layer_norm import layer_norm_ref
from hetrain.ops.rng import HOST_SEEDED, apply_mask, dropout_stream, refuse_host_seed_in_capture, stream

OP = "dropout_add_layer_norm"
_M32 = 0xFFFFFFFF


# --- the counter-based mask of every backend (csrc/dropout_math.h) ----------------------------

def _mul32(h, c: int):
    """(h * c) mod 2^32 for h < 2^32, in 16-bit halves of c so int64 tensors never overflow."""
    return (h * (c & 0xFFFF) + (((h * (c >> 16)) & 0xFFFF) << 16)) & _M32


def _mix32(h):
    """MurmurHash3's 32-bit finaliser, on Python ints or int64 tensors holding uint32 values."""
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def drop_threshold(p: float) -> int:
    """Elements whose 24 random bits fall below ceil(p * 2^24) are dropped."""
    return math.ceil(p * 16777216.0)


def keep_mask(seed: int, rows: int, cols: int, p: float, device: torch.device | str = "cpu",
              offset: int = 0) -> torch.Tensor:
    """The (rows, cols) bool mask of kept elements every backend draws for ``(seed, offset)``."""
    index = torch.arange(offset, offset + rows * cols, dtype=torch.int64, device=device)
    key_lo = _mix32((seed & _M32) ^ 0x9E3779B9)
    key_hi = _mix32((((seed >> 32) + 0x7F4A7C15) & _M32) ^ _mix32(((index >> 32) + 0x632BE5AB) & _M32))
    bits24 = _mix32(_mix32((index & _M32) ^ key_lo) ^ key_hi) >> 8
    return (bits24 >= drop_threshold(p)).view(rows, cols)


# --- reference ---------------------------------------------------------------------------------

def dropout_add_layer_norm_ref(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
    keep: torch.Tensor | None, p: float, eps: float = 1e-5,
) -> torch.Tensor:
    """What the op computes given its kept positions ``keep`` (``None``: no dropout); the tests' oracle."""
    dropped = x if keep is None else apply_mask(x, keep, p)
    return layer_norm_ref(dropped + residual, weight, bias, eps)


class TorchBackend:
    """The reference written as forward/backward entry points, with the C++ kernel's mask."""

    @staticmethod
    def _keep(x, seed, p):
        """The kernels' kept positions for the stream ``seed``; None without dropout."""
        if p == 0:
            return None
        s, offset = stream(seed)
        return keep_mask(s, x.shape[0], x.shape[1], p, x.device, offset)

    @staticmethod
    def _pre_norm(x, residual, keep, p):
        """dropout(x) + residual in compute_dtype, contiguous: the outputs derived from it must be, as the op's fakes
        say (with p == 0, x + residual kept a transposed x's strides)."""
        stats = compute_dtype(x.dtype)
        x, residual = x.contiguous().to(stats), residual.contiguous().to(stats)
        return (x if keep is None else apply_mask(x, keep, p)) + residual

    @staticmethod
    def forward(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                seed: torch.Tensor, p: float, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """layer_norm(dropout(x) + residual) for (M, N) rows; mean and rstd (M,) in compute_dtype for backward."""
        s = TorchBackend._pre_norm(x, residual, TorchBackend._keep(x, seed, p), p)
        y, mean, rstd = _LayerNormTorch.forward(s, weight, bias, eps)
        return y.to(x.dtype), mean, rstd

    @staticmethod
    def backward(dy: torch.Tensor, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None,
                 mean: torch.Tensor, rstd: torch.Tensor, seed: torch.Tensor, p: float,
                 has_bias: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """dx, dresidual (M, N) and dweight, dbias (N,) in x's dtype; the mask regenerated from ``seed``."""
        keep = TorchBackend._keep(x, seed, p)
        s = TorchBackend._pre_norm(x, residual, keep, p)
        ds, dw, db = _LayerNormTorch.backward(dy, s, weight, mean, rstd, has_bias)
        dx = ds.clone() if keep is None else apply_mask(ds, keep, p)  # a custom op's outputs may not alias each other
        return dx.to(x.dtype), ds.to(x.dtype), dw.to(x.dtype), db.to(x.dtype)


class CppBackend:
    """The kernels of hetrain._C: csrc/dropout_add_layer_norm.cpp on the CPU, csrc/cuda/dropout_add_layer_norm_kernel.cu
    on CUDA."""

    @staticmethod
    def forward(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                seed: torch.Tensor, p: float, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return torch.ops.hetrain_C.dropout_add_layer_norm_fwd(x, residual, weight, bias, seed, p, eps)

    @staticmethod
    def backward(dy: torch.Tensor, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None,
                 mean: torch.Tensor, rstd: torch.Tensor, seed: torch.Tensor, p: float,
                 has_bias: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return torch.ops.hetrain_C.dropout_add_layer_norm_bwd(dy, x, residual, weight, mean, rstd, seed, p,
                                                               has_bias)

    @staticmethod
    def forward_with_grad(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None,
                          bias: torch.Tensor | None, seed: torch.Tensor, p: float,
                          eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The op's forward with its backward in C++ (csrc/autograd.cpp), so autograd never re-enters Python."""
        return torch.ops.hetrain_C.dropout_add_layer_norm(x, residual, weight, bias, seed, p, eps)


def _register_backends() -> None:
    _backends.register_triton(OP, "hetrain.ops.triton.dropout_add_layer_norm")
    _backends.register_cpp(OP, CppBackend)
    _backends.register_torch(OP, TorchBackend)


_register_backends()


# --- torch.library op --------------------------------------------------------------------------

@op("hetrain::dropout_add_layer_norm_fwd", tags=HOST_SEEDED,
    graph_guard=lambda x, residual, weight, bias, seed, p, eps: refuse_host_seed_in_capture(x, seed, p))
def _dropout_add_layer_norm_fwd(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
    seed: torch.Tensor, p: float, eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``x`` and ``residual`` of one shape, any leading dims; the statistics one entry per row of ``as_rows(x)``."""
    if residual.shape != x.shape:  # flattened, a residual of another shape with as many rows would pass
        raise ValueError(f"hetrain.dropout_add_layer_norm: residual {tuple(residual.shape)} vs x {tuple(x.shape)}")
    y, mean, rstd = plugins.call(OP, "forward", x.device.type, as_rows(x), as_rows(residual), weight, bias, seed,
                                 p, eps)
    return in_shape_of(y, x), mean, rstd


@_dropout_add_layer_norm_fwd.register_fake
def _(x, residual, weight, bias, seed, p, eps):
    torch._check(residual.shape == x.shape, lambda: f"hetrain.dropout_add_layer_norm: residual {residual.shape} "
                 f"vs x {x.shape}")
    stats = compute_dtype(x.dtype)
    return x.new_empty(x.shape), x.new_empty(row_count(x), dtype=stats), x.new_empty(row_count(x), dtype=stats)


@op("hetrain::dropout_add_layer_norm_bwd", tags=HOST_SEEDED)
def _dropout_add_layer_norm_bwd(
    dy: torch.Tensor, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None, mean: torch.Tensor,
    rstd: torch.Tensor, seed: torch.Tensor, p: float, has_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    dx, dres, dw, db = plugins.call(OP, "backward", x.device.type, as_rows(dy), as_rows(x), as_rows(residual),
                                    weight, mean, rstd, seed, p, has_bias)
    return dx.view(x.shape), dres.view(x.shape), dw, db


@_dropout_add_layer_norm_bwd.register_fake
def _(dy, x, residual, weight, mean, rstd, seed, p, has_bias):
    n = x.shape[-1]
    return (x.new_empty(x.shape), x.new_empty(x.shape), x.new_empty(n if weight is not None else 0),
            x.new_empty(n if has_bias else 0))


def _setup_context(ctx, inputs, output):
    x, residual, weight, bias, seed, p, _eps = inputs
    _y, mean, rstd = output
    ctx.save_for_backward(x, residual, weight, mean, rstd, seed)
    ctx.p = p
    ctx.has_bias = bias is not None
    ctx.mark_non_differentiable(mean, rstd)
    ctx.set_materialize_grads(False)  # no zero gradients made for the statistics, or for y where it was not used


def _backward(ctx, dy, _dmean, _drstd):
    if dy is None:
        return None, None, None, None, None, None, None
    x, residual, weight, mean, rstd, seed = ctx.saved_tensors
    dx, dres, dw, db = _dropout_add_layer_norm_bwd(dy.contiguous(), x, residual, weight, mean, rstd, seed, ctx.p,
                                                   ctx.has_bias)
    return dx, dres, (dw if weight is not None else None), (db if ctx.has_bias else None), None, None, None


_dropout_add_layer_norm_fwd.register_autograd(_backward, setup_context=_setup_context,
                                              public="dropout_add_layer_norm",
                                              reference="hetrain.ops.dropout_add_layer_norm_ref", family=OP)


# --- functional face ---------------------------------------------------------------------------

def dropout_add_layer_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, p: float,
    eps: float = 1e-5, training: bool = True,
) -> torch.Tensor:
    """``layer_norm(dropout(x, p, training) + residual)`` over the last dimension, fused; returns the output.

    ``x`` and ``residual`` share shape (any leading dims); of different float dtypes (a bf16 sublayer
    output under autocast beside a float32 residual) both are promoted as ``x + residual`` would be.
    The arithmetic runs in float32 (float64 for float64), but ``weight`` and ``bias`` are first cast to the
    inputs' (promoted) dtype, as :func:`hetrain.ops.layer_norm` casts them to ``x``'s: float32 parameters of a
    bf16 call are rounded to bf16. Autocast casts nothing else, so the output has the dtype
    ``F.layer_norm(F.dropout(x) + residual)`` has under CPU autocast. ``eps`` must be finite in float32 unless
    the inputs are float64. With ``p == 0`` or ``training=False`` no random number is drawn and the result is
    ``layer_norm(x + residual)``. As for :func:`hetrain.ops.dropout`, a call with ``p > 0`` on CUDA tensors while
    a CUDA graph is being captured draws its seed inside the graph (read there by the triton and cuda backends).
    """
    name = "hetrain.ops.dropout_add_layer_norm"
    _args.rows_input(name, x)
    if not isinstance(residual, torch.Tensor):
        raise ValueError(f"{name}: residual must be a tensor like x, got {type(residual).__name__}")
    if residual.shape != x.shape or not residual.is_floating_point() or residual.device != x.device:
        raise ValueError(f"{name}: residual must match x ({tuple(x.shape)} {x.dtype} on {x.device}), got "
                         f"{tuple(residual.shape)} {residual.dtype} on {residual.device}")
    if residual.dtype != x.dtype:
        common = torch.promote_types(x.dtype, residual.dtype)
        x, residual = x.to(common), residual.to(common)
    weight, bias = _args.vector(name, "weight", weight, x), _args.vector(name, "bias", bias, x)
    p = _args.probability(name, p)
    p = p if training else 0.0
    eps = _args.eps_value(name, eps, x.dtype)
    seed = dropout_stream(x) if p > 0 else torch.zeros(2, dtype=torch.int64)
    return _dropout_add_layer_norm_fwd(x, residual, weight, bias, seed, p, eps)[0]
