"""Serving load test: how much does dynamic batching buy on this machine?

    python benchmarks/serve_load.py                       # random default-size model, 16 clients, 20 s per mode
    python benchmarks/serve_load.py --export-dir outputs/pretrain/export --clients 32 --duration 60

Deploys the completions app twice on a local Ray (or RAY_ADDRESS): with batching
(max_batch_size = clients) and without (max_batch_size = 1), one replica each with
the same resources. For each, N closed-loop clients on loopback send greedy
completions for T seconds (then stop by themselves) and we report requests/s,
generated tokens/s, p50/p99 latency and the 5xx count (must be 0). The last line
is the batching speed-up in generated tokens/s; the target on a 2-core CPU box at
16 clients is >= 4x. Record results with the date and machine.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import List

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "platform"))  # run from a checkout without installing

from moe_platform.serve.client import CompletionsClient  # noqa: E402
from moe_platform.serve.config import AutoscalingConfig, ServeConfig  # noqa: E402

PROMPTS = [
    "def main(", "import os\n", "class Router(", "The experts", "for i in range(",
    "return self.", "# Load the", "if __name__ ==",
]  # fmt: skip


@dataclass
class ModeResult:
    name: str
    duration_s: float
    latencies_s: List[float] = field(default_factory=list)
    tokens: int = 0
    server_errors: int = 0  # 5xx
    other_errors: int = 0  # 4xx, connection errors

    @property
    def requests_per_s(self) -> float:
        return len(self.latencies_s) / self.duration_s

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.duration_s

    def percentile_ms(self, q: float) -> float:
        if not self.latencies_s:
            return float("nan")
        ordered = sorted(self.latencies_s)
        return 1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    def line(self) -> str:
        return (
            f"{self.name:>10}: {len(self.latencies_s):5d} requests  {self.requests_per_s:7.2f} req/s  "
            f"{self.tokens_per_s:8.1f} tok/s  p50 {self.percentile_ms(0.5):7.1f} ms  "
            f"p99 {self.percentile_ms(0.99):7.1f} ms  5xx {self.server_errors}  other errors {self.other_errors}"
        )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--export-dir", help="an export to serve (default: a random model of the default size)")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of load per mode")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds of unmeasured load per mode")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--num-cpus", type=float, default=1.0, help="CPUs per replica")
    parser.add_argument("--batch-wait-s", type=float, default=0.02)
    return parser.parse_args()


def random_export(directory: str) -> str:
    """The default ModelConfig (d_model 256, 4 layers, 8 experts, top-2) with a 512-token vocabulary."""
    import dataclasses

    from moe import ModelConfig
    from moe_platform.serve.random_export import write_random_export

    texts = [p.read_text(errors="ignore") for p in sorted((Path(os.__file__).parent).glob("[a-c]*.py"))[:20]]
    config = dataclasses.replace(ModelConfig(), vocab_size=512)
    return write_random_export(directory, config, seed=0, texts=texts)


def run_load(client: CompletionsClient, clients: int, seconds: float, max_tokens: int, result: ModeResult) -> None:
    """Closed loop: each client sends its next request when the previous one is answered."""
    deadline = time.monotonic() + seconds
    lock = threading.Lock()

    def one_client(index: int) -> None:
        n = index
        while time.monotonic() < deadline:
            prompt = PROMPTS[n % len(PROMPTS)]
            n += clients
            start = time.monotonic()
            try:
                reply = client.complete(prompt=prompt, max_tokens=max_tokens, temperature=0)
            except OSError:
                with lock:
                    result.other_errors += 1
                continue
            elapsed = time.monotonic() - start
            with lock:
                if reply.status == 200:
                    result.latencies_s.append(elapsed)
                    result.tokens += reply.body["usage"]["completion_tokens"]
                elif reply.status >= 500:
                    result.server_errors += 1
                else:
                    result.other_errors += 1

    threads = [threading.Thread(target=one_client, args=(i,), daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=seconds + 120)  # a request in flight at the deadline may still finish


def measure_mode(name: str, export_dir: str, port: int, max_batch_size: int, args: argparse.Namespace) -> ModeResult:
    from ray import serve

    from moe_platform.serve.app import deploy

    app = f"bench-{name}-{uuid.uuid4().hex[:6]}"
    config = ServeConfig(
        export_dir=export_dir, app_name=app, route_prefix=f"/{app}", port=port, max_batch_size=max_batch_size,
        batch_wait_timeout_s=args.batch_wait_s, max_ongoing_requests=max(64, 2 * args.clients),
        max_tokens_limit=max(512, args.max_tokens), num_cpus=args.num_cpus, api_key="bench",
        autoscaling=AutoscalingConfig(min_replicas=1, max_replicas=1),
    )  # fmt: skip
    url = deploy(config)
    try:
        client = CompletionsClient(url, api_key="bench", timeout_s=120)
        run_load(client, args.clients, args.warmup, args.max_tokens, ModeResult(name, args.warmup))
        result = ModeResult(name, args.duration)
        run_load(client, args.clients, args.duration, args.max_tokens, result)
        health = client.request("GET", "/healthz").body  # counts include the warm-up
        mean_batch = health["requests"] / max(1, health["batches"])
        print(f"{result.line()}  batch mean {mean_batch:.1f} max {health['largest_batch']}", flush=True)
        return result
    finally:
        serve.delete(app)


def main() -> int:
    args = parse_args()
    import ray
    from ray import serve

    ray.init(address=os.environ.get("RAY_ADDRESS", "local"), include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory() as scratch:
        export_dir = args.export_dir or random_export(os.path.join(scratch, "export"))
        port = _serve_port(serve)
        print(f"serving {export_dir} on port {port}: {args.clients} clients x {args.duration:.0f} s per mode, "
              f"max_tokens={args.max_tokens}, {args.num_cpus} CPU per replica, {os.cpu_count()} cores", flush=True)  # fmt: skip
        batched = measure_mode("batched", export_dir, port, max(1, args.clients), args)
        single = measure_mode("batch=1", export_dir, port, 1, args)
    speedup = batched.tokens_per_s / single.tokens_per_s if single.tokens_per_s else float("inf")
    errors = batched.server_errors + single.server_errors
    print(f"batching speed-up at {args.clients} clients: {speedup:.2f}x generated tokens/s "
          f"({batched.tokens_per_s:.1f} vs {single.tokens_per_s:.1f}); 5xx: {errors}; target >= 4x", flush=True)  # fmt: skip
    return 1 if errors else 0


def _serve_port(serve) -> int:
    try:
        return serve.context._get_global_client().http_config.port
    except Exception:  # Serve not running yet: start it on a free loopback port
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        return port


if __name__ == "__main__":
    sys.exit(main())
