"""Stage-by-stage torch.compile (hetrain.regional_compile): the settings a run offers compile whole, and the counts
the run summary reports are the run's own."""

import pytest
import torch
from torch._dynamo.utils import counters

from hetrain.models.bert import BertClassifier
from hetrain.regional_compile import compile_counts, compile_stages


def _train_steps(model: torch.nn.Module, shapes: list[tuple[int, int]]) -> None:
    for rows, length in shapes:
        ids = torch.randint(1, 50, (rows, length), generator=torch.Generator().manual_seed(rows))
        model(ids, torch.ones(rows, length, dtype=torch.bool)).sum().backward()


@pytest.mark.parametrize("dynamic", [None, True])
def test_the_encoder_stages_compile_whole_dynamic_or_not(dynamic):
    """compile.dynamic=true made eps a symbolic float, which the ops' eps check (math.isfinite) could not trace: a graph
    break in every block, and with compile.fullgraph=true a failed run."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = BertClassifier(vocab_size=50, num_classes=3, hidden=32, layers=2, heads=2, dropout=0.0,
                           sparse_embeddings=True)
    before = compile_counts()
    compile_stages(model.stages(), backend="aot_eager", fullgraph=True, dynamic=dynamic)
    _train_steps(model, [(4, 16), (6, 20), (5, 9)])
    counts = compile_counts(since=before)
    assert counts["graph_breaks"] == 0 and counts["graphs"] >= 2, counts


def test_counts_since_leave_out_what_was_compiled_before():
    """A sweep's later job reported the graphs of every job before it in the same process."""
    counters.clear()
    counters["stats"]["unique_graphs"] += 5
    counters["graph_break"]["an earlier job's break"] += 2
    before = compile_counts()
    counters["stats"]["unique_graphs"] += 3
    assert compile_counts(since=before) == {"graphs": 3, "graph_breaks": 0}
    assert compile_counts()["graphs"] >= 8
