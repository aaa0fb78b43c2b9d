"""Training-step benchmark of a BERT-base-like encoder: precision modes, fused ops vs torch modules, pipeline split.

Run: ``python -m benchmarks.bench_train [--quick] [--device cpu|cuda|cuda:N] [--out DIR]``. A placement section
sets HEFT's plan beside the chain optimum, all-on-the-fastest-device and round-robin over this machine's
devices, each predicted by the measured cost model and then measured, and the pipeline's bubble. Writes
``benchmarks/results/<date>-<card>-train.json`` (``<card>``: the GPU's name, or ``cpu``; a variant run:
``-train-quick``, ``-train-short``, ``-system-malloc``; ``.partial.json`` until the run completes) and prints
one line per mode. The target: hetrain's
bf16 recipe with its fused ops and no torch.compile at least as fast as plain torch in bf16 + torch.compile.
The loop is plain PyTorch (forward, cross-entropy, backward, AdamW) so that only the model differs. A mode that
raises is recorded with its error while the others run on; the run then exits with status 1 naming it, its
result written as ``<name>-failed.json``, never over the day's complete file.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import gc
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

import hetrain
from benchmarks.cli import (
    check_backend_settings,
    check_device,
    make_current,
    out_dir,
    result_file,
    save_complete,
    save_partial,
)
from benchmarks.timing import Devices, cuda_generator_restored_on_error, median_ms
from hetrain import _ext, cpu_memory, plugins
from hetrain.callbacks.placement import StagePlacement
from hetrain.device_info import device_name, host_description, result_card
from hetrain.models.bert import BertClassifier
from hetrain.placement import CostModel, available_devices
from hetrain.placement import measure as cost_model
from hetrain.placement.pipeline import micro_batch_count

RESULTS = Path(__file__).parent / "results"
BASELINE = ("bf16-compile", False)  # plain torch modules in bf16 under torch.compile: the bar to meet
# The target's two rows, by the names the closing verdict gives them: hetrain's recipe, and the bar it is to meet.
TARGET = {"fused bf16": ("bf16-mixed", True), "bf16 + torch.compile": BASELINE}


@dataclass(frozen=True)
class Shape:
    """Model and batch size of one benchmark run."""

    vocab_size: int
    hidden: int
    layers: int
    heads: int
    seq: int
    batch: int
    num_classes: int = 2
    dropout: float = 0.1
    attention_dropout: float | None = None  # None: dropout


FULL = Shape(vocab_size=30522, hidden=768, layers=12, heads=12, seq=128, batch=32)  # BERT-base
QUICK = Shape(vocab_size=256, hidden=64, layers=2, heads=4, seq=32, batch=8)


@dataclass(frozen=True)
class Mode:
    """One precision recipe: autocast dtype, TF32 matmuls, loss scaling, torch.compile."""

    name: str
    autocast: torch.dtype | None = None
    tf32: bool = False
    scaler: bool = False
    compile: bool = False
    cudagraphs: bool = False  # torch.compile(mode="reduce-overhead"): the step's launches replayed from CUDA graphs


MODES = [
    Mode("fp32"),
    Mode("tf32", tf32=True),
    Mode("bf16-mixed", autocast=torch.bfloat16),
    Mode("16-mixed", autocast=torch.float16, scaler=True),
    Mode("bf16-compile", autocast=torch.bfloat16, compile=True),
    Mode("bf16-compile-cudagraphs", autocast=torch.bfloat16, compile=True, cudagraphs=True),
]


def skip_reason(mode: Mode, device: str, light: str | None) -> str | None:
    """Why ``mode`` cannot (or should not) run on ``device``; None when it runs. ``light``: the flag of a run with
    few repeats ("--quick" or "--short"), None for a full run."""
    on_cpu = torch.device(device).type == "cpu"  # "cpu:0" too
    if on_cpu and mode.tf32:
        return "TF32 is a CUDA tensor-core format; on CPU it would be fp32 again"
    if on_cpu and mode.scaler:
        return "16-mixed needs torch.amp.GradScaler on CUDA; CPU autocast runs bf16"
    if on_cpu and mode.cudagraphs:
        return "CUDA graphs need a GPU"
    if on_cpu and mode.compile and light:
        return f"torch.compile's inductor C++ build takes longer than a {light} run on CPU; run without {light}"
    if mode.cudagraphs and light:
        return f"compiling and recording the CUDA graphs takes about a minute; run without {light}"
    return None


def make_batch(shape: Shape, device: str | torch.device, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Random token ids, a padding mask (lengths between seq/2 and seq) and labels, seeded."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, shape.vocab_size, (shape.batch, shape.seq), generator=g)
    lengths = torch.randint(shape.seq // 2, shape.seq + 1, (shape.batch, 1), generator=g)
    mask = torch.arange(shape.seq)[None, :] < lengths
    ids = ids.masked_fill(~mask, 0)
    labels = torch.randint(0, shape.num_classes, (shape.batch,), generator=g)
    return ids.to(device), mask.to(device), labels.to(device)


def build_model(shape: Shape, fused: bool) -> BertClassifier:
    torch.manual_seed(0)
    return BertClassifier(shape.vocab_size, shape.num_classes, shape.hidden, shape.layers, shape.heads,
                          4 * shape.hidden, shape.seq, shape.dropout, fused, shape.attention_dropout)


@contextlib.contextmanager
def tf32(enabled: bool) -> Iterator[None]:
    """TF32 matmuls on for one mode only, restored afterwards."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def train_step(model: torch.nn.Module, mode: Mode, batch: tuple[torch.Tensor, ...],
               device_type: str) -> Callable[[], None]:
    """One optimiser step as a closure: forward under the mode's autocast, cross-entropy, backward, AdamW."""
    # The recipes' optimizer: torch's fused AdamW, which has CPU and CUDA kernels and groups parameters by
    # device, so a CPU + GPU split steps in one call too.
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    scaler = torch.amp.GradScaler(device_type) if mode.scaler else None
    forward = model
    if mode.compile:  # reduce-overhead: what a host-bound step would use (hetrain's dropout ops run between graphs)
        forward = torch.compile(model, mode="reduce-overhead" if mode.cudagraphs else "default")
    ids, mask, labels = batch

    def step() -> None:
        with torch.autocast(device_type, dtype=mode.autocast or torch.float32, enabled=mode.autocast is not None):
            loss = F.cross_entropy(forward(ids, mask).float(), labels)
        opt.zero_grad(set_to_none=True)
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()

    return step


