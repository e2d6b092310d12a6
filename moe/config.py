"""Typed configs for the MoE transformer: `ModelConfig` and its nested `MoEConfig`.

These dataclasses are the source of truth for the model's hyper-parameters. The
jobs/ layer registers them as Hydra structured configs, so every field has a
plain type (int, float, bool, str, Optional of those, or a nested dataclass) and
a default; `__post_init__` rejects a bad value with one sentence that names the
key the way users write it (``model.moe.top_k=4 ...``).

The configs also know their own size: `num_params`, `num_active_params` and
`flops_per_token` (tests check them against the built model).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Optional

from .configs import from_dict

BACKENDS = ("native", "deepspeed")
# The balancing recipe (MoEConfig's None defaults): the bias moves at DeepSeek-V3's rate, and a
# light balance loss keeps each batch balanced beside it; without the bias the loss balances alone.
DEFAULT_BIAS_UPDATE_RATE = 0.001
BALANCE_LOSS_WITH_BIAS = 0.01
BALANCE_LOSS_ALONE = 0.05
ROUTERS = ("token_choice", "expert_choice")


@dataclass
class MoEConfig:
    """The mixture-of-experts feed-forward layers (``model.moe.*``)."""

    # The defaults are the recipe the MoE-vs-dense study chose (benchmarks/RESULTS.md, "MoE vs
    # dense"): fine-grained experts (16 of width 128, 4 per token: the active FLOPs and the total
    # parameters of 8 experts of width 256 with top-2), their output summed (routed_scale = top_k),
    # auxiliary-loss-free bias balancing over a light balance loss, and (in the trainer) the routed
    # experts learning at twice the learning rate. Through the platform on English prose it beats the
    # dense model of equal active compute at every seed, by 1.1% at 200 steps and by 3.2% at 600, with
    # every layer balanced (max/mean load <= 1.22); on code by 2.1% at 200 steps.
    num_experts: int = 16
    """E: routed experts per MoE layer."""
    top_k: int = 4
    """K: experts per token (token_choice), or the K in the expert_choice capacity."""
    backend: str = "native"
    """'native' (sorted dropless dispatch + grouped GEMM) or 'deepspeed' (deepspeed.moe.layer.MoE).
    The deepspeed backend refuses expert_choice, bias balancing (bias_update_rate > 0)
    and renormalize=false with top_k >= 2."""
    router: str = "token_choice"
    """'token_choice': each token picks its top_k experts (causal, per token).
    'expert_choice' (Zhou et al. 2022): each expert picks its top
    C = capacity_factor * T * top_k / num_experts tokens among the T tokens of the batch.
    It is NOT causal: a token's route depends on the other tokens in the batch, later ones
    included, so teacher-forced training sees a little of the future. generate() routes each
    step among the tokens present (the prompts at prefill, one token per sequence when
    decoding) and warns that outputs depend on the batch. Native backend only."""
    expert_hidden: int = 128
    """F: hidden size of each routed SwiGLU expert (independent of d_model: fine-grained experts)."""
    num_shared_experts: int = 0
    """DeepSeekMoE shared experts that every token passes through (one SwiGLU of
    hidden num_shared_experts * shared_expert_hidden)."""
    shared_expert_hidden: Optional[int] = None
    """Hidden size per shared expert; None means expert_hidden."""
    shared_expert_gate: bool = False
    """Scale the shared experts' output by sigmoid(w . x), a learned per-token gate (Qwen2-MoE's
    shared expert); false adds it ungated (DeepSeekMoE, ERNIE-4.5)."""
    moe_every: int = 1
    """Block i (0-based) has an MoE feed-forward when (i + 1) % moe_every == 0; 0 = no MoE (dense model)."""
    capacity_factor: float = 0.0
    """0 means dropless. > 0: each expert takes at most ceil(capacity_factor * T * top_k / E)
    tokens of a (per-rank) batch of T tokens; token_choice drops the lowest gate
    probabilities first (the deepspeed backend drops by position for top_k <= 2).
    generate() always routes token_choice dropless, so a sequence's output does not
    depend on its batch neighbours. expert_choice needs capacity_factor > 0."""
    renormalize: bool = True
    """Renormalise the top_k combine weights to sum to 1 (top_k >= 2). top_k = 1 always
    uses the raw softmax probability, as Switch does, so the router still gets a gradient."""
    jitter_eps: float = 0.0
    """Multiply the router input by U(1 - eps, 1 + eps) in training (Switch); 0 = off."""
    balance_loss_coef: Optional[float] = None
    """Weight of the Switch/GShard load-balancing loss E * sum_i f_i * P_i (mean over MoE layers, so
    0.05 over 4 layers weighs like 0.0125 per layer in the sum-over-layers convention of Switch/OLMoE).
    None: 0.01 when the router bias balances (bias_update_rate > 0), 0.05 when the loss balances alone.
    Code reads it resolved: `ModelConfig.balance_loss_coef`."""
    z_loss_coef: float = 0.001
    """Weight of the ST-MoE router z-loss mean(logsumexp(logits)^2) (mean over MoE layers)."""
    bias_update_rate: Optional[float] = None
    """Auxiliary-loss-free balancing (DeepSeek-V3): a per-expert bias added to the router
    scores for expert SELECTION only, moved by this rate times sign(mean load - load) in
    `model.update_router_bias()` after each optimizer step; 0 = off. None: 0.001 wherever the bias
    can act and a transformers architecture computes it (ERNIE-4.5-MoE's router): the native
    token-choice router with top_k >= 2 renormalised, and no qkv_bias, qk_norm or gated shared
    expert; 0 otherwise. Code reads it resolved: `ModelConfig.bias_update_rate`."""
    routed_scale: Optional[float] = None
    """Multiplies the routed experts' combined output (DeepSeek-V2/V3's routed_scaling_factor);
    None means top_k. With renormalised top-k weights the routed output is a weighted MEAN of
    k experts, each F wide, where a dense SwiGLU of the same active FLOPs SUMS k * F hidden
    units: at equal weight scale the MoE's feed-forward starts k times smaller and moves k times
    slower under Adam. Scaling by k restores the sum (benchmarks/RESULTS.md, "MoE vs dense": the
    old default went from -0.9% to -3.6% held-out loss against dense in the study's harness).
    Exports fold it into the experts' down projection."""

    def __post_init__(self) -> None:
        p = "model.moe."
        for name in ("num_experts", "top_k", "expert_hidden"):
            if getattr(self, name) < 1:
                raise ValueError(f"{p}{name}={getattr(self, name)} must be at least 1.")
        if self.routed_scale is not None and self.routed_scale <= 0:
            raise ValueError(f"{p}routed_scale={self.routed_scale} must be positive (or null: top_k).")
        for name in ("num_shared_experts", "moe_every", "capacity_factor", "balance_loss_coef",
                     "z_loss_coef", "bias_update_rate", "jitter_eps"):
            if (getattr(self, name) or 0) < 0:  # None: resolved by ModelConfig
                raise ValueError(f"{p}{name}={getattr(self, name)} must not be negative.")
        if self.shared_expert_hidden is not None and self.shared_expert_hidden < 1:
            raise ValueError(f"{p}shared_expert_hidden={self.shared_expert_hidden} must be at least 1 (or null).")
        if self.top_k > self.num_experts:
            raise ValueError(f"{p}top_k={self.top_k} is larger than {p}num_experts={self.num_experts}.")
        if self.backend not in BACKENDS:
            raise ValueError(f"{p}backend={self.backend!r} is not one of {', '.join(BACKENDS)}.")
        if self.router not in ROUTERS:
            raise ValueError(f"{p}router={self.router!r} is not one of {', '.join(ROUTERS)}.")
        if self.jitter_eps >= 1:
            raise ValueError(f"{p}jitter_eps={self.jitter_eps} must be below 1 (it scales inputs by 1 +- eps).")
        if self.router == "expert_choice" and self.capacity_factor == 0:
            raise ValueError(f"{p}router=expert_choice needs {p}capacity_factor > 0 "
                             "(each expert picks capacity_factor * tokens * top_k / num_experts tokens).")
        if self.backend == "deepspeed":
            self._check_deepspeed_support()

    def _check_deepspeed_support(self) -> None:
        p = "model.moe."
        if self.router != "token_choice":
            raise ValueError(f"{p}router={self.router} is not supported by {p}backend=deepspeed "
                             "(DeepSpeed's gate is token-choice only); use backend=native.")
        if self.bias_update_rate:
            raise ValueError(f"{p}bias_update_rate={self.bias_update_rate} is not supported by {p}backend=deepspeed "
                             "(its gate uses the same scores to select and to weight experts); use backend=native.")
        if not self.renormalize and self.top_k >= 2:
            raise ValueError(f"{p}renormalize=false is not supported by {p}backend=deepspeed with top_k >= 2 "
                             "(DeepSpeed always renormalises the top-k weights); use backend=native.")

    @property
    def shared_hidden(self) -> int:
        """Total hidden size of the shared-expert SwiGLU (0 when there is none)."""
        return self.num_shared_experts * (self.shared_expert_hidden or self.expert_hidden)

    @property
    def routed_output_scale(self) -> float:
        """The factor on the routed experts' combined output: routed_scale, or top_k when unset."""
        return float(self.top_k) if self.routed_scale is None else float(self.routed_scale)

    @property
    def dropless(self) -> bool:
        return self.capacity_factor == 0


@dataclass
class ModelConfig:
    """A decoder-only MoE transformer (``model.*``). Defaults give a ~7M-parameter model."""

    vocab_size: int = 8192
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: Optional[int] = None
    """Key/value heads (grouped-query attention: each serves n_heads / n_kv_heads query heads);
    None means n_heads (plain multi-head attention)."""
    attention_head_dim: Optional[int] = None
    """Width of each attention head; None means d_model / n_heads. Real Qwen3-MoE checkpoints set
    it wider (128 at d_model 2048 with 32 heads): q projects to n_heads * head_dim, o back to d_model."""
    qkv_bias: bool = False
    """A bias on the query, key and value projections (Qwen2)."""
    qk_norm: bool = False
    """RMSNorm over each head's queries and keys before RoPE (Qwen3)."""
    seq_len: int = 256
    """Maximum context: training sequence length and the limit of prompt + generated tokens."""
    ffn_hidden: int = 704
    """Hidden size of the dense SwiGLU feed-forward in non-MoE blocks."""
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    """Share the token embedding with the output projection (lm_head)."""
    init_std: float = 0.02
    moe: MoEConfig = field(default_factory=MoEConfig)

    def __post_init__(self) -> None:
        if isinstance(self.moe, dict):  # tolerate a plain nested dict (e.g. from JSON)
            self.moe = MoEConfig(**self.moe)
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "seq_len", "ffn_hidden"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name}={getattr(self, name)} must be at least 1.")
        for name in ("rope_theta", "norm_eps", "init_std"):
            if getattr(self, name) <= 0:
                raise ValueError(f"model.{name}={getattr(self, name)} must be positive.")
        if self.attention_head_dim is None and self.d_model % self.n_heads:
            raise ValueError(f"model.d_model={self.d_model} is not divisible by model.n_heads={self.n_heads}.")
        if self.attention_head_dim is not None and self.attention_head_dim < 1:
            raise ValueError(f"model.attention_head_dim={self.attention_head_dim} must be at least 1 (or null).")
        if self.head_dim % 2:
            raise ValueError(f"the attention head width {self.head_dim} must be even for rotary embeddings.")
        if self.n_kv_heads is not None and (self.n_kv_heads < 1 or self.n_heads % self.n_kv_heads):
            raise ValueError(f"model.n_kv_heads={self.n_kv_heads} must be at least 1 and divide "
                             f"model.n_heads={self.n_heads}.")

    # -- balancing: model.moe's None defaults, resolved for this model -----------------------
    # Resolved on every read, never written back: a config kept with None (a run's or a Tune
    # sweep's) resolves again for whatever model it becomes, e.g. a trial that sets
    # model.moe.backend=deepspeed gets no bias, as the same override on the command line would.
    # An export records the resolved values (`resolved`): its state has a bias or not.

    @property
    def bias_update_rate(self) -> float:
        """model.moe.bias_update_rate, or when None 0.001 where `router_bias_applies`, else 0."""
        rate = self.moe.bias_update_rate
        if rate is None:
            return DEFAULT_BIAS_UPDATE_RATE if self.router_bias_applies() else 0.0
        return rate

    @property
    def balance_loss_coef(self) -> float:
        """model.moe.balance_loss_coef, or when None 0.01 beside the router bias, else 0.05."""
        coef = self.moe.balance_loss_coef
        if coef is None:
            return BALANCE_LOSS_WITH_BIAS if self.bias_update_rate > 0 else BALANCE_LOSS_ALONE
        return coef

    def resolved(self) -> "ModelConfig":
        """This config with the balancing defaults filled in: what an export records, since its
        state has a router bias or not whichever backend later loads it."""
        moe = replace(self.moe, bias_update_rate=self.bias_update_rate, balance_loss_coef=self.balance_loss_coef)
        return replace(self, moe=moe)

    def router_bias_applies(self) -> bool:
        """Whether bias balancing is on by default: the model has MoE layers routed by the native
        token-choice router (the only one that adds the bias) and exports to the transformers
        architecture whose router carries it (ERNIE-4.5-MoE, with its own limits)."""
        m = self.moe
        if not self.num_moe_layers or m.backend != "native" or m.router != "token_choice":
            return False
        from .hf.config import ernie_blocker  # here, not at the top: moe.hf.config imports this module
        return ernie_blocker(self) is None

    # -- structure ---------------------------------------------------------------------------

    @property
    def head_dim(self) -> int:
        return self.attention_head_dim or self.d_model // self.n_heads

    @property
    def q_dim(self) -> int:
        """Output size of the query projection (input size of the output projection)."""
        return self.n_heads * self.head_dim

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def kv_dim(self) -> int:
        """Output size of the key (and value) projection."""
        return self.kv_heads * self.head_dim

    def is_moe_layer(self, i: int) -> bool:
        return self.moe.moe_every > 0 and (i + 1) % self.moe.moe_every == 0

    @property
    def num_moe_layers(self) -> int:
        return sum(self.is_moe_layer(i) for i in range(self.n_layers))

    def validate_expert_parallel(self, expert_parallel_size: int, world_size: Optional[int] = None) -> None:
        """Raise ValueError if the model cannot be split over `expert_parallel_size` ranks."""
        ep = expert_parallel_size
        if ep < 1:
            raise ValueError(f"expert_parallel_size={ep} must be at least 1.")
        if self.moe.num_experts % ep:
            raise ValueError(f"model.moe.num_experts={self.moe.num_experts} is not divisible by "
                             f"the expert-parallel size {ep}.")
        if world_size is not None and world_size % ep:
            raise ValueError(f"the world size {world_size} is not divisible by the expert-parallel size {ep}.")

    # -- sizes -------------------------------------------------------------------------------

    def _block_matmul_params(self, i: int, active: bool) -> int:
        d, m = self.d_model, self.moe
        attn = 2 * d * self.q_dim + 2 * d * self.kv_dim
        if not self.is_moe_layer(i):
            return attn + 3 * d * self.ffn_hidden
        experts = m.top_k if active else m.num_experts
        shared_gate = d if m.shared_hidden and m.shared_expert_gate else 0
        return attn + d * m.num_experts + experts * 3 * d * m.expert_hidden + 3 * d * m.shared_hidden + shared_gate

    def _attention_vector_params(self) -> int:
        """Per block: the q/k/v biases and the per-head q/k norms (not matmul parameters)."""
        return (self.q_dim + 2 * self.kv_dim) * self.qkv_bias + 2 * self.head_dim * self.qk_norm

    def _count(self, active: bool) -> int:
        d, v = self.d_model, self.vocab_size
        blocks = sum(self._block_matmul_params(i, active) + 2 * d + self._attention_vector_params()
                     for i in range(self.n_layers))
        embeddings = v * d if self.tie_embeddings else 2 * v * d
        return embeddings + blocks + d  # + final norm

    @property
    def num_params(self) -> int:
        """Every parameter of the model (all experts, EP-independent)."""
        return self._count(active=False)

    @property
    def num_active_params(self) -> int:
        """Parameters a token uses: num_params with only top_k routed experts per MoE layer.
        (expert_choice gives a token capacity_factor * top_k experts on average.)"""
        return self._count(active=True)

    @property
    def flops_per_token(self) -> int:
        """Training FLOPs (forward + backward) per token at seq_len context:
        6 * active matmul parameters (lm_head included, embedding lookup not) plus
        12 * n_layers * (n_heads * head_dim) * seq_len for attention scores (PaLM appendix B, no causal
        discount)."""
        matmul = sum(self._block_matmul_params(i, active=True) for i in range(self.n_layers))
        matmul += self.vocab_size * self.d_model  # lm_head
        return 6 * matmul + 12 * self.n_layers * self.q_dim * self.seq_len

    # -- (de)serialisation -------------------------------------------------------------------

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        """Build from a nested dict such as `dataclasses.asdict(cfg)` or a config.json (moe.configs:
        unknown keys refused, values coerced by their declared types, the key named)."""
        return from_dict(cls, d, prefix="model.")


def capacity(num_tokens: int, num_experts: int, top_k: int, capacity_factor: float) -> int:
    """Tokens one expert may take: ceil(T / E * capacity_factor * K), DeepSpeed's formula."""
    return max(1, math.ceil((num_tokens / num_experts) * (capacity_factor * top_k)))
