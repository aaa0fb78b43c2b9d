"""Builds a token file from text or jsonl: ``python -m hetrain.data.build_tokens corpus.jsonl --out data/corpus``.

Documents: each non-empty line of a text file (``--whole-files``: each file), or the ``--field`` of each
record of a JSON Lines file (one JSON object per line: named ``.jsonl``, or ``.json`` but under ``--whole-files``,
in any case). The built-in tokenizer maps UTF-8 bytes to ids, so it needs no download; any tokenizer works through
``--tokenizer package.module:name`` (a callable ``str -> list[int]`` or an object with ``encode``, e.g. a Hugging
Face tokenizer, whose ``Encoding`` is read through ``.ids``) or the ``tokenizer`` argument of
:func:`build_token_file`. Whatever goes wrong with a document is one line naming its file and line; input without
documents leaves the files at ``--out`` as they were. Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import signal
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from hetrain.data.tokenize import ByteTokenizer, Document, build_token_file, is_json_lines, iter_documents
from hetrain.data.tokens import TokenFile

PROGRESS_CHARS = 32 << 20  # a progress line per this many characters of text read


def _load_tokenizer(spec: str) -> object:
    """The tokenizer ``spec`` names; what fails in loading it (a missing model file is an OSError without a path)
    is a ValueError naming ``--tokenizer``, not an input or ``--out`` that cannot be read or written."""
    if spec == "byte":
        return ByteTokenizer()
    module, _, name = spec.partition(":")
    if not name:
        raise ValueError(f"hetrain: --tokenizer takes 'byte' or 'package.module:name', got {spec!r}")
    try:
        obj = getattr(importlib.import_module(module), name)
        return obj() if isinstance(obj, type) else obj
    except (ImportError, AttributeError, OSError, ValueError, TypeError) as exc:
        raise ValueError(f"hetrain: --tokenizer {spec} failed to load: {type(exc).__name__}: {exc}") from exc


@contextlib.contextmanager
def _sigterm_exits() -> Iterator[None]:
    """SIGTERM (a scheduler stopping the job) raises SystemExit, as Ctrl-C raises KeyboardInterrupt, so the writer
    removes its temporary .bin, as large as the corpus, instead of leaving it behind. The old handler comes back
    after; only the main thread can set one."""
    # A handler set outside Python (an embedding program's) reads as None and could not be put back: left alone.
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) is None:
        yield
        return

    def stop(signum: int, frame: object) -> None:
        print(f"hetrain: build_tokens stopped by {signal.Signals(signum).name}", file=sys.stderr)
        raise SystemExit(128 + signum)

    old = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def _reporting_progress(docs: Iterator[Document]) -> Iterator[Document]:
    """``docs``, with a line on stderr per ``PROGRESS_CHARS`` characters read: a large corpus takes minutes."""
    start, chars, reported = time.monotonic(), 0, 0
    for n, doc in enumerate(docs, 1):
        chars += len(doc)
        if chars - reported >= PROGRESS_CHARS:
            reported = chars
            print(f"hetrain: build_tokens: {n} documents, {chars / 1e6:.0f}M characters read, at {doc.where} "
                  f"({time.monotonic() - start:.0f} s)", file=sys.stderr, flush=True)
        yield doc


def main(argv: Sequence[str] | None = None) -> TokenFile:
    parser = argparse.ArgumentParser(prog="python -m hetrain.data.build_tokens", description=__doc__.split("\n")[0])
    parser.add_argument("inputs", nargs="+", help="text or JSON Lines (.jsonl, .json) files")
    parser.add_argument("--out", required=True, help="output prefix: writes <out>.bin and <out>.idx")
    parser.add_argument("--tokenizer", default="byte", help="'byte' or package.module:name (callable or .encode)")
    parser.add_argument("--field", help="field of a JSON Lines (.jsonl or .json) record holding the document "
                                        "(default: text)")
    parser.add_argument("--whole-files", action="store_true",
                        help="a text file (and a .json one) is one document, not one per line")
    parser.add_argument("--itemsize", type=int, choices=(2, 4), help="bytes per token (default: from vocab_size)")
    args = parser.parse_args(argv)
    folders = [p for p in args.inputs if Path(p).is_dir()]
    if folders:
        parser.error(f"{', '.join(folders)}: a directory, not a file; pass the files in it, e.g. {folders[0]}/*.jsonl")
    missing = [p for p in args.inputs if not Path(p).is_file()]
    if missing:
        parser.error(f"no such file: {', '.join(missing)}")
    # Else ignored without a word.
    if args.field is not None and not any(is_json_lines(p, args.whole_files) for p in args.inputs):
        parser.error(f"--field {args.field} names a field of JSON Lines records, but no input is a .jsonl or .json "
                     "file, and other files are read as text; name JSON Lines files .jsonl, or drop --field")
    try:
        tokenizer = _load_tokenizer(args.tokenizer)
        with _sigterm_exits():
            docs = _reporting_progress(iter_documents(args.inputs, args.field or "text", args.whole_files))
            tf = build_token_file(docs, args.out, tokenizer, args.itemsize)
    except (ValueError, TypeError, ImportError, AttributeError, UnicodeDecodeError) as exc:
        parser.exit(2, f"{parser.prog}: error: {exc}\n")  # one line naming the file and record, not a traceback
    except OSError as exc:  # an --out that cannot be written (or an input that cannot be read): no traceback
        what = f"{exc.strerror}: {exc.filename}" if exc.strerror and exc.filename else str(exc)
        parser.exit(2, f"{parser.prog}: error: hetrain: {what}; the inputs must be readable and --out {args.out} in "
                       "a directory you can write\n")
    print(f"hetrain: wrote {tf.bin_path} and {tf.idx_path}: {len(tf)} documents, {tf.num_tokens} tokens, {tf.dtype}")
    return tf


if __name__ == "__main__":
    main()
