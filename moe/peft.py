"""Parameter-efficient finetuning: LoRA adapters and freeze modes (the ``peft.*`` config section).

    model.load_canonical_state_dict(base)          # or load_export: the base weights first
    counts = apply_peft(model, PeftConfig(lora_rank=8))   # before deepspeed.initialize
    ... train (moe.optimizer_param_groups skips what is frozen) ...
    save_export(model, "export")                   # the MERGED weights, like any export
    save_adapter(model, "export/adapter", config, base_export_dir="base")   # the adapters alone
    merge_adapter("base", "export/adapter", "merged")                       # no model needed

Shape legend: O out features, I in features, R LoRA rank, L local experts (E / ep), E experts.

LoRA (Hu et al. 2021) adds a low-rank delta to a frozen weight: W_OI + scale * B_OR @ A_RI,
scale = lora_alpha / lora_rank, B zero at first so the model is unchanged at step 0. It is a
`torch.nn.utils.parametrize` parametrization, so reading the weight gives W + delta: the
model's forward, `canonical_state_dict()` and `save_export` all see the merged weight, with
no change to the model code. The same module adapts the native backend's stacked expert
tensors (W_LOI + scale * B_LOR @ A_LRI, one adapter per expert) and, on the deepspeed
backend, each expert's nn.Linear. The cost of that simplicity: the merged weight is
materialised at every forward (an (O, R) @ (R, I) product, small), and the backward computes
the full-size weight gradient before reducing it to A and B (as the unfused x @ A.T @ B.T
form would not). So this LoRA saves optimizer state, gradient reduction traffic and
checkpoint size, not backward FLOPs; the grouped-GEMM expert path stays as it is.

Why not Hugging Face `peft`: it is not a dependency (it brings transformers and accelerate),
its LoRA layers wrap nn.Linear-like modules, and even its support for bare parameters knows
nothing of what our expert tensors need: only this rank's L experts exist, their adapters
must carry DeepSpeed's expert tags (gradients reduced over the expert-data-parallel group),
DeepSpeed's per-expert checkpoint files need per-expert keys, and adapter files must be
EP-independent (gathered over the EP group, like the canonical state). That glue is most
of the work; the LoRA itself is the 20 lines of `LoRA` below.

Adapters in the model's own `state_dict()` (DeepSpeed checkpoints): nn.Linear targets keep
torch's parametrize keys (`...wq.parametrizations.weight.original`, `...weight.0.lora_A`);
native experts take DeepSpeed's per-expert layout like their weights do
(`...deepspeed_experts.{j}.w1.weight`, `...deepspeed_experts.{j}.w1.lora_A` (R, I)), so each
expert's adapter lands in that expert's checkpoint file.

Adapter files (`adapter_state_dict`, `save_adapter`) use canonical names: the canonical
weight key plus `.lora_A` / `.lora_B`, e.g. `layers.0.attn.wq.weight.lora_A` (R, I),
`layers.1.ffn.experts.w1.lora_A` (E, R, I), `layers.1.ffn.experts.w1.lora_B` (E, F, R).

Limits: `load_canonical_state_dict` refuses a model with adapters (load the base first);
canonical gradients are undefined with adapters. DeepSpeed ZeRO stage 1/2 cannot run an MoE
model in which no routed-expert weight or adapter trains (it needs a 'moe' param group):
`PeftConfig.check_zero_stage` says so before a run starts; ZeRO stage 0 runs such stages.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.utils import parametrize

from . import parallel
from .config import ModelConfig
from .peft_config import FREEZE_MODES, LORA_TARGETS, PeftConfig  # noqa: F401 (re-exported)
from .experts import NativeExperts
from .layer import MoELayer
from .model import MoETransformer

ADAPTER_FILE = "adapter.safetensors"
ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_FORMAT_VERSION = 1
FACTORS = ("lora_A", "lora_B")
# One native expert's adapter factor in the model's state_dict (beside DeepSpeed's expert weight keys).
EXPERT_FACTOR_KEY = "deepspeed_moe.experts.deepspeed_experts.{j}.{w}.{factor}"
PathLike = Union[str, Path]


class LoRA(nn.Module):
    """The parametrization W -> W + scale * B @ A, for a weight W_OI or a stack of them W_LOI."""

    def __init__(self, weight: Tensor, rank: int, scale: float) -> None:
        super().__init__()
        *lead, out_features, in_features = weight.shape
        # A is filled by apply_peft (from the global RNG, in canonical order); B = 0 keeps the
        # model's function unchanged until the first optimizer step.
        self.lora_A = nn.Parameter(weight.new_zeros(*lead, rank, in_features))  # (..., R, I)
        self.lora_B = nn.Parameter(weight.new_zeros(*lead, out_features, rank))  # (..., O, R)
        self.scale = scale

    def forward(self, w: Tensor) -> Tensor:
        return w + (self.lora_B @ self.lora_A) * self.scale


@dataclass
class _Target:
    """One adapted canonical weight and where it lives on this rank: one nn.Linear weight
    ('linear'), the native backend's stacked (L, O, I) expert tensor ('stacked'), or one
    nn.Linear per local expert on the deepspeed backend ('per_expert')."""

    key: str  # canonical weight key, e.g. layers.0.attn.wq.weight or layers.1.ffn.experts.w1
    kind: str
    owners: list[tuple[nn.Module, str]]  # (module, tensor name) holding the weight
    ep_size: int = 1

    @property
    def is_expert(self) -> bool:
        return self.kind != "linear"

    def loras(self) -> list[LoRA]:
        return [module.parametrizations[name][0] for module, name in self.owners]

    def local(self, factor: str) -> Tensor:
        """This rank's factor: (R, I) / (O, R), or (L, R, I) / (L, O, R) for experts."""
        tensors = [getattr(lora, factor) for lora in self.loras()]
        return torch.stack(tensors) if self.kind == "per_expert" else tensors[0]

    def canonical(self, factor: str) -> Tensor:
        """The factor over all experts (E, ...) for expert targets: collective over the EP group."""
        local = self.local(factor).detach()
        if not self.is_expert:
            return local
        return parallel.all_gather_cat(local, parallel.expert_parallel_group(self.ep_size))

    @torch.no_grad()
    def load(self, factor: str, canonical: Tensor) -> None:
        """Copy a canonical factor in; expert targets keep this rank's slice of the experts."""
        if self.is_expert:
            n_local = self.local(factor).shape[0]
            start = parallel.expert_parallel_rank(self.ep_size) * n_local
            canonical = canonical[start:start + n_local]
        params = [getattr(lora, factor) for lora in self.loras()]
        values = canonical.unbind(0) if self.kind == "per_expert" else [canonical]
        for p, value in zip(params, values):
            p.copy_(value)


