"""Mixed precision chosen per device, and a guard against training on non-finite numbers.

``choose_precision(device)`` names the Lightning precision a device runs fastest without losing
range: ``bf16-mixed`` where bf16 matmuls are native, ``16-mixed`` (with a loss scaler) where only
fp16 is, ``32-true`` elsewhere. ``trainer_precision("auto", devices)`` turns that into the Trainer's
arguments; when a model's stages sit on several device types (CPU embeddings, GPU encoder) it gives
:class:`DeviceMixedPrecision`, Lightning's ``MixedPrecision`` with one autocast per device type, so
every stage runs under its own device's autocast. :class:`NonFiniteGuard` watches the result.
"""

from __future__ import annotations

import copy
import inspect
import logging
import math
import random
from collections.abc import Generator, Iterable, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.plugins.precision import MixedPrecision
from pytorch_lightning.utilities.rank_zero import rank_zero_warn
from pytorch_lightning.utilities.signature_utils import is_param_in_hook_signature
from torch import nn
from torch.amp.grad_scaler import OptState
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils._pytree import tree_leaves
from typing_extensions import override

from hetrain import cpu_features
from hetrain.callbacks.ranks import reduce_flags
from hetrain.placement.plan import device_present

log = logging.getLogger(__name__)

PrecisionName = Literal["bf16-mixed", "16-mixed", "32-true"]
_DTYPES = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}
# When one device type holds devices of different speeds (two GPU generations), autocast can only
# take one dtype per type: the most widely supported choice wins.
_RANK = {"32-true": 0, "16-mixed": 1, "bf16-mixed": 2}


def choose_precision(device: str | torch.device) -> PrecisionName:
    """The Lightning precision that is fast on ``device`` and keeps fp32's range where it can.

    CUDA: ``bf16-mixed`` from compute capability 8.0 (Ampere) on, ``16-mixed`` on 7.x (Volta and Turing
    have fp16 tensor cores only), else ``32-true``. CPU: ``bf16-mixed`` with AVX512-BF16 or AMX, else
    ``32-true``. Any other device type: ``32-true``.
    """
    device = torch.device(device)
    if device.type == "cuda":
        major, _ = torch.cuda.get_device_capability(device)
        return "bf16-mixed" if major >= 8 else "16-mixed" if major >= 7 else "32-true"
    if device.type == "cpu":
        return "bf16-mixed" if cpu_features.has_fast_bf16() else "32-true"
    return "32-true"


def choices_by_type(devices: Iterable[str | torch.device]) -> dict[str, PrecisionName]:
    """``choose_precision`` for each device type among the present ``devices``, weakest device first."""
    choices: dict[str, PrecisionName] = {}
    for device in map(torch.device, devices):
        if not device_present(device):
            continue
        choice = choose_precision(device)
        if device.type not in choices or _RANK[choice] < _RANK[choices[device.type]]:
            choices[device.type] = choice
    return choices


