"""Reader processes: forked processes that run ``dataset[i]`` for the ring loader's producer threads.

Why not ``multiprocessing.Pool``: a pool worker that dies takes its task with it and the pool's result
never arrives (the caller waits forever); its ``terminate()`` can assert ("Cannot have cache with
result_hander not alive") or block on its queue lock when results are still in flight; and torch's
reductions send tensors through it as shared-memory file descriptors fetched from the sending process,
which fails once that process has been stopped. Here each reader has its own pipe, a producer waits on
that pipe and on the process's exit at once (a dead reader is named, with its exit code, not waited on),
samples come back pickled by value (a tensor as its bytes), and stopping is a message, then SIGTERM, then SIGKILL.
A SIGTERM that another process sends (a scheduler's, to every process of the job) leaves the readers reading, where
hetrain._C is built (:func:`stop_on_the_parents_sigterm_only`).
"""

from __future__ import annotations

import contextlib
import functools
import io
import multiprocessing
import os
import pickle
import queue
import signal
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Iterator, Sequence
from multiprocessing.connection import Connection, wait
from typing import Any

import torch

from hetrain import _ext

_STOP_GRACE_S = 0.25  # how long a reader has to leave after the stop message before it is terminated


class _Stopped(Exception):
    """A read found the readers stopped (by another thread) while it waited: it returns None, as when ``stopped()``."""


class ReaderDied(RuntimeError):
    """A reader process ended while it was reading samples (the other readers go on)."""


