"""Expert pruning: measure how many tokens each expert gets, keep the most used ones.

Shape legend: E experts before pruning, N experts kept, D model dim, F expert hidden.

    usage = expert_usage(model, batches)               tokens routed to each expert, per MoE layer
    keep_ids = choose_experts(usage, keep=4)           per MoE layer, sorted expert ids
    prune_export("export", "pruned", keep_ids)         sliced weights, num_experts = N

Pruning slices, in every MoE layer, `experts.w1/w2/w3` (E, ...) -> (N, ...), `router.weight`
(E, D) -> (N, D) and `router.balance_bias` (E,) -> (N,) to the kept experts (in ascending id
order), and sets model.moe.num_experts = N. The router is thereby re-normalised: its softmax
runs over the N remaining experts only, and the top-k weights are renormalised (or not) as
`model.moe.renormalize` says. Dropping experts that never receive a token therefore leaves
the model's outputs unchanged when renormalize=true (top_k >= 2), and nearly so otherwise
(the raw probabilities grow by the mass the dropped experts held). A capacity
(capacity_factor > 0) is per expert, so with fewer experts each one takes more tokens.

ModelConfig has one num_experts for every MoE layer, so every layer keeps the same count.
Works on exports (canonical state dict + ModelConfig), so it is backend- and EP-independent.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Iterable, Optional, Union

import torch
from torch import Tensor

from .config import ModelConfig
from .export import export_tokenizer, load_export_state, write_export
from .model import MoETransformer

PathLike = Union[str, Path]
EXPERT_KEYS = ("experts.w1", "experts.w2", "experts.w3", "router.weight", "router.balance_bias")


@torch.no_grad()
def expert_usage(model: MoETransformer, batches: Iterable[Tensor]) -> list[Tensor]:
    """Per MoE layer, (E,) int64: tokens routed to each expert (before any capacity drop),
    summed over the token batches (each (B, T) token ids). Runs the model in eval mode
    with routing statistics on, and restores both afterwards."""
    layers = model.moe_layers()
    was_training, was_collecting = model.training, any(layer.collect_stats for _, layer in layers)
    usage = [torch.zeros(model.config.moe.num_experts, dtype=torch.long) for _ in layers]
    model.eval()
    model.set_routing_stats(True)
    try:
        for idx_BT in batches:
            model(idx_BT)
            for total, stats in zip(usage, model.routing_stats()):
                total += stats["tokens_per_expert"]
    finally:
        model.set_routing_stats(was_collecting)
        model.train(was_training)
    return usage


def choose_experts(usage: list[Tensor], *, keep: Optional[int] = None,
                   min_share: Optional[float] = None) -> list[list[int]]:
    """Per MoE layer, the sorted ids of the experts to keep; give exactly one of
    `keep` (the N most used experts of each layer) or `min_share` (drop experts whose share
    of the layer's routed tokens is below it). As every layer must keep the same count, with
    min_share N is the largest count of experts at or above the threshold in any layer, and
    every layer keeps its N most used experts (ties go to the lower id)."""
    if (keep is None) == (min_share is None):
        raise ValueError("choose_experts() needs exactly one of keep= or min_share=.")
    if not usage:
        raise ValueError("choose_experts() got no layers' usage (a dense model has nothing to prune).")
    num_experts = usage[0].numel()
    if keep is not None and not 1 <= keep <= num_experts:
        raise ValueError(f"keep={keep} must be between 1 and the layer's {num_experts} experts.")
    if min_share is not None:
        if not 0 <= min_share < 1:
            raise ValueError(f"min_share={min_share} must be in [0, 1).")
        shares = [u.double() / u.sum().clamp(min=1) for u in usage]
        keep = max(1, max(int((s >= min_share).sum()) for s in shares))
    # Stable sort on the negated count: most used first, lower id first among equals.
    return [sorted(torch.argsort(-u, stable=True)[:keep].tolist()) for u in usage]


def prune_state(sd: dict[str, Tensor], config: ModelConfig,
                keep_ids: list[list[int]]) -> tuple[dict[str, Tensor], ModelConfig]:
    """The canonical state dict with only the kept experts of each MoE layer, and its config."""
    layers = [i for i in range(config.n_layers) if config.is_moe_layer(i)]
    kept = _check_keep_ids(keep_ids, config, len(layers))
    out = dict(sd)
    for i, ids in zip(layers, kept):
        ids_N = torch.tensor(ids)
        for key in EXPERT_KEYS:
            name = f"layers.{i}.ffn.{key}"
            if name in out:
                out[name] = out[name].index_select(0, ids_N).contiguous()  # (E, ...) -> (N, ...)
    moe = dataclasses.replace(config.resolved().moe, num_experts=len(kept[0]))  # the kept experts keep their bias
    return out, dataclasses.replace(config, moe=moe)


def prune_export(export_dir: PathLike, out_dir: PathLike, keep_ids: list[list[int]]) -> Path:
    """Prune the export in export_dir into out_dir (tokenizer.json copied when present)."""
    src = Path(export_dir)
    sd, config = prune_state(*load_export_state(src), keep_ids)
    return write_export(sd, config, out_dir, export_tokenizer(src))


def _check_keep_ids(keep_ids: list[list[int]], config: ModelConfig, num_layers: int) -> list[list[int]]:
    m = config.moe
    if num_layers == 0:
        raise ValueError(f"the model has no MoE layers (model.moe.moe_every={m.moe_every}), so no expert to prune.")
    if len(keep_ids) != num_layers:
        raise ValueError(f"keep_ids has {len(keep_ids)} lists; the model has {num_layers} MoE layers.")
    kept = [sorted(ids) for ids in keep_ids]
    if len({len(ids) for ids in kept}) > 1:
        raise ValueError(f"keep_ids keeps {[len(ids) for ids in kept]} experts per layer; model.moe.num_experts "
                         "is one number, so every layer must keep the same count.")
    for ids in kept:
        if len(set(ids)) != len(ids) or not all(0 <= e < m.num_experts for e in ids):
            raise ValueError(f"keep_ids has {ids}; each layer's ids must be distinct and in [0, {m.num_experts}).")
    if len(kept[0]) < m.top_k:
        raise ValueError(f"keeping {len(kept[0])} experts per layer is fewer than model.moe.top_k={m.top_k} "
                         "(each token needs top_k experts); keep more or lower top_k first.")
    return kept
