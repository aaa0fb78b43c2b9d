"""AdamW for a model whose embedding tables get sparse gradients: ``SparseAwareAdamW``.

torch's fused AdamW refuses sparse gradients and its ``SparseAdam`` takes nothing else, while
Lightning drives one optimizer per task. ``SparseAwareAdamW`` is that one optimizer: parameter groups
marked ``sparse=True`` (the weights of ``nn.Embedding(sparse=True)`` and ``nn.EmbeddingBag(sparse=True)``
tables, see :func:`sparse_parameters`) step lazily through :func:`hetrain.ops.sparse_adamw.sparse_adamw_`
(only the rows a batch used); every other group steps through torch's ``AdamW`` (fused where the devices
allow), which shares this optimizer's groups and state, so learning-rate schedules, ``state_dict``
and checkpoints see one optimizer. A group added after construction without a ``sparse`` flag (Lightning's
``BaseFinetuning`` unfreezing a module) steps each parameter by its gradient's layout.

Why: an embedding table on a CPU pipeline stage (bert_split) is worth it only when its step is cheap.
A dense AdamW step over BERT-base's 30522 x 768 table reads and writes all of it and its moments
every step; the lazy step touches the rows of the batch's tokens (benchmarks/RESULTS.md).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from hetrain.ops.sparse_adamw import check_hyperparameters, sparse_adamw_


def sparse_parameters(module: nn.Module, frozen: bool = False) -> list[nn.Parameter]:
    """The weights of the ``nn.Embedding(sparse=True)`` and ``nn.EmbeddingBag(sparse=True)`` tables in ``module``,
    which get sparse gradients; a weight tied between tables is listed once (twice, it would step twice). Those that
    require no gradient too if ``frozen`` (a table that is unfrozen later needs a SparseAwareAdamW)."""
    tables = (m for m in module.modules() if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.sparse)
    found = {id(m.weight): m.weight for m in tables if frozen or m.weight.requires_grad}
    return list(found.values())


# torch's AdamW options the lazy step does not implement: refused in a sparse group rather than ignored.
UNSUPPORTED_SPARSE_OPTIONS = ("maximize", "amsgrad", "capturable", "differentiable", "foreach", "fused")


def _loaded_group(index: int, saved: dict[str, Any], sparse: bool | None) -> dict[str, Any]:
    """Saved group ``index`` as a group whose ``sparse`` flag is this optimizer's (the model says which tables get
    sparse gradients now; ``None``, a group added without the flag, steps each parameter by its gradient). A sparse
    group drops the torch AdamW options a dense group of the saved run carried, which its lazy step has none of; it
    refuses maximize or amsgrad turned on, whose update it cannot make. The others (foreach, fused, capturable,
    differentiable) only choose how torch's step runs, so they are dropped."""
    if not sparse:
        return {**saved, "sparse": sparse}
    on = [key for key in ("maximize", "amsgrad") if saved.get(key)]
    if on:
        raise ValueError(f"hetrain.SparseAwareAdamW: parameter group {index} is sparse=True here, but the state was "
                         f"saved with {' and '.join(on)} on for it, which its lazy step does not have; load it into a "
                         "dense group (nn.Embedding(sparse=False)), as it was saved")
    kept = {key: value for key, value in saved.items() if key not in UNSUPPORTED_SPARSE_OPTIONS}
    return {**kept, "sparse": True}


