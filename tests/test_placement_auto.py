"""`placement.plan: auto` in a real run: measured, solved, logged, saved, and reusable as an explicit plan."""

import contextlib
import dataclasses
import json
import logging
import math
import pickle
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch

from hetrain.callbacks import StagePlacement
from hetrain.placement import CostModel, PlacementPlan, measure

INF = math.inf

ROOT = Path(__file__).resolve().parent.parent


def train(*overrides: str, run_dir: Path) -> subprocess.CompletedProcess:
    run = subprocess.run(
        [sys.executable, "train.py", *overrides, "trainer.max_steps=4", "trainer.val_check_interval=4",
         "data.train_size=256", "data.val_size=64", "threads=1", f"hydra.run.dir={run_dir}"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return run


def test_auto_placement_measures_solves_and_saves_a_reusable_plan(tmp_path):
    run = train("recipe=bert_auto", run_dir=tmp_path / "auto")
    assert "placement auto (chain-dp, pipeline)" in run.stdout + run.stderr
    summary = json.loads((tmp_path / "auto" / "summary.json").read_text())
    assert summary["placement"]["method"] == "chain-dp"
    assert summary["placement"]["predicted_step_time_ms"] > 0
    assert summary["throughput"]["step_time_ms"]["p50"] > 0  # the measured time beside the prediction
    plan = PlacementPlan.load(tmp_path / "auto" / "placement_plan.yaml")
    assert set(plan.devices) == {"embeddings", "encoder.0", "encoder.1", "classifier"}
    assert set(summary["stages"].values()) == set(plan.devices.values())
    if len(set(plan.devices.values())) == 1:  # the pipeline split runs each batch whole: priced whole
        costs = CostModel.load(tmp_path / "auto" / "placement_costs.json")
        assert summary["placement"]["predicted_step_time_ms"] == round(costs.predict(plan.devices) * 1e3, 3)
    # The saved file is an explicit plan as it stands.
    train("recipe=bert_split", f"placement.plan={tmp_path / 'auto' / 'placement_plan.yaml'}",
          run_dir=tmp_path / "reused")
    reused = json.loads((tmp_path / "reused" / "summary.json").read_text())
    assert reused["stages"] == summary["stages"]


def test_bert_auto_plans_for_the_pipeline_split_it_runs(tmp_path):
    """Before, bert_auto solved for stages one after another while bert_split's split ran 4 micro-batches."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from hetrain.recipes import register_recipes

    register_recipes(ROOT / "recipes")
    for overrides, micro_batches in [[], 4], [["callbacks.pipeline_split.micro_batches=2"], 2]:
        with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
            cfg = compose("train", overrides=["recipe=bert_auto", *overrides, f"output_dir={tmp_path}"])
        OmegaConf.resolve(cfg)
        assert cfg.placement.objective == "pipeline"
        assert cfg.placement.micro_batches == cfg.callbacks.pipeline_split.micro_batches == micro_batches


def fit_one_step(placement: StagePlacement, tmp_path: Path, precision: str = "32-true",
                 others: tuple[pl.Callback, ...] = ()) -> int:
    """One training step of a tiny BERT with ``placement`` (and ``others``); returns the rows of the batch placement
    measures."""
    import pytorch_lightning as pl

    from hetrain.data.datamodule import SyntheticDataModule
    from hetrain.models.bert import BertClassifier
    from hetrain.models.task import ClassificationTask

    data = SyntheticDataModule(vocab_size=64, num_classes=2, min_len=8, max_len=24, train_size=64, val_size=16,
                               max_tokens=192)
    task = ClassificationTask(BertClassifier(vocab_size=64, num_classes=2, hidden=16, layers=1, heads=2, max_len=32),
                              num_classes=2)
    trainer = pl.Trainer(max_steps=1, precision=precision, callbacks=[placement, *others], logger=False,
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                         limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(task, datamodule=data)
    return len(next(iter(data.val_dataloader()))["labels"])


def test_pipeline_objective_on_one_device_predicts_the_whole_batch_it_runs(tmp_path):
    """Before, the whole batch's costs were read as one micro-batch's: 4 micro-batches predicted 4 whole steps."""
    placement = StagePlacement("auto", objective="pipeline", micro_batches=4, save_dir=str(tmp_path))
    fit_one_step(placement, tmp_path)
    costs = CostModel.load(tmp_path / "placement_costs.json")
    assert costs.devices == ["cpu"] and not (tmp_path / "placement_costs_micro.json").exists()
    # Every stage on the one device: the pipeline split runs each batch whole, stage after stage.
    assert placement.summary["predicted_step_time_ms"] == round(sum(row[0] for row in costs.compute) * 1e3, 3)


class Kept(StagePlacement):
    """Keeps the costs it measured."""

    def measure(self, trainer, pl_module):
        self.costs = super().measure(trainer, pl_module)
        return self.costs


def test_auto_prices_the_micro_batches_a_split_on_one_device_runs(tmp_path, caplog):
    """Before, PipelineSplit(split_on_one_device=True) went unread: a plan on one device was priced, and summarised,
    as the whole batch the split still cut into micro-batches; nor was it said that checkpointed stages' recompute
    goes unpriced."""
    from hetrain.callbacks import PipelineSplit

    placement = Kept("auto", objective="pipeline", micro_batches=1)  # the split's count is the one the run runs
    with caplog.at_level(logging.WARNING, logger="hetrain.callbacks.placement"):
        fit_one_step(placement, tmp_path, others=(PipelineSplit(4, checkpoint="encoder", split_on_one_device=True),))
    costs = placement.costs
    assert costs.split_on_one_device and costs.micro is not None and costs.micro_batches == 4
    plan = {key.removeprefix("plan."): device for key, device in placement.summary.items() if key.startswith("plan.")}
    assert costs.split(plan) and placement.summary["micro_batches"] == costs.micro_batches
    predicted = costs.micro.predict(plan, "pipeline", costs.micro_batches)
    assert placement.summary["predicted_step_time_ms"] == round(predicted * 1e3, 3)
    assert "PipelineSplit checkpoints encoder.0, whose forward runs again in backward" in caplog.text


def measuring_two_devices(rows: list[int]):
    """A stand-in for ``measure`` that records the rows of each batch it times."""

    def measure_two_devices(stages, make_input, devices, extra_args, **kwargs):
        # This machine's CPU, and a device as a GPU machine would measure it: ten times faster, behind a fast link.
        rows.append(len(make_input()))
        cpu = measure(stages, make_input, ["cpu"], extra_args, **kwargs)
        return CostModel(cpu.stages, ["cpu", "cuda:0"], [[c, c / 10] for c, in cpu.compute], cpu.boundary_bytes,
                         [[INF, 1e12], [1e12, INF]], meta=cpu.meta)

    return measure_two_devices


def test_pipeline_objective_times_one_micro_batch_where_a_plan_can_split(tmp_path, monkeypatch):
    """With several devices the whole batch is timed for one-device plans and its first micro-batch (the rows the
    pipeline split gives it) for split ones; before, only the whole batch, read as one micro-batch."""
    from hetrain.callbacks import placement as placement_module

    rows = []
    monkeypatch.setattr(placement_module, "measure", measuring_two_devices(rows))
    placement = StagePlacement("auto", objective="pipeline", micro_batches=4, save_dir=str(tmp_path))
    batch_rows = fit_one_step(placement, tmp_path)
    assert rows == [batch_rows, math.ceil(batch_rows / 4)]
    whole = CostModel.load(tmp_path / "placement_costs.json")
    micro = CostModel.load(tmp_path / "placement_costs_micro.json")
    assert [whole.meta["input_shapes"][0][0], micro.meta["input_shapes"][0][0]] == rows
    from hetrain.callbacks.placement import RunCosts

    best = RunCosts(whole, micro, 4).best_plan()
    assert placement.summary["predicted_step_time_ms"] == round(best.predicted_step_time * 1e3, 3)


def test_pipeline_objective_cuts_only_what_the_stages_take_into_a_micro_batch(tmp_path, monkeypatch):
    """Before, every tensor of the batch was cut, and a 0-d one the model never reads (a token count) raised
    "len() of a 0-d tensor"."""
    import pytorch_lightning as pl

    from hetrain.callbacks import placement as placement_module
    from hetrain.models.bert import BertClassifier
    from hetrain.models.task import ClassificationTask

    def collate(samples: list[int]) -> dict[str, torch.Tensor]:
        ids = torch.tensor([[1 + (s + t) % 63 for t in range(8)] for s in samples])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids, dtype=torch.bool),
                "labels": torch.tensor(samples) % 2, "num_tokens": torch.tensor(ids.numel())}

    rows = []
    monkeypatch.setattr(placement_module, "measure", measuring_two_devices(rows))
    task = ClassificationTask(BertClassifier(vocab_size=64, num_classes=2, hidden=16, layers=1, heads=2, max_len=8),
                              num_classes=2)
    trainer = pl.Trainer(max_steps=1, callbacks=[StagePlacement("auto", objective="pipeline", micro_batches=4)],
                         logger=False, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, default_root_dir=tmp_path)
    trainer.fit(task, torch.utils.data.DataLoader(range(16), batch_size=8, collate_fn=collate))
    assert rows == [8, 2]


def collate_rows(samples: list[int]) -> dict[str, torch.Tensor]:
    ids = torch.tensor([[1 + (s + t) % 63 for t in range(8)] for s in samples])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids, dtype=torch.bool),
            "labels": torch.tensor(samples) % 2}


def test_a_batch_of_fewer_rows_than_micro_batches_is_priced_in_as_many_pieces_as_it_has_rows(tmp_path, monkeypatch):
    """The split cuts 2 rows into 2 micro-batches, not 8; before, a split plan was priced as 8 micro-batches."""
    import pytorch_lightning as pl

    from hetrain.callbacks import placement as placement_module
    from hetrain.models.bert import BertClassifier
    from hetrain.models.task import ClassificationTask

    rows = []
    monkeypatch.setattr(placement_module, "measure", measuring_two_devices(rows))
    task = ClassificationTask(BertClassifier(vocab_size=64, num_classes=2, hidden=16, layers=1, heads=2, max_len=8),
                              num_classes=2)
    placement = Kept("auto", objective="pipeline", micro_batches=8)
    trainer = pl.Trainer(max_steps=1, callbacks=[placement], logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path)
    trainer.fit(task, torch.utils.data.DataLoader(range(2), batch_size=2, collate_fn=collate_rows))
    assert rows == [2, 1] and placement.costs.micro_batches == 2
    split = {"embeddings": "cpu", "encoder.0": "cuda:0", "classifier": "cuda:0"}
    assert placement.costs.predict(split) == placement.costs.micro.predict(split, "pipeline", 2)
    plan = {key.removeprefix("plan."): device for key, device in placement.summary.items() if key.startswith("plan.")}
    assert placement.summary["micro_batches"] == (2 if placement.costs.split(plan) else 1)


def test_auto_places_a_stage_without_weights_with_the_stage_before_it(tmp_path, monkeypatch):
    """Placing leaves a stage without weights where its input is. Before, the solver put act (10 s on the CPU, 1 s on
    cuda:0) on cuda:0 after a on the CPU and predicted 3.2 s, a plan that ran act on the CPU (12.2 s)."""
    import pytorch_lightning as pl
    from torch import nn

    from hetrain.callbacks import placement as placement_module

    class ThreeStages(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.act, self.c = nn.Linear(4, 4), nn.GELU(), nn.Linear(4, 1)

        def stages(self) -> dict[str, nn.Module]:
            return {"a": self.a, "act": self.act, "c": self.c}

        def placement_inputs(self, batch: torch.Tensor):
            return (lambda: batch), (lambda name: ())

        def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
            return self.c(self.act(self.a(batch))).sum()

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    def measured(stages, make_input, devices, extra_args, **kwargs):
        return CostModel(list(stages), ["cpu", "cuda:0"], [[1.0, 3.0], [10.0, 1.0], [1.0, 1.0]], [100, 100, 8],
                         [[INF, 1e3], [1e3, INF]])

    monkeypatch.setattr(placement_module, "measure", measured)
    placement = StagePlacement("auto")
    trainer = pl.Trainer(max_steps=1, callbacks=[placement], logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path)
    trainer.fit(ThreeStages(), torch.utils.data.DataLoader(torch.randn(8, 4), batch_size=4))
    assert placement.summary["plan.act"] == placement.summary["plan.a"] == "cuda:0"
    assert placement.summary["predicted_step_time_ms"] == 5000.0


def test_run_costs_price_a_plan_as_the_pipeline_split_runs_it():
    from hetrain.callbacks.placement import RunCosts

    # Per-call costs: a micro-batch of a quarter of the rows takes more than a quarter of the batch's time.
    whole = CostModel(["a", "b"], ["cpu", "cuda:0"], [[4.0, 1.0], [4.0, 1.0]], [100, 10], [[INF, 1e9], [1e9, INF]])
    micro = CostModel(["a", "b"], ["cpu", "cuda:0"], [[1.5, 0.9], [1.5, 0.9]], [25, 3], [[INF, 1e9], [1e9, INF]])
    costs = RunCosts(whole, micro, 4)
    # One device runs the batch whole; two run 4 micro-batches over 2 stages: one through both, then 3 x the slower.
    assert costs.predict({"a": "cuda:0", "b": "cuda:0"}) == pytest.approx(2.0)
    assert costs.predict({"a": "cpu", "b": "cuda:0"}) == pytest.approx(1.5 + 0.9 + 3 * 1.5)
    assert costs.best_plan().devices == {"a": "cuda:0", "b": "cuda:0"}  # the solver alone: 4 x 1.8 on cuda:0
    assert costs.best_plan().predicted_step_time == pytest.approx(2.0)
    balanced = RunCosts(whole, CostModel(["a", "b"], ["cpu", "cuda:0"], [[0.3, 0.3], [0.3, 0.3]], [25, 3],
                                         [[INF, 1e9], [1e9, INF]]), 4)
    assert len(set(balanced.best_plan().devices.values())) == 2  # a split worth its fill and drain
    assert balanced.best_plan().predicted_step_time == pytest.approx(5 * 0.3, rel=1e-3)
    assert RunCosts(whole).predict({"a": "cpu", "b": "cuda:0"}) == pytest.approx(5.0, rel=1e-3)  # sequential


def test_auto_placement_times_stages_under_the_run_precision(tmp_path):
    """Before, stages were timed in float32 however the run trained: fit start lies outside Lightning's autocast."""
    placement = StagePlacement("auto", save_dir=str(tmp_path))
    batch_rows = fit_one_step(placement, tmp_path, precision="bf16-mixed")
    costs = CostModel.load(tmp_path / "placement_costs.json")
    assert costs.boundary_bytes[-1] == batch_rows * 2 * torch.bfloat16.itemsize  # logits as autocast makes them


def test_an_explicit_plan_is_shown_beside_what_auto_would_predict(tmp_path, caplog):
    placement = StagePlacement({"embeddings": "cpu", "encoder": "cuda:0"}, predict=True)
    with caplog.at_level("INFO"):
        fit_one_step(placement, tmp_path)
    summary = placement.summary
    assert summary["method"] == "explicit" and summary["predicted_step_time_ms"] > 0
    assert summary["auto_predicted_step_time_ms"] <= summary["predicted_step_time_ms"] * 1.0001  # auto is optimal
    assert {k for k in summary if k.startswith("auto.")} == {"auto.embeddings", "auto.encoder.0", "auto.classifier"}
    assert "this plan predicts" in caplog.text and "auto would choose" in caplog.text


def test_a_plan_the_pipeline_model_cannot_price_is_logged_not_fatal(caplog):
    from hetrain.callbacks.placement import RunCosts

    # Two devices as a GPU machine measures them; the plan goes back to the CPU, which a pipeline cannot price.
    costs = CostModel(["embeddings", "encoder", "classifier"], ["cpu", "cuda:0"], [[1e-3, 2e-3], [9e-3, 1e-3],
                      [1e-3, 2e-3]], [4096, 4096, 64], [[float("inf"), 1e9], [1e9, float("inf")]])

    class Measured(StagePlacement):
        def measure(self, trainer, pl_module):
            return RunCosts(costs, costs, 4)

    placement = Measured({"embeddings": "cpu", "encoder": "cuda:0", "classifier": "cpu"}, objective="pipeline",
                         micro_batches=4, predict=True)
    placed = {"embeddings": torch.device("cpu"), "encoder": torch.device("cuda:0"), "classifier": torch.device("cpu")}
    with caplog.at_level("INFO"):
        placement.compare(pl.Trainer(accelerator="cpu", devices=1, logger=False), None, placed)
    assert "this plan has no predicted time" in caplog.text and "device 0 holds" in caplog.text
    assert placement.summary["predicted_step_time_ms"] is None
    assert placement.summary["auto_predicted_step_time_ms"] > 0


class NeedsTwoArguments(Exception):
    def __init__(self, message: str, stage: str) -> None:
        super().__init__(message)
        self.stage = stage


def test_a_failure_on_rank_0_is_sent_to_the_other_ranks_as_text_and_raised_there_as_it_was():
    """Before, rank 0 broadcast the exception object: one holding a lambda did not pickle (rank 0 raised the pickling
    error, the others a broken connection), one whose __init__ takes two arguments did not unpickle on the others."""
    from hetrain.callbacks.placement import _on_global_zero, _RankZeroFailure

    holds_lambda = RuntimeError("stage a failed")
    holds_lambda.fix = lambda: None
    for exc in (holds_lambda, NeedsTwoArguments("stage a failed", "a")):
        def fail(exc=exc):
            raise exc

        with pytest.raises(type(exc)) as raised:  # one process: work's own exception, as before
            _on_global_zero(pl.Trainer(accelerator="cpu", devices=1, logger=False), fail)
        assert raised.value is exc
        error = pickle.loads(pickle.dumps(_RankZeroFailure.of(exc))).error()  # what another rank raises
        assert isinstance(error, RuntimeError)
        assert f"placement failed on global rank 0 with {type(exc).__name__}: stage a failed;" in str(error)
        assert "in fail\n    raise exc" in str(error)  # rank 0's traceback


def test_a_saved_plan_file_is_an_explicit_plan(tmp_path):
    """Before, a path was refused as neither a mapping nor 'auto', and only once the model was built."""
    devices = {"embeddings": "cpu", "encoder": "cuda:0", "classifier": "cuda:0"}
    for name in ("placement_plan.yaml", "plan.json"):
        path = PlacementPlan(devices, "chain-dp", 0.01).save(tmp_path / name)
        assert StagePlacement(str(path)).plan == devices
    with pytest.raises(ValueError, match=r"placement plan file .*missing.yaml does not exist; pass the placement_plan"):
        StagePlacement(str(tmp_path / "missing.yaml"))
    with pytest.raises(ValueError, match=r"mapping, 'auto', or the path of a plan file \(.yaml, .yml, .json\)"):
        StagePlacement("plan.txt")


def test_nested_plan_entries_read_as_dotted_paths():
    """Hydra turns +placement.plan.encoder.1=cpu into {encoder: {'1': cpu}}; before, a device named {'1': 'cpu'}."""
    placement = StagePlacement({"embeddings": "cpu", "encoder": {"1": "cpu", "0": {"attention": "cpu"}}})
    assert placement.plan == {"embeddings": "cpu", "encoder.1": "cpu", "encoder.0.attention": "cpu"}
    with pytest.raises(ValueError, match="gives 'encoder.1' twice, once as a dotted path and once nested; keep one"):
        StagePlacement({"encoder.1": "cuda:0", "encoder": {"1": "cpu"}})
    with pytest.raises(ValueError, match="placement of 'encoder' is an empty mapping"):
        StagePlacement({"encoder": {}})
    with pytest.raises(ValueError, match="placement of 'encoder.1' names device 'gpu'"):
        StagePlacement({"encoder": {"1": "gpu"}})


AUTO_PER_RANK = '''
import json, sys
import pytorch_lightning as pl
import torch
from torch import nn
from hetrain.callbacks import StagePlacement
from hetrain.callbacks import placement as placement_module
from hetrain.placement import CostModel, PlacementPlan

measured, saved = [], []
failing = False  # measure raises (set per fit)


class StageFailed(Exception):
    """An error that neither pickles (it holds a lambda) nor unpickles (its __init__ takes two arguments)."""

    def __init__(self, message, stage):
        super().__init__(message)
        self.stage, self.fix = stage, lambda: None


def measure(stages, make_input, devices, extra_args, **kwargs):
    """Timings that differ by rank, as on a machine whose ranks see their devices differently: rank 0 finds the CPU
    faster, rank 1 cuda:0 (absent here: a plan naming it falls back to the CPU)."""
    rank = torch.distributed.get_rank()
    measured.append(rank)
    if failing:
        raise StageFailed("stage a failed", "a")
    compute = [[1.0, 3.0], [1.0, 3.0]] if rank == 0 else [[3.0, 1.0], [3.0, 2.0]]
    inf = float("inf")
    return CostModel(list(stages), ["cpu", "cuda:0"], compute, [100, 8], [[inf, 1e3], [1e3, inf]])


def counted(save):
    def save_and_count(self, path):
        saved.append(str(path))
        return save(self, path)
    return save_and_count


class TwoStages(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.a, self.c = nn.Linear(4, 4), nn.Linear(4, 1)

    def stages(self):
        return {"a": self.a, "c": self.c}

    def placement_inputs(self, batch):
        return (lambda: batch), (lambda name: ())

    def training_step(self, batch, batch_idx):
        return self.c(self.a(batch)).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


if __name__ == "__main__":
    torch.set_num_threads(1)
    placement_module.measure = measure
    PlacementPlan.save, CostModel.save = counted(PlacementPlan.save), counted(CostModel.save)
    results = {}
    # The same processes fit again: an explicit plan beside auto's prediction, measured on rank 0 alone too; and auto
    # where measuring fails on rank 0.
    for name, placement in [("auto", StagePlacement("auto", save_dir=sys.argv[1] + "/run")),
                            ("predict", StagePlacement({"a": "cpu", "c": "cpu"}, predict=True)),
                            ("failing", StagePlacement("auto"))]:
        measured.clear()
        failing = name == "failing"
        trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=1, logger=False,
                             enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                             default_root_dir=sys.argv[1], callbacks=[placement])
        try:
            trainer.fit(TwoStages(), torch.utils.data.DataLoader(torch.randn(8, 4), batch_size=2))
            error = None
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
        results[name] = {"summary": placement.summary, "measured": list(measured), "saved": list(saved),
                         "error": error}
    with open(f"{sys.argv[1]}/rank{trainer.global_rank}.json", "w") as f:
        json.dump(results, f)
    # Three fits, the last failing, leave the process group to the interpreter's exit, where its teardown aborted
    # now and then ("terminate called without an active exception") with both results written: ended here instead.
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
'''


def test_under_ddp_rank_0_plans_for_every_rank_and_alone_saves_the_plan(tmp_path):
    """Before, each rank measured, solved and placed its own plan, and wrote the run's files over the others': the
    saved plan was whichever rank wrote last, not always the one rank 0's summary gave. An explicit plan with
    predict=True was measured on every rank too, each summarising its own timings."""
    from test_ddp import run_two_ranks

    run_two_ranks(AUTO_PER_RANK, tmp_path)
    runs = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    predicted = [rank["predict"] for rank in runs]
    assert [rank["measured"] for rank in predicted] == [[0], []]
    assert predicted[0]["summary"] == {"method": "explicit", "predicted_step_time_ms": 2000.0,
                                       "auto_predicted_step_time_ms": 2000.0, "auto.a": "cpu", "auto.c": "cpu"}
    assert predicted[1]["summary"] == predicted[0]["summary"]  # rank 0's times, broadcast
    # Before, rank 0 broadcast the exception itself: rank 1 got a broken connection (rank 0 failed to pickle it) or,
    # with one that pickles, a TypeError unpickling it.
    failed = [rank["failing"] for rank in runs]
    assert failed[0]["error"] == "StageFailed: stage a failed"
    assert failed[1]["error"].startswith("RuntimeError: hetrain: placement failed on global rank 0 with StageFailed: "
                                         "stage a failed; its traceback")
    assert 'raise StageFailed("stage a failed", "a")' in failed[1]["error"]
    ranks = [rank["auto"] for rank in runs]
    assert ranks[0]["summary"] == {"method": "chain-dp", "predicted_step_time_ms": 2000.0, "micro_batches": 1,
                                   "plan.a": "cpu", "plan.c": "cpu"}
    assert ranks[1]["summary"] == ranks[0]["summary"]  # rank 0's plan, broadcast
    assert [rank["measured"] for rank in ranks] == [[0], []]
    assert [len(rank["saved"]) for rank in ranks] == [2, 0]  # the plan and the costs, once
    saved = PlacementPlan.load(tmp_path / "run" / "placement_plan.yaml")
    assert saved.devices == {"a": "cpu", "c": "cpu"} and saved.predicted_step_time == 2.0
    assert CostModel.load(tmp_path / "run" / "placement_costs.json").compute == [[1.0, 3.0], [1.0, 3.0]]
    assert sorted(path.name for path in (tmp_path / "run").iterdir()) == ["placement_costs.json",
                                                                          "placement_plan.yaml"]


class TiedLM(pl.LightningModule):
    """An embedding tied to the output head (stages emb, body, head), as language models tie them."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.body, self.head = torch.nn.Embedding(50, 8), torch.nn.Linear(8, 8), torch.nn.Linear(8, 50)
        self.head.weight = self.emb.weight

    def stages(self) -> dict[str, torch.nn.Module]:
        return {"emb": self.emb, "body": self.body, "head": self.head}

    def placement_inputs(self, batch):
        return (lambda: batch), (lambda name: ())

    def training_step(self, batch, batch_idx):
        return self.head(self.body(self.emb(batch))).logsumexp(-1).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_auto_never_splits_stages_that_share_a_parameter(tmp_path, monkeypatch):
    """The reviewer's costs: the lookup cheap on the CPU, the matmuls fast on the GPU. Before, auto put the embedding
    on the CPU and the tied head on cuda:0, a plan place() refuses on a GPU machine (here cuda:0 falls back to the
    CPU, so the plan is read from the summary)."""
    from hetrain.callbacks import placement as placement_module
    from hetrain.placement.pipeline import shared_across_devices

    def measure_two_devices(stages, make_input, devices, extra_args, **kwargs):
        cpu = measure(stages, make_input, ["cpu"], extra_args, **kwargs)  # finds the tied stages as place() does
        return dataclasses.replace(cpu, devices=["cpu", "cuda:0"], compute=[[0.001, 0.004], [0.05, 0.002],
                                   [0.08, 0.003]], bandwidth=[[INF, 1e10], [1e10, INF]])

    monkeypatch.setattr(placement_module, "measure", measure_two_devices)
    placement, model = StagePlacement("auto"), TiedLM()
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, callbacks=[placement],
                         default_root_dir=tmp_path)
    trainer.fit(model, torch.utils.data.DataLoader(torch.randint(0, 50, (8, 4)), batch_size=4))
    plan = {key.removeprefix("plan."): device for key, device in placement.summary.items() if key.startswith("plan.")}
    assert plan == {"emb": "cuda:0", "body": "cuda:0", "head": "cuda:0"}
    assert shared_across_devices(list(model.stages().items()), plan) == []


def simulate_gpus(monkeypatch, current: int) -> None:
    """Two visible GPUs with ``cuda:current`` this process's (DDP rank ``current``: Lightning makes its root device
    current), on a machine without any: only device names are resolved, nothing is allocated."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current)


class DDPRank:
    """What StagePlacement reads of a Trainer under ``world_size`` processes (two by default), one GPU each
    (``root``: its root device, by default ``cuda:rank``). ``refused_elsewhere``: another process refused the plan
    (the strategy's reduction of the processes' decisions says so)."""

    def __init__(self, rank: int, root: torch.device | None = None, refused_elsewhere: bool = False,
                 world_size: int = 2) -> None:
        self.world_size = world_size

        def any_process(decision: bool, all: bool = True) -> bool:  # the strategy's argument names
            assert not all
            return decision or refused_elsewhere

        self.strategy = SimpleNamespace(root_device=torch.device("cuda", rank) if root is None else root,
                                        reduce_boolean_decision=any_process)
        self.precision_plugin = SimpleNamespace(forward_context=contextlib.nullcontext)


OLD_PLAN = "plan:\n  embeddings: cpu\n  encoder: cuda:0\n  classifier: cuda:0\nmethod: chain-dp\n"  # bert_split's


def test_under_ddp_a_plan_putting_a_stage_on_another_process_gpu_is_refused(monkeypatch, tmp_path):
    """The bert_split recipe placed its stages on cuda:0, and the README runs it with trainer.devices=2
    +trainer.strategy=ddp: rank 1 put its stages on rank 0's GPU. Refused, naming the stages, the process's own GPU
    and the plan file, saying to write cuda."""
    from hetrain.models.bert import BertClassifier

    (tmp_path / "plan.yaml").write_text(OLD_PLAN)
    model = BertClassifier(hidden=16, layers=1, heads=2)
    simulate_gpus(monkeypatch, current=1)
    placement = StagePlacement(str(tmp_path / "plan.yaml"))
    with pytest.raises(ValueError, match=rf"under 2 processes \(DDP\) the placement plan read from "
                                         rf"{tmp_path / 'plan.yaml'} puts encoder.0, classifier on cuda:0, not on this "
                                         rf"process's devices: .* This process's own GPU is cuda:1: write cuda \(each "
                                         rf"process's own GPU\) or cpu for those stages"):
        placement._place(DDPRank(1), model)
    assert next(model.parameters()).device.type == "cpu" and placement.devices is None  # refused before moving


def test_under_ddp_each_process_refuses_when_one_does(monkeypatch):
    """cuda:0 is rank 0's own GPU, so rank 0 alone would accept the plan rank 1 refuses, and train on while rank 1
    stopped: every process stops."""
    from hetrain.models.bert import BertClassifier

    simulate_gpus(monkeypatch, current=0)
    placement, model = StagePlacement({"": "cuda:0"}), BertClassifier(hidden=16, layers=1, heads=2)
    stages = list(model.stages())
    assert set(placement._resolved_in_this_process(DDPRank(0), stages).values()) == {torch.device("cuda", 0)}
    with pytest.raises(ValueError, match=r"another process \(DDP\) refused the placement plan"):
        placement._resolved_in_this_process(DDPRank(0, refused_elsewhere=True), stages)


def test_under_ddp_cuda_resolves_to_each_process_own_gpu(monkeypatch):
    """A plan writing cuda puts each process's stages on its own GPU, the trainer's root device."""
    simulate_gpus(monkeypatch, current=1)
    devices = StagePlacement({"a": "cpu", "b": "cuda"})._resolved_in_this_process(DDPRank(1), ["a", "b"])
    assert devices == {"a": torch.device("cpu"), "b": torch.device("cuda", 1)}


def test_under_ddp_without_gpus_an_older_plan_naming_cuda_0_falls_back(monkeypatch, tmp_path, caplog):
    """CPU-only DDP with a plan an older run saved (cuda:0): the GPU is absent, so its stages go to the fallback, as
    in one process. Before, the plan was refused for naming a GPU by index, one that is no process's here."""
    from hetrain.models.bert import BertClassifier

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    (tmp_path / "plan.yaml").write_text(OLD_PLAN)
    placement, model = StagePlacement(str(tmp_path / "plan.yaml")), BertClassifier(hidden=16, layers=1, heads=2)
    with caplog.at_level(logging.INFO, logger="hetrain.callbacks.placement"):
        placement._place(DDPRank(0, root=torch.device("cpu")), model)
    assert set(placement.devices.values()) == {torch.device("cpu")}
    assert "placement: cuda:0 not present; encoder, classifier -> cpu" in caplog.text


def test_under_ddp_with_a_cpu_accelerator_a_plan_naming_cuda_falls_back(monkeypatch, caplog):
    """trainer.accelerator=cpu under DDP on a machine with GPUs (tests/test_ddp.py's bert_split runs): cuda is the
    process's own GPU, and none has one, so its stages go to the fallback, said in one log line. Before, cuda resolved
    to cuda:0 and every process refused the plan, quoting cuda:0, which the plan never wrote."""
    from hetrain.models.bert import BertClassifier

    simulate_gpus(monkeypatch, current=0)
    placement = StagePlacement({"embeddings": "cpu", "encoder": "cuda", "classifier": "cuda"})
    with caplog.at_level(logging.INFO, logger="hetrain.callbacks.placement"):
        placement._place(DDPRank(1, root=torch.device("cpu")), BertClassifier(hidden=16, layers=1, heads=2))
    assert set(placement.devices.values()) == {torch.device("cpu")}
    assert ("placement: cuda is no process's own under 2 processes on the CPU (trainer.accelerator=cpu); encoder, "
            "classifier -> cpu") in caplog.text


@pytest.mark.parametrize(("root", "world_size", "placed"), [
    ("cuda:1", 2, "cuda:1"),  # each process's own GPU
    ("cpu", 1, "cuda:0"),  # one process on the CPU may put stages on the GPU: the heterogeneous case
])
def test_a_plan_naming_cuda_puts_stages_on_the_process_gpu(monkeypatch, root, world_size, placed):
    simulate_gpus(monkeypatch, current=1 if root == "cuda:1" else 0)
    rank = DDPRank(0, root=torch.device(root), world_size=world_size)
    devices = StagePlacement({"a": "cpu", "b": "cuda"})._resolved_in_this_process(rank, ["a", "b"])
    assert devices == {"a": torch.device("cpu"), "b": torch.device(placed)}


@pytest.mark.parametrize(("plan", "collective"), [({"a": "cpu", "b": "cuda"}, False), ({"a": "cpu"}, False),
                                                  ({"a": "cpu", "b": "cuda:0"}, True)])
def test_processes_reduce_their_decisions_only_where_a_gpu_named_by_index_can_make_them_differ(monkeypatch, plan,
                                                                                               collective):
    """Every DDP fit with a placement ran a collective at fit start to agree on the refusal; only a GPU named by
    index is one process's own and not another's, so only then can their decisions differ."""
    simulate_gpus(monkeypatch, current=0)
    rank, reductions = DDPRank(0, root=torch.device("cuda:0")), []
    reduce = rank.strategy.reduce_boolean_decision
    rank.strategy.reduce_boolean_decision = lambda decision, all=True: reductions.append(decision) or reduce(
        decision, all=all)
    StagePlacement(plan)._resolved_in_this_process(rank, list(plan))
    assert reductions == ([False] if collective else [])


@pytest.mark.parametrize("root", ["cpu", "cuda:1"])
def test_under_ddp_a_plan_naming_cuda_0_off_the_process_gpu_is_refused_as_written(monkeypatch, root):
    """cuda:0 is the same GPU in every process: on CPU root devices (trainer.accelerator=cpu) it is no process's own,
    and unlike cuda it says which GPU, so it is refused, quoted as the plan wrote it, not sent to the fallback."""
    from hetrain.models.bert import BertClassifier

    simulate_gpus(monkeypatch, current=1 if root == "cuda:1" else 0)
    placement = StagePlacement({"embeddings": "cpu", "encoder": "cuda:0", "classifier": "cuda:0"})
    with pytest.raises(ValueError, match=r"under 2 processes \(DDP\) the placement plan puts encoder.0, classifier on "
                                         r"cuda:0, not on this process's devices"):
        placement._place(DDPRank(1, root=torch.device(root)), BertClassifier(hidden=16, layers=1, heads=2))
    assert placement.devices is None


def test_under_ddp_auto_names_its_gpu_cuda_so_each_rank_places_on_its_own(monkeypatch):
    """Before, rank 0 measured every visible GPU and broadcast cuda:0 / cuda:1 by name: every rank placed its stages
    on the GPUs rank 0 chose, rank 1's on rank 0's."""
    from hetrain.callbacks import placement as placement_module
    from hetrain.callbacks.placement import RunCosts, _time_stages
    from hetrain.placement import resolve_plan
    from hetrain.placement.plan import refuse_other_processes_devices

    measured = []

    def measure_own_devices(stages, make_input, devices, extra_args, **kwargs):
        measured.append(list(devices))
        gpus = len(devices) - 1
        return CostModel(list(stages), list(devices), [[1.0] + [0.1] * gpus] * 2, [64, 8],
                         [[INF if a == b else 1e9 for b in devices] for a in devices])

    monkeypatch.setattr(placement_module, "measure", measure_own_devices)
    simulate_gpus(monkeypatch, current=0)  # rank 0 measures and solves
    module = SimpleNamespace(stages=lambda: {"a": torch.nn.Linear(2, 2), "c": torch.nn.Linear(2, 2)})
    plan = RunCosts(_time_stages(DDPRank(0), module, lambda: torch.randn(2, 2), lambda name: ())).best_plan()
    assert measured == [["cpu", "cuda"]] and plan.devices == {"a": "cuda", "c": "cuda"}
    simulate_gpus(monkeypatch, current=1)  # rank 1 places the plan it was sent, on its own GPU
    devices = resolve_plan(plan.devices, ["a", "c"])[0]
    assert devices == {"a": torch.device("cuda", 1), "c": torch.device("cuda", 1)}
    refuse_other_processes_devices(plan.devices, devices, DDPRank(1).strategy.root_device, processes=2)
