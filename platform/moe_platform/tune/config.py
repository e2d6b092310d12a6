"""Typed config of a sweep: the `tune` section (`TuneConfig`) and its search space (`ParamSpec`).

The search space is a list of `ParamSpec`, one per searched config key:

    tune:
      space:
        - {key: trainer.lr, kind: loguniform, low: 1.0e-4, high: 1.0e-2}
        - {key: model.moe.top_k, kind: choice, values: [1, 2]}
        - {key: model.moe.num_experts, kind: grid, values: [4, 8]}

A list, not a dict keyed by the dotted name: Hydra cannot add a key containing
dots to a typed dict from the command line, while a whole list can be replaced
(`'tune.space=[{key: trainer.lr, kind: uniform, low: 0.001, high: 0.01}]'`) and
one entry edited (`tune.space.0.high=0.02`).

Each `__post_init__` checks what a spec or the section can check alone and names
the key. Whether a key exists, has the right type, and gives a config the model
accepts needs the base stage: `moe_platform.tune.space.check_space`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, List, Optional

from moe.configs import ConfigError, require

# Sampled: choice (uniform over values), uniform / loguniform (floats in [low, high]),
# randint (integers low..high, both included). grid: every value, in every sample.
KINDS = ("choice", "grid", "uniform", "loguniform", "randint")
DISCRETE_KINDS = ("choice", "grid")
RANGE_KINDS = ("uniform", "loguniform", "randint")
SCHEDULERS = ("asha", "fifo")
MODES = ("min", "max")
# What every report of the pretraining loop carries (moe_platform.train.metrics): a metric
# missing from a report makes Tune fail the trial, so only these can rank trials.
METRICS = ("val/loss", "val/perplexity", "train/loss", "train/lm_loss")


# The one config error (moe.configs), under the name the tuning code has always raised.
TuneConfigError = ConfigError


@dataclass
class ParamSpec:
    """One searched key: `key` is a dotted config key (model.* or trainer.*), `kind` its distribution."""

    key: str = ""
    kind: str = "choice"
    values: List[Any] = field(default_factory=list)  # choice / grid
    low: Optional[float] = None  # uniform / loguniform / randint
    high: Optional[float] = None

    def __post_init__(self) -> None:
        require(bool(self.key) and " " not in self.key,
                 f"tune.space: an entry has an empty or invalid key {self.key!r}")
        name = f"tune.space entry {self.key}"
        require(self.kind in KINDS, f"{name}: kind={self.kind!r} is not one of {', '.join(KINDS)}")
        if self.kind in DISCRETE_KINDS:
            self._check_discrete(name)
        else:
            self._check_range(name)

    def _check_discrete(self, name: str) -> None:
        require(self.low is None and self.high is None, f"{name}: kind={self.kind} takes values, not low/high")
        require(len(self.values) > 0, f"{name}: kind={self.kind} needs a non-empty values list")
        for value in self.values:
            require(
                value is None or isinstance(value, (bool, int, float, str)),
                f"{name}: values must be plain scalars (number, string, bool or null), got {value!r}",
            )

    def _check_range(self, name: str) -> None:
        require(not self.values, f"{name}: kind={self.kind} takes low/high, not values")
        require(self.low is not None and self.high is not None, f"{name}: kind={self.kind} needs both low and high")
        assert self.low is not None and self.high is not None
        require(math.isfinite(self.low) and math.isfinite(self.high), f"{name}: low and high must be finite numbers")
        if self.kind == "randint":
            require(
                float(self.low).is_integer() and float(self.high).is_integer(),
                f"{name}: kind=randint needs integer low/high, got low={self.low}, high={self.high}",
            )
            require(self.low <= self.high, f"{name}: low={self.low} must be <= high={self.high}")
        else:
            require(self.low < self.high, f"{name}: low={self.low} must be < high={self.high}")
        if self.kind == "loguniform":
            require(self.low > 0, f"{name}: kind=loguniform needs low > 0, got low={self.low}")

    def candidates(self) -> list[Any]:
        """Values that stand for the whole spec in pre-flight checks: every discrete value, or the range's ends."""
        if self.kind in DISCRETE_KINDS:
            return list(self.values)
        if self.kind == "randint":
            return sorted({int(self.low), int(self.high)})
        return [float(self.low), float(self.high)]


def _default_space() -> List[ParamSpec]:
    return [
        ParamSpec(key="trainer.lr", kind="loguniform", low=3e-4, high=1e-2),
        ParamSpec(key="model.moe.balance_loss_coef", kind="loguniform", low=1e-3, high=1e-1),
    ]


@dataclass
class TuneConfig:
    """A Ray Tune search over pretraining runs (`jobs/tune.py`); see moe_platform/tune/README.md.

    Resources per trial are the trainer section's: trainer.num_workers Ray Train workers of
    trainer.cpus_per_worker CPUs (+1 GPU each with trainer.use_gpu). Steps are optimizer steps.
    """

    space: List[ParamSpec] = field(default_factory=_default_space)
    # Samples drawn from the space; with grid entries, every grid point is repeated num_samples times.
    num_samples: int = 8
    max_concurrent_trials: int = 2
    metric: str = "val/loss"
    mode: str = "min"
    # asha: stop trials whose metric trails the others at steps grace_period * reduction_factor^k;
    # fifo: run every trial to its end.
    scheduler: str = "asha"
    grace_period: int = 100
    reduction_factor: float = 2.0
    # Steps after which ASHA stops any trial; null = the longest trial's trainer length.
    max_t: Optional[int] = None
    seed: int = 0  # seeds the random sampling of the space
    # Everything of the sweep: Tune's experiment, trial run dirs, TensorBoard, results, best/.
    output_dir: str = "outputs/tune"
    # On resuming an interrupted sweep: run errored trials again (from their last checkpoint).
    resume_errored: bool = True

    def __post_init__(self) -> None:
        require(self.num_samples >= 1, f"tune.num_samples must be >= 1, got {self.num_samples}")
        require(self.max_concurrent_trials >= 1,
                 f"tune.max_concurrent_trials must be >= 1, got {self.max_concurrent_trials}")
        require(self.metric in METRICS, f"tune.metric={self.metric!r} is not one of {', '.join(METRICS)}")
        require(self.mode in MODES, f"tune.mode={self.mode!r} is not one of {', '.join(MODES)}")
        require(self.scheduler in SCHEDULERS,
                 f"tune.scheduler={self.scheduler!r} is not one of {', '.join(SCHEDULERS)}")
        require(self.grace_period >= 1, f"tune.grace_period must be >= 1 step, got {self.grace_period}")
        require(self.reduction_factor > 1, f"tune.reduction_factor must be > 1, got {self.reduction_factor}")
        require(self.max_t is None or self.max_t >= 1, f"tune.max_t must be >= 1 step or null, got {self.max_t}")
        require(
            self.max_t is None or self.scheduler != "asha" or self.max_t >= self.grace_period,
            f"tune.max_t={self.max_t} must be >= tune.grace_period={self.grace_period}",
        )
        require(bool(self.output_dir), "tune.output_dir must not be empty")
        require(len(self.space) > 0, "tune.space is empty: give at least one config key to search")
        keys = [spec.key for spec in self.space]
        duplicates = sorted({key for key in keys if keys.count(key) > 1})
        if duplicates:
            raise TuneConfigError(f"tune.space lists {duplicates[0]} more than once")
