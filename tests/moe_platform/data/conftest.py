"""Fixtures of the data tests; helpers live in testkit.datasets."""
from __future__ import annotations

from pathlib import Path

import pytest

from testkit.datasets import write_corpus


@pytest.fixture()
def corpus(tmp_path) -> tuple[Path, dict[str, str]]:
    """A directory of small text files and {identity: text} of its documents."""
    root = tmp_path / "corpus"
    root.mkdir()
    return root, write_corpus(root)
