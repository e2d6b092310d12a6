"""The root config: one section per concern, each a typed dataclass owned by the
package it configures. Every job loads this same tree (jobs/conf/config.yaml),
so an `experiment=` preset applies to any job and a typo fails in any job.

Registered with Hydra's ConfigStore as the schema of jobs/conf/config.yaml:
an unknown key or a wrong type fails at parse time, naming the key.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List

from hydra.core.config_store import ConfigStore

from moe import ModelConfig
from moe.peft_config import PeftConfig
from moe_platform.data import DataConfig
from moe_platform.generate import GenerateConfig
from moe_platform.serve.config import ServeConfig
from moe_platform.stages.config import PipelineConfig, PruneConfig, UpcycleConfig
from moe_platform.train.config import (
    DistillConfig,
    EvaluateConfig,
    InitConfig,
    RunConfig,
    TaskConfig,
    TrainerConfig,
)
from moe_platform.tune.config import TuneConfig


@dataclass
class RootConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    # moe_platform.train: how to train, where a run writes, where weights start, what evaluate scores.
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    run: RunConfig = field(default_factory=RunConfig)
    init: InitConfig = field(default_factory=InitConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    # moe_platform.generate: offline batch generation over a prompt file with Ray Data.
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    # Later stages (moe_platform.stages, moe.peft): LoRA / freezing, distillation, a multi-task
    # mixture, the upcycle and prune transforms, and the pipeline that chains stages.
    peft: PeftConfig = field(default_factory=PeftConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    tasks: List[TaskConfig] = field(default_factory=list)
    upcycle: UpcycleConfig = field(default_factory=UpcycleConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    # Sections are added here by the package that owns them (data, trainer, run, tune, serve, ...).


def register_configs() -> None:
    ConfigStore.instance().store(name="root_schema", node=RootConfig)
