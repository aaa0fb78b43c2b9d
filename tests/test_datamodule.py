"""Text DataModules: ring-loaded synthetic sequences, token-file windows of long documents, the longseq recipe."""

import importlib
import inspect
import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf
from pytorch_lightning.callbacks import ModelCheckpoint

from hetrain.data import build_tokens
from hetrain.data.datamodule import SyntheticDataModule, TokenDataModule, write_synthetic_corpus
from hetrain.data.images import SyntheticImageDataModule
from hetrain.data.synthetic import SyntheticSequences, pad_collate
from hetrain.data.tokens import TokenFile
from tests.fixtures.slots import keep_all_slots_but_one

ROOT = Path(__file__).resolve().parent.parent


def _epoch(loader) -> list[dict[str, torch.Tensor]]:
    # Copies, since a batch views a ring slot that is refilled once the batch is dropped.
    return [{k: v.clone() for k, v in batch.items()} for batch in loader]


def test_synthetic_ring_yields_every_sample_once_per_epoch_within_budget():
    dm = SyntheticDataModule(train_size=300, val_size=40, min_len=5, max_len=37, max_tokens=160, seed=3)
    dm.setup("fit")
    loader = dm.train_dataloader()
    orders = []
    for epoch in range(2):
        loader.set_epoch(epoch)
        batches = _epoch(loader)
        ids = [i for b in batches for i in b["sample_ids"].tolist()]
        assert sorted(ids) == list(range(300))
        orders.append(ids)
        for b in batches:
            assert b["input_ids"].numel() <= 160
            # The slot holds exactly the batch pad_collate builds from the same samples.
            expected = pad_collate([dm.train_set[i] for i in b["sample_ids"].tolist()])
            for key in ("input_ids", "attention_mask", "labels"):
                torch.testing.assert_close(b[key], expected[key])
    assert orders[0] != orders[1]  # shuffled per epoch from (seed, epoch)
    summary = dm.loader_summary()["train"]
    assert summary["loader"] == "ring" and summary["ring_bytes"] > 0
    assert summary["prefetch"] == "off (the stages are not all on one GPU)"
    assert summary["pinned_bytes"] == (summary["ring_bytes"] if torch.cuda.is_available() else 0)
    dm.teardown("fit")


def _samples(batch: dict[str, torch.Tensor]) -> list[tuple[tuple[int, ...], int]]:
    """Each row of a padded batch as (its unpadded tokens, its label)."""
    return [(tuple(ids[: int(mask.sum())].tolist()), int(label))
            for ids, mask, label in zip(batch["input_ids"], batch["attention_mask"], batch["labels"], strict=True)]


def test_synthetic_validation_is_in_order_and_torch_loader_matches():
    ring = SyntheticDataModule(train_size=64, val_size=50, min_len=5, max_len=20, max_tokens=64, seed=1)
    plain = SyntheticDataModule(train_size=64, val_size=50, min_len=5, max_len=20, loader="torch", batch_size=8,
                                seed=1)
    for dm in (ring, plain):
        dm.setup("fit")
    first, second = _epoch(ring.val_dataloader()), _epoch(ring.val_dataloader())
    assert [b["sample_ids"].tolist() for b in first] == [b["sample_ids"].tolist() for b in second]
    lengths = [int(b["attention_mask"][0].sum()) for b in first]
    assert lengths == sorted(lengths)  # unshuffled: short to long
    # The same samples, token for token, whichever loader batched and padded them.
    ring_samples, torch_samples = (Counter(sample for b in batches for sample in _samples(b))
                                   for batches in (first, _epoch(plain.val_dataloader())))
    assert len(ring_samples) > 40 and ring_samples == torch_samples
    assert plain.loader_summary()["val"] == {"loader": "torch", "batch_size": 8}
    with pytest.raises(ValueError, match="loader must be 'ring' or 'torch'"):
        SyntheticDataModule(loader="fast")
    ring.teardown("fit")


@pytest.mark.parametrize("name", ["images", "synthetic", "tokens"])
def test_a_data_config_holds_its_modules_defaults(name):
    # Else a recipe and the same module built in Python make different data (images.yaml had noise 1.0, the code 0.5).
    config = OmegaConf.to_container(OmegaConf.load(ROOT / "configs" / "data" / f"{name}.yaml"), resolve=False)
    module, _, cls = config.pop("_target_").rpartition(".")
    params = inspect.signature(getattr(importlib.import_module(module), cls)).parameters
    assert set(config) == set(params)
    differ = {key: (value, params[key].default) for key, value in config.items()
              if not str(value).startswith("${") and value != params[key].default}
    assert differ == {}, f"configs/data/{name}.yaml (value, default)"


