"""moe.testing.run_distributed_test reports its two known failure modes as what they are:
a rank aborted by C++ std::terminate (SIGABRT), and ranks stuck on a stale DeepSpeed op build lock."""
from __future__ import annotations

import os

import pytest

from moe.testing import run_distributed_test, torch_extension_locks


def _abort_on_rank_1() -> None:
    import torch.distributed as dist

    if dist.get_rank() == 1:
        os.abort()  # what "terminate called without an active exception" ends in


def test_a_rank_killed_by_sigabrt_is_reported_as_such():
    with pytest.raises(RuntimeError, match=r"rank 1 was killed by SIGABRT before its test body finished\. "
                                           r"'terminate called without an active exception'"):
        run_distributed_test(_abort_on_rank_1, world_size=2, timeout_s=300)


def _nothing() -> None:
    pass


@pytest.mark.slow  # it waits out its timeout, on purpose
def test_ranks_waiting_on_a_stale_build_lock_fail_naming_the_lock(tmp_path, monkeypatch):
    # An interrupted build of DeepSpeed's CPU comm op leaves its lock: every rank that loads the op waits on it.
    lock = tmp_path / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir()
    lock.touch()
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))  # inherited by the spawned ranks
    assert torch_extension_locks() == [str(lock)]
    with pytest.raises(TimeoutError, match=rf"rank\(s\) \[0, 1\] still running after 10 s; torch_extensions build "
                                           rf"lock\(s\) {lock} exist"):
        run_distributed_test(_nothing, world_size=2, timeout_s=10)
