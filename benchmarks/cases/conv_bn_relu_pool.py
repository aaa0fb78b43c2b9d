"""Conv -> BatchNorm2d (training) -> ReLU -> MaxPool2d, forward+backward: eager, torch.compile, hetrain.

Shapes: the ResNet stem (64x3x224x224, 7x7 stride 2, max pool 3x3 stride 2) and a mid block (64x64x56x56,
3x3, max pool 2x2) on the GPU; a smaller mid block on the CPU.

The convolution is the same call in every column (F.conv2d), so the epilogue's cost is the block's time
minus the ``conv`` entry (the convolution alone, forward+backward, timed in the same run).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from benchmarks.cases import Case, dtype_name
from hetrain.ops.conv_bn_relu_pool import conv_bn_relu_pool


@dataclass(frozen=True)
class Block:
    """One ResNet block shape: input (n, c_in, hw, hw), a conv to c_out, then a max pool."""

    n: int
    c_in: int
    c_out: int
    hw: int
    conv_kernel: int = 3
    conv_stride: int = 1
    conv_padding: int = 1
    pool_kernel: int = 2
    pool_stride: int = 2
    pool_padding: int = 0

    @property
    def conv_hw(self) -> int:
        return (self.hw + 2 * self.conv_padding - self.conv_kernel) // self.conv_stride + 1

    @property
    def pool_hw(self) -> int:
        return (self.conv_hw + 2 * self.pool_padding - self.pool_kernel) // self.pool_stride + 1

    @property
    def name(self) -> str:
        return (f"{self.n}x{self.c_in}x{self.hw}x{self.hw} conv{self.conv_kernel}s{self.conv_stride}->{self.c_out} "
                f"pool{self.pool_kernel}s{self.pool_stride}")

    def epilogue_bytes(self, itemsize: int) -> int:
        """Epilogue traffic, each tensor once: forward reads the conv output and writes y; backward reads dy
        and the conv output and writes the conv output's gradient."""
        conv_out = self.n * self.c_out * self.conv_hw**2 * itemsize
        pooled = self.n * self.c_out * self.pool_hw**2 * itemsize
        return 3 * conv_out + 2 * pooled


MID = Block(64, 64, 64, 56)  # ResNet mid block: 3x3 conv, 2x2 pool
STEM = Block(64, 3, 64, 224, conv_kernel=7, conv_stride=2, conv_padding=3, pool_kernel=3, pool_padding=1)  # 7x7 s2


def _make(block: Block, dtype: torch.dtype, device: str):
    b = block

    def make():
        def param(*shape, scale=1.0, shift=0.0):
            return (torch.randn(*shape, dtype=dtype, device=device) * scale + shift).requires_grad_()

        x = param(b.n, b.c_in, b.hw, b.hw).contiguous(memory_format=torch.channels_last).detach().requires_grad_()
        w = param(b.c_out, b.c_in, b.conv_kernel, b.conv_kernel, scale=0.1).contiguous(
            memory_format=torch.channels_last).detach().requires_grad_()
        bn_w, bn_b = param(b.c_out, shift=1.0), param(b.c_out)
        running_mean = torch.zeros(b.c_out, dtype=dtype, device=device)
        running_var = torch.ones(b.c_out, dtype=dtype, device=device)
        dy = torch.randn(b.n, b.c_out, b.pool_hw, b.pool_hw, dtype=dtype, device=device).contiguous(
            memory_format=torch.channels_last)
        leaves = (x, w, bn_w, bn_b)

        def conv(x, w):
            return F.conv2d(x, w, stride=b.conv_stride, padding=b.conv_padding)

        def eager(x, w, bn_w, bn_b):
            y = F.batch_norm(conv(x, w), running_mean, running_var, bn_w, bn_b, True, 0.1, 1e-5)
            return F.max_pool2d(F.relu(y), b.pool_kernel, b.pool_stride, b.pool_padding)

        def fused(x, w, bn_w, bn_b):
            return conv_bn_relu_pool(x, w, None, bn_w, bn_b, running_mean, running_var, True,
                                     conv_stride=b.conv_stride, conv_padding=b.conv_padding,
                                     kernel_size=b.pool_kernel, stride=b.pool_stride, padding=b.pool_padding)

        conv_dy = torch.randn(b.n, b.c_out, b.conv_hw, b.conv_hw, dtype=dtype, device=device).contiguous(
            memory_format=torch.channels_last)
        compiled = torch.compile(eager)

        def step(fn, grad=dy, inputs=leaves):
            return lambda: torch.autograd.grad(fn(*inputs), inputs, grad)

        return {"eager": step(eager), "compile": step(compiled), "hetrain": step(fused),
                "conv": step(conv, conv_dy, (x, w))}

    return make


NOTES = {"layout": "channels_last", "epilogue": "hetrain/eager time minus the 'conv' entry"}


def cpu_cases() -> list[Case]:
    block = Block(8, 64, 64, 56)
    return [Case("conv_bn_relu_pool", block.name, "float32", _make(block, torch.float32, "cpu"),
                 block.epilogue_bytes(4), notes=NOTES, backend_op="bn_relu_pool")]


def gpu_cases(device: str = "cuda", quick: bool = False) -> list[Case]:
    blocks = [Block(2, 16, 16, 28), Block(2, 3, 16, 32, 7, 2, 3, 3, 2, 1)] if quick else [STEM, MID]
    cases = []
    for dtype in (torch.bfloat16,) if quick else (torch.float32, torch.bfloat16):
        for block in blocks:
            cases.append(Case("conv_bn_relu_pool", block.name, dtype_name(dtype), _make(block, dtype, device),
                              block.epilogue_bytes(dtype.itemsize), notes=NOTES, backend_op="bn_relu_pool"))
    return cases
