"""dropout: every backend against the float64 reference on the same mask, one mask for every backend,
kept fraction, reproducibility, nothing of the input's size saved for backward, gradcheck, compile, errors, nn."""

import contextlib
import math

import pytest
import torch
from op_testing import assert_close, non_contiguous, randn

from benchmarks.timing import cuda_generator_restored_on_error
from hetrain import plugins
from hetrain.nn.dropout import Dropout
from hetrain.ops.dropout import dropout, dropout_ref, keep_mask
from hetrain.ops.dropout_add_layer_norm import dropout_add_layer_norm
from hetrain.ops.rng import masks_fixed_in_cuda_graphs

BACKENDS = ["triton", "cpu", "torch"]
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(), (7,), (3, 1), (4, 7), (2, 5, 33), (1, 257), (3, 1030)]  # 3090 elements: past a Triton block
fwd_op = torch.ops.hetrain.dropout_fwd
bwd_op = torch.ops.hetrain.dropout_bwd


def values(shape, dtype=torch.float32, seed=1, requires_grad=True):
    """Random values with no zero among them, so ``y != 0`` is exactly the kept positions."""
    x = randn(math.prod(shape), dtype=torch.float64, seed=seed, scale=2.0, shift=0.3).view(shape)
    x = torch.where(x.abs() < 1e-2, torch.full_like(x, 0.5), x).to(dtype)
    assert (x != 0).all()
    return x.requires_grad_(requires_grad)


def run(backend, x, seed, p, dy):
    with plugins.use_backend(dropout=backend):
        y = fwd_op(x, torch.tensor([seed]), p)
        (dx,) = torch.autograd.grad(y, x, dy)
    return y, dx


def reference(x, seed, p, dy):
    """The float64 reference on the same values and the kernels' mask."""
    keep = keep_mask(seed, x.shape, p)
    x64 = x.detach().double().requires_grad_()
    y = dropout_ref(x64, keep, p)
    (dx,) = torch.autograd.grad(y, x64, dy.double())
    return y, dx


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_and_backward_match_the_reference_on_the_same_mask(backend, dtype, shape):
    p, seed = 0.3, 1234567
    x, dy = values(shape, dtype), values(shape, dtype, seed=7, requires_grad=False)
    y, dx = run(backend, x, seed, p, dy)
    y_ref, dx_ref = reference(x, seed, p, dy)
    assert y.dtype == dx.dtype == dtype and y.shape == dx.shape == shape
    assert_close(y, y_ref, dtype, f"{backend} y")
    assert_close(dx, dx_ref, dtype, f"{backend} dx")


