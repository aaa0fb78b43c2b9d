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
specific one wins. Nested mappings read as dotted paths (``{encoder: {"1": cpu}}`` is ``{encoder.1: cpu}``).
On the command line ``'+placement.plan={encoder.1: cpu}'`` adds an entry and keeps the others;
``+placement.plan.encoder.1=cpu`` is read too, but Hydra then replaces the whole ``encoder`` entry with it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from torch import nn
from torch.utils.hooks import RemovableHandle

from hetrain.placement.heft import is_number
from hetrain.placement.pipeline import to_device

METHODS = ("explicit", "heft", "chain-dp")
PLAN_SUFFIXES = (".yaml", ".yml", ".json")


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


def flatten_plan(plan: Mapping, prefix: str = "") -> dict[str, object]:
    """``plan`` with nested mappings as dotted paths: Hydra turns ``+placement.plan.encoder.1=cpu`` into
    ``{encoder: {"1": cpu}}``, which would otherwise read as a device named ``{"1": cpu}``."""
    flat: dict[str, object] = {}
    for key, value in plan.items():
        path = f"{prefix}{key}"
        entries = flatten_plan(value, f"{path}.") if isinstance(value, Mapping) else {path: value}
        if not entries:
            raise ValueError(f"hetrain: placement of {path!r} is an empty mapping; give it a device, or nested "
                             f"stage paths with devices")
        twice = sorted(set(flat) & set(entries))
        if twice:
            raise ValueError(f"hetrain: the placement plan gives {twice[0]!r} twice, once as a dotted path and once "
                             f"nested; keep one")
        flat.update(entries)
    return flat


