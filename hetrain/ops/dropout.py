"""Dropout whose mask is regenerated in backward, never stored: reference, backends, ``torch.library`` op,
functional face.

Backends (best first): ``triton`` (CUDA tensors; CPU tensors too under ``TRITON_INTERPRET=1``),
``cuda`` and ``cpu`` (the C++/CUDA kernels in ``hetrain._C``; OpenMP on the CPU), ``torch`` (the plain
reference, the test oracle).

Each call takes a stream ``(seed, offset)`` from :mod:`hetrain.ops.rng`: a fresh seed from the CPU
default generator (so ``torch.manual_seed`` makes runs reproducible, and a CUDA input needs no device
sync to launch), or in a pipeline split the unsplit call's seed at the micro-batch's offset. Element
``i`` of the flattened (row-major) input is kept when the keyed counter hash of csrc/dropout_math.h on
``(seed, offset + i)`` clears
the threshold of ``p``: the mask of ``dropout_add_layer_norm``'s ``cpu`` and ``torch`` backends, and
here every backend's, Triton's included, so a seed gives the same mask on each. Backward evaluates the
hash again from the saved seed: nothing of the input's size is kept for backward (torch's dropout
keeps a one-byte-per-element mask). Dropout is diagonal, so backward is the same map applied to the
upstream gradient, and each backend's ``backward`` is its ``forward``.
"""

from __future__ import annotations

import math

import torch

from hetrain import plugins
from hetrain.ops import _args, _backends
from hetrain.ops._op import compute_dtype, op
from hetrain.ops.dropout_add_layer_norm import keep_mask as _keep_mask_2d
from hetrain.ops.rng import HOST_SEEDED, apply_mask, dropout_stream, refuse_host_seed_in_capture, stream

OP = "dropout"


def keep_mask(seed: int, shape: torch.Size | tuple[int, ...], p: float,
              device: torch.device | str = "cpu", offset: int = 0) -> torch.Tensor:
    """The bool mask of kept elements every backend draws for ``(seed, offset)`` and ``p`` on a tensor of ``shape``."""
    return _keep_mask_2d(seed, 1, math.prod(shape), p, device, offset).view(shape)


# --- reference ---------------------------------------------------------------------------------

def dropout_ref(x: torch.Tensor, keep: torch.Tensor, p: float) -> torch.Tensor:
    """What the op computes given its kept positions ``keep``; the tests' oracle."""
    return apply_mask(x, keep, p)


class TorchBackend:
    """The reference written as the backends' entry point, with the kernels' mask."""

    @staticmethod
    def forward(x: torch.Tensor, seed: torch.Tensor, p: float) -> torch.Tensor:
        """x with the elements the stream ``seed`` (int64 ``(seed[, offset])``) drops zeroed, the rest scaled."""
        s, offset = stream(seed)
        keep = keep_mask(s, x.shape, p, x.device, offset)
        return dropout_ref(x.to(compute_dtype(x.dtype)), keep, p).to(x.dtype).contiguous()

    backward = forward  # dropout is diagonal: dx = dy / (1 - p) where kept, with the same seed


class CppBackend:
    """The kernel of hetrain._C for both directions: csrc/dropout.cpp on the CPU, csrc/cuda/dropout_kernel.cu
    on CUDA."""

    @staticmethod
    def forward(x: torch.Tensor, seed: torch.Tensor, p: float) -> torch.Tensor:
        return torch.ops.hetrain_C.dropout_fwd(x, seed, p)

    backward = forward

    @staticmethod
    def forward_with_grad(x: torch.Tensor, seed: torch.Tensor, p: float) -> torch.Tensor:
        """The op's forward with its backward in C++ (csrc/autograd.cpp), so autograd never re-enters Python."""
        return torch.ops.hetrain_C.dropout(x, seed, p)


def _register_backends() -> None:
    _backends.register_triton(OP, "hetrain.ops.triton.dropout")
    _backends.register_cpp(OP, CppBackend)
    _backends.register_torch(OP, TorchBackend)


_register_backends()


# --- torch.library op --------------------------------------------------------------------------

@op("hetrain::dropout_fwd", tags=HOST_SEEDED, graph_guard=refuse_host_seed_in_capture)
def _dropout_fwd(x: torch.Tensor, seed: torch.Tensor, p: float) -> torch.Tensor:
    return plugins.call(OP, "forward", x.device.type, x, seed, p)


@_dropout_fwd.register_fake
def _(x, seed, p):
    return x.new_empty(x.shape)  # backends return contiguous outputs whatever the input's strides


# A separate op for backward (the same math) so profiles and graphs name the direction.
@op("hetrain::dropout_bwd", tags=HOST_SEEDED)
def _dropout_bwd(dy: torch.Tensor, seed: torch.Tensor, p: float) -> torch.Tensor:
    return plugins.call(OP, "backward", dy.device.type, dy, seed, p)


@_dropout_bwd.register_fake
def _(dy, seed, p):
    return dy.new_empty(dy.shape)


def _setup_context(ctx, inputs, output):
    _x, seed, p = inputs
    ctx.save_for_backward(seed)
    ctx.p = p


def _backward(ctx, dy):
    (seed,) = ctx.saved_tensors
    return _dropout_bwd(dy, seed, ctx.p), None, None


# Both ops are the same linear, self-adjoint map, so the gradient of either is ``dropout_bwd``
# (which also makes double backward work).
_dropout_fwd.register_autograd(_backward, setup_context=_setup_context, public="dropout", reference=None, family=OP)
_dropout_bwd.register_autograd(_backward, setup_context=_setup_context, public="dropout", reference=None)


# --- functional face ---------------------------------------------------------------------------

def dropout(x: torch.Tensor, p: float = 0.5, training: bool = True) -> torch.Tensor:
    """``F.dropout(x, p, training)`` with a mask regenerated in backward instead of stored.

    ``x`` of any shape and floating dtype; the result is contiguous, in ``x``'s dtype, computed in
    float32 (float64 for float64). With ``p == 0`` or ``training=False`` it returns ``x`` itself and
    draws no random number; ``p == 1`` gives zeros. Dropped elements are exactly zero, also where
    ``x`` is infinite or NaN. Under ``torch.compile`` with inductor the seed comes from inductor's own
    generator, as for torch's random ops (``torch._inductor.config.fallback_random`` restores eager's draw).
    A call on a CUDA tensor while a CUDA graph is being captured draws its seed on the GPU, inside the graph, so
    every replay applies a new mask (the triton and cuda backends read it there; the torch reference refuses).
    """
    p = _args.probability("hetrain.ops.dropout", p)
    _args.floating_input("hetrain.ops.dropout", x)
    if not training or p == 0:
        return x
    return _dropout_fwd(x, dropout_stream(x), float(p))
