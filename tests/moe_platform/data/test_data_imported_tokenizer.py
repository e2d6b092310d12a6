"""data.tokenizer=<a model directory>: an imported model's tokenizer, its own special tokens
("</s>", no pad token, as Mixtral's and Llama's), and the tokenizer_config.json a dataset writes
for the exports trained on it (eos/pad, and the chat template of an instruction set)."""
import json
import random

import jinja2
import pytest
from testkit.datasets import prose

from moe_platform.data import DataError
from moe_platform.data.config import DataConfig
from moe_platform.data.prepare import build_tokenizer, plan_dataset, tokenizer_config
from moe_platform.data.tokenizer import load_tokenizer, train_tokenizer


@pytest.fixture()
def model_dir(tmp_path):
    """A directory as transformers saves one: tokenizer.json + tokenizer_config.json, eos </s>, no pad."""
    rng = random.Random(1)
    tokenizer = train_tokenizer([prose(rng, 120) for _ in range(20)], vocab_size=320,
                                special_tokens=["<unk>", "<s>", "</s>"])
    directory = tmp_path / "mixtral"
    directory.mkdir()
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "LlamaTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "pad_token": None}))
    return directory


def test_a_model_directory_prepares_with_its_own_eos_and_pads_with_it(model_dir, corpus, tmp_path) -> None:
    root, _ = corpus
    config = DataConfig(input=str(root), tokenizer=str(model_dir), dataset_dir=str(tmp_path / "dataset"))
    assert load_tokenizer(str(model_dir)).token_to_id("</s>") == 2
    bundle = build_tokenizer(plan_dataset(config))
    assert (bundle.eos_id, bundle.pad_id, bundle.eos_token, bundle.pad_token) == (2, 2, "</s>", None)
    assert tokenizer_config(config, bundle) == {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "</s>",
                                                "bos_token": "<s>"}


def test_an_instruction_set_writes_its_prompt_template_as_a_chat_template(model_dir, tmp_path) -> None:
    records = tmp_path / "qa.jsonl"
    records.write_text(json.dumps({"prompt": "hi", "response": "yo"}) + "\n")
    config = DataConfig(input=str(records), kind="instruction", tokenizer=str(model_dir / "tokenizer.json"),
                        prompt_template="Q: {prompt}\nA: ", dataset_dir=str(tmp_path / "dataset"))
    template = tokenizer_config(config, build_tokenizer(plan_dataset(config)))["chat_template"]
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
                {"role": "user", "content": "again"}]
    # Each turn as training rendered it; the generation prompt is the template's tail after the last user turn.
    assert jinja2.Template(template).render(messages=messages, eos_token="</s>") == "Q: hi\nA: yo</s>Q: again\nA: "


def test_a_declared_eos_the_tokenizer_lacks_is_one_line(model_dir, corpus, tmp_path) -> None:
    (model_dir / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    config = DataConfig(input=str(corpus[0]), tokenizer=str(model_dir), dataset_dir=str(tmp_path / "dataset"))
    with pytest.raises(DataError, match=r"data.tokenizer: .*eos_token '<\|im_end\|>' is not in tokenizer.json"):
        build_tokenizer(plan_dataset(config))
