"""StepTrace: a Chrome trace of exactly the steps asked for, with hetrain's named ranges, read back."""

import json
import subprocess
import sys

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from hetrain.callbacks import PipelineSplit, StagePlacement, StepTrace
from hetrain.callbacks.profiling import instrumented, parse_steps
from hetrain.models.bert import BertClassifier
from hetrain.models.task import ClassificationTask


def rows(n: int = 48, t: int = 12) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 40, (n, t), generator=g)
    mask = torch.ones(n, t, dtype=torch.bool)
    mask[::3, t // 2:] = False
    labels = torch.randint(0, 3, (n,), generator=g)
    return [{"input_ids": i, "attention_mask": m, "labels": y} for i, m, y in zip(ids, mask, labels, strict=True)]


class MarkValidation(pl.Callback):
    """Leaves a named range in any trace recording while a validation batch runs."""

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        with torch.profiler.record_function("test::validation batch"):
            pass


def fit(tmp_path, trace: StepTrace, max_steps: int, accumulate: int = 1, val_check_interval=None) -> None:
    """Fits a small BERT; with ``val_check_interval`` it validates 3 batches then and when training ends."""
    torch.manual_seed(0)
    model = BertClassifier(vocab_size=40, num_classes=3, hidden=16, layers=1, heads=2, max_len=16)
    validation = {"val_check_interval": val_check_interval, "limit_val_batches": 3, "num_sanity_val_steps": 0} \
        if val_check_interval else {"limit_val_batches": 0}
    trainer = pl.Trainer(max_steps=max_steps, accumulate_grad_batches=accumulate, logger=False,
                         callbacks=[StagePlacement({"embeddings": "cpu"}),
                                    PipelineSplit(2, split_on_one_device=True), MarkValidation(), trace],
                         enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
                         default_root_dir=tmp_path, **validation)
    loader = DataLoader(rows(), batch_size=4)
    trainer.fit(ClassificationTask(model, num_classes=3), train_dataloaders=loader,
                val_dataloaders=loader if val_check_interval else None)


def names_in(path) -> set[str]:
    return {e.get("name") for e in json.loads(path.read_text())["traceEvents"]}


@pytest.mark.parametrize("accumulate", [1, 2])
def test_trace_holds_exactly_the_chosen_steps_and_the_named_ranges(tmp_path, accumulate):
    trace = StepTrace([2, 3], dirpath=tmp_path)
    fit(tmp_path, trace, max_steps=6, accumulate=accumulate)
    assert trace.path == tmp_path / "trace_steps_2-3.json" and trace.summary == {"trace": str(trace.path)}
    names = names_in(trace.path)
    steps = {n for n in names if n and n.startswith("hetrain::train step")}
    assert steps == {"hetrain::train step 2", "hetrain::train step 3"}
    for stage in ("embeddings", "encoder.0", "classifier"):
        assert {f"hetrain::stage {stage} micro-batch {i}" for i in (0, 1)} <= names
    assert any(n and n.startswith("hetrain::layer_norm.forward[") for n in names)  # the fused ops' own ranges
    assert any(n and n.startswith("hetrain::dropout_add_layer_norm.backward[") for n in names)


def test_a_run_that_ends_early_keeps_what_it_recorded(tmp_path, caplog):
    trace = StepTrace([1, 50], dirpath=tmp_path)
    with caplog.at_level("INFO"):
        fit(tmp_path, trace, max_steps=3)
    steps = {n for n in names_in(trace.path) if n and n.startswith("hetrain::train step")}
    assert steps == {"hetrain::train step 1", "hetrain::train step 2"}
    assert "steps 1..2 written" in caplog.text
    assert "steps 3..50 are not in it: training ended after step 2" in caplog.text


@pytest.mark.parametrize(("max_steps", "val_check_interval", "why"), [
    (4, 4, "training ended after step 3"),  # the validation at the end of training
    (6, 4, "a validation began after step 3"),  # a validation inside the range
])
def test_the_trace_holds_training_steps_only(tmp_path, caplog, max_steps, val_check_interval, why):
    # Steps asked for past the end of training recorded the final validation (and the checkpoint saved after it).
    trace = StepTrace([2, 9], dirpath=tmp_path)
    with caplog.at_level("INFO"):
        fit(tmp_path, trace, max_steps=max_steps, val_check_interval=val_check_interval)
    names = names_in(trace.path)
    assert {n for n in names if n and n.startswith("hetrain::train step")} == {"hetrain::train step 2",
                                                                              "hetrain::train step 3"}
    assert "test::validation batch" not in names
    assert f"steps 2..3 written to {trace.path}; steps 4..9 are not in it: {why}" in caplog.text
    assert not trace.instruments_step(4)  # steps after the trace run at full speed: timing callbacks count them


def test_a_range_the_run_never_reaches_says_so(tmp_path, caplog):
    trace = StepTrace([20, 22], dirpath=tmp_path)
    with caplog.at_level("INFO"):
        fit(tmp_path, trace, max_steps=2)
    assert not trace.path.exists() and trace.summary == {}
    assert "no trace written: training ended at step 2, before step 20" in caplog.text  # it said nothing


def test_steps_are_checked():
    assert parse_steps([4]) == (4, 4) == parse_steps(4) and parse_steps([1, 3]) == (1, 3)
    for bad in ([3, 1], [-1, 2], [1, 2, 3], [1.5, 2], True, [True]):  # true was read as step 1
        with pytest.raises(ValueError, match="profile_steps must be \\[first, last\\]"):
            parse_steps(bad)


class Regression(pl.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Linear(6, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def fit_regression(tmp_path, callbacks, max_steps: int, ckpt_path=None) -> pl.Trainer:
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(80, 6, generator=g), torch.randn(80, 1, generator=g))
    trainer = pl.Trainer(accelerator="cpu", max_steps=max_steps, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0,
                         default_root_dir=tmp_path, callbacks=callbacks)
    trainer.fit(Regression(), DataLoader(data, batch_size=4), ckpt_path=ckpt_path)
    return trainer


class FailsValidation(Regression):
    def validation_step(self, batch, batch_idx):
        raise ValueError("validation failed")


def test_a_failing_validate_says_nothing_of_training(tmp_path, caplog):
    # Its error ran the end of training: "no trace written: training ended at step 0, before step 10".
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(8, 6, generator=g), torch.randn(8, 1, generator=g))
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, default_root_dir=tmp_path,
                         callbacks=[StepTrace([10, 12], dirpath=tmp_path)])
    with caplog.at_level("INFO"), pytest.raises(ValueError, match="validation failed"):
        trainer.validate(FailsValidation(), DataLoader(data, batch_size=4), verbose=False)
    assert "profile:" not in caplog.text


