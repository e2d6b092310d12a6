"""Prepare a dataset: raw corpus -> byte-level BPE tokenizer + packed Parquet shards + manifest.json.

    python jobs/prepare.py                                   # the stdlib corpus -> outputs/dataset
    python jobs/prepare.py data.input=~/corpus data.dataset_dir=outputs/mine data.vocab_size=8192
    python jobs/prepare.py data.input='s3://bucket/corpus/**/*.jsonl' data.dataset_dir=s3://bucket/ds

Training, tuning and evaluation read data.dataset_dir (see moe_platform/data/manifest.py).
"""
from __future__ import annotations

import sys

from jobs.common import init_ray, job
from jobs.config import RootConfig
from moe_platform.data import DataError


def run_prepare(config: RootConfig):
    """Prepare `config.data`, print the summary; a data problem exits 1 with one line."""
    from moe_platform.data.prepare import prepare_dataset  # Ray Data: only once the config is valid

    try:
        # resolved(): relative paths are made absolute here, where the user's cwd is known.
        result = prepare_dataset(config.data.resolved(), start_ray=init_ray)
    except DataError as exc:
        print(f"data error: {exc}", file=sys.stderr)
        sys.exit(1)
    print(result.summary())
    return result


@job
def main(config: RootConfig) -> None:
    run_prepare(config)


if __name__ == "__main__":
    main()
