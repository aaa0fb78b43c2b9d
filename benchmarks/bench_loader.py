"""Batch assembly from a token file: RingLoader against torch's DataLoader, and padding of batching schemes.

Run: ``make bench-loader`` (or ``python -m benchmarks.bench_loader``; ``--docs`` sets the corpus size).
Both loaders use the same TokenBudgetBatchSampler and produce the same batches (RingLoader gathers in
C++; the DataLoader uses ``token_collate``); the DataLoader is timed with num_workers 0, 2 and 4 and its
best is reported; the loaders' epochs take turns over rounds, and each reports its median. The consumer
does nothing, so the figures are assembly throughput alone. Host allocations per batch are counted with
torch's profiler (in-process loaders only). Padding compares token-budget batches with fixed-size random
batches of the same mean row count on Zipf-like lengths.
A training-loop section feeds a loop with fixed compute per step (on ``--device``: the GPU when there is one,
``cuda:N`` that GPU) from each loader and from nothing: the data wait is one minus the ratio of their step rates;
on CUDA it also times host-to-device copies from pageable and pinned memory. A last section reads a Dataset that
tokenizes text in Python (GIL-bound) with RingLoader threads, RingLoader reader processes and DataLoader workers.
Writes ``benchmarks/results/<date>-loader-<card>.json`` (``<card>``: the device's GPU's name, or ``cpu``); a run
with flags other than the defaults names its file after them too (``-text-samples0``, ``-workers0-2``), so it
never overwrites the day's full run. Until the run completes its result is kept in ``<name>.partial.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

import hetrain
from benchmarks.cli import (
    check_device,
    make_current,
    non_negative_int,
    out_dir,
    positive_float,
    positive_int,
    result_file,
    save_complete,
    save_partial,
)
from hetrain.data.prefetch import DevicePrefetcher
from hetrain.data.ring import PadInto, RingLoader
from hetrain.data.sampler import TokenBudgetBatchSampler
from hetrain.data.synthetic import pad_collate
from hetrain.data.tokens import write_token_file
from hetrain.data.windows import TokenWindows, token_collate
from hetrain.device_info import host_description, result_card

RESULTS = Path(__file__).parent / "results"


def zipf_lengths(n: int, max_len: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.minimum(rng.zipf(1.5, n) * 16, 4 * max_len)


def real_tokens(batch: dict[str, torch.Tensor]) -> int:
    return int(batch["lengths"].sum() if "lengths" in batch else batch["attention_mask"].sum())


def epoch_time(loader: Iterable[dict[str, torch.Tensor]]) -> tuple[int, int, float]:
    """(batches, real tokens, seconds) of one pass over ``loader``."""
    t0, batches, tokens = time.perf_counter(), 0, 0
    for batch in loader:
        batches += 1
        tokens += real_tokens(batch)
    return batches, tokens, time.perf_counter() - t0


def epoch_rate(loader, epochs: int = 2) -> tuple[float, float]:
    """(batches/s, real tokens/s) of the last of ``epochs`` passes (the first warms up workers and caches)."""
    for _ in range(epochs):
        batches, tokens, seconds = epoch_time(loader)
    return batches / seconds, tokens / seconds


def interleaved_epoch_rates(loaders: dict[str, Iterable[dict[str, torch.Tensor]]],
                            rounds: int) -> dict[str, tuple[float, float]]:
    """(batches/s, real tokens/s) of each loader at the median of its ``rounds`` timed epochs, the loaders taking
    turns epoch by epoch after an untimed one each (it starts workers and warms caches): a shared machine's slow
    spell then hits every loader alike instead of the one whose epochs it fell on."""
    for loader in loaders.values():
        epoch_time(loader)
    epochs: dict[str, list[tuple[int, int, float]]] = {name: [] for name in loaders}
    for _ in range(rounds):
        for name, loader in loaders.items():
            epochs[name].append(epoch_time(loader))
    rates = {}
    for name, runs in epochs.items():
        batches, tokens, _ = runs[0]  # the sampler gives the same batches every epoch
        seconds = statistics.median(s for _, _, s in runs)
        rates[name] = (batches / seconds, tokens / seconds)
    return rates


def allocations_per_batch(loader) -> float:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        n = sum(1 for _ in loader)
    # Ops that allocated host memory and none of whose children did: one event per tensor allocation.
    allocs = sum(1 for e in prof.events()
                 if e.cpu_memory_usage > 0 and not any(c.cpu_memory_usage > 0 for c in e.cpu_children))
    return allocs / n


def padding(lengths: np.ndarray, max_tokens: int) -> dict:
    sampler = TokenBudgetBatchSampler(lengths, max_tokens, seed=0)
    rows = max(1, round(len(lengths) / sampler.num_global_batches))
    perm = np.random.default_rng(0).permutation(len(lengths))
    fixed = [lengths[perm[i : i + rows]] for i in range(0, len(perm), rows)]
    fixed_padded = sum(len(b) * int(b.max()) for b in fixed)
    return {"token_budget": sampler.padding_fraction, "fixed_size": 1 - lengths.sum() / fixed_padded,
            "fixed_batch_size": rows}


class TextOnTheFly(torch.utils.data.Dataset):
    """Documents tokenized in ``__getitem__`` by a Python WordPiece tokenizer: GIL-bound work per sample.

    Each word is lower-cased, stripped of punctuation and split greedily into the longest pieces found in
    the vocabulary, as on-the-fly preprocessing of raw text does. A document is the same for a given index,
    so every loader sees the same samples.
    """

    WORDS = [f"Word{k}," if k % 7 == 0 else f"item{k * 37 % 100003}" for k in range(5000)]
    PIECES = ["word", "item", *"abcdefghijklmnopqrstuvwxyz0123456789", *(f"##{c}" for c in "0123456789"),
              *(f"##{k}" for k in range(10, 100))]

    def __init__(self, n: int, max_words: int, seed: int = 0) -> None:
        self.n, self.max_words, self.seed = n, max_words, seed
        self.vocab = {piece: i + 3 for i, piece in enumerate(self.PIECES)}

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng((self.seed, index))
        text = " ".join(self.WORDS[k] for k in rng.integers(0, len(self.WORDS), 1 + index % self.max_words))
        ids = []
        for word in text.split():
            ids.extend(self._pieces(word.lower().strip(".,;")))
        return {"input_ids": torch.tensor(ids), "label": torch.tensor(index % 2)}

    def _pieces(self, word: str) -> list[int]:
        """Greedy longest-match-first split into vocabulary pieces (``##`` marks a continuation)."""
        out, start = [], 0
        while start < len(word):
            for end in range(len(word), start, -1):
                piece = word[start:end] if start == 0 else "##" + word[start:end]
                if piece in self.vocab:
                    out.append(self.vocab[piece])
                    start = end
                    break
            else:
                out.append(2)  # unknown character
                start += 1
        return out

    def length(self, index: int) -> int:
        return len(self[index]["input_ids"])


def python_dataset(samples: int, max_words: int, workers: int, max_tokens: int) -> dict:
    """A Python-heavy Dataset: RingLoader reading in threads, in reader processes, and the DataLoader's workers.

    The same token-budget batches from each; threads share the GIL, processes do not.
    """
    ds = TextOnTheFly(samples, max_words)
    sampler = TokenBudgetBatchSampler([ds.length(i) for i in range(len(ds))], max_tokens, seed=0)
    collate = PadInto(max_tokens, sampler.max_batch_rows)
    rows = {}
    for name, readers in ((f"ring_threads_{workers}", 0), (f"ring_readers_{workers}", workers)):
        with RingLoader(ds, sampler, collate=collate, num_workers=workers, reader_processes=readers) as ring:
            rows[name] = epoch_rate(ring)
    dl = DataLoader(ds, batch_sampler=sampler, collate_fn=pad_collate, num_workers=workers,
                    persistent_workers=True)
    rows[f"dataloader_w{workers}"] = epoch_rate(dl)
    del dl
    result = {"samples": samples, "max_words": max_words, "batches_per_epoch": len(sampler),
              "rows": {k: {"batches_s": b, "tokens_s": t} for k, (b, t) in rows.items()}}
    for k, v in result["rows"].items():
        print(f"text {k:16s} {v['batches_s']:9.1f} batches/s {v['tokens_s'] / 1e6:8.2f} Mtok/s")
    return result


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# Matrix side of the fixed work. On a GPU each matmul must be long next to its launch (a 4096^3 float32
# matmul takes milliseconds, its launch microseconds), so the host runs ahead of the GPU as in a real step;
# with small matmuls the step would be all kernel launches, and any host time of the loader would show
# as data wait. On the CPU the matmuls run on the host anyway.
WORK_SIDE = {"cuda": 4096, "cpu": 512}
LOOP_ROUNDS = 5  # of the training-loop section, each loader's share of its steps taking turns
ASSEMBLY_ROUNDS = 3  # of the assembly section, each loader's timed epochs taking turns: the median leaves one out


def fixed_work(device: torch.device, target_ms: float) -> Callable[[], torch.Tensor]:
    """A step's compute that does not depend on the data: square matmuls, calibrated to about ``target_ms``."""
    side = WORK_SIDE.get(device.type, 512)
    a = torch.randn(side, side, device=device) / side**0.5

    def run(k: int) -> torch.Tensor:
        y = a
        for _ in range(k):
            y = torch.tanh(y @ a)
        return y

    run(2)
    _sync(device)
    t0 = time.perf_counter()
    run(10)
    _sync(device)
    per = (time.perf_counter() - t0) / 10
    k = max(1, round(target_ms / 1e3 / per))
    return lambda: run(k)


def loop_rate(batches: Iterator, work: Callable[[], torch.Tensor], device: torch.device,
              steps: int) -> tuple[float, float]:
    """(steps/s, samples/s) of ``steps`` training-like steps: fixed work plus a use of each batch on ``device``."""
    it = batches
    total = torch.zeros((), device=device)
    for _ in range(2):  # warm up the pipeline
        next(it)
    _sync(device)
    t0, samples = time.perf_counter(), 0
    for _ in range(steps):
        batch = next(it)
        ids = batch["input_ids"].to(device, non_blocking=True)
        total += work().sum() * 0 + ids.sum()
        samples += ids.shape[0]
    _sync(device)
    elapsed = time.perf_counter() - t0
    return steps / elapsed, samples / elapsed


def cycle(loader):
    while True:
        yield from loader


def h2d_bandwidth(nbytes: int, device: torch.device) -> dict:
    """Host-to-device GB/s of an ``nbytes`` copy from pageable and from pinned memory (CUDA only)."""
    out = {}
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    for kind, pinned in (("pageable", False), ("pinned", True)):
        src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned).fill_(1)
        dst.copy_(src, non_blocking=True)
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(10):
            dst.copy_(src, non_blocking=True)
        _sync(device)
        out[kind] = 10 * nbytes / (time.perf_counter() - t0) / 1e9
    return out


