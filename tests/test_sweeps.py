"""Sweeps (train.py -m) as a user runs them: a metric the sweeper cannot get, a signal, a rerun into the same
directory. Each job trains a one-layer model for two steps, so a sweep takes a few seconds."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra.core.utils import JobReturn, JobStatus
from hydra.types import RunMode
from omegaconf import OmegaConf
from pytorch_lightning.utilities.rank_zero import rank_zero_only
from test_train import ROOT, train_py, write_dated

from hetrain.report import EARLIER_CONFIG, SWEEP_ID, SweepSummary, collect_jobs, write_run_summary, write_stopped_sweep

TINY = ["recipe=bert_split", "trainer.val_check_interval=2", "data.train_size=128",
        "data.val_size=32", "model.hidden=32", "model.layers=1", "trainer.num_sanity_val_steps=0",
        "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "data.producers=1"]
TWO_STEPS = "trainer.max_steps=2"
MISSPELT = ("hetrain: optimized_metric=val/accuracy is not a logged metric; choose one of val/acc, val/loss (or "
            "optimized_metric=null where no sweeper optimises it)")


def _rows(sweep: Path) -> list[dict[str, str]]:
    with open(sweep / "summary.csv") as f:
        return list(csv.DictReader(f))


def test_a_misspelt_optimized_metric_fails_the_job_and_keeps_what_it_measured(tmp_path):
    """The job returned None: Optuna ended the sweep with 'Return value must be float-castable. Got None', naming
    neither the setting nor the metrics there are; the basic sweeper called the job ok."""
    sweep = tmp_path / "sweep"
    result = train_py("-m", *TINY, TWO_STEPS, "optimized_metric=val/accuracy,val/acc", f"hydra.sweep.dir={sweep}",
                      cwd=tmp_path)
    assert result.returncode == 1, (result.stdout + result.stderr)[-3000:]
    assert "1 of 2 jobs failed (job 0)" in result.stderr
    misspelt, ok = _rows(sweep)
    assert (misspelt["status"], misspelt["error"]) == ("failed", f"ValueError: {MISSPELT}")
    assert misspelt["steps"] == "2" and float(misspelt["metrics.val/acc"]) >= 0  # the run trained: still reported
    assert ok["status"] == "ok"


def test_a_misspelt_optimized_metric_is_a_warning_in_a_single_run(tmp_path):
    # No sweeper takes a single run's value: the run stays ok, and says what a sweep would fail on.
    result = train_py(*TINY, TWO_STEPS, "optimized_metric=val/accuracy", f"hydra.run.dir={tmp_path}/run", cwd=tmp_path)
    assert result.returncode == 0 and MISSPELT in result.stdout + result.stderr, result.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "ok" and summary["warning"] == MISSPELT


def test_a_sweep_stopped_by_sigterm_lists_the_stopped_job_and_those_it_never_started(tmp_path):
    """Hydra calls no callback for a job that ends the process (SystemExit): the sweep's table lacked the job whose
    row says where to go on from."""
    sweep = tmp_path / "sweep"
    args = [sys.executable, str(ROOT / "train.py"), "-m", *TINY, "threads=1", "trainer.max_steps=2,2000,2",
            f"hydra.sweep.dir={sweep}"]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # as train_py runs it
    with subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True) as process:
        # Job 1 has trained once its first validation saved last.ckpt; it has 2000 steps to go.
        deadline = time.monotonic() + 120
        while not (sweep / "1" / "checkpoints" / "last.ckpt").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, (stdout + stderr)[-3000:]
    assert "Sweep summary" in stdout and "the sweep was stopped in job 1" in stderr, stderr[-3000:]
    assert "job 2 never started" in stderr
    rows = _rows(sweep)
    assert [(r["job"], r["status"]) for r in rows] == [("0", "ok"), ("1", "interrupted"), ("2", "not started")]
    checkpoint = sweep / "1" / "checkpoints" / "interrupted.ckpt"
    assert rows[1]["error"].endswith(f"go on with ckpt_path={checkpoint}") and checkpoint.is_file()
    assert "trainer.max_steps=2" in rows[2]["overrides"].split()  # the job as it would have run, to run it later
    assert "| 1 | " in (sweep / "summary.md").read_text()


@pytest.mark.parametrize("signal_name, code", [("SIGINT", 130), ("SIGTERM", 143)])
def test_a_stopped_jobs_row_names_the_checkpoint_and_counts_steps_and_samples(tmp_path, signal_name, code):
    """A Ctrl-C'd job's row had no error naming the checkpoint to go on from; a SIGTERM'd one's had no steps or
    samples. The signal comes at a chosen step, from inside the job (tests/fixtures/ctrl_c.py)."""
    sweep = tmp_path / "sweep"
    result = train_py("-m", *TINY, "trainer.max_steps=6", "+callbacks.ctrl_c._target_=tests.fixtures.ctrl_c.CtrlCAt",
                      "+callbacks.ctrl_c.steps=[2]", f"+callbacks.ctrl_c.signal_name={signal_name}", "seed=0,1",
                      f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert result.returncode == code, (result.stdout + result.stderr)[-3000:]
    stopped, not_started = _rows(sweep)
    checkpoint = sweep / "0" / "checkpoints" / "interrupted.ckpt"
    assert (stopped["status"], not_started["status"]) == ("interrupted", "not started")
    assert stopped["error"] == f"{signal_name} after 3 steps; go on with ckpt_path={checkpoint}"
    assert checkpoint.is_file()
    assert stopped["steps"] == "3" and int(stopped["samples"]) > 0


@pytest.mark.parametrize("signal_name, code", [("SIGINT", 130), ("SIGTERM", 143)])
def test_a_signal_during_a_jobs_last_step_ends_the_sweep_after_that_job(tmp_path, signal_name, code):
    """GracefulStop lets a fit run to its end on a signal during its last step, and only logged it: the job said ok,
    the sweep went on with the next jobs and exited 0. The job is complete (a single run ends ok); the sweep ends."""
    sweep = tmp_path / "sweep"
    result = train_py("-m", *TINY, TWO_STEPS, "+callbacks.ctrl_c._target_=tests.fixtures.ctrl_c.CtrlCAt",
                      "+callbacks.ctrl_c.steps=[1]", f"+callbacks.ctrl_c.signal_name={signal_name}", "seed=0,1",
                      f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert result.returncode == code, (result.stdout + result.stderr)[-3000:]
    assert "the sweep was stopped in job 0; its row says that it finished; job 1 never started" in result.stderr
    completed, not_started = _rows(sweep)
    assert (completed["status"], completed["steps"], not_started["status"]) == ("ok", "2", "not started")
    assert not (sweep / "0" / "checkpoints" / "interrupted.ckpt").exists()


def test_a_sweep_stopped_by_sigterm_before_training_lists_the_stopped_job_and_those_it_never_started(tmp_path):
    """A SIGTERM before Lightning's handler was in place (here in the fit's setup, beside the data's) killed the
    process: exit 143 with no row for the stopped job nor for those after it."""
    sweep = tmp_path / "sweep"
    result = train_py("-m", *TINY, TWO_STEPS, "+callbacks.sigterm._target_=tests.test_train._SigtermIn",
                      "+callbacks.sigterm.where=setup,none", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert result.returncode == 143, (result.stdout + result.stderr)[-3000:]
    assert "the sweep was stopped in job 0" in result.stderr and "job 1 never started" in result.stderr
    stopped, not_started = _rows(sweep)
    assert (stopped["status"], stopped["error"]) == (
        "interrupted", "SIGTERM before the first training step: nothing trained, nothing saved")
    assert not_started["status"] == "not started" and "+callbacks.sigterm.where=none" in not_started["overrides"]


def test_a_sweep_stopped_by_sigterm_after_a_jobs_fit_lists_the_whole_job_and_those_it_never_started(tmp_path):
    """Raised after the fit (here while train() read the callbacks' summaries), the SIGTERM cut the job's summary
    short: its row said "before the first training step", with no steps, though the job had trained."""
    sweep = tmp_path / "sweep"
    result = train_py("-m", *TINY, TWO_STEPS, "+callbacks.sigterm._target_=tests.test_train._SigtermIn",
                      "+callbacks.sigterm.where=summary,none", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert result.returncode == 143, (result.stdout + result.stderr)[-3000:]
    assert "the sweep was stopped in job 0" in result.stderr and "job 1 never started" in result.stderr
    stopped, not_started = _rows(sweep)
    assert (stopped["status"], stopped["error"], stopped["steps"]) == (
        "interrupted", "SIGTERM after training finished: the summary is complete, the run ends here (exit 143)", "2")
    assert not_started["status"] == "not started" and "+callbacks.sigterm.where=none" in not_started["overrides"]


def test_a_sweep_rerun_into_its_directory_sets_the_earlier_jobs_files_aside(tmp_path):
    """The earlier sweep's best checkpoint stayed beside the new one and its log ran on into the new log. A job
    resuming from a checkpoint in its own directory keeps that directory as it is."""
    sweep = tmp_path / "sweep"
    first = train_py("-m", *TINY, TWO_STEPS, "seed=0,1", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    # Job 0 goes on from its own last checkpoint, job 1 starts afresh.
    resume = f"ckpt_path={sweep}/0/checkpoints/last.ckpt,null"
    second = train_py("-m", *TINY, resume, "trainer.max_steps=4", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    resumed, fresh = (json.loads((sweep / job / "summary.json").read_text()) for job in ("0", "1"))
    assert resumed["resumed"]["at_step"] == 2 and not list((sweep / "0").glob("previous-*"))
    # Its log holds the steps after the resume; that of the part before, which Lightning's CSVLogger deleted, is kept.
    assert {r["step"] for r in csv.DictReader((sweep / "0" / "csv-part1" / "metrics.csv").open())} == {"1"}
    assert {r["step"] for r in csv.DictReader((sweep / "0" / "csv" / "metrics.csv").open())} == {"3"}

    # Each job's config of the earlier sweep is kept: in the files set aside, or beside the resumed job's own.
    assert "seed=0" in (sweep / "0" / ".hydra-part1" / "overrides.yaml").read_text()
    assert resume.split(",")[0] in (sweep / "0" / ".hydra" / "overrides.yaml").read_text()
    (aside,) = (sweep / "1").glob("previous-*")
    assert "seed=1" in (aside / ".hydra" / "overrides.yaml").read_text()
    assert "seed=1" not in (sweep / "1" / ".hydra" / "overrides.yaml").read_text()
    assert fresh["steps"] == 4 and "resumed" not in fresh
    assert sorted(p.name for p in (sweep / "1" / "checkpoints").iterdir()) == sorted(
        ["last.ckpt", Path(fresh["best_model_path"]).name])
    assert Path(fresh["best_model_path"]).parent == sweep / "1" / "checkpoints"
    assert Path(json.loads((aside / "summary.json").read_text())["best_model_path"]).name in {
        p.name for p in (aside / "checkpoints").iterdir()}
    for log in (sweep / "1" / "train.log", aside / "train.log"):
        assert log.read_text().count("Starting training") == 1, log
    assert "held a job of an earlier sweep; moved its checkpoints" in (sweep / "1" / "train.log").read_text()
    assert [r["best_model_path"] for r in _rows(sweep)] == [resumed["best_model_path"], fresh["best_model_path"]]


def _hydra_config(sweep: Path, output_subdir: str | None = ".hydra"):
    """The part of a job's config the sweep callback reads, as Hydra gives it in a sweep's job 0."""
    return OmegaConf.create({"hydra": {"mode": RunMode.MULTIRUN, "output_subdir": output_subdir,
                                       "sweep": {"dir": str(sweep)}, "runtime": {"output_dir": str(sweep / "0")},
                                       "job": {"num": 0}}})


def test_a_rank_that_lightning_launched_leaves_the_sweep_to_rank_0(tmp_path, monkeypatch, capsys):
    """Under DDP, Lightning launches rank 1 with the whole -m command line: its SweepSummary gave the sweep a new id,
    moved rank 0's live train.log of job 0 into previous-<id>/ and printed the table a second time."""
    sweep = tmp_path / "sweep"
    config = _hydra_config(sweep)
    SweepSummary().on_multirun_start(config)  # rank 0
    (sweep / "0").mkdir()  # Hydra makes the job's directory and opens its log before on_job_start
    (sweep / "0" / "train.log").write_text("rank 0 trains\n")
    SweepSummary().on_job_start(config, task_function=None)
    rank_0s = (sweep / SWEEP_ID).read_text()
    monkeypatch.setattr(rank_zero_only, "rank", 1)  # what Lightning reads from LOCAL_RANK=1 in the rank it launched
    rank_1 = SweepSummary()
    rank_1.on_multirun_start(config)
    rank_1.on_job_start(config, task_function=None)
    rank_1.on_job_end(config, JobReturn(status=JobStatus.COMPLETED))
    rank_1.on_multirun_end(config)
    assert (sweep / SWEEP_ID).read_text() == rank_0s and (sweep / "0" / SWEEP_ID).read_text() == rank_0s
    assert sorted(p.name for p in (sweep / "0").iterdir()) == [SWEEP_ID, "train.log"]
    assert not (sweep / "summary.md").exists() and "Sweep summary" not in capsys.readouterr().out


def test_a_rerun_sweep_leaves_in_place_the_log_rank_1_opened_in_a_job_before_rank_0_got_there(tmp_path):
    """Under DDP, rank 1 runs ahead into the next job: in a sweep rerun into its directory it had opened that job's
    train_ddp_process_1.log before rank 0's on_job_start moved the earlier sweep's files aside, that log with them."""
    sweep = tmp_path / "sweep"
    earlier = ["checkpoints/last.ckpt", "summary.json", "train.log", "train_ddp_process_1.log"]
    write_dated(sweep / "0", [*earlier, ".hydra/config.yaml"], time.time() - 3600)
    (sweep / "0" / SWEEP_ID).write_text("0123456789abcdef\n")
    config = _hydra_config(sweep)
    SweepSummary().on_multirun_start(config)
    (sweep / "0" / "train_ddp_process_1.log").write_text("rank 1 trains\n")  # this sweep's rank 1, before rank 0
    SweepSummary().on_job_start(config, task_function=None)
    job = sweep / "0"
    assert sorted(p.name for p in job.iterdir()) == [SWEEP_ID, ".hydra", "previous-01234567",
                                                      "train_ddp_process_1.log"]
    assert (job / "train_ddp_process_1.log").read_text() == "rank 1 trains\n"
    assert sorted(str(p.relative_to(job / "previous-01234567")) for p in (job / "previous-01234567").rglob("*")
                  if p.is_file()) == sorted([*earlier[:3], ".hydra/config.yaml"])


def _job_config(job: Path, num: int, overrides: str) -> None:
    """The config folder Hydra writes into a job's directory when the job starts, before any callback of the job."""
    (job / ".hydra").mkdir(parents=True, exist_ok=True)
    (job / ".hydra" / "hydra.yaml").write_text(f"hydra:\n  job:\n    num: {num}\n    name: train\n")
    (job / ".hydra" / "overrides.yaml").write_text(f"- {overrides}\n")


def test_a_sweep_rerun_into_its_directory_keeps_the_earlier_jobs_configs(tmp_path):
    """Hydra rewrites a job's .hydra/ before on_job_start: the earlier sweep's overrides and config of every job the
    new sweep reached were lost, its checkpoints and summary set aside without them."""
    sweep = tmp_path / "sweep"
    for num in range(3):  # the earlier sweep's three jobs
        _job_config(sweep / str(num), num, f"seed={num}")
        write_dated(sweep / str(num), ["checkpoints/last.ckpt", "summary.json"], time.time() - 3600)
        (sweep / str(num) / SWEEP_ID).write_text("0123456789abcdef\n")
    fresh, resumed = _hydra_config(sweep), _hydra_config(sweep)
    resumed.hydra.runtime.output_dir, resumed.hydra.job.num = str(sweep / "1"), 1
    resumed.ckpt_path = str(sweep / "1" / "checkpoints" / "last.ckpt")  # job 1 goes on in place
    summary = SweepSummary()
    summary.on_multirun_start(fresh)
    for config, overrides in ((fresh, "seed=5"), (resumed, f"ckpt_path={resumed.ckpt_path}")):
        job = Path(config.hydra.runtime.output_dir)
        _job_config(job, config.hydra.job.num, overrides)
        summary.on_job_start(config, task_function=None)
        write_run_summary({"status": "ok"}, job)
    summary.on_multirun_end(fresh)  # the new sweep has two jobs

    earlier = sweep / "0" / "previous-01234567"
    assert (earlier / ".hydra" / "overrides.yaml").read_text() == "- seed=0\n" and (earlier / "summary.json").exists()
    assert (sweep / "0" / ".hydra" / "overrides.yaml").read_text() == "- seed=5\n"
    # The resumed job keeps its files in place, and the earlier part's config beside its own.
    assert (sweep / "1" / ".hydra-part1" / "overrides.yaml").read_text() == "- seed=1\n"
    assert not list((sweep / "1").glob("previous-*")) and (sweep / "1" / "checkpoints" / "last.ckpt").exists()
    # A job the new sweep did not reach keeps its config in place, and no copy of it.
    assert (sweep / "2" / ".hydra" / "overrides.yaml").read_text() == "- seed=2\n"
    assert sorted(p.name for p in (sweep / "2").iterdir()) == sorted([".hydra", SWEEP_ID, "checkpoints",
                                                                      "summary.json"])
    assert [(r["job"], r["status"]) for r in collect_jobs(sweep)] == [(0, "ok"), (1, "ok")]


def test_a_sweep_rerun_into_its_directory_sets_the_earlier_table_and_sweep_config_aside(tmp_path):
    """The new sweep rewrote summary.csv/.md and Hydra its multirun.yaml: the earlier sweep's table was lost, its
    jobs' files kept in each job's previous-<id>/ with nothing listing them."""
    sweep = tmp_path / "sweep"
    _job_config(sweep / "0", 0, "seed=0")
    (sweep / "0" / SWEEP_ID).write_text("0123456789abcdef\n")
    (sweep / SWEEP_ID).write_text("0123456789abcdef\n")
    earlier = {"summary.csv": "job,status\n0,ok\n", "summary.md": "| job |\n", "multirun.yaml": "hydra: {}\n"}
    for name, text in earlier.items():
        (sweep / name).write_text(text)
    config = _hydra_config(sweep)
    SweepSummary().on_multirun_start(config)
    aside = sweep / "previous-01234567"
    assert {p.name: p.read_text() for p in aside.iterdir()} == earlier
    assert not any((sweep / name).exists() for name in earlier)
    assert (sweep / SWEEP_ID).read_text() != "0123456789abcdef\n"
    # A sweep that left no id (run without SweepSummary) has its table set aside too, numbered: it would be rewritten.
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "summary.csv").write_text("mine\n")
    SweepSummary().on_multirun_start(_hydra_config(plain))
    assert (plain / "previous-1" / "summary.csv").read_text() == "mine\n" and not (plain / "summary.csv").exists()