def measure(step: Callable[[], None], device: str, quick: bool) -> tuple[float, float | None]:
    """Median step ms after warmup, and peak allocated MiB on CUDA (None on CPU)."""
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    ms = step_ms(step, device, quick)
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
    return ms, peak


def step_ms(step: Callable[[], None], devices: Devices, quick: bool) -> float:
    """Median step ms after warmup, each step waited for on every one of ``devices`` it runs on."""
    return median_ms(step, device=devices, warmup=2 if quick else 5, min_reps=3 if quick else 20,
                     max_reps=5 if quick else 100, budget_s=0.5 if quick else 5.0)


def _release(device: str) -> None:
    """Frees what a mode left: dynamo's compiled code holds its CUDA graphs' memory pools until reset, and the
    next mode's peak would count them."""
    torch.compiler.reset()
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def pinned_to(kernels: str | None) -> contextlib.AbstractContextManager:
    """Every op that has backend ``kernels`` pinned to it (nothing pinned for None). Pinned, not preferred: a
    preferred backend that raises falls back to the next one with one warning, and the row would time that one
    under this name; pinned, it fails the row."""
    if kernels is None:
        return contextlib.nullcontext()
    return plugins.use_backend(**{op: kernels for op in plugins.ops()
                                  if kernels in {b.name for b in plugins.backends(op)}})


def variants(mode: Mode, device: str) -> list[tuple[bool, str | None]]:
    """(fused, pinned backend) rows of a mode: fused and not; in bf16-mixed on a CUDA build, fused pinned to
    the C++/CUDA kernels too (their autograd is C++, so an eager step launches them at about torch's own cost;
    the default on CUDA is Triton)."""
    rows: list[tuple[bool, str | None]] = [(True, None), (False, None)]
    if mode.name == "bf16-mixed" and torch.device(device).type == "cuda" and _ext.built_with_cuda():
        rows.append((True, "cuda"))
    return rows


