"""The CUDA emulator itself (csrc/emu, hetrain.checks.cuda_emulator): its launch rewriting, its indices, and
the faults and races it must report, on the test kernels of tests/cpp/emulated_faults.cu."""

from __future__ import annotations

import ctypes
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from hetrain.checks import cuda_emulator
from hetrain.checks.cuda_emulator import Emulator, KernelFault, rewrite_launches, rewrite_shared

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="the emulator is built with g++")

FAULTS = Path(__file__).parent / "cpp" / "emulated_faults.cu"


@pytest.fixture(scope="module")
def emu():
    emulator = Emulator(cuda_emulator.build(extra=[FAULTS]))
    yield emulator
    emulator.shuffle_threads(0)



def test_rewrite_launches():
    src = "k<T, true><<<grid(N, 3), 256, 0, stream>>>(x, y);\nplain<<<1, 32>>>(\n  a);\nempty<<<1, 1>>>( );"
    assert rewrite_launches(src) == (
        "::hetrain_emu::launch(::hetrain_emu::Config(grid(N, 3), 256, 0, stream), k<T, true>, x, y);\n"
        "::hetrain_emu::launch(::hetrain_emu::Config(1, 32), plain, \n  a);\n"
        "::hetrain_emu::launch(::hetrain_emu::Config(1, 1), empty );")
    assert rewrite_launches("a << b; c >> d;") == "a << b; c >> d;"
    assert rewrite_launches("k\n<<<1, 1>>>\n(x);") == "::hetrain_emu::launch(::hetrain_emu::Config(1, 1), k, \n\nx);"
    with pytest.raises(ValueError, match="without arguments"):
        rewrite_launches("k<<<1, 1>>>;")


def test_rewrite_shared():
    assert rewrite_shared("  __shared__ acc_t s[4][N + 1];  // sums\n  __shared__ float v;") == (
        "  static acc_t s[4][N + 1]; ::hetrain_emu::declare_shared(&s, sizeof s);  // sums\n"
        "  static float v; ::hetrain_emu::declare_shared(&v, sizeof v);")
    with pytest.raises(ValueError, match="one array per __shared__ declaration"):
        rewrite_shared("__shared__ float a[4], b[4];")


def test_a_failed_build_leaves_nothing_behind(tmp_path):
    """A failed build left its folder of copied sources and objects (some 16 MB) under build/cuda_emu."""
    with pytest.raises(cuda_emulator.EmulatorBuildError, match="building the emulated CUDA kernels failed"):
        cuda_emulator.build(out=tmp_path, compiler="false")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("grid,block", [((3, 1, 1), (64, 1, 1)), ((2, 3, 2), (8, 4, 2)), ((1, 1, 1), (1, 1, 1))])
def test_every_thread_of_every_block_runs_once_with_its_indices(emu, grid, block):
    blocks, threads = grid[0] * grid[1] * grid[2], block[0] * block[1] * block[2]
    out = torch.full((blocks * threads,), -1, dtype=torch.int32)
    launches = emu.launches
    emu.call("test_index", out, *grid, *block)
    assert emu.launches == launches + 1
    want = torch.tensor([b * 10000 + t for b in range(blocks) for t in range(threads)], dtype=torch.int32)
    assert torch.equal(out, want)


def test_warp_shuffle_exchanges_within_each_warp(emu):
    out = torch.full((96,), float("nan"))
    emu.call("test_shuffle", out, 96)
    assert torch.equal(out, (torch.arange(96) ^ 3).float())


def test_syncthreads_after_some_threads_returned_is_reported(emu):
    out = torch.zeros(64)
    with pytest.raises(KernelFault, match=r"__syncthreads reached by 40 of 64 threads"):
        emu.call("test_early_return", out, 64, 40)
    emu.call("test_early_return", out, 64, 64)  # all threads reach it: fine, and the error was cleared
    assert torch.equal(out, torch.ones(64))


def test_threads_at_different_barriers_are_reported(emu):
    with pytest.raises(KernelFault, match="different barriers"):
        emu.call("test_divergent", torch.zeros(128), 128)