def test_under_torchrun_the_multirun_yaml_another_rank_of_this_sweep_wrote_stays(tmp_path, monkeypatch):
    """All ranks run the -m command at once: rank 1's sweeper saved this sweep's multirun.yaml before rank 0's
    on_multirun_start, which filed it as the earlier sweep's."""
    sweep = tmp_path / "sweep"
    earlier = time.time() - 3600
    write_dated(sweep, ["summary.csv", "multirun.yaml"], earlier)
    (sweep / SWEEP_ID).write_text("0123456789abcdef\n")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "sweep")
    (sweep / "multirun.yaml").write_text("# this sweep's, from rank 1\n")  # newer than this process
    SweepSummary().on_multirun_start(_hydra_config(sweep))
    assert (sweep / "multirun.yaml").read_text() == "# this sweep's, from rank 1\n"
    assert sorted(p.name for p in (sweep / "previous-01234567").iterdir()) == ["summary.csv"]


def test_a_stopped_sweep_leaves_no_copy_of_the_config_in_the_jobs_it_did_not_reach(tmp_path):
    """A sweep a signal or a DDP failure ends (write_stopped_sweep; Hydra calls no on_multirun_end) left a copy of
    its own config (.hetrain_earlier_config/) in every job directory of the earlier sweep it had not reached."""
    sweep = tmp_path / "sweep"
    for num in range(3):  # the earlier sweep's three jobs
        _job_config(sweep / str(num), num, f"seed={num}")
        (sweep / str(num) / SWEEP_ID).write_text("0123456789abcdef\n")
    config = _hydra_config(sweep)
    # Not Hydra's basic sweeper and launcher: no rows for the jobs not started, which need its multirun.yaml.
    config.hydra.sweeper, config.hydra.launcher = {"_target_": None}, {"_target_": None}
    summary = SweepSummary()
    summary.on_multirun_start(config)
    _job_config(sweep / "0", 0, "seed=5")
    summary.on_job_start(config, task_function=None)
    # A parallel launcher's next job: Hydra rewrote its config, its on_job_start is still to come.
    _job_config(sweep / "1", 1, "seed=6")
    write_stopped_sweep(config.hydra)  # the signal, in job 0

    assert not (sweep / "2" / EARLIER_CONFIG).exists()  # not reached: its config is in place
    assert (sweep / "2" / ".hydra" / "overrides.yaml").read_text() == "- seed=2\n"
    assert (sweep / "1" / EARLIER_CONFIG / "overrides.yaml").read_text() == "- seed=1\n"  # the only record left
    (aside,) = (sweep / "0").glob("previous-*")
    assert (aside / ".hydra" / "overrides.yaml").read_text() == "- seed=0\n"


