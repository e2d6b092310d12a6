"""ServeConfig: the `serve` section of the job config (jobs/conf/config.yaml).

Plain types only (an OmegaConf structured config): Hydra validates overrides
against it and `__post_init__` rejects bad values with one sentence naming the
key, before Ray starts. The same dataclass is built from the dict that
`build_app(args)` receives from `serve run` / `serve deploy` / a RayService.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Optional

from moe.configs import from_dict, require

# The environment variable that holds the API key when serve.api_key is unset.
API_KEY_ENV = "MOE_SERVE_API_KEY"


@dataclass
class AutoscalingConfig:
    """Replica autoscaling (Ray Serve's autoscaling_config). min == max: a fixed replica count."""

    min_replicas: int = 1
    max_replicas: int = 1
    # Ongoing requests per replica Serve aims for. Batching wants several per replica:
    # at 1, a replica would never see more than one request to batch.
    target_ongoing_requests: float = 8.0
    upscale_delay_s: float = 5.0
    downscale_delay_s: float = 30.0
    # The window Serve averages the ongoing requests over before deciding (Ray's default): it must
    # exceed the interval replicas push their metrics at (RAY_SERVE_*_AUTOSCALING_METRIC_PUSH_INTERVAL_S, 10 s).
    look_back_period_s: float = 30.0

    def validate(self, prefix: str = "serve.autoscaling") -> None:
        require(self.min_replicas >= 0, f"{prefix}.min_replicas={self.min_replicas} must be >= 0")
        require(self.max_replicas >= 1, f"{prefix}.max_replicas={self.max_replicas} must be >= 1")
        require(
            self.min_replicas <= self.max_replicas,
            f"{prefix}.min_replicas={self.min_replicas} must be <= {prefix}.max_replicas={self.max_replicas}",
        )
        require(
            self.target_ongoing_requests > 0,
            f"{prefix}.target_ongoing_requests={self.target_ongoing_requests} must be > 0",
        )
        require(self.upscale_delay_s >= 0, f"{prefix}.upscale_delay_s={self.upscale_delay_s} must be >= 0")
        require(self.downscale_delay_s >= 0, f"{prefix}.downscale_delay_s={self.downscale_delay_s} must be >= 0")
        require(self.look_back_period_s > 0, f"{prefix}.look_back_period_s={self.look_back_period_s} must be > 0")

    def to_ray(self) -> Dict[str, Any]:
        return asdict(self)


QUANTIZE_MODES = ("none", "int8")
SCHEDULERS = ("continuous", "static")


@dataclass
class ServeConfig:
    # The export directory written by training (a Hugging Face model directory, moe/export.py),
    # or a local Mixtral / Qwen2-MoE / Qwen3-MoE / ERNIE-4.5-MoE / Llama / Mistral directory.
    # Unset: the serve job uses <run.output_dir>/export; build_app requires it.
    export_dir: Optional[str] = None
    # The name clients pass as "model" and /v1/models lists; unset: the export directory's name
    # (its parent's for <run.output_dir>/export).
    model_name: Optional[str] = None
    # Serve application name and HTTP route prefix (one Ray cluster can host several apps).
    app_name: str = "moe"
    route_prefix: str = "/"
    # Serve's HTTP proxy: one per Ray cluster, so host/port apply when this job starts Serve;
    # a running Serve instance keeps its own. 0.0.0.0 exposes it beyond this machine.
    host: str = "127.0.0.1"
    port: int = 8000
    # Bearer token clients must send (Authorization: Bearer <key>); unset: the MOE_SERVE_API_KEY
    # environment variable of the process that builds the app; neither: no auth (a warning).
    # Ray's own token auth does not cover the Serve HTTP proxy, so this is the only guard.
    api_key: Optional[str] = None
    # "continuous": per-step batching (scheduler.py): max_batch_size sequence slots, each with its
    # own preallocated KV cache (max_batch_size x model.seq_len positions per layer); a request
    # joins at the next step and leaves when it ends. "static" (the benchmark's baseline): when
    # the model is free, a batch takes up to max_batch_size queued requests (waiting up to
    # batch_wait_timeout_s for more only if fewer are queued) and runs until its longest ends.
    scheduler: str = "continuous"
    max_batch_size: int = 16
    batch_wait_timeout_s: float = 0.02
    # Requests a replica accepts at once; below max_batch_size batches can never fill.
    max_ongoing_requests: int = 64
    # Requests each Serve proxy holds while every replica is at max_ongoing_requests; beyond
    # that, overload is answered at once with 429 and Retry-After: retry_after_s (never a hang).
    max_queued_requests: int = 128
    retry_after_s: int = 1
    # Request limits: max_tokens default and ceiling, prompts per request, body size.
    default_max_tokens: int = 16
    max_tokens_limit: int = 512
    max_prompts_per_request: int = 16
    max_request_bytes: int = 1_000_000
    # Resources per replica. CPU replicas use one torch thread each (replicas scale out, not up).
    num_cpus: float = 0.5
    num_gpus: float = 0.0
    torch_threads: int = 1
    # Weights as served: "none" (as exported, fp32) or "int8" - dynamic int8 quantization of the
    # linear layers and routed experts (moe.quantize), for CPU replicas: 0.36x the weights at a
    # +0.0002 held-out loss, but NOT faster per token at the default model's size (0.89x at
    # batch 1, benchmarks/RESULTS.md, compression).
    quantize: str = "none"
    # Health checks: Serve calls check_health every period and restarts a replica that fails.
    health_check_period_s: float = 10.0
    health_check_timeout_s: float = 30.0
    # A replica being removed (scale-down, redeploy, delete) checks every wait_loop seconds whether its
    # requests are done, and is killed after timeout seconds whatever it holds (Ray's defaults).
    graceful_shutdown_wait_loop_s: float = 2.0
    graceful_shutdown_timeout_s: float = 20.0
    autoscaling: AutoscalingConfig = field(default_factory=AutoscalingConfig)
    # The serve job blocks (prints the URL, serves until Ctrl-C); false: deploy and return.
    blocking: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.autoscaling, dict):  # built from build_app's plain dict
            self.autoscaling = AutoscalingConfig(**self.autoscaling)
        require(bool(self.app_name), "serve.app_name must not be empty")
        require(self.route_prefix.startswith("/"), f"serve.route_prefix={self.route_prefix!r} must start with '/'")
        require(0 < self.port < 65536, f"serve.port={self.port} must be in 1..65535")
        require(self.api_key is None or len(self.api_key) > 0, "serve.api_key must not be empty (unset it instead)")
        require(self.max_batch_size >= 1, f"serve.max_batch_size={self.max_batch_size} must be >= 1")
        require(self.batch_wait_timeout_s >= 0, f"serve.batch_wait_timeout_s={self.batch_wait_timeout_s} must be >= 0")
        require(self.max_ongoing_requests >= 1, f"serve.max_ongoing_requests={self.max_ongoing_requests} must be >= 1")
        require(self.scheduler in SCHEDULERS,
                 f"serve.scheduler={self.scheduler!r} must be one of {', '.join(SCHEDULERS)}")
        require(self.max_queued_requests >= 1, f"serve.max_queued_requests={self.max_queued_requests} must be >= 1")
        require(self.retry_after_s >= 1, f"serve.retry_after_s={self.retry_after_s} must be >= 1")
        require(self.max_tokens_limit >= 1, f"serve.max_tokens_limit={self.max_tokens_limit} must be >= 1")
        require(
            1 <= self.default_max_tokens <= self.max_tokens_limit,
            f"serve.default_max_tokens={self.default_max_tokens} must be in "
            f"1..serve.max_tokens_limit={self.max_tokens_limit}",
        )
        require(
            self.max_prompts_per_request >= 1,
            f"serve.max_prompts_per_request={self.max_prompts_per_request} must be >= 1",
        )
        require(self.max_request_bytes >= 1024, f"serve.max_request_bytes={self.max_request_bytes} must be >= 1024")
        require(self.num_cpus >= 0, f"serve.num_cpus={self.num_cpus} must be >= 0")
        require(self.num_gpus >= 0, f"serve.num_gpus={self.num_gpus} must be >= 0")
        require(self.num_cpus > 0 or self.num_gpus > 0, "serve.num_cpus and serve.num_gpus must not both be 0")
        require(self.torch_threads >= 1, f"serve.torch_threads={self.torch_threads} must be >= 1")
        require(self.quantize in QUANTIZE_MODES,
                 f"serve.quantize={self.quantize!r} must be one of {', '.join(QUANTIZE_MODES)}")
        require(not (self.quantize == "int8" and self.num_gpus > 0),
                 "serve.quantize=int8 is for CPU replicas (dynamic int8 kernels run on CPU); set serve.num_gpus=0")
        require(
            self.health_check_period_s > 0, f"serve.health_check_period_s={self.health_check_period_s} must be > 0"
        )
        require(
            self.health_check_timeout_s > 0, f"serve.health_check_timeout_s={self.health_check_timeout_s} must be > 0"
        )
        for key in ("graceful_shutdown_wait_loop_s", "graceful_shutdown_timeout_s"):
            require(getattr(self, key) > 0, f"serve.{key}={getattr(self, key)} must be > 0")
        self.autoscaling.validate()

    @property
    def device(self) -> str:
        return "cuda" if self.num_gpus > 0 else "cpu"

    def resolved_api_key(self) -> Optional[str]:
        """serve.api_key, else MOE_SERVE_API_KEY from this process' environment, else None."""
        return self.api_key or os.environ.get(API_KEY_ENV) or None

    def served_model_name(self, export_dir: str) -> str:
        """serve.model_name, else the export directory's name; training writes <run dir>/export,
        so an "export" directory is named after its run directory instead."""
        if self.model_name:
            return self.model_name
        path = os.path.normpath(os.path.abspath(export_dir))
        name = os.path.basename(path)
        return os.path.basename(os.path.dirname(path)) if name == "export" else name

    @classmethod
    def from_dict(cls, args: Dict[str, Any]) -> "ServeConfig":
        """Build from plain `serve run key=value` / YAML args (every value may arrive as text):
        moe.configs' reader refuses unknown keys and coerces by declared type, naming the key."""
        return from_dict(cls, args, prefix="serve.", parse_strings=True)
