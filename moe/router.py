"""Routing: which expert sees which token, with what weight, and the router losses.

Shape legend (torchtitan style): T tokens (batch * seq, this rank), D model dim,
E experts (global), K top-k, A assignments (token, expert) pairs actually dispatched.

Token choice: each token takes its top-K experts by softmax probability (gate in
fp32). Expert choice (Zhou et al. 2022): each expert takes its top-C tokens. Both end
in a `Dispatch` sorted by expert, which the native expert backend consumes as is
(contiguous rows per expert -> one grouped GEMM).

Losses: Switch/GShard load balancing E * sum_i f_i * P_i (f_i: share of assignments
to expert i, P_i: mean router probability of expert i; exactly 1.0 under uniform
routing) and the ST-MoE z-loss mean(logsumexp(logits)^2).

Auxiliary-loss-free balancing (DeepSeek-V3): `balance_bias` is added to the scores
used to SELECT experts and never to the combine weights, so it steers load without
changing what a chosen expert contributes; `Router.update_bias()` moves it by
rate * sign(mean load - load) after each optimizer step.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from .config import ModelConfig, capacity


class Dispatch(NamedTuple):
    """Assignments sorted by expert: rows [offs[e-1], offs[e]) go to expert e."""

    token_idx_A: Tensor  # (A,) int64, the token of each assignment
    weight_A: Tensor  # (A,) fp32 combine weight
    counts_E: Tensor  # (E,) int64 assignments per expert (after capacity)


class RouteInfo(NamedTuple):
    """What the losses and statistics need, from either backend."""

    logits_TE: Tensor  # fp32
    routed_E: Tensor  # (E,) int64 assignments each expert was chosen for, before capacity
    kept_E: Tensor  # (E,) int64 assignments each expert processed
    unrouted_tokens: Optional[Tensor] = None  # expert_choice: tokens that no expert picked


def router_logits(x_TD: Tensor, weight_ED: Tensor) -> Tensor:
    """The gate runs in fp32: small logit differences decide routes, bf16 would blur them."""
    return F.linear(x_TD.float(), weight_ED.float())


def jitter(x_TD: Tensor, eps: float) -> Tensor:
    """Switch's multiplicative input jitter, U(1 - eps, 1 + eps) (training only)."""
    if eps == 0:
        return x_TD
    return x_TD * torch.empty_like(x_TD).uniform_(1.0 - eps, 1.0 + eps)


def select_top_k(probs_TE: Tensor, k: int, bias_E: Optional[Tensor], renormalize: bool) -> tuple[Tensor, Tensor]:
    """Top-k experts per token -> (expert_idx_TK, weight_TK)."""
    # The balancing bias only chooses experts; weights come from the unbiased probabilities,
    # so the bias cannot inflate or shrink what an expert adds to the residual stream.
    scores_TE = probs_TE if bias_E is None else probs_TE + bias_E
    expert_idx_TK = scores_TE.topk(k, dim=-1).indices
    weight_TK = probs_TE.gather(-1, expert_idx_TK)
    if renormalize and k > 1:
        weight_TK = weight_TK / weight_TK.sum(-1, keepdim=True)
    return expert_idx_TK, weight_TK


