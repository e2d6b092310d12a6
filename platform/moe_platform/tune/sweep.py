"""A Ray Tune sweep whose trials are pretraining runs: pre-flight, run or resume, summary, best trial.

    plan = prepare_sweep(base_stage, tune_config)   # every check; no Ray needed
    result = run_sweep(plan)                        # Ray must be initialised
    print(result.summary())

Each trial is a Tune *function trainable* that builds the pretraining
`TorchTrainer` (`moe_platform.train.train`) for the base stage with the trial's
values applied, and forwards its reports to Tune with `TuneReportCallback`: the
supported way to tune Ray Train V2 (`Tuner(trainer)` is deprecated, docs/ray-notes.md).
ASHA acts on the forwarded `tune.metric` at `step` (optimizer steps).

Directory layout (`tune.output_dir`):

    sweep.json              what the sweep searches (tune section + base stage): resuming needs the same
    experiment/             Ray Tune's experiment (state, per-trial progress.csv / result.json / tfevents)
    trials/                 TensorBoard logdir: the HPARAMS experiment summary at its root, and
      <trial_id>/           a trial's run.output_dir: config.json, tensorboard/, checkpoints/
    results.csv, results.json, curves.png     the summary table and every trial's metric curve
    best/                   params.json, overrides.txt, stage.json and export/ of the best trial
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from dataclasses import dataclass
from typing import Any, Optional

from moe_platform.train import StageConfig
from moe_platform.train.plan import load_manifest
from moe_platform.train.trainer import config_differences, prepare_stage, with_current_defaults
from moe_platform.tune import hparams, results
from moe_platform.tune.config import TuneConfig, TuneConfigError
from moe_platform.tune.space import apply_params, check_space, for_trial, hydra_override, param_space, typed_params

log = logging.getLogger(__name__)

SWEEP_FILE = "sweep.json"
EXPERIMENT_NAME = "experiment"
TRIALS_DIR = "trials"
BEST_DIR = "best"
RESULTS_CSV, RESULTS_JSON, CURVES_PNG = "results.csv", "results.json", "curves.png"
# Written into a trial's run dir once its HPARAMS session end is logged (a re-summary must not repeat it).
_SESSION_END_MARKER = "hparams_session_end.json"
# tune keys that may change when an interrupted sweep resumes: they change no trial.
OPERATIONAL_TUNE_KEYS = frozenset({"output_dir", "resume_errored"})
# Tune's trainable only waits for its TorchTrainer; the workers hold the real resources
# (0 CPU is refused, docs/ray-notes.md).
TRAINABLE_CPUS = 0.01
# Ray Data lists and reads files in tasks of one whole CPU (the listing task's request cannot be
# lowered), so trials that leave less than this free in the cluster hang without an error.
DATA_CPUS = 1.0


@dataclass(frozen=True)
class SweepPlan:
    """A checked sweep: the base stage (absolute paths), the tune section and ASHA's max_t."""

    base: StageConfig
    tune: TuneConfig
    max_t: int  # steps
    trial_cpus: float  # CPUs one trial holds: its workers' and its Tune trainable's

    @property
    def cpus_needed(self) -> float:
        """CPUs for max_concurrent_trials trials plus the one Ray Data needs to read."""
        return self.tune.max_concurrent_trials * self.trial_cpus + DATA_CPUS

    @property
    def output_dir(self) -> str:
        return self.tune.output_dir

    @property
    def experiment_dir(self) -> str:
        return os.path.join(self.output_dir, EXPERIMENT_NAME)

    @property
    def trials_dir(self) -> str:
        return os.path.join(self.output_dir, TRIALS_DIR)

    @property
    def best_dir(self) -> str:
        return os.path.join(self.output_dir, BEST_DIR)


@dataclass
class SweepResult:
    output_dir: str
    metric: str
    rows: list[results.TrialRow]  # best first
    best: Optional[results.TrialRow]
    best_export_dir: Optional[str]
    complete: bool  # False when the sweep was interrupted with trials left to run

    @property
    def best_dir(self) -> str:
        return os.path.join(self.output_dir, BEST_DIR)

    def summary(self) -> str:
        lines = [results.table(self.rows, self.metric, self.best.trial_id if self.best else None), ""]
        stopped = sum(row.stopped_early for row in self.rows)
        lines.append(f"{len(self.rows)} trials, {stopped} stopped early by ASHA; results: "
                     f"{os.path.join(self.output_dir, RESULTS_CSV)}, {os.path.join(self.output_dir, CURVES_PNG)}")
        lines += [f"trial {row.trial_id} failed: {row.error}" for row in self.rows if row.status == results.ERROR]
        if not self.complete:
            lines.append("the sweep was interrupted: run the same command again to resume it")
        if self.best is not None:
            lines.append(f"best trial {self.best.trial_id} ({self.metric} {self.best.last_metric:.4f}): "
                         + " ".join(hydra_override(key, value) for key, value in self.best.params.items()))
        if self.best_export_dir:
            lines.append(f"best export: {self.best_export_dir}")
        lines.append(f"dashboards: tensorboard --logdir {os.path.join(self.output_dir, TRIALS_DIR)}")
        return "\n".join(lines)