@pytest.mark.parametrize("p", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_every_backend_draws_the_same_mask_as_dropout_add_layer_norm(p):
    seed, shape = 987654321, (33, 257)
    x = values(shape, requires_grad=False)
    shared = torch.ops.hetrain_C.dropout_add_layer_norm_keep_mask(torch.tensor([seed]), *shape, p)
    assert torch.equal(keep_mask(seed, shape, p), shared)
    for backend in BACKENDS:
        with plugins.use_backend(dropout=backend):
            kept = fwd_op(x, torch.tensor([seed]), p) != 0
        assert torch.equal(kept, shared), backend


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("offset", [0, 3, 2**32 - 700])  # the last: the stream index crosses 2^32 in the call
def test_an_offset_stream_continues_the_mask_of_the_whole_tensor(backend, offset):
    # A micro-batch of rows [r0, r1) at offset r0 * cols draws what the whole batch draws on those rows.
    seed, p, rows, cols = 424242, 0.4, 9, 257
    x = values((rows, cols), requires_grad=False)
    whole = keep_mask(seed, (rows, cols), p, offset=offset)  # the reference's mask of a call at ``offset``
    with plugins.use_backend(dropout=backend):
        assert torch.equal(fwd_op(x, torch.tensor([seed, offset]), p) != 0, whole), backend
        for r0, r1 in ((0, 4), (4, 9), (2, 3)):
            kept = fwd_op(x[r0:r1], torch.tensor([seed, offset + r0 * cols]), p) != 0
            assert torch.equal(kept, whole[r0:r1]), (backend, r0, r1)
    with pytest.raises(RuntimeError, match="offset"), plugins.use_backend(dropout="cpu"):
        fwd_op(x, torch.tensor([seed, -1]), p)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_kept_fraction_is_one_minus_p(backend, p):
    # 2^19 elements: the fraction's standard deviation is at most 7e-4.
    x = values((512, 1024), requires_grad=False)
    torch.manual_seed(3)
    with plugins.use_backend(dropout=backend):
        y = dropout(x, p)
    assert abs((y != 0).float().mean().item() - (1 - p)) < 4e-3


@pytest.mark.parametrize("backend", BACKENDS)
def test_reproducible_under_manual_seed(backend):
    x = values((6, 100))
    outs = []
    with plugins.use_backend(dropout=backend):
        for seed in (0, 0, 1):
            torch.manual_seed(seed)
            outs.append(dropout(x, 0.5))
    assert torch.equal(outs[0], outs[1])
    assert not torch.equal(outs[0], outs[2])
    torch.manual_seed(0)  # the op draws its seed with one torch.randint on the CPU generator
    assert torch.equal(outs[0] != 0, keep_mask(int(torch.randint(2**31, (1,)).item()), (6, 100), 0.5))


@pytest.mark.parametrize("backend", BACKENDS)
def test_only_the_seed_is_saved_for_backward(backend):
    x = values((64, 48))
    saved = []
    with plugins.use_backend(dropout=backend), torch.autograd.graph.saved_tensors_hooks(
            lambda t: saved.append(t) or t, lambda t: t):
        y = dropout(x, 0.2)
    assert [(t.numel(), t.dtype) for t in saved] == [(1, torch.int64)]  # the stream: its seed (offset 0)
    (dx,) = torch.autograd.grad(y, x, torch.ones_like(y))
    assert torch.equal(dx != 0, y != 0)


@pytest.mark.parametrize("training, p", [(False, 0.5), (True, 0.0)])
def test_identity_without_a_draw(training, p):
    x = values((4, 9))
    state = torch.get_rng_state()
    y = dropout(x, p, training)
    assert y is x
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("backend", BACKENDS)
def test_p_one_gives_zeros_even_for_inf_and_nan(backend):
    x = values((5, 11)).detach()
    x[0, 0], x[1, 1] = float("inf"), float("nan")
    x.requires_grad_()
    with plugins.use_backend(dropout=backend):
        y = dropout(x, 1.0)
        (dx,) = torch.autograd.grad(y, x, values((5, 11), seed=2, requires_grad=False))
    assert torch.equal(y, torch.zeros(5, 11)) and torch.equal(dx, torch.zeros(5, 11))


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_and_transposed_inputs(backend):
    p, seed = 0.25, 42
    for x, dy in ((non_contiguous(values((5, 40), torch.float64)),
                   non_contiguous(values((5, 40), torch.float64, seed=8, requires_grad=False))),
                  (values((40, 5), torch.float64).t(), values((40, 5), torch.float64, seed=8).t().detach())):
        assert not x.is_contiguous() and not dy.is_contiguous()
        y, dx = run(backend, x, seed, p, dy)
        y_ref, dx_ref = reference(x, seed, p, dy)
        assert y.is_contiguous()
        assert_close(y, y_ref, torch.float64, f"{backend} y")
        assert_close(dx, dx_ref, torch.float64, f"{backend} dx")


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_size(backend):
    x = torch.empty(0, 16, requires_grad=True)
    with plugins.use_backend(dropout=backend):
        y = dropout(x, 0.1)
        (dx,) = torch.autograd.grad(y, x, torch.empty(0, 16))
    assert y.shape == dx.shape == (0, 16)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_and_gradgradcheck(backend):
    x = values((3, 9), torch.float64)
    seed = torch.tensor([77])
    with plugins.use_backend(dropout=backend):
        assert torch.autograd.gradcheck(lambda x: fwd_op(x, seed, 0.4), (x,))
        assert torch.autograd.gradgradcheck(lambda x: fwd_op(x, seed, 0.4), (x,))


def test_a_later_micro_batch_outside_a_capture_whose_first_was_captured_is_refused_naming_the_fix():
    from hetrain.ops.rng import micro_batch

    captured = torch.empty(1, dtype=torch.int64, device="meta")  # where the first micro-batch's graph drew its seed
    with micro_batch([captured], first_row=3, record=False), pytest.raises(
            RuntimeError, match="first micro-batch was captured in a CUDA graph but this later one is not"):
        dropout(values((2, 8), requires_grad=False), 0.5)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_kernels_match_the_cpu_mask_and_reference(backend, dtype):
    p, seed, shape = 0.1, 24680, (513, 777)
    x = values(shape, dtype).detach().cuda().requires_grad_()
    dy = values(shape, dtype, seed=7, requires_grad=False).cuda()
    y, dx = run(backend, x, seed, p, dy)
    y_ref, dx_ref = reference(x.cpu(), seed, p, dy.cpu())
    assert torch.equal((y != 0).cpu(), keep_mask(seed, shape, p))
    assert_close(y.cpu(), y_ref, dtype, "cuda y")
    assert_close(dx.cpu(), dx_ref, dtype, "cuda dx")


@pytest.mark.parametrize("seed", [[1234567], [2**40 + 99, 2**32 - 700], [5, 0]])  # a 64-bit seed; an offset past 2^32
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_the_triton_kernel_reads_a_captured_stream_from_memory_as_it_takes_one_by_value(seed, dtype):
    # Under a CUDA graph capture the (seed, offset) lives on the GPU and the kernel loads it (each replay's own);
    # Triton's interpreter runs that variant on a CPU tensor here.
    from hetrain.ops.triton import dropout as triton_dropout

    x = values((3, 1030), dtype, requires_grad=False)
    stream = torch.tensor(seed)
    by_value = triton_dropout.forward(x, stream, 0.3, stream_in_memory=False)
    from_memory = triton_dropout.forward(x, stream, 0.3, stream_in_memory=True)
    assert torch.equal(from_memory, by_value)
    offset = seed[1] if len(seed) > 1 else 0
    assert torch.equal(by_value != 0, keep_mask(seed[0], x.shape, 0.3, offset=offset))


def test_the_reference_refuses_a_seed_drawn_on_a_device_naming_the_backends_that_read_it():
    from hetrain.ops.dropout import TorchBackend

    x = values((4, 8), requires_grad=False)
    on_device = torch.empty(2, dtype=torch.int64, device="meta")  # where a captured call's stream would live
    with pytest.raises(RuntimeError, match="the triton and cuda backends read it there"):
        TorchBackend.forward(x, on_device, 0.5)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("op", ["dropout", "dropout_add_layer_norm"])
def test_a_cuda_graph_draws_a_new_mask_every_replay_and_the_reference_refuses_it(backend, op):
    x = values((64, 48)).detach().cuda().requires_grad_()
    residual = values((64, 48), seed=2, requires_grad=False).cuda()
    dy = values((64, 48), seed=3, requires_grad=False).cuda()

    def call():
        y = dropout(x, 0.5) if op == "dropout" else dropout_add_layer_norm(x, residual, None, None, 0.5)
        (dx,) = torch.autograd.grad(y, x, dy)
        return y, dx

    def capture(backend, fixed=False):
        with plugins.use_backend(**{op: backend}), cuda_generator_restored_on_error():
            # Compiled and loaded outside the capture (CUDA forbids loading a module while a stream captures): a
            # captured call, which reads its stream from memory, runs the kernels this one did.
            call()
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph), (masks_fixed_in_cuda_graphs() if fixed else contextlib.nullcontext()):
                y, dx = call()
        return graph, y, dx

    def replays(graph, y, dx, n=3):
        outputs = []
        for _ in range(n):
            y.fill_(float("nan"))  # every replay must write every element again
            dx.fill_(float("nan"))
            graph.replay()
            outputs.append((y.clone(), dx.clone()))
        assert not any(o.isnan().any() for pair in outputs for o in pair)
        return outputs

    outputs = replays(*capture(backend))
    assert all(not torch.equal(a, b) for i, (a, _) in enumerate(outputs) for b, _ in outputs[i + 1:])
    for y, dx in outputs:
        if op == "dropout":  # each a dropout of x: kept elements doubled, about half of them
            kept = y != 0
            torch.testing.assert_close(y[kept], x.detach()[kept] * 2)
            assert 0.4 < kept.float().mean().item() < 0.6
            assert torch.equal(dx != 0, kept)  # backward regenerated this replay's mask
        else:  # a dropped element of x gets no gradient, whatever its mask was
            assert 0.4 < (dx == 0).float().mean().item() < 0.6
    fixed = replays(*capture(backend, fixed=True))  # what bench-ops asks for: the capture's mask every time
    assert all(torch.equal(fixed[0][0], y) and torch.equal(fixed[0][1], dx) for y, dx in fixed)
    with pytest.raises(RuntimeError, match="the triton and cuda backends read it there"):
        capture("torch")


