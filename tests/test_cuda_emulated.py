"""Every CUDA kernel of csrc/cuda, run in the CPU emulator (hetrain.checks.cuda_emulator), against the C++ CPU
kernels in float64 (themselves tested against torch): the kernels' own indexing, block reductions, partial
rows and launches, checked without a GPU, in every dtype they are built for.

Each tensor a kernel sees lies between NaN guard bands that must be unchanged afterwards (a write outside a
tensor) and that poison any read outside it; outputs, workspaces and each block's shared arrays start as NaN
(a value never written, or a workspace read before it is written, shows). Backward kernels run with fewer
row blocks than rows, so blocks fold several rows into their partial rows. Each case runs twice, threads and
blocks in index order, then threads in a shuffled order between barriers and blocks in a shuffled order: the
results must agree bit for bit, or the kernel has a race.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable, Sequence

import pytest
import torch
from op_testing import assert_close, randn

from hetrain import _ext
from hetrain.checks import cuda_emulator
from hetrain.ops.dropout_add_layer_norm import keep_mask

pytestmark = [
    pytest.mark.skipif(shutil.which("g++") is None, reason="the emulator is built with g++"),
    pytest.mark.skipif(_ext.load() is None, reason="the float64 reference is the C++ CPU kernel (hetrain._C)"),
]

C = torch.ops.hetrain_C
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
EPS = 1e-5
GUARD = 64  # elements of each guard band


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class Memory:
    """Tensors between guard bands, as the kernels get them."""

    def __init__(self):
        self._bands: list[tuple[torch.Tensor, torch.Tensor]] = []

    def _alloc(self, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        n = 1
        for s in shape:
            n *= s
        base = torch.empty(n + 2 * GUARD, dtype=dtype)
        base.fill_(float("nan") if dtype.is_floating_point else 0xA5)
        bytes_ = base.view(torch.uint8)
        band = GUARD * base.element_size()
        self._bands.append((bytes_, torch.cat([bytes_[:band], bytes_[-band:]]).clone()))
        return base[GUARD:GUARD + n].view(*shape)

    def empty(self, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        """NaN-filled (0xA5 for integers): what the kernel must overwrite."""
        return self._alloc(shape, dtype)

    def put(self, t: torch.Tensor | None, misalign: bool = False) -> torch.Tensor | None:
        """A copy of ``t``; ``misalign``: one element past a 16-byte boundary (no packed loads)."""
        if t is None:
            return None
        if not misalign:
            return self._alloc(t.shape, t.dtype).copy_(t)
        return self._alloc((t.numel() + 1,), t.dtype)[1:].view(t.shape).copy_(t)

    def check(self) -> None:
        for bytes_, saved in self._bands:
            band = saved.numel() // 2
            now = torch.cat([bytes_[:band], bytes_[-band:]])
            assert torch.equal(now, saved), "a kernel wrote outside a tensor it was given"


@pytest.fixture(scope="module")
def emu():
    return cuda_emulator.load()


def in_two_orders(emu, launch: Callable[[Memory], Sequence[torch.Tensor]]) -> list[torch.Tensor]:
    """``launch``'s outputs with threads run in index order, after checking a shuffled order gives the same bits
    and that neither run wrote outside its tensors."""
    results = []
    for seed in (0, 20261204):
        emu.shuffle_threads(seed)
        mem = Memory()
        try:
            results.append([t.clone() for t in launch(mem)])
        finally:
            emu.shuffle_threads(0)
        mem.check()
    for a, b in zip(*results, strict=True):
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)), "results depend on the thread order: a race"
    return results[0]


def close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, what: str, summed: bool = False) -> None:
    """``got`` against the float64 ``want`` at ``dtype``'s tolerance; sums over rows relative to their size."""
    scale = max(1.0, want.abs().max().item()) if summed and want.numel() else 1.0
    assert_close(got.double() / scale, want / scale, dtype, what)


def stats_close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    assert_close(got.double(), want, stats_dtype(dtype), what)


