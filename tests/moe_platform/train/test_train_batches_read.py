"""batches.read_columns: a small local dataset from the object store gives exactly the rows, order
and columns that streaming it from Parquet gives; larger ones, URIs and missing files stream."""
from __future__ import annotations

import glob
import os

import pytest
from testkit.datasets import write_dataset

from moe_platform.train import batches


def _rows(dataset) -> list[dict]:
    dataset.context.execution_options.preserve_order = True  # as training reads (batches.data_config)
    return [{name: list(value) for name, value in row.items()} for row in dataset.iter_rows()]


def test_small_datasets_come_from_the_object_store_with_the_streamed_rows(ray_cluster, tmp_path, monkeypatch):
    dataset_dir = write_dataset(str(tmp_path / "data"), train_rows=96, shard_rows=32, loss_mask=True)
    paths = sorted(glob.glob(os.path.join(dataset_dir, "train", "*.parquet")))
    assert len(paths) == 3  # several files: block order must follow the given order
    import ray.data

    streaming_reads = []
    read_parquet = ray.data.read_parquet
    monkeypatch.setattr(ray.data, "read_parquet",
                        lambda *args, **kwargs: streaming_reads.append(args) or read_parquet(*args, **kwargs))
    in_memory = batches.read_columns(paths, ["tokens"])
    assert streaming_reads == []  # the object-store path was taken
    monkeypatch.setattr(batches, "IN_MEMORY_MAX_BYTES", 0)
    streamed = batches.read_columns(paths, ["tokens"])
    assert len(streaming_reads) == 1
    assert in_memory.columns() == streamed.columns() == ["tokens"]  # loss_mask was not asked for
    assert _rows(in_memory) == _rows(streamed)


@pytest.mark.parametrize("paths", [[], ["s3://bucket/train/part-00000.parquet"], ["/no/such/file.parquet"]])
def test_uris_missing_files_and_no_files_are_left_to_read_parquet(paths):
    assert batches._local_bytes(paths) == float("inf")
