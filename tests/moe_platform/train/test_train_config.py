"""Pure parts of moe_platform.train: config checks, the plan, the schedule, the run directory."""
from __future__ import annotations

import dataclasses
import json
import math

import pytest
from testkit.datasets import write_dataset
from testkit.models import tiny_model
from testkit.training import tiny_stage

from moe_platform.data import ManifestError
from moe_platform.train import RunConfig, StageConfig, TrainConfigError, TrainerConfig
from moe_platform.train.engine import build_optimizer, deepspeed_config, expert_lr_scale, warmup_cosine
from moe_platform.train.plan import eval_batches_per_worker, total_steps
from moe_platform.train.progress import format_progress
from moe_platform.train.trainer import claim_output_dir, config_differences, prepare_stage


@pytest.mark.parametrize(
    ("changes", "key"),
    [
        ({"num_workers": 3, "expert_parallel_size": 2}, "trainer.num_workers=3"),
        ({"zero_stage": 3}, "trainer.zero_stage"),
        ({"precision": "fp16"}, "trainer.precision"),
        ({"precision": "bf16"}, "trainer.precision=bf16"),
        ({"micro_batch_size": 0}, "trainer.micro_batch_size"),
        ({"max_steps": None}, "trainer.max_steps"),
        ({"min_lr_ratio": 2.0}, "trainer.min_lr_ratio"),
        ({"cpus_per_worker": 0}, "trainer.cpus_per_worker"),
        ({"eval_batches": 0}, "trainer.eval_batches"),
        ({"expert_lr_scale": 0}, "trainer.expert_lr_scale"),
        ({"peak_flops_per_worker": 0}, "trainer.peak_flops_per_worker"),
    ],
)
def test_trainer_config_names_the_bad_key(changes, key):
    with pytest.raises(TrainConfigError, match=key.replace("[", r"\[")) as info:
        TrainerConfig(**{"max_steps": 10, **changes})
    assert "\n" not in str(info.value)


def test_run_config_checks():
    with pytest.raises(TrainConfigError, match="run.checkpoints_to_keep"):
        RunConfig(checkpoints_to_keep=0)


def test_total_steps_takes_the_first_limit():
    common = dict(tokens_per_step=100, steps_per_epoch=10.0)
    assert total_steps(max_steps=50, max_tokens=None, max_epochs=None, **common) == 50
    assert total_steps(max_steps=50, max_tokens=1050, max_epochs=None, **common) == 11
    assert total_steps(max_steps=50, max_tokens=None, max_epochs=2, **common) == 20
    assert total_steps(max_steps=None, max_tokens=None, max_epochs=1, tokens_per_step=1, steps_per_epoch=2.5) == 2


def test_eval_batches_are_equal_on_every_worker():
    assert eval_batches_per_worker(100, num_workers=2, batch_size=8, cap=None) == 6
    assert eval_batches_per_worker(100, num_workers=2, batch_size=8, cap=3) == 3
    assert eval_batches_per_worker(0, num_workers=2, batch_size=8, cap=3) == 0


def test_warmup_then_cosine():
    schedule = dict(warmup_steps=4, total_steps=14, min_lr_ratio=0.1)
    values = [warmup_cosine(step, **schedule) for step in range(15)]
    assert values[:4] == [0.25, 0.5, 0.75, 1.0]
    assert values[4] == pytest.approx(1.0)
    assert values[9] == pytest.approx(0.1 + 0.9 * 0.5)  # half way through the decay
    assert values[14] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(values[4:], values[5:]))


def test_deepspeed_config_follows_the_trainer():
    trainer = TrainerConfig(max_steps=1, num_workers=2, micro_batch_size=4, grad_accum_steps=3, zero_stage=2,
                            grad_clip=0.5)
    config = deepspeed_config(trainer)
    assert config["train_batch_size"] == 24
    assert config["zero_optimization"]["stage"] == 2
    assert config["gradient_clipping"] == 0.5
    assert config["bf16"]["enabled"] is False  # CPU: fp32


