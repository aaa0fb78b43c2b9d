"""Counts and token ids as int64 arrays, refusing values that are not whole numbers.

``np.asarray(values, dtype=np.int64)`` truncates 12.7 to 12 without a word: a length or a token id that came
out of float arithmetic would silently turn into another one.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable

import numpy as np

INT64_MAX = np.iinfo(np.int64).max


def whole_numbers(values: Iterable[int] | np.ndarray, what: str) -> np.ndarray:
    """``values`` as an int64 array; a ValueError naming ``what`` and the first value that is not whole, or is
    past int64 (which the cast would wrap: 2**64 - 1 became -1)."""
    torch = sys.modules.get("torch")  # a tensor exists only once torch is imported; this module does not need it
    if torch is not None and isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()  # list() of a tensor is one 0-d tensor per element: slow
    arr = np.asarray(values if isinstance(values, np.ndarray) else list(values))
    if arr.size == 0:
        return arr.astype(np.int64)
    if arr.dtype.kind == "u" and arr.itemsize == 8:
        _check_int64(arr, arr > INT64_MAX, what)
    if arr.dtype.kind in "iub":
        return arr.astype(np.int64)
    if arr.dtype.kind != "f":
        raise ValueError(f"hetrain: {what} must be whole numbers, got an array of {arr.dtype}")
    fractional = np.flatnonzero(~np.isfinite(arr) | (arr != np.round(arr)))
    if len(fractional):
        i = int(fractional[0])
        raise ValueError(f"hetrain: {what} must be whole numbers, got {float(arr.flat[i])} at index {i}")
    _check_int64(arr, (arr >= 2.0**63) | (arr < -(2.0**63)), what)
    return arr.astype(np.int64)


def token_count(value: object, name: str) -> int:
    """``value`` (a size counted in tokens: a row, a window, a stride) as an int; a ValueError naming ``name``
    otherwise (a float would size rows or windows that nothing else plans for; ``True`` would read as 1)."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ValueError(f"hetrain: {name} counts tokens, so must be an integer, got {value!r}")
    return int(value)


def _check_int64(arr: np.ndarray, outside: np.ndarray, what: str) -> None:
    """Refuses the first value of ``arr`` where ``outside`` holds, naming it as it is."""
    past = np.flatnonzero(outside)
    if len(past):
        i = int(past[0])
        value = arr.flat[i]
        shown = int(value) if arr.dtype.kind == "u" else float(value)
        raise ValueError(f"hetrain: {what} must fit int64 (below 2**63), got {shown} at index {i}")
