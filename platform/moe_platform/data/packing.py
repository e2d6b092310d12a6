"""Where each token goes: the split of a document, its place in a row, the row's shard.

Packing is a pure function of the documents' token arrays in order: tokens
are concatenated (each document already ends with eos) and cut into rows of
`row_len` = seq_len + 1 tokens. Nothing is padded and nothing is dropped
except the tail after the last full row, which the manifest declares. So the
rows of a split, read in shard order and flattened, equal its documents'
tokens minus that tail - the property the tests check. An instruction dataset
packs its loss mask with a second packer fed the same lengths, so mask and
tokens stay aligned position by position.

Shapes: R = rows, L = row_len, N = tokens.
"""
from __future__ import annotations

import hashlib
from typing import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from moe_platform.data import storage
from moe_platform.data.manifest import LOSS_MASK_COLUMN, TOKENS_COLUMN, ShardInfo

TRAIN, VALIDATION = "train", "validation"
ROW_SCHEMA = pa.schema([pa.field(TOKENS_COLUMN, pa.list_(pa.int32()), nullable=False)])
MASKED_ROW_SCHEMA = ROW_SCHEMA.append(pa.field(LOSS_MASK_COLUMN, pa.list_(pa.int8()), nullable=False))


def assign_split(identity: str, validation_fraction: float, seed: int = 0) -> str:
    """'validation' for a stable pseudo-random fraction of documents, else 'train'.

    Depends on the document's own identity only, so adding documents never moves others.
    """
    digest = hashlib.sha256(f"{seed}:{identity}".encode("utf-8")).digest()
    position = int.from_bytes(digest[:8], "big") / 2**64  # uniform in [0, 1)
    return VALIDATION if position < validation_fraction else TRAIN


class RowPacker:
    """Concatenates token arrays and emits full rows; the leftover carries to the next call."""

    def __init__(self, row_len: int, dtype: type = np.int32):
        self.row_len = row_len
        self._carry = np.empty(0, dtype=dtype)  # int32 tokens, or an int8 loss mask

    def add(self, tokens_N: np.ndarray) -> np.ndarray:
        """Append tokens; return the rows completed, shape (R, L) with R possibly 0."""
        stream_N = np.concatenate([self._carry, tokens_N.astype(self._carry.dtype, copy=False)])
        full = len(stream_N) // self.row_len * self.row_len
        self._carry = stream_N[full:].copy()
        return stream_N[:full].reshape(-1, self.row_len)

    @property
    def tail(self) -> int:
        """Tokens waiting for a row; after the last document, the declared remainder."""
        return len(self._carry)


def pack(documents: Iterable[np.ndarray], row_len: int) -> tuple[np.ndarray, int]:
    """All rows of a sequence of documents and the tail length (the reference packing)."""
    packer = RowPacker(row_len)
    rows = [packer.add(doc) for doc in documents]
    rows_RL = np.concatenate(rows) if rows else np.empty((0, row_len), dtype=np.int32)
    return rows_RL, packer.tail


def rows_to_table(rows_RL: np.ndarray, mask_RL: np.ndarray | None = None) -> pa.Table:
    """(R, L) int32 [+ (R, L) int8 mask] -> list<int32> tokens [+ list<int8> loss_mask], no Python loop."""
    count, row_len = rows_RL.shape
    offsets = pa.array(np.arange(0, (count + 1) * row_len, row_len, dtype=np.int32))
    tokens = pa.ListArray.from_arrays(offsets, pa.array(rows_RL.reshape(-1), type=pa.int32()))
    if mask_RL is None:
        return pa.Table.from_arrays([tokens], schema=ROW_SCHEMA)
    mask = pa.ListArray.from_arrays(offsets, pa.array(mask_RL.reshape(-1), type=pa.int8()))
    return pa.Table.from_arrays([tokens, mask], schema=MASKED_ROW_SCHEMA)


class ShardWriter:
    """Buffers rows of one split and writes <split>/part-NNNNN.parquet every `shard_rows` rows.

    Every shard but the last holds exactly shard_rows rows, so the layout depends only on the
    rows themselves (not on how they arrived): same rows, same bytes. A writer made with
    loss_mask=True takes a mask row for every token row and writes both columns.
    """

    def __init__(self, dataset_dir: str, split: str, *, row_len: int, shard_rows: int, row_group_rows: int,
                 loss_mask: bool = False):
        self.dataset_dir = dataset_dir
        self.split = split
        self.row_len = row_len
        self.shard_rows = shard_rows
        self.row_group_rows = row_group_rows
        self.loss_mask = loss_mask
        self.shards: list[ShardInfo] = []
        self._pending: list[np.ndarray] = []
        self._pending_masks: list[np.ndarray] = []
        self._pending_rows = 0

    def add(self, rows_RL: np.ndarray, mask_RL: np.ndarray | None = None) -> None:
        if (mask_RL is not None) != self.loss_mask:
            raise ValueError(f"ShardWriter(loss_mask={self.loss_mask}) got {'a' if mask_RL is not None else 'no'} mask")
        if len(rows_RL) == 0:
            return
        self._pending.append(rows_RL)
        if mask_RL is not None:
            self._pending_masks.append(mask_RL)
        self._pending_rows += len(rows_RL)
        while self._pending_rows >= self.shard_rows:
            buffered_RL, masks_RL = self._take_pending()
            self._write(buffered_RL[: self.shard_rows], None if masks_RL is None else masks_RL[: self.shard_rows])
            rest_RL = buffered_RL[self.shard_rows:]
            self._pending = [rest_RL] if len(rest_RL) else []
            self._pending_masks = [masks_RL[self.shard_rows:]] if masks_RL is not None and len(rest_RL) else []
            self._pending_rows = len(rest_RL)

    def finish(self) -> list[ShardInfo]:
        if self._pending_rows:
            self._write(*self._take_pending())
            self._pending, self._pending_masks, self._pending_rows = [], [], 0
        return self.shards

    def _take_pending(self) -> tuple[np.ndarray, np.ndarray | None]:
        rows_RL = np.concatenate(self._pending)
        return rows_RL, (np.concatenate(self._pending_masks) if self.loss_mask else None)

    @property
    def rows(self) -> int:
        return sum(shard.rows for shard in self.shards)

    def _write(self, rows_RL: np.ndarray, mask_RL: np.ndarray | None) -> None:
        relative = f"{self.split}/part-{len(self.shards):05d}.parquet"
        location = storage.join(self.dataset_dir, relative)
        fs, path = storage.filesystem(location)
        pq.write_table(
            rows_to_table(rows_RL, mask_RL),
            path,
            filesystem=fs,
            compression="zstd",
            row_group_size=self.row_group_rows,
            # Token ids are near-unique per row: dictionary encoding would only cost time.
            use_dictionary=False,
        )
        self.shards.append(ShardInfo(file=relative, rows=len(rows_RL), tokens=rows_RL.size))