class HostSafeGradScaler(torch.amp.GradScaler):
    """torch's ``GradScaler``, safe for gradients on the CPU beside a loss scaled on a GPU (a CPU stage).

    torch hands each device its copy of the inverse scale and of the inf flag with a non-blocking copy from the
    scale's device. From a GPU to the host such a copy returns before the bytes land, and the CPU's unscale
    kernel reads them at once: it may unscale by garbage, and the flag's late arrival may overwrite the inf the
    kernel found, so an overflowing step is applied (pytorch/pytorch#176429 fixed this for FSDP's CPU offload
    only). Where a gradient lives on the CPU both start on the host here: a copy from pageable host memory to a
    GPU has read its source when it returns. One small device read per step, and only with loss scaling.
    """

    def _unscale_grads_(self, optimizer: torch.optim.Optimizer, inv_scale: torch.Tensor, found_inf: torch.Tensor,
                        allow_fp16: bool) -> dict[torch.device, torch.Tensor]:
        on_host = any(p.grad is not None and p.grad.device.type == "cpu"
                      for group in optimizer.param_groups for p in group["params"])
        if on_host:
            inv_scale, found_inf = inv_scale.cpu(), found_inf.cpu()
        return super()._unscale_grads_(optimizer, inv_scale, found_inf, allow_fp16)

    @override
    def step(self, optimizer: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> float | None:
        """torch's step, but an optimizer that unscales in its own step (fused AdamW) with gradients off the scale's
        device is handed no scale or inf flag: it would copy them to each gradient's device without waiting."""
        # Cheapest first: this runs every step; the signature (torch's older protocol) is read last.
        if (self._enabled and self._scale is not None and getattr(optimizer, "_step_supports_amp_scaling", False)
                and any(p.grad is not None and p.grad.device != self._scale.device
                        for group in optimizer.param_groups for p in group["params"])
                and "grad_scaler" not in inspect.signature(optimizer.step).parameters):
            return step_found_inf_on_host(self, optimizer, *args, **kwargs)
        return super().step(optimizer, *args, **kwargs)


def step_found_inf_on_host(scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer, *args: Any,
                           **kwargs: Any) -> float | None:
    """``scaler.step(optimizer)`` for an optimizer that unscales in its own step, with the scaler unscaling instead.

    torch hands such an optimizer the scale and the summed inf flag, which fused AdamW copies to each parameter's
    device with a non-blocking copy: from a GPU to the host that copy may be read before it lands (see
    :class:`HostSafeGradScaler`). Here ``unscale_`` unscales (host-safely under a ``HostSafeGradScaler``), the inf
    flags are read on the host, and the optimizer steps on unscaled gradients, or not at all after an overflow, as
    torch's step does for other optimizers; ``update()`` then reads the same flags.
    """
    if not scaler.is_enabled():
        return optimizer.step(*args, **kwargs)
    if "closure" in kwargs:  # its backward would leave scaled gradients after the unscale
        raise RuntimeError("Closure use is not currently supported if GradScaler is enabled.")
    state = scaler._per_optimizer_states[id(optimizer)]  # GradScaler's record of unscale_ and step
    if state["stage"] is OptState.STEPPED:
        raise RuntimeError("step() has already been called since the last update().")
    if state["stage"] is OptState.READY:
        scaler.unscale_(optimizer)
    retval = None
    if not any(flag.item() for flag in state["found_inf_per_device"].values()):
        # The gradients are unscaled already; the optimizer reads these attributes in its step.
        optimizer.grad_scale = optimizer.found_inf = None
        try:
            retval = optimizer.step(*args, **kwargs)
        finally:
            del optimizer.grad_scale, optimizer.found_inf  # torch's next step would multiply its scale by one kept
    state["stage"] = OptState.STEPPED
    return retval


class DeviceMixedPrecision(MixedPrecision):
    """Lightning's ``MixedPrecision`` with one autocast per device type, for models spread over devices.

    Example::

        plugin = DeviceMixedPrecision({"cpu": "bf16-mixed", "cuda": "16-mixed"}, root="cuda")
        Trainer(plugins=[plugin])

    Notes:
        ``MixedPrecision`` enters the autocast of the root device only, so a CPU stage of a model
        trained on a GPU runs in fp32 whatever the CPU can do. Autocast state is kept per device
        type, so entering one context per type makes each op follow the autocast of the device it runs
        on. Loss scaling, unscaling before clipping and skipped steps are Lightning's: the plugin's
        ``GradScaler`` (there when any type runs ``16-mixed``) unscales gradients on every device.

    Args:
        choices: device type -> ``bf16-mixed`` | ``16-mixed`` | ``32-true``. A device (``cuda:1``) counts as its type;
            two keys of one type must make the same choice.
        root: the Trainer's root device type (a device counts as its type). The plugin's ``precision``, which
            Lightning's own utilities read (FLOPs tables, checkpoints), is ``16-mixed`` where any type runs it
            (Lightning's loss scaler follows it), else the root's choice where that is mixed, else ``bf16-mixed``:
            ``MixedPrecision`` cannot hold ``32-true``. A root choosing ``32-true`` still runs in fp32 (its autocast is
            entered disabled); read ``choices`` (or :func:`run_precision`) for what each type runs.
    """

    def __init__(self, choices: Mapping[str, str], root: str) -> None:
        unknown = set(choices.values()) - set(_RANK)
        if unknown:
            raise ValueError(f"hetrain: unknown precision {sorted(unknown)}; expected one of {sorted(_RANK)}")
        # Keyed by device type ("cuda:1" is "cuda"): autocast and GradScaler take types, and one type has one autocast.
        by_type: dict[str, tuple[str, str]] = {}  # device type -> (the key as written, its choice)
        for key, choice in choices.items():
            device_type = _device_type(key)
            first_key, first_choice = by_type.setdefault(device_type, (key, choice))
            if first_choice != choice:
                raise ValueError(f"hetrain: {first_key!r} ({first_choice}) and {key!r} ({choice}) are both device type "
                                 f"{device_type!r}, which autocasts in one precision; give {device_type!r} one choice")
        choices = {device_type: choice for device_type, (_, choice) in by_type.items()}
        root = _device_type(root)
        mixed = {t: c for t, c in choices.items() if c in _DTYPES}
        if not mixed:
            raise ValueError(f"hetrain: no device type runs mixed precision in {dict(choices)}; use '32-true'")
        scaled = [t for t, c in mixed.items() if c == "16-mixed"]
        scaler = HostSafeGradScaler(device=scaled[0]) if scaled else None
        # Lightning pairs a scaler with 16-mixed only: with one device type in float16 the plugin is 16-mixed,
        # whatever the root runs (the root's own autocast is entered by forward_context below either way).
        precision = "16-mixed" if scaled else mixed.get(root, "bf16-mixed")
        super().__init__(precision=precision, device=root, scaler=scaler)
        self.choices = choices

    def __repr__(self) -> str:
        """Each device type's choice: the plugin's ``precision`` alone names one of them (the log showed an address)."""
        return f"DeviceMixedPrecision({', '.join(f'{t}={c}' for t, c in self.choices.items())})"

    @override
    @contextmanager
    def forward_context(self) -> Generator[None, None, None]:
        with ExitStack() as stack:
            for device_type, choice in self.choices.items():
                # cache_enabled=False as in MixedPrecision: cached casts would outlive a weight update.
                stack.enter_context(torch.autocast(device_type, dtype=_DTYPES.get(choice), enabled=choice in _DTYPES,
                                                   cache_enabled=False))
            yield


def _device_type(device: str) -> str:
    """``device``'s type (``"cuda"`` for ``"cuda:1"``), or a ValueError naming it where it is none."""
    try:
        return torch.device(device).type
    except RuntimeError:
        raise ValueError(f"hetrain: {device!r} is not a device type; use cpu, cuda, mps, ...") from None


def run_precision(trainer: pl.Trainer) -> str | dict[str, str]:
    """The precision a run's summary records: each device type's choice under :class:`DeviceMixedPrecision`, whose
    ``precision`` names only the one its loss scaler follows; else the Trainer's one precision."""
    plugin = trainer.precision_plugin
    return dict(plugin.choices) if isinstance(plugin, DeviceMixedPrecision) else str(trainer.precision)


def trainer_precision(precision: str | int, devices: Iterable[str | torch.device]) -> dict[str, Any]:
    """Trainer keyword arguments for ``precision``; ``"auto"`` decides from the devices the stages use.

    ``devices`` lists the Trainer's root device and every stage's device. One device type: that type's
    choice as a plain Lightning precision string. Several types with any mixed choice:
    :class:`DeviceMixedPrecision` as a plugin (with ``precision=None``, as Lightning requires).
    Anything but ``"auto"`` passes through.
    """
    if precision != "auto":
        return {"precision": precision}
    devices = [torch.device(d) for d in devices]
    choices = choices_by_type(devices)
    if not choices:
        raise ValueError(f"hetrain: precision 'auto' found none of {[str(d) for d in devices]} present on this "
                         "machine; train on a device it has (the Trainer's accelerator, the placement plan)")
    root = devices[0].type if devices[0].type in choices else next(iter(choices))
    if len(choices) == 1 or all(c == "32-true" for c in choices.values()):
        return {"precision": choices[root]}
    return {"precision": None, "plugins": [DeviceMixedPrecision(choices, root=root)]}


class NonFiniteError(RuntimeError):
    """Training produced non-finite losses or gradients for too many steps in a row."""


def _floating_leaves(obj: Any) -> list[torch.Tensor]:
    return [t for t in tree_leaves(obj) if isinstance(t, torch.Tensor) and t.is_floating_point()]


def _stored_values(t: torch.Tensor) -> torch.Tensor:
    """A sparse gradient's stored values (an embedding table's, one row per looked-up token), else ``t``:
    norms and finiteness checks run on dense tensors."""
    return t._values() if t.is_sparse else t


def _all_finite(tensors: list[torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(_stored_values(t)).all()) for t in tensors)


class NonFiniteDiagnosis:
    """Trainer-free search for where a non-finite value came from: inputs, a module's forward, or backward.

    ``first_nonfinite_output`` reruns a forward with a hook on every module; the hooks fire as each
    module finishes, innermost first, so the first hook to see a non-finite output names the module
    that made it from finite inputs. Where that module's inputs were already non-finite, code between
    modules made the value: the innermost running module given finite inputs (or the caller of the
    forward) is named instead. ``nearest_nonfinite_grad`` reads the gradients of a finished backward:
    non-finite gradients flow towards the inputs, so the module closest to the loss whose parameters
    have them is where backward produced them.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def first_nonfinite_output(self, forward: Any) -> tuple[str, str, bool] | None:
        """Calls ``forward()`` with hooks; returns (module path, module type, own) for the first non-finite output.

        ``own`` is False where the module made it from finite inputs; True where its inputs were already non-finite,
        and the path and type are then those of the innermost running module whose own inputs were finite: its own
        forward code (outside its children) made the value. The path is ``""`` where no running module had finite
        inputs (the code calling ``forward`` made it)."""
        found: list[tuple[str, str, bool]] = []
        # Modules whose forward is running, outermost first, with whether their inputs were finite: a non-finite
        # value made between two children is made by the innermost of them that was given finite inputs.
        running: list[tuple[str, str, bool]] = [("", type(self.model).__name__, True)]

        def enter(name: str):
            def push(module: nn.Module, args: Any, kwargs: Any) -> None:
                finite = not found and _all_finite(_floating_leaves((args, kwargs)))
                running.append((name, type(module).__name__, finite))
            return push

        def leave(name: str):
            def check(module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
                _, kind, inputs_finite = running.pop()
                if found or _all_finite(_floating_leaves(output)):
                    return
                if inputs_finite:
                    found.append((name, kind, False))
                else:
                    maker = next(entry for entry in reversed(running) if entry[2])
                    found.append((maker[0], maker[1], True))
            return check

        modules = [(n, m) for n, m in self.model.named_modules() if n]
        handles = [m.register_forward_pre_hook(enter(n), with_kwargs=True) for n, m in modules]
        handles += [m.register_forward_hook(leave(n), with_kwargs=True) for n, m in modules]
        try:
            forward()
        finally:
            for handle in handles:
                handle.remove()
        return found[0] if found else None

    def nearest_nonfinite_grad(self) -> str | None:
        """Path of the module nearest the loss whose own parameters have non-finite gradients."""
        bad = [name for name, module in self.model.named_modules()
               if not _all_finite([p.grad for p in module.parameters(recurse=False) if p.grad is not None])]
        # named_modules() follows registration order, which for most models is forward order.
        return bad[-1] if bad else None


@dataclass
class _GeneratorStates:
    """The generators as a batch's step began, so a rerun draws what the step drew: torch's (dropout masks) and
    numpy's and Python's (an augmentation in training_step). Reading numpy's and Python's costs ~0.1 ms a batch,
    torch's a few microseconds: they are read only for a batch a rerun can follow (see :func:`_can_rerun`)."""

    cpu: torch.Tensor
    # Each CUDA device's, where CUDA was initialised as the step began; a device initialised later is not replayed.
    cuda: list[torch.Tensor]
    host: tuple[Any, Any] | None  # numpy's and Python's, for a batch a rerun can follow


def _generator_states(host: bool) -> _GeneratorStates:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else []
    return _GeneratorStates(torch.get_rng_state(), cuda, (np.random.get_state(), random.getstate()) if host else None)


@contextmanager
def _replaying(states: _GeneratorStates) -> Generator[None, None, None]:
    """Runs the block with the generators set to ``states``, and puts each back as it was after it: the run's later
    draws (an augmentation's, a shuffle's) are those it would have drawn without the block."""
    numpy_state, python_state = np.random.get_state(), random.getstate()
    try:
        # Every device CUDA has now, not only those saved: where CUDA was initialised during the step, the rerun's
        # draws there are put back too, and the run's later ones are not shifted.
        with torch.random.fork_rng(devices=_cuda_devices()):
            torch.set_rng_state(states.cpu)
            if states.cuda:
                torch.cuda.set_rng_state_all(states.cuda)
            if states.host is not None:
                np.random.set_state(states.host[0])
                random.setstate(states.host[1])
            yield
    finally:
        np.random.set_state(numpy_state)
        random.setstate(python_state)


def _cuda_devices() -> list[int]:
    """The CUDA devices whose generators exist: every device once CUDA is initialised, none before (nothing drew)."""
    return list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []


@dataclass
class _WindowBatch:
    """A batch of the optimizer window in flight, so a non-finite step is diagnosed on the batch that made it: under
    gradient accumulation that may be any batch of the window, not the last.

    Only the newest batch is held (``batch``): a ring loader's batch views a slot that is refilled once its tensors
    are freed, so holding a whole window would hold as many slots and stall the loader. An earlier batch keeps what a
    diagnosis needs without it: whether its inputs were finite, checked on the device when it is let go
    (:meth:`let_go`). Until then the guard's reference keeps a ring slot from being refilled, so the check reads the
    batch's own values; a loop that steps on every batch lets none go and pays nothing for it.
    """

    index: int | None  # None where training_step fetches its own batches (see NonFiniteGuard's notes)
    batch: Any | None
    generators: _GeneratorStates  # before its forward, so a rerun draws the same dropout masks and augmentations
    inputs_finite: torch.Tensor | None = None  # on the device; taken when the batch is let go
    loss_finite: torch.Tensor | None = None  # stays on the device: read only when the step is skipped

    def let_go(self) -> None:
        """Drops the batch, keeping whether its inputs were finite. A batch without floating tensors (token ids
        only) holds nothing that can be non-finite."""
        if self.batch is None:  # none is held (a training_step taking the dataloader_iter): nothing to check
            return
        leaves = [_stored_values(t) for t in _floating_leaves(self.batch)]
        self.inputs_finite = (torch.stack([torch.isfinite(t).all().to(leaves[0].device) for t in leaves]).all()
                              if leaves else torch.ones((), dtype=torch.bool))
        self.batch = None

    def inputs_nonfinite(self) -> bool:
        """Whether the batch held NaN or inf (a device read: on a skipped step only); False where unknown."""
        if self.batch is not None:
            return not _all_finite(_floating_leaves(self.batch))
        return self.inputs_finite is not None and not bool(self.inputs_finite)

    @property
    def inputs_checked(self) -> bool:
        """Whether :meth:`inputs_nonfinite` knows: the batch is held, or its flag was taken when it was let go."""
        return self.batch is not None or self.inputs_finite is not None


class _RunningStats:
    """A copy of the running statistics of a model's BatchNorms, so that a skipped step leaves them as they were.

    A step's forward updates them before its loss and gradients can be checked: without the copy one non-finite batch
    leaves them NaN for good, and validation and checkpoints with them. The copy is allocated once and refilled by
    device copies, which add no sync.
    """

    def __init__(self, norms: list[_BatchNorm]) -> None:
        self.norms = norms
        self._buffers: list[torch.Tensor] = []
        self._saved: list[torch.Tensor] = []

    def save(self) -> None:
        """Copies the statistics as they are now."""
        buffers = [b for m in self.norms for b in m.buffers(recurse=False)]
        if len(buffers) == len(self._buffers) and all(a is b for a, b in zip(buffers, self._buffers, strict=True)):
            torch._foreach_copy_(self._saved, buffers)
        else:  # the first save, or the model moved since (moving replaces its buffers)
            self._buffers, self._saved = buffers, [b.clone() for b in buffers]

    def restore(self) -> None:
        """Puts back the statistics of the last ``save``."""
        if self._buffers:
            torch._foreach_copy_(self._buffers, self._saved)


def _running_stats(model: nn.Module) -> _RunningStats | None:
    """The BatchNorms' statistics to keep, or None for a model without BatchNorm (it then pays nothing)."""
    norms = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    return _RunningStats(norms) if norms else None


_CLIP = "configure_gradient_clipping"  # the LightningModule hook NonFiniteGuard patches to drop a step's gradients


class NonFiniteGuard(Callback):
    """Counts and logs non-finite steps and loss-scale skips, names where NaN/inf began, and stops.

    Example::

        Trainer(precision="16-mixed", callbacks=[NonFiniteGuard(max_consecutive=3)])

    Notes:
        - Each step checks the loss (before backward) and the total gradient norm (after unscaling,
          before the optimizer step): one device sync per step, no hooks.
        - A step with a non-finite loss or gradients is skipped: under a ``GradScaler`` the scaler skips
          it (told to where only the loss is non-finite, and it lowers its scale as for an overflow);
          without one the gradients are dropped (after Lightning's gradient clipping, which runs on them as
          under a scaler) so the optimizer leaves the weights and its state alone. Step-interval
          LR schedulers are set back after a skipped step, with every setting of the optimizer's param
          groups (lr, momentum, betas), so the schedule does not advance on it, and BatchNorm running
          statistics too (copied at each window's first batch, only where a model has a BatchNorm): the
          step's forward had updated them, NaN where its batch was.
        - Under a scaler, non-finite gradients with a finite loss are the scaler's overflow probe: they
          are counted as ``skipped_steps`` but stop nothing while the scale is above ``min_loss_scale``.
        - On the first step of a non-finite streak the guard reruns a batch's ``training_step`` (with
          autograd on, as the step ran; a rerun that raises is reported in the diagnosis, not raised),
          with that batch's random state (torch's, numpy's and Python's generators, each put back after the
          rerun, so the run draws on as without it) and global step and a forward hook on every module, and names
          the first module whose output was non-finite. Under gradient accumulation the guard names the window's first
          batch with a non-finite loss and whether its inputs were (each batch's are checked on the
          device as it arrives), and reruns it if it is the window's last batch, the one still held (an
          earlier batch's memory has gone back to the loader). Hooks exist only during that rerun, so
          healthy steps pay nothing for them; the rerun may log the step's metrics a second time, and
          leaves BatchNorm running statistics as they were. Under manual optimization there is no rerun:
          training_step steps the optimizers and schedulers itself. Reading a batch's numpy and Python
          generators for a rerun costs ~0.1 ms, paid only for a batch one can follow: one process, automatic
          optimization, and the batch that steps the optimizer (once a window under gradient accumulation).
        - Under manual optimization a batch that steps several optimizers (a GAN's) counts as one step:
          non-finite if any of its optimizer steps was. Its loss is non-finite if any of its backward
          passes' was, so every optimizer step after a non-finite loss in that batch is skipped too.
        - Every rank reaches the same verdict: gradients are reduced across ranks before the check, and
          the loss's flag is reduced with them (one small collective a step under DDP), so the hooks are
          not rank-zero-only. A non-finite loss is diagnosed by the lowest rank whose own loss it was (with
          its log file), which hands the diagnosis to the others: two more small collectives, on the first
          step of a streak only.
        - A ``training_step`` taking the ``dataloader_iter`` fetches its own batches, and Lightning hands callbacks
          the batch and index the previous step fetched (none on the first): the guard holds none of them, checks
          no inputs, reruns nothing, and names the global step alone.
        - ``on_nonfinite="stop"`` raises :class:`NonFiniteError` with that diagnosis after
          ``max_consecutive`` non-finite steps in a row; ``"skip"`` keeps skipping them.

    Args:
        max_consecutive: non-finite steps in a row that stop training (with ``on_nonfinite="stop"``).
        on_nonfinite: ``"stop"`` or ``"skip"``.
        min_loss_scale: under a scaler, overflow at a scale at or below this counts as non-finite.
    """

    def __init__(self, max_consecutive: int = 3, on_nonfinite: Literal["stop", "skip"] = "stop",
                 min_loss_scale: float = 1.0) -> None:
        if max_consecutive < 1:
            raise ValueError(f"hetrain: max_consecutive must be >= 1, got {max_consecutive}")
        if on_nonfinite not in ("stop", "skip"):
            raise ValueError(f"hetrain: on_nonfinite must be 'stop' or 'skip', got {on_nonfinite!r}")
        self.max_consecutive = max_consecutive
        self.on_nonfinite = on_nonfinite
        self.min_loss_scale = min_loss_scale
        self.skipped_steps = 0  # optimizer steps that did not update the weights
        self.nonfinite_steps = 0  # skipped steps that were not a loss scaler's overflow probe
        self.consecutive = 0
        self.diagnosis: str | None = None  # where the current streak began
        self._streak_start: int | None = None  # the global step that began the current streak
        self._window: list[_WindowBatch] = []  # the batches since the last optimizer step
        self._fetches_own_batches = False  # training_step takes the dataloader_iter: callbacks are given no batch
        self._running_stats: _RunningStats | None = None
        self._step: dict[str, Any] | None = None  # what on_before_optimizer_step saw, for on_train_batch_end
        # The module whose gradient clipping drops this step's gradients, and its own instance attribute to put back.
        self._pending_drop: tuple[pl.LightningModule, dict[str, Any]] | None = None
        self._logged: dict[str, float] | None = None  # the metrics as last logged

    @override
    def state_dict(self) -> dict[str, Any]:
        """The counters and the current streak, so a resumed run goes on counting (and stopping) where it left.

        The key stays the class's name whatever the arguments: the stop message suggests resuming with others."""
        return {"skipped_steps": self.skipped_steps, "nonfinite_steps": self.nonfinite_steps,
                "consecutive": self.consecutive, "diagnosis": self.diagnosis, "streak_start": self._streak_start}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped_steps = state_dict["skipped_steps"]
        self.nonfinite_steps = state_dict["nonfinite_steps"]
        self.consecutive = state_dict["consecutive"]
        self.diagnosis = state_dict["diagnosis"]
        self._streak_start = state_dict["streak_start"]

    @staticmethod
    def _scaler(trainer: pl.Trainer) -> torch.amp.GradScaler | None:
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        return scaler if scaler is not None and scaler.is_enabled() else None

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After fit start, where placement moves the stages.
        self._end_step()
        self._running_stats = _running_stats(pl_module)
        # As Lightning chooses its data fetcher for the fit.
        self._fetches_own_batches = is_param_in_hook_signature(pl_module.training_step, "dataloader_iter",
                                                               explicit=True)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._end_step()

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # An error between this guard's on_before_optimizer_step and Lightning's clipping (the module's own hook, a
        # clip_grad_norm_(error_if_nonfinite=True)) left the step's verdict and its gradient drop behind: the next fit
        # dropped its first step's gradients and counted it as non-finite.
        self._end_step()

    def _end_step(self) -> None:
        """Forgets the step in flight: its verdict, its window's batches, and a gradient drop still on the module."""
        self._undo_drop()
        self._step = None
        self._window = []

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if not self._window and self._running_stats is not None:
            self._running_stats.save()
        # The batch before this one, of a window not stepped yet (automatic or manual accumulation), is let go.
        if self._window:
            self._window[-1].let_go()
        if self._fetches_own_batches:  # ``batch`` is the previous step's: hold and name none
            self._window.append(_WindowBatch(None, None, _generator_states(host=False)))
        else:
            self._window.append(_WindowBatch(batch_idx, batch, _generator_states(_can_rerun(trainer, pl_module))))

    @override
    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        if self._window:
            finite = torch.isfinite(loss.detach()).all()  # on the device: no sync per batch
            # Manual optimization may run several backward passes in a batch: a later finite loss hid a NaN one.
            earlier = self._window[-1].loss_finite
            self._window[-1].loss_finite = finite if earlier is None else earlier & finite.to(earlier.device)

    @override
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        grads = [_stored_values(p.grad) for group in optimizer.param_groups for p in group["params"]
                 if p.grad is not None]
        # The largest |value| (inf-norm) is finite exactly when every stored value is: a 2-norm overflows float32 past
        # ~1.8e19 though every gradient is finite. A sparse gradient's uncoalesced rows serve as they are.
        norm = torch.nn.utils.get_total_norm(grads, norm_type=math.inf) if grads else torch.zeros(())
        # Under gradient accumulation a step is non-finite if any of its batches' losses is.
        losses = [b.loss_finite for b in self._window if b.loss_finite is not None]
        loss_flag = torch.stack(losses).all() if losses else torch.ones((), dtype=torch.bool)
        # One rank's non-finite loss is every rank's: a rank whose own loss was finite read its non-finite (reduced)
        # gradients as the scaler's overflow probe and went on into the next collective alone.
        flags = reduce_flags(trainer, torch.stack([loss_flag.to(norm.device), torch.isfinite(norm)]),
                             torch.distributed.ReduceOp.MIN)
        # Both flags in one read: each bool() of a GPU tensor waits for the device.
        loss_finite, grads_finite = flags.tolist()
        scaler = self._scaler(trainer)
        scale = scaler.get_scale() if scaler is not None else None
        step = {"loss_finite": loss_finite, "grads_finite": grads_finite, "scale": scale}
        if not (loss_finite and grads_finite):
            self._restore_running_stats()
            step["grad_module"] = NonFiniteDiagnosis(pl_module).nearest_nonfinite_grad()
            # Every setting of each group, not only lr: OneCycleLR and CyclicLR (cycle_momentum) also set momentum or
            # betas. Only this optimizer's schedulers: another optimizer's step in the same batch may have been finite.
            step["schedulers"] = [
                (cfg.scheduler, copy.deepcopy(cfg.scheduler.state_dict()),
                 [copy.deepcopy({k: v for k, v in g.items() if k != "params"})
                  for g in cfg.scheduler.optimizer.param_groups])
                for cfg in trainer.lr_scheduler_configs
                if cfg.interval == "step" and cfg.scheduler.optimizer is optimizer
            ]
            if scaler is None:  # no scaler skips this step: without gradients the optimizer leaves every weight alone
                self._drop_grads_after_clipping(pl_module, optimizer)
            elif grads_finite:  # a non-finite loss with finite gradients (a NaN term off the gradient path)
                self._make_scaler_skip(scaler, optimizer)
        # Under manual optimization a batch may step several optimizers, each through this hook.
        self._step = step if self._step is None else _merged(self._step, step)

    def _drop_grads_after_clipping(self, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer) -> None:
        """Drops ``optimizer``'s gradients, once Lightning has clipped them: its step then leaves every weight and
        its state alone. Under automatic optimization Lightning clips after this hook, inside the optimizer's step, and
        clipping by value raises on a list of no gradients; ``configure_gradient_clipping`` (which Lightning calls
        there whether or not it clips) is the last code to run before the step reads them, so this step's call drops
        them. The guard keeps the patch to take it back where an error ends the step before that call. Under manual
        optimization training_step has clipped already."""
        if not pl_module.automatic_optimization:
            optimizer.zero_grad(set_to_none=True)
            return
        self._undo_drop()
        clip = getattr(pl_module, _CLIP)
        attrs = vars(pl_module)  # one set on the instance (rare) is put back
        self._pending_drop = (pl_module, {_CLIP: attrs[_CLIP]} if _CLIP in attrs else {})

        def clip_then_drop(*args: Any, **kwargs: Any) -> None:
            try:
                clip(*args, **kwargs)
            finally:
                self._undo_drop()  # this step only
                optimizer.zero_grad(set_to_none=True)

        setattr(pl_module, _CLIP, clip_then_drop)

    def _undo_drop(self) -> None:
        """Takes a pending gradient drop off its module, putting back the module's own attribute as it was."""
        if self._pending_drop is None:
            return
        module, own = self._pending_drop
        self._pending_drop = None
        vars(module).pop(_CLIP, None)
        vars(module).update(own)

    @staticmethod
    def _make_scaler_skip(scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer) -> None:
        """Has ``scaler`` skip this step as it does an overflow (and lower its scale), which it checks for in the
        gradients alone. Gradients set to None instead would leave it no check to read ("No inf checks were
        recorded"). GradScaler keeps what ``unscale_`` found per optimizer: its public API cannot set it."""
        found = scaler._per_optimizer_states[id(optimizer)].get("found_inf_per_device") or {}
        if found:  # unscale_ ran (Lightning's before this hook): mark the overflow it checked for
            for flag in found.values():
                flag.fill_(1.0)
            return
        # An optimizer that unscales in its own step (fused Adam): the scaler checks later, so give it one to find.
        for group in optimizer.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    param.grad.fill_(float("nan"))

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step, self._step = self._step, None
        if step is None:  # accumulating: no optimizer step on this batch
            return
        window, self._window = self._window, []
        metrics = {"nonfinite/skipped_steps": float(self.skipped_steps)}
        if step["scale"] is not None:
            metrics["precision/loss_scale"] = step["scale"]
        if step["loss_finite"] and step["grads_finite"]:
            self.consecutive = 0
            self.diagnosis = self._streak_start = None
        else:
            self._skipped(trainer, pl_module, step, window)
            metrics["nonfinite/skipped_steps"] = float(self.skipped_steps)
        metrics["nonfinite/nonfinite_steps"] = float(self.nonfinite_steps)  # skipped, less the scaler's overflows
        metrics["nonfinite/consecutive"] = float(self.consecutive)
        # Lightning writes step metrics every log_every_n_steps (global_step has counted this step by now), and a
        # log_dict call costs ~0.5 ms of Python: log on those steps, and whenever a value changed so that
        # callback_metrics (which a checkpoint or early stopping may monitor) are current.
        every = trainer.log_every_n_steps
        if metrics != self._logged or trainer.should_stop or (every and trainer.global_step % every == 0):
            pl_module.log_dict(metrics, on_step=True, on_epoch=False, batch_size=1)
            self._logged = metrics
        if self.on_nonfinite == "stop" and self.consecutive >= self.max_consecutive:
            raise NonFiniteError(self._stop_message(trainer.global_step - 1))

    def _stop_message(self, last: int) -> str:
        """Names the streak's steps (the Trainer has already counted the last one) and the ways to go on."""
        steps = f"global step {last}" if self._streak_start == last else f"global steps {self._streak_start}-{last}"
        return (f"hetrain: training stopped after non-finite {steps} ({self.consecutive} in a row; the limit is "
                f"max_consecutive={self.max_consecutive}). {self.diagnosis} To go on: lower the learning rate "
                "(task.lr) and resume from the last checkpoint (ckpt_path=<run dir>/checkpoints/last.ckpt), or skip "
                "such steps (callbacks.nonfinite_guard.on_nonfinite=skip, or a higher "
                "callbacks.nonfinite_guard.max_consecutive).")

    def _restore_running_stats(self) -> None:
        if self._running_stats is not None:
            self._running_stats.restore()

    def _skipped(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: dict[str, Any],
                 window: list[_WindowBatch]) -> None:
        self.skipped_steps += 1
        # Latest first: a scheduler that two skipped steps saved goes back to the earlier state.
        for scheduler, state, settings in reversed(step["schedulers"]):
            scheduler.load_state_dict(state)
            for group, saved in zip(scheduler.optimizer.param_groups, settings, strict=True):
                group.update(saved)
        overflow = step["loss_finite"] and step["scale"] is not None and step["scale"] > self.min_loss_scale
        if overflow:
            return
        self.nonfinite_steps += 1
        self.consecutive += 1
        if self.consecutive == 1:
            self._streak_start = trainer.global_step - 1
            self.diagnosis = self._diagnose(trainer, pl_module, step, window)
        rank_zero_warn(f"hetrain: non-finite step {trainer.global_step - 1} skipped ({self.consecutive} in a row). "
                       f"{self.diagnosis}")

    def _diagnose(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: dict[str, Any],
                  window: list[_WindowBatch]) -> str:
        if trainer.world_size > 1 and not step["loss_finite"]:
            return self._diagnosis_from_failing_rank(trainer, pl_module, step, window)
        return self._diagnose_here(trainer, pl_module, step, window)

    def _diagnosis_from_failing_rank(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: dict[str, Any],
                                     window: list[_WindowBatch]) -> str:
        """The diagnosis of the lowest rank whose own loss was non-finite, on every rank: the loss's flag is
        reduced across ranks, and a rerun on a rank whose own loss was finite finds nothing. Every rank takes part in
        both collectives, in the same order: this runs on the first step of a streak, which all agree on."""
        own_finite = all(bool(b.loss_finite) for b in window if b.loss_finite is not None)
        mine = torch.tensor(float(trainer.world_size if own_finite else trainer.global_rank),
                            device=trainer.strategy.root_device)
        failing = int(trainer.strategy.reduce(mine, reduce_op=torch.distributed.ReduceOp.MIN).item())
        diagnosis = None
        if trainer.global_rank == failing:  # no rerun: see _diagnose_here
            here = self._diagnose_here(trainer, pl_module, step, window, rerun=False)
            diagnosis = f"Rank {failing}{_log_file_note()}: {here}"
        return trainer.strategy.broadcast(diagnosis, src=failing)

    def _diagnose_here(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: dict[str, Any],
                       window: list[_WindowBatch], rerun: bool = True) -> str:
        """What this process's batches tell of the step: its inputs, the module nearest the loss with non-finite
        gradients, or the module a rerun of a held batch names.

        ``rerun=False`` under DDP: a rerun of training_step on one rank alone runs its collectives (a
        ``self.log(..., sync_dist=True)``, SyncBatchNorm) with no other rank to meet them, and every rank waited
        until the process group's timeout. Nor is there a rerun under manual optimization: training_step steps the
        optimizers and schedulers itself, and a rerun applied the update the guard had skipped."""
        what = "non-finite loss" if not step["loss_finite"] else "finite loss but non-finite gradients"
        suspects = _suspects(window, step["loss_finite"])
        for suspect in suspects:
            if suspect.inputs_nonfinite():
                return f"{_where(trainer, [suspect])}: {what}; produced by the inputs: the batch holds NaN or inf."
        if step["loss_finite"]:
            module = step["grad_module"]
            named = f"module '{module}'" if module else "no module's parameters (the loss scale?)"
            return (f"{_where(trainer, suspects)}: {what}; produced in backward: nearest the loss with non-finite "
                    f"gradients: {named}.")
        held = [suspect for suspect in suspects if suspect.batch is not None]
        if held and not rerun:
            return (f"{_where(trainer, suspects)}: {what}; produced in forward (the inputs were finite); under DDP no "
                    "rerun names the module (training_step's collectives would wait for the other ranks): resume "
                    "from the last checkpoint with trainer.devices=1 to have it named.")
        if held and not pl_module.automatic_optimization:
            return (f"{_where(trainer, suspects)}: {what}; produced in forward (the inputs were finite); under manual "
                    "optimization no rerun names the module (a rerun of training_step would step its optimizers and "
                    "LR schedulers again): call hetrain.callbacks.precision.NonFiniteDiagnosis(model)"
                    ".first_nonfinite_output on that batch's forward to have it named.")
        if self._fetches_own_batches:
            return (f"{_where(trainer, suspects)}: {what}; produced in forward (inputs not checked); training_step "
                    "takes the dataloader_iter and fetches its own batches, which the guard is not given to check or "
                    "rerun, so the module is not named.")
        if not held:
            inputs = "the inputs were finite" if all(s.inputs_checked for s in suspects) else "inputs not checked"
            return (f"{_where(trainer, suspects)}: {what}; produced in forward ({inputs}); that batch is no longer "
                    "held to rerun (the loader reuses its memory), so the module is not named.")
        for suspect in held:
            try:
                found, loss_finite = self._rerun(trainer, pl_module, suspect)
            except Exception as error:  # a diagnosis must not end a fit that would skip the step
                return (f"{_where(trainer, [suspect])}: {what}; produced in forward (the inputs were finite); the "
                        f"rerun failed: {type(error).__name__}: {error}")
            if found is not None and not found[2]:
                return (f"{_where(trainer, [suspect])}: {what}; produced in forward: first non-finite output from "
                        f"module '{found[0]}' ({found[1]}).")
            if found is not None and found[0]:
                return (f"{_where(trainer, [suspect])}: {what}; produced in forward: made in '{found[0]}' "
                        f"({found[1]})'s own forward, outside its children.")
            if found is not None:
                return (f"{_where(trainer, [suspect])}: {what}; produced in forward, outside any module "
                        "(training_step's own code, before it called a module).")
            if not loss_finite:
                return (f"{_where(trainer, [suspect])}: {what}; produced in forward, outside any module (the loss "
                        f"computation in training_step).")
        return f"{_where(trainer, suspects)}: {what}; not reproduced by a rerun of training_step."

    def _rerun(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
               suspect: _WindowBatch) -> tuple[tuple[str, str, bool] | None, bool]:
        """Reruns ``suspect``'s training_step as it ran; returns where the first non-finite module output was made
        (path, type, own: see ``first_nonfinite_output``) and whether the loss was finite. BatchNorms stay in train
        mode, so the rerun normalises as the step did, and their running statistics, which it updated again, are
        put back. ``global_step`` reads as the failing step's, which Lightning has counted by now: a term added on
        some steps only (a regulariser every k steps, a KL weight) is computed as it was."""
        outputs: list[Any] = []
        # What trainer.global_step reads under automatic optimization (the only one with a rerun).
        steps = trainer.fit_loop.epoch_loop.automatic_optimization.optim_progress.optimizer.step.total
        steps.completed -= 1
        try:
            # With gradients, as the step ran: a training_step may call torch.autograd.grad (a gradient penalty).
            # Eagerly: a compiled stage runs its graph, in which the hooks added after compiling never fire, so only
            # the stage itself was named, not the module within it that made the value.
            with (_replaying(suspect.generators), torch.enable_grad(), torch.compiler.set_stance("force_eager"),
                  trainer.precision_plugin.forward_context()):
                found = NonFiniteDiagnosis(pl_module).first_nonfinite_output(
                    lambda: outputs.append(pl_module.training_step(suspect.batch, suspect.index)))
        finally:
            steps.completed += 1
            self._restore_running_stats()
        return found, _all_finite(_floating_leaves(outputs))


def _merged(earlier: dict[str, Any], later: dict[str, Any]) -> dict[str, Any]:
    """One verdict for two optimizer steps of a batch (manual optimization): non-finite if either was, with the
    schedulers of every skipped step to set back."""
    if later["loss_finite"] and later["grads_finite"]:
        return later if earlier["loss_finite"] and earlier["grads_finite"] else earlier
    if earlier["loss_finite"] and earlier["grads_finite"]:
        return later
    return {"loss_finite": earlier["loss_finite"] and later["loss_finite"],
            "grads_finite": earlier["grads_finite"] and later["grads_finite"],
            # The lowest scale: an overflow probe only where every skipped step was one.
            "scale": None if earlier["scale"] is None else min(earlier["scale"], later["scale"]),
            "grad_module": earlier["grad_module"],
            "schedulers": earlier["schedulers"] + later["schedulers"]}


def _can_rerun(trainer: pl.Trainer, pl_module: pl.LightningModule) -> bool:
    """Whether a rerun (see ``NonFiniteGuard._diagnose_here``) can follow this batch's step: one process, automatic
    optimization, and the batch that steps the optimizer, the window's last, the one still held at the step (an
    earlier one is let go). Lightning has counted the batch, and read whether it is the epoch's last, before
    ``on_train_batch_start``; a strategy accumulating on its own (DeepSpeed) is stepped on every batch."""
    return (trainer.world_size == 1 and pl_module.automatic_optimization
            and (trainer.strategy.handles_gradient_accumulation or not trainer.fit_loop._should_accumulate()))


def _suspects(window: list[_WindowBatch], loss_finite: bool) -> list[_WindowBatch]:
    """The batches of the window that may have made its step non-finite, in order: the first whose own loss was
    non-finite, else (the losses were finite) every batch of the window."""
    if not loss_finite:
        for batch in window:
            if batch.loss_finite is not None and not bool(batch.loss_finite):  # a device read, on a skipped step only
                return [batch]
    return window


def _log_file_note() -> str:
    """`` (log <path>)`` naming this process's log file (under DDP each rank writes its own), or nothing without
    one."""
    files = [h.baseFilename for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)]
    return f" (log {files[0]})" if files else ""


def _where(trainer: pl.Trainer, batches: list[_WindowBatch]) -> str:
    first, last = batches[0].index, batches[-1].index
    if first is None:  # a training_step taking the dataloader_iter: Lightning's batch index may be the previous one
        return f"First at global step {trainer.global_step - 1}"
    named = f"batch {first}" if first == last else f"batches {first}-{last}"
    return f"First at {named} (global step {trainer.global_step - 1})"
