"""The `deepspeed` expert backend: `deepspeed.moe.layer.MoE`, with our losses on top.

Shape legend: T tokens (this rank), D model dim, E experts, L local experts, F expert hidden.

DeepSpeed does the gating, the GShard capacity dispatch, the expert-parallel
all-to-all, the optimizer param groups and the per-expert checkpoint files. What it
does not do is added around it, from the same gate weight:
- input jitter: applied by a forward pre-hook on DeepSpeed's gate (so only the gate,
  not the experts, sees it, as in Switch), with any `jitter_eps`;
- the load-balancing loss and the z-loss: computed by `moe.router` from the gate
  logits, so both backends optimise the same objective (DeepSpeed's own `l_aux` is
  unused: for top_k=2 it counts only first choices);
- routing statistics: from DeepSpeed's `exp_counts` (counted before dropping) and the
  capacity it applies.
Refused at config validation: expert_choice routing, bias balancing (DeepSpeed's gate
weights and selects with the same scores) and renormalize=false with top_k >= 2.
Conventions DeepSpeed fixes: top_k=1 combines with the raw probability; with a
capacity it drops by position for top_k <= 2 and by gate probability for top_k > 2, and
renormalises over the kept experts; its dropless mode pads every expert to the
largest load.
"""

from __future__ import annotations

from typing import Optional

import torch
from deepspeed.moe.layer import MoE as DeepSpeedMoE
from torch import Tensor, nn

from .config import ModelConfig, capacity
from .experts import WEIGHT_NAMES, SwiGLU
from .router import RouteInfo, jitter, router_logits


class DeepSpeedExperts(DeepSpeedMoE):
    """deepspeed.moe.layer.MoE configured from a ModelConfig; forward -> (y_TD, RouteInfo)."""

    def __init__(self, config: ModelConfig, *, expert_parallel_size: int = 1) -> None:
        m = config.moe
        config.validate_expert_parallel(expert_parallel_size)
        cf = m.capacity_factor or 1.0  # unused when dropless
        super().__init__(
            hidden_size=config.d_model,
            expert=SwiGLU(config.d_model, m.expert_hidden),
            num_experts=m.num_experts,
            ep_size=expert_parallel_size,
            k=m.top_k,
            capacity_factor=cf,
            eval_capacity_factor=cf,
            min_capacity=0,  # capacity is exactly ceil(T / E * capacity_factor * K), as in the native backend
            noisy_gate_policy=None,  # jitter is applied by our pre-hook
            drop_tokens=not m.dropless,
            use_rts=False,  # no random token selection: dropping must not depend on an RNG
            top2_2nd_expert_sampling=False,  # plain top-2, no Gumbel noise on the second choice
        )
        self.top_k, self.capacity_factor, self.jitter_eps = m.top_k, cf, m.jitter_eps
        self._gate_input: Optional[Tensor] = None
        self.deepspeed_moe.gate.register_forward_pre_hook(self._jitter_gate_input)

    def _jitter_gate_input(self, gate: nn.Module, args: tuple) -> tuple:
        x = jitter(args[0], self.jitter_eps) if self.training else args[0]
        self._gate_input = x
        return (x,) + tuple(args[1:])

    @property
    def gate_weight(self) -> nn.Parameter:
        return self.deepspeed_moe.gate.wg.weight

    def forward(self, x_TD: Tensor, token_mask_T: Optional[Tensor] = None,
                dropless: bool = False) -> tuple[Tensor, RouteInfo]:
        if self.ep_size > 1 and self.deepspeed_moe.ep_group is None:
            self.set_deepspeed_parallelism()  # outside a DeepSpeed engine, which would have done it
        gate = self.deepspeed_moe.gate
        drop_tokens = gate.drop_tokens and not dropless
        saved, gate.drop_tokens = gate.drop_tokens, drop_tokens
        try:
            y_TD, _, routed_E = super().forward(x_TD)  # DeepSpeed's l_aux is replaced by ours
        finally:
            gate.drop_tokens = saved
        logits_TE = router_logits(self._gate_input, self.gate_weight)
        self._gate_input = None
        routed_E = routed_E.long()
        kept_E = routed_E
        if drop_tokens:
            kept_E = routed_E.clamp(max=capacity(x_TD.shape[0], self.num_experts, self.top_k, self.capacity_factor))
        return y_TD, RouteInfo(logits_TE, routed_E, kept_E)

    def local_weights(self, grads: bool = False) -> dict[str, Tensor]:
        """This rank's experts as stacked (L, ...) tensors, like the native backend's."""
        experts = self.deepspeed_moe.experts.deepspeed_experts
        pick = (lambda p: p.grad) if grads else (lambda p: p)
        return {w: torch.stack([pick(getattr(e, w).weight).detach() for e in experts]) for w in WEIGHT_NAMES}

    @torch.no_grad()
    def load_local_weights(self, weights: dict[str, Tensor]) -> None:
        for j, e in enumerate(self.deepspeed_moe.experts.deepspeed_experts):
            for w in WEIGHT_NAMES:
                getattr(e, w).weight.copy_(weights[w][j])
