"""The search space against the pretraining config: keys, types, trial configs, pre-flight. No Ray."""
from __future__ import annotations

import dataclasses

import pytest
from testkit.datasets import write_dataset
from testkit.training import sweep_base_stage

from moe_platform.tune import ParamSpec, TuneConfig, TuneConfigError, prepare_sweep
from moe_platform.tune.space import apply_params, field_type, hydra_override, param_space, typed_params


@pytest.fixture(scope="module")
def base_stage(tmp_path_factory):
    dataset = write_dataset(str(tmp_path_factory.mktemp("tune-space") / "dataset"))
    return sweep_base_stage(dataset)


def tune_config(*specs: ParamSpec, tmp_dir: str = "unused", **settings) -> TuneConfig:
    return TuneConfig(space=list(specs), output_dir=tmp_dir, grace_period=4, **settings)


def test_field_types_follow_the_dataclasses():
    assert field_type("trainer.lr") is float
    assert field_type("model.moe.top_k") is int
    assert field_type("model.moe.backend") is str
    assert field_type("model.tie_embeddings") is bool


def test_apply_params_rebuilds_a_checked_stage(base_stage):
    stage = apply_params(base_stage, {"trainer.lr": 1, "model.moe.top_k": 1, "model.moe.backend": "deepspeed"})
    assert stage.trainer.lr == 1.0 and isinstance(stage.trainer.lr, float)  # an int is a valid float
    assert stage.model.moe.top_k == 1 and stage.model.moe.backend == "deepspeed"
    assert base_stage.model.moe.top_k == 2  # the base is untouched
    with pytest.raises(TuneConfigError, match=r"model.moe.top_k=8 is larger than model.moe.num_experts=4"):
        apply_params(base_stage, {"model.moe.top_k": 8})


def test_typed_params_turns_numpy_scalars_into_python():
    import numpy as np

    values = typed_params({"trainer.lr": np.float64(0.01), "model.moe.top_k": np.int64(2)})
    assert values == {"trainer.lr": 0.01, "model.moe.top_k": 2}
    assert type(values["model.moe.top_k"]) is int


def test_good_space_passes_and_sets_max_t(base_stage, tmp_path):
    plan = prepare_sweep(base_stage, tune_config(
        ParamSpec(key="trainer.lr", kind="loguniform", low=1e-4, high=1e-2),
        ParamSpec(key="model.moe.top_k", kind="choice", values=[1, 2]),
        ParamSpec(key="trainer.max_steps", kind="randint", low=8, high=16),
        tmp_dir=str(tmp_path / "sweep"),
    ))
    assert plan.max_t == 16  # the longest trial
    assert plan.trial_cpus == pytest.approx(0.51)  # one worker of 0.5 CPU + the Tune trainable
    assert plan.cpus_needed == pytest.approx(2 * 0.51 + 1)  # two at a time + a CPU for Ray Data
    assert plan.tune.output_dir == str(tmp_path / "sweep")
    assert plan.base.dataset_dir == base_stage.dataset_dir


