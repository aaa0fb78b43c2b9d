"""Lightning callbacks: placement, pipeline split, precision, non-finite guard, memory, throughput, trace,
random state in checkpoints, a graceful stop on Ctrl-C."""

from hetrain.callbacks.churn import ChurnTracker
from hetrain.callbacks.graceful_stop import GracefulStop
from hetrain.callbacks.memory import MemoryProfiler
from hetrain.callbacks.pipeline import PipelineSplit
from hetrain.callbacks.placement import StagePlacement
from hetrain.callbacks.precision import (
    DeviceMixedPrecision,
    NonFiniteError,
    NonFiniteGuard,
    choose_precision,
    trainer_precision,
)
from hetrain.callbacks.profiling import StepTrace
from hetrain.callbacks.random_state import RandomState
from hetrain.callbacks.throughput import Throughput

__all__ = [
    "ChurnTracker",
    "DeviceMixedPrecision",
    "GracefulStop",
    "MemoryProfiler",
    "NonFiniteError",
    "NonFiniteGuard",
    "PipelineSplit",
    "RandomState",
    "StagePlacement",
    "StepTrace",
    "Throughput",
    "choose_precision",
    "trainer_precision",
]
