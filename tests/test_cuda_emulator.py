"""The CUDA emulator itself (csrc/emu, hetrain.checks.cuda_emulator): its launch rewriting, its indices, and
the faults and races it must report, on the test kernels of tests/cpp/emulated_faults.cu."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hetrain.checks import cuda_emulator
from hetrain.checks.cuda_emulator import Emulator, KernelFault, rewrite_launches

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
    with pytest.raises(ValueError, match="without arguments"):
        rewrite_launches("k<<<1, 1>>>;")


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


def test_shuffle_in_a_partial_warp_is_reported(emu):
    with pytest.raises(KernelFault, match="partial warp"):
        emu.call("test_shuffle", torch.zeros(48), 48)


def test_invalid_launch_configuration_is_reported(emu):
    with pytest.raises(KernelFault, match=r"invalid launch configuration.*block \(2048,1,1\)"):
        emu.call("test_index", torch.zeros(2048, dtype=torch.int32), 1, 1, 1, 2048, 1, 1)


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


def test_undefined_behaviour_in_a_kernel_stops_the_process_naming_the_line(emu):
    out = torch.zeros(32, dtype=torch.int32)
    emu.call("test_overflow", out, 2**31 - 100)  # no overflow for 32 threads
    assert torch.equal(out, torch.arange(2**31 - 100, 2**31 - 68, dtype=torch.int32))
    code = (
        "import torch\n"
        "from pathlib import Path\n"
        "from hetrain.checks import cuda_emulator\n"
        f"emu = cuda_emulator.Emulator(cuda_emulator.build(extra=[Path({str(FAULTS)!r})]))\n"
        "emu.call('test_overflow', torch.zeros(32, dtype=torch.int32), 2**31 - 10)\n"
        "print('not stopped')\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert run.returncode != 0 and "not stopped" not in run.stdout
    assert "runtime error: signed integer overflow" in run.stderr and "emulated_faults.cu" in run.stderr, run.stderr
