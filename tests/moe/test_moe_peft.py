"""moe.peft: LoRA adapters (both backends), freeze modes, adapter files and merging, and a
2-process gloo run (EP=2, ZeRO-1, real deepspeed.initialize) that trains adapters, restores
them from a DeepSpeed checkpoint and exports the same merged model as an offline merge."""

from __future__ import annotations

from functools import partial

import json
from pathlib import Path

import pytest
import torch
from moe.export import load_export_state

from testkit.models import tiny_model

from moe import (ModelConfig, MoETransformer, PeftConfig, adapter_state_dict, apply_peft, load_adapter,
                 load_export, merge_adapter, optimizer_param_groups, save_adapter, save_export)
from moe.testing import run_distributed_test

ALL_TARGETS = ["attention", "experts", "shared", "dense_ffn", "lm_head"]


# Block 0 dense, block 1 MoE with a shared expert; untied lm_head (so every target exists).
tiny = partial(tiny_model, n_heads=4, seq_len=16, ffn_hidden=48, tie_embeddings=False, expert_hidden=16,
               num_shared_experts=1, moe_every=2)


def build(config: ModelConfig, seed: int = 0, ep: int = 1) -> MoETransformer:
    torch.manual_seed(seed)
    return MoETransformer(config, expert_parallel_size=ep)


def tokens(B: int = 4, T: int = 16) -> torch.Tensor:
    return torch.randint(0, 64, (B, T), generator=torch.Generator().manual_seed(1))


def train(model: MoETransformer, steps: int = 4) -> list[float]:
    """A few AdamW steps on a copy task (target = input token): learnable in a handful of steps."""
    optimizer = torch.optim.AdamW(optimizer_param_groups(model), lr=1e-2)
    idx, losses = tokens(), []
    for _ in range(steps):
        _, loss = model(idx, idx)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def logits(model: MoETransformer) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens())[0]


