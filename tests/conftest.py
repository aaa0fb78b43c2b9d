"""Test-wide settings: Triton kernels run in the interpreter on CPU tensors, and backends are strict."""

import os

# Both must be set before triton or hetrain is imported: @triton.jit reads TRITON_INTERPRET at decoration.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HETRAIN_STRICT", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def _interpreter_loops_over_tensor_bounds() -> bool:
    """Whether this Triton's interpreter runs ``range`` over a program's tensor bounds, as the row kernels do
    (Triton 3.6's fails under NumPy 2.4: 'only 0-dimensional arrays can be converted to Python scalars')."""
    import triton
    import triton.language as tl

    @triton.jit
    def rows(Out, n):
        start = tl.program_id(0) * n
        count = 0
        for _ in range(start, start + n):
            count += 1
        tl.store(Out, count)

    out = torch.zeros(1, dtype=torch.int32)
    try:
        rows[(1,)](out, 3)
    except Exception:
        return False
    return out.item() == 3


def pytest_configure(config):
    if os.environ.get("TRITON_INTERPRET") == "1" and not _interpreter_loops_over_tensor_bounds():
        import numpy
        import triton

        pytest.exit(f"Triton {triton.__version__}'s interpreter cannot run hetrain's row kernels with NumPy "
                    f"{numpy.__version__}, so every Triton test would fail. Fix: pip install 'numpy<2.4', or a newer "
                    "triton (3.9 works); or run the GPU tests alone: TRITON_INTERPRET=0 pytest -m cuda", returncode=4)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none visible)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
