"""Submit one of our jobs to a running Ray cluster and follow it to the end.

    python jobs/submit.py pretrain experiment=smoke trainer.num_workers=8 --address http://HEAD:8265

The job runs as `python jobs/<job>.py <overrides>` on the cluster with the runtime_env
of cluster/runtime_env.yaml (the repo as working_dir, moe_platform as a py_module).
Logs stream here; the exit status is the job's: 0 SUCCEEDED, 1 FAILED or STOPPED,
2 when it could not be submitted (bad job name, unreachable cluster, missing or wrong token).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

import requests
from ray.exceptions import AuthenticationError
from ray.job_submission import JobStatus, JobSubmissionClient

from moe_platform.cluster.auth import TOKEN_SOURCES, AuthToken, TokenError, find_token

EXIT_SUCCEEDED, EXIT_FAILED, EXIT_NOT_SUBMITTED, EXIT_INTERRUPTED = 0, 1, 2, 130

# Python files in jobs/ that are helpers, not jobs one can submit.
_NOT_JOBS = {"__init__", "common", "config", "submit"}

_CONNECT_TIMEOUT_S = 10.0
# How long to wait for the job agent of a head that has just started ("No available agent...").
_AGENT_WAIT_S = 60.0
_NO_AGENT_YET = "No available agent to submit job"
# The log stream closes when the driver exits; the status can lag it by a moment.
_STATUS_SETTLE_TIMEOUT_S = 60.0


class SubmitError(RuntimeError):
    """The job could not be submitted or followed; the message is one sentence for the user."""


def job_names(project_root: Path) -> list[str]:
    """The jobs one can submit: the job files in jobs/."""
    jobs_dir = project_root / "jobs"
    return sorted(p.stem for p in jobs_dir.glob("*.py") if p.stem not in _NOT_JOBS and not p.stem.startswith("_"))


def job_entrypoint(project_root: Path, job: str, overrides: list[str], python: str = "python") -> str:
    """The shell command the cluster runs, e.g. `python jobs/pretrain.py trainer.max_steps=10`.

    `python` is the interpreter on the head node: `python` in our image, a venv's on a local Ray.
    """
    names = job_names(project_root)
    if job not in names:
        raise SubmitError(f"unknown job {job!r}: the jobs in {project_root / 'jobs'} are {', '.join(names) or 'none'}")
    return shlex.join([python, f"jobs/{job}.py", *overrides])


def resolve_address(address: str | None, environ: dict[str, str] | None = None) -> str:
    """--address, else $RAY_API_SERVER_ADDRESS, else $RAY_ADDRESS (as `ray job submit` does)."""
    environ = os.environ if environ is None else environ
    address = address or environ.get("RAY_API_SERVER_ADDRESS") or environ.get("RAY_ADDRESS")
    if not address:
        raise SubmitError("no cluster address: pass --address http://HEAD:8265 or set RAY_ADDRESS")
    if "://" not in address and address.rsplit(":", 1)[-1] == "8265":
        address = f"http://{address}"  # host:8265 is the dashboard, never a GCS address
    return address.rstrip("/")


def connect(address: str, token: AuthToken | None) -> JobSubmissionClient:
    """A Jobs API client for `address`, failing with one clear sentence when that is impossible."""
    headers = token.headers() if token else {}
    if address.startswith(("http://", "https://")):
        _check_dashboard(address, token)
    try:
        with _without_address_env():
            return JobSubmissionClient(address, headers=headers)
    except AuthenticationError as exc:
        raise _auth_error(address, token, "Authentication failed" in str(exc)) from None
    except (ConnectionError, requests.exceptions.ConnectionError) as exc:
        raise SubmitError(f"cannot reach the Ray cluster at {address} ({exc})") from None


@contextlib.contextmanager
def _without_address_env() -> Iterator[None]:
    """Ray lets $RAY_ADDRESS override the address a JobSubmissionClient is given; ours must win."""
    saved = {k: os.environ.pop(k) for k in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS") if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def _check_dashboard(url: str, token: AuthToken | None) -> None:
    """One bounded request first: Ray's client has no timeout, and its auth errors are pages long."""
    try:
        response = requests.get(
            f"{url}/api/version", headers=token.headers() if token else {}, timeout=_CONNECT_TIMEOUT_S
        )
    except requests.exceptions.RequestException as exc:
        reason = type(exc).__name__
        raise SubmitError(
            f"cannot reach the Ray dashboard at {url} ({reason}); "
            "is the cluster up and is this its dashboard address (http://HEAD:8265)?"
        ) from None
    if response.status_code in (401, 403):
        raise _auth_error(url, token, wrong_token=response.status_code == 403)
    if response.status_code != 200:
        raise SubmitError(f"{url}/api/version answered HTTP {response.status_code}; is this a Ray dashboard address?")


