"""Typed configs of a training stage: the `trainer`, `run`, `init` and `evaluate` sections.

A *stage* is one Ray Train + DeepSpeed run: a model, a dataset, an objective, an
initialisation and an optimiser schedule. Pretraining is the first stage; later
stages (finetune, distill, upcycle) reuse the same loop with a different
`StageConfig`. Jobs build these dataclasses from Hydra; nothing here reads Hydra.

Each `__post_init__` checks what one section can check alone and names the key.
Checks that need two sections or the dataset (experts vs. expert-parallel size,
vocabulary vs. manifest) live in `moe_platform.train.plan.validate_stage`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, List, Optional

from moe import ModelConfig
from moe.configs import ConfigError, from_dict, require
from moe.peft_config import PeftConfig

PRECISIONS = ("auto", "fp32", "bf16")
ZERO_STAGES = (0, 1, 2)


# The one config error (moe.configs), under the name the training code has always raised.
TrainConfigError = ConfigError


@dataclass
class TrainerConfig:
    """How to train: parallel layout, optimiser, schedule, run length and cadences."""

    # ---- parallel layout ------------------------------------------------------------------
    num_workers: int = 1
    # Experts are split over groups of this many workers (all-to-all inside a group);
    # num_workers and model.moe.num_experts must both be multiples of it.
    expert_parallel_size: int = 1
    use_gpu: bool = False
    # Fractional on purpose: workers holding every CPU starve Ray Data, which then hangs
    # without an error (docs/ray-notes.md, Data -> Train). GPU runs keep it small too.
    cpus_per_worker: float = 0.5
    # Intra-op threads per worker; null = the node's cores shared evenly among the training workers
    # on it (engine.intra_op_threads: Ray's own choice from a 0.5-CPU request would be 1 thread).
    torch_threads: Optional[int] = None

    # ---- objective and optimiser ----------------------------------------------------------
    # What the loss is (moe_platform.train.objective.OBJECTIVES): "lm" = next-token cross-entropy
    # plus the model's auxiliary MoE losses; "distill" = that plus a KL term towards a teacher
    # export's logits (the `distill` section).
    objective: str = "lm"
    zero_stage: int = 1
    # auto: fp32 on CPU, bf16 on GPU.
    precision: str = "auto"
    micro_batch_size: int = 8
    grad_accum_steps: int = 1
    grad_clip: float = 1.0  # max global gradient norm; 0 = no clipping
    lr: float = 3e-3
    # Linear warmup to lr over warmup_steps, then cosine decay to lr * min_lr_ratio at the last step.
    # 50, not 20: at lr 3e-3 a 20-step warmup ends in a loss spike (the default model's training
    # loss climbs from 6.9 to 7.3 over steps 14-19) that both MoE and dense carry to the end;
    # 50 steps lowers their held-out loss by ~2.5% at 200 steps (benchmarks/RESULTS.md, "MoE vs dense").
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1
    # The routed experts' learning rate is lr * expert_lr_scale (the router, attention, shared experts
    # and embeddings keep lr): each expert learns from only top_k / num_experts of the tokens. null:
    # 2 when the model balances with the router bias (model.moe.bias_update_rate > 0, the default),
    # else 1. The study measured the two together: on English prose the faster experts give back the
    # held-out loss the bias costs, and at 600 steps gain 1% over the balance loss alone; without the
    # bias, 2 changes nothing beyond the noise (benchmarks/RESULTS.md, "the experts' learning rate").
    expert_lr_scale: Optional[float] = None
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8

    # ---- length: the run stops at whichever limit comes first (at least one set; null = no limit;
    # the cosine schedule ends at that step) ----------------------------------------------------
    max_steps: Optional[int] = 200
    max_tokens: Optional[int] = None
    max_epochs: Optional[int] = None

    # ---- data ----------------------------------------------------------------------------
    seed: int = 0
    # Rows in each worker's shuffle buffer, reseeded every epoch from (seed, epoch, rank);
    # 0 = read rows in stored order.
    shuffle_buffer_rows: int = 4096
    prefetch_batches: int = 4

    # ---- cadences (in optimizer steps) ------------------------------------------------------
    log_every: int = 10  # TensorBoard scalars and routing statistics
    # ray.train.report is throttled (~2 s per call, docs/ray-notes.md): report every N steps.
    report_every: int = 10
    eval_every: int = 100  # 0 = evaluate only at the end
    eval_batches: Optional[int] = 20  # per worker; null = the whole validation split
    checkpoint_every: int = 100  # a checkpoint is always written at the last step too
    # Routing health: an expert is "dead" in a logging interval when its share of its layer's
    # assignments is below this fraction of the uniform share 1/E (0.25: under a quarter of it).
    dead_expert_threshold: float = 0.25
    # Peak FLOP/s of one worker's device, the denominator of MFU (e.g. 989e12, an H100's datasheet
    # bf16). null: measured by each worker at its first logging step, as the best rate of a few
    # large matmuls at the training precision on its threads; MFU then reads as the share of what this
    # hardware's matmul reaches (a fixed guess read 120% on a 2-core AVX-512 VM).
    peak_flops_per_worker: Optional[float] = None

    # ---- testing only ----------------------------------------------------------------------
    # The last worker exits abruptly after this step, once per run (a marker file in
    # run.output_dir remembers it), to exercise Ray Train's restart from the checkpoint.
    fail_at_step: Optional[int] = None

    def __post_init__(self) -> None:
        require(self.num_workers >= 1, f"trainer.num_workers must be >= 1, got {self.num_workers}")
        require(
            self.expert_parallel_size >= 1,
            f"trainer.expert_parallel_size must be >= 1, got {self.expert_parallel_size}",
        )
        require(
            self.num_workers % self.expert_parallel_size == 0,
            f"trainer.num_workers={self.num_workers} must be a multiple of "
            f"trainer.expert_parallel_size={self.expert_parallel_size}",
        )
        require(self.cpus_per_worker > 0, f"trainer.cpus_per_worker must be > 0, got {self.cpus_per_worker}")
        require(
            self.torch_threads is None or self.torch_threads >= 1,
            f"trainer.torch_threads must be >= 1 or null, got {self.torch_threads}",
        )
        require(self.zero_stage in ZERO_STAGES, f"trainer.zero_stage must be one of 0, 1, 2, got {self.zero_stage}")
        require(
            self.precision in PRECISIONS,
            f"trainer.precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}",
        )
        require(
            not (self.precision == "bf16" and not self.use_gpu),
            "trainer.precision=bf16 needs trainer.use_gpu=true (CPU training runs in fp32)",
        )
        for key in ("micro_batch_size", "grad_accum_steps", "log_every", "report_every", "checkpoint_every"):
            value = getattr(self, key)
            require(value >= 1, f"trainer.{key} must be >= 1, got {value}")
        for key in ("warmup_steps", "eval_every", "shuffle_buffer_rows", "prefetch_batches"):
            value = getattr(self, key)
            require(value >= 0, f"trainer.{key} must be >= 0, got {value}")
        require(self.lr > 0, f"trainer.lr must be > 0, got {self.lr}")
        require(self.expert_lr_scale is None or self.expert_lr_scale > 0,
                f"trainer.expert_lr_scale must be > 0 (or null), got {self.expert_lr_scale}")
        require(0 <= self.min_lr_ratio <= 1, f"trainer.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        require(self.grad_clip >= 0, f"trainer.grad_clip must be >= 0 (0 = off), got {self.grad_clip}")
        require(self.weight_decay >= 0, f"trainer.weight_decay must be >= 0, got {self.weight_decay}")
        for key in ("beta1", "beta2"):
            value = getattr(self, key)
            require(0 <= value < 1, f"trainer.{key} must be in [0, 1), got {value}")
        require(self.eps > 0, f"trainer.eps must be > 0, got {self.eps}")
        limits = {"max_steps": self.max_steps, "max_tokens": self.max_tokens, "max_epochs": self.max_epochs}
        require(
            any(value is not None for value in limits.values()),
            "set at least one of trainer.max_steps, trainer.max_tokens, trainer.max_epochs (the run needs an end)",
        )
        for key, value in limits.items():
            require(value is None or value >= 1, f"trainer.{key} must be >= 1 or null, got {value}")
        require(
            self.eval_batches is None or self.eval_batches >= 1,
            f"trainer.eval_batches must be >= 1 or null (the whole split), got {self.eval_batches}",
        )
        require(0 < self.dead_expert_threshold <= 1,
                f"trainer.dead_expert_threshold must be in (0, 1], got {self.dead_expert_threshold}")
        require(
            self.peak_flops_per_worker is None or self.peak_flops_per_worker > 0,
            f"trainer.peak_flops_per_worker must be > 0 or null, got {self.peak_flops_per_worker}",
        )
        require(
            self.fail_at_step is None or self.fail_at_step >= 1,
            f"trainer.fail_at_step must be >= 1 or null, got {self.fail_at_step}",
        )

    @property
    def samples_per_step(self) -> int:
        """Rows per optimizer step over all workers (every worker is data parallel)."""
        return self.micro_batch_size * self.grad_accum_steps * self.num_workers


@dataclass
class RunConfig:
    """Where a run writes and how Ray Train keeps it alive.

    Layout under output_dir (other jobs rely on it): config.json, config.yaml,
    tensorboard/, checkpoints/<step_00000100>/, export/.
    """

    # A local (or shared, for multi-node clusters) directory; relative paths are made absolute
    # by the job, since Ray workers run in other directories.
    output_dir: str = "outputs/pretrain"
    # Worker failures Ray Train absorbs by restarting from the latest checkpoint (-1 = forever).
    max_failures: int = 0
    checkpoints_to_keep: int = 2
    # Write <output_dir>/export (a Hugging Face model directory, moe/export.py) at the end.
    export: bool = True

    def __post_init__(self) -> None:
        require(bool(self.output_dir), "run.output_dir must not be empty")
        require(self.max_failures >= -1, f"run.max_failures must be >= -1 (-1 = forever), got {self.max_failures}")
        require(self.checkpoints_to_keep >= 1, f"run.checkpoints_to_keep must be >= 1, got {self.checkpoints_to_keep}")


@dataclass
class InitConfig:
    """Where a stage's weights come from when it is not resuming: random (seeded) or an export."""

    # An export directory (ours, or a local transformers checkpoint of a supported architecture,
    # moe/export.py) whose weights start this stage;
    # its architecture must match the `model` section. null = random init from trainer.seed.
    export_dir: Optional[str] = None


