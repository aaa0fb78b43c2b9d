"""Conv3x3 -> BatchNorm2d (training) -> ReLU -> MaxPool2d 2x2, forward+backward: eager, torch.compile, hetrain.

The convolution is the same call in every column (F.conv2d), so the epilogue's cost is the block's time
minus the ``conv`` entry (the convolution alone, forward+backward, timed in the same run).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from benchmarks.cases import Case, dtype_name
from hetrain.ops.conv_bn_relu_pool import conv_bn_relu_pool


def _make(n: int, c: int, hw: int, dtype: torch.dtype, device: str):
    def make():
        def param(*shape, scale=1.0, shift=0.0):
            return (torch.randn(*shape, dtype=dtype, device=device) * scale + shift).requires_grad_()

        x = param(n, c, hw, hw).contiguous(memory_format=torch.channels_last).detach().requires_grad_()
        w = param(c, c, 3, 3, scale=0.1).contiguous(memory_format=torch.channels_last).detach().requires_grad_()
        bn_w, bn_b = param(c, shift=1.0), param(c)
        running_mean = torch.zeros(c, dtype=dtype, device=device)
        running_var = torch.ones(c, dtype=dtype, device=device)
        dy = torch.randn(n, c, hw // 2, hw // 2, dtype=dtype, device=device).contiguous(
            memory_format=torch.channels_last)
        leaves = (x, w, bn_w, bn_b)

        def eager(x, w, bn_w, bn_b):
            y = F.batch_norm(F.conv2d(x, w, padding=1), running_mean, running_var, bn_w, bn_b, True, 0.1, 1e-5)
            return F.max_pool2d(F.relu(y), 2)

        def fused(x, w, bn_w, bn_b):
            return conv_bn_relu_pool(x, w, None, bn_w, bn_b, running_mean, running_var, True, conv_padding=1,
                                     kernel_size=2)

        def conv(x, w):
            return F.conv2d(x, w, padding=1)

        conv_dy = torch.randn(n, c, hw, hw, dtype=dtype, device=device).contiguous(memory_format=torch.channels_last)
        compiled = torch.compile(eager)

        def step(fn, grad=dy, inputs=leaves):
            return lambda: torch.autograd.grad(fn(*inputs), inputs, grad)

        return {"eager": step(eager), "compile": step(compiled), "hetrain": step(fused),
                "conv": step(conv, conv_dy, (x, w))}

    return make


def cpu_cases() -> list[Case]:
    n, c, hw = 8, 64, 56
    elem = 4
    act = n * c * hw * hw * elem
    # Epilogue traffic counted once each: forward reads the conv output, writes y (1/4); backward reads
    # dy (1/4) and the conv output, writes its gradient.
    return [Case("conv_bn_relu_pool", f"{n}x{c}x{hw}x{hw}", "float32", _make(n, c, hw, torch.float32, "cpu"),
                 int(act * (1 + 0.25 + 0.25 + 1 + 1)),
                 notes={"layout": "channels_last", "epilogue": "hetrain/eager time minus the 'conv' entry"})]


def gpu_cases(device: str = "cuda", quick: bool = False) -> list[Case]:
    n, c, hw = (2, 16, 28) if quick else (64, 64, 56)  # the ResNet mid block; the 7x7 stem is not covered yet
    dtype = torch.bfloat16
    act = n * c * hw * hw * dtype.itemsize
    return [Case("conv_bn_relu_pool", f"{n}x{c}x{hw}x{hw}", dtype_name(dtype), _make(n, c, hw, dtype, device),
                 int(act * 3.5), notes={"layout": "channels_last", "epilogue": "time minus the 'conv' entry"})]
