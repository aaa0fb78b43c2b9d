"""An op of hetrain: a ``torch.library`` custom op for graphs, its body called directly in eager mode.

The custom op is what ``torch.compile`` and ``torch.export`` trace (fake implementation, registered
autograd). In eager mode each call through a custom op's Python layer costs far more than a small
kernel: on a 2-core EPYC VM, a 4x64 LayerNorm forward took 11 us in the C++ kernel and 200 us
through the custom op with autograd; forward and backward of an 8x64 one took 640 us (350 us this
way) against ``F.layer_norm``'s 150 us (``make bench-overhead``, benchmarks/RESULTS.md). At
BERT-base sizes on a GPU, some 50 calls per step, that overhead would eat the fusion's gain. So
an :class:`Op` runs the same body through a plain ``torch.autograd.Function`` with the same
``setup_context`` and ``backward`` in eager mode (or the body alone when nothing needs a gradient),
and the custom op whenever a graph is being traced or an argument is a tensor subclass (fake,
functional or user-defined tensors, which need the op's registrations) or on the meta device.

Where the backend a call picks is hetrain's C++ extension, that plain Function is skipped too: the
extension registers each op with its autograd written in C++ (csrc/autograd.cpp), named by the backend's
``forward_with_grad`` entry, so forward and backward never re-enter Python. A backward written in Python
runs on the autograd engine's device thread, which must take the GIL for it; on a GPU host that was most
of a small op's host time.

Under a ``torch.func`` transform (grad, vjp, jacrev, vmap) the custom op runs, through a ``setup_context``-style
Function (the form functorch requires) where a gradient is recorded: the dispatcher unwraps functorch's wrapper
tensors, which a Triton kernel cannot read, before the body runs. First-order compositions with vmap (grad of vmap,
per-sample gradients as vmap of grad) run so, except for an op whose backward cannot run under vmap
(``batched_backward=False``: linear_cross_entropy's reads its upstream gradient's value), refused naming its
reference. A fused op's backward kernels have no derivative of their own, so stacked derivative transforms
(hessian, grad of grad, jvp over grad) and double backward (a gradient of a gradient, ``create_graph=True``, also
inside a transform: a gradient penalty under ``torch.func.grad``) raise naming the op and its torch reference,
rather than torch's "no autograd formula" for an internal op, or a wrong result (zeros, or a gradient computed
in forward taken again).
Forward-mode AD (``torch.autograd.forward_ad``, ``torch.func.jvp``, ``jacfwd``) is refused so too: the kernels
have no forward derivative, and torch's fallback for them drops a tangent silently. A tangent on the upstream
gradient of a backward (forward-over-reverse) is refused by the op's backward; so that one reaches it, a call made
while a dual level is open takes the plain Function, not the backend's C++ autograd.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.autograd import forward_ad

from hetrain import plugins

_PLAIN = (torch.Tensor, torch.nn.Parameter)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """What the ops accumulate and keep statistics in: float64 for float64 inputs, float32 for every other dtype."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def row_count(x: torch.Tensor) -> int:
    """Rows of ``as_rows(x)``: one per-row statistic each. Counted, not inferred: ``reshape(-1, 0)`` fails for a
    hidden size of 0."""
    return math.prod(x.shape[:-1])


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` as the (rows, features) matrix the row kernels take. The ops flatten inside their bodies, not in
    their faces: there the reshape and the view back record no autograd nodes, which cost a small call more
    than its kernel."""
    return x if x.dim() == 2 else x.reshape(row_count(x), x.shape[-1])


_unsafe_view = torch.ops.aten._unsafe_view.default


def in_shape_of(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``y``, a row kernel's fresh output, in ``x``'s shape as a tensor of its own, not a view of ``y``: autograd
    refuses an in-place op (``nn.ReLU(inplace=True)`` after a norm) on a view an autograd Function returns."""
    return y if y.shape == x.shape else _unsafe_view(y, x.shape)


class _SecondDerivativeRefused(torch.autograd.Function):
    """Under a ``torch.func`` transform, the node :func:`_first_order_only` puts behind a backward's gradients: the
    tensors given first, as they are, and a backward that raises ``message``. torch's ``DelayedError`` node does the
    same outside transforms, but there it cannot: the gradients it takes must be made to require grad, which a
    transform refuses (``requires_grad_()``), and it reads its inputs' data, which vmap refuses (the backward of
    grad of vmap, jacrev). As a Function, functorch records it at each gradient level, under vmap too."""

    generate_vmap_rule = True

    @staticmethod
    def forward(message: str, count: int, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # Copies, not views: a view made inside a Function may not be changed in place, and a per-sample gradient
        # is (clipped with mul_, DP-SGD's way).
        return tuple(t.clone() for t in tensors[:count])

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        ctx.message = inputs[0]

    @staticmethod
    def backward(ctx: Any, *grads: Any) -> Any:
        raise RuntimeError(ctx.message)


def _first_order_only(
    grads: tuple[Any, ...], sources: tuple[Any, ...], message: str
) -> tuple[Any, ...]:
    """``grads`` as they are, or under ``create_graph=True`` behind a node that raises ``message`` when a
    second derivative reaches it. ``sources`` (the incoming gradients and saved tensors: what ``grads``
    depend on) are linked to that node, so a gradient taken with respect to any of them reaches it; merely
    detached, the second derivative would silently be ``None``."""
    given = [g.detach() for g in grads if isinstance(g, torch.Tensor)]
    if _functorch_level() is None:
        linked = [t for t in sources if isinstance(t, torch.Tensor) and t.requires_grad]
        error = torch._C._functions.DelayedError(message.encode(), len(given) + len(linked))  # once_differentiable's
        guarded = iter(error(*(g.requires_grad_() for g in given), *linked))
    else:
        # A transform's backward runs with a graph (create_graph=True) whatever comes next: the node is there for
        # a gradient penalty (torch.autograd.grad(create_graph=True) inside torch.func.grad) or a vjp_fn
        # differentiated with respect to its cotangent; first-order transforms never reach it. Every source is
        # linked: a BatchedTensor says requires_grad=False for a tensor that requires it at the level below.
        linked = [t for t in sources if isinstance(t, torch.Tensor)]
        guarded = iter(_SecondDerivativeRefused.apply(message, len(given), *given, *linked))
    return tuple(next(guarded) if isinstance(g, torch.Tensor) else g for g in grads)


def _first_order(backward: Callable[..., Any], public: str, reference: str) -> Callable[..., Any]:
    """``backward`` run without a graph; under ``create_graph=True`` its gradients refuse a second derivative."""
    message = (f"hetrain.ops.{public}: double backward (a gradient of its gradient, create_graph=True) is not "
               f"supported: its backward kernels have no derivative. Use {reference} where second derivatives "
               "are needed")

    def guarded(ctx: Any, *grads: Any) -> Any:
        if not torch.is_grad_enabled() or torch.compiler.is_compiling():
            return backward(ctx, *grads)
        # Read before backward runs: a backward may scale its saved tensors in place (linear_cross_entropy's,
        # where the graph is not kept, as under a torch.func transform), which makes them unreadable after.
        sources = (*grads, *ctx.saved_tensors)
        with torch.no_grad():
            out = backward(ctx, *grads)
        single = not isinstance(out, tuple)
        out = _first_order_only((out,) if single else out, sources, message)
        return out[0] if single else out

    return guarded


def _functorch_level() -> int | None:
    """How many ``torch.func`` transforms wrap this call (None outside any)."""
    return torch._C._functorch.maybe_current_level()


_GRAD, _VMAP = torch._C._functorch.TransformType.Grad, torch._C._functorch.TransformType.Vmap
_DERIVATIVE_TRANSFORMS = (_GRAD, torch._C._functorch.TransformType.Jvp)


def _open_transforms() -> list[torch._C._functorch.TransformType]:
    """The kinds of the ``torch.func`` transforms open, outermost first."""
    return [level.key() for level in torch._C._functorch.get_interpreter_stack() or ()]


def _stacks_derivatives() -> bool:
    """Whether two or more of the ``torch.func`` transforms open take a derivative (grad, vjp, jacrev: Grad; jvp,
    jacfwd: Jvp), as hessian, grad of grad or jvp of grad do: the op's backward would itself be differentiated,
    which its kernels cannot be. vmap and functionalize levels take none: grad of vmap and vmap of grad are first
    order."""
    return sum(kind in _DERIVATIVE_TRANSFORMS for kind in _open_transforms()) > 1


def _vmaps_a_gradient() -> bool:
    """Whether a ``torch.vmap`` and a ``torch.func`` gradient (grad, vjp, jacrev) are both open, in either order
    (per-sample gradients, grad of vmap): the op's backward then runs under vmap."""
    kinds = _open_transforms()
    return _VMAP in kinds and _GRAD in kinds


_is_functorch_wrapper = torch._C._functorch.is_functorch_wrapped_tensor
# torch.autograd.grad(is_grads_batched=True) and torch.autograd.functional's vectorize=True batch with the legacy
# vmap (torch._vmap_internals), whose BatchedTensor neither is a functorch wrapper nor opens a functorch level.
_is_legacy_batched = torch._C._functorch.is_legacy_batchedtensor


def batched_by_vmap(t: torch.Tensor | None) -> bool:
    """Whether a ``torch.vmap`` batches ``t``: a BatchedTensor, or a ``torch.func`` wrapper around one (vmap of
    grad). An op whose kernel torch's batching fallback cannot run per sample (one that writes an argument in
    place) refuses such a tensor by this, naming itself, before the fallback fails. False while a graph is traced:
    torch.compile cannot trace functorch's wrappers."""
    if t is None or torch.compiler.is_compiling():
        return False
    while _is_functorch_wrapper(t):
        if torch._C._functorch.is_batchedtensor(t):
            return True
        t = torch._C._functorch.get_unwrapped(t)
    return False


def requires_grad_beneath(t: torch.Tensor | None) -> bool:
    """Whether ``t``, or a tensor a ``torch.func`` wrapper of it wraps, requires grad: a BatchedTensor says False for
    one that requires it beneath the vmap."""
    while t is not None:
        if t.requires_grad:
            return True
        t = torch._C._functorch.get_unwrapped(t) if _is_functorch_wrapper(t) else None
    return False


def _has_tangent(args: Sequence[Any]) -> bool:
    """Whether forward-mode AD carries a tangent on an argument (asked only where a dual level is open)."""
    return any(isinstance(a, torch.Tensor) and forward_ad.unpack_dual(a).tangent is not None for a in args)


def _tangent_error(name: str, reference: str) -> RuntimeError:
    return RuntimeError(f"{name}: forward-mode AD (torch.autograd.forward_ad, torch.func.jvp, jacfwd) is not "
                        "supported: its kernels have no forward derivative, so the tangent would be lost. "
                        f"Use {reference} where tangents are needed")


def _route(args: Sequence[Any]) -> str:
    """"custom" while a graph is traced, for a tensor subclass or a meta tensor (it takes the custom op, whose fake
    implementation gives its shapes) or a ``torch.func`` wrapper or legacy BatchedTensor (see below),
    "tangent" where forward-mode AD carries a tangent on an argument, "functorch" under a ``torch.func`` transform,
    "body" when no argument needs a gradient (or grad mode is off), "function" otherwise.

    A ``torch.func`` wrapper (BatchedTensor, TensorWrapper) is also met outside any transform: a ``vjp_fn`` called
    after ``torch.func.vjp`` returned runs backward on the tensors saved inside it. Only the dispatcher unwraps one:
    the Triton kernels read an argument's storage, which a wrapper has not. Nor has the legacy vmap's BatchedTensor
    (``is_grads_batched=True``, ``jacobian(vectorize=True)``), met with no transform open: it takes the custom op too.

    ``torch.jit.trace`` records the custom op too: the body's kernels have no autograd of their own, so a
    trace of them would train nothing, and one taken with gradients would differ from its no-grad check run.
    """
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return "custom"
    # The kernels have no forward derivative: the body would drop a tangent silently. The level is a plain int.
    if forward_ad._current_level >= 0 and _has_tangent(args):
        return "tangent"
    if _functorch_level() is not None:
        return "functorch"
    grad = False
    for a in args:
        if isinstance(a, torch.Tensor):
            if type(a) not in _PLAIN or a.is_meta or _is_functorch_wrapper(a) or _is_legacy_batched(a):
                return "custom"
            grad = grad or a.requires_grad
    return "function" if grad and torch.is_grad_enabled() else "body"


def _warn_autograd_entry_failed(exc: Exception, family: str, backend: str, device_type: str) -> None:
    """Says once per op and backend (plugins' once-only warnings) that the backend's C++ autograd entry failed: every
    call then pays the exception and runs the slower Python autograd, which should not go unnoticed."""
    key = (family, f"{backend}.forward_with_grad")
    if key in plugins._warned:
        return
    plugins._warned.add(key)
    warnings.warn(
        f"hetrain: the C++ autograd entry forward_with_grad of backend {backend!r} of op {family!r} failed on "
        f"{device_type} ({type(exc).__name__}: {exc}); each call runs the op's Python autograd instead. This warning "
        f"comes once per op and backend in a process; set {plugins.ENV_STRICT}=1 to raise instead.",
        stacklevel=plugins._caller_stacklevel(),
    )


class Op:
    """``fn`` as the custom op ``name``, called like it; see the module docstring. ``mutates_args`` as for
    ``torch.library.custom_op``: graphs see the mutation declared, eager calls run the body. ``graph_guard``, called
    with the arguments, runs before the body where the custom op is called (compiled graphs, tensor subclasses):
    there the checks the op's face made were traced once, not made per call; eager calls do not pay for it."""

    def __init__(self, name: str, fn: Callable[..., Any], mutates_args: tuple[str, ...] = (),
                 tags: tuple[torch.Tag, ...] = (), graph_guard: Callable[..., None] | None = None) -> None:
        self.name, self.body = name, fn
        self.custom = torch.library.custom_op(name, fn if graph_guard is None else _guarded(fn, graph_guard),
                                              mutates_args=mutates_args, tags=tags)
        self._function: type[torch.autograd.Function] | None = None
        self._functorch: type[torch.autograd.Function] | None = None
        self._public, self._reference = name, None
        self._family: str | None = None
        self._batched_backward = True

    def register_fake(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        return self.custom.register_fake(fn)

    def register_autograd(self, backward: Callable[..., Any], *, setup_context: Callable[..., Any],
                          public: str, reference: str | None, family: str | None = None,
                          batched_backward: bool = True) -> None:
        """``public``: the op's name in ``hetrain.ops``; ``reference``: what to use for second derivatives, named
        when double backward is refused, or None where ``backward`` is itself differentiable (dropout's);
        ``family``: the op's name in :mod:`hetrain.plugins`, whose first-choice backend for the first argument's
        device may offer ``forward_with_grad`` (the same body with its autograd done by the backend);
        ``batched_backward``: False where ``backward`` cannot run under ``torch.vmap`` (it reads a value of its
        upstream gradient): calls with a vmap and a ``torch.func`` gradient both open are then refused naming
        ``reference``, rather than failing inside backward with vmap's error."""
        self._public, self._reference, self._family = public, reference, family
        self._batched_backward = batched_backward
        if reference is not None:
            backward = _first_order(backward, public, reference)
        body = self.body

        # A CUDA tensor's backward runs on autograd's device thread: the backend blocks (use_backend, preferring)
        # open where forward ran are reopened there, so a pinned forward gets its backward pinned too. Not in a
        # compiled backward, which calls the backward op where backward runs, nor in activation checkpointing's
        # recompute (a forward run again in backward), unless the checkpoint has plugins.checkpoint_context.
        def scoped_setup_context(ctx: Any, inputs: Any, output: Any) -> None:
            setup_context(ctx, inputs, output)
            ctx.backend_scopes = plugins.open_scopes()

        def scoped_backward(ctx: Any, *grads: Any) -> Any:
            # Forward over reverse: a tangent on the upstream gradient, which the backward kernels would drop.
            # Refused here, naming this op, rather than by a backward op that knows no public name.
            if forward_ad._current_level >= 0 and _has_tangent(grads):
                raise _tangent_error(f"hetrain.ops.{public}", reference or f"hetrain.ops.{public}_ref")
            if ctx.backend_scopes is None:  # none open: no context manager to pay for
                return backward(ctx, *grads)
            with plugins.reopened(ctx.backend_scopes):
                return backward(ctx, *grads)

        self.custom.register_autograd(scoped_backward, setup_context=scoped_setup_context)

        # forward(ctx, *args) rather than a setup_context staticmethod: Function.apply binds the arguments
        # of the latter through inspect.signature on every call, which costs more than a small kernel.
        def forward(ctx: Any, *args: Any) -> Any:
            output = body(*args)
            setup_context(ctx, args, output)
            ctx.backend_scopes = plugins.open_scopes()
            return output

        name = self.name.replace("::", "_")
        self._function = type(name, (torch.autograd.Function,), {
            "forward": staticmethod(forward), "backward": staticmethod(scoped_backward)})
        # torch.func's transforms take only the setup_context form: the slower binding is paid there alone.
        # generate_vmap_rule: under vmap the forward and backward run per sample. The forward is the custom op,
        # not the body: its arguments may be functorch wrappers, which the dispatcher unwraps (and loops over
        # per sample, torch's batching fallback) before the body runs; the body would hand them to a Triton
        # kernel, which cannot read them.
        self._functorch = type(name, (torch.autograd.Function,), {
            "forward": staticmethod(self.custom), "setup_context": staticmethod(scoped_setup_context),
            "backward": staticmethod(scoped_backward), "generate_vmap_rule": True})

    def __call__(self, *args: Any) -> Any:
        route = _route(args)
        if route == "tangent":
            if self._function is None:  # an op without autograd, called directly: its public op is not known here
                raise _tangent_error(self.name, "the torch reference (hetrain.ops.*_ref) of the op it computes")
            raise _tangent_error(f"hetrain.ops.{self._public}",
                                 self._reference or f"hetrain.ops.{self._public}_ref")
        if route == "body":
            return self.body(*args)
        if route == "function" and self._function is not None:
            # With a dual level open, the Function's backward refuses a tangent on the upstream gradient; the C++
            # autograd's would drop it.
            if self._family is not None and forward_ad._current_level < 0:
                with_grad = plugins.first_choice_entry(self._family, args[0].device.type, "forward_with_grad")
                if with_grad is not None:
                    try:
                        return with_grad(*args)
                    except plugins.PASS_THROUGH:
                        raise
                    except Exception as exc:
                        device = args[0].device.type
                        backend = plugins.select(self._family, device).name
                        if plugins.raises_without_fallback(self._family):
                            plugins.note_failure(exc, self._family, backend, device)
                            raise
                        return self._python_autograd_after(exc, backend, device, args)
            return self._function.apply(*args)
        if route == "functorch" and self._functorch is not None and torch.is_grad_enabled():
            self._refuse_unsupported_transforms()
            return self._functorch.apply(*args)
        # A graph, a tensor subclass, a functorch wrapper (under a transform without a gradient to record: every
        # backward op, which runs under no_grad), or a gradient the op has no formula for (the custom op names it).
        return self.custom(*args)

    def _refuse_unsupported_transforms(self) -> None:
        """Raises, naming the op and its reference, where the open ``torch.func`` transforms would differentiate its
        backward (stacked derivatives) or batch a backward that cannot be batched."""
        reference = self._reference or f"hetrain.ops.{self._public}_ref"
        if self._reference is not None and _stacks_derivatives():
            raise RuntimeError(f"hetrain.ops.{self._public}: stacked derivative transforms (hessian, grad of "
                               "grad, jvp or jacfwd over grad) are not supported: its backward kernels have no "
                               f"derivative. Use {reference} inside them; grad of vmap and vmap of grad "
                               "are supported")
        if not self._batched_backward and _vmaps_a_gradient():
            raise RuntimeError(f"hetrain.ops.{self._public}: torch.vmap together with torch.func.grad, vjp or jacrev "
                               "(per-sample gradients as vmap of grad, grad of vmap) is not supported: its backward "
                               f"cannot run under vmap. Use {reference} inside them; jacrev alone is supported")

    def _python_autograd_after(self, exc: Exception, backend: str, device: str, args: tuple[Any, ...]) -> Any:
        """The call through the Python autograd after ``backend``'s C++ autograd entry raised ``exc``, which is
        reported once as the backend's failure unless the Python autograd raises the same error: then it is the
        caller's (e.g. an inference-mode tensor saved for backward), raised as torch's own ops raise it."""
        try:
            output = self._function.apply(*args)  # the same backend again: it warns and falls back, as any call does
        except Exception as again:
            if type(again) is type(exc) and str(again) == str(exc):
                raise again from None
            _warn_autograd_entry_failed(exc, self._family, backend, device)
            raise
        _warn_autograd_entry_failed(exc, self._family, backend, device)
        return output


def _guarded(fn: Callable[..., Any], guard: Callable[..., None]) -> Callable[..., Any]:
    """``fn`` after ``guard``, with ``fn``'s signature (the custom op's schema is read from it)."""
    @functools.wraps(fn)
    def guarded(*args: Any) -> Any:
        guard(*args)
        return fn(*args)

    return guarded


def op(name: str, mutates_args: tuple[str, ...] = (), tags: tuple[torch.Tag, ...] = (),
       graph_guard: Callable[..., None] | None = None) -> Callable[[Callable[..., Any]], Op]:
    """Decorator: ``@op("hetrain::layer_norm_fwd")`` in place of ``@torch.library.custom_op(..., mutates_args=())``."""
    return lambda fn: Op(name, fn, mutates_args, tags, graph_guard)