def as_double(*ts: torch.Tensor | None) -> list[torch.Tensor | None]:
    return [None if t is None else t.double() for t in ts]


# (rows, features): one element; odd widths; BERT's width; a width held in registers in 16-bit and 32-bit
# types and re-read per pass in float64; a width re-read in every type (over four per thread of a full
# 1024-thread block, so each thread strides over columns); no rows. Widths that split into 16-byte packs
# take the packed kernels, the others one element at a time.
ROW_SHAPES = [(1, 1), (6, 7), (19, 300), (5, 768), (3, 4200), (2, 8200), (0, 33)]
# Each shape with the parameters (weight and bias) and one without.
WITH_PARAMS = [(shape, True) for shape in ROW_SHAPES] + [((19, 300), False)]


def parts_for(m: int) -> int:
    return max(1, min(m, 4))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,affine", WITH_PARAMS)
def test_layer_norm(emu, dtype, shape, affine):
    m, n = shape
    x, dy = randn(m, n, dtype=dtype, seed=1, shift=0.5), randn(m, n, dtype=dtype, seed=2)
    w = randn(n, dtype=dtype, seed=3, shift=1.0) if affine else None
    b = randn(n, dtype=dtype, seed=4) if affine else None
    acc, parts = stats_dtype(dtype), parts_for(m)

    def launch(mem):
        y, mean, rstd = mem.empty((m, n), dtype), mem.empty((m,), acc), mem.empty((m,), acc)
        emu.call("layer_norm_forward", dtype, mem.put(x), mem.put(w), mem.put(b), y, mean, rstd, m, n, EPS)
        dx = mem.empty((m, n), dtype)
        dw, db = (mem.empty((n,), dtype), mem.empty((n,), dtype)) if affine else (None, None)
        wp, bp = (mem.empty((parts, n), acc), mem.empty((parts, n), acc)) if affine else (None, None)
        emu.call("layer_norm_backward", dtype, mem.put(dy), mem.put(x), mem.put(w), mean, rstd, dx, dw, db, wp, bp,
                 parts, m, n)
        return [y, mean, rstd, dx] + ([dw, db] if affine else [])

    got = in_two_orders(emu, launch)
    x64, w64, b64, dy64 = as_double(x, w, b, dy)
    y, mean, rstd = C.layer_norm_fwd(x64, w64, b64, EPS)
    dx, dw, db = C.layer_norm_bwd(dy64, x64, w64, mean, rstd, affine)
    close(got[0], y, dtype, "y")
    stats_close(got[1], mean, dtype, "mean")
    stats_close(got[2], rstd, dtype, "rstd")
    close(got[3], dx, dtype, "dx")
    if affine:
        close(got[4], dw, dtype, "dw", summed=True)
        close(got[5], db, dtype, "db", summed=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_norms_of_unaligned_rows(emu, dtype):
    """A row start off a 16-byte boundary (a view into a larger buffer) takes the one-element-at-a-time kernels."""
    m, n = 5, 768
    x, dy = randn(m, n, dtype=dtype, seed=40, shift=0.5), randn(m, n, dtype=dtype, seed=41)
    w, b = randn(n, dtype=dtype, seed=42, shift=1.0), randn(n, dtype=dtype, seed=43)
    acc, parts = stats_dtype(dtype), 2

    def launch(mem):
        y, mean, rstd = mem.empty((m, n), dtype), mem.empty((m,), acc), mem.empty((m,), acc)
        xs = mem.put(x, misalign=True)
        emu.call("layer_norm_forward", dtype, xs, mem.put(w), mem.put(b), y, mean, rstd, m, n, EPS)
        dx, dw, db = mem.empty((m, n), dtype), mem.empty((n,), dtype), mem.empty((n,), dtype)
        wp, bp = mem.empty((parts, n), acc), mem.empty((parts, n), acc)
        emu.call("layer_norm_backward", dtype, mem.put(dy), xs, mem.put(w), mean, rstd, dx, dw, db, wp, bp, parts, m,
                 n)
        y_rms, rstd_rms = mem.empty((m, n), dtype), mem.empty((m,), acc)
        emu.call("rms_norm_forward", dtype, xs, mem.put(w), y_rms, rstd_rms, m, n, EPS)
        dx_rms, dw_rms = mem.empty((m, n), dtype), mem.empty((n,), dtype)
        emu.call("rms_norm_backward", dtype, mem.put(dy, misalign=True), xs, mem.put(w), rstd_rms, dx_rms, dw_rms,
                 mem.empty((parts, n), acc), parts, m, n)
        return [y, dx, dw, db, y_rms, dx_rms, dw_rms]

    got = in_two_orders(emu, launch)
    x64, w64, b64, dy64 = as_double(x, w, b, dy)
    y, mean, rstd = C.layer_norm_fwd(x64, w64, b64, EPS)
    dx, dw, db = C.layer_norm_bwd(dy64, x64, w64, mean, rstd, True)
    y_rms, rstd_rms = C.rms_norm_fwd(x64, w64, EPS)
    dx_rms, dw_rms = C.rms_norm_bwd(dy64, x64, w64, rstd_rms)
    for g, want, what in zip(got, (y, dx, dw, db, y_rms, dx_rms, dw_rms),
                             ("y", "dx", "dw", "db", "rms y", "rms dx", "rms dw"), strict=True):
        close(g, want, dtype, what, summed=what.endswith(("dw", "db")))


def test_partial_rows_summed_over_many_blocks(emu):
    """More row blocks than the column sum has lanes (32), and a column count that leaves a partial tile: the
    weight and bias gradients still sum every block's partial row once."""
    m, n, parts = 75, 45, 75
    x, dy = randn(m, n, seed=44, shift=0.5), randn(m, n, seed=45)
    w, b = randn(n, seed=46, shift=1.0), randn(n, seed=47)

    def launch(mem):
        y, mean, rstd = mem.empty((m, n), torch.float32), mem.empty((m,), torch.float32), mem.empty((m,), torch.float32)
        emu.call("layer_norm_forward", torch.float32, mem.put(x), mem.put(w), mem.put(b), y, mean, rstd, m, n, EPS)
        dx, dw, db = (mem.empty(s, torch.float32) for s in ((m, n), (n,), (n,)))
        wp, bp = mem.empty((parts, n), torch.float32), mem.empty((parts, n), torch.float32)
        emu.call("layer_norm_backward", torch.float32, mem.put(dy), mem.put(x), mem.put(w), mean, rstd, dx, dw, db, wp,
                 bp, parts, m, n)
        dx_g, db_g = mem.empty((m, n), torch.float32), mem.empty((n,), torch.float32)
        emu.call("bias_gelu_backward", torch.float32, mem.put(dy), mem.put(x), mem.put(b), dx_g, db_g,
                 mem.empty((parts, n), torch.float32), False, parts, m, n)
        return [dw, db, db_g]

    dw, db, db_g = in_two_orders(emu, launch)
    x64, w64, b64, dy64 = as_double(x, w, b, dy)
    y, mean, rstd = C.layer_norm_fwd(x64, w64, b64, EPS)
    _, dw_want, db_want = C.layer_norm_bwd(dy64, x64, w64, mean, rstd, True)
    _, db_g_want = C.bias_gelu_bwd(dy64, x64, b64, "none")
    close(dw, dw_want, torch.float32, "dw", summed=True)
    close(db, db_want, torch.float32, "db", summed=True)
    close(db_g, db_g_want, torch.float32, "bias_gelu db", summed=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,weighted", WITH_PARAMS)
def test_rms_norm(emu, dtype, shape, weighted):
    m, n = shape
    x, dy = randn(m, n, dtype=dtype, seed=5, shift=0.5), randn(m, n, dtype=dtype, seed=6)
    w = randn(n, dtype=dtype, seed=7, shift=1.0) if weighted else None
    acc, parts = stats_dtype(dtype), parts_for(m)

    def launch(mem):
        y, rstd = mem.empty((m, n), dtype), mem.empty((m,), acc)
        emu.call("rms_norm_forward", dtype, mem.put(x), mem.put(w), y, rstd, m, n, EPS)
        dx = mem.empty((m, n), dtype)
        dw, wp = (mem.empty((n,), dtype), mem.empty((parts, n), acc)) if weighted else (None, None)
        emu.call("rms_norm_backward", dtype, mem.put(dy), mem.put(x), mem.put(w), rstd, dx, dw, wp, parts, m, n)
        return [y, rstd, dx] + ([dw] if weighted else [])

    got = in_two_orders(emu, launch)
    x64, w64, dy64 = as_double(x, w, dy)
    y, rstd = C.rms_norm_fwd(x64, w64, EPS)
    dx, dw = C.rms_norm_bwd(dy64, x64, w64, rstd)
    close(got[0], y, dtype, "y")
    stats_close(got[1], rstd, dtype, "rstd")
    close(got[2], dx, dtype, "dx")
    if weighted:
        close(got[3], dw, dtype, "dw", summed=True)


@pytest.mark.parametrize("n", [768, 4096, 8192, 8200])  # rows held in registers, and one read again from memory
def test_rms_norm_backward_of_a_row_at_float32s_top_is_nan_as_on_the_cpu(emu, n):
    """The kernels summed g * (x * rstd): where the row's mean square overflowed (rstd 0) that gave dx = 0, where the
    CPU kernel (sum(g * x) * rstd) and torch give NaN. Rows held in registers (norm_rows.cuh) sum such a row again
    in the CPU kernel's order."""
    x, dy, w = randn(3, n, seed=5, shift=0.5), randn(3, n, seed=6), randn(n, seed=7, shift=1.0)
    x[1] = 3e38
    y, rstd = C.rms_norm_fwd(x, w, EPS)
    dx_want, _ = C.rms_norm_bwd(dy, x, w, rstd)
    assert rstd[1] == 0 and dx_want[1].isnan().all()

    def launch(mem):
        dx, dw, wp = mem.empty((3, n), torch.float32), mem.empty((n,), torch.float32), mem.empty((1, n), torch.float32)
        emu.call("rms_norm_backward", torch.float32, mem.put(dy), mem.put(x), mem.put(w), mem.put(rstd), dx, dw, wp, 1,
                 3, n)
        return [dx]

    (dx,) = in_two_orders(emu, launch)
    assert torch.equal(dx.isnan(), dx_want.isnan())
    close(dx[[0, 2]], dx_want[[0, 2]], torch.float32, "dx")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (7, 300), (19, 513), (9, 1040), (0, 33)])
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_bias_gelu(emu, dtype, shape, approximate):
    m, n = shape
    x, dy = randn(m, n, dtype=dtype, seed=8, scale=2.0), randn(m, n, dtype=dtype, seed=9)
    b = randn(n, dtype=dtype, seed=10)
    acc, parts, tanh = stats_dtype(dtype), parts_for(m), approximate == "tanh"

    def launch(mem):
        y = mem.empty((m, n), dtype)
        emu.call("bias_gelu_forward", dtype, mem.put(x), mem.put(b), y, tanh, m, n)
        dx, db, bp = mem.empty((m, n), dtype), mem.empty((n,), dtype), mem.empty((parts, n), acc)
        emu.call("bias_gelu_backward", dtype, mem.put(dy), mem.put(x), mem.put(b), dx, db, bp, tanh, parts, m, n)
        return [y, dx, db]

    got = in_two_orders(emu, launch)
    x64, b64, dy64 = as_double(x, b, dy)
    y = C.bias_gelu_fwd(x64, b64, approximate)
    dx, db = C.bias_gelu_bwd(dy64, x64, b64, approximate)
    close(got[0], y, dtype, "y")
    close(got[1], dx, dtype, "dx")
    close(got[2], db, dtype, "db", summed=True)


