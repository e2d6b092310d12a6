"""Resumable data positions, completion manifests and RNG state: the parts of resume without Ray."""
from __future__ import annotations

import json
import os
import random

import numpy as np
import pytest
import torch

from moe_platform.train.checkpointing import (
    CheckpointError,
    TrainState,
    _write_completion_manifest,
    capture_rng_state,
    incomplete_reason,
    latest_complete_checkpoint,
    restore_rng_state,
)
from moe_platform.train.data import DataPosition, TrainBatches
from moe_platform.train.checkpoint_export import resolve_checkpoint
from moe_platform.train.plan import TrainPlan


class FakeShard:
    """Stands in for a Ray Data shard: row ids 0..rows-1, reordered by the shuffle seed, as Ray does."""

    def __init__(self, rows: int):
        self.rows = rows
        self.opened = []

    def iter_torch_batches(self, *, batch_size, local_shuffle_seed=None, **_):
        self.opened.append(local_shuffle_seed)
        order = np.random.default_rng(local_shuffle_seed).permutation(self.rows)
        for start in range(0, self.rows - batch_size + 1, batch_size):
            yield {"tokens": torch.tensor(order[start:start + batch_size])}


def make_plan(batches_per_epoch: int) -> TrainPlan:
    return TrainPlan(train_paths=(), validation_paths=(), tokenizer_path="", columns=("tokens",), seq_len=8,
                     train_rows=0, validation_rows=0, batches_per_epoch=batches_per_epoch, total_steps=100,
                     tokens_per_step=1, eval_batches=0)


def stream(shard, position=None, batches_per_epoch=5):
    return TrainBatches(shard, make_plan(batches_per_epoch), batch_size=4, seed=1, rank=0, shuffle_buffer_rows=16,
                        prefetch_batches=1, device=torch.device("cpu"), position=position)


def take(batches, n):
    return [tuple(next(batches)["tokens"].tolist()) for _ in range(n)]


def test_epochs_are_shuffled_differently_and_counted():
    shard = FakeShard(rows=22)  # 5 full batches of 4 per epoch
    batches = stream(shard)
    first_epoch, second_epoch = take(batches, 5), take(batches, 5)
    assert first_epoch != second_epoch
    assert batches.position == DataPosition(epoch=1, batches_in_epoch=5)
    assert len(set(shard.opened)) == 2  # a new seed per epoch


def test_resuming_at_a_position_continues_the_same_sequence():
    uninterrupted = take(stream(FakeShard(rows=22)), 12)
    # Stopped after 7 batches (epoch 1, 2 consumed): the resumed stream yields batch 8 onwards.
    resumed = stream(FakeShard(rows=22), position=DataPosition(epoch=1, batches_in_epoch=2))
    assert take(resumed, 5) == uninterrupted[7:12]


def test_a_shard_that_runs_dry_says_why():
    batches = stream(FakeShard(rows=10), batches_per_epoch=5)  # only 2 batches of 4
    take(batches, 2)
    with pytest.raises(RuntimeError, match="ran out of training rows"):
        next(batches)


def write_fake_checkpoint(directory, step: int, world_size: int = 2, complete_ranks=(0, 1)):
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "train_state.json"), "w") as fh:
        json.dump({**TrainState(step=step).to_dict(), "world_size": world_size}, fh)
    for rank in complete_ranks:
        part = os.path.join(directory, f"part_{rank}.bin")
        with open(part, "wb") as fh:
            fh.write(b"x" * (rank + 10))
        _write_completion_manifest(str(directory), rank, world_size)
    return str(directory)


def test_completion_manifests_decide_which_checkpoint_is_usable(tmp_path):
    checkpoints = tmp_path / "run" / "checkpoints"
    write_fake_checkpoint(checkpoints / "step_00000010", 10)
    half_written = write_fake_checkpoint(checkpoints / "step_00000020", 20, complete_ranks=(0,))
    assert incomplete_reason(half_written) == "rank 1 of 2 never finished writing its part"
    assert latest_complete_checkpoint(str(checkpoints)) == str(checkpoints / "step_00000010")
    assert resolve_checkpoint(str(tmp_path / "run")) == str(checkpoints / "step_00000010")
    with pytest.raises(CheckpointError, match="incomplete: rank 1 of 2"):
        resolve_checkpoint(half_written)
    # A file truncated after its rank finished (an interrupted copy) is caught too.
    truncated = checkpoints / "step_00000010" / "part_1.bin"
    truncated.write_bytes(b"x")
    assert "part_1.bin (written by rank 1) is missing or truncated" in incomplete_reason(str(truncated.parent))


def test_rng_state_round_trips_through_a_weights_only_load(tmp_path):
    torch.manual_seed(3)
    random.seed(3)
    np.random.seed(3)
    path = tmp_path / "rng.pt"
    torch.save(capture_rng_state(), path)
    expected = (torch.rand(3), random.random(), np.random.rand())
    restore_rng_state(torch.load(path, weights_only=True))
    assert (torch.rand(3), random.random(), np.random.rand())[1:] == expected[1:]
    torch.manual_seed(0)
    restore_rng_state(torch.load(path, weights_only=True))
    assert torch.equal(torch.rand(3), expected[0])
