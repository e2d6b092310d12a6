"""Helpers for multi-process tests on CPU (after OLMo-core's run_distributed_test)."""

from __future__ import annotations

import os
import socket
from typing import Any, Callable

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, backend: str, fn: Callable, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)  # world_size processes share the machine's cores
    import deepspeed

    deepspeed.init_distributed(dist_backend=backend)
    try:
        fn(*args)
    finally:
        torch.distributed.destroy_process_group()


def run_distributed_test(fn: Callable, *args: Any, world_size: int = 2, backend: str = "gloo") -> None:
    """Run fn(*args) in world_size spawned processes with torch.distributed (and DeepSpeed's
    comm) initialised. fn must be importable (module level); an exception in any rank fails."""
    mp.start_processes(_worker, args=(world_size, free_port(), backend, fn, args), nprocs=world_size,
                       join=True, start_method="spawn")
