"""Pretrain an MoE model: Ray Data -> Ray Train workers (DeepSpeed) -> checkpoints, TensorBoard, export.

    python jobs/pretrain.py                                    # reads data.dataset_dir, writes run.output_dir
    python jobs/pretrain.py trainer.num_workers=2 trainer.expert_parallel_size=2 run.output_dir=outputs/ep2
    ray job submit --working-dir . -- python jobs/pretrain.py ...   (see platform/moe_platform/train/README.md)

Run it again with the same run.output_dir to resume (same config) - a different
config there is refused. Layout: <run.output_dir>/{config.yaml,config.json,tensorboard,checkpoints,export}.
"""
from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from omegaconf import OmegaConf

from jobs.common import ConfigError, init_ray, job
from jobs.config import RootConfig
from moe_platform.data import DataError
from moe_platform.train.config import StageConfig

# Ray, DeepSpeed and torch load inside the functions, once the config is known to be valid
# (a bad override answers in a second, before any of them is imported).
if TYPE_CHECKING:
    from moe_platform.train import TrainResult


def pretrain_stage(config: RootConfig) -> StageConfig:
    """The pretraining stage of a config tree (tune trials and main.py use the same sections)."""
    return StageConfig(model=config.model, dataset_dir=config.data.resolved().dataset_dir,
                       trainer=config.trainer, run=config.run, init=config.init, peft=config.peft,
                       distill=config.distill, tasks=config.tasks)


def run_pretraining(config: RootConfig) -> TrainResult:
    """Check (exit 2 naming the key), save config.yaml, train or resume, export. Ray must be up."""
    from moe_platform.train import CheckpointError, TrainingError, prepare_stage, train

    stage = pretrain_stage(config)
    try:
        prepare_stage(stage)  # every check (a ConfigError names the key), before Ray or any worker starts
        init_ray()
        # config.yaml: the whole resolved tree, for people (config.json is what resuming compares).
        return train(stage, config_yaml=OmegaConf.to_yaml(OmegaConf.structured(config)))
    except DataError as exc:  # the dataset a stage names is part of its config
        raise ConfigError(str(exc)) from None
    except (CheckpointError, TrainingError) as exc:
        print(f"pretraining failed: {exc}", file=sys.stderr)
        sys.exit(1)


def summary(result: TrainResult) -> str:
    metrics = result.metrics
    lines = [f"trained {int(metrics.get('step', 0))} steps: loss {metrics.get('train/loss', float('nan')):.4f}"
             + (f", validation loss {metrics['val/loss']:.4f} (perplexity {metrics['val/perplexity']:.2f})"
                if "val/loss" in metrics else "")]
    lines.append(f"checkpoint  {result.checkpoint_dir}")
    if result.export_dir:
        lines.append(f"export      {result.export_dir}")
    lines.append(f"tensorboard tensorboard --logdir {result.tensorboard_dir}")
    return "\n".join(lines)


@job
def main(config: RootConfig) -> None:
    print(summary(run_pretraining(config)))


if __name__ == "__main__":
    main()
