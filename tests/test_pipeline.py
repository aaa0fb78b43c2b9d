"""Pipeline split: micro-batched GPipe forward equals the unsplit model; checks at fit start; profiler ranges."""

import copy
import re
from collections import OrderedDict, UserDict
from collections.abc import Mapping
from typing import NamedTuple

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence
from torch.utils._pytree import tree_leaves
from torch.utils.data import DataLoader

from hetrain import plugins
from hetrain.callbacks import PipelineSplit, StagePlacement
from hetrain.models.bert import BertClassifier
from hetrain.models.task import ClassificationTask
from hetrain.ops import dropout
from hetrain.placement import PlacementPlan
from hetrain.placement.pipeline import gpipe_forward, run_in_order, shared_across_devices, to_device
from hetrain.placement.plan import hook_inputs, remove_input_hooks
from hetrain.regional_compile import compile_counts, compile_stages


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


def test_sparse_embedding_gradients_through_the_split_equal_the_unsplit_models():
    # The token table's gradient holds one row per looked-up token; the micro-batches' parts add up to
    # the whole batch's (compared densified), as for every other parameter.
    model = small_bert(sparse_embeddings=True).double()
    batches = [batch(7), batch(5)]
    loss_ref, grads_ref = loss_and_grads(model, *batches)
    assert grads_ref["embeddings.tokens.weight"].is_sparse
    model.micro_batches = 3
    loss, grads = loss_and_grads(model, *batches)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-10, atol=1e-12)
    for name, g in grads.items():
        torch.testing.assert_close(g.to_dense(), grads_ref[name].to_dense(), rtol=1e-9, atol=1e-11,
                                   msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("micro_batches", [1, 2])
def test_every_stage_and_micro_batch_runs_in_a_named_range(micro_batches):
    model = small_bert()
    model.micro_batches = micro_batches
    ids, mask, _ = batch(4)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        model(ids, mask)
    names = {e.name for e in prof.events()}
    for stage in model.stages():
        if micro_batches == 1:  # the unsplit model runs its stages in order, each named as well
            assert f"hetrain::stage {stage}" in names
        for i in range(micro_batches if micro_batches > 1 else 0):
            assert f"hetrain::stage {stage} micro-batch {i}" in names


def tied_stages(device: str = "cpu") -> dict[str, nn.Module]:
    """Two stages sharing a weight, like an input embedding and an output projection."""
    with torch.device(device):
        shared = nn.Linear(4, 4)
        head = nn.Sequential(nn.Linear(4, 4))
    head[0].weight = shared.weight
    return {"embed": nn.Sequential(shared), "head": head}


def test_parameters_tied_across_devices_are_refused_with_both_paths():
    stages = tied_stages()
    assert shared_across_devices(list(stages.items()), {"embed": "cpu", "head": "cpu"}) == []
    assert shared_across_devices(list(stages.items()), {"embed": "cpu", "head": "meta"}) == [
        ("embed.0.weight", "head.0.weight")]
    both = r"embed\.0\.weight \(module embed\.0\) and head\.0\.weight \(module head\.0\)"
    stages = tied_stages("meta")  # built without data, to be filled later; a plan may not name meta, but cpu
    with pytest.raises(ValueError, match=both):
        StagePlacement({"head": "cpu"}).place(stages)  # embed, which the plan leaves alone, stays on meta
    assert stages["head"][0].weight.device.type == "meta"  # refused before anything moved


def test_a_parameter_tied_within_one_device_collects_both_stages_gradients():
    torch.manual_seed(0)
    embed, head = nn.Linear(6, 6, bias=False), nn.Linear(6, 6, bias=False)
    head.weight = embed.weight  # tied, both stages on the CPU: kept as one parameter
    stages = [("embed", embed), ("head", nn.Sequential(nn.Tanh(), head))]
    x = torch.randn(7, 6, dtype=torch.float64)
    embed.double()

    def run_stage(name, h, *inputs):
        return dict(stages)[name](h)

    gpipe_forward(stages, run_stage, (x,), micro_batches=3).square().sum().backward()
    split = embed.weight.grad.clone()
    w = embed.weight.detach().clone().requires_grad_()
    (torch.tanh(x @ w.T) @ w.T).square().sum().backward()  # the same function with both uses written out
    torch.testing.assert_close(split, w.grad, rtol=1e-12, atol=1e-12)
    w_embed_only = embed.weight.detach().clone().requires_grad_()
    (torch.tanh(x @ w_embed_only.T) @ embed.weight.detach().T).square().sum().backward()
    assert not torch.allclose(split, w_embed_only.grad)  # the head's use did add to the gradient


def test_pipeline_split_in_a_lightning_fit(tmp_path):
    model = small_bert()
    task = ClassificationTask(model, num_classes=3)
    ids, mask, labels = batch(40)
    rows = [{"input_ids": i, "attention_mask": m, "labels": y} for i, m, y in zip(ids, mask, labels, strict=True)]
    split = PipelineSplit(3, checkpoint=["encoder"], split_on_one_device=True)
    seen = []

    class Watch(pl.Callback):
        def on_train_batch_start(self, *args):
            seen.append((model.micro_batches, model.checkpoint_stages))

    trainer = pl.Trainer(max_steps=3, callbacks=[StagePlacement({"embeddings": "cpu"}), split, Watch()],
                         logger=False, enable_progress_bar=False, enable_checkpointing=False,
                         default_root_dir=tmp_path, enable_model_summary=False)
    trainer.fit(task, train_dataloaders=DataLoader(rows, batch_size=10))
    assert trainer.global_step == 3 and seen == [(3, frozenset({"encoder.0", "encoder.1"}))] * 3
    # Afterwards the model runs as before: a later fit without the callback ran split and recomputed stages.
    assert model.micro_batches == 1 and model.checkpoint_stages == frozenset()

    class Failing(ClassificationTask):
        def training_step(self, batch, batch_idx):
            raise RuntimeError("boom")

    trainer = pl.Trainer(max_steps=1, callbacks=[split], logger=False, enable_progress_bar=False,
                         enable_checkpointing=False, default_root_dir=tmp_path, enable_model_summary=False)
    with pytest.raises(RuntimeError, match="boom"):
        trainer.fit(Failing(model, num_classes=3), train_dataloaders=DataLoader(rows, batch_size=10))
    assert model.micro_batches == 1 and model.checkpoint_stages == frozenset()


def test_stages_all_on_one_device_run_each_batch_whole_unless_asked(caplog):
    stages = {"a": nn.Linear(4, 4), "b": nn.Linear(4, 4)}
    assert PipelineSplit(4).active_micro_batches(list(stages.values())) == 1
    assert PipelineSplit(4, split_on_one_device=True).active_micro_batches(list(stages.values())) == 4
    stages["b"] = nn.Linear(4, 4, device="meta")  # a second device: now the stages can overlap
    assert PipelineSplit(4).active_micro_batches(list(stages.values())) == 4

    task = ClassificationTask(small_bert(), num_classes=3)
    with caplog.at_level("INFO", logger="hetrain.callbacks.pipeline"):
        PipelineSplit(4).on_fit_start(None, task)
    assert task.model.micro_batches == 1
    assert "every stage is on cpu, where micro-batches cannot overlap: each batch runs whole instead of in 4" \
        in caplog.text


def test_pipeline_split_refuses_a_model_without_stages(tmp_path):
    class Plain(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = nn.Linear(2, 1)

    with pytest.raises(TypeError, match="stages\\(\\), run_stage\\(\\)"):
        PipelineSplit(2).on_fit_start(None, Plain())
    with pytest.raises(ValueError, match="micro_batches must be >= 1"):
        PipelineSplit(0)


def saved_bytes(fn) -> int:
    """Bytes autograd keeps for backward while ``fn`` runs."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


@pytest.mark.parametrize("micro_batches", [1, 3])
def test_checkpointed_stages_equal_the_plain_model_with_dropout_and_keep_less(micro_batches):
    torch.manual_seed(0)
    model = BertClassifier(vocab_size=50, num_classes=3, hidden=32, layers=2, heads=4, max_len=16,
                           dropout=0.2).double().train()
    ids, mask, labels = batch(7)
    model.micro_batches = micro_batches

    def step():
        torch.manual_seed(1)  # the same dropout masks in both runs
        return loss_and_grads(model, (ids, mask, labels))

    loss_ref, grads_ref = step()
    plain = saved_bytes(lambda: nn.functional.cross_entropy(model(ids, mask), labels))
    model.checkpoint_stages = PipelineSplit(checkpoint=["encoder"]).checkpointed(list(model.stages()))
    assert model.checkpoint_stages == {"encoder.0", "encoder.1"}
    loss, grads = step()
    kept = saved_bytes(lambda: nn.functional.cross_entropy(model(ids, mask), labels))
    assert loss.item() != pytest.approx(step_without_dropout(ids, mask, labels))  # dropout did act
    torch.testing.assert_close(loss, loss_ref, rtol=1e-12, atol=1e-12)
    for name, g in grads.items():
        torch.testing.assert_close(g, grads_ref[name], rtol=1e-10, atol=1e-12, msg=lambda m, n=name: f"{n}: {m}")
    assert kept < 0.6 * plain, (kept, plain)


@pytest.mark.parametrize("micro_batches", [2, 3, 5])  # 7 and 5 rows: most counts do not divide them
@pytest.mark.parametrize("checkpoint", [False, True])
def test_split_with_dropout_equals_the_unsplit_model(micro_batches, checkpoint):
    # hetrain's dropout on embeddings, residual branches and pooler; SDPA's own dropout (torch's generator,
    # drawn per micro-batch) off.
    torch.manual_seed(0)
    model = BertClassifier(vocab_size=50, num_classes=3, hidden=32, layers=2, heads=4, max_len=16, dropout=0.3,
                           attention_dropout=0.0).double().train()
    batches = [batch(7), batch(5)]

    def step(seed: int = 1):
        torch.manual_seed(seed)
        return loss_and_grads(model, *batches)  # two batches accumulated, as under accumulate_grad_batches

    loss_ref, grads_ref = step()
    assert not torch.equal(step(seed=2)[0], loss_ref)  # dropout acts: another seed, another loss
    model.micro_batches = micro_batches
    model.checkpoint_stages = frozenset({"encoder.0", "classifier"} if checkpoint else ())
    loss, grads = step()
    torch.testing.assert_close(loss, loss_ref, rtol=1e-10, atol=1e-12)
    for name, g in grads.items():
        torch.testing.assert_close(g, grads_ref[name], rtol=1e-9, atol=1e-11, msg=lambda m, n=name: f"{n}: {m}")
    torch.manual_seed(1)
    after = model(*batches[0][:2])  # the split's draws leave torch's generator where the unsplit model's do
    model.micro_batches, model.checkpoint_stages = 1, frozenset()
    torch.manual_seed(1)
    torch.testing.assert_close(after, model(*batches[0][:2]), rtol=1e-10, atol=1e-12)


def test_the_split_on_gpu_kernels_draws_the_unsplit_cpu_models_dropout_masks():
    # Moving a stage between CPU and GPU changes the backend of its dropout ops (C++ -> Triton), not their
    # masks: the split runs them as the GPU kernels (Triton's interpreter) and equals the model on C++.
    torch.manual_seed(0)
    model = BertClassifier(vocab_size=50, num_classes=3, hidden=32, layers=1, heads=4, max_len=16, dropout=0.3,
                           attention_dropout=0.0).double().train()
    ids, mask, labels = batch(5, 7)
    torch.manual_seed(1)
    with plugins.use_backend(dropout="cpu", dropout_add_layer_norm="cpu"):
        loss_ref, grads_ref = loss_and_grads(model, (ids, mask, labels))
    model.micro_batches = 2
    torch.manual_seed(1)
    with plugins.use_backend(dropout="triton", dropout_add_layer_norm="triton"):
        loss, grads = loss_and_grads(model, (ids, mask, labels))
    torch.testing.assert_close(loss, loss_ref, rtol=1e-10, atol=1e-12)
    for name, g in grads.items():
        torch.testing.assert_close(g, grads_ref[name], rtol=1e-9, atol=1e-11, msg=lambda m, n=name: f"{n}: {m}")


def test_a_stage_that_calls_dropout_more_often_on_a_later_micro_batch_is_refused():
    from hetrain.ops import dropout, rng

    seeds: list[torch.Tensor] = []
    x = torch.randn(4, 3)
    with rng.micro_batch(seeds, first_row=0, record=True):
        dropout(x, 0.5)
    with rng.micro_batch(seeds, first_row=4, record=False), pytest.raises(RuntimeError, match="more dropout calls"):
        dropout(x, 0.5)
        dropout(x, 0.5)


class DropoutLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(self.linear(x), 0.5)


class DropoutChain(nn.Module):
    """Two stages of one class (sharing dynamo's cache, as BERT's blocks do), each with hetrain's dropout."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = DropoutLinear(), DropoutLinear()
        self.micro_batches = 1

    def stages(self) -> dict[str, nn.Module]:
        return {"a": self.a, "b": self.b}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        stages = list(self.stages().items())
        if self.micro_batches > 1:
            return gpipe_forward(stages, lambda name, x, _: self.get_submodule(name)(x), (x,), self.micro_batches)
        return run_in_order(stages, lambda name, x, _: self.get_submodule(name)(x), (x,))


def test_compiled_stages_serve_every_micro_batch_of_batches_of_any_row_count_under_fullgraph():
    # Each micro-batch's first row reaches the dropout op as a tensor, not an int baked into the graph, and the skip
    # guard's hook stays out of the trace: once the stages have met a first and a later micro-batch of dynamic
    # shape, batches of new row counts compile nothing, and draw the unsplit model's masks.
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = DropoutChain().double()
    unsplit = copy.deepcopy(model)
    compile_stages(model.stages(), backend="eager", fullgraph=True)
    model.micro_batches = 4

    def run(rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(rows, 4, dtype=torch.float64, requires_grad=True)  # so both stages share their graphs
        torch.manual_seed(rows)
        out = model(x)
        torch.manual_seed(rows)
        return out, unsplit(x)

    for rows in (8, 10):  # static shapes, then dynamic ones (micro-batches of 3, 3, 2, 2 rows)
        run(rows)
    before = compile_counts()
    for rows in (11, 13, 14, 17, 23):
        out, ref = run(rows)
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    assert compile_counts(since=before) == {"graphs": 0, "graph_breaks": 0, "eager_frames": 0}


def step_without_dropout(ids, mask, labels) -> float:
    torch.manual_seed(0)
    model = BertClassifier(vocab_size=50, num_classes=3, hidden=32, layers=2, heads=4, max_len=16,
                           dropout=0.2).double().eval()
    return nn.functional.cross_entropy(model(ids, mask), labels).item()


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"plan": {"encoder": "gpu"}}, "placement of 'encoder' names device 'gpu', unknown to torch; write cpu, cuda"),
    ({"plan": {"encoder": 0}}, "placement of 'encoder' names device 0"),
    ({"fallback": "cdua"}, "placement fallback names device 'cdua'"),
    ({"plan": "auto", "objective": "fast"}, "objective 'fast' is not one of"),
    ({"plan": "auto", "micro_batches": 0}, "micro_batches must be an integer >= 1, got 0"),
    ({"plan": "auto", "micro_batches": True}, "micro_batches must be an integer >= 1, got True"),  # was taken as 1
])
def test_stage_placement_refuses_bad_settings_when_made_not_at_fit_start(kwargs, message):
    """Before, a typo'd device reached torch.device at fit start, and 'auto' timed every stage before failing."""
    with pytest.raises(ValueError, match=re.escape(message)):
        StagePlacement(**kwargs)