def _auth_error(address: str, token: AuthToken | None, wrong_token: bool) -> SubmitError:
    if wrong_token and token is not None:
        return SubmitError(
            f"the cluster at {address} rejected the auth token read from {token.source} (HTTP 403); "
            "use the cluster's token"
        )
    return SubmitError(
        f"the cluster at {address} requires an auth token and none was found (HTTP 401); put it in {TOKEN_SOURCES}"
    )


def submit(client: JobSubmissionClient, entrypoint: str, runtime_env: dict[str, Any], name: str) -> str:
    """Submit `entrypoint`; returns the submission id (readable: `<name>-<time>-<random>`)."""
    submission_id = f"{name}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    deadline = time.monotonic() + _AGENT_WAIT_S
    while True:
        try:
            return client.submit_job(
                entrypoint=entrypoint, runtime_env=runtime_env, submission_id=submission_id, metadata={"job": name}
            )
        except AuthenticationError:
            raise SubmitError("the cluster rejected the auth token while uploading the job") from None
        except (RuntimeError, ValueError) as exc:
            # A head that has just started answers 500 until its job agent registers: wait for it.
            if _NO_AGENT_YET in str(exc) and time.monotonic() < deadline:
                time.sleep(1.0)
                continue
            raise SubmitError(f"the cluster refused the job: {_first_line(exc)}") from None


def follow(client: JobSubmissionClient, job_id: str, out: TextIO = sys.stdout) -> JobStatus:
    """Stream the job's logs to `out` until it ends; returns its final status."""
    try:
        asyncio.run(_stream_logs(client, job_id, out))
    except RuntimeError as exc:  # the log socket dropped (e.g. a port-forward hiccup): the job runs on
        print(f"[submit] log stream lost ({_first_line(exc)}); polling the job status instead", file=sys.stderr)
        return wait_for_terminal_status(client, job_id, timeout_s=None)
    return wait_for_terminal_status(client, job_id)


async def _stream_logs(client: JobSubmissionClient, job_id: str, out: TextIO) -> None:
    async for chunk in client.tail_job_logs(job_id):
        out.write(chunk)
        out.flush()


def wait_for_terminal_status(
    client: JobSubmissionClient, job_id: str, timeout_s: float | None = _STATUS_SETTLE_TIMEOUT_S
) -> JobStatus:
    """Poll until the job is SUCCEEDED, FAILED or STOPPED. Bounded by default: once the logs have
    ended the status follows within seconds; `timeout_s=None` waits as long as the job runs."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    status = client.get_job_status(job_id)
    while not status.is_terminal():
        if deadline is not None and time.monotonic() > deadline:
            raise SubmitError(f"job {job_id} is still {status.value} {timeout_s:.0f} s after its logs ended")
        time.sleep(0.5 if deadline is not None else 5.0)
        status = client.get_job_status(job_id)
    return status


def exit_code(status: JobStatus) -> int:
    return EXIT_SUCCEEDED if status == JobStatus.SUCCEEDED else EXIT_FAILED


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def load_token() -> AuthToken | None:
    try:
        return find_token()
    except TokenError as exc:
        raise SubmitError(str(exc)) from None