# -- applying ----------------------------------------------------------------------------------

def apply_peft(model: MoETransformer, config: PeftConfig) -> dict[str, int]:
    """Freeze parameters and/or add LoRA adapters, in place; returns {"trainable", "total"}
    parameter counts on this rank. Call it after the base weights are loaded
    (`load_canonical_state_dict`) and before `deepspeed.initialize`, on every rank (adapter
    initialisation draws from the global torch RNG in canonical order: one seed set just before
    it gives the same adapters on every rank, at any EP size, on either backend)."""
    if getattr(model, "peft_config", None) is not None:
        raise ValueError("apply_peft() was already called on this model; peft.* applies once, to the base model.")
    if config.lora_rank > 0:
        _add_adapters(model, config)
    elif config.freeze != "none":
        keep = _trainable_under_freeze(model, config)
        for p in model.parameters():
            p.requires_grad_(id(p) in keep)
    if config.enabled:
        model.peft_config = config
    params = list(model.parameters())
    return {"trainable": sum(p.numel() for p in params if p.requires_grad), "total": sum(p.numel() for p in params)}


def _trainable_under_freeze(model: MoETransformer, config: PeftConfig) -> set[int]:
    """ids of the parameters that keep training under peft.freeze."""
    layers = [layer for _, layer in model.moe_layers()]
    if config.freeze == "router_only":
        return {id(layer.router_weight) for layer in layers}
    if config.freeze == "experts":
        frozen = {id(p) for layer in layers for p in _routed_expert_params(layer)}
        return {id(p) for p in model.parameters()} - frozen
    n = config.trainable_top_layers  # top_layers
    if n > len(model.layers):
        raise ValueError(f"peft.trainable_top_layers={n} is more than model.n_layers={len(model.layers)}.")
    top = [*model.layers[-n:], model.norm]
    return {id(p) for module in top for p in module.parameters()}


