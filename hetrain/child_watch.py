"""Rank 0's watch over the ranks Lightning's subprocess launcher starts from it, in place of Lightning's own.

Lightning's observer (``_ChildProcessObserver``) SIGKILLs rank 0 within 5 s of a launched rank ending with an error:
a rank 0 blocked for good in a collective with the ended rank would otherwise never end. It killed rank 0 as well
while that rank was recording the failure (its on_exception hooks, reading the other ranks' logs, waiting for their
outcomes, the summary): the run left no summary.json and exited -9. This watch lets rank 0 end its run first, up to
a bound, and only then ends every rank as Lightning does. Rank 0's wait for the other ranks' outcomes reads the
exit codes of those it launched: one killed without telling its outcome holds that wait up no longer.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress

from pytorch_lightning.strategies.launchers import subprocess_script

log = logging.getLogger(__name__)


class ChildWatch(threading.Thread):
    """Polls the launched ranks as Lightning's observer does; once one has ended with an error, waits up to
    ``grace_s`` (from then) for ``run_ended()`` (rank 0's current run) to be set, then ``exit_s`` for rank 0 to exit
    by itself, and then kills every rank, rank 0 last."""

    def __init__(self, children: list[subprocess.Popen], main_pid: int, run_ended: Callable[[], threading.Event],
                 grace_s: float, exit_s: float = 30.0, period_s: float = 5.0) -> None:
        super().__init__(daemon=True, name="hetrain-child-watch")  # ends with rank 0's process
        self.children, self.main_pid, self.run_ended = children, main_pid, run_ended
        self.grace_s, self.exit_s, self.period_s = grace_s, exit_s, period_s

    def run(self) -> None:
        while True:
            time.sleep(self.period_s)
            codes = [child.poll() for child in self.children]
            if all(code == 0 for code in codes):
                return
            failed = next(((rank, code) for rank, code in enumerate(codes, 1) if code), None)
            if failed is not None:
                break
        rank, code = failed
        ended = exit_text(code)
        log.warning(f"hetrain: local rank {rank} ended with {ended}; rank 0 records the failure, then every rank "
                    f"is ended (in {self.grace_s:.0f} s at most)")
        if self.run_ended().wait(self.grace_s):
            time.sleep(self.exit_s)  # rank 0 exits meanwhile, as a rule, and this thread with it
            log.error(f"hetrain: rank 0 did not exit within {self.exit_s:.0f} s of ending its run, local rank {rank} "
                      f"having ended with {ended}: ending every rank")
        else:
            log.error(f"hetrain: rank 0 did not end its run within {self.grace_s:.0f} s of local rank {rank} ending "
                      f"with {ended} (blocked in a collective with it, or still ending its fit?): ending every rank")
        # Lightning's signal: SIGTERM does not end a process blocked in a collective.
        kill = signal.SIGTERM if sys.platform == "win32" else signal.SIGKILL
        for child in self.children:
            child.send_signal(kill)  # skips one already reaped
        os.kill(self.main_pid, kill)


def exit_text(code: int) -> str:
    """A process's exit code as a log says it: ``code -9 (SIGKILL)`` for one a signal ended."""
    if code < 0:
        with suppress(ValueError):  # a number no signal of this platform has
            return f"code {code} ({signal.Signals(-code).name})"
    return f"code {code}"


@contextmanager
def watching_launched_ranks(run_ended: Callable[[], threading.Event], grace_s: float,
                            launched: list[subprocess.Popen]) -> Iterator[None]:
    """Within: a fit whose Lightning launcher starts the other ranks gets a :class:`ChildWatch` over them instead of
    Lightning's observer (the name its launcher calls, which it imported from lightning_fabric). ``launched`` gets
    those ranks (local ranks 1, 2, ... in order), whose exit codes outlast the fit."""
    lightning_observer = subprocess_script._launch_process_observer

    def watch(children: list[subprocess.Popen]) -> None:
        launched[:] = children  # Lightning launches once per process; a later launch would start afresh
        ChildWatch(children, os.getpid(), run_ended, grace_s).start()

    subprocess_script._launch_process_observer = watch
    try:
        yield
    finally:
        subprocess_script._launch_process_observer = lightning_observer