def test_token_windows_cover_documents_and_carry_their_label(tmp_path):
    dm = TokenDataModule(data_dir=str(tmp_path), train_size=30, val_size=6, min_doc_len=20, max_doc_len=300,
                         max_len=64, stride=48, max_tokens=256, seed=5)
    dm.setup("fit")
    train = TokenFile(tmp_path / "train")
    doc_labels = np.load(tmp_path / "train.labels.npy")
    assert len(train) == 30 and train.doc_lengths.max() > 64  # long documents, several windows each
    seen = Counter()
    for b in _epoch(dm.train_dataloader()):
        assert b["input_ids"].numel() <= 256
        for row, sid, n, label in zip(b["input_ids"], b["sample_ids"], b["lengths"], b["labels"], strict=True):
            w = dm.windows["train"].windows
            doc, offset = int(w.doc[sid]), int(w.offset[sid])
            assert row[:n].tolist() == train[doc][offset : offset + int(n)].tolist()
            assert int(label) == doc_labels[doc]
            seen[int(sid)] += 1
    assert sorted(seen) == list(range(len(dm.windows["train"]))) and set(seen.values()) == {1}
    # The same seed writes the same corpus.
    write_synthetic_corpus(tmp_path / "again", {"train": 30, "val": 6}, 5, min_len=20, max_len=300)
    assert (tmp_path / "again" / "train.bin").read_bytes() == train.bin_path.read_bytes()
    dm.teardown("fit")


@pytest.mark.parametrize("make", [
    lambda tmp: SyntheticDataModule(train_size=40, val_size=8, min_len=4, max_len=12, max_tokens=24, num_slots=3),
    lambda tmp: TokenDataModule(data_dir=str(tmp), train_size=12, val_size=4, min_doc_len=20, max_doc_len=80,
                                max_len=16, stride=16, max_tokens=32, num_slots=3),
], ids=["synthetic", "tokens"])
def test_a_batch_the_consumer_drops_is_freed_at_once_while_it_keeps_all_slots_but_one(tmp_path, make):
    # The loaders' generators (the labelling one of token windows too) kept the batch they last yielded until
    # the next one came, so a consumer keeping num_slots - 1 batches and dropping each new one stalled.
    dm = make(tmp_path)
    dm.setup("fit")
    assert keep_all_slots_but_one(dm.train_dataloader(), keep=2) > 3
    dm.teardown("fit")


