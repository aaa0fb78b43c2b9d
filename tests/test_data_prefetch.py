"""DevicePrefetcher: a pass-through on the CPU; on CUDA, batches arrive on the device in order and intact."""

from __future__ import annotations

import weakref
from collections import namedtuple

import pytest
import torch

from hetrain.data.prefetch import DevicePrefetcher, _one_ahead, _to_device
from hetrain.data.ring import LoaderError, PadInto, RingLoader
from hetrain.data.sampler import TokenBudgetBatchSampler
from hetrain.data.synthetic import SyntheticSequences, pad_collate
from hetrain.host_copies import held_count, hold_until_copied, release_all
from tests.fixtures.slots import keep_all_slots_but_one


def batches(n: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [{"x": torch.randn(3, 5, generator=g), "pair": (torch.arange(i + 1), [torch.tensor(i)])} for i in range(n)]


def test_cpu_passes_batches_through_and_counts_consumed():
    src = batches(4)
    pre = DevicePrefetcher(src, "cpu", lookahead=1)
    assert not pre.active and len(pre) == 4
    out = []
    for batch in pre:
        out.append(batch)
        assert pre.consumed() == len(out) - 1
    assert all(a is b for a, b in zip(out, src, strict=True))
    assert pre.consumed() == 4


def test_cpu_pass_through_frees_each_ring_slot_its_consumer_drops():
    # The pass-through's loop variable kept the last batch until the next one came: a consumer keeping
    # num_slots - 1 batches and dropping each new one stalled ("still holds all 3 slots").
    ds = SyntheticSequences(size=10, vocab_size=32, num_classes=2, min_len=3, max_len=6, seed=0)
    with RingLoader(ds, [[i] for i in range(10)], collate=PadInto(6, 1), num_slots=3, num_workers=1,
                    stall_timeout=1) as loader:
        assert keep_all_slots_but_one(DevicePrefetcher(loader, "cpu"), keep=2) == 10


class FailsAt(torch.utils.data.Dataset):
    """Samples 0..n-1 labelled by index; sample ``bad`` raises."""

    def __init__(self, n: int, bad: int) -> None:
        self.n, self.bad = n, bad

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        if i == self.bad:
            raise OSError(f"bad sample {i}")
        return {"input_ids": torch.arange(2), "label": i}


def failing_loader() -> RingLoader:
    return RingLoader(FailsAt(8, bad=4), [[i] for i in range(8)], collate=PadInto(4, 1), num_workers=1)


def labels_until_the_error(batches) -> list[int]:
    got = []
    with pytest.raises(LoaderError, match="failed on batch 4 at sample 4: OSError: bad sample 4"):
        for batch in batches:
            got.append(int(batch["labels"]))
    return got


def test_a_loader_error_arrives_after_every_batch_before_it_passed_through():
    with failing_loader() as loader:
        pre = DevicePrefetcher(loader, "cpu")
        assert labels_until_the_error(pre) == [0, 1, 2, 3] and pre.consumed() == 4


def test_a_loader_error_arrives_after_every_batch_before_it_one_ahead():
    """The CUDA path's order: batch 3, started when fetching batch 4 failed, was never handed over."""
    log = []

    def start(batch):
        log.append(f"start {int(batch['labels'])}")
        return batch

    def finish(batch):
        log.append(f"finish {int(batch['labels'])}")
        return batch

    with failing_loader() as loader:
        assert labels_until_the_error(_one_ahead(loader, start, finish)) == [0, 1, 2, 3]
    assert log == ["start 0", "start 1", "finish 0", "start 2", "finish 1", "start 3", "finish 2", "finish 3"]


def items_then(error: BaseException):
    yield from range(3)
    raise error


def test_closing_one_ahead_at_the_batch_before_an_error_ends_it_there():
    """The consumer closes the iterator where it hands over the batch before the error: no more batches, no error."""
    finished = []
    ahead = _one_ahead(items_then(OSError("bad item 3")), lambda x: x, lambda x: finished.append(x) or x)
    assert [next(ahead) for _ in range(3)] == [0, 1, 2]  # 2 came after fetching item 3 failed
    ahead.close()
    assert finished == [0, 1, 2] and next(ahead, "done") == "done"


def test_ctrl_c_goes_through_one_ahead_at_once():
    """Held back behind the started item, a KeyboardInterrupt would be lost by a consumer that then closes."""
    ahead = _one_ahead(items_then(KeyboardInterrupt()), lambda x: x, lambda x: x)
    got = []
    with pytest.raises(KeyboardInterrupt):
        for x in ahead:
            got.append(x)
    assert got == [0, 1]

def test_a_namedtuple_batch_is_moved_field_by_field():
    # It was rebuilt as Batch(<generator>): "missing 1 required positional argument".
    Batch = namedtuple("Batch", "x pair")
    batch = Batch(torch.arange(3), [torch.ones(2), (torch.zeros(1),)])
    moved = _to_device(batch, torch.device("cpu"))
    assert type(moved) is Batch and torch.equal(moved.x, batch.x)
    assert isinstance(moved.pair, list) and isinstance(moved.pair[1], tuple)
    assert torch.equal(moved.pair[0], batch.pair[0])


@pytest.mark.cuda
def test_cuda_batches_arrive_on_the_device_intact_from_pinned_ring_slots():
    ds = SyntheticSequences(200, min_len=4, max_len=40, seed=1)
    lengths = [len(ds[i]["input_ids"]) for i in range(len(ds))]
    sampler = TokenBudgetBatchSampler(lengths, 256, seed=2)
    plan = list(sampler)
    with RingLoader(ds, sampler, collate=PadInto(256, sampler.max_batch_rows), num_slots=3) as loader:
        assert loader.pinned_bytes == loader.nbytes > 0
        pre = DevicePrefetcher(loader, "cuda")
        for epoch in range(3):
            sampler.set_epoch(epoch)
            plan = list(sampler)
            for batch, idx in zip(pre, plan, strict=True):
                want = pad_collate([ds[i] for i in idx])
                torch.cuda.current_stream().synchronize()
                for k, v in want.items():
                    assert batch[k].is_cuda and torch.equal(batch[k].cpu(), v), k
                # Fixed GPU work per step, so copies overlap compute.
                torch.cuda._sleep(100_000)
        assert loader.pinned_bytes == loader.nbytes  # never more pinned memory, whatever the epochs
    nested = DevicePrefetcher(batches(3), "cuda")
    for got, want in zip(nested, batches(3), strict=True):
        assert torch.equal(got["pair"][0].cpu(), want["pair"][0]) and got["pair"][1][0].is_cuda


@pytest.mark.cuda
def test_cuda_a_loader_error_arrives_after_every_batch_before_it():
    """Batch 3, copied ahead when fetching batch 4 failed, was dropped: the loop got batches 0-2, then the error."""
    with failing_loader() as loader:
        pre = DevicePrefetcher(loader, "cuda")
        assert labels_until_the_error(pre) == [0, 1, 2, 3] and pre.consumed() == 4

@pytest.mark.cuda
def test_a_host_source_is_held_until_its_copy_to_the_gpu_has_run():
    """A ring slot is a view torch's host allocator does not own: nothing else keeps it from its producer."""
    stream = torch.cuda.Stream()
    source = torch.randn(4096).pin_memory()
    alive = weakref.ref(source)
    with torch.cuda.stream(stream):
        torch.cuda._sleep(200_000_000)  # the copy waits behind a long kernel, as behind a step
        copied = source.to("cuda", non_blocking=True)
    hold_until_copied([source], stream)
    del source
    assert alive() is not None and held_count() >= 1  # the GPU has not read it yet
    stream.synchronize()
    hold_until_copied([], stream)  # any later call releases what has been copied
    assert alive() is None and held_count() == 0
    assert copied.is_cuda


@pytest.mark.cuda
def test_release_all_waits_for_the_last_copies_and_drops_their_sources():
    """Holds were released only by a later hold_until_copied: the last copies' sources stayed referenced."""
    stream = torch.cuda.Stream()
    source = torch.randn(4096).pin_memory()
    want, alive = source.clone(), weakref.ref(source)
    with torch.cuda.stream(stream):
        torch.cuda._sleep(200_000_000)  # the copy waits behind a long kernel, as behind a step
        copied = source.to("cuda", non_blocking=True)
    hold_until_copied([source], stream)
    del source
    release_all()
    assert alive() is None and held_count() == 0
    assert torch.equal(copied.cpu(), want)


@pytest.mark.cuda
def test_a_fit_ends_holding_no_host_batches(tmp_path):
    """The fit's last batch, its copy queued behind the step before, stayed held (with its ring slot and the loader's
    pinned slab) after the fit."""
    import pytorch_lightning as pl

    from hetrain.models.bert import BertClassifier
    from hetrain.models.task import ClassificationTask

    class QueueBehindEachStep(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            torch.cuda._sleep(200_000_000)  # the next batch's copy waits behind it, still to run when held

    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(1, 64, (3, 8), generator=g).pin_memory(),
                "attention_mask": torch.ones(3, 8, dtype=torch.bool).pin_memory(),
                "labels": torch.tensor([0, 1, 2]).pin_memory()} for _ in range(2)]
    task = ClassificationTask(BertClassifier(vocab_size=64, num_classes=3, hidden=16, layers=1, heads=2, max_len=16),
                              num_classes=3)
    trainer = pl.Trainer(accelerator="gpu", devices=1, max_steps=2, logger=False, default_root_dir=tmp_path,
                         enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
                         limit_val_batches=0, callbacks=[QueueBehindEachStep()])
    trainer.fit(task, torch.utils.data.DataLoader(batches, batch_size=None))
    assert held_count() == 0


@pytest.mark.cuda
def test_the_task_holds_ring_slots_its_label_copies_read():
    """bert_split's labels go from a ring slot straight to the GPU stage (no prefetcher across devices)."""
    from hetrain.models.bert import BertClassifier
    from hetrain.models.task import ClassificationTask

    model = BertClassifier(vocab_size=64, num_classes=3, hidden=16, layers=1, heads=2, max_len=16)
    model.classifier.to("cuda")
    task = ClassificationTask(model, num_classes=3)
    labels = torch.tensor([0, 1, 2]).pin_memory()
    alive = weakref.ref(labels)
    batch = {"input_ids": torch.ones(3, 8, dtype=torch.long), "attention_mask": torch.ones(3, 8, dtype=torch.bool),
             "labels": labels}
    torch.cuda._sleep(200_000_000)
    moved = task.transfer_batch_to_device(batch, torch.device("cuda:0"), 0)
    del batch, labels
    assert alive() is not None and moved["labels"].is_cuda and moved["input_ids"].device.type == "cpu"
    torch.cuda.synchronize()
    hold_until_copied([], torch.cuda.current_stream())
    assert alive() is None
