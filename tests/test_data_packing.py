"""Packing short sequences into rows: every sample once, rows full, and attention that stops at boundaries."""

from collections import Counter

import numpy as np
import pytest
import torch

from hetrain.data import RingLoader, SyntheticSequences, TokenBudgetBatchSampler
from hetrain.data.packing import PackedSequences, PackInto, pack_rows, segment_attention_mask
from hetrain.models.bert import EncoderBlock


def short_lengths(n: int, seed: int) -> np.ndarray:
    """Zipf-like: most sequences short, a few near the context."""
    return np.minimum(np.random.default_rng(seed).zipf(1.6, n) * 6, 120)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rows_hold_every_sample_once_within_the_row_length_and_are_nearly_full(seed):
    lengths = short_lengths(3001, seed)
    rows = pack_rows(lengths, 128)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert max(int(lengths[row].sum()) for row in rows) <= 128
    fill = lengths.sum() / (len(rows) * 128)
    assert fill > 0.95, fill  # one sequence per row would fill lengths.mean() / 128, about a fifth
    assert pack_rows(lengths, 128) == rows  # deterministic


def test_a_sample_longer_than_a_row_is_refused_naming_it():
    with pytest.raises(ValueError, match="sample 2 has length 9, outside \\[1, row_len=8\\]"):
        pack_rows([3, 4, 9], 8)


def test_lengths_and_row_len_that_are_not_whole_numbers_are_refused():
    # np.asarray(..., int64) made 3.7 and 2.6 tokens 3 and 2: both packed into one row of 5.
    with pytest.raises(ValueError, match=r"lengths must be whole numbers, got 3.7 at index 0"):
        pack_rows([3.7, 2.6], row_len=5)
    with pytest.raises(ValueError, match=r"row_len counts tokens, so must be an integer, got 5.5"):
        pack_rows([3, 2], row_len=5.5)
    with pytest.raises(ValueError, match=r"PackedSequences lengths must be whole numbers, got 2.6 at index 1"):
        PackedSequences([{"input_ids": [1, 2, 3]}] * 2, row_len=8, lengths=[3, 2.6])
    assert pack_rows(np.array([3.0, 2.0]), np.int64(5)) == [[0, 1]]  # whole floats and numpy integers pass


def test_packed_batches_through_the_ring_carry_segments_positions_and_labels():
    data = SyntheticSequences(size=203, vocab_size=64, num_classes=3, min_len=4, max_len=40, seed=5)
    packed = PackedSequences(data, row_len=64)
    sampler = TokenBudgetBatchSampler(packed.lengths, max_tokens=256, seed=1)
    collate = PackInto(256, sampler.max_batch_rows, packed.max_segments)
    seen = Counter()
    with RingLoader(packed, sampler, collate=collate, num_workers=2) as loader:
        for rows, batch in zip(([packed.rows[k] for k in b] for b in sampler), loader, strict=True):
            for r, row in enumerate(rows):
                start = 0
                for s, i in enumerate(row, start=1):
                    ids = torch.as_tensor(data[i]["input_ids"])
                    n = len(ids)
                    assert torch.equal(batch["input_ids"][r, start:start + n], ids)
                    assert (batch["segment_ids"][r, start:start + n] == s).all()
                    assert torch.equal(batch["position_ids"][r, start:start + n], torch.arange(n))
                    assert batch["labels"][r, s - 1] == int(data[i]["label"])
                    seen[i] += 1
                    start += n
                assert batch["attention_mask"][r, :start].all() and not batch["attention_mask"][r, start:].any()
                assert (batch["segment_ids"][r, start:] == 0).all() and (batch["labels"][r, len(row):] == -100).all()
    assert sorted(seen) == list(range(len(data))) and set(seen.values()) == {1}
    assert packed.fill_fraction > 0.9


def test_a_batch_too_large_for_pack_into_is_refused_naming_the_sizes():
    rows = [[{"input_ids": list(range(5)), "label": 1}] * 3] * 4  # 4 rows of 3 segments, 15 tokens each
    out = {name: torch.empty(n, dtype=dtype) for name, (dtype, n) in PackInto(32, 4, 3).spec.items()}
    with pytest.raises(ValueError, match=r"packed batch of 4 rows x 15 tokens .* does not fit PackInto\(max_tokens=32"):
        PackInto(32, 4, 3)(rows, out)  # was: shape '[4, 15]' is invalid for input of size 32
    out = {name: torch.empty(n, dtype=dtype) for name, (dtype, n) in PackInto(64, 4, 2).spec.items()}
    with pytest.raises(ValueError, match="up to 3 segments a row does not fit .* max_segments=2"):
        PackInto(64, 4, 2)(rows, out)


