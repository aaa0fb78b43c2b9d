"""TokenDataModule under Lightning's DDP with 2 CPU processes (gloo): one shared ``data_dir``, written once."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch.utils.data import SequentialSampler

from hetrain.data.datamodule import SyntheticDataModule, TokenDataModule
from hetrain.data.images import SyntheticImageDataModule
from hetrain.data.splits import EpochShuffle
from hetrain.data.tokens import TokenFile, TokenFileWriter, write_token_file

# Each rank records what it read and which sample ids it trained on; every rank notes each corpus it wrote. Lightning
# starts rank 1 by running this script again, so the recording is set up in both processes.
SHARED_DATA_DIR = '''
import json, sys
import pytorch_lightning as pl
import torch
import torch.distributed as dist
from hetrain.data import datamodule
from hetrain.models.bert import BertClassifier
from hetrain.models.task import ClassificationTask

out = sys.argv[1]
write_synthetic_corpus = datamodule.write_synthetic_corpus


def noted_write(*args, **kwargs):
    """Notes the rank writing the corpus: only one may, and before any rank reads it."""
    with open(f"{out}/writers.txt", "a") as f:
        f.write(f"{dist.get_rank() if dist.is_initialized() else 'none'}\\n")
    write_synthetic_corpus(*args, **kwargs)


datamodule.write_synthetic_corpus = noted_write


class Seen(ClassificationTask):
    """Records the training batches' sample ids, and the corpus this rank's data module read."""

    def transfer_batch_to_device(self, batch, device, dataloader_idx):
        if self.trainer.training:  # the task keeps only the inputs and labels
            self.ids = getattr(self, "ids", []) + [batch["sample_ids"].tolist()]
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def on_train_end(self):
        windows = self.trainer.datamodule.windows
        record = {"ids": self.ids, "docs": {s: len(w.file) for s, w in windows.items()},
                  "windows": {s: len(w) for s, w in windows.items()}}
        with open(f"{out}/rank{self.trainer.global_rank}.json", "w") as f:
            json.dump(record, f)


if __name__ == "__main__":
    torch.set_num_threads(1)
    pl.seed_everything(0)
    data = datamodule.TokenDataModule(data_dir=f"{out}/tokens", train_size=400, val_size=8, min_doc_len=64,
                                      max_doc_len=1024, max_len=64, stride=64, max_tokens=512, producers=1, seed=2)
    model = BertClassifier(vocab_size=256, num_classes=4, hidden=16, layers=1, heads=2, max_len=64)
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=4, limit_val_batches=0,
                         logger=False, enable_progress_bar=False, enable_checkpointing=False,
                         enable_model_summary=False, default_root_dir=out)
    trainer.fit(Seen(model, num_classes=4), datamodule=data)
'''


def test_ddp_ranks_read_one_token_corpus_written_once_into_a_shared_data_dir(tmp_path):
    script = tmp_path / "two_ranks.py"
    script.write_text(SHARED_DATA_DIR)
    run = subprocess.run([sys.executable, str(script), str(tmp_path)], cwd=tmp_path, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    # Local rank 0 wrote the corpus in prepare_data; rank 1 only read it (both wrote it at once before, in setup).
    assert (tmp_path / "writers.txt").read_text().split() == ["0"]
    assert sorted(p.name for p in (tmp_path / "tokens").iterdir()) == [
        f"{split}{ext}" for split in ("train", "val") for ext in (".bin", ".idx", ".labels.npy")]  # no .tmp left
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["docs"] == ranks[1]["docs"] == {"train": 400, "val": 8}
    assert ranks[0]["windows"] == ranks[1]["windows"]
    assert len(ranks[0]["ids"]) == len(ranks[1]["ids"]) == 4
    shares = [{i for batch in rank["ids"] for i in batch} for rank in ranks]
    assert not shares[0] & shares[1], "a window went to both ranks"


def test_setup_after_prepare_data_reads_the_token_files_it_wrote(tmp_path):
    small = {"data_dir": str(tmp_path), "train_size": 12, "val_size": 4, "min_doc_len": 20, "max_doc_len": 200,
             "max_len": 32, "stride": 32, "max_tokens": 128, "seed": 1}
    prepared = TokenDataModule(**small)
    prepared.prepare_data()
    written = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    assert sorted(written) == [f"{s}{ext}" for s in ("train", "val") for ext in (".bin", ".idx", ".labels.npy")]
    prepared.setup("fit")
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == written  # read, not written again
    assert len(prepared.labels["train"]) == len(prepared.windows["train"])
    assert np.array_equal(np.load(tmp_path / "train.labels.npy"), prepared.labels["train"][
        np.r_[0, np.flatnonzero(np.diff(prepared.windows["train"].windows.doc)) + 1]])
    assert len(TokenFile(tmp_path / "train")) == 12
    prepared.teardown("fit")


def test_a_rank_whose_data_dir_was_never_prepared_says_how_to_fix_it(tmp_path):
    module = TokenDataModule(data_dir=str(tmp_path / "empty"), train_size=4, val_size=2)

    class TwoRanks:  # what a DDP rank's module sees: a Trainer of 2 processes, rank 1
        world_size, global_rank, lightning_module = 2, 1, None

    module.trainer = TwoRanks()
    with pytest.raises(FileNotFoundError, match=r"is missing train\.bin.*prepare_data\(\)"):
        module.setup("fit")


class Rank:
    """What a DDP rank's data module sees: a Trainer of 2 processes."""

    world_size = 2
    lightning_module = None

    def __init__(self, rank: int) -> None:
        self.global_rank = rank