# -- config ------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, message", [
    (dict(lora_rank=-1), "peft.lora_rank=-1 must not be negative"),
    (dict(lora_alpha=0.0), "peft.lora_alpha=0.0 must be positive"),
    (dict(lora_targets=["mlp"]), "peft.lora_targets has 'mlp', which is not one of"),
    (dict(lora_targets="attention"), "peft.lora_targets='attention' must be a list"),
    (dict(lora_targets=["experts", "experts"]), "peft.lora_targets=.* lists a target twice"),
    (dict(lora_rank=4, lora_targets=[]), "peft.lora_targets is empty"),
    (dict(freeze="all"), "peft.freeze='all' is not one of none, router_only, experts, top_layers"),
    (dict(trainable_top_layers=0), "peft.trainable_top_layers=0 must be at least 1"),
    (dict(lora_rank=4, freeze="experts"), "peft.freeze=experts cannot be combined with peft.lora_rank=4"),
])
def test_bad_config_is_one_sentence_naming_the_key(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PeftConfig(**kwargs)


def test_enabled() -> None:
    assert not PeftConfig().enabled
    assert PeftConfig(lora_rank=2).enabled and PeftConfig(freeze="router_only").enabled
    assert PeftConfig(lora_rank=4, lora_alpha=8.0).lora_scale == 2.0


def test_zero_stage_check_names_the_stages_deepspeed_zero_cannot_run() -> None:
    model = tiny()  # block 1 (the top block) is MoE
    for peft in (PeftConfig(lora_rank=2), PeftConfig(freeze="top_layers"), PeftConfig()):
        peft.check_zero_stage(model, 2)
    for peft in (PeftConfig(freeze="router_only"), PeftConfig(lora_rank=2, lora_targets=["attention"])):
        peft.check_zero_stage(model, 0)
        with pytest.raises(ValueError, match="trains no routed-expert weight, which DeepSpeed ZeRO stage 1"):
            peft.check_zero_stage(model, 1)
    PeftConfig(freeze="experts").check_zero_stage(tiny(n_layers=1), 1)  # a dense model: no MoE group needed


@pytest.mark.parametrize("config, peft, message", [
    (tiny(tie_embeddings=True), PeftConfig(lora_rank=2, lora_targets=["lm_head"]),
     "peft.lora_targets=lm_head needs model.tie_embeddings=false"),
    (tiny(n_layers=1), PeftConfig(lora_rank=2, lora_targets=["experts"]),
     "peft.lora_targets=experts matches no weight of this model"),
    (tiny(), PeftConfig(freeze="top_layers", trainable_top_layers=3),
     "peft.trainable_top_layers=3 is more than model.n_layers=2"),
])
def test_config_that_does_not_fit_the_model_is_refused(config: ModelConfig, peft: PeftConfig, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        apply_peft(build(config), peft)


def test_peft_applies_once_and_canonical_loads_go_before_it() -> None:
    model = build(tiny())
    base = model.canonical_state_dict()
    apply_peft(model, PeftConfig(lora_rank=2))
    with pytest.raises(ValueError, match="already called"):
        apply_peft(model, PeftConfig(lora_rank=2))
    with pytest.raises(ValueError, match="load the base weights before apply_peft"):
        model.load_canonical_state_dict(base)


# -- freeze modes --------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["native", "deepspeed"])
@pytest.mark.parametrize("freeze, trainable", [
    ("router_only", lambda name: "router" in name or "gate.wg" in name),
    ("experts", lambda name: "ffn.experts" not in name or "gate.wg" in name),
    ("top_layers", lambda name: name.startswith("layers.1.") or name == "norm.weight"),
])
def test_freeze_mode_leaves_exactly_the_intended_params_trainable(backend: str, freeze: str, trainable) -> None:
    model = build(tiny(backend=backend))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    counts = apply_peft(model, PeftConfig(freeze=freeze))
    intended = {n for n in before if trainable(n)}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == intended
    assert 0 < counts["trainable"] < counts["total"] == sum(p.numel() for p in model.parameters())
    train(model, steps=2)
    after = dict(model.named_parameters())
    assert {n for n in before if not torch.equal(before[n], after[n])} == intended


# -- LoRA ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["native", "deepspeed"])
def test_lora_at_init_leaves_the_model_unchanged(backend: str) -> None:
    model = build(tiny(backend=backend))
    expected, canonical = logits(model), model.canonical_state_dict()
    counts = apply_peft(model, PeftConfig(lora_rank=4, lora_targets=ALL_TARGETS))
    torch.testing.assert_close(logits(model), expected, atol=0, rtol=0)
    after = model.canonical_state_dict()
    assert set(after) == set(canonical) and all(torch.equal(after[k], canonical[k]) for k in canonical)
    # R * (I + O) per adapted matrix: attention 4 * 2 * 32, dense 3 * (32 + 48), experts and shared 3 * (32 + 16) each
    # (4 experts), lm_head (32 + 64).
    per_rank = 4 * (2 * 4 * 2 * 32 + 3 * 80 + 4 * 3 * 48 + 3 * 48 + 96)
    assert counts["trainable"] == per_rank


@pytest.mark.parametrize("backend", ["native", "deepspeed"])
def test_lora_trains_only_the_adapters(backend: str) -> None:
    model = build(tiny(backend=backend))
    apply_peft(model, PeftConfig(lora_rank=4, lora_targets=ALL_TARGETS))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    losses = train(model, steps=5)
    assert losses[-1] < losses[0] - 0.1
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.endswith(("lora_A", "lora_B")) for k in changed)
    assert all(p.requires_grad == n.endswith(("lora_A", "lora_B")) for n, p in model.named_parameters())


def test_adapters_use_canonical_names_and_the_native_state_dict_deepspeed_expert_keys() -> None:
    model = build(tiny())
    torch.manual_seed(3)  # building the modules consumes the RNG differently per backend
    apply_peft(model, PeftConfig(lora_rank=4, lora_targets=ALL_TARGETS))
    adapters = adapter_state_dict(model)
    assert adapters["layers.0.attn.wq.weight.lora_A"].shape == (4, 32)
    assert adapters["layers.0.ffn.w1.weight.lora_B"].shape == (48, 4)
    assert adapters["layers.1.ffn.experts.w1.lora_A"].shape == (4, 4, 32)  # (E, R, I)
    assert adapters["layers.1.ffn.experts.w2.lora_B"].shape == (4, 32, 4)  # (E, O, R)
    assert adapters["layers.1.ffn.shared.w3.weight.lora_A"].shape == (4, 32)
    assert adapters["lm_head.weight.lora_B"].shape == (64, 4)
    sd = model.state_dict()
    prefix = "layers.1.ffn.experts.deepspeed_moe.experts.deepspeed_experts."
    assert sd[prefix + "3.w2.weight"].shape == (32, 16) and sd[prefix + "3.w2.lora_A"].shape == (4, 16)
    # the same seed gives the same adapters on the deepspeed backend
    other = build(tiny(backend="deepspeed"))
    torch.manual_seed(3)
    apply_peft(other, PeftConfig(lora_rank=4, lora_targets=ALL_TARGETS))
    assert all(torch.equal(v, adapter_state_dict(other)[k]) for k, v in adapters.items())


@pytest.mark.parametrize("backend", ["native", "deepspeed"])
def test_merged_export_adapter_files_and_state_dict_agree(backend: str, tmp_path: Path) -> None:
    config, peft = tiny(backend=backend), PeftConfig(lora_rank=4, lora_alpha=8.0, lora_targets=["attention", "experts"])
    model = build(config)
    save_export(model, tmp_path / "base")
    apply_peft(model, peft)
    train(model, steps=3)
    expected = logits(model)
    # 1. save_export writes the merged weights; merge_adapter computes them offline from the files.
    save_export(model, tmp_path / "trained")
    save_adapter(model, tmp_path / "adapter", peft, base_export_dir=tmp_path / "base")
    merge_adapter(None, tmp_path / "adapter", tmp_path / "merged")  # the base export recorded in the adapter
    trained, merged = (load_export_state(tmp_path / d)[0] for d in ("trained", "merged"))
    assert set(trained) == set(merged)
    for key in trained:
        torch.testing.assert_close(merged[key], trained[key], atol=1e-6, rtol=1e-6, msg=key)
    base = load_export_state(tmp_path / "base")[0]
    assert not torch.equal(merged["layers.1.ffn.experts.w2"], base["layers.1.ffn.experts.w2"])
    assert torch.equal(merged["layers.1.ffn.router.weight"], base["layers.1.ffn.router.weight"])
    for loaded in (load_export(tmp_path / "merged"), load_export(tmp_path / "trained", backend="native")):
        torch.testing.assert_close(logits(loaded), expected, atol=1e-5, rtol=1e-5)
    # 2. load_adapter on the base export gives the trained model back.
    fresh = load_export(tmp_path / "base").train()
    apply_peft(fresh, peft)
    load_adapter(fresh, tmp_path / "adapter")
    torch.testing.assert_close(logits(fresh), expected, atol=1e-6, rtol=1e-6)
    # 3. the model's own state_dict (what DeepSpeed checkpoints hold) round-trips the adapters.
    other = build(config, seed=7)
    apply_peft(other, peft)
    other.load_state_dict(model.state_dict())
    torch.testing.assert_close(logits(other), expected, atol=0, rtol=0)


def test_load_adapter_refuses_another_config(tmp_path: Path) -> None:
    model = build(tiny())
    apply_peft(model, PeftConfig(lora_rank=4))
    save_adapter(model, tmp_path / "adapter", PeftConfig(lora_rank=4))
    other = build(tiny())
    apply_peft(other, PeftConfig(lora_rank=2))
    with pytest.raises(ValueError, match="was made with .*'lora_rank': 4"):
        load_adapter(other, tmp_path / "adapter")
    with pytest.raises(ValueError, match="this model has no LoRA adapters"):
        load_adapter(build(tiny()), tmp_path / "adapter")
    save_export(build(tiny(d_model=16, n_heads=2)), tmp_path / "narrow")
    with pytest.raises(ValueError, match=r"layers.0.attn.w.\.weight has shape \(32, 32\); the base export.s is"):
        merge_adapter(tmp_path / "narrow", tmp_path / "adapter", tmp_path / "merged")


# -- 2 processes: EP=2, ZeRO-1, a real DeepSpeed engine --------------------------------------------

DIST_PEFT = PeftConfig(lora_rank=4, lora_targets=["attention", "experts", "shared", "lm_head"])
DS_CONFIG = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
             "zero_optimization": {"stage": 1}, "zero_allow_untested_optimizer": True}


