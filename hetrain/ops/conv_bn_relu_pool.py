"""Conv2d -> BatchNorm2d -> ReLU -> MaxPool2d with the part after the convolution fused into one epilogue.

The convolution stays on cuDNN / the CPU library (``F.conv2d``, differentiated by torch). What follows
it is memory-bound, and eager torch reads and writes the convolution output's size about ten times
over forward and backward; the fused epilogue reads it once for the batch statistics (training only)
and once to normalise, apply ReLU and pool, writing only the pooled output and the argmax as a uint8
index inside each pooling window. Backward recomputes the pre-ReLU value from the convolution output
and the per-channel mean/invstd (the normalised tensor is never stored) and returns the gradient of
the convolution output and of the BatchNorm weight and bias.

Ops (each a ``torch.library`` custom op with a fake; the forward with autograd):
  ``hetrain::bn_stats``          batch mean and invstd; updates ``running_mean``/``running_var`` in place
                                 (declared in ``mutates_args``, so ``torch.compile`` functionalises it);
  ``hetrain::bn_relu_pool_fwd``  normalise (or not) -> ReLU -> max-pool, returns (y, argmax);
  ``hetrain::bn_relu_pool_bwd``  its fused backward.
Backends (best first): ``cuda`` and ``cpu`` (the C++/CUDA kernels in ``hetrain._C``), ``torch`` (the
plain reference, the test oracle). Outputs keep the input's layout: channels_last stays channels_last,
anything else becomes contiguous NCHW.

The in-window argmax is the first maximum in row-major order, as torch's ``max_pool2d``, wherever the
maximum is positive. Where a whole window is <= 0 after ReLU, torch picks its first element and the
kernels pick the largest pre-ReLU value; the ReLU stops the gradient there either way, so the
gradients are identical.
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F

from hetrain import plugins
from hetrain.ops import _args, _backends
from hetrain.ops._op import batched_by_vmap, compute_dtype, op

OP = "bn_relu_pool"
MAX_WINDOW = 256  # positions in a pooling window: the argmax is stored as uint8


def _integer(v: object) -> int | None:
    """``v`` as an int when it is an integer, NumPy's included (as ``F.max_pool2d`` takes them); else None.

    Never a bool (True would read as 1) nor a tensor (its value needs a sync; ``_pair`` names the fix).
    """
    if isinstance(v, int) and not isinstance(v, bool):  # the usual case first
        return v
    if isinstance(v, bool | torch.Tensor):
        return None
    try:
        return operator.index(v)
    except TypeError:
        return None


def _pair(name: str, what: str, v: int | tuple[int, ...] | list[int]) -> list[int]:
    """``v`` as (height, width): one integer for both, or one or two of them in a sequence, as ``F.max_pool2d``."""
    if isinstance(v, torch.Tensor):
        raise ValueError(f"{name}: {what} must be Python integers, got a tensor; pass {what}.tolist()")
    one = _integer(v)
    if one is not None:
        return [one, one]
    if isinstance(v, tuple | list) and len(v) in (1, 2):
        both = [_integer(e) for e in v]
        if None not in both:
            return [both[0], both[-1]]
    raise ValueError(f"{name}: {what} must be an integer or one or two of them (height, width), got {v!r}")


def is_channels_last(x: torch.Tensor) -> bool:
    """The layout rule of every backend: channels_last when x is so and not also plain contiguous. Under
    torch.vmap (a batched tensor, whose layout functorch cannot query) the plain layout."""
    if torch._C._functorch.is_batchedtensor(x):
        return False
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def _layout(x: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if is_channels_last(x) else torch.contiguous_format


def pooled_size(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


# --- reference ---------------------------------------------------------------------------------

def bn_relu_pool_ref(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None, training: bool, momentum: float = 0.1, eps: float = 1e-5,
    kernel_size: int | tuple[int, int] = 2, stride: int | tuple[int, int] | None = None,
    padding: int | tuple[int, int] = 0,
) -> torch.Tensor:
    """What the epilogue computes, in plain torch; the tests' oracle."""
    # torch 2.13's F.batch_norm eval backward gives a wrong dx for a channels_last x and a strided weight (measured).
    weight, bias = (v.contiguous() if v is not None else None for v in (weight, bias))
    y = F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)
    return F.max_pool2d(F.relu(y), kernel_size, stride if stride is not None else kernel_size, padding)


