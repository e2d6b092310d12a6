"""The engine takes eos/pad from the export's tokenizer_config.json: an imported model's "</s>"
(and no pad token, as Mixtral's and Llama's) works as well as our "<|endoftext|>"."""
from __future__ import annotations

import json
import shutil

from testkit.serving import tiny_serve_model as tiny_model_config
from tokenizers import Tokenizer

from moe_platform.serve.engine import Engine
from moe_platform.serve.random_export import write_random_export


def test_an_imported_models_eos_comes_from_its_tokenizer_config(tmp_path) -> None:
    ours = write_random_export(str(tmp_path / "ours"), tiny_model_config(), seed=0)
    assert Engine.load(ours).eos_token_id == Tokenizer.from_file(f"{ours}/tokenizer.json").token_to_id("<|endoftext|>")
    imported = tmp_path / "imported"
    shutil.copytree(ours, imported)
    tokenizer = json.loads((imported / "tokenizer.json").read_text())
    for added in tokenizer["added_tokens"]:  # rename our specials as a Llama-family tokenizer has them
        added["content"] = {"<|endoftext|>": "</s>", "<|pad|>": "<s>"}[added["content"]]
    (imported / "tokenizer.json").write_text(json.dumps(tokenizer))
    (imported / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "pad_token": None}))
    engine = Engine.load(str(imported))
    eos = Tokenizer.from_file(str(imported / "tokenizer.json")).token_to_id("</s>")
    assert engine.eos_token_id == eos and engine.pad_token_id == eos  # no pad token: pad with eos
