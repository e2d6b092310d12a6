"""`make run` (jobs/main.py): prepare -> pretrain -> evaluate -> export in one job, as users run it.

The run is the session's shared smoke run (tests/conftest.py `smoke_run`); other tests serve and
evaluate what it wrote."""
from __future__ import annotations

import json
import os

import pytest
from testkit.processes import environment_without_ray, run_job
from testkit.smoke import STEPS
from testkit.training import read_json, read_scalars

RAY_STARTED = "Started a local Ray instance"


@pytest.mark.slow
def test_make_run_prepares_trains_evaluates_and_exports(smoke_run):
    out = smoke_run.job.stdout
    assert f"Prepared dataset {smoke_run.dataset_dir}" in out
    assert (smoke_run.dataset_dir / "manifest.json").is_file()
    assert "done in " in out and f"{STEPS} steps, final training loss" in out
    # The last lines say where everything is and how to look at it.
    assert f"export       {smoke_run.export_dir}" in out
    assert f"tensorboard --logdir {smoke_run.run_dir / 'tensorboard'}" in out
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(smoke_run.export_dir))
    assert json.loads((smoke_run.run_dir / "config.json").read_text())["trainer"]["max_steps"] == STEPS
    assert [step for step, _ in read_scalars(str(smoke_run.run_dir / "tensorboard"))["train/loss"]][-1] == STEPS
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
