"""The training worker's compute setup: intra-op threads, the CPU allocator, the MFU peak."""
import subprocess
import sys

import pytest
import torch

from moe_platform.train.engine import intra_op_threads
from moe_platform.train.metrics import measured_matmul_flops
from testkit.processes import tail

# Allocates and fills a 64 MiB tensor again and again, as training steps do with their logits and
# gradients, and prints the minor page faults of the last 5 of 15 rounds (the first rounds grow the
# heap: glibc's posix_memalign asks a little more than a freed block of the same size offers):
# first with glibc's defaults, then under the training workers' policy. One process: one torch import.
FAULTS_OF_REPEATED_LARGE_TENSORS = """
import resource, torch
from moe_platform.train.engine import keep_large_blocks_on_heap

def faults():
    for _ in range(10):
        torch.ones(16 << 20)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        torch.ones(16 << 20)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

default = faults()
print(default, faults() if keep_large_blocks_on_heap() else "not glibc")
"""


def test_default_threads_share_the_cores_among_the_workers_of_a_node(monkeypatch):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(8)))
    assert intra_op_threads(None, workers_on_node=1) == 8
    assert intra_op_threads(None, workers_on_node=3) == 2
    assert intra_op_threads(None, workers_on_node=16) == 1
    assert intra_op_threads(4, workers_on_node=1) == 4  # trainer.torch_threads wins


def test_large_tensors_reuse_the_heap_instead_of_faulting_in_fresh_pages_every_step():
    done = subprocess.run([sys.executable, "-c", FAULTS_OF_REPEATED_LARGE_TENSORS], capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert done.returncode == 0, tail(done.stderr)
    default, kept = done.stdout.split()
    if kept == "not glibc":
        pytest.skip("mallopt is glibc's: this libc keeps its own allocation policy")
    # 5 x 64 MiB of fresh pages is 5 x 16384 faults of 4 KiB; a reused heap block faults none.
    assert int(default) > 5 * 8192, "glibc mmaps 64 MiB blocks by default: the baseline"
    assert int(kept) < 1000


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_measured_matmul_peak_is_a_rate_and_leaves_the_rng_alone(dtype):
    rng = torch.random.get_rng_state()
    peak = measured_matmul_flops(torch.device("cpu"), dtype, size=256, repeats=3)
    assert 1e8 < peak < 1e14  # FLOP/s: any CPU from a slow core to a large socket
    # Measured mid-training: drawing from the global RNG would make a resumed run diverge.
    assert torch.equal(torch.random.get_rng_state(), rng)
