"""Output projection fused with softmax cross-entropy, without ever holding the full (rows, vocab) logits.

``loss = cross_entropy(hidden @ weight.T + bias, target)`` with the logits in float32 (float64 for float64
inputs). The rows are processed in chunks, so the extra memory is one chunk of logits however many rows
there are. For each chunk:

1. ``logits = hidden_chunk @ weight.T (+ bias)`` with torch's matmul (cuBLAS / the CPU BLAS);
2. a per-row kernel (the registry's backend: ``triton``, ``cpu`` or ``torch``) computes the logsumexp
   and the loss of each row (label smoothing, ``ignore_index``) and overwrites the logits with
   ``d(loss)/d(logits) = (softmax - smoothed one-hot) * scale``;
3. ``grad_hidden_chunk = dlogits @ weight``, ``grad_weight += dlogits.T @ hidden_chunk``,
   ``grad_bias += dlogits.sum(0)``.

**Why the gradients are computed in forward.** Backward needs each chunk's softmax again. Keeping the
dlogits of every chunk would be the full logits this op exists to avoid; recomputing them would cost a
second ``hidden @ weight.T`` GEMM. Computing the input gradients while the chunk is at hand (the "fused
linear cross-entropy" approach) keeps one chunk alive and runs three GEMMs in all, as unfused autograd
does; backward then only multiplies the stored gradients by the upstream gradient (a scalar for
``"mean"``/``"sum"``). **What it costs:** the gradients (``hidden``-sized, ``weight``-sized) live from
forward to backward, and they are computed even if backward never runs. They are skipped for inputs
that do not require grad, and all of them under ``torch.no_grad()``.

**``reduction="none"``** returns per-row losses; their upstream gradient can differ per row and is only
known in backward, so forward stores no gradients there. Backward recomputes each chunk's logits and
runs the kernel with each row's upstream gradient as its scale (one extra GEMM; memory still one chunk).

**Memory.** ``memory_budget`` bounds the chunk's working set, in bytes:
``chunk_rows * (V * (c + h) + 4 * H * [half])``, with ``c`` the logits' element size (4, or 8 for
float64), ``h`` the input's element size for bf16/fp16 (their GEMM output and the dlogits cast back
for the gradient GEMMs, else 0) and ``4 * H`` the chunk of hidden in float32 for the weight gradient
(bf16/fp16 only). On CUDA, and for bf16 on a CPU with bf16 dot products, bf16/fp16 logits stay in their
dtype (see :func:`_chunked`) and a row costs ``V * h``. Beside it: the per-row losses (``4 * rows`` bytes)
and, for bf16/fp16 weights, a float32 weight-gradient accumulator (``4 * V * H``) so the sum over chunks
does not round at every chunk; each chunk's weight-gradient GEMM adds into it directly where torch can
(:func:`_gemm_adds_into_float32`), else through one weight-sized scratch in the input dtype. The chunk
buffers are freed before the float32 sums are cast to the parameters' dtype. Backward scales the gradients
computed in forward in place and hands them to autograd (the weight's ``.grad`` is that tensor, no copy),
unless the graph is kept for another backward.
The default budget, :data:`DEFAULT_MEMORY_BUDGET` = 96 MiB, gives 824 rows of float32 logits at
vocab 30522: 96 MiB of chunk plus 64 KiB of losses at 16384 rows, under 128 MiB.

``num_items`` makes gradient accumulation exact: the loss is the sum over this call's non-ignored rows
divided by ``num_items``, so micro-batches each given the whole batch's token count add up to the loss
and gradients of the whole batch in one ``"mean"`` call.
"""

from __future__ import annotations

import math
import operator
import threading

import torch

from hetrain import cpu_features, plugins
from hetrain.ops import _args, _backends
from hetrain.ops._op import batched_by_vmap, compute_dtype, op, requires_grad_beneath

OP = "linear_cross_entropy"
DEFAULT_MEMORY_BUDGET = 96 * 2**20
_HALF = (torch.float16, torch.bfloat16)


def bytes_per_row(vocab: int, hidden: int, dtype: torch.dtype, half_logits: bool = False) -> int:
    """Working-set bytes one row of a chunk costs (the formula in the module docstring)."""
    if dtype in _HALF:
        if half_logits:
            return vocab * dtype.itemsize
        return vocab * (compute_dtype(dtype).itemsize + dtype.itemsize) + 4 * hidden
    return vocab * compute_dtype(dtype).itemsize


