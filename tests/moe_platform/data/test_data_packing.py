"""Packing loses and duplicates no token; the split is a stable function of a document's identity."""
import numpy as np
import pyarrow.parquet as pq
import pytest

from moe_platform.data.packing import ROW_SCHEMA, RowPacker, ShardWriter, assign_split, pack, rows_to_table


def random_documents(seed: int, count: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 1000, size=rng.integers(1, 40), dtype=np.int32) for _ in range(count)]


@pytest.mark.parametrize("seed, row_len", [(0, 2), (1, 7), (2, 64), (3, 1000)])
def test_rows_are_the_token_stream_less_the_declared_tail(seed, row_len):
    documents = random_documents(seed, 50)
    stream = np.concatenate(documents)
    rows, tail = pack(documents, row_len)
    assert rows.shape[1] == row_len
    assert tail == len(stream) % row_len
    assert np.array_equal(rows.reshape(-1), stream[: len(stream) - tail])


def test_packing_does_not_depend_on_how_tokens_arrive():
    documents = random_documents(5, 30)
    whole, tail = pack([np.concatenate(documents)], 9)
    piecewise, tail_again = pack(documents, 9)
    assert np.array_equal(whole, piecewise) and tail == tail_again


def test_packer_carries_the_remainder():
    packer = RowPacker(4)
    assert packer.add(np.arange(3, dtype=np.int32)).shape == (0, 4)
    assert packer.tail == 3
    assert packer.add(np.arange(3, 9, dtype=np.int32)).tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert packer.tail == 1


def test_split_is_deterministic_and_close_to_the_fraction():
    identities = [f"dir/file{i}.py" for i in range(4000)]
    splits = [assign_split(i, 0.1) for i in identities]
    assert splits == [assign_split(i, 0.1) for i in identities]
    assert 0.08 < splits.count("validation") / len(splits) < 0.12
    assert set(assign_split(i, 0.0) for i in identities) == {"train"}
    # Another seed is another (equally stable) split.
    assert splits != [assign_split(i, 0.1, seed=1) for i in identities]


def test_shard_writer_cuts_exact_shards(tmp_path):
    writer = ShardWriter(str(tmp_path), "train", row_len=5, shard_rows=4, row_group_rows=2)
    (tmp_path / "train").mkdir()
    rows = np.arange(50, dtype=np.int32).reshape(10, 5)
    writer.add(rows[:3])
    writer.add(rows[3:])
    shards = writer.finish()
    assert [(s.file, s.rows, s.tokens) for s in shards] == [
        ("train/part-00000.parquet", 4, 20), ("train/part-00001.parquet", 4, 20), ("train/part-00002.parquet", 2, 10)]
    tables = [pq.read_table(tmp_path / s.file) for s in shards]
    assert all(t.schema.equals(ROW_SCHEMA) for t in tables)
    assert pq.ParquetFile(tmp_path / shards[0].file).metadata.row_group(0).column(0).compression == "ZSTD"
    back = np.concatenate([np.array(t.column("tokens").to_pylist(), dtype=np.int32) for t in tables])
    assert np.array_equal(back, rows)


def test_rows_to_table_is_list_int32():
    table = rows_to_table(np.arange(6, dtype=np.int32).reshape(2, 3))
    assert str(table.schema.field("tokens").type) == "list<item: int32>"
    assert table.column("tokens").to_pylist() == [[0, 1, 2], [3, 4, 5]]
