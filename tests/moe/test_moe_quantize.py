"""moe.quantize: the int8 copy stays close to the fp32 model (logits, loss), every Linear and
every routed expert is replaced, generation runs, the model shrinks, the deepspeed backend and
LoRA-adapted models quantize too, and the fp32 model (and the global RNG) are left untouched."""

from __future__ import annotations

from functools import partial

import warnings

import pytest
import torch
from torch import nn
from torch.ao.nn.quantized.dynamic import Linear as DynamicQuantizedLinear

from testkit.models import tiny_model

from moe import ModelConfig, MoETransformer, PeftConfig, apply_peft
from moe.quantize import Int8Experts, model_size_bytes, quantize_int8

E = 4


# Block 0 dense, block 1 MoE with a shared expert. init_std 0.1: blocks move the logits a lot.
tiny = partial(tiny_model, vocab_size=128, d_model=64, n_heads=4, ffn_hidden=96, init_std=0.1, num_experts=E,
               expert_hidden=64, moe_every=2, num_shared_experts=1)


def build(config: ModelConfig) -> MoETransformer:
    torch.manual_seed(0)
    return MoETransformer(config).eval()


def held_out() -> torch.Tensor:
    return torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(5))


def logits_and_loss(model: MoETransformer, idx: torch.Tensor = None) -> tuple[torch.Tensor, float]:
    idx = held_out() if idx is None else idx
    with torch.no_grad():
        logits, _ = model(idx[:, :-1], idx[:, 1:])
    return logits, model.loss_breakdown["lm"].item()


def counting(n: int, seed: int) -> torch.Tensor:
    """Sequences start, start + 3, start + 6, ... (mod vocab): a bigram task learnt in a few steps."""
    start = torch.randint(0, 128, (n, 1), generator=torch.Generator().manual_seed(seed))
    return (start + 3 * torch.arange(32)) % 128


def trained(tie: bool) -> MoETransformer:
    model = build(tiny(tie_embeddings=tie, init_std=0.02)).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(30):
        idx = counting(8, step)
        model(idx[:, :-1], idx[:, 1:])[1].backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


@pytest.mark.parametrize("tie", [True, False])
def test_int8_held_out_loss_and_predictions_stay_close_to_fp32(tie: bool) -> None:
    model = trained(tie)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the deprecation warnings of torch.ao are silenced inside
        q = quantize_int8(model)
        idx = counting(8, seed=999)  # held out
        q_logits, q_loss = logits_and_loss(q, idx)
    fp_logits, fp_loss = logits_and_loss(model, idx)
    assert fp_loss < 1.0  # learnt, so the comparison means something (ln 128 = 4.85 untrained)
    assert q_loss == pytest.approx(fp_loss, rel=0.05, abs=0.005)
    assert (q_logits.argmax(-1) == fp_logits.argmax(-1)).float().mean() > 0.95
    assert ((q_logits - fp_logits).norm() / fp_logits.norm()).item() < 0.1


@pytest.mark.parametrize("tie", [True, False])
def test_every_linear_and_routed_expert_is_int8_and_the_original_is_untouched(tie: bool) -> None:
    model = build(tiny(tie_embeddings=tie))
    rng = torch.get_rng_state()
    q = quantize_int8(model)
    assert torch.equal(torch.get_rng_state(), rng)
    float_linears = [name for name, m in q.named_modules() if type(m) is nn.Linear]
    assert float_linears == (["lm_head"] if tie else [])
    if tie:  # the tied output projection is the fp32 token embedding
        assert q.lm_head.weight is q.tok_emb.weight
    # 2 x 4 attention + 3 dense + 3 shared + 4 experts x 3 (+ lm_head when untied)
    int8 = [m for m in q.modules() if isinstance(m, DynamicQuantizedLinear)]
    assert len(int8) == 8 + 3 + 3 + 3 * E + (0 if tie else 1)
    (_, layer), = q.moe_layers()
    assert isinstance(layer.experts, Int8Experts) and len(layer.experts.experts) == E
    assert not q.training
    assert not any(isinstance(m, DynamicQuantizedLinear) for m in model.modules())  # still fp32


def test_generate_and_forward_run_and_the_model_shrinks() -> None:
    model = build(tiny(tie_embeddings=False))
    q = quantize_int8(model)
    out = q.generate([[1, 2, 3], [4]], max_new_tokens=6, temperature=0)
    assert [len(o) for o in out] == [6, 6] and all(0 <= t < 128 for o in out for t in o)
    sampled = q.generate([[5, 6]], max_new_tokens=4, generator=torch.Generator().manual_seed(0))
    assert len(sampled[0]) == 4
    assert len(list(q.generate_stream([[7]], 3, temperature=0))) == 3
    # fp32 weights are 4 bytes, int8 ones 1 byte; at d_model 64 the per-channel scales and zero
    # points (16 bytes per output row), the fp32 embedding and the file overhead still weigh (0.44).
    assert model_size_bytes(q) < 0.5 * model_size_bytes(model)


def test_deepspeed_backend_quantizes_like_native() -> None:
    native, deepspeed = build(tiny(backend="native", bias_update_rate=0.0)), build(tiny(backend="deepspeed"))
    torch.testing.assert_close(logits_and_loss(deepspeed)[0], logits_and_loss(native)[0])  # same weights
    q = quantize_int8(deepspeed)
    assert q.config.moe.backend == "native"
    torch.testing.assert_close(logits_and_loss(q)[0], logits_and_loss(quantize_int8(native))[0], atol=0, rtol=0)


def test_lora_adapters_arrive_merged() -> None:
    model = build(tiny())
    apply_peft(model, PeftConfig(lora_rank=4, lora_targets=["attention", "experts"]))
    with torch.no_grad():  # B starts at zero: move it so the adapters change the function
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    merged = build(tiny())
    merged.load_canonical_state_dict(model.canonical_state_dict())  # W + scale * B @ A
    q_logits = logits_and_loss(quantize_int8(model))[0]
    torch.testing.assert_close(q_logits, logits_and_loss(quantize_int8(merged))[0], atol=0, rtol=0)
    assert not torch.allclose(q_logits, logits_and_loss(quantize_int8(build(tiny())))[0], atol=0.1)


def test_expert_parallel_models_are_refused() -> None:
    model = build(tiny())
    model.expert_parallel_size = 2  # as an EP=2 rank would have it (no process group needed to refuse)
    with pytest.raises(ValueError, match="quantize_int8 needs expert_parallel_size=1, not 2"):
        quantize_int8(model)