@dataclass
class EvaluateConfig:
    """`jobs/evaluate.py`: perplexity and routing statistics of an export on a dataset split, and
    task metrics where the data has references."""

    export_dir: str = "${run.output_dir}/export"
    split: str = "validation"
    batch_size: int = 8
    max_batches: Optional[int] = None  # null = the whole split
    # Several exports side by side instead (an entry "<dir>+int8" = that export quantized to int8):
    # held-out loss, perplexity, total/active parameters, size on disk, generation tokens/s.
    compare: List[str] = field(default_factory=list)
    # The comparison's PNG chart; null = <first export's parent>/comparison.png.
    chart: Optional[str] = None
    compare_max_batches: Optional[int] = 20  # held-out batches per export in a comparison
    # Task metrics (exact match, token F1, ROUGE-L, BLEU) of greedy answers to held-out
    # prompt/response records (moe_platform/generate/tasks.py), per task and overall, for one
    # export or each compared one: the .jsonl/.parquet files of task_input (one task each), else
    # the `tasks` of a mixture, else data.dataset_dir - each an instruction dataset's `split`
    # records, read from its source. A text dataset has no references: perplexity only.
    task_metrics: bool = True
    task_input: Optional[str] = None
    task_examples: int = 32  # per task
    task_max_tokens: int = 32  # per answer (at most half the model's context)

    def __post_init__(self) -> None:
        require(bool(self.export_dir), "evaluate.export_dir must not be empty")
        require(self.task_examples >= 1, f"evaluate.task_examples must be >= 1, got {self.task_examples}")
        require(self.task_max_tokens >= 1, f"evaluate.task_max_tokens must be >= 1, got {self.task_max_tokens}")
        require(self.batch_size >= 1, f"evaluate.batch_size must be >= 1, got {self.batch_size}")
        require(
            self.max_batches is None or self.max_batches >= 1,
            f"evaluate.max_batches must be >= 1 or null, got {self.max_batches}",
        )


