"""``ConvBNReLUPool2d`` and ``ConvReLUPool2d``: a convolution block whose epilogue runs fused.

Both are ``nn.Sequential`` subclasses holding the very torch modules they replace (Conv2d, BatchNorm2d,
ReLU, MaxPool2d), so their state_dict is that of ``nn.Sequential(conv, bn, relu, pool)``: ``0.weight``
(``0.bias`` when the convolution has one), ``1.weight``, ``1.bias``, ``1.running_mean``,
``1.running_var``, ``1.num_batches_tracked``; checkpoints load both ways and ``block[1]`` is the
BatchNorm2d. Only ``forward`` differs: the convolution runs through its own module (cuDNN / the CPU
library), then :func:`hetrain.ops.conv_bn_relu_pool.bn_relu_pool` with the BatchNorm's own rules
(its ``training`` flag, momentum or a cumulative average when momentum is None,
``track_running_stats``).

Hooks on any of its modules, or on every module (``register_module_forward_hook``), make the block
call its modules one by one, as ``nn.Sequential`` does; so do children replaced, added or reconfigured since
construction such that the run no longer fits the kernel (``block[2] = nn.LeakyReLU()``, ``block.append(...)``,
``block[3].ceil_mode = True``: checked on every call), and an unbatched (C, H, W) image (one sample under
``torch.vmap``), which the kernels do not take. Hooks that only measure (hetrain's
FLOP counter, memory and churn profiling; a ``FlopCounterMode`` of your own is a hook) leave it fused, so measuring does
not change the numbers a step computes, and they see the block as one module.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from hetrain.nn._share import called_one_by_one
from hetrain.ops.conv_bn_relu_pool import MAX_WINDOW, _pair, _stride_or_kernel, bn_relu_pool, relu_pool


def unfusable_reason(conv: nn.Module, bn: nn.Module | None, relu: nn.Module, pool: nn.Module) -> str | None:
    """Why these modules cannot run as one fused block, or None when they can (``bn`` None: no BatchNorm)."""
    if not isinstance(conv, nn.Conv2d):
        return f"expected a Conv2d first, got {type(conv).__name__}"
    if bn is not None:
        if not isinstance(bn, nn.BatchNorm2d):
            return f"expected a BatchNorm2d after the Conv2d, got {type(bn).__name__}"
        if bn.num_features != conv.out_channels:
            return f"BatchNorm2d has {bn.num_features} features but the Conv2d gives {conv.out_channels} channels"
    if not isinstance(relu, nn.ReLU):
        return f"expected a ReLU, got {type(relu).__name__}"
    if not isinstance(pool, nn.MaxPool2d):
        return f"expected a MaxPool2d last, got {type(pool).__name__}"
    # The fused kernel reads their settings and never calls them: a subclass's own forward (a frozen BatchNorm, a
    # pool that averages) would be skipped. The Conv2d is called as a module, so any subclass of it is fine.
    for module, base in ((bn, nn.BatchNorm2d), (relu, nn.ReLU), (pool, nn.MaxPool2d)):
        if module is not None and type(module).forward is not base.forward:
            return f"{type(module).__name__} overrides {base.__name__}.forward, which the fused kernel would skip"
    try:
        kernel, padding, dilation = (_pair("MaxPool2d", what, getattr(pool, what))
                                     for what in ("kernel_size", "padding", "dilation"))
        _stride_or_kernel("MaxPool2d", pool.stride, kernel)  # the fused op parses it so on every call
    except ValueError as exc:
        return str(exc)
    if pool.ceil_mode or pool.return_indices or dilation != [1, 1]:
        return "MaxPool2d with ceil_mode, return_indices or dilation is not fused"
    if kernel[0] * kernel[1] > MAX_WINDOW or 2 * padding[0] > kernel[0] or 2 * padding[1] > kernel[1]:
        return f"MaxPool2d window {kernel} with padding {padding} is not fused"
    return None


def conv_bn_relu_pool_forward(x: torch.Tensor, conv: nn.Conv2d, bn: nn.BatchNorm2d, pool: nn.MaxPool2d) -> torch.Tensor:
    """``pool(relu(bn(conv(x))))`` with the epilogue fused, read from the live modules on every call."""
    y = conv(x)
    # BatchNorm's own rules, as torch.nn.modules.batchnorm._BatchNorm.forward applies them.
    factor = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    batch_stats = bn.training or (bn.running_mean is None and bn.running_var is None)
    track = not bn.training or bn.track_running_stats
    return bn_relu_pool(y, bn.weight, bn.bias, bn.running_mean if track else None,
                        bn.running_var if track else None, batch_stats, factor, bn.eps, pool.kernel_size,
                        pool.stride, pool.padding)


def conv_relu_pool_forward(x: torch.Tensor, conv: nn.Conv2d, pool: nn.MaxPool2d) -> torch.Tensor:
    """``pool(relu(conv(x)))`` with the epilogue fused."""
    return relu_pool(conv(x), pool.kernel_size, pool.stride, pool.padding)


def _fusable_now(modules: list[nn.Module], x: torch.Tensor, count: int) -> bool:
    """Whether a block's forward may run fused, before its children's types and settings are checked (the caller's
    ``unfusable_reason``, read on every call: a child replaced, added or reconfigured since construction runs as the
    Sequential it now is). Not for an unbatched (C, H, W) image, which the kernels do not take (torch's modules answer
    for it, as under ``torch.vmap``), nor where hooks expect each child's call."""
    return len(modules) == count and x.dim() == 4 and not called_one_by_one(modules)


