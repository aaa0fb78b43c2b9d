"""Lightning callbacks: placement, pipeline split, precision, non-finite guard, memory, throughput, trace."""

from hetrain.callbacks.churn import ChurnTracker
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
from hetrain.callbacks.profiling import StepTrace
from hetrain.callbacks.throughput import Throughput

__all__ = [
    "ChurnTracker",
    "DeviceMixedPrecision",
    "MemoryProfiler",
    "NonFiniteError",
    "NonFiniteGuard",
    "PipelineSplit",
    "StagePlacement",
    "StepTrace",
    "Throughput",
    "choose_precision",
    "device_present",
    "resolve_plan",
    "trainer_precision",
]
