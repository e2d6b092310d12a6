"""The `tune` section alone: each bad spec or setting fails in its dataclass, naming the key. No Ray."""
from __future__ import annotations

import pytest

from moe_platform.tune import ParamSpec, TuneConfig, TuneConfigError


@pytest.mark.parametrize(
    "spec, message",
    [
        (dict(kind="choice", values=[]), "tune.space entry trainer.lr: kind=choice needs a non-empty values list"),
        (dict(kind="grid"), "tune.space entry trainer.lr: kind=grid needs a non-empty values list"),
        (dict(kind="uniform", low=0.2, high=0.1), "tune.space entry trainer.lr: low=0.2 must be < high=0.1"),
        (dict(kind="uniform", low=0.1, high=0.1), "low=0.1 must be < high=0.1"),
        (dict(kind="loguniform", low=0.0, high=0.1), "kind=loguniform needs low > 0, got low=0.0"),
        (dict(kind="loguniform", low=-1.0, high=0.1), "kind=loguniform needs low > 0"),
        (dict(kind="uniform", low=0.1), "kind=uniform needs both low and high"),
        (dict(kind="randint", low=1.5, high=4), "kind=randint needs integer low/high"),
        (dict(kind="randint", low=4, high=2), "low=4 must be <= high=2"),
        (dict(kind="choice", values=[1], low=0.1), "kind=choice takes values, not low/high"),
        (dict(kind="uniform", values=[1], low=0.1, high=0.2), "kind=uniform takes low/high, not values"),
        (dict(kind="normal", values=[1]), "kind='normal' is not one of choice, grid, uniform, loguniform, randint"),
        (dict(kind="choice", values=[[1, 2]]), "values must be plain scalars"),
        (dict(kind="uniform", low=float("nan"), high=1.0), "low and high must be finite numbers"),
    ],
    ids=["empty-choice", "empty-grid", "low-above-high", "low-equals-high", "loguniform-zero",
         "loguniform-negative", "missing-high", "randint-fraction", "randint-reversed", "choice-with-range",
         "range-with-values", "unknown-kind", "nested-value", "nan"],
)
def test_bad_spec_fails_naming_the_key(spec, message):
    with pytest.raises(TuneConfigError, match="tune.space") as info:
        ParamSpec(key="trainer.lr", **spec)
    assert message in str(info.value)


def test_good_specs_and_their_candidates():
    assert ParamSpec(key="model.moe.top_k", kind="choice", values=[1, 2]).candidates() == [1, 2]
    assert ParamSpec(key="trainer.lr", kind="loguniform", low=1e-4, high=1e-2).candidates() == [1e-4, 1e-2]
    # randint includes high; candidates are integers even when YAML gave floats.
    assert ParamSpec(key="trainer.max_steps", kind="randint", low=4.0, high=8.0).candidates() == [4, 8]
    assert ParamSpec(key="trainer.max_steps", kind="randint", low=4, high=4).candidates() == [4]


def test_empty_key_is_refused():
    with pytest.raises(TuneConfigError, match="empty or invalid key"):
        ParamSpec(key="", kind="choice", values=[1])


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(space=[]), "tune.space is empty"),
        (dict(num_samples=0), "tune.num_samples must be >= 1"),
        (dict(max_concurrent_trials=0), "tune.max_concurrent_trials must be >= 1"),
        (dict(metric="accuracy"), "tune.metric='accuracy' is not one of"),
        (dict(mode="lowest"), "tune.mode='lowest' is not one of min, max"),
        (dict(scheduler="pbt"), "tune.scheduler='pbt' is not one of asha, fifo"),
        (dict(grace_period=0), "tune.grace_period must be >= 1"),
        (dict(reduction_factor=1.0), "tune.reduction_factor must be > 1"),
        (dict(max_t=2, grace_period=4), "tune.max_t=2 must be >= tune.grace_period=4"),
        (dict(output_dir=""), "tune.output_dir must not be empty"),
    ],
    ids=["empty-space", "samples", "concurrency", "metric", "mode", "scheduler", "grace", "reduction", "max-t",
         "output-dir"],
)
def test_bad_tune_section_fails_naming_the_key(settings, message):
    with pytest.raises(TuneConfigError) as info:
        TuneConfig(**settings)
    assert message in str(info.value)


def test_duplicate_key_is_refused():
    spec = ParamSpec(key="trainer.lr", kind="choice", values=[0.1])
    with pytest.raises(TuneConfigError, match="tune.space lists trainer.lr more than once"):
        TuneConfig(space=[spec, spec])


def test_defaults_are_valid():
    config = TuneConfig()
    assert [spec.key for spec in config.space] == ["trainer.lr", "model.moe.balance_loss_coef"]
    assert config.scheduler == "asha" and config.metric == "val/loss"
