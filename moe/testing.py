"""Helpers for multi-process tests on CPU (after OLMo-core's run_distributed_test).

Two failure modes of spawned gloo ranks are reported as what they are instead of as a hang or
a bare signal:
- a rank that never finishes: after `timeout_s` the ranks are killed and the error names any
  torch_extensions build lock (an interrupted JIT build of DeepSpeed's CPU comm op leaves
  one behind, and every later process waits on it forever);
- a rank killed by SIGABRT ("terminate called without an active exception": C++ std::terminate,
  a native thread still joinable when the process tore down) - the error says whether its test
  body had finished.
"""

from __future__ import annotations

import glob
import os
import signal
import socket
import sys
import tempfile
import time
from typing import Any, Callable

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torch_extension_locks() -> list[str]:
    """Build locks under torch's JIT extension directory. A lock that stays while no build runs
    is stale: every process that loads the op (DeepSpeed's comm op on CPU) waits on it forever."""
    from torch.utils.cpp_extension import get_default_build_root

    # $TORCH_EXTENSIONS_DIR/<op>/lock, else ~/.cache/torch_extensions/<python>_<device>/<op>/lock
    custom = os.environ.get("TORCH_EXTENSIONS_DIR")
    pattern = os.path.join(custom, "*", "lock") if custom else os.path.join(get_default_build_root(), "*", "*", "lock")
    return sorted(glob.glob(pattern))


def _worker(rank: int, world_size: int, port: int, backend: str, fn: Callable, args: tuple, done_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)  # world_size processes share the machine's cores
    import deepspeed

    deepspeed.init_distributed(dist_backend=backend)
    try:
        fn(*args)
        torch.distributed.barrier()  # no rank tears down while a peer may still talk to it
    finally:
        torch.distributed.destroy_process_group()
    open(os.path.join(done_dir, f"rank_{rank}"), "w").close()
    # The test body passed and the process group is gone: leave without the interpreter's
    # teardown, where native threads of torch/gloo still joinable at exit abort the process
    # (SIGABRT, "terminate called without an active exception") after the work is done.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_distributed_test(fn: Callable, *args: Any, world_size: int = 2, backend: str = "gloo",
                         timeout_s: float = 600) -> None:  # fmt: skip
    """Run fn(*args) in world_size spawned processes with torch.distributed (and DeepSpeed's
    comm) initialised. fn must be importable (module level); an exception in any rank fails,
    and so does a rank still running after timeout_s (see the module docstring)."""
    with tempfile.TemporaryDirectory(prefix="distributed-test-") as done_dir:
        context = mp.start_processes(_worker, args=(world_size, free_port(), backend, fn, args, done_dir),
                                     nprocs=world_size, join=False, start_method="spawn")  # fmt: skip
        deadline = time.monotonic() + timeout_s
        try:
            # join() returns as soon as any rank exits: loop until all have, or time is up.
            while not context.join(timeout=max(0.0, deadline - time.monotonic())):
                if time.monotonic() >= deadline:
                    _fail_on_timeout(context, timeout_s)
        except mp.ProcessExitedException as exc:
            if exc.exit_code == -signal.SIGABRT:
                finished = os.path.exists(os.path.join(done_dir, f"rank_{exc.error_index}"))
                raise RuntimeError(_abort_message(exc.error_index, finished)) from exc
            raise


def _fail_on_timeout(context, timeout_s: float) -> None:
    running = [rank for rank, process in enumerate(context.processes) if process.exitcode is None]
    for process in context.processes:
        if process.is_alive():
            process.kill()
    locks = torch_extension_locks()
    hint = (f"; torch_extensions build lock(s) {', '.join(locks)} exist: a JIT build of DeepSpeed's op that was "
            "interrupted leaves one behind and every process then waits on it - delete it if no build is running"
            if locks else "")  # fmt: skip
    raise TimeoutError(f"distributed test: rank(s) {running} still running after {timeout_s:.0f} s{hint} "
                       "(their output is in the test's captured stdout/stderr)")  # fmt: skip


def _abort_message(rank: int, finished: bool) -> str:
    when = ("after its test body passed and the process group was destroyed (during process teardown)"
            if finished else "before its test body finished")  # fmt: skip
    return (f"distributed test: rank {rank} was killed by SIGABRT {when}. 'terminate called without an "
            "active exception' is C++ std::terminate: a native thread (gloo/torch.distributed) was still "
            "joinable when its owner was destroyed.")