@pytest.mark.parametrize(
    "specs, message",
    [
        ([ParamSpec(key="model.moe.topk", kind="choice", values=[1])],
         "tune.space: model.moe.topk is not a config key (model.moe has: num_experts, top_k,"),
        ([ParamSpec(key="trainer.learning_rate", kind="uniform", low=0.1, high=0.2)],
         "tune.space: trainer.learning_rate is not a config key"),
        ([ParamSpec(key="data.seq_len", kind="choice", values=[16])], "tune.space: data.seq_len cannot be searched"),
        ([ParamSpec(key="run.output_dir", kind="choice", values=["x"])],
         "tune.space: run.output_dir cannot be searched"),
        ([ParamSpec(key="model.moe", kind="choice", values=[1])], "tune.space: model.moe is a config section"),
        ([ParamSpec(key="model.moe.top_k", kind="uniform", low=1, high=2)],
         "tune.space: model.moe.top_k takes int values, got 1.0"),
        ([ParamSpec(key="trainer.lr", kind="choice", values=["fast"])],
         "tune.space: trainer.lr takes float values, got 'fast'"),
        ([ParamSpec(key="trainer.lr", kind="choice", values=[None])], "tune.space: trainer.lr cannot be null"),
        ([ParamSpec(key="model.moe.top_k", kind="choice", values=[1, 8])],
         "model.moe.top_k=8 is larger than model.moe.num_experts=4. (trial values model.moe.top_k=8)"),
        ([ParamSpec(key="model.moe.backend", kind="choice", values=["native", "triton"])],
         "model.moe.backend='triton' is not one of native, deepspeed"),
        ([ParamSpec(key="trainer.micro_batch_size", kind="choice", values=[8, 4096])],
         "too few for one step of trainer.micro_batch_size=4096"),
        ([ParamSpec(key="model.vocab_size", kind="choice", values=[64, 32])],
         "model.vocab_size=32 is smaller than the vocabulary of the dataset"),
        ([ParamSpec(key="trainer.eval_every", kind="choice", values=[4, 8, 12])],
         "trainer.checkpoint_every=12 must be a multiple of trainer.eval_every=8 in a sweep"),
        ([ParamSpec(key="trainer.eval_every", kind="choice", values=[0])],
         "trainer.eval_every=0 validates only at the end"),
    ],
    ids=["unknown-moe-key", "unknown-trainer-key", "data-section", "run-section", "section-not-value",
         "float-for-int", "string-for-float", "null-for-required", "model-rejects", "bad-choice-value",
         "batch-too-big-for-data", "vocab-below-dataset", "checkpoint-between-evals", "no-eval"],
)
def test_bad_space_fails_before_any_trial_naming_the_key(base_stage, specs, message):
    with pytest.raises(TuneConfigError) as info:
        prepare_sweep(base_stage, tune_config(*specs))
    assert message in str(info.value)


def test_combinations_are_checked_together(base_stage):
    """Each value alone is fine; top_k=4 with num_experts=2 is not."""
    specs = [ParamSpec(key="model.moe.num_experts", kind="choice", values=[2, 4]),
             ParamSpec(key="model.moe.top_k", kind="grid", values=[1, 4])]
    with pytest.raises(TuneConfigError) as info:
        prepare_sweep(base_stage, tune_config(*specs))
    assert "model.moe.top_k=4 is larger than model.moe.num_experts=2" in str(info.value)
    assert "trial values model.moe.num_experts=2, model.moe.top_k=4" in str(info.value)


def test_trials_report_at_every_validation(base_stage):
    from moe_platform.tune.sweep import trial_stage

    stage = dataclasses.replace(base_stage, trainer=dataclasses.replace(base_stage.trainer, report_every=10))
    trial = trial_stage(stage, {"trainer.lr": 0.02}, "/runs/t1")
    assert trial.trainer.report_every == trial.trainer.eval_every == 4
    assert trial.trainer.lr == 0.02 and trial.run.output_dir == "/runs/t1" and trial.run.export is False


def test_asha_needs_a_report_before_the_end(base_stage):
    stage = dataclasses.replace(base_stage, trainer=dataclasses.replace(base_stage.trainer, eval_every=12))
    with pytest.raises(TuneConfigError, match="trials report first at step 12 .* ASHA could stop none"):
        prepare_sweep(stage, tune_config(ParamSpec(key="trainer.lr", kind="choice", values=[0.01])))
    prepare_sweep(stage, tune_config(ParamSpec(key="trainer.lr", kind="choice", values=[0.01]), scheduler="fifo"))


def test_concurrency_leaves_ray_data_a_cpu(base_stage, monkeypatch):
    import ray

    from moe_platform.tune.sweep import fit_concurrency

    plan = prepare_sweep(base_stage, tune_config(ParamSpec(key="trainer.num_workers", kind="choice", values=[1, 2]),
                                                 max_concurrent_trials=3))
    assert plan.trial_cpus == pytest.approx(1.01)  # the hungriest trial: 2 workers
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 8.0})
    assert fit_concurrency(plan) == 3
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    assert fit_concurrency(plan) == 1  # 2 trials would leave 2 - 2.02 CPUs: Ray Data could never read


