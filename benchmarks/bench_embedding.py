"""A CPU stage's token-table step: dense AdamW vs torch's SparseAdam vs hetrain's coalesced lookup + lazy AdamW.

Run: ``make bench-embedding`` (``python -m benchmarks.bench_embedding [--quick] [--out DIR]``). BERT-base's
30522 x 768 table on the CPU, as bert_split places it: lookup, backward from a given upstream gradient
and the optimizer step, for batches of 32 x 128 and 32 x 512 token ids, each way side by side, median
of repeats taking turns. Each way runs twice per round: on torch's CPU allocator and with hetrain's kept
host blocks (``cpu_malloc: keep``, what ``python train.py`` uses; hetrain.cpu_memory), the allocators taking
turns at going first; the result records what each allocator setting was (``allocator_settings``), and a run
where hetrain's kept blocks cannot be applied (hetrain._C missing or stale) is refused: its "keep" column would
time torch's allocator against itself. Writes ``benchmarks/results/<date>-embedding-cpu.json`` (``--quick``:
``-embedding-cpu-quick.json``), kept in ``<name>.partial.json`` until the run completes.
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

import hetrain
from benchmarks.cli import check_backend_settings, out_dir, result_file, save_complete, save_partial
from benchmarks.timing import median_ms
from hetrain import cpu_memory
from hetrain.device_info import host_description
from hetrain.optim import SparseAwareAdamW

RESULTS = Path(__file__).parent / "results"
VOCAB, HIDDEN = 30522, 768
ALLOCATORS = ("system", "keep")


def table_step(kind: str, vocab: int, hidden: int, ids: torch.Tensor) -> Callable[[], None]:
    """One training step of an embedding table updated the ``kind`` way: dense, SparseAdam or hetrain."""
    torch.manual_seed(0)
    table = hetrain.nn.Embedding if kind == "hetrain" else torch.nn.Embedding  # hetrain's: a coalesced gradient
    emb = table(vocab, hidden, padding_idx=0, sparse=kind != "dense")
    if kind == "dense":
        opt: torch.optim.Optimizer = torch.optim.AdamW(emb.parameters(), lr=1e-4, fused=True)
    elif kind == "SparseAdam":
        opt = torch.optim.SparseAdam(emb.parameters(), lr=1e-4)
    else:
        opt = SparseAwareAdamW([{"params": list(emb.parameters()), "sparse": True}], lr=1e-4)
    upstream = torch.randn(*ids.shape, hidden)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        emb(ids).backward(upstream)
        opt.step()

    return step


def allocator_settings() -> dict[str, dict]:
    """What applying each allocator does here: its description and whether it took effect, as a run records it."""
    settings = {}
    for allocator in ALLOCATORS:
        with cpu_memory.host_memory(allocator) as setting:
            settings[allocator] = {"description": setting.description, "applied": setting.applied}
    return settings


def refuse_unapplied_keep(settings: dict[str, dict]) -> None:
    """Exits naming why where hetrain's kept blocks did not take effect: the "keep" column would run on torch's
    allocator, and every ratio would set it against itself."""
    keep = settings["keep"]
    if not keep["applied"]:
        raise SystemExit(f"bench_embedding: hetrain's kept host blocks are not in use here (cpu_malloc keep gave "
                         f"{keep['description']!r}), so the keep column would time torch's allocator against itself; "
                         "fix what that names and run again")


def run(quick: bool, save: Callable[[dict], None] = lambda result: None) -> dict:
    """Each batch's step times on each allocator; ``save`` gets the result after each batch, so a run cut short
    keeps what it measured. Refused before any timing where the kept blocks cannot be applied."""
    vocab, hidden = (2048, 64) if quick else (VOCAB, HIDDEN)
    settings = allocator_settings()
    refuse_unapplied_keep(settings)
    rows: list[dict] = []
    result = {"date": dt.date.today().isoformat(), "device": host_description(), "torch": torch.__version__,
              "hetrain": hetrain.__version__, "table": [vocab, hidden], "quick": quick,
              "allocators": list(ALLOCATORS), "allocator_settings": settings, "rows": rows}
    for seq in (128, 512):
        ids = torch.randint(1, vocab, (32, seq), generator=torch.Generator().manual_seed(seq))
        steps = {kind: table_step(kind, vocab, hidden, ids) for kind in ("dense", "SparseAdam", "hetrain")}
        per_round: dict[tuple[str, str], list[float]] = {(k, a): [] for k in steps for a in ALLOCATORS}
        # Even rounds, each allocator first in half of them: the first one of a round meets a cold cache and heap.
        for i in range(2 if quick else 4):
            for allocator in ALLOCATORS if i % 2 == 0 else ALLOCATORS[::-1]:
                with cpu_memory.host_memory(allocator):
                    for kind, step in steps.items():
                        per_round[kind, allocator].append(median_ms(
                            step, device="cpu", warmup=2 if i == 0 else 1, min_reps=3 if quick else 5, max_reps=20,
                            budget_s=0.25 if quick else 2.25))
        ms = {kind: {a: statistics.median(per_round[kind, a]) for a in ALLOCATORS} for kind in steps}
        rows.append({"ids": [32, seq], "unique_rows": int(ids.unique().numel()), "ms": ms,
                     "dense_over_hetrain": ms["dense"]["keep"] / ms["hetrain"]["keep"],
                     "sparse_adam_over_hetrain": ms["SparseAdam"]["keep"] / ms["hetrain"]["keep"],
                     "system_over_keep": {kind: ms[kind]["system"] / ms[kind]["keep"] for kind in steps}})
        print(f"ids 32x{seq:<4} ({rows[-1]['unique_rows']} rows), ms on torch's allocator / with kept blocks:  "
              + "  ".join(f"{kind} {ms[kind]['system']:6.1f} / {ms[kind]['keep']:6.1f}" for kind in steps), flush=True)
        save(result)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small table, for a smoke test")
    parser.add_argument("--out", type=out_dir, default=str(RESULTS), help="results directory")
    args = parser.parse_args()
    check_backend_settings(parser, "cpu", ops=("sparse_adamw",))  # its only plugin op: the lazy AdamW step
    warnings.filterwarnings("ignore", message="Sparse invariant checks")

    def path_of(result: dict) -> Path:
        return result_file(args.out, result["date"], "embedding-cpu", "quick" if args.quick else None)

    def save(result: dict) -> None:  # after every batch, as <name>.partial.json: a run cut short keeps its rows
        save_partial(path_of(result), result)

    result = run(args.quick, save)
    path = path_of(result)
    save_complete(path, result)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
