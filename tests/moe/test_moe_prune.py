"""moe.prune: usage counting, choosing experts (keep / min_share), and pruning experts that no
token reaches, which leaves the logits unchanged (both backends) and shrinks num_params exactly."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from testkit.models import tiny_model

from moe import MoETransformer, load_export, save_export
from moe.prune import choose_experts, expert_usage, prune_export, prune_state

D, F, E = 32, 16, 6
UNUSED = [[4, 5], [0, 3]]  # per MoE layer: experts no token is routed to


tiny = partial(tiny_model, d_model=D, n_heads=4, seq_len=16, ffn_hidden=48, init_std=0.1, num_experts=E,
               expert_hidden=F)


def batches(n: int = 3) -> list[torch.Tensor]:
    return [torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(s)) for s in range(n)]


def model_with_unused_experts(**moe) -> MoETransformer:
    """Per layer, the four used experts' router rows are +w, -w, +u, -u and the unused ones'
    are 0: each token has exactly two positive router logits (one of +-w.x, one of +-u.x), so
    its top 2 are always used experts and an unused expert (logit 0) is never picked."""
    torch.manual_seed(0)
    model = MoETransformer(tiny(**moe)).eval()
    sd = model.canonical_state_dict()
    for layer, unused in enumerate(UNUSED):
        w, u = torch.randn(2, D)
        rows = iter([w, -w, u, -u])
        sd[f"layers.{layer}.ffn.router.weight"] = torch.stack(
            [torch.zeros(D) if e in unused else next(rows) for e in range(E)])
    model.load_canonical_state_dict(sd)
    return model


def logits(model: MoETransformer) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(idx)[0] for idx in batches()])


@pytest.mark.parametrize("backend", ["native", "deepspeed"])
def test_pruning_experts_without_tokens_keeps_logits_and_shrinks_num_params(tmp_path, backend) -> None:
    model = model_with_unused_experts(backend=backend)
    usage = expert_usage(model, batches())
    for u, unused in zip(usage, UNUSED):
        assert u.sum() == 3 * 2 * 16 * 2  # tokens * top_k
        assert u[unused].sum() == 0 and (u[[e for e in range(E) if e not in unused]] > 0).all()
    keep_ids = choose_experts(usage, keep=4)
    assert keep_ids == [[0, 1, 2, 3], [1, 2, 4, 5]]
    assert choose_experts(usage, min_share=0.01) == keep_ids
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "tokenizer.json").write_text("{}")
    save_export(model, tmp_path / "src")
    pruned = load_export(prune_export(tmp_path / "src", tmp_path / "pruned", keep_ids), backend=backend)
    torch.testing.assert_close(logits(pruned), logits(model), atol=1e-5, rtol=0)
    assert pruned.config.moe.num_experts == 4
    assert pruned.config.num_params == model.config.num_params - 2 * 2 * (3 * D * F + D)
    assert sum(p.numel() for p in pruned.parameters()) == pruned.config.num_params
    assert (tmp_path / "pruned" / "tokenizer.json").read_text() == "{}"


def test_expert_usage_restores_mode_and_stats_switch() -> None:
    model = model_with_unused_experts().train()
    expert_usage(model, batches(1))
    assert model.training and not any(layer.collect_stats for _, layer in model.moe_layers())


def test_prune_state_slices_every_expert_tensor_in_order() -> None:
    torch.manual_seed(0)
    model = MoETransformer(tiny(bias_update_rate=0.1, moe_every=2))  # block 1 is the only MoE layer
    sd = model.canonical_state_dict()
    sd["layers.1.ffn.router.balance_bias"] = torch.arange(E, dtype=torch.float32)
    out, config = prune_state(sd, model.config, [[5, 1, 3]])
    for key in ("experts.w1", "experts.w2", "experts.w3", "router.weight", "router.balance_bias"):
        assert torch.equal(out[f"layers.1.ffn.{key}"], sd[f"layers.1.ffn.{key}"][[1, 3, 5]])
    assert config.moe.num_experts == 3 and config.moe.bias_update_rate == 0.1
    assert torch.equal(out["layers.0.ffn.w1.weight"], sd["layers.0.ffn.w1.weight"])


def test_choose_experts_keep_and_min_share() -> None:
    usage = [torch.tensor([5, 0, 3, 2]), torch.tensor([1, 1, 8, 0])]
    assert choose_experts(usage, keep=2) == [[0, 2], [0, 2]]  # layer 1: a tie, the lower id wins
    # shares >= 0.15: layer 0 has 3 experts, layer 1 has 1; every layer keeps max(3, 1) = 3.
    assert choose_experts(usage, min_share=0.15) == [[0, 2, 3], [0, 1, 2]]
    assert choose_experts(usage, min_share=0.9) == [[0], [2]]  # at least one expert
    assert choose_experts(usage, min_share=0.0) == [[0, 1, 2, 3]] * 2


@pytest.mark.parametrize("kwargs, message", [
    (dict(), "exactly one of keep= or min_share="),
    (dict(keep=2, min_share=0.1), "exactly one of keep= or min_share="),
    (dict(keep=0), "keep=0 must be between 1 and the layer's 4 experts"),
    (dict(keep=5), "keep=5 must be between 1 and the layer's 4 experts"),
    (dict(min_share=1.0), r"min_share=1.0 must be in \[0, 1\)"),
])
def test_choose_experts_errors(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        choose_experts([torch.tensor([5, 0, 3, 2])], **kwargs)


@pytest.mark.parametrize("keep_ids, message", [
    ([[0, 1]], "keep_ids has 1 lists; the model has 2 MoE layers"),
    ([[0, 1], [0, 1, 2]], r"keeps \[2, 3\] experts per layer; model.moe.num_experts is one number"),
    ([[0, 0], [0, 1]], r"keep_ids has \[0, 0\]; each layer's ids must be distinct and in \[0, 6\)"),
    ([[0, 6], [0, 1]], r"keep_ids has \[0, 6\]"),
    ([[0], [1]], "keeping 1 experts per layer is fewer than model.moe.top_k=2"),
])
def test_prune_state_errors(keep_ids, message) -> None:
    with pytest.raises(ValueError, match=message):
        prune_state({}, tiny(), keep_ids)


def test_prune_state_refuses_a_dense_model() -> None:
    with pytest.raises(ValueError, match="has no MoE layers"):
        prune_state({}, tiny(moe_every=0), [])
