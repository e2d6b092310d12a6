"""Routing functions and the native Router: top-k, capacity dropping, expert choice,
the balance and z losses, auxiliary-loss-free bias balancing, jitter."""

from __future__ import annotations

import math

import pytest
import torch

from moe import ModelConfig, MoEConfig
from moe.router import (Router, expert_choice, jitter, load_balancing_loss, routing_stats, select_top_k,
                        sort_by_expert, z_loss, RouteInfo)


def router(**moe) -> Router:
    cfg = ModelConfig(vocab_size=16, d_model=8, n_layers=1, n_heads=2, seq_len=8,
                      moe=MoEConfig(**{"num_experts": 4, "top_k": 2, "expert_hidden": 8, **moe}))
    r = Router(cfg)
    torch.nn.init.normal_(r.weight, std=1.0, generator=torch.Generator().manual_seed(0))
    return r


def test_balance_loss_is_exactly_one_under_uniform_routing() -> None:
    E, T = 4, 8
    logits = torch.zeros(T, E)  # P_i = 1/E
    routed = torch.full((E,), T * 2 // E)  # f_i = 1/E
    assert load_balancing_loss(logits, routed).item() == 1.0
    # Collapsed routing (everything to expert 0, confidently) approaches E.
    collapsed = torch.tensor([[20.0, 0, 0, 0]]).expand(T, E)
    assert load_balancing_loss(collapsed, torch.tensor([T, 0, 0, 0])).item() == pytest.approx(E, rel=1e-6)


def test_balance_loss_gradient_flows_through_probabilities_only() -> None:
    logits = torch.randn(6, 3, requires_grad=True)
    load_balancing_loss(logits, torch.tensor([4, 1, 1])).backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_z_loss_is_mean_squared_logsumexp() -> None:
    logits = torch.tensor([[0.0, 0.0], [1.0, 2.0]])
    expected = (math.log(2) ** 2 + math.log(math.e + math.e ** 2) ** 2) / 2
    assert z_loss(logits).item() == pytest.approx(expected, rel=1e-6)


def test_top_k_renormalises_and_bias_only_selects() -> None:
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    idx, w = select_top_k(probs, 2, None, renormalize=True)
    assert idx.tolist() == [[0, 1]] and w[0].tolist() == pytest.approx([0.625, 0.375])
    _, w_raw = select_top_k(probs, 2, None, renormalize=False)
    assert w_raw[0].tolist() == pytest.approx([0.5, 0.3])
    # A bias steers the choice to experts 2 and 3, but their weights are their own probabilities.
    bias = torch.tensor([0.0, 0.0, 1.0, 1.0])
    idx, w = select_top_k(probs, 2, bias, renormalize=False)
    assert sorted(idx.tolist()[0]) == [2, 3] and sorted(w.tolist()[0]) == pytest.approx([0.05, 0.15])


def test_capacity_drops_lowest_probability_first() -> None:
    # 4 tokens all choose expert 0 (k=1); capacity 2 keeps the two most confident.
    idx = torch.zeros(4, 1, dtype=torch.long)
    prob = torch.tensor([[0.3], [0.9], [0.5], [0.7]])
    d = sort_by_expert(idx, prob, num_experts=2, cap=2, priority_TK=prob)
    assert sorted(d.token_idx_A.tolist()) == [1, 3]
    assert d.counts_E.tolist() == [2, 0]
    dropless = sort_by_expert(idx, prob, num_experts=2)
    assert dropless.counts_E.tolist() == [4, 0] and dropless.token_idx_A.tolist() == [0, 1, 2, 3]


def test_sorted_dispatch_groups_rows_by_expert() -> None:
    idx = torch.tensor([[2, 0], [1, 2], [0, 1]])
    w = torch.arange(6, dtype=torch.float).view(3, 2)
    d = sort_by_expert(idx, w, num_experts=3)
    assert d.counts_E.tolist() == [2, 2, 2]
    # assignments (token, slot) -> expert: (0,1)->0 (2,0)->0 | (1,0)->1 (2,1)->1 | (0,0)->2 (1,1)->2
    assert d.token_idx_A.tolist() == [0, 2, 1, 2, 0, 1]
    assert d.weight_A.tolist() == [1.0, 4.0, 2.0, 5.0, 0.0, 3.0]


def test_expert_choice_takes_top_tokens_per_expert_and_skips_padding() -> None:
    probs = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.5, 0.5]])
    d = expert_choice(probs, cap=2)
    assert d.token_idx_A.tolist() == [0, 2, 1, 3] and d.counts_E.tolist() == [2, 2]
    masked = expert_choice(probs, cap=2, token_mask_T=torch.tensor([False, True, True, True]))
    assert 0 not in masked.token_idx_A.tolist()


