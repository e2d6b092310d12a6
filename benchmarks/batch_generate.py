"""Offline batch generation (jobs/generate.py's Ray Data pool) against the HTTP server, same prompts.

    python benchmarks/batch_generate.py                          # random default-size model, 128 prompts
    python benchmarks/batch_generate.py --prompts 512 --max-tokens 64 --export-dir outputs/pretrain/export

Every mode generates the same prompts (3-60 words each), greedy, up to `--max-tokens` tokens
each (a random model may emit eos earlier: the tokens actually generated are counted):
- batch-1 / batch-2: moe_platform.generate.run_generation with 1 and 2 replicas (1 CPU and one
  torch thread each, --num-slots continuous-batching slots, --rows-per-part rows per part);
- http: one Serve replica (the same CPU, threads and slots) sent every prompt at once by
  --clients concurrent non-streaming /v1/completions calls.
Per mode: generated tokens, wall seconds from the first request (batch: from submitting the
dataset; model loading included in both), tokens/s. Record with the date, the machine and its
load average (benchmarks/RESULTS.md).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import List, Tuple

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "platform"))  # run from a checkout without installing

from serve_load import _serve_port, random_export  # noqa: E402  (the same random model as the serving benchmark)

WORDS = ("the expert router sends each token to two of eight experts while the batch keeps every slot busy "
         "and the server streams text back to many clients at once").split()


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--export-dir", help="an export (default: a random model of the default size)")
    parser.add_argument("--prompts", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--num-slots", type=int, default=16, help="KV-cache slots per replica (server: max_batch_size)")
    parser.add_argument("--rows-per-part", type=int, default=32)
    parser.add_argument("--clients", type=int, default=32, help="concurrent HTTP requests")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def write_prompts(path: Path, count: int, seed: int) -> List[str]:
    rng = random.Random(seed)
    prompts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 60))) for _ in range(count)]
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    return prompts


def run_batch(export_dir: str, prompts_file: Path, output: Path, replicas: int,
              args: argparse.Namespace) -> Tuple[int, float]:
    from moe_platform.generate.batch import run_generation
    from moe_platform.generate.config import GenerateConfig

    settings = GenerateConfig(export_dir=export_dir, input=str(prompts_file), output=str(output),
                              max_tokens=args.max_tokens, temperature=0.0, stop=[], replicas=replicas,
                              num_cpus_per_replica=1.0, num_slots=args.num_slots, rows_per_part=args.rows_per_part)
    started = time.perf_counter()
    summary = run_generation(settings)
    return summary.generated_tokens, time.perf_counter() - started


def run_http(export_dir: str, prompts: List[str], args: argparse.Namespace) -> Tuple[int, float]:
    from ray import serve

    from moe_platform.serve.app import deploy
    from moe_platform.serve.client import CompletionsClient
    from moe_platform.serve.config import AutoscalingConfig, ServeConfig

    app = f"bench-batch-{uuid.uuid4().hex[:6]}"
    config = ServeConfig(export_dir=export_dir, app_name=app, route_prefix=f"/{app}", port=_serve_port(serve),
                         max_batch_size=args.num_slots, max_ongoing_requests=1000, max_queued_requests=1000,
                         max_tokens_limit=256, num_cpus=1.0, api_key="bench",
                         autoscaling=AutoscalingConfig(min_replicas=1, max_replicas=1))  # fmt: skip
    started = time.perf_counter()  # deploying loads the model, as a batch replica does
    client = CompletionsClient(deploy(config), api_key="bench", timeout_s=600)
    try:
        def complete(prompt: str) -> int:
            reply = client.complete(prompt=prompt, max_tokens=args.max_tokens, temperature=0)
            if reply.status != 200:
                raise RuntimeError(f"HTTP {reply.status}: {reply.body}")
            return reply.body["usage"]["completion_tokens"]

        with ThreadPoolExecutor(max_workers=args.clients) as pool:
            tokens = sum(pool.map(complete, prompts))
        return tokens, time.perf_counter() - started
    finally:
        serve.delete(app)


def main() -> int:
    args = parse_args()
    import ray

    # Logical CPUs above the core count: 2 replicas x 1 CPU must leave Ray Data room (a fully
    # booked node hangs it, docs/ray-notes.md); the torch thread count is what bounds real use.
    ray.init(address=os.environ.get("RAY_ADDRESS", "local"), num_cpus=None if os.environ.get("RAY_ADDRESS") else 4,
             include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        export_dir = args.export_dir or random_export(str(root / "export"))
        prompts = write_prompts(root / "prompts.jsonl", args.prompts, args.seed)
        print(f"{export_dir}: {args.prompts} prompts x {args.max_tokens} tokens, greedy, {args.num_slots} slots per "
              f"replica, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}", flush=True)
        print("| mode | replicas | tokens | seconds | tokens/s |\n| --- | --- | --- | --- | --- |", flush=True)
        for mode, replicas in (("batch", 1), ("batch", 2), ("http", 1)):
            if mode == "batch":
                output = root / f"out-{replicas}"
                tokens, seconds = run_batch(export_dir, root / "prompts.jsonl", output, replicas, args)
            else:
                tokens, seconds = run_http(export_dir, prompts, args)
            print(f"| {mode} | {replicas} | {tokens} | {seconds:.1f} | {tokens / seconds:.1f} |", flush=True)
    print(f"load average now {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
