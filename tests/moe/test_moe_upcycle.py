"""moe.upcycle: a dense export upcycled to MoE computes the same logits and loss at step 0
(both backends, top_k 2 and 4, every block or every other block), its sizes grow as
expected, and inputs that would break the equality are refused in one sentence."""

from __future__ import annotations

import json

import pytest
import torch
from moe.export import load_export_state

from moe import ModelConfig, MoEConfig, MoETransformer, load_export, save_export
from moe.upcycle import upcycle_export, upcycle_state

FD = 48  # dense ffn_hidden = expert_hidden


def dense_config() -> ModelConfig:
    # init_std 0.1: the feed-forward then moves the logits visibly, so equality means something.
    return ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, seq_len=16, ffn_hidden=FD,
                       init_std=0.1, moe=MoEConfig(moe_every=0))


def moe_config(**kw) -> MoEConfig:
    return MoEConfig(**{"num_experts": 4, "top_k": 2, "expert_hidden": FD, "moe_every": 1, **kw})


@pytest.fixture(scope="module")
def dense_export(tmp_path_factory) -> tuple:
    torch.manual_seed(0)
    model = MoETransformer(dense_config()).eval()
    out = tmp_path_factory.mktemp("dense")
    (out / "tok.json").write_text("{}")
    save_export(model, out, tokenizer_file=out / "tok.json")
    return model, out


def idx() -> torch.Tensor:
    return torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))


def lm_loss_and_logits(model: MoETransformer) -> tuple[float, torch.Tensor]:
    with torch.no_grad():
        logits, _ = model(idx(), idx().roll(-1, 1))
    return model.loss_breakdown["lm"].item(), logits


@pytest.mark.parametrize("backend, top_k, moe_every", [
    ("native", 2, 1), ("native", 4, 2), ("deepspeed", 2, 1), ("deepspeed", 4, 2),
])
def test_upcycled_model_equals_dense_model_at_step_0(dense_export, tmp_path, backend, top_k, moe_every) -> None:
    dense, src = dense_export
    moe = moe_config(top_k=top_k, moe_every=moe_every, backend=backend)
    out = upcycle_export(src, tmp_path / "up", moe, seed=3)
    model = load_export(out, backend=backend)
    assert [i for i, _ in model.moe_layers()] == [i for i in range(2) if (i + 1) % moe_every == 0]
    dense_loss, dense_logits = lm_loss_and_logits(dense)
    loss, logits = lm_loss_and_logits(model)
    assert loss == pytest.approx(dense_loss, abs=1e-5)
    torch.testing.assert_close(logits, dense_logits, atol=1e-5, rtol=0)
    assert (out / "tokenizer.json").read_text() == "{}"


def test_experts_are_copies_router_is_seeded_and_bias_starts_at_zero(dense_export, tmp_path) -> None:
    _, src = dense_export
    dense_sd = load_export_state(src)[0]
    moe = moe_config(bias_update_rate=0.01)
    sd, config = upcycle_state(dense_sd, dense_config(), moe, seed=7)
    for e in range(4):  # copies; w2 carries 1/routed_scale, which the layer multiplies back
        assert torch.equal(sd["layers.1.ffn.experts.w1"][e], dense_sd["layers.1.ffn.w1.weight"])
        assert torch.equal(sd["layers.1.ffn.experts.w2"][e],
                           dense_sd["layers.1.ffn.w2.weight"] / moe.routed_output_scale)
    assert "layers.1.ffn.w1.weight" not in sd
    assert torch.equal(sd["layers.0.ffn.router.balance_bias"], torch.zeros(4))
    router = sd["layers.0.ffn.router.weight"]
    assert router.std().item() == pytest.approx(0.1, rel=0.3)
    assert torch.equal(upcycle_state(dense_sd, dense_config(), moe, seed=7)[0]["layers.0.ffn.router.weight"], router)
    assert not torch.equal(upcycle_state(dense_sd, dense_config(), moe, seed=8)[0]["layers.0.ffn.router.weight"],
                           router)
    # Bias balancing is native-only; the upcycled export loads and still equals the dense model.
    model = MoETransformer(config).eval()
    model.load_canonical_state_dict(sd)
    torch.testing.assert_close(lm_loss_and_logits(model)[1], lm_loss_and_logits(dense_export[0])[1],
                               atol=1e-5, rtol=0)


@pytest.mark.parametrize("moe_every, moe_layers", [(1, 2), (2, 1)])
def test_num_params_grow_by_the_new_experts_and_routers(dense_export, tmp_path, moe_every, moe_layers) -> None:
    _, src = dense_export
    out = upcycle_export(src, tmp_path / "up", moe_config(moe_every=moe_every), seed=0)
    config = ModelConfig.from_dict(json.loads((out / "config.json").read_text())["moe_platform"]["model"])
    D, E = 32, 4
    grown = moe_layers * ((E - 1) * 3 * D * FD + E * D)
    assert config.num_params == dense_config().num_params + grown
    assert sum(p.numel() for p in load_export(out).parameters()) == config.num_params


@pytest.mark.parametrize("dense, moe, message", [
    (dict(moe=MoEConfig(moe_every=1, expert_hidden=FD)), {}, "needs a dense model, but its model.moe.moe_every=1"),
    ({}, dict(moe_every=0), "model.moe.moe_every=0 would upcycle no block"),
    ({}, dict(expert_hidden=32), "model.moe.expert_hidden=32 must equal the dense model.ffn_hidden=48"),
    ({}, dict(num_shared_experts=1), "model.moe.num_shared_experts=1 is not supported by upcycling"),
    ({}, dict(top_k=1), "model.moe.top_k=1 cannot be upcycled exactly"),
    ({}, dict(renormalize=False), "model.moe.renormalize=false cannot be upcycled exactly"),
    ({}, dict(capacity_factor=1.25), "model.moe.capacity_factor=1.25 would drop tokens"),
    ({}, dict(router="expert_choice", capacity_factor=1.0), "model.moe.router=expert_choice cannot be upcycled"),
])
def test_inputs_that_break_equality_are_refused_in_one_sentence(dense, moe, message) -> None:
    config = ModelConfig(**{**dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, seq_len=16, ffn_hidden=FD,
                                   moe=MoEConfig(moe_every=0)), **dense})
    with pytest.raises(ValueError, match=message):
        upcycle_state({}, config, moe_config(**moe), seed=0)


def test_an_incomplete_dense_state_dict_is_refused() -> None:
    with pytest.raises(ValueError, match="the dense state dict lacks"):
        upcycle_state({}, dense_config(), moe_config(), seed=0)
