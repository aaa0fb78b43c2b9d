"""Where use_backend/preferring blocks reach: activation checkpointing's recompute, and torch.compile."""

import threading

import pytest
import torch
import torch.utils.checkpoint

import hetrain
from hetrain import plugins
from hetrain.placement.pipeline import gpipe_forward


class Broken:
    """A layer_norm backend that must never run (a vendor kernel wrong for this model, say): pins keep it away."""

    @staticmethod
    def forward(*args):
        raise RuntimeError("the broken backend ran")

    backward = forward


@pytest.fixture
def broken_layer_norm(monkeypatch):
    """layer_norm's automatic choice on the CPU is a backend that raises (strict: no fallback hides it)."""
    monkeypatch.setenv(plugins.ENV_STRICT, "1")
    plugins.register("layer_norm", "broken", ("cpu",), Broken, priority=99)
    yield
    plugins.unregister("layer_norm", "broken")


class NormThenLinear(torch.nn.Module):
    """A fused op with a torch op after it, as in any transformer block: the recompute must rebuild both."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(8))
        self.linear = torch.nn.Linear(8, 8)

    def forward(self, x):
        return self.linear(hetrain.ops.layer_norm(x, self.weight))


def test_a_checkpointed_pipeline_stage_recomputes_under_the_pins_of_its_forward(broken_layer_norm):
    """PipelineSplit(checkpoint=[...]) recomputed a pinned stage unpinned, during a backward run outside the block."""
    stage = NormThenLinear()
    x = torch.randn(4, 8, requires_grad=True)
    with plugins.use_backend(layer_norm="torch"):
        y = gpipe_forward([("block", stage)], lambda name, h, *own: stage(h), [x], micro_batches=2,
                          checkpoint=["block"])
    y.sum().backward()
    expected = stage.linear(torch.nn.functional.layer_norm(x, (8,), stage.weight))
    torch.testing.assert_close(torch.autograd.grad(expected.sum(), x)[0], x.grad)


def test_checkpoint_context_gives_a_users_own_checkpoint_the_pins_of_its_forward(broken_layer_norm):
    block = NormThenLinear()
    x = torch.randn(4, 8, requires_grad=True)
    with plugins.use_backend(layer_norm="torch"):
        y = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False, context_fn=plugins.checkpoint_context)
    y.sum().backward(retain_graph=True)
    y.sum().backward()  # a second backward recomputes again, under the same pins
    with plugins.use_backend(layer_norm="torch"):
        expected = torch.autograd.grad(block(x).sum(), x)[0]
    torch.testing.assert_close(x.grad, 2 * expected)


@pytest.mark.parametrize("block", [lambda: plugins.use_backend(layer_norm="torch"),
                                   lambda: plugins.preferring("torch")], ids=["use_backend", "preferring"])
def test_a_block_opened_inside_a_compiled_function_is_refused_in_hetrains_words(block):
    """Dynamo said only that it cannot enter a 'lock' context manager."""
    def pinned_inside(x):
        with block():
            return hetrain.ops.layer_norm(x)

    with pytest.raises(Exception, match=r"hetrain: .* cannot be opened inside a torch.compile'd function") as info:
        torch.compile(pinned_inside, fullgraph=True)(torch.randn(2, 8))
    # It advised a block around backward(), which on CUDA runs on autograd's device thread, where no block is open.
    assert "No block reaches the compiled backward of CUDA tensors, not even one around backward()" in str(info.value)
    assert "configure(pins=...) or HETRAIN_BACKEND" in str(info.value)


def on_a_thread_without_blocks(fn):
    """Runs ``fn`` on a new thread, which never opened a block (this one may have, in earlier tests); re-raises."""
    errors = []

    def run():
        try:
            fn()
        except BaseException as exc:  # re-raised on the test's thread
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    if errors:
        raise errors[0]


def test_training_steps_under_preferring_run_past_the_first_backward():
    """The backward reopened the block's scopes and then left this thread's pins as None: the second step raised
    TypeError ('NoneType' object is not reversible)."""
    def train():
        torch.manual_seed(0)
        model = torch.nn.Sequential(hetrain.nn.LayerNorm(8), torch.nn.Linear(8, 1))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        with plugins.preferring("torch"):
            for _ in range(2):
                model(torch.randn(4, 8)).sum().backward()
                opt.step()
                opt.zero_grad()

    on_a_thread_without_blocks(train)


@pytest.mark.parametrize("checkpointed", [False, True], ids=["op", "checkpoint_context"])
def test_a_backward_after_its_block_closed_leaves_the_thread_able_to_choose_backends(checkpointed):
    def backward_then_choose():
        x = torch.randn(4, 8, requires_grad=True)
        with plugins.preferring("torch"):
            if checkpointed:
                y = torch.utils.checkpoint.checkpoint(NormThenLinear(), x, use_reentrant=False,
                                                      context_fn=plugins.checkpoint_context)
            else:
                y = hetrain.ops.layer_norm(x, torch.ones(8), torch.zeros(8))
        y.sum().backward()  # reopens the block's scopes on this thread, then closes them
        assert plugins.open_scopes() is None
        assert plugins.select("rms_norm", "cpu").name
        hetrain.ops.rms_norm(torch.randn(2, 8), torch.ones(8))
        with plugins.use_backend(layer_norm="torch"):  # this thread's own blocks work as before
            assert plugins.pinned("layer_norm") == "torch"

    on_a_thread_without_blocks(backward_then_choose)


@pytest.mark.parametrize("way", ["compiled", "reentrant checkpoint"])
def test_on_autograds_device_thread_a_backward_without_the_ops_autograd_follows_configure_not_a_block(
        broken_layer_norm, way):
    """What the advice says of a compiled backward and a use_reentrant=True recompute: on CUDA autograd runs them on a
    device thread of its own (emulated here by another thread), where a block open around backward() is not;
    configure's pins, process-wide, are."""
    block = NormThenLinear()
    if way == "compiled":
        forward = torch.compile(block, backend="aot_eager", fullgraph=True)
    else:
        def forward(x):
            return torch.utils.checkpoint.checkpoint(block, x, use_reentrant=True)
    x = torch.randn(4, 8, requires_grad=True)
    with plugins.use_backend(layer_norm="torch"):
        loss = forward(x).sum()
        with pytest.raises(RuntimeError, match="the broken backend ran"):
            on_a_thread_without_blocks(loss.backward)
    plugins.configure(pins={"layer_norm": "torch"})
    try:
        on_a_thread_without_blocks(forward(x).sum().backward)
    finally:
        plugins.configure(pins={})
