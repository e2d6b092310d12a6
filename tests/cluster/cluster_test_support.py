"""Helpers shared by the tests of cluster/ (a uniquely named module: test dirs have no __init__.py)."""

from __future__ import annotations

import subprocess
import sys
from importlib import metadata
from pathlib import Path

import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
CLUSTER_DIR = REPO_ROOT / "cluster"


def load_yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def project_image() -> str:
    """The one image every launcher and manifest runs, tagged with the project's version."""
    image = load_yaml(CLUSTER_DIR / "aws.yaml")["docker"]["image"]
    assert image.rsplit(":", 1)[1].startswith(metadata.version("moe-ray-platform")), image
    return image


def run_fresh_python(code: str, *args: str) -> subprocess.CompletedProcess:
    """Run `code` in a new interpreter at the repo root, where imports resolve as they do for a
    job. In-process they may not: pytest puts tests/ on sys.path, and tests/moe_platform/
    (no __init__.py) is then found as a namespace package before the installed moe_platform."""
    return subprocess.run(
        [sys.executable, "-c", code, *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )
