"""Byte-level BPE with HF `tokenizers`: train, load, check, encode.

Byte-level means every string round-trips (decode(encode(s)) == s): the base
vocabulary is the 256 byte values, so no text is ever <unk>. The special tokens
(end-of-document, padding) come first, so a trained tokenizer has eos = 0 and
pad = 1. When encoding corpus text, special-token strings that appear *inside*
a document are encoded as ordinary text: a source file that mentions
"<|endoftext|>" must not cut itself in two.
"""
from __future__ import annotations

import hashlib
import os
from functools import lru_cache
from typing import Iterable, Optional, Sequence

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from moe_platform.data import storage
from moe_platform.data.config import BYTE_ALPHABET_SIZE
from moe_platform.data.errors import DataError


def train_tokenizer(
    texts: Iterable[str], *, vocab_size: int, special_tokens: Sequence[str], min_frequency: int = 2
) -> Tokenizer:
    """Train a byte-level BPE; deterministic for the same texts in the same order."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(special_tokens),
        # All 256 bytes from the start, seen in the sample or not: nothing is ever unknown.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def tokenizer_file(location: str) -> str:
    """data.tokenizer may name a tokenizer.json or a model directory holding one (an export, or a
    Hugging Face checkpoint on disk)."""
    return os.path.join(location, "tokenizer.json") if os.path.isdir(location) else location


def declared_special_tokens(location: str) -> Optional[tuple[str, Optional[str], Optional[str]]]:
    """(eos, pad, bos) that the tokenizer's own directory declares in tokenizer_config.json (an
    imported model's "</s>", often with no pad token), or None when there is no such file."""
    from moe.export import TOKENIZER_CONFIG_FILE, special_tokens

    directory = location if os.path.isdir(location) else os.path.dirname(location)
    if not directory or not os.path.isfile(os.path.join(directory, TOKENIZER_CONFIG_FILE)):
        return None
    try:
        declared = special_tokens(directory)
    except ValueError as exc:
        raise DataError(f"data.tokenizer: {exc}") from None
    if declared.eos is None:
        raise DataError(f"data.tokenizer: {directory}/{TOKENIZER_CONFIG_FILE} names no eos_token")
    return declared.eos, declared.pad, declared.bos


def load_tokenizer(location: str) -> Tokenizer:
    """A tokenizer.json from a local path or URI, with a DataError naming the file if it is unusable."""
    location = tokenizer_file(location)
    try:
        return Tokenizer.from_str(storage.read_bytes(location).decode("utf-8"))
    except FileNotFoundError:
        raise DataError(f"data.tokenizer: {location} does not exist") from None
    except Exception as exc:  # tokenizers raises a bare Exception for malformed JSON
        raise DataError(f"data.tokenizer: {location} is not a tokenizer.json ({exc})") from None


def special_token_ids(tokenizer: Tokenizer, *, eos_token: str, pad_token: Optional[str]) -> tuple[int, int]:
    """(eos_id, pad_id); DataError if the tokenizer lacks either or is too small to be byte-level.
    pad_token None (Mixtral's and Llama's tokenizers have none): pad with eos. A pad id only fills
    padding, which is never trained on."""
    ids = []
    for key, token in (("data.eos_token", eos_token), ("data.pad_token", pad_token or eos_token)):
        token_id = tokenizer.token_to_id(token)
        if token_id is None:
            raise DataError(f"the tokenizer has no {token!r} token: set {key} to one it has")
        ids.append(token_id)
    if tokenizer.get_vocab_size() < BYTE_ALPHABET_SIZE + 2:
        raise DataError(f"the tokenizer's vocabulary ({tokenizer.get_vocab_size()}) is smaller than 256 bytes + 2 specials")
    return ids[0], ids[1]


def tokenizer_json(tokenizer: Tokenizer) -> str:
    """The canonical serialized form; its bytes are what the manifest's sha256 covers."""
    return tokenizer.to_str()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@lru_cache(maxsize=4)
def encoder_from_json(serialized: str) -> Tokenizer:
    """A tokenizer for encoding corpus text, built once per process (Ray workers reuse it)."""
    tokenizer = Tokenizer.from_str(serialized)
    # Special-token strings inside a document are text, not document boundaries.
    tokenizer.encode_special_tokens = True
    return tokenizer


def encode_documents(tokenizer: Tokenizer, texts: Sequence[str], eos_id: int) -> list[np.ndarray]:
    """Token ids of each text followed by end-of-document, as int32 arrays."""
    if not texts:
        return []
    encodings = tokenizer.encode_batch_fast(list(texts), add_special_tokens=False)
    return [np.array(encoding.ids + [eos_id], dtype=np.int32) for encoding in encodings]


def encode_instructions(
    tokenizer: Tokenizer, prompts: Sequence[str], responses: Sequence[str], eos_id: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """(tokens, loss_mask) per record: encode(prompt) + encode(response) + eos, mask 0 on the prompt.

    The mask is 1 on each token the model should learn to predict: the response and the eos that
    ends it (so generation learns to stop). Prompt and response are encoded separately, as at
    inference, where the rendered prompt is encoded alone and the model continues it.
    Tokens int32, mask int8, same length.
    """
    if not prompts:
        return []
    prompt_encodings = tokenizer.encode_batch_fast(list(prompts), add_special_tokens=False)
    response_encodings = tokenizer.encode_batch_fast(list(responses), add_special_tokens=False)
    encoded = []
    for prompt, response in zip(prompt_encodings, response_encodings):
        tokens = np.array(prompt.ids + response.ids + [eos_id], dtype=np.int32)
        mask = np.zeros(len(tokens), dtype=np.int8)
        mask[len(prompt.ids):] = 1
        encoded.append((tokens, mask))
    return encoded
