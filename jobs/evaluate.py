"""Evaluate exports: one export's perplexity and routing statistics, or several side by side.

    python jobs/evaluate.py                                         # <run.output_dir>/export on validation
    python jobs/evaluate.py evaluate.export_dir=outputs/pretrain/export evaluate.split=train \
        evaluate.max_batches=50 data.dataset_dir=outputs/dataset
    python jobs/evaluate.py 'evaluate.compare=[outputs/pretrain/export,outputs/prune/export,outputs/pretrain/export+int8]'
    python jobs/evaluate.py evaluate.export_dir=outputs/finetune/export data.dataset_dir=outputs/finetune/dataset
    python jobs/evaluate.py data.dataset_dir=outputs/finetune/dataset \
        'evaluate.compare=[outputs/pretrain/export,outputs/finetune/export,outputs/finetune/export+int8]'
        # ^ + task metrics on the finetune set's held-out records
    python jobs/evaluate.py evaluate.task_input=heldout/ ...        # one task per .jsonl/.parquet file

One export: writes evaluation_<split>.json next to it and prints a summary. A comparison
prints a table (held-out loss, perplexity, total/active parameters, MB on disk, generation
tokens/s) and writes it as comparison.json + a PNG chart (evaluate.chart).
Where the data has references (an instruction dataset, a mixture's `tasks`, or
evaluate.task_input), both also score greedy answers: exact match, token F1, ROUGE-L and BLEU
per task and overall - a table, and a chart (task_metrics_<split>.png beside one export;
a second row of panels in a comparison's chart).
"""
from __future__ import annotations

import json
import os
import sys
from typing import TYPE_CHECKING

from jobs.common import ConfigError, init_ray, job
from jobs.config import RootConfig
from moe_platform.data import DataError

# Ray and torch load inside the functions, once the config is known to be valid.
if TYPE_CHECKING:
    from moe_platform.generate.tasks import TaskSet
    from moe_platform.train import EvaluationReport


def find_task_sets(config: RootConfig) -> list[TaskSet]:
    """The held-out prompt/response sets evaluate.* selects (none: perplexity only)."""
    from moe_platform.generate.tasks import task_sets_for

    try:
        return task_sets_for(config.evaluate, config.data.resolved(), config.tasks)
    except (DataError, ValueError) as exc:
        print(f"evaluation failed: {exc}", file=sys.stderr)
        sys.exit(1)


def run_evaluation(config: RootConfig) -> EvaluationReport:
    from moe.export import check_export
    from moe_platform.generate.tasks import format_task_table, score_export
    from moe_platform.train import evaluate_export

    settings = config.evaluate
    export_dir = os.path.abspath(settings.export_dir)
    try:
        check_export(export_dir, "evaluate.export_dir")
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    task_sets = find_task_sets(config)
    init_ray()
    try:
        report = evaluate_export(export_dir, config.data.resolved().dataset_dir, split=settings.split,
                                 batch_size=settings.batch_size, max_batches=settings.max_batches)
    except (DataError, ValueError) as exc:
        print(f"evaluation failed: {exc}", file=sys.stderr)
        sys.exit(1)
    result = report.to_dict()
    if task_sets:
        chart = os.path.join(export_dir, f"task_metrics_{settings.split}.png")
        rows = score_export(export_dir, task_sets, max_tokens=settings.task_max_tokens, chart=chart)
        print(format_task_table(rows))
        print(f"chart  {chart}")
        result["tasks"] = [row.to_dict() for row in rows]
    with open(os.path.join(export_dir, f"evaluation_{settings.split}.json"), "w") as fh:
        json.dump(result, fh, indent=2)
    return report


def run_comparison(config: RootConfig) -> list:
    from moe_platform.stages.compare import compare_exports, format_table, parse_entry, write_chart

    settings = config.evaluate
    try:
        first_dir, _ = [parse_entry(entry) for entry in settings.compare][0]
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    task_sets = find_task_sets(config)
    init_ray()
    try:
        rows = compare_exports(settings.compare, config.data.resolved().dataset_dir, split=settings.split,
                               batch_size=settings.batch_size, max_batches=settings.compare_max_batches,
                               task_sets=task_sets, task_max_tokens=settings.task_max_tokens)
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
