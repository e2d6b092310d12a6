"""Canonical state dict (moe/state.py) <-> the tensor names of a transformers architecture.

    canonical                               transformers ("model.layers.{i}." = L)
    tok_emb.weight / norm.weight            model.embed_tokens.weight / model.norm.weight
    lm_head.weight (untied only)            lm_head.weight
    layers.i.attn_norm / ffn_norm           L input_layernorm / L post_attention_layernorm
    layers.i.attn.{wq,wk,wv,wo}             L self_attn.{q,k,v,o}_proj   (+ .bias, q_norm, k_norm)
    layers.i.ffn.{w1,w2,w3} (dense)         L mlp.{gate,down,up}_proj
    layers.i.ffn.router.weight              L block_sparse_moe.gate (mixtral) | L mlp.gate
    layers.i.ffn.experts.wX[e]              L block_sparse_moe.experts.e.{w1,w2,w3} (mixtral)
                                            | L mlp.experts.e.{gate,down,up}_proj
    layers.i.ffn.shared.*, shared_gate      L mlp.shared_expert.*, mlp.shared_expert_gate (qwen2_moe)
                                            | L mlp.shared_experts.* (ernie4_5_moe)
    layers.i.ffn.router.balance_bias (E,)   L mlp.moe_statics.e_score_correction_bias (1, E) (ernie)

ERNIE's RoPE rotates interleaved pairs (2j, 2j+1) where ours rotates (j, j + Hd/2), so its q/k
projection rows are ours permuted within each head: every attention score stays the same.
Qwen2-MoE always has a (gated) shared expert: a model without one exports it with 0 columns.
model.moe.routed_scale is folded into every expert's down projection (w2 x scale).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from ..config import ModelConfig

EXPERT_NAMES = {"mixtral": ("w1", "w2", "w3")}  # canonical w1/w2/w3 in each layout
PROJ_NAMES = ("gate_proj", "down_proj", "up_proj")
ATTN = {"wq": "q_proj", "wk": "k_proj", "wv": "v_proj", "wo": "o_proj"}
FFN = dict(zip(("w1", "w2", "w3"), PROJ_NAMES))


def _moe_prefix(layout: str) -> str:
    return "block_sparse_moe" if layout == "mixtral" else "mlp"


def _interleave_rows(w: Tensor, head_dim: int, inverse: bool = False) -> Tensor:
    """Rows of a q/k projection (or bias), per head: ours (j, j + Hd/2) -> ERNIE's (2j, 2j + 1)."""
    half = head_dim // 2
    perm = torch.stack([torch.arange(half), torch.arange(half) + half], dim=1).reshape(-1).to(w.device)  # 0, h, 1, ..
    if inverse:
        perm = perm.argsort()
    heads = w.reshape(-1, head_dim, *w.shape[1:])
    return heads[:, perm].reshape(w.shape)


def _attn_names(config: ModelConfig, i: int) -> dict[str, str]:
    ours, theirs = f"layers.{i}.attn.", f"model.layers.{i}.self_attn."
    names = {ours + f"{w}.weight": theirs + f"{p}.weight" for w, p in ATTN.items()}
    if config.qkv_bias:
        names.update({ours + f"{w}.bias": theirs + f"{ATTN[w]}.bias" for w in ("wq", "wk", "wv")})
    if config.qk_norm:
        names.update({ours + f"{n}.weight": theirs + f"{n}.weight" for n in ("q_norm", "k_norm")})
    return names


def renames(config: ModelConfig, layout: str) -> dict[str, str]:
    """canonical key -> transformers key, for every canonical tensor except the routed experts."""
    names = {"tok_emb.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"}
    if not config.tie_embeddings:
        names["lm_head.weight"] = "lm_head.weight"
    for i in range(config.n_layers):
        ours, theirs = f"layers.{i}.", f"model.layers.{i}."
        names[ours + "attn_norm.weight"] = theirs + "input_layernorm.weight"
        names[ours + "ffn_norm.weight"] = theirs + "post_attention_layernorm.weight"
        names.update(_attn_names(config, i))
        if not config.is_moe_layer(i):
            names.update({ours + f"ffn.{w}.weight": theirs + f"mlp.{p}.weight" for w, p in FFN.items()})
            continue
        names[ours + "ffn.router.weight"] = theirs + f"{_moe_prefix(layout)}.gate.weight"
        shared = "shared_experts" if layout == "ernie4_5_moe" else "shared_expert"
        names.update({ours + f"ffn.shared.{w}.weight": theirs + f"mlp.{shared}.{p}.weight" for w, p in FFN.items()})
        names[ours + "ffn.shared_gate.weight"] = theirs + "mlp.shared_expert_gate.weight"
    return names


