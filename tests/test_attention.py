"""hetrain.models.attention: torch's SDPA, in float32 exactly where the CPU's bf16 kernel is the slower one."""

import pytest
import torch
import torch.nn.functional as F

from hetrain.models.attention import CPU_FLOAT32_MAX_KEYS, attention, runs_in_float32


def qkv(keys: int, dtype=torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(3, 2, keys, 16, generator=g, dtype=dtype).requires_grad_() for _ in range(3))
    keep = torch.rand(3, keys, generator=g) > 0.2
    keep[:, 0] = True
    return q, k, v, keep[:, None, None, :]


def grads(fn, q, k, v, mask, upstream):
    y = fn(q, k, v, attn_mask=mask)
    return (y, *torch.autograd.grad(y, (q, k, v), upstream))


@pytest.mark.parametrize("autocast", [False, True], ids=["bf16-inputs", "bf16-autocast"])
def test_short_cpu_bf16_attention_is_torchs_float32_kernel_rounded_once(autocast):
    keys = CPU_FLOAT32_MAX_KEYS - 3
    q, k, v, mask = qkv(keys, dtype=torch.float32 if autocast else torch.bfloat16)
    upstream = torch.randn(3, 2, keys, 16).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        assert runs_in_float32(q, k, 0.0)
        ours = grads(attention, q, k, v, mask, upstream)
    q32, k32, v32 = (t.detach().bfloat16().float().requires_grad_() for t in (q, k, v))
    expected = grads(F.scaled_dot_product_attention, q32, k32, v32, mask, upstream.float())
    assert ours[0].dtype == torch.bfloat16  # as autocast or bf16 inputs give
    assert torch.equal(ours[0], expected[0].bfloat16())
    for g, g_ref in zip(ours[1:], expected[1:], strict=True):  # the input gradients pass the bf16 rounding too
        assert g.dtype == q.dtype and torch.equal(g.float(), g_ref.bfloat16().float())


@pytest.mark.parametrize("autocast", [False, True], ids=["bf16-inputs", "bf16-autocast"])
def test_an_additive_mask_of_the_inputs_dtype_works_as_a_boolean_one(autocast):
    """SDPA takes a float mask of q's dtype; the float32 path refused the bf16 one bf16 inputs come with."""
    q, k, v, keep = qkv(CPU_FLOAT32_MAX_KEYS - 3, dtype=torch.float32 if autocast else torch.bfloat16)
    additive = torch.zeros(keep.shape, dtype=q.dtype).masked_fill(~keep, float("-inf"))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        assert torch.equal(attention(q, k, v, attn_mask=additive), attention(q, k, v, attn_mask=keep))


@pytest.mark.parametrize("case", ["long", "float32", "dropout"])
def test_everything_else_is_torchs_sdpa_as_called(case):
    keys = CPU_FLOAT32_MAX_KEYS + 5 if case == "long" else 40
    q, k, v, mask = qkv(keys, dtype=torch.float32 if case == "float32" else torch.bfloat16, seed=1)
    p = 0.3 if case == "dropout" else 0.0
    assert not runs_in_float32(q, k, p)
    torch.manual_seed(7)
    ours = attention(q, k, v, attn_mask=mask, dropout_p=p)
    torch.manual_seed(7)
    theirs = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
    assert ours.dtype == q.dtype and torch.equal(ours, theirs)


def test_float64_under_autocast_stays_float64():
    q, k, v, mask = qkv(8, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not runs_in_float32(q, k, 0.0)
        assert attention(q, k, v, attn_mask=mask).dtype == torch.float64


def test_compiles_in_one_graph_under_cpu_autocast():
    q, k, v, mask = qkv(24, seed=2)
    compiled = torch.compile(attention, fullgraph=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        eager = attention(q, k, v, attn_mask=mask)
        traced = compiled(q, k, v, attn_mask=mask)
    assert traced.dtype == torch.bfloat16
    torch.testing.assert_close(traced.float(), eager.float(), rtol=1.6e-2, atol=1e-2)
