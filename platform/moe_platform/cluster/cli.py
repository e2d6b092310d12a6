"""`python jobs/submit.py <job> [hydra overrides] [--address URL] [--no-wait]`.

Not a Hydra job: the overrides are forwarded untouched to the job on the cluster,
which validates them (a bad override fails there, before any worker starts).
Anything after `--` is forwarded as well, e.g. `-- --cfg job` to print the config.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ray.job_submission import JobSubmissionClient

from moe_platform.cluster.auth import TOKEN_SOURCES
from moe_platform.cluster.runtime_env import (
    RUNTIME_ENV_FILE,
    RuntimeEnvError,
    load_runtime_env,
    project_pip_requirements,
    with_pip_requirements,
)
from moe_platform.cluster.submit import (
    EXIT_INTERRUPTED,
    EXIT_NOT_SUBMITTED,
    EXIT_SUCCEEDED,
    SubmitError,
    connect,
    exit_code,
    follow,
    job_entrypoint,
    job_names,
    load_token,
    resolve_address,
    submit,
)


def build_parser(project_root: Path) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jobs/submit.py",
        description="Submit one of our jobs to a running Ray cluster, stream its logs, exit with its status.",
        epilog=f"Auth token (clusters with token auth): {TOKEN_SOURCES}.",
    )
    parser.add_argument("job", help=f"one of: {', '.join(job_names(project_root)) or '(no jobs yet)'}")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for the job, e.g. trainer.max_steps=100")
    parser.add_argument("--address", help="the cluster's dashboard, http://HEAD:8265 (default: $RAY_ADDRESS)")
    parser.add_argument("--no-wait", action="store_true", help="submit, print the job id and return")
    parser.add_argument(
        "--runtime-env",
        type=Path,
        default=project_root / RUNTIME_ENV_FILE,
        help=f"runtime_env YAML (default: {RUNTIME_ENV_FILE})",
    )
    parser.add_argument(
        "--python", default="python", help="the interpreter on the cluster's head node (default: python)"
    )
    parser.add_argument(
        "--install-deps",
        action="store_true",
        help="pip-install the project's dependencies in the job (clusters on a stock Ray image)",
    )
    return parser


def parse_args(argv: list[str], project_root: Path) -> argparse.Namespace:
    """Our options may sit anywhere among the overrides; everything after `--` is the job's verbatim."""
    ours, forwarded = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    args = build_parser(project_root).parse_intermixed_args(ours)
    args.overrides = [*args.overrides, *forwarded]
    return args


def main(argv: list[str], *, project_root: Path) -> int:
    args = parse_args(argv, project_root)
    try:
        return _run(args, project_root)
    except (SubmitError, RuntimeEnvError) as exc:
        print(f"submit error: {exc}", file=sys.stderr)
        return EXIT_NOT_SUBMITTED


def _run(args: argparse.Namespace, project_root: Path) -> int:
    entrypoint = job_entrypoint(project_root, args.job, args.overrides, python=args.python)
    runtime_env = load_runtime_env(project_root, args.runtime_env)
    if args.install_deps:
        runtime_env = with_pip_requirements(runtime_env, project_pip_requirements())
    address = resolve_address(args.address)
    client = connect(address, load_token())
    job_id = submit(client, entrypoint, runtime_env, name=args.job)
    print(f"job id: {job_id}  ({entrypoint})", flush=True)
    if args.no_wait:
        print(f"follow it with: ray job logs --follow --address {address} {job_id}")
        return EXIT_SUCCEEDED
    return _follow_to_end(client, job_id, address)


def _follow_to_end(client: JobSubmissionClient, job_id: str, address: str) -> int:
    try:
        status = follow(client, job_id)
    except KeyboardInterrupt:
        # Ctrl-C stops watching, not the job: a long pretraining run must survive a closed laptop.
        print(
            f"\nstopped following; job {job_id} keeps running (stop it: ray job stop --address {address} {job_id})",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    print(f"job {job_id} {status.value}", flush=True)
    return exit_code(status)