def _routed_expert_params(layer: nn.Module) -> list[nn.Parameter]:
    # Both backends tag routed expert weights as DeepSpeed does (allreduce=False); the deepspeed
    # backend's gate lives in the same module but is not tagged.
    return [p for p in layer.experts.parameters() if getattr(p, "allreduce", True) is False]


def _add_adapters(model: MoETransformer, config: PeftConfig) -> None:
    targets = _lora_targets(model, config)
    for p in model.parameters():
        p.requires_grad_(False)  # LoRA trains the adapters only
    for target in targets:
        for module, name in target.owners:
            lora = LoRA(getattr(module, name), config.lora_rank, config.lora_scale)
            parametrize.register_parametrization(module, name, lora)
            if target.is_expert:
                # Like the expert weights: DeepSpeed reduces their gradients over the
                # expert-data-parallel group and puts them in its 'moe' param groups.
                parallel.tag_expert_params([lora.lora_A, lora.lora_B], target.ep_size)
        target.load("lora_A", _initial_lora_A(target))
    for _, layer in model.moe_layers():
        if isinstance(layer.experts, NativeExperts) and parametrize.is_parametrized(layer.experts):
            _register_expert_state_hooks(layer.experts)


def _initial_lora_A(target: _Target) -> Tensor:
    """A in the canonical shape, (R, I) or (E, R, I), uniform in +-1/sqrt(I) (nn.Linear's and
    HF peft's kaiming-uniform init). Drawn for all E experts on every rank, so a seed gives
    the same adapters at any EP size."""
    local = target.local("lora_A")
    shape = (local.shape[0] * target.ep_size, *local.shape[1:]) if target.is_expert else tuple(local.shape)
    bound = 1.0 / math.sqrt(shape[-1])
    return torch.empty(shape).uniform_(-bound, bound)


def _lora_targets(model: MoETransformer, config: PeftConfig) -> list[_Target]:
    """The weights peft.lora_targets names, in canonical order (the order A is drawn in)."""
    wanted, ep = set(config.lora_targets), model.expert_parallel_size
    found: dict[str, list[_Target]] = {name: [] for name in LORA_TARGETS if name in wanted}
    for i, block in enumerate(model.layers):
        p = f"layers.{i}."
        if "attention" in wanted:
            found["attention"] += [_Target(f"{p}attn.{w}.weight", "linear", [(getattr(block.attn, w), "weight")])
                                   for w in ("wq", "wk", "wv", "wo")]
        if not isinstance(block.ffn, MoELayer):
            if "dense_ffn" in wanted:
                found["dense_ffn"] += _linear_targets(block.ffn, f"{p}ffn.")
            continue
        if "experts" in wanted:
            found["experts"] += _expert_targets(block.ffn.experts, f"{p}ffn.experts.", ep)
        if "shared" in wanted and block.ffn.shared is not None:
            found["shared"] += _linear_targets(block.ffn.shared, f"{p}ffn.shared.")
    if "lm_head" in wanted:
        if model.config.tie_embeddings:
            raise ValueError("peft.lora_targets=lm_head needs model.tie_embeddings=false (a tied lm_head is the "
                             "token embedding).")
        found["lm_head"].append(_Target("lm_head.weight", "linear", [(model.lm_head, "weight")]))
    for name, targets in found.items():
        if not targets:
            raise ValueError(f"peft.lora_targets={name} matches no weight of this model ({_MISSING[name]}).")
    return sorted((t for targets in found.values() for t in targets), key=lambda t: _canonical_position(t.key))


_MISSING = {"experts": "it has no MoE layers", "shared": "model.moe.num_shared_experts=0",
            "dense_ffn": "every block is an MoE block"}  # attention and lm_head always exist


def _canonical_position(key: str) -> tuple[int, int]:
    """Layer by layer, attention before the feed-forward (sorted() keeps the order within each)."""
    if not key.startswith("layers."):
        return (1 << 30, 0)
    _, i, rest = key.split(".", 2)
    return (int(i), 0 if rest.startswith("attn.") else 1)


def _linear_targets(swiglu: nn.Module, prefix: str) -> list[_Target]:
    return [_Target(f"{prefix}{name}.weight", "linear", [(linear, "weight")])
            for name, linear in swiglu.named_children()]