def chunk_rows(rows: int, vocab: int, hidden: int, dtype: torch.dtype, memory_budget: int | None = None,
               half_logits: bool = False) -> int:
    """Rows per chunk: as many as ``memory_budget`` bytes hold (at least 1, at most ``rows``)."""
    budget = DEFAULT_MEMORY_BUDGET if memory_budget is None else memory_budget
    per_row = bytes_per_row(vocab, hidden, dtype, half_logits)
    if budget < per_row:
        raise ValueError(f"hetrain.ops.linear_cross_entropy: memory_budget={budget} bytes is less than one row of "
                         f"the chunk ({per_row} bytes at vocab {vocab}, hidden {hidden}, {dtype})")
    return max(1, min(rows, budget // per_row))


# --- reference ---------------------------------------------------------------------------------

def linear_cross_entropy_ref(
    hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, bias: torch.Tensor | None = None,
    ignore_index: int = -100, label_smoothing: float = 0.0, reduction: str = "mean",
    num_items: int | float | torch.Tensor | None = None,
) -> torch.Tensor:
    """What the op computes, in plain torch (the full logits at once); the tests' oracle."""
    logits = torch.nn.functional.linear(hidden, weight, bias).to(compute_dtype(hidden.dtype))
    logits, target = logits.reshape(-1, weight.shape[0]), target.reshape(-1)
    if num_items is not None:
        return torch.nn.functional.cross_entropy(logits, target, ignore_index=ignore_index,
                                                 label_smoothing=label_smoothing, reduction="sum") / num_items
    loss = torch.nn.functional.cross_entropy(logits, target, ignore_index=ignore_index,
                                             label_smoothing=label_smoothing, reduction=reduction)
    return loss.view(hidden.shape[:-1]) if reduction == "none" else loss


class TorchBackend:
    """The per-row kernel in plain torch, so the chunked algorithm runs on any device."""

    @staticmethod
    def rows(logits: torch.Tensor, loss: torch.Tensor, target: torch.Tensor, scale: torch.Tensor | None,
             ignore_index: int, label_smoothing: float) -> None:
        """Writes each row's loss into ``loss`` (M,); with a ``scale`` (M,), d(loss)/d(logits) over ``logits``."""
        if logits.dtype in _HALF:  # bf16/fp16 logits: computed in float32, the gradient written back
            work = logits.float()
            TorchBackend.rows(work, loss, target, scale, ignore_index, label_smoothing)
            if scale is not None:
                logits.copy_(work)
            return
        V = logits.shape[1]
        keep = target != ignore_index
        safe = torch.where(keep, target, 0)[:, None]
        # From log_softmax (z - max - log(sum)), as F.cross_entropy: lse - z_t rounded a small loss at the
        # logits' magnitude, and the sum of the logits for smoothing overflowed.
        logp = torch.log_softmax(logits, 1)
        row = -(1.0 - label_smoothing) * logp.gather(1, safe)[:, 0]
        if label_smoothing > 0:
            row = row - label_smoothing / V * logp.sum(1)
        loss.copy_(torch.where(keep, row, 0.0))
        if scale is not None:
            # softmax = exp(log_softmax): exp(z - logsumexp) rounded the logsumexp at the logits' magnitude, 6% off
            # at 2^20.
            torch.exp(logp, out=logits).sub_(label_smoothing / V)
            logits.scatter_add_(1, safe, logits.new_full(safe.shape, label_smoothing - 1.0))
            # Exact zeros for ignored rows, as the C++ and Triton kernels write, even if scale is inf or the row's
            # logits are NaN (a padding position's hidden state): multiplying by 0 would keep the NaN.
            logits.mul_(scale[:, None]).masked_fill_(~keep[:, None], 0.0)
        del logp  # the chunk's extra memory stays one logits-sized buffer


class CppBackend:
    """The C++ kernel of hetrain._C (csrc/linear_cross_entropy.cpp)."""

    @staticmethod
    def rows(logits: torch.Tensor, loss: torch.Tensor, target: torch.Tensor, scale: torch.Tensor | None,
             ignore_index: int, label_smoothing: float) -> None:
        torch.ops.hetrain_C.cross_entropy_rows_(logits, loss, target, scale, ignore_index, label_smoothing)


def _register_backends() -> None:
    _backends.register_triton(OP, "hetrain.ops.triton.linear_cross_entropy")
    _backends.register_cpp(OP, CppBackend, devices=("cpu",))
    _backends.register_torch(OP, TorchBackend)


_register_backends()


# --- the chunked algorithm ---------------------------------------------------------------------

# Per thread (a GPU's backward runs on autograd's device threads): set while ``reduction="none"``'s backward
# recomputes a chunk's logits.
_recompute = threading.local()


def recomputing_logits() -> bool:
    """Whether this thread is recomputing logits in a ``reduction="none"`` backward: forward work run again, which
    :class:`hetrain.callbacks.throughput.TrainingFlopCounter` leaves out as it does activation checkpointing's."""
    return getattr(_recompute, "logits", False)


def _check_targets(target: torch.Tensor, vocab: int, ignore_index: int) -> None:
    bad = (target != ignore_index) & ((target < 0) | (target >= vocab))
    if target.device.type == "cuda":
        # A host check would sync every step; torch's own cross_entropy asserts on the device too.
        torch._assert_async(~bad.any(), "hetrain.ops.linear_cross_entropy: a target is outside [0, vocab)")
    elif bool(bad.any()):
        value = target[bad][0].item()
        raise ValueError(f"hetrain.ops.linear_cross_entropy: target {value} is outside [0, {vocab}) and is not "
                         f"ignore_index ({ignore_index})")


def _chunked(
    hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, bias: torch.Tensor | None,
    ignore_index: int, label_smoothing: float, scale: torch.Tensor | None, memory_budget: int,
    needs: tuple[bool, bool, bool], *, half_logits: bool | None = None, recompute: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row losses (M,) and, where ``needs`` says and ``scale`` (0-d or (M,)) is given, the gradients of
    ``sum_r loss_r * scale_r`` for hidden, weight and bias (empty tensors for those not computed).
    ``recompute``: the logits were computed in forward already (see :func:`recomputing_logits`).

    bf16/fp16 inputs take one of two paths. ``half_logits`` (the default on CUDA, and for bf16 on a CPU with
    bf16 dot products, :func:`hetrain.cpu_features.has_fast_bf16`): the logits stay in the GEMM's output
    dtype; the row kernel reads them, computes in float32 and writes the gradient over them, and each chunk's
    weight gradient is one GEMM in the input dtype (tensor cores or AMX, float32 accumulation inside the
    GEMM) added into the float32 sum. Otherwise (a CPU that emulates bf16, where float32 GEMMs are the fast
    ones) the logits are copied to float32, and the weight gradient is a float32 GEMM. The values are the same:
    the GEMM rounds the logits to the input dtype either way, and the gradient GEMMs read the gradient in
    it. On an H200 the float32 weight-gradient GEMM ran at a tenth of the rate (the op took 38 ms against
    eager's 16 at 16384x768, vocab 30522), and the float32 copies double the chunk's traffic and size. On a
    CPU with AMX the bf16 weight-gradient GEMM (2048 x 8192 by 2048 x 768) took 24 ms against 72 in float32,
    and the copies a quarter of the op."""
    M, H = hidden.shape
    V = weight.shape[0]
    cdt = compute_dtype(hidden.dtype)
    half = hidden.dtype in _HALF
    if half_logits is None:
        half_logits = hidden.is_cuda or (hidden.dtype == torch.bfloat16 and hidden.device.type == "cpu"
                                         and cpu_features.has_fast_bf16())
    half_logits = half and half_logits
    _check_targets(target, V, ignore_index)
    need_h, need_w, need_b = needs if scale is not None else (False, False, False)
    loss = hidden.new_empty(M, dtype=cdt)
    grad_h = hidden.new_empty((M, H) if need_h else (0,))
    # Weight/bias gradients are sums over every chunk: accumulate them in the logits' dtype. With 16-bit logits
    # in one chunk, that chunk's GEMM is the whole weight gradient: written in the weight's dtype it is rounded
    # once, as a float32 sum cast at the end is, without a float32 sum to fill, add into and cast.
    c = chunk_rows(M, V, H, hidden.dtype, memory_budget, half_logits=half_logits)
    direct_wgrad = half_logits and M <= c
    grad_w = weight.new_zeros((V, H) if need_w else (0,), dtype=cdt if half and not direct_wgrad else weight.dtype)
    grad_b = hidden.new_zeros(V if need_b else 0, dtype=cdt)
    _run_chunks(hidden, weight, target, bias, ignore_index, label_smoothing, scale, c, half_logits, direct_wgrad,
                loss, grad_h if need_h else None, grad_w if need_w else None, grad_b if need_b else None, recompute)
    # The chunk buffers are gone by now: the casts below need room only beside the sums.
    return loss, grad_h, grad_w.to(weight.dtype), grad_b.to(bias.dtype if bias is not None else cdt)


# Per device type: whether a 16-bit GEMM adds straight into a float32 tensor (see _gemm_adds_into_float32).
_ADDS_INTO_FLOAT32: dict[str, bool] = {}


def _gemm_adds_into_float32(device: torch.device) -> bool:
    """Whether ``torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)`` adds the bf16/fp16 product ``a @ b``
    into the float32 ``acc`` on this device: cuBLAS then accumulates each chunk's weight gradient into the
    float32 sum itself, with no weight-sized scratch and no rounding of the chunk's share to 16 bits. torch
    has the overload (aten::addmm.dtype_out) on CUDA since 2.8, and takes a float32 addend in later
    versions; tried once per device type on a 1x1 product whose result is checked (not while a CUDA graph
    is being captured, where the check cannot read the result)."""
    if device.type not in _ADDS_INTO_FLOAT32:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return False
        try:
            a = torch.tensor([[1.0, 2.0]], dtype=torch.bfloat16, device=device)
            b = torch.tensor([[3.0], [4.0]], dtype=torch.bfloat16, device=device)
            acc = torch.full((1, 1), 0.5, device=device)
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
            _ADDS_INTO_FLOAT32[device.type] = acc.item() == 11.5
        except (RuntimeError, NotImplementedError, TypeError):
            _ADDS_INTO_FLOAT32[device.type] = False
    return _ADDS_INTO_FLOAT32[device.type]


def _run_chunks(
    hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, bias: torch.Tensor | None, ignore_index: int,
    label_smoothing: float, scale: torch.Tensor | None, c: int, half_logits: bool, direct_wgrad: bool,
    loss: torch.Tensor, grad_h: torch.Tensor | None, grad_w: torch.Tensor | None, grad_b: torch.Tensor | None,
    recompute: bool = False,
) -> None:
    """Fills ``loss`` and adds each chunk of ``c`` rows' share into the gradients that are not None (see
    :func:`_chunked`; ``direct_wgrad``: the one chunk's GEMM is the weight gradient). Its own function so that
    the chunk buffers are freed when it returns."""
    M = hidden.shape[0]
    V = weight.shape[0]
    cdt = compute_dtype(hidden.dtype)
    half = hidden.dtype in _HALF
    write_grad = grad_h is not None or grad_w is not None or grad_b is not None
    gemm_buf = hidden.new_empty((c if M else 0, V))  # the GEMM's own dtype
    logits_buf = hidden.new_empty((c if M else 0, V), dtype=cdt) if half and not half_logits else gemm_buf
    half_wgrad = half_logits and grad_w is not None
    direct_wgrad = half_wgrad and direct_wgrad
    adds_into_float32 = half_wgrad and not direct_wgrad and _gemm_adds_into_float32(hidden.device)
    wgrad_chunk = weight.new_empty(weight.shape) if half_wgrad and not direct_wgrad and not adds_into_float32 \
        else None
    # The bias gradient of 16-bit logits on a CPU: ATen's sum of bf16 into float32 there casts the whole chunk
    # first (20 ms against 1.8 at 2048 x 8192); its bf16 sum accumulates in float32 and rounds once, as the
    # weight gradient's GEMM does.
    bias_sum_dtype = None if half_logits and hidden.device.type == "cpu" else cdt
    weight_t = weight.t()
    for start in range(0, M, c):
        n = min(c, M - start)
        h = hidden[start:start + n]
        out, logits = gemm_buf[:n], logits_buf[:n]
        _recompute.logits = recompute
        try:
            if bias is not None:
                torch.addmm(bias, h, weight_t, out=out)
            else:
                torch.mm(h, weight_t, out=out)
        finally:
            _recompute.logits = False
        if logits is not out:
            logits.copy_(out)
        row_scale = None
        if write_grad:
            row_scale = scale.expand(n) if scale.dim() == 0 else scale[start:start + n]
        plugins.call(OP, "rows", hidden.device.type, logits, loss[start:start + n], target[start:start + n],
                     row_scale, ignore_index, label_smoothing)
        if not write_grad:
            continue
        dlogits = out.copy_(logits) if logits is not out else logits  # in the GEMMs' dtype
        if grad_h is not None:
            torch.mm(dlogits, weight, out=grad_h[start:start + n])
        if direct_wgrad:
            torch.mm(dlogits.t(), h, out=grad_w)
        elif adds_into_float32:
            torch.addmm(grad_w, dlogits.t(), h, out_dtype=torch.float32, out=grad_w)
        elif wgrad_chunk is not None:
            grad_w.add_(torch.mm(dlogits.t(), h, out=wgrad_chunk))
        elif grad_w is not None:
            grad_w.addmm_(logits.t(), h.to(cdt) if half else h)
        if grad_b is not None:
            grad_b.add_(logits.sum(0, dtype=bias_sum_dtype))


# --- torch.library ops -------------------------------------------------------------------------

@op("hetrain::linear_cross_entropy")
def _reduced(
    hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, bias: torch.Tensor | None,
    scale: torch.Tensor, ignore_index: int, label_smoothing: float, memory_budget: int,
    need_hidden: bool, need_weight: bool, need_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``sum_r loss_r * scale`` (0-d) and its gradients, computed in the same pass (see module docstring)."""
    loss, gh, gw, gb = _chunked(hidden, weight, target, bias, ignore_index, label_smoothing, scale, memory_budget,
                                (need_hidden, need_weight, need_bias))
    return loss.sum() * scale, gh, gw, gb


@_reduced.register_fake
def _(hidden, weight, target, bias, scale, ignore_index, label_smoothing, memory_budget,
      need_hidden, need_weight, need_bias):
    cdt = compute_dtype(hidden.dtype)
    return (hidden.new_empty((), dtype=cdt), hidden.new_empty(hidden.shape if need_hidden else (0,)),
            weight.new_empty(weight.shape if need_weight else (0,)),
            hidden.new_empty(weight.shape[0] if need_bias else 0, dtype=bias.dtype if bias is not None else cdt))


def _reduced_setup(ctx, inputs, output):
    _loss, gh, gw, gb = output
    ctx.needs = inputs[8:11]
    ctx.save_for_backward(gh, gw, gb)


def _graph_kept(saved: tuple[torch.Tensor, ...]) -> bool:
    """Whether the running backward keeps its graph (``retain_graph``/``create_graph``), so the saved gradients
    must stay as they are; True wherever that is not known (a traced graph, a torch that does not say)."""
    keep = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    if keep is None or torch.compiler.is_compiling() or any(type(t) is not torch.Tensor for t in saved):
        return True
    return bool(keep())


def _reduced_backward(ctx, grad_loss, _gh, _gw, _gb):
    saved = ctx.saved_tensors
    gh, gw, gb = saved
    need_h, need_w, need_b = ctx.needs
    # The gradients were computed in forward for a loss gradient of 1. Scaled in place when the graph is not
    # kept, autograd then takes them as they are (the weight's .grad becomes this very tensor, no copy: at
    # BERT-base's vocabulary the largest buffer of the step). A kept graph's next backward must find them
    # unscaled, so there they are scaled into new tensors. A loss gradient of exactly 1 held on the CPU
    # (``loss.backward()`` on the loss itself) leaves them as they are: the multiply is a pass over the
    # weight-sized gradient (3.6 of a 64 ms bf16 step at 2048 x 768, vocab 8192); on a GPU, reading the value
    # would wait for the device.
    if _graph_kept(saved):
        scale = lambda t: t * grad_loss  # noqa: E731
    elif grad_loss.device.type == "cpu" and grad_loss.item() == 1.0:
        scale = lambda t: t  # noqa: E731
    else:
        scale = lambda t: t.mul_(grad_loss)  # noqa: E731
    return (scale(gh) if need_h else None, scale(gw) if need_w else None, None,
            scale(gb) if need_b else None, None, None, None, None, None, None, None)


# The gradients are computed in forward: with a graph they would lead a second derivative back into the
# first-order backward and give a wrong result without an error, so double backward is refused.
_SECOND_ORDER = "hetrain.ops.linear_cross_entropy_ref (F.linear + F.cross_entropy)"
# Its backward reads the upstream gradient's value (a loss gradient of exactly 1 leaves the gradients as they are)
# and scales the saved gradients in place: neither runs under vmap, so vmap with a torch.func gradient is refused.
_reduced.register_autograd(_reduced_backward, setup_context=_reduced_setup, public="linear_cross_entropy",
                           reference=_SECOND_ORDER, batched_backward=False)


@op("hetrain::linear_cross_entropy_rows")
def _per_row(
    hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, bias: torch.Tensor | None,
    ignore_index: int, label_smoothing: float, memory_budget: int,
) -> torch.Tensor:
    """Per-row losses (M,); no gradients are computed here (``reduction="none"``)."""
    return _chunked(hidden, weight, target, bias, ignore_index, label_smoothing, None, memory_budget,
                    (False, False, False))[0]


@_per_row.register_fake
def _(hidden, weight, target, bias, ignore_index, label_smoothing, memory_budget):
    return hidden.new_empty(hidden.shape[0], dtype=compute_dtype(hidden.dtype))


@op("hetrain::linear_cross_entropy_rows_bwd")
def _per_row_bwd(
    grad_rows: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
    bias: torch.Tensor | None, ignore_index: int, label_smoothing: float, memory_budget: int,
    need_hidden: bool, need_weight: bool, need_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of ``sum_r loss_r * grad_rows_r``: the chunks' logits recomputed, each row scaled by its own."""
    _loss, gh, gw, gb = _chunked(hidden, weight, target, bias, ignore_index, label_smoothing, grad_rows,
                                 memory_budget, (need_hidden, need_weight, need_bias), recompute=True)
    return gh, gw, gb


@_per_row_bwd.register_fake
def _(grad_rows, hidden, weight, target, bias, ignore_index, label_smoothing, memory_budget,
      need_hidden, need_weight, need_bias):
    cdt = compute_dtype(hidden.dtype)
    return (hidden.new_empty(hidden.shape if need_hidden else (0,)),
            weight.new_empty(weight.shape if need_weight else (0,)),
            hidden.new_empty(weight.shape[0] if need_bias else 0, dtype=bias.dtype if bias is not None else cdt))


def _per_row_setup(ctx, inputs, output):
    hidden, weight, target, bias, ignore_index, label_smoothing, memory_budget = inputs
    ctx.save_for_backward(hidden, weight, target, bias)
    ctx.args = (ignore_index, label_smoothing, memory_budget)


def _per_row_backward(ctx, grad_rows):
    hidden, weight, target, bias = ctx.saved_tensors
    need_h, need_w, _t, need_b = ctx.needs_input_grad[:4]
    gh, gw, gb = _per_row_bwd(grad_rows.to(compute_dtype(hidden.dtype)).contiguous(), hidden, weight, target, bias,
                              *ctx.args, need_h, need_w, need_b and bias is not None)
    return (gh if need_h else None, gw if need_w else None, None, gb if need_b and bias is not None else None,
            None, None, None)


_per_row.register_autograd(_per_row_backward, setup_context=_per_row_setup, public="linear_cross_entropy",
                           reference=_SECOND_ORDER)


# --- functional face ---------------------------------------------------------------------------

def check_loss_settings(name: str, ignore_index: int, label_smoothing: float, reduction: str,
                        memory_budget: int | None) -> None:
    """The settings a call and a :class:`hetrain.nn.LinearCrossEntropyHead` share, checked alike in both."""
    _check_ignore_index(name, ignore_index)
    _check_label_smoothing(name, label_smoothing)
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"{name}: reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    # >= 1 before the call truncates it to whole bytes: 0.5 passed a "> 0" check and was reported as 0 bytes.
    if memory_budget is not None and not (_args.is_number(memory_budget) and 1 <= memory_budget < math.inf):
        raise ValueError(f"{name}: memory_budget must be a finite number of bytes >= 1, got {memory_budget!r}")


def _check_label_smoothing(name: str, label_smoothing: object) -> None:
    """A number in [0, 1], or a 0-d CPU tensor holding one, as ``F.cross_entropy`` takes (the call reads it with
    ``float``). A bool or a string is refused, and a tensor on another device: reading it would wait for the device."""
    value = label_smoothing
    if isinstance(value, torch.Tensor):
        if value.dim() != 0 or value.dtype == torch.bool or value.is_complex() or value.device.type != "cpu":
            raise ValueError(f"{name}: label_smoothing must be a number in [0, 1] or a 0-d CPU tensor holding one, "
                             f"got a {value.dtype} tensor of shape {tuple(value.shape)} on {value.device}: pass "
                             "float(label_smoothing)")
        value = value.item()
    if not _args.is_number(value):
        raise ValueError(f"{name}: label_smoothing must be in [0, 1], got {value!r}, a {type(value).__name__}: "
                         "pass a float")
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name}: label_smoothing must be in [0, 1], got {value}")


def _check_num_items(name: str, num_items: object) -> None:
    """A count > 0: a number, or a one-element tensor (a count all-reduced across ranks stays one). A tensor's
    value is read only on the CPU, and not while compiling: on a GPU reading it would wait for the device, and
    torch.compile cannot branch on a tensor's value (under ``fullgraph=True`` it fails)."""
    if num_items is None:
        return
    if isinstance(num_items, torch.Tensor):
        if num_items.numel() != 1 or num_items.is_complex() or num_items.dtype == torch.bool:
            raise ValueError(f"{name}: num_items must be one number, got a {num_items.dtype} tensor of shape "
                             f"{tuple(num_items.shape)}")
        if num_items.device.type == "cpu" and not torch.compiler.is_compiling() and not num_items.item() > 0:
            raise ValueError(f"{name}: num_items must be > 0, got {num_items.item()}")
        return
    if not _args.is_number(num_items) or not num_items > 0:
        raise ValueError(f"{name}: num_items must be a count > 0, got {num_items!r}")


def _check_ignore_index(name: str, ignore_index: object) -> None:
    """A Python or NumPy integer, as ``F.cross_entropy`` takes. ``operator.index``, not an ``isinstance`` check: under
    torch.compile a NumPy integer is traced as a 0-d array, which it still takes. A bool would read as class 0 or 1
    and a tensor's value needs a device sync: both are refused."""
    if not isinstance(ignore_index, bool | torch.Tensor):
        try:
            operator.index(ignore_index)
            return
        except TypeError:
            pass
    raise ValueError(f"{name}: ignore_index must be an integer class index, got {ignore_index!r}")


_NAME = "hetrain.ops.linear_cross_entropy"
_EXPECTED = {"weight": "a (V, H) tensor, as nn.Linear's weight", "target": "an int64 tensor of class indices",
             "bias": "a (V,) tensor or None"}


def _check_tensors(hidden: object, weight: object, target: object, bias: object) -> None:
    """Each tensor argument is a tensor (bias may be None), so that autocast and :func:`_validate` can read them."""
    _args.rows_input(_NAME, hidden, "hidden")
    for what, t in (("weight", weight), ("target", target), ("bias", bias)):
        if not isinstance(t, torch.Tensor) and not (what == "bias" and t is None):
            raise ValueError(f"{_NAME}: {what} must be {_EXPECTED[what]}, got {type(t).__name__}")


def _validate(hidden, weight, target, bias, ignore_index, label_smoothing, reduction, num_items,
              memory_budget) -> None:
    name = _NAME
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1] or weight.shape[0] == 0:
        raise ValueError(f"{name}: weight must be (V, H) with V >= 1 and H = hidden's last dimension "
                         f"{hidden.shape[-1]}, got {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"{name}: bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    if tuple(target.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"{name}: target must have shape {tuple(hidden.shape[:-1])} (hidden's leading dimensions), "
                         f"got {tuple(target.shape)}")
    if target.dtype != torch.int64:
        raise ValueError(f"{name}: target must be int64 class indices, got {target.dtype}; pass target.long()")
    for what, t in (("weight", weight), ("bias", bias), ("target", target)):
        if t is not None and t.device != hidden.device:
            raise ValueError(f"{name}: {what} is on {t.device} but hidden is on {hidden.device}")
    for what, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.dtype != hidden.dtype:
            raise ValueError(f"{name}: {what} dtype {t.dtype} differs from hidden's {hidden.dtype}")
    check_loss_settings(name, ignore_index, label_smoothing, reduction, memory_budget)
    if num_items is not None and reduction == "none":
        raise ValueError(f"{name}: num_items divides a reduced loss; it has no meaning with reduction='none'")
    _check_num_items(name, num_items)


def _autocast_inputs(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The autocast rule, applied in Python because the cast follows the active autocast dtype (bf16 or fp16),
    which ``torch.library.register_autocast``'s fixed ``cast_inputs`` cannot. As autocast's ``F.linear``:
    floating tensors other than float64 are cast to the autocast dtype of hidden's device; float64 is kept."""
    device_type = hidden.device.type
    # torch raises for a device type without autocast (meta: a model built on the meta device).
    if not torch.amp.is_autocast_available(device_type) or not torch.is_autocast_enabled(device_type):
        return hidden, weight, bias
    dt = torch.get_autocast_dtype(device_type)

    def cast(t: torch.Tensor | None) -> torch.Tensor | None:
        return t.to(dt) if t is not None and t.is_floating_point() and t.dtype != torch.float64 else t

    return cast(hidden), cast(weight), cast(bias)


def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, bias: torch.Tensor | None = None,
    ignore_index: int = -100, label_smoothing: float = 0.0, reduction: str = "mean",
    num_items: int | float | torch.Tensor | None = None, memory_budget: int | None = None,
) -> torch.Tensor:
    """``F.cross_entropy(F.linear(hidden, weight, bias).float(), target, ...)`` without the full logits.

    hidden (..., H), weight (V, H) as in ``nn.Linear``, target (...) int64, bias (V,). The loss is
    float32 (float64 for float64 inputs). ``num_items``: the loss is the sum over non-ignored rows
    divided by it (exact gradient accumulation; see the module docstring). ``memory_budget``: bytes
    the chunk of logits may use (default :data:`DEFAULT_MEMORY_BUDGET`).

    Under autocast the projection runs in the autocast dtype, as ``F.linear`` would, and the loss stays
    float32, as autocast's ``F.cross_entropy`` gives: see :func:`_autocast_inputs`.
    """
    _check_tensors(hidden, weight, target, bias)
    hidden, weight, bias = _autocast_inputs(hidden, weight, bias)
    _validate(hidden, weight, target, bias, ignore_index, label_smoothing, reduction, num_items, memory_budget)
    budget = DEFAULT_MEMORY_BUDGET if memory_budget is None else int(memory_budget)
    h2 = hidden.reshape(math.prod(hidden.shape[:-1]), hidden.shape[-1]).contiguous()
    t1 = target.reshape(-1).contiguous()
    smoothing, ignore = float(label_smoothing), int(ignore_index)
    if reduction == "none":
        return _per_row(h2, weight.contiguous(), t1, bias, ignore, smoothing, budget).view(hidden.shape[:-1])
    cdt = compute_dtype(hidden.dtype)
    if num_items is not None:
        # A scalar, also from a one-element tensor (a count all_reduce gives as (1,)): a (1,) scale read as per-row.
        scale = 1.0 / torch.as_tensor(num_items, dtype=cdt, device=hidden.device).reshape(())
    elif reduction == "mean":
        scale = 1.0 / (t1 != ignore).sum().to(cdt)  # 1/0 = inf over zero tokens: a nan loss, as torch gives
    else:
        scale = torch.ones((), dtype=cdt, device=hidden.device)
    grad = torch.is_grad_enabled()
    if (grad and any(batched_by_vmap(t) for t in (hidden, weight, bias, target))
            and any(requires_grad_beneath(t) for t in (hidden, weight, bias))):
        # A BatchedTensor says requires_grad=False for a tensor that requires it beneath vmap: the kernel would be
        # asked for no gradient and autograd would get none (the GPU path), or its backward would read a value of
        # the batched upstream gradient (the CPU path's error, naming no op). Batched inference, with nothing to
        # differentiate, runs.
        raise RuntimeError("hetrain.ops.linear_cross_entropy: torch.vmap over the reduced loss (reduction='mean' or "
                           "'sum') with gradients enabled is not supported: its backward cannot run under vmap. Use "
                           "hetrain.ops.linear_cross_entropy_ref under vmap, reduction='none', or torch.no_grad()")
    loss, _gh, _gw, _gb = _reduced(h2, weight.contiguous(), t1, bias, scale, ignore, smoothing, budget,
                                   grad and hidden.requires_grad, grad and weight.requires_grad,
                                   grad and bias is not None and bias.requires_grad)
    return loss
