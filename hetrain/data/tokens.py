"""Token files: a corpus tokenised once, read through the page cache by any number of workers.

``<prefix>.bin`` holds every document's tokens back to back as little-endian uint16 or uint32 (half
or a quarter of int64's bytes; uint16 holds vocabularies up to 65536). ``<prefix>.idx`` holds a
32-byte header and ``num_docs + 1`` uint64 token offsets: document ``i`` is ``tokens[off[i]:off[i+1]]``.

Header: magic ``HETOKENS`` (8 bytes), version (u32), bytes per token (u32), num_docs (u64),
num_tokens (u64). Both files are memory-mapped, so opening a corpus reads no tokens.
"""

from __future__ import annotations

import contextlib
import glob
import operator
import os
import re
import signal
import struct
import threading
import time
import uuid
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from hetrain.data.integers import whole_numbers

MAGIC = b"HETOKENS"
VERSION = 1
HEADER = struct.Struct("<8sIIQQ")
DTYPES = {2: np.dtype("<u2"), 4: np.dtype("<u4")}
# A writer's .idx temporary lives from its write to its rename, moments apart: one younger than this may belong to a
# writer renaming now, whose files are left alone.
RENAMING_S = 10.0


def paths_of(prefix: str | os.PathLike) -> tuple[Path, Path]:
    """``(<prefix>.bin, <prefix>.idx)``; ``prefix`` may also name either file."""
    p = Path(prefix)
    if p.suffix in (".bin", ".idx"):
        p = p.with_suffix("")
    return p.with_name(p.name + ".bin"), p.with_name(p.name + ".idx")


