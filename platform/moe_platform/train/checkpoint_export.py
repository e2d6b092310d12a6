"""Copy a checkpoint's EP-independent model files into a standalone export directory.

Every checkpoint already holds `model/` (a complete export, moe/export.py: a Hugging
Face model directory), written by rank 0 after an all-gather of the experts, at any
expert-parallel size. Exporting is therefore a verified copy: no Ray, no GPU,
no knowledge of the worker count, and no pickle (DeepSpeed's own files are
only for resuming).

`resolve_checkpoint` accepts a checkpoint directory, a run's checkpoints/
directory, or a run.output_dir, and picks the newest complete checkpoint.
"""
from __future__ import annotations

import json
import logging
import os
import shutil

from moe.export import ADAPTER_DIR, check_export, export_blocker, export_files, load_export_config
from moe_platform.train.checkpointing import (
    MODEL_DIR,
    TRAIN_STATE_FILE,
    CheckpointError,
    latest_complete_checkpoint,
    require_complete,
)

log = logging.getLogger(__name__)

_CHECKPOINTS_DIR = "checkpoints"


def resolve_checkpoint(path: str) -> str:
    """A checkpoint dir, a checkpoints/ dir or a run dir -> the newest complete checkpoint in it."""
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.exists(path):
        raise CheckpointError(f"{path} does not exist")
    if os.path.isfile(os.path.join(path, TRAIN_STATE_FILE)):
        require_complete(path)
        return path
    for checkpoints_dir in (os.path.join(path, _CHECKPOINTS_DIR), path):
        latest = latest_complete_checkpoint(checkpoints_dir)
        if latest is not None:
            return latest
    raise CheckpointError(
        f"{path} holds no complete checkpoint (expected a run.output_dir, its {_CHECKPOINTS_DIR}/ directory, "
        "or a step_* checkpoint directory)"
    )


def export_checkpoint(path: str, output_dir: str) -> str:
    """Copy the newest complete checkpoint's model files under `path` to output_dir; returns output_dir.

    The copy goes to a sibling temporary directory first, then replaces output_dir in one
    rename, so a reader never sees a half-written export.
    """
    checkpoint = resolve_checkpoint(path)
    source = os.path.join(checkpoint, MODEL_DIR)
    try:
        check_export(source, f"checkpoint {MODEL_DIR}/")
    except ValueError as exc:
        raise CheckpointError(f"checkpoint {checkpoint} cannot be exported: {exc}") from None
    output_dir = os.path.abspath(output_dir)
    temporary = output_dir + ".partial"
    shutil.rmtree(temporary, ignore_errors=True)
    os.makedirs(temporary)
    for name in export_files(source):
        shutil.copy2(os.path.join(source, name), os.path.join(temporary, name))
    if os.path.isdir(os.path.join(source, ADAPTER_DIR)):  # a LoRA stage: the adapters alone, too
        shutil.copytree(os.path.join(source, ADAPTER_DIR), os.path.join(temporary, ADAPTER_DIR))
    _write_provenance(temporary, checkpoint)
    if os.path.isdir(output_dir):
        shutil.rmtree(output_dir)
    os.replace(temporary, output_dir)
    log.info("exported %s -> %s", checkpoint, output_dir)
    blocker = export_blocker(load_export_config(output_dir))
    if blocker:
        log.warning("transformers cannot load %s: %s (config.json model_type=moe_platform)", output_dir, blocker)
    return output_dir


def _write_provenance(directory: str, checkpoint: str) -> None:
    """Which checkpoint (and step) an export came from; JSON, not part of what load_export reads."""
    with open(os.path.join(checkpoint, TRAIN_STATE_FILE)) as fh:
        state = json.load(fh)
    with open(os.path.join(directory, "provenance.json"), "w") as fh:
        json.dump({"checkpoint": checkpoint, "step": state["step"], "tokens": state["tokens"],
                   "metrics": state.get("metrics", {})}, fh, indent=2, sort_keys=True)
