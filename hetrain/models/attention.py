"""Self-attention through torch's ``scaled_dot_product_attention``, in the dtype that is fast where it runs.

On a CPU, torch's bf16 flash-attention kernel is slower than its float32 one on short sequences: forward plus
backward at batch 32, head size 64, a padding mask, no dropout, on a 2-core AMX VM (torch 2.13): 64 keys and
2 heads 5.6 ms in bf16 against 2.0 in float32; 128 keys and 12 heads 75 against 52; 128 keys, 4 heads of 32
19.7 against 5.8; at 256 keys bf16 is ahead (53 against 63 at batch 16, 12 heads) and stays ahead at 384 to
1024. Precision ``auto`` runs bf16 autocast on such a CPU, where it made BERT-tiny's step at 64 tokens
slower than float32 (attention was half of the bf16 step). So bf16 attention of at most
:data:`CPU_FLOAT32_MAX_KEYS` keys on a CPU runs in float32 (its result cast back); it is torch's kernel either
way. With attention dropout torch takes its unfused path on a CPU, which was not measured: left as it is.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CPU_FLOAT32_MAX_KEYS = 128


def _dtype(q: torch.Tensor) -> torch.dtype:
    """The dtype attention runs in: autocast's where it would cast ``q`` (floating, not float64), else ``q``'s."""
    device = q.device.type
    if torch.is_autocast_enabled(device) and q.is_floating_point() and q.dtype != torch.float64:
        return torch.get_autocast_dtype(device)
    return q.dtype


def _float32_for(q: torch.Tensor, k: torch.Tensor, dropout_p: float, dtype: torch.dtype) -> bool:
    return q.device.type == "cpu" and dtype == torch.bfloat16 and dropout_p == 0.0 \
        and k.shape[-2] <= CPU_FLOAT32_MAX_KEYS


def runs_in_float32(q: torch.Tensor, k: torch.Tensor, dropout_p: float) -> bool:
    """Whether :func:`attention` computes bf16 attention of these inputs in float32 (see the module docstring)."""
    return _float32_for(q, k, dropout_p, _dtype(q))


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None,
              dropout_p: float = 0.0) -> torch.Tensor:
    """``F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p)`` with its dtype (autocast's where it is
    on), computed in float32 where that is the faster kernel."""
    dtype = _dtype(q)
    if not _float32_for(q, k, dropout_p, dtype):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)
    with torch.autocast(q.device.type, enabled=False):  # CPU autocast would cast float32 inputs back to bf16
        # Rounded to bf16 first, as autocast would hand them to a bf16 kernel: the same result for bf16 inputs
        # and for float32 ones under autocast.
        q, k, v = (t.to(dtype).float() for t in (q, k, v))
        if attn_mask is not None and attn_mask.is_floating_point():  # an additive mask: SDPA wants q's dtype
            attn_mask = attn_mask.to(dtype).float()
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    return y.to(dtype)