@pytest.mark.parametrize(("settings", "expected"), [
    ({"num_sanity_val_steps": 1}, None),  # no step trained, so none went untraced
    ({"num_sanity_val_steps": 0, "val_check_interval": 4},
     "profile: no trace written: the fit failed at step 4, before step 10\n"),
], ids=["sanity check", "validation after step 4"])
def test_a_fit_failing_before_its_trace_says_so_without_advising_to_train_longer(tmp_path, caplog, settings,
                                                                                   expected):
    # Both said "training ended at step 0 (4), before step 10; trace earlier steps or train longer".
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(80, 6, generator=g), torch.randn(80, 1, generator=g))
    trainer = pl.Trainer(accelerator="cpu", max_steps=20, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path,
                         callbacks=[StepTrace([10, 12], dirpath=tmp_path)], **settings)
    with caplog.at_level("INFO"), pytest.raises(ValueError, match="validation failed"):
        trainer.fit(FailsValidation(), DataLoader(data, batch_size=4), DataLoader(data, batch_size=4))
    logged = "".join(f"{r.getMessage()}\n" for r in caplog.records if r.getMessage().startswith("profile:"))
    assert logged == (expected or "")


def test_a_fit_resumed_inside_or_past_the_range_says_which_steps_it_traced(tmp_path, caplog):
    """The log named the steps asked for, not those traced, and instruments_step counted a step this fit never
    ran; a fit resumed past the range said nothing of the trace it did not write."""
    resumed = tmp_path / "step3.ckpt"
    fit_regression(tmp_path, [], max_steps=3).save_checkpoint(resumed)
    trace = StepTrace([2, 4], dirpath=tmp_path / "inside")
    with caplog.at_level("INFO"):
        fit_regression(tmp_path / "inside", [trace], max_steps=8, ckpt_path=resumed)
    assert trace.path == tmp_path / "inside" / "trace_steps_2-4.json"  # named as asked for
    steps = {n for n in names_in(trace.path) if n and n.startswith("hetrain::train step")}
    assert steps == {"hetrain::train step 3", "hetrain::train step 4"}
    assert f"steps 3..4 written to {trace.path}; steps 2..2 are not in it: the fit resumed at step 3" in caplog.text
    assert not trace.instruments_step(2) and trace.instruments_step(3)

    past = StepTrace([1, 2], dirpath=tmp_path / "past")
    caplog.clear()
    with caplog.at_level("INFO"):
        fit_regression(tmp_path / "past", [past], max_steps=5, ckpt_path=resumed)
    assert not past.path.exists() and past.summary == {}
    assert "no trace written: the fit resumed at step 3, after step 2" in caplog.text