def sort_by_expert(expert_idx_TK: Tensor, weight_TK: Tensor, num_experts: int,
                   cap: Optional[int] = None, priority_TK: Optional[Tensor] = None) -> Dispatch:
    """Sort the T*K assignments by expert; with a capacity, keep each expert's `cap`
    assignments of highest priority (gate probability) and drop the rest."""
    k = expert_idx_TK.shape[1]
    expert_A = expert_idx_TK.reshape(-1)
    counts_E = torch.bincount(expert_A, minlength=num_experts)
    if cap is None:
        order_A = expert_A.argsort(stable=True)
    else:
        # Two stable sorts = sort by (expert ascending, priority descending).
        by_prio = priority_TK.reshape(-1).argsort(descending=True, stable=True)
        order_A = by_prio[expert_A[by_prio].argsort(stable=True)]
        start_E = counts_E.cumsum(0) - counts_E
        rank_in_expert = torch.arange(order_A.numel(), device=order_A.device) - start_E[expert_A[order_A]]
        order_A = order_A[rank_in_expert < cap]
        counts_E = counts_E.clamp(max=cap)
    return Dispatch(order_A // k, weight_TK.reshape(-1)[order_A], counts_E)


def expert_choice(probs_TE: Tensor, cap: int, token_mask_T: Optional[Tensor] = None) -> Dispatch:
    """Each expert takes its `cap` highest-probability tokens (already grouped by expert)."""
    num_experts = probs_TE.shape[1]
    scores_TE = probs_TE if token_mask_T is None else probs_TE.masked_fill(~token_mask_T[:, None], -1.0)
    _, token_idx_CE = scores_TE.topk(cap, dim=0)
    token_idx_A = token_idx_CE.t().reshape(-1)  # expert-major: expert 0's C tokens, then expert 1's, ...
    expert_A = torch.arange(num_experts, device=probs_TE.device).repeat_interleave(cap)
    counts_E = torch.full((num_experts,), cap, dtype=torch.long, device=probs_TE.device)
    return Dispatch(token_idx_A, probs_TE[token_idx_A, expert_A], counts_E)


def load_balancing_loss(logits_TE: Tensor, routed_E: Tensor) -> Tensor:
    """E * sum_i f_i * P_i; f is a count ratio (no gradient), P carries the gradient."""
    probs_TE = logits_TE.softmax(-1)
    f_E = routed_E.float() / routed_E.sum().clamp(min=1)
    return probs_TE.shape[1] * (f_E * probs_TE.mean(0)).sum()


def z_loss(logits_TE: Tensor) -> Tensor:
    """ST-MoE router z-loss: keeps logits small so the fp32 softmax stays well conditioned."""
    return torch.logsumexp(logits_TE, dim=-1).square().mean()


@torch.no_grad()
def routing_stats(info: RouteInfo) -> dict:
    """Detached CPU statistics of one layer's routing (call only when logging)."""
    routed = info.routed_E.cpu()
    kept = info.kept_E.cpu()
    probs = info.logits_TE.softmax(-1)
    entropy = -(probs * probs.clamp(min=1e-20).log()).sum(-1).mean()
    if info.unrouted_tokens is not None:  # expert choice: share of tokens no expert took
        dropped = info.unrouted_tokens.float() / max(1, info.logits_TE.shape[0])
    else:
        dropped = 1.0 - kept.sum().float() / routed.sum().clamp(min=1)
    load = routed.float()
    return {
        "tokens_per_expert": routed,
        "dropped_fraction": float(dropped),
        "router_entropy": float(entropy),
        "max_over_mean_load": float(load.max() / load.mean().clamp(min=1e-9)),
    }


class Router(nn.Module):
    """The native backend's router: gate weight, optional balancing bias, dispatch plan."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        m = config.moe
        self.num_experts, self.top_k = m.num_experts, m.top_k
        self.kind, self.capacity_factor = m.router, m.capacity_factor
        self.renormalize, self.jitter_eps = m.renormalize, m.jitter_eps
        self.bias_update_rate = config.bias_update_rate
        self.weight = nn.Parameter(torch.empty(m.num_experts, config.d_model))
        if self.bias_update_rate > 0:
            self.register_buffer("balance_bias", torch.zeros(m.num_experts))
            # Load seen since the last bias update (not checkpointed: it is reset every step).
            self.register_buffer("load_E", torch.zeros(m.num_experts), persistent=False)
        else:
            self.balance_bias = None

    def forward(self, x_TD: Tensor, token_mask_T: Optional[Tensor] = None,
                dropless: bool = False) -> tuple[Dispatch, RouteInfo]:
        if self.training:
            x_TD = jitter(x_TD, self.jitter_eps)
        logits_TE = router_logits(x_TD, self.weight)
        probs_TE = logits_TE.softmax(-1)
        if self.kind == "expert_choice":
            dispatch, info = self._expert_choice(logits_TE, probs_TE, token_mask_T)
        else:
            dispatch, info = self._token_choice(logits_TE, probs_TE, dropless)
        if self.training and self.balance_bias is not None:
            self.load_E += info.routed_E.to(self.load_E.dtype)
        return dispatch, info

    def _token_choice(self, logits_TE: Tensor, probs_TE: Tensor, dropless: bool) -> tuple[Dispatch, RouteInfo]:
        idx_TK, weight_TK = select_top_k(probs_TE, self.top_k, self.balance_bias, self.renormalize)
        cap = None
        if self.capacity_factor > 0 and not dropless:
            cap = capacity(probs_TE.shape[0], self.num_experts, self.top_k, self.capacity_factor)
        priority_TK = probs_TE.gather(-1, idx_TK) if cap is not None else None
        dispatch = sort_by_expert(idx_TK, weight_TK, self.num_experts, cap, priority_TK)
        routed_E = torch.bincount(idx_TK.reshape(-1), minlength=self.num_experts) if cap is not None else dispatch.counts_E
        return dispatch, RouteInfo(logits_TE, routed_E, dispatch.counts_E)

    def _expert_choice(self, logits_TE: Tensor, probs_TE: Tensor,
                       token_mask_T: Optional[Tensor]) -> tuple[Dispatch, RouteInfo]:
        num_tokens = probs_TE.shape[0] if token_mask_T is None else int(token_mask_T.sum())  # sync only if masked
        cap = min(capacity(num_tokens, self.num_experts, self.top_k, self.capacity_factor), num_tokens)
        dispatch = expert_choice(probs_TE, cap, token_mask_T)
        covered_T = torch.bincount(dispatch.token_idx_A, minlength=probs_TE.shape[0]) > 0
        unrouted = num_tokens - covered_T.sum()
        return dispatch, RouteInfo(logits_TE, dispatch.counts_E, dispatch.counts_E, unrouted)

    @torch.no_grad()
    def update_bias(self) -> None:
        """bias += rate * sign(mean load - load), with the load summed over all ranks so every
        replica keeps the same bias. Collective when torch.distributed is initialised."""
        if self.balance_bias is None:
            return
        load_E = self.load_E.clone()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(load_E)
        self.balance_bias += self.bias_update_rate * torch.sign(load_E.mean() - load_E)
        self.load_E.zero_()