def test_token_module_reads_jsonl_and_its_own_token_dir(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    records = [{"text": ("ab" if i % 2 else "xyz") * (20 + i), "label": i % 2} for i in range(20)]
    corpus.write_text("".join(json.dumps(r) + "\n" for r in records))
    built = TokenDataModule(path=str(corpus), data_dir=str(tmp_path / "tok"), vocab_size=259, num_classes=2,
                            max_len=32, stride=32, max_tokens=128, val_fraction=0.2)
    built.setup("fit")
    assert len(TokenFile(tmp_path / "tok" / "train")) == 16 and len(TokenFile(tmp_path / "tok" / "val")) == 4
    # "ab" documents (label 1) tokenise to bytes + 3 = 100, 101; "xyz" ones (label 0) to 123..125.
    for b in _epoch(built.val_dataloader()):
        for row, n, label in zip(b["input_ids"], b["lengths"], b["labels"], strict=True):
            assert bool((row[:n] == 100).any()) == (int(label) == 1)
    reread = TokenDataModule(path=str(tmp_path / "tok"), vocab_size=259, num_classes=2, max_len=32, stride=32,
                             max_tokens=128)
    reread.setup("fit")
    assert np.array_equal(reread.labels["val"], built.labels["val"])
    # Labels the classes do not cover name the corpus the person gave and the setting to change, not a temporary
    # token file.
    with pytest.raises(ValueError, match=re.escape(f"the labels of {corpus} run from 0 to 1, outside "
                                                   "[0, data.num_classes=1); set data.num_classes=2")):
        TokenDataModule(path=str(corpus), vocab_size=259, num_classes=1, max_len=32, stride=32,
                        max_tokens=128).setup("fit")
    (tmp_path / "tok" / "val.labels.npy").unlink()
    with pytest.raises(FileNotFoundError, match="is missing val.labels.npy"):
        TokenDataModule(path=str(tmp_path / "tok"), vocab_size=259, num_classes=2).setup("fit")
    built.teardown("fit")


def test_a_directory_of_build_tokens_output_says_what_it_lacks_and_both_ways_to_write_it_work(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": "ab" * (9 + i), "label": i % 2}) + "\n" for i in range(10)))
    tok = tmp_path / "tok"
    build_tokens.main([str(corpus), "--out", str(tok / "corpus")])  # one unlabelled token file
    small = {"vocab_size": 259, "num_classes": 2, "max_len": 32, "stride": 32, "max_tokens": 128}
    with pytest.raises(FileNotFoundError) as err:
        TokenDataModule(path=str(tok), **small).setup("fit")
    message = str(err.value)
    assert f"data.path {tok} is missing train.bin, train.idx, train.labels.npy, val.bin, val.idx, val.labels.npy " \
           "(token files there: corpus.bin, corpus.idx)" in message
    # What the message says to do works. First: the jsonl written into that directory, then reused.
    assert f"data.path=<corpus.jsonl> data.vocab_size=259 data.data_dir={tok}, then data.path={tok}" in message
    TokenDataModule(path=str(corpus), data_dir=str(tok), val_fraction=0.2, **small).setup("fit")
    reused = TokenDataModule(path=str(tok), **small)
    reused.setup("fit")
    assert len(reused.labels["train"]) > 0 and len(reused.labels["val"]) > 0
    # Second: each split built by build_tokens, its labels saved next to it.
    assert f"--out {tok}/train, then --out {tok}/val" in message and "numpy.save(" in message
    own = tmp_path / "own"
    for split, picked in (("train", range(8)), ("val", range(8, 10))):
        lines = corpus.read_text().splitlines()
        (tmp_path / f"{split}.jsonl").write_text("".join(lines[i] + "\n" for i in picked))
        build_tokens.main([str(tmp_path / f"{split}.jsonl"), "--out", str(own / split)])
        np.save(own / f"{split}.labels.npy", np.array([i % 2 for i in picked]))
    built = TokenDataModule(path=str(own), **small)
    built.setup("fit")
    assert built.labels["val"].tolist() == [0] * 2 + [1] * 2  # documents 8 and 9, two windows each


@pytest.mark.parametrize("record", [{"text": "ab"}, {"text": "ab", "label": "two"}, {"text": "ab", "label": 1.5}])
def test_a_jsonl_line_without_an_integer_label_is_named(tmp_path, record):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(json.dumps({"text": "xyz", "label": 0}) + "\n\n" + json.dumps(record) + "\n")
    module = TokenDataModule(path=str(corpus), data_dir=str(tmp_path / "tok"), vocab_size=259, num_classes=2)
    with pytest.raises(ValueError, match=r"corpus.jsonl:3: field 'label' is .* not an integer label.*"
                                         r"data.label_field"):
        module.setup("fit")


def test_longseq_recipe_trains_end_to_end(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "recipe=longseq_ringbuffer", "trainer.max_steps=20",
         "trainer.val_check_interval=20", "data.train_size=128", "data.val_size=16", "threads=1",
         f"hydra.run.dir={run}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "ok" and summary["recipe"] == "longseq_ringbuffer" and summary["steps"] == 20
    assert 0 <= summary["metrics"]["val/acc"] <= 1
    assert "Instantiating data <hetrain.data.datamodule.TokenDataModule>" in (run / "train.log").read_text()


class BatchLog(pl.Callback):
    """Each training batch's content, by the step it trained: what a resumed run must repeat exactly."""

    def __init__(self) -> None:
        self.seen: dict[int, tuple[int, ...]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        rows = (batch["input_ids"] * torch.arange(1, batch["input_ids"].shape[1] + 1)).sum(1)
        self.seen[trainer.global_step] = tuple(rows.tolist())  # a fingerprint of every row, in order


def _fit(tmp_path, max_steps: int, ckpt_path=None, save_at: int | None = None,
         loader: str = "ring") -> tuple[BatchLog, pl.Trainer]:
    from hetrain.models.bert import BertClassifier
    from hetrain.models.task import ClassificationTask

    pl.seed_everything(0)
    data = SyntheticDataModule(vocab_size=64, num_classes=2, min_len=8, max_len=24, train_size=160, val_size=16,
                               loader=loader, max_tokens=192, producers=2, batch_size=16, seed=3)
    task = ClassificationTask(BertClassifier(vocab_size=64, num_classes=2, hidden=16, layers=1, heads=2,
                                             max_len=32), num_classes=2)
    log = BatchLog()
    # Saved by Lightning in the middle of the run, as a preempted job's last checkpoint would be.
    saver = [ModelCheckpoint(tmp_path, filename="{step}", every_n_train_steps=save_at, save_top_k=-1)] * bool(save_at)
    trainer = pl.Trainer(max_steps=max_steps, callbacks=[log, *saver], logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=bool(save_at), limit_val_batches=0,
                         default_root_dir=tmp_path)
    trainer.fit(task, datamodule=data, ckpt_path=ckpt_path)
    return log, trainer


@pytest.mark.parametrize("stop", [5, 22])  # inside the first epoch, and inside the second one
def test_a_resumed_lightning_run_sees_exactly_the_batches_of_an_uninterrupted_one(tmp_path, stop):
    full, trainer = _fit(tmp_path, max_steps=40, save_at=stop)
    batches_per_epoch = trainer.num_training_batches
    assert batches_per_epoch < 22 < 2 * batches_per_epoch < 40, batches_per_epoch  # mid-epoch stops; 3 epochs
    resumed, _ = _fit(tmp_path / "resumed", max_steps=40, ckpt_path=tmp_path / f"step={stop}.ckpt")
    assert sorted(resumed.seen) == list(range(stop, 40))
    assert resumed.seen == {step: rows for step, rows in full.seen.items() if step >= stop}


@pytest.mark.parametrize("stop", [10, 15])  # at the end of the first epoch, and inside the second one
def test_a_resumed_run_on_torchs_loader_shuffles_each_epoch_as_the_uninterrupted_one(tmp_path, stop):
    # The loader's generator was seeded once and not saved: a resumed run shuffled its epoch 1 as epoch 0.
    full, trainer = _fit(tmp_path, max_steps=30, save_at=stop, loader="torch")
    assert trainer.num_training_batches == 10  # 3 epochs of 10 steps
    resumed, _ = _fit(tmp_path / "resumed", max_steps=30, ckpt_path=tmp_path / f"step={stop}.ckpt", loader="torch")
    assert sorted(resumed.seen) == list(range(stop, 30))
    assert len(set(full.seen.values())) == 30  # no batch of one epoch repeats another epoch's
    # Resumed inside an epoch, torch's loader starts that epoch's order again; every later epoch is the same.
    assert resumed.seen[stop] == full.seen[10]
    assert {step: rows for step, rows in resumed.seen.items() if step >= 20} == \
        {step: rows for step, rows in full.seen.items() if step >= 20}
    if stop == 10:
        assert resumed.seen == {step: rows for step, rows in full.seen.items() if step >= 10}


@pytest.mark.parametrize("make", [
    lambda: SyntheticDataModule(train_size=40, val_size=8, min_len=5, max_len=20, loader="torch", batch_size=8, seed=2),
    lambda: SyntheticImageDataModule(train_size=40, val_size=8, image_size=4, batch_size=8, seed=2),
])
def test_torchs_training_order_is_a_function_of_seed_and_epoch_on_one_rank_or_several(make):
    from lightning_fabric.utilities.data import _set_sampler_epoch
    from pytorch_lightning.trainer.connectors.data_connector import _get_distributed_sampler

    def loader():
        dm = make()
        dm.setup("fit")
        return dm.train_dataloader()

    def orders(epochs: list[int]) -> list[list[int]]:
        """Each epoch's sample order from a freshly built loader, set to the epoch as Lightning's fit loop does."""
        train, order = loader(), []
        for epoch in epochs:
            _set_sampler_epoch(train, epoch)
            order.append([i for batch in train.batch_sampler for i in batch])
        return order

    whole = orders([0, 1, 2])
    assert orders([1]) == whole[1:2] and orders([2]) == whole[2:]  # a resumed process: epoch e as the whole run's
    assert all(sorted(order) == list(range(40)) for order in whole)
    assert whole[0] != whole[1] != whole[2] != whole[0]

    def shares(epochs: list[int], rank: int) -> list[list[int]]:
        """What Lightning's DDP gives ``rank`` of 2: this sampler wrapped, set_epoch forwarded to it."""
        sampler = _get_distributed_sampler(loader(), shuffle=True, overfit_batches=0, num_replicas=2, rank=rank)
        order = []
        for epoch in epochs:
            sampler.set_epoch(epoch)
            order.append(list(sampler))
        return order

    ranks = [shares([0, 1], rank) for rank in (0, 1)]
    assert all(sorted(ranks[0][e] + ranks[1][e]) == list(range(40)) for e in (0, 1))  # disjoint, all samples
    assert ranks[0][0] != ranks[0][1] and shares([1], 0) == ranks[0][1:]


def test_synthetic_documents_past_a_uint16_vocabulary_are_written_as_uint32():
    # The corpus was always written with itemsize=2: "token id 69838 outside [0, 65535]; write with itemsize=4".
    dm = TokenDataModule(vocab_size=70_000, train_size=8, val_size=2, min_doc_len=20, max_doc_len=60, max_len=32,
                         stride=32, max_tokens=64)
    dm.setup("fit")
    tokens = dm.windows["train"].file.tokens
    assert tokens.dtype.itemsize == 4 and tokens.max() >= 1 << 16
    dm.teardown("fit")


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"min_len": 2, "max_len": 5}, r"need 3 <= min_len <= max_len \(\[CLS\] and at least 2 markers"),
    ({"signal": 0.7}, r"need signal >= 0 and signal \* \(1 \+ distractors\) <= 1 .* got signal=0.7, distractors=0.5"),
    ({"signal": 1.0, "distractors": 0.0}, None),
    ({"signal": -0.1}, r"need signal >= 0 .* got signal=-0.1"),
])
def test_synthetic_settings_are_refused_naming_them_or_generate_what_they_say(kwargs, message):
    # min_len=2 and signal=0.7 failed in an index assignment ("shape mismatch"); signal=-0.1 was accepted.
    if message is not None:
        with pytest.raises(ValueError, match=message):
            SyntheticSequences(20, **kwargs)
        return
    data = SyntheticSequences(20, min_len=3, max_len=9, **kwargs)
    for seq, label in zip(data.sequences, data.labels.tolist(), strict=True):
        assert ((seq[1:] - 2) // 8 == label).all()  # signal 1: every token after [CLS] a marker of the class


def test_the_smallest_sequences_keep_the_label_the_majority_and_the_data_of_their_seed():
    # A body of 2 tokens holds the 2 class markers and no distractor; the later sequences are as before the check.
    data = SyntheticSequences(50, min_len=3, max_len=4, seed=1)
    for seq, label in zip(data.sequences, data.labels.tolist(), strict=True):
        classes = Counter(((seq[1:] - 2) // 8).tolist())
        assert classes.most_common(1)[0] == (label, 2) and sum(classes.values()) == len(seq) - 1
    assert data.sequences[-1].tolist() == [1, 3, 28, 3]


def test_token_documents_name_the_synthetic_settings_too():
    with pytest.raises(ValueError, match="need 3 <= min_len <= max_len .*data.min_doc_len"):
        TokenDataModule(min_doc_len=2, max_len=32, stride=32, max_tokens=64).setup("fit")


@pytest.mark.parametrize("make", [
    lambda: SyntheticDataModule(train_size=20, val_size=8, min_len=5, max_len=20, loader="torch", batch_size=32),
    lambda: SyntheticImageDataModule(train_size=20, val_size=8, image_size=4, batch_size=32),
])
def test_a_train_split_smaller_than_one_batch_is_refused_not_trained_as_nothing(make):
    # The last short batch is dropped: 20 samples in batches of 32 were no batch at all, and the run said "ok".
    dm = make()
    dm.setup("fit")
    with pytest.raises(ValueError, match=r"data.train_size=20 is smaller than data.batch_size=32: .* set "
                                         r"data.batch_size<=20 or data.train_size>=32"):
        dm.train_dataloader()
    dm.hparams.batch_size = 20  # exactly one batch
    assert len(dm.train_dataloader()) == 1


def test_a_token_setup_failing_on_the_val_split_can_be_run_again(tmp_path):
    # The train split was kept: the next setup returned at once, and val_dataloader failed with KeyError: 'val'.
    write_synthetic_corpus(tmp_path, {"train": 8, "val": 3}, seed=0, min_len=20, max_len=60)
    good = np.load(tmp_path / "val.labels.npy")
    np.save(tmp_path / "val.labels.npy", good[:2])
    dm = TokenDataModule(path=str(tmp_path), max_len=32, stride=32, max_tokens=64)
    with pytest.raises(ValueError, match="val.labels.npy holds 2 labels for 3 documents"):
        dm.setup("fit")
    np.save(tmp_path / "val.labels.npy", good)
    dm.setup("fit")
    assert sorted(dm.windows) == ["train", "val"] and len(dm.val_dataloader()) > 0
    dm.teardown("fit")


@pytest.mark.parametrize("make", [
    lambda: SyntheticDataModule(max_len=64, max_tokens=32),
    lambda: TokenDataModule(max_len=64, stride=32, max_tokens=32),
])
def test_a_token_budget_below_the_longest_sample_names_both_settings(make):
    # The sampler said to cut long documents into windows first, which these samples already are.
    with pytest.raises(ValueError, match=r"data.max_tokens=32 is smaller than data.max_len=64: a batch must hold at "
                                         r"least one whole sequence"):
        make()
    SyntheticDataModule(max_len=64, max_tokens=32, loader="torch")  # batches by batch_size, not by tokens