def training_loop(ds: TokenWindows, sampler: TokenBudgetBatchSampler, device: torch.device, workers: int,
                  steps: int, work_ms: float) -> dict:
    """Data wait as a share of step time: a loop with fixed work per step fed by each loader vs fed by nothing.

    On CUDA the ring's batches go through ``DevicePrefetcher`` (side-stream copies from pinned slots) and the
    DataLoader's through ``pin_memory=True`` + ``non_blocking`` copies, as a user would write it.
    """
    work = fixed_work(device, work_ms)
    per_round = max(1, steps // LOOP_ROUNDS)  # each source's steps per round: the result records what was timed
    # The baseline's batch already sits on the device: a host batch would be copied from pageable memory every
    # step, which makes the host wait for the GPU and slows the very loop the others are measured against.
    one = {k: v.to(device) for k, v in next(iter(DataLoader(ds, batch_sampler=sampler,
                                                             collate_fn=token_collate))).items()}
    pin = device.type == "cuda"
    rates: dict[str, list[tuple[float, float]]] = {}
    with RingLoader(ds, sampler, num_workers=max(1, workers), pin_memory=pin) as ring:
        dl = DataLoader(ds, batch_sampler=sampler, collate_fn=token_collate, num_workers=workers, pin_memory=pin,
                        persistent_workers=workers > 0)
        sources = {"compute_only": cycle([one]), "ring": cycle(DevicePrefetcher(ring, device) if pin else ring),
                   f"dataloader_w{workers}": cycle(dl)}
        for _ in range(LOOP_ROUNDS):  # interleaved rounds, medians: a shared machine's slow spells hit every row alike
            for name, source in sources.items():
                rates.setdefault(name, []).append(loop_rate(source, work, device, per_round))
        del sources, dl
    compute_only = statistics.median(r for r, _ in rates["compute_only"])
    rows = {name: {"steps_s": statistics.median(r for r, _ in runs),
                   "samples_s": None if name == "compute_only" else statistics.median(s for _, s in runs)}
            for name, runs in rates.items()}
    for row in rows.values():  # raw: below 0 where a loader's loop ran faster than compute alone (noise)
        row["data_wait"] = 1 - row["steps_s"] / compute_only
    result = {"device": str(device), "work_ms": work_ms, "work_matmul_side": WORK_SIDE.get(device.type, 512),
              "steps": per_round * LOOP_ROUNDS, "rows": rows}
    if device.type == "cuda":
        result["h2d_gb_s"] = h2d_bandwidth(64 << 20, device)  # 64 MiB: large enough that latency does not count
    for name, row in rows.items():
        samples_s = "" if row["samples_s"] is None else f" {row['samples_s']:9.1f} samples/s"
        print(f"loop {name:16s} {row['steps_s']:8.1f} steps/s{samples_s}  {data_wait_text(row['data_wait'])}")
    return result


def data_wait_text(wait: float) -> str:
    """A loop's data wait as measured; a negative one (faster than compute alone) is marked as the noise it is."""
    note = " (negative: faster than compute alone, within noise)" if wait < 0 else ""
    return f"data wait {wait:.1%}{note}"


def run(docs: int, max_len: int, max_tokens: int, workers: tuple[int, ...], loop_steps: int = 0,
        work_ms: float = 5.0, text_samples: int = 0, device: str | None = None,
        save: Callable[[dict], None] = lambda result: None) -> dict:
    """Every section's figures; ``save`` gets the result after each section, so a run cut short (a time cap on a
    lent GPU) keeps the sections it finished. ``device``: the training loop's, and where the loaders' batches go
    (pinned for a GPU); by default the GPU when there is one."""
    loop_device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    pin = loop_device.type == "cuda"
    cores = len(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory() as tmp:
        rng = np.random.default_rng(1)
        tf = write_token_file(Path(tmp) / "corpus", (rng.integers(3, 32000, n) for n in zipf_lengths(docs, max_len)))
        ds = TokenWindows(tf, max_len=max_len)
        sampler = TokenBudgetBatchSampler(ds.lengths, max_tokens, seed=0)
        with RingLoader(ds, sampler, num_workers=cores, num_slots=4, pin_memory=pin) as ring:
            loaders = {"ring": ring, **{
                f"dataloader_w{w}": DataLoader(ds, batch_sampler=sampler, collate_fn=token_collate, num_workers=w,
                                               pin_memory=pin, persistent_workers=w > 0) for w in workers}}
            rates = interleaved_epoch_rates(loaders, ASSEMBLY_ROUNDS)
            # Counted in-process only: a worker's allocations are not in this process's profile.
            allocs = {name: allocations_per_batch(loader) if name in ("ring", "dataloader_w0") else None
                      for name, loader in loaders.items()}
            ring_bytes = ring.nbytes
            del loaders  # stops the DataLoaders' persistent workers before the next section
        rows = {name: (*rates[name], allocs[name]) for name in rates}
        best = max((k for k in rows if k.startswith("dataloader")), key=lambda k: rows[k][0])
        result = {
            "date": dt.date.today().isoformat(),
            "device": host_description(cores, "cores"),
            "torch": torch.__version__, "hetrain": hetrain.__version__,
            "corpus": {"docs": docs, "tokens": tf.num_tokens, "windows": len(ds)},
            "max_len": max_len, "max_tokens": max_tokens, "batches_per_epoch": len(sampler),
            "assembly_rounds": ASSEMBLY_ROUNDS, "ring_bytes": ring_bytes,
            "rows": {k: {"batches_s": v[0], "tokens_s": v[1], "allocs_per_batch": v[2]} for k, v in rows.items()},
            "best_dataloader": best, "speedup_vs_best_dataloader": rows["ring"][0] / rows[best][0],
            "padding": padding(ds.lengths, max_tokens), "loop": None, "python_dataset": None,
        }
        save(result)
        if loop_steps:
            result["loop"] = training_loop(ds, sampler, loop_device, int(best.removeprefix("dataloader_w")),
                                           loop_steps, work_ms)
            save(result)
    if text_samples:
        result["python_dataset"] = python_dataset(text_samples, 400, cores, max_tokens)
        save(result)
    for k, v in result["rows"].items():
        allocs = "-" if v["allocs_per_batch"] is None else f"{v['allocs_per_batch']:.1f}"
        print(f"{k:16s} {v['batches_s']:9.1f} batches/s {v['tokens_s'] / 1e6:8.2f} Mtok/s  allocs/batch {allocs}")
    pad = result["padding"]
    print(f"ring vs best DataLoader ({best}): {result['speedup_vs_best_dataloader']:.2f}x; padding token-budget "
          f"{pad['token_budget']:.1%} vs fixed batch size {pad['fixed_batch_size']}: {pad['fixed_size']:.1%}")
    return result


def variant_parts(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[str]:
    """The flags this run changed from their defaults, each with its value ("text-samples0", "workers0-2"): a run
    with a section left out or other sizes names its file after them."""
    parts = []
    for dest, value in vars(args).items():  # the device is named by its card already
        if dest not in ("out", "device") and value != parser.get_default(dest):
            shown = "-".join(map(str, value)) if isinstance(value, list) else str(value).removesuffix(".0")
            parts.append(dest.replace("_", "-") + shown)
    return parts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=positive_int, default=3000, help="documents in the synthetic corpus")
    parser.add_argument("--max-len", type=positive_int, default=512, help="window length")
    parser.add_argument("--max-tokens", type=positive_int, default=8192, help="token budget per batch")
    parser.add_argument("--workers", type=non_negative_int, nargs="+", default=[0, 2, 4],
                        help="DataLoader num_workers to try")
    parser.add_argument("--loop-steps", type=non_negative_int, default=200,
                        help=f"steps of the training-loop section, in {LOOP_ROUNDS} interleaved rounds; 0 skips it")
    parser.add_argument("--work-ms", type=positive_float, default=5.0, help="fixed compute per loop step, in ms")
    parser.add_argument("--text-samples", type=non_negative_int, default=3000,
                        help="documents of the Python-heavy dataset section (threads vs processes); 0 skips it")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="the training loop's device (cpu, cuda or cuda:N), where batches are copied to")
    parser.add_argument("--out", type=out_dir, default=str(RESULTS), help="results directory")
    args = parser.parse_args()
    device = check_device(parser, args.device)
    make_current(device)
    if args.max_tokens < args.max_len:
        parser.error(f"--max-tokens {args.max_tokens}: below --max-len {args.max_len}, so a full window fits in no "
                     f"batch; pass --max-tokens of at least {args.max_len} or a smaller --max-len")
    if 0 < args.loop_steps < LOOP_ROUNDS:
        parser.error(f"--loop-steps: 0 skips the loop, else at least {LOOP_ROUNDS} (a step per round); "
                     f"got {args.loop_steps}")
    path = result_file(args.out, dt.date.today().isoformat(), "loader", result_card(device),
                       *variant_parts(parser, args))

    def save(result: dict) -> None:  # after every section, as <name>.partial.json: a run cut short keeps them
        save_partial(path, result)

    result = run(args.docs, args.max_len, args.max_tokens, tuple(args.workers), args.loop_steps, args.work_ms,
                 args.text_samples, device, save)
    save_complete(path, result)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
