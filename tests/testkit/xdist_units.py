"""Work units for `make test`'s two pytest-xdist workers (`-n 2`).

Every test that uses Ray (its fixtures include `ray_cluster`) is one unit, so one worker owns the
session's Ray instance and the shared runs it holds (smoke_run, interrupted_sweep). Two local Ray
instances on one machine would both claim the dashboard agent's fixed port (52365), and the
second could not take jobs. The other worker meanwhile runs the tests without Ray, one module at
a time, so that module fixtures are built once.

Which tests use Ray is known only after collection, which happens in the workers; the scheduler
runs in the controller and sees node ids. So the workers write the Ray tests' node ids to a file
the controller named (in an environment variable the workers inherit), and the scheduler reads it
when it splits the collection into units. (xdist's `--dist loadgroup` marks would say the same,
but xdist 3.8 stores a group by rewriting an attribute pytest 9.2 no longer reads.)
"""
from __future__ import annotations

import json
import os
import tempfile

from xdist.scheduler import LoadScopeScheduling

RAY_TESTS_FILE_ENV = "MOE_TESTS_RAY_TESTS_FILE"
RAY_UNIT = "ray"


def is_controller(config) -> bool:
    return bool(getattr(config.option, "numprocesses", None)) and not hasattr(config, "workerinput")


def name_ray_tests_file() -> None:
    """In the controller, before the workers start: the file they will write."""
    handle, path = tempfile.mkstemp(prefix="moe-tests-ray-", suffix=".json")
    os.close(handle)
    os.environ[RAY_TESTS_FILE_ENV] = path


def remove_ray_tests_file() -> None:
    path = os.environ.pop(RAY_TESTS_FILE_ENV, None)
    if path and os.path.exists(path):
        os.remove(path)


def write_ray_tests(items) -> None:
    """In a worker, after collection (every worker collects the same tests and writes the same)."""
    path = os.environ.get(RAY_TESTS_FILE_ENV)
    if not path:
        return
    nodeids = [item.nodeid for item in items if "ray_cluster" in item.fixturenames]
    partial = f"{path}.{os.getpid()}"
    with open(partial, "w") as f:
        json.dump(nodeids, f)
    os.replace(partial, path)


class RayTestsOnOneWorker(LoadScopeScheduling):
    """xdist's load-by-scope scheduler with the Ray tests as one scope and every other module as
    its own. Scopes go out largest first, so the Ray unit starts at once on the first worker."""

    def __init__(self, config, log=None) -> None:
        super().__init__(config, log)
        self._ray_tests: set[str] | None = None

    def _split_scope(self, nodeid: str) -> str:
        if self._ray_tests is None:  # read once, after every worker finished collecting
            with open(os.environ[RAY_TESTS_FILE_ENV]) as f:
                self._ray_tests = set(json.load(f))
        return RAY_UNIT if nodeid in self._ray_tests else nodeid.split("::", 1)[0]
