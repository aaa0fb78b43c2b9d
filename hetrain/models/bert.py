"""A BERT encoder for sequence classification, built from hetrain.nn modules.

The model is written for one device; :meth:`BertClassifier.stages` names the pieces a placement
may put on different devices (``embeddings``, ``encoder.<i>``, ``classifier``), in forward order.
Defaults give BERT-tiny's size (2 layers, hidden 128) with 4 heads where BERT-Tiny has 2. With
``fused=True`` (the default) each block runs hetrain's fused ops (LayerNorm, Linear+bias+GELU,
dropout+residual+LayerNorm, and a dropout whose mask is regenerated in backward rather than stored);
``fused=False`` builds the same model from torch modules, with the same state_dict keys (the token table is a
:class:`hetrain.nn.Embedding` either way: torch's lookup, with hetrain's sparse-gradient kernel only where ``sparse``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hetrain.models.attention import attention
from hetrain.nn import BiasGELU, Dropout, DropoutAddLayerNorm, Embedding, LayerNorm
from hetrain.placement.pipeline import gpipe_forward, run_in_order


class Embeddings(nn.Module):
    """Token + learned position embeddings, normalised: (B, T) ids -> (B, T, H).

    ``sparse``: the token table's gradient holds the looked-up rows only (``nn.Embedding(sparse=True)``),
    which :class:`hetrain.optim.SparseAwareAdamW` steps lazily, a row at a time.
    """

    def __init__(self, vocab_size: int, hidden: int, max_len: int, dropout: float, pad_id: int = 0,
                 fused: bool = True, sparse: bool = False) -> None:
        super().__init__()
        self.tokens = Embedding(vocab_size, hidden, padding_idx=pad_id, sparse=sparse)
        self.positions = nn.Embedding(max_len, hidden)
        self.norm = LayerNorm(hidden) if fused else nn.LayerNorm(hidden)
        self.dropout = Dropout(dropout) if fused else nn.Dropout(dropout)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """``position_ids`` (B, T) restart at each sequence of a packed row; by default 0..T-1."""
        if position_ids is None:
            if input_ids.shape[1] > self.positions.num_embeddings:  # else an IndexError deep in the lookup
                raise ValueError(f"hetrain: a sequence of {input_ids.shape[1]} tokens is longer than the model's "
                                 f"{self.positions.num_embeddings} positions; raise model.max_len or shorten the data")
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        else:
            positions = position_ids
        return self.dropout(self.norm(self.tokens(input_ids) + self.positions(positions)))


class SelfAttention(nn.Module):
    """Multi-head self-attention through ``scaled_dot_product_attention`` (:func:`hetrain.models.attention.attention`:
    float32 where torch's bf16 kernel is the slower one); padded keys are masked out.

    The mask is (B, T) bool, True on real tokens, or (B, 1, T, T) for packed rows (each query sees its own
    sequence only: :func:`hetrain.data.packing.segment_attention_mask`), bool or a float added to the scores.
    """

    def __init__(self, hidden: int, heads: int, dropout: float) -> None:
        super().__init__()
        _check_sizes(hidden=hidden, heads=heads)
        if hidden % heads:
            raise ValueError(f"hetrain: hidden={hidden} is not divisible by heads={heads}; pick model.hidden a "
                             f"multiple of model.heads (e.g. model.hidden={heads * max(1, round(hidden / heads))})")
        self.heads = heads
        self.dropout = dropout
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.out = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        b, t, h = x.shape
        _check_block_mask(x, attention_mask)
        qkv = self.qkv(x).view(b, t, 3, self.heads, h // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, heads, T, head_dim)
        # (B, 1, 1, T): True where the key is a real token; or per query, for packed rows.
        keep = attention_mask[:, None, None, :] if attention_mask.dim() == 2 else attention_mask
        dropout = self.dropout if self.training else 0.0
        y = attention(q, k, v, attn_mask=keep, dropout_p=dropout)  # like q (autocast's dtype)
        return self.out(y.transpose(1, 2).reshape(b, t, h))


class EncoderBlock(nn.Module):
    """Post-norm transformer block as in BERT: attention, then a GELU MLP, each with a residual."""

    def __init__(self, hidden: int, heads: int, ffn: int, dropout: float, fused: bool = True,
                 attention_dropout: float | None = None) -> None:
        super().__init__()
        self.attention = SelfAttention(hidden, heads, dropout if attention_dropout is None else attention_dropout)
        if fused:
            # norm(x + dropout(sublayer)) in one op each; the MLP's GELU is the first Linear's epilogue.
            self.norm1 = DropoutAddLayerNorm(hidden, dropout)
            self.mlp = nn.Sequential(BiasGELU(hidden, ffn), nn.Identity(), nn.Linear(ffn, hidden))
            self.norm2 = DropoutAddLayerNorm(hidden, dropout)
        else:
            self.norm1 = _PostNorm(hidden, dropout)
            self.mlp = nn.Sequential(nn.Linear(hidden, ffn), nn.GELU(), nn.Linear(ffn, hidden))
            self.norm2 = _PostNorm(hidden, dropout)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        x = self.norm1(self.attention(x, attention_mask), x)
        return self.norm2(self.mlp(x), x)


class _PostNorm(nn.LayerNorm):
    """``layer_norm(dropout(sublayer) + residual)`` from torch modules: the unfused twin of DropoutAddLayerNorm."""

    def __init__(self, hidden: int, dropout: float) -> None:
        super().__init__(hidden)
        self.p = dropout

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return super().forward(residual + F.dropout(x, self.p, self.training))


class Classifier(nn.Module):
    """Pooler (dense + tanh) and a linear head over the mean of the real tokens: (B, T, H) -> (B, C).

    BERT pools the [CLS] position instead; the masked mean learns the synthetic task in a fraction of
    the steps (a [CLS] head first has to learn where to attend), and padding never reaches it.
    """

    def __init__(self, hidden: int, num_classes: int, dropout: float, fused: bool = True) -> None:
        super().__init__()
        self.pooler = nn.Linear(hidden, hidden)
        self.dropout = Dropout(dropout) if fused else nn.Dropout(dropout)
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        keep = attention_mask[..., None].to(x.dtype)  # (B, T, 1)
        # A row with no real token pools to zeros, not 0/0 = NaN.
        mean = (x * keep).sum(1) / keep.sum(1).clamp_min(1)  # (B, H)
        return self.head(self.dropout(torch.tanh(self.pooler(mean))))


class BertClassifier(nn.Module):
    """Encoder-only transformer that classifies a whole sequence.

    ``dropout`` acts on the hidden states through hetrain's ops (when ``fused``), whose masks a pipeline
    split reproduces exactly; ``attention_dropout`` (default: ``dropout``) on the attention probabilities
    inside SDPA, from torch's generator, which a split draws per micro-batch. ``sparse_embeddings``: the
    token table gets sparse gradients and a lazy optimizer step (:class:`Embeddings`), what makes the
    table cheap on a CPU stage.
    """

    def __init__(
        self,
        vocab_size: int = 256,
        num_classes: int = 4,
        hidden: int = 128,
        layers: int = 2,
        heads: int = 4,
        ffn: int | None = None,
        max_len: int = 512,
        dropout: float = 0.1,
        fused: bool = True,
        attention_dropout: float | None = None,
        sparse_embeddings: bool = False,
    ) -> None:
        super().__init__()
        _check_sizes(hidden=hidden, heads=heads)  # layers=0 builds no attention to check them
        _check_settings(layers, ffn, dropout, attention_dropout)
        self.embeddings = Embeddings(vocab_size, hidden, max_len, dropout, fused=fused, sparse=sparse_embeddings)
        ffn = 4 * hidden if ffn is None else ffn
        attention_dropout = dropout if attention_dropout is None else attention_dropout
        self.encoder = nn.ModuleList(EncoderBlock(hidden, heads, ffn, dropout, fused, attention_dropout)
                                     for _ in range(layers))
        self.classifier = Classifier(hidden, num_classes, dropout, fused)
        self.micro_batches = 1  # > 1: forward runs the GPipe schedule (hetrain.callbacks.PipelineSplit sets it)
        self.checkpoint_stages: frozenset[str] = frozenset()  # stages that recompute activations in backward
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        # BERT's initialisation: N(0, 0.02) weights and zero biases; norms keep torch's ones/zeros.
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        if isinstance(module, nn.Embedding) and module.padding_idx is not None:
            nn.init.zeros_(module.weight[module.padding_idx])

    def stages(self) -> dict[str, nn.Module]:
        """The pieces a placement may put on different devices, by module path, in forward order."""
        blocks = {f"encoder.{i}": block for i, block in enumerate(self.encoder)}
        return {"embeddings": self.embeddings, **blocks, "classifier": self.classifier}

    def run_stage(self, name: str, x: torch.Tensor, input_ids: torch.Tensor,
                  attention_mask: torch.Tensor) -> torch.Tensor:
        """One stage on the previous stage's output ``x`` (the ids for the embeddings)."""
        stage = self.get_submodule(name)
        return stage(x) if name == "embeddings" else stage(x, attention_mask)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T) token ids and (B, T) bool mask (True on real tokens) -> (B, num_classes) logits."""
        _check_mask(input_ids, attention_mask)
        stages = list(self.stages().items())
        if self.micro_batches > 1 or self.checkpoint_stages:
            return gpipe_forward(stages, self.run_stage, (input_ids, attention_mask), self.micro_batches,
                                 self.checkpoint_stages)
        return run_in_order(stages, self.run_stage, (input_ids, attention_mask))


def _check_sizes(**sizes: int) -> None:
    """Sizes below 1 fail later with no name: ``heads=0`` as a ZeroDivisionError, ``hidden=0`` inside the optimizer
    step (torch's ``_foreach_norm``)."""
    for name, size in sizes.items():
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"hetrain: {name}={size!r} must be a positive whole number (model.{name}; the "
                             "defaults are hidden=128, heads=4)")


