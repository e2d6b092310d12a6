"""Small generated corpora for the data tests (a few KB each: fast on 2 cores).

A uniquely named module (not conftest) so test files can import it unambiguously."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

WORDS = (
    "def class return import yield lambda tensor expert router token batch gradient layer "
    "the of and to in is that for it with as on be at by this had not are but from or have"
).split()


def prose(rng: random.Random, words: int) -> str:
    lines, line = [], []
    for _ in range(words):
        line.append(rng.choice(WORDS))
        if len(line) >= rng.randint(4, 12):
            lines.append(" ".join(line))
            line = []
    lines.append(" ".join(line))
    return "\n".join(lines) + "\n"


def write_corpus(root: Path, *, files: int = 16, seed: int = 0) -> dict[str, str]:
    """Text files of several types under root; returns {identity: text} of every document."""
    rng = random.Random(seed)
    documents = {}
    for i in range(files):
        ext = [".txt", ".md", ".py", ".rst"][i % 4]
        identity = f"{'sub/' if i % 3 == 0 else ''}doc{i:02d}{ext}"
        text = prose(rng, rng.randint(40, 160))
        (root / identity).parent.mkdir(parents=True, exist_ok=True)
        (root / identity).write_text(text, encoding="utf-8")
        documents[identity] = text
    return documents


def write_jsonl(path: Path, texts: list, field: str = "text") -> None:
    path.write_text("".join(json.dumps({field: t}) + "\n" for t in texts), encoding="utf-8")


def write_parquet(path: Path, column: str, values: list, type=pa.string()) -> None:
    pq.write_table(pa.table({column: pa.array(values, type=type)}), path)
