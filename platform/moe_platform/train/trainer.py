"""The driver side of a stage: pre-flight checks, the run directory, the TorchTrainer, fit -> export.

    stage = StageConfig(model=..., dataset_dir=..., trainer=..., run=..., init=...)
    result = train(stage)            # = build_trainer(stage).fit() + export + a summary
    print(result.export_dir)

Everything that can be wrong with a stage fails in `build_trainer`, before any
worker starts, with one sentence naming the key (TrainConfigError) or the data
problem (moe_platform.data.DataError).

Run directory (`run.output_dir`, a stable layout other jobs rely on):

    config.yaml        the job's whole resolved config tree (Hydra), for people
    config.json        the resolved StageConfig; a second run with the same directory resumes only if
                       its config matches (except OPERATIONAL_KEYS), else fails naming the difference
    tensorboard/       rank 0's event files
    checkpoints/       Ray Train's run directory: step_00000100/ ... (see checkpointing.py)
    export/            the last checkpoint's model/, a Hugging Face model directory (moe/export.py)
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass
from typing import Any, Optional

from moe_platform.data import storage
from moe_platform.train.checkpointing import CheckpointError, latest_complete_checkpoint, read_train_state
from moe_platform.train.config import StageConfig, TrainConfigError
from moe_platform.train.batches import build_datasets, data_config
from moe_platform.train.checkpoint_export import export_checkpoint
from moe_platform.train.loop import TENSORBOARD_DIR, train_loop_per_worker
from moe_platform.train.plan import (
    TrainPlan,
    check_model_fits_data,
    load_stage_manifests,
    make_plan,
    validate_stage,
)
from moe_platform.train.progress import ProgressCallback

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
CONFIG_YAML_FILE = "config.yaml"  # the job's whole config tree, for people; config.json is what resuming checks
CHECKPOINTS_DIR = "checkpoints"
EXPORT_DIR = "export"
# Keys that may change between a run and its resumption: they do not change what is computed.
OPERATIONAL_KEYS = frozenset({
    "run.max_failures", "run.checkpoints_to_keep", "run.export",
    "trainer.cpus_per_worker", "trainer.torch_threads", "trainer.prefetch_batches",
    "trainer.log_every", "trainer.report_every", "trainer.eval_every", "trainer.eval_batches",
    "trainer.checkpoint_every", "trainer.peak_flops_per_worker", "trainer.fail_at_step",
    "trainer.dead_expert_threshold",
})


class TrainingError(RuntimeError):
    """Training failed on the workers; the message carries the first worker's error."""


@dataclass
class TrainResult:
    output_dir: str
    tensorboard_dir: str
    checkpoint_dir: Optional[str]  # the last checkpoint
    export_dir: Optional[str]  # None when run.export is off
    metrics: dict[str, Any]  # the last checkpoint's report (rank 0)
    already_finished: bool = False  # True when the run had finished before: nothing trained, nothing reported


# ---- pre-flight ------------------------------------------------------------------------------


def prepare_stage(stage: StageConfig) -> tuple[StageConfig, TrainPlan]:
    """Absolute paths, cross-section checks, the model against the dataset, the plan."""
    stage = with_absolute_paths(stage)
    validate_stage(stage)
    manifests = load_stage_manifests(stage)
    for manifest in manifests.values():
        check_model_fits_data(stage.model, manifest)
    return stage, make_plan(stage, manifests)


def with_absolute_paths(stage: StageConfig) -> StageConfig:
    """Workers run in other directories: every local path becomes absolute on the driver."""
    init_dir, teacher_dir = stage.init.export_dir, stage.distill.teacher_export_dir
    return dataclasses.replace(
        stage,
        dataset_dir=storage.absolute(stage.dataset_dir),
        run=dataclasses.replace(stage.run, output_dir=os.path.abspath(os.path.expanduser(stage.run.output_dir))),
        init=dataclasses.replace(stage.init, export_dir=os.path.abspath(init_dir) if init_dir else None),
        distill=dataclasses.replace(stage.distill,
                                    teacher_export_dir=os.path.abspath(teacher_dir) if teacher_dir else None),
        tasks=[dataclasses.replace(task, dataset_dir=storage.absolute(task.dataset_dir)) for task in stage.tasks],
    )


