"""The stage jobs as users run them: pipeline, finetune, upcycle, prune, evaluate comparisons."""
from __future__ import annotations

import json
import os

import pytest
import torch
from testkit.datasets import write_dataset
from testkit.models import tiny_model
from testkit.processes import environment_without_ray, run_job
from testkit.training import read_scalars

# A tiny model and a small slice of the built-in corpora, as command-line overrides.
SMALL = [
    "data.vocab_size=300", "data.seq_len=32", "data.max_bytes=150000",
    "model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.ffn_hidden=64",
    "model.moe.num_experts=4", "model.moe.top_k=2", "model.moe.expert_hidden=32",
    "trainer.max_steps=6", "trainer.micro_batch_size=8", "trainer.warmup_steps=2", "trainer.log_every=2",
    "trainer.report_every=3", "trainer.eval_every=3", "trainer.eval_batches=2", "trainer.checkpoint_every=3",
    "evaluate.compare_max_batches=2",
]


@pytest.mark.slow
def test_pretrain_finetune_pipeline_runs_resumably_and_compares(job_env, tmp_path):
    root = tmp_path / "pipe"
    args = ["pipeline=pretrain_finetune", f"pipeline.output_dir={root}", *SMALL]
    result = run_job("pipeline", *args, env=job_env)
    assert result.returncode == 0, result.stderr[-4000:]
    for stage in ("pretrain", "finetune", "multitask"):
        assert (root / stage / "export" / "model.safetensors").is_file(), stage
        assert (root / stage / "stage_done.json").is_file(), stage
        assert (root / stage / "tensorboard").is_dir(), stage
    # Finetuning read prompt/response records with a loss mask, tokenized by the pretrained tokenizer.
    manifest = json.loads((root / "finetune" / "dataset" / "manifest.json").read_text())
    assert "loss_mask" in manifest["columns"]
    assert (root / "finetune" / "dataset" / "tokenizer.json").read_bytes() == \
        (root / "pretrain" / "export" / "tokenizer.json").read_bytes()
    # Each stage started from the previous stage's export.
    assert json.loads((root / "finetune" / "config.json").read_text())["init"]["export_dir"] == \
        str(root / "pretrain" / "export")
    scalars = read_scalars(str(root / "multitask" / "tensorboard"))
    assert {"val/text/loss", "val/instruct/loss", "val/loss"} <= set(scalars)
    assert (root / "comparison.png").is_file()
    assert len(json.loads((root / "comparison.json").read_text())) == 3
    # ...on task metrics too: the finetune set's held-out prompt/response records, same for every export.
    compared = json.loads((root / "comparison.json").read_text())
    assert [[(t["task"], t["examples"]) for t in row["tasks"]] for row in compared] == [[("finetune", 32)]] * 3
    assert "exact_match" in result.stdout

    again = run_job("pipeline", *args, env=job_env)  # finished stages are not run again
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("earlier") == 3


def test_finetune_without_an_export_is_a_one_line_error(tmp_path):
    result = run_job("finetune", f"run.output_dir={tmp_path / 'run'}", env=environment_without_ray())
    assert result.returncode == 2
    assert "init.export_dir must name the export" in result.stderr and "Traceback" not in result.stderr


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory) -> tuple[str, str]:
    """(dataset, export) of the tiny model, trained for nothing: enough for transforms and comparisons."""
    from moe import MoETransformer, save_export

    root = tmp_path_factory.mktemp("tiny")
    dataset = write_dataset(str(root / "data"), train_rows=128, validation_rows=32)
    torch.manual_seed(0)
    export = save_export(MoETransformer(tiny_model()), root / "export",
                         tokenizer_file=os.path.join(dataset, "tokenizer.json"))
    return dataset, str(export)


def test_upcycle_job_turns_a_dense_export_into_an_moe(tmp_path, tiny_export):
    from moe import MoETransformer, load_export, save_export

    dataset, _ = tiny_export
    torch.manual_seed(1)
    dense = save_export(MoETransformer(_dense_config()), tmp_path / "dense",
                        tokenizer_file=os.path.join(dataset, "tokenizer.json"))
    out = tmp_path / "up"
    result = run_job("upcycle", f"upcycle.dense_export_dir={dense}", f"upcycle.output_dir={out}",
                     "model.moe.num_experts=4", "model.moe.top_k=2", env=environment_without_ray())
    assert result.returncode == 0, result.stderr[-3000:]
    assert "4 experts top-2" in result.stdout
    idx = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(load_export(out)(idx)[0], load_export(dense)(idx)[0], atol=1e-5, rtol=1e-5)
    missing = run_job("upcycle", env=environment_without_ray())
    assert missing.returncode == 2 and "upcycle.dense_export_dir" in missing.stderr


def _dense_config():
    import dataclasses

    config = tiny_model()
    return dataclasses.replace(config, moe=dataclasses.replace(config.moe, moe_every=0))


@pytest.mark.slow
def test_prune_and_compare_jobs(job_env, tmp_path, tiny_export):
    dataset, export = tiny_export
    out = tmp_path / "pruned"
    pruned = run_job("prune", f"prune.export_dir={export}", f"prune.output_dir={out}", "prune.keep=2",
                     f"data.dataset_dir={dataset}", "prune.calibration_batches=4", "prune.eval_batches=2",
                     env=job_env)
    assert pruned.returncode == 0, pruned.stderr[-3000:]
    report = json.loads((out / "prune_report.json").read_text())
    assert report["num_experts"] == 4 and report["kept"] == 2
    assert set(report["loss_by_kept"]) >= {"4", "2"}
    assert "held-out loss" in pruned.stdout

    chart = tmp_path / "cmp.png"
    compared = run_job("evaluate", f"evaluate.compare=[{export},{out},{export}+int8]", f"evaluate.chart={chart}",
                       f"data.dataset_dir={dataset}", "evaluate.compare_max_batches=2", env=job_env)
    assert compared.returncode == 0, compared.stderr[-3000:]
    rows = json.loads((tmp_path / "cmp.json").read_text())
    assert [row["int8"] for row in rows] == [False, False, True]
    assert rows[1]["params"] < rows[0]["params"] and rows[2]["size_mb"] < rows[0]["size_mb"]
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    bad = run_job("evaluate", f"evaluate.compare=[{export},{tmp_path}/nothing]", f"data.dataset_dir={dataset}",
                  env=environment_without_ray())
    assert bad.returncode == 2 and "is not an export" in bad.stderr and "Traceback" not in bad.stderr


def test_distill_without_a_teacher_is_a_one_line_error(tmp_path):
    result = run_job("distill", f"run.output_dir={tmp_path / 'run'}", env=environment_without_ray(), timeout=300)
    assert result.returncode == 2
    assert "config error: distill.teacher_export_dir must name the teacher export" in result.stderr
    assert "Traceback" not in result.stderr


def test_distill_from_a_directory_that_is_not_an_export_names_it(tmp_path):
    result = run_job("distill", f"distill.teacher_export_dir={tmp_path}", f"run.output_dir={tmp_path / 'run'}",
                     env=environment_without_ray(), timeout=300)  # fmt: skip
    assert result.returncode == 2
    assert f"config error: distill.teacher_export_dir={tmp_path}: " in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "run").exists()
