"""Tiny training stages and readers of what a run leaves behind (TensorBoard events, JSON)."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Optional

from moe import ModelConfig
from moe_platform.train import InitConfig, RunConfig, StageConfig, TrainerConfig
from testkit.models import tiny_model


def tiny_stage(
    dataset_dir: str,
    output_dir: str,
    *,
    model: Optional[ModelConfig] = None,
    init_export_dir: Optional[str] = None,
    max_failures: int = 0,
    **trainer_overrides,
) -> StageConfig:
    """A stage that trains the tiny model for a few steps on 1 worker (override anything)."""
    trainer = dict(
        num_workers=1, micro_batch_size=8, lr=1e-2, warmup_steps=2, max_steps=12, log_every=2,
        report_every=4, eval_every=6, eval_batches=2, checkpoint_every=6, shuffle_buffer_rows=64,
    )
    trainer.update(trainer_overrides)
    return StageConfig(
        model=model or tiny_model(),
        dataset_dir=dataset_dir,
        trainer=TrainerConfig(**trainer),
        run=RunConfig(output_dir=output_dir, max_failures=max_failures, checkpoints_to_keep=3),
        init=InitConfig(export_dir=init_export_dir),
    )


def sweep_base_stage(dataset_dir: str, *, max_steps: int = 12, every: int = 4) -> StageConfig:
    """A stage short enough for a sweep on 2 cores: validation, reports and ASHA rungs every `every` steps."""
    return tiny_stage(
        dataset_dir, str(Path(dataset_dir).parent / "unused-run-dir"),
        max_steps=max_steps, warmup_steps=2, log_every=every, report_every=every, eval_every=every,
        eval_batches=2, checkpoint_every=max_steps,
    )


def replace_trainer(stage: StageConfig, **changes) -> StageConfig:
    return dataclasses.replace(stage, trainer=dataclasses.replace(stage.trainer, **changes))


def read_scalars(tensorboard_dir: str) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} from the run's event files, read by TensorBoard's own reader."""
    accumulator = event_accumulator(tensorboard_dir)
    return {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}


def event_accumulator(tensorboard_dir: str):
    from tensorboard.backend.event_processing import event_accumulator as ea

    accumulator = ea.EventAccumulator(
        tensorboard_dir, size_guidance={ea.SCALARS: 0, ea.HISTOGRAMS: 0, ea.IMAGES: 0}
    )
    accumulator.Reload()
    return accumulator


def read_json(path: str) -> dict:
    with open(path) as fh:
        return json.load(fh)