def traced_steps(path) -> set[int]:
    prefix = "hetrain::train step "
    return {int(n.removeprefix(prefix)) for n in names_in(path) if n and n.startswith(prefix)}


def test_a_fit_resumed_into_its_own_directory_keeps_the_earlier_parts_trace(tmp_path, caplog):
    """Each part of a run resumed into its own directory wrote trace_steps_1-5.json over the earlier part's: after
    a stop at step 2 and a resume, the file held steps 3..5 and steps 1..2 were gone. The earlier parts' traces are
    kept as -part<k>, as the CSV logger keeps csv-part<k>/."""
    trace = StepTrace([1, 5], dirpath=tmp_path)
    fit_regression(tmp_path, [trace], max_steps=3).save_checkpoint(tmp_path / "step3.ckpt")  # traces 1..2
    fit_regression(tmp_path, [trace], max_steps=5, ckpt_path=tmp_path / "step3.ckpt").save_checkpoint(
        tmp_path / "step5.ckpt")  # traces 3..4
    with caplog.at_level("INFO"):
        fit_regression(tmp_path, [trace], max_steps=8, ckpt_path=tmp_path / "step5.ckpt")  # traces 5
    named = tmp_path / "trace_steps_1-5.json"
    assert trace.path == named and traced_steps(named) == {5}
    assert traced_steps(tmp_path / "trace_steps_1-5-part1.json") == {1, 2}
    assert traced_steps(tmp_path / "trace_steps_1-5-part2.json") == {3, 4}
    assert f"{named} held the trace of an earlier part of this run; moved it to {tmp_path}/trace_steps_1-5-part2.json" \
        in caplog.text


def test_a_second_fit_traces_its_steps_again(tmp_path):
    """The same StepTrace for a second fit traced nothing, while telling timing callbacks it traced steps 1..2."""
    trace = StepTrace([1, 2], dirpath=tmp_path)
    for fit in range(2):
        fit_regression(tmp_path / str(fit), [trace], max_steps=4)
        assert trace.summary == {"trace": str(tmp_path / "trace_steps_1-2.json")}, fit
        steps = {n for n in names_in(trace.path) if n and n.startswith("hetrain::train step")}
        assert steps == {"hetrain::train step 1", "hetrain::train step 2"}, fit
        trace.path.unlink()


class ValidatedRegression(Regression):
    def validation_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)


class StopsAt(pl.Callback):
    """Asks training to stop after batch ``batch_idx``, as early stopping or ``max_time`` do."""

    def __init__(self, batch_idx: int):
        self.batch_idx = batch_idx

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        trainer.should_stop = trainer.should_stop or batch_idx == self.batch_idx


def five_batches() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(20, 6, generator=g), torch.randn(20, 1, generator=g)), batch_size=4)


