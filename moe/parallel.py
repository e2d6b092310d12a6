"""Expert parallelism on DeepSpeed's process groups.

Both backends use the groups of `deepspeed.utils.groups`, named ``ep_size_{ep}``:
the expert-parallel group (ranks that split one layer's experts and exchange tokens
by all-to-all) and the expert-data-parallel group (ranks holding the same experts,
which average those experts' gradients). DeepSpeed's engine creates them when it
sees an MoE layer (`set_deepspeed_parallelism`); `ensure_expert_parallel_groups`
creates the same groups earlier when a model needs them before the engine exists.
With the default (non "data before expert") layout the EP groups are consecutive
ranks: [0, 1], [2, 3], ... for ep=2.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn


def expert_group_name(expert_parallel_size: int) -> str:
    """DeepSpeed's name for the groups of this EP size (also each expert param's `group_name`)."""
    return f"ep_size_{expert_parallel_size}"


def _dist_ready() -> bool:
    return dist.is_available() and dist.is_initialized()


def ensure_expert_parallel_groups(expert_parallel_size: int) -> None:
    """Create DeepSpeed's expert(-data)-parallel groups for this EP size if missing."""
    if expert_parallel_size == 1 and not _dist_ready():
        return
    if not _dist_ready():
        raise RuntimeError(f"expert_parallel_size={expert_parallel_size} needs torch.distributed to be "
                           "initialised first (e.g. deepspeed.init_distributed(dist_backend='gloo')).")
    from deepspeed.utils import groups

    if expert_group_name(expert_parallel_size) not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(expert_parallel_size)


def expert_parallel_group(expert_parallel_size: int) -> Optional[dist.ProcessGroup]:
    if expert_parallel_size == 1:
        return None
    ensure_expert_parallel_groups(expert_parallel_size)
    from deepspeed.utils import groups

    return groups._get_expert_parallel_group(expert_group_name(expert_parallel_size))


def expert_parallel_rank(expert_parallel_size: int) -> int:
    """This rank's position in its EP group: it holds experts [rank * E/ep, (rank + 1) * E/ep)."""
    group = expert_parallel_group(expert_parallel_size)
    return 0 if group is None else dist.get_rank(group)


def tag_expert_params(params: list[nn.Parameter], expert_parallel_size: int) -> None:
    """Mark params as DeepSpeed marks `deepspeed.moe.experts.Experts`' params: the engine then
    averages their gradients over the expert-data-parallel group (not all ranks), ZeRO
    partitions them there, and `split_params_into_different_moe_groups_for_optimizer`
    puts them in their own 'moe' param group."""
    for p in params:
        p.allreduce = False
        p.group_name = expert_group_name(expert_parallel_size)


def optimizer_param_groups(model: nn.Module, weight_decay: float = 0.0, **group_options: Any) -> list[dict]:
    """Param groups for any torch optimizer under DeepSpeed: decay on matrices, none on
    norms/biases/embedding, experts split into DeepSpeed's 'moe' groups (needed by ZeRO)."""
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "tok_emb" in name else decay).append(p)
    groups = [{"name": "decay", "params": decay, "weight_decay": weight_decay, **group_options},
              {"name": "no_decay", "params": no_decay, "weight_decay": 0.0, **group_options}]
    return split_params_into_different_moe_groups_for_optimizer([g for g in groups if g["params"]])


@dataclass
class CommMeter:
    """What this rank's expert-parallel all-to-alls cost while `measuring` is on: bytes sent
    (rows leaving for other ranks and their gradients coming back) and seconds inside the calls.
    Off by default: on a GPU, timing a call means synchronising around it."""

    measuring: bool = False
    bytes_sent: int = 0
    seconds: float = 0.0

    def start(self) -> None:
        self.measuring, self.bytes_sent, self.seconds = True, 0, 0.0

    def stop(self) -> tuple[int, float]:
        self.measuring = False
        return self.bytes_sent, self.seconds


ALL_TO_ALL = CommMeter()


def _all_to_all(out: Tensor, x: Tensor, out_splits: list[int], in_splits: list[int], group) -> None:
    if not ALL_TO_ALL.measuring:
        dist.all_to_all_single(out, x, out_splits, in_splits, group=group)
        return
    on_gpu = x.is_cuda
    if on_gpu:
        torch.cuda.synchronize(x.device)
    started = time.perf_counter()
    dist.all_to_all_single(out, x, out_splits, in_splits, group=group)
    if on_gpu:
        torch.cuda.synchronize(x.device)
    ALL_TO_ALL.seconds += time.perf_counter() - started
    own = dist.get_rank(group)
    row_bytes = x[0].numel() * x.element_size() if x.shape[0] else 0
    ALL_TO_ALL.bytes_sent += (sum(in_splits) - in_splits[own]) * row_bytes


class _AllToAllV(torch.autograd.Function):
    """all_to_all_single with uneven splits; the backward sends gradients back the same way."""

    @staticmethod
    def forward(ctx, x: Tensor, out_splits: list[int], in_splits: list[int], group) -> Tensor:
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
        _all_to_all(out, x.contiguous(), out_splits, in_splits, group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        out_splits, in_splits = ctx.splits
        return _AllToAllV.apply(grad, in_splits, out_splits, ctx.group), None, None, None


def all_to_all_v(x: Tensor, out_splits: list[int], in_splits: list[int], group) -> Tensor:
    """Rows x[sum(in_splits[:r]) : ...] go to rank r; rows from rank r land in out_splits[r]."""
    return _AllToAllV.apply(x, out_splits, in_splits, group)


def exchange_counts(counts: Tensor, group) -> Tensor:
    """all_to_all of equal-size count vectors (no autograd): counts.view(ep, -1)[r] goes to rank r."""
    out = torch.empty_like(counts)
    dist.all_to_all_single(out, counts.contiguous(), group=group)
    return out


@torch.no_grad()
def all_gather_cat(x: Tensor, group, dim: int = 0) -> Tensor:
    """Concatenate every EP rank's shard along `dim` (rank order = expert order)."""
    if group is None:
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=dim)
