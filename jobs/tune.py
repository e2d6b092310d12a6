"""Hyperparameter search: a Ray Tune sweep of small pretraining runs, ASHA early stopping, dashboards.

    python jobs/tune.py experiment=smoke
    python jobs/tune.py tune.num_samples=16 tune.grace_period=50 trainer.max_steps=400 \
        'tune.space=[{key: trainer.lr, kind: loguniform, low: 1e-4, high: 1e-2},
                     {key: model.moe.top_k, kind: choice, values: [1, 2]}]'

Every trial is `jobs/pretrain.py` with the same config plus the trial's values
(set the small scale with the usual trainer.* overrides). Interrupted? Run the
same command again: finished trials are kept, unfinished ones resume. The best
trial's config lands in <tune.output_dir>/best/config.yaml, ready for
`jobs/pretrain.py --config-path <that dir> --config-name config`; see
platform/moe_platform/tune/README.md.
"""
from __future__ import annotations

import math
import os
import sys

from omegaconf import OmegaConf

from jobs.common import ConfigError, init_ray, job
from jobs.config import RootConfig
from jobs.pretrain import pretrain_stage
from moe_platform.data import DataError

# Hydra's own settings, as in jobs/conf/config.yaml: a best/config.yaml behaves like the tree it came from.
BEST_CONFIG_HEADER = {
    "defaults": ["root_schema", "_self_", {"override hydra/job_logging": "none"},
                 {"override hydra/hydra_logging": "none"}],
    "hydra": {"run": {"dir": "."}, "output_subdir": None, "job": {"chdir": False}},
}


def write_best_config(config: RootConfig, params: dict, path: str) -> str:
    """The whole config tree with the best trial's values: a Hydra primary config for jobs/pretrain.py."""
    tree = OmegaConf.structured(config)
    for key, value in params.items():
        OmegaConf.update(tree, key, value, merge=False)
    document = OmegaConf.merge(OmegaConf.create(BEST_CONFIG_HEADER), OmegaConf.to_container(tree))
    with open(path, "w") as fh:
        fh.write("# The best trial of a jobs/tune.py sweep. Continue it at full scale with\n"
                 f"#   python jobs/pretrain.py --config-path {os.path.dirname(path)} --config-name config "
                 "trainer.max_steps=... run.output_dir=...\n")
        fh.write(OmegaConf.to_yaml(document))
    return path


@job
def main(config: RootConfig) -> None:
    from moe_platform.tune import hydra_override, prepare_sweep, run_sweep  # Ray: only once the config is valid

    try:
        plan = prepare_sweep(pretrain_stage(config), config.tune)  # a ConfigError names the key
    except DataError as exc:  # the dataset a sweep names is part of its config
        raise ConfigError(str(exc)) from None
    # A local Ray gets enough logical CPUs for the concurrent trials plus Ray Data's reads (CPU is
    # a scheduling token here; fractional workers run one torch thread each); a given cluster keeps its own.
    init_ray(num_cpus=max(os.cpu_count() or 1, math.ceil(plan.cpus_needed)))
    result = run_sweep(plan)
    print(result.summary())
    if not result.complete:
        sys.exit(130)  # interrupted (Ctrl-C): the same command resumes it
    if result.best is None:
        print("no trial reported tune.metric: nothing to continue from", file=sys.stderr)
        sys.exit(1)
    best_config = write_best_config(config, result.best.params, os.path.join(result.best_dir, "config.yaml"))
    overrides = " ".join(hydra_override(key, value) for key, value in result.best.params.items())
    print(f"best config: {best_config}")
    print(f"continue at full scale: python jobs/pretrain.py --config-path {result.best_dir} --config-name config "
          f"run.output_dir={os.path.join(result.best_dir, 'pretrain')} trainer.max_steps=<full length>")
    print(f"  (or add to your own pretrain command: {overrides})")
    if result.best_export_dir:
        print(f"serve the best trial: python jobs/serve.py serve.export_dir={result.best_export_dir}")


if __name__ == "__main__":
    main()