def _engine(model: MoETransformer, zero_stage: int = 1):
    import deepspeed

    optimizer = torch.optim.AdamW(optimizer_param_groups(model), lr=1e-2)
    config = {**DS_CONFIG, "zero_optimization": {"stage": zero_stage}}
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return engine


def _lora_run(backend: str, out: Path, rank: int) -> dict:
    """Train adapters at EP=2, write the adapter, the merged export and a DeepSpeed checkpoint,
    and restore that checkpoint into a fresh engine (optimizer state included)."""
    model = build(tiny(backend=backend), ep=2)
    save_export(model, out / "base")
    torch.manual_seed(3)
    apply_peft(model, DIST_PEFT)
    initial = {k: v.clone() for k, v in adapter_state_dict(model).items()}  # replicated ones are views
    engine = _engine(model)
    batch = tokens()[2 * rank:2 * rank + 2]
    losses = []
    for _ in range(4):
        _, loss = engine(batch, batch)  # the copy task of train()
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    save_adapter(model, out / "adapter", DIST_PEFT, base_export_dir=out / "base")
    save_export(model, out / "merged_ep2")
    engine.save_checkpoint(str(out / "ckpt"), tag="t")
    fresh = build(tiny(backend=backend), seed=9, ep=2)
    torch.manual_seed(4)
    apply_peft(fresh, DIST_PEFT)
    _engine(fresh).load_checkpoint(str(out / "ckpt"), tag="t")
    trained, restored = adapter_state_dict(model), adapter_state_dict(fresh)
    restored_merged = fresh.canonical_state_dict()
    if rank != 0:
        return {}
    torch.save(initial, out / "initial_adapters.pt")
    base, merged = (load_export_state(out / d)[0] for d in ("base", "merged_ep2"))
    return {"losses": losses,
            "adapters_restored": all(torch.equal(trained[k], restored[k]) for k in trained),
            "merged_restored": all(torch.equal(restored_merged[k], merged[k]) for k in merged),
            "experts_adapted": not torch.equal(base["layers.1.ffn.experts.w1"], merged["layers.1.ffn.experts.w1"]),
            "expert_files": len([f for f in (out / "ckpt" / "t").iterdir() if "expert" in f.name])}


