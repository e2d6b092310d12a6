"""A real sweep on the session's local Ray: Tune -> Ray Train -> DeepSpeed, ASHA, TensorBoard, best export.

The session's `interrupted_sweep` (testkit.sweeps: jobs/tune.py interrupted after its first trial,
then resumed): three trials of the tiny stage (12 steps, a validation and a report every 4 steps,
one worker of 0.5 CPU, one at a time). The grid puts a learning rate too small to learn last, so
when it reaches ASHA's first rung (step 4) the others are already recorded there and it is
stopped. Here the finished sweep is run again in-process (Tune restores it and reruns nothing),
and a different config in the same directory is refused.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import os
import time

import pytest
from testkit.sweeps import BAD_LR, GOOD_LR, MIDDLE_LR, STEPS, sweep_settings, trial_in_a_finished_run_dir
from testkit.training import event_accumulator

from moe import load_export
from moe_platform.tune import ParamSpec, TuneConfigError, prepare_sweep, run_sweep
from moe_platform.tune.hparams import read_sessions
from moe_platform.tune.results import FINISHED, STOPPED_EARLY

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def finished_sweep(interrupted_sweep):
    """(base stage, plan, result): the session's finished sweep, summarised again in-process."""
    base, tune = sweep_settings(interrupted_sweep)
    plan = prepare_sweep(base, tune)
    return base, plan, run_sweep(plan)


def test_asha_stops_the_trial_that_cannot_learn(finished_sweep):
    _, _, result = finished_sweep
    assert result.complete and len(result.rows) == 3
    by_lr = {row.params["trainer.lr"]: row for row in result.rows}
    assert by_lr[BAD_LR].status == STOPPED_EARLY and by_lr[BAD_LR].steps < STEPS
    assert result.best is not None and result.best.params["trainer.lr"] == GOOD_LR
    assert result.best.status == FINISHED and result.best.steps == STEPS
    assert result.best.last_metric < by_lr[BAD_LR].last_metric - 0.3
    assert result.rows[0] is result.best  # best first


