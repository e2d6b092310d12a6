"""The platform/ trap (docs/architecture.md): platform/ must never shadow the stdlib `platform`."""
import subprocess
import sys

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_platform_dir_is_not_a_package():
    assert not (REPO_ROOT / "platform" / "__init__.py").exists()
    assert not (REPO_ROOT / "tests" / "platform").exists()


def test_stdlib_platform_wins_with_repo_root_first_on_sys_path():
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); "
        "import platform, moe_platform; "
        "assert hasattr(platform, 'system'), platform.__file__; "
        "print(platform.__file__)"
    )
    out = subprocess.run([sys.executable, "-c", code, str(REPO_ROOT)], capture_output=True, text=True, check=True)
    assert "platform/" not in out.stdout.replace("lib/python", "")
    assert str(REPO_ROOT) not in out.stdout


def test_job_scripts_do_not_shadow_importable_modules():
    """`python jobs/x.py` puts jobs/ first on sys.path (also for Ray workers): a job
    named like an installed top-level module would shadow it."""
    import importlib.util

    for script in (REPO_ROOT / "jobs").glob("*.py"):
        name = script.stem
        if name.startswith("_"):
            continue
        spec = importlib.util.find_spec(name)
        origin = getattr(spec, "origin", None) if spec else None
        assert spec is None or (origin and str(REPO_ROOT) in origin), (
            f"jobs/{script.name} shadows the installed module {name!r} ({origin})"
        )


def test_jobs_validate_their_config_before_importing_torch_or_ray():
    """A bad override must answer in about a second: every job file, the config tree and the
    jobs' shared code import without torch, DeepSpeed or Ray (those load once the config is valid)."""
    jobs = sorted(p.stem for p in (REPO_ROOT / "jobs").glob("*.py") if p.stem not in ("__init__", "submit", "export"))
    code = (
        "import sys, importlib; sys.path[:0] = [sys.argv[1], sys.argv[1] + '/platform']; "
        f"[importlib.import_module('jobs.' + name) for name in {jobs!r}]; "
        "heavy = sorted(m for m in ('torch', 'deepspeed', 'ray') if m in sys.modules); "
        "print(' '.join(heavy)); sys.exit(1 if heavy else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code, str(REPO_ROOT)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"importing the jobs loaded {result.stdout.strip()}\n{result.stderr[-2000:]}"