def test_a_sample_without_the_label_names_the_setting_as_pad_into_does():
    # Was a bare KeyError: 'label' (token windows carry no label, and label_key defaults to "label").
    pack = PackInto(16, 2, 2)
    out = {name: torch.empty(n, dtype=dtype) for name, (dtype, n) in pack.spec.items()}
    rows = [[{"input_ids": [1, 2], "label": 0}], [{"input_ids": [3], "label": 1}, {"input_ids": [4], "sample_id": 7}]]
    with pytest.raises(ValueError, match=r"PackInto reads each sample's label from 'label', which row 1, segment 2 "
                                         r"does not have \(its fields: \['input_ids', 'sample_id'\]\); pass "
                                         r"label_key=<its name>, or label_key=None for samples without labels"):
        pack(rows, out)
    unlabelled = PackInto(16, 2, 2, label_key=None)
    assert "labels" not in unlabelled(rows, out)


def test_attention_over_a_packed_row_equals_each_sequence_alone():
    torch.manual_seed(0)
    block = EncoderBlock(hidden=16, heads=2, ffn=32, dropout=0.0).double().eval()
    g = torch.Generator().manual_seed(1)
    sequences = [torch.randn(n, 16, generator=g, dtype=torch.float64) for n in (5, 9, 3)]
    row = torch.cat(sequences + [torch.randn(4, 16, generator=g, dtype=torch.float64)])[None]  # 4 padding tokens
    segment_ids = torch.tensor([[1] * 5 + [2] * 9 + [3] * 3 + [0] * 4])
    packed = block(row, segment_attention_mask(segment_ids))
    assert torch.isfinite(packed).all()  # padding queries attend to themselves, never to nothing
    start = 0
    for seq in sequences:
        alone = block(seq[None], torch.ones(1, len(seq), dtype=torch.bool))
        torch.testing.assert_close(packed[:, start:start + len(seq)], alone, rtol=1e-12, atol=1e-12)
        start += len(seq)
    unmasked = block(row, segment_ids != 0)  # the plain padding mask lets sequences see each other
    assert not torch.allclose(unmasked[:, :5], packed[:, :5])


def test_embeddings_restart_positions_at_each_packed_sequence():
    from hetrain.models.bert import Embeddings

    torch.manual_seed(0)
    embed = Embeddings(vocab_size=30, hidden=8, max_len=16, dropout=0.0).eval()
    a, b = torch.tensor([[3, 4, 5]]), torch.tensor([[7, 8]])
    packed = embed(torch.cat([a, b], 1), position_ids=torch.tensor([[0, 1, 2, 0, 1]]))
    torch.testing.assert_close(packed, torch.cat([embed(a), embed(b)], 1))
    assert not torch.allclose(embed(torch.cat([a, b], 1))[:, 3:], embed(b))


def test_packing_nothing_says_the_dataset_is_empty():
    with pytest.raises(ValueError, match="PackedSequences got no sample to pack: is the dataset empty"):
        PackedSequences([], row_len=64)


def test_lengths_not_one_per_sample_are_refused():
    # Samples past the lengths given were never packed: 4 lengths for 6 samples packed 4 without a word.
    data = [{"input_ids": torch.arange(n)} for n in (8, 2, 3, 2, 8, 4)]
    for lengths in ([8, 2, 3, 2], [8, 2, 3, 2, 8, 4, 1]):
        with pytest.raises(ValueError, match=rf"PackedSequences got {len(lengths)} lengths for a dataset of 6 samples; "
                                             r"pass one per sample"):
            PackedSequences(data, row_len=8, lengths=lengths)
    assert sorted(i for row in PackedSequences(data, row_len=8).rows for i in row) == list(range(6))


class Indexed(torch.utils.data.Dataset):
    """A map-style dataset with no __len__ (torch's Dataset defines none): only indexed."""

    def __getitem__(self, i):
        return {"input_ids": torch.arange(1 + i)}


def test_given_lengths_pack_a_dataset_without_a_length():
    # The lengths check called len(dataset): a bare TypeError for a dataset packing only ever indexes.
    assert sorted(i for row in PackedSequences(Indexed(), row_len=4, lengths=[1, 2, 3]).rows for i in row) == [0, 1, 2]


@pytest.mark.parametrize(("row", "message"), [
    ([{"input_ids": torch.tensor([3.0, 4.7]), "label": 1}], r"input_ids of row 0, segment 1 holds non-whole numbers "
                                                            r"\(such as 4.7\)"),
    ([{"input_ids": [3, 4], "label": 1}, {"input_ids": [5], "label": 1.6}], r"field 'label' of row 0 holds non-whole "
                                                                             r"numbers \(such as 1.6\)"),
    ([{"input_ids": [[3, 4]], "label": 0}], r"PackInto takes 1-D input_ids, got shape \(1, 2\) in row 0, segment 1"),
])
def test_pack_into_refuses_what_its_slots_would_truncate_as_pad_into_does(row, message):
    # PadInto refused these; PackInto wrote 4.7 as 4 and the label 1.6 as 1 without a word.
    pack = PackInto(16, 2, 2)
    out = {name: torch.empty(n, dtype=dtype) for name, (dtype, n) in pack.spec.items()}
    with pytest.raises(ValueError, match=message):
        pack([row], out)
