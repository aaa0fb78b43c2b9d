"""A small ResNet for image classification whose stem runs as one hetrain fused block.

The stem (conv 7x7 stride 2 -> BatchNorm -> ReLU -> max-pool 3x3 stride 2) is
:class:`hetrain.nn.ConvBNReLUPool2d`: the convolution on oneDNN / cuDNN, the rest in one fused epilogue.
Stages of basic residual blocks follow (conv-BN-ReLU-conv-BN plus a shortcut, as in ResNet-18/34), each
stage after the first halving the resolution with a stride-2 first block; then global average pooling
and a linear head. Conv -> BN -> ReLU without a pool is not a hetrain op, so the blocks are torch modules.

``fused=False`` builds the stem as ``nn.Sequential(Conv2d, BatchNorm2d, ReLU, MaxPool2d)``: the same
state_dict keys, so checkpoints load both ways. ``channels_last=True`` (the default) keeps weights and
activations NHWC, the layout the fused epilogue and the fastest cuDNN / oneDNN convolutions read.
:meth:`ResNet.stages` names the pieces a placement may put on different devices: ``stem``,
``layer1`` .. ``layer<n>``, ``head``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from hetrain.nn import ConvBNReLUPool2d
from hetrain.placement.pipeline import gpipe_forward, run_in_order


def _stem(in_channels: int, width: int, fused: bool) -> nn.Sequential:
    """(B, in_channels, H, W) -> (B, width, H/4, W/4): conv 7x7/2, BN, ReLU, max-pool 3x3/2."""
    if fused:
        return ConvBNReLUPool2d(in_channels, width, 7, stride=2, padding=3, pool_kernel_size=3, pool_stride=2,
                                pool_padding=1)
    return nn.Sequential(nn.Conv2d(in_channels, width, 7, stride=2, padding=3, bias=False), nn.BatchNorm2d(width),
                         nn.ReLU(), nn.MaxPool2d(3, stride=2, padding=1))


class BasicBlock(nn.Module):
    """``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``; a 1x1 conv + BN shortcut when the shape changes."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU()
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(y)) + shortcut)


class Head(nn.Module):
    """Global average pool and a linear classifier: (B, C, H, W) -> (B, num_classes)."""

    def __init__(self, channels: int, num_classes: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(x), 1))


class ResNet(nn.Module):
    """Fused stem, ``len(widths)`` stages of basic blocks (``blocks[i]`` in stage ``i``), pooled linear head."""

    # Batch entries the model takes, in order (read by hetrain.models.task.ClassificationTask).
    input_keys = ("images",)

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        widths: Sequence[int] = (16, 32, 64),
        blocks: Sequence[int] = (1, 1, 1),
        fused: bool = True,
        channels_last: bool = True,
        zero_init_residual: bool = True,
    ) -> None:
        super().__init__()
        widths, blocks = list(widths), list(blocks)
        if not widths or len(widths) != len(blocks):
            raise ValueError(f"hetrain: ResNet needs one block count per stage width, got widths={widths} and "
                             f"blocks={blocks}")
        if min(widths) < 1 or min(blocks) < 1 or in_channels < 1 or num_classes < 2:
            raise ValueError(f"hetrain: ResNet needs positive widths, blocks and in_channels and num_classes >= 2, "
                             f"got {widths=}, {blocks=}, {in_channels=}, {num_classes=}")
        self.in_channels = in_channels
        self.channels_last = channels_last
        self.stem = _stem(in_channels, widths[0], fused)
        self.layer_names: list[str] = []
        previous = widths[0]
        for i, (width, count) in enumerate(zip(widths, blocks, strict=True)):
            stride = 1 if i == 0 else 2
            stage = nn.Sequential(*(BasicBlock(previous if j == 0 else width, width, stride if j == 0 else 1)
                                    for j in range(count)))
            self.add_module(f"layer{i + 1}", stage)
            self.layer_names.append(f"layer{i + 1}")
            previous = width
        self.head = Head(previous, num_classes)
        self.micro_batches = 1  # > 1: forward runs the GPipe schedule (hetrain.callbacks.PipelineSplit sets it)
        self.checkpoint_stages: frozenset[str] = frozenset()  # stages that recompute activations in backward
        self._init_weights(zero_init_residual)
        if channels_last:
            self.to(memory_format=torch.channels_last)

    def _init_weights(self, zero_init_residual: bool) -> None:
        # He initialisation for ReLU networks; with zero_init_residual each block starts as the identity
        # (its last BN scale is 0), which lets a fresh network train at a higher learning rate.
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, BasicBlock) and zero_init_residual:
                nn.init.zeros_(module.bn2.weight)

    def stages(self) -> dict[str, nn.Module]:
        """The pieces a placement may put on different devices, by module path, in forward order."""
        return {"stem": self.stem, **{name: self.get_submodule(name) for name in self.layer_names}, "head": self.head}

    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] != self.in_channels:
            raise ValueError(f"hetrain: ResNet expects images of shape (B, {self.in_channels}, H, W), got "
                             f"{tuple(images.shape)}")
        return images.contiguous(memory_format=torch.channels_last) if self.channels_last else images

    def run_stage(self, name: str, x: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """One stage on the previous stage's output ``x`` (the images for the stem)."""
        return self.stem(self._prepare(x)) if name == "stem" else self.get_submodule(name)(x)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, in_channels, H, W) images -> (B, num_classes) logits.

        With ``micro_batches > 1`` each micro-batch is normalised with its own BatchNorm statistics and
        updates the running ones, as in any pipeline split of a BatchNorm network.
        """
        stages = list(self.stages().items())
        if self.micro_batches > 1 or self.checkpoint_stages:
            return gpipe_forward(stages, self.run_stage, (images,), self.micro_batches, self.checkpoint_stages)
        return run_in_order(stages, self.run_stage, (images,))