@dataclass
class PlacementPlan:
    """``devices`` maps module paths to device strings; ``predicted_step_time`` is in seconds (None if unknown)."""

    devices: dict[str, str]
    method: str = "explicit"
    predicted_step_time: float | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"hetrain: placement method {self.method!r} is not one of {METHODS}")
        self.devices = flatten_plan(self.devices)
        for path, device in self.devices.items():
            parse_device(device, f"placement of {path!r}")
        # torch.device values (resolve_plan's) as their names: a plan is saved as YAML or JSON, which hold strings.
        self.devices = {path: str(d) if isinstance(d, torch.device) else d for path, d in self.devices.items()}
        if self.predicted_step_time is not None:
            if not is_number(self.predicted_step_time):
                raise ValueError(f"hetrain: predicted_step_time is {self.predicted_step_time!r}; it is seconds, a "
                                 f"number (or None)")
            # A solver given NumPy arrays returns a NumPy scalar, which neither YAML nor JSON can write.
            self.predicted_step_time = float(self.predicted_step_time)

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
        """Moves each planned submodule to its device, groups before the paths inside them, and hooks each unit so
        that its tensor inputs come to its device, as ``StagePlacement`` does: the model's forward then runs across
        devices with no device code. The units are the model's ``stages()`` where it has them (a path then names
        stages, as in :func:`resolve_plan`; ``""`` names them all), else the planned submodules. A hook reads its
        unit's device when the unit runs, so moving the model afterwards (``.cpu()``, another plan) keeps it
        right; applying again adds none, and :func:`remove_input_hooks` removes them. Every path and device is
        checked before anything moves, so a bad plan leaves the model where it was: the meta device is refused (the
        weights moved there would be lost), as is a plan that puts two uses of one parameter on different devices
        (moving one would untie it). Returns ``model``."""
        for path in self.devices:
            try:
                model.get_submodule(path)
            except AttributeError as exc:
                children = ", ".join(model._modules)  # every child name: named_children() skips a reused module
                raise ValueError(
                    f"hetrain: placement path {path!r} names no submodule of {type(model).__name__} "
                    f"(its children: {children})"
                ) from exc
        units = self._units(model)  # checks that each path names stages, where the model has them
        self._refuse_splitting_shared(model)
        _refuse_meta({f"placement of {path!r}": torch.device(device) for path, device in self.devices.items()})
        self._check_present()
        for path in sorted(self.devices, key=lambda p: p.count(".") if p else -1):
            model.get_submodule(path).to(self.devices[path])
        for unit in units:
            hook_inputs(unit)
        return model

    def _units(self, model: nn.Module) -> list[nn.Module]:
        """The modules that get an input hook: every stage (one the plan leaves alone may still take its input
        from a stage it moved), or without ``stages()`` the planned submodules."""
        stages = model.stages() if callable(getattr(model, "stages", None)) else None
        if stages is None:
            return [model.get_submodule(path) for path in self.devices]
        stage_paths(self.devices, list(stages))
        return list(stages.values())

    def _refuse_splitting_shared(self, model: nn.Module) -> None:
        """Refuses a plan that puts two uses of one parameter on different devices: a parameter lives on one device,
        and moving one use would silently untie it from the other (an input embedding tied to an output head)."""
        first_use: dict[int, tuple[str, torch.device]] = {}
        clashes = []
        for name, p in model.named_parameters(remove_duplicate=False):
            covering = [path for path in self.devices if path == "" or name.startswith(path + ".")]
            device = _indexed(torch.device(self.devices[max(covering, key=len)]) if covering else p.device)
            first, first_device = first_use.setdefault(id(p), (name, device))
            if first_device != device:
                clashes.append(f"{first} on {first_device} and {name} on {device}")
        if clashes:
            raise ValueError(f"hetrain: the plan puts parameters shared by two modules on different devices: "
                             f"{'; '.join(clashes)}; nothing was moved. Put both modules on one device, or untie the "
                             f"weights")

    def _check_present(self) -> None:
        absent = [f"{path!r} on {device}" for path, device in self.devices.items()
                  if not device_present(_indexed(torch.device(device)))]
        if absent:
            raise ValueError(f"hetrain: the plan places {', '.join(absent)}, which this machine does not have (it has "
                             f"{', '.join(available_devices())}); nothing was moved. Plan for the devices here, or "
                             f"map the plan onto them with resolve_plan and a fallback")

    def to_dict(self) -> dict:
        return {"plan": dict(self.devices), "method": self.method, "predicted_step_time": self.predicted_step_time}

    @classmethod
    def from_dict(cls, data: Mapping) -> PlacementPlan:
        """Reads :meth:`to_dict`'s form, or a bare ``{path: device}`` mapping (an explicit plan)."""
        if "plan" not in data:
            _refuse_missing_plan_key(data)
            return cls(dict(data))  # each entry checked as a plan's are, so a bad device is named with its path
        if isinstance(data["plan"], Mapping):
            return cls(dict(data["plan"]), data.get("method", "explicit"), data.get("predicted_step_time"))
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


def _refuse_missing_plan_key(data: Mapping) -> None:
    """A file with :meth:`PlacementPlan.to_dict`'s other keys but no ``plan`` (misspelt ``plans:``, say) would read
    as a bare mapping, its ``method`` a module path with a device named ``chain-dp``."""
    saved_keys = [key for key in ("method", "predicted_step_time") if key in data]
    if saved_keys:
        raise ValueError(f"hetrain: the placement file has {', '.join(saved_keys)} but no 'plan' key (its keys: "
                         f"{', '.join(map(str, data))}); a placement file holds either {{plan: {{path: device}}, "
                         f"method: ...}} or {{path: device}}")


def read_plan(plan: Mapping | str | Path | None) -> dict[str, str] | str:
    """A ``placement.plan`` setting as ``{module path: device}``, or ``"auto"``; a bad one fails here, not at fit start.

    The setting is a mapping (nested ones flattened), ``"auto"``, ``None`` (no plan), or the path of a plan
    file (``.yaml``/``.yml``/``.json``, as :meth:`PlacementPlan.save` writes it, or a bare mapping).
    """
    if plan is None:
        return {}
    if isinstance(plan, Mapping):
        return PlacementPlan(dict(plan)).devices
    if plan == "auto":
        return "auto"
    if isinstance(plan, str | Path) and Path(plan).suffix in PLAN_SUFFIXES:
        path = Path(plan).expanduser()
        if not path.is_file():
            raise ValueError(f"hetrain: placement plan file {path.resolve()} does not exist; pass the "
                             f"placement_plan.yaml a run with placement.plan=auto wrote in its run directory")
        return PlacementPlan.load(path).devices
    raise ValueError(f"hetrain: placement plan must be a {{module_path: device}} mapping, 'auto', or the path of "
                     f"a plan file ({', '.join(PLAN_SUFFIXES)}), got {plan!r}")