def relu_pool_ref(x: torch.Tensor, kernel_size: int | tuple[int, int] = 2, stride: int | tuple[int, int] | None = None,
                  padding: int | tuple[int, int] = 0) -> torch.Tensor:
    """What the epilogue computes without BatchNorm (ReLU -> MaxPool), in plain torch; the tests' oracle."""
    return F.max_pool2d(F.relu(x), kernel_size, stride if stride is not None else kernel_size, padding)


class TorchBackend:
    """The epilogue written as stats/forward/backward entry points, so it can stand in for any kernel."""

    @staticmethod
    def stats(x: torch.Tensor, running_mean: torch.Tensor | None, running_var: torch.Tensor | None,
              momentum: float, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch mean and invstd (C,) of x (N, C, H, W), in compute_dtype; running statistics updated in place."""
        stats = compute_dtype(x.dtype)
        n = x.shape[0] * x.shape[2] * x.shape[3]
        if n == 0:  # empty batch: running statistics left alone, as torch does
            c = x.shape[1]
            return x.new_zeros(c, dtype=stats), x.new_full((c,), (0.0 + eps) ** -0.5, dtype=stats)
        var, mean = torch.var_mean(x.to(stats), dim=(0, 2, 3), correction=0)
        if running_mean is not None:
            with torch.no_grad():
                running_mean.mul_(1 - momentum).add_(mean, alpha=momentum)
                running_var.mul_(1 - momentum).add_(var * (n / (n - 1)), alpha=momentum)
        return mean, torch.rsqrt(var + eps)

    @staticmethod
    def _pre_relu(x, mean, invstd, weight, bias):
        """z as the kernels compute it (one fma per element), rounded to x's dtype."""
        stats = compute_dtype(x.dtype)
        if mean is None:
            return x
        scale = invstd * (weight if weight is not None else 1.0)
        shift = (bias if bias is not None else 0.0) - mean * scale
        return torch.addcmul(shift[:, None, None], x.to(stats), scale[:, None, None]).to(x.dtype)

    @staticmethod
    def forward(x: torch.Tensor, mean: torch.Tensor | None, invstd: torch.Tensor | None,
                weight: torch.Tensor | None, bias: torch.Tensor | None, kernel: list[int], stride: list[int],
                padding: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """max_pool(relu(batch_norm(x))) in x's layout, and each output's argmax as its uint8 index in the window."""
        fmt = _layout(x)
        z = TorchBackend._pre_relu(x, mean, invstd, weight, bias)
        y, flat = F.max_pool2d(torch.relu(z), kernel, stride, padding, return_indices=True)
        # Flat plane index -> row-major index inside the pooling window.
        oh = torch.arange(y.shape[2], device=x.device)[:, None] * stride[0] - padding[0]
        ow = torch.arange(y.shape[3], device=x.device)[None, :] * stride[1] - padding[1]
        arg = (flat // x.shape[3] - oh) * kernel[1] + (flat % x.shape[3] - ow)
        return y.contiguous(memory_format=fmt), arg.to(torch.uint8).contiguous(memory_format=fmt)

    @staticmethod
    def backward(dy: torch.Tensor, argmax: torch.Tensor, x: torch.Tensor, mean: torch.Tensor | None,
                 invstd: torch.Tensor | None, weight: torch.Tensor | None, bias: torch.Tensor | None,
                 batch_stats: bool, kernel: list[int], stride: list[int],
                 padding: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """dx in x's dtype and layout, dweight and dbias (C,) in compute_dtype."""
        stats = compute_dtype(x.dtype)
        fmt = _layout(x)
        n, c, h, w = x.shape
        a = argmax.long()
        oh = torch.arange(dy.shape[2], device=x.device)[:, None] * stride[0] - padding[0]
        ow = torch.arange(dy.shape[3], device=x.device)[None, :] * stride[1] - padding[1]
        flat = (oh + a // kernel[1]) * w + (ow + a % kernel[1])
        ohw = dy.shape[2] * dy.shape[3]
        # Out of place: under torch.vmap dy is batched and a fresh zeros is not, which scatter_add_ refuses.
        g = torch.zeros(n, c, h * w, dtype=stats, device=x.device).scatter_add(
            2, flat.reshape(n, c, ohw), dy.to(stats).reshape(n, c, ohw))
        z = TorchBackend._pre_relu(x, mean, invstd, weight, bias)
        g = torch.where(z.reshape(n, c, h * w) <= 0, 0.0, g).reshape(x.shape)
        xf = x.to(stats)
        mu = mean[:, None, None] if mean is not None else 0.0
        rs = invstd[:, None, None] if invstd is not None else 1.0
        xhat = (xf - mu) * rs
        sum_g, sum_gx = g.sum((0, 2, 3)), (g * xhat).sum((0, 2, 3))
        k = rs * (weight[:, None, None] if weight is not None else 1.0)
        dx = k * g
        if batch_stats and n * h * w > 0:
            count = n * h * w
            dx = dx - k * (sum_g[:, None, None] / count + xhat * sum_gx[:, None, None] / count)
        dw = sum_gx if weight is not None else x.new_empty(0, dtype=stats)
        db = sum_g if bias is not None else x.new_empty(0, dtype=stats)
        return dx.to(x.dtype).contiguous(memory_format=fmt), dw, db


class CppBackend:
    """The kernels of hetrain._C: csrc/bn_relu_pool.cpp on the CPU, csrc/cuda/bn_relu_pool_kernel.cu on CUDA."""

    @staticmethod
    def stats(x: torch.Tensor, running_mean: torch.Tensor | None, running_var: torch.Tensor | None,
              momentum: float, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.ops.hetrain_C.bn_stats(x, running_mean, running_var, momentum, eps)

    @staticmethod
    def forward(x: torch.Tensor, mean: torch.Tensor | None, invstd: torch.Tensor | None,
                weight: torch.Tensor | None, bias: torch.Tensor | None, kernel: list[int], stride: list[int],
                padding: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.ops.hetrain_C.bn_relu_pool_fwd(x, mean, invstd, weight, bias, kernel, stride, padding)

    @staticmethod
    def backward(dy: torch.Tensor, argmax: torch.Tensor, x: torch.Tensor, mean: torch.Tensor | None,
                 invstd: torch.Tensor | None, weight: torch.Tensor | None, bias: torch.Tensor | None,
                 batch_stats: bool, kernel: list[int], stride: list[int],
                 padding: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return torch.ops.hetrain_C.bn_relu_pool_bwd(dy, argmax, x, mean, invstd, weight, bias, batch_stats, kernel,
                                                    stride, padding)

    @staticmethod
    def forward_with_grad(x: torch.Tensor, mean: torch.Tensor | None, invstd: torch.Tensor | None,
                          weight: torch.Tensor | None, bias: torch.Tensor | None, batch_stats: bool,
                          kernel: list[int], stride: list[int],
                          padding: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The op's forward with its backward in C++ (csrc/autograd.cpp), so autograd never re-enters Python."""
        # batch_stats steers that backward as it steers _backward's below.
        return torch.ops.hetrain_C.bn_relu_pool(x, mean, invstd, weight, bias, batch_stats, kernel, stride, padding)


def _register_backends() -> None:
    _backends.register_cpp(OP, CppBackend)
    _backends.register_torch(OP, TorchBackend)


_register_backends()


# --- torch.library ops -------------------------------------------------------------------------

@op("hetrain::bn_stats", mutates_args=("running_mean", "running_var"))
def _bn_stats(
    x: torch.Tensor, running_mean: torch.Tensor | None, running_var: torch.Tensor | None, momentum: float, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    return plugins.call(OP, "stats", x.device.type, x, running_mean, running_var, momentum, eps)


@_bn_stats.register_fake
def _(x, running_mean, running_var, momentum, eps):
    stats = compute_dtype(x.dtype)
    return x.new_empty(x.shape[1], dtype=stats), x.new_empty(x.shape[1], dtype=stats)


@op("hetrain::bn_relu_pool_fwd")
def _bn_relu_pool_fwd(
    x: torch.Tensor, mean: torch.Tensor | None, invstd: torch.Tensor | None, weight: torch.Tensor | None,
    bias: torch.Tensor | None, batch_stats: bool, kernel: list[int], stride: list[int], padding: list[int],
) -> tuple[torch.Tensor, torch.Tensor]:
    # batch_stats only steers autograd: whether the statistics depend on x.
    return plugins.call(OP, "forward", x.device.type, x, mean, invstd, weight, bias, kernel, stride, padding)


def _pooled_shape(x, kernel, stride, padding):
    return (x.shape[0], x.shape[1], pooled_size(x.shape[2], kernel[0], stride[0], padding[0]),
            pooled_size(x.shape[3], kernel[1], stride[1], padding[1]))


@_bn_relu_pool_fwd.register_fake
def _(x, mean, invstd, weight, bias, batch_stats, kernel, stride, padding):
    shape, fmt = _pooled_shape(x, kernel, stride, padding), _layout(x)
    return (torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=fmt),
            torch.empty(shape, dtype=torch.uint8, device=x.device, memory_format=fmt))


@op("hetrain::bn_relu_pool_bwd")
def _bn_relu_pool_bwd(
    dy: torch.Tensor, argmax: torch.Tensor, x: torch.Tensor, mean: torch.Tensor | None, invstd: torch.Tensor | None,
    weight: torch.Tensor | None, bias: torch.Tensor | None, batch_stats: bool, kernel: list[int], stride: list[int],
    padding: list[int],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return plugins.call(OP, "backward", x.device.type, dy, argmax, x, mean, invstd, weight, bias, batch_stats, kernel,
                        stride, padding)


@_bn_relu_pool_bwd.register_fake
def _(dy, argmax, x, mean, invstd, weight, bias, batch_stats, kernel, stride, padding):
    stats = compute_dtype(x.dtype)
    c = x.shape[1]
    return (torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=_layout(x)),
            x.new_empty(c if weight is not None else 0, dtype=stats), x.new_empty(c if bias is not None else 0,
                                                                                   dtype=stats))


def _setup_context(ctx, inputs, output):
    x, mean, invstd, weight, bias, batch_stats, kernel, stride, padding = inputs
    _y, argmax = output
    ctx.save_for_backward(x, mean, invstd, weight, bias, argmax)
    ctx.pool = (batch_stats, kernel, stride, padding)


def _backward(ctx, dy, _dargmax):
    x, mean, invstd, weight, bias, argmax = ctx.saved_tensors
    batch_stats, kernel, stride, padding = ctx.pool
    dx, dw, db = _bn_relu_pool_bwd(dy, argmax, x, mean, invstd, weight, bias, batch_stats, kernel, stride, padding)
    return (dx, None, None, dw if weight is not None else None, db if bias is not None else None,
            None, None, None, None)


_bn_relu_pool_fwd.register_autograd(_backward, setup_context=_setup_context, public="bn_relu_pool",
                                    reference="hetrain.ops.bn_relu_pool_ref (relu_pool_ref without BatchNorm)",
                                    family=OP)


# --- functional face ---------------------------------------------------------------------------

def _stride_or_kernel(name: str, stride: object, kernel: list[int]) -> list[int]:
    """The pool's ``stride`` as (height, width). None, or an empty tuple or list, is ``F.max_pool2d``'s own default:
    the kernel. ``nn.MaxPool2d`` keeps the stride it was given, ``()`` included; ``unfusable_reason`` parses it
    here too, so a stride the kernels cannot take leaves the module to torch rather than raising."""
    # `not stride` only for a sequence: for a NumPy integer it is an array, not a bool.
    if stride is None or (isinstance(stride, tuple | list) and not stride):
        return kernel
    return _pair(name, "stride", stride)


def _pool_args(name, x, kernel_size, stride, padding):
    kernel = _pair(name, "kernel_size", kernel_size)
    stride = _stride_or_kernel(name, stride, kernel)
    padding = _pair(name, "padding", padding)
    if min(kernel) < 1 or min(stride) < 1:
        raise ValueError(f"{name}: kernel_size and stride must be >= 1, got {kernel} and {stride}")
    if kernel[0] * kernel[1] > MAX_WINDOW:
        raise ValueError(f"{name}: the pooling window {kernel} has more than {MAX_WINDOW} positions "
                         "(the in-window argmax is stored as uint8)")
    if min(padding) < 0 or 2 * padding[0] > kernel[0] or 2 * padding[1] > kernel[1]:
        raise ValueError(f"{name}: padding must be >= 0 and at most half the kernel, got padding {padding} "
                         f"for kernel {kernel}")
    if x.shape[2] == 0 or x.shape[3] == 0:  # the kernels refuse it too, where it read as a backend failure
        raise ValueError(f"{name}: x has no pixels (shape {tuple(x.shape)}); a window over padding alone has no "
                         "maximum to pool")
    h, w = x.shape[2] + 2 * padding[0], x.shape[3] + 2 * padding[1]
    if h < kernel[0] or w < kernel[1]:
        raise ValueError(f"{name}: the pooling kernel {kernel} is larger than the padded input ({h}x{w}); "
                         f"input shape {tuple(x.shape)}")
    return kernel, stride, padding


def _check_x(name, x):
    _args.require_tensor(name, "x", x, "a 4-D (N, C, H, W) floating tensor")
    if x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"{name}: x must be a 4-D (N, C, H, W) floating tensor, got shape {tuple(x.shape)} "
                         f"{x.dtype}")


def _check_conv_x(name, x, unbatched):
    """Checked before the convolution, so the error names the op called and x's own shape."""
    dims = (3, 4) if unbatched else (4,)
    what = "a 4-D (N, C, H, W) or 3-D unbatched (C, H, W)" if unbatched else "a 4-D (N, C, H, W)"
    _args.require_tensor(name, "x", x, f"{what} floating tensor")
    if x.dim() not in dims or not x.is_floating_point():
        hint = "" if unbatched else "; for one image pass x.unsqueeze(0)"
        raise ValueError(f"{name}: x must be {what} floating tensor, got shape {tuple(x.shape)} {x.dtype}{hint}")


def _channel_vector(name, what, v, x, dtype):
    if v is None:
        return None
    _args.require_tensor(name, what, v, f"a torch.Tensor of shape ({x.shape[1]},)")
    if tuple(v.shape) != (x.shape[1],):
        raise ValueError(f"{name}: {what} must have shape ({x.shape[1]},) to match x's channels, got "
                         f"{tuple(v.shape)} (x is {tuple(x.shape)})")
    if not v.is_floating_point():  # an integer running mean would keep only the integer part of each update
        raise ValueError(f"{name}: {what} must be a floating tensor, got {v.dtype}; pass {what}.float()")
    if v.device != x.device:
        raise ValueError(f"{name}: {what} is on {v.device} but x is on {x.device}")
    return v.to(dtype) if v.dtype != dtype else v


def bn_relu_pool(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None, training: bool, momentum: float = 0.1, eps: float = 1e-5,
    kernel_size: int | tuple[int, int] = 2, stride: int | tuple[int, int] | None = None,
    padding: int | tuple[int, int] = 0,
) -> torch.Tensor:
    """``max_pool2d(relu(batch_norm(x, ...)), kernel_size, stride, padding)``, fused; arguments as in ``F.batch_norm``.

    ``training``: normalise with the batch statistics and update ``running_mean``/``running_var`` in place
    when given (momentum as in torch, running variance unbiased); otherwise use the running statistics.
    Runs in x's dtype with float32 accumulation (float64 for float64); weight, bias and the running
    statistics may be float32 for a bf16/fp16 x, as under autocast.
    """
    name = "hetrain.ops.bn_relu_pool"
    _check_x(name, x)
    kernel, stride, padding = _pool_args(name, x, kernel_size, stride, padding)
    stats = compute_dtype(x.dtype)
    weight = _channel_vector(name, "weight", weight, x, stats)
    bias = _channel_vector(name, "bias", bias, x, stats)
    if (running_mean is None) != (running_var is None):
        raise ValueError(f"{name}: give both running_mean and running_var or neither")
    for what, v in (("running_mean", running_mean), ("running_var", running_var)):
        _channel_vector(name, what, v, x, stats)
    eps = _args.eps_value(name, eps)
    if training:
        _refuse_batched(name, x, running_mean, running_var)
        momentum = _momentum_value(name, momentum)
        if not eps > 0:
            raise ValueError(f"{name}: eps must be positive when training, got {eps}")
        if x.shape[0] * x.shape[2] * x.shape[3] == 1:
            raise ValueError(f"{name}: expected more than 1 value per channel when training, got input of shape "
                             f"{tuple(x.shape)}")
        mean, invstd = _batch_stats(x, running_mean, running_var, momentum, eps)
    else:
        if running_mean is None:
            raise ValueError(f"{name}: training=False normalises with running_mean and running_var; none given")
        mean = running_mean.detach().to(stats)
        invstd = torch.rsqrt(running_var.detach().to(stats) + eps)
    y, _argmax = _bn_relu_pool_fwd(x, mean, invstd, weight, bias, bool(training), kernel, stride, padding)
    return y


def _momentum_value(name, momentum):
    """``momentum`` as a float; NumPy numbers are taken, as torch's BatchNorm2d takes them."""
    if isinstance(momentum, torch.Tensor):
        raise ValueError(f"{name}: momentum must be a Python number, got a tensor; pass float(momentum)")
    if not _args.is_number(momentum):
        hint = ("; for BatchNorm's cumulative average (momentum=None) pass 1 / num_batches_tracked, as "
                "ConvBNReLUPool2d does") if momentum is None else ""
        raise ValueError(f"{name}: momentum must be a number, got {momentum!r}{hint}")
    return float(momentum)


def _refuse_batched(name, *tensors):
    """The batch statistics kernel writes the running statistics in place, which torch's batching fallback cannot
    run per sample: said naming the op, not the fallback's error for an internal op."""
    if any(batched_by_vmap(t) for t in tensors):
        raise RuntimeError(f"{name}: training (batch statistics) on a tensor torch.vmap batches is not supported, "
                           "with or without torch.func.grad: its statistics kernel updates the running statistics in "
                           "place. Use hetrain.ops.bn_relu_pool_ref under vmap, or training=False")


def _batch_stats(x, running_mean, running_var, momentum, eps):
    """The batch statistics (no gradient: the epilogue's backward covers them), updating the running ones."""
    stats = compute_dtype(x.dtype)
    if running_mean is None:
        return _bn_stats(x.detach(), None, None, momentum, eps)
    # The kernels update float32 (float64) buffers in place; others go through a copy.
    direct = all(v.dtype == stats and v.is_contiguous() for v in (running_mean, running_var))
    rm = running_mean if direct else running_mean.detach().to(stats).contiguous()
    rv = running_var if direct else running_var.detach().to(stats).contiguous()
    mean, invstd = _bn_stats(x.detach(), rm, rv, momentum, eps)
    if not direct:
        with torch.no_grad():
            running_mean.copy_(rm)
            running_var.copy_(rv)
    return mean, invstd


def relu_pool(x: torch.Tensor, kernel_size: int | tuple[int, int] = 2, stride: int | tuple[int, int] | None = None,
              padding: int | tuple[int, int] = 0) -> torch.Tensor:
    """``max_pool2d(relu(x), ...)``, fused: one read of x, the argmax kept as uint8 for backward."""
    name = "hetrain.ops.relu_pool"
    _check_x(name, x)
    kernel, stride, padding = _pool_args(name, x, kernel_size, stride, padding)
    y, _argmax = _bn_relu_pool_fwd(x, None, None, None, None, False, kernel, stride, padding)
    return y


def conv_bn_relu_pool(
    x: torch.Tensor, conv_weight: torch.Tensor, conv_bias: torch.Tensor | None, bn_weight: torch.Tensor | None,
    bn_bias: torch.Tensor | None, running_mean: torch.Tensor | None, running_var: torch.Tensor | None,
    training: bool, momentum: float = 0.1, eps: float = 1e-5, *, conv_stride: int | tuple[int, int] = 1,
    conv_padding: int | tuple[int, int] | str = 0, conv_dilation: int | tuple[int, int] = 1, conv_groups: int = 1,
    kernel_size: int | tuple[int, int] = 2, stride: int | tuple[int, int] | None = None,
    padding: int | tuple[int, int] = 0,
) -> torch.Tensor:
    """Conv2d (``F.conv2d``, cuDNN / the CPU library) followed by the fused BatchNorm -> ReLU -> MaxPool epilogue.

    Under autocast the convolution runs in the autocast dtype (autocast casts ``F.conv2d``) and the epilogue
    in the convolution output's dtype with float32 statistics, so the output is bf16 under bf16 autocast,
    as the unfused torch block gives.

    An unbatched (C, H, W) x is refused, as torch's ``BatchNorm2d`` refuses it.
    """
    _check_conv_x("hetrain.ops.conv_bn_relu_pool", x, unbatched=False)
    conv = F.conv2d(x, conv_weight, conv_bias, conv_stride, conv_padding, conv_dilation, conv_groups)
    return bn_relu_pool(conv, bn_weight, bn_bias, running_mean, running_var, training, momentum, eps,
                        kernel_size, stride, padding)


def conv_relu_pool(
    x: torch.Tensor, conv_weight: torch.Tensor, conv_bias: torch.Tensor | None = None, *,
    conv_stride: int | tuple[int, int] = 1, conv_padding: int | tuple[int, int] | str = 0,
    conv_dilation: int | tuple[int, int] = 1, conv_groups: int = 1, kernel_size: int | tuple[int, int] = 2,
    stride: int | tuple[int, int] | None = None, padding: int | tuple[int, int] = 0,
) -> torch.Tensor:
    """Conv2d followed by the fused ReLU -> MaxPool epilogue.

    x is (N, C, H, W) or, as ``F.conv2d`` takes it, one unbatched (C, H, W) sample: what ``torch.vmap`` passes
    per sample.
    """
    _check_conv_x("hetrain.ops.conv_relu_pool", x, unbatched=True)
    unbatched = x.dim() == 3
    conv = F.conv2d(x.unsqueeze(0) if unbatched else x, conv_weight, conv_bias, conv_stride, conv_padding,
                    conv_dilation, conv_groups)
    y = relu_pool(conv, kernel_size, stride, padding)
    return y.squeeze(0) if unbatched else y
