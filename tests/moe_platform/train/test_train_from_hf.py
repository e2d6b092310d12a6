"""A finetune stage started from a checkpoint that transformers saved (a tiny Mixtral with
grouped-query attention), whose export transformers loads back with the same logits as ours.
One real Ray run."""
from __future__ import annotations

import os
import shutil

import pytest
import torch

transformers = pytest.importorskip("transformers")

from moe import load_export, load_export_config  # noqa: E402
from moe_platform.train import train  # noqa: E402
from testkit.datasets import write_dataset  # noqa: E402
from testkit.models import SEQ_LEN, VOCAB_SIZE  # noqa: E402
from testkit.training import tiny_stage  # noqa: E402


@pytest.fixture(scope="module")
def mixtral_dir(tmp_path_factory) -> str:
    """A random transformers Mixtral on disk, with the dataset's tokenizer (as a user's would be)."""
    root = tmp_path_factory.mktemp("hf")
    config = transformers.MixtralConfig(
        vocab_size=VOCAB_SIZE, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=32, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=SEQ_LEN)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(root / "mixtral")
    return str(root / "mixtral")


@pytest.mark.slow  # a whole Ray Train finetune
def test_finetune_from_a_transformers_mixtral_exports_what_transformers_reloads(ray_cluster, mixtral_dir,
                                                                                tmp_path) -> None:
    dataset = write_dataset(str(tmp_path / "data"), train_rows=64, validation_rows=16, seed=3)
    shutil.copyfile(os.path.join(dataset, "tokenizer.json"), os.path.join(mixtral_dir, "tokenizer.json"))
    model = load_export_config(mixtral_dir)
    idx = torch.randint(0, VOCAB_SIZE, (2, 16), generator=torch.Generator().manual_seed(1))
    before = transformers.AutoModelForCausalLM.from_pretrained(mixtral_dir).eval()
    with torch.no_grad():  # equal before training
        torch.testing.assert_close(load_export(mixtral_dir)(idx)[0], before(idx).logits, atol=1e-4, rtol=1e-4)

    result = train(tiny_stage(dataset, str(tmp_path / "run"), model=model, init_export_dir=mixtral_dir,
                              max_steps=4, eval_every=4, checkpoint_every=4))

    after = transformers.AutoModelForCausalLM.from_pretrained(result.export_dir).eval()
    ours = load_export(result.export_dir)
    assert ours.config.kv_heads == 2 and after.config.model_type == "mixtral"
    with torch.no_grad():
        torch.testing.assert_close(after(idx).logits, ours(idx)[0], atol=1e-4, rtol=1e-4)
        assert not torch.allclose(after(idx).logits, before(idx).logits, atol=1e-3)  # it trained
    assert transformers.AutoTokenizer.from_pretrained(result.export_dir).eos_token == "<|endoftext|>"
