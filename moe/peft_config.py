"""PeftConfig: what a parameter-efficient finetuning stage trains (``peft.*``).

Torch-free, like moe/config.py, so a job validates its whole config before importing torch;
moe/peft.py applies it to a model.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, List

if TYPE_CHECKING:
    from .config import ModelConfig

LORA_TARGETS = ("attention", "experts", "shared", "dense_ffn", "lm_head")
FREEZE_MODES = ("none", "router_only", "experts", "top_layers")


@dataclass
class PeftConfig:
    """Parameter-efficient finetuning (``peft.*``): LoRA adapters, or freezing part of the model."""

    lora_rank: int = 0
    """R: rank of the LoRA adapters; 0 = no LoRA. With R > 0 every base weight is frozen
    (embeddings, norms and routers too) and only the adapters train."""
    lora_alpha: float = 16.0
    """The adapters add (lora_alpha / lora_rank) * B @ A to their weight."""
    lora_targets: List[str] = field(default_factory=lambda: ["attention", "experts"])
    """Which weights get adapters: 'attention' (wq wk wv wo), 'experts' (the routed experts,
    one adapter per expert), 'shared' (the shared-expert SwiGLU), 'dense_ffn' (the dense
    blocks' SwiGLU), 'lm_head' (only with model.tie_embeddings=false)."""
    freeze: str = "none"
    """Without LoRA: 'none'; 'router_only' (only the routers train); 'experts' (the routed
    experts are frozen, everything else trains); 'top_layers' (only the last
    trainable_top_layers blocks and the final norm train; embeddings and lm_head stay frozen)."""
    trainable_top_layers: int = 1
    """Blocks that train with freeze=top_layers."""

    def __post_init__(self) -> None:
        if isinstance(self.lora_targets, str):
            raise ValueError(f"peft.lora_targets={self.lora_targets!r} must be a list, e.g. [attention, experts].")
        self.lora_targets = list(self.lora_targets)  # a tuple or an OmegaConf ListConfig
        if self.lora_rank < 0:
            raise ValueError(f"peft.lora_rank={self.lora_rank} must not be negative (0 = no LoRA).")
        if not self.lora_alpha > 0:
            raise ValueError(f"peft.lora_alpha={self.lora_alpha} must be positive (adapters are scaled by "
                             "lora_alpha / lora_rank).")
        for target in self.lora_targets:
            if target not in LORA_TARGETS:
                raise ValueError(f"peft.lora_targets has {target!r}, which is not one of {', '.join(LORA_TARGETS)}.")
        if len(set(self.lora_targets)) != len(self.lora_targets):
            raise ValueError(f"peft.lora_targets={self.lora_targets} lists a target twice.")
        if self.lora_rank > 0 and not self.lora_targets:
            raise ValueError(f"peft.lora_targets is empty, but peft.lora_rank={self.lora_rank} needs at least one "
                             f"of {', '.join(LORA_TARGETS)}.")
        if self.freeze not in FREEZE_MODES:
            raise ValueError(f"peft.freeze={self.freeze!r} is not one of {', '.join(FREEZE_MODES)}.")
        if self.trainable_top_layers < 1:
            raise ValueError(f"peft.trainable_top_layers={self.trainable_top_layers} must be at least 1.")
        if self.lora_rank > 0 and self.freeze != "none":
            raise ValueError(f"peft.freeze={self.freeze} cannot be combined with peft.lora_rank={self.lora_rank}: "
                             "LoRA already freezes every base weight and trains only the adapters; set "
                             "peft.freeze=none.")

    @property
    def enabled(self) -> bool:
        return self.lora_rank > 0 or self.freeze != "none"

    @property
    def lora_scale(self) -> float:
        return self.lora_alpha / self.lora_rank

    def check_zero_stage(self, model: ModelConfig, zero_stage: int) -> None:
        """Raise if DeepSpeed ZeRO cannot run this stage. ZeRO stage 1/2 refuses an MoE model
        whose optimizer has no expert ('moe') param group, i.e. when no routed-expert weight or
        adapter trains (freeze=router_only|experts, LoRA without 'experts', top_layers with no
        MoE block on top); ZeRO stage 0 runs those (the expert weights need no reduction)."""
        if zero_stage == 0 or model.num_moe_layers == 0 or self._trains_routed_experts(model):
            return
        what = (f"peft.lora_targets={self.lora_targets} (no 'experts')" if self.lora_rank
                else f"peft.freeze={self.freeze}")
        raise ValueError(f"{what} trains no routed-expert weight, which DeepSpeed ZeRO stage {zero_stage} cannot "
                         "run for an MoE model (it needs a trainable 'moe' param group); use ZeRO stage 0 "
                         "(trainer.zero_stage=0) for this stage.")

    def _trains_routed_experts(self, model: ModelConfig) -> bool:
        if self.lora_rank:
            return "experts" in self.lora_targets
        if self.freeze == "top_layers":
            n = model.n_layers
            return any(model.is_moe_layer(i) for i in range(max(0, n - self.trainable_top_layers), n))
        return self.freeze == "none"