def test_a_sweep_that_saves_no_job_configs_is_refused_and_another_config_folder_is_read(tmp_path):
    """With hydra.output_subdir=null the table found no job: every job failed, the table was empty, the sweep
    exited 0. Another folder name was not looked for either."""
    with pytest.raises(SystemExit, match="hydra.output_subdir=null leaves the sweep's jobs without"):
        SweepSummary().on_multirun_start(_hydra_config(tmp_path / "sweep", output_subdir=None))
    assert not (tmp_path / "sweep").exists()  # refused before anything was written

    job = tmp_path / "sweep" / "0"
    (job / "cfg").mkdir(parents=True)
    (job / "cfg" / "hydra.yaml").write_text("hydra:\n  job:\n    num: 0\n    name: train\n")
    (job / "cfg" / "overrides.yaml").write_text("- seed=0\n")
    (record,) = collect_jobs(tmp_path / "sweep", "cfg")
    assert (record["job"], record["overrides"], record["status"]) == (0, "seed=0", "no summary")


def test_a_ddp_sweep_ends_after_a_failed_job_and_names_the_rank_that_failed(tmp_path):
    """The failed job's process group stayed initialised with a broken connection: every later job failed at once
    with gloo's "Connection reset by peer", and the failed job's row gave rank 0's error, which names no cause."""
    sweep = tmp_path / "sweep"
    result = train_py("-m", "recipe=bert_split", "trainer.accelerator=cpu", "trainer.devices=2",
                      "+trainer.strategy=ddp", "trainer.max_steps=3", "trainer.val_check_interval=3",
                      "data.train_size=64", "data.val_size=16", "callbacks.memory_profiler=null",
                      "callbacks.progress_bar=null", "+callbacks.fail_at._target_=tests.fixtures.fail_at.FailAt",
                      "+callbacks.fail_at.step=1", "+callbacks.fail_at.rank=1,5", f"hydra.sweep.dir={sweep}",
                      cwd=ROOT)
    assert result.returncode == 1, (result.stdout + result.stderr)[-3000:]
    failed, not_started = _rows(sweep)
    assert (failed["status"], failed["error"]) == (
        "failed", "another rank failed: train_ddp_process_1.log: RuntimeError: failure injected on rank 1 at step 1")
    assert (not_started["status"], not_started["error"]) == (
        "not started", "not started: a DDP job failed and left its process group broken; rerun these jobs")
    assert "+callbacks.fail_at.rank=5" in not_started["overrides"].split()


