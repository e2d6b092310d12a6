"""The app deployed on the session's Ray Serve for a test: a unique name and route, loopback only."""
from __future__ import annotations

import socket
import uuid
from dataclasses import dataclass

from moe import ModelConfig
from moe_platform.serve.client import CompletionsClient
from moe_platform.serve.config import AutoscalingConfig, ServeConfig
from testkit.models import tiny_model

API_KEY = "test-key-123"


def tiny_serve_model(router: str = "token_choice") -> ModelConfig:
    """The tiny MoE with a 300-token vocabulary and a 64-token context: a decoding step costs a few
    milliseconds. Untied embeddings: a random tied model just repeats its input token."""
    return tiny_model(vocab_size=300, seq_len=64, tie_embeddings=False, router=router,
                      capacity_factor=1.0 if router == "expert_choice" else 0.0)  # fmt: skip


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
        graceful_shutdown_wait_loop_s=0.2,  # a deleted test app goes in a fraction of a second, not 2+ s
    )
    values.update(overrides)
    config = ServeConfig(**values)
    return Served(deploy(config), config)