def test_results_table_files_and_plot(finished_sweep):
    _, plan, result = finished_sweep
    with open(os.path.join(plan.output_dir, "results.csv")) as fh:
        rows = list(csv.DictReader(fh))
    assert {row["trial_id"] for row in rows} == {row.trial_id for row in result.rows}
    assert {"trainer.lr", "model.moe.top_k", "best_val/loss", "steps", "stopped_early"} <= set(rows[0])
    assert any(row["stopped_early"] == "True" for row in rows)
    with open(os.path.join(plan.output_dir, "results.json")) as fh:
        data = json.load(fh)
    assert data["best_trial"] == result.best.trial_id and data["complete"] is True
    with open(os.path.join(plan.output_dir, "curves.png"), "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    summary = result.summary()
    assert "stopped early" in summary and f"tensorboard --logdir {plan.trials_dir}" in summary


def test_tensorboard_has_hparams_and_training_curves_per_trial(finished_sweep):
    _, plan, result = finished_sweep
    sessions = read_sessions(plan.trials_dir)
    assert {run.split("/")[0] for run in sessions} == {row.trial_id for row in result.rows}
    assert sorted(values["trainer.lr"] for values in sessions.values()) == sorted([GOOD_LR, MIDDLE_LR, BAD_LR])
    best_run = event_accumulator(os.path.join(result.best.run_dir, "tensorboard"))
    assert [event.step for event in best_run.Scalars("val/loss")] == [4, 8, 12]
    assert "train/loss" in best_run.Tags()["scalars"] and "tune/best_metric" in best_run.Tags()["scalars"]
    assert "_hparams_/session_start_info" in best_run.PluginTagToContent("hparams")
    assert "_hparams_/experiment" in event_accumulator(plan.trials_dir).PluginTagToContent("hparams")


def test_best_trial_is_exported_and_loads(finished_sweep):
    _, plan, result = finished_sweep
    assert result.best_export_dir == os.path.join(plan.best_dir, "export")
    model = load_export(result.best_export_dir)
    assert model.config.moe.top_k == result.best.params["model.moe.top_k"]
    with open(os.path.join(plan.best_dir, "params.json")) as fh:
        assert json.load(fh)["params"]["trainer.lr"] == GOOD_LR
    with open(os.path.join(plan.best_dir, "overrides.txt")) as fh:
        assert f"trainer.lr={GOOD_LR!r}" in fh.read().split()
    with open(os.path.join(plan.best_dir, "stage.json")) as fh:
        assert json.load(fh)["trainer"]["lr"] == GOOD_LR


def test_running_a_finished_sweep_again_reruns_no_trial(finished_sweep, interrupted_sweep):
    base, plan, result = finished_sweep
    # The resumed job's own summary: the in-process one read the same trials back.
    ran = interrupted_sweep.results["trials"]
    assert [(row.trial_id, row.status, row.last_metric) for row in result.rows] == \
        [(trial["trial_id"], trial["status"], trial["last_metric"]) for trial in ran]
    progress = {row.trial_id: _mtime(os.path.join(row.run_dir, "checkpoints")) for row in result.rows}
    started = time.monotonic()
    again = run_sweep(prepare_sweep(base, plan.tune))
    assert time.monotonic() - started < 60  # restored from Tune's saved state, nothing trained
    assert [(row.trial_id, row.status, row.last_metric) for row in again.rows] == \
        [(row.trial_id, row.status, row.last_metric) for row in result.rows]
    assert {row.trial_id: _mtime(os.path.join(row.run_dir, "checkpoints")) for row in again.rows} == progress


def test_a_trial_resumed_after_its_last_checkpoint_reports_it_again(finished_sweep, tmp_path):
    """Ctrl-C can land after a trial's last checkpoint but before Tune records the trial as finished.
    Resumed, the trial trains nothing; it must still give Tune its metric, or Tune fails the sweep."""
    import testkit.sweeps
    from ray import cloudpickle, tune

    cloudpickle.register_pickle_by_value(testkit.sweeps)  # Ray's workers cannot import the tests' helpers
    base, plan, result = finished_sweep
    row = next(row for row in result.rows if row.status == FINISHED)
    trainable = tune.with_parameters(trial_in_a_finished_run_dir, finished_run_dir=row.run_dir, base=plan.base,
                                     trials_dir=str(tmp_path / "trials"))
    grid = tune.Tuner(
        tune.with_resources(trainable, {"cpu": 0.01}),
        param_space=row.params,
        tune_config=tune.TuneConfig(metric=plan.tune.metric, mode=plan.tune.mode),
        run_config=tune.RunConfig(storage_path=str(tmp_path / "experiment")),
    ).fit()
    assert not grid.errors
    assert grid[0].metrics[plan.tune.metric] == pytest.approx(row.last_metric)
    assert grid[0].metrics["step"] == STEPS
    resumed = tmp_path / "trials" / grid[0].metrics["trial_id"] / "checkpoints"
    assert sorted(os.listdir(resumed)) == sorted(os.listdir(os.path.join(row.run_dir, "checkpoints")))


def test_a_different_sweep_in_the_same_directory_is_refused(finished_sweep):
    base, plan, _ = finished_sweep
    space = [ParamSpec(key="trainer.lr", kind="grid", values=[GOOD_LR, MIDDLE_LR]),
             ParamSpec(key="model.moe.top_k", kind="choice", values=[1, 2])]
    other = dataclasses.replace(plan.tune, space=space)
    with pytest.raises(TuneConfigError, match=r"holds a sweep with a different config \(tune.space.trainer.lr.values="):
        run_sweep(prepare_sweep(base, other))
    longer = dataclasses.replace(base, trainer=dataclasses.replace(base.trainer, max_steps=16))
    with pytest.raises(TuneConfigError, match=r"different config \(trainer.max_steps=12 there, 16 now\)"):
        run_sweep(prepare_sweep(longer, plan.tune))


def _mtime(directory: str) -> dict[str, float]:
    return {name: os.path.getmtime(os.path.join(directory, name)) for name in sorted(os.listdir(directory))}
