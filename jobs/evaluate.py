"""Evaluate exports: one export's perplexity and routing statistics, or several side by side.

    python jobs/evaluate.py                                         # <run.output_dir>/export on validation
    python jobs/evaluate.py evaluate.export_dir=outputs/pretrain/export evaluate.split=train \
        evaluate.max_batches=50 data.dataset_dir=outputs/dataset
    python jobs/evaluate.py 'evaluate.compare=[outputs/pretrain/export,outputs/prune/export,outputs/pretrain/export+int8]'

One export: writes evaluation_<split>.json next to it and prints a summary. A comparison
prints a table (held-out loss, perplexity, total/active parameters, MB on disk, generation
tokens/s) and writes it as comparison.json + a PNG chart (evaluate.chart).
"""
from __future__ import annotations

import json
import os
import sys

from jobs.common import ConfigError, init_ray, job
from jobs.config import RootConfig
from moe.export import check_export
from moe_platform.data import DataError
from moe_platform.train import EvaluationReport, evaluate_export


def run_evaluation(config: RootConfig) -> EvaluationReport:
    settings = config.evaluate
    export_dir = os.path.abspath(settings.export_dir)
    try:
        check_export(export_dir, "evaluate.export_dir")
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
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


def run_comparison(config: RootConfig) -> list:
    from moe_platform.stages.compare import compare_exports, format_table, parse_entry, write_chart

    settings = config.evaluate
    try:
        first_dir, _ = [parse_entry(entry) for entry in settings.compare][0]
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    init_ray()
    try:
        rows = compare_exports(settings.compare, config.data.resolved().dataset_dir, split=settings.split,
                               batch_size=settings.batch_size, max_batches=settings.compare_max_batches)
    except (DataError, ValueError) as exc:
        print(f"evaluation failed: {exc}", file=sys.stderr)
        sys.exit(1)
    chart = os.path.abspath(settings.chart or os.path.join(os.path.dirname(first_dir), "comparison.png"))
    write_chart(rows, chart)
    with open(os.path.splitext(chart)[0] + ".json", "w") as fh:
        json.dump([row.to_dict() for row in rows], fh, indent=2)
    print(format_table(rows))
    print(f"chart  {chart}")
    return rows


@job
def main(config: RootConfig) -> None:
    if config.evaluate.compare:
        run_comparison(config)
    else:
        print(run_evaluation(config).summary())


if __name__ == "__main__":
    main()
