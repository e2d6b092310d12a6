"""The manifest contract: JSON layout, load-time validation, shard paths."""
import json

import pytest

from moe_platform.data import FORMAT_VERSION, Manifest, ManifestError
from moe_platform.data.manifest import DocumentStats, ShardInfo, Skip, SplitInfo, TokenizerInfo


def make_manifest(dataset_dir="") -> Manifest:
    return Manifest(
        seq_len=8,
        vocab_size=300,
        tokenizer=TokenizerInfo(file="tokenizer.json", sha256="ab" * 32, eos_id=0, pad_id=1),
        splits={
            "train": SplitInfo(rows=3, tokens=27, shards=[ShardInfo("train/part-00000.parquet", 2, 18),
                                                         ShardInfo("train/part-00001.parquet", 1, 9)]),
            "validation": SplitInfo(rows=1, tokens=9, shards=[ShardInfo("validation/part-00000.parquet", 1, 9)]),
        },
        documents=DocumentStats(read=5, used=4, skipped=[Skip("/c/x.bin", "binary file (NUL byte at 3)")],
                                tail_tokens_dropped={"train": 2, "validation": 5}),
        fingerprint="f" * 64,
        config={"seq_len": 8},
        created="2026-01-01T00:00:00+00:00",
        dataset_dir=dataset_dir,
    )


def write_dataset_files(root, manifest: Manifest) -> None:
    for relative in [manifest.tokenizer.file] + [s.file for split in manifest.splits.values() for s in split.shards]:
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_bytes(b"x")


def test_save_and_load_round_trip_with_contract_layout(tmp_path):
    manifest = make_manifest()
    write_dataset_files(tmp_path, manifest)
    manifest.save(str(tmp_path))
    data = json.loads((tmp_path / "manifest.json").read_text())
    assert data["format_version"] == FORMAT_VERSION == 1
    assert set(data) >= {"format_version", "seq_len", "vocab_size", "tokenizer", "splits", "documents",
                         "fingerprint", "config", "created"}
    assert data["splits"]["train"]["shards"][1] == {"file": "train/part-00001.parquet", "rows": 1, "tokens": 9}
    assert data["documents"]["skipped"] == [{"path": "/c/x.bin", "reason": "binary file (NUL byte at 3)"}]
    assert data["documents"]["tail_tokens_dropped"] == {"train": 2, "validation": 5}
    assert data["columns"] == {"tokens": "list<int32>"}
    loaded = Manifest.load(str(tmp_path))
    assert loaded == manifest
    assert loaded.dataset_dir == str(tmp_path)
    assert loaded.split_paths("train") == [f"{tmp_path}/train/part-00000.parquet", f"{tmp_path}/train/part-00001.parquet"]
    assert loaded.tokenizer_path == f"{tmp_path}/tokenizer.json"
    assert loaded.row_len == 9


def test_missing_directory(tmp_path):
    with pytest.raises(ManifestError, match="does not exist.*jobs/prepare.py"):
        Manifest.load(str(tmp_path / "nope"))


def test_missing_manifest(tmp_path):
    with pytest.raises(ManifestError, match="has no manifest.json"):
        Manifest.load(str(tmp_path))


def test_wrong_format_version(tmp_path):
    data = make_manifest().to_dict()
    data["format_version"] = 2
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ManifestError, match="format_version 2 is not supported.*version 1"):
        Manifest.load(str(tmp_path))


def test_missing_key_is_named(tmp_path):
    data = make_manifest().to_dict()
    del data["splits"]["validation"]["rows"]
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ManifestError, match="missing key 'splits.validation.rows'"):
        Manifest.load(str(tmp_path))


def test_not_json(tmp_path):
    (tmp_path / "manifest.json").write_text("{oops")
    with pytest.raises(ManifestError, match="not valid JSON"):
        Manifest.load(str(tmp_path))


def test_missing_shard_is_reported(tmp_path):
    manifest = make_manifest()
    write_dataset_files(tmp_path, manifest)
    manifest.save(str(tmp_path))
    (tmp_path / "train" / "part-00001.parquet").unlink()
    with pytest.raises(ManifestError, match="train/part-00001.parquet listed in manifest.json but missing"):
        Manifest.load(str(tmp_path))
    assert Manifest.load(str(tmp_path), check_files=False).split("train").rows == 3


def test_unknown_split_is_named(tmp_path):
    with pytest.raises(ManifestError, match="split 'test' is not in"):
        make_manifest(str(tmp_path)).split_paths("test")


def test_loss_counts_round_trip_and_stay_out_of_text_manifests(tmp_path):
    manifest = make_manifest()
    manifest.columns = {"tokens": "list<int32>", "loss_mask": "list<int8>"}
    manifest.splits["train"].loss_tokens, manifest.splits["train"].rows_without_loss = 11, 1
    write_dataset_files(tmp_path, manifest)
    manifest.save(str(tmp_path))
    data = json.loads((tmp_path / "manifest.json").read_text())
    assert data["splits"]["train"]["loss_tokens"] == 11 and "loss_tokens" not in data["splits"]["validation"]
    loaded = Manifest.load(str(tmp_path))
    assert loaded == manifest and loaded.splits["validation"].loss_tokens is None
