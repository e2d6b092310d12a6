"""moe_platform.tune: Ray Tune sweeps whose trials are pretraining runs, with ASHA early stopping.

    from moe_platform.tune import TuneConfig, ParamSpec, prepare_sweep, run_sweep
    plan = prepare_sweep(base_stage, TuneConfig(space=[ParamSpec(key="trainer.lr", kind="loguniform",
                                                                 low=1e-4, high=1e-2)]))
    result = run_sweep(plan)          # Ray initialised; returns a SweepResult
    print(result.summary())

`prepare_sweep` checks everything (keys, types, every value combination against the
model and trainer configs and the dataset) without Ray; see README.md here for the
config, the output layout and the dashboards.
"""
from moe_platform.tune.config import ParamSpec, TuneConfig, TuneConfigError


def __getattr__(name: str):
    # Ray, torch and the trainer load on first use, so `jobs/config.py` imports the dataclasses cheaply.
    lazy = {
        "prepare_sweep": "moe_platform.tune.sweep",
        "run_sweep": "moe_platform.tune.sweep",
        "sweep": "moe_platform.tune.sweep",
        "SweepPlan": "moe_platform.tune.sweep",
        "SweepResult": "moe_platform.tune.sweep",
        "apply_params": "moe_platform.tune.space",
        "hydra_override": "moe_platform.tune.space",
    }
    if name in lazy:
        import importlib

        return getattr(importlib.import_module(lazy[name]), name)
    raise AttributeError(f"module 'moe_platform.tune' has no attribute {name!r}")


__all__ = [
    "ParamSpec",
    "SweepPlan",
    "SweepResult",
    "TuneConfig",
    "TuneConfigError",
    "apply_params",
    "hydra_override",
    "prepare_sweep",
    "run_sweep",
    "sweep",
]