def _lines_with(kernel: str, text: str) -> list[int]:
    """The lines of FAULTS's ``kernel`` that hold ``text``."""
    lines, inside = [], False
    for n, line in enumerate(FAULTS.read_text().splitlines(), 1):
        inside = inside or f" {kernel}(" in line
        if inside and text in line:
            lines.append(n)
        if inside and line == "}":
            return lines
    raise AssertionError(f"no kernel {kernel} in {FAULTS}")


def test_threads_at_different_syncthreads_calls_are_reported(emu):
    """The barrier opened once every thread had reached any __syncthreads, whichever call: even and odd threads
    at two different ones passed."""
    even, odd = _lines_with("two_barriers_kernel", "__syncthreads")
    with pytest.raises(KernelFault, match=rf"different barriers: __syncthreads at \S*emulated_faults.cu:{even}:\d+ "
                                          rf"\(thread 0\) and at \S*emulated_faults.cu:{odd}:\d+ \(thread 1\)"):
        emu.call("test_two_barriers", torch.zeros(64))
    out = torch.zeros(64)
    emu.call("test_looped_barrier", out, 3)  # one call on every pass: one barrier
    assert torch.equal(out, torch.full((64,), 3.0))


def test_lanes_at_different_shuffle_calls_are_reported(emu):
    low, high = _lines_with("two_shuffles_kernel", "__shfl_xor_sync")
    with pytest.raises(KernelFault, match=rf"different barriers: warp shuffle at \S*emulated_faults.cu:{low}:\d+ "
                                          rf"\(thread 0\) and at \S*emulated_faults.cu:{high}:\d+ \(thread 16\)"):
        emu.call("test_two_shuffles", torch.zeros(32))


def test_a_launch_over_the_kernels_launch_bounds_is_refused(emu):
    """__launch_bounds__ was defined away: a block of 256 threads ran a kernel declared for at most 128."""
    out = torch.zeros(256)
    emu.call("test_bounded", out, 128)
    assert torch.equal(out, torch.tensor([1.0] * 128 + [0.0] * 128))
    with pytest.raises(KernelFault, match=r"cudaError 701: too many resources requested for launch: a block of 256 "
                                          r"threads, over the kernel's __launch_bounds__\(128\)"):
        emu.call("test_bounded", out, 256)


def test_rewrite_launch_bounds():
    src = ("template <int N>\n__global__ void __launch_bounds__(N, 2)\nk(float* x, int (*f)(int)) {\n  x[0] = 1;\n}\n"
           "__global__ void __launch_bounds__(64) d(float* x);")
    assert cuda_emulator.rewrite_launch_bounds(src) == (
        "template <int N>\n__global__ void \nk(float* x, int (*f)(int)) { ::hetrain_emu::check_launch_bounds(N, 2);\n"
        "  x[0] = 1;\n}\n__global__ void  d(float* x);")


def test_launch_bounds_in_comments_and_literals_stay():
    """The rewrite read the raw text: a bound named in a comment was cut out of it and checked at the start of
    the next function's body, so a kernel without a bound failed its legal launches."""
    src = "// at most __launch_bounds__(128) threads\n/* __launch_bounds__(64) */ __global__ void k(float* x) {\n}\n"
    assert cuda_emulator.rewrite_launch_bounds(src) == src
    src = ('const char* s = "__launch_bounds__(32) f(";\nchar c = \'(\';\n'
           "__global__ void __launch_bounds__(1'024) b(char c = ')') {\n}\n")
    assert cuda_emulator.rewrite_launch_bounds(src) == src.replace(
        "void __launch_bounds__(1'024) b(char c = ')') {", "void  b(char c = ')') { "
        "::hetrain_emu::check_launch_bounds(1'024);")
    # A bounded kernel's declaration in an #if 0 block is rewritten like any other: nothing attaches to the next.
    src = "#if 0\n__global__ void __launch_bounds__(64) old(float* x);\n#endif\n__global__ void k(float* x) {\n}\n"
    assert cuda_emulator.rewrite_launch_bounds(src) == src.replace("__launch_bounds__(64)", "")


