"""Token files, build_tokens and windows: round trips, corruption found at open, window coverage."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import pickle
import re
import resource
import signal
import subprocess
import sys
import threading
import time
import tracemalloc
import warnings

import numpy as np
import pytest
import torch

from hetrain.data.images import SyntheticImages
from hetrain.data.tokenize import ByteTokenizer, build_token_file, iter_documents
from hetrain.data.tokens import HEADER, MAGIC, RENAMING_S, VERSION, TokenFile, TokenFileWriter, write_token_file
from hetrain.data.windows import TokenWindows, make_windows, token_collate


def random_docs(n: int, vocab: int, seed: int = 0, max_len: int = 300) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, rng.integers(0, max_len)) for _ in range(n)]


@pytest.mark.parametrize(("itemsize", "vocab"), [(2, 65536), (4, 200_000)])
def test_token_file_round_trip(tmp_path, itemsize, vocab):
    docs = random_docs(37, vocab, seed=itemsize)
    tf = write_token_file(tmp_path / "c", docs, itemsize=itemsize)
    assert len(tf) == 37 and tf.dtype.itemsize == itemsize
    assert tf.num_tokens == sum(len(d) for d in docs)
    for i, doc in enumerate(docs):
        np.testing.assert_array_equal(tf[i], doc)
    np.testing.assert_array_equal(tf.doc_lengths, [len(d) for d in docs])
    assert TokenFile(tmp_path / "c.bin").num_tokens == tf.num_tokens  # either file names the pair
    for i in (-1, -2, -37):  # from the end, as a list counts (-1 was empty, -2 the last document)
        np.testing.assert_array_equal(tf[i], docs[i])
    for i in (37, -38):
        with pytest.raises(IndexError, match=f"document {i} of a token file of 37 documents"):
            tf[i]


def test_ids_too_large_for_uint16_are_refused(tmp_path):
    with pytest.raises(ValueError, match="document 1 has token id 70000"):
        write_token_file(tmp_path / "c", [[1, 2], [70000]], itemsize=2)
    assert not (tmp_path / "c.bin").exists() and not list(tmp_path.glob("*.tmp"))  # no temporary left behind


@contextlib.contextmanager
def file_size_limit(nbytes: int):
    """Writes past ``nbytes`` fail with EFBIG, as writes to a full disk fail with ENOSPC."""
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel ends the process
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


def test_a_write_failing_while_documents_are_added_leaves_no_temporary(tmp_path):
    # __exit__ closed the temporary .bin, whose flush failed again, before unlinking it: a corpus-sized file
    # stayed behind, and the second failure hid the first.
    with file_size_limit(20_000), pytest.raises(OSError) as failed:
        with TokenFileWriter(tmp_path / "c") as writer:
            for _ in range(10_000):
                writer.add([7] * 10)
    assert failed.value.errno == errno.EFBIG and failed.value.__context__ is None
    assert os.listdir(tmp_path) == []


def test_an_index_write_failing_at_close_leaves_no_temporary(tmp_path):
    # close() had no cleanup: the full temporary .bin and a partial temporary .idx stayed behind.
    docs = [[5]] * 5000  # .bin 10 000 bytes, .idx 40 040
    with file_size_limit(20_000), pytest.raises(OSError, match="File too large"):
        write_token_file(tmp_path / "c", docs)
    assert os.listdir(tmp_path) == []


def test_an_index_that_cannot_be_renamed_into_place_takes_the_new_bin_with_it(tmp_path):
    # The .bin was in place, the .idx rename failed: the temporary .idx stayed, and the new .bin beside an index
    # that does not describe it. A reader is now told the corpus is missing.
    (tmp_path / "c.idx").mkdir()  # what the .idx cannot replace
    (tmp_path / "c.idx" / "x").touch()
    with pytest.raises(OSError):
        write_token_file(tmp_path / "c", [[1, 2, 3]])
    assert os.listdir(tmp_path) == ["c.idx"]


def stop_rename(monkeypatch, onto: str, exc: type[BaseException], done: bool) -> None:
    """``exc`` from the first ``os.replace`` onto a file named ``onto``: before it renames, or once it has (a
    signal handled as the rename returns)."""
    real, pending = os.replace, [exc]

    def replace(src, dst):
        if pending and os.path.basename(dst) == onto:
            if done:
                real(src, dst)
            raise pending.pop()
        real(src, dst)

    monkeypatch.setattr(os, "replace", replace)


def read_back(prefix) -> list[list[int]]:
    tf = TokenFile(prefix)  # validated
    return [tf[i].tolist() for i in range(len(tf))]


@pytest.mark.parametrize("exc", [KeyboardInterrupt, OSError])
@pytest.mark.parametrize(("onto", "done"), [("c.bin", True), ("c.idx", False)])
def test_a_stop_or_failure_between_the_renames_leaves_the_old_pair_as_it_was(tmp_path, monkeypatch, exc, onto, done):
    # The new .bin was renamed over the old before the .idx rename failed: the cleanup then deleted it, and the old
    # corpus was gone. A signal handled as the first rename returned kept it instead, beside the old .idx: with as
    # many tokens as before, the pair validated and read the new tokens under the old document boundaries.
    write_token_file(tmp_path / "c", [[1, 2, 3], [4, 5]])
    stop_rename(monkeypatch, onto, exc, done)
    with pytest.raises(exc):
        write_token_file(tmp_path / "c", [[7, 8], [9, 10, 11]])
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["c.bin", "c.idx"]
    assert read_back(tmp_path / "c") == [[1, 2, 3], [4, 5]]


def test_the_old_pair_comes_back_on_a_filesystem_without_hard_links(tmp_path, monkeypatch):
    write_token_file(tmp_path / "c", [[1, 2, 3], [4, 5]])

    def link(*args, **kwargs):
        raise PermissionError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", link)
    stop_rename(monkeypatch, "c.idx", KeyboardInterrupt, done=False)
    with pytest.raises(KeyboardInterrupt):
        write_token_file(tmp_path / "c", [[7, 8], [9, 10, 11]])
    assert sorted(os.listdir(tmp_path)) == ["c.bin", "c.idx"]
    assert read_back(tmp_path / "c") == [[1, 2, 3], [4, 5]]
    write_token_file(tmp_path / "c", [[6]])  # and a build that succeeds leaves the new pair alone
    assert sorted(os.listdir(tmp_path)) == ["c.bin", "c.idx"] and read_back(tmp_path / "c") == [[6]]


def test_a_stop_handled_once_both_renames_are_done_keeps_the_new_pair(tmp_path, monkeypatch):
    # The cleanup removed the new .bin once it was in place, whatever else had happened: here it took it from
    # beside its own new .idx.
    write_token_file(tmp_path / "c", [[1, 2, 3], [4, 5]])
    stop_rename(monkeypatch, "c.idx", KeyboardInterrupt, done=True)
    with pytest.raises(KeyboardInterrupt):
        write_token_file(tmp_path / "c", [[7, 8], [9, 10, 11]])
    assert sorted(os.listdir(tmp_path)) == ["c.bin", "c.idx"]
    assert read_back(tmp_path / "c") == [[7, 8], [9, 10, 11]]


def test_a_stop_between_the_renames_without_an_old_pair_leaves_nothing(tmp_path, monkeypatch):
    stop_rename(monkeypatch, "c.bin", KeyboardInterrupt, done=True)
    with pytest.raises(KeyboardInterrupt):
        write_token_file(tmp_path / "c", [[7, 8]])
    assert os.listdir(tmp_path) == []


@contextlib.contextmanager
def another_thread():
    """A thread that blocks no signal, as numpy's OpenBLAS pool or a DataLoader's: the kernel gives it a
    process-directed signal that the main thread blocks."""
    done = threading.Event()
    thread = threading.Thread(target=done.wait)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def stop(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # as build_tokens' SIGTERM handler


def kill_self(signum: int) -> None:
    """``signum`` to the whole process, as the terminal's Ctrl-C or a scheduler's SIGTERM; then time for the kernel
    to hand it to some thread."""
    os.kill(os.getpid(), signum)
    time.sleep(0.2)


@pytest.mark.parametrize(("signum", "handler", "exc"), [(signal.SIGINT, signal.default_int_handler, KeyboardInterrupt),
                                                       (signal.SIGTERM, stop, SystemExit)])
def test_ctrl_c_or_sigterm_during_the_renames_arrives_once_both_are_done(tmp_path, monkeypatch, signum, handler, exc):
    # A signal mask on the main thread held a signal sent to that thread only: the kernel gave a real Ctrl-C to
    # another thread, and Python raised KeyboardInterrupt on the main thread between the renames all the same.
    write_token_file(tmp_path / "c", [[1, 2, 3], [4, 5]])
    real, renamed = os.replace, []

    def replace(src, dst):
        if not renamed:
            kill_self(signum)
        real(src, dst)
        renamed.append(os.path.basename(dst))

    monkeypatch.setattr(os, "replace", replace)
    before = signal.signal(signum, handler)
    try:
        with another_thread(), pytest.raises(exc):
            write_token_file(tmp_path / "c", [[7, 8], [9, 10, 11]])
        assert signal.getsignal(signum) is handler
    finally:
        signal.signal(signum, before)
    assert renamed == ["c.bin", "c.idx"]
    assert sorted(os.listdir(tmp_path)) == ["c.bin", "c.idx"]
    assert read_back(tmp_path / "c") == [[7, 8], [9, 10, 11]]


def test_a_second_ctrl_c_while_a_failed_rename_puts_the_old_bin_back_waits_for_it(tmp_path, monkeypatch):
    # The second one stopped the recovery: the new .bin stayed beside the old .idx, the old .bin beside them as a
    # leftover, and with as many tokens the pair validated and read the new tokens under the old boundaries.
    write_token_file(tmp_path / "c", [[1, 2, 3], [4, 5]])
    real = os.replace

    def replace(src, dst):
        if os.path.basename(dst) == "c.idx":
            raise OSError(errno.EIO, "Input/output error")
        back = ".old." in os.path.basename(src)  # the old .bin going back
        if back:
            kill_self(signal.SIGINT)
        real(src, dst)
        if not back:
            kill_self(signal.SIGINT)

    monkeypatch.setattr(os, "replace", replace)
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with another_thread(), pytest.raises(KeyboardInterrupt) as stopped:
            write_token_file(tmp_path / "c", [[7, 8], [9, 10, 11]])
    finally:
        signal.signal(signal.SIGINT, before)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["c.bin", "c.idx"]
    assert read_back(tmp_path / "c") == [[1, 2, 3], [4, 5]]
    assert isinstance(stopped.value.__context__, OSError)  # the failure that the recovery answered


def test_a_writer_closes_where_signal_has_no_pthread_sigmask_and_off_the_main_thread(tmp_path, monkeypatch):
    # Windows' signal module has no pthread_sigmask: close() raised AttributeError and wrote nothing.
    monkeypatch.delattr(signal, "pthread_sigmask")
    assert read_back(write_token_file(tmp_path / "c", [[1, 2]]).bin_path) == [[1, 2]]
    handlers = [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)]
    thread = threading.Thread(target=write_token_file, args=(tmp_path / "c", [[3]]))  # no handler can be set there
    thread.start()
    thread.join()
    assert read_back(tmp_path / "c") == [[3]] and [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)] == \
        handlers


def killed_in_close(prefix, docs, onto: str, done: bool) -> None:
    """Writes ``docs`` at ``prefix`` in a forked child that is killed (SIGKILL, which no handler sees) as its rename
    onto ``onto`` starts, or once it is done."""
    pid = os.fork()
    if pid == 0:  # the child leaves by SIGKILL or os._exit, never back into pytest
        try:
            real = os.replace

            def replace(src, dst):
                if os.path.basename(dst) == onto and not done:
                    os.kill(os.getpid(), signal.SIGKILL)
                real(src, dst)
                if os.path.basename(dst) == onto:
                    os.kill(os.getpid(), signal.SIGKILL)

            os.replace = replace
            write_token_file(prefix, docs)
        finally:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


def start_a_build_without_documents(prefix) -> None:
    """A build whose writer opens and writes nothing: what it finds at ``prefix`` is all that changes."""
    with pytest.raises(ValueError, match="no documents to write"):
        build_token_file([], prefix)


def age(folder, seconds: float) -> None:
    """Every file in ``folder`` as written ``seconds`` earlier (their order kept)."""
    for path in folder.iterdir():
        st = path.stat()
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns - int(seconds * 1e9)))


@pytest.mark.parametrize(("onto", "done", "kept"), [("c.bin", False, [[1, 2, 3], [4, 5]]),
                                                    ("c.idx", False, [[1, 2, 3], [4, 5]]),
                                                    ("c.idx", True, [[7, 8], [9, 10, 11]])])
def test_the_next_writer_repairs_what_a_build_killed_while_renaming_left(tmp_path, onto, done, kept):
    # Nothing cleaned up after SIGKILL: the old .bin stayed as c.bin.old.<id>.tmp (the whole old corpus) with the
    # temporaries, and killed between the renames, the new .bin stayed beside the old .idx; with as many tokens,
    # the pair validated and read the new tokens under the old boundaries.
    write_token_file(tmp_path / "c", [[1, 2, 3], [4, 5]])
    age(tmp_path, 100)
    killed_in_close(tmp_path / "c", [[7, 8], [9, 10, 11]], onto, done)
    left = sorted(os.listdir(tmp_path))
    assert any(".old." in name for name in left)
    age(tmp_path, 2 * RENAMING_S)
    with pytest.warns(RuntimeWarning) as warned:
        start_a_build_without_documents(tmp_path / "c")
    assert sorted(os.listdir(tmp_path)) == ["c.bin", "c.idx"]
    assert read_back(tmp_path / "c") == kept
    assert all(any(name in str(w.message) for w in warned) for name in left if name.endswith(".tmp"))
    assert len(warned) == (2 if (onto, done) == ("c.idx", False) else 1)  # the old .bin back where it was replaced


def test_leftovers_of_builds_killed_one_after_another_give_back_the_first_old_bin(tmp_path):
    # Each killed build set aside the .bin in place, the previous one's new .bin; all have as many tokens as the old.
    write_token_file(tmp_path / "c", [[1, 2, 3], [4, 5]])
    age(tmp_path, 100)
    for docs in ([[7, 8], [9, 10, 11]], [[6, 6, 6, 6], [6]]):
        killed_in_close(tmp_path / "c", docs, "c.idx", done=False)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # under RENAMING_S: a writer that may be renaming now is left alone
            start_a_build_without_documents(tmp_path / "c")
    assert sum(".old." in name for name in os.listdir(tmp_path)) == 2
    (tmp_path / "c.bin.0123abcd.tmp").write_bytes(b"\0" * 8)  # a writer still adding documents
    age(tmp_path, 2 * RENAMING_S)
    with pytest.warns(RuntimeWarning) as warned:
        start_a_build_without_documents(tmp_path / "c")
    assert [re.sub(r"\w{8}\.tmp", "<id>.tmp", str(w.message).split(": ", 2)[-1]) for w in warned] == [
        "the old c.bin is back from c.bin.old.<id>.tmp",
        "c.bin.old.<id>.tmp, c.idx.<id>.tmp, c.idx.<id>.tmp"]
    assert sorted(os.listdir(tmp_path)) == ["c.bin", "c.bin.0123abcd.tmp", "c.idx"]
    assert read_back(tmp_path / "c") == [[1, 2, 3], [4, 5]]


def test_a_writer_renames_into_the_directory_it_was_opened_in(tmp_path, monkeypatch):
    # A relative prefix was resolved at close(): a job that changed directory meanwhile found its temporary
    # .bin gone from under the new directory and lost the corpus.
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    with TokenFileWriter("c") as writer:
        writer.add([1, 2, 3])
        monkeypatch.chdir(tmp_path / "b")
    assert sorted(os.listdir(tmp_path / "a")) == ["c.bin", "c.idx"] and os.listdir(tmp_path / "b") == []
    assert TokenFile(tmp_path / "a" / "c")[0].tolist() == [1, 2, 3]


def test_an_id_past_uint32_does_not_advise_the_itemsize_already_used(tmp_path):
    # Was "... of uint32; write with itemsize=4", the itemsize that refused it.
    with pytest.raises(ValueError, match=r"document 0 has token id 8589934592 outside \[0, 4294967295\] of uint32; "
                                         r"a token file holds no wider ids; check the tokenizer") as refused:
        write_token_file(tmp_path / "c", [[2**33]], itemsize=4)
    assert "itemsize=4" not in str(refused.value)


def test_a_negative_id_is_named_not_blamed_on_the_width(tmp_path):
    with pytest.raises(ValueError, match=r"document 0 has token id -5; token ids are non-negative"):
        write_token_file(tmp_path / "c", [[-5, 3]], itemsize=2)  # was: "token id 3 outside [0, 65535]; itemsize=4"
    with pytest.raises(ValueError, match=r"document 1's token ids must be whole numbers, got 7.5 at index 2"):
        write_token_file(tmp_path / "d", [[1, 2], [3, 4, 7.5]], itemsize=2)  # was written as 7


def test_truncated_and_corrupt_files_fail_at_open_naming_the_file(tmp_path):
    write_token_file(tmp_path / "c", random_docs(10, 1000, seed=1))
    data = (tmp_path / "c.bin").read_bytes()
    (tmp_path / "c.bin").write_bytes(data[:-6])
    with pytest.raises(ValueError, match=r"c\.bin is truncated or corrupt.*rebuild it: python -m hetrain\.data\."
                                         r"build_tokens <text or \.jsonl files> --out .*/c$"):
        TokenFile(tmp_path / "c")
    (tmp_path / "c.bin").write_bytes(data)
    idx = bytearray((tmp_path / "c.idx").read_bytes())
    idx[32 + 8 * 3 : 32 + 8 * 4] = (10**9).to_bytes(8, "little")  # offset of document 3 jumps far ahead
    (tmp_path / "c.idx").write_bytes(bytes(idx))
    with pytest.raises(ValueError, match="offsets go wrong at document 3"):
        TokenFile(tmp_path / "c")
    (tmp_path / "c.idx").write_bytes(b"NOTTOKENS" * 4)
    with pytest.raises(ValueError, match="not a hetrain token index"):
        TokenFile(tmp_path / "c")
    with pytest.raises(FileNotFoundError, match="missing.bin"):
        TokenFile(tmp_path / "missing")


def test_byte_tokenizer_round_trip_and_build_from_jsonl(tmp_path):
    tok = ByteTokenizer()
    text = "naïve tokens — ok"
    assert tok.decode(tok.encode(text)) == text and max(tok.encode(text)) < tok.vocab_size
    src = tmp_path / "in.jsonl"
    texts = ["first doc", "", "third, longer document ✓"]
    src.write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(texts)) + "\n")
    tf = build_token_file(iter_documents([src]), tmp_path / "out/c")
    assert tf.dtype.itemsize == 2 and len(tf) == 3
    for i, t in enumerate(texts):
        assert tf[i][0] == tok.bos_id and tf[i][-1] == tok.eos_id
        assert tok.decode(tf[i][1:-1]) == t


def test_any_tokenizer_callable_and_the_command_line(tmp_path):
    src = tmp_path / "in.txt"
    src.write_text("a b c\n\nd e\n")
    words = {"a": 100_000, "b": 1, "c": 2, "d": 3, "e": 4}
    tf = build_token_file(iter_documents([src]), tmp_path / "w", tokenizer=lambda s: [words[w] for w in s.split()])
    assert tf.dtype.itemsize == 4 and [t.tolist() for t in (tf[0], tf[1])] == [[100_000, 1, 2], [3, 4]]
    run = subprocess.run(
        [sys.executable, "-m", "hetrain.data.build_tokens", str(src), "--out", str(tmp_path / "cli"), "--whole-files"],
        capture_output=True, text=True, check=True,
    )
    assert "1 documents" in run.stdout and "RuntimeWarning" not in run.stderr
    assert ByteTokenizer().decode(TokenFile(tmp_path / "cli")[0]) == "a b c\n\nd e\n"


def test_jsonl_without_the_field_or_not_json_names_the_line(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text('{"text": "x"}\n{"body": "y"}\n')
    with pytest.raises(ValueError, match=r"in\.jsonl:2 has no field 'text' \(fields: \['body'\]\); name the text's "
                                         r"field: --field for build_tokens, data.text_field for train.py"):
        list(iter_documents([src]))
    src.write_text('{"text": "x"}\n{"text": "y"\n')
    with pytest.raises(ValueError, match=r"in\.jsonl:2 is not a JSON record: Expecting ',' delimiter"):
        list(iter_documents([src]))
    src.write_text('{"text": "x"}\n{"text": null}\n')  # was: 'NoneType' object has no attribute 'encode'
    with pytest.raises(ValueError, match=r"in\.jsonl:2: field 'text' is a JSON NoneType, not text"):
        list(iter_documents([src]))
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("caf\u00e9 au lait\n".encode("latin-1"))  # was: a codec error naming no file
    with pytest.raises(ValueError, match=r"latin1\.txt:1 is not UTF-8 text \(byte 0xe9 at column 4\)"):
        list(iter_documents([latin]))


def test_the_command_line_says_what_is_wrong_in_one_line(tmp_path):
    bad, empty = tmp_path / "bad.jsonl", tmp_path / "empty.txt"
    bad.write_text('{"text": "x"}\n[1, 2]\n')
    empty.write_text("\n\n")
    for inputs, message in (([tmp_path / "nope.txt"], "no such file: "),
                            ([bad], "bad.jsonl:2 has no field 'text' (fields: a JSON list)"),
                            ([empty], "no documents to write")):
        run = subprocess.run([sys.executable, "-m", "hetrain.data.build_tokens", *map(str, inputs), "--out",
                              str(tmp_path / "out")], capture_output=True, text=True)
        assert run.returncode == 2 and message in run.stderr and "Traceback" not in run.stderr, run.stderr
    assert not list(tmp_path.glob("out.*"))  # nothing left behind


@pytest.mark.parametrize(("max_len", "stride"), [(16, 16), (16, 12), (16, 5), (7, 1), (64, 64)])
def test_windows_cover_every_token_with_only_the_chosen_overlap(max_len, stride):
    rng = np.random.default_rng(max_len * 100 + stride)
    lengths = np.concatenate([[0, 1, max_len, max_len + 1], rng.integers(0, 200, 40)])
    starts = np.cumsum(lengths) - lengths + 3  # documents need not start at 0
    w = make_windows(lengths, max_len, stride, doc_starts=starts)
    assert (w.length >= 1).all() and (w.length <= max_len).all()
    np.testing.assert_array_equal(w.start, starts[w.doc] + w.offset)
    for d, length in enumerate(lengths):
        mine = w.doc == d
        cover = np.zeros(length, dtype=np.int64)
        for off, n in zip(w.offset[mine], w.length[mine], strict=True):
            cover[off : off + n] += 1
        assert (cover >= 1).all(), f"document {d}: a token is lost"
        count = int(mine.sum())
        # Tokens read = document + one overlap per cut; nothing else repeats.
        assert cover.sum() == length + (count - 1) * (max_len - stride) if count else length == 0
        assert cover.max(initial=1) <= -(-max_len // stride)
        if stride == max_len:
            assert (cover == 1).all()
        if count > 1:  # the last window reaches the end and brings tokens the one before lacked
            assert w.offset[mine][-1] + w.length[mine][-1] == length
            assert w.offset[mine][-2] + max_len < length


def test_windows_reject_a_bad_stride():
    with pytest.raises(ValueError, match="stride"):
        make_windows(np.array([10]), 8, stride=9)


def test_windows_refuse_lengths_and_sizes_that_are_not_whole_numbers():
    # np.asarray(..., int64) made 10.9 tokens 10 without a word: windows [4, 4, 2] of a document of 10.9.
    with pytest.raises(ValueError, match=r"document lengths must be whole numbers, got 10.9 at index 0"):
        make_windows([10.9], 4)
    with pytest.raises(ValueError, match=r"document starts must be whole numbers, got 2.5 at index 0"):
        make_windows([10], 4, doc_starts=[2.5])
    for kwargs, name in (({"max_len": 4.5}, "max_len"), ({"max_len": 4, "stride": 2.0}, "stride")):
        with pytest.raises(ValueError, match=rf"{name} counts tokens, so must be an integer, got {kwargs[name]}"):
            make_windows([10], **kwargs)
    np.testing.assert_array_equal(make_windows(np.array([10.0]), np.int64(4)).length, [4, 4, 2])  # whole floats pass


def test_a_window_past_the_end_of_a_file_cut_short_is_refused_naming_it(tmp_path):
    write_token_file(tmp_path / "c", [np.arange(1, 101)] * 4)
    data = (tmp_path / "c.bin").read_bytes()
    (tmp_path / "c.bin").write_bytes(data[: 250 * 2])  # 250 of the 400 tokens
    ds = TokenWindows(TokenFile(tmp_path / "c", validate=False), max_len=64)
    np.testing.assert_array_equal(ds[3]["input_ids"].numpy(), np.arange(65, 101))  # whole windows are served
    # Window 4 came back with 50 of its 64 tokens, windows 5 to 7 empty, and the batch held rows of padding only.
    with pytest.raises(ValueError, match=r"c\.bin is cut short: window 4 needs tokens \[200, 264\), the file holds "
                                         r"250 of the 400 its index promises\. Copy it again, or rebuild it"):
        ds[4]
    with pytest.raises(ValueError, match=r"window 7 needs tokens \[364, 400\)"):
        ds[7]
    assert list(ds.file[1]) == list(range(1, 101))
    with pytest.raises(ValueError, match=r"c\.bin is cut short: document 2 needs tokens \[200, 300\)"):
        ds.file[2]  # a whole document read the same way came back with 50 of its 100 tokens


def test_a_pickled_token_file_maps_the_files_again_instead_of_carrying_the_tokens(tmp_path):
    # np.memmap pickles by value: a DataLoader worker started by spawn got a private copy of the corpus.
    tf = write_token_file(tmp_path / "c", [np.arange(50_000) % 250 for _ in range(4)])  # 400 KB of tokens
    ds = TokenWindows(tf, max_len=4096)
    tf_blob, ds_blob = pickle.dumps(tf), pickle.dumps(ds)
    assert len(tf_blob) < 1000 and len(ds_blob) < 10_000, (len(tf_blob), len(ds_blob))
    tf2, ds2 = pickle.loads(tf_blob), pickle.loads(ds_blob)
    for got in (tf2, ds2.file):
        assert got.validated and len(got) == 4
        for name in ("tokens", "offsets"):
            arr = getattr(got, name)
            assert isinstance(arr, np.memmap) and arr._mmap is not None, name  # mapped here, not a copy
            np.testing.assert_array_equal(arr, getattr(tf, name))
    assert torch.equal(ds2[20]["input_ids"], ds[20]["input_ids"])


def test_an_unpickled_token_file_checks_again_what_is_cheap_to_check(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tf = write_token_file("c", [[1, 2, 3], [4, 5]])  # a relative path, and then the job changes directory
    monkeypatch.chdir(tmp_path.parent)
    blob = pickle.dumps(tf)
    np.testing.assert_array_equal(pickle.loads(blob)[1], [4, 5])
    data = (tmp_path / "c.bin").read_bytes()
    (tmp_path / "c.bin").write_bytes(data[:-2])  # cut short after it was opened
    with pytest.raises(ValueError, match=r"c\.bin is truncated or corrupt"):
        pickle.loads(blob)
    unchecked = pickle.loads(pickle.dumps(TokenFile(tmp_path / "c", validate=False)))  # opened unchecked: kept so
    assert not unchecked.validated and len(unchecked.tokens) == 4
    write_token_file(tmp_path / "c", [[1, 2, 3], [4, 5], [6]])  # rebuilt under a running job
    with pytest.raises(ValueError, match=r"c\.bin changed since it was opened: 2 documents, 5 tokens of 2 bytes then, "
                                         r"3, 6 of 2 now"):
        pickle.loads(blob)


def test_a_corpus_rebuilt_at_its_prefix_is_refused_by_check_unchanged_and_by_unpickling(tmp_path):
    # The ring's C++ reader opens the path again: a rebuild after TokenFile opened it was read through the old
    # windows, wrong tokens without an error. Same counts, so only the files' identity tells them apart.
    tf = write_token_file(tmp_path / "c", [[1, 2, 3], [4, 5]])
    tf.check_unchanged()
    blob = pickle.dumps(tf)
    write_token_file(tmp_path / "c", [[9, 9], [8, 8, 8]])
    with pytest.raises(ValueError, match=r"c\.bin changed since it was opened: c\.bin is another file or was written "
                                         r"to, c\.idx is another file or was written to\. Do not rebuild a corpus "
                                         r"while a job reads it; reopen it"):
        tf.check_unchanged()
    with pytest.raises(ValueError, match=r"c\.bin changed since it was opened: the same counts, but the files were "
                                         r"replaced or written to"):
        pickle.loads(blob)
    np.testing.assert_array_equal(tf[1], [4, 5])  # this object still reads the files it mapped
    reopened = TokenFile(tmp_path / "c")
    reopened.check_unchanged()
    (tmp_path / "c.bin").unlink()
    with pytest.raises(ValueError, match=r"changed since it was opened: c\.bin is gone\. "):
        reopened.check_unchanged()


def test_a_token_file_opened_by_a_relative_prefix_is_still_found_after_a_change_of_directory(tmp_path, monkeypatch):
    # The relative path was kept: after a chdir check_unchanged (which the ring loader calls before its C++ reader
    # opens str(bin_path)) said the corpus "changed since it was opened ... is gone".
    (tmp_path / "data").mkdir()
    monkeypatch.chdir(tmp_path / "data")
    tf = write_token_file("c", [[1, 2, 3], [4, 5]])
    monkeypatch.chdir(tmp_path)
    tf.check_unchanged()
    assert (tf.bin_path, tf.idx_path) == (tmp_path / "data" / "c.bin", tmp_path / "data" / "c.idx")
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(tf))[1], [4, 5])


def test_opening_a_token_file_reads_its_header_not_its_whole_index(tmp_path):
    # The whole .idx was read to parse its 32-byte header, in every unpickled copy too: 200 MB for 200 MB.
    n = 500_000  # documents of one token: a 4 MB index
    with open(tmp_path / "c.idx", "wb") as f:
        f.write(HEADER.pack(MAGIC, VERSION, 2, n, n))
        np.arange(n + 1, dtype="<u8").tofile(f)
    np.zeros(n, "<u2").tofile(tmp_path / "c.bin")
    tracemalloc.start()
    try:
        tf = TokenFile(tmp_path / "c", validate=False)
        opened = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        copy = pickle.loads(pickle.dumps(tf))
        unpickled = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert opened < 1 << 20 and unpickled < 1 << 20, (opened, unpickled)
    assert len(copy) == n and int(copy.offsets[-1]) == n


def test_token_windows_dataset_serves_each_window_and_pads_in_collate(tmp_path):
    docs = random_docs(12, 500, seed=3, max_len=90)
    ds = TokenWindows(write_token_file(tmp_path / "c", docs), max_len=32, stride=24)
    rebuilt = {d: np.zeros(len(doc), dtype=np.int64) - 1 for d, doc in enumerate(docs)}
    for i in range(len(ds)):
        d, off = int(ds.windows.doc[i]), int(ds.windows.offset[i])
        ids = ds[i]["input_ids"].numpy()
        rebuilt[d][off : off + len(ids)] = ids
    for d, doc in enumerate(docs):
        np.testing.assert_array_equal(rebuilt[d], doc)
    batch = token_collate([ds[0], ds[len(ds) - 1]], pad_id=7)
    n0, n1 = batch["lengths"].tolist()
    assert batch["input_ids"].shape == (2, max(n0, n1)) and batch["sample_ids"].tolist() == [0, len(ds) - 1]
    assert batch["attention_mask"].sum().item() == n0 + n1
    assert (batch["input_ids"][~batch["attention_mask"]] == 7).all()


def test_a_window_from_the_end_is_named_by_its_index_from_the_start(tmp_path):
    # ds[-1] carried sample_id -1, which no batch of the sampler or the ring holds.
    ds = TokenWindows(write_token_file(tmp_path / "c", random_docs(5, 300, seed=4, max_len=60)), max_len=16)
    n = len(ds)
    assert ds[-1]["sample_id"] == n - 1 and ds[-n]["sample_id"] == 0
    assert torch.equal(ds[-1]["input_ids"], ds[n - 1]["input_ids"])
    for i in (n, -n - 1):
        with pytest.raises(IndexError, match=f"window {i} of {n}"):
            ds[i]


def test_synthetic_images_refuse_a_noise_that_is_not_finite():
    # nan passed `noise < 0` and made every image nan.
    for noise in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match=r"noise is a standard deviation and must be finite and >= 0"):
            SyntheticImages(8, noise=noise)


def test_a_jsonl_corpus_past_vocab_size_names_the_setting_not_a_temporary_file(tmp_path):
    # The gather named a deleted temporary token file ("/tmp/hetrain-tokens-.../val.bin: ... >= vocab_size 150").
    from hetrain.data.datamodule import TokenDataModule

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": "déjà vu " * 10, "label": i % 2}) + "\n" for i in range(10)))
    dm = TokenDataModule(path=str(corpus), vocab_size=150, num_classes=2, max_len=32, stride=32, max_tokens=128)
    with pytest.raises(ValueError, match=rf"data.path {corpus} tokenises \(byte tokenizer\) to token ids up to "
                                         rf"\d+, past data.vocab_size=150; set data.vocab_size=259"):
        dm.setup("fit")
    dm.teardown("fit")


def labelled_token_dir(tmp_path, labels: dict[str, np.ndarray]):
    """A directory TokenDataModule reads: train and val token files of one short document per label given."""
    for split, split_labels in labels.items():
        write_token_file(tmp_path / split, random_docs(len(split_labels), 50, seed=len(split), max_len=40))
        np.save(tmp_path / f"{split}.labels.npy", split_labels)
    return tmp_path


@pytest.mark.parametrize("labels", [np.array([0.7, 1.7, 2.7]), np.array([0.0, np.nan, 1.0]), np.array([[0], [1], [2]]),
                                    np.array(["0", "1", "2"]), np.array([True, False, True])])
def test_labels_that_are_not_a_1d_integer_array_are_refused_naming_the_file(tmp_path, labels):
    # Float labels were truncated to int64 without a word (0.7 trained as class 0); NaN said "set
    # data.num_classes=nan"; an (N, 1) array failed inside torch, string labels inside numpy.
    from hetrain.data.datamodule import TokenDataModule

    corpus = labelled_token_dir(tmp_path, {"train": labels, "val": np.array([0, 1])})
    module = TokenDataModule(path=str(corpus), vocab_size=50, num_classes=3, max_len=16, stride=16, max_tokens=64)
    with pytest.raises(ValueError, match=re.escape(f"{corpus}/train.labels.npy holds a {labels.dtype} array of shape "
                                                   f"{labels.shape}, not a 1-D integer array of labels; write one "
                                                   "integer class per document: numpy.save(")):
        module.setup("fit")


def test_a_negative_or_too_large_label_in_a_labels_file_says_what_is_wrong(tmp_path):
    from hetrain.data.datamodule import TokenDataModule

    small = {"vocab_size": 50, "num_classes": 3, "max_len": 16, "stride": 16, "max_tokens": 64}
    corpus = labelled_token_dir(tmp_path, {"train": np.array([0, 2, -1, 1]), "val": np.array([0, 1])})
    with pytest.raises(ValueError, match=re.escape(f"{corpus}/train.labels.npy holds label -1 (document 2); labels "
                                                   "are classes counted from 0, so must be >= 0")):
        TokenDataModule(path=str(corpus), **small).setup("fit")  # was: "set data.num_classes=3"
    np.save(corpus / "train.labels.npy", np.array([0, 2, 255, 1], dtype=np.uint8))
    with pytest.raises(ValueError, match=r"run from 0 to 255, outside \[0, data.num_classes=3\); set "
                                         r"data.num_classes=256 "):
        TokenDataModule(path=str(corpus), **small).setup("fit")  # 255 + 1 in uint8 would say 0
    np.save(corpus / "train.labels.npy", np.array([0, 2, 1, 1], dtype=np.uint8))
    module = TokenDataModule(path=str(corpus), **small)
    module.setup("fit")
    assert module.labels["train"].dtype == np.int64 and sorted(set(module.labels["train"])) == [0, 1, 2]


@pytest.mark.parametrize("val_fraction", [0, 0.0, 1, 1.5, -0.2, float("nan"), True, "0.1"])
def test_a_val_fraction_outside_0_1_is_refused_saying_how_to_skip_validation(val_fraction):
    # 0 still held one document out; 1.5 and -0.2 were accepted and made lopsided splits.
    from hetrain.data.datamodule import TokenDataModule

    with pytest.raises(ValueError, match=rf"data.val_fraction={re.escape(repr(val_fraction))} is the share .* must "
                                         r"lie in \(0, 1\).*set trainer.limit_val_batches=0"):
        TokenDataModule(path="corpus.jsonl", val_fraction=val_fraction)
    assert TokenDataModule(path="corpus.jsonl", val_fraction=0.5).hparams.val_fraction == 0.5


@pytest.mark.parametrize(("label", "message"), [
    ('"\u00b2"', "field 'label' is '\u00b2', not an integer label"),  # passed str.isdigit, then failed int()
    ('"--1"', "field 'label' is '--1', not an integer label"),  # passed lstrip("-").isdigit()
    ('" 1"', "field 'label' is ' 1', not an integer label"),
    ("100000000000000000000", "label 100000000000000000000 is past int64"),  # overflowed in numpy, no line
    ("-1", "label -1 is negative; labels are classes counted from 0, so must be >= 0"),  # was: num_classes=3
    ('"-2"', "label -2 is negative"),
])
def test_a_jsonl_label_is_parsed_strictly_and_refused_naming_its_line(tmp_path, label, message):
    from hetrain.data.datamodule import read_labels

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(f'{{"text": "a", "label": 0}}\n\n{{"text": "b", "label": {label}}}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=re.escape(f"{corpus}:3: {message}")):
        read_labels(corpus, "label")
    corpus.write_text('{"text": "a", "label": 0}\n{"text": "b", "label": "12"}\n', encoding="utf-8-sig")
    assert read_labels(corpus, "label") == [0, 12]  # a byte order mark is skipped, as iter_documents skips it


def test_a_jsonl_record_with_a_lone_carriage_return_gives_one_label_and_a_broken_one_is_named(tmp_path):
    # The labels were read with universal newlines, the documents without: a lone "\r" (JSON whitespace) cut the
    # record in two there, and json's own error named no file or line.
    from hetrain.data.datamodule import read_labels

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_bytes(b'{"text": "a", "label": 0}\n{"text": "b",\r "label": 1}\r\n{"text": "c", "label": 2}\n')
    assert read_labels(corpus, "label") == [0, 1, 2]
    corpus.write_bytes(b'{"text": "a", "label": 0}\n{"text": "b", "label"\n')
    with pytest.raises(ValueError, match=re.escape(f"{corpus}:2 is not a JSON record")):
        read_labels(corpus, "label")
    corpus.write_bytes(b'{"text": "a", "label": 0}\n[1, 2]\n')
    with pytest.raises(ValueError, match=re.escape(f"{corpus}:2 is a JSON list, not a record")):
        read_labels(corpus, "label")


def test_a_uint64_id_past_int64_is_named_as_it_is(tmp_path):
    # The cast to int64 wrapped 2**64 - 1 to -1: "token id -1; token ids are non-negative".
    with pytest.raises(ValueError, match=r"document 0's token ids must fit int64 \(below 2\*\*63\), got "
                                         r"18446744073709551615 at index 1"):
        write_token_file(tmp_path / "c", [np.array([3, 2**64 - 1], dtype=np.uint64)])
    with pytest.raises(ValueError, match=r"must fit int64 \(below 2\*\*63\), got 1e\+20 at index 0"):
        write_token_file(tmp_path / "c", [[1e20]])


def test_tensor_documents_are_written_whole_strided_or_needing_grad(tmp_path):
    import torch

    # Tensors are converted as arrays (element by element took seconds for a long document).
    long_doc = torch.arange(50_000) % 60_000
    strided = torch.arange(40).view(8, 5).t()[1]  # every fifth id: a non-contiguous view
    needs_grad = torch.tensor([3.0, 7.0, 11.0], requires_grad=True)
    tf = write_token_file(tmp_path / "t", [long_doc, strided, needs_grad])
    np.testing.assert_array_equal(tf[0], long_doc.numpy())
    np.testing.assert_array_equal(tf[1], [1, 6, 11, 16, 21, 26, 31, 36])
    np.testing.assert_array_equal(tf[2], [3, 7, 11])