DDP_SWEEP = ["recipe=bert_split", "trainer.accelerator=cpu", "trainer.devices=2", "+trainer.strategy=ddp", TWO_STEPS,
             "trainer.val_check_interval=2", "data.train_size=64", "data.val_size=16", "model.hidden=16",
             "model.layers=1", "callbacks.memory_profiler=null", "callbacks.progress_bar=null",
             "trainer.num_sanity_val_steps=0"]


def test_a_ddp_sweep_goes_on_after_a_rank_failed_once_its_fit_had_returned(tmp_path):
    """Every rank's fit ended whole and rank 1 went on to the next job: rank 0, told through the store, is to fail
    the job and go on with it, not end the sweep on a process group no failure broke."""
    sweep = tmp_path / "sweep"
    result = train_py("-m", *DDP_SWEEP, "+callbacks.late._target_=tests.test_train._FailInSummaryOnRank",
                      "+callbacks.late.rank=1,5", f"hydra.sweep.dir={sweep}", cwd=ROOT)
    assert result.returncode == 1, (result.stdout + result.stderr)[-3000:]
    failed, ok = _rows(sweep)
    assert (failed["status"], failed["error"], failed["steps"]) == (
        "failed", "another rank failed: rank 1 (train_ddp_process_1.log): RuntimeError: failure injected on rank 1 "
        "after the fit", "2")
    assert ok["status"] == "ok" and "+callbacks.late.rank=5" in ok["overrides"].split()


