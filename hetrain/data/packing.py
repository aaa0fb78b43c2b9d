"""Packing: several short sequences share one row, and each attends only to itself.

Token-budget batching removes most padding when lengths vary, but a corpus of short documents trained
at a long context still leaves rows mostly empty. Packing fills rows of ``row_len`` tokens with whole
sequences (best-fit decreasing: deterministic, and within a few percent of full for typical length
mixes). A packed batch carries ``segment_ids`` (1, 2, ... for the sequences of a row, 0 on padding)
and ``position_ids`` (restarting at 0 for each sequence); :func:`segment_attention_mask` turns them
into the block-diagonal mask ``scaled_dot_product_attention`` takes, so no token sees another sequence.

Packing is a dataset transform: :class:`PackedSequences` makes each row one sample, so the token-budget
sampler, the ring's producers, resuming and the once-per-epoch guarantee work on rows unchanged.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from hetrain.data.integers import token_count, whole_numbers
from hetrain.data.ring import Spec, _check_lossless

# As PadInto: a float id or label would be truncated into the int64 slot field without a word.
PACK_INTO_FIX = "PackInto writes integer token ids and labels: fix them in the dataset"


def pack_rows(lengths: Sequence[int] | np.ndarray, row_len: int) -> list[list[int]]:
    """Groups sample indices into rows whose lengths sum to at most ``row_len`` (best-fit decreasing).

    Longest first, each sample goes to the row it fills best; ties go to the earlier row and the
    earlier sample, so the packing depends on the lengths alone.
    """
    row_len = token_count(row_len, "row_len")
    lengths = whole_numbers(lengths, "lengths")  # np.asarray(..., int64) cut 3.7 to 3 without a word
    too_long = np.flatnonzero((lengths < 1) | (lengths > row_len))
    if len(too_long):
        i = int(too_long[0])
        raise ValueError(f"hetrain: sample {i} has length {int(lengths[i])}, outside [1, row_len={row_len}]; cut long "
                         f"documents into windows (hetrain.data.windows) before packing")
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, row), sorted: the best fit is the first with enough room
    for i in np.argsort(-lengths, kind="stable").tolist():
        n = int(lengths[i])
        k = bisect.bisect_left(free, (n, -1))
        if k == len(free):
            row = len(rows)
            rows.append([i])
            room = row_len - n
        else:
            room, row = free.pop(k)
            rows[row].append(i)
            room -= n
        if room > 0:
            bisect.insort(free, (room, row))
    return rows


class PackedSequences(torch.utils.data.Dataset):
    """Rows of ``dataset``'s samples packed to ``row_len`` tokens; item ``k`` is the list of row ``k``'s samples.

    Args:
        dataset: map-style, samples are dicts with a 1-D ``input_ids``.
        lengths: each sample's token count (read from the dataset when omitted).
        row_len: tokens per row, the model's context.
    """

    def __init__(self, dataset: Any, row_len: int, lengths: Sequence[int] | None = None) -> None:
        self.dataset, self.row_len = dataset, row_len
        if lengths is None:
            lengths = [len(dataset[i]["input_ids"]) for i in range(len(dataset))]
        self.sample_lengths = whole_numbers(lengths, "PackedSequences lengths")
        # Samples past the lengths were never packed, without a word (a dataset without __len__ is only indexed).
        if hasattr(dataset, "__len__") and len(self.sample_lengths) != len(dataset):
            raise ValueError(f"hetrain: PackedSequences got {len(self.sample_lengths)} lengths for a dataset of "
                             f"{len(dataset)} samples; pass one per sample (a TokenWindows' .lengths, not its token "
                             "file's doc_lengths), or omit lengths to read them from the dataset")
        if self.sample_lengths.size == 0:
            raise ValueError("hetrain: PackedSequences got no sample to pack: is the dataset empty?")
        self.rows = pack_rows(self.sample_lengths, row_len)
        self.lengths = np.array([self.sample_lengths[r].sum() for r in self.rows], dtype=np.int64)
        self.max_segments = max(map(len, self.rows))

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, k: int) -> list[dict[str, Any]]:
        return [self.dataset[i] for i in self.rows[k]]

    @property
    def fill_fraction(self) -> float:
        """Share of the packed rows' ``row_len`` slots that hold tokens (before batching pads rows)."""
        return float(self.lengths.sum()) / (len(self.rows) * self.row_len)


