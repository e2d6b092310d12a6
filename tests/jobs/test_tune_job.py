"""`python jobs/tune.py ...` as users run it: a bad search space fails before Ray starts; a sweep
interrupted with Ctrl-C resumes without rerunning its finished trial; best/config.yaml is a config
jobs/pretrain.py accepts."""
from __future__ import annotations

import glob
import json
import os
import signal
import time
from pathlib import Path

import pytest
from testkit.datasets import write_dataset
from testkit.processes import environment_without_ray, run_job, start_job

RAY_STARTED = "Started a local Ray instance"
GOOD_LR = 0.01


def tiny_overrides(dataset_dir: str, tune_dir: str) -> list[str]:
    """The tiny model on the tiny dataset, 12 steps, validation every 4: a trial in well under a minute."""
    return [
        f"data.dataset_dir={dataset_dir}", f"tune.output_dir={tune_dir}",
        "model.vocab_size=64", "model.seq_len=32", "model.d_model=32", "model.n_layers=2", "model.n_heads=2",
        "model.ffn_hidden=64", "model.moe.num_experts=4", "model.moe.top_k=2", "model.moe.expert_hidden=32",
        "trainer.num_workers=1", "trainer.cpus_per_worker=0.5", "trainer.micro_batch_size=8",
        "trainer.max_steps=12", "trainer.warmup_steps=2", "trainer.log_every=4", "trainer.eval_every=4",
        "trainer.eval_batches=2", "trainer.checkpoint_every=12", "trainer.shuffle_buffer_rows=64",
    ]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    return write_dataset(str(tmp_path_factory.mktemp("tune-job") / "dataset"))


@pytest.mark.parametrize(
    "space, message",
    [
        ("[{key: model.moe.topk, kind: choice, values: [1]}]", "tune.space: model.moe.topk is not a config key"),
        ("[{key: trainer.lr, kind: choice, values: []}]",
         "tune.space entry trainer.lr: kind=choice needs a non-empty"),
        ("[{key: trainer.lr, kind: loguniform, low: 0.0, high: 0.1}]",
         "tune.space entry trainer.lr: kind=loguniform needs low > 0"),
        ("[{key: model.moe.top_k, kind: choice, values: [2, 8]}]",
         "model.moe.top_k=8 is larger than model.moe.num_experts=4"),
    ],
    ids=["unknown-key", "empty-choice", "loguniform-zero", "model-rejects"],
)
def test_bad_space_fails_before_ray_starts(dataset, tmp_path, space, message):
    result = run_job("tune", *tiny_overrides(dataset, str(tmp_path / "tune")), f"tune.space={space}",
                     env=environment_without_ray(), timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.startswith("config error: ") and message in result.stderr
    assert RAY_STARTED not in result.stdout + result.stderr
    assert not (tmp_path / "tune").exists()


@pytest.mark.slow
def test_interrupted_sweep_resumes_without_rerunning_finished_trials(job_env, dataset, tmp_path):
    tune_dir = tmp_path / "tune"
    overrides = [*tiny_overrides(dataset, str(tune_dir)),
                 f"tune.space=[{{key: trainer.lr, kind: grid, values: [{GOOD_LR}, 0.003]}}]",
                 "tune.num_samples=1", "tune.max_concurrent_trials=1", "tune.scheduler=fifo"]
    first = start_job("tune", *overrides, env=job_env)
    finished_checkpoint = _wait_for_first_finished_trial(tune_dir, first)
    first.process.send_signal(signal.SIGINT)  # Ctrl-C: Tune saves the experiment and stops the running trial
    code, output = first.wait(timeout_s=300), first.output()
    assert code == 130, output[-4000:]
    assert "the sweep was interrupted: run the same command again to resume it" in output, output[-4000:]
    finished_trial = finished_checkpoint.split(os.sep)[-3]
    finished_at = os.path.getmtime(finished_checkpoint)

    again = run_job("tune", *overrides, env=job_env, timeout=600)
    assert again.returncode == 0, (again.stdout + again.stderr)[-4000:]
    assert "resuming the sweep" in again.stdout + again.stderr
    results = json.loads((tune_dir / "results.json").read_text())
    assert results["complete"] is True and len(results["trials"]) == 2
    assert {trial["status"] for trial in results["trials"]} == {"finished"}
    assert os.path.getmtime(finished_checkpoint) == finished_at  # not trained again
    progress = (tune_dir / "experiment" / finished_trial / "progress.csv").read_text().splitlines()
    assert len(progress) == 1 + 3  # header + its three reports, once
    _check_best(tune_dir, again.stdout)


def _wait_for_first_finished_trial(tune_dir: Path, job, timeout: float = 400) -> str:
    """The first trial's final checkpoint, once the second trial has started: with one trial at a
    time, Tune has then recorded the first as finished."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        started = glob.glob(str(tune_dir / "trials" / "*" / "config.json"))
        done = glob.glob(str(tune_dir / "trials" / "*" / "checkpoints" / "step_00000012" / "train_state.json"))
        if len(started) == 2 and done:
            return os.path.dirname(done[0])
        if job.process.poll() is not None:
            pytest.fail(f"the sweep ended before it could be interrupted:\n{job.output()[-4000:]}")
        time.sleep(0.5)
    job.kill()
    pytest.fail(f"the second trial did not start within {timeout:.0f} s; the sweep's last output:\n{job.output(40)}")


def _check_best(tune_dir: Path, stdout: str) -> None:
    """best/config.yaml composes into the root config with the best values; the export loads."""
    from hydra import compose, initialize_config_dir

    from jobs.common import to_root_config
    from jobs.config import register_configs
    from moe import load_export

    best = tune_dir / "best"
    assert f"python jobs/pretrain.py --config-path {best} --config-name config" in stdout
    assert f"python jobs/serve.py serve.export_dir={best / 'export'}" in stdout
    register_configs()
    with initialize_config_dir(str(best), version_base="1.3"):
        config = to_root_config(compose("config"))
    assert config.trainer.lr == GOOD_LR and config.model.d_model == 32
    assert load_export(str(best / "export")).config.d_model == 32
