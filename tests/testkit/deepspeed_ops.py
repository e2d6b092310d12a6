"""DeepSpeed's CPU comm op, built once per test session, before any rank or Ray Train worker loads it.

On CPU, DeepSpeed JIT-builds a small C++ op (`deepspeed_shm_comm`) the first time a process
group starts, under torch's build lock <torch_extensions>/<python>_cpu/<op>/lock, which every
loading process takes for a moment. A build killed midway (Ctrl-C, a timeout) leaves the lock
behind, and every later process then waits on it forever, silently. Building here first means
the ranks only load the op; a lock that outlives a build fails the session, naming the file.
"""
from __future__ import annotations

import time

from moe.testing import torch_extension_locks

# Longer than a build of the op takes on 2 busy cores (another session on this machine may be
# building it right now: that lock clears by itself).
LOCK_WAIT_S = 180


class StaleBuildLock(RuntimeError):
    pass


def build_deepspeed_ops(lock_wait_s: float = LOCK_WAIT_S) -> None:
    deadline = time.monotonic() + lock_wait_s
    while locks := torch_extension_locks():
        if time.monotonic() >= deadline:
            raise StaleBuildLock(
                f"torch_extensions build lock(s) {', '.join(locks)} did not clear in {lock_wait_s:.0f} s: left by an "
                "interrupted JIT build of a DeepSpeed op, they make every process that loads the op wait forever. "
                "Delete them if no build is running."
            )
        time.sleep(1)
    from deepspeed.comm.torch import build_shm_op

    build_shm_op()
