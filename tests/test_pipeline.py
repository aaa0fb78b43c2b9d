"""Pipeline split: micro-batched GPipe forward equals the unsplit model; checks at fit start; profiler ranges."""

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader

from hetrain.callbacks import PipelineSplit, StagePlacement
from hetrain.models.bert import BertClassifier
from hetrain.models.task import ClassificationTask
from hetrain.placement.pipeline import shared_across_devices


def small_bert(**kw) -> BertClassifier:
    torch.manual_seed(0)
    return BertClassifier(vocab_size=50, num_classes=3, hidden=32, layers=2, heads=4, max_len=16, dropout=0.0, **kw)


def batch(n: int = 7, t: int = 11):
    g = torch.Generator().manual_seed(n)
    ids = torch.randint(1, 50, (n, t), generator=g)
    mask = torch.ones(n, t, dtype=torch.bool)
    mask[::2, t // 2:] = False
    labels = torch.randint(0, 3, (n,), generator=g)
    return ids, mask, labels


def loss_and_grads(model: BertClassifier, *batches):
    model.zero_grad()
    losses = []
    for ids, mask, labels in batches:  # gradient accumulation over the given batches
        loss = nn.functional.cross_entropy(model(ids, mask), labels)
        loss.backward()
        losses.append(loss.detach())
    return torch.stack(losses), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("micro_batches", [2, 3, 5, 7, 9])
@pytest.mark.parametrize("fused", [True, False])
def test_micro_batched_forward_and_grads_equal_the_unsplit_model(micro_batches, fused):
    model = small_bert(fused=fused).double()
    batches = [batch(7), batch(5)]
    loss_ref, grads_ref = loss_and_grads(model, *[(i, m, y) for i, m, y in batches])
    model.micro_batches = micro_batches  # 7 and 5 rows: most counts do not divide them
    loss, grads = loss_and_grads(model, *batches)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-10, atol=1e-12)
    for name, g in grads.items():
        torch.testing.assert_close(g, grads_ref[name], rtol=1e-9, atol=1e-11, msg=lambda m, n=name: f"{n}: {m}")


def test_every_stage_and_micro_batch_runs_in_a_named_range():
    model = small_bert()
    model.micro_batches = 2
    ids, mask, _ = batch(4)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        model(ids, mask)
    names = {e.name for e in prof.events()}
    for stage in model.stages():
        for i in range(2):
            assert f"hetrain::stage {stage} micro-batch {i}" in names


def test_parameters_tied_across_devices_are_refused_with_both_paths():
    shared = nn.Linear(4, 4)
    head = nn.Sequential(nn.Linear(4, 4))
    head[0].weight = shared.weight  # tied, like an input embedding and an output projection
    stages = {"embed": nn.Sequential(shared), "head": head}
    assert shared_across_devices(list(stages.items()), {"embed": "cpu", "head": "cpu"}) == []
    assert shared_across_devices(list(stages.items()), {"embed": "cpu", "head": "meta"}) == [
        ("embed.0.weight", "head.0.weight")]
    with pytest.raises(ValueError, match="embed.0.weight and head.0.weight"):
        StagePlacement({"head": "cuda:99"}, fallback="meta").place(stages)  # cuda:99 absent -> meta
    assert head[0].weight.device.type == "cpu"  # refused before anything moved


def test_pipeline_split_in_a_lightning_fit(tmp_path):
    model = small_bert()
    task = ClassificationTask(model, num_classes=3)
    ids, mask, labels = batch(40)
    rows = [{"input_ids": i, "attention_mask": m, "labels": y} for i, m, y in zip(ids, mask, labels, strict=True)]
    trainer = pl.Trainer(max_steps=3, callbacks=[StagePlacement({"embeddings": "cpu"}), PipelineSplit(3)],
                         logger=False, enable_progress_bar=False, enable_checkpointing=False,
                         default_root_dir=tmp_path, enable_model_summary=False)
    trainer.fit(task, train_dataloaders=DataLoader(rows, batch_size=10))
    assert model.micro_batches == 3 and trainer.global_step == 3


def test_pipeline_split_refuses_a_model_without_stages(tmp_path):
    class Plain(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = nn.Linear(2, 1)

    with pytest.raises(TypeError, match="stages\\(\\), run_stage\\(\\)"):
        PipelineSplit(2).on_fit_start(None, Plain())
    with pytest.raises(ValueError, match="micro_batches must be >= 1"):
        PipelineSplit(0)
