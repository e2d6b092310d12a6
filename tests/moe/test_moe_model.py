"""MoETransformer: forward/loss, backend equivalence, routing stats, bias balancing,
generation (KV cache, padding, sampling, streaming), expert choice, exports."""

from __future__ import annotations

from functools import partial

import dataclasses
import json
import warnings

import pytest
import torch
import torch.nn.functional as F

from testkit.models import tiny_model

from moe import ModelConfig, MoETransformer, load_export, save_export
from moe.experts import swiglu_experts


tiny = partial(tiny_model, n_heads=4, seq_len=24, ffn_hidden=48, expert_hidden=16)


def build(cfg: ModelConfig, seed: int = 0) -> MoETransformer:
    torch.manual_seed(seed)
    return MoETransformer(cfg)


def tokens(B: int, T: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 64, (B, T), generator=torch.Generator().manual_seed(seed))


# -- forward and loss ---------------------------------------------------------------------------

def test_forward_shapes_and_loss_breakdown() -> None:
    model = build(tiny(num_shared_experts=1))
    idx = tokens(2, 24)
    logits, loss = model(idx)
    assert logits.shape == (2, 24, 64) and loss is None
    logits, loss = model(idx, idx)
    b = model.loss_breakdown
    assert set(b) == {"lm", "balance", "z"}
    c = model.config
    assert loss.item() == pytest.approx((b["lm"] + c.balance_loss_coef * b["balance"] + c.moe.z_loss_coef * b["z"]).item())
    assert b["lm"].item() == pytest.approx(F.cross_entropy(logits.flatten(0, 1), idx.flatten()).item(), rel=1e-5)
    with pytest.raises(ValueError, match="longer than model.seq_len=24"):
        model(tokens(1, 25))


def test_loss_mask_and_ignore_index_select_counted_positions() -> None:
    model = build(tiny())
    idx = tokens(2, 12)
    targets = idx.roll(-1, 1)
    mask = torch.zeros(2, 12, dtype=torch.bool)
    mask[:, 6:] = True
    logits, _ = model(idx, targets, mask)
    expected = F.cross_entropy(logits[:, 6:].flatten(0, 1), targets[:, 6:].flatten())
    assert model.loss_breakdown["lm"].item() == pytest.approx(expected.item(), rel=1e-5)
    ignored = targets.masked_fill(~mask, -100)
    model(idx, ignored)
    assert model.loss_breakdown["lm"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_dense_model_has_zero_router_losses() -> None:
    model = build(tiny(moe_every=0))
    _, loss = model(tokens(1, 8), tokens(1, 8))
    assert model.loss_breakdown["balance"].item() == 0 and model.loss_breakdown["z"].item() == 0
    assert model.moe_layers() == []


# -- the two backends compute the same function -------------------------------------------------

@pytest.mark.parametrize("moe", [
    dict(top_k=2),
    dict(top_k=1),
    dict(top_k=3, num_shared_experts=1, expert_hidden=8),  # DeepSpeed's generic top-k gate, fine-grained
    dict(top_k=2, capacity_factor=4.0),  # a capacity large enough that nothing drops
    dict(top_k=2, expert_hidden=64),  # F > D: native weights its rows in the combine, not before w2
], ids=["k2", "k1", "k3_shared", "k2_roomy_capacity", "k2_wide_experts"])
def test_backends_give_same_outputs_and_gradients(moe: dict) -> None:
    native = build(tiny(backend="native", bias_update_rate=0.0, **moe))  # DeepSpeed's gate has no bias
    ds = MoETransformer(tiny(backend="deepspeed", **moe))
    ds.load_canonical_state_dict(native.canonical_state_dict())
    idx = tokens(2, 24)
    ln, loss_n = native(idx, idx)
    ld, loss_d = ds(idx, idx)
    torch.testing.assert_close(ld, ln, atol=1e-5, rtol=1e-5)
    for key in ("lm", "balance", "z"):
        torch.testing.assert_close(ds.loss_breakdown[key], native.loss_breakdown[key], atol=1e-6, rtol=1e-5)
    loss_n.backward()
    loss_d.backward()
    gn, gd = native.canonical_state_dict(grads=True), ds.canonical_state_dict(grads=True)
    assert set(gn) == set(gd)
    for key in gn:
        torch.testing.assert_close(gd[key], gn[key], atol=1e-6, rtol=1e-4, msg=key)


def test_grouped_mm_and_per_expert_loop_agree() -> None:
    g = torch.Generator().manual_seed(0)
    w1, w3, w2 = torch.randn(3, 8, 4, generator=g), torch.randn(3, 8, 4, generator=g), torch.randn(3, 4, 8, generator=g)
    x = torch.randn(7, 4, generator=g)
    counts = torch.tensor([3, 0, 4])  # an empty expert too
    loop = swiglu_experts(x, w1, w2, w3, counts, use_grouped_mm=False)
    if hasattr(torch, "_grouped_mm"):
        torch.testing.assert_close(swiglu_experts(x, w1, w2, w3, counts, use_grouped_mm=True), loop)
    manual = torch.cat([F.silu(x[:3] @ w1[0].T) * (x[:3] @ w3[0].T) @ w2[0].T,
                        F.silu(x[3:] @ w1[2].T) * (x[3:] @ w3[2].T) @ w2[2].T])
    torch.testing.assert_close(loop, manual)


def test_canonical_state_round_trip_and_same_seed_same_model() -> None:
    a, b = build(tiny(bias_update_rate=0.0)), build(tiny(backend="deepspeed"))
    sa, sb = a.canonical_state_dict(), b.canonical_state_dict()
    assert set(sa) == set(sb)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)  # a seed gives one model for every backend
    assert sa["layers.0.ffn.experts.w1"].shape == (4, 16, 32)
    assert sa["layers.0.ffn.experts.w2"].shape == (4, 32, 16)
    c = build(tiny(bias_update_rate=0.0), seed=5)
    c.load_canonical_state_dict(sa)
    assert all(torch.equal(c.canonical_state_dict()[k], sa[k]) for k in sa)
    with pytest.raises(ValueError, match="does not match the model config"):
        c.load_canonical_state_dict({k: v for k, v in sa.items() if k != "norm.weight"})