@pytest.mark.cuda
@pytest.mark.parametrize("op", ["dropout", "dropout_add_layer_norm"])
def test_compiled_dropout_captured_by_hand_is_refused_rather_than_replaying_one_mask(op):
    torch._dynamo.reset()
    x = values((64, 48)).detach().cuda()
    residual = values((64, 48), seed=2, requires_grad=False).cuda()

    @torch.compile(backend="aot_eager")
    def step(x):
        return dropout(x, 0.5) if op == "dropout" else dropout_add_layer_norm(x, residual, None, None, 0.5)

    step(x)
    torch.cuda.synchronize()
    with pytest.raises(RuntimeError, match="compiled by torch.compile is being captured in a CUDA graph by hand"):
        with cuda_generator_restored_on_error(), torch.cuda.graph(torch.cuda.CUDAGraph()):
            step(x)


@pytest.mark.parametrize("name", ["dropout_fwd", "dropout_bwd", "dropout_add_layer_norm_fwd",
                                  "dropout_add_layer_norm_bwd"])
def test_host_seeded_ops_are_kept_out_of_inductor_cuda_graphs(name):
    # Inductor runs ops with this tag outside its CUDA graphs; inside one, every replay would repeat the mask.
    assert torch.Tag.cudagraph_unsafe in getattr(torch.ops.hetrain, name).default.tags
    assert torch.Tag.cudagraph_unsafe not in torch.ops.hetrain.layer_norm_fwd.default.tags  # no seed: graphed


