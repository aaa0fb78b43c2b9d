"""Command-line pieces the benchmarks share: argument types that refuse values a run cannot use, the device
check, and result file names.

A mistyped number should end in one usage line naming the flag, not in a traceback after minutes of setup,
nor in a run that quietly measures something else (a step count of -3 running one step).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import torch


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: a whole number of at least ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"wants a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"wants a whole number of at least {minimum}, got {value}")
        return value

    return parse


positive_int = int_at_least(1)
non_negative_int = int_at_least(0)


def positive_float(text: str) -> float:
    """An argparse type: a number above 0 (a duration, a time budget)."""
    value = _float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"wants a number above 0, got {text}")
    return value


def probability(text: str) -> float:
    """An argparse type: a dropout probability, at least 0 and below 1."""
    value = _float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"wants a probability p with 0 <= p < 1, got {text}")
    return value


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"wants a number, got {text!r}") from None


def check_device(parser: argparse.ArgumentParser, device: str) -> str:
    """``device`` if this machine can run on it; else ``parser.error`` says why and what to pass instead."""
    try:
        kind = torch.device(device)
    except RuntimeError:
        parser.error(f"--device {device}: not a device; pass cpu or cuda")
    if kind.type not in ("cpu", "cuda"):
        parser.error(f"--device {device}: the benchmarks run on cpu or cuda")
    if kind.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {device}: no GPU in use; pass --device cpu")
    if kind.type == "cuda" and (kind.index or 0) >= torch.cuda.device_count():
        parser.error(f"--device {device}: this machine has {torch.cuda.device_count()} GPU(s)")
    return device


def result_file(out: Path, *parts: str | None) -> Path:
    """``out/<part>-<part>....json`` of the parts given (None and "" left out): a variant run (quick, another
    allocator, a subset) names itself after the variant, so it neither overwrites the day's full run nor is
    taken for it by benchmarks.report."""
    return out / ("-".join(p for p in parts if p) + ".json")
