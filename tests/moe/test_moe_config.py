"""ModelConfig / MoEConfig: validation messages, (de)serialisation, and the size facts
(num_params, num_active_params, flops_per_token) checked against built models."""

from __future__ import annotations

from functools import partial

import dataclasses

import pytest
import torch
from omegaconf import OmegaConf
from torch.utils.flop_counter import FlopCounterMode

from testkit.models import tiny_model

from moe import ModelConfig, MoEConfig, MoETransformer


tiny = partial(tiny_model, n_heads=4, seq_len=16, ffn_hidden=48, expert_hidden=16)


def test_defaults_build_and_are_plain_structured_configs() -> None:
    cfg = ModelConfig()
    assert cfg.moe.backend == "native" and cfg.moe.top_k <= cfg.moe.num_experts
    schema = OmegaConf.structured(ModelConfig)
    merged = OmegaConf.merge(schema, OmegaConf.from_dotlist(["moe.top_k=1", "d_model=128"]))
    obj = OmegaConf.to_object(merged)
    assert isinstance(obj, ModelConfig) and isinstance(obj.moe, MoEConfig)
    assert obj.moe.top_k == 1 and obj.d_model == 128
    with pytest.raises(Exception):  # a typo fails at once
        OmegaConf.merge(schema, OmegaConf.from_dotlist(["moe.topk=1"]))


@pytest.mark.parametrize("changes, bias, balance", [
    ({}, 0.001, 0.01),  # the recipe: bias balancing over a light balance loss
    ({"backend": "deepspeed"}, 0.0, 0.05),  # DeepSpeed's gate has no bias
    ({"router": "expert_choice", "capacity_factor": 1.0}, 0.0, 0.05),  # experts pick: no bias to add
    ({"top_k": 1}, 0.0, 0.05),  # ERNIE-4.5-MoE renormalises, so no transformers layout carries it
    ({"qk_norm": True}, 0.0, 0.05),
    ({"num_shared_experts": 1}, 0.001, 0.01),  # ungated shared experts: ERNIE's layout
    ({"moe_every": 0}, 0.0, 0.05),  # dense: nothing to balance
    ({"qk_norm": True, "bias_update_rate": 0.002}, 0.002, 0.01),  # set explicitly: kept
    ({"balance_loss_coef": 0.2}, 0.001, 0.2),
])
def test_balancing_defaults_resolve_per_model(changes: dict, bias: float, balance: float) -> None:
    cfg = tiny(**changes)
    assert (cfg.bias_update_rate, cfg.balance_loss_coef) == (bias, balance)
    # Never written back: the config saved and rebuilt with another setting resolves afresh.
    assert ModelConfig.from_dict(dataclasses.asdict(cfg)) == cfg
    if not changes:
        assert cfg.moe.bias_update_rate is None
        moved = dataclasses.asdict(cfg)
        moved["moe"]["backend"] = "deepspeed"
        assert ModelConfig.from_dict(moved).bias_update_rate == 0.0


@pytest.mark.parametrize("build, message", [
    (lambda: MoEConfig(num_experts=2, top_k=4), "model.moe.top_k=4 is larger than model.moe.num_experts=2."),
    (lambda: MoEConfig(backend="megablocks"), "model.moe.backend='megablocks' is not one of native, deepspeed."),
    (lambda: MoEConfig(router="hash"), "model.moe.router='hash'"),
    (lambda: MoEConfig(num_experts=0), "model.moe.num_experts=0 must be at least 1."),
    (lambda: MoEConfig(capacity_factor=-1.0), "model.moe.capacity_factor=-1.0 must not be negative."),
    (lambda: MoEConfig(router="expert_choice"), "model.moe.router=expert_choice needs model.moe.capacity_factor > 0"),
    (lambda: MoEConfig(backend="deepspeed", router="expert_choice", capacity_factor=1.0),
     "not supported by model.moe.backend=deepspeed"),
    (lambda: MoEConfig(backend="deepspeed", bias_update_rate=1e-3),
     "model.moe.bias_update_rate=0.001 is not supported by model.moe.backend=deepspeed"),
    (lambda: MoEConfig(backend="deepspeed", renormalize=False),
     "model.moe.renormalize=false is not supported by model.moe.backend=deepspeed"),
    (lambda: ModelConfig(d_model=30, n_heads=4), "model.d_model=30 is not divisible by model.n_heads=4."),
    (lambda: ModelConfig(vocab_size=0), "model.vocab_size=0 must be at least 1."),
])
def test_bad_values_fail_with_one_sentence_naming_the_key(build, message: str) -> None:
    with pytest.raises(ValueError) as err:
        build()
    assert message in str(err.value)
    assert str(err.value).count("\n") == 0


