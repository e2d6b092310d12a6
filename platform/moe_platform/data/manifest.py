"""The data contract: what `jobs/prepare.py` writes and every other job reads.

    <dataset_dir>/manifest.json
    <dataset_dir>/tokenizer.json
    <dataset_dir>/train/part-00000.parquet, part-00001.parquet, ...
    <dataset_dir>/validation/part-00000.parquet, ...

Every Parquet row holds a column "tokens" (list<int32>) of exactly seq_len + 1
tokens: a model reads tokens[:-1] and predicts tokens[1:]. Documents are packed
back to back, each followed by the end-of-document token, so a row can span
documents. `manifest.columns` lists the row columns: an instruction dataset
(data.kind=instruction) adds "loss_mask" (list<int8>, same length; 1 where the
token should be predicted, i.e. response tokens and their eos), so readers
select the columns they need instead of assuming "tokens" is the only one.

manifest.json is written last (atomically): a directory with a manifest is a
complete dataset. `Manifest.load(dataset_dir)` validates it and names what is
wrong; `manifest.split_paths("train")` gives the shard locations for
`ray.data.read_parquet`.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import pyarrow.fs as pafs

from moe_platform.data import storage
from moe_platform.data.errors import ManifestError

FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"  # eos/pad and a chat template, as exports carry them
SPLITS = ("train", "validation")
TOKENS_COLUMN = "tokens"
LOSS_MASK_COLUMN = "loss_mask"
# The row schema of a text dataset; an instruction dataset adds the loss mask.
DEFAULT_COLUMNS = {TOKENS_COLUMN: "list<int32>"}
INSTRUCTION_COLUMNS = {TOKENS_COLUMN: "list<int32>", LOSS_MASK_COLUMN: "list<int8>"}


@dataclass(frozen=True)
class ShardInfo:
    file: str  # relative to dataset_dir, e.g. "train/part-00000.parquet"
    rows: int
    tokens: int


@dataclass
class SplitInfo:
    rows: int
    tokens: int
    shards: list[ShardInfo]
    # Datasets with a loss_mask only (None, and absent from the JSON, otherwise):
    # targets the loss counts - loss_mask[1:] summed over rows, as a model predicts tokens[1:] -
    # and rows where that sum is 0 (kept, so packing stays the plain token stream; they add no loss).
    loss_tokens: Optional[int] = None
    rows_without_loss: Optional[int] = None


@dataclass(frozen=True)
class TokenizerInfo:
    file: str
    sha256: str
    eos_id: int
    pad_id: int


@dataclass(frozen=True)
class Skip:
    """A document (or whole file) left out, and why: 'line 7: malformed JSON'."""

    path: str
    reason: str


@dataclass
class DocumentStats:
    read: int
    used: int
    skipped: list[Skip]
    # Tokens after the last full row of each split: packed nowhere, counted here.
    tail_tokens_dropped: dict[str, int]


@dataclass
class Manifest:
    seq_len: int
    vocab_size: int
    tokenizer: TokenizerInfo
    splits: dict[str, SplitInfo]
    documents: DocumentStats
    fingerprint: str
    config: dict[str, Any]
    created: str
    format_version: int = FORMAT_VERSION
    columns: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_COLUMNS))
    # What was read: {"location", "default_corpus", "files", "bytes", "max_bytes", "max_documents"}.
    input: dict[str, Any] = field(default_factory=dict)
    # Where this manifest was loaded from; not part of the JSON.
    dataset_dir: str = field(default="", compare=False)

    # ---- reading ---------------------------------------------------------------------------

    @classmethod
    def load(cls, dataset_dir: str, *, check_files: bool = True) -> Manifest:
        """Read and validate <dataset_dir>/manifest.json (local path or URI).

        Raises ManifestError naming the problem: missing directory, missing
        manifest, unreadable JSON, wrong format version, a missing key, or
        (with check_files) a shard or tokenizer file that is not there.
        """
        dataset_dir = storage.absolute(dataset_dir)
        if storage.file_info(dataset_dir).type != pafs.FileType.Directory:
            raise ManifestError(
                f"dataset directory {dataset_dir} does not exist: "
                f"run `python jobs/prepare.py data.dataset_dir={dataset_dir}` first"
            )
        location = storage.join(dataset_dir, MANIFEST_FILE)
        if storage.file_info(location).type != pafs.FileType.File:
            raise ManifestError(
                f"{dataset_dir} has no {MANIFEST_FILE} (not a prepared dataset, or preparation did not finish): "
                f"run `python jobs/prepare.py data.dataset_dir={dataset_dir}`"
            )
        try:
            data = json.loads(storage.read_bytes(location))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ManifestError(f"{location} is not valid JSON: {exc}") from None
        manifest = cls.from_dict(data, dataset_dir=dataset_dir, source=location)
        if check_files:
            manifest.check_files()
        return manifest

    @classmethod
    def from_dict(cls, data: Any, *, dataset_dir: str = "", source: str = "manifest") -> Manifest:
        reader = _Reader(source)
        if not isinstance(data, dict):
            raise ManifestError(f"{source}: expected a JSON object, got {type(data).__name__}")
        version = reader.get(data, "format_version", int)
        if version != FORMAT_VERSION:
            raise ManifestError(
                f"{source}: format_version {version} is not supported (this code reads version {FORMAT_VERSION}); "
                "prepare the dataset again with this version of the platform"
            )
        tokenizer = reader.get(data, "tokenizer", dict)
        documents = reader.get(data, "documents", dict)
        splits = reader.get(data, "splits", dict)
        for name in SPLITS:
            reader.get(splits, name, dict, prefix="splits")
        return cls(
            format_version=version,
            seq_len=reader.get(data, "seq_len", int),
            vocab_size=reader.get(data, "vocab_size", int),
            tokenizer=TokenizerInfo(
                file=reader.get(tokenizer, "file", str, prefix="tokenizer"),
                sha256=reader.get(tokenizer, "sha256", str, prefix="tokenizer"),
                eos_id=reader.get(tokenizer, "eos_id", int, prefix="tokenizer"),
                pad_id=reader.get(tokenizer, "pad_id", int, prefix="tokenizer"),
            ),
            splits={name: reader.split(value, f"splits.{name}") for name, value in splits.items()},
            documents=DocumentStats(
                read=reader.get(documents, "read", int, prefix="documents"),
                used=reader.get(documents, "used", int, prefix="documents"),
                skipped=[
                    Skip(path=reader.get(s, "path", str, prefix="documents.skipped[]"),
                         reason=reader.get(s, "reason", str, prefix="documents.skipped[]"))
                    for s in reader.get(documents, "skipped", list, prefix="documents")
                ],
                tail_tokens_dropped=dict(reader.get(documents, "tail_tokens_dropped", dict, prefix="documents")),
            ),
            fingerprint=reader.get(data, "fingerprint", str),
            config=reader.get(data, "config", dict),
            created=reader.get(data, "created", str),
            columns=dict(data.get("columns", DEFAULT_COLUMNS)),
            input=dict(data.get("input", {})),
            dataset_dir=dataset_dir,
        )

    def check_files(self) -> None:
        """Every shard and the tokenizer exist (one listing call for all of them)."""
        relative = [self.tokenizer.file] + [s.file for split in self.splits.values() for s in split.shards]
        fs, root = storage.filesystem(self.dataset_dir)
        infos = fs.get_file_info([storage.join(root, r) for r in relative])
        missing = [r for r, info in zip(relative, infos) if info.type != pafs.FileType.File]
        if missing:
            shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
            raise ManifestError(
                f"dataset {self.dataset_dir} is incomplete: {shown} listed in {MANIFEST_FILE} but missing; "
                "prepare it again with data.overwrite=true"
            )

    # ---- using -----------------------------------------------------------------------------

    @property
    def row_len(self) -> int:
        """Tokens per row: seq_len inputs plus one shifted target."""
        return self.seq_len + 1

    @property
    def tokenizer_path(self) -> str:
        return storage.join(self.dataset_dir, self.tokenizer.file)

    def split(self, name: str) -> SplitInfo:
        if name not in self.splits:
            raise ManifestError(f"split {name!r} is not in {self.dataset_dir} (it has: {', '.join(self.splits)})")
        return self.splits[name]

    def split_paths(self, name: str) -> list[str]:
        """Absolute locations of a split's shards, in order (empty if the split has no rows)."""
        return [storage.join(self.dataset_dir, shard.file) for shard in self.split(name).shards]

    # ---- writing ---------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("dataset_dir")
        for split in data["splits"].values():  # a text dataset's splits keep their original keys
            for key in ("loss_tokens", "rows_without_loss"):
                if split[key] is None:
                    del split[key]
        order = ["format_version", "seq_len", "vocab_size", "tokenizer", "splits", "documents", "columns",
                 "input", "fingerprint", "config", "created"]
        return {key: data[key] for key in order}

    def save(self, dataset_dir: str | None = None) -> str:
        """Write manifest.json atomically; returns its location."""
        target = storage.absolute(dataset_dir or self.dataset_dir)
        location = storage.join(target, MANIFEST_FILE)
        text = json.dumps(self.to_dict(), indent=2) + "\n"
        storage.write_bytes_atomically(location, text.encode("utf-8"))
        self.dataset_dir = target
        return location


