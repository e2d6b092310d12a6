"""moe: a Mixture-of-Experts decoder-only transformer in PyTorch + DeepSpeed.

Never imports ray or hydra. See moe/README.md.
"""

from .config import ModelConfig, MoEConfig
from .export import load_export, load_export_config, save_export
from .model import MoETransformer
from .parallel import optimizer_param_groups

__all__ = [
    "ModelConfig",
    "MoEConfig",
    "MoETransformer",
    "load_export",
    "load_export_config",
    "optimizer_param_groups",
    "save_export",
]
