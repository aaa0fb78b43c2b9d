"""Counts and token ids as int64 arrays, refusing values that are not whole numbers.

``np.asarray(values, dtype=np.int64)`` truncates 12.7 to 12 without a word: a length or a token id that came
out of float arithmetic would silently turn into another one.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np


def whole_numbers(values: Iterable[int] | np.ndarray, what: str) -> np.ndarray:
    """``values`` as an int64 array; a ValueError naming ``what`` and the first value that is not whole."""
    arr = np.asarray(values if isinstance(values, np.ndarray) else list(values))
    if arr.dtype.kind in "iub" or arr.size == 0:
        return arr.astype(np.int64)
    if arr.dtype.kind != "f":
        raise ValueError(f"hetrain: {what} must be whole numbers, got an array of {arr.dtype}")
    fractional = np.flatnonzero(~np.isfinite(arr) | (arr != np.round(arr)))
    if len(fractional):
        i = int(fractional[0])
        raise ValueError(f"hetrain: {what} must be whole numbers, got {float(arr.flat[i])} at index {i}")
    return arr.astype(np.int64)
