"""The ring buffer's gather: one epoch of token-budget batches assembled from a token file into slots.

hetrain's C++ producers read each window from the file (pread) and write ids, mask, lengths and sample
ids straight into a preallocated slot; the baselines gather the same batches with torch ops from the
token array already in memory (eager, and the same function under torch.compile with dynamic shapes).
Each implementation builds every batch of the plan once per call.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from benchmarks.cases import Case
from hetrain.data.ring import RingLoader
from hetrain.data.sampler import TokenBudgetBatchSampler
from hetrain.data.tokens import write_token_file
from hetrain.data.windows import TokenWindows


def gather_batch(tokens: torch.Tensor, starts: torch.Tensor, lengths: torch.Tensor, ids: torch.Tensor,
                 width: int, pad_id: int = 0) -> dict[str, torch.Tensor]:
    """The slot's fields for one batch of rows ``width`` tokens wide, from a flat token tensor, in torch ops."""
    cols = torch.arange(width)
    mask = cols < lengths[:, None]  # (B, T)
    index = (starts[:, None] + cols).clamp_max(tokens.numel() - 1)
    input_ids = torch.where(mask, tokens[index].long(), pad_id)
    return {"input_ids": input_ids, "attention_mask": mask, "lengths": lengths, "sample_ids": ids}


def _make(windows: TokenWindows, max_tokens: int, workers: int):
    def make():
        sampler = TokenBudgetBatchSampler(windows.lengths, max_tokens, seed=0)
        plan = [torch.as_tensor(b, dtype=torch.int64) for b in sampler]
        widths = [int(windows.lengths[b].max()) for b in plan]  # host-side, so the compiled graph never breaks
        tokens = torch.from_numpy(np.asarray(windows.file.tokens).astype(np.int32))
        starts = torch.from_numpy(windows.windows.start.astype(np.int64))
        lengths = torch.from_numpy(windows.lengths.astype(np.int64))
        compiled = torch.compile(gather_batch, dynamic=True)
        loader = RingLoader(windows, sampler, num_slots=4, num_workers=workers)

        def torch_epoch(fn):
            return lambda: [fn(tokens, starts[b], lengths[b], b, w) for b, w in zip(plan, widths, strict=True)]

        def ring_epoch():
            for batch in loader:
                del batch  # a consumer that moves on frees the slot

        return {"eager": torch_epoch(gather_batch), "compile": torch_epoch(compiled), "hetrain": ring_epoch}

    return make


def cpu_cases() -> list[Case]:
    docs, max_len, max_tokens = 2000, 512, 8192
    rng = np.random.default_rng(0)
    lengths = np.minimum(rng.zipf(1.3, docs) * 40, 4000)
    tmp = Path(tempfile.mkdtemp(prefix="hetrain-bench-"))
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)
    prefix = write_token_file(tmp / "corpus", [rng.integers(3, 30000, n) for n in lengths], itemsize=2)
    windows = TokenWindows(prefix, max_len=max_len, stride=max_len)
    batches = list(TokenBudgetBatchSampler(windows.lengths, max_tokens, seed=0))
    padded = sum(len(b) * int(windows.lengths[b].max()) for b in batches)
    # Each window's tokens read once (uint16); ids (int64) and mask (bool) written per padded position.
    moved = int(windows.lengths.sum()) * 2 + padded * 9
    return [Case("ring_gather", f"{len(batches)} batches <= {max_tokens} tokens, windows of {max_len}", "uint16",
                 _make(windows, max_tokens, workers=torch.get_num_threads()), moved)]
