"""DevicePrefetcher: a pass-through on the CPU; on CUDA, batches arrive on the device in order and intact."""

from __future__ import annotations

import pytest
import torch

from hetrain.data.prefetch import DevicePrefetcher
from hetrain.data.ring import PadInto, RingLoader
from hetrain.data.sampler import TokenBudgetBatchSampler
from hetrain.data.synthetic import SyntheticSequences, pad_collate


def batches(n: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [{"x": torch.randn(3, 5, generator=g), "pair": (torch.arange(i + 1), [torch.tensor(i)])} for i in range(n)]


def test_cpu_passes_batches_through_and_counts_consumed():
    src = batches(4)
    pre = DevicePrefetcher(src, "cpu", lookahead=1)
    assert not pre.active and len(pre) == 4
    out = []
    for batch in pre:
        out.append(batch)
        assert pre.consumed() == len(out) - 1
    assert all(a is b for a, b in zip(out, src, strict=True))
    assert pre.consumed() == 4


@pytest.mark.cuda
def test_cuda_batches_arrive_on_the_device_intact_from_pinned_ring_slots():
    ds = SyntheticSequences(200, min_len=4, max_len=40, seed=1)
    lengths = [len(ds[i]["input_ids"]) for i in range(len(ds))]
    sampler = TokenBudgetBatchSampler(lengths, 256, seed=2)
    plan = list(sampler)
    with RingLoader(ds, sampler, collate=PadInto(256, sampler.max_batch_rows), num_slots=3) as loader:
        assert loader.pinned_bytes == loader.nbytes > 0
        pre = DevicePrefetcher(loader, "cuda")
        for epoch in range(3):
            sampler.set_epoch(epoch)
            plan = list(sampler)
            for batch, idx in zip(pre, plan, strict=True):
                want = pad_collate([ds[i] for i in idx])
                torch.cuda.current_stream().synchronize()
                for k, v in want.items():
                    assert batch[k].is_cuda and torch.equal(batch[k].cpu(), v), k
                # Fixed GPU work per step, so copies overlap compute.
                torch.cuda._sleep(100_000)
        assert loader.pinned_bytes == loader.nbytes  # never more pinned memory, whatever the epochs
    nested = DevicePrefetcher(batches(3), "cuda")
    for got, want in zip(nested, batches(3), strict=True):
        assert torch.equal(got["pair"][0].cpu(), want["pair"][0]) and got["pair"][1][0].is_cuda
