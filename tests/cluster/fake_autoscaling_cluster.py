"""A private autoscaling Ray cluster on this host, for tests (Ray's fake_multinode provider).

Other engineers run their own Ray instances on the same machine, and the test session
has one too, so everything here is isolated and owned:
- its own short temp dir (/tmp/rayas_<random>: Unix socket paths are length-limited),
- explicit free ports for every listener (GCS, dashboard, agents, workers, ...),
- an environment without RAY_ADDRESS, so nothing joins the session's Ray,
- teardown by PID: the processes whose command line names our temp dir (head daemons,
  fake worker nodes, Ray workers) plus their descendants (job drivers). Never `ray stop`,
  which kills every Ray on the host.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import string
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import requests
import yaml

RAY_BIN = Path(sys.executable).with_name("ray")


@dataclass(frozen=True)
class HeadPorts:
    gcs: int
    dashboard: int
    client_server: int
    node_manager: int
    object_manager: int
    runtime_env_agent: int
    metrics_export: int
    dashboard_agent_listen: int
    dashboard_agent_grpc: int
    min_worker: int
    max_worker: int

    def ray_start_flags(self) -> list[str]:
        return [
            f"--port={self.gcs}",
            f"--dashboard-port={self.dashboard}",
            f"--ray-client-server-port={self.client_server}",
            f"--node-manager-port={self.node_manager}",
            f"--object-manager-port={self.object_manager}",
            f"--runtime-env-agent-port={self.runtime_env_agent}",
            f"--metrics-export-port={self.metrics_export}",
            f"--dashboard-agent-listen-port={self.dashboard_agent_listen}",
            f"--dashboard-agent-grpc-port={self.dashboard_agent_grpc}",
            f"--min-worker-port={self.min_worker}",
            f"--max-worker-port={self.max_worker}",
        ]


def pick_ports(worker_port_count: int = 64) -> HeadPorts:
    """Free ports for every listener of the head, chosen while all are held so none repeats."""
    with contextlib.ExitStack() as stack:
        singles = [_bind_any(stack) for _ in range(9)]
        first_worker = _free_port_range(worker_port_count)
    return HeadPorts(*singles, min_worker=first_worker, max_worker=first_worker + worker_port_count - 1)


def _bind_any(stack: contextlib.ExitStack) -> int:
    sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
    sock.bind(("", 0))
    return sock.getsockname()[1]


def _free_port_range(count: int, attempts: int = 50) -> int:
    """A run of `count` free ports, away from the ephemeral range the kernel hands out."""
    for _ in range(attempts):
        start = random.randrange(20000, 30000 - count)
        if all(_is_free(port) for port in range(start, start + count)):
            return start
    raise RuntimeError(f"found no {count} consecutive free ports in 20000-30000")


def _is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("", port))
        except OSError:
            return False
    return True


def write_config(template: Path, destination: Path, gcs_port: int) -> Path:
    """Our fake_autoscaling.yaml with the fake nodes pointed at this head's GCS port."""
    config = yaml.safe_load(template.read_text())
    config["cluster_name"] = f"{config['cluster_name']}-{gcs_port}"
    config["provider"]["gcs_address"] = f"127.0.0.1:{gcs_port}"
    destination.write_text(yaml.safe_dump(config))
    return destination


class FakeAutoscalingCluster:
    """Start with `start()`, stop with `stop()` (idempotent; kills only our processes)."""

    def __init__(self, config_template: Path, work_dir: Path, auth_headers: dict[str, str]):
        self.temp_dir = Path(f"/tmp/rayas_{''.join(random.choices(string.ascii_lowercase + string.digits, k=8))}")
        self.ports = pick_ports()
        self.config_path = write_config(config_template, work_dir / "fake_autoscaling.yaml", self.ports.gcs)
        self.log_path = work_dir / "ray_start.log"
        self.auth_headers = auth_headers

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.ports.dashboard}"

    def start(self, timeout_s: float = 120) -> None:
        command = [
            str(RAY_BIN), "start", "--head", "--num-cpus=0", "--disable-usage-stats",
            f"--temp-dir={self.temp_dir}", f"--autoscaling-config={self.config_path}",
            *self.ports.ray_start_flags(),
        ]  # fmt: skip
        with self.log_path.open("w") as log:
            # `ray start` returns once the head is up; its daemons live on detached (stop() finds them).
            process = subprocess.Popen(command, env=self._env(), stdout=log, stderr=subprocess.STDOUT)
            try:
                returncode = process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                raise RuntimeError(
                    f"`ray start --head` did not return within {timeout_s:.0f} s; see {self.log_path}"
                ) from None
        if returncode != 0:
            raise RuntimeError(f"`ray start --head` failed with exit {returncode}: {self.log_path.read_text()[-2000:]}")
        self.wait_until(self.dashboard_ready, timeout_s, "the dashboard to answer")

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
        env.update(RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1", PYTHONUNBUFFERED="1")
        # Job entrypoints say `python`: on this head that must be the test's interpreter.
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        return env

    def dashboard_ready(self) -> bool:
        try:
            return requests.get(f"{self.dashboard_url}/api/version", headers=self.auth_headers, timeout=5).ok
        except requests.exceptions.RequestException:
            return False

    def nodes(self) -> list[dict[str, Any]]:
        """Every node the GCS knows (alive and dead), from the dashboard's state API."""
        response = requests.get(
            f"{self.dashboard_url}/api/v0/nodes",
            params={"limit": 1000, "detail": 1},
            headers=self.auth_headers,
            timeout=10,
        )
        response.raise_for_status()
        return response.json()["data"]["result"]["result"]

    def alive_worker_nodes(self) -> list[dict[str, Any]]:
        return [n for n in self.nodes() if n["state"] == "ALIVE" and not n["is_head_node"]]

    @staticmethod
    def wait_until(predicate, timeout_s: float, what: str, interval_s: float = 0.5):
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            result = predicate()
            if result:
                return result
            time.sleep(interval_s)
        raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}")

    def own_processes(self) -> list[psutil.Process]:
        """Our head's daemons, fake nodes and workers (they name our temp dir) and their children."""
        marker = str(self.temp_dir)
        owned: dict[int, psutil.Process] = {}
        for proc in psutil.process_iter(["pid", "cmdline"]):
            if any(marker in part for part in proc.info["cmdline"] or []):
                owned[proc.pid] = proc
        for proc in list(owned.values()):
            with contextlib.suppress(psutil.Error):
                owned.update({child.pid: child for child in proc.children(recursive=True)})
        owned.pop(os.getpid(), None)
        return list(owned.values())

    def stop(self, grace_s: float = 3) -> None:
        """SIGTERM our processes, SIGKILL what is left after `grace_s`, repeat until none remains."""
        for _ in range(3):  # a dying raylet may still spawn a worker: sweep again
            procs = self.own_processes()
            if not procs:
                break
            for proc in procs:
                with contextlib.suppress(psutil.Error):
                    proc.send_signal(signal.SIGTERM)
            _, alive = psutil.wait_procs(procs, timeout=grace_s)
            for proc in alive:
                with contextlib.suppress(psutil.Error):
                    proc.kill()
            psutil.wait_procs(alive, timeout=5)