def claim_output_dir(stage: StageConfig) -> bool:
    """Write config.json, or check the existing one matches. Returns True when resuming."""
    path = os.path.join(stage.run.output_dir, CONFIG_FILE)
    ours = stage.to_dict()
    if os.path.isfile(path):
        with open(path) as fh:
            theirs = with_current_defaults(json.load(fh))
        differences = config_differences(theirs, ours)
        if differences:
            key, before, now = differences[0]
            raise TrainConfigError(
                f"run.output_dir={stage.run.output_dir} holds a run with a different config ({key}={before!r} there, "
                f"{now!r} now{f', and {len(differences) - 1} more' if len(differences) > 1 else ''}): use a new "
                "run.output_dir, or the same config to resume that run"
            )
        log.info("resuming the run in %s (same config)", stage.run.output_dir)
        return True
    os.makedirs(stage.run.output_dir, exist_ok=True)
    if os.path.isdir(os.path.join(stage.run.output_dir, CHECKPOINTS_DIR)):
        raise TrainConfigError(
            f"run.output_dir={stage.run.output_dir} has checkpoints but no {CONFIG_FILE}: it is not a run this "
            "platform can resume; use a new run.output_dir"
        )
    temporary = path + ".tmp"
    with open(temporary, "w") as fh:
        json.dump(ours, fh, indent=2, sort_keys=True)
    os.replace(temporary, path)
    return False


def with_current_defaults(saved: dict) -> dict:
    """A saved stage config with the keys added since it was written at their defaults, so that this
    version resumes a run an older one started (keys added at their default change nothing). One that
    no longer loads (a removed key, a value now refused) is compared as it is."""
    try:
        return StageConfig.from_dict(saved).to_dict()
    except (TypeError, ValueError):
        return saved


def config_differences(before: dict, now: dict, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """(dotted key, old, new) for every leaf that differs, operational keys excluded."""
    differences = []
    for key in sorted(set(before) | set(now)):
        dotted = f"{prefix}{key}"
        old, new = before.get(key), now.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            differences += config_differences(old, new, prefix=f"{dotted}.")
        elif old != new and dotted not in OPERATIONAL_KEYS:
            differences.append((dotted, old, new))
    return differences


# ---- the trainer -------------------------------------------------------------------------------


def build_trainer(stage: StageConfig, *, callbacks: tuple = (), config_yaml: Optional[str] = None):
    """Check the stage, claim run.output_dir, and return a ready `ray.train.torch.TorchTrainer`.

    Running `.fit()` on it trains (or resumes) the stage; `train()` also exports and summarises.
    `config_yaml`: the job's whole config tree, saved as <output_dir>/config.yaml once claimed.
    """
    return _build(stage, callbacks, config_yaml)[0]


def _build(stage: StageConfig, callbacks: tuple, config_yaml: Optional[str]):
    stage, plan, resuming = _claim(stage, config_yaml)
    return _torch_trainer(stage, plan, resuming, callbacks), stage


def _claim(stage: StageConfig, config_yaml: Optional[str]) -> tuple[StageConfig, TrainPlan, bool]:
    """Check the stage and claim its run.output_dir; -> (stage, plan, resuming)."""
    stage, plan = prepare_stage(stage)
    resuming = claim_output_dir(stage)
    if config_yaml is not None:
        with open(os.path.join(stage.run.output_dir, CONFIG_YAML_FILE), "w") as fh:
            fh.write(config_yaml)
    return stage, plan, resuming


def _torch_trainer(stage: StageConfig, plan: TrainPlan, resuming: bool, callbacks: tuple):
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    trainer = stage.trainer
    resources = {"CPU": trainer.cpus_per_worker, **({"GPU": 1} if trainer.use_gpu else {})}
    log.info(
        "%s %d steps x %d tokens on %d worker(s), expert-parallel %d, ZeRO %d: %s",
        "resuming" if resuming else "planning", plan.total_steps, plan.tokens_per_step, trainer.num_workers,
        trainer.expert_parallel_size, trainer.zero_stage, stage.run.output_dir,
    )
    torch_trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"stage": stage, "plan": plan},
        scaling_config=ray.train.ScalingConfig(
            num_workers=trainer.num_workers, use_gpu=trainer.use_gpu, resources_per_worker=resources
        ),
        torch_config=TorchConfig(backend="nccl" if trainer.use_gpu else "gloo"),
        datasets=build_datasets(plan),
        dataset_config=data_config(),
        run_config=ray.train.RunConfig(
            # The name is fixed: the same output_dir is the same Ray Train run, which Ray resumes
            # from its latest checkpoint - claim_output_dir made sure the config is the same.
            name=CHECKPOINTS_DIR,
            storage_path=stage.run.output_dir,
            failure_config=ray.train.FailureConfig(max_failures=stage.run.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=stage.run.checkpoints_to_keep),
            callbacks=[ProgressCallback(total_steps=plan.total_steps), *callbacks],
        ),
    )
    return torch_trainer