@pytest.mark.parametrize("src,expected", [
    ("__global__ __launch_bounds__(256) void k(int n) {\n}",
     "__global__  void k(int n) { ::hetrain_emu::check_launch_bounds(256);\n}"),
    ('extern "C" __global__ __launch_bounds__(256, 1)\nvoid k(int n) {\n}',
     'extern "C" __global__ \nvoid k(int n) { ::hetrain_emu::check_launch_bounds(256, 1);\n}'),
    ("template <> __global__ void __launch_bounds__(256) k<Pair<float, 2>>(int n) {\n}",
     "template <> __global__ void  k<Pair<float, 2>>(int n) { ::hetrain_emu::check_launch_bounds(256);\n}"),
])
def test_launch_bounds_before_void_and_on_specializations_are_rewritten(src, expected):
    """Only a bound right after `__global__ void` and before a plain name was taken: one before `void` (as
    nvcc takes it too) or on an explicit specialization `k<float>(...)` was refused as outside a kernel."""
    assert cuda_emulator.rewrite_launch_bounds(src) == expected


@pytest.mark.parametrize("src,line", [
    ("#define ROW_BOUNDS __launch_bounds__(256, 2)\n__global__ void ROW_BOUNDS k(float* x) {\n}\n", 1),
    ("#define K(n) __global__ void __launch_bounds__(128) n(float* x)\nK(k) {\n}\n", 1),
    ("#if 0\nkernels take __launch_bounds__(128)\n#endif\n__global__ void k(float* x) {\n}\n", 2),
    ("__device__ float __launch_bounds__(128) h(float x) {\n  return x;\n}\n", 1),
    ("__global__ __launch_bounds__(128) k(float* x) {\n}\n", 1),
])
def test_launch_bounds_outside_a_kernels_definition_are_refused(src, line):
    """A bound in a #define was emptied out of it and checked in the function after the macro; one in an
    ``#if 0`` block or before a __device__ helper was checked in whatever function came next."""
    with pytest.raises(ValueError, match=rf"^line {line}: __launch_bounds__ outside '__global__ void"):
        cuda_emulator.rewrite_launch_bounds(src)


def test_an_argument_of_the_wrong_kind_is_refused_before_the_call(emu):
    """The check ran on the converted arguments: a tensor's data pointer passed for an int64_t, an int for a
    pointer (a segfault where the kernel wrote to it), and an int a C int cannot hold was truncated."""
    out = torch.zeros(64)
    with pytest.raises(TypeError, match=r"test_index: the parameter 'int64_t gx' cannot take the Tensor "
                                        r"tensor\(\[0\.\]\); it takes an int in its C type's range"):
        emu.call("test_index", out, torch.zeros(1), 1, 1, 0, 1, 1)  # launched, its empty block is refused
    with pytest.raises(TypeError, match=r"test_index: the parameter 'int\* out' cannot take the int 4096; it takes "
                                        r"a contiguous CPU tensor"):
        emu.call("test_index", 4096, 1, 1, 1, 0, 1, 1)
    with pytest.raises(TypeError, match=r"test_looped_barrier: the parameter 'int passes' cannot take the int "
                                        r"4294967297; it takes an int in its C type's range"):
        emu.call("test_looped_barrier", out, 2**32 + 1)  # truncated, one pass
    with pytest.raises(TypeError, match=r"the parameter 'int dtype' cannot take the dtype torch.int8"):
        emu.call("layer_norm_forward", torch.int8, out, None, None, out, out, out, 1, 64, 1e-5)
    emu.call("test_looped_barrier", out, 1)
    assert torch.equal(out, torch.ones(64))


