"""Triton dropout kernel and its launcher, with the mask of the ``cpu`` and ``torch`` backends.

Element ``i`` of the flattened (row-major) tensor is kept when the keyed hash of csrc/dropout_math.h,
evaluated on ``(seed, offset + i)`` in 32-bit unsigned arithmetic, clears the integer threshold of ``p``
(``kept``, shared with the fused dropout_add_layer_norm kernels), so a stream gives the same mask here as
on the CPU. Dropout is diagonal: backward is the same kernel applied to the upstream gradient with the
same stream. Each program handles ``BLOCK`` elements.
"""

from __future__ import annotations

import math
import struct

import torch
import triton
import triton.language as tl

from hetrain.ops.rng import stream
from hetrain.ops.triton._aot import AotSpec, BenchShapes, aot_spec
from hetrain.ops.triton._rows import tl_compute

_M32 = 0xFFFFFFFF


@triton.jit
def _mix32(h):
    # MurmurHash3's 32-bit finaliser on uint32 values (csrc/dropout_math.h's mix32): products wrap mod 2^32.
    h ^= h >> 16
    h *= 0x85EBCA6B
    h ^= h >> 13
    h *= 0xC2B2AE35
    h ^= h >> 16
    return h


@triton.jit
def join64(lo, hi):
    """The int64 whose low and high 32 bits are the int32 bit patterns ``lo`` and ``hi``."""
    return (hi.to(tl.int64) << 32) | lo.to(tl.uint32, bitcast=True).to(tl.int64)


@triton.jit
def kept(seed_lo, seed_hi, first, lanes, threshold):
    """Whether the elements at stream indices ``first + lanes`` of the stream ``seed`` (two int32 bit patterns)
    are kept: csrc/dropout_math.h's 24-bit draw against its integer threshold, so every backend agrees.

    ``first``: an int64 scalar; ``lanes``: non-negative int32 offsets from it. Their high index word is
    first's or, past the point where the low word wraps, the next one (csrc/dropout_math.h's run_keys): both
    keys are made once per program, so each element takes two mixes rather than four, the arithmetic that
    bounded the kernel (bf16 and fp32 dropout took the same 0.068 ms on an H200).
    """
    key_lo = _mix32(seed_lo.to(tl.uint32, bitcast=True) ^ 0x9E3779B9)
    first_lo = (first & 0xFFFFFFFF).to(tl.uint32)
    first_hi = (first >> 32).to(tl.uint32)
    seed_key = seed_hi.to(tl.uint32, bitcast=True) + 0x7F4A7C15
    key_hi = _mix32(seed_key ^ _mix32(first_hi + 0x632BE5AB))
    key_hi_next = _mix32(seed_key ^ _mix32(first_hi + 0x632BE5AC))  # the word after first_hi
    index_lo = first_lo + lanes.to(tl.uint32)  # wraps where the high word steps
    key = tl.where(index_lo < first_lo, key_hi_next, key_hi)
    return (_mix32(_mix32(index_lo ^ key_lo) ^ key) >> 8) >= threshold


@triton.jit
def stream_start(Stream, seed_lo, seed_hi, offset_lo, offset_hi, stream_in_memory):
    """The launch's seed (two int32 bit patterns) and the stream index of its element 0 (int64).

    From the arguments, or, for a call captured in a CUDA graph (``stream_in_memory`` 1), from the int64
    ``(seed, offset)`` at ``Stream`` on the device, which the graph's own draw rewrites on every replay
    (:func:`hetrain.ops.rng.dropout_stream`). A run-time choice, not a constexpr: one compiled kernel serves both,
    so the kernel a warm-up before a capture loads is the one the capture launches. Compiling and loading a
    second one inside the capture fails: CUDA forbids loading a module while a stream captures.
    """
    if stream_in_memory != 0:
        seed = tl.load(Stream)
        lo = seed.to(tl.int32)  # the low word: a truncating cast
        hi = (seed >> 32).to(tl.int32)
        first = tl.load(Stream + 1)
    else:
        lo = seed_lo
        hi = seed_hi
        first = join64(offset_lo, offset_hi)
    return lo, hi, first


# Seeds, offsets, threshold, scale and where the stream is vary per call: never specialised on their values, so
# one compilation serves all.
STREAM_ARGS = ["seed_lo", "seed_hi", "offset_lo", "offset_hi", "threshold", "stream_in_memory"]


@triton.jit(do_not_specialize=[*STREAM_ARGS, "scale_bits"])
def _dropout(
    X,  # (numel,) input (x forward, dy backward), contiguous
    Y,  # (numel,) output, contiguous
    Stream,  # int64 (seed, offset), read only if stream_in_memory (else empty: a null pointer)
    numel,
    seed_lo,  # low 32 bits of the seed, as an int32 bit pattern
    seed_hi,  # high 32 bits of the seed, as an int32 bit pattern
    offset_lo,  # low 32 bits of the stream index of element 0, as an int32 bit pattern
    offset_hi,  # its high 32 bits
    threshold,  # a 24-bit draw below this is dropped: ceil(p * 2^24)
    scale_bits,  # the float64 bits of 1 / (1 - p), exact whatever COMPUTE is
    stream_in_memory,  # 1: the seed and offset come from Stream, not the four arguments above
    COMPUTE: tl.constexpr,  # tl.float32, or tl.float64 for float64 inputs
    BLOCK: tl.constexpr,
):
    start = tl.program_id(0).to(tl.int64) * BLOCK  # int64: numel may pass 2**31
    lanes = tl.arange(0, BLOCK)
    offsets = start + lanes
    mask = offsets < numel
    seed_lo, seed_hi, first = stream_start(Stream, seed_lo, seed_hi, offset_lo, offset_hi, stream_in_memory)
    keep = kept(seed_lo, seed_hi, first + start, lanes, threshold)
    scale = scale_bits.to(tl.float64, bitcast=True).to(COMPUTE)
    x = tl.load(X + offsets, mask=mask, other=0.0).to(COMPUTE)
    y = tl.where(keep, x * scale, 0.0)
    tl.store(Y + offsets, y.to(Y.dtype.element_ty), mask=mask)


