"""`python jobs/pretrain.py | export.py | evaluate.py` as users run them: exit codes, layout, one-line errors."""
from __future__ import annotations

import json
import os

import pytest
from testkit.processes import environment_without_ray, run_job
from testkit.smoke import STEPS
from testkit.training import read_json

RAY_STARTED = "Started a local Ray instance"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["trainer.num_workers=3", "trainer.expert_parallel_size=2"],
         "config error: trainer.num_workers=3 must be a multiple of trainer.expert_parallel_size=2"),
        (["trainer.num_workers=4", "trainer.expert_parallel_size=4", "model.moe.num_experts=6"],
         "config error: model.moe.num_experts=6 must be a multiple of trainer.expert_parallel_size=4"),
        (["trainer.zero_stage=3"], "config error: trainer.zero_stage must be one of 0, 1, 2, got 3"),
        (["trainer.max_stepz=3"], "max_stepz"),
    ],
)
def test_bad_training_config_fails_before_ray_starts(tmp_path, overrides, message):
    result = run_job("pretrain", f"run.output_dir={tmp_path / 'run'}", *overrides, env=environment_without_ray())
    assert result.returncode == 2, result.stderr[-2000:]
    assert message in result.stderr
    assert "Traceback" not in result.stderr and RAY_STARTED not in result.stderr + result.stdout
    assert not (tmp_path / "run").exists()


def test_missing_dataset_is_a_one_line_error(tmp_path):
    result = run_job("pretrain", f"data.dataset_dir={tmp_path / 'nothing'}", f"run.output_dir={tmp_path / 'run'}",
                     env=environment_without_ray())
    assert result.returncode == 2
    assert "does not exist" in result.stderr and "jobs/prepare.py" in result.stderr
    assert "Traceback" not in result.stderr


def test_export_of_a_directory_without_checkpoints_fails_clearly(tmp_path):
    result = run_job("export", str(tmp_path))
    assert result.returncode == 1
    assert "holds no complete checkpoint" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_pretrain_export_and_evaluate_jobs(smoke_run, job_env, tmp_path):
    """The session's smoke run (tests/conftest.py) is a prepare and a pretrain job: check what the
    pretrain job printed and wrote, then export and evaluate it with their jobs."""
    run_dir, trained = smoke_run.run_dir, smoke_run.pretrain
    assert f"tensorboard --logdir {run_dir / 'tensorboard'}" in trained.stdout
    assert sorted(os.listdir(run_dir)) == ["checkpoints", "config.json", "config.yaml", "export", "tensorboard"]
    assert f"max_steps: {STEPS}" in (run_dir / "config.yaml").read_text()
    assert f"step {STEPS}/{STEPS} (100%)" in trained.stderr + trained.stdout  # the driver's progress line

    # Export from the run directory, without Ray: the same files as the run's own export.
    exported = run_job("export", str(run_dir), "--output", str(tmp_path / "again"), env=environment_without_ray())
    assert exported.returncode == 0, exported.stderr[-2000:]
    assert f"step_{STEPS:08d}" in exported.stdout
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        assert (tmp_path / "again" / name).read_bytes() == (run_dir / "export" / name).read_bytes()

    evaluated = run_job("evaluate", *smoke_run.overrides, f"evaluate.export_dir={tmp_path / 'again'}",
                        "evaluate.max_batches=null", env=job_env)  # the whole validation split
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    manifest = read_json(str(smoke_run.dataset_dir / "manifest.json"))
    tokens = manifest["splits"]["validation"]["rows"] * manifest["seq_len"]  # one target per position
    report = read_json(str(tmp_path / "again" / "evaluation_validation.json"))
    assert report["tokens"] == tokens and 1.0 < report["perplexity"] < manifest["vocab_size"]
    assert [layer["layer"] for layer in report["routing"]] == [0, 1]
    assert sum(report["routing"][0]["tokens_per_expert"]) == tokens * 2  # top-2
    assert "perplexity" in evaluated.stdout

    # The same output_dir with another config: refused, naming the difference.
    refused = run_job("pretrain", *smoke_run.overrides, "trainer.lr=0.5", env=job_env, cwd=smoke_run.root)
    assert refused.returncode == 2
    assert "trainer.lr=0.01 there, 0.5 now" in refused.stderr and "Traceback" not in refused.stderr
    assert json.loads((run_dir / "config.json").read_text())["trainer"]["lr"] == 0.01
