"""Builds a token file from text or jsonl: ``python -m hetrain.data.build_tokens corpus.jsonl --out data/corpus``.

Documents: each non-empty line of a text file (``--whole-files``: each file), or the ``--field`` of each
jsonl record. The built-in tokenizer maps UTF-8 bytes to ids, so it needs no download; any tokenizer
works through ``--tokenizer package.module:name`` (a callable ``str -> list[int]`` or an object with
``encode``, e.g. a Hugging Face tokenizer) or the ``tokenizer`` argument of :func:`build_token_file`.
"""

from __future__ import annotations

import argparse
import importlib
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
    """The documents of ``paths``: ``.jsonl`` files by record ``field``, other files by line (or whole)."""
    for path in map(Path, paths):
        if path.suffix == ".jsonl":
            with open(path, encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    record = json.loads(line)
                    if field not in record:
                        raise KeyError(f"hetrain: {path}:{n} has no field {field!r} (fields: {sorted(record)})")
                    yield record[field]
        elif whole_files:
            yield path.read_text(encoding="utf-8")
        else:
            with open(path, encoding="utf-8") as f:
                yield from (line.rstrip("\n") for line in f if line.strip())


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
    return TokenFile(out)


def _load_tokenizer(spec: str) -> object:
    if spec == "byte":
        return ByteTokenizer()
    module, _, name = spec.partition(":")
    if not name:
        raise ValueError(f"hetrain: --tokenizer takes 'byte' or 'package.module:name', got {spec!r}")
    obj = getattr(importlib.import_module(module), name)
    return obj() if isinstance(obj, type) else obj


def main(argv: Sequence[str] | None = None) -> TokenFile:
    parser = argparse.ArgumentParser(prog="python -m hetrain.data.build_tokens", description=__doc__.split("\n")[0])
    parser.add_argument("inputs", nargs="+", help="text or .jsonl files")
    parser.add_argument("--out", required=True, help="output prefix: writes <out>.bin and <out>.idx")
    parser.add_argument("--tokenizer", default="byte", help="'byte' or package.module:name (callable or .encode)")
    parser.add_argument("--field", default="text", help="jsonl field holding the document")
    parser.add_argument("--whole-files", action="store_true", help="a text file is one document, not one per line")
    parser.add_argument("--itemsize", type=int, choices=(2, 4), help="bytes per token (default: from vocab_size)")
    args = parser.parse_args(argv)
    tokenizer = _load_tokenizer(args.tokenizer)
    tf = build_token_file(iter_documents(args.inputs, args.field, args.whole_files), args.out, tokenizer, args.itemsize)
    print(f"hetrain: wrote {tf.bin_path} and {tf.idx_path}: {len(tf)} documents, {tf.num_tokens} tokens, {tf.dtype}")
    return tf


if __name__ == "__main__":
    main()
