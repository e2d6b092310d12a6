"""Task evaluation: generate answers to held-out instruction records and score them (metrics.py).

The examples are raw prompt/response records, not packed shards, found in one of two ways:
- `task_sets_from_files(location, ...)`: every .jsonl/.parquet file of a location is one task
  (named after the file), all its records held out;
- `task_sets_from_datasets([(name, dataset_dir), ...], split)`: the records a prepared
  instruction dataset put in `split`, read again from the source its manifest names with the
  same field names and split hash - one task per dataset of a multi-task mixture (`tasks`).
Either way the prompt is rendered with the dataset's prompt template, the text the finetuned
model was trained on, and every compared export gets that same text.

`evaluate_tasks(engine, task_sets)` decodes greedily through the serving scheduler in this
process (a few dozen examples per task; a large set is a job for jobs/generate.py) and
returns one row per task plus "overall" (BLEU pooled over every example, the other metrics
averaged over examples). A prompt longer than the context keeps its last tokens: a metric
needs an answer for every example, so it is cut from the left, where the question's start is.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, List, Optional, Sequence, Tuple

from moe_platform.data.config import DataConfig, render_prompt
from moe_platform.data.errors import DataError
from moe_platform.data.manifest import Manifest, Skip
from moe_platform.data.packing import assign_split
from moe_platform.data.records import RecordFormat, read_records
from moe_platform.data.sources import SourceFile
from moe_platform.generate.metrics import METRICS, TaskScores, score

if TYPE_CHECKING:
    from moe_platform.train.config import EvaluateConfig, TaskConfig

log = logging.getLogger(__name__)

OVERALL = "overall"
METRIC_TITLES = {"exact_match": "exact match (%)", "f1": "token F1 (%)", "rouge_l": "ROUGE-L F (%)",
                 "bleu": "BLEU (corpus)"}


@dataclass(frozen=True)
class TaskSet:
    name: str
    prompts: Tuple[str, ...]  # rendered with the prompt template
    references: Tuple[str, ...]


def task_sets_from_files(location: str, *, prompt_field: str = "prompt", response_field: str = "response",
                         prompt_template: str = "{prompt}\n", max_examples: int = 32) -> List[TaskSet]:
    """One task per .jsonl/.parquet file of `location` (evaluate.task_input)."""
    from moe_platform.generate.inputs import find_input_files

    try:
        files = find_input_files(location)
    except DataError as exc:
        raise DataError(str(exc).replace("generate.input", "evaluate.task_input")) from None
    record_format = RecordFormat.instruction(prompt_field, response_field)
    return [_task_set(_task_name(file), [file], record_format, prompt_template, max_examples, keep=lambda _: True)
            for file in files]


def task_sets_from_datasets(tasks: Sequence[Tuple[str, str]], split: str, max_examples: int = 32) -> List[TaskSet]:
    """One task per (name, prepared dataset) whose records have references (data.kind=instruction)."""
    from moe_platform.data.prepare import find_input

    sets = []
    for name, dataset_dir in tasks:
        manifest = Manifest.load(dataset_dir, check_files=False)
        if manifest.config.get("kind") != "instruction":
            log.info("task %s: %s is not an instruction dataset (no references): perplexity only", name, dataset_dir)
            continue
        known = {f.name for f in dataclasses.fields(DataConfig)}
        config = DataConfig(**{key: value for key, value in manifest.config.items() if key in known})
        try:
            files = find_input(config).files
        except DataError as exc:
            raise DataError(f"task {name}: cannot read the records {dataset_dir} was prepared from ({exc})") from None
        keep = _in_split(split, config.validation_fraction, config.split_seed)
        sets.append(_task_set(name, files, RecordFormat.of(config), config.prompt_template, max_examples, keep))
    return sets


def task_sets_for(evaluate: EvaluateConfig, data: DataConfig, tasks: Sequence[TaskConfig]) -> List[TaskSet]:
    """The task sets evaluate.* selects (EvaluateConfig's task_* keys): task_input's files, else
    the mixture's `tasks`, else data.dataset_dir; [] when task metrics are off or the data has
    no references."""
    if not evaluate.task_metrics:
        return []
    if evaluate.task_input:
        return task_sets_from_files(evaluate.task_input, prompt_field=data.prompt_field,
                                    response_field=data.response_field, prompt_template=data.prompt_template,
                                    max_examples=evaluate.task_examples)  # fmt: skip
    datasets = [(task.name, task.dataset_dir) for task in tasks]
    return task_sets_from_datasets(datasets or [(_dataset_name(data.dataset_dir), data.dataset_dir)],
                                   evaluate.split, evaluate.task_examples)


def _dataset_name(dataset_dir: str) -> str:
    """outputs/finetune/dataset -> "finetune"; outputs/qa -> "qa"."""
    parts = [part for part in dataset_dir.rstrip("/").split("/") if part]
    if len(parts) > 1 and parts[-1] == "dataset":
        return parts[-2]
    return parts[-1] if parts else "task"


def _in_split(split: str, validation_fraction: float, split_seed: int):
    return lambda identity: assign_split(identity, validation_fraction, split_seed) == split


def _task_set(name: str, files: List[SourceFile], record_format: RecordFormat, prompt_template: str,
              max_examples: int, keep) -> TaskSet:
    prompts, references = [], []
    for file in files:
        for record in read_records(file, record_format):
            if len(prompts) >= max_examples:
                break
            if not isinstance(record, Skip) and keep(record.identity):
                prompts.append(render_prompt(prompt_template, record.prompt))
                references.append(record.response)
    if not prompts:
        raise DataError(f"task {name}: no usable prompt/response records in {', '.join(f.location for f in files)}")
    return TaskSet(name, tuple(prompts), tuple(references))


def _task_name(file: SourceFile) -> str:
    stem = os.path.splitext(file.identity)[0]
    return stem.replace("/", "_") or "task"


# ---- scoring -----------------------------------------------------------------------------------


def evaluate_tasks(engine: Any, task_sets: Sequence[TaskSet], *, max_tokens: int = 32,
                   num_slots: int = 8) -> List[TaskScores]:
    """Greedy answers to every task's prompts, scored: one row per task, then the overall row."""
    import torch

    from moe_platform.serve.engine import GenerationJob
    from moe_platform.serve.protocol import SamplingParams

    max_tokens = max(1, min(max_tokens, engine.context_length // 2))
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    room = engine.context_length - max_tokens
    scheduler = engine.scheduler(num_slots=num_slots)
    rows, predictions, references = [], [], []
    for task in task_sets:
        jobs = [GenerationJob(tuple(engine.encode(prompt)[-room:]), params) for prompt in task.prompts]
        with torch.inference_mode():
            texts = [text.strip() for text, _, _ in scheduler.run(jobs)]
        rows.append(score(task.name, texts, task.references))
        predictions += texts
        references += task.references
    if len(rows) > 1:
        rows.append(score(OVERALL, predictions, references))
    return rows


def score_export(export_dir: str, task_sets: Sequence[TaskSet], *, max_tokens: int, chart: str) -> List[TaskScores]:
    """One export's task metrics (its serving engine loaded here), drawn into `chart`."""
    from moe_platform.serve.engine import Engine

    rows = evaluate_tasks(Engine.load(export_dir), task_sets, max_tokens=max_tokens)
    write_task_chart([(os.path.basename(export_dir.rstrip("/")), rows)], chart)
    return rows


def format_task_table(rows: Sequence[TaskScores], label: Optional[str] = None) -> str:
    """A fixed-width table: one line per task (and export, when `label` names one)."""
    header = (f"{'export':<24} " if label is not None else "") + f"{'task':<20} {'n':>4} " + \
        " ".join(f"{name:>11}" for name in METRICS)
    lines = [header, "-" * len(header)]
    for row in rows:
        prefix = f"{_fit(label, 24):<24} " if label is not None else ""
        values = " ".join(f"{getattr(row, name):>11.2f}" for name in METRICS)
        lines.append(f"{prefix}{_fit(row.task, 20):<20} {row.examples:>4} {values}")
    return "\n".join(lines)


def _fit(text: str, width: int) -> str:
    return text if len(text) <= width else "..." + text[-(width - 3):]


def write_task_chart(results: Sequence[Tuple[str, Sequence[TaskScores]]], path: str) -> str:
    """One panel per metric in one PNG (see plot_task_metrics)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(METRICS), figsize=(4 * len(METRICS), 4))
    plot_task_metrics(axes, results)
    figure.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def plot_task_metrics(axes: Sequence[Any], results: Sequence[Tuple[str, Sequence[TaskScores]]]) -> None:
    """On one axis per metric: a group of bars per task, one bar per (label, scores) of `results`."""
    tasks = list(dict.fromkeys(row.task for _, rows in results for row in rows))
    width = 0.8 / max(len(results), 1)
    for axis, metric in zip(axes, METRICS):
        for k, (label, rows) in enumerate(results):
            values = {row.task: getattr(row, metric) for row in rows}
            axis.bar([t + (k - (len(results) - 1) / 2) * width for t in range(len(tasks))],
                     [values.get(task, 0.0) for task in tasks], width=width, label=label)
        axis.set_title(METRIC_TITLES[metric], fontsize=10)
        axis.set_ylim(0, 100)
        axis.set_xticks(range(len(tasks)))
        axis.set_xticklabels(tasks, rotation=30, ha="right", fontsize=8)
    axes[0].legend(fontsize=8)
