"""What the row-wise Triton kernels share: the accumulation type, one-row-per-program configs, program counts."""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from hetrain.ops._op import compute_dtype


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


@functools.cache
def _multiprocessors(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def multiprocessors(device: torch.device) -> int:
    """The GPU's multiprocessor count, read once per device (a properties lookup on every call cost microseconds
    of host time per backward)."""
    return _multiprocessors(device.index if device.index is not None else torch.cuda.current_device())


def backward_programs(M: int, device: torch.device) -> int:
    """Programs of a backward kernel that walks blocks of rows: enough to fill the GPU, each with one partial row."""
    if device.type == "cuda":
        return max(1, min(M, 4 * multiprocessors(device)))
    return max(1, min(M, 4))


def partial_rows(count: int, programs: int, N: int, M: int, dtype: torch.dtype,
                 device: torch.device) -> torch.Tensor:
    """(count, programs, N): one partial row per program for each of ``count`` parameter gradients.

    Every program stores its row, so the buffer needs clearing (a kernel launch per gradient) only when no
    program runs (``M == 0``). Each gradient's block starts 16-byte aligned, as Triton specialises its pointers.
    """
    per_block = 16 // torch.empty((), dtype=dtype).element_size()
    span = -(-programs * N // per_block) * per_block
    make = torch.zeros if M == 0 else torch.empty
    return make((count, span), dtype=dtype, device=device)[:, :programs * N].view(count, programs, N)


def sum_partials(parts: torch.Tensor, dtype: torch.dtype) -> list[torch.Tensor]:
    """Each gradient (N,) in ``dtype``: its partial rows summed in the accumulation dtype, then cast. Separate
    tensors, not views of one: a custom op's outputs may not alias each other."""
    return [part.sum(0).to(dtype) for part in parts]


def dense(v: torch.Tensor | None) -> torch.Tensor | None:
    """``v`` with unit stride: the kernels read a weight or bias as ``W + cols``, so a strided or expanded
    (stride 0) vector, e.g. ``w[::2]`` or ``torch.ones(1).expand(n)``, would be read at the wrong places."""
    return v if v is None or v.is_contiguous() else v.contiguous()
