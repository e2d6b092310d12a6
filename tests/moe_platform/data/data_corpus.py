"""Moved to testkit.datasets (tests/testkit/datasets.py): import from there. This alias stays only
so that branches written against the old module still import; delete it once nothing does."""
from testkit.datasets import WORDS, prose, write_corpus, write_jsonl, write_parquet  # noqa: F401
