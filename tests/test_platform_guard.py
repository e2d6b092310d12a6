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
