"""ModelConfig <-> a transformers config.json, written and read as plain JSON.

Which architecture expresses one of our models (first match):
    no MoE layer                                   llama (qwen2 with qkv_bias, qwen3 with qk_norm)
    bias balancing, or shared experts without gate ernie4_5_moe  (selects by softmax + bias, ungated shared)
    shared experts with gate, moe_every > 1,       qwen2_moe  (decoder_sparse_step = moe_every,
      top_k = 1 or renormalize = false                          norm_topk_prob = renormalize and top_k > 1)
    qk_norm                                        qwen3_moe
    otherwise                                      mixtral
A model that no architecture computes exactly (expert_choice routing, for one) is still written
in its nearest architecture's tensor layout, under model_type "moe_platform" (architectures
"MoePlatformForCausalLM"), so transformers and vLLM refuse it instead of computing something else; `blocker` says which setting is the reason.

Our own settings travel in config.json under NAMESPACE: {"format_version", "layout", "model":
dataclasses.asdict(ModelConfig)}, so load_export rebuilds exactly the model that trained.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

from ..config import DEFAULT_BIAS_UPDATE_RATE, ModelConfig, MoEConfig

NAMESPACE = "moe_platform"
FORMAT_VERSION = 2
UNLOADABLE_MODEL_TYPE = "moe_platform"
ARCHITECTURES = {
    "mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM",
    "ernie4_5_moe": "Ernie4_5_MoeForCausalLM", "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
}


class ConfigError(ValueError):
    """config.json asks for something this model does not implement (the message names the field)."""


# -- ours -> transformers ----------------------------------------------------------------------

def choose_layout(config: ModelConfig) -> tuple[str, Optional[str]]:
    """(model_type whose layout expresses the model, the setting that keeps transformers from
    computing the same function, or None)."""
    m = config.moe
    if config.num_moe_layers == 0:
        if config.qk_norm:
            return "qwen3", "model.qkv_bias=true with model.qk_norm=true" if config.qkv_bias else None
        return ("qwen2" if config.qkv_bias else "llama"), None
    blocker = "model.moe.router=expert_choice" if m.router == "expert_choice" else None
    shared = m.num_shared_experts > 0
    if config.bias_update_rate > 0 or (shared and not m.shared_expert_gate):
        return "ernie4_5_moe", blocker or ernie_blocker(config)
    if shared or m.moe_every > 1 or m.top_k == 1 or not m.renormalize:
        if config.qk_norm:
            return "qwen3_moe", blocker or _qwen3_blocker(config)
        return "qwen2_moe", blocker
    if config.qk_norm:
        return "qwen3_moe", blocker or _qwen3_blocker(config)
    return ("qwen2_moe" if config.qkv_bias else "mixtral"), blocker


def ernie_blocker(config: ModelConfig) -> Optional[str]:
    m = config.moe
    why = "ERNIE-4.5-MoE (bias balancing / ungated shared experts)"
    if m.top_k == 1 or not m.renormalize:
        return f"model.moe.top_k={m.top_k}, renormalize={str(m.renormalize).lower()} with {why} renormalises"
    if m.num_shared_experts and m.shared_expert_gate:
        return "model.moe.shared_expert_gate=true with model.moe.bias_update_rate > 0"
    if m.shared_expert_hidden not in (None, m.expert_hidden):
        return f"model.moe.shared_expert_hidden={m.shared_expert_hidden} != expert_hidden in {why}"
    for name in ("qkv_bias", "qk_norm"):
        if getattr(config, name):
            return f"model.{name}=true in {why}"
    return None


def _qwen3_blocker(config: ModelConfig) -> Optional[str]:
    if config.moe.num_shared_experts:
        return "model.moe.num_shared_experts > 0 with model.qk_norm=true (Qwen3-MoE has no shared expert)"
    return "model.qkv_bias=true with model.qk_norm=true" if config.qkv_bias else None


def to_hf_config(config: ModelConfig, layout: str, blocker: Optional[str], token_ids: dict[str, Optional[int]],
                 dtype: str) -> dict[str, Any]:
    """The config.json of an export (token_ids: bos/eos/pad -> id or None)."""
    m = config.moe
    d: dict[str, Any] = {
        # Unloadable: no architecture name either, so no engine (transformers, vLLM) picks a class.
        "architectures": [ARCHITECTURES[layout] if blocker is None else "MoePlatformForCausalLM"],
        "model_type": layout if blocker is None else UNLOADABLE_MODEL_TYPE,
        "vocab_size": config.vocab_size, "hidden_size": config.d_model, "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads, "num_key_value_heads": config.kv_heads,
        "head_dim": config.head_dim, "hidden_act": "silu", "max_position_embeddings": config.seq_len,
        "rms_norm_eps": config.norm_eps, "rope_theta": config.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "tie_word_embeddings": config.tie_embeddings, "initializer_range": config.init_std,
        "attention_dropout": 0.0, "use_cache": True, "dtype": dtype,
        **{f"{name}_token_id": token_ids.get(name) for name in ("bos", "eos", "pad")},
    }
    if layout in ("llama", "mistral", "qwen3", "qwen2"):
        d.update(intermediate_size=config.ffn_hidden, attention_bias=False, mlp_bias=False,
                 use_sliding_window=False, sliding_window=None)
    elif layout == "mixtral":
        d.update(intermediate_size=m.expert_hidden, num_local_experts=m.num_experts, num_experts_per_tok=m.top_k,
                 router_aux_loss_coef=config.balance_loss_coef, router_jitter_noise=m.jitter_eps, sliding_window=None)
    elif layout in ("qwen2_moe", "qwen3_moe"):
        d.update(intermediate_size=config.ffn_hidden, moe_intermediate_size=m.expert_hidden,
                 num_experts=m.num_experts, num_experts_per_tok=m.top_k, decoder_sparse_step=max(m.moe_every, 1),
                 mlp_only_layers=[], norm_topk_prob=m.renormalize and m.top_k > 1,
                 router_aux_loss_coef=config.balance_loss_coef, use_sliding_window=False, sliding_window=None)
        if layout == "qwen2_moe":
            d.update(shared_expert_intermediate_size=m.shared_hidden, qkv_bias=config.qkv_bias)
        else:
            d.update(attention_bias=False)
    elif layout == "ernie4_5_moe":
        d.update(intermediate_size=config.ffn_hidden, moe_intermediate_size=m.expert_hidden,
                 moe_num_experts=m.num_experts, moe_k=m.top_k, moe_num_shared_experts=m.num_shared_experts,
                 moe_layer_start_index=0, moe_layer_end_index=config.n_layers - 1, moe_layer_interval=m.moe_every,
                 moe_norm_min=1e-12, use_bias=False, router_aux_loss_coef=config.balance_loss_coef)
    d[NAMESPACE] = {"format_version": FORMAT_VERSION, "layout": layout, "model": dataclasses.asdict(config.resolved())}
    return d


# -- transformers -> ours ----------------------------------------------------------------------

class _Reader:
    """Typed field access to one config.json, every error naming the field and the file."""

    def __init__(self, d: dict[str, Any], file: str) -> None:
        self.d, self.file = d, file

    def fail(self, field: str, problem: str) -> ConfigError:
        sep = "" if problem.startswith("=") else " "
        return ConfigError(f"{self.file}: {field}{sep}{problem}")

    def get(self, field: str, kind: type, default: Any = ...) -> Any:
        if field not in self.d or self.d[field] is None:
            if default is ...:
                raise self.fail(field, "is missing")
            return default
        value = self.d[field]
        ok = isinstance(value, kind) and not (isinstance(value, bool) and kind is not bool)
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value, ok = float(value), True
        if not ok:
            raise self.fail(field, f"={value!r} is not a {kind.__name__}")
        return value


def from_hf_config(d: dict[str, Any], file: str) -> tuple[ModelConfig, str]:
    """(ModelConfig, layout) of a config.json: our own exports through NAMESPACE, any supported
    transformers checkpoint through its fields. Refuses what we do not implement, naming the field."""
    r = _Reader(d, file)
    if NAMESPACE in d:
        return _from_namespace(r)
    model_type = r.get("model_type", str)
    if model_type not in ARCHITECTURES:
        raise r.fail("model_type", f"={model_type!r} is not supported (supported: {', '.join(ARCHITECTURES)})")
    _refuse_unsupported(r, model_type)
    hidden, heads = r.get("hidden_size", int), r.get("num_attention_heads", int)
    head_dim = r.get("head_dim", int, None)  # explicit: may differ from hidden / heads (Qwen3-MoE)
    if heads < 1 or (head_dim is None and hidden % heads):
        raise r.fail("num_attention_heads", f"={heads} does not divide hidden_size={hidden}")
    wider = head_dim if head_dim is not None and heads * head_dim != hidden else None
    base = dict(vocab_size=r.get("vocab_size", int), d_model=hidden, n_layers=r.get("num_hidden_layers", int),
                n_heads=heads, n_kv_heads=r.get("num_key_value_heads", int, heads), attention_head_dim=wider,
                seq_len=r.get("max_position_embeddings", int), rope_theta=_rope_theta(r),
                norm_eps=r.get("rms_norm_eps", float, 1e-6), init_std=r.get("initializer_range", float, 0.02),
                tie_embeddings=r.get("tie_word_embeddings", bool, model_type == "ernie4_5_moe"),
                qkv_bias=model_type in ("qwen2", "qwen2_moe") and r.get("qkv_bias", bool, True),
                qk_norm=model_type in ("qwen3", "qwen3_moe"))
    try:
        return ModelConfig(**base, **_feed_forward(r, model_type)), model_type
    except ValueError as exc:  # a value our config refuses (e.g. top_k > num_experts)
        raise ConfigError(f"{file}: {exc}") from None


def _from_namespace(r: _Reader) -> tuple[ModelConfig, str]:
    ns = r.get(NAMESPACE, dict)
    version = ns.get("format_version")
    if version != FORMAT_VERSION:
        raise r.fail(f"{NAMESPACE}.format_version", f"={version!r}; this code reads {FORMAT_VERSION}")
    layout = ns.get("layout")
    if layout not in ARCHITECTURES:
        raise r.fail(f"{NAMESPACE}.layout", f"={layout!r} is not one of {', '.join(ARCHITECTURES)}")
    if not isinstance(ns.get("model"), dict):
        raise r.fail(f"{NAMESPACE}.model", "is missing or not an object")
    try:
        return ModelConfig.from_dict(ns["model"]), layout
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{r.file}: {NAMESPACE}.model: {exc}") from None


def _refuse_unsupported(r: _Reader, model_type: str) -> None:
    act = r.get("hidden_act", str, "silu")
    if act != "silu":
        raise r.fail("hidden_act", f"={act!r} is not supported (SwiGLU with silu only)")
    if r.d.get("rope_scaling"):
        raise r.fail("rope_scaling", "is set: rope scaling is not supported")
    rope = r.get("rope_parameters", dict, {})
    if rope.get("rope_type", "default") != "default":
        raise r.fail("rope_parameters.rope_type", f"={rope.get('rope_type')!r}: rope scaling is not supported")
    window = r.d.get("sliding_window")
    active = r.get("use_sliding_window", bool, model_type in ("mistral", "mixtral"))
    if active and window and window < r.get("max_position_embeddings", int):
        raise r.fail("sliding_window", f"={window} is shorter than max_position_embeddings (sliding-window "
                                       "attention is not supported)")
    for flag in ("attention_bias", "mlp_bias", "use_bias"):
        if r.get(flag, bool, False):
            raise r.fail(flag, "=true is not supported (biases on the output/MLP projections)")
    if r.get("mlp_only_layers", list, []):
        raise r.fail("mlp_only_layers", "is not empty (only a regular decoder_sparse_step is supported)")


def _rope_theta(r: _Reader) -> float:
    rope = r.get("rope_parameters", dict, {})
    theta = rope.get("rope_theta", r.d.get("rope_theta", 10000.0))
    if not isinstance(theta, (int, float)) or isinstance(theta, bool) or theta <= 0:
        raise r.fail("rope_parameters.rope_theta", f"={theta!r} is not a positive number")
    return float(theta)


def _feed_forward(r: _Reader, model_type: str) -> dict[str, Any]:
    """ffn_hidden and MoEConfig of each architecture. Their routed outputs are the plain
    weighted sum (our exports fold model.moe.routed_scale into the experts' down projection),
    so an imported model has routed_scale=1; only ERNIE's router has a balancing bias, so every
    other import sets bias_update_rate=0 (our default would add one, and the export would then
    change architecture)."""
    if model_type in ("llama", "mistral", "qwen2", "qwen3"):
        return {"ffn_hidden": r.get("intermediate_size", int), "moe": MoEConfig(moe_every=0)}
    if model_type == "mixtral":
        k = _top_k(r, "num_experts_per_tok", renormalized=True)
        f = r.get("intermediate_size", int)
        return {"ffn_hidden": f, "moe": MoEConfig(num_experts=r.get("num_local_experts", int), top_k=k,
                                                  expert_hidden=f, moe_every=1, renormalize=True,
                                                  bias_update_rate=0.0, routed_scale=1.0)}
    if model_type in ("qwen2_moe", "qwen3_moe"):
        norm = r.get("norm_topk_prob", bool, False)  # transformers' default for both
        k = _top_k(r, "num_experts_per_tok", renormalized=norm)
        shared = r.get("shared_expert_intermediate_size", int, 0) if model_type == "qwen2_moe" else 0
        experts = r.get("num_experts", int, None) or r.get("num_local_experts", int)
        return {"ffn_hidden": r.get("intermediate_size", int), "moe": MoEConfig(
            num_experts=experts, top_k=k, expert_hidden=r.get("moe_intermediate_size", int),
            moe_every=r.get("decoder_sparse_step", int, 1), renormalize=norm or k == 1,
            num_shared_experts=1 if shared else 0, shared_expert_hidden=shared or None,
            shared_expert_gate=bool(shared), bias_update_rate=0.0, routed_scale=1.0)}
    return _ernie_feed_forward(r)


def _ernie_feed_forward(r: _Reader) -> dict[str, Any]:
    n_layers, interval = r.get("num_hidden_layers", int), r.get("moe_layer_interval", int, 1)
    start, end = r.get("moe_layer_start_index", int, 0), r.get("moe_layer_end_index", int, n_layers - 1)
    if interval < 1:
        raise r.fail("moe_layer_interval", f"={interval} must be at least 1")
    if any((i + 1) % interval == 0 and not start <= i <= end for i in range(n_layers)):
        raise r.fail("moe_layer_start_index", f"={start} / moe_layer_end_index={end} leave out MoE layers that "
                                              "moe_layer_interval places (only a regular interval is supported)")
    k = _top_k(r, "moe_k", renormalized=True)
    return {"ffn_hidden": r.get("intermediate_size", int), "moe": MoEConfig(
        num_experts=r.get("moe_num_experts", int), top_k=k, expert_hidden=r.get("moe_intermediate_size", int),
        moe_every=interval, num_shared_experts=r.get("moe_num_shared_experts", int, 0), renormalize=True,
        bias_update_rate=DEFAULT_BIAS_UPDATE_RATE, routed_scale=1.0)}  # an imported bias keeps training at our rate


def _top_k(r: _Reader, field: str, renormalized: bool) -> int:
    k = r.get(field, int)
    if k == 1 and renormalized:
        raise r.fail(field, "=1 with renormalised weights (every token's weight is 1) is not supported; "
                            "our top_k=1 weighs by the router probability")
    return k
