"""Shared fixtures: one local Ray instance per test session.

Tests that need Ray take `ray_cluster`. It starts Ray once with a few logical
CPUs on this 2-core box (train workers use fractional CPUs so Ray Data is never
starved), and exports RAY_ADDRESS so jobs run as subprocesses join the same
instance instead of starting their own.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def ray_cluster():
    import ray

    context = ray.init(
        address="local",
        num_cpus=4,
        object_store_memory=1_000_000_000,
        include_dashboard=True,  # Tune leaks placement groups without it (docs/ray-notes.md)
        log_to_driver=True,
    )
    previous = os.environ.get("RAY_ADDRESS")
    os.environ["RAY_ADDRESS"] = context.address_info["address"]
    yield context
    if previous is None:
        os.environ.pop("RAY_ADDRESS", None)
    else:
        os.environ["RAY_ADDRESS"] = previous
    ray.shutdown()


@pytest.fixture()
def job_env(ray_cluster) -> dict[str, str]:
    """Environment for running a job file as a subprocess against the session's Ray."""
    env = dict(os.environ)
    env["RAY_ADDRESS"] = ray_cluster.address_info["address"]
    env["PYTHONUNBUFFERED"] = "1"
    return env


PYTHON = sys.executable
