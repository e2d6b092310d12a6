"""A compact progress line per report, printed by Ray Train's controller (reaches the driver log).

    step 40/200 (20%) loss 5.412 val 5.501 lr 2.81e-03 | 12.3k tok/s, MFU 1.2%, data wait 0.4% [checkpoint]
"""
from __future__ import annotations

import logging
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


class ProgressCallback(UserCallback):
    """Runs in the controller actor after every consolidated report."""

    def __init__(self, total_steps: int):
        self.total_steps = total_steps
        self._logger: Optional[logging.Logger] = None

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        if metrics:
            self._log().info(format_progress(metrics[0], self.total_steps, checkpoint=checkpoint is not None))

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
        return {"total_steps": self.total_steps, "_logger": None}
