"""Lazy AdamW for sparse embedding gradients: the kernel against the reference and against torch's own
optimizers where they must agree, untouched rows left alone, errors, SparseAwareAdamW in a model and in a fit."""

import copy
import pickle
import re

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import BaseFinetuning
from torch import nn
from torch.utils.data import DataLoader

from hetrain import plugins
from hetrain.models.bert import BertClassifier
from hetrain.models.task import ClassificationTask
from hetrain.ops.sparse_adamw import OP, sparse_adamw_, sparse_adamw_ref
from hetrain.optim import UNSUPPORTED_SPARSE_OPTIONS, SparseAwareAdamW, sparse_parameters

pytestmark = pytest.mark.filterwarnings("ignore:Sparse invariant checks")
BACKENDS = ["triton", "cpu", "torch"]
TOL = {torch.float64: {"rtol": 1e-12, "atol": 1e-14}, torch.float32: {"rtol": 2e-6, "atol": 2e-7}}


def table(V=37, H=13, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(V, H, generator=g, dtype=dtype) * 0.5 + 0.1).requires_grad_()


def sparse_grad(V, H, n, dtype, seed, cover_all=False):
    """A gradient as nn.Embedding(sparse=True) makes it: n looked-up rows, unsorted, with repeats."""
    g = torch.Generator().manual_seed(seed)
    index = torch.randperm(V, generator=g) if cover_all else torch.randint(V, (n,), generator=g)
    index = torch.cat([index, index[: n // 3]])  # repeats
    values = torch.randn(len(index), H, generator=g, dtype=dtype)
    return torch.sparse_coo_tensor(index[None], values, (V, H))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_each_backend_matches_the_reference_over_steps(backend, dtype):
    p = table(dtype=dtype).detach()
    m, v = torch.zeros_like(p), torch.zeros_like(p)
    p_ref, m_ref, v_ref = p.clone(), m.clone(), v.clone()
    for step in range(1, 5):
        grad = sparse_grad(*p.shape, 20, dtype, seed=step)
        with plugins.use_backend(**{OP: backend}):
            sparse_adamw_(p, m, v, grad, step, lr=1e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1)
        c = grad.coalesce()
        sparse_adamw_ref(p_ref, m_ref, v_ref, c.indices()[0], c.values(), step, 1e-2, 0.8, 0.95, 1e-6, 0.1)
    for got, want in ((p, p_ref), (m, m_ref), (v, v_ref)):
        torch.testing.assert_close(got, want, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_16_bit_table_on_the_cpu_backend_steps_as_the_reference(dtype):
    """The C++ kernel takes float32/float64: a bf16-true run's table failed there (a warning each run, an error
    under strict backends); it steps through the reference instead."""
    p = table(dtype=dtype).detach()
    m, v = torch.zeros_like(p), torch.zeros_like(p)
    p_ref, m_ref, v_ref = p.clone(), m.clone(), v.clone()
    grad = sparse_grad(*p.shape, 20, dtype, seed=1)
    with plugins.use_backend(**{OP: "cpu"}):  # a pinned backend that fails raises
        sparse_adamw_(p, m, v, grad, 1, lr=1e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1)
    # The pairs uncoalesced, as sparse_adamw_ passes them: the reference sums the repeats in float32.
    sparse_adamw_ref(p_ref, m_ref, v_ref, grad._indices()[0], grad._values(), 1, 1e-2, 0.8, 0.95, 1e-6, 0.1)
    assert not torch.equal(p, table(dtype=dtype).detach())
    for got, want in ((p, p_ref), (m, m_ref), (v, v_ref)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("beta2", [0.999, 0.99999])
def test_a_float32_table_takes_one_minus_beta_from_the_exact_betas(backend, beta2):
    """The C++ kernel took 1 - beta2 in float32 from the float32-rounded beta2: the second moment was 1e-5 off at
    beta2=0.999 and 1e-3 off at 0.99999, where torch rounds the double 1 - beta2 once."""
    p = table(V=6, H=5, dtype=torch.float32).detach()
    m, v = torch.zeros_like(p), torch.zeros_like(p)
    p_ref, m_ref, v_ref = p.clone(), m.clone(), v.clone()
    for step in range(1, 3):
        grad = sparse_grad(6, 5, 4, torch.float32, seed=step)
        grad = torch.sparse_coo_tensor(grad._indices(), grad._values() * 10, grad.shape)
        with plugins.use_backend(**{OP: backend}):
            sparse_adamw_(p, m, v, grad, step, lr=1e-2, betas=(0.9, beta2), eps=1e-8, weight_decay=0.0)
        sparse_adamw_ref(p_ref, m_ref, v_ref, grad._indices()[0], grad._values(), step, 1e-2, 0.9, beta2, 1e-8, 0.0)
    for got, want in ((p, p_ref), (m, m_ref), (v, v_ref)):
        torch.testing.assert_close(got, want, **TOL[torch.float32])


def test_the_triton_step_sums_a_16_bit_tables_repeats_in_float32():
    """The repeats were summed in the table's dtype: in bf16 a gradient of 0.01 looked up 1000 times summed to 3.98,
    not 10 (256 + 1 rounds to 256). The reference sums in float32."""
    p = table(V=3, H=4, dtype=torch.bfloat16).detach()
    m, v = torch.zeros_like(p), torch.zeros_like(p)
    p_ref, m_ref, v_ref = p.clone(), m.clone(), v.clone()
    index, values = torch.full((1000,), 1), torch.full((1000, 4), 0.01, dtype=torch.bfloat16)
    with plugins.use_backend(**{OP: "triton"}):
        sparse_adamw_(p, m, v, torch.sparse_coo_tensor(index[None], values, p.shape), 1, lr=1e-3)
    sparse_adamw_ref(p_ref, m_ref, v_ref, index, values, 1, 1e-3, 0.9, 0.999, 1e-8, 1e-2)
    for got, want in ((p, p_ref), (m, m_ref), (v, v_ref)):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_an_fp16_table_steps_in_float32_so_small_gradients_stay_finite(backend):
    """A 16-true run's first step made the table inf: stepped in fp16, the second moment of a 1e-5 gradient underflows
    to 0 and eps=1e-8 rounds to 0. The step must be a float32 step's result rounded to fp16."""
    p = (table(dtype=torch.float32).detach() * 0.04).half()
    m, v = torch.zeros_like(p), torch.zeros_like(p)
    index = torch.tensor([3, 5, 3, 9])
    grad = torch.sparse_coo_tensor(index[None], torch.full((4, p.shape[1]), 1e-5).half(), p.shape)
    want = [t.float() for t in (p, m, v)]
    with plugins.use_backend(**{OP: backend}):
        sparse_adamw_(p, m, v, grad, 1, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    sparse_adamw_(*want, grad.float(), 1, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    assert torch.isfinite(p).all()
    for got, expected in zip((p, m, v), want, strict=True):
        torch.testing.assert_close(got, expected.half())


def step_side_by_side(backend, mine, torchs, grads, as_torchs):
    """Steps hetrain's optimizer and torch's through the same gradients; the parameters must agree."""
    (p, ours), (q, theirs) = mine, torchs
    for grad in grads:
        p.grad, q.grad = grad, as_torchs(grad)
        with plugins.use_backend(**{OP: backend}):
            ours.step()
        theirs.step()
    torch.testing.assert_close(p, q, **TOL[torch.float64])


@pytest.mark.parametrize("backend", BACKENDS)
def test_equals_torch_sparse_adam_without_decay_and_eps(backend):
    # torch's SparseAdam adds eps outside the bias correction, AdamW inside: with a negligible eps and no decay
    # the two rules coincide, so torch's own lazy optimizer is the oracle over several steps of random rows.
    p, q = table(), table()
    ours = SparseAwareAdamW([{"params": [p], "sparse": True}], lr=3e-2, betas=(0.85, 0.9), eps=1e-200,
                            weight_decay=0.0)
    theirs = torch.optim.SparseAdam([q], lr=3e-2, betas=(0.85, 0.9), eps=1e-200)
    grads = [sparse_grad(*p.shape, 25, torch.float64, seed=10 + step) for step in range(5)]
    step_side_by_side(backend, (p, ours), (q, theirs), grads, lambda g: g.clone())


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_row_touched_every_step_is_torch_adamw(backend):
    p, q = table(), table()
    ours = SparseAwareAdamW([{"params": [p], "sparse": True}], lr=2e-2, weight_decay=0.05)
    theirs = torch.optim.AdamW([q], lr=2e-2, weight_decay=0.05, foreach=False)
    grads = [sparse_grad(*p.shape, p.shape[0], torch.float64, seed=20 + step, cover_all=True) for step in range(4)]
    step_side_by_side(backend, (p, ours), (q, theirs), grads, lambda g: g.to_dense())


@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_no_batch_used_keep_their_values_and_moments(backend):
    p = table().detach()
    m, v = torch.rand_like(p), torch.rand_like(p)
    before = [t.clone() for t in (p, m, v)]
    index = torch.tensor([3, 30, 3, 7])
    grad = torch.sparse_coo_tensor(index[None], torch.randn(4, p.shape[1], dtype=p.dtype), p.shape)
    with plugins.use_backend(**{OP: backend}):
        sparse_adamw_(p, m, v, grad, 3, lr=0.1)
    untouched = torch.ones(p.shape[0], dtype=torch.bool)
    untouched[index] = False
    for now, then in zip((p, m, v), before, strict=True):
        assert torch.equal(now[untouched], then[untouched])
        assert not torch.equal(now[index], then[index])


def test_bad_inputs_raise_clear_errors():
    p = table().detach()
    m, v = torch.zeros_like(p), torch.zeros_like(p)
    with pytest.raises(ValueError, match="must be a sparse COO tensor"):
        sparse_adamw_(p, m, v, torch.randn_like(p), 1, lr=0.1)
    out_of_range = torch.sparse_coo_tensor(torch.tensor([[99]]), torch.randn(1, p.shape[1], dtype=p.dtype),
                                           (100, p.shape[1]))
    with pytest.raises(ValueError, match="parameter's shape"):
        sparse_adamw_(p, m, v, out_of_range, 1, lr=0.1)
    grad = sparse_grad(*p.shape, 5, p.dtype, seed=1)
    with pytest.raises(ValueError, match="exp_avg must match the parameter"):
        sparse_adamw_(p, m[:-1], v, grad, 1, lr=0.1)
    with pytest.raises(ValueError, match="step counts from 1"):
        sparse_adamw_(p, m, v, grad, 0, lr=0.1)
    with pytest.raises(RuntimeError, match="is outside the table"):
        torch.ops.hetrain_C.sparse_adamw_(p, m, v, torch.tensor([37]), torch.randn(1, 13, dtype=p.dtype), 1, 0.1,
                                          0.9, 0.999, 1e-8, 0.0)
    emb = nn.Embedding(10, 4)  # dense gradients in a sparse group
    opt = SparseAwareAdamW([{"params": [emb.weight], "sparse": True}])
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(ValueError, match="nn.Embedding\\(..., sparse=True\\); if it is one, the weight is also "
                                         "used by a dense module \\(tied"):
        opt.step()


@pytest.mark.parametrize("row", [-1, 37])
def test_the_triton_step_refuses_a_row_outside_the_table(row):
    # torch builds such a gradient without complaint unless its invariant checks are on; the kernel would write
    # outside the table.
    p = table().detach()
    m, v = torch.zeros_like(p), torch.zeros_like(p)
    # Called directly: sparse_adamw_ refuses such a row before dispatch (below).
    from hetrain.ops.triton import sparse_adamw as triton_step

    with pytest.raises(ValueError, match=f"triton\\): row {row} of the gradient"):
        triton_step.step(p, m, v, torch.tensor([3, row]), torch.randn(2, 13, dtype=p.dtype), 1, 0.1, 0.9, 0.999,
                         1e-8, 0.0)


@pytest.mark.parametrize("backend", [None, *BACKENDS])
@pytest.mark.parametrize("row", [-1, 37])
def test_a_row_outside_the_table_is_refused_before_any_backend_runs(backend, row):
    # The C++ kernel's refusal read as a backend failure: the call fell back to the reference, whose coalesce()
    # of a negative row corrupted the heap (double free) and of a row past the end raised torch's IndexError.
    p = table().detach()
    m, v = torch.zeros_like(p), torch.zeros_like(p)
    before = p.clone()
    grad = torch.sparse_coo_tensor(torch.tensor([[3, row]]), torch.randn(2, 13, dtype=p.dtype), p.shape,
                                   check_invariants=False)
    pins = {} if backend is None else {OP: backend}
    with plugins.use_backend(**pins), pytest.raises(ValueError, match=f"sparse_adamw: row {row} of the gradient "
                                                                       "is outside the table of 37 rows"):
        sparse_adamw_(p, m, v, grad, 1, lr=0.1)
    assert torch.equal(p, before)
    with pytest.raises(RuntimeError, match="index"):  # the reference checks the invariants itself
        sparse_adamw_ref(p, m, v, torch.tensor([3, row]), torch.randn(2, 13, dtype=p.dtype), 1, 0.1, 0.9, 0.999,
                         1e-8, 0.0)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_triton_step_matches_the_reference_on_a_bert_sized_table(dtype):
    V, H = 30522, 768
    p = table(V, H, dtype=dtype).detach()
    m, v = torch.rand_like(p) * 0.01, torch.rand_like(p) * 1e-4
    on_gpu = [t.cuda() for t in (p, m, v)]
    for step in range(1, 4):
        grad = sparse_grad(V, H, 4096, dtype, seed=step)
        with plugins.use_backend(**{OP: "triton"}):
            sparse_adamw_(*on_gpu, grad.cuda(), step, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
        c = grad.coalesce()
        sparse_adamw_ref(p, m, v, c.indices()[0], c.values(), step, 1e-3, 0.9, 0.999, 1e-8, 0.01)
    for got, want in zip(on_gpu, (p, m, v), strict=True):
        torch.testing.assert_close(got.cpu(), want, **TOL[dtype])


def model_and_optimizer(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Embedding(40, 8, sparse=True), nn.Linear(8, 3)).double()
    sparse = sparse_parameters(model)
    dense = [p for p in model.parameters() if all(p is not q for q in sparse)]
    opt = SparseAwareAdamW([{"params": dense}, {"params": sparse, "sparse": True}], lr=1e-2, fused=False)
    return model, opt


def train(model, opt, steps, seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        opt.zero_grad()
        ids = torch.randint(40, (6, 5), generator=g)
        model(ids).sum(1).pow(2).mean().backward()
        opt.step()


def test_dense_groups_step_as_torch_adamw_and_sparse_ones_lazily():
    model, opt = model_and_optimizer()
    ref = [p.detach().clone().requires_grad_() for p in model.parameters()]
    ref_m, ref_v = torch.zeros_like(ref[0]), torch.zeros_like(ref[0])
    dense_ref = torch.optim.AdamW(ref[1:], lr=1e-2, weight_decay=1e-2, foreach=False)
    g = torch.Generator().manual_seed(5)
    for step in range(1, 4):
        opt.zero_grad()
        ids = torch.randint(40, (6, 5), generator=g)
        model(ids).sum(1).pow(2).mean().backward()
        for r, p in zip(ref, model.parameters(), strict=True):
            r.grad = p.grad.clone()
        opt.step()
        dense_ref.step()
        emb_grad = ref[0].grad.coalesce()
        with torch.no_grad():
            sparse_adamw_ref(ref[0], ref_m, ref_v, emb_grad.indices()[0], emb_grad.values(), step, 1e-2, 0.9, 0.999,
                             1e-8, 1e-2)
    for got, want in zip(model.parameters(), ref, strict=True):
        torch.testing.assert_close(got, want, **TOL[torch.float64])


def test_a_state_dict_round_trip_resumes_exactly_and_a_schedule_reaches_the_sparse_rows():
    model, opt = model_and_optimizer()
    train(model, opt, 2, seed=1)
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    train(model, opt, 2, seed=2)
    resumed, resumed_opt = model_and_optimizer(seed=7)
    resumed.load_state_dict(saved_model)
    resumed_opt.load_state_dict(saved_opt)
    train(resumed, resumed_opt, 2, seed=2)
    for a, b in zip(model.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)
    for group in resumed_opt.param_groups:  # what an LR scheduler does: both kinds of group follow
        group["lr"] = 0.0
    before = [p.detach().clone() for p in resumed.parameters()]
    for group in resumed_opt.param_groups:
        group["weight_decay"] = 0.0
    train(resumed, resumed_opt, 1, seed=3)
    for a, b in zip(resumed.parameters(), before, strict=True):
        assert torch.equal(a, b)


def test_the_task_trains_bert_with_sparse_embeddings_in_a_fit(tmp_path):
    model = BertClassifier(vocab_size=64, num_classes=3, hidden=16, layers=1, heads=2, max_len=8, dropout=0.0,
                           sparse_embeddings=True)
    task = ClassificationTask(model, num_classes=3, lr=1e-2)
    opt = task.configure_optimizers()
    assert isinstance(opt, SparseAwareAdamW)
    assert [len(g["params"]) for g in opt.param_groups if g["sparse"]] == [1]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 64, (24, 8), generator=g)
    data = DataLoader([{"input_ids": row, "attention_mask": torch.ones(8, dtype=torch.bool), "labels": row[0] % 3}
                       for row in ids], batch_size=8)
    table_before = model.embeddings.tokens.weight.detach().clone()
    trainer = pl.Trainer(max_steps=6, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                         accumulate_grad_batches=2)
    trainer.fit(task, train_dataloaders=data)
    changed = (model.embeddings.tokens.weight.detach() != table_before).any(1)
    used = torch.zeros(64, dtype=torch.bool)
    used[ids.unique()] = True
    assert changed[used].all() and not changed[~used].any()  # only the rows the batches looked up moved
    clipping = pl.Trainer(max_steps=1, accelerator="cpu", logger=False, gradient_clip_val=1.0,
                          enable_checkpointing=False, enable_progress_bar=False, default_root_dir=tmp_path)
    with pytest.raises(ValueError, match="gradient_clip_val"):
        clipping.fit(ClassificationTask(model, num_classes=3), train_dataloaders=data)


def test_a_dense_group_added_later_steps_like_the_first():
    # What Lightning's BaseFinetuning does when it unfreezes a module: optimizer.add_param_group(...).
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(40, 8, sparse=True), nn.Linear(8, 8), nn.Linear(8, 3)).double()
    opt = SparseAwareAdamW([{"params": sparse_parameters(model), "sparse": True},
                            {"params": model[1].parameters()}], lr=1e-2, fused=False)
    opt.add_param_group({"params": model[2].parameters()})
    before = model[2].weight.detach().clone()
    train(model, opt, 1, seed=0)
    assert not torch.equal(model[2].weight, before), "the added group was never stepped"


def test_a_dense_group_added_after_a_state_load_keeps_the_optimizers_fused_step():
    # torch's load_state_dict calls __setstate__ without "_fused": fused became None, and a group unfrozen after a
    # resume stepped unfused.
    model, _ = model_and_optimizer()
    sparse = sparse_parameters(model)
    dense = [p for p in model.parameters() if all(p is not q for q in sparse)]
    saved = SparseAwareAdamW([{"params": dense}, {"params": sparse, "sparse": True}], fused=True)
    train(model, saved, 1, seed=0)
    resumed = SparseAwareAdamW([{"params": dense}, {"params": sparse, "sparse": True}], fused=True)
    resumed.load_state_dict(saved.state_dict())
    head = nn.Linear(3, 2).double()
    resumed.add_param_group({"params": head.parameters()})
    assert resumed.param_groups[-1]["fused"] is True
    head(model(torch.tensor([[1, 2]]))).sum().backward()
    resumed.step()


@pytest.mark.parametrize("option", ["maximize", "amsgrad"])
def test_an_adamw_option_the_lazy_step_lacks_is_refused_in_a_sparse_group(option):
    # It was ignored: a sparse group with maximize=True minimised.
    weight = nn.Embedding(8, 4, sparse=True).weight
    with pytest.raises(ValueError, match=f"a sparse=True group takes lr, betas, eps and weight_decay; its lazy step "
                                         f"has no {option}"):
        SparseAwareAdamW([{"params": [weight], "sparse": True, option: True}])
    SparseAwareAdamW([{"params": [weight], "sparse": False, option: True}])  # torch's AdamW takes it in a dense group


def test_a_state_saved_by_torch_adamw_loads_and_a_sparse_grad_in_a_dense_group_is_named():
    model, opt = model_and_optimizer()
    plain = torch.optim.AdamW([{"params": list(model[1].parameters())}, {"params": [model[0].weight]}], lr=1e-2)
    opt.load_state_dict(plain.state_dict())  # was KeyError: 'sparse'
    assert [g["sparse"] for g in opt.param_groups] == [False, True]
    train(model, opt, 1, seed=0)
    wrong = SparseAwareAdamW(model.parameters())  # the sparse table in a dense group
    with pytest.raises(ValueError, match="in a dense group got a sparse gradient; put it in a group with sparse=True"):
        train(model, wrong, 1, seed=0)


@pytest.mark.parametrize("clone", [copy.deepcopy, lambda x: pickle.loads(pickle.dumps(x))], ids=["deepcopy", "pickle"])
def test_a_deepcopied_or_pickled_optimizer_steps_as_the_original(clone):
    # torch's pickled state has no inner dense AdamW: the copy's next step raised AttributeError.
    model, opt = model_and_optimizer()
    train(model, opt, 2, seed=1)
    model2, opt2 = clone((model, opt))
    train(model, opt, 2, seed=2)
    train(model2, opt2, 2, seed=2)
    for a, b in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(a, b)
    head = nn.Linear(3, 2).double()  # a dense group added to the copy steps too
    opt2.add_param_group({"params": head.parameters()})
    before = head.weight.detach().clone()
    head(model2(torch.tensor([[1, 2]]))).sum().backward()
    opt2.step()
    assert not torch.equal(head.weight, before)


@pytest.mark.parametrize("bad", [{"lr": -0.1}, {"eps": -1e-8}, {"betas": (0.9, 1.0)}, {"betas": (-0.1, 0.999)},
                                 {"weight_decay": -1.0}])
def test_a_value_torch_adamw_refuses_is_refused_before_any_step(bad):
    # A sparse-only optimizer checked nothing: the C++ kernel's refusal fell back to the reference, which trained
    # a negative lr by ascent; betas >= 1 failed with "math domain error".
    with pytest.raises(ValueError) as torchs:
        torch.optim.AdamW([nn.Parameter(torch.zeros(2))], **bad)
    message = re.escape(str(torchs.value))
    weight = nn.Embedding(8, 4, sparse=True).weight
    with pytest.raises(ValueError, match=message):
        SparseAwareAdamW([{"params": [weight], "sparse": True}], **bad)
    with pytest.raises(ValueError, match=message):
        SparseAwareAdamW([{"params": [weight], "sparse": True, **bad}])
    p = table().detach()
    m, v = torch.zeros_like(p), torch.zeros_like(p)
    before = p.clone()
    with pytest.raises(ValueError, match=message):
        sparse_adamw_(p, m, v, sparse_grad(*p.shape, 5, p.dtype, seed=1), 1, **{"lr": 0.1, **bad})
    assert torch.equal(p, before)


def dense_table_model_and_optimizer(seed=0, **adamw):
    """model_and_optimizer's model with a dense table, in a dense group of its own (same group structure)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Embedding(40, 8), nn.Linear(8, 3)).double()
    opt = SparseAwareAdamW([{"params": list(model[1].parameters())}, {"params": [model[0].weight], **adamw}],
                           lr=1e-2, fused=False)
    return model, opt


def test_a_state_saved_with_the_table_sparse_resumes_it_dense_as_torch_adamw_does():
    # The saved sparse=True replaced the group's own: the dense table's gradient was refused as not sparse.
    sparse_model, sparse_opt = model_and_optimizer()
    train(sparse_model, sparse_opt, 2, seed=1)
    model, opt = dense_table_model_and_optimizer(seed=7)
    model.load_state_dict(sparse_model.state_dict())
    opt.load_state_dict(copy.deepcopy(sparse_opt.state_dict()))
    assert [g["sparse"] for g in opt.param_groups] == [False, False]
    reference = copy.deepcopy(model)
    plain = torch.optim.AdamW([{"params": list(reference[1].parameters())}, {"params": [reference[0].weight]}])
    plain.load_state_dict(copy.deepcopy(sparse_opt.state_dict()))
    train(model, opt, 2, seed=2)
    train(reference, plain, 2, seed=2)
    for a, b in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(a, b, **TOL[torch.float64])


def test_a_state_saved_with_the_table_dense_resumes_it_sparse_and_lazily():
    # The saved sparse=False replaced the group's own: the sparse gradient was refused in a "dense group".
    dense_model, dense_opt = dense_table_model_and_optimizer()
    train(dense_model, dense_opt, 2, seed=1)
    model, opt = model_and_optimizer(seed=7)
    model.load_state_dict(dense_model.state_dict())
    opt.load_state_dict(copy.deepcopy(dense_opt.state_dict()))
    assert [g["sparse"] for g in opt.param_groups] == [False, True]
    assert not set(UNSUPPORTED_SPARSE_OPTIONS) & set(opt.param_groups[1])  # torch AdamW's options left out
    before = model[0].weight.detach().clone()
    ids = torch.tensor([[3, 5, 5]])
    model(ids).sum().backward()
    opt.step()
    moved = (model[0].weight != before).any(1)
    assert moved[[3, 5]].all() and moved.sum() == 2


@pytest.mark.parametrize("option", ["maximize", "amsgrad"])
def test_a_state_saved_with_an_option_the_lazy_step_lacks_is_refused_in_a_sparse_group(option):
    dense_model, dense_opt = dense_table_model_and_optimizer(**{option: True})
    train(dense_model, dense_opt, 1, seed=1)
    _model, opt = model_and_optimizer()
    with pytest.raises(ValueError, match=f"parameter group 1 is sparse=True here, but the state was saved with "
                                         f"{option} on for it"):
        opt.load_state_dict(dense_opt.state_dict())


def test_a_state_with_another_number_of_groups_is_refused():
    # zip dropped the extra group and its state without a word.
    model, opt = model_and_optimizer()
    extra = SparseAwareAdamW([{"params": list(model[1].parameters())}, {"params": [model[0].weight], "sparse": True},
                              {"params": [nn.Parameter(torch.zeros(2))]}])
    with pytest.raises(ValueError, match="the state has 3 parameter groups, this optimizer 2"):
        opt.load_state_dict(extra.state_dict())


class TiedTables(nn.Module):
    """Two sparse tables sharing one weight (e.g. an encoder's and a decoder's token tables), and a head."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Embedding(10, 4, sparse=True), nn.Embedding(10, 4, sparse=True)
        self.b.weight = self.a.weight
        self.head = nn.Linear(4, 3)

    def stages(self):
        return {"emb": nn.ModuleList([self.a, self.b]), "head": self.head}

    def forward(self, ids, mask):
        return self.head((self.a(ids) + self.b(ids)).mean(1))


def test_a_table_tied_between_two_sparse_embeddings_steps_once_a_step():
    # sparse_parameters listed the weight once per table, torch only warned, and the table stepped twice a step.
    task = ClassificationTask(TiedTables(), num_classes=3, lr=0.1, weight_decay=0.0)
    assert [len(g["params"]) for g in task.configure_optimizers().param_groups if g["sparse"]] == [1]
    opt = task.configure_optimizers()
    before = task.model.a.weight.detach().clone()
    task(torch.tensor([[1, 2]]), None).sum().backward()
    opt.step()
    assert opt.state[task.model.a.weight]["step"] == 1
    # AdamW's first step moves each used element by lr.
    torch.testing.assert_close((task.model.a.weight - before)[[1, 2]].abs(), torch.full((2, 4), 0.1))
    for sparse in (True, False):  # listed twice (as BaseFinetuning lists a tied weight), it is held once
        listed = SparseAwareAdamW([{"params": [task.model.a.weight, task.model.b.weight], "sparse": sparse}])
        assert [len(g["params"]) for g in listed.param_groups] == [1]


class Bag(nn.Module):
    def __init__(self, sparse):
        super().__init__()
        self.bag, self.head = nn.EmbeddingBag(20, 4, sparse=sparse), nn.Linear(4, 3)

    def stages(self):
        return {"bag": self.bag, "head": self.head}

    def forward(self, ids, mask):
        return self.head(self.bag(ids))


def test_an_embedding_bag_with_sparse_gradients_steps_lazily_as_torch_adamw_steps_its_dense_twin():
    # nn.EmbeddingBag(sparse=True) was not a sparse table: the task's torch AdamW refused its gradient.
    torch.manual_seed(0)
    task = ClassificationTask(Bag(sparse=True), num_classes=3, lr=0.1, weight_decay=0.0)
    twin = Bag(sparse=False)
    twin.load_state_dict(task.model.state_dict())
    assert [p is task.model.bag.weight for p in sparse_parameters(task)] == [True]
    opt = task.configure_optimizers()
    plain = torch.optim.AdamW(twin.parameters(), lr=0.1, weight_decay=0.0)
    ids = torch.tensor([[1, 2, 2], [5, 1, 7]])
    task(ids, None).sum().backward()
    twin(ids, None).sum().backward()
    opt.step()
    plain.step()  # without decay, AdamW's first step leaves the rows without gradient as they were
    for got, want in zip(task.model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(got, want)


class Unfrozen(nn.Module):
    """A sparse token table and a dense norm in one stage, frozen at first, and a head."""

    def __init__(self):
        super().__init__()
        self.emb = nn.ModuleDict({"tokens": nn.Embedding(40, 4, sparse=True), "norm": nn.LayerNorm(4)})
        self.head = nn.Linear(4, 3)

    def stages(self):
        return {"emb": self.emb, "head": self.head}

    def forward(self, ids, mask=None):
        return self.head(self.emb["norm"](self.emb["tokens"](ids)).mean(1))


def test_a_group_added_without_a_sparse_flag_steps_each_parameter_by_its_gradient():
    # The group of a table unfrozen by Lightning's BaseFinetuning (no sparse flag) was dense: its step raised.
    def build():
        torch.manual_seed(0)
        model = Unfrozen().double()
        return model, SparseAwareAdamW(model.head.parameters(), lr=1e-2, fused=False)

    model, opt = build()
    opt.add_param_group({"params": model.emb.parameters(), "lr": 1e-3})
    twin, split = build()
    split.add_param_group({"params": [twin.emb["tokens"].weight], "lr": 1e-3, "sparse": True})
    split.add_param_group({"params": twin.emb["norm"].parameters(), "lr": 1e-3})
    train(model, opt, 2, seed=1)
    train(twin, split, 2, seed=1)
    for got, want in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(got, want, **TOL[torch.float64])
    resumed, resumed_opt = build()  # the group's missing flag survives a state round trip
    resumed_opt.add_param_group({"params": resumed.emb.parameters(), "lr": 1e-3})
    resumed.load_state_dict(model.state_dict())
    resumed_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    train(model, opt, 1, seed=2)
    train(resumed, resumed_opt, 1, seed=2)
    for got, want in zip(model.parameters(), resumed.parameters(), strict=True):
        torch.testing.assert_close(got, want, **TOL[torch.float64])


def test_lightnings_finetuning_unfreezes_a_sparse_table_and_trains_it(tmp_path):
    class Unfreeze(BaseFinetuning):
        def freeze_before_training(self, pl_module):
            self.freeze(pl_module.model.emb)

        def finetune_function(self, pl_module, epoch, optimizer):
            if epoch == 1:
                self.unfreeze_and_add_param_group(modules=pl_module.model.emb, optimizer=optimizer)

    torch.manual_seed(0)
    ids = torch.randint(0, 10, (8, 5))  # rows 10-39 of the table are never used
    data = DataLoader([{"input_ids": r, "attention_mask": torch.ones(5), "labels": r[0] % 3} for r in ids],
                      batch_size=8)
    task = ClassificationTask(Unfrozen(), num_classes=3)
    before = {name: p.detach().clone() for name, p in task.model.emb.named_parameters()}
    pl.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False, callbacks=[Unfreeze()], num_sanity_val_steps=0,
               default_root_dir=tmp_path).fit(task, train_dataloaders=data)
    moved = (task.model.emb["tokens"].weight != before["tokens.weight"]).any(1)
    assert moved[ids.unique()].all() and not moved[10:].any()
    assert not torch.equal(task.model.emb["norm"].weight, before["norm.weight"])


def test_a_refused_gradient_leaves_every_parameter_as_it_was():
    # torch's AdamW stepped the dense groups before the refusal of a later group's gradient.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(40, 8, sparse=True), nn.Linear(8, 3)).double()
    dense_table = nn.Sequential(nn.Embedding(40, 8), nn.Linear(8, 3)).double()
    for m, table_group in ((model, {}), (dense_table, {"sparse": True})):
        opt = SparseAwareAdamW([{"params": m[1].parameters()}, {"params": [m[0].weight], **table_group}])
        before = [p.detach().clone() for p in m.parameters()]
        with pytest.raises(ValueError, match="group got a (sparse|dense) gradient"):
            train(m, opt, 1, seed=0)
        for got, want in zip(m.parameters(), before, strict=True):
            assert torch.equal(got, want)


def test_finetuning_unfreezes_a_table_tied_between_two_modules_and_steps_it_once():
    # BaseFinetuning lists a tied weight once per module it unfreezes; refusing the repeat ended the fit there.
    words = nn.Embedding(10, 4, sparse=True)
    bag = nn.EmbeddingBag(10, 4, sparse=True)
    bag.weight = words.weight
    backbone, head = nn.ModuleDict({"words": words, "bag": bag}), nn.Linear(4, 2)
    BaseFinetuning.freeze(backbone)
    opt = SparseAwareAdamW(head.parameters(), lr=0.1, weight_decay=0.0, fused=True)
    BaseFinetuning.unfreeze_and_add_param_group(backbone, opt, lr=0.1)
    assert [len(g["params"]) for g in opt.param_groups] == [2, 1]
    before = words.weight.detach().clone()
    ids = torch.tensor([[1, 2]])
    (head(words(ids)).sum() + head(bag(ids)).sum()).backward()
    opt.step()
    assert opt.state[words.weight]["step"] == 1
    torch.testing.assert_close((words.weight - before)[[1, 2]].abs(), torch.full((2, 4), 0.1))  # one step of lr


def test_a_weight_listed_twice_by_name_in_a_group_is_held_once():
    # A group of (name, parameter) pairs was deduplicated by the pair, so a tied weight stepped twice.
    w = nn.Parameter(torch.randn(3, 2))
    opt = SparseAwareAdamW([{"params": [("a", w), ("b", w)]}], lr=0.1, weight_decay=0.0)
    (held,) = opt.param_groups[0]["params"]
    assert held is w and opt.param_groups[0]["param_names"] == ["a"]
    before = w.detach().clone()
    w.grad = torch.randn(3, 2)
    opt.step()
    torch.testing.assert_close((w - before).abs(), torch.full((3, 2), 0.1))  # one step of lr
