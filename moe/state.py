"""The canonical state dict: one layout for every backend and expert-parallel size.

    tok_emb.weight                          (V, D)
    layers.{i}.attn_norm.weight             (D,)
    layers.{i}.attn.{wq,wo}.weight          (D, D)
    layers.{i}.attn.{wk,wv}.weight          (KV*Hd, D)  KV = n_kv_heads (wq: (H*Hd, D), wo: (D, H*Hd))
    layers.{i}.attn.{wq,wk,wv}.bias         (D,) / (KV*Hd,)   only with qkv_bias
    layers.{i}.attn.{q,k}_norm.weight       (Hd,)       only with qk_norm
    layers.{i}.ffn_norm.weight              (D,)
    dense block i:
    layers.{i}.ffn.w1.weight (Fd, D)   layers.{i}.ffn.w2.weight (D, Fd)   layers.{i}.ffn.w3.weight (Fd, D)
    MoE block i:
    layers.{i}.ffn.router.weight            (E, D)
    layers.{i}.ffn.router.balance_bias      (E,)        only when bias_update_rate > 0
    layers.{i}.ffn.experts.w1               (E, F, D)   gate projection of every expert
    layers.{i}.ffn.experts.w2               (E, D, F)   down projection
    layers.{i}.ffn.experts.w3               (E, F, D)   up projection
    layers.{i}.ffn.shared.{w1,w2,w3}.weight (S, D) / (D, S) / (S, D), S = num_shared * shared hidden
    layers.{i}.ffn.shared_gate.weight       (1, D)      only with shared_expert_gate
    norm.weight                             (D,)
    lm_head.weight                          (V, D)      only when tie_embeddings is false

Expert e's SwiGLU is w2[e] @ (silu(w1[e] @ x) * (w3[e] @ x)). Exports (safetensors)
store exactly this; the model's own `state_dict()` differs by backend (and, for
expert weights, takes DeepSpeed's per-expert key layout). A model with LoRA adapters
(moe/peft.py) gives its merged weights here; loading into such a model is refused.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from torch.nn.utils import parametrize

from .config import ModelConfig

if TYPE_CHECKING:
    from .model import MoETransformer


def canonical_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    d, v, m = config.d_model, config.vocab_size, config.moe
    e, f, s, fd = m.num_experts, m.expert_hidden, m.shared_hidden, config.ffn_hidden
    shapes: dict[str, tuple[int, ...]] = {"tok_emb.weight": (v, d)}
    for i in range(config.n_layers):
        p = f"layers.{i}."
        shapes[p + "attn_norm.weight"] = (d,)
        q, kv = config.q_dim, config.kv_dim
        shapes.update({p + "attn.wq.weight": (q, d), p + "attn.wk.weight": (kv, d), p + "attn.wv.weight": (kv, d),
                       p + "attn.wo.weight": (d, q)})
        if config.qkv_bias:
            shapes.update({p + "attn.wq.bias": (q,), p + "attn.wk.bias": (kv,), p + "attn.wv.bias": (kv,)})
        if config.qk_norm:
            shapes.update({p + "attn.q_norm.weight": (config.head_dim,), p + "attn.k_norm.weight": (config.head_dim,)})
        shapes[p + "ffn_norm.weight"] = (d,)
        if not config.is_moe_layer(i):
            shapes.update({p + "ffn.w1.weight": (fd, d), p + "ffn.w2.weight": (d, fd), p + "ffn.w3.weight": (fd, d)})
            continue
        shapes[p + "ffn.router.weight"] = (e, d)
        if config.bias_update_rate > 0:
            shapes[p + "ffn.router.balance_bias"] = (e,)
        shapes.update({p + "ffn.experts.w1": (e, f, d), p + "ffn.experts.w2": (e, d, f),
                       p + "ffn.experts.w3": (e, f, d)})
        if s:
            shapes.update({p + "ffn.shared.w1.weight": (s, d), p + "ffn.shared.w2.weight": (d, s),
                           p + "ffn.shared.w3.weight": (s, d)})
            if m.shared_expert_gate:
                shapes[p + "ffn.shared_gate.weight"] = (1, d)
    shapes["norm.weight"] = (d,)
    if not config.tie_embeddings:
        shapes["lm_head.weight"] = (v, d)
    return shapes


def initial_canonical_state(config: ModelConfig) -> dict[str, Tensor]:
    """Fresh weights drawn from the global torch RNG in canonical order, so a given seed gives
    the same model for every backend and EP size. Normal(0, init_std) matrices, with the
    projections back into the residual stream (wo, w2) scaled by 1/sqrt(2 * n_layers) as in
    GPT-2; norms at 1; balancing bias and q/k/v biases at 0."""
    out_std = config.init_std / math.sqrt(2 * config.n_layers)
    sd = {}
    for key, shape in canonical_shapes(config).items():
        if key.endswith(("norm.weight", "balance_bias", ".bias")):
            sd[key] = torch.ones(shape) if key.endswith("norm.weight") else torch.zeros(shape)
        else:
            std = out_std if key.endswith(("wo.weight", "w2.weight", "experts.w2")) else config.init_std
            sd[key] = torch.randn(shape) * std
    return sd


def _moe_prefixes(model: "MoETransformer") -> dict[str, object]:
    return {f"layers.{i}.ffn.": layer for i, layer in model.moe_layers()}


def merged_state(module: torch.nn.Module) -> dict[str, Tensor]:
    """module.state_dict() with each parametrized tensor (a LoRA adapter, moe/peft.py) under its
    plain name and read through its parametrization: the merged weight W + scale * B @ A."""
    sd = {k: v for k, v in module.state_dict().items() if "parametrizations." not in k}
    with torch.no_grad():
        for name, m in module.named_modules():
            for tensor in getattr(m, "parametrizations", {}):
                sd[f"{name}.{tensor}" if name else tensor] = getattr(m, tensor)
    return sd


def _has_adapters(model: "MoETransformer") -> bool:
    return any(parametrize.is_parametrized(m) for m in model.modules())


def canonical_state_dict(model: "MoETransformer", grads: bool = False) -> dict[str, Tensor]:
    if grads and _has_adapters(model):
        raise ValueError("canonical gradients are not defined for a model with LoRA adapters (only the "
                         "adapters have gradients).")
    moe = _moe_prefixes(model)
    items = model.named_parameters() if grads else merged_state(model).items()
    sd = {}
    for key, t in items:
        if key.startswith(tuple(moe)) or (model.config.tie_embeddings and key == "lm_head.weight"):
            continue
        sd[key] = (t.grad if grads else t).detach()
    for prefix, layer in moe.items():
        sd.update(layer.canonical_state(prefix, grads))
    return sd


@torch.no_grad()
def load_canonical_state_dict(model: "MoETransformer", sd: dict[str, Tensor]) -> None:
    if _has_adapters(model):
        raise ValueError("load_canonical_state_dict() cannot load into a model with LoRA adapters: load the base "
                         "weights before apply_peft(), and adapters with moe.peft.load_adapter().")
    expected = canonical_shapes(model.config)
    missing, unexpected = sorted(set(expected) - set(sd)), sorted(set(sd) - set(expected))
    if missing or unexpected:
        raise ValueError(f"the canonical state dict does not match the model config: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}.")
    for key, shape in expected.items():
        if tuple(sd[key].shape) != shape:
            raise ValueError(f"{key} has shape {tuple(sd[key].shape)}; the model config needs {shape}.")
    moe = _moe_prefixes(model)
    own = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    for key, t in sd.items():
        if not key.startswith(tuple(moe)):
            own[key].copy_(t)
    for prefix, layer in moe.items():
        layer.load_canonical_state(sd, prefix)
