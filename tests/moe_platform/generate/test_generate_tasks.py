"""Task evaluation: held-out prompt/response records of prepared datasets, answered and scored per task."""
from __future__ import annotations

import json

import pytest
from testkit.processes import run_job

from moe_platform.data import DataConfig, DataError
from moe_platform.data.packing import assign_split
from moe_platform.data.prepare import prepare_dataset
from moe_platform.generate.tasks import (evaluate_tasks, format_task_table, task_sets_from_datasets,
                                         task_sets_from_files)

TEMPLATE = "Q: {prompt}\nA: "
COLORS = ["red", "green", "blue", "black", "white", "brown", "pink", "gray"]


def task_records(task: str) -> list[dict]:
    if task == "qa":
        return [{"prompt": f"What colour is thing {i}?", "response": COLORS[i % len(COLORS)]} for i in range(24)]
    return [{"prompt": f"Repeat: {COLORS[i % 8]} {COLORS[(i + 3) % 8]}", "response": f"{COLORS[i % 8]} "
             f"{COLORS[(i + 3) % 8]}"} for i in range(24)]


@pytest.fixture(scope="module")
def task_datasets(ray_cluster, tiny_export, tmp_path_factory) -> dict[str, str]:
    """Two instruction datasets (a two-task mixture), prepared with the tiny export's tokenizer."""
    root = tmp_path_factory.mktemp("tasks")
    datasets = {}
    for task in ("qa", "echo"):
        (root / f"{task}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in task_records(task)))
        config = DataConfig(input=str(root / f"{task}.jsonl"), kind="instruction", dataset_dir=str(root / task),
                            tokenizer=f"{tiny_export}/tokenizer.json", seq_len=32, validation_fraction=0.5,
                            prompt_template=TEMPLATE)
        prepare_dataset(config.resolved())
        datasets[task] = str(root / task)
    return datasets


def test_each_dataset_of_a_mixture_gives_its_held_out_records_rendered_as_in_training(task_datasets, engine):
    sets = task_sets_from_datasets(list(task_datasets.items()), "validation", max_examples=100)
    assert [s.name for s in sets] == ["qa", "echo"]
    for task_set in sets:
        records = task_records(task_set.name)
        held_out = [r for i, r in enumerate(records)
                    if assign_split(f"{task_set.name}.jsonl:{i + 1}", 0.5, 0) == "validation"]
        assert 0 < len(held_out) < len(records)
        assert list(task_set.prompts) == [TEMPLATE.replace("{prompt}", r["prompt"]) for r in held_out]
        assert list(task_set.references) == [r["response"] for r in held_out]

    rows = evaluate_tasks(engine, sets, max_tokens=4)
    assert [row.task for row in rows] == ["qa", "echo", "overall"]
    assert rows[2].examples == rows[0].examples + rows[1].examples
    assert all(0 <= row.f1 <= 100 and 0 <= row.bleu <= 100 for row in rows)
    assert [line.split()[0] for line in format_task_table(rows).splitlines()[2:]] == ["qa", "echo", "overall"]


def test_a_dataset_whose_source_is_gone_or_without_references_is_said_so(task_datasets, tmp_path):
    import shutil

    moved = shutil.copytree(task_datasets["qa"], tmp_path / "qa")
    manifest = json.loads((moved / "manifest.json").read_text())
    manifest["config"]["input"] = str(tmp_path / "gone.jsonl")
    (moved / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=r"task qa: cannot read the records .*qa was prepared from \(data.input: "
                                        r".*gone.jsonl does not exist\)"):
        task_sets_from_datasets([("qa", str(moved))], "validation")
    manifest["config"]["kind"] = "text"
    (moved / "manifest.json").write_text(json.dumps(manifest))
    assert task_sets_from_datasets([("qa", str(moved))], "validation") == []


def test_task_input_files_are_one_task_each(tmp_path):
    for task in ("qa", "echo"):
        (tmp_path / f"{task}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in task_records(task)))
    sets = task_sets_from_files(str(tmp_path), prompt_template=TEMPLATE, max_examples=5)
    assert [(s.name, len(s.prompts)) for s in sets] == [("echo", 5), ("qa", 5)]
    assert sets[1].prompts[0] == "Q: What colour is thing 0?\nA: " and sets[1].references[0] == "red"


@pytest.mark.slow
def test_evaluate_compares_exports_on_a_mixtures_tasks_one_row_per_task(job_env, task_datasets, tiny_export,
                                                                         tmp_path):
    tasks = ",".join(f"{{name:{name},dataset_dir:{path}}}" for name, path in task_datasets.items())
    chart = tmp_path / "comparison.png"
    result = run_job("evaluate", f"evaluate.compare=[{tiny_export},{tiny_export}+int8]", f"tasks=[{tasks}]",
                     f"data.dataset_dir={task_datasets['qa']}", f"evaluate.chart={chart}",
                     "evaluate.task_examples=4", "evaluate.task_max_tokens=4", env=job_env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    task_lines = [line.split()[:2] for line in result.stdout.splitlines()
                  if line.split()[:1] in (["tiny"], ["tiny+int8"])]
    assert [line for line in task_lines if len(line) == 2 and line[1] in ("qa", "echo", "overall")] == [
        ["tiny", "qa"], ["tiny", "echo"], ["tiny", "overall"],
        ["tiny+int8", "qa"], ["tiny+int8", "echo"], ["tiny+int8", "overall"]]
    rows = json.loads((tmp_path / "comparison.json").read_text())
    assert [[t["task"] for t in row["tasks"]] for row in rows] == [["qa", "echo", "overall"]] * 2
    assert all(t["examples"] == 4 for row in rows for t in row["tasks"][:2])
    assert chart.stat().st_size > 0


@pytest.mark.slow
def test_evaluate_one_export_adds_task_metrics_to_its_report(job_env, task_datasets, tiny_export, tmp_path):
    import shutil

    export = shutil.copytree(tiny_export, tmp_path / "export")
    result = run_job("evaluate", f"evaluate.export_dir={export}", f"data.dataset_dir={task_datasets['qa']}",
                     "evaluate.task_examples=3", "evaluate.task_max_tokens=4", env=job_env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((export / "evaluation_validation.json").read_text())
    assert [(t["task"], t["examples"]) for t in report["tasks"]] == [("qa", 3)]
    assert (export / "task_metrics_validation.png").stat().st_size > 0
    assert "exact_match" in result.stdout and "perplexity" in result.stdout
