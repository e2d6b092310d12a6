"""Fixtures of the training tests; helpers live in train_test_support.py."""
from __future__ import annotations

import sys
from pathlib import Path

# pytest puts tests/ on sys.path, where tests/moe_platform/ (no __init__.py) is a namespace
# package that shadows the editable install's moe_platform ("unknown location"). A regular
# package anywhere on sys.path wins over namespace portions, so put platform/ there, as the
# data and serve tests do. (Project-wide fix: pytest `pythonpath = ["platform"]`.)
_PLATFORM_DIR = str(Path(__file__).resolve().parents[3] / "platform")
if _PLATFORM_DIR not in sys.path:
    sys.path.insert(0, _PLATFORM_DIR)
