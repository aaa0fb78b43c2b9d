"""bench_ops and bench_train check --out before they run, as the other benchmark scripts do (benchmarks.cli.out_dir).

With ``type=Path`` a file given as --out ended in a traceback from mkdir; had the directory been unwritable, the
run would have failed only when it saved its first result, after minutes on a GPU lent for a few.
"""

from __future__ import annotations

import sys

import pytest

from benchmarks import bench_ops, bench_train


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
