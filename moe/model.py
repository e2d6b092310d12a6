"""A decoder-only Mixture-of-Experts transformer, in the spirit of nanoGPT's model.py.

token embedding -> n_layers x [RMSNorm -> causal attention (RoPE, SDPA; grouped-query when
n_kv_heads < n_heads, optional q/k/v bias and per-head q/k norm) -> residual,
RMSNorm -> feed-forward -> residual] -> RMSNorm -> lm_head. The feed-forward of every
`moe_every`-th block is an MoELayer (moe/layer.py), the others a dense SwiGLU.
Embeddings are tied by default (`tie_embeddings`): the output projection reuses the
token embedding, which saves vocab_size * d_model parameters at small scale.

Shapes: B batch, T sequence, D model dim, H heads, KV key/value heads, Hd head dim, V vocab,
L cache length.

Everything about ranks stays in moe/parallel.py; the model only knows its
expert_parallel_size (each rank builds E / ep experts per MoE layer).
"""

from __future__ import annotations

import math
import warnings
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import ModelConfig
from .experts import SwiGLU
from .generation import Sampling, SlotDecoder
from .layer import MoELayer
from .state import canonical_state_dict, initial_canonical_state, load_canonical_state_dict


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Normalise in fp32: the mean of squares underflows/overflows easily in bf16.
        xf = x.float()
        return (xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


def rope_tables(seq_len: int, head_dim: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos and sin of position * frequency, (seq_len, Hd), halves duplicated for rotate-half."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x_BHTd: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    x1, x2 = x_BHTd.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x_BHTd * cos + rotated * sin).to(x_BHTd.dtype)


class KVCache:
    """Keys and values of every layer, (B, KV, L, Hd), preallocated once: B sequence slots of L
    positions each (moe/generation.py hands the slots out and writes them). KV = n_kv_heads:
    grouped-query attention caches only the shared key/value heads."""

    def __init__(self, config: ModelConfig, batch: int, length: int, dtype: torch.dtype, device) -> None:
        shape = (batch, config.kv_heads, length, config.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layers)]


class Attention(nn.Module):
    """Causal self-attention with RoPE. Grouped-query when n_kv_heads < n_heads (query head h
    reads key/value head h // (H / KV)); optional q/k/v bias (Qwen2) and per-head q/k RMSNorm
    before RoPE (Qwen3)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        d, q, kv = config.d_model, config.q_dim, config.kv_dim
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.kv_heads, config.head_dim
        self.wq = nn.Linear(d, q, bias=config.qkv_bias)
        self.wk = nn.Linear(d, kv, bias=config.qkv_bias)
        self.wv = nn.Linear(d, kv, bias=config.qkv_bias)
        self.wo = nn.Linear(q, d, bias=False)
        self.q_norm = RMSNorm(self.head_dim, config.norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, config.norm_eps) if config.qk_norm else None

    def forward(self, x_BTD: Tensor, cos: Tensor, sin: Tensor, mask: Optional[Tensor] = None,
                kv=None) -> Tensor:
        """mask None: plain causal attention. Otherwise a (B, 1, T, L) bool mask (True = attend)
        over what the cache returns. `kv` (moe/generation.py) stores this call's keys/values:
        `kv.update(k, v)` -> the keys/values to attend over, (B, KV, L, Hd)."""
        B, T, D = x_BTD.shape
        q = self.wq(x_BTD).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, Hd)
        k, v = (w(x_BTD).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, KV, T, Hd)
                for w in (self.wk, self.wv))
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv is not None:
            k, v = kv.update(k, v)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                           enable_gqa=self.n_kv_heads != self.n_heads)
        return self.wo(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, expert_parallel_size: int) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(config.d_model, config.norm_eps)
        self.attn = Attention(config)
        self.ffn_norm = RMSNorm(config.d_model, config.norm_eps)
        if config.is_moe_layer(layer_idx):
            self.ffn: nn.Module = MoELayer(config, expert_parallel_size=expert_parallel_size)
        else:
            self.ffn = SwiGLU(config.d_model, config.ffn_hidden)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Optional[Tensor] = None, kv=None) -> Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, kv)
        h = self.ffn_norm(x)
        # Generation routes dropless: a capacity would make a sequence depend on its batch.
        h = self.ffn(h, dropless=kv is not None) if isinstance(self.ffn, MoELayer) else self.ffn(h)
        return x + h


class MoETransformer(nn.Module):
    """forward(idx, targets=None, loss_mask=None) -> (logits, loss); generate(); generate_stream()."""

    def __init__(self, config: ModelConfig, *, expert_parallel_size: int = 1) -> None:
        super().__init__()
        config.validate_expert_parallel(expert_parallel_size)
        # Resolved once: a built model has a router bias or not, and reads its coefficients every step.
        config = config.resolved()
        # Draw the initial weights first, in the canonical layout, so that a seed gives the same
        # model for any backend and EP size (building the modules below consumes RNG differently).
        init_state = initial_canonical_state(config)
        self.config = config
        self.expert_parallel_size = expert_parallel_size
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(Block(config, i, expert_parallel_size) for i in range(config.n_layers))
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        cos, sin = rope_tables(config.seq_len, config.head_dim, config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.loss_breakdown: dict[str, Tensor] = {}
        self._warned_expert_choice = False
        self.load_canonical_state_dict(init_state)

    # -- training forward --------------------------------------------------------------------

    def forward(self, idx: Tensor, targets: Optional[Tensor] = None,
                loss_mask: Optional[Tensor] = None) -> tuple[Tensor, Optional[Tensor]]:
        """idx, targets (next tokens; -100 = ignore), loss_mask: (B, T). The loss is the mean
        cross-entropy over positions where loss_mask is set, plus the weighted router losses."""
        T = idx.shape[1]
        if T > self.config.seq_len:
            raise ValueError(f"a sequence of {T} tokens is longer than model.seq_len={self.config.seq_len}.")
        cos, sin = self.rope_cos[:T], self.rope_sin[:T]
        x = self.tok_emb(idx)
        for block in self.layers:
            x = block(x, cos, sin)
        logits = self.lm_head(self.norm(x))  # (B, T, V)
        if targets is None:
            return logits, None
        return logits, self._loss(logits, targets, loss_mask)

    def _loss(self, logits: Tensor, targets: Tensor, loss_mask: Optional[Tensor]) -> Tensor:
        ce = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100, reduction="none")
        counted = targets.flatten() != -100
        if loss_mask is not None:
            counted = counted & loss_mask.flatten().bool()
        lm = (ce * counted).sum() / counted.sum().clamp(min=1)
        balance, z = self._router_losses(logits)
        m = self.config.moe
        self.loss_breakdown = {"lm": lm.detach(), "balance": balance.detach(), "z": z.detach()}
        return lm + self.config.balance_loss_coef * balance + m.z_loss_coef * z

    def _router_losses(self, like: Tensor) -> tuple[Tensor, Tensor]:
        """Mean over MoE layers, so the coefficients do not scale with depth."""
        layers = self.moe_layers()
        if not layers:
            zero = like.new_zeros((), dtype=torch.float32)
            return zero, zero
        balance = torch.stack([layer.aux_losses["balance"] for _, layer in layers]).mean()
        z = torch.stack([layer.aux_losses["z"] for _, layer in layers]).mean()
        return balance, z

    # -- MoE controls ------------------------------------------------------------------------

    def moe_layers(self) -> list[tuple[int, MoELayer]]:
        return [(i, b.ffn) for i, b in enumerate(self.layers) if isinstance(b.ffn, MoELayer)]

    @torch.no_grad()
    def update_router_bias(self) -> None:
        """Auxiliary-loss-free balancing step; call after each optimizer step (on every rank:
        it all-reduces the load when torch.distributed is initialised). No-op when off."""
        if self.config.bias_update_rate == 0:
            return
        for _, layer in self.moe_layers():
            layer.router.update_bias()

    def set_routing_stats(self, enabled: bool) -> None:
        """Turn per-layer routing statistics on or off (off costs nothing)."""
        for _, layer in self.moe_layers():
            layer.collect_stats = enabled
            layer.stats = None

    def pop_expert_load(self) -> list[tuple[int, Tensor]]:
        """(block index, (E,) int64 assignments per global expert) per MoE layer, summed over this
        rank's training forwards since the last call, which clears them."""
        loads = []
        for i, layer in self.moe_layers():
            loads.append((i, layer.window_load_E.clone()))
            layer.window_load_E.zero_()
        return loads

    def routing_stats(self) -> list[dict]:
        """Per MoE layer, from the last forward: layer, tokens_per_expert (CPU int64, this rank's
        tokens per global expert before dropping), dropped_fraction, router_entropy (nats),
        max_over_mean_load."""
        return [{"layer": i, **layer.stats} for i, layer in self.moe_layers() if layer.stats is not None]

    # -- canonical state dict ----------------------------------------------------------------

    def canonical_state_dict(self, *, grads: bool = False) -> dict[str, Tensor]:
        """EP- and backend-independent tensors (see moe/state.py for the layout); with
        grads=True the parameters' gradients in the same layout. Collective when EP > 1."""
        return canonical_state_dict(self, grads=grads)

    def load_canonical_state_dict(self, sd: dict[str, Tensor]) -> None:
        """Load canonical tensors; each rank takes its slice of the experts."""
        load_canonical_state_dict(self, sd)

    # -- generation ------------------------------------------------------------------------

    def forward_cached(self, idx_BT: Tensor, positions_BT: Tensor, layer_caches: list,
                       mask: Optional[Tensor] = None) -> Tensor:
        """New tokens through the model with a KV cache (one `update`-able view per layer, from
        moe/generation.py); positions_BT are their RoPE positions. Logits of the last column (B, V)."""
        cos, sin = self.rope_cos[positions_BT][:, None], self.rope_sin[positions_BT][:, None]  # (B, 1, T, Hd)
        x = self.tok_emb(idx_BT)
        for block, kv in zip(self.layers, layer_caches):
            x = block(x, cos, sin, mask, kv)
        return self.lm_head(self.norm(x[:, -1]))

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], max_new_tokens: int = 64, *, temperature: float = 1.0,
                 top_k: Optional[int] = None, top_p: Optional[float] = None, eos_token_id: Optional[int] = None,
                 generator: Optional[torch.Generator] = None) -> list[list[int]]:
        """New tokens for each prompt (a sequence that emits eos_token_id ends with it).
        temperature=0 is greedy. Prompts may differ in length: a prompt's output does not
        depend on the others in the batch (token_choice routing)."""
        out: list[list[int]] = [[] for _ in prompts]
        for step in self.generate_stream(prompts, max_new_tokens, temperature=temperature, top_k=top_k,
                                         top_p=top_p, eos_token_id=eos_token_id, generator=generator):
            for b, token in step.items():
                out[b].append(token)
        return out

    @torch.no_grad()
    def generate_stream(self, prompts: list[list[int]], max_new_tokens: int = 64, *, temperature: float = 1.0,
                        top_k: Optional[int] = None, top_p: Optional[float] = None,
                        eos_token_id: Optional[int] = None,
                        generator: Optional[torch.Generator] = None) -> Iterator[dict[int, int]]:
        """Yields, per decoding step, {prompt index: new token} for every sequence still running.
        Built on moe.generation.SlotDecoder: one slot per prompt; `generator` (if given) is shared
        by the rows in prompt order, otherwise each row draws its own."""
        self._check_generate_args(prompts, max_new_tokens, temperature, top_k, top_p)
        self._warn_if_expert_choice()
        was_training = self.training
        self.eval()
        try:
            yield from self._decode(prompts, max_new_tokens, Sampling(temperature, top_k or 0, top_p or 1.0),
                                    eos_token_id, generator)
        finally:
            self.train(was_training)

    def _decode(self, prompts, max_new_tokens, sampling, eos_token_id, generator):
        decoder = SlotDecoder(self, len(prompts), cache_length=max(len(p) for p in prompts) + max_new_tokens,
                              generator=generator)
        slots, tokens = zip(*(decoder.prefill(p, sampling) for p in prompts))
        running = list(range(len(prompts)))
        for step in range(max_new_tokens):
            yield {b: tokens[b] for b in running}
            running = [b for b in running if tokens[b] != eos_token_id]
            if not running or step == max_new_tokens - 1:
                return
            tokens = dict(zip(running, decoder.decode([slots[b] for b in running])))

    def _check_generate_args(self, prompts, max_new_tokens, temperature, top_k, top_p) -> None:
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("generate() needs at least one prompt, and every prompt needs at least one token.")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens} must be at least 1.")
        longest = max(len(p) for p in prompts)
        if longest + max_new_tokens > self.config.seq_len:
            raise ValueError(f"a prompt of {longest} tokens + max_new_tokens={max_new_tokens} exceeds the "
                             f"model's context model.seq_len={self.config.seq_len}.")
        bad = [t for p in prompts for t in p if not 0 <= t < self.config.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary [0, {self.config.vocab_size}).")
        if not (math.isfinite(temperature) and temperature >= 0):
            raise ValueError(f"temperature={temperature} must be a finite number, not negative (0 = greedy).")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k={top_k} must be at least 1.")
        if top_p is not None and not 0 < top_p <= 1:
            raise ValueError(f"top_p={top_p} must be in (0, 1].")

    def _warn_if_expert_choice(self) -> None:
        if self.config.moe.router == "expert_choice" and not self._warned_expert_choice:
            self._warned_expert_choice = True
            warnings.warn("model.moe.router=expert_choice is not causal: generation routes each step among the "
                          "tokens present (each prompt alone, then one token per running sequence), so outputs depend "
                          "on the batch and differ from a teacher-forced forward.", stacklevel=3)

