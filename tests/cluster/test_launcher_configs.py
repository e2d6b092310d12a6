"""The cluster-launcher YAMLs, the image and the runtime_env: valid for Ray 2.60 and sane.

Ray's schema (ray/autoscaler/ray-schema.json) rejects unknown keys but accepts
nonsense bounds such as `min_workers: -1`, so the bounds are checked here too.
"""

from __future__ import annotations

import json
import re
from importlib import metadata
from pathlib import Path

import jsonschema
import pytest
import ray
from cluster_test_support import CLUSTER_DIR, REPO_ROOT, load_yaml, project_image
from moe_platform.cluster.runtime_env import load_runtime_env
from ray.autoscaler._private.util import validate_config
from ray.runtime_env import RuntimeEnv

CLOUD_LAUNCHERS = ["aws.yaml", "gcp.yaml"]
ALL_LAUNCHERS = [*CLOUD_LAUNCHERS, "local/fake_autoscaling.yaml"]
# The 8 x H100 instance of each cloud.
H100X8_INSTANCE = {"aws.yaml": ("InstanceType", "p5.48xlarge"), "gcp.yaml": ("machineType", "a3-highgpu-8g")}
RAY_SCHEMA = Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"


def load_launcher(name: str) -> dict:
    return load_yaml(CLUSTER_DIR / name)


def worker_types(config: dict) -> dict[str, dict]:
    return {name: t for name, t in config["available_node_types"].items() if name != config["head_node_type"]}


@pytest.mark.parametrize("name", ALL_LAUNCHERS)
def test_launcher_matches_rays_schema(name):
    schema = json.loads(RAY_SCHEMA.read_text())
    assert schema["$schema"].startswith("http://json-schema.org/draft-07")
    jsonschema.Draft7Validator(schema).validate(load_launcher(name))
    validate_config(load_launcher(name))  # Ray's own checks: head type exists, sum(min) <= max, ...


@pytest.mark.parametrize("name", ALL_LAUNCHERS)
def test_launcher_worker_bounds(name):
    config = load_launcher(name)
    head = config["available_node_types"][config["head_node_type"]]
    assert head.get("max_workers", 0) == 0, "the head node type must not be launched as a worker"
    assert config["idle_timeout_minutes"] > 0
    assert config["upscaling_speed"] > 0
    for type_name, node_type in worker_types(config).items():
        low, high = node_type.get("min_workers", 0), node_type.get("max_workers")
        assert high is not None, f"{name}: {type_name} needs max_workers (autoscaling has no bound)"
        assert 0 <= low <= high, f"{name}: {type_name} must have 0 <= min_workers ({low}) <= max_workers ({high})"
        assert high <= config["max_workers"], f"{name}: {type_name}.max_workers exceeds the cluster max_workers"
    assert sum(t.get("min_workers", 0) for t in worker_types(config).values()) <= config["max_workers"]


@pytest.mark.parametrize("name", CLOUD_LAUNCHERS)
def test_cloud_launcher_has_cpu_and_h100_workers_that_scale_from_zero(name):
    config = load_launcher(name)
    workers = worker_types(config)
    key, instance = H100X8_INSTANCE[name]
    gpu_names = [n for n, t in workers.items() if t["node_config"].get(key) == instance]
    assert gpu_names, f"{name} has no {instance} (8 x H100) node type"
    for gpu in gpu_names:
        assert workers[gpu]["min_workers"] == 0 and workers[gpu]["max_workers"] >= 1, "GPU nodes must scale from 0"
        if name == "gcp.yaml":  # GCP does not detect resources: they must be stated
            assert workers[gpu]["resources"].get("GPU") == 8
    assert set(workers) - set(gpu_names), f"{name} has no CPU worker type for Ray Data"
    assert config["available_node_types"][config["head_node_type"]]["resources"] == {"CPU": 0}


@pytest.mark.parametrize("name", CLOUD_LAUNCHERS)
def test_cloud_launcher_runs_our_image_with_token_auth(name):
    config = load_launcher(name)
    assert config["docker"]["image"] == project_image()
    assert any("import moe, moe_platform, jobs" in c for c in config["setup_commands"]), (
        "nodes must prove the project is installed"
    )
    starts = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    assert all("RAY_AUTH_MODE=token" in c for c in starts if "ray start" in c)
    assert config["file_mounts"] == {"~/.ray/auth_token": "~/.ray/auth_token"}


def test_local_fake_autoscaling_config_follows_the_verified_recipe():
    config = load_launcher("local/fake_autoscaling.yaml")
    provider = config["provider"]
    assert provider["type"] == "fake_multinode"
    assert (
        provider["use_node_id_as_ip"] and provider["disable_node_updaters"] and provider["disable_launch_config_check"]
    )
    assert config["head_node_type"] == "ray.head.default"  # the name the fake provider gives its head
    assert config["available_node_types"]["ray.head.default"]["resources"] == {"CPU": 0}
    [worker] = worker_types(config).values()
    assert (worker["resources"], worker["min_workers"], worker["max_workers"]) == ({"CPU": 1}, 0, 2)
    assert config["idle_timeout_minutes"] == 0.1
    commands = [k for k in config if k.endswith("_commands")]
    assert commands and all(config[k] == [] for k in commands)


def test_dockerfile_builds_on_ray_260_gpu_and_installs_the_project_with_cuda_torch():
    dockerfile = (CLUSTER_DIR / "Dockerfile").read_text()
    assert re.search(rf"^FROM rayproject/ray:{re.escape(ray.__version__)}-py311-gpu$", dockerfile, re.M)
    torch_pin = next(d for d in metadata.requires("moe-ray-platform") if d.startswith("torch"))
    assert f'"{torch_pin}" --index-url' in dockerfile, "the CUDA torch must satisfy the project's torch pin"
    assert "download.pytorch.org/whl/cu" in dockerfile
    for package in ("moe", "platform", "jobs"):
        assert f"COPY --chown=ray:users {package} " in dockerfile
    assert "pip install --no-cache-dir --no-deps ." in dockerfile
    lines = (CLUSTER_DIR / "Dockerfile.dockerignore").read_text().splitlines()
    ignore = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    assert ignore[0] == "**" and {"!moe/", "!platform/", "!jobs/", "!pyproject.toml"} <= set(ignore)


def test_runtime_env_ships_code_not_environments_or_data():
    env = load_runtime_env(REPO_ROOT)
    RuntimeEnv(**env)  # Ray's own validation of every field
    assert Path(env["working_dir"]) == REPO_ROOT
    assert env["py_modules"] == [str(REPO_ROOT / "platform" / "moe_platform")]
    required = {".venv/", ".git/", "outputs/", "checkpoints/", "*.parquet"}
    assert required <= set(env["excludes"]), f"missing excludes: {required - set(env['excludes'])}"
