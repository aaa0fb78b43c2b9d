"""The loader benchmark runs end to end in a small size and reports what the targets are judged on."""

import hetrain
from benchmarks.bench_loader import run


def test_bench_loader_small_run_reports_throughput_padding_and_the_training_loop():
    saved = []  # what a run cut short after each section would have left on disk
    result = run(docs=300, max_len=64, max_tokens=512, workers=(0,), loop_steps=20, work_ms=1.0, text_samples=40,
                 save=lambda r: saved.append({k: r[k] for k in ("rows", "loop", "python_dataset")}))
    assert [(s["loop"] is None, s["python_dataset"] is None) for s in saved] == [(True, True), (False, True),
                                                                                 (False, False)]
    assert all(s["rows"] == result["rows"] for s in saved) and result["hetrain"] == hetrain.__version__
    assert {"ring", "dataloader_w0"} <= set(result["rows"]) and result["speedup_vs_best_dataloader"] > 0
    assert result["rows"]["ring"]["allocs_per_batch"] == 0  # slots are reused: nothing allocated per batch
    assert 0 <= result["padding"]["token_budget"] < result["padding"]["fixed_size"]
    loop = result["loop"]
    assert set(loop["rows"]) == {"compute_only", "ring", "dataloader_w0"}
    assert loop["rows"]["compute_only"]["data_wait"] == 0
    for name, row in loop["rows"].items():  # raw: a loader's can be below 0 by noise
        assert row["steps_s"] > 0 and row["data_wait"] < 1, (name, row)
    assert loop["rows"]["ring"]["samples_s"] > 0 and ("h2d_gb_s" in loop) == (loop["device"] == "cuda")
    text = result["python_dataset"]
    assert [k.rstrip("0123456789") for k in text["rows"]] == ["ring_threads_", "ring_readers_", "dataloader_w"]
    tokens_per_batch = {round(v["tokens_s"] / v["batches_s"], 6) for v in text["rows"].values()}
    assert len(tokens_per_batch) == 1 and tokens_per_batch.pop() > 0  # the same batches from every loader
