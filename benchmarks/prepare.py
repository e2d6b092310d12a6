"""Question: how fast is the Ray Data prepare job, against the same tokenizer in a plain loop?

    python benchmarks/prepare.py                      # default corpus (stdlib .py, 4 MB cap)
    python benchmarks/prepare.py --max-bytes 20000000 --repeats 5
    RAY_ADDRESS=auto python benchmarks/prepare.py --input s3://bucket/corpus

Measures tokens/s of
  ray:  the whole prepare pipeline (read, tokenize in Ray Data tasks, pack, write zstd shards,
        manifest) with a fixed tokenizer, so BPE training is outside the timing;
  loop: one process reading the same files with the same reader and encoding them with the
        same tokenizer call (encode_batch_fast, per file), no packing or writing;
        once with HF tokenizers' own thread pool and once single-threaded
        (TOKENIZERS_PARALLELISM=false), the honest one-core baseline.
Runs interleave (ray, loop, loop-1-thread, ray, ...) so load changes hit all alike; medians
are reported. Ray start-up is outside the timing (a cluster is up before a job runs).
Record results with date, machine and load in benchmarks/RESULTS.md (method: docs/benchmarking.md).
"""
from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import sys
import tempfile
import time

import ray
import tokenizers

from moe_platform.data import DataConfig
from moe_platform.data.prepare import prepare_dataset
from moe_platform.data.records import Document, RecordFormat, read_records
from moe_platform.data.sources import find_corpus
from moe_platform.data.tokenizer import encode_documents, encoder_from_json, tokenizer_json


def ray_run(config: DataConfig) -> tuple[float, int]:
    start = time.perf_counter()
    manifest = prepare_dataset(config).manifest
    elapsed = time.perf_counter() - start
    tokens = sum(s.tokens for s in manifest.splits.values()) + sum(manifest.documents.tail_tokens_dropped.values())
    return elapsed, tokens


def loop_run(config: DataConfig, serialized_tokenizer: str, eos_id: int, *, threads: bool) -> tuple[float, int]:
    # tokenizers reads TOKENIZERS_PARALLELISM on each batch call.
    os.environ["TOKENIZERS_PARALLELISM"] = "true" if threads else "false"
    try:
        start = time.perf_counter()
        encoder, tokens = encoder_from_json(serialized_tokenizer), 0
        for file in find_corpus(config).files:
            documents = read_records(file, RecordFormat.of(config))
            texts = [d.text for d in documents if isinstance(d, Document)]
            tokens += sum(len(t) for t in encode_documents(encoder, texts, eos_id))
        return time.perf_counter() - start, tokens
    finally:
        os.environ.pop("TOKENIZERS_PARALLELISM", None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", default=None, help="corpus (default: the stdlib sources)")
    parser.add_argument("--max-bytes", type=int, default=4_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs of a local Ray (default: all)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    ray.init(address=os.environ.get("RAY_ADDRESS"), num_cpus=None if os.environ.get("RAY_ADDRESS") else args.num_cpus,
             include_dashboard=False, log_to_driver=False)

    with tempfile.TemporaryDirectory() as scratch:
        base = DataConfig(input=args.input, max_bytes=args.max_bytes, vocab_size=args.vocab_size,
                          dataset_dir=f"{scratch}/warmup")
        warm = prepare_dataset(base).manifest  # trains the tokenizer once; also warms Ray workers
        with open(warm.tokenizer_path) as handle:
            serialized = tokenizer_json(tokenizers.Tokenizer.from_str(handle.read()))
        timed = DataConfig(**{**base.to_dict(), "dataset_dir": f"{scratch}/timed", "tokenizer": warm.tokenizer_path,
                              "overwrite": True})
        results: dict[str, list[tuple[float, int]]] = {"ray": [], "loop": [], "loop-1-thread": []}
        for _ in range(args.repeats):
            results["ray"].append(ray_run(timed))
            results["loop"].append(loop_run(timed, serialized, warm.tokenizer.eos_id, threads=True))
            results["loop-1-thread"].append(loop_run(timed, serialized, warm.tokenizer.eos_id, threads=False))
    report(results, warm.input, args)


def report(results: dict[str, list[tuple[float, int]]], corpus: dict, args: argparse.Namespace) -> None:
    resources = ray.cluster_resources()
    print(f"machine: {os.cpu_count()} cores, {platform.platform()}; python {sys.version.split()[0]}; "
          f"ray {ray.__version__} ({resources.get('CPU', 0):g} CPUs); tokenizers {tokenizers.__version__}")
    print(f"corpus: {corpus['location']} ({corpus['files']} files, {corpus['bytes']} bytes); "
          f"{args.repeats} interleaved repeats")
    rates = {}
    for name, runs in results.items():
        seconds = [s for s, _ in runs]
        tokens = runs[0][1]
        assert all(t == tokens for _, t in runs), f"{name}: token counts differ between runs"
        rates[name] = tokens / statistics.median(seconds)
        print(f"{name:14s} {tokens} tokens, median {statistics.median(seconds):.2f} s "
              f"(runs {', '.join(f'{s:.2f}' for s in seconds)}) -> {rates[name]:,.0f} tokens/s")
    print(f"ratio: ray / loop = {rates['ray'] / rates['loop']:.2f}x, "
          f"ray / loop-1-thread = {rates['ray'] / rates['loop-1-thread']:.2f}x")


if __name__ == "__main__":
    main()
