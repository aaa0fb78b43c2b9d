"""What the row-wise Triton kernels share: accumulation dtype, one-row-per-program configs, program counts."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Statistics and accumulation type: float64 for float64 inputs, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def tl_compute(dtype: torch.dtype):
    """:func:`compute_dtype` as the Triton type a kernel's ``COMPUTE`` constexpr takes."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def row_config(op: str, N: int, dtype: torch.dtype, max_fused_bytes: int) -> dict:
    """BLOCK_N and num_warps for a kernel that holds one row of ``N`` elements in registers.

    ``max_fused_bytes`` bounds the row in the accumulation dtype (past it the kernels spill); a longer
    row is refused with an error that names the op and how to run it elsewhere.
    """
    block_n = triton.next_power_of_2(max(N, 1))
    if block_n * compute_dtype(dtype).itemsize > max_fused_bytes:
        raise ValueError(
            f"hetrain.{op} (triton): rows of {N} {dtype} elements exceed the fused limit of {max_fused_bytes} "
            f"bytes per row (counted in {compute_dtype(dtype)}); pin another backend, e.g. "
            f"HETRAIN_BACKEND={op}=torch"
        )
    return {"BLOCK_N": block_n, "num_warps": min(max(block_n // 256, 1), 16)}


def backward_programs(M: int, device: torch.device) -> int:
    """Programs of a backward kernel that walks blocks of rows: enough to fill the GPU, each with one partial row."""
    if device.type == "cuda":
        return max(1, min(M, 4 * torch.cuda.get_device_properties(device).multi_processor_count))
    return max(1, min(M, 4))


def dense(v: torch.Tensor | None) -> torch.Tensor | None:
    """``v`` with unit stride: the kernels read a weight or bias as ``W + cols``, so a strided or expanded
    (stride 0) vector, e.g. ``w[::2]`` or ``torch.ones(1).expand(n)``, would be read at the wrong places."""
    return v if v is None or v.is_contiguous() else v.contiguous()