def _check_settings(layers: int, ffn: int | None, dropout: float, attention_dropout: float | None) -> None:
    """``layers < 0`` built no block and trained the embeddings alone, ``ffn=0`` silently became ``4 * hidden``; a
    negative ``ffn`` or a dropout outside [0, 1] failed later in torch without naming the setting."""
    if isinstance(layers, bool) or not isinstance(layers, int) or layers < 0:
        raise ValueError(f"hetrain: layers={layers!r} must be a whole number >= 0 (model.layers, the encoder blocks; "
                         "the default is 2)")
    if ffn is not None and (isinstance(ffn, bool) or not isinstance(ffn, int) or ffn < 1):
        raise ValueError(f"hetrain: ffn={ffn!r} must be a positive whole number (model.ffn, the MLP's width), or null "
                         "for 4 * model.hidden")
    for name, p in (("dropout", dropout), ("attention_dropout", attention_dropout)):
        if p is not None and (isinstance(p, bool) or not isinstance(p, int | float) or not 0 <= p <= 1):
            default = "the default is 0.1" if name == "dropout" else "null takes model.dropout"
            raise ValueError(f"hetrain: {name}={p!r} must be a probability in [0, 1] (model.{name}; {default})")


def _check_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
    """The classifier's mask is (B, T) bool. A float 0/1 mask (Hugging Face's) would reach SDPA as an additive bias
    that masks nothing, and a packed (B, 1, T, T) mask would give logits per token instead of per row."""
    if attention_mask.dim() != 2 or attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"hetrain: BertClassifier takes a (B, T) attention_mask like input_ids {tuple(input_ids.shape)}, got "
            f"{tuple(attention_mask.shape)}; packed rows with a (B, 1, T, T) mask go through "
            "Embeddings(position_ids) and EncoderBlock, since the classifier pools whole rows")
    if attention_mask.dtype != torch.bool:
        raise ValueError(
            f"hetrain: BertClassifier's attention_mask must be bool (True on real tokens), got {attention_mask.dtype}; "
            "pass attention_mask.bool() (a float one would be added to the attention scores, masking nothing)")


