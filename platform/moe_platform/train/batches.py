"""Ray Data -> training batches: datasets on the driver, resumable batch streams on workers.

Every stage trains on a mixture of tasks (a single dataset is a mixture of one unnamed task):
`TaskBatches` is one task's endless stream over its epochs, and `MixtureBatches` - the one stream
the loop reads - draws each micro-batch from a task chosen by weight.

Determinism is what makes resume exact. `DataConfig(preserve_order=True)` gives
every worker the same row sequence in every run of the same config, so a
worker that restarts from a checkpoint at (epoch, batches consumed) reopens
that epoch and skips the consumed batches: nothing repeated, nothing skipped.
Each epoch is shuffled differently by a per-worker shuffle buffer seeded from
(seed, epoch, rank) - not by `random_shuffle`, whose per-execution reseeding
restarts from epoch 0's order after a restart (docs/ray-notes.md, Data -> Train).

Shapes: B = micro_batch_size rows, L = seq_len + 1 tokens per row.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import random
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import torch

from moe_platform.data.storage import is_uri
from moe_platform.train.config import TrainerConfig
from moe_platform.train.plan import LOSS_MASK_COLUMN, TaskPlan, TrainPlan

log = logging.getLogger(__name__)

TRAIN, VALIDATION = "train", "validation"
_DTYPES = {"tokens": torch.int32, LOSS_MASK_COLUMN: torch.int8}


# ---- driver side ------------------------------------------------------------------------------


def train_name(task: str = "") -> str:
    """The dataset name a worker asks for: "train" for a stage's single (unnamed) dataset, else "train.<task>"."""
    return f"{TRAIN}.{task}" if task else TRAIN


def validation_name(task: str = "") -> str:
    return f"{VALIDATION}.{task}" if task else VALIDATION


def build_datasets(plan: TrainPlan) -> dict:
    """Each task's train (and validation) dataset, by `train_name`/`validation_name`, reading only
    the columns the loop uses."""
    datasets = {}
    for task in plan.tasks:
        datasets[train_name(task.name)] = read_columns(task.train_paths, task.columns)
        if task.eval_batches:
            datasets[validation_name(task.name)] = read_columns(task.validation_paths, task.columns)
    for dataset in datasets.values():
        # Progress bars of every epoch's execution would drown the training log.
        dataset.context.enable_progress_bars = False
    return datasets


# A prepared dataset up to this size on disk is read once, here, into Ray's object store.
IN_MEMORY_MAX_BYTES = 64 * 2**20


def read_columns(paths, columns):
    """A Parquet dataset (local paths or URIs) restricted to the columns the loop reads.

    Local files of at most IN_MEMORY_MAX_BYTES in all are read by this process (the driver) into
    Ray's object store, one block per file in the given order, the rows `read_parquet` would give.
    Streaming them instead starts read tasks in fresh worker processes on every epoch: measured
    on 2 cores for a 1 MB dataset, 3.5-4.8 s to the first batch and 1.6 s per later epoch,
    against 1.1-1.4 s and 0.07 s from the object store (benchmarks/RESULTS.md). Larger or remote
    datasets stream from their files, so memory never holds more than Ray Data's buffers."""
    import ray.data

    paths, columns = list(paths), list(columns)
    if _local_bytes(paths) <= IN_MEMORY_MAX_BYTES:
        import pyarrow.parquet as pq

        return ray.data.from_arrow([pq.read_table(path, columns=columns) for path in paths])
    return ray.data.read_parquet(paths).select_columns(columns)


def _local_bytes(paths: list[str]) -> float:
    """Total size of local files; infinite for none, a URI or a missing file (read_parquet reports it)."""
    if not paths or any(is_uri(str(path)) or not os.path.isfile(path) for path in paths):
        return float("inf")
    return sum(os.path.getsize(path) for path in paths)


def data_config():
    """Identical per-worker row sequences across runs: the basis of exact resume."""
    from ray.data import ExecutionOptions
    from ray.train import DataConfig

    # Locality-aware splitting depends on where blocks land, which differs between runs.
    return DataConfig(execution_options=ExecutionOptions(preserve_order=True), enable_shard_locality=False)


# ---- worker side ------------------------------------------------------------------------------


@dataclass
class DataPosition:
    """Where the next micro-batch comes from: `batches_in_epoch` already consumed in `epoch`."""

    epoch: int = 0
    batches_in_epoch: int = 0


def shuffle_seed(seed: int, epoch: int, rank: int) -> int:
    return (seed * 1_000_003 + epoch * 7_919 + rank) % (2**31)


