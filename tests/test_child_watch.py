"""Rank 0 and the ranks Lightning launched from it: their exit codes, read by the watch and by rank 0's wait for the
other ranks' outcomes (the whole runs under DDP are in test_ddp.py)."""

import json
import signal
import subprocess
import sys
import threading
from datetime import timedelta

import torch.distributed as dist
from pytorch_lightning.strategies.launchers import subprocess_script

from hetrain import train
from hetrain.child_watch import exit_text, watching_launched_ranks

# Rank 1 of a 2-process gloo group over rank 0's store (its port in argv[1]), killed once it has joined, as the OOM
# killer ends a rank after the fit's last collective.
KILLED_RANK_1 = """
import os, signal, sys
from datetime import timedelta
import torch.distributed as dist
store = dist.TCPStore("127.0.0.1", int(sys.argv[1]), 2, is_master=False, timeout=timedelta(seconds=60))
dist.init_process_group("gloo", store=store, rank=1, world_size=2, timeout=timedelta(seconds=60))
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_exit_codes_name_the_signal_that_ended_the_process():
    assert (exit_text(-9), exit_text(-15), exit_text(1), exit_text(-1000)) == (
        "code -9 (SIGKILL)", "code -15 (SIGTERM)", "code 1", "code -1000")


def test_the_ranks_lightning_launches_are_kept_for_their_exit_codes():
    """Called as Lightning's launcher calls its observer; ranks that exit 0 leave the watch nothing to do."""
    launched = []
    children = [subprocess.Popen([sys.executable, "-c", "pass"]) for _ in range(2)]
    with watching_launched_ranks(threading.Event, 60, launched):
        subprocess_script._launch_process_observer(children)
    assert launched == children
    assert [child.wait(timeout=30) for child in children] == [0, 0]


def test_rank_0_stops_waiting_for_the_outcome_of_a_launched_rank_that_was_killed(monkeypatch):
    """Rank 0 waited _OUTCOME_WAIT_S (120 s) for it: its watch, which gives it 180 s from that rank's exit to write
    the summary, killed it during that wait when its fit took a minute to end (exit 137, no summary.json)."""
    store = dist.TCPStore("127.0.0.1", 0, 2, is_master=True, wait_for_workers=False)
    rank1 = subprocess.Popen([sys.executable, "-c", KILLED_RANK_1, str(store.port)])
    try:
        dist.init_process_group("gloo", store=store, rank=0, world_size=2, timeout=timedelta(seconds=60))
        assert rank1.wait(timeout=60) == -signal.SIGKILL
        # A rank this process did not launch (torchrun, another node): waited for up to _OUTCOME_WAIT_S.
        monkeypatch.setattr(train, "_OUTCOME_WAIT_S", 0.2)
        failed, left = train._failed_other_ranks(0, None)
        assert failed["rank 1"].startswith("no outcome from rank 1 within 0 s of this rank finishing") and left
        # Launched from this process: its exit ends the wait, and the summary gets its exit code.
        monkeypatch.setattr(train, "_launched", [rank1])
        monkeypatch.setattr(train, "_OUTCOME_WAIT_S", 60.0)
        monkeypatch.setattr(train, "_TOLD_BEFORE_EXIT_S", 0.2)
        assert train._failed_other_ranks(1, None) == ({"rank 1": "rank 1 ended with code -9 (SIGKILL) without "
                                                                  "telling how its run ended (killed? see the end "
                                                                  "of its log)"}, True)
        # What it told before it exited is read all the same.
        told = {"rank": "rank 1", "error": "RuntimeError: failure in on_fit_end", "leaves_sweep": False}
        train._store().set(train._outcome_key(2, 1), json.dumps(told))
        assert train._failed_other_ranks(2, None) == ({"rank 1": "RuntimeError: failure in on_fit_end"}, False)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        rank1.kill()
        rank1.wait()