def run_modes(shape: Shape, device: str, light: str | None,
              measured: Callable[[dict], None] = lambda row: None) -> list[dict]:
    """Every precision mode, fused and not; ``light``: the flag of a run with few repeats, None for a full run.
    ``measured`` gets each row as it ends."""
    rows = []
    batch = make_batch(shape, device)
    device_type = torch.device(device).type  # autocast's and GradScaler's: "cuda", never "cuda:1"
    few_repeats = light is not None
    for mode in MODES:
        for fused, kernels in variants(mode, device):
            row = {"section": "precision", "mode": mode.name, "fused": fused, "kernels": kernels, "ms": None,
                   "peak_mib": None, "skipped": skip_reason(mode, device, light)}
            if row["skipped"] is None:
                model = build_model(shape, fused).to(device).train()
                try:
                    with tf32(mode.tf32), pinned_to(kernels), cuda_generator_restored_on_error():
                        row["ms"], row["peak_mib"] = measure(train_step(model, mode, batch, device_type), device,
                                                             few_repeats)
                except Exception as exc:  # one mode that fails (a compile error, say) leaves the others' figures
                    row["failed"] = f"{type(exc).__name__}: {exc}"[:500]
                del model
                _release(device)
            rows.append(row)
            print(row_text(row), flush=True)
            measured(row)
    return rows


def pipeline_plan(gpu: str) -> dict[str, str]:
    """Embeddings on the CPU, encoder and classifier on the measured ``gpu`` (with its index: a stage placement
    names one device)."""
    index = torch.device(gpu).index
    on = f"cuda:{torch.cuda.current_device() if index is None else index}"
    return {"embeddings": "cpu", "encoder": on, "classifier": on}


def run_pipeline(shape: Shape, device: str, quick: bool) -> list[dict]:
    """Embeddings on the CPU + encoder/classifier on ``device``'s GPU with and without micro-batches, vs all on
    the GPU."""
    micro = 2 if quick else 4
    on_gpu = torch.device(device).type == "cuda"
    split = pipeline_plan(device) if on_gpu else {}
    cases = [("cpu+cuda", split, micro), ("cpu+cuda", split, 1), ("cuda", {}, 1)]
    rows = []
    bf16 = MODES[2]
    for placement, plan, m in cases:
        row = {"section": "pipeline", "mode": bf16.name, "fused": True, "placement": placement, "micro_batches": m,
               "ms": None, "peak_mib": None, "skipped": None}
        if not on_gpu:
            row["skipped"] = "the pipeline split puts the encoder on a GPU; none in use"
        else:
            model = build_model(shape, fused=True).to(device).train()
            model.micro_batches = m
            StagePlacement(plan).place(model.stages())
            # The ids start where the embeddings live; the hooks move each stage's inputs to its device.
            ids, mask, labels = make_batch(shape, "cpu" if plan else device)
            batch = (ids, mask, labels.to(device))
            row["ms"], row["peak_mib"] = measure(train_step(model, bf16, batch, "cuda"), device, quick)
            del model
            _release(device)
        rows.append(row)
        print(row_text(row), flush=True)
    return rows


def forward_backward(model: torch.nn.Module, batch: tuple[torch.Tensor, ...]) -> Callable[[], None]:
    """Forward, cross-entropy and backward in fp32: what the cost model prices, so the two compare directly."""
    ids, mask, labels = batch

    def step() -> None:
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(ids, mask).float(), labels).backward()

    return step


def candidate_plans(costs: CostModel) -> dict[str, list[str]]:
    """Device per stage for HEFT, the chain optimum, everything on the fastest device, and round-robin."""
    fastest = min(range(len(costs.devices)), key=lambda d: sum(row[d] for row in costs.compute))
    return {
        "heft": [costs.heft_plan().devices[s] for s in costs.stages],
        "chain-dp": [costs.chain_plan().devices[s] for s in costs.stages],
        "fastest-device": [costs.devices[fastest]] * len(costs.stages),
        "round-robin": [costs.devices[i % len(costs.devices)] for i in range(len(costs.stages))],
    }