# ---- pre-flight ------------------------------------------------------------------------------


def prepare_sweep(base: StageConfig, tune: TuneConfig) -> SweepPlan:
    """Check the base stage, every searched key and every value combination; no trial starts on a bad space."""
    base, _ = prepare_stage(base)
    facts = check_space(base, tune, load_manifest(base.dataset_dir))
    max_t = tune.max_t or facts.most_steps
    if tune.scheduler == "asha" and tune.grace_period > max_t:
        raise TuneConfigError(
            f"tune.grace_period={tune.grace_period} is longer than the trials ({max_t} steps): "
            "ASHA could never stop one"
        )
    tune = dataclasses.replace(tune, output_dir=os.path.abspath(os.path.expanduser(tune.output_dir)))
    plan = SweepPlan(base=base, tune=tune, max_t=max_t, trial_cpus=facts.most_worker_cpus + TRAINABLE_CPUS)
    check_sweep_dir(plan)
    return plan


def trial_stage(base: StageConfig, params: dict[str, Any], run_dir: str) -> StageConfig:
    """A trial's stage: base + params, reporting at each validation, in its own run directory.
    The sweep exports the best trial itself."""
    stage = for_trial(apply_params(base, params))
    return dataclasses.replace(stage, run=dataclasses.replace(stage.run, output_dir=run_dir, export=False))


# ---- the trainable (runs in a Tune trial actor) ----------------------------------------------------


def run_trial(params: dict[str, Any], *, base: StageConfig, trials_dir: str) -> None:
    """Tune's function trainable: one pretraining run whose reports Tune (and ASHA) receive."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from moe_platform.train import train
    from moe_platform.train.loop import TENSORBOARD_DIR

    trial_id = tune.get_context().get_trial_id()
    values = typed_params(params)
    stage = trial_stage(base, values, os.path.join(trials_dir, trial_id))
    group = ", ".join(hydra_override(key, value) for key, value in sorted(values.items()))
    hparams.write_session_start(os.path.join(stage.run.output_dir, TENSORBOARD_DIR), values, group_name=group)
    result = train(stage, callbacks=(TuneReportCallback(),))
    if result.already_finished:
        # Ctrl-C can land after a trial's last checkpoint but before Tune records the trial as
        # finished. Resumed, it trains nothing and reports nothing, and Tune fails a trial that ends
        # without its metric: hand Tune the last checkpoint's report again.
        tune.report(result.metrics)


def _trial_dirname(trial) -> str:
    return trial.trial_id  # short and stable across resumes; the values are in the trial's config


# ---- the sweep ------------------------------------------------------------------------------------


def run_sweep(plan: SweepPlan) -> SweepResult:
    """Run the sweep in plan.output_dir, or resume the unfinished one there; then summarise it."""
    resuming = claim_sweep_dir(plan)
    if not resuming:  # a resumed sweep's TensorBoard root already holds it
        os.makedirs(plan.trials_dir, exist_ok=True)
        hparams.write_experiment(plan.trials_dir, plan.tune.space, plan.tune.metric)
    tuner = _restored_tuner(plan) if resuming else _new_tuner(plan, concurrency=fit_concurrency(plan))
    tuner.fit()
    return summarize(plan)


def fit_concurrency(plan: SweepPlan) -> int:
    """tune.max_concurrent_trials, lowered (with a warning) to what leaves Ray Data its CPU in this cluster.

    A jobs/tune.py that starts its own local Ray sizes it to plan.cpus_needed, so this only bites on a
    cluster too small for the request (on an autoscaling one: too small right now).
    """
    import ray

    cpus = ray.cluster_resources().get("CPU", 0.0)
    wanted = plan.tune.max_concurrent_trials
    fitting = max(1, int((cpus - DATA_CPUS) // plan.trial_cpus))
    if fitting >= wanted:
        return wanted
    log.warning(
        "tune.max_concurrent_trials=%d trials of %.2f CPUs would leave less than the %.0f CPU Ray Data needs of this "
        "cluster's %.2f CPUs (and hang): running %d at a time; lower trainer.cpus_per_worker to run more",
        wanted, plan.trial_cpus, DATA_CPUS, cpus, fitting,
    )
    return fitting


def sweep(base: StageConfig, tune: TuneConfig) -> SweepResult:
    return run_sweep(prepare_sweep(base, tune))


def sweep_fingerprint(plan: SweepPlan) -> dict[str, Any]:
    """What decides the sweep's trials: the tune section (space keyed by name) and the base stage."""
    tune = {key: value for key, value in dataclasses.asdict(plan.tune).items() if key not in OPERATIONAL_TUNE_KEYS}
    tune["space"] = {spec["key"]: {k: v for k, v in spec.items() if k != "key"} for spec in tune["space"]}
    return {"tune": tune, "base": _without_output_dir(plan.base.to_dict())}


