"""A model directory is input from outside: what we do not implement, and what is broken, is
refused in one line naming the file and the field (never a traceback from deep inside, never
unpickled). Directories are written by hand here: no transformers needed."""
import json

import pytest
import torch
from safetensors.torch import save_file

from moe import ModelConfig, MoEConfig, MoETransformer, load_export, load_export_config, save_export
from moe.export import ExportError, check_export, is_export, special_tokens

MIXTRAL = {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "vocab_size": 64, "hidden_size": 32,
           "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 16,
           "num_local_experts": 4, "num_experts_per_tok": 2, "max_position_embeddings": 64, "rms_norm_eps": 1e-5,
           "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}, "sliding_window": None,
           "tie_word_embeddings": False, "hidden_act": "silu"}


def write_config(path, **changes):
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({**MIXTRAL, **changes}))
    return path


@pytest.mark.parametrize("changes, field", [
    ({"sliding_window": 16}, "sliding_window=16 is shorter"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}}, "rope_parameters.rope_type"),
    ({"model_type": "gpt2"}, "model_type='gpt2' is not supported"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"num_key_value_heads": 3}, "n_kv_heads=3"),
    ({"vocab_size": "many"}, "vocab_size='many' is not a int"),
    ({"num_experts_per_tok": 1}, "num_experts_per_tok=1 with renormalised"),
])
def test_unsupported_settings_are_refused_naming_the_field_and_file(tmp_path, changes, field) -> None:
    write_config(tmp_path, **changes)
    with pytest.raises(ValueError, match="config.json") as info:
        load_export_config(tmp_path)
    assert field in str(info.value) and "\n" not in str(info.value)


def test_an_inactive_sliding_window_is_fine(tmp_path) -> None:
    write_config(tmp_path, sliding_window=64)
    assert load_export_config(tmp_path).seq_len == 64
    write_config(tmp_path, model_type="qwen2_moe", sliding_window=8, use_sliding_window=False, num_experts=4,
                 moe_intermediate_size=16, shared_expert_intermediate_size=0)
    assert load_export_config(tmp_path).moe.num_shared_experts == 0


def test_a_malformed_config_json_is_one_line(tmp_path) -> None:
    tmp_path.joinpath("config.json").write_text('{"model_type": "mixtral",')
    with pytest.raises(ExportError, match=r"config.json: .*") as info:
        load_export_config(tmp_path)
    assert "\n" not in str(info.value)


@pytest.fixture
def export(tmp_path):
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, seq_len=32, ffn_hidden=48,
                         moe=MoEConfig(num_experts=4, top_k=2, expert_hidden=16))
    out = tmp_path / "export"
    save_export(MoETransformer(config), out)
    return out


def test_a_bad_safetensors_header_and_a_wrong_shape_name_the_file(export) -> None:
    weights = export / "model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(b"\xff" * 16 + good[16:])
    with pytest.raises(ValueError, match="model.safetensors: not a readable safetensors file"):
        load_export(export)
    from safetensors.torch import load_file

    weights.write_bytes(good)
    tensors = load_file(str(weights))
    tensors["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(32, 32)
    save_file(tensors, str(weights))
    with pytest.raises(ValueError, match=r"model.safetensors: tensor model.layers.0.self_attn.k_proj.weight has "
                                         r"shape \[32, 32\]; config.json needs \[16, 32\]"):
        load_export(export)


def test_pickled_weights_are_refused_and_never_unpickled(export) -> None:
    (export / "model.safetensors").unlink()
    # A pickle that would run code if it were ever loaded.
    (export / "pytorch_model.bin").write_bytes(b"cos\nsystem\n(S'touch /tmp/pwned_by_moe_test'\ntR.")
    assert not is_export(export)
    with pytest.raises(ValueError, match="only pickled weights \\(pytorch_model.bin\\); they are never unpickled"):
        load_export(export)
    with pytest.raises(ExportError, match="serve.export_dir=.*pytorch_model.bin"):
        check_export(export, "serve.export_dir")


def test_a_missing_tokenizer_is_named(export) -> None:
    with pytest.raises(ExportError, match=r"serve.export_dir=.* has no tokenizer.json"):
        check_export(export, "serve.export_dir")
    assert check_export(export, "init.export_dir", need_tokenizer=False).n_kv_heads == 2


def test_special_tokens_come_from_the_directory(export) -> None:
    tok = {"version": "1.0", "added_tokens": [{"id": 1, "content": "<s>"}, {"id": 2, "content": "</s>"}],
           "model": {"type": "BPE", "vocab": {"<s>": 1, "</s>": 2, "a": 3}}}
    (export / "tokenizer.json").write_text(json.dumps(tok))
    (export / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": {"content": "<s>"}, "eos_token": "</s>", "pad_token": None}))
    assert special_tokens(export) == ("</s>", None, "<s>", 2, None, 1)
    (export / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    with pytest.raises(ExportError, match="eos_token '<|im_end|>' is not in tokenizer.json"):
        special_tokens(export)


def test_check_export_reads_headers_so_a_wrong_shape_fails_before_any_work(export) -> None:
    from safetensors.torch import load_file

    tensors = load_file(str(export / "model.safetensors"))
    tensors["model.norm.weight"] = torch.ones(31)
    save_file(tensors, str(export / "model.safetensors"))
    with pytest.raises(ExportError, match=r"init.export_dir=.*tensor model.norm.weight has shape \[31\]"):
        check_export(export, "init.export_dir", need_tokenizer=False)
