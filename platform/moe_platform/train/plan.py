"""The training plan: every number the workers must agree on, computed once on the driver.

Workers run collectives (gradient all-reduce, expert all-to-all), so they must
take exactly the same number of steps and evaluation batches. Those counts come
from the manifest's row counts and the trainer config here, before any worker
starts, and travel to the workers inside `TrainPlan`.

`validate_stage` is the pre-flight check: everything that can be wrong with a
stage (cross-section or against the dataset) fails here, as one sentence naming
the key, instead of as a traceback from inside Ray or DeepSpeed.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import Mapping, Optional

from moe import ModelConfig
from moe_platform.data import Manifest
from moe_platform.data import storage
from moe_platform.train.config import StageConfig, TrainConfigError, TrainerConfig
from moe_platform.train.objective import OBJECTIVES

LOSS_MASK_COLUMN = "loss_mask"

log = logging.getLogger(__name__)


# A stage without `tasks` trains on its dataset_dir as the one task of its plan, unnamed.
SINGLE_DATASET_TASK = ""


@dataclass(frozen=True)
class TaskPlan:
    """One dataset of the stage's mixture, as the workers read it (counts per worker)."""

    name: str  # StageConfig.tasks' name; SINGLE_DATASET_TASK for a stage's own dataset_dir
    weight: float  # normalised: the weights of a plan's tasks sum to 1
    train_paths: tuple[str, ...]
    validation_paths: tuple[str, ...]
    columns: tuple[str, ...]  # Parquet columns the loop reads: "tokens" and maybe "loss_mask"
    batches_per_epoch: int  # micro-batches each worker reads per epoch of this task
    eval_batches: int  # validation micro-batches per worker and evaluation (0 = no validation split)


@dataclass(frozen=True)
class TrainPlan:
    """Derived, agreed-upon facts of one stage (all counts per worker unless named global).

    Every stage trains on a mixture of `tasks`; a single dataset is a mixture of one task. The
    fields below describe the whole mixture.
    """

    tasks: tuple[TaskPlan, ...]
    tokenizer_path: str
    columns: tuple[str, ...]  # Parquet columns of any task: "tokens" and maybe "loss_mask"
    seq_len: int  # model inputs per row (rows hold seq_len + 1 tokens)
    train_rows: int  # global
    validation_rows: int  # global
    batches_per_epoch: int  # micro-batch draws per mixture epoch: all tasks' batches together
    total_steps: int  # optimizer steps of the whole stage
    tokens_per_step: int  # global: micro_batch * grad_accum * num_workers * seq_len
    eval_batches: int  # validation micro-batches per worker and evaluation, all tasks together

    @property
    def has_loss_mask(self) -> bool:
        return LOSS_MASK_COLUMN in self.columns


def check_model_fits_data(model: ModelConfig, manifest: Manifest) -> None:
    """The model must read the dataset: raise on a vocabulary or context too small for it.

    Decision: the model section is never rewritten from the manifest (ModelConfig has no
    "unset" value, and an export must say what was trained). A larger vocab_size (a padded
    embedding) or seq_len (a longer maximum context) is allowed, with a warning for the vocab.
    Jobs keep them equal by default through `model.vocab_size: ${data.vocab_size}`-style
    interpolation in the config tree.
    """
    if model.vocab_size < manifest.vocab_size:
        raise TrainConfigError(
            f"model.vocab_size={model.vocab_size} is smaller than the vocabulary of the dataset "
            f"{manifest.dataset_dir} ({manifest.vocab_size}); set model.vocab_size={manifest.vocab_size}"
        )
    if model.seq_len < manifest.seq_len:
        raise TrainConfigError(
            f"model.seq_len={model.seq_len} is shorter than the rows of the dataset {manifest.dataset_dir} "
            f"(seq_len {manifest.seq_len}); set model.seq_len={manifest.seq_len} or prepare with "
            f"data.seq_len={model.seq_len}"
        )
    if model.vocab_size > manifest.vocab_size:
        log.warning(
            "model.vocab_size=%d is larger than the dataset's vocabulary (%d): %d embedding rows are never used",
            model.vocab_size, manifest.vocab_size, model.vocab_size - manifest.vocab_size,
        )


def validate_stage(stage: StageConfig) -> None:
    """Checks that need more than one section (single sections check themselves)."""
    trainer, moe = stage.trainer, stage.model.moe
    ep = trainer.expert_parallel_size
    if moe.num_experts % ep != 0:
        raise TrainConfigError(
            f"model.moe.num_experts={moe.num_experts} must be a multiple of trainer.expert_parallel_size={ep}"
        )
    if ep > 1 and stage.model.num_moe_layers == 0:
        raise TrainConfigError(
            f"trainer.expert_parallel_size={ep} needs MoE layers, but model.moe.moe_every=0 makes the model dense"
        )
    if trainer.objective not in OBJECTIVES:
        raise TrainConfigError(
            f"trainer.objective={trainer.objective!r} is not one of: {', '.join(sorted(OBJECTIVES))}"
        )
    if stage.init.export_dir:
        check_init_export(stage.init.export_dir, stage.model)
    if trainer.objective == "distill":
        check_teacher(stage)
    elif stage.distill.teacher_export_dir:
        raise TrainConfigError(
            f"distill.teacher_export_dir is set but trainer.objective={trainer.objective!r}: "
            "set trainer.objective=distill to learn from the teacher"
        )
    if stage.peft.enabled:
        check_peft(stage)
    names = [task.name for task in stage.tasks]
    if len(set(names)) != len(names):
        raise TrainConfigError(f"tasks: names must be unique, got {names}")


