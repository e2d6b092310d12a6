"""The prepare pipeline end to end on the session's real local Ray (tiny corpora, vocab 300)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from testkit.datasets import write_corpus, write_jsonl, write_parquet
from tokenizers import Tokenizer

from moe_platform.data import DataConfig, DataError, Manifest
from moe_platform.data.packing import assign_split
from moe_platform.data.prepare import IN_PROGRESS_FILE, prepare_dataset

pytestmark = pytest.mark.usefixtures("ray_cluster")


def config_for(root: Path, dataset_dir: Path, **overrides) -> DataConfig:
    settings = dict(input=str(root), dataset_dir=str(dataset_dir), vocab_size=300, seq_len=16,
                    validation_fraction=0.25, shard_rows=8, files_per_task=4)
    settings.update(overrides)
    return DataConfig(**settings)


def split_tokens(manifest: Manifest, split: str) -> np.ndarray:
    """Every token of a split, shard by shard, checking the row contract on the way."""
    rows = []
    for path in manifest.split_paths(split):
        table = pq.read_table(path)
        assert table.schema.names == ["tokens"]  # text data has no loss_mask column
        column_type = table.schema.field("tokens").type
        assert pa.types.is_list(column_type) and column_type.value_type == pa.int32()
        assert pq.ParquetFile(path).metadata.row_group(0).column(0).compression == "ZSTD"
        rows.extend(table.column("tokens").to_pylist())
    assert all(len(row) == manifest.row_len for row in rows)
    return np.array(rows, dtype=np.int32).reshape(-1)


def expected_stream(manifest: Manifest, documents: dict[str, str], split: str, fraction: float) -> np.ndarray:
    """The tokenized corpus of a split: documents in sorted order, each + eos, with the saved tokenizer."""
    tokenizer = Tokenizer.from_file(manifest.tokenizer_path)
    tokenizer.encode_special_tokens = True
    chosen = [documents[i] for i in sorted(documents) if assign_split(i, fraction) == split]
    return np.array([t for text in chosen for t in tokenizer.encode(text).ids + [manifest.tokenizer.eos_id]],
                    dtype=np.int32)


def shard_hashes(dataset_dir: Path) -> dict[str, str]:
    files = sorted(p for p in dataset_dir.rglob("*") if p.is_file() and p.name != "manifest.json")
    return {str(p.relative_to(dataset_dir)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def test_shards_hold_the_tokenized_corpus_in_order_less_the_tail(corpus, tmp_path):
    root, documents = corpus
    (root / "binary.txt").write_bytes(b"\x00\x01\x02")
    (root / "notes.pdf").write_bytes(b"%PDF")
    result = prepare_dataset(config_for(root, tmp_path / "ds"))
    assert not result.reused
    manifest = Manifest.load(str(tmp_path / "ds"))
    assert manifest.vocab_size == 300 and manifest.seq_len == 16
    assert (manifest.tokenizer.eos_id, manifest.tokenizer.pad_id) == (0, 1)
    for split in ("train", "validation"):
        got, want = split_tokens(manifest, split), expected_stream(manifest, documents, split, 0.25)
        tail = manifest.documents.tail_tokens_dropped[split]
        assert len(got) == manifest.splits[split].tokens == manifest.splits[split].rows * 17 > 0
        assert len(got) + tail == len(want) and tail < 17
        assert np.array_equal(got, want[: len(want) - tail])
    assert manifest.splits["train"].rows > 8  # more than one shard
    assert len(manifest.splits["train"].shards) >= 2
    docs = manifest.documents
    assert (docs.read, docs.used) == (len(documents) + 2, len(documents))
    assert {(Path(s.path).name, s.reason) for s in docs.skipped} == {
        ("binary.txt", "binary file (NUL byte at 0)"), ("notes.pdf", "unsupported file type '.pdf'")}
    data = json.loads((tmp_path / "ds" / "manifest.json").read_text())
    assert data["config"]["input"] == str(root) and data["input"]["tokenizer_trained"] is True
    assert data["columns"] == {"tokens": "list<int32>"} and set(data["splits"]["train"]) == {"rows", "tokens", "shards"}
    assert "2 skipped: 1 binary file, 1 unsupported file type '.pdf'" in result.summary()


def test_rerun_reuses_and_rewrite_is_byte_identical(corpus, tmp_path):
    root, _ = corpus
    dataset_dir = tmp_path / "ds"
    first = prepare_dataset(config_for(root, dataset_dir))
    before = shard_hashes(dataset_dir)
    again = prepare_dataset(config_for(root, dataset_dir))
    assert again.reused and again.manifest.fingerprint == first.manifest.fingerprint
    # Rewritten with other task sizes: task layout is not part of the output.
    rewritten = prepare_dataset(config_for(root, dataset_dir, overwrite=True, files_per_task=1, num_cpus_per_task=0.25))
    assert not rewritten.reused
    assert shard_hashes(dataset_dir) == before
    assert len(before) >= 4  # tokenizer + shards of both splits


def test_a_different_dataset_is_never_silently_overwritten(corpus, tmp_path):
    root, _ = corpus
    dataset_dir = tmp_path / "ds"
    prepare_dataset(config_for(root, dataset_dir))
    with pytest.raises(DataError, match=r"holds a different dataset \(data.seq_len differs; .*another data.dataset_dir or pass data.overwrite=true"):
        prepare_dataset(config_for(root, dataset_dir, seq_len=8))
    assert Manifest.load(str(dataset_dir)).seq_len == 16  # untouched
    assert prepare_dataset(config_for(root, dataset_dir, seq_len=8, overwrite=True)).manifest.seq_len == 8


def test_a_directory_of_other_files_is_refused(corpus, tmp_path):
    root, _ = corpus
    dataset_dir = tmp_path / "ds"
    dataset_dir.mkdir()
    (dataset_dir / "keep.txt").write_text("mine")
    with pytest.raises(DataError, match="holds files that are not a prepared dataset"):
        prepare_dataset(config_for(root, dataset_dir))


def test_zero_usable_documents_is_an_error_with_the_reasons(tmp_path):
    root = tmp_path / "bad"
    root.mkdir()
    (root / "a.txt").write_bytes(b"\x00binary")
    (root / "b.txt").write_bytes(b"\xc3\x28 broken")
    write_jsonl(root / "c.jsonl", ["x"], field="body")
    with pytest.raises(DataError, match=r"no usable documents in .*3 skipped: 1 binary file, 1 invalid UTF-8, 1 no 'text' field"):
        prepare_dataset(config_for(root, tmp_path / "ds"))


def test_zero_usable_documents_with_a_given_tokenizer_leaves_no_half_dataset(corpus, tmp_path):
    root, _ = corpus
    first = prepare_dataset(config_for(root, tmp_path / "ds"))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.md").write_text("   \n")
    with pytest.raises(DataError, match="no usable documents .*1 empty document"):
        prepare_dataset(config_for(bad, tmp_path / "ds2", tokenizer=first.manifest.tokenizer_path))
    assert list((tmp_path / "ds2").iterdir()) == []


def test_too_little_text_for_one_row(corpus, tmp_path):
    root, _ = corpus
    with pytest.raises(DataError, match="too little text for one row.*lower data.seq_len"):
        prepare_dataset(config_for(root, tmp_path / "ds", seq_len=100_000))
    assert not (tmp_path / "ds" / IN_PROGRESS_FILE).exists()
    assert not (tmp_path / "ds" / "manifest.json").exists()


def test_reusing_a_tokenizer_and_mixed_record_files_with_a_document_cap(corpus, tmp_path):
    root, _ = corpus
    first = prepare_dataset(config_for(root, tmp_path / "ds")).manifest
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    write_jsonl(mixed / "a.jsonl", [f"record {i} " * 20 for i in range(10)])
    write_parquet(mixed / "b.parquet", "content", [f"row {i} " * 20 for i in range(10)])
    result = prepare_dataset(config_for(mixed, tmp_path / "ds2", tokenizer=first.tokenizer_path,
                                        text_column="content", max_documents=14, validation_fraction=0.0))
    manifest = result.manifest
    assert manifest.tokenizer.sha256 == first.tokenizer.sha256 and manifest.input["tokenizer_trained"] is False
    assert (manifest.documents.read, manifest.documents.used) == (14, 14)
    assert manifest.splits["validation"].rows == 0 and manifest.split_paths("validation") == []


def test_extra_documents_keep_their_split(tmp_path):
    """A document's split depends on its identity only: adding files moves no one."""
    root = tmp_path / "c"
    root.mkdir()
    documents = write_corpus(root, files=8, seed=3)
    small = prepare_dataset(config_for(root, tmp_path / "a", validation_fraction=0.5)).manifest
    (root / "zzz.txt").write_text("an extra document " * 30)
    bigger = prepare_dataset(config_for(root, tmp_path / "b", validation_fraction=0.5)).manifest
    assert bigger.fingerprint != small.fingerprint
    assert bigger.documents.used == len(documents) + 1


