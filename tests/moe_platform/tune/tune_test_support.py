"""Helpers of the tune tests: moe_platform importable under pytest, a tiny dataset, a tiny base stage.

The dataset and stage helpers are the training tests' own (tests/moe_platform/train/
train_test_support.py, imported by path): a learnable dataset written to the data
contract and a tiny MoE stage, so a sweep trains what the training tests train.
"""
from __future__ import annotations

import sys
from pathlib import Path

# pytest puts tests/ on sys.path, where tests/moe_platform/ (no __init__.py) is a namespace
# package that hides the real moe_platform; the regular package's parent first wins (as in
# the serve and data tests). Ray workers inherit sys.path from the driver.
_REPO = Path(__file__).resolve().parents[3]
for _path in (str(_REPO / "platform"), str(_REPO / "tests" / "moe_platform" / "train")):
    if _path not in sys.path:
        sys.path.insert(0, _path)

from train_test_support import event_accumulator, read_json, tiny_stage, write_dataset  # noqa: E402

from moe_platform.train import StageConfig  # noqa: E402

__all__ = ["event_accumulator", "read_json", "sweep_base_stage", "write_dataset"]


def sweep_base_stage(dataset_dir: str, *, max_steps: int = 12, every: int = 4) -> StageConfig:
    """A stage short enough for a sweep on 2 cores: validation, reports and ASHA rungs every `every` steps."""
    return tiny_stage(
        dataset_dir, str(Path(dataset_dir).parent / "unused-run-dir"),
        max_steps=max_steps, warmup_steps=2, log_every=every, report_every=every, eval_every=every,
        eval_batches=2, checkpoint_every=max_steps,
    )