def check_peft(stage: StageConfig) -> None:
    """LoRA / freezing must fit the model and ZeRO: tried on a weightless (meta-device) model,
    so a bad target fails here rather than on every worker."""
    import torch

    from moe import MoETransformer
    from moe.peft import apply_peft

    try:
        stage.peft.check_zero_stage(stage.model, stage.trainer.zero_stage)
        with torch.device("meta"):
            apply_peft(MoETransformer(stage.model), stage.peft)
    except ValueError as exc:
        raise TrainConfigError(str(exc)) from None


def check_teacher(stage: StageConfig) -> None:
    """The teacher must be an export whose vocabulary is the student's (the KL compares logits)."""
    teacher_dir = stage.distill.teacher_export_dir
    if not teacher_dir:
        raise TrainConfigError("trainer.objective=distill needs distill.teacher_export_dir (a teacher export)")
    teacher = _export_config(teacher_dir, "distill.teacher_export_dir")
    if teacher.vocab_size != stage.model.vocab_size:
        raise TrainConfigError(
            f"distill.teacher_export_dir={teacher_dir} has vocab_size {teacher.vocab_size} but "
            f"model.vocab_size={stage.model.vocab_size}: teacher and student must share the tokenizer"
        )


def _export_config(export_dir: str, key: str) -> ModelConfig:
    """The ModelConfig of an export (ours or a transformers directory), or one line naming `key`."""
    from moe.export import check_export

    try:
        return check_export(export_dir, key, need_tokenizer=False)
    except ValueError as exc:
        raise TrainConfigError(str(exc)) from None


def check_init_export(export_dir: str, model: ModelConfig) -> None:
    """init.export_dir must be an export whose parameter shapes match the model section."""
    exported = _export_config(export_dir, "init.export_dir")
    exported_model = dataclasses.asdict(exported)
    ours = dataclasses.asdict(model)
    for section, keys, prefix in ((ours, ARCHITECTURE_KEYS, "model."), (ours["moe"], MOE_ARCHITECTURE_KEYS, "model.moe.")):
        theirs = exported_model if prefix == "model." else exported_model.get("moe", {})
        for key in keys:
            if key in theirs and theirs[key] != section[key]:
                raise TrainConfigError(
                    f"init.export_dir={export_dir} does not fit the model section: "
                    f"{prefix}{key}={section[key]!r} but the export has {theirs[key]!r}"
                )
    _check_router_bias_fits(export_dir, exported, model)


def _check_router_bias_fits(export_dir: str, exported: ModelConfig, model: ModelConfig) -> None:
    """A router balancing bias is a tensor of the state: both have one, or neither."""
    if not model.num_moe_layers or (exported.bias_update_rate > 0) == (model.bias_update_rate > 0):
        return
    prefix = f"init.export_dir={export_dir} does not fit the model section: "
    if exported.bias_update_rate > 0:
        raise TrainConfigError(prefix + "the export's routers carry a balancing bias and the model's have none "
                               f"(model.moe.bias_update_rate is 0 for it: backend={model.moe.backend}, "
                               f"router={model.moe.router}, top_k={model.moe.top_k}); only the native "
                               "token-choice router adds the bias")
    raise TrainConfigError(prefix + f"the model balances with a router bias (model.moe.bias_update_rate="
                           f"{model.bias_update_rate}) and the export's routers have none; set "
                           "model.moe.bias_update_rate=0")


# Fields that decide parameter shapes: an export initialises only a model that agrees on them.
# (Routing settings - top_k, capacity, loss weights, backend - may change between stages.)
ARCHITECTURE_KEYS = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "qkv_bias", "qk_norm",
                     "ffn_hidden", "tie_embeddings")
MOE_ARCHITECTURE_KEYS = ("num_experts", "expert_hidden", "num_shared_experts", "shared_expert_hidden",
                         "shared_expert_gate", "moe_every")


def stage_datasets(stage: StageConfig) -> list[tuple[str, str, float]]:
    """(task name, dataset_dir, weight) of every dataset the stage trains on: its `tasks`, or its
    dataset_dir as one unnamed task."""
    if stage.tasks:
        return [(task.name, task.dataset_dir, task.weight) for task in stage.tasks]
    return [(SINGLE_DATASET_TASK, stage.dataset_dir, 1.0)]


def load_stage_manifests(stage: StageConfig) -> dict[str, Manifest]:
    """The manifest of every dataset of the stage, by dataset_dir."""
    return {directory: load_manifest(directory) for _, directory, _ in stage_datasets(stage)}