def device_present(device: torch.device) -> bool:
    """Whether this process can allocate on ``device`` (``cuda:1`` on a one-GPU machine cannot; the CPU and the
    meta device, which holds shapes only, are in every process)."""
    if device.type in ("cpu", "meta"):
        return True
    backend = getattr(torch, device.type, None)
    if backend is None or not backend.is_available():
        return False
    return device.index is None or device.index < backend.device_count()


def _indexed(device: torch.device) -> torch.device:
    """One spelling per device: ``cuda`` as the GPU it means here (this process's current one) and ``cpu:0`` as
    ``cpu``, so a plan that writes ``cuda`` for one stage and ``cuda:0`` for the next puts both on one device, as
    torch would run them. Where the backend is absent (a GPU run's plan or costs read on a laptop) ``cuda`` is
    ``cuda:0``, the GPU a process starts on: the same device with or without a GPU here."""
    if device.type == "cpu":
        return torch.device("cpu")
    if device.index is not None or device.type == "meta":  # a meta tensor's device has no index
        return device
    backend = getattr(torch, device.type, None)
    is_available = getattr(backend, "is_available", None)
    if callable(is_available) and is_available() and hasattr(backend, "current_device"):
        return torch.device(device.type, backend.current_device())
    return torch.device(device.type, 0)


def refuse_repeated_devices(names: Sequence[str], what: str) -> None:
    """Refuses ``names`` that name one device twice, spelt alike or not (``cpu`` and ``cpu:0``)."""
    seen: dict[torch.device, str] = {}
    for name in names:
        device = _indexed(parse_device(name, what))
        if device in seen:
            raise ValueError(f"hetrain: {what} name {device} twice ({seen[device]!r} and {name!r}); give each device "
                             f"once")
        seen[device] = name


def stage_paths(plan: Mapping[str, object], stages: Sequence[str]) -> dict[str, str]:
    """The plan path that decides each stage it covers: the most specific one (``encoder.1`` over ``encoder``).

    Raises if a path names no stage, or lies inside one (a stage is the unit). The root path ``""`` covers every
    stage, the least specific of all.
    """
    for path in plan:
        if not any(_covers(path, s) for s in stages):
            inside = next((s for s in stages if path.startswith(s + ".")), None)
            where = f"it lies inside stage {inside!r}" if inside else "no stage has that path"
            raise ValueError(
                f"hetrain: placement entry {path!r} names no stage ({where}); stages: {', '.join(stages)}"
            )
    paths = {}
    for stage in stages:
        covering = [p for p in plan if _covers(p, stage)]
        if covering:
            paths[stage] = max(covering, key=len)
    return paths


def _covers(path: str, stage: str) -> bool:
    return path in ("", stage) or stage.startswith(path + ".")


