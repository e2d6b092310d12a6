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
from moe_platform.train.batches import DataPosition, TaskBatches, train_stream
from moe_platform.train.checkpoint_export import resolve_checkpoint
from moe_platform.train.config import TrainerConfig
from moe_platform.train.plan import TaskPlan, TrainPlan


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


def make_task(batches_per_epoch: int, name: str = "") -> TaskPlan:
    return TaskPlan(name=name, weight=1.0, train_paths=(), validation_paths=(), columns=("tokens",),
                    batches_per_epoch=batches_per_epoch, eval_batches=0)


def stream(shard, position=None, batches_per_epoch=5):
    return TaskBatches(shard, make_task(batches_per_epoch), batch_size=4, seed=1, rank=0, shuffle_buffer_rows=16,
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


# The first row id of each of 13 batches (2.6 epochs of 5) that the loop read from a single dataset
# (seed 7, batches of 4 out of 22 rows) before a single dataset became a mixture of one task:
# recorded from that code's TrainBatches, the stream its loop built for a stage without tasks.
SINGLE_DATASET_ORDER = {
    0: [20, 9, 10, 7, 18, 12, 6, 20, 1, 0, 5, 14, 8],
    1: [20, 5, 9, 2, 8, 18, 7, 5, 12, 4, 3, 15, 0],
}


def single_dataset_stream(rank, state=None):
    task = make_task(5)
    plan = TrainPlan(tasks=(task,), tokenizer_path="", columns=("tokens",), seq_len=8, train_rows=22,
                     validation_rows=0, batches_per_epoch=5, total_steps=100, tokens_per_step=1, eval_batches=0)
    trainer = TrainerConfig(seed=7, micro_batch_size=4, shuffle_buffer_rows=16, prefetch_batches=1)
    state = state or TrainState()
    return train_stream(plan, lambda name: FakeShard(rows=22) if name == "train" else None, trainer=trainer,
                        rank=rank, device=torch.device("cpu"), position=state.position,
                        task_positions=state.task_positions)


@pytest.mark.parametrize("rank", [0, 1])
def test_a_single_dataset_is_read_in_exactly_the_order_it_was_before_mixtures_of_one(rank):
    assert [row for row, *_ in take(single_dataset_stream(rank), 13)] == SINGLE_DATASET_ORDER[rank]


def test_a_checkpoint_of_the_old_format_resumes_at_the_same_batch():
    """Format 1 (before every stage was a mixture): a single dataset's state was its one position."""
    old = {"step": 7, "tokens": 56, "position": {"epoch": 1, "batches_in_epoch": 2}, "world_size": 1}
    state = TrainState.from_dict(old)
    assert state.task_positions == {"": DataPosition(1, 2)} and state.position == DataPosition(1, 2)
    resumed = single_dataset_stream(0, state)
    assert [row for row, *_ in take(resumed, 6)] == SINGLE_DATASET_ORDER[0][7:13]
    assert resumed.position == DataPosition(epoch=2, batches_in_epoch=3)
    # A mixture's format-1 state: draws are implied by its position.
    mixture = {"step": 3, "tokens": 9, "position": {"epoch": 0, "batches_in_epoch": 3}, "draws": 3,
               "task_positions": {"a": {"epoch": 0, "batches_in_epoch": 3}}}
    assert TrainState.from_dict(mixture).task_positions == {"a": DataPosition(0, 3)}
    with pytest.raises(CheckpointError, match="train_state.json has format version 3; .* reads versions 1 to 2"):
        TrainState.from_dict({**old, "format_version": 3})
    assert TrainState.from_dict(TrainState(step=2).to_dict()) == TrainState(step=2)


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
