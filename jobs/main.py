"""`make run`: prepare -> pretrain -> evaluate -> export on the embedded default corpus, one Ray instance.

    make run                                   # or: python jobs/main.py
    make run ARGS="trainer.max_steps=600 run.output_dir=outputs/longer"

Each step is the same code as its own job (jobs/prepare.py, pretrain.py,
evaluate.py, export.py); a second `make run` reuses the dataset and resumes (or
re-exports) the finished run. At the end it prints where the TensorBoard logs and
the export are, and the command that opens TensorBoard.
"""
from __future__ import annotations

import time

from jobs.common import init_ray, job
from jobs.config import RootConfig
from jobs.evaluate import run_evaluation
from jobs.prepare import run_prepare
from jobs.pretrain import run_pretraining


@job
def main(config: RootConfig) -> None:
    started = time.perf_counter()
    init_ray()  # one Ray instance for every step
    run_prepare(config)
    trained = run_pretraining(config)  # ends with the export of the last checkpoint (run.export)
    config.evaluate.export_dir = trained.export_dir or config.evaluate.export_dir
    report = run_evaluation(config)
    minutes = (time.perf_counter() - started) / 60
    print()
    print(f"done in {minutes:.1f} min: {int(trained.metrics.get('step', 0))} steps, "
          f"final training loss {trained.metrics.get('train/loss', float('nan')):.3f}, "
          f"validation perplexity {report.perplexity:.1f}")
    print(report.summary())
    print(f"checkpoints  {trained.checkpoint_dir}")
    print(f"export       {trained.export_dir}")
    print(f"tensorboard  {trained.tensorboard_dir}")
    print(f"  open it:   tensorboard --logdir {trained.tensorboard_dir}")


if __name__ == "__main__":
    main()
