"""Autoscaling proven on one machine: a job that needs more CPUs than the head has makes the
Ray autoscaler add worker nodes, the job succeeds on them, and the idle nodes go away.

The cluster is Ray's fake_multinode provider driven by cluster/local/fake_autoscaling.yaml
(head: 0 CPUs; workers: 1 CPU each, 0..2, idle timeout 6 s), started privately with its
own ports and temp dir and torn down by PID (see fake_autoscaling_cluster.py).
"""

from __future__ import annotations

import io
import shutil
import time

import pytest
from cluster_test_support import CLUSTER_DIR, REPO_ROOT
from fake_autoscaling_cluster import FakeAutoscalingCluster
from moe_platform.cluster.auth import find_token
from moe_platform.cluster.runtime_env import load_runtime_env
from moe_platform.cluster.submit import connect, follow, submit

TIMEOUT_S = 180  # every wait is bounded by this
TASKS = 2  # 1 CPU each, on a 0-CPU head: the autoscaler must add 2 nodes (max_workers: 2)


@pytest.fixture()
def fake_cluster(tmp_path):
    token = find_token()
    cluster = FakeAutoscalingCluster(
        CLUSTER_DIR / "local" / "fake_autoscaling.yaml", tmp_path, auth_headers=token.headers() if token else {}
    )
    try:
        cluster.start(timeout_s=TIMEOUT_S)
        yield cluster
    finally:
        cluster.stop()
        leftovers = cluster.own_processes()
        shutil.rmtree(cluster.temp_dir, ignore_errors=True)
        assert not leftovers, f"processes of the fake cluster survived teardown: {[p.pid for p in leftovers]}"


@pytest.mark.slow
def test_a_job_larger_than_the_head_scales_the_cluster_up_and_back_down(fake_cluster):
    assert fake_cluster.alive_worker_nodes() == [], "the cluster must start with the head alone"
    client = connect(fake_cluster.dashboard_url, find_token())
    entrypoint = f"python tests/cluster/scripts/cpu_burst.py --tasks {TASKS} --seconds 5"

    submitted = time.monotonic()
    job_id = submit(client, entrypoint, load_runtime_env(REPO_ROOT), name="cpu_burst")
    fake_cluster.wait_until(
        lambda: len(fake_cluster.alive_worker_nodes()) == TASKS, TIMEOUT_S, f"{TASKS} worker nodes to be added"
    )
    scaled_up = time.monotonic()

    logs = io.StringIO()
    status = follow(client, job_id, out=logs)
    finished = time.monotonic()
    assert status.value == "SUCCEEDED", logs.getvalue()[-3000:]
    assert f"cpu_burst: {TASKS} tasks ran on {TASKS} node(s)" in logs.getvalue()
    assert "runtime_resources/py_modules_files" in logs.getvalue(), "moe_platform must reach workers via py_modules"

    fake_cluster.wait_until(lambda: fake_cluster.alive_worker_nodes() == [], TIMEOUT_S, "idle workers to be removed")
    scaled_down = time.monotonic()
    dead_workers = [n for n in fake_cluster.nodes() if n["state"] == "DEAD" and not n["is_head_node"]]
    assert len(dead_workers) == TASKS

    print(
        f"\nautoscaling: scale-up {scaled_up - submitted:.1f} s after submit, job {finished - submitted:.1f} s, "
        f"scale-down {scaled_down - finished:.1f} s after the job ended (idle timeout 6 s)"
    )