def fit_epochs(tmp_path, callbacks, **trainer_kwargs) -> pl.Trainer:
    """Fits 5 batches an epoch, validating one batch at each epoch's end."""
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, num_sanity_val_steps=0, limit_val_batches=1,
                         default_root_dir=tmp_path, callbacks=callbacks, **trainer_kwargs)
    trainer.fit(ValidatedRegression(), five_batches(), five_batches())
    return trainer


@pytest.mark.parametrize(("trainer_kwargs", "stop_at", "last", "why"), [
    ({"max_epochs": 1}, None, 4, "training ended"),
    ({"max_epochs": 1, "limit_train_batches": 3}, None, 2, "training ended"),
    ({"max_epochs": 3}, 2, 2, "training ended"),  # trainer.should_stop
    ({"max_epochs": 2}, None, 4, "a validation began"),  # the first epoch's: training goes on after it
])
def test_the_validation_at_the_end_of_training_is_not_blamed_for_the_steps_missing(tmp_path, caplog, trainer_kwargs,
                                                                                   stop_at, last, why):
    """Only max_steps was taken for the end of training: ended by max_epochs, limit_train_batches or a stop, the log
    said a validation began and advised choosing steps between validations."""
    trace = StepTrace([1, 60], dirpath=tmp_path)
    with caplog.at_level("INFO"):
        fit_epochs(tmp_path, [trace] + ([StopsAt(stop_at)] if stop_at is not None else []), **trainer_kwargs)
    assert f"steps 1..{last} written to {trace.path}; steps {last + 1}..60 are not in it: {why} after step {last}" \
        in caplog.text


def test_a_second_fit_of_the_same_trainer_is_not_said_to_resume(tmp_path, caplog):
    trace = StepTrace([1, 2], dirpath=tmp_path)
    trainer = fit_epochs(tmp_path, [trace], max_epochs=1)
    trainer.fit_loop.max_epochs = 2  # the second fit goes on from step 5
    with caplog.at_level("INFO"):
        trainer.fit(ValidatedRegression(), five_batches(), five_batches())
    assert trainer.global_step == 10 and trace.summary == {}
    assert ("no trace written: the fit began at step 5 (where this Trainer's previous fit ended), after step 2"
            in caplog.text)
    assert "resumed" not in caplog.text


def test_under_ddp_each_fit_names_the_trace_of_its_rank_once(tmp_path):
    """A second fit's trace was named ``..._rank0_rank0.json``. The hooks of two fits are driven by hand on a Trainer
    of two processes that is never launched (rank 0 of 2): a real two-process fit takes half a minute."""
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path)
    assert trainer.world_size == 2 and trainer.global_rank == 0 and trainer.global_step == 0
    trace, model = StepTrace(0, dirpath=tmp_path), Regression()
    for fit in range(2):
        trace.on_fit_start(trainer, model)
        trace.on_train_start(trainer, model)
        trace.on_train_batch_start(trainer, model, None, 0)
        trace.on_train_end(trainer, model)
        assert trace.path == tmp_path / "trace_steps_0-0_rank0.json" and trace.path.exists(), fit
        trace.path.unlink()


def test_under_ddp_a_resumed_fit_keeps_its_ranks_earlier_trace(tmp_path):
    """Rank 0 of two, its hooks driven by hand as above: the resumed fit keeps the earlier part's trace of its rank
    under that rank's name."""
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path)
    trace, model = StepTrace(0, dirpath=tmp_path), Regression()
    earlier = tmp_path / "trace_steps_0-0_rank0.json"
    earlier.write_text("the earlier part's")
    trainer.ckpt_path = str(tmp_path / "earlier.ckpt")  # as Trainer.fit(ckpt_path=...) sets it
    trace.on_fit_start(trainer, model)
    trace.on_train_start(trainer, model)
    trace.on_train_batch_start(trainer, model, None, 0)
    trace.on_train_end(trainer, model)
    assert trace.path == earlier and traced_steps(earlier) == {0}
    assert (tmp_path / "trace_steps_0-0_rank0-part1.json").read_text() == "the earlier part's"


