"""Test-wide settings: Triton kernels run in the interpreter on CPU tensors, and backends are strict."""

import os

# Both must be set before triton or hetrain is imported: @triton.jit reads TRITON_INTERPRET at decoration.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HETRAIN_STRICT", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none visible)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
