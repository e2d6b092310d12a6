"""The runtime_env our jobs are submitted with, read from cluster/runtime_env.yaml.

The YAML's paths are relative to the repository root so that the same file works
for `ray job submit` run from the root and for `jobs/submit.py` run from anywhere:
`load_runtime_env` resolves them against the root it is given.
"""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

RUNTIME_ENV_FILE = Path("cluster") / "runtime_env.yaml"

# Dependencies the cluster must already provide: torch has to be the image's CUDA
# build, and ray has to be the version the cluster runs.
_PROVIDED_BY_CLUSTER = {"torch", "ray"}

_KNOWN_KEYS = {"working_dir", "py_modules", "excludes", "env_vars", "pip", "uv", "conda", "config"}


class RuntimeEnvError(ValueError):
    """The runtime_env file is wrong; the message says which entry."""


def load_runtime_env(project_root: Path, path: Path | None = None) -> dict[str, Any]:
    """Read the runtime_env YAML and make its local paths absolute under `project_root`."""
    path = path or project_root / RUNTIME_ENV_FILE
    if not path.is_file():
        raise RuntimeEnvError(f"runtime_env file {path} does not exist")
    env = yaml.safe_load(path.read_text()) or {}
    if not isinstance(env, dict):
        raise RuntimeEnvError(f"{path} must hold a mapping of runtime_env fields")
    unknown = sorted(set(env) - _KNOWN_KEYS)
    if unknown:
        raise RuntimeEnvError(f"{path}: unknown runtime_env field(s) {unknown}")
    if "working_dir" in env:
        env["working_dir"] = str(_local_path(project_root, env["working_dir"], "working_dir"))
    if "py_modules" in env:
        env["py_modules"] = [str(_local_path(project_root, m, "py_modules")) for m in env["py_modules"]]
    return env


def _local_path(project_root: Path, entry: str, field: str) -> Path | str:
    if "://" in entry:  # a remote URI (s3://, gs://, https://): Ray fetches it itself
        return entry
    resolved = (project_root / entry).resolve()
    if not resolved.exists():
        raise RuntimeEnvError(f"runtime_env {field} entry {entry!r} does not exist under {project_root}")
    return resolved


def project_pip_requirements(distribution: str = "moe-ray-platform") -> list[str]:
    """The project's runtime dependencies (installed metadata), minus what the cluster image provides."""
    requirements = metadata.requires(distribution) or []
    runtime = [req for req in requirements if "extra ==" not in req]  # drop `[test]` and other extras
    return [req for req in runtime if _distribution_name(req) not in _PROVIDED_BY_CLUSTER]


def _distribution_name(requirement: str) -> str:
    """'ray[train]==2.60.0' -> 'ray' (PEP 508 name, normalised)."""
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    if match is None:
        raise RuntimeEnvError(f"cannot read the distribution name of requirement {requirement!r}")
    return re.sub(r"[-_.]+", "-", match.group(1)).lower()


def with_pip_requirements(env: dict[str, Any], requirements: list[str]) -> dict[str, Any]:
    """A copy of `env` that pip-installs `requirements` (on top of the cluster's packages)."""
    if "conda" in env or "uv" in env:
        raise RuntimeEnvError("the runtime_env already names conda or uv; add the dependencies there")
    merged = dict(env)
    merged["pip"] = sorted(set(env.get("pip", [])) | set(requirements))
    return merged
