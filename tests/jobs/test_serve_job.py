"""`python jobs/serve.py ...` as users run it: config errors before Ray, detached and blocking
serving on the session's Ray, and the whole path prepare -> pretrain -> export -> serve."""
from __future__ import annotations

import os
import signal
import time
import uuid

import pytest
from testkit.processes import REPO_ROOT, environment_without_ray, run_job, start_job
from testkit.serving import API_KEY, ensure_serve_port, tiny_serve_model

from moe_platform.serve.client import CompletionsClient
from moe_platform.serve.config import API_KEY_ENV

RAY_STARTED = "Started a local Ray instance"


def app_overrides(export_dir: str, port: int) -> tuple[list[str], str]:
    name = f"job-{uuid.uuid4().hex[:8]}"
    overrides = [f"serve.export_dir={export_dir}", f"serve.app_name={name}", f"serve.route_prefix=/{name}",
                 f"serve.port={port}", "serve.num_cpus=0.25", "serve.model_name=tiny"]  # fmt: skip
    return overrides, name


@pytest.fixture(scope="module")
def job_export(tmp_path_factory) -> str:
    from moe_platform.serve.random_export import write_random_export

    return write_random_export(str(tmp_path_factory.mktemp("job") / "export"), tiny_serve_model(), seed=0)


@pytest.fixture(scope="module")
def session_serve_port(ray_cluster) -> int:
    return ensure_serve_port()


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["serve.export_dir=/x", "serve.max_batch_size=0"], "config error: serve.max_batch_size=0 must be >= 1"),
        (["serve.export_dir=/no/such/export"], "config error: serve.export_dir='/no/such/export' is not a directory"),
        (["run.output_dir=/no/run"], "config error: serve.export_dir='/no/run/export' is not a directory "
         "(the default, <run.output_dir>/export: train first or set serve.export_dir)"),
    ],
    ids=["bad-value", "missing-export", "default-export-missing"],
)
def test_bad_serve_config_is_one_line_before_ray(overrides, message):
    result = run_job("serve.py", *overrides, env=environment_without_ray(), timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == message
    assert "Traceback" not in result.stderr and RAY_STARTED not in result.stderr + result.stdout


def compose_root(*overrides: str):
    from hydra import compose, initialize_config_dir

    from jobs.common import to_root_config
    from jobs.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(REPO_ROOT / "jobs" / "conf"), version_base="1.3"):
        return to_root_config(compose("config", overrides=list(overrides)))


def test_serve_overrides_reach_the_typed_config():
    from jobs.common import ConfigError
    from moe_platform.serve.config import ServeConfig

    config = compose_root("serve.export_dir=/e", "serve.autoscaling.max_replicas=3", "serve.num_cpus=0.25")
    assert isinstance(config.serve, ServeConfig)
    assert (config.serve.export_dir, config.serve.autoscaling.max_replicas, config.serve.num_cpus) == ("/e", 3, 0.25)
    with pytest.raises(ConfigError, match=r"serve\.autoscaling\.min_replicas=4 must be <= "):
        compose_root("serve.autoscaling.min_replicas=4")


def test_sigterm_stops_the_blocking_wait_like_ctrl_c():
    from jobs.serve import sigterm_as_interrupt

    received = []  # a harmless handler around the test, so a broken context cannot kill pytest
    previous = signal.signal(signal.SIGTERM, lambda *_: received.append("outer"))
    try:
        with pytest.raises(KeyboardInterrupt):  # the path that deletes the app and exits 0
            with sigterm_as_interrupt():
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(1.0)  # Python runs the handler here at the latest
        assert received == []
        os.kill(os.getpid(), signal.SIGTERM)  # afterwards the handler before it is back
        time.sleep(0.1)
        assert received == ["outer"]
    finally:
        signal.signal(signal.SIGTERM, previous)


@pytest.mark.slow  # the serve job as a process, deployed and left running
def test_detached_job_leaves_the_app_serving_on_the_cluster(job_env, job_export, session_serve_port):
    from ray import serve

    overrides, name = app_overrides(job_export, session_serve_port)
    result = run_job("serve.py", *overrides, "serve.blocking=false", env={**job_env, API_KEY_ENV: API_KEY},
                     timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    url = f"http://127.0.0.1:{session_serve_port}/{name}"
    assert f"serving tiny at {url}" in result.stdout
    assert f"curl -s {url}/v1/completions" in result.stdout
    assert "Authorization: Bearer $MOE_SERVE_API_KEY" in result.stdout
    try:
        assert CompletionsClient(url, api_key=None).complete(prompt="hi").status == 401
        reply = CompletionsClient(url, api_key=API_KEY).complete(prompt="hello", max_tokens=3, temperature=0)
        assert reply.status == 200, reply.body
    finally:
        serve.delete(name)


@pytest.mark.slow  # the serve job as a process, until Ctrl-C
def test_blocking_job_serves_until_ctrl_c_then_deletes_its_app(job_env, job_export, session_serve_port):
    from ray import serve

    overrides, name = app_overrides(job_export, session_serve_port)
    job = start_job("serve.py", *overrides, env=job_env)  # drains stdout: Ray streams the replicas' logs to it
    try:
        lines = job.wait_for("serving until Ctrl-C", timeout_s=180)
        assert any(f"/{name}" in line for line in lines)
        health = CompletionsClient(f"http://127.0.0.1:{session_serve_port}/{name}").request("GET", "/healthz")
        assert health.status == 200
        job.process.send_signal(signal.SIGINT)
        # Generous: deleting the app on a 2-core box shared with other suites can take a while.
        code = job.wait(timeout_s=180)
        assert code == 0, job.output(40)
        assert name not in serve.status().applications
    finally:
        job.kill()  # no-op once it exited
        if name in serve.status().applications:
            serve.delete(name)


# ---- the whole path --------------------------------------------------------------------------

@pytest.mark.slow
def test_prepare_pretrain_export_serve_complete(smoke_run, session_serve_port):
    """The session's `make run` (prepare -> pretrain -> export on the built-in corpus, tests/conftest.py)
    served by the serve job's own functions, in this process (the job script's start-up is tested
    above): with serve.export_dir unset, the served model is the export training wrote."""
    from jobs.serve import resolve_export_dir
    from moe_platform.serve.app import deploy, undeploy

    name = f"e2e-{uuid.uuid4().hex[:8]}"
    config = compose_root(
        f"run.output_dir={smoke_run.run_dir}", f"serve.app_name={name}", f"serve.route_prefix=/{name}",
        f"serve.port={session_serve_port}", "serve.num_cpus=0.25", "serve.api_key=e2e-key",
    )  # fmt: skip
    serve_config = resolve_export_dir(config)  # serve.export_dir unset: <run.output_dir>/export
    assert os.path.samefile(serve_config.export_dir, smoke_run.export_dir)
    url = deploy(serve_config)
    try:
        client = CompletionsClient(url, api_key="e2e-key")
        assert client.models().body["data"][0]["id"] == "run"  # named after the run directory
        reply = client.complete(model="run", prompt="def main(", max_tokens=16, temperature=0)
        assert reply.status == 200, reply.body
        assert 1 <= reply.body["usage"]["completion_tokens"] <= 16
        streamed = [e for e in client.stream(prompt="def main(", max_tokens=16, temperature=0)]
        assert streamed[-1] == "[DONE]"
        assert "".join(e["choices"][0]["text"] for e in streamed[:-1]) == reply.body["choices"][0]["text"]
    finally:
        undeploy(serve_config)