def dropout_args(seed: int, offset: int, p: float) -> tuple[int, int, int, float]:
    """(seed, offset, threshold, scale) of dropout_math.h's Call, as the bindings make it."""
    threshold = math.ceil(p * 2**24)
    return seed, offset, threshold, 1.0 / (1.0 - p) if p < 1 else 0.0


# Stream offsets: small, and one where the stream index crosses 2^32 inside the call (inside a row).
OFFSETS = [77, 2**32 - 7 * 300 - 5]


@pytest.mark.parametrize("dtype", DTYPES)
# Whole 16-byte packs; packs and a partial last one; the same off a 16-byte boundary (one element at a time).
@pytest.mark.parametrize("numel,misalign", [(1, False), (5000, False), (5003, False), (5003, True)])
@pytest.mark.parametrize("p", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("offset", OFFSETS)
def test_dropout_draws_the_cpu_kernels_mask(emu, dtype, numel, misalign, p, offset):
    x = randn(numel, dtype=dtype, seed=11, shift=3.0)  # never zero: a zero output means dropped
    seed = 1234

    def launch(mem):
        y = mem.empty((numel,), dtype)
        emu.call("dropout", dtype, mem.put(x, misalign=misalign), y, numel, *dropout_args(seed, offset, p), None)
        return [y]

    (got,) = in_two_orders(emu, launch)
    want = C.dropout_fwd(x.double(), torch.tensor([seed, offset]), p)
    assert torch.equal(got == 0, want == 0), "the kept elements differ from the CPU kernel's"
    close(got, want, dtype, "y")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_captured_calls_stream_is_read_from_device_memory(emu, dtype):
    # A call captured in a CUDA graph keeps (seed, offset) in device memory, where each replay's draw writes it;
    # the by-value seed and offset are then garbage the kernels must not use.
    m, n, p, seed, offset = 19, 300, 0.3, 2**40 + 5, OFFSETS[1]
    x, res = randn(m, n, dtype=dtype, seed=21, shift=3.0), randn(m, n, dtype=dtype, seed=22)
    w, b, dy = randn(n, dtype=dtype, seed=23, shift=1.0), randn(n, dtype=dtype, seed=24), randn(m, n, dtype=dtype)
    acc, parts = stats_dtype(dtype), parts_for(m)
    _, _, threshold, scale = dropout_args(seed, offset, p)
    garbage = (7, 123, threshold, scale)

    def launch(mem):
        stream = mem.put(torch.tensor([seed, offset]))
        y = mem.empty((m * n,), dtype)
        emu.call("dropout", dtype, mem.put(x), y, m * n, *garbage, stream)
        z, mean, rstd = mem.empty((m, n), dtype), mem.empty((m,), acc), mem.empty((m,), acc)
        emu.call("dropout_add_layer_norm_forward", dtype, mem.put(x), mem.put(res), mem.put(w), mem.put(b), z, mean,
                 rstd, *garbage, stream, m, n, EPS)
        dx, dres = mem.empty((m, n), dtype), mem.empty((m, n), dtype)
        dw, db, wp, bp = (mem.empty((n,), dtype), mem.empty((n,), dtype), mem.empty((parts, n), acc),
                          mem.empty((parts, n), acc))
        emu.call("dropout_add_layer_norm_backward", dtype, mem.put(dy), mem.put(x), mem.put(res), mem.put(w), mean,
                 rstd, *garbage, stream, dx, dres, dw, db, wp, bp, parts, m, n)
        return [y, z, dx]

    y, z, dx = in_two_orders(emu, launch)
    x64, res64, w64, b64, dy64 = as_double(x, res, w, b, dy)
    stream = torch.tensor([seed, offset])
    close(y.view(m, n), C.dropout_fwd(x64, stream, p), dtype, "dropout y")
    want_z, mean, rstd = C.dropout_add_layer_norm_fwd(x64, res64, w64, b64, stream, p, EPS)
    close(z, want_z, dtype, "dropout_add_layer_norm y")
    want_dx = C.dropout_add_layer_norm_bwd(dy64, x64, res64, w64, mean, rstd, stream, p, True)[0]
    assert torch.equal(dx == 0, want_dx == 0), "the dropped elements differ from the CPU kernel's"


@pytest.mark.parametrize("dtype", DTYPES)
# The last: over 32 elements per thread, past the decisions a thread keeps as bits between passes.
@pytest.mark.parametrize("shape", [(1, 1), (6, 7), (19, 300), (3, 4200), (0, 33), (2, 33000)])
@pytest.mark.parametrize("p", [0.0, 0.25])
@pytest.mark.parametrize("offset", OFFSETS)
def test_dropout_add_layer_norm(emu, dtype, shape, p, offset):
    m, n = shape
    x, res = randn(m, n, dtype=dtype, seed=12), randn(m, n, dtype=dtype, seed=13, shift=0.5)
    w, b = randn(n, dtype=dtype, seed=14, shift=1.0), randn(n, dtype=dtype, seed=15)
    dy = randn(m, n, dtype=dtype, seed=16)
    acc, parts, seed = stats_dtype(dtype), parts_for(m), 99
    call = dropout_args(seed, offset, p)

    def launch(mem):
        y, mean, rstd = mem.empty((m, n), dtype), mem.empty((m,), acc), mem.empty((m,), acc)
        emu.call("dropout_add_layer_norm_forward", dtype, mem.put(x), mem.put(res), mem.put(w), mem.put(b), y, mean,
                 rstd, *call, None, m, n, EPS)
        dx, dres = mem.empty((m, n), dtype), mem.empty((m, n), dtype)
        dw, db, wp, bp = mem.empty((n,), dtype), mem.empty((n,), dtype), mem.empty((parts, n), acc), mem.empty(
            (parts, n), acc)
        emu.call("dropout_add_layer_norm_backward", dtype, mem.put(dy), mem.put(x), mem.put(res), mem.put(w), mean,
                 rstd, *call, None, dx, dres, dw, db, wp, bp, parts, m, n)
        return [y, mean, rstd, dx, dres, dw, db]

    got = in_two_orders(emu, launch)
    x64, res64, w64, b64, dy64 = as_double(x, res, w, b, dy)
    stream = torch.tensor([seed, offset])
    y, mean, rstd = C.dropout_add_layer_norm_fwd(x64, res64, w64, b64, stream, p, EPS)
    dx, dres, dw, db = C.dropout_add_layer_norm_bwd(dy64, x64, res64, w64, mean, rstd, stream, p, True)
    close(got[0], y, dtype, "y")
    stats_close(got[1], mean, dtype, "mean")
    stats_close(got[2], rstd, dtype, "rstd")
    close(got[3], dx, dtype, "dx")
    close(got[4], dres, dtype, "dresidual")
    close(got[5], dw, dtype, "dw", summed=True)
    close(got[6], db, dtype, "db", summed=True)
    if p > 0 and m:
        assert torch.equal(got[3] == 0, dx == 0), "the dropped elements differ from the CPU kernel's"


@pytest.mark.parametrize("shape", [(6, 40), (2, 9000)])  # a row held in registers, and one read pass by pass
def test_dropout_add_layer_norm_adds_exactly_zero_for_a_dropped_inf(emu, shape):
    m, n = shape
    p, seed, offset = 0.5, 99, 77
    x, res = randn(m, n, seed=12), randn(m, n, seed=13, shift=0.5)
    w, b, dy = randn(n, seed=14, shift=1.0), randn(n, seed=15), randn(m, n, seed=16)
    dropped = ~keep_mask(seed, m, n, p, offset=offset)
    x[dropped] = float("inf")  # dropped, so it must add 0 (0 * inf is NaN)
    acc, parts, call = stats_dtype(torch.float32), parts_for(m), dropout_args(seed, offset, p)

    def launch(mem):
        y, mean, rstd = mem.empty((m, n), torch.float32), mem.empty((m,), acc), mem.empty((m,), acc)
        emu.call("dropout_add_layer_norm_forward", torch.float32, mem.put(x), mem.put(res), mem.put(w), mem.put(b), y,
                 mean, rstd, *call, None, m, n, EPS)
        dx, dres = mem.empty((m, n), torch.float32), mem.empty((m, n), torch.float32)
        dw, db = mem.empty((n,), torch.float32), mem.empty((n,), torch.float32)
        wp, bp = mem.empty((parts, n), acc), mem.empty((parts, n), acc)
        emu.call("dropout_add_layer_norm_backward", torch.float32, mem.put(dy), mem.put(x), mem.put(res), mem.put(w),
                 mean, rstd, *call, None, dx, dres, dw, db, wp, bp, parts, m, n)
        return [y, dx, dres, dw, db]

    got = in_two_orders(emu, launch)
    assert dropped.any() and all(bool(t.isfinite().all()) for t in got)
    y, mean, rstd = C.dropout_add_layer_norm_fwd(x, res, w, b, torch.tensor([seed, offset]), p, EPS)
    want = [y, *C.dropout_add_layer_norm_bwd(dy, x, res, w, mean, rstd, torch.tensor([seed, offset]), p, True)]
    for name, g, ref in zip(("y", "dx", "dresidual", "dw", "db"), got, want, strict=True):
        close(g, ref.double(), torch.float32, name, summed=name in ("dw", "db"))


# (N, C, H, W), pooling (kernel, stride, padding): the ResNet stem's 3x3/2 pad 1 on odd sizes, and 2x2/2 with a
# channel count that leaves a partial channels_last tile of 32; then channel counts that split into 16-byte
# packs in every dtype (channels_last takes a pack of channels a thread), one leaving idle lanes in a
# reduction block (48 bfloat16 channels: 6 packs on 8 lanes).
GEOMETRIES = [((2, 3, 9, 11), (3, 2, 1)), ((3, 33, 6, 8), (2, 2, 0)), ((2, 48, 7, 9), (3, 2, 1)),
              ((3, 16, 6, 8), (2, 2, 0))]


def geometry(shape, pool, channels_last: bool) -> tuple[list[int], tuple[int, int]]:
    n, c, h, w = shape
    k, s, pad = pool
    oh, ow = (h + 2 * pad - k) // s + 1, (w + 2 * pad - k) // s + 1
    return [n, c, h, w, oh, ow, k, k, s, s, pad, pad, int(channels_last)], (oh, ow)


def memory_order(t: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """``t`` (N, C, H, W) as the kernel's flat buffer: NCHW, or NHWC for channels_last."""
    return (t.permute(0, 2, 3, 1) if channels_last else t).contiguous().flatten()


def logical(flat: torch.Tensor, shape, channels_last: bool) -> torch.Tensor:
    n, c, h, w = shape
    return flat.view(n, h, w, c).permute(0, 3, 1, 2) if channels_last else flat.view(n, c, h, w)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,pool", GEOMETRIES)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("batch_stats", [True, False])
def test_bn_relu_pool(emu, dtype, shape, pool, channels_last, batch_stats):
    n, c, h, w_ = shape
    k, s, pad = pool
    geo, (oh, ow) = geometry(shape, pool, channels_last)
    acc = stats_dtype(dtype)
    x = randn(*shape, dtype=dtype, seed=17, shift=0.3)
    dy = randn(n, c, oh, ow, dtype=dtype, seed=18)
    weight, bias = randn(c, dtype=acc, seed=19, shift=1.0), randn(c, dtype=acc, seed=20)
    run_mean, run_var = randn(c, dtype=acc, seed=21), randn(c, dtype=acc, seed=22).abs() + 0.5
    eval_mean, eval_invstd = randn(c, dtype=acc, seed=23), randn(c, dtype=acc, seed=24).abs() + 0.5
    momentum, parts = 0.1, 3
    xf, dyf = memory_order(x, channels_last), memory_order(dy, channels_last)

    def launch(mem):
        outs = []
        if batch_stats:
            mean, invstd = mem.empty((c,), acc), mem.empty((c,), acc)
            rm, rv = mem.put(run_mean), mem.put(run_var)
            emu.call("bn_relu_pool_stats", dtype, mem.put(xf), mean, invstd, rm, rv, momentum, EPS,
                     mem.empty((2 * parts * c,), acc), parts, geo)
            outs += [mean, invstd, rm, rv]
        else:
            mean, invstd = mem.put(eval_mean), mem.put(eval_invstd)
        y, argmax = mem.empty((n * c * oh * ow,), dtype), mem.empty((n * c * oh * ow,), torch.uint8)
        emu.call("bn_relu_pool_forward", dtype, mem.put(xf), mean, invstd, mem.put(weight), mem.put(bias), y, argmax,
                 geo)
        dx, dw, db = mem.empty((n * c * h * w_,), dtype), mem.empty((c,), acc), mem.empty((c,), acc)
        emu.call("bn_relu_pool_backward", dtype, mem.put(dyf), argmax, mem.put(xf), mean, invstd, mem.put(weight),
                 mem.put(bias), batch_stats, dx, dw, db, mem.empty((2 * parts * c + 3 * c,), acc), parts, geo)
        return outs + [y, argmax, dx, dw, db]

    got = in_two_orders(emu, launch)
    y_got, argmax_got, dx_got, dw_got, db_got = got[-5:]
    x64, dy64, w64, b64 = as_double(x, dy, weight, bias)
    if batch_stats:
        rm, rv = run_mean.double(), run_var.double()
        mean, invstd = C.bn_stats(x64, rm, rv, momentum, EPS)
        names = ("mean", "invstd", "running_mean", "running_var")
        for g, want, what in zip(got[:4], (mean, invstd, rm, rv), names, strict=True):
            stats_close(g, want, dtype, what)
    else:
        mean, invstd = eval_mean.double(), eval_invstd.double()
    kernel, stride, padding = [k, k], [s, s], [pad, pad]
    y, argmax = C.bn_relu_pool_fwd(x64, mean, invstd, w64, b64, kernel, stride, padding)
    close(logical(y_got, (n, c, oh, ow), channels_last), y, dtype, "y")
    argmax_got = logical(argmax_got, (n, c, oh, ow), channels_last)
    if dtype in (torch.float32, torch.float64):  # rounding to 16 bits can tie a window's values
        assert torch.equal(argmax_got, argmax), "argmax differs from the CPU kernel's"
    # The reference gradient routed through the emulated argmax: ties resolved as the kernel resolved them.
    dx, dw, db = C.bn_relu_pool_bwd(dy64, argmax_got.contiguous(), x64, mean, invstd, w64, b64, batch_stats, kernel,
                                    stride, padding)
    close(logical(dx_got, shape, channels_last), dx, dtype, "dx")
    close(dw_got, dw, dtype, "dw", summed=True)
    close(db_got, db, dtype, "db", summed=True)


def test_relu_pool_without_batch_norm(emu):
    shape, pool = (2, 5, 7, 7), (3, 2, 1)
    geo, (oh, ow) = geometry(shape, pool, False)
    x = randn(*shape, seed=25)

    def launch(mem):
        y, argmax = mem.empty((2 * 5 * oh * ow,), torch.float32), mem.empty((2 * 5 * oh * ow,), torch.uint8)
        emu.call("bn_relu_pool_forward", torch.float32, mem.put(x.flatten()), None, None, None, None, y, argmax, geo)
        return [y, argmax]

    y, argmax = in_two_orders(emu, launch)
    y_ref, argmax_ref = C.bn_relu_pool_fwd(x.double(), None, None, None, None, [3, 3], [2, 2], [1, 1])
    close(y.view(2, 5, oh, ow), y_ref, torch.float32, "y")
    assert torch.equal(argmax.view(2, 5, oh, ow), argmax_ref)


def test_bad_arguments_are_refused_not_run(emu):
    x = randn(4, 8)
    y, rstd = torch.empty(4, 8), torch.empty(4)
    with pytest.raises(cuda_emulator.KernelFault, match="cudaError 1"):  # parts outside [1, M]
        emu.call("rms_norm_backward", torch.float32, x, x, x[0], rstd, y, torch.empty(8), torch.empty(9, 8), 9, 4, 8)

