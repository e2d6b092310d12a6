"""What every job shares: the Hydra entry point, the typed root config, Ray start-up.

A job file is thin: it declares `@job` on a function that takes the typed
`RootConfig` (never a DictConfig) and calls into moe_platform. This module
turns config mistakes into one clear sentence instead of a traceback.
"""
from __future__ import annotations

import functools
import logging
import os
import sys
from typing import Callable

import hydra
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from jobs.config import RootConfig, register_configs
from moe.configs import ConfigError  # the one config error: a job raises it anywhere, `job` prints it

log = logging.getLogger("jobs")




def to_root_config(cfg: DictConfig) -> RootConfig:
    """DictConfig -> RootConfig once, at the entry point; dataclass validation runs here."""
    try:
        config = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as exc:
        # OmegaConf wraps errors raised in a dataclass __post_init__; surface the original sentence.
        cause = exc.__cause__ or exc
        raise ConfigError(_first_line(cause)) from None
    except (ValueError, TypeError) as exc:
        raise ConfigError(_first_line(exc)) from None
    assert isinstance(config, RootConfig)
    return config


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def check_overrides(overrides: list[str]) -> None:
    """Compose the config tree with `overrides`; raise ConfigError naming the bad key."""
    from hydra import compose, initialize_config_module
    from hydra.errors import HydraException

    register_configs()
    try:
        with initialize_config_module(config_module="jobs.conf", version_base="1.3"):
            compose(config_name="config", overrides=overrides)
    except (HydraException, OmegaConfBaseException) as exc:
        raise ConfigError(_describe_hydra_error(exc)) from None


def _describe_hydra_error(exc: BaseException) -> str:
    """One line from Hydra's error chain: `<full.key>: <what is wrong>` where a key is known."""
    for err in _error_chain(exc):
        full_key = getattr(err, "full_key", None)
        if isinstance(err, OmegaConfBaseException) and full_key:
            return f"{full_key}: {_first_line(err)}"
    return _first_line(exc)


def _error_chain(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def job(fn: Callable[[RootConfig], object] | None = None, *, defaults: tuple[str, ...] = ()):
    """Decorate a job's main: Hydra parses overrides, `fn` gets the validated RootConfig.

    `defaults`: overrides this job applies before the user's (a finetune job's own run
    directory, learning rate, ...), so the user's win. A ConfigError - from the config tree
    or raised by the job itself - exits 2 with `config error: <sentence>`.
    """
    if fn is None:
        return lambda function: job(function, defaults=defaults)
    register_configs()

    @hydra.main(version_base="1.3", config_path="conf", config_name="config")
    def _hydra_entry(cfg: DictConfig) -> None:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        try:
            fn(to_root_config(cfg))
        except ConfigError as exc:
            exit_config_error(exc)

    @functools.wraps(fn)
    def main() -> None:
        sys.argv[1:1] = list(defaults)
        overrides = sys.argv[1:]
        # Hydra reports a bad override in a multi-line block; compose once ourselves so the
        # user gets one line naming the key. Hydra's own flags (--help, --cfg, -m) go straight on.
        if overrides and not any(arg.startswith("-") for arg in overrides):
            try:
                check_overrides(overrides)
            except ConfigError as exc:
                exit_config_error(exc)
        _hydra_entry()

    return main


def exit_config_error(exc: ConfigError) -> None:
    print(f"config error: {exc}", file=sys.stderr)
    sys.exit(2)


def init_ray(num_cpus: int | None = None) -> None:
    """Connect to the cluster in RAY_ADDRESS (or a `ray start` one), else start a local Ray."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)
    else:
        # No cluster given: a local instance sized to this machine. The dashboard stays on:
        # without it Tune leaks placement groups of trials that ASHA stops (docs/ray-notes.md, Tune over Train V2).
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=True, log_to_driver=True)


def compose_config(overrides: list[str]) -> RootConfig:
    """The typed config tree for these overrides (a pipeline composes one per stage)."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException

    register_configs()
    try:
        if GlobalHydra.instance().is_initialized():  # inside a @job: Hydra already knows jobs/conf
            return to_root_config(compose(config_name="config", overrides=overrides))
        with initialize_config_module(config_module="jobs.conf", version_base="1.3"):
            return to_root_config(compose(config_name="config", overrides=overrides))
    except (HydraException, OmegaConfBaseException) as exc:
        raise ConfigError(_describe_hydra_error(exc)) from None


def command_line_overrides() -> list[str]:
    """The overrides this job was started with (its `defaults` first)."""
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task)


def model_from_export(config: RootConfig, export_dir: str, overrides: list[str]):
    """The model section of a stage that starts from an export: the export's architecture, with
    the `model.*` keys given explicitly in `overrides` (e.g. model.moe.capacity_factor) on top."""
    import dataclasses

    from moe import ModelConfig
    from moe.export import check_export

    try:
        exported = dataclasses.asdict(check_export(export_dir, "init.export_dir", need_tokenizer=False))
    except ValueError as exc:
        raise ConfigError(_first_line(exc)) from None
    ours = dataclasses.asdict(config.model)
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        if not key.startswith("model."):
            continue
        path = key.split(".")[1:]
        source, target = ours, exported
        for part in path[:-1]:
            source, target = source[part], target[part]
        target[path[-1]] = source[path[-1]]
    try:
        return ModelConfig.from_dict(exported)
    except ValueError as exc:
        raise ConfigError(_first_line(exc)) from None
