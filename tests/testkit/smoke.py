"""One prepare + pretrain (jobs/prepare.py, then jobs/pretrain.py, as users run them) of the tiny
model on a small slice of the built-in corpus, shared by the session (fixture `smoke_run` in
tests/conftest.py). tests/jobs/test_pretrain_job.py checks the pretrain job's output and what it
wrote; tests/jobs/test_main_job.py runs `make run` on the finished run again (it reuses both).

Every test that needs *a* trained run or its export (serving it, evaluating it, starting a stage
from it) takes this one instead of training its own: a Ray Train run costs tens of seconds on
2 cores, the suite's budget is 10 minutes.
"""
from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

from testkit.processes import run_job, tail

STEPS = 10
# The tiny model's shape (testkit.models) on a 300-token BPE vocabulary trained on 150 KB of text.
SMOKE_OVERRIDES = [
    "data.vocab_size=300", "data.seq_len=32", "data.max_bytes=150000",
    "model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.ffn_hidden=64",
    "model.moe.num_experts=4", "model.moe.top_k=2", "model.moe.expert_hidden=32",
    f"trainer.max_steps={STEPS}", "trainer.micro_batch_size=8", "trainer.warmup_steps=2", "trainer.log_every=2",
    "trainer.report_every=5", "trainer.eval_every=5", "trainer.eval_batches=2", "trainer.checkpoint_every=5",
    "trainer.lr=1e-2", "evaluate.max_batches=2",
]


@dataclass(frozen=True)
class SmokeRun:
    root: Path  # the jobs' working directory
    dataset_dir: Path
    run_dir: Path  # checkpoints/, tensorboard/, export/, config.json, config.yaml - named "run"
    overrides: tuple[str, ...]  # what both jobs ran with, paths included: the same run's config
    pretrain: subprocess.CompletedProcess  # jobs/pretrain.py's exit code and output

    @property
    def export_dir(self) -> Path:
        return self.run_dir / "export"


def run_smoke(root: Path, env: dict[str, str]) -> SmokeRun:
    """Prepare, then pretrain, under `root` (the jobs' cwd: Hydra's outputs/ land there too);
    fails with a job's last output if either fails."""
    dataset_dir, run_dir = root / "dataset", root / "run"
    overrides = (f"data.dataset_dir={dataset_dir}", f"run.output_dir={run_dir}", *SMOKE_OVERRIDES)
    for script in ("prepare", "pretrain"):
        result = run_job(script, *overrides, env=env, cwd=root, timeout=600)
        assert result.returncode == 0, f"jobs/{script}.py failed ({result.returncode}):\n{tail(result.stderr)}"
    return SmokeRun(root=root, dataset_dir=dataset_dir, run_dir=run_dir, overrides=overrides, pretrain=result)
