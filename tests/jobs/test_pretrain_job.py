"""`python jobs/pretrain.py | export.py | evaluate.py` as users run them: exit codes, layout, one-line errors."""
from __future__ import annotations

import json
import os

import pytest
from testkit.datasets import write_dataset
from testkit.models import TINY_MODEL_OVERRIDES
from testkit.processes import environment_without_ray, run_job
from testkit.training import read_json

RAY_STARTED = "Started a local Ray instance"
TINY_TRAINER = [
    "trainer.max_steps=8", "trainer.micro_batch_size=8", "trainer.lr=1e-2", "trainer.warmup_steps=2",
    "trainer.log_every=2", "trainer.report_every=4", "trainer.eval_every=4", "trainer.eval_batches=2",
    "trainer.checkpoint_every=4", "trainer.shuffle_buffer_rows=64",
]


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
def test_pretrain_export_and_evaluate_jobs(job_env, tmp_path):
    dataset = write_dataset(str(tmp_path / "data"), train_rows=256, validation_rows=32)
    run_dir = tmp_path / "run"
    common = [f"data.dataset_dir={dataset}", f"run.output_dir={run_dir}", *TINY_MODEL_OVERRIDES]
    trained = run_job("pretrain", *common, *TINY_TRAINER, env=job_env)
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert f"tensorboard --logdir {run_dir / 'tensorboard'}" in trained.stdout
    assert sorted(os.listdir(run_dir)) == ["checkpoints", "config.json", "config.yaml", "export", "tensorboard"]
    assert "max_steps: 8" in (run_dir / "config.yaml").read_text()
    assert "step 8/8 (100%)" in trained.stderr + trained.stdout  # the driver's progress line

    # Export from the run directory, without Ray: the same files as the run's own export.
    exported = run_job("export", str(run_dir), "--output", str(tmp_path / "again"), env=environment_without_ray())
    assert exported.returncode == 0, exported.stderr[-2000:]
    assert "step_00000008" in exported.stdout
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        assert (tmp_path / "again" / name).read_bytes() == (run_dir / "export" / name).read_bytes()

    evaluated = run_job("evaluate", *common, f"evaluate.export_dir={tmp_path / 'again'}", env=job_env)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    report = read_json(str(tmp_path / "again" / "evaluation_validation.json"))
    assert report["tokens"] == 32 * 32 and 1.0 < report["perplexity"] < 64.0
    assert [layer["layer"] for layer in report["routing"]] == [0, 1]
    assert sum(report["routing"][0]["tokens_per_expert"]) == 32 * 32 * 2  # top-2
    assert "perplexity" in evaluated.stdout

    # The same output_dir with another config: refused, naming the difference.
    refused = run_job("pretrain", *common, *TINY_TRAINER, "trainer.lr=0.5", env=job_env)
    assert refused.returncode == 2
    assert "trainer.lr=0.01 there, 0.5 now" in refused.stderr and "Traceback" not in refused.stderr
    assert json.loads((run_dir / "config.json").read_text())["trainer"]["lr"] == 0.01
