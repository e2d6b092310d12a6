"""Fixtures for batch generation: a tiny random export and its engine in this process (no Ray)."""
from __future__ import annotations

import pytest
from testkit.serving import tiny_serve_model


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory) -> str:
    from moe_platform.serve.random_export import write_random_export

    return write_random_export(str(tmp_path_factory.mktemp("export") / "tiny"), tiny_serve_model(), seed=0)


@pytest.fixture(scope="module")
def engine(tiny_export):
    """The tiny export's serving engine on one torch thread, as in a replica."""
    import torch

    from moe_platform.serve.engine import Engine

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield Engine.load(tiny_export)
    torch.set_num_threads(previous)
