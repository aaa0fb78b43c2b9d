"""What this host's CPU does fast, for choices that depend on it (precision, GEMM dtypes)."""

from __future__ import annotations

import functools

import torch


@functools.cache
def has_fast_bf16() -> bool:
    """Whether the CPU has bf16 dot products in hardware: AVX512-BF16 (Cooper Lake, Zen 4 and later) or AMX
    (Sapphire Rapids and later). Without them oneDNN emulates bf16, and bf16 GEMMs and autocast are slower than
    float32; with AMX a bf16 GEMM ran 3-6x faster than the float32 one (2048 x 768 x 8192)."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