def resolve_plan(
    plan: Mapping[str, object], stages: list[str], fallback: str = "cpu", root_device: torch.device | None = None,
    processes: int = 1,
) -> tuple[dict[str, torch.device], str | None]:
    """Maps each stage the plan covers (see :func:`stage_paths`; nested mappings read as dotted paths) to a
    present device.

    Returns the devices and, when some planned device is absent, one line saying what moved to
    ``fallback`` instead. Under several processes (DDP) whose root device is the CPU (``root_device``, as under
    ``trainer.accelerator=cpu``) a GPU written without an index (``cuda``: the process's own) is no process's, so its
    stages go to ``fallback`` too, said in the same line; one written with an index is left to
    :func:`refuse_other_processes_devices`. The meta device is refused: it is present everywhere, but a stage moved
    there loses its weights, and a run could not train it.
    """
    plan = flatten_plan(plan)
    deciding = stage_paths(plan, stages)
    written = {path: parse_device(name, f"placement of {path!r}") for path, name in plan.items()}
    planned = {path: _indexed(device) for path, device in written.items()}
    fallback_device = _indexed(parse_device(fallback, "placement fallback"))
    _refuse_meta({**{f"placement of {path!r}": device for path, device in planned.items()},
                  "placement fallback": fallback_device})
    moved: dict[str, list[str]] = {}  # why a planned device is not used here -> the paths it leaves
    for path, name in plan.items():
        if not device_present(planned[path]):
            moved.setdefault(f"{name} not present", []).append(path)
        elif _no_process_own(written[path], root_device, processes):
            moved.setdefault(f"{name} is no process's own under {processes} processes on the CPU "
                             f"(trainer.accelerator=cpu)", []).append(path)
    note = "; ".join(f"{why}; {', '.join(paths)} -> {fallback}" for why, paths in moved.items())
    if moved and not device_present(fallback_device):
        raise ValueError(f"hetrain: {note}, but the fallback {fallback} is not here either (it has "
                         f"{', '.join(available_devices())}); give a fallback it has, e.g. cpu")
    if moved and _on_cpu_processes(root_device, processes) and fallback_device.type not in ("cpu", "meta"):
        raise ValueError(f"hetrain: {note}, but the fallback {fallback} is a GPU, which no process has under "
                         f"{processes} processes on the CPU (trainer.accelerator=cpu); give the fallback cpu "
                         f"(placement.fallback=cpu)")
    moved_paths = {path for paths in moved.values() for path in paths}
    devices = {stage: fallback_device if path in moved_paths else planned[path] for stage, path in deciding.items()}
    return devices, f"placement: {note}" if note else None


def _no_process_own(device: torch.device, root_device: torch.device | None, processes: int) -> bool:
    """Whether ``device``, as a plan wrote it, means a process's own GPU (an accelerator with no index) where no
    process has one: several processes on CPU root devices."""
    return _on_cpu_processes(root_device, processes) and device.type not in ("cpu", "meta") and device.index is None


def _on_cpu_processes(root_device: torch.device | None, processes: int) -> bool:
    """Several processes (DDP) whose root devices are the CPU: none has a GPU of its own."""
    return processes > 1 and root_device is not None and root_device.type == "cpu"


def refuse_other_processes_devices(plan: Mapping[str, object], devices: Mapping[str, torch.device],
                                   own: torch.device, processes: int, source: str | None = None) -> None:
    """Refuses, under several processes (DDP), a resolved plan (:func:`resolve_plan`'s ``{stage: device}`` for
    ``plan``) that puts a stage on an accelerator other than this process's own (``own``, its root device).

    Every process places the same plan, and each splits its own share of the batch over its own devices: the CPU
    and its own GPU. A GPU named by index is the same one in every process, so where it is not this process's own
    (``cuda:0`` in the process on ``cuda:1``, or where the root device is the CPU, as under
    ``trainer.accelerator=cpu``) the processes would compete for it while their own sit idle. With one GPU per node
    ``cuda:0`` is each process's own, and ``cuda`` resolves to each process's own GPU (the one the trainer made
    current for it; on a CPU root :func:`resolve_plan` sends it to the fallback). A planned device that is absent
    counts as the fallback that replaced it. The error quotes each device as ``plan`` wrote it, with the device it
    resolved to where that differs. ``source``: the plan file the plan was read from, named in the error."""
    if processes <= 1:
        return
    own = _indexed(own)
    plan = flatten_plan(plan)
    deciding = stage_paths(plan, list(devices))
    elsewhere: dict[str, list[str]] = {}
    for stage, device in devices.items():
        if device.type not in ("cpu", "meta") and _indexed(device) != own:
            elsewhere.setdefault(_as_written(plan[deciding[stage]], device), []).append(stage)
    if not elsewhere:
        return
    described = f"the placement plan read from {source}" if source else "the placement plan"
    placed = "; ".join(f"{', '.join(stages)} on {device}" for device, stages in elsewhere.items())
    if own.type == "cpu":
        gpus = ", ".join(sorted({device.type for device in devices.values()} - {"cpu", "meta"}))
        fix = (f"This process has no GPU of its own (its root device is the CPU: trainer.accelerator=cpu): write cpu "
               f"for those stages, or train on GPUs (trainer.accelerator=gpu), where {gpus} names each process's own")
    else:
        fix = f"This process's own GPU is {own}: write {own.type} (each process's own GPU) or cpu for those stages"
    raise ValueError(f"hetrain: under {processes} processes (DDP) {described} puts {placed}, not on this process's "
                     f"devices: each process splits its own share of the batch over the CPU and its own GPU, and a GPU "
                     f"named by index is the same one in every process, so they would compete for it. {fix}")