@pytest.mark.cuda
def test_reduce_overhead_compile_draws_a_fresh_mask_every_call():
    torch._dynamo.reset()
    x = values((96, 40)).detach().cuda().requires_grad_()

    @torch.compile(mode="reduce-overhead")
    def step(x):
        y = dropout(x, 0.5)
        (dx,) = torch.autograd.grad(y.sum(), x)
        return y, dx

    masks = []
    for _ in range(4):  # the first calls warm up and record; the later ones replay
        y, dx = step(x)
        keep = y != 0
        assert torch.equal(dx != 0, keep)  # backward regenerated this call's mask
        torch.testing.assert_close(y[keep], x.detach()[keep] * 2)
        masks.append(keep.cpu())
    assert all(not torch.equal(a, b) for i, a in enumerate(masks) for b in masks[i + 1:])


def test_custom_ops_pass_opcheck():
    seed = torch.tensor([3])
    for p in (0.0, 0.3, 1.0):
        torch.library.opcheck(fwd_op.default, (values((4, 24)), seed, p))
        torch.library.opcheck(fwd_op.default, (values((2, 3, 5), torch.bfloat16), seed, p))
        torch.library.opcheck(bwd_op.default, (values((4, 24), seed=4), seed, p))


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_torch_compile_fullgraph_draws_the_same_seed_as_eager(backend):
    torch._dynamo.reset()
    x = values((2, 5, 48))

    def block(x):
        return dropout(x * 2.0, 0.2).relu()

    with plugins.use_backend(dropout=backend):
        compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
        torch.manual_seed(5)
        y = compiled(x)
        (g,) = torch.autograd.grad(y.sum(), x)
        torch.manual_seed(5)
        y_eager = block(x)
        (g_eager,) = torch.autograd.grad(y_eager.sum(), x)
    assert torch.equal(y, y_eager)
    assert torch.equal(g, g_eager)


def test_inductor_compile_has_no_graph_break_and_is_reproducible():
    # Inductor draws the seed from its own generator (as it does for torch's random ops), so the mask differs
    # from eager's; it is still a dropout of x, reproducible under torch.manual_seed.
    torch._dynamo.reset()
    x = values((8, 64), requires_grad=False)
    compiled = torch.compile(lambda x: dropout(x, 0.1) + 1, fullgraph=True)
    torch.manual_seed(9)
    y = compiled(x) - 1
    kept = y != 0
    assert_close(y[kept], x[kept] / 0.9, torch.float32, "inductor kept")
    assert 0.8 < kept.float().mean().item() < 0.98
    torch.manual_seed(9)
    assert torch.equal(compiled(x) - 1, y)