def test_numpy_scalars_are_taken_as_the_numbers_they_hold(emu):
    """Only Python ints and floats were taken: an np.int64 (from np.prod) or an np.float32 eps was refused."""
    out = torch.full((96,), float("nan"))
    emu.call("test_shuffle", out, np.prod([2, 48]))
    assert not out.isnan().any()
    x = torch.randn(4, 64)
    rstd = [torch.empty(4), torch.empty(4)]
    for r, n, eps in zip(rstd, (64, np.int32(64)), (1e-5, np.float32(1e-5)), strict=True):
        emu.call("layer_norm_forward", torch.float32, x, None, None, torch.empty(4, 64), torch.empty(4), r, 4, n, eps)
    torch.testing.assert_close(rstd[1], rstd[0])
    with pytest.raises(TypeError, match=r"the parameter 'double eps' cannot take the bool True"):
        emu.call("layer_norm_forward", torch.float32, x, None, None, x, rstd[0], rstd[0], 4, 64, True)


def test_a_finite_number_float32_cannot_hold_is_refused():
    """A finite float over float32's range was taken for a C float, which the kernel then read as inf."""
    assert cuda_emulator._accepts(ctypes.c_float, 3.4e38)
    assert cuda_emulator._accepts(ctypes.c_float, float("inf"))
    assert not cuda_emulator._accepts(ctypes.c_float, 1e39)
    assert not cuda_emulator._accepts(ctypes.c_float, np.float64(-1e39))
    assert cuda_emulator._accepts(ctypes.c_double, 1e39)


def test_shuffle_in_a_partial_warp_is_reported(emu):
    with pytest.raises(KernelFault, match="partial warp"):
        emu.call("test_shuffle", torch.zeros(48), 48)


def test_invalid_launch_configuration_is_reported(emu):
    with pytest.raises(KernelFault, match=r"invalid launch configuration.*block \(2048,1,1\)"):
        emu.call("test_index", torch.zeros(2048, dtype=torch.int32), 1, 1, 1, 2048, 1, 1)


def test_a_grid_over_the_gpus_limits_is_refused(emu):
    """A grid of 2^31 blocks in x (a GPU takes at most 2^31 - 1) was accepted, and ran."""
    with pytest.raises(KernelFault, match=r"invalid launch configuration: grid \(2147483648,1,1\)"):
        emu.call("test_index", torch.zeros(1, dtype=torch.int32), 2**31, 1, 1, 1, 1, 1)


def test_arguments_are_passed_as_the_entrys_declared_c_types(emu):
    """An int passed where the entry declares a double was passed as an int64 register, read as garbage."""
    x = torch.randn(4, 64)
    rstd = [torch.empty(4), torch.empty(4)]
    for out, eps in zip(rstd, (1.0, 1), strict=True):
        emu.call("layer_norm_forward", torch.float32, x, torch.ones(64), torch.zeros(64), torch.empty(4, 64),
                 torch.empty(4), out, 4, 64, eps)
    assert torch.equal(rstd[1], rstd[0]), rstd
    torch.testing.assert_close(rstd[1], 1 / torch.sqrt(x.var(1, unbiased=False) + 1))
    with pytest.raises(TypeError, match=r"layer_norm_forward: the parameter 'int64_t N' cannot take the float 64.0"):
        emu.call("layer_norm_forward", torch.float32, x, None, None, x, rstd[0], rstd[0], 4, 64.0, 1.0)


def test_shuffled_thread_order_exposes_a_missing_barrier(emu):
    blocks, threads = 4, 64
    want = (torch.arange(blocks).repeat_interleave(threads) + 1).float()
    results = {}
    for synced in (1, 0):
        for seed in (0, 1, 2):
            emu.shuffle_threads(seed)
            out = torch.full((blocks * threads,), float("nan"))
            emu.call("test_publish", out, blocks, threads, synced)
            results[synced, seed] = torch.equal(out, want)
    emu.shuffle_threads(0)
    assert all(results[1, seed] for seed in (0, 1, 2))  # with the barrier: right in every order
    assert results[0, 0]  # the race hides in index order...
    assert not results[0, 1] and not results[0, 2]  # ...and shows when threads run in other orders


