"""Evaluate an export: perplexity and routing statistics on a prepared dataset split.

    python jobs/evaluate.py                                         # <run.output_dir>/export on validation
    python jobs/evaluate.py evaluate.export_dir=outputs/pretrain/export evaluate.split=train \
        evaluate.max_batches=50 data.dataset_dir=outputs/dataset

Writes the numbers as JSON next to the export (evaluation_<split>.json) and prints a summary.
"""
from __future__ import annotations

import json
import os
import sys

from jobs.common import init_ray, job
from jobs.config import RootConfig
from moe_platform.data import DataError
from moe_platform.train import EvaluationReport, evaluate_export


def run_evaluation(config: RootConfig) -> EvaluationReport:
    settings = config.evaluate
    export_dir = os.path.abspath(settings.export_dir)
    if not os.path.isfile(os.path.join(export_dir, "model.safetensors")):
        print(f"config error: evaluate.export_dir={export_dir} is not an export (no model.safetensors)",
              file=sys.stderr)
        sys.exit(2)
    init_ray()
    try:
        report = evaluate_export(export_dir, config.data.resolved().dataset_dir, split=settings.split,
                                 batch_size=settings.batch_size, max_batches=settings.max_batches)
    except (DataError, ValueError) as exc:
        print(f"evaluation failed: {exc}", file=sys.stderr)
        sys.exit(1)
    with open(os.path.join(export_dir, f"evaluation_{settings.split}.json"), "w") as fh:
        json.dump(report.to_dict(), fh, indent=2)
    return report


@job
def main(config: RootConfig) -> None:
    print(run_evaluation(config).summary())


if __name__ == "__main__":
    main()
