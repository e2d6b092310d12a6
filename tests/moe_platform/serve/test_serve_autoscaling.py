"""Autoscaling shown live: 1 -> 2 replicas under a sustained bounded load, back to 1 when the
load drops, proven with Serve's own status, and no request fails during either move."""
from __future__ import annotations

import threading
import time

import pytest
from testkit.serving import deploy_for_test

from moe_platform.serve.config import AutoscalingConfig

pytestmark = pytest.mark.slow


def running_replicas(app_name: str) -> int:
    from ray import serve

    deployment = serve.status().applications[app_name].deployments["CompletionServer"]
    return sum(n for state, n in deployment.replica_states.items() if str(state).endswith("RUNNING"))


class Load:
    """`clients` closed-loop threads sending greedy completions until stopped; every reply is kept."""

    def __init__(self, served, clients: int) -> None:
        self.served, self.statuses, self._stop = served, [], threading.Event()
        self._threads = [threading.Thread(target=self._client, daemon=True) for _ in range(clients)]
        for thread in self._threads:
            thread.start()

    def _client(self) -> None:
        client = self.served.client(timeout_s=120)
        while not self._stop.is_set():
            reply = client.complete(prompt="The quick brown", max_tokens=40, temperature=0)
            self.statuses.append(reply.status)

    def stop(self) -> list:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=150)
        return self.statuses


def wait_for(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout_s:.0f} s waiting for {what}"
        time.sleep(1.0)


def test_a_sustained_load_scales_to_two_replicas_and_idle_scales_back_to_one(ray_cluster, serve_port, tiny_export):
    from ray import serve

    scaling = AutoscalingConfig(min_replicas=1, max_replicas=2, target_ongoing_requests=2,
                                upscale_delay_s=1.0, downscale_delay_s=3.0, look_back_period_s=3.0)  # fmt: skip
    served = deploy_for_test(tiny_export, serve_port, autoscaling=scaling, max_batch_size=4)
    name = served.config.app_name
    try:
        assert running_replicas(name) == 1
        heavy = Load(served, clients=8)  # 8 ongoing against a target of 2 per replica
        wait_for(lambda: running_replicas(name) == 2, 120, "a second replica under load")
        light = Load(served, clients=1)  # keeps requests flowing while Serve scales back down
        statuses = heavy.stop()
        wait_for(lambda: running_replicas(name) == 1, 120, "the extra replica to go when the load drops")
        statuses += light.stop()
        assert statuses and set(statuses) == {200}, sorted(set(statuses))
    finally:
        serve.delete(name)