class SeveralSteps(pl.LightningModule):
    """Manual optimization that runs ``steps`` optimizer steps per batch, cycling over ``optimizers`` Linears: each
    step counts one global step, so a batch advances global_step by ``steps``."""

    def __init__(self, optimizers: int, steps: int):
        super().__init__()
        self.automatic_optimization = False
        self.nets = torch.nn.ModuleList(torch.nn.Linear(6, 1) for _ in range(optimizers))
        self.steps = steps

    def training_step(self, batch, batch_idx):
        x, _ = batch
        optimizers = self.optimizers()
        optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
        for i in range(self.steps):
            optimizer, net = optimizers[i % len(optimizers)], self.nets[i % len(optimizers)]
            optimizer.zero_grad()
            self.manual_backward(net(x).pow(2).mean())
            optimizer.step()

    def configure_optimizers(self):
        return [torch.optim.SGD(net.parameters(), lr=0.01) for net in self.nets]


def fit_steps(tmp_path, trace: StepTrace, optimizers: int, steps: int, batches: int = 4) -> None:
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(4 * batches, 6, generator=g), torch.randn(4 * batches, 1, generator=g))
    trainer = pl.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0,
                         default_root_dir=tmp_path, callbacks=[trace])
    trainer.fit(SeveralSteps(optimizers, steps), DataLoader(data, batch_size=4))


@pytest.mark.parametrize(("steps", "written"), [([3, 3], "steps 2..3 written"), ([3, 4], "steps 2..5 written")])
def test_steps_inside_a_batch_of_several_optimizer_steps_are_traced(tmp_path, caplog, steps, written):
    # Two optimizers step each batch: batches begin at steps 0, 2, 4, ... Step 3 alone was never traced, and
    # [3, 4] began at step 4 and said the fit had resumed there.
    trace = StepTrace(steps, dirpath=tmp_path)
    with caplog.at_level("INFO"):
        fit_steps(tmp_path, trace, optimizers=2, steps=2)
    assert trace.path.exists() and trace.summary == {"trace": str(trace.path)}
    assert f"{written} to {trace.path} (open" in caplog.text and "resumed" not in caplog.text
    assert trace.instruments_step(2) and trace.instruments_step(3) and not trace.instruments_step(6)


def test_steps_run_untraced_by_a_batch_of_more_steps_than_expected_are_named(tmp_path, caplog):
    # One optimizer stepped three times a batch: batch 0 ran steps 0..2 before the trace could know it would.
    past = StepTrace([1, 2], dirpath=tmp_path / "past")
    with caplog.at_level("INFO"):
        fit_steps(tmp_path, past, optimizers=1, steps=3)
    assert not past.path.exists() and past.summary == {}
    assert "no trace written: batch 0 ran steps 0..2 untraced" in caplog.text

    partial = StepTrace([1, 5], dirpath=tmp_path / "partial")
    caplog.clear()
    with caplog.at_level("INFO"):
        fit_steps(tmp_path, partial, optimizers=1, steps=3)
    assert (f"steps 3..5 written to {partial.path}; steps 1..2 are not in it: batch 0 ran steps 0..2 untraced"
            in caplog.text)
    assert "resumed" not in caplog.text


class InstrumentedAtBatchStart(pl.Callback):
    """Listed before StepTrace, as Throughput may be: notes whether each batch's start is instrumented."""

    def __init__(self):
        self.seen: list[tuple[int, bool]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen.append((trainer.global_step, instrumented(trainer, trainer.global_step)))


def test_a_callback_before_the_trace_sees_the_batch_it_begins_at_as_instrumented(tmp_path):
    # Two optimizers, batches from steps 0, 2, 4, 6; [3, 4] is traced from the batch at step 2. The trace moved its
    # first step to 2 in its own hook, after Throughput had timed that batch.
    probe, trace = InstrumentedAtBatchStart(), StepTrace([3, 4], dirpath=tmp_path)
    data = TensorDataset(torch.randn(16, 6), torch.randn(16, 1))
    trainer = pl.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0,
                         callbacks=[probe, trace])
    trainer.fit(SeveralSteps(optimizers=2, steps=2), DataLoader(data, batch_size=4))
    assert probe.seen == [(0, False), (2, True), (4, True), (6, False)]