def test_the_routed_experts_learn_at_lr_times_expert_lr_scale():
    import torch

    from moe import MoETransformer

    torch.manual_seed(0)
    model = MoETransformer(tiny_model(num_shared_experts=1))
    trainer = TrainerConfig(max_steps=10, lr=1e-3, expert_lr_scale=3.0, weight_decay=0.0)
    optimizer = build_optimizer(model, trainer)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5)
    assert sorted({group["lr"] for group in optimizer.param_groups}) == pytest.approx([5e-4, 1.5e-3])

    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    tokens = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(1))
    model(tokens, tokens)[1].backward()
    optimizer.step()
    schedule.step()
    # Adam's first step moves every weight with a gradient by about its group's lr.
    moved = {name: (p.detach() - before[name]).abs().max().item() for name, p in model.named_parameters()}
    routed = [step for name, step in moved.items() if ".experts." in name]
    others = [step for name, step in moved.items() if ".experts." not in name and step > 0]
    assert routed and others and any("shared" in name for name in moved)
    assert max(routed) == pytest.approx(1.5e-3, rel=0.01) and max(others) == pytest.approx(5e-4, rel=0.01)


@pytest.mark.parametrize("model, scale", [
    (tiny_model(), 2.0),  # the default recipe: bias balancing with faster experts
    (tiny_model(bias_update_rate=0.0), 1.0),
    (tiny_model(backend="deepspeed"), 1.0),  # no router bias there, so none by default
])
def test_expert_lr_scale_null_follows_bias_balancing(model, scale):
    assert expert_lr_scale(TrainerConfig(), model) == scale
    assert expert_lr_scale(TrainerConfig(expert_lr_scale=3.0), model) == 3.0


def test_prepare_stage_plans_from_the_manifest(tmp_path):
    dataset = write_dataset(str(tmp_path / "data"), train_rows=100, validation_rows=40)
    stage = tiny_stage(dataset, str(tmp_path / "run"), num_workers=2, micro_batch_size=8, max_epochs=3,
                       max_steps=None, eval_batches=None)
    stage, plan = prepare_stage(stage)
    assert plan.batches_per_epoch == 6  # 100 rows / 2 workers = 50 -> 6 full batches of 8
    assert plan.total_steps == 18
    assert plan.tokens_per_step == 2 * 8 * 32
    assert plan.eval_batches == 2  # 40 / 2 = 20 rows -> 2 batches of 8
    assert plan.columns == ("tokens",)
    [task] = plan.tasks  # a single dataset is a mixture of one unnamed task with the plan's counts
    assert (task.name, task.weight, task.batches_per_epoch, task.eval_batches) == ("", 1.0, 6, 2)
    assert len(task.train_paths) == 1 and task.train_paths[0].startswith(str(tmp_path))


@pytest.mark.parametrize(
    ("stage_changes", "key"),
    [
        ({"model": tiny_model(num_experts=3, top_k=1)}, "model.moe.num_experts=3"),
        ({"model": dataclasses.replace(tiny_model(), vocab_size=32)}, "model.vocab_size=32"),
        ({"model": dataclasses.replace(tiny_model(), seq_len=16)}, "model.seq_len=16"),
    ],
)
def test_cross_section_errors_name_the_key(tmp_path, stage_changes, key):
    dataset = write_dataset(str(tmp_path / "data"), train_rows=64, validation_rows=16)
    stage = tiny_stage(dataset, str(tmp_path / "run"), num_workers=2, expert_parallel_size=2)
    with pytest.raises(TrainConfigError, match=key):
        prepare_stage(dataclasses.replace(stage, **stage_changes))


def test_too_small_a_dataset_is_a_clear_error(tmp_path):
    dataset = write_dataset(str(tmp_path / "data"), train_rows=20, validation_rows=8)
    with pytest.raises(TrainConfigError, match="too few for one step"):
        prepare_stage(tiny_stage(dataset, str(tmp_path / "run"), num_workers=2, micro_batch_size=16))


def test_missing_dataset_names_the_directory(tmp_path):
    with pytest.raises(ManifestError, match="does not exist"):
        prepare_stage(tiny_stage(str(tmp_path / "nowhere"), str(tmp_path / "run")))


def test_init_export_must_match_the_architecture(tmp_path):
    export = tmp_path / "export"
    export.mkdir()
    from moe import MoETransformer, save_export

    save_export(MoETransformer(dataclasses.replace(tiny_model(), d_model=48)), export)
    dataset = write_dataset(str(tmp_path / "data"), train_rows=64, validation_rows=16)
    stage = tiny_stage(dataset, str(tmp_path / "run"), init_export_dir=str(export))
    with pytest.raises(TrainConfigError, match="model.d_model=32 but the export has 48"):
        prepare_stage(stage)


