"""Serve a model export over HTTP with Ray Serve (OpenAI-style /v1/completions).

    python jobs/serve.py                                   # serves <run.output_dir>/export (what `make run` trained)
    python jobs/serve.py serve.export_dir=outputs/export
    python jobs/serve.py serve.export_dir=outputs/export serve.max_batch_size=32 \
        serve.autoscaling.max_replicas=4 serve.port=8080
    MOE_SERVE_API_KEY=secret python jobs/serve.py serve.export_dir=outputs/export

Blocks and serves until Ctrl-C (or SIGTERM). `serve.blocking=false` deploys and returns: on a
running cluster (RAY_ADDRESS) the application keeps serving after this process
exits; against a local Ray started by this process it ends with it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import time
from typing import Iterator

from jobs.common import ConfigError, init_ray, job
from jobs.config import RootConfig
from moe_platform.serve.config import API_KEY_ENV, ServeConfig

log = logging.getLogger("jobs.serve")


def serve_export(config: ServeConfig) -> str:
    """Deploy the app (Ray already initialised) and return its base URL."""
    from moe_platform.serve.app import deploy

    url = deploy(config)
    print(f"serving {config.served_model_name(config.export_dir or '')} at {url}")
    print(example_curl(url, config))
    return url


def example_curl(url: str, config: ServeConfig) -> str:
    auth = f' -H "Authorization: Bearer ${API_KEY_ENV}"' if config.resolved_api_key() else ""
    return (
        f"example: curl -s {url}/v1/completions -H 'Content-Type: application/json'{auth} "
        """-d '{"prompt": "def main(", "max_tokens": 32, "temperature": 0}'"""
    )


def wait_until_interrupted(config: ServeConfig) -> None:
    from moe_platform.serve.app import undeploy

    print("serving until Ctrl-C")
    try:
        with sigterm_as_interrupt():
            while True:
                time.sleep(1.0)
    except KeyboardInterrupt:
        log.info("stopping: deleting Serve application %r", config.app_name)
        undeploy(config)


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM (`kill`, `docker stop`, a process manager) stops the server the way Ctrl-C does:
    the application is deleted and the job exits 0, instead of Ray's default of dying mid-call."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def resolve_export_dir(config: RootConfig) -> ServeConfig:
    """serve.export_dir, else the export pretraining writes: <run.output_dir>/export."""
    if config.serve.export_dir:
        return config.serve
    return dataclasses.replace(config.serve, export_dir=os.path.join(config.run.output_dir, "export"))


@job
def main(config: RootConfig) -> None:
    from moe_platform.serve.engine import ExportError, check_export  # torch: only once the config is valid

    serve_config = resolve_export_dir(config)
    try:
        check_export(serve_config.export_dir)
    except ExportError as exc:
        default = " (the default, <run.output_dir>/export: train first or set serve.export_dir)"
        hint = "" if config.serve.export_dir else default
        raise ConfigError(f"{exc}{hint}") from None
    init_ray()
    serve_export(serve_config)
    if serve_config.blocking:
        wait_until_interrupted(serve_config)


if __name__ == "__main__":
    main()
