"""One real sweep for the session (fixture `interrupted_sweep` in tests/conftest.py), as users run
it: `python jobs/tune.py ...` interrupted with Ctrl-C once its first trial has finished, then the
same command again, which resumes it to the end.

Three trials of the tiny model (12 steps, a validation and a report every 4, ASHA with its first
rung at step 4), one at a time. The grid puts a learning rate too small to learn last, so when it
reaches the rung the others are recorded there and ASHA stops it. tests/jobs/test_tune_job.py checks
the interruption and the resume; tests/moe_platform/tune/test_tune_sweep.py checks the finished
sweep (ASHA, results, TensorBoard, best export) and reruns it in-process. One sweep instead of two
(a trial costs a Ray Train run: tens of seconds on 2 cores).
"""
from __future__ import annotations

import glob
import json
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from testkit.datasets import write_dataset
from testkit.processes import RunningJob, run_job, start_job

GOOD_LR, MIDDLE_LR, BAD_LR = 1e-2, 3e-3, 1e-5
STEPS = 12
TIMEOUT_S = 600  # every wait on the sweep's jobs is bounded by this


def tiny_overrides(dataset_dir: str, tune_dir: str) -> list[str]:
    """The tiny model on the tiny dataset, 12 steps, validation and reports every 4: a trial in well under a minute."""
    return [
        f"data.dataset_dir={dataset_dir}", f"tune.output_dir={tune_dir}",
        "model.vocab_size=64", "model.seq_len=32", "model.d_model=32", "model.n_layers=2", "model.n_heads=2",
        "model.ffn_hidden=64", "model.moe.num_experts=4", "model.moe.top_k=2", "model.moe.expert_hidden=32",
        "trainer.num_workers=1", "trainer.cpus_per_worker=0.5", "trainer.micro_batch_size=8",
        f"trainer.max_steps={STEPS}", "trainer.warmup_steps=2", "trainer.log_every=4", "trainer.eval_every=4",
        "trainer.report_every=4", "trainer.eval_batches=2", f"trainer.checkpoint_every={STEPS}",
        "trainer.shuffle_buffer_rows=64",
    ]


def sweep_overrides(dataset_dir: str, tune_dir: str) -> list[str]:
    """The session's sweep: 3 learning rates (the bad one last) x a sampled top_k, ASHA, one trial at a time."""
    return [
        *tiny_overrides(dataset_dir, tune_dir),
        f"tune.space=[{{key: trainer.lr, kind: grid, values: [{GOOD_LR}, {MIDDLE_LR}, {BAD_LR}]}}, "
        "{key: model.moe.top_k, kind: choice, values: [1, 2]}]",
        "tune.num_samples=1", "tune.max_concurrent_trials=1", "tune.scheduler=asha", "tune.grace_period=4",
        "tune.reduction_factor=2",
    ]


@dataclass(frozen=True)
class InterruptedSweep:
    tune_dir: Path
    overrides: tuple[str, ...]  # what both jobs ran with
    interrupted_code: int  # the first job's exit code after Ctrl-C
    interrupted_output: str
    finished_checkpoint: str  # the first trial's final checkpoint, written before the interruption
    finished_at: float  # its mtime then
    resumed: object  # subprocess.CompletedProcess of the second job
    results: dict  # results.json as the resumed job wrote it

    @property
    def finished_trial(self) -> str:
        return self.finished_checkpoint.split(os.sep)[-3]


def run_interrupted_sweep(root: Path, env: dict[str, str]) -> InterruptedSweep:
    dataset = write_dataset(str(root / "dataset"))
    tune_dir = root / "tune"
    overrides = tuple(sweep_overrides(dataset, str(tune_dir)))
    first = start_job("tune", *overrides, env=env)
    finished_checkpoint = wait_for_first_finished_trial(tune_dir, first)
    first.process.send_signal(signal.SIGINT)  # Ctrl-C: Tune saves the experiment and stops the running trial
    code = first.wait(timeout_s=300)
    finished_at = os.path.getmtime(finished_checkpoint)
    resumed = run_job("tune", *overrides, env=env, timeout=TIMEOUT_S)
    assert resumed.returncode == 0, f"the resumed sweep failed:\n{(resumed.stdout + resumed.stderr)[-4000:]}"
    results = json.loads((tune_dir / "results.json").read_text())
    return InterruptedSweep(tune_dir=tune_dir, overrides=overrides, interrupted_code=code,
                            interrupted_output=first.output(), finished_checkpoint=finished_checkpoint,
                            finished_at=finished_at, resumed=resumed, results=results)


def wait_for_first_finished_trial(tune_dir: Path, job: RunningJob, timeout: float = 400) -> str:
    """The first trial's final checkpoint, once the second trial has started: with one trial at a
    time, Tune has then recorded the first as finished."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        started = glob.glob(str(tune_dir / "trials" / "*" / "config.json"))
        done = glob.glob(str(tune_dir / "trials" / "*" / "checkpoints" / f"step_{STEPS:08d}" / "train_state.json"))
        if len(started) == 2 and done:
            return os.path.dirname(done[0])
        if job.process.poll() is not None:
            raise AssertionError(f"the sweep ended before it could be interrupted:\n{job.output()[-4000:]}")
        time.sleep(0.5)
    job.kill()
    raise AssertionError(f"the second trial did not start within {timeout:.0f} s; the sweep's last output:\n"
                         f"{job.output(40)}")


def sweep_settings(sweep: InterruptedSweep):
    """(base stage, tune section) of the session's sweep, composed in-process from the jobs' overrides."""
    from jobs.common import compose_config
    from jobs.pretrain import pretrain_stage

    config = compose_config(list(sweep.overrides))
    return pretrain_stage(config), config.tune


def trial_in_a_finished_run_dir(params: dict, *, finished_run_dir: str, base, trials_dir: str) -> None:
    """The sweep's trainable (run_trial) in a run directory that already holds a finished trial's
    run: what a trial resumes into when Ctrl-C lands after its last checkpoint but before Tune
    records it as finished."""
    import shutil

    from ray import tune

    from moe_platform.train.trainer import CONFIG_FILE
    from moe_platform.tune.sweep import run_trial

    run_dir = shutil.copytree(finished_run_dir, os.path.join(trials_dir, tune.get_context().get_trial_id()))
    config_path = os.path.join(run_dir, CONFIG_FILE)
    with open(config_path) as fh:
        config = json.load(fh)
    config["run"]["output_dir"] = run_dir  # the copy is that trial's run, moved
    with open(config_path, "w") as fh:
        json.dump(config, fh)
    run_trial(params, base=base, trials_dir=trials_dir)
