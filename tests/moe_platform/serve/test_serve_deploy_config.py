"""cluster/serve/serve_config.yaml is a valid Serve config whose args build and serve the app."""
from __future__ import annotations

import uuid
from pathlib import Path

import pytest
import yaml
from testkit.serving import API_KEY

from moe_platform.serve.client import CompletionsClient
from moe_platform.serve.config import API_KEY_ENV, ServeConfig

SERVE_CONFIG = Path(__file__).resolve().parents[3] / "cluster" / "serve" / "serve_config.yaml"


@pytest.fixture(scope="module")
def serve_yaml() -> dict:
    return yaml.safe_load(SERVE_CONFIG.read_text())


def test_the_yaml_validates_against_rays_serve_deploy_schema(serve_yaml):
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema(**serve_yaml)
    (app,) = schema.applications
    assert app.import_path == "moe_platform.serve.app:build_app"
    ServeConfig.from_dict(app.args)  # every arg is a ServeConfig key with a valid value
    assert "api_key" not in app.args  # secrets come from the environment


def test_build_app_turns_the_args_into_deployment_options(serve_yaml, monkeypatch):
    from moe_platform.serve.app import build_app

    monkeypatch.setenv(API_KEY_ENV, "from-env")
    args = serve_yaml["applications"][0]["args"]
    deployment = build_app(args)._bound_deployment
    assert deployment.ray_actor_options == {"num_cpus": 1.0, "num_gpus": 0.0}
    scaling = deployment._deployment_config.autoscaling_config
    assert (scaling.min_replicas, scaling.max_replicas, scaling.target_ongoing_requests) == (1, 4, 8)
    assert deployment._deployment_config.max_ongoing_requests == 64
    assert deployment.init_args[2] == "from-env"  # the key, resolved where the app is built
    assert deployment.init_args[1]["api_key"] is None  # and not copied into the config


def test_serve_run_style_string_args_build_too():
    from moe_platform.serve.app import build_app

    deployment = build_app({"export_dir": "/x", "num_cpus": "0.25", "max_batch_size": "4"})._bound_deployment
    assert deployment.ray_actor_options["num_cpus"] == 0.25 and deployment.num_replicas == 1
    with pytest.raises(ValueError, match="serve.max_batch_size=0 must be >= 1"):
        build_app({"export_dir": "/x", "max_batch_size": "0"})


def test_the_yaml_app_serves_on_this_cluster(ray_cluster, serve_port, tiny_export, serve_yaml, monkeypatch):
    """The YAML's own args (adjusted to this 2-core box) deployed through build_app answer over HTTP."""
    from ray import serve

    from moe_platform.serve.app import build_app

    monkeypatch.setenv(API_KEY_ENV, API_KEY)
    args = dict(serve_yaml["applications"][0]["args"], export_dir=tiny_export, num_cpus=0.25,
                autoscaling={"min_replicas": 1, "max_replicas": 1})  # fmt: skip
    name = f"yaml-{uuid.uuid4().hex[:8]}"
    serve.run(build_app(args), name=name, route_prefix=f"/{name}")
    try:
        client = CompletionsClient(f"http://127.0.0.1:{serve_port}/{name}", api_key=API_KEY)
        reply = client.complete(model="moe", prompt="hello", max_tokens=4, temperature=0)
        assert reply.status == 200, reply.body
        assert reply.body["model"] == "moe" and reply.body["usage"]["completion_tokens"] == 4 or (
            reply.body["choices"][0]["finish_reason"] == "stop"
        )
    finally:
        serve.delete(name)


def test_serve_run_cli_with_key_value_args(ray_cluster, serve_port, tiny_export):
    """`serve run moe_platform.serve.app:build_app export_dir=... key=value`, as the README shows."""
    import os
    import subprocess
    import sys

    from ray import serve

    name = f"cli-{uuid.uuid4().hex[:8]}"
    serve_cli = os.path.join(os.path.dirname(sys.executable), "serve")
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.address_info["address"], API_KEY_ENV: API_KEY}
    command = [serve_cli, "run", "--non-blocking", "--name", name, "--route-prefix", f"/{name}",
               "moe_platform.serve.app:build_app", f"export_dir={tiny_export}", "num_cpus=0.25",
               "max_batch_size=4", "model_name=cli"]  # fmt: skip
    try:
        result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        client = CompletionsClient(f"http://127.0.0.1:{serve_port}/{name}", api_key=API_KEY)
        assert client.models().body["data"][0]["id"] == "cli"
    finally:
        serve.delete(name)
