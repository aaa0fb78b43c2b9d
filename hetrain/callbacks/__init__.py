"""Lightning callbacks: stage placement, pipeline split, per-device precision, non-finite guard, memory, throughput."""

from hetrain.callbacks.memory import MemoryProfiler
from hetrain.callbacks.pipeline import PipelineSplit
from hetrain.callbacks.placement import StagePlacement, device_present, resolve_plan
from hetrain.callbacks.precision import (
    DeviceMixedPrecision,
    NonFiniteError,
    NonFiniteGuard,
    choose_precision,
    trainer_precision,
)
from hetrain.callbacks.throughput import Throughput

__all__ = [
    "DeviceMixedPrecision",
    "MemoryProfiler",
    "NonFiniteError",
    "NonFiniteGuard",
    "PipelineSplit",
    "StagePlacement",
    "Throughput",
    "choose_precision",
    "device_present",
    "resolve_plan",
    "trainer_precision",
]
