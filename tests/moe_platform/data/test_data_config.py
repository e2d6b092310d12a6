"""DataConfig validation: a bad value fails at construction with a sentence naming the key."""
import os

import pytest

from moe_platform.data import DataConfig


@pytest.mark.parametrize(
    "overrides, key",
    [
        ({"seq_len": 1}, "data.seq_len"),
        ({"vocab_size": 257}, "data.vocab_size"),  # 256 bytes + 2 specials do not fit
        ({"validation_fraction": 1.0}, "data.validation_fraction"),
        ({"validation_fraction": -0.1}, "data.validation_fraction"),
        ({"extensions": [".csv"]}, "data.extensions"),
        ({"pad_token": "<|endoftext|>"}, "data.pad_token"),
        ({"max_documents": -1}, "data.max_documents"),
        ({"shard_rows": 0}, "data.shard_rows"),
        ({"num_cpus_per_task": 0}, "data.num_cpus_per_task"),
        ({"dataset_dir": ""}, "data.dataset_dir"),
        ({"kind": "chat"}, "data.kind"),
        ({"prompt_field": ""}, "data.prompt_field"),
        ({"response_field": ""}, "data.response_field"),
        ({"prompt_field": "text", "response_field": "text"}, "data.response_field"),
        ({"prompt_template": "Question: {question}\n"}, "data.prompt_template"),
        ({"kind": "instruction", "extensions": [".txt", ".md"]}, "data.extensions"),
    ],
)
def test_bad_values_name_their_key(overrides, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")) as info:
        DataConfig(**overrides)
    assert "\n" not in str(info.value)


def test_smallest_valid_vocab_is_bytes_plus_specials():
    assert DataConfig(vocab_size=258).vocab_size == 258


def test_resolved_makes_local_paths_absolute_and_keeps_uris(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = DataConfig(input="corpus", dataset_dir="out/ds", tokenizer="~/tok.json").resolved()
    assert config.input == str(tmp_path / "corpus")
    assert config.dataset_dir == str(tmp_path / "out" / "ds")
    assert config.tokenizer == os.path.expanduser("~/tok.json")
    uri = DataConfig(input="s3://bucket/raw/*.jsonl", dataset_dir="gs://b/ds").resolved()
    assert (uri.input, uri.dataset_dir) == ("s3://bucket/raw/*.jsonl", "gs://b/ds")
    assert uri.resolved() == uri


def test_default_input_is_unset_and_dataset_dir_usable():
    config = DataConfig()
    assert config.input is None
    assert config.dataset_dir == "outputs/dataset"
    assert config.row_len == config.seq_len + 1


def test_instruction_defaults_and_extensions():
    config = DataConfig(kind="instruction")
    assert (config.prompt_field, config.response_field, config.prompt_template) == ("prompt", "response", "{prompt}\n")
    assert config.input_extensions == (".jsonl", ".parquet")
    assert DataConfig().kind == "text" and DataConfig().input_extensions == tuple(DataConfig().extensions)
