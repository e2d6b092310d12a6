"""The search space against the pretraining config: key lookup, typing, trial configs, Tune domains.

A trial's config is the base `StageConfig` with the sampled values set at their
dotted keys, rebuilt through the dataclasses (`StageConfig.from_dict`), so every
`__post_init__` and the stage's cross-section checks run on it again: a value
the model rejects (top_k > num_experts, ...) is the same error it would be in
`jobs/pretrain.py`.

`check_space` runs those checks for the whole space before any trial starts:
every combination of candidate values (each discrete value, the ends of each
range) becomes a trial config that must pass `validate_stage`, fit the dataset
and give at least one step.
"""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import typing
from dataclasses import dataclass
from typing import Any, Iterator, Optional

from moe.configs import ConfigError, coerce
from moe_platform.data import Manifest
from moe_platform.train import StageConfig
from moe_platform.train.plan import check_model_fits_data, make_plan, validate_stage
from moe_platform.tune.config import ParamSpec, TuneConfig, TuneConfigError

log = logging.getLogger(__name__)

# A trial trains the prepared dataset into its own run directory, so only these sections vary.
SEARCHABLE_SECTIONS = ("model", "trainer")
# More combinations than this are checked key by key instead of all together.
MAX_CHECKED_COMBINATIONS = 4096


# ---- keys and types ------------------------------------------------------------------------------


def field_type(key: str) -> Any:
    """The declared type of a dotted key of StageConfig (e.g. model.moe.top_k -> int); raises naming it."""
    parts = key.split(".")
    if parts[0] not in SEARCHABLE_SECTIONS:
        sections = " and ".join(f"{section}.*" for section in SEARCHABLE_SECTIONS)
        raise TuneConfigError(
            f"tune.space: {key} cannot be searched: trials vary only {sections} keys "
            "(each trial trains the prepared dataset in its own run directory)"
        )
    cls: Any = StageConfig
    for depth, part in enumerate(parts):
        hints = typing.get_type_hints(cls)
        names = [f.name for f in dataclasses.fields(cls)]
        if part not in names:
            where = ".".join(parts[:depth]) or "the config"
            raise TuneConfigError(f"tune.space: {key} is not a config key ({where} has: {', '.join(names)})")
        cls = hints[part]
    if dataclasses.is_dataclass(cls):
        raise TuneConfigError(f"tune.space: {key} is a config section, not a value; search one of its keys")
    return cls


def coerce_value(key: str, hint: Any, value: Any) -> Any:
    """`value` as the field's type (an int is a valid float); raises naming the key if it cannot be."""
    base = next((arg for arg in typing.get_args(hint) if arg is not type(None)), hint)
    if base not in (bool, int, float, str):
        raise TuneConfigError(f"tune.space: {key} has type {base} which cannot be searched")
    try:
        return coerce(hint, value, key)
    except ConfigError as exc:
        hint_text = " (use kind=choice or randint for integers)" if base is int and isinstance(value, float) else ""
        raise TuneConfigError(f"tune.space: {exc}{hint_text}") from None


def typed_params(params: dict[str, Any]) -> dict[str, Any]:
    """Sampled values -> the types their keys declare (Tune may give numpy scalars or ints for floats)."""
    return {key: coerce_value(key, field_type(key), _plain(value)) for key, value in params.items()}


def _plain(value: Any) -> Any:
    """numpy scalars (what Tune's samplers return) -> Python scalars."""
    return value.item() if hasattr(value, "item") and not isinstance(value, (str, bytes)) else value


# ---- trial configs -----------------------------------------------------------------------------


def apply_params(base: StageConfig, params: dict[str, Any]) -> StageConfig:
    """The base stage with `params` ({dotted key: value}) set, rebuilt so every dataclass check runs again."""
    data = base.to_dict()
    for key, value in typed_params(params).items():
        node = data
        *sections, leaf = key.split(".")
        for section in sections:
            node = node[section]
        node[leaf] = value
    try:
        return StageConfig.from_dict(data)
    except (ValueError, TypeError) as exc:
        raise _rejected(exc, params) from None


def for_trial(stage: StageConfig) -> StageConfig:
    """A stage as a trial runs it: reporting exactly at each validation, so every report Tune (and
    ASHA) receives carries a fresh validation metric. report_every changes no result (an
    operational key), so the pretraining config of the best trial stays as it was."""
    trainer = stage.trainer
    if trainer.eval_every < 1:
        return stage  # check_reports_carry_metric explains why that cannot be tuned on val/*
    return dataclasses.replace(stage, trainer=dataclasses.replace(trainer, report_every=trainer.eval_every))


def check_trial_stage(stage: StageConfig, manifest: Manifest, tune: TuneConfig, params: dict[str, Any]) -> int:
    """Every pre-flight check a trial would hit, plus the sweep's own; returns the trial's total steps."""
    try:
        validate_stage(stage)
        check_model_fits_data(stage.model, manifest)
        plan = make_plan(stage, {stage.dataset_dir: manifest})
    except (ValueError, TypeError) as exc:
        raise _rejected(exc, params) from None
    try:
        check_reports_carry_metric(stage, tune, has_validation=plan.eval_batches > 0)
        check_asha_can_look(stage, tune, plan.total_steps)
    except TuneConfigError as exc:
        raise TuneConfigError(f"{exc} ({_describe(params)})" if params else str(exc)) from None
    return plan.total_steps


