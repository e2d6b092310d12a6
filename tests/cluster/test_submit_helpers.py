"""The submit helper's pure parts: job names, entrypoints, addresses, tokens, arguments, runtime_env."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
import yaml
from cluster_test_support import REPO_ROOT
from moe_platform.cluster.auth import TokenError, find_token
from moe_platform.cluster.cli import parse_args
from moe_platform.cluster.runtime_env import (
    RuntimeEnvError,
    load_runtime_env,
    project_pip_requirements,
    with_pip_requirements,
)
from moe_platform.cluster.submit import SubmitError, job_entrypoint, job_names, resolve_address


@pytest.fixture()
def project(tmp_path) -> Path:
    """A minimal project tree: two jobs, the helper modules that are not jobs, a runtime_env."""
    jobs = tmp_path / "jobs"
    jobs.mkdir()
    for name in ("__init__", "common", "config", "submit", "_private", "prepare", "pretrain"):
        (jobs / f"{name}.py").write_text("")
    (tmp_path / "platform" / "moe_platform").mkdir(parents=True)
    (tmp_path / "cluster").mkdir()
    (tmp_path / "cluster" / "runtime_env.yaml").write_text(
        yaml.safe_dump({"working_dir": ".", "py_modules": ["platform/moe_platform"], "excludes": [".venv/"]})
    )
    return tmp_path


def test_job_names_are_the_job_files_not_the_helpers(project):
    assert job_names(project) == ["prepare", "pretrain"]


def test_every_job_of_the_repo_is_submittable():
    expected = {p.stem for p in (REPO_ROOT / "jobs").glob("*.py")} - {"__init__", "common", "config", "submit"}
    assert set(job_names(REPO_ROOT)) == expected


def test_entrypoint_quotes_overrides_for_the_shell(project):
    entrypoint = job_entrypoint(project, "pretrain", ["trainer.max_steps=10", "run.name=my run", "+x='a b'"])
    assert entrypoint.startswith("python jobs/pretrain.py ")
    assert shlex.split(entrypoint)[2:] == ["trainer.max_steps=10", "run.name=my run", "+x='a b'"]


def test_unknown_job_names_the_jobs_there_are(project):
    with pytest.raises(SubmitError, match=r"unknown job 'pretrian': the jobs in .* are prepare, pretrain"):
        job_entrypoint(project, "pretrian", [])


@pytest.mark.parametrize(
    ("given", "environ", "expected"),
    [
        ("http://head:8265/", {"RAY_ADDRESS": "ignored:6379"}, "http://head:8265"),
        (None, {"RAY_API_SERVER_ADDRESS": "https://h:443", "RAY_ADDRESS": "x:1"}, "https://h:443"),
        (None, {"RAY_ADDRESS": "10.0.0.5:6379"}, "10.0.0.5:6379"),  # a GCS address: Ray finds the dashboard
        ("10.0.0.5:8265", {}, "http://10.0.0.5:8265"),  # the dashboard port is always HTTP
    ],
)
def test_address_comes_from_the_flag_then_the_environment(given, environ, expected):
    assert resolve_address(given, environ) == expected


def test_no_address_is_a_clear_error():
    with pytest.raises(SubmitError, match="pass --address http://HEAD:8265 or set RAY_ADDRESS"):
        resolve_address(None, {})


def test_token_sources_in_rays_order(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert find_token({}) is None
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("from-home\n")
    assert find_token({}).value == "from-home"
    other = tmp_path / "token"
    other.write_text("from-path")
    assert find_token({"RAY_AUTH_TOKEN_PATH": str(other)}).value == "from-path"
    token = find_token({"RAY_AUTH_TOKEN": "from-env", "RAY_AUTH_TOKEN_PATH": str(other)})
    assert (token.value, token.source) == ("from-env", "$RAY_AUTH_TOKEN")
    assert token.headers() == {"Authorization": "Bearer from-env"}


def test_a_named_but_missing_or_empty_token_file_is_an_error(tmp_path):
    with pytest.raises(TokenError, match="RAY_AUTH_TOKEN_PATH names .*, which is not a file"):
        find_token({"RAY_AUTH_TOKEN_PATH": str(tmp_path / "nope")})
    (tmp_path / "empty").write_text(" \n")
    with pytest.raises(TokenError, match="is empty"):
        find_token({"RAY_AUTH_TOKEN_PATH": str(tmp_path / "empty")})


def test_our_options_mix_with_overrides_and_everything_after_dashes_is_forwarded(project):
    args = parse_args(
        ["pretrain", "a=1", "--address", "http://h:8265", "b=2", "--no-wait", "--", "--cfg", "job"], project
    )
    assert (args.job, args.address, args.no_wait) == ("pretrain", "http://h:8265", True)
    assert args.overrides == ["a=1", "b=2", "--cfg", "job"]


def test_runtime_env_paths_resolve_against_the_project_root(project):
    env = load_runtime_env(project)
    assert env["working_dir"] == str(project.resolve())
    assert env["py_modules"] == [str((project / "platform" / "moe_platform").resolve())]


def test_runtime_env_rejects_unknown_fields_and_missing_paths(project):
    path = project / "cluster" / "runtime_env.yaml"
    path.write_text(yaml.safe_dump({"working_dir": ".", "pip_packages": ["x"]}))
    with pytest.raises(RuntimeEnvError, match=r"unknown runtime_env field\(s\) \['pip_packages'\]"):
        load_runtime_env(project)
    path.write_text(yaml.safe_dump({"py_modules": ["platform/nope"]}))
    with pytest.raises(RuntimeEnvError, match="'platform/nope' does not exist"):
        load_runtime_env(project)


def test_install_deps_adds_the_projects_dependencies_but_never_torch_or_ray():
    requirements = project_pip_requirements()
    names = {r.split("[")[0].split("=")[0].split(">")[0].split("<")[0].strip().lower() for r in requirements}
    assert "hydra-core" in names and "deepspeed" in names
    assert not names & {"torch", "ray", "pytest"}
    env = with_pip_requirements({"working_dir": "/x", "pip": ["extra==1"]}, requirements)
    assert set(env["pip"]) == {*requirements, "extra==1"}


def test_the_config_tree_is_a_regular_package_so_shipped_jobs_find_it():
    """Hydra looks the config tree up as the module `jobs.conf`. Shipped as files (a job's
    working_dir, the image's non-editable install) that works only if it is a regular package."""
    assert (REPO_ROOT / "jobs" / "conf" / "__init__.py").is_file()