def _sequential_slice(module: nn.Sequential, idx: slice) -> nn.Sequential:
    # A slice is a plain Sequential: the fused forward needs all of its parts.
    return nn.Sequential(OrderedDict(list(module._modules.items())[idx]))


class ConvBNReLUPool2d(nn.Sequential):
    """``nn.Sequential(Conv2d, BatchNorm2d, ReLU, MaxPool2d)`` with BatchNorm, ReLU and pooling fused."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int], stride: int = 1,
        padding: int | tuple[int, int] | str = 0, dilation: int = 1, groups: int = 1, bias: bool = False,
        eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True, track_running_stats: bool = True,
        pool_kernel_size: int | tuple[int, int] = 2, pool_stride: int | tuple[int, int] | None = None,
        pool_padding: int | tuple[int, int] = 0, device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        factory = {"device": device, "dtype": dtype}
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, **factory),
            nn.BatchNorm2d(out_channels, eps, momentum, affine, track_running_stats, **factory),
            nn.ReLU(),
            nn.MaxPool2d(pool_kernel_size, pool_stride, pool_padding),
        )
        reason = unfusable_reason(*self)
        if reason is not None:
            raise ValueError(f"hetrain.nn.ConvBNReLUPool2d: {reason}")

    @classmethod
    def from_modules(cls, conv: nn.Conv2d, bn: nn.BatchNorm2d, relu: nn.ReLU, pool: nn.MaxPool2d) -> ConvBNReLUPool2d:
        """The fused block around these very modules (parameters and buffers shared, nothing copied)."""
        reason = unfusable_reason(conv, bn, relu, pool)
        if reason is not None:
            raise ValueError(f"hetrain.nn.ConvBNReLUPool2d.from_modules: {reason}")
        new = cls.__new__(cls)
        nn.Sequential.__init__(new, conv, bn, relu, pool)
        return new

    def __getitem__(self, idx):
        return _sequential_slice(self, idx) if isinstance(idx, slice) else super().__getitem__(idx)

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 - nn.Sequential's own argument name
        modules = list(self._modules.values())
        if not _fusable_now(modules, input, 4) or unfusable_reason(*modules) is not None:
            return nn.Sequential.forward(self, input)
        conv, bn, _relu, pool = modules
        return conv_bn_relu_pool_forward(input, conv, bn, pool)


class ConvReLUPool2d(nn.Sequential):
    """``nn.Sequential(Conv2d, ReLU, MaxPool2d)`` with ReLU and pooling fused."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int], stride: int = 1,
        padding: int | tuple[int, int] | str = 0, dilation: int = 1, groups: int = 1, bias: bool = True,
        pool_kernel_size: int | tuple[int, int] = 2, pool_stride: int | tuple[int, int] | None = None,
        pool_padding: int | tuple[int, int] = 0, device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, device=device,
                      dtype=dtype),
            nn.ReLU(),
            nn.MaxPool2d(pool_kernel_size, pool_stride, pool_padding),
        )
        reason = unfusable_reason(self[0], None, self[1], self[2])
        if reason is not None:
            raise ValueError(f"hetrain.nn.ConvReLUPool2d: {reason}")

    @classmethod
    def from_modules(cls, conv: nn.Conv2d, relu: nn.ReLU, pool: nn.MaxPool2d) -> ConvReLUPool2d:
        """The fused block around these very modules (parameters shared, nothing copied)."""
        reason = unfusable_reason(conv, None, relu, pool)
        if reason is not None:
            raise ValueError(f"hetrain.nn.ConvReLUPool2d.from_modules: {reason}")
        new = cls.__new__(cls)
        nn.Sequential.__init__(new, conv, relu, pool)
        return new

    def __getitem__(self, idx):
        return _sequential_slice(self, idx) if isinstance(idx, slice) else super().__getitem__(idx)

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 - nn.Sequential's own argument name
        modules = list(self._modules.values())
        if not _fusable_now(modules, input, 3) or unfusable_reason(modules[0], None, *modules[1:]) is not None:
            return nn.Sequential.forward(self, input)
        conv, _relu, pool = modules
        return conv_relu_pool_forward(input, conv, pool)