def check_asha_can_look(stage: StageConfig, tune: TuneConfig, total_steps: int) -> None:
    """ASHA decides at reports: a trial whose first report is its last could never be stopped."""
    first_report = min(stage.trainer.report_every, stage.trainer.checkpoint_every)
    if tune.scheduler == "asha" and first_report >= total_steps:
        raise TuneConfigError(
            f"trials report first at step {first_report} (trainer.eval_every), not before their end at step "
            f"{total_steps}: ASHA could stop none; set trainer.eval_every (and checkpoint_every) below the trial length"
        )


def check_reports_carry_metric(stage: StageConfig, tune: TuneConfig, *, has_validation: bool) -> None:
    """Tune fails a trial whose report lacks the metric, and ASHA needs a fresh one at every report.

    Trials report at every validation (`for_trial`) and at every checkpoint; a checkpoint step
    must therefore be a validation step too.
    """
    if not tune.metric.startswith("val/"):
        return
    trainer = stage.trainer
    if not has_validation:
        raise TuneConfigError(
            f"tune.metric={tune.metric} needs a validation split, but {stage.dataset_dir} gives no full validation "
            f"batch of trainer.micro_batch_size={trainer.micro_batch_size}"
        )
    if trainer.eval_every < 1:
        raise TuneConfigError(
            f"trainer.eval_every={trainer.eval_every} validates only at the end: ASHA needs tune.metric={tune.metric} "
            "every few steps; set trainer.eval_every to the step interval between ASHA's looks"
        )
    if trainer.checkpoint_every % trainer.eval_every:
        raise TuneConfigError(
            f"trainer.checkpoint_every={trainer.checkpoint_every} must be a multiple of trainer.eval_every="
            f"{trainer.eval_every} in a sweep: every checkpoint is a report, and every report must carry a fresh "
            f"tune.metric={tune.metric}"
        )


@dataclass(frozen=True)
class SpaceFacts:
    """What the checked trial configs say about the sweep's needs."""

    most_steps: int  # the longest trial (ASHA's default max_t)
    most_worker_cpus: float  # trainer.num_workers x trainer.cpus_per_worker of the hungriest trial


def check_space(base: StageConfig, tune: TuneConfig, manifest: Manifest) -> SpaceFacts:
    """Check every key and (up to a limit) every combination of candidate values."""
    for spec in tune.space:
        hint = field_type(spec.key)
        for value in spec.candidates():
            coerce_value(spec.key, hint, value)
        if spec.kind in ("uniform", "loguniform") and _base_type(hint) is int:
            raise TuneConfigError(
                f"tune.space: {spec.key} takes int values but kind={spec.kind} samples floats; use choice or randint"
            )
    most_steps, most_cpus = 0, 0.0
    with _each_warning_once("moe_platform.train.plan"):  # the same remark for every combination is noise
        for params in _combinations(tune.space):
            stage = for_trial(apply_params(base, params))
            most_steps = max(most_steps, check_trial_stage(stage, manifest, tune, params))
            most_cpus = max(most_cpus, stage.trainer.num_workers * stage.trainer.cpus_per_worker)
    return SpaceFacts(most_steps=most_steps, most_worker_cpus=most_cpus)


@contextlib.contextmanager
def _each_warning_once(logger_name: str) -> Iterator[None]:
    seen: set[str] = set()

    def first_time(record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message in seen:
            return False
        seen.add(message)
        return True

    logger = logging.getLogger(logger_name)
    logger.addFilter(first_time)
    try:
        yield
    finally:
        logger.removeFilter(first_time)


def _combinations(space: list[ParamSpec]) -> Iterator[dict[str, Any]]:
    """All combinations of candidate values, or each key's candidates alone when there are too many."""
    candidates = [spec.candidates() for spec in space]
    count = 1
    for values in candidates:
        count *= len(values)
    if count <= MAX_CHECKED_COMBINATIONS:
        for combination in itertools.product(*candidates):
            yield {spec.key: value for spec, value in zip(space, combination)}
        return
    log.warning("tune.space has %d value combinations: checking each key on its own, not every combination", count)
    for spec, values in zip(space, candidates):
        for value in values:
            yield {spec.key: value}


def _base_type(hint: Any) -> Any:
    return next((arg for arg in typing.get_args(hint) if arg is not type(None)), hint)


# ---- Tune's view -----------------------------------------------------------------------------------


def tune_domain(spec: ParamSpec, seed: Optional[int] = None) -> Any:
    """A ParamSpec as a Ray Tune search-space domain (randint's high is inclusive here, exclusive in Tune)."""
    from ray import tune

    if spec.kind == "choice":
        return tune.choice(list(spec.values))
    if spec.kind == "grid":
        return tune.grid_search(list(spec.values))
    if spec.kind == "uniform":
        return tune.uniform(spec.low, spec.high)
    if spec.kind == "loguniform":
        return tune.loguniform(spec.low, spec.high)
    return tune.randint(int(spec.low), int(spec.high) + 1)


def param_space(tune: TuneConfig) -> dict[str, Any]:
    """Tune's param_space: {dotted key: domain}; a trial's config is then {dotted key: value}."""
    return {spec.key: tune_domain(spec) for spec in tune.space}


def hydra_override(key: str, value: Any) -> str:
    """`key=value` as a Hydra command-line override."""
    if value is None:
        text = "null"
    elif isinstance(value, bool):
        text = "true" if value else "false"
    else:
        text = repr(value)  # floats keep full precision; strings come out quoted, as Hydra reads them
    return f"{key}={text}"


def _rejected(exc: BaseException, params: dict[str, Any]) -> TuneConfigError:
    return TuneConfigError(f"tune.space gives a config the trainer rejects: {_first_line(exc)} ({_describe(params)})")


def _describe(params: dict[str, Any]) -> str:
    return "trial values " + ", ".join(hydra_override(key, value) for key, value in params.items())


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]
