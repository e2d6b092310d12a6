"""A compact progress line per report, printed by Ray Train's controller (reaches the driver log).

    step 40/200 (20%) loss 5.412 val 5.501 lr 2.81e-03 | 12.3k tok/s, MFU 1.2%, data wait 0.4% [checkpoint]

A layer that keeps a dead expert (one in two reports in a row; see trainer.dead_expert_threshold)
gets a warning at the end of the line:

    ... | WARNING dead experts: block 2 has 1 (3 reports), block 3 has 2 (2 reports)
"""
from __future__ import annotations

import logging
import re
import sys
from typing import Any, Optional

from ray.train import UserCallback

_LOGGER_NAME = "moe_platform.train.progress"


def format_progress(metrics: dict[str, Any], total_steps: int, *, checkpoint: bool) -> str:
    step = int(metrics.get("step", 0))
    parts = [f"step {step}/{total_steps} ({100 * step / max(total_steps, 1):.0f}%)"]
    if "train/loss" in metrics:
        parts.append(f"loss {metrics['train/loss']:.3f}")
    if "val/loss" in metrics:
        parts.append(f"val {metrics['val/loss']:.3f}")
    if "train/lr" in metrics:
        parts.append(f"lr {metrics['train/lr']:.2e}")
    line = " ".join(parts)
    if "perf/tokens_per_s" in metrics:
        line += (
            f" | {metrics['perf/tokens_per_s'] / 1000:.1f}k tok/s, MFU {100 * metrics['perf/mfu']:.1f}%, "
            f"data wait {100 * metrics['perf/data_wait_fraction']:.1f}%"
        )
    return line + (" [checkpoint]" if checkpoint else "")


_DEAD_KEY = re.compile(r"moe/layer_(\d+)/dead_experts")
# A dead expert in this many reports in a row is a layer that *keeps* one, worth a warning.
DEAD_EXPERT_REPORTS = 2


class DeadExpertWatch:
    """Counts, per MoE block, the consecutive reports in which it had a dead expert."""

    def __init__(self) -> None:
        self.streaks: dict[int, int] = {}

    def update(self, metrics: dict[str, Any]) -> str:
        """Feed one report; returns the warning text ("" when no block keeps a dead expert)."""
        dead = {int(m.group(1)): int(value) for key, value in metrics.items() if (m := _DEAD_KEY.fullmatch(key))}
        if not dead:  # a report without routing statistics changes nothing
            return ""
        self.streaks = {block: self.streaks.get(block, 0) + 1 for block, count in dead.items() if count > 0}
        kept = [f"block {block} has {dead[block]} ({streak} reports)"
                for block, streak in sorted(self.streaks.items()) if streak >= DEAD_EXPERT_REPORTS]
        return f" | WARNING dead experts: {', '.join(kept)}" if kept else ""


class ProgressCallback(UserCallback):
    """Runs in the controller actor after every consolidated report."""

    def __init__(self, total_steps: int):
        self.total_steps = total_steps
        self._logger: Optional[logging.Logger] = None
        self._dead = DeadExpertWatch()

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        if metrics:
            line = format_progress(metrics[0], self.total_steps, checkpoint=checkpoint is not None)
            self._log().info(line + self._dead.update(metrics[0]))

    def _log(self) -> logging.Logger:
        # The controller is a Ray actor without logging configured; give our line a handler once.
        if self._logger is None:
            logger = logging.getLogger(_LOGGER_NAME)
            if not logger.handlers:
                handler = logging.StreamHandler(sys.stderr)
                handler.setFormatter(logging.Formatter("%(message)s"))
                logger.addHandler(handler)
                logger.setLevel(logging.INFO)
                logger.propagate = False
            self._logger = logger
        return self._logger

    def __getstate__(self) -> dict:
        # Loggers hold locks: ship only the plain fields to the controller.
        return {"total_steps": self.total_steps, "_logger": None, "_dead": self._dead}
