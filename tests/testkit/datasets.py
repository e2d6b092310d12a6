"""Datasets the tests write themselves (nothing is downloaded): a tokenized dataset on the prepare
job's contract, and small raw corpora for the data pipeline.

`write_dataset` follows the contract (manifest.json, tokenizer.json, train/ and validation/
Parquet shards of seq_len + 1 tokens) without running the prepare job, so training tests
depend only on the contract. Rows are arithmetic progressions modulo the vocabulary
(token[i+1] = token[i] + stride), which a 2-layer model learns in tens of steps: a falling
loss means learning.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from moe_platform.data import DocumentStats, Manifest, ShardInfo, SplitInfo, TokenizerInfo
from testkit.models import SEQ_LEN, VOCAB_SIZE


def write_tokenizer(path: str, vocab_size: int) -> str:
    """A word-level tokenizer.json with `vocab_size` entries (ids 0 and 1: eos and pad)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<|endoftext|>": 0, "<|pad|>": 1, **{f"t{i}": i for i in range(2, vocab_size)}}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|pad|>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(path)
    return path


def progression_rows(rows: int, seq_len: int, vocab_size: int, seed: int) -> np.ndarray:
    """(rows, seq_len + 1) int32: each row counts up by a stride of 1-3 from a random start."""
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, vocab_size, size=(rows, 1))
    strides = rng.integers(1, 4, size=(rows, 1))
    return ((starts + strides * np.arange(seq_len + 1)) % vocab_size).astype(np.int32)


def write_dataset(
    dataset_dir: str,
    *,
    train_rows: int = 512,
    validation_rows: int = 64,
    seq_len: int = SEQ_LEN,
    vocab_size: int = VOCAB_SIZE,
    shard_rows: int = 128,
    loss_mask: bool = False,
    seed: int = 0,
) -> str:
    """Write a complete dataset directory following the prepare job's contract; returns it."""
    os.makedirs(dataset_dir, exist_ok=True)
    tokenizer_path = write_tokenizer(os.path.join(dataset_dir, "tokenizer.json"), vocab_size)
    splits = {}
    for split, rows, split_seed in (("train", train_rows, seed), ("validation", validation_rows, seed + 1)):
        data = progression_rows(rows, seq_len, vocab_size, split_seed)
        os.makedirs(os.path.join(dataset_dir, split), exist_ok=True)
        shards = []
        for index, start in enumerate(range(0, rows, shard_rows)):
            chunk = data[start:start + shard_rows]
            columns = {"tokens": pa.array(chunk.tolist(), type=pa.list_(pa.int32()))}
            if loss_mask:
                # Only the second half of every row counts (a prompt/answer split, as finetuning has).
                mask = np.zeros_like(chunk, dtype=np.int8)
                mask[:, seq_len // 2:] = 1
                columns["loss_mask"] = pa.array(mask.tolist(), type=pa.list_(pa.int8()))
            relative = f"{split}/part-{index:05d}.parquet"
            pq.write_table(pa.table(columns), os.path.join(dataset_dir, relative))
            shards.append(ShardInfo(file=relative, rows=len(chunk), tokens=int(chunk.size)))
        splits[split] = SplitInfo(rows=rows, tokens=rows * (seq_len + 1), shards=shards)
    with open(tokenizer_path, "rb") as fh:
        sha256 = hashlib.sha256(fh.read()).hexdigest()
    columns = {"tokens": "list<int32>", **({"loss_mask": "list<int8>"} if loss_mask else {})}
    Manifest(
        seq_len=seq_len,
        vocab_size=vocab_size,
        tokenizer=TokenizerInfo(file="tokenizer.json", sha256=sha256, eos_id=0, pad_id=1),
        splits=splits,
        documents=DocumentStats(read=train_rows + validation_rows, used=train_rows + validation_rows, skipped=[],
                                tail_tokens_dropped={"train": 0, "validation": 0}),
        fingerprint=f"progressions-{seed}-{train_rows}-{validation_rows}-{seq_len}-{vocab_size}-{loss_mask}",
        config={"source": "tests/testkit/datasets.py"},
        created="2026-01-01T00:00:00Z",
        columns=columns,
    ).save(dataset_dir)
    return dataset_dir


# ---- raw corpora for the data pipeline (a few KB each: fast on 2 cores) -------------------------

WORDS = (
    "def class return import yield lambda tensor expert router token batch gradient layer "
    "the of and to in is that for it with as on be at by this had not are but from or have"
).split()


def prose(rng: random.Random, words: int) -> str:
    lines, line = [], []
    for _ in range(words):
        line.append(rng.choice(WORDS))
        if len(line) >= rng.randint(4, 12):
            lines.append(" ".join(line))
            line = []
    lines.append(" ".join(line))
    return "\n".join(lines) + "\n"


def write_corpus(root: Path, *, files: int = 16, seed: int = 0) -> dict[str, str]:
    """Text files of several types under root; returns {identity: text} of every document."""
    rng = random.Random(seed)
    documents = {}
    for i in range(files):
        ext = [".txt", ".md", ".py", ".rst"][i % 4]
        identity = f"{'sub/' if i % 3 == 0 else ''}doc{i:02d}{ext}"
        text = prose(rng, rng.randint(40, 160))
        (root / identity).parent.mkdir(parents=True, exist_ok=True)
        (root / identity).write_text(text, encoding="utf-8")
        documents[identity] = text
    return documents


def write_jsonl(path: Path, texts: list, field: str = "text") -> None:
    path.write_text("".join(json.dumps({field: t}) + "\n" for t in texts), encoding="utf-8")


def write_parquet(path: Path, column: str, values: list, type=pa.string()) -> None:
    pq.write_table(pa.table({column: pa.array(values, type=type)}), path)
