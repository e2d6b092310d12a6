"""Does routing buy anything? A tiny MoE layer against a dense SwiGLU of (at least) equal
active parameters, on a synthetic task where each token class needs a different function.

Task: a token is x = center[c] + noise for one of C classes; its target is class c's own
random SwiGLU teacher applied to x (normalised to unit variance). One expert per class can
represent its teacher exactly; a dense layer of the same active size must share its hidden
units between C unrelated functions. Full-batch Adam, fixed seeds, a few seconds.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from moe import ModelConfig, MoEConfig
from moe.experts import SwiGLU
from moe.layer import MoELayer

D, C, FH, E = 16, 4, 8, 8  # model dim, token classes, expert hidden, experts (more experts than classes)
STEPS = 200


def teachers() -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(C, D, generator=g) * 2
    w1, w3 = (torch.randn(C, FH, D, generator=g) / math.sqrt(D) for _ in range(2))
    w2 = torch.randn(C, D, FH, generator=g) / math.sqrt(FH)
    return centers, w1, w2, w3


def data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    centers, w1, w2, w3 = teachers()
    g = torch.Generator().manual_seed(seed)
    c = torch.randint(0, C, (n,), generator=g)
    x = centers[c] + torch.randn(n, D, generator=g)
    h = F.silu(torch.einsum("nd,nfd->nf", x, w1[c])) * torch.einsum("nd,nfd->nf", x, w3[c])
    y = torch.einsum("nf,ndf->nd", h, w2[c])
    return x, y / y.std()


def fit(model: nn.Module, balance_coef: float = 0.0) -> float:
    """Train full-batch; return the held-out mean squared error."""
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3, generator=torch.Generator().manual_seed(p.numel()))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = data(2048, seed=1)
    for _ in range(STEPS):
        loss = (model(x[None])[0] - y).square().mean()
        if isinstance(model, MoELayer):
            loss = loss + balance_coef * model.aux_losses["balance"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    xt, yt = data(1024, seed=2)
    with torch.no_grad():
        return (model(xt[None])[0] - yt).square().mean().item()


def moe_layer(balance_coef: float) -> MoELayer:
    cfg = ModelConfig(vocab_size=8, d_model=D, n_layers=1, n_heads=2, seq_len=8,
                      moe=MoEConfig(num_experts=E, top_k=1, expert_hidden=FH, balance_loss_coef=balance_coef))
    return MoELayer(cfg)


def test_moe_beats_dense_of_equal_active_params_and_balance_loss_balances() -> None:
    unbalanced = moe_layer(0.0)
    moe_err = fit(unbalanced, 0.0)
    # Dense hidden FH + E*D/(3D): its active parameters cover the experts' AND the router's.
    dense = SwiGLU(D, FH + math.ceil(E / 3))
    active_moe = 3 * D * FH + E * D
    assert sum(p.numel() for p in dense.parameters()) >= active_moe
    dense_err = fit(dense)
    assert moe_err < 0.6 * dense_err, (moe_err, dense_err)

    balanced = moe_layer(1.0)
    fit(balanced, 1.0)
    x, _ = data(1024, seed=2)
    balance = {}
    for name, layer in (("without", unbalanced), ("with", balanced)):
        with torch.no_grad():
            layer(x[None])
        balance[name] = layer.aux_losses["balance"].item()  # E * sum f_i P_i: 1.0 is perfect
    assert balance["with"] < balance["without"] - 0.2, balance