def train(stage: StageConfig, *, callbacks: tuple = (), config_yaml: Optional[str] = None) -> TrainResult:
    """Train (or resume) a stage to its end, then export the last checkpoint if run.export.

    A run whose newest complete checkpoint is already at the last step is not started again: a
    second `make run`, or a pipeline rerun, costs no Ray Train worker group.
    """
    stage, plan, resuming = _claim(stage, config_yaml)
    output_dir = stage.run.output_dir
    finished = finished_checkpoint(output_dir, plan.total_steps) if resuming else None
    if finished is not None:
        checkpoint_dir, metrics = finished
        log.info("the run in %s already finished its %d steps: not training again", output_dir, plan.total_steps)
    else:
        result = fit_or_explain(_torch_trainer(stage, plan, resuming, callbacks))
        if result.checkpoint is None:
            raise TrainingError(f"training in {output_dir} finished without a checkpoint")
        checkpoint_dir, metrics = result.checkpoint.path, dict(result.metrics or {})
    export_dir = None
    if stage.run.export:
        export_dir = export_checkpoint(checkpoint_dir, os.path.join(output_dir, EXPORT_DIR))
    return TrainResult(
        output_dir=output_dir,
        tensorboard_dir=os.path.join(output_dir, TENSORBOARD_DIR),
        checkpoint_dir=checkpoint_dir,
        export_dir=export_dir,
        metrics=metrics,
        already_finished=finished is not None,
    )


def finished_checkpoint(output_dir: str, total_steps: int) -> Optional[tuple[str, dict]]:
    """(checkpoint, its final report's metrics) when the newest complete checkpoint is at total_steps."""
    checkpoint = latest_complete_checkpoint(os.path.join(output_dir, CHECKPOINTS_DIR))
    if checkpoint is None:
        return None
    state = read_train_state(checkpoint)
    if state.get("step") != total_steps:
        return None
    return checkpoint, {**state.get("metrics", {}), "step": state["step"], "total_steps": total_steps}


# Ray Train's controller polls its workers every 2 s by default, so it notices a run's end (and
# every other state change) up to 2 s late. At 0.5 s a 20-step run took 25.9 s instead of 27.5 s
# (three pairs, 2-core VM); a poll is one small actor call per worker. A user's own value wins.
POLL_INTERVAL_ENV = ("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")


def fit_or_explain(trainer):
    """trainer.fit(), with a worker's failure turned into one readable TrainingError."""
    import ray.train

    os.environ.setdefault(*POLL_INTERVAL_ENV)  # read by fit(), passed on to the controller
    try:
        return trainer.fit()
    except ray.train.WorkerGroupError as exc:
        rank, failure = min(exc.worker_failures.items())
        cause = getattr(failure, "cause", None) or failure
        if isinstance(cause, (TrainConfigError, CheckpointError)):
            raise type(cause)(str(cause)) from None
        raise TrainingError(f"training failed on worker {rank}: {type(cause).__name__}: {_last_line(cause)}") from exc
    except ray.train.TrainingFailedError as exc:
        raise TrainingError(f"training failed: {_last_line(exc)}") from exc


def _last_line(exc: BaseException) -> str:
    """A RayTaskError's text is the remote traceback; its last line is the error itself."""
    text = str(exc).strip()
    return text.splitlines()[-1] if text else type(exc).__name__
