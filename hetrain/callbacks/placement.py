"""Puts each stage of a model on the device a plan names, and moves activations between stages.

The plan is a plain ``{module_path: device}`` mapping, e.g. ``{"embeddings": "cpu", "encoder":
"cuda:0", "classifier": "cuda:0"}``. A path names a stage (``encoder.1``) or a group of stages
(``encoder`` covers ``encoder.0``, ``encoder.1``, ...); the most specific path wins. Stages are run one
after another; a pipeline split that overlaps them builds on the same plan.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from torch import nn
from torch.utils.hooks import RemovableHandle
from typing_extensions import override

log = logging.getLogger(__name__)


def device_present(device: torch.device) -> bool:
    """Whether this process can allocate on ``device`` (``cuda:1`` on a one-GPU machine cannot)."""
    if device.type == "cpu":
        return True
    backend = getattr(torch, device.type, None)
    if backend is None or not backend.is_available():
        return False
    return device.index is None or device.index < backend.device_count()


def resolve_plan(
    plan: Mapping[str, str], stages: list[str], fallback: str = "cpu"
) -> tuple[dict[str, torch.device], str | None]:
    """Maps each stage the plan covers to a present device.

    Returns the devices and, when some planned device is absent, one line saying what moved to
    ``fallback`` instead. Raises if a path names no stage, or lies inside one (a stage is the unit).
    """
    for path in plan:
        if not any(s == path or s.startswith(path + ".") for s in stages):
            inside = next((s for s in stages if path.startswith(s + ".")), None)
            where = f"it lies inside stage {inside!r}" if inside else "no stage has that path"
            raise ValueError(
                f"hetrain: placement entry {path!r} names no stage ({where}); stages: {', '.join(stages)}"
            )
    devices: dict[str, torch.device] = {}
    for stage in stages:
        covering = [p for p in plan if stage == p or stage.startswith(p + ".")]
        if covering:
            devices[stage] = torch.device(plan[max(covering, key=len)])
    missing: dict[str, list[str]] = {}
    for path, name in plan.items():
        if not device_present(torch.device(name)):
            missing.setdefault(name, []).append(path)
    for stage, device in devices.items():
        if not device_present(device):
            devices[stage] = torch.device(fallback)
    note = "; ".join(f"{name} not present; {', '.join(paths)} -> {fallback}"
                     for name, paths in missing.items())
    return devices, f"placement: {note}" if note else None


def _inputs_to(device: torch.device):
    # Host-to-device copies may run asynchronously; a copy to the host must not, because the CPU
    # would read the destination before the copy has landed.
    non_blocking = device.type != "cpu"

    def move(x):
        return x.to(device, non_blocking=non_blocking) if isinstance(x, torch.Tensor) else x

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return tuple(move(a) for a in args), {k: move(v) for k, v in kwargs.items()}

    return hook


class StagePlacement(Callback):
    """Moves the stages of ``pl_module.stages()`` to the devices of ``plan`` once Lightning has set up.

    Example::

        plan = {"embeddings": "cpu", "encoder": "cuda:0", "classifier": "cuda:0"}
        Trainer(callbacks=[StagePlacement(plan)])

    Notes:
        Lightning first puts the whole module on its root device; stages the plan does not cover
        stay there. Every stage gets a forward pre-hook that brings its tensor inputs to its
        device, so the model's own forward needs no device code. A planned device that is not
        present (no GPU, fewer GPUs) is replaced by ``fallback``, said in one log line.

    Args:
        plan: ``{module_path: device}``, paths relative to the model (``embeddings``, ``encoder.0``).
        fallback: device for stages whose planned device is absent.
    """

    def __init__(self, plan: Mapping[str, str] | None = None, fallback: str = "cpu") -> None:
        self.plan = dict(plan or {})
        self.fallback = fallback
        self.devices: dict[str, torch.device] | None = None
        self._hooks: dict[str, RemovableHandle] = {}

    def place(self, stages: Mapping[str, nn.Module]) -> dict[str, torch.device]:
        """Moves the stages (again, if Lightning moved them back) and hooks them; returns their devices."""
        if self.devices is None:
            self.devices, note = resolve_plan(self.plan, list(stages), self.fallback)
            if note:
                log.info(note)
        placed = {}
        for name, stage in stages.items():
            device = self.devices.get(name)
            if device is None:
                device = next(stage.parameters()).device
            else:
                stage.to(device)
            if name not in self._hooks:
                self._hooks[name] = stage.register_forward_pre_hook(_inputs_to(device), with_kwargs=True)
            placed[name] = device
        return placed

    def _place(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.place(pl_module.stages())

    # Each entry point (fit, validate, test, predict) sets the module up on Lightning's root device
    # first; placing runs after that and is a no-op when nothing moved.
    on_fit_start = override(_place)
    on_validation_start = override(_place)
    on_test_start = override(_place)
    on_predict_start = override(_place)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for handle in self._hooks.values():
            handle.remove()
        self._hooks.clear()