def test_native_state_dict_uses_deepspeed_per_expert_keys() -> None:
    model = build(tiny())
    sd = model.state_dict()
    assert "layers.0.ffn.experts.deepspeed_moe.experts.deepspeed_experts.3.w2.weight" in sd
    assert not any(k.endswith("experts.w1") for k in sd)
    other = build(tiny(), seed=9)
    other.load_state_dict(sd)
    torch.testing.assert_close(other.layers[0].ffn.experts.w1, model.layers[0].ffn.experts.w1)
    for p in (model.layers[0].ffn.experts.w1, model.layers[0].ffn.experts.w2):
        assert p.allreduce is False and p.group_name == "ep_size_1"


# -- routing statistics, capacity, bias balancing ------------------------------------------------

def test_routing_stats_only_on_request() -> None:
    model = build(tiny(capacity_factor=0.5))
    model(tokens(2, 16))
    assert model.routing_stats() == []
    model.set_routing_stats(True)
    model(tokens(2, 16))
    stats = model.routing_stats()
    assert [s["layer"] for s in stats] == [0, 1]
    for s in stats:
        assert set(s) == {"layer", "tokens_per_expert", "dropped_fraction", "router_entropy", "max_over_mean_load"}
        assert int(s["tokens_per_expert"].sum()) == 2 * 16 * 2
        assert 0 < s["dropped_fraction"] < 1  # capacity 0.5 must drop
        assert s["max_over_mean_load"] >= 1
    model.set_routing_stats(False)
    model(tokens(2, 16))
    assert model.routing_stats() == []


def test_update_router_bias_after_a_step_changes_selection_bias_only() -> None:
    model = build(tiny(bias_update_rate=0.05))
    _, loss = model(tokens(2, 16), tokens(2, 16))
    loss.backward()
    model.update_router_bias()
    bias = model.canonical_state_dict()["layers.0.ffn.router.balance_bias"]
    assert bias.abs().sum() > 0
    assert all(b == 0 or b == pytest.approx(0.05) for b in bias.abs().tolist())
    assert not any("balance_bias" in n for n, _ in model.named_parameters())  # never trained by SGD


# -- generation ---------------------------------------------------------------------------------

def naive_greedy(model: MoETransformer, prompt: list[int], n: int) -> list[int]:
    """Full forward (no cache) for every new token."""
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            logits, _ = model(torch.tensor([seq]))
            seq.append(int(logits[0, -1].argmax()))
    return seq[len(prompt):]


PROMPTS = [[5, 9, 2, 33, 7, 1, 60], [11], [3, 3, 40, 22]]


@pytest.mark.parametrize("backend", ["native", "deepspeed"])
def test_greedy_with_cache_equals_without_and_batched_equals_alone(backend: str) -> None:
    model = build(tiny(backend=backend, init_std=0.2, num_shared_experts=1)).eval()
    batched = model.generate(PROMPTS, max_new_tokens=8, temperature=0)
    for prompt, out in zip(PROMPTS, batched):
        assert out == naive_greedy(model, prompt, 8)
        assert model.generate([prompt], max_new_tokens=8, temperature=0) == [out]
    assert len({tuple(o) for o in batched}) > 1  # not a degenerate model


def test_streaming_yields_the_same_tokens_and_stops_at_eos() -> None:
    model = build(tiny(init_std=0.2))
    expected = model.generate(PROMPTS, max_new_tokens=6, temperature=0)
    streamed: list[list[int]] = [[] for _ in PROMPTS]
    for step in model.generate_stream(PROMPTS, max_new_tokens=6, temperature=0):
        for b, t in step.items():
            streamed[b].append(t)
    assert streamed == expected
    eos = expected[0][2]
    out = model.generate(PROMPTS, max_new_tokens=6, temperature=0, eos_token_id=eos)
    assert out[0] == expected[0][:expected[0].index(eos) + 1]
    for o, e in zip(out[1:], expected[1:]):  # the others run on (or stop at their own eos)
        assert o == (e[:e.index(eos) + 1] if eos in e else e)