class TaskBatches:
    """One task's endless stream of (B, L) micro-batches over epochs, resumable at a DataPosition.

    Every worker reads exactly `task.batches_per_epoch` batches per epoch, so all
    workers cross epoch boundaries together.
    """

    def __init__(self, shard, task: TaskPlan, *, batch_size: int, seed: int, rank: int,
                 shuffle_buffer_rows: int, prefetch_batches: int, device: torch.device,
                 position: Optional[DataPosition] = None):
        self._shard = shard
        self._task = task
        self._batch_size = batch_size
        self._seed = seed
        self._rank = rank
        self._shuffle_buffer_rows = shuffle_buffer_rows
        self._prefetch_batches = prefetch_batches
        self._device = device
        self.position = position or DataPosition()
        self._batches: Optional[Iterator[dict]] = None

    def __iter__(self) -> TaskBatches:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self.position.batches_in_epoch >= self._task.batches_per_epoch:
            self._close()
            self.position = DataPosition(epoch=self.position.epoch + 1)
        if self._batches is None:
            self._open_epoch()
        try:
            batch = next(self._batches)
        except StopIteration:
            raise RuntimeError(
                f"rank {self._rank} ran out of training rows in epoch {self.position.epoch} after "
                f"{self.position.batches_in_epoch} of {self._task.batches_per_epoch} batches: the dataset "
                "changed since the run was planned (its manifest row counts no longer match the shards)"
            ) from None
        self.position.batches_in_epoch += 1
        return batch

    def _open_epoch(self) -> None:
        epoch, skip = self.position.epoch, self.position.batches_in_epoch
        shuffle = self._shuffle_buffer_rows > 0
        self._batches = iter(
            self._shard.iter_torch_batches(
                batch_size=self._batch_size,
                dtypes={column: _DTYPES[column] for column in self._task.columns},
                device=self._device,
                drop_last=True,
                prefetch_batches=self._prefetch_batches,
                local_shuffle_buffer_size=self._shuffle_buffer_rows if shuffle else None,
                local_shuffle_seed=shuffle_seed(self._seed, epoch, self._rank) if shuffle else None,
            )
        )
        if skip:
            # Resuming mid-epoch: the same seed and row order replay the epoch; drop what was trained on.
            log.info("rank %d: resuming epoch %d, skipping %d consumed batches", self._rank, epoch, skip)
            for _ in range(skip):
                next(self._batches)

    def _close(self) -> None:
        if self._batches is not None and hasattr(self._batches, "close"):
            self._batches.close()
        self._batches = None


class MixtureBatches:
    """The loop's stream: micro-batches drawn from the tasks' streams by weight.

    Draw n picks its task from a generator seeded by (seed, n) alone - the same on every
    rank - so all workers read the same number of batches from each task and cross each
    task's epoch boundaries together (Ray Data's streaming split starts an epoch only when
    every worker asks for it). With one task every draw picks it, so a single dataset's
    batches are its own stream's. Resuming restores the mixture's position (its draws) and
    every task's position.
    """

    def __init__(self, streams: dict[str, TaskBatches], weights: dict[str, float], *, seed: int,
                 batches_per_epoch: int, position: Optional[DataPosition] = None):
        self._streams, self._seed, self._batches_per_epoch = streams, seed, batches_per_epoch
        self._names = list(streams)
        self._weights = [weights[name] for name in self._names]
        position = position or DataPosition()
        self.draws = position.epoch * batches_per_epoch + position.batches_in_epoch

    def __iter__(self) -> MixtureBatches:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        chooser = random.Random(self._seed * 1_000_003 + self.draws)
        name = chooser.choices(self._names, weights=self._weights)[0]
        self.draws += 1
        return next(self._streams[name])

    @property
    def position(self) -> DataPosition:
        """The mixture's own epoch and draws within it (an epoch is batches_per_epoch draws)."""
        return DataPosition(epoch=self.draws // self._batches_per_epoch,
                            batches_in_epoch=self.draws % self._batches_per_epoch)

    @property
    def task_positions(self) -> dict[str, DataPosition]:
        return {name: dataclasses.replace(stream.position) for name, stream in self._streams.items()}


def train_stream(plan: TrainPlan, shard_of: Callable[[str], Any], *, trainer: TrainerConfig, rank: int,
                 device: torch.device, position: Optional[DataPosition] = None,
                 task_positions: Optional[dict[str, DataPosition]] = None) -> MixtureBatches:
    """The loop's stream: every task's TaskBatches (task i shuffled by task_seed(trainer.seed, i)) over its
    shard (`shard_of(train_name(task))`), mixed by weight, resumed at the given positions."""
    task_positions = task_positions or {}
    streams = {
        task.name: TaskBatches(
            shard_of(train_name(task.name)), task, batch_size=trainer.micro_batch_size,
            seed=task_seed(trainer.seed, index), rank=rank, shuffle_buffer_rows=trainer.shuffle_buffer_rows,
            prefetch_batches=trainer.prefetch_batches, device=device, position=task_positions.get(task.name),
        )
        for index, task in enumerate(plan.tasks)
    }
    return MixtureBatches(streams, {task.name: task.weight for task in plan.tasks}, seed=trainer.seed,
                          batches_per_epoch=plan.batches_per_epoch, position=position)


def task_seed(seed: int, task_index: int) -> int:
    """Each task's shuffle stream differs from the others'; the first task's seed is the trainer's."""
    return seed + 7_777_777 * task_index


def validation_batches(shard, task: TaskPlan, *, batch_size: int, device: torch.device) -> Iterator[dict]:
    """Exactly `task.eval_batches` (B, L) batches from this worker's validation shard of the task."""
    batches = shard.iter_torch_batches(
        batch_size=batch_size,
        dtypes={column: _DTYPES[column] for column in task.columns},
        device=device,
        drop_last=True,
    )
    for index, batch in enumerate(batches):
        if index >= task.eval_batches:
            break
        yield batch
