"""Stage-by-stage torch.compile (hetrain.regional_compile): the settings a run offers compile whole, and the counts
the run summary reports are the run's own."""

import copy
import functools
import io
import itertools

import pytest
import torch
from torch._dynamo.utils import counters

from hetrain.models.bert import BertClassifier
from hetrain.placement.pipeline import gpipe_forward
from hetrain.placement.plan import hook_inputs
from hetrain.regional_compile import compile_counts, compile_stages


class _Block(torch.nn.Module):
    def __init__(self, width_in: int, width_out: int) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(width_in, width_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.linear(x))


def _stages_of_one_class(widths: tuple[int, ...]) -> dict[str, torch.nn.Module]:
    """Stages of one class at different widths, sharing their forward's code object, as ResNet's stages do."""
    torch.manual_seed(0)
    return {f"s{i}": _Block(a, b) for i, (a, b) in enumerate(itertools.pairwise(widths))}


def _validate_then_train(stages: dict[str, torch.nn.Module], rows: int = 4) -> None:
    """As Lightning runs them: a sanity-check batch without grad, then a training batch."""
    for grad in (False, True):
        x = torch.randn(rows, next(iter(stages.values())).linear.in_features)
        with torch.set_grad_enabled(grad):
            for stage in stages.values():
                x = stage(x)
        if grad:
            x.sum().backward()


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
    assert compile_counts(since=before) == {"graphs": 3, "graph_breaks": 0, "eager_frames": 0}
    assert compile_counts()["graphs"] >= 8


@pytest.mark.parametrize("fullgraph", [True, False])
def test_placed_stages_of_one_class_compile_through_validation_and_training(fullgraph):
    """Dynamo compiled placement's input hook as a frame of its own, one code object for every stage, and the stages'
    shared forwards likewise: validation and the first training step passed its recompile limit (8), which
    compile.fullgraph=true turned into a failed run and false into stages left eager."""
    torch._dynamo.reset()
    stages = _stages_of_one_class((3, 4, 5, 6, 7, 8, 9))
    before = compile_counts()
    compile_stages(stages, backend="eager", fullgraph=fullgraph)
    for stage in stages.values():
        hook_inputs(stage)
    _validate_then_train(stages)
    counts = compile_counts(since=before)
    assert counts["graph_breaks"] == 0 and counts["eager_frames"] == 0 and counts["graphs"] >= 12, counts


def test_counts_name_the_frames_left_to_eager_at_the_recompile_limit():
    """A stage past dynamo's recompile limit runs eagerly with no graph break counted: the summary said 0 breaks."""
    torch._dynamo.reset()
    stages = _stages_of_one_class((3, 4, 5))
    before = compile_counts()
    compile_stages(stages, backend="eager")
    with torch._dynamo.config.patch(recompile_limit=1):  # the second width already passes it
        _validate_then_train(stages)
    counts = compile_counts(since=before)
    assert counts["graph_breaks"] == 0 and counts["eager_frames"] >= 1, counts


def test_a_placed_model_compiles_whole_under_fullgraph_and_exports():
    """The input hooks of a placed model are traced with the modules they hook: kept out of dynamo, each broke the
    graph (torch.compile(fullgraph=True) and strict torch.export failed)."""
    from hetrain.placement.plan import PlacementPlan

    torch._dynamo.reset()
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    PlacementPlan({"0": "cpu", "2": "cpu"}, "explicit").apply(model)
    x = torch.randn(3, 4)
    before = compile_counts()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), model(x))
    counts = compile_counts(since=before)
    assert counts == {"graphs": 1, "graph_breaks": 0, "eager_frames": 0}, counts
    torch.testing.assert_close(torch.export.export(model, (x,), strict=True).module()(x), model(x))


@pytest.mark.parametrize("fullgraph", [False, True])
def test_stages_made_only_of_torch_modules_are_traced(fullgraph):
    """nn.Module.compile compiled each stage's _call_impl, a frame dynamo skips, and torch's own forwards
    (nn.Sequential, nn.Linear) are skipped too: such a stage ran eagerly while the summary called it compiled, and
    compile.fullgraph=true failed its first call ("found no compiled frames")."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    stem = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                               torch.nn.MaxPool2d(2))
    stages = {"stem": stem, "head": torch.nn.Linear(36, 2)}
    keys = list(stem.state_dict())
    graphs = []

    def counting_backend(gm: torch.fx.GraphModule, example_inputs: list) -> object:
        graphs.append(gm)
        return gm.forward

    compile_stages(stages, backend=counting_backend, fullgraph=fullgraph)
    stages["head"](stem(torch.randn(2, 3, 8, 8)).flatten(1)).sum().backward()
    assert len(graphs) == 2, f"{len(graphs)} graphs for 2 stages"
    assert list(stem.state_dict()) == keys  # compiled in place: no _orig_mod wrapper


def test_a_checkpointed_torch_module_stage_recomputes_through_the_pipeline():
    """Torch-only stages were compiled with their _call_impl, hooks and all, and the graph guarded on the hook count:
    the pipeline split's skip-guard pre-hook, removed before backward, made the checkpoint's recompute compile anew
    and fail (CheckpointError: recomputed values with different metadata)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = {"body": torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(),
                                         torch.nn.Conv2d(4, 4, 3, padding=1)),
             "head": torch.nn.Linear(4, 2)}
    stages = copy.deepcopy(eager)
    compile_stages(stages, backend="aot_eager")
    x = torch.randn(4, 3, 6, 6)
    for model in (eager, stages):
        def run_stage(name: str, h: torch.Tensor, _x: torch.Tensor, model: dict = model) -> torch.Tensor:
            return model[name](h if name == "body" else h.mean((2, 3)))

        gpipe_forward(list(model.items()), run_stage, (x,), 2, checkpoint=("body",)).square().sum().backward()
    for p, q in zip(eager["body"].parameters(), stages["body"].parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad)


def test_a_compiled_torch_module_stage_copies_and_pickles():
    """A deep copy and a pickled stage (which loads uncompiled, as nn.Module.compile's does) run their own weights."""
    torch._dynamo.reset()
    stage = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())
    compile_stages({"s": stage}, backend="eager")
    buffer = io.BytesIO()
    torch.save(stage, buffer)
    buffer.seek(0)
    x = torch.randn(2, 4)
    for twin in (copy.deepcopy(stage), torch.load(buffer, weights_only=False)):
        torch.nn.init.zeros_(twin[0].weight)
        torch.nn.init.zeros_(twin[0].bias)
        assert twin(x).count_nonzero() == 0 and stage(x).count_nonzero() > 0


def _doubled(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return module._old_forward(x) * 2


@pytest.mark.parametrize("kind", ["partial", "traced"])
def test_stages_whose_forward_is_no_method_compile(kind):
    """A forward replaced on the instance by a functools.partial (as accelerate's hooks do) or a torch.jit.trace'd
    stage's ScriptMethod: compile_stages failed asking dynamo's trace rules about it ("getfile returned None")."""
    torch._dynamo.reset()
    stage = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())
    x = torch.randn(2, 4)
    if kind == "partial":
        stage._old_forward = stage.forward
        stage.forward = functools.partial(_doubled, stage)
    else:
        stage = torch.jit.trace(stage, x)
    expected = stage(x)
    assert compile_stages({"s": stage}, backend="eager")["stages"] == 1
    torch.testing.assert_close(stage(x), expected)
