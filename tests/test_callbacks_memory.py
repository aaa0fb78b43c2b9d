"""MemoryProfiler on real Lightning fits (CPU): per-module numbers, phase peaks, allocator churn, report files,
OOM post-mortem."""

import contextlib
import copy
import errno
import gc
import io
import logging
import os
import pickle
import re
import resource
import subprocess
import sys
import tempfile
import weakref
from collections import Counter

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.utils.data import DataLoader, TensorDataset, default_collate

from hetrain import cpu_memory, ops
from hetrain.callbacks import memory
from hetrain.callbacks.churn import OUTSIDE, ROOT, Allocation, ChurnTracker, churned
from hetrain.callbacks.memory import OOM_MD, OOM_SNAPSHOT, MemoryProfiler, StepPeaks
from hetrain.callbacks.memory_report import (
    PHASES,
    REPORT_HTML,
    REPORT_MD,
    REPORT_PNG,
    STEPS_CSV,
    STEPS_HEADER,
    MemoryReport,
)
from hetrain.callbacks.module_memory import NOT_MEASURED, ModuleMemory, optimizer_state_bytes
from hetrain.callbacks.module_memory import OUTSIDE as OUTSIDE_MODULES
from hetrain.callbacks.profiling import StepTrace
from hetrain.memory_counters import PhaseMemory, forget_erased_peak, peak_rss_bytes, reset_peak_rss, rss_bytes
from hetrain.nn import ConvBNReLUPool2d
from hetrain.nn.patch_sequences import swap_sequences
from hetrain.report import peak_memory_mib

BATCH, IN, HIDDEN = 6, 8, 24
OOM_MESSAGE = "CUDA out of memory. Tried to allocate 20.00 GiB (GPU 0; 79.11 GiB total capacity)"


class Regressor(pl.LightningModule):
    def __init__(self, oom_at_step: int | None = None):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(IN, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, 1))
        self.oom_at_step = oom_at_step

    def training_step(self, batch, batch_idx):
        x, y = batch
        if self.global_step == self.oom_at_step:
            raise torch.cuda.OutOfMemoryError(OOM_MESSAGE)  # the exception type torch raises on a CUDA OOM
        return F.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def _loader(batches: int) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(batches * BATCH, IN, generator=g),
                                    torch.randn(batches * BATCH, 1, generator=g)), batch_size=BATCH)


def _fit(model, profiler, tmp_path, batches=3, **kwargs) -> pl.Trainer:
    pl.seed_everything(0, verbose=False)
    kwargs = {"max_steps": batches, "callbacks": [profiler], **kwargs}  # max_steps: more under manual optimization
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, default_root_dir=tmp_path,
                         enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
                         limit_val_batches=0, **kwargs)
    trainer.fit(model, _loader(batches))
    return trainer


def _nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _measured_step(model: nn.Module, x: torch.Tensor, read_graph: bool = False) -> ModuleMemory:
    """One forward and backward of ``model`` on ``x`` watched by a ModuleMemory; with ``read_graph`` it is given
    the loss, whose graph it reads."""
    tracker = ModuleMemory(model)
    tracker.start()
    loss = model(x).square().mean()
    tracker.forward_done(loss if read_graph else None)
    loss.backward()
    tracker.backward_done()
    tracker.stop()
    return tracker


def test_module_memory_counts_params_grads_outputs_and_saved_tensors_exactly():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(IN, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, 1))
    x = torch.randn(BATCH, IN)
    tracker = _measured_step(model, x)
    r = tracker.records
    fc1, fc2 = model[0], model[2]
    assert r["0"].params == r["0"].grads == _nbytes(fc1.weight, fc1.bias)
    assert r["2"].params == r["2"].grads == _nbytes(fc2.weight, fc2.bias)
    assert r["1"].params == r["1"].grads == 0
    assert r["0"].outputs == r["1"].outputs == 4 * BATCH * HIDDEN and r["2"].outputs == 4 * BATCH
    # Autograd keeps x for fc1's weight gradient and ReLU's result for ReLU's and fc2's backward: each storage
    # is counted once, by the first module that saved it; weights are never activations.
    assert r["0"].saved == _nbytes(x)
    assert r["1"].saved == 4 * BATCH * HIDDEN
    assert r["2"].saved == 0
    assert r["0"].cuda_delta is None  # CPU modules: no allocator delta
    # All hooks are gone: another forward changes nothing.
    model(x).sum().backward()
    assert tracker.records["0"].outputs == 4 * BATCH * HIDDEN
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_the_compiled_note_names_a_compiled_module_run_eagerly_in_the_measured_step():
    """train.py's hooked step is the fit's first, the batch Throughput counts FLOPs on with torch.compile standing
    aside: the compiled block ran eagerly and its submodules' rows held eager figures, while the note said they had
    no rows of their own."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(IN, HIDDEN), nn.Sequential(nn.Linear(HIDDEN, HIDDEN), nn.Tanh()),
                          nn.Linear(HIDDEN, 1))
    model[1].compile(backend="aot_eager")
    x = torch.randn(BATCH, IN)
    model(x).sum().backward()  # compiled before the measured step
    with torch.compiler.set_stance("force_eager"):
        tracker = _measured_step(model, x)
    assert tracker.records["1.0"].outputs == 4 * BATCH * HIDDEN  # measured as eager ran it
    note = tracker.compiled_note()
    assert note.startswith("Compiled with torch.compile, but run eagerly in a measured step: 1 (")
    assert "rows are that eager run's figures" in note and "rows hold only their parameters" not in note


def test_module_memory_leaves_a_compiled_module_compiled_and_counts_what_it_saves():
    def measure(compiled: bool) -> dict:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(IN, HIDDEN), nn.Sequential(nn.Linear(HIDDEN, HIDDEN), nn.Tanh()),
                              nn.Linear(HIDDEN, 1))
        if compiled:
            model[1].compile(backend="aot_eager")
        x = torch.randn(BATCH, IN)
        model(x).sum().backward()  # compiled before the measured step
        torch._dynamo.utils.counters.clear()
        tracker = _measured_step(model, x)
        assert sum(torch._dynamo.utils.counters["graph_break"].values()) == 0
        assert ("Compiled with torch.compile: 1. " in tracker.compiled_note()) == compiled
        return tracker.records

    eager, compiled = measure(False), measure(True)
    # Dynamo traces a compiled module's hooks; their allocator reads and its calls of the pack hook broke the
    # graph, so the step measured ran eagerly. Now the compiled graph runs, and what it saves (fc2's input and
    # tanh's result) goes to the nearest module that runs eagerly, the root: every byte still counted once.
    assert sum(r.saved for r in compiled.values()) == sum(r.saved for r in eager.values()) > 0
    assert compiled["(root)"].saved == eager["1.0"].saved + eager["1.1"].saved > 0
    assert compiled["0"].saved == eager["0"].saved and compiled["2"].params == eager["2"].params


def test_a_sparse_embedding_gradient_counts_its_stored_rows_not_the_whole_table():
    model = nn.Sequential(nn.Embedding(1000, 16, sparse=True))
    tracker = ModuleMemory(model)
    tracker.start()
    out = model(torch.tensor([[1, 2, 2]]))
    tracker.forward_done()
    out.sum().backward()
    tracker.backward_done()
    tracker.stop()
    assert tracker.records["0"].params == 1000 * 16 * 4
    assert tracker.records["0"].grads == 3 * 16 * 4 + 3 * 8  # three looked-up rows and their int64 indices


def test_views_of_one_fresh_result_count_its_whole_storage_once():
    class QKV(nn.Module):  # a leaf returning three views of one result, as an attention's projection does
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(3 * HIDDEN, IN))

        def forward(self, x):
            return (x @ self.weight.t()).chunk(3, dim=-1)

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = QKV()

        def forward(self, x):
            q, k, v = self.qkv(x)
            return q * k + v

    tracker = _measured_step(Attention(), torch.randn(BATCH, IN))
    assert tracker.records["qkv"].outputs == 4 * BATCH * 3 * HIDDEN


def test_the_batch_passed_on_is_no_modules_output():
    model = nn.Sequential(nn.Identity(), nn.Flatten(), nn.Linear(2 * IN, 1))
    r = _measured_step(model, torch.randn(BATCH, 2, IN)).records
    assert r["0"].outputs == r["1"].outputs == 0  # the batch itself, and a view of it
    assert r["2"].outputs == 4 * BATCH


def test_a_buffer_used_in_the_forward_is_not_saved_for_backward():
    class Masked(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(IN, HIDDEN)
            self.register_buffer("mask", torch.ones(HIDDEN, HIDDEN))  # held all fit long, not an activation

        def forward(self, x):
            return self.fc(x) @ self.mask  # autograd keeps the mask for fc's gradient

    x = torch.randn(BATCH, IN)
    r = _measured_step(Masked(), x).records
    assert r["fc"].saved == _nbytes(x) and r[ROOT].saved == 0


class Block(nn.Module):
    """Saves a tensor for backward in its own forward (tanh keeps its result), not in a child."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(IN, HIDDEN)

    def forward(self, x):
        return torch.tanh(self.fc(x))


def test_module_memory_gives_a_tensor_saved_by_a_parent_to_the_parent():
    model = nn.Sequential(Block(), nn.Linear(HIDDEN, 1))
    x = torch.randn(BATCH, IN)
    tracker = ModuleMemory(model)
    tracker.start()
    loss = model(x).sum() * 2  # mul by a constant saves nothing; sum saves nothing
    tracker.forward_done()
    loss.backward()
    tracker.backward_done()
    tracker.stop()
    r = tracker.records
    assert r["0.fc"].saved == _nbytes(x)
    assert r["0"].saved == 4 * BATCH * HIDDEN  # tanh's result, saved in Block.forward
    assert r["0"].outputs == 0 and r["0.fc"].outputs == 4 * BATCH * HIDDEN  # outputs belong to leaves only
    assert r["1"].saved == 0  # fc2's input is tanh's result, already counted
    header, rows = tracker.table()
    assert [row[0] for row in rows][-1] == "total"
    assert rows[-1][header.index("saved for backward MiB")] == round((_nbytes(x) + 4 * BATCH * HIDDEN) / 2**20, 3)


def test_a_forward_under_the_users_saved_tensors_hook_keeps_it_and_is_said_not_measured():
    """The step's own hook sat under a user's (save_on_cpu): only the user's was called, and the table said 0."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(IN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, 1))
    x = torch.randn(BATCH, IN)
    packed = []  # what the user's hook packs, as an offload would

    def step():
        with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t, lambda t: t):
            loss = model(x).square().mean()
        loss.backward()

    step()
    unmeasured = len(packed)
    tracker = ModuleMemory(model)
    tracker.start()
    packed.clear()
    step()
    tracker.stop()
    assert len(packed) == unmeasured > 0  # the user's hook saw every tensor it sees unmeasured
    header, rows = tracker.table()
    saved = {row[0]: row[header.index("saved for backward MiB")] for row in rows}
    assert saved["0"] == saved["1"] == saved["2"] == NOT_MEASURED  # not 0
    assert "Not measured: " in tracker.saved_note() and "save_on_cpu" in tracker.saved_note()


class Offloading(nn.Module):
    """Offloads what its own forward saves after its child's: only save_on_cpu's hook sees those tensors."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(IN, HIDDEN)

    def forward(self, x):
        h = self.fc(x)
        with torch.autograd.graph.save_on_cpu():
            return torch.tanh(h) * h


class Checkpointing(nn.Module):
    """Recomputes its forward in backward: keeps only its input."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(HIDDEN, HIDDEN))

    def forward(self, h):
        return torch.utils.checkpoint.checkpoint(lambda t: torch.tanh(t @ self.w) * t, h, use_reentrant=False)


def test_a_module_that_pushes_its_own_saved_tensors_hook_is_said_not_measured():
    """A hook pushed inside a module's forward sat over the pack hook, which never saw what it saved there: the
    module's row said 0 though save_on_cpu kept copies."""
    torch.manual_seed(0)
    model = nn.Sequential(Offloading(), Checkpointing(), nn.Linear(HIDDEN, 1))
    x = torch.randn(BATCH, IN)
    tracker = _measured_step(model, x, read_graph=True)
    header, rows = tracker.table()
    saved = {row[0]: row[header.index("saved for backward MiB")] for row in rows}
    r = tracker.records
    assert saved.get("0") == NOT_MEASURED and "Not measured: 0: " in tracker.saved_note()  # no row: all 0
    # Its child ran before the hook was pushed, the checkpoint keeps its input (the offloaded block's output), and
    # the container around them pushed nothing: measured.
    assert r["0.fc"].saved == _nbytes(x) and r["1"].saved == r["2"].saved == 4 * BATCH * HIDDEN
    assert not any(r[name].saved_unseen for name in (ROOT, "0.fc", "1", "2", OUTSIDE_MODULES))
    assert model[1].w.grad is not None and model[0].fc.weight.grad is not None


class GradInForward(nn.Module):
    """Takes torch.func's grad inside its own forward, as a physics-informed layer's residual does: of its detached
    hidden state (nothing for the step's backward), or of the state itself (the grad's graph is the step's)."""

    def __init__(self, n_in: int, detach: bool):
        super().__init__()
        self.fc, self.detach = nn.Linear(n_in, HIDDEN), detach

    def forward(self, x):
        h = self.fc(x)
        g = grad(lambda t: (torch.sin(t) * t).sum())(h.detach() if self.detach else h)
        return torch.tanh(h) * g


def test_a_module_calling_torch_func_grad_in_its_own_forward_runs_its_measured_step():
    """The pack hook, on for the outermost module's forward, was under torch.func's grad in a module's own forward:
    grad refuses to start under a saved-tensors hook, and the measured step failed."""
    torch.manual_seed(0)
    model = nn.Sequential(GradInForward(IN, detach=True), GradInForward(HIDDEN, detach=False), nn.Linear(HIDDEN, 1))
    x = torch.randn(BATCH, IN)
    model(x).square().mean().backward()
    unmeasured = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    disable = torch.autograd.graph.disable_saved_tensors_hooks
    tracker = _measured_step(model, x, read_graph=True)
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), unmeasured, strict=True))
    r = tracker.records
    # A grad of a detached tensor keeps nothing for the step's backward: measured (tanh's output, and the grad that
    # multiplies it), as its child.
    assert not r["0"].saved_unseen and r["0"].saved == 2 * 4 * BATCH * HIDDEN and r["0.fc"].saved == _nbytes(x)
    # A grad of the step's own tensors saves them for the step's backward where no hook sees: not measured.
    assert r["1"].saved_unseen and "1: their forward ran under another saved-tensors hook" in tracker.saved_note()
    assert "called torch.func's grad or vjp" in tracker.saved_note() and r["1.fc"].saved == 4 * BATCH * HIDDEN
    assert torch._C._autograd._top_saved_tensors_default_hooks(False) is None
    assert torch.autograd.graph.disable_saved_tensors_hooks is disable  # torch's own again


