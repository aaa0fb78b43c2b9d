"""Placement: which part of a model runs on which device, decided by measurement and scheduling.

A Lightning-free toolbox: :func:`measure` builds a :class:`CostModel` on the machine at hand,
:func:`heft` / :func:`heft_bytes` schedule any task graph, :func:`chain_dp` / :func:`chain_dp_bytes`
place a chain of layers exactly (:func:`chain_time` prices any other plan), and :class:`PlacementPlan`
carries the answer (save, load, apply; :func:`remove_input_hooks` undoes apply's input hooks); :func:`resolve_plan`
maps it onto a model's stages and the devices present.
"""

from hetrain.placement.chain import ChainPlan, chain_dp, chain_dp_bytes, chain_time
from hetrain.placement.cost_model import CostModel, measure, measure_bandwidth
from hetrain.placement.heft import Schedule, heft, heft_bytes, topological_order, upward_ranks
from hetrain.placement.plan import (
    PlacementPlan,
    available_devices,
    device_present,
    remove_input_hooks,
    resolve_plan,
)

__all__ = [
    "ChainPlan",
    "CostModel",
    "PlacementPlan",
    "Schedule",
    "available_devices",
    "chain_dp",
    "chain_dp_bytes",
    "chain_time",
    "device_present",
    "heft",
    "heft_bytes",
    "measure",
    "measure_bandwidth",
    "remove_input_hooks",
    "resolve_plan",
    "topological_order",
    "upward_ranks",
]
