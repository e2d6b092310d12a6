"""Sparse upcycling (Komatsuzaki et al. 2022, as in Megatron-Core): a dense model -> an MoE model.

Every block that the new `moe_every` makes MoE gets E routed experts that all start as
copies of that block's dense SwiGLU, and a freshly initialised router. Attention, norms,
embeddings and the blocks that stay dense are copied unchanged. Training then resumes
from the dense model's quality instead of from scratch.

Shape legend: D model dim, Fd dense hidden (model.ffn_hidden), E experts, F expert hidden (= Fd).

    layers.{i}.ffn.w1.weight (Fd, D)  ->  layers.{i}.ffn.experts.w1 (E, F, D)   E copies
    layers.{i}.ffn.w2.weight (D, Fd)  ->  layers.{i}.ffn.experts.w2 (E, D, F)
    layers.{i}.ffn.w3.weight (Fd, D)  ->  layers.{i}.ffn.experts.w3 (E, F, D)
    (new)                             ->  layers.{i}.ffn.router.weight (E, D)   Normal(0, init_std), from `seed`
    (new)                             ->  layers.{i}.ffn.router.balance_bias (E,) zeros, if bias_update_rate > 0

At step 0 the upcycled model computes exactly the dense function: whichever experts a
token picks compute the same SwiGLU, so the MoE output is (sum of combine weights) *
dense(x), which is dense(x) when the weights sum to 1. Hence we require token-choice
routing, top_k >= 2 with renormalize=true, and dropless (capacity_factor=0). top_k=1 is
refused: this library (like Switch and DeepSpeed's top-1 gate) combines a single expert
with its raw softmax probability, which is < 1 under a fresh router. Shared experts are
refused too: a shared copy of the dense feed-forward would add it twice.

Works on exports (canonical state dict + ModelConfig), so it is backend- and EP-independent.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Union

import torch
from torch import Tensor

from .config import ModelConfig, MoEConfig
from .export import export_tokenizer, load_export_state, write_export
from .state import canonical_shapes

PathLike = Union[str, Path]


def check_upcyclable(dense_config: ModelConfig, moe: MoEConfig) -> None:
    """Raise ValueError (one sentence naming the key) unless upcycling keeps the dense function."""
    p = "model.moe."
    if dense_config.moe.moe_every != 0:
        raise ValueError(f"upcycling needs a dense model, but its {p}moe_every={dense_config.moe.moe_every} "
                         "(a dense model has moe_every=0).")
    if moe.moe_every == 0:
        raise ValueError(f"{p}moe_every=0 would upcycle no block; set it to 1 (every block) or more.")
    if moe.expert_hidden != dense_config.ffn_hidden:
        raise ValueError(f"{p}expert_hidden={moe.expert_hidden} must equal the dense model.ffn_hidden="
                         f"{dense_config.ffn_hidden}, since every expert starts as a copy of the dense feed-forward.")
    if moe.num_shared_experts:
        raise ValueError(f"{p}num_shared_experts={moe.num_shared_experts} is not supported by upcycling (a shared "
                         "copy of the dense feed-forward would add it twice); set it to 0.")
    if moe.router != "token_choice":
        raise ValueError(f"{p}router={moe.router} cannot be upcycled exactly (its combine weights do not sum to 1); "
                         "use router=token_choice.")
    if moe.top_k == 1:
        raise ValueError(f"{p}top_k=1 cannot be upcycled exactly (one expert is combined with its raw router "
                         "probability, below 1); use top_k >= 2 with renormalize=true.")
    if not moe.renormalize:
        raise ValueError(f"{p}renormalize=false cannot be upcycled exactly (the top_k combine weights must sum "
                         "to 1); set renormalize=true.")
    if not moe.dropless:
        raise ValueError(f"{p}capacity_factor={moe.capacity_factor} would drop tokens, so the upcycled model would "
                         "not equal the dense one; set capacity_factor=0 (dropless).")


def upcycle_state(dense_sd: dict[str, Tensor], dense_config: ModelConfig, moe: MoEConfig, *,
                  seed: int) -> tuple[dict[str, Tensor], ModelConfig]:
    """The upcycled canonical state dict and its config (dense_config with `moe` in place)."""
    check_upcyclable(dense_config, moe)
    missing = sorted(set(canonical_shapes(dense_config)) - set(dense_sd))
    if missing:
        raise ValueError(f"the dense state dict lacks {missing[:3]}, which its config needs.")
    config = dataclasses.replace(dense_config, moe=moe)
    gen = torch.Generator().manual_seed(seed)  # own RNG: the router does not depend on global state
    E = moe.num_experts
    sd = dict(dense_sd)
    for i in range(config.n_layers):
        if not config.is_moe_layer(i):
            continue
        p = f"layers.{i}.ffn."
        for w in ("w1", "w2", "w3"):
            w_FD = sd.pop(f"{p}{w}.weight")  # (Fd, D), or (D, Fd) for w2
            if w == "w2":  # the layer multiplies the routed output by this: each copy carries 1/scale
                w_FD = w_FD / moe.routed_output_scale
            sd[f"{p}experts.{w}"] = w_FD.unsqueeze(0).expand(E, *w_FD.shape).clone()  # (E, ...)
        dtype = sd[f"{p}experts.w1"].dtype
        sd[f"{p}router.weight"] = (torch.randn(E, config.d_model, generator=gen) * config.init_std).to(dtype)
        if config.bias_update_rate > 0:
            sd[f"{p}router.balance_bias"] = torch.zeros(E)
    return sd, config


def upcycle_export(dense_export_dir: PathLike, out_dir: PathLike, moe: MoEConfig, *, seed: int = 0) -> Path:
    """Upcycle the export in dense_export_dir into out_dir (tokenizer.json copied when present)."""
    src = Path(dense_export_dir)
    sd, config = upcycle_state(*load_export_state(src), moe, seed=seed)
    return write_export(sd, config, out_dir, tokenizer_file=export_tokenizer(src))
