"""A learnable, variable-length token classification task generated from a seed (no download).

Each class owns a band of marker token ids. A sequence is ``[CLS]`` followed by noise tokens among
which markers of its class are scattered, plus fewer markers of one other class as a distractor:
the label is the class whose markers are in the majority. A model has to look across the whole
sequence (attention, not position) to answer, and a small encoder learns it in a few hundred steps.

Vocabulary layout: ``0`` padding, ``1`` ``[CLS]``, then ``num_classes * markers_per_class`` marker
ids, then noise ids up to ``vocab_size``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import Dataset

from hetrain.data.ring import PadInto

PAD = 0
CLS = 1
FIRST_MARKER = 2


class SyntheticSequences(Dataset):
    """``size`` sequences with lengths uniform in ``[min_len, max_len]`` (``[CLS]`` included).

    A sequence of ``n`` tokens holds ``max(2, round(signal * (n - 1)))`` markers of its class and
    ``distractors`` times as many (rounded down) of another, as many as fit, at random places: the label is
    the majority of the whole sequence, not of every part of it. With ``min_span`` (at least 2), every run of
    ``min_span`` or more consecutive tokens holds more markers of the label than of the other class as well
    (what windows of a long document need): where one would not, the last tokens of it that are not markers
    of the label become such markers. The same arguments give the same sequences, whatever the process or
    the order of access.
    """

    def __init__(
        self,
        size: int,
        vocab_size: int = 256,
        num_classes: int = 4,
        min_len: int = 16,
        max_len: int = 64,
        markers_per_class: int = 8,
        signal: float = 0.15,
        distractors: float = 0.5,
        seed: int = 0,
        min_span: int | None = None,
    ) -> None:
        if size < 0:
            # A negative size failed in torch.randint ("negative dimension"), naming no setting.
            raise ValueError(f"hetrain: need size >= 0 sequences (data.train_size and data.val_size; documents for "
                             f"token data), got {size=}")
        noise_start = FIRST_MARKER + num_classes * markers_per_class
        if vocab_size <= noise_start:
            raise ValueError(
                f"hetrain: vocab_size={vocab_size} leaves no noise tokens: padding, [CLS] and "
                f"{num_classes} classes x {markers_per_class} markers take ids 0..{noise_start - 1}"
            )
        if not 3 <= min_len <= max_len:  # TokenDataModule passes data.min_doc_len and data.max_doc_len
            raise ValueError(f"hetrain: need 3 <= min_len <= max_len ([CLS] and at least 2 markers of the class; "
                             f"data.min_doc_len and data.max_doc_len for token documents), got {min_len=}, {max_len=}")
        if not 0 <= distractors < 1:
            raise ValueError(f"hetrain: need 0 <= distractors < 1 (so the label wins), got {distractors=}")
        if not (0 <= signal and signal * (1 + distractors) <= 1):
            # More markers than a sequence has tokens failed in an index assignment, naming no setting.
            raise ValueError(f"hetrain: need signal >= 0 and signal * (1 + distractors) <= 1 (the class's markers "
                             f"and the distractors fit in the sequence), got {signal=}, {distractors=}; lower "
                             "signal or distractors")
        if num_classes < 2:
            raise ValueError(f"hetrain: need at least 2 classes, got {num_classes=}")
        if min_span is not None and min_span < 2:
            raise ValueError(f"hetrain: need min_span >= 2 or None ([CLS] alone is a run of 1 token that holds no "
                             f"marker), got {min_span=}")
        self.vocab_size = vocab_size
        g = torch.Generator().manual_seed(seed)
        self.labels = torch.randint(num_classes, (size,), generator=g)
        lengths = torch.randint(min_len, max_len + 1, (size,), generator=g)
        self.sequences = []
        for label, length in zip(self.labels.tolist(), lengths.tolist(), strict=True):
            body = length - 1
            n_signal = max(2, round(signal * body))
            n_distractor = int(n_signal * distractors)
            other = (label + 1 + int(torch.randint(num_classes - 1, (), generator=g))) % num_classes
            ids = torch.randint(noise_start, vocab_size, (body,), generator=g)
            slots = torch.randperm(body, generator=g)[: n_signal + n_distractor]
            ids[slots[:n_signal]] = self._markers(label, n_signal, markers_per_class, g)
            # Fewer than n_distractor slots are left only where the 2 markers fill a body of 2 tokens: the
            # distractor is drawn all the same, keeping every later sequence of the seed as it was.
            ids[slots[n_signal:]] = self._markers(other, n_distractor, markers_per_class, g)[: len(slots) - n_signal]
            sequence = torch.cat([torch.tensor([CLS]), ids])
            if min_span is not None:
                _lead_every_span(sequence, label, markers_per_class, noise_start, min_span)
            self.sequences.append(sequence)

    @staticmethod
    def _markers(cls: int, n: int, per_class: int, g: torch.Generator) -> torch.Tensor:
        return FIRST_MARKER + cls * per_class + torch.randint(per_class, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.sequences)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"input_ids": self.sequences[index], "label": self.labels[index], "sample_id": index}


def _lead_every_span(sequence: torch.Tensor, label: int, per_class: int, noise_start: int, min_span: int) -> None:
    """Turns tokens of ``sequence`` into markers of ``label`` until every run of ``min_span`` or more tokens holds
    more of them than of the other classes' markers together; in place.

    ``lead[j]`` is the label's markers minus the other markers among the first ``j`` tokens, so tokens ``i..j-1``
    hold the majority where ``lead[j] > lead[i]``. Left to right, where ``lead[j]`` does not beat the best
    ``lead[i]`` with ``i <= j - min_span``, the last tokens before ``j`` that are not markers of the label become
    ones. That raises only the lead of runs ending at ``j`` or later, so runs checked before keep their majority;
    and the ``min_span`` tokens before ``j`` always suffice: all markers, they outweigh the ``min_span - 1`` tokens
    before them, and a run starting earlier than that was checked already. They never reach ``[CLS]``: a run of
    ``min_span >= 2`` tokens from it has another token to turn.
    """
    first = FIRST_MARKER + label * per_class
    ids = sequence.tolist()
    score = [1 if first <= t < first + per_class else -1 if FIRST_MARKER <= t < noise_start else 0 for t in ids]
    lead = [0] * (len(ids) + 1)
    best = 0  # the largest lead[i] with i <= j - min_span; lead[0] = 0
    for j in range(1, len(ids) + 1):
        lead[j] = lead[j - 1] + score[j - 1]
        if j < min_span:
            continue
        best = max(best, lead[j - min_span])
        k = j
        while lead[j] <= best:
            k -= 1
            if score[k] == 1:
                continue
            gain, score[k] = 1 - score[k], 1
            ids[k] = first + k % per_class  # a marker of the class, none favoured
            for i in range(k + 1, j + 1):
                lead[i] += gain
    sequence.copy_(torch.tensor(ids))


def pad_collate(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Pads a batch to its longest sequence: ``input_ids`` and ``attention_mask`` (B, T), ``labels`` (B,)."""
    lengths = torch.tensor([len(item["input_ids"]) for item in items])
    input_ids = torch.full((len(items), int(lengths.max())), PAD, dtype=torch.long)
    for row, item in zip(input_ids, items, strict=True):
        row[: len(item["input_ids"])] = item["input_ids"]
    attention_mask = torch.arange(input_ids.shape[1]) < lengths[:, None]  # True on real tokens
    labels = torch.stack([item["label"] for item in items])
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


class PadWithIds(PadInto):
    """Slot collate writing :func:`pad_collate`'s batch plus ``sample_ids`` (B,), as token-file batches carry."""

    def __init__(self, max_tokens: int, max_rows: int) -> None:
        super().__init__(max_tokens, max_rows, pad_id=PAD)
        self.spec["sample_ids"] = (torch.int64, max_rows)

    def __call__(self, items: list[dict[str, Any]], out: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
        shapes = super().__call__(items, out)
        out["sample_ids"][: len(items)] = torch.as_tensor([item["sample_id"] for item in items])
        shapes["sample_ids"] = (len(items),)
        return shapes
