"""Helpers of the training tests: a tiny learnable dataset written to the data contract, tiny stages.

The dataset follows the prepare job's contract (manifest.json, tokenizer.json,
train/ and validation/ Parquet shards of seq_len + 1 tokens) without running
the prepare job, so training tests depend only on the contract. Rows are
arithmetic progressions modulo the vocabulary (token[i+1] = token[i] + stride),
which a 2-layer model learns in tens of steps: a falling loss means learning.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from moe import ModelConfig, MoEConfig
from moe_platform.data import DocumentStats, Manifest, ShardInfo, SplitInfo, TokenizerInfo
from moe_platform.train import InitConfig, RunConfig, StageConfig, TrainerConfig

VOCAB_SIZE = 64
SEQ_LEN = 32


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
        config={"source": "tests/moe_platform/train/train_test_support.py"},
        created="2026-01-01T00:00:00Z",
        columns=columns,
    ).save(dataset_dir)
    return dataset_dir


def tiny_model(*, backend: str = "native", num_experts: int = 4, top_k: int = 2, **overrides) -> ModelConfig:
    return ModelConfig(
        vocab_size=VOCAB_SIZE, d_model=32, n_layers=2, n_heads=2, seq_len=SEQ_LEN, ffn_hidden=64,
        moe=MoEConfig(num_experts=num_experts, top_k=top_k, expert_hidden=32, backend=backend),
        **overrides,
    )


def tiny_stage(
    dataset_dir: str,
    output_dir: str,
    *,
    model: Optional[ModelConfig] = None,
    init_export_dir: Optional[str] = None,
    max_failures: int = 0,
    **trainer_overrides,
) -> StageConfig:
    """A stage that trains the tiny model for a few steps on 1 worker (override anything)."""
    trainer = dict(
        num_workers=1, micro_batch_size=8, lr=1e-2, warmup_steps=2, max_steps=12, log_every=2,
        report_every=4, eval_every=6, eval_batches=2, checkpoint_every=6, shuffle_buffer_rows=64,
    )
    trainer.update(trainer_overrides)
    return StageConfig(
        model=model or tiny_model(),
        dataset_dir=dataset_dir,
        trainer=TrainerConfig(**trainer),
        run=RunConfig(output_dir=output_dir, max_failures=max_failures, checkpoints_to_keep=3),
        init=InitConfig(export_dir=init_export_dir),
    )


def read_scalars(tensorboard_dir: str) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} from the run's event files, read by TensorBoard's own reader."""
    accumulator = event_accumulator(tensorboard_dir)
    return {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}


def event_accumulator(tensorboard_dir: str):
    from tensorboard.backend.event_processing import event_accumulator as ea

    accumulator = ea.EventAccumulator(
        tensorboard_dir, size_guidance={ea.SCALARS: 0, ea.HISTOGRAMS: 0, ea.IMAGES: 0}
    )
    accumulator.Reload()
    return accumulator


def read_json(path: str) -> dict:
    with open(path) as fh:
        return json.load(fh)


def replace_trainer(stage: StageConfig, **changes) -> StageConfig:
    return dataclasses.replace(stage, trainer=dataclasses.replace(stage.trainer, **changes))
