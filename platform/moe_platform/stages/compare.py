"""Several exports side by side: what each stage or transform bought and what it cost.

    rows = compare_exports(["outputs/pretrain/export", "outputs/prune/export",
                            "outputs/pretrain/export+int8"], dataset_dir)
    print(format_table(rows)); write_chart(rows, "comparison.png")

An entry `<export>+int8` is that export with dynamic int8 quantization (moe.quantize),
as a CPU serve replica would run it. Held-out loss comes from the same rows for every
export (moe_platform.train.evaluate_export); generation tokens/s from the same prompts,
greedy, at batch size `generate_batch`, after one warm-up call. Given `task_sets`
(moe_platform.generate.tasks), each export also answers the same held-out prompts and gets
task metrics (exact match, F1, ROUGE-L, BLEU) per task and overall: a second table, and a
second row of panels in the chart.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Sequence

import torch

log = logging.getLogger(__name__)

INT8_SUFFIX = "+int8"


@dataclass
class ExportSummary:
    name: str  # the entry as given
    export_dir: str
    int8: bool
    loss: float
    perplexity: float
    params: int
    active_params: int
    size_mb: float  # bytes on disk of the weights (int8: of the quantized state dict)
    generate_tokens_per_s: float
    tasks: list = field(default_factory=list)  # generate.metrics.TaskScores per task (+ overall)

    def to_dict(self) -> dict:
        return asdict(self)


def parse_entry(entry: str) -> tuple[str, bool]:
    """'dir' or 'dir+int8' -> (absolute dir, int8?); the directory must be an export."""
    int8 = entry.endswith(INT8_SUFFIX)
    export_dir = os.path.abspath(entry[: -len(INT8_SUFFIX)] if int8 else entry)
    from moe.export import ExportError, check_export

    try:
        check_export(export_dir, "evaluate.compare")
    except ExportError as exc:
        raise ExportError(f"evaluate.compare entry {entry!r} is not an export ({exc})") from None
    return export_dir, int8


def load_model(export_dir: str, int8: bool) -> torch.nn.Module:
    from moe import load_export

    model = load_export(export_dir, backend="native")
    if int8:
        from moe.quantize import quantize_int8

        model = quantize_int8(model)
    return model


def compare_exports(entries: Sequence[str], dataset_dir: str, *, split: str = "validation", batch_size: int = 8,
                    max_batches: Optional[int] = 20, generate_batch: int = 4, prompt_tokens: int = 16,
                    new_tokens: int = 32, task_sets: Sequence[Any] = (),
                    task_max_tokens: int = 32) -> list[ExportSummary]:
    """Score every entry on the same held-out rows and prompts (Ray must be up: rows stream via Ray Data)."""
    from moe_platform.train.evaluation import evaluate_export, held_out_batches

    from moe import load_export_config

    parsed = [parse_entry(entry) for entry in entries]  # all checked before the first (slow) evaluation
    # Prompt + generated tokens must fit every model's context (small models have short ones).
    context = min(load_export_config(export_dir).seq_len for export_dir, _ in parsed)
    prompt_tokens = max(1, min(prompt_tokens, context // 4))
    new_tokens = max(1, min(new_tokens, context - prompt_tokens))
    prompts = _prompts(dataset_dir, split, generate_batch, prompt_tokens)
    batches = held_out_batches(dataset_dir, split=split, batch_size=batch_size, max_batches=max_batches)
    rows = []
    for entry, (export_dir, int8) in zip(entries, parsed):
        model = load_model(export_dir, int8)
        report = evaluate_export(export_dir, dataset_dir, split=split, batch_size=batch_size,
                                 max_batches=max_batches, model=model, batches=batches)
        rows.append(ExportSummary(
            name=entry, export_dir=export_dir, int8=int8, loss=report.loss, perplexity=report.perplexity,
            params=model.config.num_params, active_params=model.config.num_active_params,
            size_mb=_size_bytes(export_dir, model, int8) / 1e6,
            generate_tokens_per_s=generation_speed(model, prompts, new_tokens),
            tasks=_task_scores(export_dir, model, task_sets, task_max_tokens),
        ))
        log.info("%s: loss %.4f, %.1f generated tokens/s", entry, report.loss, rows[-1].generate_tokens_per_s)
    return rows


def _task_scores(export_dir: str, model: torch.nn.Module, task_sets: Sequence[Any], max_tokens: int) -> list:
    if not task_sets:
        return []
    from moe_platform.generate.tasks import evaluate_tasks
    from moe_platform.serve.engine import Engine

    return evaluate_tasks(Engine.for_model(export_dir, model), task_sets, max_tokens=max_tokens)


def _prompts(dataset_dir: str, split: str, count: int, length: int) -> list[list[int]]:
    """The first `length` tokens of the split's first `count` rows (the same for every export)."""
    import pyarrow.parquet as pq

    from moe_platform.train.plan import load_manifest

    path = load_manifest(dataset_dir).split_paths(split)[0]
    tokens = pq.read_table(path, columns=["tokens"]).column("tokens").to_pylist()[:count]
    return [row[:length] for row in tokens]


