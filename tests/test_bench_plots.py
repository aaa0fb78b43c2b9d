"""The benchmark charts: speedups computed from recorded times, and a PNG written for RESULTS.md."""

import pytest

from benchmarks.plots import speedup_chart, speedups

RESULT = {"rows": [
    {"op": "layer_norm", "shape": "8x64", "dtype": "float32",
     "ms": {"eager": 2.0, "compile": 1.0, "hetrain": 0.5},
     "graph_ms": {"eager": 0.4, "compile": "n/a", "hetrain": 0.2}},
    {"op": "conv_bn_relu_pool", "shape": "stem", "dtype": "bfloat16",
     "ms": {"eager": 3.0, "compile": 6.0, "liger": 1.5, "hetrain": 3.0, "conv": 2.0},
     "graph_ms": {"eager": 1.0, "compile": 1.0, "hetrain": 2.0}},
]}


def test_speedups_are_baseline_over_hetrain_and_none_where_a_time_is_missing():
    labels, series = speedups(RESULT)
    assert labels == ["layer_norm 8x64 float32", "conv_bn_relu_pool stem bfloat16"]
    assert series == {"eager": [4.0, 1.0], "compile": [2.0, 2.0], "liger": [None, 0.5]}  # conv is not a baseline
    _, graph = speedups(RESULT, "graph_ms")
    assert graph == {"eager": [2.0, 0.5], "compile": [None, 0.5]}


def test_chart_is_written_with_a_panel_per_timing(tmp_path):
    pytest.importorskip("matplotlib")
    path = speedup_chart(RESULT, tmp_path / "chart.png", "test", {"ms": "per call", "graph_ms": "GPU time"})
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
    assert speedup_chart({"rows": []}, tmp_path / "none.png", "empty") is None  # nothing measured, no file
    assert not (tmp_path / "none.png").exists()