def make_plan(stage: StageConfig, manifests: Optional[Mapping[str, Manifest]] = None) -> TrainPlan:
    """Count rows, batches and steps; raise if a dataset cannot feed one step.

    `manifests`: by dataset_dir (load_stage_manifests); a dataset missing there is loaded. Each
    task is planned alone, then the counts are combined: a mixture epoch is as many micro-batch
    draws as all tasks hold together; each draw picks a task by weight, so a heavily weighted
    small task repeats (its own epochs cycle faster). A single dataset's plan is its one task's
    counts.
    """
    trainer, manifests = stage.trainer, manifests or {}
    datasets = [(name, manifests[directory] if directory in manifests else load_manifest(directory), weight)
                for name, directory, weight in stage_datasets(stage)]
    seq_lens = {manifest.seq_len for _, manifest, _ in datasets}
    if len(seq_lens) > 1:
        raise TrainConfigError(
            f"tasks: all datasets must have the same seq_len, got "
            f"{', '.join(f'{name}={manifest.seq_len}' for name, manifest, _ in datasets)}"
        )
    total_weight = sum(weight for _, _, weight in datasets)
    tasks = tuple(plan_task(name, weight / total_weight, manifest, trainer) for name, manifest, weight in datasets)
    first = datasets[0][1]
    batches_per_epoch = sum(task.batches_per_epoch for task in tasks)
    tokens_per_step = trainer.samples_per_step * first.seq_len
    manifests_used = [manifest for _, manifest, _ in datasets]
    return TrainPlan(
        tasks=tasks,
        tokenizer_path=first.tokenizer_path,
        columns=("tokens",) + ((LOSS_MASK_COLUMN,) if any(LOSS_MASK_COLUMN in t.columns for t in tasks) else ()),
        seq_len=first.seq_len,
        train_rows=sum(m.split("train").rows for m in manifests_used),
        validation_rows=sum(m.splits["validation"].rows for m in manifests_used if "validation" in m.splits),
        batches_per_epoch=batches_per_epoch,
        total_steps=total_steps(
            max_steps=trainer.max_steps, max_tokens=trainer.max_tokens, max_epochs=trainer.max_epochs,
            tokens_per_step=tokens_per_step, steps_per_epoch=batches_per_epoch / trainer.grad_accum_steps,
        ),
        tokens_per_step=tokens_per_step,
        eval_batches=sum(task.eval_batches for task in tasks),
    )


def plan_task(name: str, weight: float, manifest: Manifest, trainer: TrainerConfig) -> TaskPlan:
    """One dataset's counts per worker; raise if it cannot feed one step."""
    train = manifest.split("train")
    validation = manifest.splits.get("validation")
    rows_per_worker = train.rows // trainer.num_workers  # streaming_split(equal=True) drops the remainder
    batches_per_epoch = rows_per_worker // trainer.micro_batch_size  # drop_last: every batch is full
    if batches_per_epoch < trainer.grad_accum_steps:
        raise TrainConfigError(
            f"the train split of {manifest.dataset_dir} has {train.rows} rows: too few for one step of "
            f"trainer.micro_batch_size={trainer.micro_batch_size} x trainer.grad_accum_steps="
            f"{trainer.grad_accum_steps} x trainer.num_workers={trainer.num_workers}"
        )
    return TaskPlan(
        name=name,
        weight=weight,
        train_paths=tuple(manifest.split_paths("train")),
        validation_paths=tuple(manifest.split_paths("validation")) if validation else (),
        columns=("tokens",) + ((LOSS_MASK_COLUMN,) if LOSS_MASK_COLUMN in manifest.columns else ()),
        batches_per_epoch=batches_per_epoch,
        eval_batches=eval_batches_per_worker(
            validation.rows if validation else 0,
            num_workers=trainer.num_workers,
            batch_size=trainer.micro_batch_size,
            cap=trainer.eval_batches,
        ),
    )


def total_steps(
    *,
    max_steps: Optional[int],
    max_tokens: Optional[int],
    max_epochs: Optional[int],
    tokens_per_step: int,
    steps_per_epoch: float,
) -> int:
    """Optimizer steps until the first limit is reached (at least one limit is set)."""
    candidates = []
    if max_steps is not None:
        candidates.append(max_steps)
    if max_tokens is not None:
        candidates.append(math.ceil(max_tokens / tokens_per_step))
    if max_epochs is not None:
        # Micro-batches run on across epoch boundaries, so partial steps per epoch add up.
        candidates.append(max(1, math.floor(max_epochs * steps_per_epoch)))
    return max(1, min(candidates))


def eval_batches_per_worker(rows: int, *, num_workers: int, batch_size: int, cap: Optional[int]) -> int:
    """Full validation batches every worker can read (equal on all, as the expert all-to-all needs)."""
    available = (rows // num_workers) // batch_size
    return available if cap is None else min(cap, available)


def load_manifest(dataset_dir: str) -> Manifest:
    """The dataset's manifest, with data-layer errors passed through (they name the problem)."""
    return Manifest.load(storage.absolute(dataset_dir))
