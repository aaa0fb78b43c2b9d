"""Every CUDA backend of the row-wise ops (Triton's, and the C++/CUDA kernels with their C++ autograd)
forward and backward on the GPU against the float64 torch reference on the CPU, in fp32, fp16 and bf16, at
odd and BERT-base widths, non-contiguous; the same ops under ``torch.compile(fullgraph=True)`` with inductor;
fused BERT against the unfused one. The interpreter checks the same kernels' numbers in CI; these check the
compiled code."""

import pytest
import torch
from op_testing import assert_close, non_contiguous, randn

from hetrain import plugins
from hetrain.models.bert import BertClassifier
from hetrain.ops import bias_gelu, bias_gelu_ref, layer_norm, layer_norm_ref, rms_norm, rms_norm_ref
from hetrain.ops.dropout_add_layer_norm import dropout_add_layer_norm_ref
from hetrain.ops.dropout_add_layer_norm import keep_mask as stream_keep_mask
from hetrain.ops.rng import stream

pytestmark = pytest.mark.cuda

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(3, 1), (37, 33), (2, 9, 768), (5, 1000), (4, 4096), (2, 6000)]
fused_dal = torch.ops.hetrain.dropout_add_layer_norm_fwd


def cuda_leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cuda().requires_grad_()


def check(name, backend, dtype, got, want, sums=()):
    """``got``/``want``: (output, grads) pairs; gradients that sum over rows are compared relative to their size."""
    (y, grads), (y_ref, grads_ref) = got, want
    assert y.is_cuda and y.dtype == dtype
    assert_close(y.cpu(), y_ref, dtype, f"{name}[{backend}] y")
    for i, (g, g_ref) in enumerate(zip(grads, grads_ref, strict=True)):
        scale = max(1.0, g_ref.abs().max().item()) if i in sums else 1.0
        assert_close(g.cpu() / scale, g_ref / scale, dtype, f"{name}[{backend}] grad {i}")