class PerSampleGradNorms(Regressor):
    """Per-sample gradient norms with torch.func in training_step, as DP-SGD-style clipping statistics do."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        params = {k: v.detach() for k, v in self.net.named_parameters()}

        def loss(p, xi, yi):
            return F.mse_loss(functional_call(self.net, p, (xi[None],)), yi[None])

        per_sample = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
        self.norm = sum(g.flatten(1).norm(dim=1) for g in per_sample.values()).mean()
        return super().training_step(batch, batch_idx)


def test_torch_func_in_training_step_runs_under_the_module_hooks_and_its_calls_are_not_counted(tmp_path):
    """The step's saved-tensors hook was on for the whole forward, and torch.func's grad refuses to run under one."""
    plain, with_func = (MemoryProfiler(module_every_n_steps=1, churn_steps=0) for _ in range(2))
    _fit(Regressor(), plain, tmp_path / "plain", batches=2)
    _fit(PerSampleGradNorms(), with_func, tmp_path / "func", batches=2)
    # The calls inside the transform are the transform's: the step's own forward is measured as without it.
    assert with_func.modules.records == plain.modules.records and plain.modules.records["net.0"].saved > 0
    assert with_func.modules.transformed == {"net", "net.0", "net.1", "net.2"}
    assert "Called inside a torch.func transform: net, net.0" in (tmp_path / "func" / REPORT_MD).read_text()


ROWS, VOCAB = 4096, 64  # a language model's logits, small: their log-softmax is 1 MiB


class LogitsLoss(Regressor):
    """Cross-entropy over logits made in training_step, outside every module, as a language model's loss is."""

    def __init__(self, cross_entropy: bool):
        super().__init__()
        self.cross_entropy = cross_entropy

    def training_step(self, batch, batch_idx):
        x, _ = batch
        logits = self.net(x).mean() + torch.zeros(ROWS, VOCAB)
        if self.cross_entropy:  # keeps its log-softmax and the targets for backward
            return F.cross_entropy(logits, torch.zeros(ROWS, dtype=torch.long))
        return logits.mean()  # keeps nothing


def test_what_training_step_saves_outside_every_module_has_its_own_row(tmp_path):
    """The saved-tensors hook opened only in module forwards: the loss's log-softmax, often a language model's largest
    activation, was counted nowhere."""
    with_ce, without = (MemoryProfiler(module_every_n_steps=1, churn_steps=0) for _ in range(2))
    _fit(LogitsLoss(cross_entropy=True), with_ce, tmp_path / "ce", batches=2)
    _fit(LogitsLoss(cross_entropy=False), without, tmp_path / "mean", batches=2)
    outside = [p.modules.records[OUTSIDE_MODULES].saved for p in (with_ce, without)]
    assert outside[0] - outside[1] == 4 * ROWS * VOCAB + 8 * ROWS + 4  # log-softmax, targets, nll_loss's total weight
    assert outside[1] <= 8  # Lightning's loss / accumulate_grad_batches keeps the divisor, a 0-dim int64
    # Read from the loss's graph, after the modules' rows: those are as they were, and nothing is counted twice.
    modules = [{k: v for k, v in p.modules.records.items() if k != OUTSIDE_MODULES} for p in (with_ce, without)]
    assert modules[0] == modules[1] and modules[0]["net.0"].saved == _nbytes(torch.empty(BATCH, IN))
    text = (tmp_path / "ce" / REPORT_MD).read_text()
    assert f"| {OUTSIDE_MODULES} |  | 0 | 0 | 0 | {round(outside[0] / 2**20, 3)} |" in text
    assert "not counted" not in text


def test_what_training_step_saves_under_its_own_hook_is_not_measured_and_not_unpacked():
    """Read from the graph, a tensor saved under a user's hook (save_on_cpu) would be unpacked: copied back."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(IN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, 4))
    unpacked = []
    tracker = ModuleMemory(model)
    tracker.start()
    logits = model(torch.randn(BATCH, IN))
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: unpacked.append(t) or t):
        loss = F.cross_entropy(logits, torch.zeros(BATCH, dtype=torch.long))
    tracker.forward_done(loss)
    assert not unpacked
    loss.backward()
    tracker.stop()
    header, rows = tracker.table()
    saved = {row[0]: row[header.index("saved for backward MiB")] for row in rows}
    assert saved[OUTSIDE_MODULES] == NOT_MEASURED and tracker.records["1"].saved == 4 * BATCH * HIDDEN
    assert f"{OUTSIDE_MODULES} not measured: training_step saved tensors under its own" in tracker.saved_note()


def test_what_a_module_under_vmap_saves_is_not_counted_outside_modules():
    """Called under vmap, a module opens no pack hook; what it saves in the step's graph is not training_step's."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(IN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, 1))
    tracker = ModuleMemory(model)
    tracker.start()
    loss = vmap(model)(torch.randn(BATCH, IN)).sum()  # keeps each Linear's input and Tanh's result
    tracker.forward_done(loss)
    loss.backward()
    tracker.stop()
    assert tracker.transformed == {ROOT, "0", "1", "2"} and tracker.records[OUTSIDE_MODULES].saved == 0
    assert not tracker.records[OUTSIDE_MODULES].saved_unseen