def launch_config(dtype: torch.dtype) -> dict:
    """Elements per program and warps: 2048 for 16-bit dtypes, 1024 otherwise, so each thread makes two
    or more 16-byte loads.

    One block size per dtype whatever the size, so a dtype compiles once; a small tensor masks the lanes it lacks.
    """
    return {"BLOCK": 2048 if dtype.itemsize <= 2 else 1024, "num_warps": 4}


def _int32_bits(v: int) -> int:
    """A uint32 value as the int32 with the same bits: always typed i32, so never a second compilation."""
    return v - (1 << 32) if v >= 1 << 31 else v


def split64(v: int) -> tuple[int, int]:
    """A 64-bit value as two int32 bit patterns (low, high): always typed i32, whatever the value."""
    v &= 0xFFFFFFFFFFFFFFFF
    return _int32_bits(v & _M32), _int32_bits(v >> 32)


def stream_args(seed: torch.Tensor, p: float, device: torch.device, in_memory: bool | None = None) -> dict:
    """The launch arguments of a draw from the stream ``seed`` (int64 ``(seed[, offset])``) with drop probability
    ``p`` on ``device``: ``Stream``, ``seed_lo``, ``seed_hi``, ``offset_lo``, ``offset_hi``, ``threshold``
    (csrc/dropout_math.h's drop_threshold) and ``stream_in_memory``.

    A seed on the CPU goes by value; one on the GPU (drawn inside a CUDA graph capture) is read by the kernel,
    so each replay uses the seed that replay drew. ``in_memory`` forces the choice (the tests read a CPU
    stream from memory in Triton's interpreter).
    """
    threshold = math.ceil(p * 16777216.0)
    if in_memory is None:
        in_memory = seed.device.type != "cpu"
    if in_memory:
        stream_tensor = seed if seed.numel() == 2 else torch.constant_pad_nd(seed, (0, 1), 0)
        return {"Stream": stream_tensor, "seed_lo": 0, "seed_hi": 0, "offset_lo": 0, "offset_hi": 0,
                "threshold": threshold, "stream_in_memory": 1}
    s, offset = stream(seed)
    seed_lo, seed_hi = split64(s)
    offset_lo, offset_hi = split64(offset)
    return {"Stream": _no_stream(device), "seed_lo": seed_lo, "seed_hi": seed_hi, "offset_lo": offset_lo,
            "offset_hi": offset_hi, "threshold": threshold, "stream_in_memory": 0}


_NO_STREAM: dict[torch.device, torch.Tensor] = {}


def _no_stream(device: torch.device) -> torch.Tensor:
    """The unread ``Stream`` of a by-value launch: an empty int64 tensor (a null pointer, which Triton accepts),
    typed as the stream of a captured call so both launches are one compilation. Empty, it holds no memory, so
    one made inside a capture outlives the graph safely."""
    empty = _NO_STREAM.get(device)
    if empty is None:
        empty = _NO_STREAM[device] = torch.empty(0, dtype=torch.int64, device=device)
    return empty


def _scale_bits(p: float) -> int:
    # p = 1 keeps nothing, so any scale serves; 1.0 keeps scale_bits a 64-bit argument (0 would be typed i32).
    scale = 1.0 / (1.0 - p) if p < 1 else 1.0
    return struct.unpack("<q", struct.pack("<d", scale))[0]


def forward(x: torch.Tensor, seed: torch.Tensor, p: float, *, stream_in_memory: bool | None = None) -> torch.Tensor:
    """x: any shape; seed: int64 (seed[, offset]), on the CPU or (under a CUDA graph capture) on x's GPU.
    Returns x / (1 - p) where kept, 0 elsewhere."""
    xc = x.contiguous()
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    numel = xc.numel()
    if numel == 0:
        return y
    cfg = launch_config(x.dtype)
    _dropout[(triton.cdiv(numel, cfg["BLOCK"]),)](
        xc, y, numel=numel, **stream_args(seed, p, x.device, stream_in_memory), scale_bits=_scale_bits(p),
        COMPUTE=tl_compute(x.dtype), BLOCK=cfg["BLOCK"], num_warps=cfg["num_warps"],
    )
    return y


backward = forward  # dropout is diagonal: dx = dy / (1 - p) where kept, with the same seed


def aot_specs(shapes: BenchShapes) -> list[AotSpec]:
    """Every compilation the launcher can cause, for the ahead-of-time check (hetrain.checks.gpu_compile):
    one per dtype (a captured call, which reads its stream from memory, runs the same one), picked where the
    benchmarks run that dtype."""
    numel = shapes.rows * max(shapes.hidden)
    specs = []
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        cfg = launch_config(dtype)
        args = {"X": dtype, "Y": dtype, "numel": numel, "scale_bits": _scale_bits(0.1),
                **stream_args(torch.tensor([12345, 4096]), 0.1, torch.device("cpu")), "Stream": torch.int64,
                "COMPUTE": tl_compute(dtype), "BLOCK": cfg["BLOCK"]}
        specs.append(aot_spec(_dropout, args, dtype=dtype, picked=dtype in shapes.dtypes, num_warps=cfg["num_warps"]))
    return specs
