"""Lightning callbacks: stage placement across devices."""

from hetrain.callbacks.placement import StagePlacement, device_present, resolve_plan

__all__ = ["StagePlacement", "device_present", "resolve_plan"]