class TokenFile:
    """A memory-mapped token file: ``len()`` documents, ``tf[i]`` the tokens of document ``i``.

    ``validate`` checks at open what would otherwise surface mid-epoch: the header, monotone offsets,
    and that the .bin holds exactly the tokens the index promises (a truncated copy fails here). Pickled (to a
    spawned worker), it travels as its path and is mapped again there.
    """

    def __init__(self, prefix: str | os.PathLike, validate: bool = True) -> None:
        # Absolute as of opening: check_unchanged and the ring's C++ reader open the path again, maybe after the job
        # changed directory, and a relative path then named another file, or none.
        self.bin_path, self.idx_path = paths_of(Path(prefix).absolute())
        for path in (self.bin_path, self.idx_path):
            if not path.is_file():
                raise FileNotFoundError(f"hetrain: token file {path} does not exist (build it: python -m hetrain.data."
                                        f"build_tokens <text or .jsonl files> --out {path.with_suffix('')})")
        # Each file is opened once: its header, its map and its identity (for check_unchanged) come from the same
        # open file, whatever is renamed onto the path meanwhile.
        with open(self.idx_path, "rb") as idx:
            raw = idx.read(HEADER.size)  # the header alone: the offsets are mapped, not read
            if len(raw) < HEADER.size:
                raise ValueError(f"hetrain: token index {self.idx_path} is truncated: {len(raw)} bytes, no full "
                                 f"header. {self._rebuild()}")
            magic, version, itemsize, num_docs, num_tokens = HEADER.unpack(raw)
            if magic != MAGIC or version != VERSION or itemsize not in DTYPES:
                raise ValueError(
                    f"hetrain: {self.idx_path} is not a hetrain token index (magic {magic!r}, version {version}, "
                    f"{itemsize} bytes per token; expected {MAGIC!r}, {VERSION}, 2 or 4)"
                )
            idx_stat = os.fstat(idx.fileno())
            idx_bytes = HEADER.size + 8 * (num_docs + 1)
            if idx_stat.st_size != idx_bytes:
                raise ValueError(
                    f"hetrain: token index {self.idx_path} is truncated or corrupt: {num_docs} documents need "
                    f"{idx_bytes} bytes, the file has {idx_stat.st_size}. {self._rebuild()}"
                )
            self.offsets = np.memmap(idx, dtype="<u8", mode="r", offset=HEADER.size, shape=(num_docs + 1,))
        self.dtype = DTYPES[itemsize]
        self.num_tokens = int(num_tokens)
        self.validated = validate
        with open(self.bin_path, "rb") as bin_file:
            bin_stat = os.fstat(bin_file.fileno())
            self._opened = (_identity(bin_stat), _identity(idx_stat))  # what check_unchanged compares
            bin_bytes = bin_stat.st_size
            if validate:
                self._check_size(bin_bytes)
                bad = np.flatnonzero(np.diff(self.offsets.astype(np.int64)) < 0)
                if self.offsets[0] != 0 or self.offsets[-1] != self.num_tokens or len(bad):
                    where = f"document {int(bad[0])}" if len(bad) else "first or last offset"
                    raise ValueError(f"hetrain: token index {self.idx_path} is corrupt: offsets go wrong at {where}. "
                                     f"{self._rebuild()}")
            # An empty file cannot be memory-mapped; the token view is then empty.
            count = min(self.num_tokens, bin_bytes // itemsize)
            self.tokens = (np.memmap(bin_file, dtype=self.dtype, mode="r", shape=(count,)) if count
                           else np.empty(0, self.dtype))

    def check_unchanged(self) -> None:
        """Raises if ``<prefix>.bin`` or ``.idx`` is no longer the file opened (rebuilt, replaced or written since).

        This object reads the files it mapped at open, but whatever opens the path again (the ring's C++ reader)
        would read a rebuilt corpus through this object's offsets and windows: wrong tokens, without an error.
        Two stats, so cheap to call before handing the path on.
        """
        changed = []
        for path, then in zip((self.bin_path, self.idx_path), self._opened, strict=True):
            try:
                now = _identity(path.stat())
            except FileNotFoundError:
                now = None
            if now != then:
                changed.append(f"{path.name} {'is gone' if now is None else 'is another file or was written to'}")
        if changed:
            raise _changed(self.bin_path, ", ".join(changed))

    def _check_size(self, bin_bytes: int) -> None:
        """A .bin of other than the promised size: a copy cut short (a stat, so cheap to repeat)."""
        expected = self.num_tokens * self.dtype.itemsize
        if bin_bytes != expected:
            raise ValueError(
                f"hetrain: token file {self.bin_path} is truncated or corrupt: the index promises "
                f"{self.num_tokens} tokens ({expected} bytes), the file has {bin_bytes} bytes. {self._rebuild()}"
            )

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        """Pickles as the path: np.memmap pickles by value, so a DataLoader worker started by spawn or forkserver
        got a private copy of every token; the receiving process maps the files itself (see :func:`_reopen`). The
        index map's path is absolute as of opening: the job may have changed directory since."""
        return _reopen, (self.offsets.filename, self.validated, len(self), self.num_tokens, self.dtype.itemsize,
                         self._opened)

    def _rebuild(self) -> str:
        """How to make the pair again: a copy cut short, or files from another tool."""
        return (f"Copy it again, or rebuild it: python -m hetrain.data.build_tokens <text or .jsonl files> "
                f"--out {self.idx_path.with_suffix('')}")

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> np.ndarray:
        """Document ``i``'s tokens; a negative ``i`` counts from the end, as for a list."""
        n = len(self)
        i = operator.index(i)
        if not -n <= i < n:
            raise IndexError(f"hetrain: document {i} of a token file of {n} documents ({self.bin_path})")
        i %= n  # offsets[i + 1] of a negative i would read the next document's start from the wrong end
        return self.span(int(self.offsets[i]), int(self.offsets[i + 1]), "document", i)

    def span(self, start: int, stop: int, kind: str, index: int) -> np.ndarray:
        """Tokens ``[start, stop)`` of the file, for ``kind`` ``index`` (named in the error only, so a read formats
        nothing): a .bin cut short and opened with ``validate=False`` would otherwise hand back fewer tokens, or none,
        without a word."""
        tokens = self.tokens[start:stop]
        if len(tokens) < stop - start:
            raise ValueError(f"hetrain: token file {self.bin_path} is cut short: {kind} {index} needs tokens "
                             f"[{start}, {stop}), the file holds {len(self.tokens)} of the {self.num_tokens} its "
                             f"index promises. {self._rebuild()}")
        return tokens

    @property
    def doc_starts(self) -> np.ndarray:
        return self.offsets[:-1].astype(np.int64)

    @property
    def doc_lengths(self) -> np.ndarray:
        return np.diff(self.offsets).astype(np.int64)

    def __repr__(self) -> str:
        return f"TokenFile({str(self.bin_path)!r}, docs={len(self)}, tokens={self.num_tokens}, dtype={self.dtype})"


def _identity(st: os.stat_result) -> tuple[int, int, int, int]:
    """What tells one file from another at a path: a rebuild renames a new file (inode) into place, a write in
    place changes the size or modification time."""
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def _changed(bin_path: Path, what: str) -> ValueError:
    return ValueError(f"hetrain: token file {bin_path} changed since it was opened: {what}. Do not rebuild a corpus "
                      "while a job reads it; reopen it (restart the job) to read the rebuilt one")


def _reopen(path: str, validated: bool, num_docs: int, num_tokens: int, itemsize: int,
            identity: tuple[tuple[int, ...], ...]) -> TokenFile:
    """A pickled :class:`TokenFile`, mapped again. The offsets scan of ``validate`` ran in the sending process and is
    not repeated (it reads the whole index); the header and, if validated, the .bin size are checked again, and a
    corpus rebuilt since it was pickled is refused rather than mixed with the sender's."""
    tf = TokenFile(path, validate=False)
    if (len(tf), tf.num_tokens, tf.dtype.itemsize) != (num_docs, num_tokens, itemsize):
        raise _changed(tf.bin_path, f"{num_docs} documents, {num_tokens} tokens of {itemsize} bytes then, {len(tf)}, "
                                    f"{tf.num_tokens} of {tf.dtype.itemsize} now")
    if validated:
        tf._check_size(tf.bin_path.stat().st_size)
        tf.validated = True
    if tf._opened != identity:  # rebuilt with the same counts
        raise _changed(tf.bin_path, "the same counts, but the files were replaced or written to")
    return tf


class TokenFileWriter:
    """Appends documents to ``<prefix>.bin/.idx``; the files appear (atomically renamed) on ``close()``.

    A writer first repairs what one killed in ``close()`` left at the prefix (see :func:`_clear_leftovers`).
    """

    def __init__(self, prefix: str | os.PathLike, itemsize: int = 2) -> None:
        if itemsize not in DTYPES:
            raise ValueError(f"hetrain: a token file holds 2- or 4-byte tokens, got itemsize={itemsize}")
        # Absolute as of construction: a Hydra job may change directory before close() renames the files.
        self.bin_path, self.idx_path = paths_of(Path(prefix).absolute())
        _clear_leftovers(self.bin_path, self.idx_path)
        self.dtype = DTYPES[itemsize]
        self._limit = np.iinfo(self.dtype).max
        # Temporary names of this writer alone: two writers of one prefix (nodes sharing a data directory) must
        # not rename each other's files away.
        self._tmp_suffix = f".{uuid.uuid4().hex[:8]}.tmp"
        self._tmp_bin = self.bin_path.with_name(self.bin_path.name + self._tmp_suffix)
        self._bin = open(self._tmp_bin, "wb")  # closed in close() or __exit__
        self._offsets = [0]

    def add(self, tokens: Iterable[int] | np.ndarray, where: str | None = None) -> None:
        """Appends one document; ``where`` names it in errors (``path:line`` of its text), else its index."""
        where = f"document {len(self)}" if where is None else where
        arr = whole_numbers(tokens, f"{where}'s token ids")
        if arr.ndim != 1:
            raise ValueError(f"hetrain: a document is a 1-D token sequence, got shape {arr.shape} ({where})")
        if len(arr) and arr.min() < 0:
            raise ValueError(f"hetrain: {where} has token id {int(arr.min())}; token ids are non-negative")
        if len(arr) and arr.max() > self._limit:
            fix = ("write with itemsize=4 (uint32; build_tokens --itemsize 4)" if self.dtype.itemsize == 2 else
                   "a token file holds no wider ids; check the tokenizer: its ids should lie below its vocab_size")
            raise ValueError(f"hetrain: {where} has token id {int(arr.max())} outside [0, {self._limit}] of "
                             f"{self.dtype}; {fix}")
        self._bin.write(arr.astype(self.dtype).tobytes())
        self._offsets.append(self._offsets[-1] + len(arr))

    def __len__(self) -> int:
        """Documents added so far: a caller refusing an empty corpus raises before ``close()`` replaces files."""
        return len(self._offsets) - 1

    def close(self) -> None:
        """Writes the index and renames both files into place: the .bin first, then the .idx.

        Two renames are not one atomic step: a reader opening the pair between them sees the new .bin with the
        old .idx (validation names a size mismatch). Whatever fails before the .idx is in place (a full disk, a
        Ctrl-C) leaves the old pair as it was, or no pair where there was none, and removes the temporaries, which
        are as large as the corpus: a new .bin beside the old .idx would give readers the new tokens under the old
        offsets. Ctrl-C and SIGTERM wait until both renames, or the old .bin's return after a failed one, are done
        (when closed on the main thread; see :func:`_signals_deferred`). A process killed outright (SIGKILL) between
        the renames leaves the new .bin beside the old .idx: the next writer of the prefix puts the old .bin back.
        """
        if self._bin.closed:
            return
        tmp_idx = self.idx_path.with_name(self.idx_path.name + self._tmp_suffix)
        try:
            self._bin.close()  # flushes: the first write to fail on a full disk may be this one
            num_docs = len(self._offsets) - 1
            header = HEADER.pack(MAGIC, VERSION, self.dtype.itemsize, num_docs, self._offsets[-1])
            tmp_idx.write_bytes(header + np.asarray(self._offsets, dtype="<u8").tobytes())
            with _signals_deferred():
                self._replace(tmp_idx)
        except BaseException:
            for path in (self._tmp_bin, tmp_idx):  # gone once renamed: what is in place stays
                path.unlink(missing_ok=True)
            raise

    def _replace(self, tmp_idx: Path) -> None:
        """Renames the pair into place, the old .bin kept aside (a second name) until the new .idx is in place.

        After a failure the files say how far it got (a flag set after a rename would miss a signal handled as
        the rename returns): both temporaries gone, the new pair is complete; the temporary .bin gone alone, the
        new .bin is beside the old .idx and the old .bin goes back.
        """
        old_bin = self.bin_path.with_name(self.bin_path.name + ".old" + self._tmp_suffix)
        try:
            self._set_aside(old_bin)
            os.replace(self._tmp_bin, self.bin_path)
            os.replace(tmp_idx, self.idx_path)
        except BaseException:
            if tmp_idx.exists() or self._tmp_bin.exists():
                self._put_back(old_bin)
            else:
                old_bin.unlink(missing_ok=True)
            raise
        old_bin.unlink(missing_ok=True)

    def _set_aside(self, old_bin: Path) -> None:
        """A second name for the .bin in place, if any: a hard link, so that readers find the old pair until the
        renames; where the filesystem has none, the .bin itself moves (readers are told it is missing meanwhile)."""
        try:
            os.link(self.bin_path, old_bin, follow_symlinks=False)
        except FileNotFoundError:  # no corpus yet
            pass
        except OSError:
            if not self.bin_path.is_dir():  # the rename of the new .bin onto a directory fails anyway
                os.replace(self.bin_path, old_bin)

    def _put_back(self, old_bin: Path) -> None:
        """The .bin in place before the renames goes back under its .idx; without one, the new .bin is removed."""
        new_in_place = not self._tmp_bin.exists()
        if os.path.lexists(old_bin) and (new_in_place or not os.path.lexists(self.bin_path)):
            os.replace(old_bin, self.bin_path)
            return
        old_bin.unlink(missing_ok=True)  # a second name of the .bin still in place, or none
        if new_in_place:
            self.bin_path.unlink(missing_ok=True)

    def __enter__(self) -> TokenFileWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:  # leave no half-written corpus behind
            try:
                with contextlib.suppress(OSError):  # the flush fails again on a full disk; `exc` says why
                    self._bin.close()
            finally:
                self._tmp_bin.unlink(missing_ok=True)


def _clear_leftovers(bin_path: Path, idx_path: Path) -> None:
    """Repairs what a writer killed in ``close()`` (SIGKILL: the OOM killer, a scheduler's kill after SIGTERM) left at
    the prefix, where no cleanup of its own ran: the old .bin set aside as ``<bin>.old.<id>.tmp``, as large as the old
    corpus, perhaps the new .bin beside the old .idx, and its temporaries.

    A .bin belongs to an .idx when its size is the index's token count times the token size and it is not newer
    (a build writes its .bin, then its .idx; renames keep both times). Where the .bin in place does not belong to the
    .idx in place, the newest set-aside .bin that does goes back: the old pair is whole again. The other set-aside
    files, and the temporaries of a writer that got as far as its .idx temporary, are removed with a warning naming
    them. A writer's .bin temporary alone may be one still writing, and stays. So may the files of a writer renaming
    now: while any .idx temporary of the prefix is under ``RENAMING_S`` old, nothing is touched.
    """
    olds = _temporaries(bin_path, ".old")
    idx_tmps = _temporaries(idx_path, "")
    if not olds and not idx_tmps:
        return
    now = time.time_ns()
    if any(now - _mtime_ns(path, now) < RENAMING_S * 1e9 for path in idx_tmps.values()):
        return
    idx_time, expected = _mtime_ns(idx_path, 0), _bin_bytes(idx_path)

    def belongs(path: Path) -> bool:
        with contextlib.suppress(OSError):
            st = path.stat()
            return st.st_size == expected and st.st_mtime_ns <= idx_time
        return False

    fitting = [path for path in olds.values() if belongs(path)]
    restored = None
    if fitting and not belongs(bin_path):
        restored = max(fitting, key=lambda path: _mtime_ns(path, 0))
        os.replace(restored, bin_path)
        warnings.warn(f"hetrain: {bin_path} did not belong to {idx_path} (a build killed between its renames): "
                      f"the old {bin_path.name} is back from {restored.name}", RuntimeWarning, stacklevel=3)
    bin_tmps = [bin_path.with_name(bin_path.name + suffix) for suffix in idx_tmps]
    removed = []
    for path in (*olds.values(), *idx_tmps.values(), *bin_tmps):
        if path != restored and path.exists():
            path.unlink(missing_ok=True)
            removed.append(path.name)
    if removed:
        warnings.warn(f"hetrain: removed what a build killed while renaming {bin_path.name} and {idx_path.name} "
                      f"left in {bin_path.parent}: {', '.join(removed)}", RuntimeWarning, stacklevel=3)


def _temporaries(path: Path, kind: str) -> dict[str, Path]:
    """The writer temporaries ``<path><kind>.<id>.tmp`` beside ``path``, by their suffix ``.<id>.tmp``."""
    name = re.compile(re.escape(path.name + kind) + r"(\.[0-9a-f]{8}\.tmp)")
    found = {}
    for candidate in sorted(path.parent.glob(glob.escape(path.name + kind) + ".*.tmp")):
        match = name.fullmatch(candidate.name)
        if match:
            found[match[1]] = candidate
    return found


def _mtime_ns(path: Path, missing: int) -> int:
    try:
        return path.stat().st_mtime_ns
    except OSError:  # gone meanwhile: another writer cleared it
        return missing


def _bin_bytes(idx_path: Path) -> int | None:
    """The size of the .bin that the index at ``idx_path`` describes; None without a readable hetrain index."""
    try:
        with open(idx_path, "rb") as idx:
            raw = idx.read(HEADER.size)
    except OSError:
        return None
    if len(raw) < HEADER.size:
        return None
    magic, version, itemsize, _, num_tokens = HEADER.unpack(raw)
    return num_tokens * itemsize if (magic, version) == (MAGIC, VERSION) and itemsize in DTYPES else None


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Ctrl-C and SIGTERM that arrive in the block run their handlers once it is done: a stop between ``close()``'s
    renames, or while a failed one's old .bin goes back, would leave the new .bin beside the old .idx.

    Handlers that only record stand in meanwhile. Python runs a handler on the main thread whichever thread the
    kernel gave the signal (a process-directed one goes to any thread that does not block it: a signal mask held
    on the main thread alone did not hold it). Off the main thread no handler can be set: the block runs as it is,
    and ``close()`` finds from the files how far it got. A signal ignored, or with a handler set outside Python (it
    reads as None and could not be put back), is left alone.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous: dict[int, Any] = {}

    def record(signum: int, frame: object) -> None:
        received.append(signum)

    try:
        for signum in (signal.SIGINT, signal.SIGTERM):
            if signal.getsignal(signum) not in (None, signal.SIG_IGN):
                previous[signum] = signal.signal(signum, record)
        yield
    finally:
        try:
            _put_back_handlers(previous)
        finally:
            _deliver(list(dict.fromkeys(received)))  # each once, as the kernel merges a signal pending twice


def _deliver(signums: list[int]) -> None:
    """Runs the handler of each signal in ``signums``, in order: one that raises does not keep the next from running,
    whose exception then carries the earlier one as its context."""
    if signums:
        try:
            signal.raise_signal(signums[0])
        finally:
            _deliver(signums[1:])


def _put_back_handlers(previous: dict[int, Any]) -> None:
    """Sets every handler of ``previous`` again. ``signal.signal`` first runs the handlers of signals pending: one
    put back a moment before may raise there, before the swap, which is then made again."""
    error = None
    for signum, handler in previous.items():
        try:
            signal.signal(signum, handler)
        except BaseException as exc:
            error = exc
            signal.signal(signum, handler)
    if error is not None:
        raise error


def write_token_file(prefix: str | os.PathLike, docs: Iterable[Iterable[int]], itemsize: int = 2) -> TokenFile:
    """Writes ``docs`` (token id sequences) as a token file and opens it."""
    with TokenFileWriter(prefix, itemsize) as writer:
        for doc in docs:
            writer.add(doc)
    return TokenFile(prefix)
