"""Byte-level BPE: round-trip, special tokens, determinism, reuse checks."""
import pytest
from testkit.datasets import prose
from tokenizers import Tokenizer

from moe_platform.data import DataError
from moe_platform.data.tokenizer import (
    encode_documents,
    encoder_from_json,
    load_tokenizer,
    special_token_ids,
    tokenizer_json,
    train_tokenizer,
)

SPECIALS = ["<|endoftext|>", "<|pad|>"]


@pytest.fixture(scope="module")
def texts():
    import random

    rng = random.Random(1)
    return [prose(rng, 120) for _ in range(20)]


@pytest.fixture(scope="module")
def tokenizer(texts) -> Tokenizer:
    return train_tokenizer(texts, vocab_size=320, special_tokens=SPECIALS)


def test_vocab_and_special_ids(tokenizer):
    assert tokenizer.get_vocab_size() == 320
    assert special_token_ids(tokenizer, eos_token=SPECIALS[0], pad_token=SPECIALS[1]) == (0, 1)


@pytest.mark.parametrize("text", ["def f(x):\n    return x  # ok\n", "héllo wörld ✓ 日本語 🙂", "\t\r\n  ", "a<|pad|>b"])
def test_round_trip_any_text(tokenizer, text):
    encoder = encoder_from_json(tokenizer_json(tokenizer))
    assert encoder.decode(encoder.encode(text).ids, skip_special_tokens=False) == text


def test_special_token_text_inside_a_document_is_not_a_boundary(tokenizer):
    encoder = encoder_from_json(tokenizer_json(tokenizer))
    [tokens] = encode_documents(encoder, ["see <|endoftext|> here"], eos_id=0)
    assert tokens[-1] == 0 and 0 not in tokens[:-1]
    assert tokens.dtype.name == "int32"


def test_training_is_deterministic(texts, tokenizer):
    again = train_tokenizer(texts, vocab_size=320, special_tokens=SPECIALS)
    assert tokenizer_json(again) == tokenizer_json(tokenizer)


def test_reused_tokenizer_must_have_the_specials(tmp_path, tokenizer):
    path = tmp_path / "tokenizer.json"
    tokenizer.save(str(path))
    loaded = load_tokenizer(str(path))
    with pytest.raises(DataError, match="no '<eos>' token: set data.eos_token"):
        special_token_ids(loaded, eos_token="<eos>", pad_token=SPECIALS[1])


def test_missing_or_malformed_tokenizer_file(tmp_path):
    with pytest.raises(DataError, match="data.tokenizer: .* does not exist"):
        load_tokenizer(str(tmp_path / "nope.json"))
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(DataError, match="data.tokenizer: .* is not a tokenizer.json"):
        load_tokenizer(str(tmp_path / "bad.json"))
