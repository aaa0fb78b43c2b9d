"""A loader's processes (the ring loader's readers, the workers of hetrain's torch DataLoaders) and SIGTERM: one that
another process sends (a scheduler's, to every process of the job) leaves them running, their parent's ends them.

The fits that go on through the job's SIGTERM are in tests/test_callbacks_graceful_stop.py.
"""

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from hetrain.data.readers import ReaderProcesses

ROOT = Path(__file__).resolve().parent.parent


class Samples(torch.utils.data.Dataset):
    def __len__(self):
        return 8

    def __getitem__(self, i):
        return {"input_ids": torch.arange(3) + i, "label": i}


def test_a_reader_reads_on_through_another_processs_sigterm_and_ends_on_its_parents():
    """SLURM or systemd sends SIGTERM to every process of the job: the reader died of it ("killed by SIGTERM"), and
    the fit GracefulStop was finishing failed on its next batch."""
    readers = ReaderProcesses(Samples(), 1)
    try:
        process = readers._readers[0].process
        subprocess.run([sys.executable, "-c", f"import os; os.kill({process.pid}, {int(signal.SIGTERM)})"], check=True)
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
import sys
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
def test_a_process_that_exits_holding_its_loaders_processes_ends_them_and_exits(tmp_path, processes):
    held = subprocess.Popen([sys.executable, "-c", HELD_AT_EXIT, processes], cwd=tmp_path, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, process_group=0,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        stdout, stderr = held.communicate(timeout=60)
    finally:  # a hang leaves the loader's processes too
        with contextlib.suppress(ProcessLookupError):
            os.killpg(held.pid, signal.SIGKILL)
    assert held.returncode == 0, stderr[-3000:]
    assert stdout.splitlines()[0] in ("[0, 1, 2]", "[0, 1]")