def _router_only_under_zero0(rank: int) -> bool:
    """What check_zero_stage recommends works: ZeRO stage 0 trains the routers alone."""
    model = build(tiny(), ep=2)
    apply_peft(model, PeftConfig(freeze="router_only"))
    before = {k: v.clone() for k, v in model.canonical_state_dict().items()}
    engine = _engine(model, zero_stage=0)
    batch = tokens()[2 * rank:2 * rank + 2]
    _, loss = engine(batch, batch)
    engine.backward(loss)
    engine.step()
    after = model.canonical_state_dict()
    return {k for k in before if not torch.equal(before[k], after[k])} == {"layers.1.ffn.router.weight"}


def _dist_worker(out_dir: str) -> None:
    import torch.distributed as dist

    rank = dist.get_rank()
    results = {backend: _lora_run(backend, Path(out_dir) / backend, rank) for backend in ("native", "deepspeed")}
    router_only = _router_only_under_zero0(rank)
    if rank == 0:
        (Path(out_dir) / "result.json").write_text(json.dumps({**results, "router_only_zero0": router_only}))


@pytest.fixture(scope="module")
def dist_run(deepspeed_ops, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("peft_dist")
    run_distributed_test(_dist_worker, str(out), world_size=2)
    return out


@pytest.mark.parametrize("backend", ["native", "deepspeed"])
def test_expert_parallel_lora_trains_and_restores_from_a_deepspeed_checkpoint(dist_run: Path, backend: str) -> None:
    result = json.loads((dist_run / "result.json").read_text())[backend]
    assert result["losses"][-1] < result["losses"][0]
    assert result["adapters_restored"] and result["merged_restored"] and result["experts_adapted"]
    assert result["expert_files"] == 4  # one per global expert of the one MoE layer, adapters inside


def test_zero_stage_0_trains_the_router_alone_at_ep2(dist_run: Path) -> None:
    assert json.loads((dist_run / "result.json").read_text())["router_only_zero0"]


@pytest.mark.parametrize("backend", ["native", "deepspeed"])
def test_expert_parallel_export_equals_the_offline_merge(dist_run: Path, backend: str, tmp_path: Path) -> None:
    run = dist_run / backend
    merge_adapter(run / "base", run / "adapter", tmp_path / "merged")
    ep2, offline = (load_export_state(d)[0] for d in (run / "merged_ep2", tmp_path / "merged"))
    assert set(ep2) == set(offline)
    for key in ep2:
        torch.testing.assert_close(offline[key], ep2[key], atol=1e-6, rtol=1e-6, msg=key)
    torch.testing.assert_close(logits(load_export(tmp_path / "merged")), logits(load_export(run / "merged_ep2")),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["native", "deepspeed"])
def test_adapter_initialisation_does_not_depend_on_the_expert_parallel_size(dist_run: Path, backend: str) -> None:
    model = build(tiny(backend=backend))
    torch.manual_seed(3)
    apply_peft(model, DIST_PEFT)
    initial = torch.load(dist_run / backend / "initial_adapters.pt")
    assert set(initial) == set(adapter_state_dict(model))
    assert all(torch.equal(v, initial[k]) for k, v in adapter_state_dict(model).items())
