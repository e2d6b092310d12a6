"""Typed configs of the stage jobs: `pipeline`, `upcycle` and `prune` (jobs/conf/config.yaml).

Each `__post_init__` names the key in one sentence; jobs build these from Hydra.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from moe.configs import require

# What a pipeline stage can run (jobs/pipeline.py maps each to its job).
STAGE_JOBS = ("pretrain", "finetune", "distill", "upcycle", "prune")



@dataclass
class StageSpec:
    """One stage of a pipeline: a job and the config overrides that make it this stage."""

    name: str = ""
    job: str = "pretrain"
    # Applied after the pipeline's command-line overrides; run.output_dir and init.export_dir
    # (the previous stage's export) are set by the pipeline.
    overrides: List[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        require(bool(self.name) and self.name.replace("_", "").replace("-", "").isalnum(),
                 f"pipeline.stages: name {self.name!r} must be a non-empty word (letters, digits, _ or -)")
        require(self.job in STAGE_JOBS,
                 f"pipeline.stages.{self.name}.job must be one of {', '.join(STAGE_JOBS)}, got {self.job!r}")


@dataclass
class PipelineConfig:
    """`python jobs/pipeline.py pipeline=<name>`: stages in order, each from the previous export."""

    name: str = ""
    # Stage i writes <output_dir>/<stage name>/ (its run directory: tensorboard/, checkpoints/, export/).
    output_dir: str = "outputs/pipeline"
    stages: List[StageSpec] = field(default_factory=list)

    def __post_init__(self) -> None:
        names = [stage.name for stage in self.stages]
        require(len(set(names)) == len(names), f"pipeline.stages: stage names must be unique, got {names}")
        require(bool(self.output_dir), "pipeline.output_dir must not be empty")


@dataclass
class UpcycleConfig:
    """`python jobs/upcycle.py`: a dense export -> an MoE export (experts copied from the FFN).

    The MoE layout comes from the `model.moe` section (num_experts, top_k, moe_every, ...);
    expert_hidden is the dense model's ffn_hidden (every expert starts as that FFN).
    """

    dense_export_dir: Optional[str] = None
    output_dir: str = "outputs/upcycle/export"
    seed: int = 0  # the router's fresh initialisation


@dataclass
class PruneConfig:
    """`python jobs/prune.py`: drop the least-used experts of an export, measured on calibration data.

    Set `keep` (experts per layer) or `min_share` (drop experts whose share of a layer's routed
    tokens is below it; the kept count is uniform over layers, the largest any layer needs).
    """

    export_dir: str = "${run.output_dir}/export"
    output_dir: str = "outputs/prune/export"
    keep: Optional[int] = None
    min_share: Optional[float] = None
    # Calibration: which split of data.dataset_dir routes tokens to count, and how much of it.
    split: str = "train"
    calibration_batches: int = 20
    # Held-out loss is reported on this split for the original, the result and (sweep) other counts.
    eval_split: str = "validation"
    eval_batches: Optional[int] = 20
    batch_size: int = 8
    # Also report held-out loss for a range of kept-expert counts (quality vs experts removed).
    sweep: bool = True

    def __post_init__(self) -> None:
        # "Exactly one of keep / min_share" is checked when the prune job runs (check_choice): every
        # job builds this section, and only the prune job needs the choice.
        require(self.keep is None or self.keep >= 1, f"prune.keep must be >= 1, got {self.keep}")
        require(self.min_share is None or 0 < self.min_share < 1,
                 f"prune.min_share must be in (0, 1), got {self.min_share}")
        require(self.calibration_batches >= 1, f"prune.calibration_batches must be >= 1, got {self.calibration_batches}")
        require(self.batch_size >= 1, f"prune.batch_size must be >= 1, got {self.batch_size}")
        require(self.eval_batches is None or self.eval_batches >= 1,
                 f"prune.eval_batches must be >= 1 or null, got {self.eval_batches}")

    def check_choice(self) -> None:
        require((self.keep is None) != (self.min_share is None),
                 "set exactly one of prune.keep (experts per layer) and prune.min_share (a usage threshold), "
                 "e.g. prune.keep=6")