def test_bad_inputs_raise_clear_errors():
    x = values((4, 8), requires_grad=False)
    for p in (-0.1, 1.5, "0.5", True, None):
        with pytest.raises(ValueError, match=r"p must be a number in \[0, 1\]"):
            dropout(x, p)
    with pytest.raises(ValueError, match="x must be a floating tensor, got torch.int64"):
        dropout(torch.ones(4, 8, dtype=torch.int64), 0.1)
    # An AttributeError ('list' object has no attribute 'is_floating_point') before.
    with pytest.raises(ValueError, match=r"x must be a floating tensor, got list; torch.as_tensor\(x\) converts one"):
        dropout([1.0, 2.0], 0.1)
    seed = torch.tensor([1])
    cpp = torch.ops.hetrain_C
    with pytest.raises(RuntimeError, match="x must be a floating tensor"):
        cpp.dropout(torch.ones(4, dtype=torch.int32), seed, 0.1)
    with pytest.raises(RuntimeError, match=r"seed must be int64 \(seed,\) or \(seed, offset\)"):
        cpp.dropout(x, torch.tensor([1.0]), 0.1)
    with pytest.raises(RuntimeError, match=r"p must be in \[0, 1\]"):
        cpp.dropout(x, seed, -0.1)


def test_nn_dropout_is_a_stateless_drop_in():
    torch_drop = torch.nn.Dropout(0.3)
    fused = Dropout.from_torch(torch_drop)
    assert isinstance(fused, torch.nn.Dropout) and fused.p == 0.3 and fused.training
    assert fused.state_dict() == {} and repr(fused) == repr(torch_drop)
    x = values((3, 4, 33), requires_grad=False)
    torch.manual_seed(1)
    y = fused(x)
    torch.manual_seed(1)
    assert torch.equal(y, dropout(x, 0.3))
    assert fused.eval()(x) is x
    assert not Dropout.from_torch(torch_drop.eval()).training
    # inplace=True writes into its input as torch's does (it returned a new tensor and left x as it was).
    inplace, before = Dropout(0.3, inplace=True), x.clone()
    torch.manual_seed(1)
    assert inplace(x) is x and torch.equal(x, y) and not torch.equal(x, before)
    with pytest.raises(ValueError, match="dropout probability"):
        Dropout(1.5)


@pytest.mark.parametrize("other", [torch.nn.Dropout1d, torch.nn.Dropout2d, torch.nn.Dropout3d, torch.nn.AlphaDropout,
                                   torch.nn.FeatureAlphaDropout])
def test_from_torch_refuses_the_dropouts_that_are_not_element_wise(other):
    # They were taken and silently became element-wise dropout (whole channels, SELU's statistics lost).
    with pytest.raises(ValueError, match=rf"hetrain.nn.Dropout: needs a torch.nn.Dropout, got {other.__name__}"):
        Dropout.from_torch(other(0.5))


@pytest.mark.parametrize("backend", BACKENDS)
def test_vmap_with_a_seed_per_sample_gives_each_sample_its_own_mask_on_every_backend(backend):
    """The custom op runs per sample (torch's batching fallback), each with its own plain seed. The body was called
    with the batched seed: the torch reference failed in tolist(), then was refused; Triton too, the only backend
    every CUDA call tries first."""
    x = torch.randn(4, 40, generator=torch.Generator().manual_seed(0)) + 3.0
    with plugins.use_backend(dropout=backend):
        y = torch.vmap(lambda row: dropout(row, 0.5), randomness="different")(x)
        same = torch.vmap(lambda row: dropout(row, 0.5), randomness="same")(x)
    assert not all(torch.equal(y[0] != 0, y[i] != 0) for i in range(1, 4))  # a mask per sample
    assert all(torch.equal(same[0] != 0, same[i] != 0) for i in range(1, 4))  # one mask for all
    for out in (y, same):
        torch.testing.assert_close(out, torch.where(out != 0, x * 2.0, 0.0), rtol=0, atol=0)
