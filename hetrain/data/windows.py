"""Long documents as windows of at most ``max_len`` tokens, ``stride`` apart.

Consecutive windows of a document overlap by ``max_len - stride`` tokens (the context a model keeps
across the cut); the last window ends at the document's end and is shorter rather than shifted back,
so no token is lost and none is repeated beyond that overlap. A document of ``L > max_len`` tokens
gives ``1 + ceil((L - max_len) / stride)`` windows; shorter documents are one window each.
"""

from __future__ import annotations

import operator
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from hetrain.data.integers import token_count, whole_numbers
from hetrain.data.tokens import TokenFile


@dataclass(frozen=True)
class Windows:
    """One row per window: the sample table a sampler batches over (``length``) and a loader gathers."""

    doc: np.ndarray  # document of each window
    offset: np.ndarray  # first token of the window within its document
    start: np.ndarray  # first token of the window in the token file (document start + offset)
    length: np.ndarray  # tokens in the window, 1..max_len

    def __len__(self) -> int:
        return len(self.length)


def make_windows(
    doc_lengths: np.ndarray, max_len: int, stride: int | None = None, doc_starts: np.ndarray | None = None
) -> Windows:
    """Cuts documents into windows; ``stride`` defaults to ``max_len`` (no overlap).

    ``doc_starts`` (each document's first token in the file) defaults to the documents laid end to end.
    Empty documents give no window.
    """
    lengths = whole_numbers(doc_lengths, "document lengths")  # np.asarray(..., int64) cut 10.9 to 10 without a word
    max_len = token_count(max_len, "max_len")
    stride = max_len if stride is None else token_count(stride, "stride")
    if max_len < 1 or not 1 <= stride <= max_len:
        raise ValueError(f"hetrain: need 1 <= stride <= max_len, got stride={stride}, max_len={max_len}")
    if (lengths < 0).any():
        raise ValueError(f"hetrain: document {int(np.argmax(lengths < 0))} has a negative length")
    if doc_starts is None:
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    else:
        starts = whole_numbers(doc_starts, "document starts")
    counts = np.where(lengths > max_len, 1 + -(-(lengths - max_len) // stride), (lengths > 0).astype(np.int64))
    doc = np.repeat(np.arange(len(lengths), dtype=np.int64), counts)
    first = np.cumsum(counts) - counts  # index of each document's first window
    k = np.arange(len(doc), dtype=np.int64) - np.repeat(first, counts)
    offset = k * stride
    length = np.minimum(max_len, lengths[doc] - offset)
    return Windows(doc=doc, offset=offset, start=starts[doc] + offset, length=length)


class TokenWindows(Dataset):
    """A token file seen as windows: sample ``i`` is window ``i``; ``lengths`` is what a sampler batches on.

    ``RingLoader`` gathers these in C++; indexing from Python (``ds[i]``) serves torch's DataLoader.
    """

    def __init__(self, token_file: TokenFile | str | os.PathLike, max_len: int, stride: int | None = None) -> None:
        self.file = token_file if isinstance(token_file, TokenFile) else TokenFile(token_file)
        self.windows = make_windows(self.file.doc_lengths, max_len, stride, self.file.doc_starts)
        self.lengths = self.windows.length
        self.max_len = max_len

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        """Window ``i``; a negative ``i`` counts from the end, as for a list, and its ``sample_id`` is the index it
        names (``ds[-1]`` is sample ``len(ds) - 1``, not -1, which no sampler or ring batch holds)."""
        n_windows = len(self)
        i = operator.index(i)
        if not -n_windows <= i < n_windows:
            raise IndexError(f"hetrain: window {i} of {n_windows} ({self.file.bin_path})")
        i %= n_windows
        start, n = int(self.windows.start[i]), int(self.windows.length[i])
        tokens = self.file.span(start, start + n, "window", i)
        return {"input_ids": torch.from_numpy(tokens.astype(np.int64)), "sample_id": i}


def token_collate(items: list[dict[str, Any]], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """The batch RingLoader builds from TokenWindows, built in Python (for torch's DataLoader)."""
    lengths = torch.tensor([len(item["input_ids"]) for item in items], dtype=torch.int64)
    input_ids = torch.full((len(items), int(lengths.max())), pad_id, dtype=torch.int64)
    for row, item in zip(input_ids, items, strict=True):
        row[: len(item["input_ids"])] = item["input_ids"]
    return {
        "input_ids": input_ids,
        "attention_mask": torch.arange(input_ids.shape[1]) < lengths[:, None],
        "lengths": lengths,
        "sample_ids": torch.tensor([item["sample_id"] for item in items], dtype=torch.int64),
    }
