"""Checkpoints: what one holds, how every rank writes its part, and how a complete one is found.

A checkpoint directory (Ray Train merges the ranks' local directories into it):

    step_00000100/
      deepspeed/latest, deepspeed/state/...   engine.save_checkpoint from every rank: module,
                                              optimizer (ZeRO partitions), LR scheduler, per-expert files
      model/                                  the EP-independent export of the weights at this step, a
                                              Hugging Face directory (moe/export.py; what `jobs/export.py` copies)
      train_state.json                        step, tokens, data position, world layout, metrics
      stage.json                              the resolved StageConfig the run was started with
      rng/rank_00000.pt                       each rank's torch / python / numpy RNG states
      complete/rank_00000.json                written last by each rank: every file it wrote, with sizes

Ray registers a checkpoint only after every rank's report() returned, so a run
never resumes from one a dying worker left half-written. The `complete/`
manifests make the same guarantee for readers that scan directories (export,
evaluation) and guard a copy interrupted on the storage side: a checkpoint is
complete when all `world_size` ranks' manifests exist and every file they list
has the listed size.
"""
from __future__ import annotations

import json
import logging
import os
import random
import re
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Optional

import numpy as np
import torch

from moe.configs import from_dict
from moe_platform.train.batches import DataPosition

log = logging.getLogger(__name__)

DEEPSPEED_DIR = "deepspeed"
DEEPSPEED_TAG = "state"
MODEL_DIR = "model"
TRAIN_STATE_FILE = "train_state.json"
STAGE_FILE = "stage.json"
RNG_DIR = "rng"
COMPLETE_DIR = "complete"
CHECKPOINT_PREFIX = "step_"
_STEP_DIR = re.compile(rf"^{CHECKPOINT_PREFIX}(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint (or run directory) cannot be used; the message says which and why."""


# train_state.json's layout. 1: a single dataset kept only `position`, a mixture also `draws` and
# `task_positions`. 2: every stage is a mixture: `position` (the mixture's) and `task_positions`.
TRAIN_STATE_FORMAT = 2


@dataclass
class TrainState:
    """The loop's progress; everything besides the engine that resuming needs."""

    step: int = 0  # optimizer steps done
    tokens: int = 0  # global tokens trained on
    # The mixture's position (an epoch is plan.batches_per_epoch draws) and each task's own stream's
    # (by task name; a stage's single dataset is the task named "").
    position: DataPosition = field(default_factory=DataPosition)
    task_positions: dict[str, DataPosition] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "format_version": TRAIN_STATE_FORMAT}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainState:
        """The state in a train_state.json of any known format (its other keys - world size,
        metrics, ... - are the checkpoint's, not the state's)."""
        data = upgrade_train_state(data)
        return from_dict(cls, {f.name: data[f.name] for f in fields(cls) if f.name in data})


def upgrade_train_state(data: dict[str, Any]) -> dict[str, Any]:
    """A train_state.json of any known format as the current one; CheckpointError for a newer one."""
    version = data.get("format_version", 1)
    if version == TRAIN_STATE_FORMAT:
        return data
    if version != 1:
        raise CheckpointError(f"train_state.json has format version {version!r}; this version of the platform "
                              f"reads versions 1 to {TRAIN_STATE_FORMAT}")
    # Format 1: a single dataset's stream position was the whole state; as the one unnamed task of a
    # mixture, its position is both the mixture's and the task's (every draw picked it).
    upgraded = {key: value for key, value in data.items() if key != "draws"}
    upgraded["task_positions"] = data.get("task_positions") or {"": data["position"]}
    upgraded["format_version"] = TRAIN_STATE_FORMAT
    return upgraded


def checkpoint_dir_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step:08d}"


# ---- writing (every rank) -----------------------------------------------------------------------


def write_checkpoint(
    *,
    engine,
    state: TrainState,
    rank: int,
    world_size: int,
    expert_parallel_size: int,
    stage_dict: dict[str, Any],
    metrics: dict[str, float],
    write_model_export,
) -> str:
    """Write this rank's part of a checkpoint into a fresh local directory; returns it.

    Every rank must call this (DeepSpeed's save and the expert all-gather are collectives).
    `write_model_export(directory)` writes model/ (rank 0 writes, the others only join the gather).
    """
    directory = tempfile.mkdtemp(prefix=f"moe-ckpt-rank{rank}-")
    # DeepSpeed creates the directory on rank 0 only; other ranks write into their own local one.
    os.makedirs(os.path.join(directory, DEEPSPEED_DIR, DEEPSPEED_TAG), exist_ok=True)
    engine.save_checkpoint(os.path.join(directory, DEEPSPEED_DIR), tag=DEEPSPEED_TAG)
    write_model_export(os.path.join(directory, MODEL_DIR))
    if rank == 0:
        _write_json(
            os.path.join(directory, TRAIN_STATE_FILE),
            {
                **state.to_dict(),
                "world_size": world_size,
                "expert_parallel_size": expert_parallel_size,
                "metrics": metrics,
                "saved_at": time.time(),
            },
        )
        _write_json(os.path.join(directory, STAGE_FILE), stage_dict)
    os.makedirs(os.path.join(directory, RNG_DIR), exist_ok=True)
    torch.save(capture_rng_state(), os.path.join(directory, RNG_DIR, f"rank_{rank:05d}.pt"))
    _write_completion_manifest(directory, rank, world_size)
    return directory