def _expert_keys(layout: str, prefix: str, e: int) -> dict[str, str]:
    """canonical expert weight name -> this layout's key of expert e."""
    names = EXPERT_NAMES.get(layout, PROJ_NAMES)
    return {w: f"{prefix}{_moe_prefix(layout)}.experts.{e}.{n}.weight" for w, n in zip(("w1", "w2", "w3"), names)}


def _fold_scale(weight_name: str, t: Tensor, scale: float) -> Tensor:
    """model.moe.routed_scale lives in the down projection (w2) of every expert in a transformers
    layout, whose layers sum the routed outputs unscaled: multiplied on the way out, divided back
    on the way in (exact for the power-of-two default top_k)."""
    return t * scale if weight_name == "w2" and scale != 1.0 else t


def _permute_for(layout: str, config: ModelConfig, inverse: bool) -> Callable[[str, Tensor], Tensor]:
    def convert(key: str, t: Tensor) -> Tensor:
        if layout == "ernie4_5_moe" and (".attn.wq." in key or ".attn.wk." in key):
            return _interleave_rows(t, config.head_dim, inverse)
        return t
    return convert


def to_hf(sd: dict[str, Tensor], config: ModelConfig, layout: str) -> dict[str, Tensor]:
    """The canonical state dict in `layout`'s tensor names."""
    convert, names = _permute_for(layout, config, inverse=False), renames(config, layout)
    out = {names[k]: convert(k, t) for k, t in sd.items() if k in names}
    m = config.moe
    for i in range(config.n_layers):
        if not config.is_moe_layer(i):
            continue
        ours, theirs = f"layers.{i}.ffn.", f"model.layers.{i}."
        for e in range(m.num_experts):
            out.update({key: _fold_scale(w, sd[ours + f"experts.{w}"][e], m.routed_output_scale)
                        for w, key in _expert_keys(layout, theirs, e).items()})
        out.update(_layout_extras(sd, config, layout, i))
    return out


def _layout_extras(sd: dict[str, Tensor], config: ModelConfig, layout: str, i: int) -> dict[str, Tensor]:
    """Tensors an architecture always has that our model may not: ERNIE's correction bias (zeros
    without bias balancing), Qwen2-MoE's shared expert (0 columns) and gate without shared experts."""
    ours, theirs, out = f"layers.{i}.ffn.", f"model.layers.{i}.mlp.", {}
    like = sd[ours + "router.weight"]
    d, e = config.d_model, config.moe.num_experts
    if layout == "ernie4_5_moe":
        bias = sd.get(ours + "router.balance_bias", like.new_zeros(e))
        out[theirs + "moe_statics.e_score_correction_bias"] = bias.float().reshape(1, e)
    if layout == "qwen2_moe" and not config.moe.num_shared_experts:
        out.update({theirs + "shared_expert.gate_proj.weight": like.new_zeros(0, d),
                    theirs + "shared_expert.up_proj.weight": like.new_zeros(0, d),
                    theirs + "shared_expert.down_proj.weight": like.new_zeros(d, 0),
                    theirs + "shared_expert_gate.weight": like.new_zeros(1, d)})
    return out


def from_hf(get: Callable[[str], Tensor], keys: set[str], config: ModelConfig, layout: str,
            expected: dict[str, tuple[int, ...]]) -> tuple[dict[str, Tensor], set[str]]:
    """The canonical state dict from a layout's tensors (`get(key)`), and the keys it did not use.
    `expected` are the canonical shapes (moe/state.canonical_shapes)."""
    convert, names = _permute_for(layout, config, inverse=True), renames(config, layout)
    sd, used = {}, set()
    for key in expected:
        if key in names:
            sd[key] = convert(key, get(names[key]))
            used.add(names[key])
        elif key.endswith("router.balance_bias"):
            theirs = f"model.layers.{key.split('.')[1]}.mlp.moe_statics.e_score_correction_bias"
            sd[key] = get(theirs).reshape(-1)
            used.add(theirs)
        elif ".experts.w" in key:
            i, w = int(key.split(".")[1]), key.rsplit(".", 1)[1]
            per_expert = [_expert_keys(layout, f"model.layers.{i}.", e)[w] for e in range(config.moe.num_experts)]
            sd[key] = _fold_scale(w, torch.stack([get(k) for k in per_expert]), 1.0 / config.moe.routed_output_scale)
            used.update(per_expert)
    return sd, keys - used
