"""Fixtures of the data tests; helpers live in data_corpus.py."""
from __future__ import annotations

from pathlib import Path

import pytest

from data_corpus import write_corpus


@pytest.fixture()
def corpus(tmp_path) -> tuple[Path, dict[str, str]]:
    """A directory of small text files and {identity: text} of its documents."""
    root = tmp_path / "corpus"
    root.mkdir()
    return root, write_corpus(root)