def test_router_capacity_and_stats() -> None:
    r = router(top_k=1, capacity_factor=0.5)
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(1))
    dispatch, info = r(x)
    assert int(dispatch.counts_E.max()) <= 2  # ceil(16 / 4 * 0.5 * 1)
    assert int(info.routed_E.sum()) == 16
    stats = routing_stats(info)
    assert stats["dropped_fraction"] == pytest.approx(1 - int(dispatch.counts_E.sum()) / 16)
    assert stats["dropped_fraction"] > 0
    # generation routes dropless whatever the capacity
    dispatch, _ = r(x, dropless=True)
    assert int(dispatch.counts_E.sum()) == 16


def test_routing_stats_values() -> None:
    info = RouteInfo(torch.zeros(8, 4), torch.tensor([8, 4, 2, 2]), torch.tensor([8, 4, 2, 2]))
    s = routing_stats(info)
    assert s["tokens_per_expert"].tolist() == [8, 4, 2, 2]
    assert s["dropped_fraction"] == 0.0
    assert s["router_entropy"] == pytest.approx(math.log(4))
    assert s["max_over_mean_load"] == pytest.approx(2.0)


def test_bias_balancing_moves_towards_underloaded_experts() -> None:
    r = router(bias_update_rate=0.1)
    r.train()
    r(torch.randn(32, 8, generator=torch.Generator().manual_seed(2)))
    load = r.load_E.clone()
    r.update_bias()
    expected = 0.1 * torch.sign(load.mean() - load)
    torch.testing.assert_close(r.balance_bias, expected)
    assert r.load_E.sum() == 0  # reset for the next step
    # Repeated updates even out a skewed load (sign updates oscillate, so compare averages).
    r = router(bias_update_rate=0.01, top_k=1)
    x = torch.randn(256, 8, generator=torch.Generator().manual_seed(3))
    r.weight.data[0] += 1.5 * x.mean(0) / x.mean(0).norm() ** 2  # expert 0 is everyone's favourite
    imbalance = []
    for _ in range(100):
        load = r(x)[1].routed_E.float()
        r.update_bias()
        imbalance.append(float(load.max() / load.mean()))
    assert imbalance[0] > 1.7
    assert sum(imbalance[-20:]) / 20 < imbalance[0] - 0.2


def test_jitter_only_in_training_and_bounded() -> None:
    x = torch.ones(1000, 4)
    y = jitter(x, 0.1)
    assert (y >= 0.9).all() and (y <= 1.1).all() and not torch.equal(x, y)
    r = router(jitter_eps=0.5)
    x = torch.randn(4, 8)
    r.eval()
    a, b = r(x)[1].logits_TE, r(x)[1].logits_TE
    assert torch.equal(a, b)
    r.train()
    assert not torch.equal(r(x)[1].logits_TE, a)


def test_gate_runs_in_fp32() -> None:
    r = router().to(torch.bfloat16)
    _, info = r(torch.randn(4, 8, dtype=torch.bfloat16))
    assert info.logits_TE.dtype == torch.float32
