"""Text to token files: a byte-level tokenizer that needs no download, documents from text or jsonl, the writer.

The command line over it is ``python -m hetrain.data.build_tokens``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from hetrain.data.tokens import TokenFile, TokenFileWriter


class ByteTokenizer:
    """UTF-8 bytes as ids ``3..258``, after the specials ``0`` padding, ``1`` begin and ``2`` end of document."""

    pad_id, bos_id, eos_id = 0, 1, 2
    vocab_size = 259

    def encode(self, text: str) -> list[int]:
        return [b + 3 for b in text.encode("utf-8")]

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(i - 3 for i in ids if i >= 3).decode("utf-8", errors="replace")

    __call__ = encode


class Document(str):
    """A document's text that knows where it was read (``path:line``, or ``path`` for a whole file).

    An error about one document (its tokenizer failed, an id does not fit) names the line, not an index.
    """

    where: str

    def __new__(cls, text: str, where: str) -> Document:
        doc = super().__new__(cls, text)
        doc.where = where
        return doc


def is_json_lines(path: str | os.PathLike, whole_files: bool = False) -> bool:
    """Whether :func:`iter_documents` reads ``path`` as JSON Lines (one object per line): a ``.jsonl`` file, or a
    ``.json`` one unless ``whole_files`` (a code or config tree's ``package.json`` is then one document), in any
    case. Hugging Face datasets' ``to_json`` writes JSON Lines as ``.json``; tokenised as text, its records went in
    whole, braces and field names included."""
    suffix = Path(path).suffix.lower()
    return suffix == ".jsonl" or (suffix == ".json" and not whole_files)


def iter_documents(paths: Sequence[str | os.PathLike], field: str = "text",
                   whole_files: bool = False) -> Iterator[Document]:
    """The documents of ``paths``: JSON Lines files (:func:`is_json_lines`) by record ``field``, other files by
    non-blank line (or whole).

    Every file is read as UTF-8 (a leading byte order mark is skipped); a problem is reported with the file and
    line it is on.
    """
    for path in map(Path, paths):
        try:
            if is_json_lines(path, whole_files):
                yield from _jsonl_documents(path, field)
            elif whole_files:
                text = path.read_text(encoding="utf-8-sig")
                if text.strip():  # as a blank line is no document, neither is a blank file
                    yield Document(text, str(path))
            else:
                with open(path, encoding="utf-8-sig", newline="\n") as f:
                    yield from (Document(_without_line_end(line), f"{path}:{n}") for n, line in enumerate(f, 1)
                                if line.strip())
        except UnicodeDecodeError as exc:
            raise _not_utf8(path, exc) from None


def _without_line_end(line: str) -> str:
    """A line read with ``newline="\\n"``, without its ``\\n`` or ``\\r\\n``.

    Universal newlines also ended a line at a lone ``\\r``: it cut a document in two, and every line after it was
    numbered otherwise than :func:`_not_utf8` (which splits bytes at ``\\n``) numbers it.
    """
    return line.removesuffix("\n").removesuffix("\r")


def _not_utf8(path: Path, exc: UnicodeDecodeError) -> ValueError:
    """The line and byte ``path`` fails to decode at: the decoder's error counts from a buffer, not the file."""
    with open(path, "rb") as f:
        if f.read(2) == b"\x1f\x8b":
            plain = path.with_suffix("") if path.suffix == ".gz" else "<decompressed file>"
            return ValueError(f"hetrain: {path} is gzip-compressed, not text; decompress it first, e.g. "
                              f"gunzip -c {path} > {plain}, and pass that file")
        f.seek(0)
        for n, line in enumerate(f, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as bad:
                return ValueError(f"hetrain: {path}:{n} is not UTF-8 text (byte {line[bad.start]:#04x} at column "
                                  f"{bad.start + 1}); convert the file, e.g. iconv -f <its encoding> -t utf-8")
    return ValueError(f"hetrain: {path} is not UTF-8 text ({exc.reason}); convert it, e.g. iconv -t utf-8")


# A pretty-printed .json, or one array of records, fails on its first line: say what the file should hold.
_ONE_PER_LINE = ("a .jsonl or .json file holds one JSON object per line (JSON Lines); convert a JSON array with e.g. "
                "jq -c '.[]' in.json > out.jsonl")


def jsonl_records(path: str | os.PathLike) -> Iterator[tuple[int, Any, str]]:
    """``(line number, parsed JSON, line)`` of each non-blank line of a JSON Lines file, one that does not parse
    named by its line. Lines end at ``\\n`` only (see :func:`_without_line_end`): a ``\\r`` is JSON whitespace.
    The documents and their labels are read through this, so both count the same lines."""
    with open(path, encoding="utf-8-sig", newline="\n") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"hetrain: {path}:{n} is not a JSON record: {exc.msg} at column {exc.colno}; "
                                 f"{_ONE_PER_LINE}") from None
            yield n, record, line


def _jsonl_documents(path: Path, field: str) -> Iterator[Document]:
    for n, record, line in jsonl_records(path):
        if not isinstance(record, dict) or field not in record:
            has = sorted(record) if isinstance(record, dict) else f"a JSON {type(record).__name__}"
            fix = ("; name the text's field: --field for build_tokens, data.text_field for train.py"
                   if isinstance(record, dict) else f"; {_ONE_PER_LINE}")
            raise ValueError(f"hetrain: {path}:{n} has no field {field!r} (fields: {has}){fix}")
        text = record[field]
        if not isinstance(text, str):
            raise ValueError(f"hetrain: {path}:{n}: field {field!r} is a JSON {type(text).__name__}, not text")
        if "\\u" in line:  # only a JSON escape makes a lone surrogate, which no UTF-8 encoder takes
            _check_surrogates(text, f"{path}:{n}", field)
        yield Document(text, f"{path}:{n}")


def _check_surrogates(text: str, where: str, field: str) -> None:
    """Refuses half of a UTF-16 pair (``"\\ud83d"`` alone), valid JSON but no text: every tokenizer fails on it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(
            f"hetrain: {where}: field {field!r} holds a lone surrogate {text[exc.start]!r} at character {exc.start} "
            "(a \\uXXXX escape of half a UTF-16 pair, cut from its other half), which is not text; fix or drop "
            "the record, e.g. re-export it with the pair whole") from None


def _encoder(tokenizer: object) -> Callable[[str, str], list[int]]:
    """``tokenizer`` as ``(text, where) -> ids``: what goes wrong in it names the document ``where``.

    A tokenizer raising on one document gave a bare traceback naming none; one returning a Hugging Face
    ``Encoding`` (ids in ``.ids``) failed with "not iterable".
    """
    encode = getattr(tokenizer, "encode", tokenizer)
    if not callable(encode):
        raise TypeError(f"hetrain: a tokenizer must be callable or have .encode, got {type(tokenizer).__name__}")
    name = getattr(tokenizer, "__name__", type(tokenizer).__name__)

    def ids(text: str, where: str) -> list[int]:
        try:
            out = encode(str(text))  # a plain str: a tokenizer written in C may refuse a subclass
        except Exception as exc:
            raise ValueError(f"hetrain: {where}: tokenizer {name} failed: {type(exc).__name__}: {exc}") from exc
        out = getattr(out, "ids", out)
        try:
            return list(out)
        except TypeError:
            raise TypeError(f"hetrain: {where}: tokenizer {name} returned a {type(out).__name__}, not token ids; "
                            "pass one that returns a list of ints, e.g. lambda s: tok.encode(s).ids") from None

    return ids


def _tokenizer_int(tokenizer: object, name: str, given: int | None = None) -> int | None:
    """``given``, else the tokenizer's ``name`` (``bos_id``, ``eos_id``, ``vocab_size``), as an int or None.

    SentencePiece has these as methods (``sp.bos_id()``) and says "none" with -1: read as attributes they
    failed in a comparison, or went into every document as a method object.
    """
    value = getattr(tokenizer, name, None) if given is None else given
    if callable(value):
        value = value()
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        if given is not None:
            raise TypeError(f"hetrain: {name}={value!r} is not an integer token id")
        instead = "itemsize to build_token_file (--itemsize for build_tokens)" if name == "vocab_size" else \
            f"{name} to build_token_file"
        raise TypeError(f"hetrain: tokenizer {type(tokenizer).__name__}'s {name} is {value!r}, not an integer; pass "
                        f"{instead}")
    return int(value) if value >= 0 else None


def build_token_file(
    docs: Iterable[str | Document],
    out: str | os.PathLike,
    tokenizer: object | None = None,
    itemsize: int | None = None,
    bos_id: int | None = None,
    eos_id: int | None = None,
) -> TokenFile:
    """Tokenises ``docs`` into ``<out>.bin/.idx``; ``itemsize`` defaults from the tokenizer's ``vocab_size``.

    No documents is an error, not an empty corpus replacing the one at ``out``. An error about one document
    names it by its ``where`` (a :class:`Document` from :func:`iter_documents`), else by its index.

    ``bos_id``/``eos_id`` are added around each document: given here, or the tokenizer's own attributes (or
    methods, as SentencePiece has them); a negative id (SentencePiece's -1) means none.
    """
    tokenizer = ByteTokenizer() if tokenizer is None else tokenizer
    bos_id = _tokenizer_int(tokenizer, "bos_id", bos_id)
    eos_id = _tokenizer_int(tokenizer, "eos_id", eos_id)
    encode = _encoder(tokenizer)
    if itemsize is None:
        vocab = _tokenizer_int(tokenizer, "vocab_size")
        itemsize = 2 if vocab is not None and vocab <= 1 << 16 else 4
    head = [] if bos_id is None else [bos_id]
    tail = [] if eos_id is None else [eos_id]
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    with TokenFileWriter(out, itemsize) as writer:
        for i, doc in enumerate(docs):
            where = getattr(doc, "where", f"document {i}")
            writer.add(head + encode(doc, where) + tail, where)
        if not len(writer):  # raised inside the writer: its temporary goes, files already at ``out`` stay
            raise ValueError(f"hetrain: no documents to write (empty files, or only blank lines); nothing written, "
                             f"{writer.bin_path} and {writer.idx_path} left as they were")
    return TokenFile(out)
