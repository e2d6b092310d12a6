"""Later stages on the training spine: multi-task mixtures, distillation, LoRA - with real Ray and DeepSpeed.

One Ray Train run carries all three at once (CI time): a LoRA student initialised from an
export, distilled from a teacher export, on a 2-task mixture (one task with a loss mask),
killed once mid-run and restarted by Ray Train.
"""
from __future__ import annotations

import dataclasses
import os
import random

import pytest
import torch
from moe.export import load_export_state

from moe import MoETransformer, load_export, save_export
from moe.peft import PeftConfig
from moe_platform.train import DistillConfig, TaskConfig, TrainConfigError, prepare_stage, train
from moe_platform.train.batches import DataPosition, MixtureBatches, TaskBatches
from moe_platform.train.objective import kl_to_teacher
from moe_platform.train.plan import load_manifest, make_plan
from testkit.datasets import write_dataset
from testkit.models import tiny_model
from testkit.training import read_json, read_scalars, tiny_stage
from test_train_state import FakeShard, make_task


@pytest.fixture(scope="module")
def two_datasets(tmp_path_factory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("tasks")
    text = write_dataset(str(root / "text"), train_rows=256, validation_rows=32, seed=3)
    masked = write_dataset(str(root / "masked"), train_rows=96, validation_rows=32, loss_mask=True, seed=5)
    return text, masked


@pytest.fixture(scope="module")
def exports(tmp_path_factory, two_datasets) -> tuple[str, str]:
    """(teacher, student init): random tiny models as exports with the datasets' tokenizer."""
    root = tmp_path_factory.mktemp("exports")
    tokenizer = os.path.join(two_datasets[0], "tokenizer.json")
    torch.manual_seed(11)
    teacher = save_export(MoETransformer(tiny_model(num_experts=4)), root / "teacher", tokenizer_file=tokenizer)
    torch.manual_seed(12)
    student = save_export(MoETransformer(tiny_model(num_experts=2, top_k=1)), root / "student",
                          tokenizer_file=tokenizer)
    return str(teacher), str(student)


def mixture_stage(two_datasets, exports, output_dir, **trainer):
    text, masked = two_datasets
    teacher, student = exports
    stage = tiny_stage(text, output_dir, model=tiny_model(num_experts=2, top_k=1), init_export_dir=student,
                       objective="distill", **trainer)
    return dataclasses.replace(
        stage,
        tasks=[TaskConfig(name="text", dataset_dir=text, weight=1.0),
               TaskConfig(name="qa", dataset_dir=masked, weight=3.0)],
        distill=DistillConfig(teacher_export_dir=teacher, temperature=2.0, alpha=0.5),
        peft=PeftConfig(lora_rank=4, lora_targets=["attention", "experts"]),
    )


# ---- without Ray ---------------------------------------------------------------------------------


def test_mixture_plan_combines_the_tasks(two_datasets, exports, tmp_path):
    stage, plan = prepare_stage(mixture_stage(two_datasets, exports, str(tmp_path / "run")))
    manifests = {task.dataset_dir: load_manifest(task.dataset_dir) for task in stage.tasks}
    assert make_plan(stage, manifests) == plan
    text, qa = plan.tasks
    assert (text.name, qa.name) == ("text", "qa")
    assert text.weight == pytest.approx(0.25) and qa.weight == pytest.approx(0.75)
    assert (text.batches_per_epoch, qa.batches_per_epoch) == (32, 12)  # 256 / 8 and 96 / 8 rows
    assert plan.batches_per_epoch == 44
    assert text.columns == ("tokens",) and qa.columns == ("tokens", "loss_mask")
    assert plan.eval_batches == 2 + 2


def test_mixture_draws_follow_the_weights_and_resume_exactly():
    def mixture(positions=None, position=None):
        positions = positions or {}
        streams = {name: TaskBatches(FakeShard(rows), make_task(rows // 4, name), batch_size=4, seed=seed, rank=0,
                                     shuffle_buffer_rows=8, prefetch_batches=1, device=torch.device("cpu"),
                                     position=positions.get(name))
                   for name, rows, seed in (("a", 40, 1), ("b", 400, 2))}
        return MixtureBatches(streams, {"a": 0.8, "b": 0.2}, seed=7, batches_per_epoch=110, position=position)

    whole = mixture()
    sequence = [tuple(next(whole)["tokens"].tolist()) for _ in range(60)]
    from_a = sum(1 for batch in sequence if max(batch) < 40 and len(set(batch)) == 4) 
    assert 36 <= from_a <= 60  # ~80 % of draws come from task a (its rows are the ids below 40)
    first = mixture()
    head = [tuple(next(first)["tokens"].tolist()) for _ in range(25)]
    assert first.position == DataPosition(epoch=0, batches_in_epoch=25) and first.draws == 25
    resumed = mixture(first.task_positions, first.position)
    tail = [tuple(next(resumed)["tokens"].tolist()) for _ in range(35)]
    assert head + tail == sequence
    assert first.task_positions["a"].epoch >= 1  # task a (10 batches per epoch) wrapped around


def test_kl_to_teacher_is_zero_for_the_teacher_itself_and_respects_the_mask():
    torch.manual_seed(0)
    teacher = torch.randn(2, 5, 11)
    assert kl_to_teacher(teacher.clone(), teacher, None, 2.0).item() == pytest.approx(0.0, abs=1e-6)
    student = torch.randn(2, 5, 11)
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[:, 3:] = True
    only_masked = kl_to_teacher(student[:, 3:], teacher[:, 3:], None, 2.0)
    assert kl_to_teacher(student, teacher, mask, 2.0).item() == pytest.approx(only_masked.item(), rel=1e-6)
    assert kl_to_teacher(student, teacher, None, 2.0) > 0


def test_stage_checks_name_the_key(two_datasets, exports, tmp_path):
    stage = mixture_stage(two_datasets, exports, str(tmp_path / "run"))
    with pytest.raises(TrainConfigError, match="distill.teacher_export_dir"):
        prepare_stage(dataclasses.replace(stage, distill=DistillConfig()))
    with pytest.raises(TrainConfigError, match="trainer.objective=distill"):
        prepare_stage(dataclasses.replace(stage, trainer=dataclasses.replace(stage.trainer, objective="lm")))
    with pytest.raises(TrainConfigError, match="names must be unique"):
        prepare_stage(dataclasses.replace(stage, tasks=[stage.tasks[0], stage.tasks[0]]))
    with pytest.raises(ValueError, match="tasks.x.weight"):
        TaskConfig(name="x", dataset_dir="d", weight=0)


# ---- one real run --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mixture_run(ray_cluster, two_datasets, exports, tmp_path_factory):
    output_dir = str(tmp_path_factory.mktemp("mixture") / "run")
    stage = mixture_stage(two_datasets, exports, output_dir, fail_at_step=8, max_steps=12)
    stage = dataclasses.replace(stage, run=dataclasses.replace(stage.run, max_failures=1))
    return stage, train(stage)


@pytest.mark.slow
def test_mixture_distillation_with_lora_finishes_after_a_restart(mixture_run):
    stage, result = mixture_run
    assert os.path.exists(os.path.join(stage.run.output_dir, ".failed_at_step_8"))
    state = read_json(os.path.join(result.checkpoint_dir, "train_state.json"))
    assert state["step"] == 12 and state["position"] == {"epoch": 0, "batches_in_epoch": 12}  # 12 draws of 44
    assert set(state["task_positions"]) == {"text", "qa"}
    drawn = sum(p["epoch"] * b + p["batches_in_epoch"]
                for p, b in ((state["task_positions"]["text"], 32), (state["task_positions"]["qa"], 12)))
    assert drawn == 12  # every draw came from exactly one task, across the restart too


@pytest.mark.slow
def test_per_task_validation_and_distillation_terms_reach_tensorboard(mixture_run):
    _, result = mixture_run
    scalars = read_scalars(result.tensorboard_dir)
    for tag in ("val/loss", "val/text/loss", "val/qa/loss", "val/qa/perplexity", "train/kd_loss", "train/lm_loss"):
        assert tag in scalars, tag
    kd = [value for _, value in scalars["train/kd_loss"]]
    assert all(value > 0 for value in kd)


@pytest.mark.slow
def test_lora_stage_exports_merged_weights_and_adapters_apart(mixture_run, exports, tmp_path):
    from moe.peft import merge_adapter

    _, result = mixture_run
    _, student = exports
    adapter_dir = os.path.join(result.export_dir, "adapter")
    assert os.path.isfile(os.path.join(adapter_dir, "adapter.safetensors"))
    merged = merge_adapter(student, adapter_dir, str(tmp_path / "merged"))
    exported, remerged = (load_export_state(d)[0] for d in (result.export_dir, merged))
    base = load_export_state(student)[0]
    assert set(exported) == set(remerged)
    for key in exported:
        torch.testing.assert_close(exported[key], remerged[key], atol=1e-5, rtol=1e-5)
    # The router was not a LoRA target and stayed frozen: LoRA trains adapters only.
    torch.testing.assert_close(exported["layers.0.ffn.router.weight"], base["layers.0.ffn.router.weight"])
    assert not torch.allclose(exported["layers.0.attn.wq.weight"], base["layers.0.attn.wq.weight"])
    idx = torch.tensor([[random.Random(0).randrange(64) for _ in range(16)]])
    torch.testing.assert_close(load_export(result.export_dir)(idx)[0], load_export(merged)(idx)[0],
                               atol=1e-5, rtol=1e-5)
