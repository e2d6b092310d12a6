"""Run a multi-stage pipeline: each stage is a job (pretrain, finetune, distill, upcycle, prune)
starting from the previous stage's export, with its own run directory, TensorBoard and export.

    python jobs/pipeline.py pipeline=pretrain_finetune               # jobs/conf/pipeline/*.yaml
    python jobs/pipeline.py pipeline=pretrain_finetune experiment=smoke
    python jobs/pipeline.py pipeline=dense_upcycle pipeline.output_dir=outputs/up

Stage <name> writes <pipeline.output_dir>/<name>/ (dataset/, tensorboard/, checkpoints/,
export/). Overrides given here apply to every stage, before the stage's own. Run the same
command again after an interruption: finished stages are skipped and the stage it was in
resumes from its newest checkpoint. At the end every stage's export is compared on the last
stage's held-out data (evaluate job's table + chart).

Later overrides win: the job's defaults (finetune, distill), the stage's overrides from the
pipeline file, the command line, and last the paths the pipeline owns - every stage's
run.output_dir and data.dataset_dir (<pipeline.output_dir>/<stage>/...) and the export it
starts from (init.export_dir, distill.teacher_export_dir, upcycle/prune inputs).
"""
from __future__ import annotations

import os

from jobs.common import ConfigError, command_line_overrides, compose_config, job
from jobs.config import RootConfig


def stage_overrides(spec, context, cli: list[str]) -> list[str]:
    """Job defaults, the stage's own overrides, the command line, then the paths the pipeline owns
    (each stage's run.output_dir, data.dataset_dir and the export it starts from)."""
    from jobs.distill import DISTILL_DEFAULTS
    from jobs.finetune import FINETUNE_DEFAULTS

    job_defaults = {"finetune": FINETUNE_DEFAULTS, "distill": DISTILL_DEFAULTS}.get(spec.job, ())
    derived = [f"run.output_dir={context.stage_dir}", f"data.dataset_dir={context.stage_dir}/dataset"]
    previous = context.previous_export
    if previous:
        derived += {
            "pretrain": [f"init.export_dir={previous}", f"data.tokenizer={previous}/tokenizer.json"],
            "finetune": [f"init.export_dir={previous}"],
            "distill": [f"distill.teacher_export_dir={previous}"],
            "upcycle": [f"upcycle.dense_export_dir={previous}", f"upcycle.output_dir={context.stage_dir}/export"],
            "prune": [f"prune.export_dir={previous}", f"prune.output_dir={context.stage_dir}/export",
                      f"data.tokenizer={previous}/tokenizer.json"],
        }[spec.job]
    elif spec.job in ("finetune", "distill", "upcycle", "prune"):
        raise ConfigError(f"pipeline stage {spec.name!r} ({spec.job}) needs an earlier stage's export: "
                          "it cannot be the first stage")
    return [*job_defaults, *spec.overrides, *cli, *derived]


def run_stage(spec, context, cli: list[str]) -> str:
    from jobs.distill import run_distillation
    from jobs.finetune import run_finetune
    from jobs.prepare import run_prepare
    from jobs.prune import run_prune
    from jobs.pretrain import run_pretraining
    from jobs.upcycle import run_upcycle

    overrides = stage_overrides(spec, context, cli)
    try:
        config = compose_config(overrides)
    except ConfigError as exc:
        raise ConfigError(f"pipeline stage {spec.name!r}: {exc}") from None
    if spec.job == "pretrain":
        if config.init.export_dir:  # continued pretraining from the previous export, its architecture
            from jobs.common import model_from_export

            config.model = model_from_export(config, config.init.export_dir, overrides)
        if not config.tasks:
            run_prepare(config)
        return run_pretraining(config).export_dir
    if spec.job == "finetune":
        return run_finetune(config, overrides).export_dir
    if spec.job == "distill":
        return run_distillation(config, overrides).export_dir
    if spec.job == "upcycle":
        return run_upcycle(config)
    if spec.job == "prune":
        run_prepare(config)  # calibration and held-out rows, with the export's tokenizer
        run_prune(config)
        return os.path.abspath(config.prune.output_dir)
    raise AssertionError(spec.job)


@job
def main(config: RootConfig) -> None:
    from jobs.common import init_ray
    from jobs.evaluate import run_comparison
    from moe_platform.stages.pipeline import format_outcomes, run_pipeline

    # Every stage sees the same command line (pipeline=<name> included: stage overrides may
    # interpolate ${pipeline.output_dir}).
    cli = command_line_overrides()
    init_ray()
    try:
        outcomes = run_pipeline(config.pipeline, lambda spec, context: run_stage(spec, context, cli))
    except ValueError as exc:  # a stage's own checks (ConfigError is one too)
        raise ConfigError(str(exc)) from None
    print()
    print(format_outcomes(outcomes))
    if len(outcomes) > 1:
        config.evaluate.compare = [o.export_dir for o in outcomes]
        config.evaluate.chart = os.path.join(os.path.abspath(config.pipeline.output_dir), "comparison.png")
        # Held-out rows: the latest stage's own prepared data (upcycle/prune stages prepare none).
        prepared = [o for o in outcomes if os.path.isfile(os.path.join(o.stage_dir, "dataset", "manifest.json"))]
        if prepared:
            config.data.dataset_dir = os.path.join(prepared[-1].stage_dir, "dataset")
            run_comparison(config)


if __name__ == "__main__":
    main()