def _without_output_dir(base: dict[str, Any]) -> dict[str, Any]:
    """A base stage dict as the fingerprint holds it: each trial has its own run.output_dir."""
    return {**base, "run": {key: value for key, value in base["run"].items() if key != "output_dir"}}


def check_sweep_dir(plan: SweepPlan) -> None:
    """Raise if tune.output_dir holds a different sweep (or a Tune experiment this platform did not start)."""
    path = os.path.join(plan.output_dir, SWEEP_FILE)
    if not os.path.isfile(path):
        if os.path.isdir(plan.experiment_dir):
            raise TuneConfigError(
                f"tune.output_dir={plan.output_dir} holds a Tune experiment but no {SWEEP_FILE}: "
                "use a new tune.output_dir"
            )
        return
    with open(path) as fh:
        theirs = json.load(fh)
    ours = sweep_fingerprint(plan)
    saved_base = _without_output_dir(with_current_defaults(theirs["base"]))  # keys added since: their defaults
    differences = config_differences(saved_base, ours["base"]) + [
        (f"tune.{key}", before, now) for key, before, now in config_differences(theirs["tune"], ours["tune"])
    ]
    if differences:
        key, before, now = differences[0]
        raise TuneConfigError(
            f"tune.output_dir={plan.output_dir} holds a sweep with a different config ({key}={before!r} there, "
            f"{now!r} now): use a new tune.output_dir, or the same config to resume that sweep"
        )


def claim_sweep_dir(plan: SweepPlan) -> bool:
    """Write sweep.json, or check the one there matches. True when a saved experiment should resume."""
    from ray import tune

    check_sweep_dir(plan)
    path = os.path.join(plan.output_dir, SWEEP_FILE)
    if not os.path.isfile(path):
        os.makedirs(plan.output_dir, exist_ok=True)
        _write_json(path, sweep_fingerprint(plan))
        return False
    resumable = tune.Tuner.can_restore(plan.experiment_dir)
    log.info("%s the sweep in %s", "resuming" if resumable else "restarting (nothing saved yet)", plan.output_dir)
    return resumable


def _trainable(plan: SweepPlan):
    from ray import tune

    with_data = tune.with_parameters(run_trial, base=plan.base, trials_dir=plan.trials_dir)
    return tune.with_resources(with_data, {"cpu": TRAINABLE_CPUS})


def _new_tuner(plan: SweepPlan, *, concurrency: int):
    from ray import tune
    from ray.tune.search import BasicVariantGenerator

    settings = plan.tune
    return tune.Tuner(
        _trainable(plan),
        param_space=param_space(settings),
        tune_config=tune.TuneConfig(
            metric=settings.metric,
            mode=settings.mode,
            scheduler=_scheduler(plan),
            # The generator limits concurrency itself: Tune ignores max_concurrent_trials when given one.
            search_alg=BasicVariantGenerator(random_state=settings.seed, max_concurrent=concurrency),
            num_samples=settings.num_samples,
            trial_dirname_creator=_trial_dirname,
        ),
        run_config=tune.RunConfig(name=EXPERIMENT_NAME, storage_path=plan.output_dir),
    )


def _restored_tuner(plan: SweepPlan):
    from ray import tune

    # Finished and early-stopped trials keep their results; unfinished ones run again with the same
    # trial id, hence the same run dir, where Ray Train resumes them from their last checkpoint.
    return tune.Tuner.restore(plan.experiment_dir, trainable=_trainable(plan), resume_unfinished=True,
                              resume_errored=plan.tune.resume_errored)