@torch.no_grad()
def generation_speed(model: torch.nn.Module, prompts: list[list[int]], new_tokens: int) -> float:
    """Greedy tokens/s for the batch of prompts (no stop token: every sequence runs to the end)."""
    model.generate(prompts, max_new_tokens=2, temperature=0.0)  # warm-up: first-call allocations
    started = time.perf_counter()
    outputs = model.generate(prompts, max_new_tokens=new_tokens, temperature=0.0)
    seconds = time.perf_counter() - started
    return sum(len(out) for out in outputs) / max(seconds, 1e-9)


def _size_bytes(export_dir: str, model: torch.nn.Module, int8: bool) -> int:
    if not int8:
        from moe.export import weights_bytes

        return weights_bytes(export_dir)
    from moe.quantize import model_size_bytes

    return model_size_bytes(model)


def format_table(rows: Sequence[ExportSummary]) -> str:
    header = f"{'export':<44} {'loss':>8} {'ppl':>9} {'params':>11} {'active':>11} {'MB':>8} {'gen tok/s':>10}"
    lines = [header, "-" * len(header)]
    for row in rows:
        name = row.name if len(row.name) <= 44 else "..." + row.name[-41:]
        lines.append(f"{name:<44} {row.loss:>8.4f} {row.perplexity:>9.2f} {row.params:>11,} "
                     f"{row.active_params:>11,} {row.size_mb:>8.2f} {row.generate_tokens_per_s:>10.1f}")
    if any(row.tasks for row in rows):
        from moe_platform.generate.tasks import format_task_table

        tables = [format_task_table(row.tasks, label=_short_label(row)) for row in rows if row.tasks]
        lines += ["", tables[0]] + [table.split("\n", 2)[2] for table in tables[1:]]  # one header
    return "\n".join(lines)


def write_chart(rows: Sequence[ExportSummary], path: str) -> str:
    """Four bar panels (held-out loss, parameters, size on disk, generation speed) in one PNG, and
    below them one panel per task metric when the rows have task scores."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [_short_label(row) for row in rows]
    panels = [
        ("held-out loss", [row.loss for row in rows]),
        ("parameters (M): total / active", None),
        ("weights on disk (MB)", [row.size_mb for row in rows]),
        ("generation tokens/s", [row.generate_tokens_per_s for row in rows]),
    ]
    with_tasks = any(row.tasks for row in rows)
    panel_rows = 2 if with_tasks else 1
    figure, grid = plt.subplots(panel_rows, 4, figsize=(4 * 4, (4 + 0.15 * max(len(rows), 1)) * panel_rows),
                                squeeze=False)
    axes = grid[0]
    if with_tasks:
        from moe_platform.generate.tasks import plot_task_metrics

        plot_task_metrics(grid[1], [(_short_label(row), row.tasks) for row in rows if row.tasks])
    positions = range(len(rows))
    for axis, (title, values) in zip(axes, panels):
        if values is None:
            axis.bar([p - 0.2 for p in positions], [row.params / 1e6 for row in rows], width=0.4, label="total")
            axis.bar([p + 0.2 for p in positions], [row.active_params / 1e6 for row in rows], width=0.4,
                     label="active")
            axis.legend(fontsize=8)
        else:
            axis.bar(list(positions), values, color="tab:blue")
        axis.set_title(title, fontsize=10)
        axis.set_xticks(list(positions))
        axis.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
    figure.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def _short_label(row: ExportSummary) -> str:
    """The export's run directory name (…/<run>/export -> <run>), plus +int8."""
    directory = row.export_dir
    base = os.path.basename(directory.rstrip("/"))
    if base == "export":
        base = os.path.basename(os.path.dirname(directory.rstrip("/")))
    return base + (INT8_SUFFIX if row.int8 else "")
