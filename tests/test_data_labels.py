"""Synthetic documents whose label's markers are the majority of every window, not only of the whole document."""

from pathlib import Path

import numpy as np
import pytest

from hetrain.data.datamodule import write_synthetic_corpus
from hetrain.data.synthetic import FIRST_MARKER, SyntheticSequences
from hetrain.data.tokens import TokenFile
from hetrain.data.windows import make_windows

NUM_CLASSES, PER_CLASS = 4, 8  # SyntheticSequences' defaults
GUARANTEED = 16  # write_synthetic_corpus: every run of at least this many tokens holds the label's majority


def _lead(tokens: np.ndarray, label: int, num_classes: int, per_class: int) -> np.ndarray:
    """Per token: +1 a marker of ``label``, -1 one of another class, 0 otherwise ([CLS], noise)."""
    marker = (tokens >= FIRST_MARKER) & (tokens < FIRST_MARKER + num_classes * per_class)
    return np.where(marker, np.where((tokens - FIRST_MARKER) // per_class == label, 1, -1), 0)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("corpus")
    # The longseq recipe's documents (configs/data/tokens.yaml), fewer of them.
    write_synthetic_corpus(out, {"train": 48}, seed=0, min_len=64, max_len=1024)
    return out


@pytest.mark.parametrize(("max_len", "stride"), [(128, 96), (64, 48), (32, 16), (16, 16), (256, 256)])
def test_every_window_of_a_synthetic_document_holds_its_labels_markers_in_the_majority(corpus, max_len, stride):
    # Markers were scattered at random: ~3% of the recipe's windows (128 tokens, 96 apart) had as many markers of
    # another class as of the label, or more, and were trained and validated on as the label all the same.
    docs, labels = TokenFile(corpus / "train"), np.load(corpus / "train.labels.npy")
    windows = make_windows(docs.doc_lengths, max_len, stride)
    checked = 0
    for doc, offset, length in zip(windows.doc, windows.offset, windows.length, strict=True):
        if length < GUARANTEED and length < len(docs[doc]):
            continue  # a document's last window can be shorter than the guarantee: a few tokens may hold no marker
        tokens = np.asarray(docs[doc][offset : offset + length], dtype=np.int64)
        markers = tokens[(tokens >= FIRST_MARKER) & (tokens < FIRST_MARKER + NUM_CLASSES * PER_CLASS)]
        counts = np.bincount((markers - FIRST_MARKER) // PER_CLASS, minlength=NUM_CLASSES)
        others = np.delete(counts, labels[doc])
        assert counts[labels[doc]] > others.max(), (int(doc), int(offset), counts.tolist(), int(labels[doc]))
        checked += 1
    assert checked > 0.9 * len(windows)


@pytest.mark.parametrize(("min_span", "settings"), [
    (2, {}), (5, {}), (16, {"signal": 0.05, "distractors": 0.9}), (40, {"num_classes": 2, "markers_per_class": 3}),
])
def test_every_run_of_min_span_tokens_or_more_holds_the_majority(min_span, settings):
    data = SyntheticSequences(20, min_len=3, max_len=300, seed=4, min_span=min_span, **settings)
    num_classes, per_class = settings.get("num_classes", NUM_CLASSES), settings.get("markers_per_class", PER_CLASS)
    for seq, label in zip(data.sequences, data.labels.tolist(), strict=True):
        tokens = seq.numpy()
        assert tokens[0] == 1  # [CLS] stays
        lead = np.concatenate([[0], np.cumsum(_lead(tokens, label, num_classes, per_class))])
        starts, ends = np.meshgrid(np.arange(len(lead)), np.arange(len(lead)), indexing="ij")
        runs = (ends - starts >= min(min_span, len(tokens)))  # every run that long, and the whole sequence
        assert (lead[ends] - lead[starts] > 0)[runs].all()


def test_min_span_below_2_is_refused_and_none_keeps_the_sequences_of_the_seed():
    with pytest.raises(ValueError, match=r"need min_span >= 2 or None \(\[CLS\] alone"):
        SyntheticSequences(4, min_span=1)
    plain, spread = SyntheticSequences(30, seed=2), SyntheticSequences(30, seed=2, min_span=8)
    assert SyntheticSequences(30, seed=2, min_span=None).sequences[-1].tolist() == plain.sequences[-1].tolist()
    assert all(len(a) == len(b) for a, b in zip(plain.sequences, spread.sequences, strict=True))
    assert plain.labels.tolist() == spread.labels.tolist()