def _as_written(name: object, device: torch.device) -> str:
    """``name`` as the plan wrote it, with ``device``, where it resolved, beside it where that reads otherwise
    (``cuda (cuda:0)``)."""
    return str(name) if str(name) == str(device) else f"{name} ({device})"


def _refuse_meta(devices: Mapping[str, torch.device]) -> None:
    on_meta = [what for what, device in devices.items() if device.type == "meta"]
    if on_meta:
        raise ValueError(f"hetrain: {on_meta[0]} names meta, which holds shapes, not data: a stage moved there loses "
                         f"its weights and cannot train; name cpu or cuda")


def held_device(module: nn.Module) -> torch.device | None:
    """The device of ``module``'s first parameter or buffer (a placement moves a unit whole); None where it holds
    neither (a bare activation), which then runs wherever its input is."""
    tensor = next(module.parameters(), None)
    if tensor is None:
        tensor = next(module.buffers(), None)
    return None if tensor is None else tensor.device


class _InputsToItsDevice:
    """A forward pre-hook that brings a module's tensor inputs to the device the module is on when it runs (see
    :func:`to_device`). Read at each call, not fixed when hooked, the device follows the module wherever it
    moves later (back to the CPU, to the devices of another placement), so a hook is never stale; a class, not a
    closure, so that a hooked model pickles (``torch.save(model)``). Traced by torch.compile with the module it
    hooks (a placed model compiles whole, or stage by stage, without a graph break). Tensors nested in the inputs
    (a tuple or list argument, a keyword argument) move too, through the containers a pipeline split moves
    activations through (a PackedSequence keeps its ``batch_sizes`` on the CPU): a stage given ``(hidden, skip)``
    gets both on its device."""

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        device = held_device(module)
        if device is None:
            return None
        return to_device((args, kwargs), device)


def _has_input_hook(module: nn.Module) -> bool:
    return any(isinstance(hook, _InputsToItsDevice) for hook in module._forward_pre_hooks.values())


def hook_inputs(module: nn.Module) -> RemovableHandle | None:
    """Hooks ``module`` to bring its tensor inputs to its device; returns the new hook's handle, or None where it
    needs none: it has one already (placing again, by whichever plan or callback, adds none) or holds no tensors."""
    if _has_input_hook(module) or held_device(module) is None:
        return None
    return module.register_forward_pre_hook(_InputsToItsDevice(), with_kwargs=True)


def remove_input_hooks(model: nn.Module) -> int:
    """Removes the input hooks that placing ``model`` (:meth:`PlacementPlan.apply`, ``StagePlacement``) gave its
    modules, e.g. before handing the model to code that expects none; returns how many it removed."""
    removed = 0
    for module in model.modules():
        # torch offers no lookup of a hook by kind: these two dicts are what RemovableHandle.remove() edits.
        keys = [key for key, hook in module._forward_pre_hooks.items() if isinstance(hook, _InputsToItsDevice)]
        for key in keys:
            del module._forward_pre_hooks[key]
            module._forward_pre_hooks_with_kwargs.pop(key, None)
        removed += len(keys)
    return removed