def test_no_input_file_crashes_prepare(corpus, tmp_path):
    """Files as a new user has them: every bad record is skipped with its file, line and reason."""
    root, documents = corpus
    separators = json.dumps({"text": "kept\u2028whole\u2029record\u0085here " * 4}, ensure_ascii=False)
    (root / "deep.jsonl").write_text('{"text": "shallow record"}\n' + "[" * 50_000 + "\n" + separators + "\n")
    (root / "mixed.jsonl").write_bytes(b'{"text": "caf\xe9"}\n{"text": "\\udc00"}\n[1, 2]\n{"text": 1e999999}\n')
    (root / "empty.jsonl").write_bytes(b"")
    (root / "empty.parquet").write_bytes(b"")
    (root / "archive.jsonl").write_bytes(b"PK\x03\x04\x00\x00")
    manifest = prepare_dataset(config_for(root, tmp_path / "ds")).manifest
    assert manifest.documents.used == len(documents) + 2  # the shallow record and the one with separators
    reasons = {(Path(s.path).name, s.reason.split(" (")[0]) for s in manifest.documents.skipped}
    assert reasons == {
        ("deep.jsonl", "line 2: malformed JSON"),
        ("mixed.jsonl", "line 1: invalid UTF-8 at byte 13"),
        ("mixed.jsonl", "line 2: text holds an unpaired surrogate"),
        ("mixed.jsonl", "line 3: no 'text' field"),
        ("mixed.jsonl", "line 4: text is float, not a string"),
        ("empty.jsonl", "no documents"),
        ("empty.parquet", "read error: Parquet file size is 0 bytes"),
        ("archive.jsonl", "binary file"),
    }