def _check_block_mask(x: torch.Tensor, attention_mask: torch.Tensor) -> None:
    """An encoder block's mask is (B, T) bool or (B, 1, T, T). Others broadcast silently against the (B, heads, T, T)
    scores: a (B, T, T) mask gave sequence b's mask to head b, and a float (B, T) 0/1 mask was added as a bias that
    masks nothing. Shapes and dtypes only: no device read, nothing data-dependent for torch.compile."""
    b, t = x.shape[0], x.shape[1]
    if attention_mask.shape == (b, t):
        if attention_mask.dtype != torch.bool:
            raise ValueError(
                f"hetrain: EncoderBlock's (B, T) attention_mask must be bool (True on real tokens), got "
                f"{attention_mask.dtype}; pass attention_mask.bool() (a float one would be added to the attention "
                "scores, masking nothing)")
    elif attention_mask.shape != (b, 1, t, t):
        raise ValueError(
            f"hetrain: EncoderBlock takes a (B, T) bool attention_mask, or (B, 1, T, T) for packed rows "
            f"(hetrain.data.packing.segment_attention_mask): {(b, t)} or {(b, 1, t, t)} for x {tuple(x.shape)}, got "
            f"{tuple(attention_mask.shape)}; a (B, T, T) mask needs attention_mask[:, None]")
