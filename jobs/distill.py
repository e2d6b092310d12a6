"""Distill a teacher export into a student (dense or a smaller MoE) on the Ray Train spine.

    python jobs/distill.py distill.teacher_export_dir=outputs/pretrain/export \
        model.moe.moe_every=0 model.ffn_hidden=512                       # a dense student
    python jobs/distill.py distill.teacher_export_dir=... model.moe.num_experts=4 model.n_layers=2

loss = distill.alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * next-token loss
(T = distill.temperature). The student's architecture is the `model` section (or
init.export_dir's); the data is the default corpus prepared with the teacher's tokenizer
into data.dataset_dir (default outputs/distill/dataset). At the end the student and the
teacher are compared on the same held-out rows: loss, parameters, generation tokens/s.
"""
from __future__ import annotations

import os

from jobs.common import ConfigError, command_line_overrides, job, model_from_export
from jobs.config import RootConfig
from jobs.prepare import run_prepare
from jobs.pretrain import run_pretraining, summary

DISTILL_DEFAULTS = (
    "trainer.objective=distill",
    "data.dataset_dir=outputs/distill/dataset",
    "data.tokenizer=${distill.teacher_export_dir}/tokenizer.json",
    "run.output_dir=outputs/distill",
)


def run_distillation(config: RootConfig, overrides: list[str]):
    teacher = config.distill.teacher_export_dir
    if not teacher:
        raise ConfigError("distill.teacher_export_dir must name the teacher export")
    try:
        from moe import load_export_config

        config.model.vocab_size = load_export_config(teacher).vocab_size  # the student reads the teacher's tokens
        if config.init.export_dir:
            config.model = model_from_export(config, config.init.export_dir, overrides)
    except (FileNotFoundError, ValueError) as exc:
        raise ConfigError(f"distill.teacher_export_dir={teacher}: {exc}") from None
    if not config.tasks:
        run_prepare(config)
    result = run_pretraining(config)
    if result.export_dir:
        from jobs.evaluate import run_comparison

        config.evaluate.compare = [teacher, result.export_dir]
        config.evaluate.chart = os.path.join(result.output_dir, "teacher_vs_student.png")
        run_comparison(config)
    return result


@job(defaults=DISTILL_DEFAULTS)
def main(config: RootConfig) -> None:
    print(summary(run_distillation(config, command_line_overrides())))


if __name__ == "__main__":
    main()
