"""moe_platform.train: distributed MoE training on Ray Train + DeepSpeed, one stage at a time.

    from moe_platform.train import StageConfig, train
    result = train(StageConfig(model=..., dataset_dir=..., trainer=..., run=...))

`build_trainer(stage)` gives the `ray.train.torch.TorchTrainer` itself (checks
done, run directory claimed); `train(stage)` also fits, exports and returns a
`TrainResult`. `export_checkpoint(path, out)` exports any checkpoint or run
directory; `evaluate_export(...)` scores an export on a dataset split.
"""
from moe_platform.train.config import (
    DistillConfig,
    EvaluateConfig,
    InitConfig,
    RunConfig,
    StageConfig,
    TaskConfig,
    TrainConfigError,
    TrainerConfig,
)


def __getattr__(name: str):
    # The heavy parts (ray, deepspeed, torch) load on first use, so `jobs/config.py` can import
    # the config dataclasses above cheaply.
    lazy = {
        "build_trainer": "moe_platform.train.trainer",
        "train": "moe_platform.train.trainer",
        "TrainResult": "moe_platform.train.trainer",
        "TrainingError": "moe_platform.train.trainer",
        "prepare_stage": "moe_platform.train.trainer",
        "export_checkpoint": "moe_platform.train.checkpoint_export",
        "resolve_checkpoint": "moe_platform.train.checkpoint_export",
        "CheckpointError": "moe_platform.train.checkpointing",
        "evaluate_export": "moe_platform.train.evaluation",
        "EvaluationReport": "moe_platform.train.evaluation",
        "train_loop_per_worker": "moe_platform.train.loop",
    }
    if name in lazy:
        import importlib

        return getattr(importlib.import_module(lazy[name]), name)
    raise AttributeError(f"module 'moe_platform.train' has no attribute {name!r}")


__all__ = [
    "CheckpointError",
    "DistillConfig",
    "TaskConfig",
    "EvaluateConfig",
    "EvaluationReport",
    "InitConfig",
    "RunConfig",
    "StageConfig",
    "TrainConfigError",
    "TrainResult",
    "TrainerConfig",
    "TrainingError",
    "build_trainer",
    "evaluate_export",
    "export_checkpoint",
    "prepare_stage",
    "resolve_checkpoint",
    "train",
    "train_loop_per_worker",
]
