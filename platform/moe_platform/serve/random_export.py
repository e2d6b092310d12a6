"""A randomly initialised export: serving tests and load benchmarks without a training run.

The export has the exact layout training writes (model.safetensors, config.json,
tokenizer.json with "<|endoftext|>" and "<|pad|>"), so everything downstream of
it - loading, batching, HTTP - is the real thing; only the weights are random.
"""
from __future__ import annotations

import os
import tempfile
from typing import Any, Iterable, Optional

from moe_platform.serve.engine import EOS_TOKEN, PAD_TOKEN

DEFAULT_TEXTS = (
    "The quick brown fox jumps over the lazy dog.",
    "Mixture-of-experts layers route each token to a few experts.",
    "def main():\n    print('hello, world')\n",
    "Ray Serve batches requests; the model decodes them together.",
    "naïve café — 東京 🙂",
)


def train_tokenizer(path: str, vocab_size: int, texts: Iterable[str] = DEFAULT_TEXTS) -> str:
    """A byte-level BPE tokenizer.json with the export's two special tokens (eos first)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(list(texts) * 4, trainer)
    tokenizer.save(path)
    return path


def write_random_export(
    directory: str, model_config: Any, *, seed: int = 0, texts: Optional[Iterable[str]] = None
) -> str:
    """Build MoETransformer(model_config) with a fixed seed and save it as an export."""
    import torch
    from moe import MoETransformer, save_export

    torch.manual_seed(seed)
    model = MoETransformer(model_config)
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer_file = train_tokenizer(
            os.path.join(scratch, "tokenizer.json"), model_config.vocab_size, texts or DEFAULT_TEXTS
        )
        save_export(model, directory, tokenizer_file=tokenizer_file)
    return directory
