"""MoELayer: router -> dispatch -> experts -> combine (+ shared experts), either backend.

Shape legend: B batch, T tokens (B * seq on this rank), D model dim, E experts (global),
L local experts (E / ep), F expert hidden.

After each forward the layer holds `aux_losses` ({"balance", "z"}, with gradient) and,
only while `collect_stats` is on, `stats` (detached CPU values, see `router.routing_stats`).
Training forwards also add their routed counts to `window_load_E` (one (E,) add on the
device, no host sync), which `MoETransformer.pop_expert_load()` reads and clears: the
load over a whole logging window, not one micro-batch, is what tells a dead expert.
`tokens_per_expert` counts this rank's tokens per GLOBAL expert, before capacity
dropping; sum it over data-parallel ranks for the global load.

Canonical (EP- and backend-independent) layout of one MoE layer, under its prefix:
    router.weight (E, D), router.balance_bias (E,) [bias balancing only],
    experts.w1 (E, F, D), experts.w2 (E, D, F), experts.w3 (E, F, D),
    shared.w1.weight (S, D), shared.w2.weight (D, S), shared.w3.weight (S, D) [shared experts only]
    shared_gate.weight (1, D) [shared_expert_gate only]
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from . import parallel
from .config import ModelConfig
from .deepspeed_backend import DeepSpeedExperts
from .experts import WEIGHT_NAMES, NativeExperts, SwiGLU
from .router import RouteInfo, Router, load_balancing_loss, routing_stats, z_loss
from .state import merged_state


class MoELayer(nn.Module):

    def __init__(self, config: ModelConfig, *, expert_parallel_size: int = 1) -> None:
        super().__init__()
        m = config.moe
        self.ep_size = expert_parallel_size
        self.expert_choice = m.router == "expert_choice"
        self.routed_scale = m.routed_output_scale
        if m.backend == "native":
            self.router: Optional[Router] = Router(config)
            self.experts = NativeExperts(config, expert_parallel_size=expert_parallel_size)
        else:  # DeepSpeed's gate lives inside its MoE module
            self.router = None
            self.experts = DeepSpeedExperts(config, expert_parallel_size=expert_parallel_size)
        self.shared = SwiGLU(config.d_model, m.shared_hidden) if m.num_shared_experts else None
        # Qwen2-MoE's shared-expert gate: a per-token sigmoid(w . x) scale on the shared output.
        gated = self.shared is not None and m.shared_expert_gate
        self.shared_gate = nn.Linear(config.d_model, 1, bias=False) if gated else None
        self.collect_stats = False
        self.stats: Optional[dict] = None
        self.aux_losses: dict[str, Tensor] = {}
        self.register_buffer("window_load_E", torch.zeros(m.num_experts, dtype=torch.long), persistent=False)

    @property
    def router_weight(self) -> nn.Parameter:
        return self.router.weight if self.router is not None else self.experts.gate_weight

    def forward(self, x_BTD: Tensor, token_mask_BT: Optional[Tensor] = None, dropless: bool = False) -> Tensor:
        """token_mask_BT marks real tokens (padding is False); only
        expert_choice routing uses it. dropless=True ignores the capacity (generation)."""
        x_TD = x_BTD.reshape(-1, x_BTD.shape[-1])
        mask_T = None if token_mask_BT is None else token_mask_BT.reshape(-1)
        if self.router is not None:
            dispatch, info = self.router(x_TD, mask_T, dropless)
            y_TD = self.experts(x_TD, dispatch)
        else:
            y_TD, info = self.experts(x_TD, mask_T, dropless)
        if self.routed_scale != 1.0:
            y_TD = y_TD * self.routed_scale
        if self.shared is not None:
            shared_TD = self.shared(x_TD)
            if self.shared_gate is not None:
                shared_TD = torch.sigmoid(self.shared_gate(x_TD)) * shared_TD
            y_TD = y_TD + shared_TD
        self.aux_losses = self._losses(info)
        if self.training:
            self.window_load_E += info.routed_E.detach().to(self.window_load_E.device)
        self.stats = routing_stats(info) if self.collect_stats else None
        return y_TD.view_as(x_BTD)

    def _losses(self, info: RouteInfo) -> dict[str, Tensor]:
        # Expert choice is balanced by construction: its balance loss is 0 (nothing to learn).
        balance = info.logits_TE.new_zeros(()) if self.expert_choice else load_balancing_loss(
            info.logits_TE, info.routed_E)
        return {"balance": balance, "z": z_loss(info.logits_TE)}

    # -- canonical state ---------------------------------------------------------------------

    def canonical_state(self, prefix: str, grads: bool = False) -> dict[str, Tensor]:
        """This layer in the canonical layout. Collective over the EP group when ep > 1."""
        group = parallel.expert_parallel_group(self.ep_size)
        out = {}
        for w, t in self.experts.local_weights(grads).items():
            out[f"{prefix}experts.{w}"] = parallel.all_gather_cat(t, group)
        rw = self.router_weight
        out[f"{prefix}router.weight"] = (rw.grad if grads else rw).detach()
        if not grads and self.router is not None and self.router.balance_bias is not None:
            out[f"{prefix}router.balance_bias"] = self.router.balance_bias.detach()
        if self.shared is not None:
            # merged_state reads LoRA-adapted weights (moe/peft.py) merged, under their plain names.
            shared = self.shared.named_parameters() if grads else merged_state(self.shared).items()
            for name, p in shared:
                out[f"{prefix}shared.{name}"] = (p.grad if grads else p).detach()
        if self.shared_gate is not None:
            gate = self.shared_gate.weight
            out[f"{prefix}shared_gate.weight"] = (gate.grad if grads else gate).detach()
        return out

    @torch.no_grad()
    def load_canonical_state(self, sd: dict[str, Tensor], prefix: str) -> set[str]:
        """Copy this rank's slice of the canonical tensors in; returns the keys used."""
        n_local = self.experts.num_local_experts
        start = parallel.expert_parallel_rank(self.ep_size) * n_local
        local = {w: sd[f"{prefix}experts.{w}"][start:start + n_local] for w in WEIGHT_NAMES}
        self.experts.load_local_weights(local)
        used = {f"{prefix}experts.{w}" for w in WEIGHT_NAMES}
        self.router_weight.copy_(sd[f"{prefix}router.weight"])
        used.add(f"{prefix}router.weight")
        if self.router is not None and self.router.balance_bias is not None:
            self.router.balance_bias.copy_(sd[f"{prefix}router.balance_bias"])
            used.add(f"{prefix}router.balance_bias")
        if self.shared is not None:
            for name, p in self.shared.named_parameters():
                p.copy_(sd[f"{prefix}shared.{name}"])
                used.add(f"{prefix}shared.{name}")
        if self.shared_gate is not None:
            self.shared_gate.weight.copy_(sd[f"{prefix}shared_gate.weight"])
            used.add(f"{prefix}shared_gate.weight")
        return used