def _tensor_from_bytes(raw: bytes, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    if not raw:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(dtype).reshape(shape)


class _SamplePickler(pickle.Pickler):
    """Pickles a plain CPU tensor as its raw bytes, dtype and shape.

    torch's own pickling of a tensor goes through ``torch.save`` per storage: about 0.1 ms a tensor each way,
    which for a batch of small samples costs the parent more GIL time than reading them in threads would.
    """

    def reducer_override(self, obj: Any) -> Any:
        if type(obj) is torch.Tensor and obj.layout == torch.strided and obj.device.type == "cpu" \
                and not obj.is_quantized and not obj.requires_grad:
            # A conjugate or negative view keeps its bit through contiguous(), and view(uint8) refuses it: resolving
            # writes the values it stands for (exact: a sign flip), which the receiver gets as a plain tensor.
            flat = obj.resolve_conj().resolve_neg().contiguous().reshape(-1)
            return _tensor_from_bytes, (flat.view(torch.uint8).numpy().tobytes(), obj.dtype, tuple(obj.shape))
        return NotImplemented


def _dumps(reply: tuple[str, Any]) -> bytes:
    buffer = io.BytesIO()
    _SamplePickler(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump(reply)
    return buffer.getvalue()


# How often a reader sends what it has read: often enough that the parent times a stall per sample and names the
# sample being read, seldom enough that a batch of small samples is a few messages (one a sample cost a quarter of
# the rate).
_SEND_EVERY_S = 0.05


class _Outbox:
    """The samples a reader has read and not yet sent, sent by a thread of its own every :data:`_SEND_EVERY_S`, so
    they reach the parent also while the next sample takes long to read (it then names that one as stalled)."""

    def __init__(self, conn: Connection) -> None:
        self.conn, self.lock = conn, threading.Lock()
        self.read: list[tuple[int, Any]] = []
        self.failed = False  # an error was sent for the current chunk: nothing more goes out for it
        threading.Thread(target=self._send_periodically, daemon=True, name="hetrain-reader-outbox").start()

    def _send_periodically(self) -> None:
        while True:
            time.sleep(_SEND_EVERY_S)
            try:
                self.send()
            except OSError:  # the parent closed the pipe: the reader is ending
                return

    def start_chunk(self) -> None:
        with self.lock:  # a sample read after the last chunk failed belongs to no chunk: it is not sent
            self.read, self.failed = [], False

    def add(self, index: int, sample: Any) -> None:
        with self.lock:
            if not self.failed:  # the sample being read when the chunk failed is not sent with the next one
                self.read.append((index, sample))

    def send(self, error: str | None = None) -> None:
        """Sends the samples read so far, then ``error`` if given (or the sample that cannot be pickled)."""
        with self.lock:
            if self.failed:
                return
            if self.read:
                reply = _reply_bytes(self.read)
                if reply is None:
                    error = _unpicklable(self.read)
                else:
                    self.conn.send_bytes(reply)
                self.read = []
            if error is not None:
                self.conn.send_bytes(pickle.dumps(("error", error)))
                self.failed = True


def _serve(outbox: _Outbox, dataset: Any, indices: Sequence[int]) -> None:
    """Reads the samples into ``outbox``, which sends ``("ok", samples)`` as they are read and stops at the first
    ``("error", message)``, naming the sample that failed (read or pickled): the parent takes no more of the chunk."""
    outbox.start_chunk()
    for index in indices:
        if outbox.failed:
            return
        try:
            outbox.add(index, dataset[index])
        except Exception as exc:  # the traceback too, as torch's DataLoader does: the parent cannot see where it was
            outbox.send(f"sample {index}: {type(exc).__name__}: {exc}\nOriginal traceback in the reader process:\n"
                        f"{traceback.format_exc().rstrip()}")
            return
    outbox.send()


def _reply_bytes(read: list[tuple[int, Any]]) -> bytes | None:
    try:
        return _dumps(("ok", [sample for _, sample in read]))
    except Exception:
        return None


def _unpicklable(read: list[tuple[int, Any]]) -> str:
    """Names the first sample of ``read`` that cannot be pickled, and why."""
    for index, sample in read:
        try:
            _dumps(("ok", sample))
        except Exception as exc:
            return (f"sample {index} cannot be sent back from the reader process (samples travel pickled; return "
                    f"picklable values): {type(exc).__name__}: {exc}")
    return f"samples {[index for index, _ in read]} cannot be sent back from the reader process together"


@functools.cache
def sigterm_filter_missing() -> str | None:
    """None where :func:`stop_on_the_parents_sigterm_only` can act; else why not (hetrain._C is unusable), warned
    once per process."""
    why = _ext.available()
    if why is True:
        return None
    warnings.warn(f"hetrain: the loaders' worker and reader processes die of a SIGTERM sent to every process of the "
                  f"job (a scheduler's), and a fit that GracefulStop is finishing then fails; filtering it needs the "
                  f"built extension: {why}", stacklevel=2)
    return why


def stop_on_the_parents_sigterm_only(exit_success: bool) -> None:
    """Makes this child process ignore a SIGTERM that its parent did not send; the parent's ends it, with exit code 0
    (``exit_success``) or as SIGTERM's default action does.

    SLURM (at a job's time limit, on preemption) and systemd send SIGTERM to every process of the job: a loader's
    reader or worker process died of it, and the fit that :class:`~hetrain.callbacks.GracefulStop` was finishing
    failed on its next batch, with no checkpoint. The parent stops these processes itself, and may do so with
    SIGTERM (:meth:`ReaderProcesses.stop`, torch's last resort, multiprocessing's exit for its daemonic processes):
    that one still ends them. A Python signal handler is not told who sent the signal: hetrain._C's
    (csrc/parent_signals.cpp) is, and it replaces this process's SIGTERM handler (torch's, in a DataLoader worker).
    It acts in whichever thread the signal reaches and blocks nothing: a process started from this one ends on
    SIGTERM as usual. Without a usable hetrain._C SIGTERM is left as it is, after a warning
    (:func:`sigterm_filter_missing`).
    """
    if sigterm_filter_missing() is not None:
        return
    parent = multiprocessing.parent_process()
    parent_pid = os.getppid() if parent is None else parent.pid  # not getppid() under forkserver: the server's
    torch.ops.hetrain_C.filter_sigterm(parent_pid, exit_success)


def _own_signals() -> None:
    """Drops the Python signal handlers the fork copied from the parent (Lightning's SIGTERM handler, which on rank 0
    kills the other ranks, its SIGUSR1 requeue handler, a scheduler's hook): they are the trainer's, and would run
    here instead, swallowing the SIGTERM that :meth:`ReaderProcesses.stop` ends a busy reader with. Ctrl-C reaches
    the whole process group, and a scheduler's SIGTERM the whole job: the loader stops the readers, so here both are
    ignored (SIGTERM unless the parent sent it: :func:`stop_on_the_parents_sigterm_only`)."""
    for signum in signal.valid_signals():
        if callable(signal.getsignal(signum)):  # a Python handler; C-level ones (torch's SIGSEGV, say) stay
            signal.signal(signum, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # even if the parent ignores it: stop() terminates with it
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    stop_on_the_parents_sigterm_only(exit_success=False)  # the parent's: killed by SIGTERM, as by default


def _reader_main(conn: Connection, dataset: Any, inherited: Sequence[Connection]) -> None:
    """A reader's loop: a list of indices in, the samples out as they are read (see :func:`_serve`)."""
    _own_signals()
    for other in inherited:  # the parent's ends of every reader's pipe, copied at fork: not this process's to hold
        other.close()
    torch.set_num_threads(1)  # as torch's DataLoader workers: one thread each, the processes are the parallelism
    outbox = _Outbox(conn)
    while True:
        try:
            indices = conn.recv()
        except (EOFError, OSError):
            return
        if indices is None:
            return
        _serve(outbox, dataset, indices)


def _exit_description(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


class _Reader:
    def __init__(self, process: multiprocessing.Process, conn: Connection) -> None:
        self.process, self.conn = process, conn
        self.chunk: list[int] = []  # the indices it was last sent
        self.owed = 0  # samples of that chunk not yet received: it reads again only once this is 0
        self.dead = False  # its death was counted


class ReaderProcesses:
    """``count`` forked processes holding ``dataset``; :meth:`read` spreads a batch's indices over idle ones.

    Create it before starting any thread of your own, so that no lock is copied held into a reader. Safe to
    call :meth:`read` from several threads; each reader serves one call at a time.
    """

    def __init__(self, dataset: Any, count: int) -> None:
        context = multiprocessing.get_context("fork")
        sigterm_filter_missing()  # warned here, not in every reader
        self._idle: queue.Queue[_Reader] = queue.Queue()
        self._owing: list[_Reader] = []  # readers still answering a read that failed or stopped
        self._owing_lock = threading.Lock()
        self._readers: list[_Reader] = []
        self.alive = count
        self._stopped = False  # stop() ran: the process objects are closed, and no read is served
        self._deaths = threading.Lock()
        self.last_death = ""
        for _ in range(count):
            parent_end, child_end = context.Pipe()
            process = context.Process(
                target=_reader_main, args=(child_end, dataset, [r.conn for r in self._readers] + [parent_end]),
                name="hetrain-ring-reader", daemon=True)
            process.start()
            child_end.close()
            reader = _Reader(process, parent_end)
            self._readers.append(reader)
            self._idle.put(reader)

    def read(self, indices: Sequence[int], stopped: Callable[[], bool], poll_s: float,
             progress: Callable[[int], None] = lambda sample: None) -> list[Any] | None:
        """``[dataset[i] for i in indices]`` read by the reader processes; None once ``stopped()``.

        ``progress(sample)`` is called whenever another sample becomes the oldest one still being read, and
        ``progress(-1)`` at every poll while waiting for an idle reader: what the caller reports to a stall
        check, so that a stall is timed per sample (not per batch) and names the sample holding it up.
        Raises RuntimeError naming the sample (with the reader's traceback) when the dataset raised, and
        :class:`ReaderDied` naming the process and its exit when a reader ended (a crash, the OOM killer), as soon
        as either happens: the other readers of this call finish their samples on their own and then serve later
        calls.
        """
        if not indices:  # no reader would answer an empty chunk
            return []
        try:
            taken = self._take(len(indices), stopped, poll_s, progress)
        except _Stopped:
            return None
        if taken is None:
            return None
        chunks = [list(indices[k::len(taken)]) for k in range(len(taken))]  # interleaved: the order is restored
        results: list[list[Any]] = [[] for _ in taken]
        try:
            deaths = [self._died(reader, f"while idle, before reading samples {sorted(chunk)}")
                      for reader, chunk in zip(taken, chunks, strict=True) if reader.process.exitcode is not None]
            if deaths:  # readers that died idle (the OOM killer picks any process): all counted out, all named
                raise ReaderDied("\n".join(deaths))
            for reader, chunk in zip(taken, chunks, strict=True):
                try:
                    reader.conn.send(chunk)
                except OSError:  # its end of the pipe closed: it died since the check above
                    raise ReaderDied(self._died(reader, f"while idle, before reading samples {sorted(chunk)}")) \
                        from None
                reader.chunk, reader.owed = chunk, len(chunk)
            pending = dict(enumerate(taken))
            started = dict.fromkeys(pending, time.monotonic())  # when each reader began its current sample
            noted = None
            while pending:
                if stopped() or self._stopped:
                    return None
                oldest = min(pending, key=started.__getitem__)  # the sample read the longest
                if chunks[oldest][len(results[oldest])] != noted:
                    noted = chunks[oldest][len(results[oldest])]
                    progress(noted)
                with self._unless_stopped():
                    ready = wait([r.conn for r in pending.values()] + [r.process.sentinel for r in pending.values()],
                                 poll_s)
                for k, reader in list(pending.items()):
                    with self._unless_stopped():
                        reply = self._reply(reader, ready, chunks[k])
                    if reply is None:
                        continue
                    status, payload = reply
                    if status == "error":
                        reader.owed = 0  # it sends nothing more for this chunk
                        raise RuntimeError(payload)
                    if status == "died":
                        if self._stopped:  # stop() ended it: no death to report
                            return None
                        raise ReaderDied(payload)
                    results[k].extend(payload)
                    reader.owed -= len(payload)
                    started[k] = time.monotonic()
                    if not reader.owed:
                        del pending[k]
        except _Stopped:
            return None
        finally:  # a reader still owing samples (the call failed or stopped) is drained before it reads again
            for reader in taken:
                if reader.owed:
                    with self._owing_lock:
                        self._owing.append(reader)
                elif not reader.dead:
                    self._idle.put(reader)
        samples: list[Any] = [None] * len(indices)
        for k, chunk_samples in enumerate(results):
            samples[k::len(taken)] = chunk_samples
        return samples

    @contextlib.contextmanager
    def _unless_stopped(self) -> Iterator[None]:
        """Turns the error of a pipe or process that stop() closed meanwhile (a read racing it) into _Stopped."""
        try:
            yield
        except (OSError, ValueError):
            if self._stopped:
                raise _Stopped from None
            raise

    def _reply(self, reader: _Reader, ready: list[Any], indices: list[int]) -> tuple[str, Any] | None:
        """``(status, payload)`` when the reader sent a sample or an error or ended, None while it is reading."""
        if reader.conn not in ready and reader.process.sentinel not in ready:
            return None
        if reader.conn in ready or reader.conn.poll():
            try:
                return pickle.loads(reader.conn.recv_bytes())
            except (EOFError, OSError):  # its end of the pipe closed: the process is gone
                pass
        return "died", self._died(reader, f"while reading samples {sorted(indices)}")

    def _died(self, reader: _Reader, doing: str) -> str:
        """Collects a reader that ended, counts it out and describes it (also as :attr:`last_death`). Once stop()
        began, stop() alone reaps the readers (two threads joining one process raced)."""
        if self._stopped:
            raise _Stopped
        reader.process.join(_STOP_GRACE_S)  # its exit code, once the kernel has reaped it
        if reader.process.exitcode is None:
            reader.process.kill()
            reader.process.join()
        reader.dead, reader.owed = True, 0
        with self._deaths:
            self.alive -= 1
            self.last_death = (f"hetrain: reader process {reader.process.pid} ended "
                               f"({_exit_description(reader.process.exitcode)}) {doing}; {self.alive} reader(s) "
                               "left. A reader killed by SIGKILL is often the kernel's OOM killer: lower "
                               "reader_processes, or read in the producer threads (reader_processes=0)")
            return self.last_death

    def _drain(self) -> None:
        """Takes what the owing readers sent since, without waiting: one that answered its whole chunk is idle
        again (so no sample of a failed call reaches a later one), one that ended is counted out."""
        with self._owing_lock:
            for reader in list(self._owing):
                gone = False
                try:
                    while reader.owed and reader.conn.poll():
                        status, payload = pickle.loads(reader.conn.recv_bytes())
                        reader.owed = reader.owed - len(payload) if status == "ok" else 0
                except (EOFError, OSError):  # its end of the pipe closed: the process is gone
                    gone = True
                if reader.owed and not gone and reader.process.exitcode is None:
                    continue  # still reading
                self._owing.remove(reader)
                if reader.owed:
                    self._died(reader, f"while reading samples {sorted(reader.chunk)} of a call that had failed")
                else:
                    self._idle.put(reader)

    def _take(self, wanted: int, stopped: Callable[[], bool], poll_s: float,
              progress: Callable[[int], None]) -> list[_Reader] | None:
        """At least one idle reader (waiting for one, calling ``progress(-1)`` per poll: waiting behind busy
        readers is no stall), and every other idle one up to ``wanted``."""
        while True:
            if stopped() or self._stopped:  # before looking at the processes, which stop() closed
                return None
            self._drain()
            if self.alive == 0:
                raise ReaderDied(f"hetrain: no reader process left; the last one: {self.last_death}")
            progress(-1)
            try:
                taken = [self._idle.get(timeout=poll_s)]
                break
            except queue.Empty:
                continue
        while len(taken) < wanted:
            try:
                taken.append(self._idle.get_nowait())
            except queue.Empty:
                break
        return taken

    def stop(self) -> None:
        """Asks every reader to leave, then terminates and finally kills the ones still there, and releases each
        one's pipes: a stopped loader kept referenced (by a trainer, say) held them until it was collected. Once
        only: a second call returns at once."""
        if self._stopped:
            return
        self._stopped = True
        for reader in self._readers:
            try:
                reader.conn.send(None)
            except (OSError, ValueError):
                pass  # already gone: its exit is collected below
        deadline = time.monotonic() + _STOP_GRACE_S
        for reader in self._readers:
            reader.process.join(max(0.0, deadline - time.monotonic()))
        for reader in self._readers:
            if reader.process.exitcode is None:  # still inside a slow sample
                reader.process.terminate()
                reader.process.join(_STOP_GRACE_S)
            if reader.process.exitcode is None:
                reader.process.kill()
                reader.process.join()
            reader.conn.close()
            reader.process.close()  # the two pipe ends multiprocessing keeps to watch its exit (its sentinel)