def test_grace_period_longer_than_trials_is_refused(base_stage):
    with pytest.raises(TuneConfigError, match="tune.grace_period=50 is longer than the trials"):
        prepare_sweep(base_stage, TuneConfig(space=[ParamSpec(key="trainer.lr", kind="choice", values=[0.01])],
                                             grace_period=50))


def test_validation_metric_needs_a_validation_split(base_stage):
    stage = dataclasses.replace(base_stage, trainer=dataclasses.replace(base_stage.trainer, micro_batch_size=128))
    with pytest.raises(TuneConfigError, match="tune.metric=val/loss needs a validation split"):
        prepare_sweep(stage, tune_config(ParamSpec(key="trainer.lr", kind="choice", values=[0.01])))
    # A training metric needs none.
    prepare_sweep(stage, tune_config(ParamSpec(key="trainer.lr", kind="choice", values=[0.01]), metric="train/loss"))


def test_tune_domains():
    from ray.tune.search.sample import Categorical, Float, Integer

    space = param_space(TuneConfig(space=[
        ParamSpec(key="trainer.lr", kind="loguniform", low=1e-4, high=1e-2),
        ParamSpec(key="model.moe.z_loss_coef", kind="uniform", low=0.0, high=0.01),
        ParamSpec(key="model.moe.top_k", kind="choice", values=[1, 2]),
        ParamSpec(key="model.moe.num_experts", kind="grid", values=[4, 8]),
        ParamSpec(key="trainer.max_steps", kind="randint", low=8, high=16),
    ]))
    assert isinstance(space["trainer.lr"], Float) and space["trainer.lr"].lower == 1e-4
    assert isinstance(space["model.moe.z_loss_coef"], Float)
    assert isinstance(space["model.moe.top_k"], Categorical) and space["model.moe.top_k"].categories == [1, 2]
    assert space["model.moe.num_experts"] == {"grid_search": [4, 8]}
    # Inclusive here, exclusive in Tune.
    assert isinstance(space["trainer.max_steps"], Integer) and space["trainer.max_steps"].upper == 17


def test_hydra_override_text():
    assert hydra_override("trainer.lr", 0.0031) == "trainer.lr=0.0031"
    assert hydra_override("model.moe.top_k", 2) == "model.moe.top_k=2"
    assert hydra_override("model.moe.backend", "native") == "model.moe.backend='native'"
    assert hydra_override("model.tie_embeddings", False) == "model.tie_embeddings=false"
    assert hydra_override("trainer.max_tokens", None) == "trainer.max_tokens=null"


def test_a_sweep_from_before_a_new_config_key_resumes_at_its_default(base_stage, tmp_path):
    import json

    from moe_platform.tune.sweep import SWEEP_FILE, check_sweep_dir, sweep_fingerprint

    plan = prepare_sweep(base_stage, tune_config(ParamSpec(key="trainer.lr", kind="choice", values=[0.01, 0.1]),
                                                 scheduler="fifo", tmp_dir=str(tmp_path / "sweep")))
    saved = sweep_fingerprint(plan)
    del saved["base"]["trainer"]["expert_lr_scale"]  # as a version before that key wrote it
    (tmp_path / "sweep").mkdir()
    (tmp_path / "sweep" / SWEEP_FILE).write_text(json.dumps(saved))
    check_sweep_dir(plan)  # resumes
    changed = dataclasses.replace(plan, base=dataclasses.replace(
        plan.base, trainer=dataclasses.replace(plan.base.trainer, expert_lr_scale=3.0)))
    with pytest.raises(TuneConfigError, match=r"trainer.expert_lr_scale=None there, 3.0 now"):
        check_sweep_dir(changed)