def run_placement(shape: Shape, quick: bool) -> list[dict]:
    """Each candidate plan over this machine's devices: predicted by the measured cost model, then measured
    (once per distinct plan, so two methods that agree show one measurement, not two draws of its noise).

    Then the chain optimum for the pipeline objective at several micro-batch counts, planned and priced from
    costs measured on one micro-batch: the measured bubble (1 - busiest device's time / step time) against GPipe's
    (p - 1) / (m + p - 1).
    """
    model = build_model(shape, fused=True).train()
    ids, mask, labels = make_batch(shape, "cpu")
    devices = available_devices()
    costs = stage_costs(model, ids, mask, devices, repeats=3 if quick else 10)
    rows = []
    measured: dict[tuple[str, ...], dict] = {}  # plan -> its row: methods that agree share one measurement
    for method, plan in candidate_plans(costs).items():
        if (first := measured.get(tuple(plan))) is None:
            measured[tuple(plan)] = row = _placed_row(model, costs, dict(zip(costs.stages, plan, strict=True)),
                                                      (ids, mask, labels), quick, section="placement", method=method)
        else:
            row = {**first, "method": method, "same_plan_as": first["method"]}
        rows.append(row)
    counts = (1, 2) if quick else (1, 2, 4, 8)
    for m in counts:
        if len(devices) < 2:
            row = {"section": "bubble", "method": "chain-dp pipeline", "micro_batches": m, "skipped":
                   "one device: stages cannot overlap"}
        else:
            # The pipeline objective prices per micro-batch; a few repeats, as placement plan "auto" measures it.
            micro = costs if m == 1 else stage_costs(model, ids, mask, devices, repeats=3, micro_batches=m)
            plan = micro.chain_plan(objective="pipeline", micro_batches=m).devices
            row = _placed_row(model, micro, plan, (ids, mask, labels), quick, section="bubble",
                              method="chain-dp pipeline", micro_batches=m)
        rows.append(row)
    for row in rows:
        print(placement_text(row), flush=True)
    return rows


def stage_costs(model: BertClassifier, ids: torch.Tensor, mask: torch.Tensor, devices: list[str], repeats: int,
                micro_batches: int = 1) -> CostModel:
    """The stages' costs on the batch's first micro-batch (the whole batch for 1), cut as the pipeline split cuts
    it: the pipeline objective takes per-micro-batch costs."""
    pieces = micro_batch_count(len(ids), micro_batches)
    ids, mask = (torch.tensor_split(t, pieces)[0] for t in (ids, mask))
    return cost_model(model.stages(), lambda: ids, devices, lambda name: () if name == "embeddings" else (mask,),
                      warmup=1, repeats=repeats)


def _placed_row(model: BertClassifier, costs: CostModel, plan: dict[str, str], batch: tuple[torch.Tensor, ...],
                quick: bool, section: str, method: str, micro_batches: int = 1) -> dict:
    """``plan`` measured and priced by ``costs``: of the whole batch for the sequential objective, of one
    micro-batch for a bubble row (the pipeline objective)."""
    model.micro_batches = micro_batches
    placed = StagePlacement(plan).place(model.stages())
    stages = list(model.stages())
    ids, mask, labels = batch
    first, last = placed[stages[0]], placed[stages[-1]]
    step = forward_backward(model, (ids.to(first), mask.to(first), labels.to(last)))
    ms = step_ms(step, set(placed.values()), quick)  # cuda:1 and more too, not the current GPU alone
    objective = "pipeline" if section == "bubble" else "sequential"
    predicted = costs.predict({s: str(placed[s]) for s in stages}, objective, micro_batches) * 1e3
    row = {"section": section, "method": method, "micro_batches": micro_batches,
           "plan": {s: str(placed[s]) for s in stages}, "predicted_ms": predicted, "ms": ms,
           "predicted_over_measured": predicted / ms, "skipped": None}
    if section == "bubble":
        busiest = max(sum(costs.compute[i][costs.devices.index(str(placed[s]))] for i, s in enumerate(stages)
                          if str(placed[s]) == device) for device in {str(d) for d in placed.values()})
        p = len(set(placed.values()))
        row["bubble"] = max(0.0, 1.0 - micro_batches * busiest * 1e3 / ms)  # busy for each of m micro-batches
        row["gpipe_bubble"] = (p - 1) / (micro_batches + p - 1)
    model.micro_batches = 1
    return row