@pytest.mark.parametrize("ranks", ["5,1,5", "1,5"])
def test_a_ddp_sweep_ends_after_a_job_that_failed_building_on_one_rank(tmp_path, ranks):
    """build() may fail on one rank alone (a node's file, device or memory): that rank went on to the next job while
    rank 0 trained the failed one, their collectives mixing two jobs' steps; in the sweep's first job too, before
    the process group existed."""
    sweep = tmp_path / "sweep"
    result = train_py("-m", *DDP_SWEEP, "+callbacks.bf._target_=tests.test_train._FailInBuildOnRank",
                      f"+callbacks.bf.rank={ranks}", f"hydra.sweep.dir={sweep}", cwd=ROOT)
    assert result.returncode == 1, (result.stdout + result.stderr)[-3000:]
    *ok, failed, not_started = _rows(sweep)
    assert [row["status"] for row in ok] == ["ok"] * (ranks == "5,1,5")
    # Named from rank 1's log, or, where it failed before rank 0's job began, from what it told the store.
    assert failed["status"] == "failed" and failed["error"].startswith("another rank failed: "), failed
    assert "train_ddp_process_1.log" in failed["error"], failed
    assert failed["error"].endswith("RuntimeError: failure injected on rank 1 in build"), failed
    assert (not_started["status"], not_started["error"]) == (
        "not started", "not started: a DDP job failed and left its process group broken; rerun these jobs")


def test_a_ddp_sweep_goes_on_after_a_job_refused_before_its_fit(tmp_path):
    """A job its config checks refuse (threads=0) fails alike on every rank before any collective, the process group
    left whole: the sweep ended there all the same, its later jobs "not started" with a broken group as the reason."""
    sweep = tmp_path / "sweep"
    result = train_py("-m", *DDP_SWEEP, "threads=1,0,1", f"hydra.sweep.dir={sweep}", cwd=ROOT, threads=None)
    assert result.returncode == 1, (result.stdout + result.stderr)[-3000:]
    assert "1 of 3 jobs failed (job 1)" in result.stderr
    rows = _rows(sweep)
    assert [(r["job"], r["status"]) for r in rows] == [("0", "ok"), ("1", "failed"), ("2", "ok")], rows
    assert rows[1]["error"].startswith("ValueError: hetrain: threads=0 must be a positive whole number")
