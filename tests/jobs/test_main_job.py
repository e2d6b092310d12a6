"""`make run` (jobs/main.py): prepare -> pretrain -> evaluate -> export in one job, as users run it.

It runs on the session's smoke run (tests/conftest.py: the same steps as separate jobs, with the
same overrides), which is what a second `make run` meets: it reuses the dataset, finds the run
finished, exports and evaluates it, and prints where everything is."""
from __future__ import annotations

import pytest
from testkit.processes import environment_without_ray, run_job
from testkit.smoke import STEPS
from testkit.training import read_json

RAY_STARTED = "Started a local Ray instance"


@pytest.mark.slow
def test_make_run_again_reuses_the_dataset_and_the_finished_run(smoke_run, job_env):
    checkpoints = sorted(p.name for p in (smoke_run.run_dir / "checkpoints").iterdir())
    result = run_job("main", *smoke_run.overrides, env=job_env, cwd=smoke_run.root)
    assert result.returncode == 0, result.stderr[-4000:]
    out = result.stdout
    assert f"Reused dataset {smoke_run.dataset_dir}" in out
    assert "done in " in out and f"{STEPS} steps, final training loss" in out
    assert sorted(p.name for p in (smoke_run.run_dir / "checkpoints").iterdir()) == checkpoints  # nothing retrained
    assert "already finished its" in result.stdout + result.stderr  # ...and no Ray Train worker group started
    # The last lines say where everything is and how to look at it.
    assert f"checkpoints  {smoke_run.run_dir / 'checkpoints'}" in out
    assert f"export       {smoke_run.export_dir}" in out
    assert f"tensorboard --logdir {smoke_run.run_dir / 'tensorboard'}" in out
    # The evaluation of the export, on the validation split.
    report = read_json(str(smoke_run.export_dir / "evaluation_validation.json"))
    assert report["perplexity"] > 1.0 and report["tokens"] > 0
    assert "perplexity" in out


def test_make_run_with_a_bad_override_is_one_line_before_ray(tmp_path):
    result = run_job("main", "trainer.max_stepz=3", f"run.output_dir={tmp_path / 'run'}",
                     env=environment_without_ray(), cwd=tmp_path, timeout=300)  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.startswith("config error: ") and "max_stepz" in result.stderr
    assert "Traceback" not in result.stderr and RAY_STARTED not in result.stdout + result.stderr
    assert not (tmp_path / "run").exists()