def placement_text(row: dict) -> str:
    name = f"{row['method']} m={row['micro_batches']}"
    if row["skipped"]:
        return f"{name:<28} skipped: {row['skipped']}"
    stages = ", ".join(f"{s}@{d}" for s, d in row["plan"].items())
    bubble = f"  bubble {row['bubble']:.2f} (GPipe {row['gpipe_bubble']:.2f})" if "bubble" in row else ""
    same = f"  (the {row['same_plan_as']} plan)" if row.get("same_plan_as") else ""
    return (f"{name:<28} predicted {row['predicted_ms']:8.2f} ms  measured {row['ms']:8.2f} ms  "
            f"({row['predicted_over_measured']:.2f}){bubble}  [{stages}]{same}")


def add_ratios(rows: list[dict]) -> None:
    """Each row's step time over the baseline's (plain bf16 + torch.compile): at most 1.0 meets the target."""
    base = next((r["ms"] for r in rows if (r["mode"], r["fused"]) == BASELINE and r["section"] == "precision"), None)
    for r in rows:
        r["vs_bf16_compile"] = r["ms"] / base if r["ms"] and base else None


def row_name(row: dict) -> str:
    """A precision or pipeline row's mode, with its placement and pinned kernels where it has them."""
    name = row["mode"] + (f" [{row['placement']}, m={row['micro_batches']}]" if row["section"] == "pipeline" else "")
    return name + (" [cuda kernels]" if row.get("kernels") else "")


def row_text(row: dict) -> str:
    name = row_name(row)
    if row["skipped"]:
        return f"{name:<28} fused={row['fused']!s:<5}  skipped: {row['skipped']}"
    if row.get("failed"):
        return f"{name:<28} fused={row['fused']!s:<5}  FAILED: {row['failed']}"
    peak = "n/a" if row["peak_mib"] is None else f"{row['peak_mib']:.0f}"
    ratio = row.get("vs_bf16_compile")
    ratio = "n/a" if ratio is None else f"{ratio:.2f}x"
    return f"{name:<28} fused={row['fused']!s:<5}  {row['ms']:9.2f} ms  peak {peak:>6} MiB  vs bf16+compile {ratio}"


def target_rows(rows: list[dict]) -> dict[str, dict | None]:
    """The target's two precision rows by their names in :data:`TARGET` (fused bf16 on its default kernels, not a
    pinned variant), None where a row is missing."""
    return {name: next((r for r in rows if r["section"] == "precision" and (r["mode"], r["fused"]) == key
                        and not r.get("kernels")), None) for name, key in TARGET.items()}


def target_met(rows: list[dict]) -> bool | None:
    """Whether fused bf16 is no slower than plain bf16 + torch.compile; None where either has no time."""
    fused, base = (None if row is None else row["ms"] for row in target_rows(rows).values())
    return None if fused is None or base is None else fused <= base


def target_verdict(result: dict) -> str:
    """The closing line's verdict: met or not or, where it was not measured, which of the two rows has no time and
    why, as the row records it (failed, skipped), so that a failed mode is never reported as a skipped one."""
    if result["target_met"] is not None:
        return str(result["target_met"])
    unmeasured = [f"{name} {_why_no_time(row)}" for name, row in target_rows(result["rows"]).items()
                  if row is None or row["ms"] is None]
    return f"not measured: {' and '.join(unmeasured)} in this run (see the summary above)"


def _why_no_time(row: dict | None) -> str:
    if row is None:
        return "was not run"
    return "failed" if row.get("failed") else "was skipped"


def failed_rows(rows: list[dict]) -> list[dict]:
    """The rows of modes that raised (those with a ``"failed"`` error)."""
    return [r for r in rows if r.get("failed")]