class _Reader:
    """Typed lookups into parsed JSON that name the key path when something is wrong."""

    def __init__(self, source: str):
        self.source = source

    def get(self, data: dict, key: str, kind: type, *, prefix: str = "") -> Any:
        name = f"{prefix}.{key}" if prefix else key
        if not isinstance(data, dict) or key not in data:
            raise ManifestError(f"{self.source}: missing key {name!r}")
        value = data[key]
        # bool is an int in Python; a manifest count must not be true/false.
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ManifestError(f"{self.source}: {name!r} should be {kind.__name__}, got {value!r}")
        return value

    def split(self, data: Any, prefix: str) -> SplitInfo:
        shards = self.get(data, "shards", list, prefix=prefix)
        optional = {key: self.get(data, key, int, prefix=prefix)
                    for key in ("loss_tokens", "rows_without_loss") if key in data}
        return SplitInfo(
            rows=self.get(data, "rows", int, prefix=prefix),
            tokens=self.get(data, "tokens", int, prefix=prefix),
            shards=[
                ShardInfo(
                    file=self.get(s, "file", str, prefix=f"{prefix}.shards[]"),
                    rows=self.get(s, "rows", int, prefix=f"{prefix}.shards[]"),
                    tokens=self.get(s, "tokens", int, prefix=f"{prefix}.shards[]"),
                )
                for s in shards
            ],
            **optional,
        )
