"""Helpers shared by the serving tests and tests/jobs/test_serve_job.py (imported by path there)."""
from __future__ import annotations

import socket
import uuid
from dataclasses import dataclass

from moe_platform.serve.client import CompletionsClient
from moe_platform.serve.config import AutoscalingConfig, ServeConfig

API_KEY = "test-key-123"


def tiny_model_config(router: str = "token_choice"):
    """A 2-layer MoE with a 64-token context: a decoding step costs a few milliseconds."""
    from moe import ModelConfig
    from moe.config import MoEConfig

    moe = MoEConfig(num_experts=4, top_k=2, expert_hidden=32, router=router,
                    capacity_factor=1.0 if router == "expert_choice" else 0.0)  # fmt: skip
    # Untied embeddings: a random tied model just repeats its input token, which tests little.
    return ModelConfig(vocab_size=300, d_model=32, n_layers=2, n_heads=2, seq_len=64, ffn_hidden=64,
                       tie_embeddings=False, moe=moe)  # fmt: skip


def ensure_serve_port() -> int:
    """The Serve proxy's port in the connected Ray: the running instance's, else start Serve
    on a free loopback port (other test sessions on this machine may hold 8000)."""
    from ray import serve

    try:
        return serve.context._get_global_client().http_config.port
    except Exception:  # Serve is not running in this Ray yet
        pass
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    return port


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Served:
    url: str
    config: ServeConfig

    def client(self, api_key: str | None = API_KEY, timeout_s: float = 60.0) -> CompletionsClient:
        return CompletionsClient(self.url, api_key=api_key, timeout_s=timeout_s)


def deploy_for_test(export_dir: str, port: int, **overrides) -> Served:
    from moe_platform.serve.app import deploy

    name = f"test-{uuid.uuid4().hex[:8]}"
    values = dict(
        export_dir=export_dir,
        model_name="tiny",
        app_name=name,
        route_prefix=f"/{name}",
        port=port,
        api_key=API_KEY,
        # A long batch window so concurrent test requests reliably share a batch.
        batch_wait_timeout_s=0.25,
        max_batch_size=8,
        num_cpus=0.25,
        autoscaling=AutoscalingConfig(min_replicas=1, max_replicas=1),
        health_check_period_s=2.0,
    )
    values.update(overrides)
    config = ServeConfig(**values)
    return Served(deploy(config), config)