def _expert_targets(experts: nn.Module, prefix: str, ep: int) -> list[_Target]:
    if isinstance(experts, NativeExperts):
        # Whatever stacked (L, ...) tensors the native experts own, adapted or not yet.
        names = [n for n, _ in experts.named_parameters(recurse=False)]
        names += list(getattr(experts, "parametrizations", {}))
        return [_Target(f"{prefix}{w}", "stacked", [(experts, w)], ep) for w in sorted(names)]
    local = list(experts.deepspeed_moe.experts.deepspeed_experts)  # deepspeed backend: one SwiGLU each
    return [_Target(f"{prefix}{w}", "per_expert", [(getattr(e, w), "weight") for e in local], ep)
            for w, _ in local[0].named_children()]


# -- native experts in the model's state_dict ----------------------------------------------------

def _register_expert_state_hooks(experts: NativeExperts) -> None:
    """Keep NativeExperts' DeepSpeed per-expert state_dict layout with parametrized tensors.
    A child's state_dict hooks run before its parent's, and a parent's load pre-hooks before
    its children are loaded, so these wrap NativeExperts' own hooks without changing them."""
    for w, plist in experts.parametrizations.items():
        plist.register_state_dict_post_hook(functools.partial(_split_expert_factors, w))
    experts.register_load_state_dict_pre_hook(_stack_expert_factors)


def _split_expert_factors(w: str, plist: nn.Module, state_dict: dict, prefix: str, local_metadata) -> None:
    """state_dict post-hook of a parametrized native expert tensor (prefix ends in
    'parametrizations.{w}.'): its base goes back under the plain name `w` (which NativeExperts'
    own hook then splits per expert) and each factor (L, ...) is split per expert."""
    experts_prefix = prefix[:-len(f"parametrizations.{w}.")]
    state_dict[experts_prefix + w] = state_dict.pop(prefix + "original")
    for factor in FACTORS:
        stacked = state_dict.pop(f"{prefix}0.{factor}")
        for j in range(stacked.shape[0]):
            state_dict[experts_prefix + EXPERT_FACTOR_KEY.format(j=j, w=w, factor=factor)] = stacked[j]


def _stack_expert_factors(experts: NativeExperts, state_dict: dict, prefix: str, *args) -> None:
    """load_state_dict pre-hook, after NativeExperts' own (which stacked the weights back):
    the inverse of _split_expert_factors."""
    for w in experts.parametrizations:
        if prefix + w in state_dict:
            state_dict[f"{prefix}parametrizations.{w}.original"] = state_dict.pop(prefix + w)
        for factor in FACTORS:
            keys = [prefix + EXPERT_FACTOR_KEY.format(j=j, w=w, factor=factor)
                    for j in range(experts.num_local_experts)]
            if all(k in state_dict for k in keys):
                state_dict[f"{prefix}parametrizations.{w}.0.{factor}"] = torch.stack([state_dict.pop(k) for k in keys])


# -- adapters apart ------------------------------------------------------------------------------

def _lora_config(model: MoETransformer) -> PeftConfig:
    config = getattr(model, "peft_config", None)
    if config is None or config.lora_rank == 0:
        raise ValueError("this model has no LoRA adapters: call apply_peft(model, PeftConfig(lora_rank=...)) first.")
    return config


def _lora_fields(config: PeftConfig) -> dict:
    return {"lora_rank": config.lora_rank, "lora_alpha": config.lora_alpha,
            "lora_targets": sorted(config.lora_targets)}


def adapter_state_dict(model: MoETransformer) -> dict[str, Tensor]:
    """The adapters under canonical names (`<canonical weight key>.lora_A` / `.lora_B`), experts
    gathered over the EP group: collective when EP > 1 (every rank must call it)."""
    return {f"{t.key}.{factor}": t.canonical(factor)
            for t in _lora_targets(model, _lora_config(model)) for factor in FACTORS}


