"""Fixtures for serving tests: a tiny random export and the app running on the session's Ray.

`served_app` deploys once per test module under a unique application name and route
prefix, on the Serve HTTP proxy of the session's Ray (loopback, a free port chosen
here unless Serve is already running), and deletes only its own application.
"""
from __future__ import annotations

import pytest
from testkit.serving import deploy_for_test, ensure_serve_port, tiny_serve_model


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory) -> str:
    from moe_platform.serve.random_export import write_random_export

    return write_random_export(str(tmp_path_factory.mktemp("export") / "tiny"), tiny_serve_model(), seed=0)


@pytest.fixture(scope="module")
def one_torch_thread():
    """As in a replica. Two threads on a busy 2-core box spin-wait on each other (seen: 400x slower)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def engine(tiny_export, one_torch_thread):
    """The tiny export's serving engine, in this process (no Ray), on one torch thread."""
    from moe_platform.serve.engine import Engine

    return Engine.load(tiny_export)


@pytest.fixture(scope="session")
def serve_port(ray_cluster) -> int:
    return ensure_serve_port()


@pytest.fixture(scope="module")
def served_app(ray_cluster, serve_port, tiny_export):
    from ray import serve

    served = deploy_for_test(tiny_export, serve_port)
    yield served
    serve.delete(served.config.app_name)
