"""Routing health users can see: load CV, dead experts, min/max share; the progress line's warning."""
import numpy as np
import pytest
import torch

from moe import ModelConfig, MoEConfig, MoETransformer
from moe_platform.train.metrics import LayerRouting, aggregate_routing, routing_scalars
from moe_platform.train.progress import DeadExpertWatch


def layer(counts, block=0) -> LayerRouting:
    return LayerRouting(layer=block, tokens_per_expert=np.array(counts, dtype=float), dropped_fraction=0.0,
                        router_entropy=1.0)


def test_health_of_a_balanced_and_a_starved_layer():
    balanced, starved = layer([25, 25, 25, 25]), layer([70, 25, 4, 1], block=2)
    assert balanced.load_cv == 0 and balanced.dead_experts(0.25) == 0
    # Uniform share is 0.25; under a quarter of it (< 0.0625): 0.04 and 0.01 are dead.
    assert starved.dead_experts(0.25) == 2
    assert starved.dead_experts(0.05) == 1  # only the expert at 0.01 is under 0.0125
    assert starved.load_cv == pytest.approx(np.std([70, 25, 4, 1]) / 25)
    scalars = routing_scalars([balanced, starved], dead_threshold=0.25)
    assert scalars["moe/layer_2/min_share"] == pytest.approx(0.01)
    assert scalars["moe/layer_2/max_share"] == pytest.approx(0.70)
    assert scalars["moe/layer_2/dead_experts"] == 2 and scalars["moe/dead_experts"] == 2
    assert layer([0, 0, 0, 0]).dead_experts(0.25) == 0  # nothing routed is not a dead expert


def test_window_load_counts_every_training_forward_and_clears():
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, seq_len=16, ffn_hidden=48,
                         moe=MoEConfig(num_experts=4, top_k=2, expert_hidden=16, moe_every=2))
    model = MoETransformer(config).train()
    idx = torch.randint(0, 64, (3, 16))
    for _ in range(3):
        model(idx)
    model.eval()(idx)  # evaluation does not count
    (block, counts_E), = model.pop_expert_load()
    assert block == 1 and int(counts_E.sum()) == 3 * 3 * 16 * 2  # forwards x tokens x top_k
    assert int(model.pop_expert_load()[0][1].sum()) == 0
    model.train()
    model.set_routing_stats(True)
    model(idx)
    window = model.pop_expert_load()
    routing = aggregate_routing(model.routing_stats(), all_reduce=False, window_load=window)
    assert routing[0].tokens_per_expert.sum() == 3 * 16 * 2


def test_progress_warns_only_when_a_block_keeps_a_dead_expert():
    watch = DeadExpertWatch()
    assert watch.update({"moe/layer_1/dead_experts": 1.0, "moe/layer_3/dead_experts": 0.0}) == ""
    warning = watch.update({"moe/layer_1/dead_experts": 2.0, "moe/layer_3/dead_experts": 1.0})
    assert warning == " | WARNING dead experts: block 1 has 2 (2 reports)"
    assert watch.update({"train/loss": 3.0}) == ""  # a report without routing statistics: no news
    assert watch.update({"moe/layer_1/dead_experts": 0.0, "moe/layer_3/dead_experts": 1.0}) == \
        " | WARNING dead experts: block 3 has 1 (2 reports)"
    assert watch.update({"moe/layer_1/dead_experts": 0.0, "moe/layer_3/dead_experts": 0.0}) == ""