def _samples(batches: list[dict[str, torch.Tensor]]) -> list[tuple[torch.Tensor, int]]:
    """Each batch row's input (without padding) and label."""
    rows = []
    for b in batches:
        if "images" in b:
            inputs = list(b["images"])
        else:
            inputs = [ids[mask] for ids, mask in zip(b["input_ids"], b["attention_mask"], strict=True)]
        rows += [(x, int(y)) for x, y in zip(inputs, b["labels"], strict=True)]
    return rows


@pytest.mark.parametrize("module", [
    lambda: SyntheticImageDataModule(num_classes=3, image_size=4, train_size=8, val_size=5, batch_size=2),
    lambda: SyntheticDataModule(loader="torch", train_size=8, val_size=5, batch_size=2, min_len=4, max_len=8),
], ids=["images", "text"])
def test_torch_validation_loaders_count_every_sample_once_over_the_ranks(module):
    """Lightning gave the validation loader its DistributedSampler, which pads the ranks' shares with repeats that
    val/loss and val/acc counted (5 samples on 2 ranks: val/acc 0.5 where it was 0.4). Every rank still runs as many
    batches, GracefulStop's collective after each validation batch needs them all; a repeat comes unlabelled."""
    data = module()
    data.setup("fit")
    one = data.val_dataloader()  # one process: every sample in order, as before
    assert isinstance(one.sampler, SequentialSampler)
    every = _samples(list(one))
    for rank in (0, 1):
        data.trainer = Rank(rank)
        assert isinstance(data.train_dataloader().sampler, EpochShuffle)  # Lightning shares it out, as before
        loader = data.val_dataloader()
        batches = list(loader)
        assert len(batches) == len(loader) == 2  # 3 positions of the 6, by 2, on either rank
        got = _samples(batches)
        expected = [(every[p % 5][0], every[p][1] if p < 5 else -100) for p in range(rank, 6, 2)]
        assert [label for _, label in got] == [label for _, label in expected]
        assert all(torch.equal(x, y) for (x, _), (y, _) in zip(got, expected, strict=True))


@pytest.mark.parametrize("module", [
    lambda tmp: TokenDataModule(data_dir=str(tmp), train_size=3, val_size=3, min_doc_len=128, max_doc_len=128,
                                max_len=128, stride=128, max_tokens=128),
    lambda tmp: SyntheticDataModule(train_size=3, val_size=5, min_len=8, max_len=8, max_tokens=8),
], ids=["tokens", "synthetic"])
def test_ring_validation_loaders_count_every_sample_once_over_the_ranks(tmp_path, module):
    """Batches of one sample each, one more than the ranks can share: the ring's sampler repeats one on the second
    rank, and val/loss and val/acc counted it twice. Now it comes unlabelled (-100); training keeps its labels."""
    data = module(tmp_path)
    data.prepare_data()
    data.setup("fit")
    truth = data.labels["val"] if isinstance(data, TokenDataModule) else data.val_set.labels.numpy()
    counted, steps = [], set()
    for rank in (0, 1):
        data.trainer = Rank(rank)
        batches = [{k: v.clone() for k, v in b.items()} for b in data.val_dataloader()]
        steps.add(len(batches))
        for b in batches:
            labelled = b["labels"] != -100
            assert b["labels"][labelled].tolist() == truth[b["sample_ids"][labelled].numpy()].tolist()
            counted += b["sample_ids"][labelled].tolist()
        assert all(bool((b["labels"] != -100).all()) for b in data.train_dataloader())  # training keeps repeats
    assert len(steps) == 1, "every rank runs as many validation batches"
    assert sorted(counted) == list(range(len(truth)))
    data.teardown("fit")


def test_two_writers_of_one_token_file_do_not_rename_each_others_temporary_files(tmp_path):
    # What two nodes writing one shared data_dir do: each writer's temporary files are its own.
    first, second = TokenFileWriter(tmp_path / "c"), TokenFileWriter(tmp_path / "c")
    first.add([1, 2, 3])
    second.add([1, 2, 3])
    first.close()
    second.close()
    assert TokenFile(tmp_path / "c")[0].tolist() == [1, 2, 3]
    with pytest.raises(ValueError, match="token id 70000"):  # a failed write leaves no temporary file either
        write_token_file(tmp_path / "d", [[1, 2], [70000]])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.bin", "c.idx"]