def _scheduler(plan: SweepPlan):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    settings = plan.tune
    if settings.scheduler == "fifo":
        return FIFOScheduler()
    # time_attr=step: rungs at grace_period * reduction_factor^k optimizer steps, whatever the report cadence.
    return ASHAScheduler(time_attr="step", max_t=plan.max_t, grace_period=settings.grace_period,
                         reduction_factor=settings.reduction_factor)


# ---- summary and best trial ---------------------------------------------------------------------


def summarize(plan: SweepPlan) -> SweepResult:
    """Rows from Tune's saved experiment; results files, curves, HPARAMS session ends, best/."""
    rows = results.ranked(_rows(plan), plan.tune.mode)
    best = results.best_row(rows, plan.tune.mode)
    complete = all(row.status != results.UNFINISHED for row in rows)
    best_id = best.trial_id if best else None
    metric = plan.tune.metric
    results.write_csv(os.path.join(plan.output_dir, RESULTS_CSV), rows, metric)
    results.write_json(os.path.join(plan.output_dir, RESULTS_JSON), rows, metric=metric, mode=plan.tune.mode,
                       best_id=best_id, complete=complete)
    results.plot_curves(os.path.join(plan.output_dir, CURVES_PNG), rows, metric=metric, best_id=best_id)
    for row in rows:
        _end_session(row)
    export_dir = write_best(plan, best) if best else None
    return SweepResult(output_dir=plan.output_dir, metric=metric, rows=rows, best=best,
                       best_export_dir=export_dir, complete=complete)


def _rows(plan: SweepPlan) -> list[results.TrialRow]:
    from ray.tune import ExperimentAnalysis

    analysis = ExperimentAnalysis(plan.experiment_dir)
    rows = []
    for trial in analysis.trials:
        error = (trial.get_pickled_error() or trial.get_error()) if trial.status == "ERROR" else None
        rows.append(results.trial_row(
            trial_id=trial.trial_id,
            tune_status=trial.status,
            params=typed_params(trial.config),
            last_result=trial.last_result or {},
            history=analysis.trial_dataframes.get(trial.trial_id),
            error=error,
            metric=plan.tune.metric,
            mode=plan.tune.mode,
            run_dir=os.path.join(plan.trials_dir, trial.trial_id),
        ))
    return rows


def _end_session(row: results.TrialRow) -> None:
    """Once per ended trial: its summary scalars and end status in its TensorBoard run."""
    from moe_platform.train.loop import TENSORBOARD_DIR

    marker = os.path.join(row.run_dir, _SESSION_END_MARKER)
    if row.status == results.UNFINISHED or os.path.exists(marker) or not os.path.isdir(row.run_dir):
        return
    scalars = {"tune/steps": float(row.steps), "tune/stopped_early": float(row.stopped_early)}
    if row.best_metric is not None:
        scalars["tune/best_metric"] = row.best_metric
    status = hparams.STATUS_FAILURE if row.status == results.ERROR else hparams.STATUS_SUCCESS
    hparams.write_session_end(os.path.join(row.run_dir, TENSORBOARD_DIR), status, scalars=scalars, step=row.steps)
    _write_json(marker, {"status": row.status, **scalars})


def write_best(plan: SweepPlan, best: results.TrialRow) -> Optional[str]:
    """best/: the trial's values (params.json, overrides.txt), resolved stage (stage.json) and export/."""
    from moe_platform.train import CheckpointError, export_checkpoint
    from moe_platform.train.trainer import CONFIG_FILE

    os.makedirs(plan.best_dir, exist_ok=True)
    overrides = [hydra_override(key, value) for key, value in best.params.items()]
    _write_json(os.path.join(plan.best_dir, "params.json"), {
        "trial_id": best.trial_id, "params": best.params, "metric": plan.tune.metric,
        "last_metric": best.last_metric, "best_metric": best.best_metric, "steps": best.steps,
        "run_dir": best.run_dir,
    })
    with open(os.path.join(plan.best_dir, "overrides.txt"), "w") as fh:
        fh.write("\n".join(overrides) + "\n")
    stage_file = os.path.join(best.run_dir, CONFIG_FILE)
    if os.path.isfile(stage_file):
        shutil.copyfile(stage_file, os.path.join(plan.best_dir, "stage.json"))
    try:
        return export_checkpoint(best.run_dir, os.path.join(plan.best_dir, "export"))
    except CheckpointError as exc:
        log.warning("the best trial %s could not be exported: %s", best.trial_id, exc)
        return None


def _write_json(path: str, data: Any) -> None:
    temporary = path + ".tmp"
    with open(temporary, "w") as fh:
        json.dump(data, fh, indent=2, sort_keys=True, default=str)
    os.replace(temporary, path)
