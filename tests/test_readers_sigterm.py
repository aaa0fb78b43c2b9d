"""A loader's processes (the ring loader's readers, the workers of hetrain's torch DataLoaders) and SIGTERM: one that
another process sends (a scheduler's, to every process of the job) leaves them running, their parent's ends them, and
a process they start ends on SIGTERM as usual.

The fits that go on through the job's SIGTERM are in tests/test_callbacks_graceful_stop.py.
"""

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from hetrain import _ext
from hetrain.data.readers import ReaderProcesses, sigterm_filter_missing
from hetrain.data.splits import ignore_interrupts_in_workers

ROOT = Path(__file__).resolve().parent.parent


class Samples(torch.utils.data.Dataset):
    def __len__(self):
        return 8

    def __getitem__(self, i):
        return {"input_ids": torch.arange(3) + i, "label": i}


def _sigterm_from_another_process(pid: int) -> None:
    subprocess.run([sys.executable, "-c", f"import os; os.kill({pid}, {int(signal.SIGTERM)})"], check=True)


def test_a_reader_reads_on_through_another_processs_sigterm_and_ends_on_its_parents():
    """SLURM or systemd sends SIGTERM to every process of the job: the reader died of it ("killed by SIGTERM"), and
    the fit GracefulStop was finishing failed on its next batch."""
    readers = ReaderProcesses(Samples(), 1)
    try:
        process = readers._readers[0].process
        _sigterm_from_another_process(process.pid)
        time.sleep(0.3)  # time for the reader to act on it, were it to
        assert process.exitcode is None
        assert [sample["label"] for sample in readers.read([0, 1, 2], lambda: False, 0.05)] == [0, 1, 2]
        # Its parent's SIGTERM (stop()'s, multiprocessing's at exit) still ends it, as SIGTERM's default action.
        process.terminate()
        process.join(5)
        assert process.exitcode == -signal.SIGTERM
    finally:
        readers.stop()


# A process that ends while it still holds its loader's processes: multiprocessing's exit terminates its daemonic
# children with SIGTERM and joins them, which a process that ignored every SIGTERM never let return.
HELD_AT_EXIT = """
import signal, sys
if sys.argv[2] == "without_sigwaitinfo":  # as on macOS
    del signal.sigwaitinfo
from torch.utils.data import DataLoader
from hetrain.data.readers import ReaderProcesses
from hetrain.data.splits import ignore_interrupts_in_workers

if sys.argv[1] == "readers":
    readers = ReaderProcesses(list(range(8)), 2)
    print(readers.read([0, 1, 2], lambda: False, 0.05))
else:
    init = ignore_interrupts_in_workers()
    batches = iter(DataLoader(list(range(64)), batch_size=2, num_workers=2, worker_init_fn=init))
    print(next(batches).tolist())
"""