def test_sampling_is_reproducible_and_filters_work() -> None:
    model = build(tiny(init_std=0.2))
    greedy = model.generate(PROMPTS, max_new_tokens=6, temperature=0)
    sample = lambda seed, **kw: model.generate(  # noqa: E731
        PROMPTS, max_new_tokens=6, temperature=1.0, generator=torch.Generator().manual_seed(seed), **kw)
    assert sample(0) == sample(0)
    assert sample(0, top_k=1) == greedy  # top_k=1 keeps only the argmax
    assert sample(0, top_p=1e-6) == greedy  # so does a tiny nucleus
    assert model.training  # generate() restores the mode


def test_generation_errors_are_clear() -> None:
    model = build(tiny())
    with pytest.raises(ValueError, match=r"a prompt of 20 tokens \+ max_new_tokens=5 exceeds .*model.seq_len=24"):
        model.generate([[1] * 20], max_new_tokens=5)
    with pytest.raises(ValueError, match="every prompt needs at least one token"):
        model.generate([[1], []])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model.generate([[64]], max_new_tokens=1)
    with pytest.raises(ValueError, match="top_p=0 must be in"):
        model.generate([[1]], max_new_tokens=1, top_p=0)


def test_generation_is_dropless_even_with_a_capacity() -> None:
    model = build(tiny(init_std=0.2, capacity_factor=0.25))
    batched = model.generate(PROMPTS, max_new_tokens=5, temperature=0)
    assert [model.generate([p], max_new_tokens=5, temperature=0)[0] for p in PROMPTS] == batched


def test_expert_choice_is_not_causal_and_generation_says_so() -> None:
    model = build(tiny(router="expert_choice", capacity_factor=1.0, init_std=0.2)).eval()
    idx = tokens(1, 16)
    full, _ = model(idx)
    prefix, _ = model(idx[:, :8])
    # The future changes which tokens the experts pick: earlier logits move (documented).
    assert not torch.allclose(full[:, :8], prefix, atol=1e-4)
    with pytest.warns(UserWarning, match="expert_choice is not causal"):
        out = model.generate(PROMPTS, max_new_tokens=4, temperature=0)
    assert [len(o) for o in out] == [4, 4, 4]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once per model, not every call
        model.generate(PROMPTS, max_new_tokens=2, temperature=0)


# -- export --------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["native", "deepspeed"])
def test_export_round_trip_without_pickle(tmp_path, backend: str) -> None:
    model = build(tiny(backend=backend, num_shared_experts=1, bias_update_rate=0.0)).eval()
    tok = tmp_path / "tok.json"
    tok.write_text('{"version": "1.0"}')
    out = save_export(model, tmp_path / "export", tokenizer_file=tok)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors",
                                                     "tokenizer.json", "tokenizer_config.json"]
    assert json.loads((out / "config.json").read_text())["moe_platform"]["model"]["moe"]["backend"] == backend
    idx = tokens(2, 10)
    expected, _ = model(idx)
    for load_backend in (None, "native", "deepspeed"):
        loaded = load_export(out, backend=load_backend)
        assert not loaded.training
        logits, _ = loaded(idx)
        torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)


def test_load_export_rejects_a_wrong_format_version(tmp_path) -> None:
    out = save_export(build(tiny()), tmp_path / "e")
    cfg = json.loads((out / "config.json").read_text())
    cfg["moe_platform"]["format_version"] = 99
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="format_version=99"):
        load_export(out)


def test_a_format_1_export_still_loads_and_an_unknown_old_version_is_refused(tmp_path) -> None:
    """Before exports were Hugging Face directories: canonical tensor names + the dataclass config."""
    from safetensors.torch import save_file

    model = build(tiny()).eval()
    (tmp_path / "old").mkdir()
    save_file({k: v.contiguous() for k, v in model.canonical_state_dict().items()},
              str(tmp_path / "old" / "model.safetensors"))
    old = {**dataclasses.asdict(model.config), "format_version": 1}
    (tmp_path / "old" / "config.json").write_text(json.dumps(old))
    idx = tokens(2, 10)
    torch.testing.assert_close(load_export(tmp_path / "old")(idx)[0], model(idx)[0], atol=0, rtol=0)
    (tmp_path / "old" / "config.json").write_text(json.dumps({**old, "format_version": 7}))
    with pytest.raises(ValueError, match="format_version=7"):
        load_export(tmp_path / "old")


def test_bias_balanced_export_keeps_the_bias(tmp_path) -> None:
    model = build(tiny(bias_update_rate=0.1))
    model(tokens(2, 8))
    model.update_router_bias()
    out = save_export(model, tmp_path / "e")
    loaded = load_export(out)
    torch.testing.assert_close(loaded.canonical_state_dict()["layers.1.ffn.router.balance_bias"],
                               model.canonical_state_dict()["layers.1.ffn.router.balance_bias"])
    assert dataclasses.asdict(loaded.config) == dataclasses.asdict(model.config.resolved())
