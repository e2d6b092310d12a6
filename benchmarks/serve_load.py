"""Serving load test: continuous (per-step) batching against the static batcher, side by side.

    python benchmarks/serve_load.py                                  # random default-size model
    python benchmarks/serve_load.py --rates 1,2,4,8 --duration 30 --export-dir outputs/pretrain/export

Deploys the completions app once per mode on a local Ray (or RAY_ADDRESS), one replica each
with the same resources and max_batch_size: serve.scheduler=continuous and =static. At every
offered rate the two modes take turns (so they meet the same background load) under the same
open-loop load: Poisson arrivals (exponential gaps,
a fixed seed, so both modes see the very same request sequence) of streamed greedy
completions with mixed prompt lengths and max_tokens. An open loop keeps sending whether
or not the server keeps up, which is what exposes queueing (a closed loop slows down with
the server and hides it). Per mode and rate: generated tokens/s, time to first token
(TTFT) and end-to-end latency at p50 and p99, and the count of non-2xx answers.

Targets: at a rate the static batcher can just sustain, p99 TTFT >= 3x lower with
continuous batching; the highest tokens/s either mode reaches with p99 TTFT under 2 s,
>= 1.3x higher for continuous; 0 non-2xx below saturation. Record results with the date,
machine and load average (benchmarks/RESULTS.md).
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Tuple

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "platform"))  # run from a checkout without installing

from moe_platform.serve.client import CompletionsClient  # noqa: E402
from moe_platform.serve.config import AutoscalingConfig, ServeConfig  # noqa: E402

MODES = ("continuous", "static")


@dataclass
class Request:
    at_s: float  # arrival, from the start of the run
    prompt: List[int]
    max_tokens: int


@dataclass
class Outcome:
    status: int  # HTTP status; 0: connection error or timeout
    ttft_s: float = float("nan")
    e2e_s: float = float("nan")
    tokens: int = 0


@dataclass
class RateResult:
    mode: str
    rate: float
    window_s: float  # arrivals happen in [0, window_s)
    offered_tokens: int  # the sum of the requests' max_tokens
    duration_s: float = 0.0  # until the last answer (at least window_s)
    outcomes: List[Outcome] = field(default_factory=list)

    @property
    def sustained(self) -> bool:
        """Kept up: every request answered, and (nearly) all the asked-for tokens generated in time."""
        return self.non_2xx == 0 and self.tokens_per_s >= 0.9 * self.offered_tokens / self.window_s

    def ok(self) -> List[Outcome]:
        return [o for o in self.outcomes if o.status == 200]

    @property
    def tokens_per_s(self) -> float:
        return sum(o.tokens for o in self.ok()) / self.duration_s

    @property
    def non_2xx(self) -> int:
        return sum(1 for o in self.outcomes if not 200 <= o.status < 300)

    def pct(self, attr: str, q: float) -> float:
        values = sorted(getattr(o, attr) for o in self.ok())
        return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")

    def row(self) -> str:
        return (f"| {self.mode} | {self.rate:g} | {len(self.outcomes)} | {self.tokens_per_s:.0f} | "
                f"{self.pct('ttft_s', 0.5):.2f} | {self.pct('ttft_s', 0.99):.2f} | {self.pct('e2e_s', 0.5):.2f} | "
                f"{self.pct('e2e_s', 0.99):.2f} | {self.non_2xx} |")  # fmt: skip


HEADER = ("| mode | offered req/s | requests | tokens/s | TTFT p50 s | TTFT p99 s | e2e p50 s | e2e p99 s | non-2xx |\n"
          "| --- | --- | --- | --- | --- | --- | --- | --- | --- |")  # fmt: skip


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--export-dir", help="an export to serve (default: a random model of the default size)")
    parser.add_argument("--rates", default="1,2,4,8", help="offered loads, requests/s, comma-separated")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of arrivals per rate and mode")
    parser.add_argument("--prompt-tokens", default="4,96", help="prompt length range (tokens), uniform")
    parser.add_argument("--max-tokens", default="8,16,32,64", help="max_tokens choices, uniform")
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--num-cpus", type=float, default=1.0, help="CPUs per replica")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def random_export(directory: str) -> str:
    """The default ModelConfig (d_model 256, 4 layers, its default experts and top_k, 256-token context), 512-token vocab."""
    import dataclasses

    from moe import ModelConfig
    from moe_platform.serve.random_export import write_random_export

    texts = [p.read_text(errors="ignore") for p in sorted((Path(os.__file__).parent).glob("[a-c]*.py"))[:20]]
    config = dataclasses.replace(ModelConfig(), vocab_size=512)
    return write_random_export(directory, config, seed=0, texts=texts)


def arrivals(rate: float, seconds: float, args: argparse.Namespace, vocab: int) -> List[Request]:
    """Poisson arrivals with mixed prompt lengths and max_tokens; the same seed gives the same list."""
    rng = random.Random(f"{args.seed}-{rate}")
    low, high = (int(v) for v in args.prompt_tokens.split(","))
    choices = [int(v) for v in args.max_tokens.split(",")]
    requests, t = [], rng.expovariate(rate)
    while t < seconds:
        length = rng.randint(low, high)
        requests.append(Request(t, [rng.randrange(1, vocab) for _ in range(length)], rng.choice(choices)))
        t += rng.expovariate(rate)
    return requests


def send(client: CompletionsClient, request: Request) -> Outcome:
    """One streamed greedy completion: TTFT is the first chunk with text (or the first event)."""
    start = time.monotonic()
    first: Optional[float] = None
    tokens = 0
    try:
        for event in client.stream(prompt=request.prompt, max_tokens=request.max_tokens, temperature=0,
                                   stream_options={"include_usage": True}):  # fmt: skip
            if first is None:
                first = time.monotonic() - start
            if isinstance(event, dict) and "error" in event:  # failed after the headers were sent
                return Outcome(status=500)
            if isinstance(event, dict) and event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
    except RuntimeError as exc:  # an error status: "HTTP 429: ..."
        return Outcome(status=int(str(exc).split()[1].rstrip(":")))
    except OSError:
        return Outcome(status=0)
    return Outcome(200, first if first is not None else float("nan"), time.monotonic() - start, tokens)


def run_rate(client: CompletionsClient, mode: str, rate: float, requests: List[Request], seconds: float) -> RateResult:
    result = RateResult(mode, rate, seconds, sum(r.max_tokens for r in requests), seconds)
    lock = threading.Lock()

    def fire(request: Request) -> None:
        outcome = send(client, request)
        with lock:
            result.outcomes.append(outcome)

    start = time.monotonic()
    with ThreadPoolExecutor(max_workers=512) as pool:  # open loop: never wait for an answer to send
        for request in requests:
            time.sleep(max(0.0, start + request.at_s - time.monotonic()))
            pool.submit(fire, request)
    # Tokens/s over the time the run really took (the last answers may come after the arrivals end).
    result.duration_s = max(seconds, time.monotonic() - start)
    return result


def deploy_mode(mode: str, export_dir: str, port: int, args: argparse.Namespace) -> Tuple[str, str]:
    from moe_platform.serve.app import deploy

    app = f"bench-{mode}-{uuid.uuid4().hex[:6]}"
    config = ServeConfig(
        export_dir=export_dir, app_name=app, route_prefix=f"/{app}", port=port, scheduler=mode,
        max_batch_size=args.max_batch_size, max_ongoing_requests=1000, max_queued_requests=1000,
        max_tokens_limit=256, num_cpus=args.num_cpus, api_key="bench",
        autoscaling=AutoscalingConfig(min_replicas=1, max_replicas=1),
    )  # fmt: skip
    return app, deploy(config)


def main() -> int:
    args = parse_args()
    import ray
    from ray import serve

    rates = [float(r) for r in args.rates.split(",")]
    ray.init(address=os.environ.get("RAY_ADDRESS", "local"), include_dashboard=False, log_to_driver=False)
    results: List[RateResult] = []
    with tempfile.TemporaryDirectory() as scratch:
        export_dir = args.export_dir or random_export(os.path.join(scratch, "export"))
        from moe import load_export_config

        vocab = load_export_config(export_dir).vocab_size
        port = _serve_port(serve)
        print(f"serving {export_dir}: rates {rates} req/s x {args.duration:.0f} s per mode, prompts "
              f"{args.prompt_tokens} tokens, max_tokens {args.max_tokens}, max_batch_size {args.max_batch_size}, "
              f"{args.num_cpus} CPU per replica, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}",
              flush=True)  # fmt: skip
        print(HEADER, flush=True)
        apps = {mode: deploy_mode(mode, export_dir, port, args) for mode in MODES}
        try:
            clients = {mode: CompletionsClient(url, api_key="bench", timeout_s=300) for mode, (_, url) in apps.items()}
            for mode, client in clients.items():
                run_rate(client, mode, 1.0, arrivals(1.0, 3.0, args, vocab), 3.0)  # warm-up, not recorded
            # Modes alternate at every rate, so both meet the same background load on a shared machine.
            for rate in rates:
                for mode, client in clients.items():
                    requests = arrivals(rate, args.duration, args, vocab)
                    results.append(run_rate(client, mode, rate, requests, args.duration))
                    print(results[-1].row(), flush=True)
        finally:
            for app, _ in apps.values():
                serve.delete(app)
    print(summary(results), flush=True)
    return 0


def summary(results: List[RateResult]) -> str:
    """The two target ratios: p99 TTFT at the highest rate static sustains, and best tokens/s with p99 TTFT < 2 s."""
    by = {(r.mode, r.rate): r for r in results}
    static_ok = [r for r in results if r.mode == "static" and r.sustained]
    lines = [f"load average now {os.getloadavg()[0]:.1f}"]
    if static_ok:
        rate = max(r.rate for r in static_ok)
        s, c = by[("static", rate)], by[("continuous", rate)]
        lines.append(f"at {rate:g} req/s (the highest rate static sustains): p99 TTFT static "
                     f"{s.pct('ttft_s', 0.99):.2f} s vs continuous {c.pct('ttft_s', 0.99):.2f} s -> "
                     f"{s.pct('ttft_s', 0.99) / c.pct('ttft_s', 0.99):.1f}x lower (target >= 3x)")  # fmt: skip
    best = {mode: max((r.tokens_per_s for r in results if r.mode == mode and r.pct("ttft_s", 0.99) < 2.0),
                      default=0.0) for mode in MODES}  # fmt: skip
    ratio = best["continuous"] / best["static"] if best["static"] else float("inf")
    lines.append(f"best tokens/s with p99 TTFT < 2 s: continuous {best['continuous']:.0f} vs static "
                 f"{best['static']:.0f} -> {ratio:.2f}x (target >= 1.3x)")  # fmt: skip
    return "\n".join(lines)


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
