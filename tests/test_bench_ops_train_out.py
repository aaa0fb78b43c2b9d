"""bench_ops and bench_train check --out before they run, as the other benchmark scripts do (benchmarks.cli.out_dir).

With ``type=Path`` a file given as --out ended in a traceback from mkdir; had the directory been unwritable, the
run would have failed only when it saved its first result, after minutes on a GPU lent for a few.

bench_ops' torch.compile baseline is compiled for each case's own shapes, never as a dynamic-shape graph.
"""

from __future__ import annotations

import functools
import sys

import pytest
import torch

from benchmarks import bench_ops, bench_train
from benchmarks.cases import Case
from benchmarks.cases import layer_norm as layer_norm_cases


def never_runs(*args, **kwargs):
    raise AssertionError("the benchmark ran although its --out should have been refused")


@pytest.mark.parametrize("module", [bench_ops, bench_train])
def test_an_out_that_is_no_directory_is_refused_before_the_run(module, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(module, "run", never_runs)
    afile = tmp_path / "afile"
    afile.write_text("")
    monkeypatch.setattr(sys, "argv", [module.__name__, "--device", "cpu", "--out", str(afile)])
    with pytest.raises(SystemExit) as exit_:
        module.main()
    assert exit_.value.code == 2
    assert f"--out: {afile}: not a writable directory (a file is there)" in capsys.readouterr().err


def test_each_op_case_compiles_its_baseline_for_its_own_static_shapes(monkeypatch):
    # A case module's compiled functions share one code object: without a reset between cases dynamo would
    # mark the second case's sizes dynamic, and its "compile" column would time a slower dynamic graph.
    dynamic = []

    def recording(gm: torch.fx.GraphModule, example_inputs: list) -> object:  # a cheap backend: no C++ build
        dynamic.append(any(isinstance(v, torch.SymInt) for v in example_inputs)
                       or any(isinstance(d, torch.SymInt) for v in example_inputs if isinstance(v, torch.Tensor)
                              for d in v.shape))
        return gm.forward

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=recording))
    cases = [Case("layer_norm", f"8x{hidden}", "float32", layer_norm_cases._make(8, hidden, torch.float32, "cpu"), 1)
             for hidden in (16, 32)]
    monkeypatch.setattr(bench_ops, "discover", lambda *args, **kwargs: cases)
    monkeypatch.setattr(bench_ops, "copy_bandwidth_gbs", lambda *args, **kwargs: 1.0)
    rows = bench_ops.run("cpu", quick=True, measure_s=0.01)["rows"]
    assert all("error" not in row for row in rows), rows
    assert dynamic == [False, False]  # one static graph per case
