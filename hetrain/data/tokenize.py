"""Text to token files: a byte-level tokenizer that needs no download, documents from text or jsonl, the writer.

The command line over it is ``python -m hetrain.data.build_tokens``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

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


def iter_documents(paths: Sequence[str | os.PathLike], field: str = "text", whole_files: bool = False) -> Iterator[str]:
    """The documents of ``paths``: ``.jsonl`` files by record ``field``, other files by line (or whole).

    Every file is read as UTF-8; a problem is reported with the file and line it is on.
    """
    for path in map(Path, paths):
        try:
            if path.suffix == ".jsonl":
                yield from _jsonl_documents(path, field)
            elif whole_files:
                yield path.read_text(encoding="utf-8")
            else:
                with open(path, encoding="utf-8") as f:
                    yield from (line.rstrip("\n") for line in f if line.strip())
        except UnicodeDecodeError as exc:
            raise ValueError(f"hetrain: {path} is not UTF-8 text (byte {exc.start} of the part read: "
                             f"{exc.object[exc.start:exc.start + 1]!r}); convert it, e.g. iconv -t utf-8") from None


def _jsonl_documents(path: Path, field: str) -> Iterator[str]:
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line.rstrip("\n"))
            except json.JSONDecodeError as exc:
                raise ValueError(f"hetrain: {path}:{n} is not a JSON record: {exc.msg} at column {exc.colno}") \
                    from None
            if not isinstance(record, dict) or field not in record:
                has = sorted(record) if isinstance(record, dict) else f"a JSON {type(record).__name__}"
                raise ValueError(f"hetrain: {path}:{n} has no field {field!r} (fields: {has})")
            text = record[field]
            if not isinstance(text, str):
                raise ValueError(f"hetrain: {path}:{n}: field {field!r} is a JSON {type(text).__name__}, not text")
            yield text


def _encoder(tokenizer: object) -> Callable[[str], Sequence[int]]:
    encode = getattr(tokenizer, "encode", tokenizer)
    if not callable(encode):
        raise TypeError(f"hetrain: a tokenizer must be callable or have .encode, got {type(tokenizer).__name__}")
    return encode


def build_token_file(
    docs: Iterable[str],
    out: str | os.PathLike,
    tokenizer: object | None = None,
    itemsize: int | None = None,
    bos_id: int | None = None,
    eos_id: int | None = None,
) -> TokenFile:
    """Tokenises ``docs`` into ``<out>.bin/.idx``; ``itemsize`` defaults from the tokenizer's ``vocab_size``.

    No documents is an error, not an empty corpus replacing the one at ``out``.

    ``bos_id``/``eos_id`` are added around each document: given here, or the tokenizer's own attributes.
    """
    tokenizer = ByteTokenizer() if tokenizer is None else tokenizer
    bos_id = getattr(tokenizer, "bos_id", None) if bos_id is None else bos_id
    eos_id = getattr(tokenizer, "eos_id", None) if eos_id is None else eos_id
    encode = _encoder(tokenizer)
    if itemsize is None:
        vocab = getattr(tokenizer, "vocab_size", None)
        itemsize = 2 if vocab is not None and vocab <= 1 << 16 else 4
    head = [] if bos_id is None else [bos_id]
    tail = [] if eos_id is None else [eos_id]
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    with TokenFileWriter(out, itemsize) as writer:
        for doc in docs:
            writer.add(head + list(encode(doc)) + tail)
        if not len(writer):  # raised inside the writer: its temporary goes, files already at ``out`` stay
            raise ValueError(f"hetrain: no documents to write (empty files, or only blank lines); nothing written, "
                             f"{writer.bin_path} and {writer.idx_path} left as they were")
    return TokenFile(out)
