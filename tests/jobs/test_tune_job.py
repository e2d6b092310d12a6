"""`python jobs/tune.py ...` as users run it: a bad search space fails before Ray starts; a sweep
interrupted with Ctrl-C resumes without rerunning its finished trial (the session's
`interrupted_sweep`, testkit.sweeps); best/config.yaml is a config jobs/pretrain.py accepts."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from testkit.datasets import write_dataset
from testkit.processes import environment_without_ray, run_job
from testkit.sweeps import GOOD_LR, tiny_overrides

from moe_platform.tune.results import FINISHED, STOPPED_EARLY

RAY_STARTED = "Started a local Ray instance"


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
def test_interrupted_sweep_resumes_without_rerunning_finished_trials(interrupted_sweep):
    sweep = interrupted_sweep
    output = sweep.interrupted_output
    assert sweep.interrupted_code == 130, output[-4000:]
    assert "the sweep was interrupted: run the same command again to resume it" in output, output[-4000:]

    again = sweep.resumed
    assert "resuming the sweep" in again.stdout + again.stderr
    results = sweep.results
    assert results["complete"] is True and len(results["trials"]) == 3
    statuses = {trial["trial_id"]: trial["status"] for trial in results["trials"]}
    assert statuses[sweep.finished_trial] == FINISHED
    assert set(statuses.values()) <= {FINISHED, STOPPED_EARLY}  # ASHA may stop the later ones; none unfinished
    assert os.path.getmtime(sweep.finished_checkpoint) == sweep.finished_at  # not trained again
    progress = (sweep.tune_dir / "experiment" / sweep.finished_trial / "progress.csv").read_text().splitlines()
    assert len(progress) == 1 + 3  # header + its three reports, once
    _check_best(sweep.tune_dir, again.stdout)


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
