"""Shared fixtures: one local Ray instance per test session (helpers: tests/testkit).

Tests that need Ray take `ray_cluster`. It starts Ray once with a few logical
CPUs on this 2-core box (train workers use fractional CPUs so Ray Data is never
starved), and exports RAY_ADDRESS so jobs run as subprocesses join the same
instance instead of starting their own. Under `make test`'s two pytest-xdist workers every
test that takes `ray_cluster` runs on the same worker, so there is still one Ray instance
(testkit.xdist_units).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from testkit import xdist_units

REPO_ROOT = Path(__file__).resolve().parents[1]

# DeepSpeed JIT-builds its CPU comm op into torch's extension directory, ~/.cache/torch_extensions
# unless TORCH_EXTENSIONS_DIR says otherwise: one directory, and one build lock, for every
# checkout and virtualenv of the user. Sources from another virtualenv count as a change there,
# so two checkouts tested at once rebuild the op in turn and wait on each other's lock. The
# suite builds into its own virtualenv instead (inherited by the ranks, Ray workers and jobs).
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))


# Ray Train's controller polls its workers every 2 s by default; a worker's report waits for the
# next poll, and so does the end of every run. Tests run dozens of short runs: poll faster.
# Set before ray.init so that every Ray worker (Tune trials drive Train runs too) inherits it.
TRAIN_POLL_INTERVAL_S = "0.25"
# Serve replicas and handles push autoscaling metrics every 10 s by default, so a scaling decision
# waits tens of seconds for data; the autoscaling tests use a 3 s look-back window over 0.5 s pushes.
SERVE_METRIC_PUSH_INTERVAL_S = "0.5"


def pytest_configure(config):
    if xdist_units.is_controller(config):
        xdist_units.name_ray_tests_file()


def pytest_unconfigure(config):
    if xdist_units.is_controller(config):
        xdist_units.remove_ray_tests_file()


def pytest_collection_modifyitems(config, items):
    xdist_units.write_ray_tests(items)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """`make test` runs two workers: one takes every Ray test, the other the rest (testkit.xdist_units)."""
    return xdist_units.RayTestsOnOneWorker(config, log)


@pytest.fixture(scope="session")
def deepspeed_ops():
    """DeepSpeed's CPU comm op built once, before any rank or Train worker loads it (testkit.deepspeed_ops)."""
    from testkit.deepspeed_ops import build_deepspeed_ops

    build_deepspeed_ops()


@pytest.fixture(scope="session")
def ray_cluster(deepspeed_ops):
    import ray

    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", TRAIN_POLL_INTERVAL_S)
    for pusher in ("REPLICA", "HANDLE"):
        os.environ.setdefault(f"RAY_SERVE_{pusher}_AUTOSCALING_METRIC_PUSH_INTERVAL_S", SERVE_METRIC_PUSH_INTERVAL_S)
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


def _job_env(ray_cluster) -> dict[str, str]:
    env = dict(os.environ)
    env["RAY_ADDRESS"] = ray_cluster.address_info["address"]
    env["PYTHONUNBUFFERED"] = "1"
    return env


@pytest.fixture()
def job_env(ray_cluster) -> dict[str, str]:
    """Environment for running a job file as a subprocess against the session's Ray."""
    return _job_env(ray_cluster)


@pytest.fixture(scope="session")
def smoke_run(ray_cluster, tmp_path_factory):
    """One prepare + pretrain of the tiny model, shared by every test that needs a trained run or
    its export (testkit.smoke); a failed job errors every user with the job's last output."""
    from testkit.smoke import run_smoke

    return run_smoke(tmp_path_factory.mktemp("smoke"), _job_env(ray_cluster))


@pytest.fixture(scope="session")
def interrupted_sweep(ray_cluster, tmp_path_factory):
    """One jobs/tune.py sweep interrupted with Ctrl-C after its first trial, then resumed to the end
    (testkit.sweeps): the Tune job's tests and the sweep's tests read it."""
    from testkit.sweeps import run_interrupted_sweep

    return run_interrupted_sweep(tmp_path_factory.mktemp("sweep"), _job_env(ray_cluster))


PYTHON = sys.executable