@pytest.mark.parametrize("processes", ["readers", "dataloader_workers"])
@pytest.mark.parametrize("signal_module", ["linux", "without_sigwaitinfo"])
def test_a_process_that_exits_holding_its_loaders_processes_ends_them_and_exits(tmp_path, processes, signal_module):
    """Without signal.sigwaitinfo the loaders' processes blocked SIGTERM and never took it: the exit hung."""
    held = subprocess.Popen([sys.executable, "-c", HELD_AT_EXIT, processes, signal_module], cwd=tmp_path, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, process_group=0,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        stdout, stderr = held.communicate(timeout=60)
    finally:  # a hang leaves the loader's processes too
        with contextlib.suppress(ProcessLookupError):
            os.killpg(held.pid, signal.SIGKILL)
    assert held.returncode == 0, stderr[-3000:]
    assert stdout.splitlines()[0] in ("[0, 1, 2]", "[0, 1]")


class WithAThread(torch.utils.data.Dataset):
    """A dataset that starts a thread of its own when it arrives in a worker (a client's, say), before the worker runs
    its ``worker_init_fn``: as numpy's OpenBLAS pool, there under spawn and forkserver, and torch's own threads."""

    def __init__(self):
        self.arrived = False

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.arrived = True
        threading.Thread(target=time.sleep, args=(3600,), daemon=True).start()

    def __len__(self):
        return 64

    def __getitem__(self, i):
        return torch.tensor([os.getpid(), self.arrived])


@pytest.mark.parametrize("start_method", ["spawn", "forkserver"])
def test_workers_started_by_spawn_or_forkserver_read_on_through_another_processs_sigterm(start_method):
    """Where a worker has threads before its worker_init_fn runs (Python 3.14's default start method on Linux is
    forkserver), the job's SIGTERM went to one of them, which did not block it, and torch's handler ended the worker
    ("DataLoader worker ... is killed by signal: Terminated")."""
    batches = iter(DataLoader(WithAThread(), batch_size=2, num_workers=1, worker_init_fn=ignore_interrupts_in_workers(),
                              multiprocessing_context=start_method, persistent_workers=True))
    try:
        pid, arrived = next(batches)[0].tolist()
        worker = batches._workers[0]
        assert arrived and pid == worker.pid
        _sigterm_from_another_process(worker.pid)
        time.sleep(0.3)  # time for the worker to act on it, were it to
        assert worker.is_alive()
        assert next(batches)[0].tolist() == [worker.pid, True]
        # Its parent's SIGTERM (torch's last resort) ends it with exit code 0, as torch's own handler does.
        worker.terminate()
        worker.join(5)
        assert worker.exitcode == 0
    finally:
        batches._shutdown_workers()


class StartsAProcess(torch.utils.data.Dataset):
    """Each sample: how a process started from the reading one (by fork and exec, or by fork alone) ended on the
    SIGTERM sent to it."""

    def __len__(self):
        return 2

    def __getitem__(self, i):
        if i == 0:
            started = subprocess.Popen(["sleep", "30"])
            started.terminate()
            try:
                return started.wait(5)
            except subprocess.TimeoutExpired:
                started.kill()
                started.wait()
                return "still running 5 s after SIGTERM"
        pid = os.fork()
        if pid == 0:  # a process forked alone inherits the reading one's handlers
            time.sleep(30)
            os._exit(0)
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            ended, status = os.waitpid(pid, os.WNOHANG)
            if ended:
                return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
            time.sleep(0.02)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        return "still running 5 s after SIGTERM"


@pytest.mark.parametrize("processes", ["readers", "dataloader_workers"])
def test_a_process_started_from_a_reader_or_worker_ends_on_sigterm(processes):
    """Blocking SIGTERM in a loader's process passed the blocked mask on to every process it started (fork and exec
    keep it): one started to run a tool, say, could no longer be terminated."""
    if processes == "readers":
        readers = ReaderProcesses(StartsAProcess(), 1)
        try:
            assert readers.read([0, 1], lambda: False, 0.05) == [-signal.SIGTERM, -signal.SIGTERM]
        finally:
            readers.stop()
    else:
        loader = DataLoader(StartsAProcess(), batch_size=None, num_workers=1,
                            worker_init_fn=ignore_interrupts_in_workers())
        assert list(loader) == [-signal.SIGTERM, -signal.SIGTERM]


def test_without_the_extension_sigterm_is_left_as_it_was_after_one_warning(monkeypatch):
    """Where hetrain._C cannot be used (not built, or stale) nothing tells who sent a SIGTERM: the loaders' processes
    end on any, as without hetrain, and the main process says why once."""
    monkeypatch.setattr(_ext, "available", lambda: "hetrain._C is not built (build it with: pip install -e .)")
    sigterm_filter_missing.cache_clear()
    readers = None
    try:
        with pytest.warns(UserWarning, match="filtering it needs the built extension: hetrain._C is not built"):
            ignore_interrupts_in_workers()
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # once
            readers = ReaderProcesses(Samples(), 1)
        process = readers._readers[0].process
        assert [sample["label"] for sample in readers.read([0, 1], lambda: False, 0.05)] == [0, 1]
        _sigterm_from_another_process(process.pid)
        process.join(5)
        assert process.exitcode == -signal.SIGTERM
    finally:
        if readers is not None:
            readers.stop()
        sigterm_filter_missing.cache_clear()