def _write_completion_manifest(directory: str, rank: int, world_size: int) -> None:
    files = {}
    for root, _, names in os.walk(directory):
        for name in names:
            path = os.path.join(root, name)
            files[os.path.relpath(path, directory)] = os.path.getsize(path)
    os.makedirs(os.path.join(directory, COMPLETE_DIR), exist_ok=True)
    _write_json(
        os.path.join(directory, COMPLETE_DIR, f"rank_{rank:05d}.json"),
        {"rank": rank, "world_size": world_size, "files": files},
    )


def _write_json(path: str, data: dict[str, Any]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as fh:
        json.dump(data, fh, indent=2, sort_keys=True)


# ---- RNG ---------------------------------------------------------------------------------------


def capture_rng_state() -> dict[str, Any]:
    """RNG states as tensors, lists and ints only, so `torch.load(weights_only=True)` reads them."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---- reading ----------------------------------------------------------------------------------


def read_train_state(checkpoint_dir: str) -> dict[str, Any]:
    with open(os.path.join(checkpoint_dir, TRAIN_STATE_FILE)) as fh:
        return json.load(fh)


def incomplete_reason(checkpoint_dir: str) -> Optional[str]:
    """None when the checkpoint is complete, else why it is not (for the error message)."""
    state_file = os.path.join(checkpoint_dir, TRAIN_STATE_FILE)
    if not os.path.isfile(state_file):
        return f"{TRAIN_STATE_FILE} is missing"
    world_size = read_train_state(checkpoint_dir)["world_size"]
    for rank in range(world_size):
        manifest_file = os.path.join(checkpoint_dir, COMPLETE_DIR, f"rank_{rank:05d}.json")
        if not os.path.isfile(manifest_file):
            return f"rank {rank} of {world_size} never finished writing its part"
        with open(manifest_file) as fh:
            files = json.load(fh)["files"]
        for relative, size in files.items():
            path = os.path.join(checkpoint_dir, relative)
            if not os.path.isfile(path) or os.path.getsize(path) != size:
                return f"{relative} (written by rank {rank}) is missing or truncated"
    return None


def require_complete(checkpoint_dir: str) -> None:
    reason = incomplete_reason(checkpoint_dir)
    if reason:
        raise CheckpointError(f"checkpoint {checkpoint_dir} is incomplete: {reason}")


def restore_checkpoint(engine, checkpoint_dir: str, rank: int, world_size: int) -> TrainState:
    """Load engine, RNG and loop state of this rank from a complete checkpoint."""
    require_complete(checkpoint_dir)
    saved = read_train_state(checkpoint_dir)
    try:
        state = TrainState.from_dict(saved)
    except CheckpointError as exc:
        raise CheckpointError(f"checkpoint {checkpoint_dir}: {exc}") from None
    if saved["world_size"] != world_size:
        raise CheckpointError(
            f"checkpoint {checkpoint_dir} was written by {saved['world_size']} workers; this run has {world_size} "
            "(resuming needs the same trainer.num_workers)"
        )
    load_path, _ = engine.load_checkpoint(os.path.join(checkpoint_dir, DEEPSPEED_DIR), tag=DEEPSPEED_TAG)
    if load_path is None:
        raise CheckpointError(f"DeepSpeed found no checkpoint under {checkpoint_dir}/{DEEPSPEED_DIR}")
    rng = torch.load(os.path.join(checkpoint_dir, RNG_DIR, f"rank_{rank:05d}.pt"), weights_only=True)
    restore_rng_state(rng)
    return state


def step_of(checkpoint_dir: str) -> Optional[int]:
    match = _STEP_DIR.match(os.path.basename(os.path.normpath(checkpoint_dir)))
    return int(match.group(1)) if match else None


def latest_complete_checkpoint(checkpoints_dir: str) -> Optional[str]:
    """The highest-step complete checkpoint under a checkpoints/ directory (None if there is none)."""
    if not os.path.isdir(checkpoints_dir):
        return None
    candidates = sorted(
        (step_of(name), os.path.join(checkpoints_dir, name))
        for name in os.listdir(checkpoints_dir)
        if step_of(name) is not None
    )
    for step, path in reversed(candidates):
        reason = incomplete_reason(path)
        if reason is None:
            return path
        log.warning("skipping checkpoint %s: %s", path, reason)
    return None
