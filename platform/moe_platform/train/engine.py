"""DeepSpeed engine construction from the typed trainer config.

One place turns `TrainerConfig` into a DeepSpeed config dict, AdamW parameter
groups (expert parameters in their own groups, as DeepSpeed's MoE support
requires) and a warmup + cosine schedule, then calls `deepspeed.initialize` on
the process group Ray Train already set up.
"""
from __future__ import annotations

import functools
import logging
import math
import os
from typing import Optional

import torch

from moe import ModelConfig
from moe.parallel import optimizer_param_groups
from moe_platform.train.config import TrainerConfig

log = logging.getLogger(__name__)

# DeepSpeed prints a throughput line every `steps_per_print` steps; our own metrics replace it.
_NEVER = 10**9


def use_bf16(trainer: TrainerConfig) -> bool:
    """auto -> bf16 on GPU, fp32 on CPU (CPU bf16 matmuls are slow and lossy for tiny models)."""
    return trainer.use_gpu and trainer.precision in ("auto", "bf16")


def deepspeed_config(trainer: TrainerConfig) -> dict:
    zero: dict = {"stage": trainer.zero_stage}
    if trainer.zero_stage == 2:
        zero.update(contiguous_gradients=True, reduce_scatter=True, overlap_comm=trainer.use_gpu)
    return {
        "train_micro_batch_size_per_gpu": trainer.micro_batch_size,
        "gradient_accumulation_steps": trainer.grad_accum_steps,
        "train_batch_size": trainer.samples_per_step,
        "gradient_clipping": trainer.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": use_bf16(trainer)},
        # torch.optim.AdamW is the client optimizer; ZeRO wraps it whatever its class.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": _NEVER,
        "wall_clock_breakdown": False,
    }


def warmup_cosine(step: int, *, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """LR multiplier after `step` optimizer steps: linear warmup, then cosine to min_lr_ratio.

    Warmup starts at 1/warmup_steps rather than 0, so the first step already learns.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def expert_lr_scale(trainer: TrainerConfig, model_config: ModelConfig) -> float:
    """trainer.expert_lr_scale, or when null 2 with bias balancing (the recipe measured together), else 1."""
    if trainer.expert_lr_scale is not None:
        return trainer.expert_lr_scale
    return 2.0 if model_config.bias_update_rate > 0 else 1.0


def build_optimizer(model: torch.nn.Module, trainer: TrainerConfig) -> torch.optim.AdamW:
    """AdamW over the model's param groups, the routed experts' at lr * trainer.expert_lr_scale.

    Matrices decay, norms/biases/embedding do not; expert params go to DeepSpeed's 'moe' groups
    (from their allreduce=False / group_name tags), whose gradients it reduces over the
    expert-data-parallel group only. The LR schedule multiplies every group's own lr.
    fused: one kernel per step over all tensors; on CPU 2.2 ms against torch's default for-loop's
    12-15 ms per step for the default model's 8.4M parameters (2-core VM), the same update.
    """
    scale = expert_lr_scale(trainer, model.config)
    groups = optimizer_param_groups(model, trainer.weight_decay)
    for group in groups:
        if group.get("moe"):
            group["lr"] = trainer.lr * scale
    return torch.optim.AdamW(groups, lr=trainer.lr, betas=(trainer.beta1, trainer.beta2), eps=trainer.eps,
                             fused=True)


def build_engine(model: torch.nn.Module, trainer: TrainerConfig, *, total_steps: int):
    """-> DeepSpeed engine (wrapping `model`, optimizer and LR scheduler)."""
    import deepspeed

    optimizer = build_optimizer(model, trainer)
    schedule = functools.partial(
        warmup_cosine, warmup_steps=trainer.warmup_steps, total_steps=total_steps, min_lr_ratio=trainer.min_lr_ratio
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=deepspeed_config(trainer),
        dist_init_required=False,
    )
    return engine


def init_deepspeed_comm(backend: str) -> None:
    """Let DeepSpeed's comm layer wrap the torch.distributed group Ray Train created."""
    import deepspeed

    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)


def keep_large_blocks_on_heap() -> bool:
    """Have glibc serve every CPU tensor from its heap and keep the heap: no page faults per step.

    glibc hands blocks over its mmap threshold (at most 32 MiB) to fresh mmap()s, and a training
    step allocates several larger ones (the default model's logits are 8 x 256 x 4096 floats,
    32 MiB, and so are their softmax and gradient). Every such block is new pages, faulted in
    during the step and unmapped after it: on the 2-core CI-class VM, 2.2M minor faults and 3.6 s
    of system time in 60 steps of the default model, 6% of the wall-clock (benchmarks/RESULTS.md,
    "Where a CPU training step lost time"). With the threshold at 1 GiB and trimming off, the heap
    grows to the step's working set once and is reused; peak memory is the same (the working set
    is live at the peak either way). Returns False where libc is not glibc.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    return bool(mallopt(m_mmap_threshold, 1 << 30)) and bool(mallopt(m_trim_threshold, -1))


def intra_op_threads(configured: Optional[int], workers_on_node: int) -> int:
    """torch's intra-op threads for one training worker: trainer.torch_threads, or by default the
    node's cores shared evenly among the training workers on it.

    Ray sets OMP_NUM_THREADS from the CPU *request* (1 for the default 0.5 CPU), which leaves
    cores idle: a lone worker on a 2-core machine would compute on one. The CPU request stays
    fractional so Ray Data can always schedule its tasks (a fully booked node hangs it); Ray Data's
    share of the work is small (reading and shuffling rows: the data wait is well under 2% of a
    step, benchmarks/train_throughput.py), so the workers' threads take every core and Ray Data's
    processes take the moments they need from them.
    """
    if configured is not None:
        return configured
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, workers_on_node))