def _hetrain_op_outside(model: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    return model[1](ops.layer_norm(model[0](x), None, None, 1e-5))  # a C++ autograd Function on the CPU


def _copy_into_slices(model: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    outs = torch.zeros(2, BATCH, HIDDEN)
    for t in range(2):
        outs[t] = model[0](x)  # copy_ into a view: a CopySlices node, which hides the copy's node
    return model[1](outs.mean(0))


@pytest.mark.parametrize("step", [_hetrain_op_outside, _copy_into_slices])
def test_a_node_outside_modules_that_cannot_be_read_leaves_the_outside_row_a_lower_bound(step, tmp_path):
    """A hetrain fused op called in training_step, or a write into a slice, made the whole row not measured, and
    what the rest of the graph saved (cross-entropy's log-softmax) was dropped."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(IN, HIDDEN), nn.Linear(HIDDEN, 4))
    tracker = ModuleMemory(model)
    tracker.start()
    loss = F.cross_entropy(step(model, torch.randn(BATCH, IN)), torch.zeros(BATCH, dtype=torch.long))
    tracker.forward_done(loss)
    loss.backward()
    tracker.backward_done()
    tracker.stop()
    header, rows = tracker.table()
    saved = {row[0]: row[header.index("saved for backward MiB")] for row in rows}
    read = 4 * BATCH * 4 + 8 * BATCH + 4  # log-softmax, targets, nll_loss's total weight
    bound = f"≥ {round(read / 2**20, 3)}"
    assert saved[OUTSIDE_MODULES] == bound and saved["total"].startswith("≥ ")  # the total holds the row
    record = tracker.records[OUTSIDE_MODULES]
    assert record.saved == read and record.saved_partial and not record.saved_unseen
    opaque = "torch::autograd::CppNode<hetrain::fused::LayerNorm>" if step is _hetrain_op_outside else "CopySlices"
    note = tracker.saved_note()
    assert f"{OUTSIDE_MODULES} is a lower bound" in note and opaque in note and NOT_MEASURED not in note
    steps = [{"step": 0, **{phase: {"cpu": {"allocated": 2**20}} for phase in PHASES}}]
    paths = MemoryReport(steps, modules=tracker).write(tmp_path)
    assert f"| {OUTSIDE_MODULES} |  | 0 | 0 | 0 | {bound} |" in paths["md"].read_text(encoding="utf-8")
    assert f"<td>{bound}</td>" in paths["html"].read_text(encoding="utf-8")


def test_measuring_leaves_an_autograd_node_type_free_to_be_collected():
    """Each torch.compile graph has a node type of its own (CompiledFunctionBackward): cached for good, each kept
    its compiled code alive after torch._dynamo.reset(). A custom Function's node type is one made at run time."""

    class Double(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return 2 * x

        @staticmethod
        def backward(ctx, grad):
            return 2 * grad

    model = nn.Linear(IN, 1)
    tracker = ModuleMemory(model)
    tracker.start()
    loss = Double.apply(model(torch.randn(BATCH, IN))).sum()
    node_type = weakref.ref(type(loss.grad_fn.next_functions[0][0]))
    tracker.forward_done(loss)
    loss.backward()
    tracker.stop()
    assert tracker.records[OUTSIDE_MODULES].saved == 4 * BATCH  # what Double saved was read through its node type
    del loss, Double, tracker
    gc.collect()
    assert node_type() is None


@pytest.mark.parametrize("fused", ["ConvBNReLUPool2d", "patched Sequential"])
def test_a_fused_block_is_measured_as_one_module_holding_what_its_kernel_makes(fused):
    # The hooks made the block call its torch modules one by one: the measured step computed other bits than the
    # others. Run fused, its BatchNorm, ReLU and MaxPool are not called: their output is the block's.
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
    layers = [conv, bn, nn.ReLU(), nn.MaxPool2d(2)]
    if fused == "ConvBNReLUPool2d":
        model = nn.Sequential(ConvBNReLUPool2d.from_modules(*layers), nn.Flatten(), nn.Linear(64, 1))
        block, children = "0", ["0.0", "0.1", "0.2", "0.3"]
    else:
        model = nn.Sequential(*layers, nn.Flatten(), nn.Linear(64, 1))
        swap_sequences(model)  # the pooled output is handed to the Flatten, a view of it to the Linear
        block, children = ROOT, ["0", "1", "2", "3"]
    tracker = _measured_step(model, torch.randn(BATCH, 3, 8, 8))
    r = tracker.records
    assert r[children[0]].outputs == 4 * BATCH * 4 * 8 * 8  # the convolution runs as a module
    assert r[block].outputs == 4 * BATCH * 4 * 4 * 4 and r[block].saved > 0  # the fused epilogue's
    assert r[children[1]].params == r[children[1]].grads == _nbytes(bn.weight, bn.bias)
    assert all(r[name].outputs == r[name].saved == 0 for name in children[1:])
    assert tracker.fused_note().startswith(f"Fused by hetrain: {block}. ")
    assert {row[0] for row in tracker.table()[1]}.isdisjoint(children[2:])  # nothing to show: no row


class Residual(nn.Module):
    """A container computing its own output, x + f(x), as a transformer block does."""

    def __init__(self):
        super().__init__()
        self.f = nn.Linear(HIDDEN, HIDDEN)

    def forward(self, x):
        return x + self.f(x)


@pytest.mark.parametrize("one_by_one", [False, True])
def test_a_containers_own_output_handed_on_in_a_fused_block_is_not_the_blocks(one_by_one):
    # The block took every tensor handed to its next child that no leaf counted as its kernel's output: the
    # residual's sum too, though nothing ran fused when a user's hook made it run its children one by one.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(IN, HIDDEN), nn.GELU(), Residual(), nn.Linear(HIDDEN, 1))
    swap_sequences(model)
    if one_by_one:
        model[0].register_forward_hook(lambda _module, _args, _out: None)
    r = _measured_step(model, torch.randn(BATCH, IN)).records
    made = 4 * BATCH * HIDDEN  # the fused Linear and GELU's output
    assert r[ROOT].outputs == (0 if one_by_one else made)
    assert r["0"].outputs == r["1"].outputs == (made if one_by_one else 0) and r["2.f"].outputs == made


def test_a_block_a_users_hook_runs_module_by_module_is_measured_module_by_module():
    torch.manual_seed(0)
    model = nn.Sequential(ConvBNReLUPool2d(3, 4, 3, padding=1), nn.Flatten(), nn.Linear(64, 1))
    model[0][1].register_forward_hook(lambda _module, _args, _out: None)
    tracker = _measured_step(model, torch.randn(BATCH, 3, 8, 8))
    r = tracker.records
    assert r["0.1"].outputs == r["0.2"].outputs == 4 * BATCH * 4 * 8 * 8 and r["0.3"].outputs == 4 * BATCH * 4 * 4 * 4
    assert r["0"].outputs == 0 and tracker.fused_note() == ""


class FusedConvNet(pl.LightningModule):
    """A fused Conv-BatchNorm-ReLU-MaxPool stem and a Linear head; keeps each step's loss."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem = ConvBNReLUPool2d(3, 8, 3, padding=1)
        self.head = nn.Linear(8 * 4 * 4, 1)
        self.losses = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.mse_loss(self.head(self.stem(x).flatten(1)), y)
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_profiling_a_fit_leaves_its_losses_as_they_were_bit_for_bit(tmp_path):
    # Module hooks (steps 0 and 2) and churn's module ranges (step 1) made the fused stem call its torch modules one
    # by one: turning the profiler on changed the numbers the fit trained with.
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(4 * BATCH, 3, 8, 8, generator=g), torch.randn(4 * BATCH, 1, generator=g))
    losses = {}
    for profiled in (False, True):
        model = FusedConvNet()
        callbacks = [MemoryProfiler(module_every_n_steps=2, churn_steps=[1])] if profiled else []
        pl.Trainer(accelerator="cpu", max_steps=4, logger=False, default_root_dir=tmp_path / str(profiled),
                   enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
                   limit_val_batches=0, callbacks=callbacks).fit(model, DataLoader(data, batch_size=BATCH))
        losses[profiled] = model.losses
    assert losses[True] == losses[False]
    assert "Fused by hetrain: stem. " in (tmp_path / "True" / REPORT_MD).read_text()


def test_optimizer_state_bytes_matches_adam_moments():
    model = nn.Linear(5, 3)
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 5)).sum().backward()
    optimizer.step()
    params = _nbytes(*model.parameters())
    # exp_avg and exp_avg_sq per parameter, plus a float32 step counter per parameter.
    assert optimizer_state_bytes([optimizer]) == {"cpu": 2 * params + 2 * 4}


def test_peak_rss_resets_and_sees_a_large_allocation():
    if not reset_peak_rss():
        pytest.skip("this kernel cannot reset the peak resident set")
    before = peak_rss_bytes()
    block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    peak = peak_rss_bytes()
    del block
    assert peak - before >= 60 * 2**20
    reset_peak_rss()
    assert peak_rss_bytes() - rss_bytes() < 8 * 2**20  # the peak fell back to about the current size


@pytest.mark.parametrize("source", ["getrusage", "/proc/self/status"])
def test_phase_memory_peak_sees_a_large_allocation_and_resets(source):
    phases = PhaseMemory([torch.device("cpu")])
    if phases._floor is None:
        pytest.skip("this kernel cannot reset the peak resident set")
    if source == "/proc/self/status":
        phases._floor = 2**62  # every getrusage peak is then below the bound: the exact file is read instead
    phases.reset()
    block = torch.ones(64 * 2**20 // 4)
    peak = phases.peaks()["cpu"]["allocated"]
    above_floor = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 > phases._floor
    del block
    assert above_floor == (source == "getrusage")  # the branch named is the one that answered
    assert peak - rss_bytes() >= 60 * 2**20 and abs(peak - peak_rss_bytes()) < 2**20
    phases.reset()
    assert phases.peaks()["cpu"]["allocated"] - rss_bytes() < 8 * 2**20


def test_profiler_writes_a_report_naming_every_module(tmp_path):
    profiler = MemoryProfiler(module_every_n_steps=2)
    model = Regressor()
    _fit(model, profiler, tmp_path, batches=3)
    assert [s["step"] for s in profiler.steps] == [0, 1, 2]
    for step in profiler.steps:
        for phase in PHASES:
            assert step[phase]["cpu"]["allocated"] > 0
    md = (tmp_path / REPORT_MD).read_text()
    page = (tmp_path / REPORT_HTML).read_text()
    for name in ("net.0", "net.1", "net.2", "Linear", "ReLU", "peak forward MiB", "optimizer state MiB"):
        assert name in md and name in page
    assert "data:image/png;base64," in page
    assert (tmp_path / REPORT_PNG).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "CUDA allocated delta" not in md  # no module ran on a GPU: no column of n/a
    # Parameters, gradients and Adam state per device match the model's own tensors.
    params = _nbytes(*model.parameters())
    assert profiler.static == {"params": {"cpu": params}, "grads": {"cpu": params},
                               "optimizer state": {"cpu": 2 * params + 4 * 4}}
    # No hook outlives the fit.
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_memory_report_renders_hand_made_steps_without_a_trainer(tmp_path):
    mib = 2**20
    steps = [{"step": n,
              "forward": {"cpu": {"allocated": (100 + n) * mib},
                          "cuda:0": {"allocated": 7 * mib, "reserved": (20 + 5 * n) * mib}},
              "backward": {"cpu": {"allocated": (120 + 3 * n) * mib}}, "optimizer": {"cpu": {"allocated": 90 * mib}}}
             for n in range(3)]
    report = MemoryReport(steps, static={"params": {"cpu": 2 * mib}}, at_start={"cpu": 80 * mib},
                          churn=(["Per step: nothing."], [("Temporaries to remove (top 10)", (["module"], []))]))
    header, rows = report.device_table()
    by_device = {row[0]: dict(zip(header, row, strict=True)) for row in rows}
    # Gradients and optimizer state were not measured: n/a, not 0. The CPU has no reserved figure.
    assert by_device["cpu"] == {"device": "cpu", "at start MiB": 80, "peak forward MiB": 102,
                                "peak backward MiB": 126, "peak optimizer MiB": 90, "peak reserved MiB": "n/a",
                                "params MiB": 2, "grads MiB": "n/a", "optimizer state MiB": "n/a"}
    assert by_device["cuda:0"]["peak forward MiB"] == 7 and by_device["cuda:0"]["peak backward MiB"] == 0
    assert by_device["cuda:0"]["peak reserved MiB"] == 30 and by_device["cuda:0"]["params MiB"] == 0
    paths = report.write(tmp_path)
    md, page = paths["md"].read_text(), paths["html"].read_text()
    csv = paths["csv"].read_text().splitlines()
    assert csv[0] == "step,device,phase,allocated_mib,reserved_mib" and len(csv) == 1 + 3 * 4
    assert "2,cuda:0,forward,7.000,30.000" in csv and "2,cpu,backward,126.000," in csv
    assert "peak reserved MiB" in md and "memory_steps.csv" in page
    for text in (md, page):
        assert "Per module" not in text  # no step was hooked: no empty table
        assert "Allocator churn" in text and "Per step: nothing." in text
    assert "### Temporaries to remove (top 10)\n\nNone." in md
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


class SpikeAtFirstStep(Regressor):
    """Step 0 touches a large host temporary; later steps are small."""

    def training_step(self, batch, batch_idx):
        if self.global_step == 0:
            torch.ones(SPIKE_BYTES // 4).sum()
        return super().training_step(batch, batch_idx)


SPIKE_BYTES = 256 * 2**20


def test_the_runs_peak_keeps_what_the_profilers_resets_erased(tmp_path):
    """The profiler resets the process's peak counters every phase; the run summary read them afterwards and
    gave the last phase's peak as the run's."""
    if not reset_peak_rss():
        pytest.skip("this kernel cannot reset the peak resident set: no reset to erase it")
    with cpu_memory.host_memory("system"):  # the temporary goes back to the system when freed
        before = rss_bytes()
        _fit(SpikeAtFirstStep(), MemoryProfiler(module_every_n_steps=100, churn_steps=0), tmp_path, batches=4)
    assert peak_rss_bytes() - before < SPIKE_BYTES // 2  # the process's own counter has forgotten the spike
    assert peak_memory_mib([])["cpu_rss"] * 2**20 >= before + SPIKE_BYTES * 0.9


class ScratchRegressor(Regressor):
    """Makes and drops a 48 MiB host temporary every step: a block hetrain's host allocator keeps."""

    def training_step(self, batch, batch_idx):
        scratch = torch.ones(SCRATCH_BYTES // 4)
        return super().training_step(batch, batch_idx) + 0 * scratch[-1]


SCRATCH_BYTES = 48 * 2**20


@pytest.mark.parametrize("mode", ["keep", "system"])
def test_report_tells_kept_host_blocks_from_the_resident_set(tmp_path, mode):
    with cpu_memory.host_memory(mode):
        profiler = MemoryProfiler(module_every_n_steps=2)
        _fit(ScratchRegressor(), profiler, tmp_path, batches=3)
    kept = [s[p]["cpu"].get("kept") for s in profiler.steps for p in PHASES]
    md, page = (tmp_path / REPORT_MD).read_text(), (tmp_path / REPORT_HTML).read_text()
    if mode == "system":
        assert kept == [None] * len(kept) and "freed blocks" not in md
        return
    assert all(k is not None for k in kept) and max(kept) >= SCRATCH_BYTES
    note = f"up to {max(kept) / 2**20:.1f} MiB of that resident set were freed blocks"
    assert note in md and note in page


def test_profiler_under_gradient_accumulation_records_optimizer_steps(tmp_path):
    profiler = MemoryProfiler(module_every_n_steps=1)
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(accelerator="cpu", max_steps=2, accumulate_grad_batches=2, logger=False,
                         default_root_dir=tmp_path, enable_progress_bar=False, enable_checkpointing=False,
                         enable_model_summary=False, limit_val_batches=0, callbacks=[profiler])
    trainer.fit(Regressor(), _loader(4))
    assert [s["step"] for s in profiler.steps] == [0, 1]
    # Outputs are those of one micro-batch (the first of each step), not a sum over micro-batches.
    assert profiler.modules.records["net.0"].outputs == 4 * BATCH * HIDDEN


def test_out_of_memory_in_a_step_writes_the_post_mortem_and_reraises(tmp_path):
    profiler = MemoryProfiler(module_every_n_steps=1)
    model = Regressor(oom_at_step=2)
    with pytest.raises(torch.cuda.OutOfMemoryError, match="Tried to allocate 20.00 GiB"):
        _fit(model, profiler, tmp_path, batches=4)
    report = (tmp_path / OOM_MD).read_text()
    assert "Out of memory at step 2" in report
    assert "During: forward" in report
    assert OOM_MESSAGE in report
    assert "No allocator snapshot" in report and not (tmp_path / OOM_SNAPSHOT).exists()
    for name in ("net.0", "net.1", "net.2"):
        assert name in report
    assert not (tmp_path / REPORT_MD).exists()  # the fit did not end: no end-of-fit report
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    assert profiler.modules._saved_hooks is None
    # Step 2 was a churn step: its profiler stopped with the fit and the failed step is not counted.
    assert not torch.autograd.profiler._is_profiler_enabled
    assert profiler.churn.steps == [] and profiler.churn_observed == []


def test_a_real_cpu_out_of_memory_writes_the_post_mortem_with_the_failed_phase(tmp_path):
    class Greedy(Regressor):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            if self.global_step == 1:
                torch.empty(1 << 50, dtype=torch.uint8)  # 1 PiB: torch's CPU allocator raises a RuntimeError
            return loss

    profiler = MemoryProfiler(module_every_n_steps=1)
    with pytest.raises(RuntimeError, match="can't allocate memory"):
        _fit(Greedy(), profiler, tmp_path, batches=3)
    report = (tmp_path / OOM_MD).read_text()
    assert "Out of memory at step 1" in report and "During: forward" in report
    assert "no stage is on a GPU" in report and "record_history" not in report  # no advice that cannot work
    # The failed phase's peaks so far: a row for the forward on the CPU, not an empty table.
    assert re.search(r"\| forward \| cpu \| \d+(\.\d+)? \|", report.split("## This step so far")[1])


class GreedyInPhase(Regressor):
    """Asks the CPU allocator for 1 PiB (torch raises its RuntimeError) in one phase of batch 3: with two
    micro-batches a step, the second of step 1, after the first filled the step's forward and backward."""

    def __init__(self, phase: str):
        super().__init__()
        self.phase, self.batch_idx = phase, -1

    def _greedy(self, phase: str) -> None:
        if phase == self.phase and self.batch_idx == 3:
            torch.empty(1 << 50, dtype=torch.uint8)

    def training_step(self, batch, batch_idx):
        self.batch_idx = batch_idx
        self._greedy("forward")
        loss = super().training_step(batch, batch_idx)
        loss.register_hook(lambda grad: self._greedy("backward"))
        return loss

    def configure_optimizers(self):
        optimizer = super().configure_optimizers()
        optimizer.register_step_post_hook(lambda *args: self._greedy("optimizer"))
        return optimizer


@pytest.mark.parametrize("phase", PHASES)
def test_out_of_memory_under_accumulation_names_the_phase_that_failed(tmp_path, phase):
    """A later micro-batch's out-of-memory was filed under the optimizer: the first phase of the step still empty."""
    with pytest.raises(RuntimeError, match="can't allocate memory"):
        _fit(GreedyInPhase(phase), MemoryProfiler(churn_steps=0), tmp_path, batches=4, accumulate_grad_batches=2)
    report = (tmp_path / OOM_MD).read_text()
    assert f"Out of memory at step 1\n\nDuring: {phase}\n" in report  # an optimizer step that fails did not finish
    this_step = report.split("## This step so far")[1].split("##")[0]
    assert ("| optimizer | cpu |" in this_step) == (phase == "optimizer")  # the peak goes to the phase that ran


def test_out_of_memory_dump_can_be_turned_off(tmp_path):
    with pytest.raises(torch.cuda.OutOfMemoryError):
        _fit(Regressor(oom_at_step=0), MemoryProfiler(dump_on_oom=False), tmp_path, batches=2)
    assert not (tmp_path / OOM_MD).exists()


OOM_ON_RANK_1 = '''
import datetime, sys
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from hetrain.callbacks.memory import MemoryProfiler


class OomOnRank1(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Linear(8, 1)

    def training_step(self, batch, batch_idx):
        if self.global_rank == 1 and self.global_step == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        x, y = batch
        return F.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


if __name__ == "__main__":
    torch.set_num_threads(1)
    data = TensorDataset(torch.randn(48, 8), torch.randn(48, 1))
    trainer = pl.Trainer(accelerator="cpu", devices=2, max_steps=4, logger=False, enable_progress_bar=False,
                         enable_checkpointing=False, enable_model_summary=False, limit_val_batches=0,
                         strategy=pl.strategies.DDPStrategy(timeout=datetime.timedelta(seconds=60)),
                         default_root_dir=sys.argv[1], callbacks=[MemoryProfiler(churn_steps=0)])
    trainer.fit(OomOnRank1(), DataLoader(data, batch_size=6), ckpt_path=sys.argv[2] if len(sys.argv) > 2 else None)
'''


def test_an_out_of_memory_on_rank_1_is_written_up_by_rank_1(tmp_path):
    """Rank 0 alone wrote post-mortems: rank 1's out-of-memory left none, and rank 0's report named only the
    collective that rank 1's exit broke."""
    script = tmp_path / "two_ranks.py"
    script.write_text(OOM_ON_RANK_1)
    run = subprocess.run([sys.executable, str(script), str(tmp_path)], cwd=tmp_path, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode != 0
    report = (tmp_path / "oom_report_rank1.md").read_text()
    assert report.startswith("# Out of memory on rank 1 at step 1\n\nDuring: forward\n")
    assert "Tried to allocate 20.00 GiB" in report
    assert not (tmp_path / OOM_MD).exists() and not (tmp_path / "oom_report_rank0.md").exists()


def test_a_resumed_part_whose_rank_runs_out_again_keeps_that_ranks_earlier_post_mortem(tmp_path):
    """A part resumed into the run's own directory wrote rank 1's post-mortem over the earlier part's."""
    script = tmp_path / "two_ranks.py"
    script.write_text(OOM_ON_RANK_1)
    scope = {}
    exec(OOM_ON_RANK_1, scope)  # its model, to train the step the part resumes from (rank 0 alone: no error)
    _fit(scope["OomOnRank1"](), MemoryProfiler(churn_steps=0), tmp_path / "first", batches=1).save_checkpoint(
        tmp_path / "step1.ckpt")
    earlier = {"oom_report_rank1.md": "# Out of memory on rank 1 at step 1\n\nthe earlier part's\n",
               "memory_steps_rank1.csv": "step,device,phase,allocated_mib,reserved_mib\n0,cpu,forward,1.000,\n"}
    for name, text in earlier.items():
        (tmp_path / name).write_text(text)
    run = subprocess.run([sys.executable, str(script), str(tmp_path), str(tmp_path / "step1.ckpt")], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode != 0
    for name, text in earlier.items():
        assert (tmp_path / name.replace(".", "-part1.")).read_text() == text
    report = (tmp_path / "oom_report_rank1.md").read_text()
    assert report.startswith("# Out of memory on rank 1 at step 1\n\nDuring: forward\n")


def test_other_errors_write_no_post_mortem_but_the_report_of_the_steps_before(tmp_path):
    class Broken(Regressor):
        def training_step(self, batch, batch_idx):
            if self.global_step == 2:
                raise ValueError("not memory\nsecond line")
            return super().training_step(batch, batch_idx)

    with pytest.raises(ValueError, match="not memory"):
        _fit(Broken(), MemoryProfiler(module_every_n_steps=1), tmp_path, batches=4)
    assert not (tmp_path / OOM_MD).exists()
    md = (tmp_path / REPORT_MD).read_text()
    assert md.startswith("# Memory\n\nThe fit stopped at step 2 with ValueError: not memory. These are the steps")
    assert "second line" not in md and "net.0" in md
    assert len((tmp_path / STEPS_CSV).read_text().splitlines()) == 1 + 2 * len(PHASES)  # steps 0 and 1, the CPU


def test_a_step_another_callback_fails_after_is_reported_and_a_failed_step_is_not(tmp_path):
    class StopAfterStep1(pl.Callback):  # before the profiler: its on_train_batch_end never runs for step 1
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == 2:
                raise RuntimeError("stopped in nn.Linear.")

    profiler = MemoryProfiler(module_every_n_steps=1, churn_steps=0)
    trainer = pl.Trainer(accelerator="cpu", max_steps=4, logger=False, default_root_dir=tmp_path,
                         enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
                         limit_val_batches=0, callbacks=[StopAfterStep1(), profiler])
    model = Regressor()
    with pytest.raises(RuntimeError, match="stopped in"):
        trainer.fit(model, _loader(4))
    assert [s["step"] for s in profiler.steps] == [0, 1]
    md = (tmp_path / REPORT_MD).read_text()
    assert "with RuntimeError: stopped in nn.Linear. These are the steps before it." in md  # one full stop
    assert "net.0" in profiler.modules.records and profiler.static["params"] == {"cpu": _nbytes(*model.parameters())}
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_a_step_that_fails_part_way_leaves_no_per_module_numbers(tmp_path):
    class Broken(Regressor):
        def training_step(self, batch, batch_idx):
            self.net(batch[0])  # the hooked step's forward has run in part
            raise ValueError("broken")

    profiler = MemoryProfiler(module_every_n_steps=1, churn_steps=0)
    with pytest.raises(ValueError, match="broken"):
        _fit(Broken(), profiler, tmp_path)
    assert "No training step completed" in (tmp_path / REPORT_MD).read_text()
    assert profiler.modules.records == {}  # the plot draws no module bars from the failed step either


def test_a_fit_with_no_step_says_so_instead_of_empty_tables(tmp_path):
    paths = MemoryReport([]).write(tmp_path)
    assert "No training step completed" in paths["md"].read_text()
    assert "Peak per device" not in paths["md"].read_text()
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


class DollarNames(Regressor):
    def __init__(self):
        super().__init__()
        # Wide enough for a bar in MiB: a name with no bar is not drawn.
        self.net = nn.ModuleDict({"a$\\b$": nn.Linear(IN, 1024), "cost_$x^2$": nn.Linear(IN, 1024)})

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(sum(m(x) for m in self.net.values()).sum(1, keepdim=True), y)


def test_module_names_with_dollar_signs_are_plotted_as_text(tmp_path):
    """The plot parsed names as mathtext: a ModuleDict key "a$\\b$" failed the finished fit at its end."""
    profiler = MemoryProfiler(churn_steps=0)
    _fit(DollarNames(), profiler, tmp_path, batches=2)
    assert (tmp_path / REPORT_PNG).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "a$\\b$" in (tmp_path / REPORT_MD).read_text()


class Unplottable(MemoryReport):
    def plot_png(self) -> bytes:
        raise ValueError("no font to draw with")


def test_a_plot_that_cannot_be_drawn_leaves_the_tables_written_and_warns(tmp_path, caplog):
    (tmp_path / REPORT_PNG).write_bytes(b"an earlier run's plot")
    with caplog.at_level(logging.WARNING, logger="hetrain.callbacks.memory_report"):
        paths = Unplottable([]).write(tmp_path)
    assert "no font to draw with" in caplog.text and str(tmp_path / REPORT_PNG) in caplog.text
    assert not (tmp_path / REPORT_PNG).exists() and "png" not in paths
    assert "No plot: drawing it failed with ValueError(&#x27;no font to draw with" in paths["html"].read_text()
    assert "No training step completed" in paths["md"].read_text() and paths["csv"].exists()


def test_a_tied_weight_and_a_passed_on_output_are_counted_once():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Linear(IN, HIDDEN, bias=False)
            self.same = nn.Identity()  # returns its input: no new output memory
            self.decode = nn.Linear(HIDDEN, IN, bias=False)
            self.decode.weight = nn.Parameter(self.embed.weight.detach().T.contiguous())
            self.tied = nn.Linear(IN, HIDDEN, bias=False)
            self.tied.weight = self.embed.weight  # shared, as tied embeddings are

        def forward(self, x):
            return self.decode(self.same(self.embed(x))) + self.tied(x).sum()

    torch.manual_seed(0)
    model = Tied()
    tracker = _measured_step(model, torch.randn(BATCH, IN))
    r = tracker.records
    weight = _nbytes(model.embed.weight)
    assert r["embed"].params == r["embed"].grads == weight  # the first owner holds it
    assert r["tied"].params == r["tied"].grads == 0
    header, rows = tracker.table()
    total = dict(zip(header, rows[-1], strict=True))
    assert total["params MiB"] == round(_nbytes(*model.parameters()) / 2**20, 3)  # as parameters() counts it
    assert r["same"].outputs == 0 and r["embed"].outputs == 4 * BATCH * HIDDEN


def test_outputs_freed_during_the_forward_are_counted_even_where_memory_is_reused():
    # An output dropped in the forward frees its address, and the next output of that size may take it: the
    # storage is new, so it counts.
    class Double(nn.Module):
        def forward(self, x):
            return 2 * x

    numel = cpu_memory.GLIBC_MAX_MMAP_THRESHOLD // 4  # a block hetrain's host allocator keeps and hands out again
    model = nn.Sequential(*[Double() for _ in range(4)])
    addresses = []
    handles = [m.register_forward_hook(lambda m, args, out: addresses.append(out.data_ptr())) for m in model]
    with torch.no_grad(), cpu_memory.host_memory("keep"):
        tracker = ModuleMemory(model)
        tracker.start()
        model(torch.randn(numel))
        tracker.stop()
    for handle in handles:
        handle.remove()
    assert addresses[2] == addresses[0]  # the third output took the first's freed block: the case tested
    assert [tracker.records[str(i)].outputs for i in range(4)] == [4 * numel] * 4


def test_a_resumed_fit_measures_its_own_steps(tmp_path):
    first = _fit(Regressor(), MemoryProfiler(), tmp_path / "a", batches=3)
    checkpoint = tmp_path / "at3.ckpt"
    first.save_checkpoint(checkpoint)
    profiler = MemoryProfiler(module_every_n_steps=100, churn_steps=1)
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(accelerator="cpu", max_steps=6, logger=False, default_root_dir=tmp_path / "b",
                         enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
                         limit_val_batches=0, callbacks=[profiler])
    trainer.fit(Regressor(), _loader(6), ckpt_path=checkpoint)
    assert profiler.start_step == 3 and [s["step"] for s in profiler.steps] == [3, 4, 5]
    # The fit's first step is hooked and its churn step is its third, wherever it starts.
    assert "net.0" in profiler.modules.records and profiler.churn_observed == [5]
    params = _nbytes(*trainer.lightning_module.parameters())
    assert profiler.static["params"] == {"cpu": params} and profiler.static["grads"] == {"cpu": params}
    assert [profiler.instruments_step(s) for s in range(3, 7)] == [True, False, True, False]


def test_resuming_a_fit_that_has_nothing_left_to_train_keeps_the_earlier_report(tmp_path):
    """Lightning skips a fit resumed at its max_epochs: the profiler wrote an empty report over the earlier fit's."""
    profiler = MemoryProfiler(churn_steps=0)
    _fit(Regressor(), profiler, tmp_path, max_steps=-1, max_epochs=1).save_checkpoint(tmp_path / "done.ckpt")
    assert [s["step"] for s in profiler.steps] == [0, 1, 2]
    report, steps = (tmp_path / REPORT_MD).read_text(), (tmp_path / STEPS_CSV).read_text()
    for directory in (tmp_path, tmp_path / "elsewhere"):
        profiler = MemoryProfiler(directory, churn_steps=0)
        trainer = pl.Trainer(accelerator="cpu", max_epochs=1, logger=False, default_root_dir=tmp_path,
                             enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
                             limit_val_batches=0, callbacks=[profiler])
        trainer.fit(Regressor(), _loader(3), ckpt_path=tmp_path / "done.ckpt")
        assert trainer.global_step == 3 and profiler.steps == []
    assert (tmp_path / REPORT_MD).read_text() == report and (tmp_path / STEPS_CSV).read_text() == steps
    # Where no report was written yet, the report says that no step ran.
    assert "No training step completed" in (tmp_path / "elsewhere" / REPORT_MD).read_text()
    # So does a fresh fit of no step into the same directory: the report there is another run's.
    trainer = pl.Trainer(accelerator="cpu", max_epochs=1, logger=False, default_root_dir=tmp_path,
                         enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
                         limit_train_batches=0, limit_val_batches=0, callbacks=[MemoryProfiler(churn_steps=0)])
    trainer.fit(Regressor(), _loader(3))
    assert "No training step completed" in (tmp_path / REPORT_MD).read_text()


def test_a_fit_resumed_into_its_own_directory_keeps_the_earlier_parts_report_and_steps(tmp_path):
    """A fit resumed into the run's own directory wrote its report and memory_steps.csv over the earlier part's:
    the steps before it were lost. The earlier report is kept as memory_report-part<k>, and the steps file goes on."""
    def resume(ckpt: str, max_steps: int) -> pl.Trainer:
        pl.seed_everything(0, verbose=False)
        trainer = pl.Trainer(accelerator="cpu", max_steps=max_steps, logger=False, default_root_dir=tmp_path,
                             enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
                             limit_val_batches=0, callbacks=[MemoryProfiler(churn_steps=0)])
        trainer.fit(Regressor(), _loader(3), ckpt_path=tmp_path / ckpt)
        return trainer

    def csv_steps() -> list[int]:
        return list(dict.fromkeys(int(r.split(",")[0]) for r in (tmp_path / STEPS_CSV).read_text().splitlines()[1:]))

    def report() -> dict[str, bytes]:
        return {name: (tmp_path / name).read_bytes() for name in (REPORT_MD, REPORT_PNG, REPORT_HTML)}

    def part(k: int) -> dict[str, bytes]:
        return {name: (tmp_path / name.replace(".", f"-part{k}.")).read_bytes()
                for name in (REPORT_MD, REPORT_PNG, REPORT_HTML)}

    _fit(Regressor(), MemoryProfiler(churn_steps=0), tmp_path).save_checkpoint(tmp_path / "step3.ckpt")
    first = report()
    resume("step3.ckpt", max_steps=5)
    assert part(1) == first and csv_steps() == [0, 1, 2, 3, 4]
    assert ("memory_steps.csv (steps before 3 are the run's earlier parts', reported in memory_report-part1.md)"
            in (tmp_path / REPORT_MD).read_text())
    second = report()
    # Resumed from step 3 again: steps 3 and 4 of the part before are not this run's any more.
    resume("step3.ckpt", max_steps=4)
    assert part(1) == first and part(2) == second and csv_steps() == [0, 1, 2, 3]
    assert "reported in memory_report-part2.md)" in (tmp_path / REPORT_MD).read_text()


def _resumed_fit(directory, model, ckpt_path, max_steps: int) -> pl.Trainer:
    """A fit of ``max_steps`` resumed from ``ckpt_path``, its MemoryProfiler writing into ``directory``."""
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(accelerator="cpu", max_steps=max_steps, logger=False, default_root_dir=directory,
                         enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
                         limit_val_batches=0, callbacks=[MemoryProfiler(churn_steps=0)])
    trainer.fit(model, _loader(max_steps), ckpt_path=ckpt_path)
    return trainer


def _csv_steps(directory, name: str = STEPS_CSV) -> list[int]:
    """The steps memory_steps.csv (or ``name``) in ``directory`` holds, in its order."""
    rows = (directory / name).read_text().splitlines()[1:]
    return list(dict.fromkeys(int(r.split(",")[0]) for r in rows))


def test_steps_that_do_not_lead_up_to_the_resumed_step_are_kept_aside_with_their_report(tmp_path, caplog):
    """A resumed fit went on with any memory_steps.csv in its directory: resumed at step 5 where a fit had trained
    3 steps (another run's, or this run's part before one killed unmeasured), the file held steps 0-2 and 5-6. Then
    such a file and its report were written over, losing a crashed run's earlier measurements. Both are kept aside."""
    _fit(Regressor(), MemoryProfiler(churn_steps=0), tmp_path / "b", batches=5).save_checkpoint(tmp_path / "b5.ckpt")
    _fit(Regressor(), MemoryProfiler(churn_steps=0), tmp_path, batches=3)  # steps 0-2, here
    earlier = (tmp_path / REPORT_MD).read_text()
    with caplog.at_level(logging.INFO, logger="hetrain.callbacks.memory"):
        _resumed_fit(tmp_path, Regressor(), tmp_path / "b5.ckpt", max_steps=7)
    assert _csv_steps(tmp_path) == [5, 6] and "earlier parts'" not in (tmp_path / REPORT_MD).read_text()
    assert (tmp_path / "memory_report-part1.md").read_text() == earlier
    assert _csv_steps(tmp_path, "memory_steps-part1.csv") == [0, 1, 2]
    assert "does not lead up to step 5, where this fit resumes (it holds steps 0..2" in caplog.text


def test_a_fit_of_two_optimizers_resumed_into_its_own_directory_goes_on_with_its_steps(tmp_path):
    """Under manual optimization with two optimizers a batch runs two global steps: the steps file's rows (0, 2)
    are two apart, and still lead up to the step resumed at."""
    _fit(TwoOptimizers(), MemoryProfiler(churn_steps=0), tmp_path, batches=2, max_steps=4).save_checkpoint(
        tmp_path / "step4.ckpt")
    _resumed_fit(tmp_path, TwoOptimizers(), tmp_path / "step4.ckpt", max_steps=8)
    assert _csv_steps(tmp_path) == [0, 2, 4, 6] and (tmp_path / "memory_report-part1.md").is_file()


def test_an_out_of_memory_in_a_resumed_fit_names_the_file_that_holds_the_earlier_part(tmp_path):
    """The post-mortem of a fit resumed into its own directory said the steps before it were "reported in
    memory_report-part<k>.md": a literal <k>, and no such file, as only the report written at a fit's end moved the
    earlier part's aside."""
    _fit(Regressor(), MemoryProfiler(churn_steps=0), tmp_path).save_checkpoint(tmp_path / "step3.ckpt")
    earlier = (tmp_path / REPORT_MD).read_text()
    with pytest.raises(torch.cuda.OutOfMemoryError):
        _resumed_fit(tmp_path, Regressor(oom_at_step=4), tmp_path / "step3.ckpt", max_steps=6)
    assert ("(steps before 3 are the run's earlier parts', reported in memory_report-part1.md)"
            in (tmp_path / OOM_MD).read_text())
    assert (tmp_path / "memory_report-part1.md").read_text() == earlier and not (tmp_path / REPORT_MD).exists()
    assert _csv_steps(tmp_path) == [0, 1, 2, 3]


def test_a_resumed_part_that_runs_out_of_memory_again_keeps_the_earlier_post_mortem(tmp_path):
    """A part resumed into the run's own directory wrote its oom_report.md (and snapshot) over the earlier part's: only
    the report written at a fit's end was kept aside as -part<k>."""
    _fit(Regressor(), MemoryProfiler(churn_steps=0), tmp_path).save_checkpoint(tmp_path / "step3.ckpt")
    with pytest.raises(torch.cuda.OutOfMemoryError):
        _resumed_fit(tmp_path, Regressor(oom_at_step=4), tmp_path / "step3.ckpt", max_steps=7)
    (tmp_path / OOM_SNAPSHOT).write_bytes(b"part 2's")  # as a part on a GPU recording its history writes
    with pytest.raises(torch.cuda.OutOfMemoryError):
        _resumed_fit(tmp_path, Regressor(oom_at_step=5), tmp_path / "step3.ckpt", max_steps=7)
    # Numbered as the parts ran: part 1's report, part 2's post-mortem.
    assert (tmp_path / "memory_report-part1.md").is_file()
    assert (tmp_path / "oom_report-part2.md").read_text().startswith("# Out of memory at step 4\n")
    assert (tmp_path / "oom_snapshot-part2.pickle").read_bytes() == b"part 2's"
    assert not (tmp_path / OOM_SNAPSHOT).exists()
    assert (tmp_path / OOM_MD).read_text().startswith("# Out of memory at step 5\n")
    # A part that ends keeps the post-mortem before it aside, as it does a report.
    _resumed_fit(tmp_path, Regressor(), tmp_path / "step3.ckpt", max_steps=5)
    assert (tmp_path / "oom_report-part3.md").read_text().startswith("# Out of memory at step 5\n")
    assert not (tmp_path / OOM_MD).exists() and (tmp_path / REPORT_MD).is_file()


def test_a_profiler_used_for_two_fits_reports_the_second_alone(tmp_path):
    profiler = MemoryProfiler(module_every_n_steps=1, churn_steps=[2])
    for batches in (4, 3):
        _fit(Regressor(), profiler, tmp_path, batches=batches)
    assert [s["step"] for s in profiler.steps] == [0, 1, 2] and profiler.churn_observed == [2]
    assert len(profiler.churn.steps) == 1


def test_a_reused_profiler_whose_next_fit_fails_before_training_keeps_the_earlier_report(tmp_path):
    """The second fit's error report rewrote the first fit's steps as its own."""
    class BrokenValidation(Regressor):
        def validation_step(self, batch, batch_idx):
            raise ValueError("broken validation")

    profiler = MemoryProfiler(module_every_n_steps=1, churn_steps=0)
    _fit(Regressor(), profiler, tmp_path, batches=3)
    first = (tmp_path / REPORT_MD).read_text()
    trainer = pl.Trainer(accelerator="cpu", max_steps=3, logger=False, default_root_dir=tmp_path,
                         enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
                         num_sanity_val_steps=1, callbacks=[profiler])
    with pytest.raises(ValueError, match="broken validation"):
        trainer.fit(BrokenValidation(), _loader(3), _loader(1))  # fails in the sanity check, before training
    assert (tmp_path / REPORT_MD).read_text() == first and profiler.steps == []


class BrokenOptimizers(Regressor):
    def __init__(self, error: BaseException):
        super().__init__()
        self.error = error

    def configure_optimizers(self):
        raise self.error


@pytest.mark.parametrize("error", [ValueError("bad lr schedule"), torch.OutOfMemoryError(OOM_MESSAGE)])
def test_a_reused_profiler_whose_next_fit_fails_before_on_fit_start_reports_no_earlier_step(tmp_path, error):
    """configure_optimizers runs before on_fit_start, where the earlier fit's steps were dropped: its error report
    (or post-mortem) gave them as the failed fit's, over the earlier fit's report."""
    profiler = MemoryProfiler(module_every_n_steps=1, churn_steps=0)
    _fit(Regressor(), profiler, tmp_path, batches=3)
    first = (tmp_path / REPORT_MD).read_text()
    oom = isinstance(error, torch.OutOfMemoryError)
    with pytest.raises(type(error)):  # into the same directory, or (out of memory) its own
        _fit(BrokenOptimizers(error), profiler, tmp_path / "oom" if oom else tmp_path, batches=3)
    assert profiler.steps == [] and profiler.modules is None
    assert (tmp_path / REPORT_MD).read_text() == first
    if oom:  # the post-mortem still names the error, and no step
        text = (tmp_path / "oom" / OOM_MD).read_text()
        assert "During: outside a step" in text and OOM_MESSAGE in text and "No training step completed" in text


def test_the_log_holds_the_device_and_module_tables(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="hetrain.callbacks.memory"):
        _fit(Regressor(), MemoryProfiler(module_every_n_steps=1, churn_steps=0), tmp_path, batches=2)
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "Memory per device, MiB" in logged and "| cpu |" in logged and "peak optimizer MiB" in logged
    assert "Memory per module" in logged and "| net.0 | Linear |" in logged and "| total |" in logged


WIDTH = 64  # BATCH x WIDTH float32 = 1536 bytes: above the tests' min_bytes, and every weight is 16 KiB


class Churner(nn.Module):
    """Makes a fresh zero buffer in every forward: the redundant allocation churn detection must name."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(WIDTH, WIDTH)

    def forward(self, x):
        offset = torch.zeros(x.shape[0], WIDTH)  # a temporary: freed when forward returns
        return self.fc(x) + offset


def _churn_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.ReLU()), Churner(), nn.Linear(WIDTH, 1))


_CHURN_IN_A_FRESH_PROCESS = """
import torch
from hetrain.callbacks.churn import ChurnTracker
model = torch.nn.Linear(8, 8)
tracker = ChurnTracker(model)
for _ in range(2):
    with tracker.step():
        model(torch.randn(4, 8)).sum().backward()
print(len(tracker.steps))
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="the markers stay on where a GPU is visible")
def test_churn_steps_leave_stderr_free_of_the_profilers_log_lines_unless_asked():
    def run(env: dict[str, str]) -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items() if k != "KINETO_LOG_LEVEL"} | env
        return subprocess.run([sys.executable, "-c", _CHURN_IN_A_FRESH_PROCESS], capture_output=True, text=True,
                              env=env, timeout=120, check=True)

    # Kineto's lines: "USDT:2026-12-06 01:55:33 19054:19054 SyncActivityProfilerHandler.cpp:52] profiler_start"
    # (torch 2.13), "STAGE:... ActivityProfilerController.cpp:389] Completed Stage: Warm Up" (2.11).
    kineto_line = re.compile(r"^[A-Z]+:\d{4}-\d\d-\d\d [\d:]+ \d+:\d+ \w+\.cpp:\d+\]", re.MULTILINE)
    quiet = run({})
    assert quiet.stdout.strip() == "2" and not kineto_line.search(quiet.stderr), quiet.stderr
    asked = run({"KINETO_LOG_LEVEL": "2"})  # a level the user set is kept
    assert asked.stdout.strip() == "2" and kineto_line.search(asked.stderr), asked.stderr


def test_churn_tracker_names_the_module_that_allocates_every_step_and_not_the_clean_ones():
    model = _churn_model()
    optimizer = torch.optim.Adam(model.parameters())
    x = torch.randn(BATCH, WIDTH)
    tracker = ChurnTracker(model, min_bytes=1024)

    def step():
        optimizer.zero_grad(set_to_none=True)
        model(x).square().mean().backward()
        optimizer.step()

    step()  # warm-up: Adam's state is made here and kept, which is not churn
    for _ in range(3):
        with tracker.step():
            step()
    assert len(tracker.steps) == 3
    buffer = BATCH * WIDTH * 4
    temporaries = {(a.module, a.phase, a.op, a.size): r.count for r in tracker.rows(["temporary"])
                   for a in [r.allocation]}
    assert temporaries.pop(("1", "forward", "aten::zeros", buffer)) == 1
    # The clean modules make none; torch's for-loop Adam makes sqrt/div scratch for each weight, and says so.
    weight = WIDTH * WIDTH * 4
    assert temporaries.pop(("(Adam.step)", "optimizer", "aten::sqrt", weight)) == 2
    assert all(module == "(Adam.step)" for module, *_ in temporaries), temporaries
    expected = {(a.module, a.phase, a.op, a.kind) for r in tracker.rows(["kept for backward", "passed on"])
                for a in [r.allocation]}
    # ReLU keeps its result for backward; the inner Linear's output is consumed in Churner's forward; the
    # backward's allocations belong to the module whose forward made the autograd node.
    assert ("0.1", "forward", "aten::relu", "kept for backward") in expected
    assert ("1.fc", "forward", "aten::linear", "passed on") in expected
    assert ("1.fc", "backward", "AddmmBackward0/aten::mm", "passed on") in expected
    assert ("0.1", "backward", "ReluBackward0/aten::threshold_backward", "passed on") in expected
    assert all(r.allocation.size >= 1024 for r in tracker.rows())
    assert tracker.totals()["temporary"] == sum(r.bytes_per_step for r in tracker.rows(["temporary"]))
    # Nothing stays hooked or profiling between steps.
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    assert not torch.autograd.profiler._is_profiler_enabled


def test_churn_tracker_leaves_a_compiled_module_compiled_whole():
    model = _churn_model()
    model[1].compile(backend="aot_eager")
    x = torch.randn(BATCH, WIDTH)
    model(x).square().mean().backward()  # compiled before the tracker's steps
    torch._dynamo.utils.counters.clear()
    tracker = ChurnTracker(model, min_bytes=1024)
    for _ in range(2):
        with tracker.step():
            model(x).square().mean().backward()
    # Dynamo traces a compiled module's hooks: a profiler range opened in one hook and closed in another broke
    # its graph, so the steps profiled were not the steps that run.
    assert sum(torch._dynamo.utils.counters["graph_break"].values()) == 0
    modules = {r.allocation.module for r in tracker.rows()}
    assert "0.1" in modules  # eager modules keep their names
    assert not any(m.startswith("1.") for m in modules), modules  # the compiled graph has no submodules


def test_churn_tells_an_ops_own_workspace_from_a_modules_temporary():
    class Gate(nn.Module):
        def forward(self, x):
            with torch.no_grad():  # no autograd: the composite op frees its products before it returns
                gate = torch.cosine_similarity(x, x.flip(0), dim=1)
            return x * gate[:, None]

    model = nn.Sequential(nn.Linear(WIDTH, WIDTH), Gate())
    tracker = ChurnTracker(model, min_bytes=1024)
    for _ in range(2):
        with tracker.step():
            model(torch.randn(BATCH, WIDTH)).sum().backward()
    kinds = {(r.allocation.module, r.allocation.op): r.allocation.kind for r in tracker.rows()}
    assert kinds[("1", "aten::cosine_similarity")] == "op workspace"
    assert kinds[("1", "aten::flip")] == "temporary"  # the flipped copy outlives flip, not Gate's forward
    assert kinds[("1", "aten::mul")] == "passed on" and kinds[("0", "aten::linear")] == "passed on"


def test_churn_labels_a_checkpointed_forward_run_again_in_the_backward_as_recompute():
    from torch.utils.checkpoint import checkpoint

    class Checkpointed(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.ReLU())
            self.head = nn.Linear(WIDTH, 1)

        def forward(self, x):
            return self.head(checkpoint(self.inner, x, use_reentrant=False))

    torch.manual_seed(0)
    model = Checkpointed()
    x = torch.randn(BATCH, WIDTH)
    tracker = ChurnTracker(model, min_bytes=1024)
    for _ in range(2):
        with tracker.step():
            model(x).sum().backward()
    rows = {(a.module, a.phase, a.op, a.kind) for r in tracker.rows() for a in [r.allocation]}
    # The first forward keeps nothing inside the checkpointed block (its output, ReLU's, is the head's input); what
    # the run again in the backward makes outlives that run. It was labelled "forward" and "kept for backward", so
    # the block looked like it kept activations in the forward.
    assert ("inner.0", "forward", "aten::linear", "passed on") in rows
    assert ("inner.0", "recompute", "aten::linear", "recomputed") in rows
    assert ("inner.1", "recompute", "aten::relu", "recomputed") in rows
    assert ("inner.0", "forward", "aten::linear", "kept for backward") not in rows


def test_churn_tracker_drops_a_step_that_raises_and_cleans_up():
    model = _churn_model()
    tracker = ChurnTracker(model)
    with pytest.raises(RuntimeError, match="shape"), tracker.step():
        model(torch.randn(BATCH, WIDTH + 1))
    assert tracker.steps == [] and not tracker.active
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    assert not torch.autograd.profiler._is_profiler_enabled


def test_churn_keeps_only_allocations_made_in_every_step_with_their_fewest_count():
    every = Allocation("cpu", "a", "forward", "aten::zeros", "temporary", 4096)
    sometimes = Allocation("cpu", "b", "forward", "aten::empty", "temporary", 1 << 20)
    big = Allocation("cpu", OUTSIDE, "backward", "MulBackward0/aten::mul", "passed on", 8192)
    steps = [Counter({every: 3, sometimes: 1, big: 1}), Counter({every: 2, big: 1}), Counter({every: 2, big: 2})]
    rows = churned(steps)
    assert [(r.allocation, r.count, r.bytes_per_step) for r in rows] == [(big, 1, 8192), (every, 2, 8192)]
    assert churned([]) == []


class ChurnRegressor(Regressor):
    def __init__(self):
        super().__init__()
        self.net = _churn_model()

    def training_step(self, batch, batch_idx):
        x, _ = batch
        return self.net(x.repeat(1, WIDTH // IN)).square().mean()


def test_profiler_reports_allocator_churn_of_the_chosen_steps(tmp_path, caplog):
    profiler = MemoryProfiler(churn_steps=[1, 3], churn_min_bytes=1024, module_every_n_steps=100)
    model = ChurnRegressor()
    with caplog.at_level(logging.INFO, logger="hetrain.callbacks.memory"):
        _fit(model, profiler, tmp_path, batches=4)
    assert profiler.churn_observed == [1, 3] and len(profiler.churn.steps) == 2
    rows = profiler.churn.rows(["temporary"])
    assert ("net.1", "aten::zeros", BATCH * WIDTH * 4) in {(r.allocation.module, r.allocation.op, r.allocation.size)
                                                            for r in rows}
    assert not any(r.allocation.module.startswith(("net.0", "net.2")) for r in rows)
    md, page = (tmp_path / REPORT_MD).read_text(), (tmp_path / REPORT_HTML).read_text()
    for text in (md, page):
        assert "Allocator churn" in text and "Steps 1, 3" in text and "Temporaries to remove" in text
        assert "net.1" in text and "aten::zeros" in text and "kept for backward" in text
    assert "| net.1 | forward | aten::zeros | temporary | cpu | 1536 | 1 |" in md
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "Allocator churn, steps [1, 3]" in logged and "| net.1 | forward | aten::zeros |" in logged
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    assert not torch.autograd.profiler._is_profiler_enabled


def test_churn_leaves_steps_traced_by_step_trace_alone(tmp_path):
    profiler = MemoryProfiler(churn_steps=[1, 2, 3], module_every_n_steps=100)
    trace = StepTrace([2, 3], dirpath=tmp_path)
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(accelerator="cpu", max_steps=5, logger=False, default_root_dir=tmp_path,
                         enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
                         limit_val_batches=0, callbacks=[profiler, trace])  # the memory profiler's hooks run first
    trainer.fit(Regressor(), _loader(5))
    assert profiler.churn_observed == [1]
    assert (tmp_path / "trace_steps_2-3.json").stat().st_size > 0


def test_churn_steps_all_traced_by_step_trace_are_named_as_the_reason(tmp_path):
    """The report said "no churn step completed", as if training had ended, when StepTrace had traced every step churn
    would have profiled (as after a resume into a trace's steps)."""
    profiler = MemoryProfiler(churn_steps=2, module_every_n_steps=100)
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(accelerator="cpu", max_steps=4, logger=False, default_root_dir=tmp_path,
                         enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
                         limit_val_batches=0, callbacks=[profiler, StepTrace([2, 10], dirpath=tmp_path)])
    trainer.fit(Regressor(), _loader(4))
    assert ("Not measured (2 steps from the fit's step 2 asked for): every churn step the fit reached was traced by "
            "StepTrace.\n\nNot profiled: steps 2..3, traced by StepTrace (two torch profilers cannot record at "
            "once).") in (tmp_path / REPORT_MD).read_text()
    assert profiler.churn_observed == [] and profiler.churn_traced == [2, 3]  # not step 4, placed but never run


class InstrumentedAsItBegins(pl.Callback):
    """Notes whether each step is instrumented as it begins, as Throughput asks before the step runs."""

    def __init__(self, profiler: MemoryProfiler):
        self.profiler, self.seen = profiler, []

    def on_train_batch_start(self, trainer, *args):
        self.seen.append(self.profiler.instruments_step(trainer.global_step))


@pytest.mark.parametrize(("churn_steps", "asked", "where"), [(3, "3 steps from the fit's step 2", "steps 2..7"),
                                                             ([2, 4], "steps [2, 4]", "steps 2, 4")])
def test_churn_under_a_torch_profiler_around_the_fit_profiles_and_instruments_no_step(tmp_path, caplog, churn_steps,
                                                                                    asked, where):
    """Under a torch.profiler.profile around the fit (or emit_nvtx, for Nsight) a count placed its next churn step at
    every step, each refused with a warning; every one was "instrumented", so Throughput timed almost no step; and the
    report said only that no churn step completed."""
    profiler = MemoryProfiler(churn_steps=churn_steps, module_every_n_steps=100)
    begins = InstrumentedAsItBegins(profiler)
    with caplog.at_level(logging.WARNING), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]):
        _fit(Regressor(), profiler, tmp_path, batches=8, callbacks=[begins, profiler])
    assert profiler.churn_observed == [] and profiler.churn_steps == [] and profiler.churn.steps == []
    assert begins.seen == [profiler.instruments_step(s) for s in range(8)] == [True] + [False] * 7  # step 0's hooks
    warned = Counter(r.name for r in caplog.records if "another torch profiler" in r.getMessage())
    assert warned == {"hetrain.callbacks.memory": 1}  # once for the fit
    md = (tmp_path / REPORT_MD).read_text()
    assert (f"Not measured ({asked} asked for): another torch profiler (a torch.profiler.profile or autograd's "
            f"emit_nvtx) was recording at {where}, and two cannot record at once.") in md


class ProfileFrom(pl.Callback):
    """Records with a torch profiler of its own from the batch of step ``step`` to the end of training."""

    def __init__(self, step: int):
        self.step, self.profile = step, None

    def on_train_batch_start(self, trainer, *args):
        if trainer.global_step == self.step:
            self.profile = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
            self.profile.__enter__()

    def on_train_end(self, trainer, pl_module):
        self.profile.__exit__(None, None, None)


def test_churn_steps_before_another_profiler_began_are_reported_and_the_later_ones_are_named(tmp_path):
    profiler = MemoryProfiler(churn_steps=[2, 4, 5], churn_min_bytes=1024, module_every_n_steps=100)
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(accelerator="cpu", max_steps=7, logger=False, default_root_dir=tmp_path,
                         enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
                         limit_val_batches=0, callbacks=[ProfileFrom(4), profiler])
    trainer.fit(ChurnRegressor(), _loader(7))
    assert profiler.churn_observed == [2] and not any(profiler.instruments_step(s) for s in (4, 5))
    md = (tmp_path / REPORT_MD).read_text()
    assert ("Not profiled: steps 4, 5, where another torch profiler (a torch.profiler.profile or autograd's emit_nvtx) "
            "was recording (two cannot record at once).") in md
    assert "Steps 2: allocations" in md and "net.1" in md.split("## Allocator churn")[1]


class ProfileSteps(pl.Callback):
    """Records steps ``first``..``last`` with a torch profiler of its own, as a trace of a few steps (or a profiler's
    schedule) does; run before MemoryProfiler, it has begun when churn would begin."""

    def __init__(self, first: int, last: int):
        self.first, self.last, self.profile = first, last, None

    def on_train_batch_start(self, trainer, *args):
        if trainer.global_step == self.first:
            self.profile = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
            self.profile.__enter__()

    def on_train_batch_end(self, trainer, *args):
        if self.profile is not None and trainer.global_step > self.last:
            self.profile.__exit__(None, None, None)
            self.profile = None


@pytest.mark.parametrize(("churn_steps", "observed", "refused"),
                         [(3, [4, 5, 6], "steps 2..3"), ([2, 5], [5], "step 2")])
def test_churn_profiles_the_steps_after_a_profiler_of_a_few_steps(tmp_path, caplog, churn_steps, observed, refused):
    """Churn stopped for the rest of the fit at the first step where another torch profiler recorded, though that one
    recorded steps 2 and 3 only: a count measured nothing, where it made those steps up later before."""
    profiler = MemoryProfiler(churn_steps=churn_steps, churn_min_bytes=1024, module_every_n_steps=100)
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(accelerator="cpu", max_steps=9, logger=False, default_root_dir=tmp_path,
                         enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
                         limit_val_batches=0, callbacks=[ProfileSteps(2, 3), profiler])
    with caplog.at_level(logging.WARNING, logger="hetrain.callbacks.memory"):
        trainer.fit(ChurnRegressor(), _loader(9))
    assert profiler.churn_observed == observed and not any(profiler.instruments_step(s) for s in (2, 3))
    assert len([r for r in caplog.records if "another torch profiler" in r.getMessage()]) == 1
    md = (tmp_path / REPORT_MD).read_text()
    assert (f"Not profiled: {refused}, where another torch profiler (a torch.profiler.profile or autograd's "
            f"emit_nvtx) was recording (two cannot record at once).") in md
    assert f"Steps {', '.join(map(str, observed))}: allocations" in md


def test_a_refused_churn_step_is_named_as_the_step_it_was(tmp_path):
    """churn_steps [2, 3, 6]: StepTrace took 2 and 3, a validation after step 2 ended its trace, so churn took step 3
    back (placed after 6), and a profiler of the user's recorded from step 3. The report named step 6, the first of
    the steps left, as where that profiler began."""
    profiler = MemoryProfiler(churn_steps=[2, 3, 6], module_every_n_steps=100)
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(accelerator="cpu", max_steps=8, logger=False, default_root_dir=tmp_path,
                         enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
                         val_check_interval=3, limit_val_batches=1, num_sanity_val_steps=0,
                         callbacks=[ProfileFrom(3), StepTrace([2, 3], tmp_path), profiler])
    trainer.fit(ValidatedRegressor(), _loader(8), _loader(1))
    assert profiler.churn_observed == [] and profiler.churn_traced == [2]
    md = (tmp_path / REPORT_MD).read_text()
    assert ("Not measured (steps [2, 3, 6] asked for): another torch profiler (a torch.profiler.profile or autograd's "
            "emit_nvtx) was recording at steps 3, 6, and two cannot record at once.") in md


def _peaks_of_step(n: int, g: torch.Generator) -> dict:
    """A step's made-up peaks: the CPU's allocated and kept every step, a GPU's allocated and reserved every third."""
    out = {"step": n}
    for phase in PHASES:
        allocated, kept, gpu = torch.randint(0, 2**34, (3,), generator=g).tolist()
        out[phase] = {"cpu": {"allocated": allocated, "kept": kept}}
        if n % 3 == 0:
            out[phase]["cuda:0"] = {"allocated": gpu, "reserved": gpu + 2**20}
    return out


def test_step_peaks_hold_a_bounded_series_with_the_exact_maxima_and_every_steps_rows():
    """Every step's peaks were held, one dict per step, for the whole fit: 1.4 KiB a step on the CPU, 1.3 GiB over a
    million steps, which the CPU's resident set the report shows counted too."""
    g = torch.Generator().manual_seed(0)
    peaks, steps = StepPeaks(limit=8), []
    for n in range(1000):
        step = _peaks_of_step(n, g)
        steps.append(copy.deepcopy(step))
        peaks.add(step)
        assert len(peaks.points) <= 8
    assert peaks.count == 1000 and peaks.steps_per_point == 128
    assert [p["step"] for p in peaks.points] == list(range(0, 1000, 128))  # evenly spaced
    every, bounded = MemoryReport(steps), MemoryReport(peaks.points)
    assert bounded.device_table() == every.device_table() and bounded.kept_host_note() == every.kept_host_note()
    rows = io.BytesIO()
    peaks.copy_rows(rows)
    assert rows.getvalue().decode() == every.steps_csv().partition("\n")[2]  # every step's rows, as they were
    for i, point in enumerate(peaks.points):  # each point: the peaks of its own steps
        assert point["forward"]["cpu"]["allocated"] == max(
            s["forward"]["cpu"]["allocated"] for s in steps[128 * i:128 * (i + 1)])
    peaks.close()
    with pytest.raises(ValueError, match="even limit"):
        StepPeaks(limit=7)


def test_a_long_fit_keeps_a_bounded_series_and_its_steps_file_every_step(tmp_path, monkeypatch):
    monkeypatch.setattr(memory, "MAX_STEP_POINTS", 4)
    profiler = MemoryProfiler(churn_steps=0)
    _fit(Regressor(), profiler, tmp_path, batches=10)
    assert [s["step"] for s in profiler.steps] == [0, 4, 8]
    assert _csv_steps(tmp_path) == list(range(10))
    rows = [r.split(",") for r in (tmp_path / STEPS_CSV).read_text().splitlines()[1:]]
    header, (cpu,) = profiler.report().device_table()
    for phase in PHASES:  # the table's peaks are every step's, not only the points'
        assert cpu[header.index(f"peak {phase} MiB")] == max(float(r[3]) for r in rows if r[2] == phase)


def _strings_held(obj) -> list[str]:
    """The strings ``obj`` holds through hetrain objects' attributes and containers (not through modules or
    tensors)."""
    out, seen, todo = [], set(), [obj]
    while todo:
        o = todo.pop()
        if id(o) in seen or isinstance(o, nn.Module | torch.Tensor | type):
            continue
        seen.add(id(o))
        if isinstance(o, str):
            out.append(o)
        elif isinstance(o, dict):
            todo.extend([*o.keys(), *o.values()])
        elif isinstance(o, list | tuple | set | frozenset):
            todo.extend(o)
        elif type(o).__module__.startswith("hetrain") and hasattr(o, "__dict__"):
            todo.extend(vars(o).values())
    return out


@pytest.mark.parametrize("oom_at_step", [None, 4])
def test_a_resumed_fit_holds_no_earlier_row_and_writes_the_steps_file_a_chunk_at_a_time(tmp_path, monkeypatch,
                                                                                       oom_at_step):
    """A fit resumed into its run's directory held every row of memory_steps.csv before its first step as a string
    for the whole fit (3 million rows, 262 MiB, after 500 000 steps), and the report, or the post-mortem, wrote the
    file as one string of every row."""
    _fit(Regressor(), MemoryProfiler(churn_steps=0), tmp_path).save_checkpoint(tmp_path / "step3.ckpt")
    earlier = (tmp_path / STEPS_CSV).read_text()
    profiler, held = MemoryProfiler(churn_steps=0), []

    class Look(pl.Callback):
        def on_train_batch_end(self, *args):
            held.extend(s for s in _strings_held(profiler) if re.match(r"\d+,cpu,", s))

    def one_string(report):
        raise AssertionError("the steps file as one string")

    monkeypatch.setattr(memory._FitReport, "steps_csv", one_string)
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(accelerator="cpu", max_steps=5, logger=False, default_root_dir=tmp_path,
                         enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
                         limit_val_batches=0, callbacks=[profiler, Look()])
    if oom_at_step is None:
        trainer.fit(Regressor(), _loader(5), ckpt_path=tmp_path / "step3.ckpt")
    else:
        with pytest.raises(torch.cuda.OutOfMemoryError):
            trainer.fit(Regressor(oom_at_step=oom_at_step), _loader(5), ckpt_path=tmp_path / "step3.ckpt")
    assert held == [] and profiler._peaks.earlier == 3 * len(PHASES)
    assert (tmp_path / STEPS_CSV).read_text().startswith(earlier)
    assert _csv_steps(tmp_path) == ([0, 1, 2, 3, 4] if oom_at_step is None else [0, 1, 2, 3])
    report = (tmp_path / (REPORT_MD if oom_at_step is None else OOM_MD)).read_text()
    assert "(steps before 3 are the run's earlier parts', reported in memory_report-part1.md)" in report


def _temporary_files() -> set[str]:
    """The temporary files, deleted once closed, this process holds open."""
    links = {}
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            links[fd] = os.readlink(f"/proc/self/fd/{fd}")
    return {fd for fd, link in links.items() if link.startswith(tempfile.gettempdir()) and link.endswith("(deleted)")}


def test_a_fits_rows_file_is_closed_when_it_ends_and_its_report_still_holds_every_row(tmp_path):
    """A finished fit kept its rows' temporary file open until the profiler's next fit or its collection (a
    ResourceWarning then), its report rendered after the next fit began held no row, and a copy of the profiler
    failed: an open file cannot be pickled."""
    before = _temporary_files()
    profiler = MemoryProfiler(churn_steps=0)
    _fit(Regressor(), profiler, tmp_path / "a", batches=3)
    assert _temporary_files() == before
    rows = (tmp_path / "a" / STEPS_CSV).read_text()
    report, copied = profiler.report(), copy.deepcopy(profiler)
    _fit(Regressor(), profiler, tmp_path / "b", batches=2)  # the profiler's next fit
    for i, kept in enumerate((report, copied.report())):
        kept.write(tmp_path / f"again{i}")
        assert (tmp_path / f"again{i}" / STEPS_CSV).read_text() == rows
        assert "It is incomplete" not in (tmp_path / f"again{i}" / REPORT_MD).read_text()
    _fit(Regressor(), MemoryProfiler(churn_steps=0), tmp_path / "a", batches=2)  # the file is written over
    report.write(tmp_path / "over")
    assert (tmp_path / "over" / STEPS_CSV).read_text().splitlines() == [STEPS_HEADER]
    assert (f"It is incomplete: the rows were held in a temporary file, closed when the fit ended (or left out of "
            f"this copy of the profiler), and {tmp_path / 'a' / STEPS_CSV} has been written over since."
            in (tmp_path / "over" / REPORT_MD).read_text())


class SmallDisk(io.FileIO):
    """A file on a disk that fills at ``ROOM`` bytes: a write past it writes what fits, the next fails."""

    ROOM = 400

    def write(self, data):
        room = self.ROOM - self.tell()
        if room <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return super().write(bytes(data)[:room])


def test_a_rows_file_that_cannot_be_written_leaves_the_fit_training_and_the_report_says_so(tmp_path, monkeypatch,
                                                                                         caplog):
    """A write error on the rows' temporary file (a full /tmp) raised from on_train_batch_end: the fit ended."""
    def temporary_file(mode="w+b", buffering=-1, encoding=None, **kwargs):
        fd, path = tempfile.mkstemp(dir=tmp_path)
        os.unlink(path)
        raw = SmallDisk(fd, "r+")
        if buffering == 0:
            return raw
        buffered = io.BufferedRandom(raw)
        return buffered if "b" in mode else io.TextIOWrapper(buffered, encoding=encoding)

    monkeypatch.setattr(memory.tempfile, "TemporaryFile", temporary_file)
    with caplog.at_level(logging.WARNING, logger="hetrain.callbacks.memory"):
        trainer = _fit(Regressor(), MemoryProfiler(churn_steps=0), tmp_path, batches=10)
    assert trainer.global_step == 10
    lines = (tmp_path / STEPS_CSV).read_text().splitlines()
    kept = _csv_steps(tmp_path)
    assert 0 < len(kept) < 10 and kept == list(range(len(kept))) and len(lines) == 1 + len(PHASES) * len(kept)
    assert all(re.fullmatch(r"\d+,cpu,\w+,[\d.]+,", line) for line in lines[1:])  # whole rows only
    assert len([r for r in caplog.records if "to a temporary file" in r.getMessage()]) == 1
    assert (f"It is incomplete: the rows from step {len(kept)} on are missing: writing them to a temporary file "
            "failed (OSError(28, 'No space left on device'))." in (tmp_path / REPORT_MD).read_text())


def test_churn_steps_count_turned_off_and_rejected(tmp_path):
    assert MemoryProfiler().churn_steps == [2, 3, 4]
    assert MemoryProfiler(churn_steps=2).churn_steps == [2, 3]
    with pytest.raises(ValueError, match="churn_steps"):
        MemoryProfiler(churn_steps=-1)
    with pytest.raises(ValueError, match="churn_steps"):
        MemoryProfiler(churn_steps=[0, -2])
    profiler = MemoryProfiler(churn_steps=0)
    _fit(Regressor(), profiler, tmp_path, batches=3)
    assert profiler.churn_observed == [] and "Allocator churn" not in (tmp_path / REPORT_MD).read_text()


@pytest.mark.cuda
def test_cuda_numbers_agree_with_torch_counters_and_snapshot_is_written(tmp_path):
    profiler = MemoryProfiler(module_every_n_steps=1, record_history=True)
    model = Regressor()
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(accelerator="gpu", devices=1, max_steps=2, logger=False, default_root_dir=tmp_path,
                         enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
                         limit_val_batches=0, callbacks=[profiler])
    trainer.fit(model, _loader(2))
    params = _nbytes(*model.parameters())
    assert profiler.static["params"] == {"cuda:0": params}
    for step in profiler.steps:
        # The forward peak holds at least the weights, the optimizer peak at least weights, grads and Adam state.
        assert step["forward"]["cuda:0"]["allocated"] >= params
        assert step["optimizer"]["cuda:0"]["allocated"] >= 4 * params
        assert step["forward"]["cuda:0"]["reserved"] >= step["forward"]["cuda:0"]["allocated"]
    assert profiler.modules.records["net.0"].cuda_delta >= 4 * BATCH * HIDDEN
    assert (tmp_path / "memory_snapshot.pickle").stat().st_size > 0


@pytest.mark.cuda
def test_cuda_history_of_a_fit_resumed_into_its_own_directory_keeps_the_earlier_parts(tmp_path):
    def fit(max_steps: int, ckpt_path=None) -> pl.Trainer:
        pl.seed_everything(0, verbose=False)
        trainer = pl.Trainer(accelerator="gpu", devices=1, max_steps=max_steps, logger=False,
                             default_root_dir=tmp_path, enable_progress_bar=False, enable_checkpointing=False,
                             enable_model_summary=False, limit_val_batches=0,
                             callbacks=[MemoryProfiler(record_history=True, churn_steps=0)])
        trainer.fit(Regressor(), _loader(2), ckpt_path=ckpt_path)
        return trainer

    fit(2).save_checkpoint(tmp_path / "step2.ckpt")
    earlier = (tmp_path / "memory_snapshot.pickle").read_bytes()
    fit(3, tmp_path / "step2.ckpt")
    assert (tmp_path / "memory_snapshot-part1.pickle").read_bytes() == earlier
    assert (tmp_path / "memory_snapshot.pickle").stat().st_size > 0


def test_history_steps_are_checked_and_say_when_there_is_no_gpu_to_record(tmp_path, caplog):
    with pytest.raises(ValueError, match="set one"):
        MemoryProfiler(record_history=True, history_steps=[1, 2])
    with pytest.raises(ValueError, match=r"history_steps must be \[first, last\].*memory_profiler.history_steps="):
        MemoryProfiler(history_steps=[3, 1])
    profiler = MemoryProfiler(history_steps=[1, 2])
    with caplog.at_level("INFO", logger="hetrain.callbacks.memory"):
        _fit(Regressor(), profiler, tmp_path, batches=3)  # on the CPU, whatever the machine has
    assert "no stage on a GPU, so no CUDA allocator history to record" in caplog.text
    assert not list(tmp_path.glob("memory_snapshot*"))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_a_second_run_in_the_process_reports_its_own_peak(tmp_path, device):
    """A run reported the process's peak since it started, and what the memory profiler erased in an earlier run:
    a sweep's later jobs inherited earlier jobs' peaks."""
    from hetrain.report import RunRecorder

    if device == "cpu" and not reset_peak_rss():
        pytest.skip("this kernel cannot reset the peak resident set")

    class Staged(Regressor):
        """Reads hetrain's batch dicts and names its stages, which RunRecorder counts and places by."""

        def stages(self):
            return {"net": self.net}

        def training_step(self, batch, batch_idx):
            return super().training_step((batch["x"], batch["labels"]), batch_idx)

    class Big(Staged):
        def training_step(self, batch, batch_idx):
            torch.ones(BIG_BYTES // 4, device=self.device).sum()  # a 256 MiB temporary
            return super().training_step(batch, batch_idx)

    peaks = []
    with cpu_memory.host_memory("system"):  # the host temporary goes back to the system when freed
        for model in (Big(), Staged()):
            recorder = RunRecorder()
            pl.seed_everything(0, verbose=False)
            trainer = pl.Trainer(accelerator="gpu" if device == "cuda" else "cpu", devices=1, max_steps=2,
                                 logger=False, default_root_dir=tmp_path, enable_progress_bar=False,
                                 enable_checkpointing=False, enable_model_summary=False, limit_val_batches=0,
                                 callbacks=[MemoryProfiler(churn_steps=0), recorder])
            samples = [{"x": x, "labels": y} for x, y in _loader(2).dataset]
            trainer.fit(model, DataLoader(samples, batch_size=BATCH))
            peaks.append(peak_memory_mib(recorder.gpus)["cuda:0" if device == "cuda" else "cpu_rss"] * 2**20)
    assert peaks[0] - peaks[1] >= BIG_BYTES * 0.9, peaks


BIG_BYTES = 256 * 2**20


@pytest.mark.cuda
def test_cuda_history_of_chosen_steps_is_written_once_the_last_has_run(tmp_path):
    profiler = MemoryProfiler(module_every_n_steps=1, history_steps=[2, 3])
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(accelerator="gpu", devices=1, max_steps=6, logger=False, default_root_dir=tmp_path,
                         enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
                         limit_val_batches=0, callbacks=[profiler])
    trainer.fit(Regressor(), _loader(6))
    with open(tmp_path / "memory_snapshot_steps_2-3.pickle", "rb") as f:
        snapshot = pickle.load(f)
    assert snapshot["device_traces"] and any(snapshot["device_traces"]), "the two steps' allocations are recorded"
    assert not profiler._recording and not (tmp_path / "memory_snapshot.pickle").exists()


@pytest.mark.cuda
def test_cuda_churn_names_the_module_that_allocates_on_the_gpu():
    class GpuChurner(nn.Module):
        def forward(self, x):
            return x + torch.zeros(x.shape, device=x.device)

    model = nn.Sequential(nn.Linear(WIDTH, WIDTH), GpuChurner()).cuda()
    x = torch.randn(BATCH, WIDTH, device="cuda")
    tracker = ChurnTracker(model, min_bytes=1024)
    for _ in range(3):
        with tracker.step():
            model(x).sum().backward()
    rows = {(r.allocation.module, r.allocation.op, r.allocation.device) for r in tracker.rows(["temporary"])}
    assert ("1", "aten::zeros", "cuda:0") in rows


@pytest.mark.cuda
def test_a_real_cuda_out_of_memory_writes_the_allocator_snapshot_when_history_is_recorded(tmp_path):
    class Greedy(Regressor):
        def training_step(self, batch, batch_idx):
            if self.global_step == 1:
                torch.empty(1 << 50, dtype=torch.uint8, device=self.device)  # 1 PiB: more than any GPU holds
            return super().training_step(batch, batch_idx)

    profiler = MemoryProfiler(module_every_n_steps=1, record_history=True)
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(accelerator="gpu", devices=1, max_steps=3, logger=False, default_root_dir=tmp_path,
                         enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
                         limit_val_batches=0, callbacks=[profiler])
    with pytest.raises(torch.cuda.OutOfMemoryError):
        trainer.fit(Greedy(), _loader(3))
    report = (tmp_path / OOM_MD).read_text()
    assert "Out of memory at step 1" in report and f"Allocator snapshot: {OOM_SNAPSHOT}" in report
    with open(tmp_path / OOM_SNAPSHOT, "rb") as f:
        snapshot = pickle.load(f)
    assert snapshot["segments"] and snapshot["device_traces"], "the snapshot holds the allocator's state and history"


def test_a_step_the_module_skips_leaves_no_hook_or_profiler_after_the_fit(tmp_path):
    """A LightningModule's on_train_batch_start returning -1 skips the rest of the epoch: the hooked, churn-profiled
    step never reached on_train_batch_end, and its module hooks, saved-tensor hooks and torch profiler stayed on
    after the fit (and under a second fit with the same callback)."""
    class SkipsStep2(Regressor):
        def on_train_batch_start(self, batch, batch_idx):
            return -1 if batch_idx == 2 else None

    profiler = MemoryProfiler(module_every_n_steps=1, churn_steps=[2])
    model = SkipsStep2()
    _fit(model, profiler, tmp_path, batches=4, max_epochs=1)
    assert [s["step"] for s in profiler.steps] == [0, 1] and profiler.churn_observed == []
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    assert torch._C._autograd._top_saved_tensors_default_hooks(False) is None
    assert not torch.autograd.profiler._is_profiler_enabled
    _fit(Regressor(), profiler, tmp_path, batches=3)  # the same callback again: it measures the new model only
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    assert "net.0" in profiler.modules.records and profiler.churn_observed == [2]


COLLATE_SPIKE_BYTES = 128 * 2**20


def test_the_runs_peak_keeps_a_spike_between_steps(tmp_path):
    """The profiler reset the peak counters at every batch start without reading them first: a spike between steps
    (the loader's collate, a checkpoint save) was erased from the run's peak."""
    if not reset_peak_rss():
        pytest.skip("this kernel cannot reset the peak resident set: no reset to erase it")

    def spiky_collate(items):
        torch.ones(COLLATE_SPIKE_BYTES // 4).sum()  # touched, then freed
        return default_collate(items)

    profiler = MemoryProfiler(module_every_n_steps=100, churn_steps=0)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=3, logger=False, default_root_dir=tmp_path,
                         enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
                         limit_val_batches=0, callbacks=[profiler])
    with cpu_memory.host_memory("system"):  # the temporary goes back to the system when freed
        forget_erased_peak("cpu")
        before = rss_bytes()
        trainer.fit(Regressor(), DataLoader(_loader(3).dataset, batch_size=BATCH, collate_fn=spiky_collate))
    assert peak_memory_mib([])["cpu_rss"] * 2**20 >= before + COLLATE_SPIKE_BYTES * 0.9


def test_the_post_mortem_writes_the_steps_file_it_names(tmp_path):
    """oom_report.md said "Every step's peaks: memory_steps.csv." and no such file was written."""
    profiler = MemoryProfiler(module_every_n_steps=1, churn_steps=0)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        _fit(Regressor(oom_at_step=2), profiler, tmp_path, batches=4)
    assert f"Every step's peaks: {STEPS_CSV}." in (tmp_path / OOM_MD).read_text()
    lines = (tmp_path / STEPS_CSV).read_text().splitlines()
    assert len(lines) == 1 + 2 * len(PHASES) and lines[-1].startswith("1,cpu,optimizer,")  # steps 0 and 1
    # Under DDP the rank that ran out names its own file: rank 0 may write memory_steps.csv with its report.
    profiler.write_oom_dump(tmp_path / "ddp", 2, torch.cuda.OutOfMemoryError(OOM_MESSAGE), rank=1)
    assert "Every step's peaks: memory_steps_rank1.csv." in (tmp_path / "ddp" / "oom_report_rank1.md").read_text()
    assert (tmp_path / "ddp" / "memory_steps_rank1.csv").read_text().splitlines() == lines
    assert not (tmp_path / "ddp" / STEPS_CSV).exists()


def test_writing_the_report_leaves_the_callers_matplotlib_backend_and_figures():
    """The plot chose pyplot's Agg backend, which switched a notebook's or GUI's backend and closed its figures."""
    import matplotlib
    import matplotlib.pyplot as plt

    original = matplotlib.get_backend()
    matplotlib.use("svg")  # stands for the caller's backend
    figure = plt.figure()
    try:
        png = MemoryReport([]).plot_png()
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        assert matplotlib.get_backend() == "svg" and plt.get_fignums() == [figure.number]
    finally:
        plt.close(figure)
        matplotlib.use(original)


def test_an_error_without_a_message_is_named_without_a_dangling_colon(tmp_path):
    """Ctrl-C's KeyboardInterrupt has no message: the report read "stopped at step 2 with KeyboardInterrupt: ."."""
    class Interrupted(Regressor):
        def training_step(self, batch, batch_idx):
            if self.global_step == 2:
                raise ValueError  # no message, as Ctrl-C's (whose Lightning handling exits the process)
            return super().training_step(batch, batch_idx)

    with pytest.raises(ValueError):
        _fit(Interrupted(), MemoryProfiler(module_every_n_steps=1, churn_steps=0), tmp_path, batches=4)
    md = (tmp_path / REPORT_MD).read_text()
    assert md.startswith("# Memory\n\nThe fit stopped at step 2 with ValueError. These are the steps before it.")


@pytest.mark.parametrize("error", [ValueError("bug in test_step"), torch.cuda.OutOfMemoryError(OOM_MESSAGE)])
def test_an_error_in_test_after_a_fit_leaves_that_fits_report(tmp_path, error):
    """trainer.test() failing after a successful fit rewrote the fit's report as "The fit stopped at step 3 with ...",
    or wrote an out-of-memory post-mortem for it."""
    class BrokenTest(Regressor):
        def test_step(self, batch, batch_idx):
            raise error

    profiler = MemoryProfiler(module_every_n_steps=1, churn_steps=0)
    model = BrokenTest()
    trainer = _fit(model, profiler, tmp_path)
    fitted = (tmp_path / REPORT_MD).read_text()
    with pytest.raises(type(error)):
        trainer.test(model, _loader(1), verbose=False)
    assert (tmp_path / REPORT_MD).read_text() == fitted and not (tmp_path / OOM_MD).exists()
    assert [s["step"] for s in profiler.steps] == [0, 1, 2]


class LazyRegressor(Regressor):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.LazyLinear(HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, 1))


def test_a_lazy_module_is_measured_once_its_first_forward_made_its_parameters(tmp_path):
    """nn.LazyLinear's uninitialized parameters crashed the fit at step 0 ("Attempted to use an uninitialized
    parameter") when the hooked step counted them."""
    profiler = MemoryProfiler(module_every_n_steps=1, churn_steps=0)
    model = LazyRegressor()
    _fit(model, profiler, tmp_path, batches=2)
    lazy = model.net[0]
    weights = _nbytes(lazy.weight, lazy.bias)
    r = profiler.modules.records
    assert r["net.0"].params == r["net.0"].grads == weights  # counted once made, in the step that made them
    assert r["net.0"].saved == _nbytes(torch.empty(BATCH, IN))  # its input, not the weight its forward made
    assert r["net.0"].outputs == 4 * BATCH * HIDDEN
    assert profiler.static["params"] == {"cpu": _nbytes(*model.parameters())}
    assert "| net.0 | Linear |" in (tmp_path / REPORT_MD).read_text()


class TwoOptimizers(pl.LightningModule):
    """Manual optimization: each training_step runs two forwards, each with its backward and its optimizer."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False
        self.net = nn.Sequential(nn.Linear(IN, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, 1))
        self.net2 = nn.Sequential(nn.Linear(IN, 2 * HIDDEN), nn.Tanh(), nn.Linear(2 * HIDDEN, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        for net, optimizer in zip((self.net, self.net2), self.optimizers(), strict=True):
            optimizer.zero_grad()
            self.manual_backward(F.mse_loss(net(x), y))
            optimizer.step()

    def configure_optimizers(self):
        return [torch.optim.Adam(self.net.parameters()), torch.optim.Adam(self.net2.parameters())]


def test_manual_optimization_measures_the_forwards_after_the_first_backward(tmp_path):
    """The hooks stopped watching at the first manual_backward: net2's forward, after it, had no outputs or saved
    tensors."""
    profiler = MemoryProfiler(module_every_n_steps=1, churn_steps=0)
    model = TwoOptimizers()
    _fit(model, profiler, tmp_path, batches=2, max_steps=4)  # the global step advances once per optimizer
    r = profiler.modules.records
    assert r["net2.0"].outputs == r["net2.1"].outputs == 4 * BATCH * 2 * HIDDEN
    assert r["net2.1"].saved == 4 * BATCH * 2 * HIDDEN  # tanh keeps its result; the input x was net.0's already
    assert r["net.1"].saved == r["net.0"].outputs == 4 * BATCH * HIDDEN and r["net.0"].saved == _nbytes(
        torch.empty(BATCH, IN))
    assert r["net2.0"].grads == _nbytes(*model.net2[0].parameters())
    assert r[OUTSIDE_MODULES].saved == 3 * 4 * BATCH  # each mse_loss's prediction, and the targets once
    assert r["net.0"].grads == _nbytes(*model.net[0].parameters())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    assert torch._C._autograd._top_saved_tensors_default_hooks(False) is None


class ZeroesAfterStepping(TwoOptimizers):
    """Each optimizer zeroes its gradients after stepping, as Lightning's manual-optimization docs do."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        for net, optimizer in zip((self.net, self.net2), self.optimizers(), strict=True):
            self.manual_backward(F.mse_loss(net(x), y))
            optimizer.step()
            optimizer.zero_grad()


def test_gradients_per_device_are_those_the_optimizer_steps_saw(tmp_path):
    """Read at the batch's end, the gradients were gone: 0 MiB per device, while the module table held them all."""
    profiler = MemoryProfiler(module_every_n_steps=1, churn_steps=0)
    model = ZeroesAfterStepping()
    _fit(model, profiler, tmp_path, batches=1, max_steps=2)
    params = _nbytes(*model.parameters())
    assert sum(r.grads for r in profiler.modules.records.values()) == params
    assert profiler.static["grads"] == {"cpu": params}


class FailingSGD(torch.optim.SGD):
    """Fails after stepping, as an out-of-memory allocating an optimizer's state would."""

    def step(self, closure=None):
        super().step(closure)
        raise RuntimeError("optimizer step failed")


class FailsInOptimizerStep(Regressor):
    def configure_optimizers(self):
        return FailingSGD(self.parameters(), lr=0.01)


class FailsValidation(Regressor):
    def validation_step(self, batch, batch_idx):
        raise ValueError("validation failed")


def test_the_next_fit_of_the_profiler_leaves_a_failed_fits_model_to_be_freed(tmp_path):
    """The gradients noted for the step were kept by parameter: a fit failing in its optimizer step left its model
    and gradients alive in the profiler through the next fit (here one failing in its sanity check)."""
    profiler = MemoryProfiler(module_every_n_steps=1, churn_steps=0, dump_on_oom=False)
    model = FailsInOptimizerStep()
    weight = weakref.ref(model.net[0].weight)
    with pytest.raises(RuntimeError, match="optimizer step failed"):
        _fit(model, profiler, tmp_path)
    del model
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, default_root_dir=tmp_path, max_steps=1,
                         enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
                         callbacks=[profiler])
    with pytest.raises(ValueError, match="validation failed"):
        trainer.fit(FailsValidation(), _loader(1), _loader(1))
    gc.collect()
    assert weight() is None


def test_a_churn_count_profiles_that_many_steps_under_two_optimizers(tmp_path):
    """churn_steps=2 chose global steps 2 and 3; with two optimizers the global step goes 0, 2, 4, ..., so only one
    step was profiled."""
    profiler = MemoryProfiler(module_every_n_steps=100, churn_steps=2, churn_min_bytes=256)
    model = TwoOptimizers()
    _fit(model, profiler, tmp_path, batches=5, max_steps=10)
    assert [s["step"] for s in profiler.steps] == [0, 2, 4, 6, 8]
    assert profiler.churn_observed == [4, 6] and len(profiler.churn.steps) == 2  # the fit's steps 2 and 3
    assert [profiler.instruments_step(s) for s in (2, 4, 6, 8)] == [False, True, True, False]
    assert "Steps 4, 6:" in (tmp_path / REPORT_MD).read_text()
    # The first optimizer's step comes before the second backward, and is still the optimizer's, not the forward's.
    rows = {(a.module, a.phase, a.op, a.size) for r in profiler.churn.rows() for a in [r.allocation]}
    assert ("(Adam.step)", "optimizer", "aten::sqrt", _nbytes(model.net[0].weight)) in rows
    assert not any(module == OUTSIDE and phase == "forward" for module, phase, *_ in rows)


class ValidatedRegressor(Regressor):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(IN, 1024), nn.ReLU(), nn.Linear(1024, 1))

    def validation_step(self, batch, batch_idx):
        return F.mse_loss(self.net(batch[0]), batch[1])


def test_a_validation_inside_a_churn_step_drops_that_step_and_a_count_profiles_another(tmp_path, caplog):
    """A validation run inside a churn step (val_check_interval inside an accumulation window) was profiled as the
    step's forward: its activations counted as forward churn of the training modules."""
    profiler = MemoryProfiler(module_every_n_steps=100, churn_steps=2, churn_min_bytes=4096)
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(accelerator="cpu", max_steps=5, logger=False, default_root_dir=tmp_path,
                         enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
                         accumulate_grad_batches=2, val_check_interval=5, limit_val_batches=1,
                         num_sanity_val_steps=0, callbacks=[profiler])
    with caplog.at_level(logging.WARNING, logger="hetrain.callbacks.memory"):
        # Validations after batches 4 and 9: inside step 2 (batches 4 and 5), and after step 4.
        trainer.fit(ValidatedRegressor(), _loader(10), _loader(1))
    assert profiler.churn_observed == [3, 4] and profiler.churn_dropped == [2]
    forward = {(r.allocation.module, r.allocation.op): r.count for r in profiler.churn.rows()
               if r.allocation.phase == "forward" and r.allocation.module.startswith("net")}
    assert forward[("net.0", "aten::linear")] == 2  # each observed step's two micro-batches, no validation's
    assert "a validation ran inside step 2, a churn step" in caplog.text and "a later step is profiled" in caplog.text
    md = (tmp_path / REPORT_MD).read_text()
    assert "Not counted: step 2, as a validation ran inside" in md and "Steps 3, 4:" in md


def _fit_validated(tmp_path, profiler: MemoryProfiler, val_check_interval: int) -> None:
    """Ten batches in windows of two (5 steps), validating one batch after every ``val_check_interval`` batches."""
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(accelerator="cpu", max_steps=5, logger=False, default_root_dir=tmp_path,
                         enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
                         accumulate_grad_batches=2, val_check_interval=val_check_interval, limit_val_batches=1,
                         num_sanity_val_steps=0, callbacks=[profiler])
    trainer.fit(ValidatedRegressor(), _loader(10), _loader(1))


def test_a_churn_count_of_one_makes_up_a_dropped_step(tmp_path, caplog):
    """A count of one stopped at its first drop: nothing was measured, though a later step could have been."""
    profiler = MemoryProfiler(module_every_n_steps=100, churn_steps=1)
    with caplog.at_level(logging.WARNING, logger="hetrain.callbacks.memory"):
        _fit_validated(tmp_path, profiler, val_check_interval=5)  # inside step 2 (batches 4 and 5)
    assert profiler.churn_dropped == [2] and profiler.churn_observed == [3]
    assert "allocator churn does not count step 2 (a later step is profiled instead)" in caplog.text
    assert "Steps 3:" in (tmp_path / REPORT_MD).read_text()


def test_a_count_whose_every_step_was_dropped_says_so(tmp_path):
    """The report said "none of 1 steps ... completed", though the steps completed and were dropped."""
    profiler = MemoryProfiler(module_every_n_steps=100, churn_steps=1)
    _fit_validated(tmp_path, profiler, val_check_interval=1)  # inside every step
    assert profiler.churn_dropped == [2, 3] and profiler.churn_observed == []  # one drop made up, not more
    md = (tmp_path / REPORT_MD).read_text()
    assert ("Not measured (1 step from the fit's step 2 asked for): no churn step completed without a validation "
            "inside it.\n\nNot counted: steps 2, 3, as a validation ran inside") in md


@pytest.mark.parametrize("churn_steps", [1, [2]])
def test_a_churn_step_whose_trace_a_validation_ended_before_it_is_profiled_by_churn(tmp_path, churn_steps):
    """StepTrace([1, 4]) was to trace step 2, so churn left it alone; a validation after step 1 ended the trace, and
    step 2 ran under neither profiler while the report said StepTrace had traced it. Churn asked for [2] was lost."""
    profiler = MemoryProfiler(module_every_n_steps=100, churn_steps=churn_steps)
    trace = StepTrace([1, 4], dirpath=tmp_path)
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(accelerator="cpu", max_steps=5, logger=False, default_root_dir=tmp_path,
                         enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
                         val_check_interval=2, limit_val_batches=1, num_sanity_val_steps=0,
                         callbacks=[profiler, trace])
    trainer.fit(ValidatedRegressor(), _loader(5), _loader(1))
    assert (trace._first_traced, trace._last_traced) == (1, 1)  # the validation after step 1 ended it
    assert profiler.churn_observed == [2] and profiler.churn_traced == []
    md = (tmp_path / REPORT_MD).read_text()
    assert "Steps 2:" in md and "Not profiled" not in md


@pytest.mark.parametrize("churn_steps", [1, [4, 6]])
def test_churn_leaves_the_batch_a_trace_begins_before_its_first_step_alone(tmp_path, churn_steps):
    """Two optimizers: batches begin at steps 0, 2, 4, ... and StepTrace([5, 5]) traces the batch from step 4. Churn
    profiled it too (it checked 5 <= step), and two torch profilers at once crashed writing the trace. StepTrace
    now refuses to start under another profiler, so a wrong placement fails here rather than crashing."""
    profiler = MemoryProfiler(module_every_n_steps=100, churn_steps=churn_steps)
    trace = StepTrace([5, 5], dirpath=tmp_path)
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(accelerator="cpu", max_steps=12, logger=False, default_root_dir=tmp_path,
                         enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
                         limit_val_batches=0, callbacks=[profiler, trace])  # the recipe's order
    trainer.fit(TwoOptimizers(), _loader(6))
    assert profiler.churn_observed == [6]
    assert trace.summary == {"trace": str(trace.path)} and (trace._first_traced, trace._last_traced) == (4, 5)
