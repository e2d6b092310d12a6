"""Fixtures of the stage tests (pipeline, comparison, pruning). See tests/moe_platform/train/conftest.py
for why platform/ goes on sys.path first."""
from __future__ import annotations

import sys
from pathlib import Path

_HERE = Path(__file__).resolve()
for path in (_HERE.parents[3] / "platform", _HERE.parents[1] / "train"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