def test_stage_placement_names_an_absent_fallback_before_moving_anything():
    """Before, the stages of an absent device were sent to an absent fallback: torch's bare AssertionError."""
    with torch.device("meta"):  # moving embed to cpu first would change its device (or fail: meta has no data)
        stages = {"embed": nn.Linear(4, 4), "head": nn.Linear(4, 2)}
    with pytest.raises(ValueError, match=r"cuda:99 not present; head -> cuda:98, but the fallback cuda:98 is not here "
                                         r"either"):
        StagePlacement({"embed": "cpu", "head": "cuda:99"}, fallback="cuda:98").place(stages)
    assert stages["embed"].weight.device.type == "meta"


def test_checkpoint_names_must_be_stages():
    with pytest.raises(ValueError, match="'decoder' names no stage"):
        PipelineSplit(checkpoint=["decoder"]).checkpointed(["embeddings", "encoder.0"])
    assert PipelineSplit(checkpoint=True).checkpointed(["a", "b"]) == {"a", "b"}
    assert PipelineSplit(checkpoint="encoder").checkpointed(["embeddings", "encoder.0", "encoder.1"]) == {
        "encoder.0", "encoder.1"}  # one path alone, not its letters


class SkipNet(nn.Module):
    """Three stages with a skip from the first to the last: carried in a tuple, or (carry=False) kept aside."""

    def __init__(self, carry: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.c = nn.Linear(6, 6), nn.Linear(6, 6), nn.Bilinear(6, 6, 2)
        self.carry, self.kept = carry, None

    def stages(self) -> dict[str, nn.Module]:
        return {"a": self.a, "b": self.b, "c": self.c}

    def run_stage(self, name, x, _inputs):
        if name == "a":
            h = torch.tanh(self.a(x))
            self.kept = h
            return (h, h) if self.carry else h
        if name == "b":
            h, skip = x if self.carry else (x, None)
            out = torch.relu(self.b(h))
            return (out, skip) if self.carry else out
        h, skip = x if self.carry else (x, self.kept)
        return self.c(h, skip)

    def forward(self, x, micro_batches=1):
        if micro_batches == 1:
            h = torch.tanh(self.a(x))
            return self.c(torch.relu(self.b(h)), h)
        return gpipe_forward(list(self.stages().items()), self.run_stage, (x,), micro_batches)


def test_a_skip_connection_carried_through_the_stages_equals_the_unsplit_model():
    net = SkipNet(carry=True).double()
    x = torch.randn(9, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    y_ref = net(x)
    grads_ref = torch.autograd.grad(y_ref.square().sum(), list(net.parameters()))
    y = net(x, micro_batches=4)
    grads = torch.autograd.grad(y.square().sum(), list(net.parameters()))
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    for g, g_ref in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(g, g_ref, rtol=1e-12, atol=1e-12)


def test_a_skip_connection_kept_aside_is_refused_naming_both_stages():
    net = SkipNet(carry=False)
    x = torch.randn(9, 6, generator=torch.Generator().manual_seed(3))
    with pytest.raises(ValueError, match="stage 'c' \\(micro-batch 0\\) got a tensor made by stage 'a'"):
        net(x, micro_batches=3)
    assert not net.a._forward_pre_hooks  # the guard's hooks are gone after the error


def test_a_skip_connection_kept_aside_is_refused_when_its_stage_is_on_another_device():
    """Before, the placement hook ran before the guard and copied the kept tensor to the stage's device, so the guard
    did not know the copy and the stage silently took another micro-batch's rows ('meta' stands in for a GPU)."""
    net = SkipNet(carry=False)
    net.c.to("meta")
    for stage in net.stages().values():
        hook_inputs(stage)  # as StagePlacement and PlacementPlan.apply do
    x = torch.randn(9, 6, generator=torch.Generator().manual_seed(3))
    refused = re.escape("stage 'c' (micro-batch 0) got a tensor made by stage 'a' (micro-batch 1)")
    with pytest.raises(ValueError, match=refused):
        net(x, micro_batches=3)
    assert [len(s._forward_pre_hooks) for s in net.stages().values()] == [1, 1, 1]  # the placement hooks stay


class InputToHead(nn.Module):
    """The head takes the micro-batch's own input from run_stage besides its previous stage's output; or (stash=True)
    an input kept aside by the model from the first stage's call, maybe another micro-batch's."""

    def __init__(self, stash: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.c = nn.Linear(4, 4), nn.Linear(4, 4), nn.Bilinear(4, 4, 2)
        self.stash, self.kept = stash, None

    def stages(self) -> dict[str, nn.Module]:
        return {"a": self.a, "b": self.b, "c": self.c}

    def run_stage(self, name, x, inp):
        if name == "a":
            self.kept = inp
        if name == "c":
            return self.c(x, self.kept if self.stash else inp)
        return self.get_submodule(name)(x)


@pytest.mark.parametrize("micro_batches", [1, 3])
def test_every_stage_may_take_the_micro_batchs_own_inputs(micro_batches):
    """Before, the first stage's input counted as made by it, so a later stage taking it was refused as a skip."""
    net = InputToHead().double()
    stages = list(net.stages().items())
    x = torch.randn(6, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = gpipe_forward(stages, net.run_stage, (x,), micro_batches)
    torch.testing.assert_close(y, run_in_order(stages, net.run_stage, (x,)), rtol=1e-12, atol=1e-12)
    stashing = InputToHead(stash=True)
    with pytest.raises(ValueError, match="stage 'c' \\(micro-batch 0\\) got an input of micro-batch 1"):
        gpipe_forward(list(stashing.stages().items()), stashing.run_stage, (x.float(),), 3)


def test_inputs_without_a_row_per_sample_reach_every_micro_batch_whole():
    """Before, every input was cut along its first dimension: a one-row scale went to micro-batch 0 alone (the others
    got it empty, and broadcast it away: rows lost), and a 0-d one could not be cut at all."""
    torch.manual_seed(0)
    a, b = nn.Linear(4, 4), nn.Linear(4, 2)
    stages = [("a", a), ("b", b)]

    def run_stage(name, x, _x, scale, shift, offset):
        return a(x) * scale + shift + offset if name == "a" else b(x) * scale
    x = torch.randn(8, 4)
    inputs = (x, torch.tensor([0.5]), torch.tensor(2.0), 3.0)  # one row, 0-d, not a tensor
    torch.testing.assert_close(gpipe_forward(stages, run_stage, inputs, 4), run_in_order(stages, run_stage, inputs))
    # a per-row input is still cut with the batch
    per_row = torch.randn(8, 1)
    torch.testing.assert_close(gpipe_forward(stages, run_stage, (x, per_row, per_row, 0.0), 4),
                               run_in_order(stages, run_stage, (x, per_row, per_row, 0.0)))


def test_per_row_tensors_inside_a_container_input_are_cut_with_the_batch():
    """A per-row tensor inside a dict input reached every micro-batch whole (a shape error inside the stage, or a
    silent broadcast), where placement timed the stages on it cut."""
    torch.manual_seed(0)
    a, b = nn.Linear(4, 4), nn.Linear(4, 2)
    stages = [("a", a), ("b", b)]

    def run_stage(name, x, _x, extra):
        return a(x) * extra["w"] + extra["bias"] if name == "a" else b(x) * extra["w"]
    x = torch.randn(8, 4)
    inputs = (x, {"w": torch.randn(8, 1), "bias": torch.randn(1, 4), "tag": "row weights"})
    torch.testing.assert_close(gpipe_forward(stages, run_stage, inputs, 4), run_in_order(stages, run_stage, inputs))


class Carry(NamedTuple):
    hidden: torch.Tensor
    skip: torch.Tensor


@pytest.mark.parametrize(("wrap", "unwrap"), [
    (Carry, lambda c: c.hidden + c.skip),
    (lambda h, x: [h, x], lambda c: c[0] + c[1]),
    (lambda h, x: {"hidden": h, "skip": x, "scale": None}, lambda c: c["hidden"] + c["skip"]),
], ids=["NamedTuple", "list", "dict"])
def test_a_skip_connection_carried_in_a_namedtuple_list_or_dict_equals_the_unsplit_model(wrap, unwrap):
    """Before, the split turned a NamedTuple into a plain tuple (no fields for the next stage) and failed on a list or
    dict, which the placement hook moves in the unsplit model."""
    torch.manual_seed(0)
    first, head = nn.Linear(4, 4), nn.Linear(4, 2)
    run = {"first": lambda x: wrap(first(x), x), "head": lambda c: head(unwrap(c))}
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(2))
    y = gpipe_forward([("first", first), ("head", head)], lambda name, x, *_: run[name](x), (x,), 2)
    torch.testing.assert_close(y, run["head"](run["first"](x)))
    moved = to_device(wrap(x, x), torch.device("meta"))  # as to a GPU stage: the container kept, each tensor moved
    assert type(moved) is type(wrap(x, x))
    assert {t.device.type for t in tree_leaves(moved) if t is not None} == {"meta"}


class PlainTuple(tuple):
    """A tuple subclass torch's pytree does not know (no NamedTuple fields)."""


class PlainDict(dict):
    pass


class PlainOrderedDict(OrderedDict):
    pass


class FieldsTuple(tuple):
    """A tuple subclass whose constructor takes its fields one by one, not an iterable of them."""

    def __new__(cls, first: object, second: object) -> "FieldsTuple":
        return super().__new__(cls, (first, second))


def _devices(x: object) -> object:
    """``x`` with each tensor replaced by its device type and each container by its type's name and its items."""
    if isinstance(x, torch.Tensor):
        return x.device.type
    if isinstance(x, Mapping):
        return type(x).__name__, {key: _devices(value) for key, value in x.items()}
    if isinstance(x, tuple | list):
        return type(x).__name__, [_devices(item) for item in x]
    return x


@pytest.mark.parametrize(("wrap", "expected"), [
    (lambda t: PlainTuple((t, None)), ("PlainTuple", ["meta", None])),
    (lambda t: [PlainTuple((t, 3))], ("list", [("PlainTuple", ["meta", 3])])),
    (lambda t: PlainDict(a=t, b="x"), ("PlainDict", {"a": "meta", "b": "x"})),
    (lambda t: {"a": PlainOrderedDict(a=t)}, ("dict", {"a": ("PlainOrderedDict", {"a": "meta"})})),
    (lambda t: UserDict(a=t), ("UserDict", {"a": "meta"})),
    (lambda t: FieldsTuple(t, 3), ("tuple", ["meta", 3])),
], ids=["tuple subclass", "nested tuple subclass", "dict subclass", "OrderedDict subclass", "UserDict",
        "tuple subclass taking its fields one by one"])
def test_to_device_moves_tensors_in_containers_pytree_does_not_know(wrap, expected):
    """Before, pytree took such a container for a leaf and to_device handed it back with its tensors where they were;
    then it came back as a plain tuple or dict. Now it keeps its type where its constructor takes the moved items."""
    assert _devices(to_device(wrap(torch.ones(2)), torch.device("meta"))) == expected


@pytest.mark.parametrize("wrap", [
    lambda t: PlainTuple((t, None)), lambda t: PlainDict(a=[t], b="x"), lambda t: UserDict(a={"b": (t, 1)}),
    lambda t: FieldsTuple(t, pack_padded_sequence(t[None], torch.tensor([2]), batch_first=True)),
], ids=["tuple subclass", "dict subclass", "UserDict", "tuple subclass holding a PackedSequence"])
def test_to_device_hands_back_a_container_pytree_does_not_know_itself_when_nothing_moves(wrap):
    """Before, such a container came back as a new plain tuple or dict even when all its tensors were already on
    the device: a module given a config or batch object lost its attributes."""
    x = wrap(torch.ones(2, 3))
    assert to_device({"x": x}, torch.device("cpu"))["x"] is x


def test_to_device_keeps_a_packed_sequences_batch_sizes_on_the_cpu():
    """Before, pytree rebuilt a PackedSequence (a NamedTuple) with batch_sizes moved too, which it refuses."""
    packed = pack_padded_sequence(torch.randn(3, 4, 2), torch.tensor([2, 4, 1]), batch_first=True,
                                  enforce_sorted=False)
    moved = to_device({"packed": packed}, torch.device("meta"))["packed"]
    assert isinstance(moved, PackedSequence) and moved.batch_sizes is packed.batch_sizes
    assert {moved.data.device.type, moved.sorted_indices.device.type, moved.unsorted_indices.device.type} == {"meta"}


def test_a_stage_handing_on_an_input_kept_aside_is_refused_as_an_input_of_another_micro_batch():
    """Before, an input a weightless stage returned as it was (nn.Identity) counted as made by that stage: the error
    named a skip connection from it, where the tensor was another micro-batch's input kept aside."""

    class KeepsIdentityOutput(InputToHead):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Identity()

        def run_stage(self, name, x, inp):
            if name == "a":
                self.kept = self.a(x)
                return self.kept
            if name == "c":
                return self.c(x, self.kept)
            return self.b(x)

    net = KeepsIdentityOutput()
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(1))
    with pytest.raises(ValueError, match="stage 'c' \\(micro-batch 0\\) got an input of micro-batch 1, kept aside"):
        gpipe_forward(list(net.stages().items()), net.run_stage, (x,), 3)


def test_checkpointing_a_stage_with_batchnorm_is_refused_naming_it():
    from hetrain.models.resnet import ResNet

    class Task(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = ResNet()

    task = Task()
    with pytest.raises(ValueError, match="stage 'stem' would update the running statistics of its BatchNorm stem"):
        PipelineSplit(1, checkpoint=["stem", "head"]).on_fit_start(None, task)
    PipelineSplit(1, checkpoint=["head"]).on_fit_start(None, task)  # no BatchNorm in the head
    assert task.model.checkpoint_stages == {"head"}
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    plain = ResNet()
    plain.load_state_dict(task.model.state_dict())
    torch.testing.assert_close(task.model(x), plain(x))  # through gpipe_forward with the head checkpointed


def test_a_split_over_batchnorm_warns_that_it_changes_training():
    from hetrain.models.resnet import ResNet

    class Task(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = ResNet()

    task = Task()
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    whole = task.model(x)
    with pytest.warns(UserWarning, match="BatchNorm stem.1 .* differs from the unsplit model"):
        PipelineSplit(4, split_on_one_device=True).on_fit_start(None, task)
    assert not torch.allclose(task.model(x), whole, atol=1e-3)  # why: statistics per micro-batch


@pytest.mark.cuda
@pytest.mark.parametrize("micro_batches", [1, 3])
def test_a_cpu_stage_feeding_gpu_stages_equals_the_unsplit_model_and_names_its_copies(micro_batches):
    model = small_bert().double()
    ids, mask, labels = batch(7)
    loss_ref, grads_ref = loss_and_grads(model, (ids, mask, labels))
    StagePlacement({"embeddings": "cpu", "encoder": "cuda:0", "classifier": "cuda:0"}).place(model.stages())
    model.micro_batches = micro_batches
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        loss, grads = loss_and_grads(model, (ids, mask, labels.cuda()))
    torch.testing.assert_close(loss.cpu(), loss_ref, rtol=1e-10, atol=1e-12)
    for name, g in grads.items():
        torch.testing.assert_close(g.cpu(), grads_ref[name], rtol=1e-9, atol=1e-11, msg=lambda m, n=name: f"{n}: {m}")
    assert "hetrain::copy cpu->cuda:0" in {e.name for e in prof.events()}


def test_placing_a_model_again_adds_no_hook_and_the_hook_follows_its_stage():
    """Before, each hook held the device its stage was placed on: one that moved later (Lightning's teardown moves
    a model to the CPU) got its inputs on the old device, so placing again had to replace every hook."""
    stages = {"embed": nn.Linear(5, 5), "head": nn.Linear(5, 3)}
    first = StagePlacement({"head": "cpu"})
    first.place(stages)
    first.place(stages)  # as each Lightning entry point does
    StagePlacement({"embed": "cpu"}).place(stages)
    assert [len(s._forward_pre_hooks) for s in stages.values()] == [1, 1]
    stages["head"].to("meta")  # moved after placing
    assert stages["head"](torch.randn(4, 5)).device.type == "meta"  # the input went where the head is now
    assert remove_input_hooks(nn.ModuleDict(stages)) == 2
    assert [len(s._forward_pre_hooks) for s in stages.values()] == [0, 0]


class Chain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

    def stages(self) -> dict[str, nn.Module]:
        return {"a": self.a, "b": self.b}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x))


def test_a_fit_after_plan_apply_leaves_the_plans_hooks_in_place():
    """Before, StagePlacement's teardown removed the hooks apply had given the stages, which stayed on their two
    devices (meta standing in for a GPU): the model's next forward met a CPU tensor on the meta stage."""
    model = Chain()
    PlacementPlan({"b": "cpu"}).apply(model)
    model.b.to("meta")  # apply refuses meta; moved after, the hooks follow it
    placement = StagePlacement({"a": "cpu"})
    placement.place(model.stages())
    placement.teardown(None, None, "fit")
    assert model(torch.randn(2, 4)).device.type == "meta"


def test_stage_placement_takes_a_stage_without_weights_and_removes_its_own_hooks_at_teardown():
    """A weightless stage (an activation) raised a bare StopIteration; and the hooks a fit added stayed after it,
    where TorchScript cannot script them (``to_torchscript`` after a fit failed)."""
    stages = {"embed": nn.Linear(5, 5), "act": nn.ReLU(), "head": nn.Linear(5, 3)}
    placement = StagePlacement({"head": "cpu"})
    placed = placement.place(stages)
    assert placed == {"embed": torch.device("cpu"), "act": torch.device("cpu"), "head": torch.device("cpu")}
    assert [len(s._forward_pre_hooks) for s in stages.values()] == [1, 0, 1]
    placement.teardown(None, None, "fit")
    assert [len(s._forward_pre_hooks) for s in stages.values()] == [0, 0, 0]
    torch.jit.script(nn.Sequential(*stages.values()))


class FailingChain(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 1)

    def stages(self) -> dict[str, nn.Module]:
        return {"a": self.a, "b": self.b}

    def training_step(self, batch, batch_idx):
        raise RuntimeError("the step failed")

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_stage_placement_removes_its_hooks_when_a_fit_raises(tmp_path):
    """Lightning calls on_exception, not teardown, when a fit raises: the hooks stayed, and a later fit, finding them,
    added none and so removed none."""
    module = FailingChain()
    trainer = pl.Trainer(max_steps=1, callbacks=[StagePlacement({"a": "cpu", "b": "cpu"})], logger=False,
                         enable_progress_bar=False, enable_checkpointing=False, default_root_dir=tmp_path,
                         enable_model_summary=False)
    with pytest.raises(RuntimeError, match="the step failed"):
        trainer.fit(module, train_dataloaders=DataLoader(torch.randn(4, 4), batch_size=2))
    assert [len(s._forward_pre_hooks) for s in module.stages().values()] == [0, 0]


def test_stage_placement_puts_resumed_optimizer_state_back_on_each_parameters_device():
    """A resumed fit restores the optimizer after fit start, where the stages were placed, and Lightning moves all its
    state to its root device (all but ``step``, which stays where torch's load_state_dict put it), a CPU stage's and
    a GPU stage's alike. Here the root device is the CPU and 'meta' stands in for a GPU stage, whose state is on the
    CPU as Lightning's restore leaves it (from meta, no move could give data back)."""
    module = FailingChain()
    module.b.to("meta")  # placed at fit start
    optimizer = torch.optim.AdamW(module.parameters())
    for p in module.parameters():
        optimizer.state[p] = {"step": torch.tensor(1.0), "exp_avg": torch.zeros(p.shape),
                              "exp_avg_sq": torch.zeros(p.shape)}
    trainer = pl.Trainer(logger=False, enable_progress_bar=False, enable_checkpointing=False,
                         enable_model_summary=False)
    trainer.optimizers = [optimizer]
    StagePlacement({"a": "cpu"}).on_train_start(trainer, module)
    for p in module.parameters():
        state = optimizer.state[p]
        assert (state["exp_avg"].device, state["exp_avg_sq"].device, state["step"].device) == (
            p.device, p.device, torch.device("cpu"))


class WithActivation(nn.Module):
    """Stages ``a``, ``act`` (no weights) and ``b``, or ``act`` first with ``activation_first``."""

    input_keys = ("x",)

    def __init__(self, activation_first: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.act, self.b = nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)
        self.order = ["act", "a", "b"] if activation_first else ["a", "act", "b"]
        self.micro_batches, self.checkpoint_stages = 1, frozenset()
        self.seen: dict[str, tuple[torch.device, torch.device]] = {}  # stage -> devices of x and of its own input

    def stages(self) -> dict[str, nn.Module]:
        return {name: self.get_submodule(name) for name in self.order}

    def run_stage(self, name: str, x: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
        self.seen[name] = (x.device, own.device)
        return self.get_submodule(name)(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        stages = list(self.stages().items())
        if self.micro_batches > 1 or self.checkpoint_stages:
            return gpipe_forward(stages, self.run_stage, (x,), self.micro_batches, self.checkpoint_stages)
        return run_in_order(stages, self.run_stage, (x,))


def test_a_stage_without_weights_runs_where_its_input_is(tmp_path, caplog):
    """StagePlacement takes a weightless stage (an activation); the split asked it for its device and raised a bare
    StopIteration, which a fit reported as 'generator raised StopIteration'."""
    net = WithActivation()
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))
    whole = net(x)
    net.micro_batches = 2
    torch.testing.assert_close(net(x), whole)
    for stage in (net.a, net.b):  # another device (standing in for a GPU): the activation gets a's output there
        stage.to("meta")
    net(x)
    assert net.seen["act"] == (torch.device("meta"), torch.device("cpu"))  # its own input is not moved either

    split = PipelineSplit(2)
    stages = list(WithActivation().stages().values())
    assert split.active_micro_batches(stages) == 1  # one device: the activation has none of its own
    stages[-1].to("meta")
    assert split.active_micro_batches(stages) == 2
    first = ClassificationTask(WithActivation(activation_first=True), num_classes=3)
    with caplog.at_level("INFO", logger="hetrain.callbacks.pipeline"):
        split.on_fit_start(None, first)
    assert "every stage is on cpu, where micro-batches cannot overlap" in caplog.text

    rows = [{"x": torch.randn(4), "labels": torch.tensor(i % 3)} for i in range(16)]
    trainer = pl.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_progress_bar=False,
                         enable_checkpointing=False, enable_model_summary=False, default_root_dir=tmp_path,
                         callbacks=[StagePlacement({"a": "cpu"}), PipelineSplit(2, split_on_one_device=True)])
    caplog.clear()
    with caplog.at_level("INFO", logger="hetrain.callbacks.pipeline"):
        trainer.fit(ClassificationTask(WithActivation(), num_classes=3), DataLoader(rows, batch_size=4))
    assert trainer.global_step == 2
    assert "pipeline split: 2 micro-batches over a@cpu, b@cpu" in caplog.text


def test_a_task_whose_first_stage_has_no_weights_sends_inputs_to_the_first_stage_that_has(tmp_path):
    """The task asked its first stage for the device of the batch's inputs: None for an activation, which failed
    every fit whose model starts (or ends, for the labels) with a weightless stage."""
    placed = ClassificationTask(WithActivation(activation_first=True), num_classes=3)
    placed.model.b.to("meta")  # standing in for a GPU holding the last stage
    assert placed._end_device(front=True) == torch.device("cpu")  # the activation, then a on the CPU
    assert placed._end_device(front=False) == torch.device("meta")
    task = ClassificationTask(WithActivation(activation_first=True), num_classes=3)
    rows = [{"x": torch.randn(4), "labels": torch.tensor(i % 3)} for i in range(16)]
    trainer = pl.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_progress_bar=False,
                         enable_checkpointing=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(task, DataLoader(rows, batch_size=4))
    assert trainer.global_step == 2


@pytest.mark.parametrize("freeze", ["eval", "no_running_stats"])
def test_checkpointing_a_stage_whose_batchnorm_keeps_no_statistics_is_allowed(tmp_path, freeze):
    """The refusal looked at the model's mode, not each BatchNorm's: a frozen BatchNorm (eval mode, as in
    fine-tuning) or one without running statistics updates none in the recompute, yet was refused."""
    from hetrain.models.resnet import ResNet

    torch.manual_seed(0)
    model = ResNet(num_classes=3, widths=(4, 8), blocks=(1, 1), fused=False, channels_last=False)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d) and freeze == "eval":
            m.eval()
        elif isinstance(m, nn.BatchNorm2d):
            m.track_running_stats, m.running_mean, m.running_var, m.num_batches_tracked = False, None, None, None
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    seen = []

    class Watch(pl.Callback):
        def on_train_batch_start(self, *args):
            seen.append(model.checkpoint_stages)

    g = torch.Generator().manual_seed(0)
    rows = [{"images": torch.randn(3, 8, 8, generator=g), "labels": torch.tensor(i % 3)} for i in range(8)]
    trainer = pl.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_progress_bar=False,
                         enable_checkpointing=False, enable_model_summary=False, default_root_dir=tmp_path,
                         callbacks=[PipelineSplit(1, checkpoint=["layer1"]), Watch()])
    trainer.fit(ClassificationTask(model, num_classes=3), DataLoader(rows, batch_size=4))
    assert seen == [frozenset({"layer1"})] * 2
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # frozen: the stats never moved


class _FieldByField(tuple):
    """A tuple subclass built from its fields one by one, the usual way to write one."""

    def __new__(cls, *fields):
        return super().__new__(cls, fields)


def test_to_device_rebuilds_a_tuple_taking_its_fields_one_by_one_as_a_plain_tuple():
    """_FieldByField(moved) took the list of moved items as its one field: the next stage got a 1-tuple holding a
    list, and only where the stages were on different devices."""
    moved = to_device(_FieldByField(torch.ones(2), torch.zeros(3)), torch.device("meta"))
    assert type(moved) is tuple and [t.device.type for t in moved] == ["meta", "meta"]
