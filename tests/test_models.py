"""The reference BERT: fused and unfused builds share a state_dict and compute the same thing; the classification
task around it predicts and names bad settings."""

import re

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from hetrain.data.datamodule import SyntheticDataModule
from hetrain.data.packing import segment_attention_mask
from hetrain.models.bert import BertClassifier, EncoderBlock
from hetrain.models.task import ClassificationTask


def test_fused_and_unfused_bert_agree_in_outputs_and_gradients():
    torch.manual_seed(0)
    fused = BertClassifier(vocab_size=40, num_classes=3, hidden=32, layers=2, heads=4, max_len=16, fused=True)
    plain = BertClassifier(vocab_size=40, num_classes=3, hidden=32, layers=2, heads=4, max_len=16, fused=False)
    assert fused.state_dict().keys() == plain.state_dict().keys()
    plain.load_state_dict(fused.state_dict())
    fused.eval()
    plain.eval()
    ids = torch.randint(1, 40, (3, 11), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(3, 11, dtype=torch.bool)
    mask[2, 7:] = False
    out_f, out_p = fused(ids, mask), plain(ids, mask)
    torch.testing.assert_close(out_f, out_p, atol=1e-5, rtol=1e-5)
    out_f.square().sum().backward()
    out_p.square().sum().backward()
    for (name, pf), pp in zip(fused.named_parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(pf.grad, pp.grad, atol=1e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


def test_a_sequence_longer_than_the_position_table_is_refused_naming_the_setting():
    model = BertClassifier(vocab_size=40, num_classes=3, hidden=32, layers=1, heads=4, max_len=8)
    ids = torch.randint(1, 40, (2, 9), generator=torch.Generator().manual_seed(2))
    with pytest.raises(ValueError, match="9 tokens is longer than the model's 8 positions; raise model.max_len"):
        model(ids, torch.ones(2, 9, dtype=torch.bool))


@pytest.mark.parametrize("mask_dtype", [torch.float32, torch.int64])
def test_a_mask_that_is_not_bool_is_refused_naming_the_fix(mask_dtype):
    # A float 0/1 mask reached attention as an additive bias that masked nothing: padding changed the logits.
    model = BertClassifier(vocab_size=16, num_classes=3, hidden=16, layers=1, heads=2).eval()
    ids = torch.randint(1, 16, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 4:] = False
    with pytest.raises(ValueError, match=r"must be bool.*attention_mask\.bool\(\)"):
        model(ids, mask.to(mask_dtype))


def test_a_packed_four_dimensional_mask_is_refused_naming_the_blocks_that_take_it():
    model = BertClassifier(vocab_size=16, num_classes=3, hidden=16, layers=1, heads=2).eval()
    ids = torch.randint(1, 16, (1, 8))
    with pytest.raises(ValueError, match=r"\(B, T\) attention_mask.*EncoderBlock"):
        model(ids, torch.ones(1, 1, 8, 8, dtype=torch.bool))


@pytest.mark.parametrize("mask, message", [
    # (B, T, T) broadcast against (B, heads, T, T): with B == heads, sequence b's mask went to head b.
    (lambda m: m[:, 0], r"takes a \(B, T\) bool attention_mask, or \(B, 1, T, T\).*got \(2, 4, 4\).*\[:, None\]"),
    (lambda m: m[:1], r"got \(1, 1, 4, 4\)"),  # another batch's mask
    # A float 0/1 (B, T) mask was added to the scores: padded keys stayed visible.
    (lambda m: m[:, 0, 0].float(), r"\(B, T\) attention_mask must be bool.*attention_mask\.bool\(\)"),
], ids=["three_dims", "another_batch", "float_two_dims"])
def test_an_encoder_block_refuses_a_mask_it_would_broadcast_wrongly(mask, message):
    block = EncoderBlock(hidden=8, heads=2, ffn=16, dropout=0.0).eval()
    packed = segment_attention_mask(torch.tensor([[1, 1, 2, 2], [1, 1, 1, 0]]))  # (B, 1, T, T) with B == heads
    with pytest.raises(ValueError, match=message):
        block(torch.randn(2, 4, 8), mask(packed))


def test_an_encoder_block_takes_a_float_additive_packed_mask():
    torch.manual_seed(0)
    block = EncoderBlock(hidden=8, heads=2, ffn=16, dropout=0.0).eval()
    x, packed = torch.randn(2, 4, 8), segment_attention_mask(torch.tensor([[1, 1, 2, 2], [1, 1, 1, 0]]))
    additive = torch.zeros(packed.shape).masked_fill(~packed, float("-inf"))
    torch.testing.assert_close(block(x, additive), block(x, packed))


def test_a_row_without_real_tokens_pools_to_finite_logits():
    model = BertClassifier(vocab_size=16, num_classes=3, hidden=16, layers=1, heads=2).eval()
    ids = torch.randint(1, 16, (2, 5))
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1] = False
    logits = model(ids, mask)
    assert torch.isfinite(logits).all()
    torch.testing.assert_close(logits[0], model(ids[:1], mask[:1])[0])  # the empty row changes no other


@pytest.mark.parametrize("sizes, message", [
    ({"heads": 0}, "heads=0 must be a positive whole number (model.heads"),  # was a ZeroDivisionError
    ({"hidden": 0}, "hidden=0 must be a positive whole number (model.hidden"),  # failed in the optimizer step
    ({"hidden": 0, "layers": 0}, "hidden=0 must be a positive whole number"),  # no attention block to catch it
    ({"heads": -2}, "heads=-2 must be a positive whole number"),
])
def test_sizes_below_one_are_refused_naming_the_setting(sizes, message):
    with pytest.raises(ValueError, match=re.escape(f"hetrain: {message}")):
        BertClassifier(**{"hidden": 16, "heads": 2, "layers": 1, **sizes})


@pytest.mark.parametrize("settings, message", [
    ({"layers": -2}, "layers=-2 must be a whole number >= 0 (model.layers"),  # built no block and trained nonetheless
    ({"layers": 2.5}, "layers=2.5 must be a whole number >= 0 (model.layers"),
    ({"ffn": 0}, "ffn=0 must be a positive whole number (model.ffn"),  # silently became 4 * hidden
    ({"ffn": -8}, "ffn=-8 must be a positive whole number (model.ffn"),
    ({"dropout": 1.5}, "dropout=1.5 must be a probability in [0, 1] (model.dropout"),
    ({"dropout": -0.1}, "dropout=-0.1 must be a probability in [0, 1] (model.dropout"),
    # -0.5 reached SDPA, which complained of "dropout > 0"
    ({"attention_dropout": -0.5}, "attention_dropout=-0.5 must be a probability in [0, 1] (model.attention_dropout"),
    ({"attention_dropout": 1.5}, "attention_dropout=1.5 must be a probability in [0, 1] (model.attention_dropout"),
])
def test_layers_ffn_and_dropouts_out_of_range_are_refused_naming_the_setting(settings, message):
    with pytest.raises(ValueError, match=re.escape(f"hetrain: {message}")):
        BertClassifier(**{"hidden": 16, "heads": 2, "layers": 1, **settings})
    # The bounds themselves are settings to take.
    BertClassifier(hidden=16, heads=2, layers=0, ffn=1, dropout=1.0, attention_dropout=0.0)


def _labelled_rows(labels: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    ids = torch.randint(1, 16, (len(labels), 6), generator=torch.Generator().manual_seed(3))
    return [{"input_ids": ids[i], "attention_mask": torch.ones(6, dtype=torch.bool), "labels": labels[i]}
            for i in range(len(labels))]


def test_validation_leaves_rows_labelled_minus_100_out_of_val_loss_and_val_acc():
    """-100 means no label (F.cross_entropy's ignore_index; hetrain.data's ValShares pads a rank's validation share
    with it). Each batch's loss left such a row out but its weight counted it, a batch of such rows alone gave a NaN
    val/loss, and val/acc counted the row as classified wrong."""
    torch.manual_seed(0)
    model = BertClassifier(vocab_size=16, num_classes=3, hidden=16, layers=1, heads=2, dropout=0.0).eval()
    rows = _labelled_rows(torch.zeros(7, dtype=torch.long))
    ids, mask = torch.stack([r["input_ids"] for r in rows]), torch.stack([r["attention_mask"] for r in rows])
    with torch.no_grad():
        logits = model(ids, mask)
    labels = logits.argmax(1)
    labels[2] = (labels[2] + 1) % 3  # 4 of the 5 labelled rows are classified right
    labels[[1, 6]] = -100  # batches of 3: one unlabelled row in the first, the third one unlabelled
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    (metrics,) = trainer.validate(ClassificationTask(model, num_classes=3), DataLoader(_labelled_rows(labels), 3),
                                  verbose=False)
    assert metrics["val/loss"] == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-6)
    assert metrics["val/acc"] == pytest.approx(0.8)


def test_training_refuses_a_row_labelled_minus_100_naming_the_fix():
    """Training left the row out of the loss but divided by a sample count that held it: it counted as a row of
    loss 0 (exact accumulation plans its sample counts before reading any batch, so it cannot leave the row out)."""
    task = ClassificationTask(BertClassifier(vocab_size=16, num_classes=3, hidden=16, layers=1, heads=2), 3)
    trainer = pl.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(ValueError, match=r"1 of its 4 labels -100 \(no label\).*Drop the unlabelled samples"):
        trainer.fit(task, DataLoader(_labelled_rows(torch.tensor([0, 1, -100, 2])), batch_size=4))


@pytest.mark.parametrize("betas", [[0.9], [0.9, 0.99, 0.999], [0.9, 1.0], [-0.1, 0.999]])
def test_betas_that_are_not_two_decay_rates_are_refused_naming_the_setting(betas):
    """[0.9] failed as an IndexError when the optimizer was built, after the data and the sanity check."""
    model = BertClassifier(hidden=16, layers=1, heads=2)
    with pytest.raises(ValueError, match=re.escape(f"hetrain: betas={betas!r} must be two numbers in [0, 1)")):
        ClassificationTask(model, num_classes=4, betas=betas)


def test_predict_gives_the_logits_of_labelled_and_unlabelled_batches():
    """Lightning's default predict_step passed the batch dict to forward; an unlabelled batch failed reading labels."""
    data = SyntheticDataModule(train_size=32, val_size=16, seed=0)
    data.setup("fit")
    torch.manual_seed(0)
    model = BertClassifier(hidden=16, layers=1, heads=2)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    batches = [{k: v.clone() for k, v in b.items()} for b in data.val_dataloader()]  # ring slots are reused
    unlabelled = [{k: v for k, v in b.items() if k != "labels"} for b in batches]
    for loader in (data.val_dataloader(), DataLoader(unlabelled, batch_size=None)):
        predicted = trainer.predict(ClassificationTask(model, num_classes=4), dataloaders=loader)
        assert len(predicted) == len(batches)
        for logits, batch in zip(predicted, batches, strict=True):
            torch.testing.assert_close(logits, model.eval()(batch["input_ids"], batch["attention_mask"]))


def test_the_batch_hooks_see_every_entry_of_the_loaders_batch():
    """transfer_batch_to_device kept the model's inputs and labels only: sample_ids, segment_ids (which Throughput
    counts packed sequences by) and the rest never reached training_step or the callbacks."""
    seen = []

    class Record(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append(dict(batch))

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append(dict(batch))

    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": torch.randint(1, 16, (6,), generator=g), "attention_mask": torch.ones(6, dtype=torch.bool),
             "labels": torch.tensor(i % 3), "sample_ids": torch.tensor(10 + i), "segment_ids": torch.ones(6).long(),
             "source": f"doc{i}"} for i in range(4)]
    trainer = pl.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[Record()])
    model = BertClassifier(vocab_size=16, num_classes=3, hidden=16, layers=1, heads=2, max_len=8)
    trainer.fit(ClassificationTask(model, num_classes=3), DataLoader(rows, batch_size=4))
    assert len(seen) == 2
    for batch in seen:
        assert list(batch) == list(rows[0])
        assert batch["sample_ids"].tolist() == [10, 11, 12, 13] and batch["source"] == ["doc0", "doc1", "doc2", "doc3"]