def test_undefined_behaviour_in_a_kernel_fails_its_launch_naming_the_line(emu, capfd):
    """It ended the process (the sanitizer's exit, which under pytest named no test and lost the report with the
    captured stderr): now the launch fails naming the kernel's own file and line (not the build folder's copy),
    as often as it happens, and the report is on stderr."""
    out = torch.zeros(32, dtype=torch.int32)
    emu.call("test_overflow", out, 2**31 - 100)  # no overflow for 32 threads
    assert torch.equal(out, torch.arange(2**31 - 100, 2**31 - 68, dtype=torch.int32))
    line = next(n for n, text in enumerate(FAULTS.read_text().splitlines(), 1) if "void overflow_kernel" in text)
    fault = (rf"^test_overflow: cudaError 719: undefined behaviour at {re.escape(str(FAULTS))}:{line}, reported by "
             r"UndefinedBehaviorSanitizer on stderr \(block 0,0,0, thread 10,0,0\)$")
    for _ in range(2):
        capfd.readouterr()
        with pytest.raises(KernelFault, match=fault):
            emu.call("test_overflow", out, 2**31 - 10)
        report = capfd.readouterr().err
        assert f"{FAULTS}:{line}:" in report and "runtime error: signed integer overflow" in report, report
    emu.call("test_overflow", out, 2**31 - 100)  # the library runs on


def test_undefined_behaviour_in_host_code_aborts_so_faulthandler_names_the_call():
    """Outside a kernel the call cannot fail: it exited with status 1, which under pytest named nothing."""
    code = (
        "import faulthandler\n"
        "from pathlib import Path\n"
        "import torch\n"
        "from hetrain.checks import cuda_emulator\n"
        "faulthandler.enable()\n"
        f"emu = cuda_emulator.Emulator(cuda_emulator.build(extra=[Path({str(FAULTS)!r})]))\n"
        "emu.call('test_host_overflow', torch.zeros(1, dtype=torch.int32), 2**31 - 5)\n"
        "print('not stopped')\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert run.returncode == -signal.SIGABRT and "not stopped" not in run.stdout, (run.returncode, run.stderr)
    assert f"{FAULTS}:" in run.stderr and "runtime error: signed integer overflow" in run.stderr, run.stderr
    assert 'File "<string>", line 7' in run.stderr, run.stderr  # faulthandler's traceback names the call


def test_an_error_without_a_fault_carries_no_earlier_faults_message(emu):
    """The message of an earlier call's fault stayed, and a later refusal of arguments was reported with it."""
    with pytest.raises(KernelFault, match="__syncthreads reached by 40 of 64 threads"):
        emu.call("test_early_return", torch.zeros(64), 64, 40)
    with pytest.raises(KernelFault, match=r"^test_refused: cudaError 1: invalid arguments$"):
        emu.call("test_refused")


def test_shared_memory_a_block_did_not_write_reads_as_nan(emu):
    """Shared arrays were plain statics, never refilled: a value a block did not write read as the one an
    earlier block or launch left there (or 0), so a kernel reading unwritten shared memory passed."""
    out = torch.zeros(2 * 64)
    emu.call("test_unwritten_shared", out, 2, 64)  # block 0 writes all 64 values, block 1 the first 32
    values = torch.arange(1, 65).float()
    assert torch.equal(out[:64], values) and torch.equal(out[64:96], values[:32])
    assert out[96:].isnan().all(), out[96:]  # not block 0's values


def test_shuffled_block_order_exposes_blocks_summed_without_atomics(emu):
    """Blocks ran in index order in the shuffled run too: a sum over blocks without atomics, which a GPU adds
    in any order, gave the same bits in both runs."""
    x = torch.ones(64)
    x[0] = 2.0**24  # after it, every 1 rounds away in float32; added before it, they count
    sums = {}
    for seed in (0, 1, 2):
        emu.shuffle_threads(seed)
        out = torch.zeros(1)
        emu.call("test_block_sum", x, out, 64)
        sums[seed] = out.item()
    emu.shuffle_threads(0)
    assert sums[0] == 2.0**24 and sums[1] != sums[0] and sums[2] != sums[0], sums