def on_both(fn, ref, tensors, dtype, seed=7):
    """(y, grads) of ``fn`` on CUDA copies of ``tensors`` and of ``ref`` in float64 on the CPU, same dy."""
    cuda = [cuda_leaf(t) for t in tensors]
    y = fn(*cuda)
    dy = randn(*y.shape, dtype=dtype, seed=seed)
    got = (y, torch.autograd.grad(y, cuda, dy.cuda()))
    cpu = [t.detach().double().requires_grad_() for t in tensors]
    y_ref = ref(*cpu)
    return got, (y_ref, torch.autograd.grad(y_ref, cpu, dy.double()))


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_layer_norm(backend, dtype, shape):
    n = shape[-1]
    x = randn(*shape, dtype=dtype, seed=1, scale=2.0, shift=0.5)
    w, b = randn(n, dtype=dtype, seed=2, shift=1.0), randn(n, dtype=dtype, seed=3)
    with plugins.use_backend(layer_norm=backend):
        got, want = on_both(layer_norm, layer_norm_ref, [x, w, b], dtype)
    check("layer_norm", backend, dtype, got, want, sums=(1, 2))


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_rms_norm(backend, dtype, shape):
    x = randn(*shape, dtype=dtype, seed=1, scale=2.0, shift=0.5)
    w = randn(shape[-1], dtype=dtype, seed=2, shift=1.0)
    with plugins.use_backend(rms_norm=backend):
        got, want = on_both(lambda x, w: rms_norm(x, w, 1e-6), lambda x, w: rms_norm_ref(x, w, 1e-6), [x, w], dtype)
    check("rms_norm", backend, dtype, got, want, sums=(1,))


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(37, 33), (2, 9, 3072), (3, 5000), (700, 5)])
def test_bias_gelu(backend, approximate, dtype, shape):
    x, b = randn(*shape, dtype=dtype, seed=1, scale=2.0), randn(shape[-1], dtype=dtype, seed=2)
    with plugins.use_backend(bias_gelu=backend):
        got, want = on_both(lambda x, b: bias_gelu(x, b, approximate), lambda x, b: bias_gelu_ref(x, b, approximate),
                            [x, b], dtype)
    check("bias_gelu", backend, dtype, got, want, sums=(1,))


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(37, 33), (2, 9, 768), (3, 4096)])
def test_dropout_add_layer_norm_draws_the_cpu_mask(backend, p, dtype, shape):
    n = shape[-1]
    seed = torch.tensor([1234567, 3 * n])
    start, offset = stream(seed)
    keep = stream_keep_mask(start, torch.Size(shape).numel() // n, n, p, offset=offset)
    x, r = randn(*shape, dtype=dtype, seed=1, scale=2.0, shift=0.5), randn(*shape, dtype=dtype, seed=2)
    w, b = randn(n, dtype=dtype, seed=3, shift=1.0), randn(n, dtype=dtype, seed=4)

    def fused(x, r, w, b):
        return fused_dal(x.reshape(-1, n), r.reshape(-1, n), w, b, seed, p, 1e-5)[0].view(shape)

    with plugins.use_backend(dropout_add_layer_norm=backend):
        got, want = on_both(fused, lambda x, r, w, b: dropout_add_layer_norm_ref(x, r, w, b, keep.view(shape), p),
                            [x, r, w, b], dtype)
    check("dropout_add_layer_norm", backend, dtype, got, want, sums=(2, 3))


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_non_contiguous_inputs_and_grads(backend):
    x = non_contiguous(randn(33, 700, dtype=torch.float32, seed=4, shift=1.0))
    w, b = randn(700, seed=5, shift=1.0), randn(700, seed=6)
    cx = torch.empty(33, 1400, device="cuda")[:, ::2]
    cx.copy_(x)
    cx.requires_grad_()
    cw, cb = cuda_leaf(w), cuda_leaf(b)
    dy = torch.empty(33, 1400, device="cuda")[:, 1::2]
    dy.copy_(randn(33, 700, seed=7))
    with plugins.use_backend(layer_norm=backend):
        y = layer_norm(cx, cw, cb)
        grads = torch.autograd.grad(y, (cx, cw, cb), dy)
    cpu = [t.detach().double().requires_grad_() for t in (x, w, b)]
    y_ref = layer_norm_ref(*cpu)
    check("layer_norm non-contiguous", backend, torch.float32, (y, grads),
          (y_ref, torch.autograd.grad(y_ref, cpu, dy.cpu().double())), sums=(1, 2))


def test_zero_rows_and_bad_devices_on_cuda():
    w = torch.ones(64, device="cuda")
    assert layer_norm(torch.randn(0, 64, device="cuda"), w).shape == (0, 64)
    with pytest.raises(ValueError, match="weight is on cpu but x is on cuda"):
        layer_norm(torch.randn(4, 64, device="cuda"), torch.ones(64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inductor_fullgraph_through_every_row_op(dtype):
    torch._dynamo.reset()
    n = 768
    x = randn(6, 5, n, dtype=dtype, seed=1, shift=0.5).cuda()
    r, w, b = randn(6, 5, n, dtype=dtype, seed=2).cuda(), randn(n, dtype=dtype, seed=3).cuda(), randn(n, dtype=dtype,
                                                                                                      seed=4).cuda()

    def block(x, r, w, b):
        h = bias_gelu(layer_norm(x, w, b), b, "tanh")
        return rms_norm(h + r, w, 1e-6) * 2

    def block_ref(x, r, w, b):
        h = bias_gelu_ref(layer_norm_ref(x, w, b), b, "tanh")
        return rms_norm_ref(h + r, w, 1e-6) * 2

    tensors = [t.requires_grad_() for t in (x, r, w, b)]
    compiled = torch.compile(block, fullgraph=True)
    y = compiled(*tensors)
    dy = randn(*y.shape, dtype=dtype, seed=9).cuda()
    grads = torch.autograd.grad(y, tensors, dy)
    cpu = [t.detach().cpu().double().requires_grad_() for t in tensors]
    y_ref = block_ref(*cpu)
    grads_ref = torch.autograd.grad(y_ref, cpu, dy.cpu().double())
    tol = 2 if dtype == torch.bfloat16 else 1  # three ops in a row round three times
    atol, rtol = (5e-2 * tol, 5e-2) if dtype == torch.bfloat16 else (1e-4, 1e-4)
    torch.testing.assert_close(y.cpu().double(), y_ref, atol=atol, rtol=rtol)
    for i, (g, g_ref) in enumerate(zip(grads, grads_ref, strict=True)):
        scale = max(1.0, g_ref.abs().max().item())
        torch.testing.assert_close(g.cpu().double() / scale, g_ref / scale, atol=atol, rtol=rtol, msg=f"grad {i}")


@pytest.mark.parametrize("prefer", [(), ("cuda",)], ids=["default", "cpp-kernels"])
def test_fused_bert_equals_unfused_bert_on_cuda(prefer):
    kwargs = dict(vocab_size=300, num_classes=3, hidden=96, layers=2, heads=4, max_len=64, dropout=0.0)
    torch.manual_seed(0)
    fused = BertClassifier(fused=True, **kwargs).cuda()
    plain = BertClassifier(fused=False, **kwargs).cuda()
    plain.load_state_dict(fused.state_dict())
    tokens = torch.randint(1, 300, (5, 37), device="cuda")
    mask = torch.arange(37, device="cuda") < torch.tensor([37, 30, 21, 37, 5], device="cuda")[:, None]
    outs, grads = [], []
    for model in (fused, plain):
        with plugins.preferring(*prefer):
            logits = model(tokens, mask)
            loss = torch.nn.functional.cross_entropy(logits, torch.arange(5, device="cuda") % 3)
        loss.backward()
        outs.append(logits.detach())
        grads.append({k: p.grad.detach().clone() for k, p in model.named_parameters() if p.grad is not None})
    torch.testing.assert_close(outs[0], outs[1], atol=1e-4, rtol=1e-4)
    assert grads[0].keys() == grads[1].keys()
    for k in grads[0]:
        torch.testing.assert_close(grads[0][k], grads[1][k], atol=1e-4, rtol=1e-3, msg=f"grad of {k}")