def test_expert_parallel_size_must_divide_experts() -> None:
    with pytest.raises(ValueError, match="model.moe.num_experts=4 is not divisible by the expert-parallel size 3"):
        MoETransformer(tiny(), expert_parallel_size=3)


def test_from_dict_round_trips_and_rejects_unknown_keys() -> None:
    cfg = tiny(num_shared_experts=1, capacity_factor=1.25)
    assert ModelConfig.from_dict(dataclasses.asdict(cfg)) == cfg
    with pytest.raises(ValueError, match="model.moe.topk is not a known key"):
        ModelConfig.from_dict({"moe": {"topk": 2}})
    with pytest.raises(ValueError, match="model.dmodel is not a known key"):
        ModelConfig.from_dict({"dmodel": 2})


SIZE_CASES = {
    "moe_every_layer": tiny(),
    "moe_every_2nd_shared_finegrained": tiny(moe_every=2, num_experts=8, top_k=3, expert_hidden=8,
                                            num_shared_experts=2, shared_expert_hidden=12),
    "dense": tiny(moe_every=0),
    "untied_bias_balanced": dataclasses.replace(tiny(bias_update_rate=1e-3), tie_embeddings=False),
}


@pytest.mark.parametrize("cfg", SIZE_CASES.values(), ids=SIZE_CASES.keys())
def test_parameter_counts_match_the_built_model(cfg: ModelConfig) -> None:
    model = MoETransformer(cfg)
    total = sum(p.numel() for p in model.parameters())
    assert cfg.num_params == total
    expert = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    m = cfg.moe
    active = total - expert + (expert * m.top_k // m.num_experts if m.num_experts else 0)
    assert cfg.num_active_params == active
    # The canonical layout holds exactly the parameters (+ the balancing bias buffer).
    canon = model.canonical_state_dict()
    buffers = sum(t.numel() for k, t in canon.items() if k.endswith("balance_bias"))
    assert sum(t.numel() for t in canon.values()) - buffers == total


FLOP_CASES = {k: SIZE_CASES[k] for k in ("moe_every_2nd_shared_finegrained", "untied_bias_balanced")}


@pytest.mark.parametrize("cfg", FLOP_CASES.values(), ids=FLOP_CASES.keys())
def test_flops_per_token_matches_counted_matmuls(cfg: ModelConfig) -> None:
    """FlopCounterMode counts every matmul of forward + backward (experts run as per-expert
    matmuls here so it sees them); SDPA is not counted on CPU, so its term is checked apart."""
    torch.manual_seed(0)
    model = MoETransformer(cfg)
    for _, layer in model.moe_layers():
        layer.experts.use_grouped_mm = False
    B, T = 2, cfg.seq_len
    idx = torch.randint(0, cfg.vocab_size, (B, T))
    with FlopCounterMode(display=False) as counter:
        _, loss = model(idx, idx)
        loss.backward()
    attention = 12 * cfg.n_layers * cfg.d_model * cfg.seq_len
    assert counter.get_total_flops() == (cfg.flops_per_token - attention) * B * T