class SparseAwareAdamW(torch.optim.Optimizer):
    """AdamW whose ``sparse=True`` groups take sparse gradients and update only the rows they name."""

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, fused: bool | None = None) -> None:
        check_hyperparameters(lr, betas, eps, weight_decay, caller="hetrain.SparseAwareAdamW")
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay, "sparse": False}
        super().__init__(params, defaults)
        self._fused = fused
        self._share_with_dense()

    def __getstate__(self) -> dict[str, Any]:
        return {**super().__getstate__(), "_fused": self._fused}

    def __setstate__(self, state: dict[str, Any]) -> None:
        # torch's state keeps the groups and their state; the inner dense AdamW is re-made over them (a deepcopy or
        # unpickled optimizer had none, and its next step failed). torch's load_state_dict calls this with only
        # "state" and "param_groups": the optimizer keeps its own fused choice, for the groups added after a resume.
        super().__setstate__(state)
        self._fused = state.get("_fused", getattr(self, "_fused", None))
        self._share_with_dense()

    def _share_with_dense(self) -> None:
        """torch's AdamW over the dense groups, the same group dicts and state (re-made after a state load). It
        holds the groups without a sparse flag too; their sparse-gradient parameters are hidden from it (step)."""
        dense = [g for g in self.param_groups if not g["sparse"]]
        self._dense = None
        if dense:
            g0 = self.defaults
            self._dense = torch.optim.AdamW(dense, lr=g0["lr"], betas=g0["betas"], eps=g0["eps"],
                                            weight_decay=g0["weight_decay"], fused=self._fused)
            self._dense.state = self.state
            # As torch's AdamW reads a loaded state: a step count saved by a sparse group (an int) becomes the tensor
            # its step takes, for a table that is dense now.
            self._dense.__setstate__(self._dense.__getstate__())

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        params = param_group["params"]
        if not isinstance(params, (torch.Tensor, set)):  # a set holds no repeats (and torch refuses it)
            # Each parameter once, in order: torch only warns of a repeat, and its step and the lazy one would step a
            # weight tied between modules once per listing. Lightning's BaseFinetuning lists a tied weight once per
            # module it unfreezes, so a repeat is dropped rather than refused.
            # A (name, parameter) pair counts by its parameter, the first name kept.
            first: dict[int, Any] = {}
            for p in params:
                first.setdefault(id(p[1] if isinstance(p, tuple) else p), p)
            param_group["params"] = list(first.values())
        if hasattr(self, "_fused") and "sparse" not in param_group:
            # Added after construction by code that knows no sparse flag (Lightning's BaseFinetuning unfreezing a
            # sparse table): each parameter steps by its gradient's layout (step).
            param_group["sparse"] = None
        # A group may set its own lr, betas, eps and weight_decay (__init__ checked the defaults).
        own = {**self.defaults, **param_group}
        check_hyperparameters(own["lr"], own["betas"], own["eps"], own["weight_decay"],
                              caller="hetrain.SparseAwareAdamW")
        if param_group.get("sparse"):
            unsupported = [key for key in UNSUPPORTED_SPARSE_OPTIONS if param_group.get(key)]
            if unsupported:
                raise ValueError(f"hetrain.SparseAwareAdamW: a sparse=True group takes lr, betas, eps and "
                                 f"weight_decay; its lazy step has no {', '.join(unsupported)}: leave it out of that "
                                 "group, or put the table in a dense group (nn.Embedding(sparse=False))")
        super().add_param_group(param_group)
        if hasattr(self, "_fused"):  # after __init__ (e.g. unfreezing): a dense group added now must step too
            self._share_with_dense()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Each group keeps its own "sparse" flag, whatever the saved run's was (torch's AdamW saves none).
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):  # zip would drop the extra groups and their state silently
            raise ValueError(f"hetrain.SparseAwareAdamW: the state has {len(saved_groups)} parameter groups, this "
                             f"optimizer {len(self.param_groups)}; build the optimizer with the groups it was saved "
                             "with")
        groups = [_loaded_group(i, saved, mine["sparse"])
                  for i, (mine, saved) in enumerate(zip(self.param_groups, saved_groups, strict=True))]
        super().load_state_dict({**state_dict, "param_groups": groups})  # replaces the group dicts and the state
        self._share_with_dense()

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        lazy = self._lazy_parameters()
        if self._dense is not None:
            # torch's AdamW skips a parameter without a gradient: those of lazy that it holds (groups without a
            # sparse flag) lend it theirs back only after its step.
            hidden = [(p, p.grad) for p, group in lazy if group["sparse"] is None]
            for p, _ in hidden:
                p.grad = None
            try:
                self._dense.step()  # first: on a GPU its kernels run while the CPU steps the sparse tables
            finally:
                for p, grad in hidden:
                    p.grad = grad
        for p, group in lazy:
            self._step_sparse(p, group)
        return loss

    def _lazy_parameters(self) -> list[tuple[torch.Tensor, dict[str, Any]]]:
        """The parameters to step lazily, with their groups. Checks every gradient first: a refused one leaves all
        the parameters as they were (torch's AdamW had stepped the groups before it)."""
        lazy = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                # A group without a sparse flag (None) steps each parameter as its gradient is.
                sparse = p.grad.is_sparse if group["sparse"] is None else bool(group["sparse"])
                if p.grad.is_sparse and not sparse:
                    raise ValueError(f"hetrain.SparseAwareAdamW: a parameter of shape {tuple(p.shape)} in a dense "
                                     "group got a sparse gradient; put it in a group with sparse=True "
                                     "(hetrain.optim.sparse_parameters(model) lists them)")
                if sparse and not p.grad.is_sparse:
                    raise ValueError(f"hetrain.SparseAwareAdamW: a parameter of shape {tuple(p.shape)} in a "
                                     "sparse=True group got a dense gradient. Build its table with "
                                     "nn.Embedding(..., sparse=True); if it is one, the weight is also used by a dense "
                                     "module (tied, e.g. to an output head), whose gradient is dense: put it in a "
                                     "dense group")
                if not sparse:
                    continue
                on = [key for key in ("maximize", "amsgrad") if group.get(key)]
                if on:  # in a group without a sparse flag (a sparse=True one refused them when added)
                    raise ValueError(f"hetrain.SparseAwareAdamW: a parameter of shape {tuple(p.shape)} got a sparse "
                                     f"gradient in a group with {' and '.join(on)} on, which the lazy step does not "
                                     "have; turn it off for that group, or give the table dense gradients")
                lazy.append((p, group))
        return lazy

    def _step_sparse(self, p: torch.Tensor, group: dict[str, Any]) -> None:
        state = self.state[p]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
        state["step"] += 1
        sparse_adamw_(p, state["exp_avg"], state["exp_avg_sq"], p.grad, state["step"], group["lr"], group["betas"],
                      group["eps"], group["weight_decay"])