class PackInto:
    """Slot collate for :class:`PackedSequences` rows: ``input_ids``, ``attention_mask``, ``segment_ids``,
    ``position_ids`` (B, T) padded to the longest row, and, with ``label_key``, ``labels`` (B, S): each
    segment's label (``-100`` where a row has fewer than S segments).
    """

    def __init__(self, max_tokens: int, max_rows: int, max_segments: int, pad_id: int = 0,
                 label_key: str | None = "label") -> None:
        self.pad_id, self.label_key, self.max_segments = pad_id, label_key, max_segments
        self.spec: Spec = {"input_ids": (torch.int64, max_tokens), "attention_mask": (torch.bool, max_tokens),
                           "segment_ids": (torch.int64, max_tokens), "position_ids": (torch.int64, max_tokens)}
        if label_key is not None:
            self.spec["labels"] = (torch.int64, max_rows * max_segments)

    def __call__(self, rows: list[list[dict[str, Any]]], out: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
        b = len(rows)
        t = max(sum(len(item["input_ids"]) for item in row) for row in rows)
        self._check_fits(b, t, max(len(row) for row in rows), out)
        ids = out["input_ids"][: b * t].view(b, t).fill_(self.pad_id)
        mask = out["attention_mask"][: b * t].view(b, t).fill_(False)
        seg = out["segment_ids"][: b * t].view(b, t).fill_(0)
        pos = out["position_ids"][: b * t].view(b, t).fill_(0)
        for r, row in enumerate(rows):
            start = 0
            for s, item in enumerate(row, start=1):
                tokens = torch.as_tensor(item["input_ids"])
                if tokens.dim() != 1:
                    raise ValueError(f"hetrain: PackInto takes 1-D input_ids, got shape {tuple(tokens.shape)} in row "
                                     f"{r}, segment {s}; pack samples whose input_ids are one sequence each")
                _check_lossless(tokens, ids.dtype, f"input_ids of row {r}, segment {s}", PACK_INTO_FIX)
                n = len(tokens)
                ids[r, start : start + n] = tokens
                seg[r, start : start + n] = s
                pos[r, start : start + n] = torch.arange(n)
                start += n
            mask[r, :start] = True
        shapes = {name: (b, t) for name in ("input_ids", "attention_mask", "segment_ids", "position_ids")}
        if self.label_key is not None:
            s = self.max_segments
            labels = out["labels"][: b * s].view(b, s).fill_(-100)
            for r, row in enumerate(rows):
                unlabelled = next((seg for seg, item in enumerate(row, start=1) if self.label_key not in item), None)
                if unlabelled is not None:  # a bare KeyError named neither the setting nor the fix
                    raise ValueError(f"hetrain: PackInto reads each sample's label from {self.label_key!r}, which "
                                     f"row {r}, segment {unlabelled} does not have (its fields: "
                                     f"{sorted(row[unlabelled - 1])}); pass label_key=<its name>, or label_key=None "
                                     "for samples without labels")
                row_labels = torch.as_tensor([item[self.label_key] for item in row])
                _check_lossless(row_labels, labels.dtype, f"field {self.label_key!r} of row {r}", PACK_INTO_FIX)
                labels[r, : len(row)] = row_labels
            shapes["labels"] = (b, s)
        return shapes

    def _check_fits(self, b: int, t: int, segments: int, out: dict[str, torch.Tensor]) -> None:
        """Checked here, or the slot views fail with a shape error that names neither the batch nor the setting."""
        labels_fit = self.label_key is None or (segments <= self.max_segments
                                                and b * self.max_segments <= out["labels"].numel())
        if b * t > out["input_ids"].numel() or not labels_fit:
            raise ValueError(f"hetrain: a packed batch of {b} rows x {t} tokens with up to {segments} segments a row "
                             f"does not fit PackInto(max_tokens={out['input_ids'].numel()}, max_segments="
                             f"{self.max_segments}); size it from the sampler's max_tokens and max_batch_rows and the "
                             "packing's max_segments")


def segment_attention_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) segment ids -> (B, 1, T, T) bool mask for SDPA: True where query and key share a sequence.

    A padding position (segment 0) attends to itself only, so its row is never fully masked (which
    would make SDPA return NaN there); nothing real attends to it.
    """
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    real_key = segment_ids[:, None, :] != 0
    eye = torch.eye(segment_ids.shape[1], dtype=torch.bool, device=segment_ids.device)
    return ((same & real_key) | (eye & (segment_ids[:, :, None] == 0)))[:, None]