@dataclass
class TaskConfig:
    """One dataset of a multi-task mixture (the `tasks` list): a prepared dataset and its weight."""

    name: str = ""
    dataset_dir: str = ""
    # Relative share of micro-batches drawn from this task (normalised over the list).
    weight: float = 1.0

    def __post_init__(self) -> None:
        require(bool(self.name) and self.name.replace("_", "").replace("-", "").isalnum(),
                 f"tasks: name {self.name!r} must be a non-empty word (letters, digits, _ or -)")
        require(bool(self.dataset_dir), f"tasks.{self.name}.dataset_dir must not be empty")
        require(self.weight > 0, f"tasks.{self.name}.weight must be > 0, got {self.weight}")


@dataclass
class DistillConfig:
    """trainer.objective=distill: learn from a teacher export's logits (Hinton et al. 2015).

    loss = alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * (student's own loss)
    over the tokens that count (the loss mask, if any). The teacher runs frozen on every worker.
    """

    teacher_export_dir: Optional[str] = None
    temperature: float = 2.0
    alpha: float = 0.5

    def __post_init__(self) -> None:
        require(self.temperature > 0, f"distill.temperature must be > 0, got {self.temperature}")
        require(0 <= self.alpha <= 1, f"distill.alpha must be in [0, 1], got {self.alpha}")


@dataclass
class StageConfig:
    """Everything one training stage needs; what `build_trainer` takes and checkpoints store.

    Data: `dataset_dir`, or - when `tasks` is not empty - a weighted mixture of several prepared
    datasets (dataset_dir is then unused); validation is reported per task and overall.
    """

    model: ModelConfig
    dataset_dir: str
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    run: RunConfig = field(default_factory=RunConfig)
    init: InitConfig = field(default_factory=InitConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    tasks: List[TaskConfig] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StageConfig:
        """Rebuild from `to_dict()` output (stage.json, a trial's values); unknown keys are errors."""
        return from_dict(cls, data)