UNDER_ANOTHER_PROFILER = '''
import json, logging, sys
import pytorch_lightning as pl
import torch
from pytorch_lightning.profilers import PyTorchProfiler
from torch.utils.data import DataLoader, TensorDataset
from hetrain.callbacks import StepTrace


class OtherProfiler(pl.Callback):
    """Records batch 1 with a torch profiler of its own, as MemoryProfiler's churn steps do."""

    profiler = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 1:
            self.profiler = torch.profiler.profile()
            self.profiler.__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.profiler is not None:
            self.profiler.__exit__(None, None, None)
            self.profiler = None


class Net(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Linear(6, 1)

    def training_step(self, batch, batch_idx):
        return self.net(batch[0]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


class Instrumented(pl.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trace.instruments_step(trainer.global_step):
            print(f"instrumented step {trainer.global_step}")


# argv: the run directory, the steps to trace, and the other profiler: "callback" (OtherProfiler) or "lightning"
# (Lightning's PyTorchProfiler, off while its schedule waits and warms up: 2 training steps, then 1)
logging.basicConfig(level=logging.INFO, format="%(message)s")
trace = StepTrace(json.loads(sys.argv[2]), dirpath=sys.argv[1])
other = sys.argv[3] == "callback"
schedule = torch.profiler.schedule(wait=2, warmup=1, active=2, repeat=1)
profiler = None if other else PyTorchProfiler(dirpath=sys.argv[1], filename="lightning", schedule=schedule)
trainer = pl.Trainer(accelerator="cpu", max_steps=6, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, enable_checkpointing=False, profiler=profiler,
                     callbacks=[OtherProfiler()] * other + [Instrumented(), trace])
trainer.fit(Net(), DataLoader(TensorDataset(torch.randn(32, 6)), batch_size=4))
'''


def run_beside_another_profiler(tmp_path, steps: list[int], other: str) -> subprocess.CompletedProcess:
    """A fit tracing ``steps`` beside another torch profiler, in a process of its own: two at once crashed it."""
    run = subprocess.run([sys.executable, "-c", UNDER_ANOTHER_PROFILER, str(tmp_path), json.dumps(steps), other],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    return run


def test_a_batch_another_torch_profiler_records_is_not_traced(tmp_path):
    """Two torch profilers at once crashed the process (SIGSEGV) writing the trace."""
    run = run_beside_another_profiler(tmp_path, [1, 2], "callback")
    assert "profile: batch 1 (from step 1) is not traced: another torch profiler records it" in run.stderr
    assert (f"steps 2..2 written to {tmp_path / 'trace_steps_1-2.json'}; steps 1..1 are not in it: batch 1 (from "
            "step 1) ran under another torch profiler" in run.stderr)


def test_steps_all_recorded_by_another_profiler_are_not_traced_and_the_log_says_turn_it_off(tmp_path):
    """Before, the log advised tracing steps of a later batch, which a profiler recording them all records too."""
    run = run_beside_another_profiler(tmp_path, [1, 1], "callback")
    assert not (tmp_path / "trace_steps_1-1.json").exists()
    assert ("no trace written: batch 1 (from step 1) ran under another torch profiler, and two cannot record at once; "
            "turn that profiler off for the steps traced, or off altogether") in run.stderr


def test_nothing_is_traced_beside_lightnings_pytorch_profiler(tmp_path):
    """Before, the trace began while Lightning's PyTorchProfiler waited in its schedule (torch reports no profiler
    then), and the PyTorchProfiler starting later raised "Profiler is already enabled on this thread" (or crashed
    the process). Now no step of such a fit is traced or counted as instrumented, and the log says why."""
    run = run_beside_another_profiler(tmp_path, [2, 3], "lightning")
    assert not (tmp_path / "trace_steps_2-3.json").exists() and "instrumented step" not in run.stdout
    assert ("profile: steps 2..3 are not traced in this fit: Lightning's PyTorchProfiler is on (Trainer(profiler=...)"
            "), and two torch profilers cannot record at once; use one or the other") in run.stderr
    assert "no trace written" not in run.stderr
    assert list(tmp_path.glob("*lightning*"))  # Lightning's profiler recorded as it was asked
