"""Checkpoints saved by transformers itself load with moe.load_export and compute the same thing.

For each architecture: a tiny random model built with transformers (`from_config`: grouped-query
attention with fewer kv heads than heads, shared experts, interleaved dense layers where the
architecture has them), `save_pretrained`, then moe.load_export: logits equal to 1e-4 and greedy
generation equal token for token. transformers is a test dependency only: it judges the format.
"""
import pytest
import torch

transformers = pytest.importorskip("transformers")

from moe import load_export, load_export_config  # noqa: E402

COMMON = dict(vocab_size=96, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=40, max_position_embeddings=64, rms_norm_eps=1e-5)


def _configs():
    t = transformers
    moe = dict(num_experts_per_tok=2, moe_intermediate_size=16)
    return {
        "mixtral": t.MixtralConfig(**COMMON, num_local_experts=4, num_experts_per_tok=2, rope_theta=5e5),
        "qwen2_moe": t.Qwen2MoeConfig(**COMMON, **moe, num_experts=4, shared_expert_intermediate_size=24,
                                      decoder_sparse_step=2, norm_topk_prob=False),
        "qwen3_moe": t.Qwen3MoeConfig(**COMMON, **moe, num_experts=4, decoder_sparse_step=1, head_dim=8,
                                      norm_topk_prob=True),
        # Real Qwen3-MoE checkpoints have heads wider than hidden_size / num_attention_heads.
        "qwen3_moe_wide_heads": t.Qwen3MoeConfig(**COMMON, **moe, num_experts=4, decoder_sparse_step=1,
                                                 head_dim=16, norm_topk_prob=True),
        "ernie4_5_moe": t.Ernie4_5_MoeConfig(**COMMON, moe_num_experts=4, moe_k=2, moe_intermediate_size=16,
                                             moe_num_shared_experts=1, moe_layer_start_index=0,
                                             moe_layer_interval=2, tie_word_embeddings=True),
        "llama": t.LlamaConfig(**COMMON),
        "mistral": t.MistralConfig(**COMMON, sliding_window=None),
    }


def save_random(config, path, seed: int = 0):
    """A transformers model with every parameter random (ERNIE starts its router at zero: ties)."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0, 0.3 if "correction_bias" in name else 0.1)
    model.generation_config.eos_token_id = None
    model.save_pretrained(path)
    return model


@pytest.mark.parametrize("arch", list(_configs()))
def test_a_transformers_checkpoint_loads_with_equal_logits_and_greedy_text(arch, tmp_path) -> None:
    theirs = save_random(_configs()[arch], tmp_path)
    ours = load_export(tmp_path)
    assert ours.config.kv_heads == 2 and ours.config.n_heads == 4
    idx = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = theirs(idx).logits
    torch.testing.assert_close(ours(idx)[0], expected, atol=1e-4, rtol=1e-4)
    prompt = idx[:1, :5]
    greedy = theirs.generate(prompt, max_new_tokens=10, do_sample=False, pad_token_id=0)[0, 5:].tolist()
    assert ours.generate([prompt[0].tolist()], max_new_tokens=10, temperature=0)[0] == greedy


def test_imported_architectures_map_to_the_features_they_need(tmp_path) -> None:
    configs = _configs()
    save_random(configs["qwen2_moe"], tmp_path / "q2")
    q2 = load_export_config(tmp_path / "q2")
    assert (q2.qkv_bias, q2.moe.moe_every, q2.moe.shared_expert_gate, q2.moe.renormalize) == (True, 2, True, False)
    save_random(configs["qwen3_moe"], tmp_path / "q3")
    assert load_export_config(tmp_path / "q3").qk_norm
    save_random(configs["ernie4_5_moe"], tmp_path / "ernie")
    ernie = load_export_config(tmp_path / "ernie")
    assert ernie.moe.bias_update_rate > 0 and ernie.moe.num_shared_experts == 1 and ernie.tie_embeddings
    assert load_export_config(tmp_path / "ernie").moe.moe_every == 2