def save_adapter(model: MoETransformer, out_dir: PathLike, config: PeftConfig,
                 base_export_dir: Optional[PathLike] = None) -> Path:
    """Write out_dir/adapter.safetensors and out_dir/adapter_config.json (the peft config and
    the base export the adapters apply to). Collective when EP > 1; global rank 0 writes."""
    from safetensors.torch import save_file

    applied = _lora_config(model)
    if _lora_fields(config) != _lora_fields(applied):
        raise ValueError(f"save_adapter() got a peft config {_lora_fields(config)} that differs from the one "
                         f"the model's adapters were made with, {_lora_fields(applied)}.")
    sd = adapter_state_dict(model)
    out = Path(out_dir)
    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        return out
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.to("cpu").contiguous() for k, v in sd.items()}, str(out / ADAPTER_FILE),
              metadata={"format_version": str(ADAPTER_FORMAT_VERSION)})
    meta = {"format_version": ADAPTER_FORMAT_VERSION, "peft": dataclasses.asdict(config),
            "base_export_dir": None if base_export_dir is None else os.path.abspath(base_export_dir)}
    (out / ADAPTER_CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return out


def read_adapter_config(adapter_dir: PathLike) -> tuple[PeftConfig, Optional[str]]:
    """(peft config, base export dir or None) of a saved adapter."""
    path = Path(adapter_dir) / ADAPTER_CONFIG_FILE
    if not path.is_file():
        raise ValueError(f"{adapter_dir} is not an adapter directory: it has no {ADAPTER_CONFIG_FILE}.")
    meta = json.loads(path.read_text())
    if meta.get("format_version") != ADAPTER_FORMAT_VERSION:
        raise ValueError(f"{path} has format_version={meta.get('format_version')}; this code reads "
                         f"{ADAPTER_FORMAT_VERSION}.")
    return PeftConfig(**meta["peft"]), meta.get("base_export_dir")


def load_adapter(model: MoETransformer, adapter_dir: PathLike) -> None:
    """Load saved adapters into a model that went through apply_peft with the same LoRA config
    (before deepspeed.initialize, like apply_peft). Each rank keeps its slice of the experts."""
    from safetensors.torch import load_file

    applied = _lora_config(model)
    saved, _ = read_adapter_config(adapter_dir)
    if _lora_fields(saved) != _lora_fields(applied):
        raise ValueError(f"the adapter in {adapter_dir} was made with {_lora_fields(saved)}, but this model's "
                         f"adapters with {_lora_fields(applied)}.")
    device = next(model.parameters()).device
    sd = load_file(str(Path(adapter_dir) / ADAPTER_FILE), device=str(device))
    targets = _lora_targets(model, applied)
    expected = {f"{t.key}.{factor}": t for t in targets for factor in FACTORS}
    if set(sd) != set(expected):
        missing, unexpected = sorted(set(expected) - set(sd)), sorted(set(sd) - set(expected))
        raise ValueError(f"the adapter in {adapter_dir} does not match this model: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}.")
    for key, target in expected.items():
        factor = key.rsplit(".", 1)[1]
        local = target.local(factor)
        shape = (local.shape[0] * target.ep_size, *local.shape[1:]) if target.is_expert else tuple(local.shape)
        if tuple(sd[key].shape) != shape:
            raise ValueError(f"{key} has shape {tuple(sd[key].shape)} in {adapter_dir}; this model needs {shape}.")
        target.load(factor, sd[key])


def merge_adapter(base_export_dir: Optional[PathLike], adapter_dir: PathLike, out_dir: PathLike) -> Path:
    """A full export (moe/export.py) with every adapted weight replaced by W + scale * B @ A,
    computed on canonical tensors (no model, no GPU, any EP).
    base_export_dir None: the one recorded in adapter_config.json."""
    from safetensors.torch import load_file

    from .export import export_tokenizer, is_export, load_export_state, write_export

    config, recorded = read_adapter_config(adapter_dir)
    base = Path(base_export_dir if base_export_dir is not None else recorded or "")
    if not is_export(base):
        raise ValueError(f"the base export {str(base)!r} of the adapter in {adapter_dir} is not an export "
                         "(no config.json with safetensors weights).")
    weights, base_config = load_export_state(base)
    adapters = load_file(str(Path(adapter_dir) / ADAPTER_FILE))
    for key in sorted(k for k in adapters if k.endswith(".lora_A")):
        w_key = key[:-len(".lora_A")]
        if w_key not in weights:
            raise ValueError(f"the adapter's {w_key} is not in the base export {base} (made for another model?).")
        w = weights[w_key]
        lora_A, lora_B = adapters[key].float(), adapters[w_key + ".lora_B"].float()
        delta = (lora_B @ lora_A) * config.lora_scale  # as LoRA.forward computes it
        if delta.shape != w.shape:
            raise ValueError(f"the adapter's {w_key} has shape {tuple(delta.shape)}; the base export's is "
                             f"{tuple(w.shape)}.")
        weights[w_key] = (w.float() + delta).to(w.dtype)
    return write_export(weights, base_config, out_dir, export_tokenizer(base))