def exit_if_any_row_failed(rows: list[dict], path: Path) -> None:
    """Exits with status 1 naming each row that failed: the others' results are kept in ``path``, but a check that
    runs the benchmark (hetrain.checks.gpu_check) must still see the failure."""
    failed = failed_rows(rows)
    if failed:
        names = "; ".join(f"{row_name(r)} fused={r['fused']}: {r['failed']}" for r in failed)
        raise SystemExit(f"{len(failed)} of {len(rows)} rows failed ({names}); the others' results are in {path}")


def measured_on(device: str) -> str:
    """The GPU's name, or the CPU's model and the threads the run used."""
    return device_name(device) if torch.device(device).type == "cuda" else host_description()


def triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def run(device: str, quick: bool = False, short: bool = False,
        save: Callable[[dict], None] = lambda result: None, cpu_malloc: str = "keep") -> dict:
    """``quick``: the tiny model, few repeats (a smoke test); ``short``: the full model, few repeats (a GPU
    lent for minutes, where the tiny model would measure nothing but the host). ``save`` gets the result
    after each precision row and each later section, so a run stopped at a time limit keeps what it measured.
    ``cpu_malloc``: the host allocator, as ``python train.py`` takes it (hetrain.cpu_memory; CPU stages allocate
    through it)."""
    with cpu_memory.host_memory(cpu_malloc) as setting:
        return _run(device, quick, short, save, setting.description)


def _run(device: str, quick: bool, short: bool, save: Callable[[dict], None], cpu_malloc: str) -> dict:
    shape = QUICK if quick else FULL
    flag = "--quick" if quick else "--short" if short else None
    few_repeats = flag is not None
    result = {
        "date": dt.date.today().isoformat(), "device": measured_on(device), "device_type": device,
        "torch": torch.__version__, "triton": triton_version(), "hetrain": hetrain.__version__, "quick": quick,
        "short": short, "shape": asdict(shape), "baseline": {"mode": BASELINE[0], "fused": BASELINE[1]},
        "target_met": None, "rows": [], "placement": [], "cpu_malloc": cpu_malloc,
    }
    rows = result["rows"]

    def measured(row: dict) -> None:  # saved row by row: a GPU run's cold compiles can outlast its time limit
        rows.append(row)
        add_ratios(rows)
        save(result)

    run_modes(shape, device, flag, measured)
    result["target_met"] = target_met(rows)
    save(result)
    rows += run_pipeline(shape, device, few_repeats)
    add_ratios(rows)
    save(result)
    result["placement"] = run_placement(shape, few_repeats)
    save(result)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model and few steps, for a smoke test")
    parser.add_argument("--short", action="store_true", help="the full model with few steps")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu, cuda or cuda:N (that GPU)")
    parser.add_argument("--out", type=out_dir, default=str(RESULTS), help="results directory")
    parser.add_argument("--cpu-malloc", choices=["keep", "system"], default="keep",
                        help="host allocator, as python train.py takes it (hetrain.cpu_memory)")
    args = parser.parse_args()
    device = check_device(parser, args.device)
    check_backend_settings(parser, device)
    make_current(device)

    def path_of(result: dict) -> Path:
        light = "quick" if args.quick else "short" if args.short else None
        return result_file(args.out, result["date"], result_card(device), "train", light,
                           "system-malloc" if args.cpu_malloc == "system" else None)

    def save(result: dict) -> None:  # after every row, as <name>.partial.json: a run cut short keeps its rows
        save_partial(path_of(result), result)

    result = run(device, quick=args.quick, short=args.short, save=save, cpu_malloc=args.cpu_malloc)
    path = save_complete(path_of(result), result, failed=bool(failed_rows(result["rows"])))
    print("\nsummary (vs bf16+compile: step time over plain torch bf16 + torch.compile; <= 1.00 meets the target)")
    for row in result["rows"]:
        print(row_text(row))
    print("\nplacement (forward+backward fp32 on this machine's devices; predicted by the measured cost model)")
    for row in result["placement"]:
        print(placement_text(row))
    print(f"target (fused bf16 no slower than bf16 + torch.compile) met: {target_verdict(result)}; wrote {path}")
    exit_if_any_row_failed(result["rows"], path)


if __name__ == "__main__":
    main()
