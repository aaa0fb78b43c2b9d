"""``PlacementPlan``: which device each part of a model runs on, how that was decided, and what it should cost.

A plan is a ``{module path: device}`` mapping, the same shape a recipe's ``placement.plan`` takes,
so a plan measured and solved once can be saved and reused as an explicit one::

    plan:
      embeddings: cpu
      encoder: cuda:0
      classifier: cuda:0
    method: chain-dp
    predicted_step_time: 0.0123

A path may name a group (``encoder``) and a more specific path inside it (``encoder.1``); the more
specific one wins.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NamedTuple

import torch
import yaml
from torch import nn

METHODS = ("explicit", "heft", "chain-dp")


class Change(NamedTuple):
    """One path whose planned device is absent here, and the device it gets instead."""

    path: str
    planned: str
    actual: str


def available_devices() -> list[str]:
    """The devices this process can use: ``cpu``, then ``cuda:0`` ... ``cuda:N-1``."""
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return ["cpu", *(f"cuda:{i}" for i in range(count))]


def parse_device(name: object, what: str) -> torch.device:
    """``name`` as a torch device; a ValueError naming ``what`` gave it where torch's own error would name neither
    (a typo such as ``gpu``, or an integer, which torch reads as the current accelerator)."""
    if isinstance(name, torch.device):
        return name
    if isinstance(name, str):
        try:
            return torch.device(name)
        except RuntimeError:
            pass
    raise ValueError(f"hetrain: {what} names device {name!r}, unknown to torch; write cpu, cuda or cuda:<index>")


def describe_changes(changes: Sequence[Change]) -> str:
    """One log line for :meth:`PlacementPlan.resolve`'s changes, e.g. ``placement: cuda:0 absent; encoder -> cpu``."""
    moved: dict[tuple[str, str], list[str]] = {}
    for c in changes:
        moved.setdefault((c.planned, c.actual), []).append(c.path)
    return "placement: " + "; ".join(f"{p} absent; {', '.join(paths)} -> {a}" for (p, a), paths in moved.items())


@dataclass
class PlacementPlan:
    """``devices`` maps module paths to device strings; ``predicted_step_time`` is in seconds (None if unknown)."""

    devices: dict[str, str]
    method: str = "explicit"
    predicted_step_time: float | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"hetrain: placement method {self.method!r} is not one of {METHODS}")
        for path, device in self.devices.items():
            parse_device(device, f"placement of {path!r}")

    @classmethod
    def from_assignment(
        cls,
        paths: Sequence[str],
        device_names: Sequence[str],
        assignment: Sequence[int] | Mapping[str, int],
        method: str,
        predicted_step_time: float | None = None,
    ) -> PlacementPlan:
        """A plan from solver output: device indices (per path, in order or by name) into ``device_names``."""
        if isinstance(assignment, Mapping) and not set(paths) <= set(assignment):
            raise ValueError(f"hetrain: the assignment gives no device for {sorted(set(paths) - set(assignment))}")
        indices = [assignment[p] for p in paths] if isinstance(assignment, Mapping) else list(assignment)
        if len(indices) != len(paths):
            raise ValueError(f"hetrain: {len(paths)} paths but {len(indices)} device indices")
        for path, i in zip(paths, indices, strict=True):
            if not 0 <= i < len(device_names):
                raise ValueError(f"hetrain: {path!r} is assigned device {i}, but there are {len(device_names)} "
                                 f"devices ({', '.join(device_names)})")
        return cls({p: device_names[i] for p, i in zip(paths, indices, strict=True)}, method, predicted_step_time)

    def apply(self, model: nn.Module) -> nn.Module:
        """Moves each planned submodule to its device, groups before the paths inside them; returns ``model``."""
        for path in self.devices:
            try:
                model.get_submodule(path)
            except AttributeError as exc:
                children = ", ".join(name for name, _ in model.named_children())
                raise ValueError(
                    f"hetrain: placement path {path!r} names no submodule of {type(model).__name__} "
                    f"(its children: {children})"
                ) from exc
        for path in sorted(self.devices, key=lambda p: p.count(".") if p else -1):
            model.get_submodule(path).to(self.devices[path])
        return model

    def resolve(
        self, available: Sequence[str] | None = None, fallback: str = "cpu"
    ) -> tuple[PlacementPlan, list[Change]]:
        """The plan with every device absent from ``available`` (default: this machine's) replaced by ``fallback``.

        Returns the new plan and the changes made; :func:`describe_changes` turns them into one log line.
        """
        present = {_normalise(d) for d in (available_devices() if available is None else available)}
        changes = [Change(p, d, fallback) for p, d in self.devices.items() if _normalise(d) not in present]
        moved = {c.path: c.actual for c in changes}
        return replace(self, devices={p: moved.get(p, d) for p, d in self.devices.items()}), changes

    def to_dict(self) -> dict:
        return {"plan": dict(self.devices), "method": self.method, "predicted_step_time": self.predicted_step_time}

    @classmethod
    def from_dict(cls, data: Mapping) -> PlacementPlan:
        """Reads :meth:`to_dict`'s form, or a bare ``{path: device}`` mapping (an explicit plan)."""
        if isinstance(data.get("plan"), Mapping):
            return cls(
                {str(k): str(v) for k, v in data["plan"].items()},
                data.get("method", "explicit"),
                data.get("predicted_step_time"),
            )
        if all(isinstance(v, str) for v in data.values()):
            return cls({str(k): v for k, v in data.items()})
        raise ValueError("hetrain: a placement file holds either {plan: {path: device}, method: ...} or {path: device}")

    def save(self, path: str | Path) -> Path:
        """Writes YAML (``.yaml``/``.yml``) or JSON (anything else)."""
        path = Path(path)
        if path.suffix in (".yaml", ".yml"):
            path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))
        else:
            path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> PlacementPlan:
        path = Path(path)
        text = path.read_text()
        data = yaml.safe_load(text) if path.suffix in (".yaml", ".yml") else json.loads(text)
        if not isinstance(data, Mapping):
            raise ValueError(f"hetrain: {path} holds no mapping")
        return cls.from_dict(data)


def _normalise(device: str) -> torch.device:
    # "cpu" and "cpu:0" are the same device; "cuda" (the current GPU) is present exactly when cuda:0 is.
    d = torch.device(device)
    if d.type == "cpu":
        return torch.device("cpu")
    return torch.device(d.type, 0) if d.index is None else d
