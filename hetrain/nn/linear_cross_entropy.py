"""``hetrain.nn.LinearCrossEntropyHead``: a language-model head that returns the loss, never the logits."""

from __future__ import annotations

import torch

from hetrain.nn._share import refuse_unconvertible_anew
from hetrain.ops.linear_cross_entropy import check_loss_settings, linear_cross_entropy


class LinearCrossEntropyHead(torch.nn.Module):
    """``nn.Linear(hidden, vocab)`` followed by cross-entropy, fused: ``forward(hidden, target)`` is the loss.

    Holds ``weight`` (vocab, hidden) and ``bias`` (vocab,) exactly as ``nn.Linear`` does (same names,
    shapes and initialisation), so state dicts move between the two. It is not an ``nn.Linear``
    subclass: its forward takes targets and returns a loss, so it cannot stand where a Linear does.
    """

    def __init__(self, hidden: int, vocab: int, bias: bool = True, ignore_index: int = -100,
                 label_smoothing: float = 0.0, reduction: str = "mean", memory_budget: int | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        who = "hetrain.nn.LinearCrossEntropyHead"
        for name, size in (("hidden", hidden), ("vocab", vocab)):
            if isinstance(size, bool) or not isinstance(size, int) or size < 1:
                raise ValueError(f"{who}: {name} must be a size >= 1, got {size!r}")
        # Now, not at the first forward.
        check_loss_settings(who, ignore_index, label_smoothing, reduction, memory_budget)
        self.in_features, self.out_features = hidden, vocab
        self.ignore_index, self.label_smoothing = ignore_index, label_smoothing
        self.reduction, self.memory_budget = reduction, memory_budget
        self.weight = torch.nn.Parameter(torch.empty(vocab, hidden, device=device, dtype=dtype))
        bias_param = torch.nn.Parameter(torch.empty(vocab, device=device, dtype=dtype)) if bias else None
        self.register_parameter("bias", bias_param)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``nn.Linear``'s own initialisation (it reads only ``weight`` and ``bias``)."""
        torch.nn.Linear.reset_parameters(self)

    def forward(self, hidden: torch.Tensor, target: torch.Tensor,
                num_items: int | float | torch.Tensor | None = None) -> torch.Tensor:
        return linear_cross_entropy(hidden, self.weight, target, self.bias, ignore_index=self.ignore_index,
                                    label_smoothing=self.label_smoothing, reduction=self.reduction,
                                    num_items=num_items, memory_budget=self.memory_budget)

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear, *, ignore_index: int = -100, label_smoothing: float = 0.0,
                    reduction: str = "mean", memory_budget: int | None = None) -> LinearCrossEntropyHead:
        """A head sharing ``linear``'s parameters (no copy), so on its device and dtype; move it with ``.to()``.
        ``linear`` is refused unless it computes as torch's does, and with hooks or a pruned weight, which the new
        head would not take (:func:`hetrain.nn._share.refuse_unconvertible_anew`)."""
        who = "hetrain.nn.LinearCrossEntropyHead.from_linear"
        refuse_unconvertible_anew(who, linear, torch.nn.Linear, parameters=("weight", "bias"))
        head = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta",
                   ignore_index=ignore_index, label_smoothing=label_smoothing, reduction=reduction,
                   memory_budget=memory_budget)
        head.weight = linear.weight
        head.bias = linear.bias
        return head

    def extra_repr(self) -> str:
        return (f"hidden={self.in_features}, vocab={self.out_features}, bias={self.bias is not None}, "
                f"ignore_index={self.ignore_index}, label_smoothing={self.label_smoothing}, "
                f"reduction={self.reduction!r}")
