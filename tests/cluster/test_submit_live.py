"""jobs/submit.py against the session's real local Ray (dashboard and Jobs API on, token auth on).

Most tests submit to a small copy of the project whose jobs succeed or fail on demand,
so they do not depend on how long the real jobs take; one submits a real job of ours.
Jobs run `python` on the head: here that must be the test's interpreter (`--python`).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import requests
from cluster_test_support import REPO_ROOT

# A job of the copied project: proves moe_platform arrived through py_modules, exits with exit=N.
PROBE_JOB = """\
import sys
import moe_platform
print("probe: moe_platform from", moe_platform.__file__)
code = int(dict(arg.split("=", 1) for arg in sys.argv[1:]).get("exit", "0"))
print("probe: exiting with", code)
sys.exit(code)
"""


@pytest.fixture(scope="module")
def probe_project(tmp_path_factory) -> Path:
    """jobs/submit.py, a probe job, the real moe_platform and runtime_env, nothing else."""
    root = tmp_path_factory.mktemp("probe_project")
    (root / "jobs").mkdir()
    shutil.copy(REPO_ROOT / "jobs" / "submit.py", root / "jobs" / "submit.py")
    (root / "jobs" / "probe.py").write_text(PROBE_JOB)
    ignore = shutil.ignore_patterns("__pycache__")
    shutil.copytree(REPO_ROOT / "platform" / "moe_platform", root / "platform" / "moe_platform", ignore=ignore)
    shutil.copytree(REPO_ROOT / "cluster", root / "cluster", ignore=ignore)
    return root


@pytest.fixture(scope="module")
def dashboard(ray_cluster) -> str:
    return f"http://{ray_cluster.dashboard_url}"


def run_submit(project: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    # --python goes first: everything after a `--` in args belongs to the job.
    command = [sys.executable, str(project / "jobs" / "submit.py"), "--python", sys.executable, *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=env or dict(os.environ))


def test_a_succeeding_job_streams_its_logs_and_exits_0(probe_project, dashboard):
    result = run_submit(probe_project, "probe", "exit=0", "--address", dashboard)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "job id: probe-" in result.stdout
    assert "probe: exiting with 0" in result.stdout  # the job's own output, streamed
    assert "runtime_resources/py_modules_files" in result.stdout, "moe_platform must come from py_modules"
    assert result.stdout.rstrip().endswith("SUCCEEDED")


def test_a_failing_job_exits_non_zero(probe_project, dashboard):
    result = run_submit(probe_project, "probe", "exit=3", "--address", dashboard)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "probe: exiting with 3" in result.stdout
    assert result.stdout.rstrip().endswith("FAILED")


def test_no_wait_returns_after_submitting(probe_project, dashboard):
    result = run_submit(probe_project, "probe", "--no-wait", "--address", dashboard)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "job id: probe-" in result.stdout and "ray job logs --follow" in result.stdout


@pytest.mark.slow  # a whole job submitted through the dashboard
def test_a_real_job_of_ours_runs_with_the_real_runtime_env(dashboard):
    """`--cfg job` makes Hydra compose and print the job's config, then exit: the job's imports,
    config tree and the uploaded working_dir all work on the cluster, in seconds."""
    job = "prepare"
    result = run_submit(REPO_ROOT, job, "--address", dashboard, "--", "--cfg", "job")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "model:" in result.stdout
    failing = run_submit(REPO_ROOT, job, "no_such_section.key=1", "--address", dashboard)
    assert failing.returncode == 1, failing.stdout + failing.stderr


@pytest.fixture(scope="module")
def token_protected(dashboard) -> None:
    if requests.get(f"{dashboard}/api/version", timeout=10).status_code == 200:
        pytest.skip("the session's Ray has token authentication off (RAY_AUTH_MODE=disabled?)")


def test_a_wrong_token_is_a_clear_error(probe_project, dashboard, token_protected):
    env = {**os.environ, "RAY_AUTH_TOKEN": "not-the-cluster-token"}
    result = run_submit(probe_project, "probe", "--address", dashboard, env=env)
    assert result.returncode == 2
    assert "rejected the auth token read from $RAY_AUTH_TOKEN (HTTP 403)" in result.stderr


def test_a_missing_token_is_a_clear_error(probe_project, dashboard, token_protected, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")}
    env["HOME"] = str(tmp_path)  # no ~/.ray/auth_token there
    result = run_submit(probe_project, "probe", "--address", dashboard, env=env)
    assert result.returncode == 2
    assert "requires an auth token and none was found (HTTP 401)" in result.stderr
    assert "~/.ray/auth_token" in result.stderr


def test_an_unreachable_cluster_is_a_clear_error(probe_project):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed_port = sock.getsockname()[1]
    result = run_submit(probe_project, "probe", "--address", f"http://127.0.0.1:{closed_port}")
    assert result.returncode == 2
    assert f"cannot reach the Ray dashboard at http://127.0.0.1:{closed_port}" in result.stderr


def test_an_unknown_job_is_refused_before_contacting_the_cluster(probe_project):
    result = run_submit(probe_project, "pretrian", "--address", "http://127.0.0.1:1")
    assert result.returncode == 2
    assert "unknown job 'pretrian': the jobs in" in result.stderr and "probe" in result.stderr
