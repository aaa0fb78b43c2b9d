"""A learnable image classification task generated from a seed (nothing to download), and its DataModule.

Class ``c`` of ``num_classes`` is a sinusoidal grating at orientation ``pi * c / num_classes``. Each image
draws its own spatial frequency, phase, colour and a small orientation jitter (less than half the gap
between classes), and Gaussian noise of standard deviation ``noise`` is added, so only the orientation
tells the classes apart: a small convolutional network learns it in a few hundred steps on a CPU.
"""

from __future__ import annotations

import math

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from hetrain.data.splits import SeededSplits


class SyntheticImages(Dataset):
    """``size`` images (channels, image_size, image_size), float32: a grating of about unit variance plus the
    noise; labels balanced.

    The same arguments give the same images and labels, whatever the process or the order of access.
    """

    def __init__(self, size: int, num_classes: int = 10, image_size: int = 32, channels: int = 3,
                 noise: float = 1.0, seed: int = 0) -> None:
        if size < 1 or num_classes < 2 or image_size < 4 or channels < 1:
            raise ValueError(f"hetrain: need size >= 1, num_classes >= 2, image_size >= 4 and channels >= 1, got "
                             f"{size=}, {num_classes=}, {image_size=}, {channels=}")
        if not (math.isfinite(noise) and noise >= 0):  # nan passed `noise < 0` and made every image nan
            raise ValueError(f"hetrain: noise is a standard deviation and must be finite and >= 0, got {noise=}")
        g = torch.Generator().manual_seed(seed)
        # Every class the same number of times (to within one), in a seeded order.
        self.labels = (torch.arange(size) % num_classes)[torch.randperm(size, generator=g)]
        gap = math.pi / num_classes
        theta = self.labels * gap + (torch.rand(size, generator=g) - 0.5) * 0.5 * gap
        cycles = 1.5 + 2.5 * torch.rand(size, generator=g)  # periods across the image: 1.5 .. 4
        phase = 2 * math.pi * torch.rand(size, generator=g)
        colour = torch.randn(size, channels, generator=g)
        # Norm sqrt(2 * channels): the grating (mean square 1/2) has unit variance per pixel on average.
        colour = colour / colour.norm(dim=1, keepdim=True) * math.sqrt(2 * channels)
        pos = torch.arange(image_size, dtype=torch.float32) / image_size
        # Distance along the grating's direction: (N, H, W), x along the last dimension, y along the middle.
        along = torch.cos(theta)[:, None, None] * pos[None, None, :] + torch.sin(theta)[:, None, None] * pos[:, None]
        wave = torch.sin(2 * math.pi * cycles[:, None, None] * along + phase[:, None, None])  # (N, H, W)
        noise_field = torch.randn(size, channels, image_size, image_size, generator=g)
        self.images = colour[:, :, None, None] * wave[:, None] + noise * noise_field

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"images": self.images[index], "labels": self.labels[index]}


class SyntheticImageDataModule(SeededSplits, pl.LightningDataModule):
    """Train and validation splits of :class:`SyntheticImages`, drawn from ``seed`` and ``seed + 1``.

    Images have one fixed shape, so torch's DataLoader batches them as they are (the ring buffer and
    token budgets of hetrain.data serve variable-length text); batches are dicts of ``images``
    (B, channels, image_size, image_size) and ``labels`` (B,).
    """

    def __init__(
        self,
        num_classes: int = 10,
        image_size: int = 32,
        channels: int = 3,
        noise: float = 1.0,
        train_size: int = 4096,
        val_size: int = 512,
        batch_size: int = 64,
        num_workers: int = 0,
        pin_memory: bool | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()

    def _split(self, size: int, seed: int) -> SyntheticImages:
        h = self.hparams
        return SyntheticImages(size, h.num_classes, h.image_size, h.channels, h.noise, seed)

    def train_dataloader(self) -> DataLoader:
        return self._torch_loader(self.train_set, True, persistent_workers=self.hparams.num_workers > 0)

    def val_dataloader(self) -> DataLoader:
        return self._torch_loader(self.val_set, False, persistent_workers=self.hparams.num_workers > 0)