def test_output_dir_resumes_the_same_config_and_refuses_another(tmp_path):
    dataset = write_dataset(str(tmp_path / "data"), train_rows=64, validation_rows=16)
    stage, _ = prepare_stage(tiny_stage(dataset, str(tmp_path / "run")))
    assert claim_output_dir(stage) is False
    assert claim_output_dir(stage) is True
    # Operational keys may change on resume...
    assert claim_output_dir(dataclasses.replace(stage, run=dataclasses.replace(stage.run, max_failures=3))) is True
    # ...what changes the computation may not.
    other = dataclasses.replace(stage, trainer=dataclasses.replace(stage.trainer, lr=0.5))
    with pytest.raises(TrainConfigError, match=r"trainer.lr=0.01 there, 0.5 now"):
        claim_output_dir(other)


def test_a_run_from_before_a_new_config_key_resumes_at_its_default(tmp_path):
    dataset = write_dataset(str(tmp_path / "data"), train_rows=64, validation_rows=16)
    stage, _ = prepare_stage(tiny_stage(dataset, str(tmp_path / "run")))
    claim_output_dir(stage)
    path = tmp_path / "run" / "config.json"
    older = json.loads(path.read_text())
    del older["trainer"]["expert_lr_scale"]  # as a version before that key wrote it
    path.write_text(json.dumps(older))
    assert claim_output_dir(stage) is True
    changed = dataclasses.replace(stage, trainer=dataclasses.replace(stage.trainer, expert_lr_scale=3.0))
    with pytest.raises(TrainConfigError, match=r"trainer.expert_lr_scale=None there, 3.0 now"):
        claim_output_dir(changed)
    older["trainer"]["retired_key"] = 1  # a key this version no longer has still counts as a change
    path.write_text(json.dumps(older))
    with pytest.raises(TrainConfigError, match=r"different config \(trainer.retired_key=1 there, None now\)"):
        claim_output_dir(stage)


def test_config_differences_are_dotted():
    before = {"model": {"moe": {"top_k": 2}}, "trainer": {"lr": 1.0, "log_every": 5}}
    now = {"model": {"moe": {"top_k": 1}}, "trainer": {"lr": 1.0, "log_every": 50}}
    assert config_differences(before, now) == [("model.moe.top_k", 2, 1)]


def test_stage_config_round_trips_through_json(tmp_path):
    stage = tiny_stage("/data", "/run", num_workers=2, expert_parallel_size=2)
    again = StageConfig.from_dict(json.loads(json.dumps(stage.to_dict())))
    assert again == stage


def test_progress_line():
    metrics = {"step": 40, "train/loss": 5.4123, "val/loss": 5.5, "train/lr": 2.8e-3, "perf/tokens_per_s": 12300.0,
               "perf/mfu": 0.012, "perf/data_wait_fraction": 0.004}
    line = format_progress(metrics, 200, checkpoint=True)
    assert line == ("step 40/200 (20%) loss 5.412 val 5.500 lr 2.80e-03 | 12.3k tok/s, MFU 1.2%, "
                    "data wait 0.4% [checkpoint]")
    assert math.isfinite(len(line))


class _FailingTrainer:
    def __init__(self, error):
        self.error = error

    def fit(self):
        raise self.error


def test_a_worker_failure_becomes_one_readable_error():
    import ray.exceptions
    import ray.train

    from moe_platform.train import TrainingError
    from moe_platform.train.checkpointing import CheckpointError
    from moe_platform.train.trainer import fit_or_explain

    boom = RuntimeError("Traceback (most recent call last):\n  ...\nValueError: the loss is nan at step 7")
    with pytest.raises(TrainingError, match="^training failed on worker 1: RuntimeError: ValueError: the loss is nan"):
        fit_or_explain(_FailingTrainer(ray.train.WorkerGroupError("failed", {1: boom, 3: RuntimeError("x")})))
    ours = CheckpointError("checkpoint /x is incomplete: rank 1 of 2 never finished writing its part")
    with pytest.raises(CheckpointError, match="^checkpoint /x is incomplete"):
        fit_or_explain(_FailingTrainer(ray.train.WorkerGroupError("failed", {0: ours})))
