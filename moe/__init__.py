"""moe: a Mixture-of-Experts decoder-only transformer in PyTorch + DeepSpeed.

Never imports ray or hydra. See moe/README.md.
"""

from .config import ModelConfig, MoEConfig
from .export import load_export, load_export_config, save_export
from .model import MoETransformer
from .parallel import optimizer_param_groups
from .peft import PeftConfig, adapter_state_dict, apply_peft, load_adapter, merge_adapter, save_adapter

__all__ = [
    "ModelConfig",
    "MoEConfig",
    "MoETransformer",
    "PeftConfig",
    "adapter_state_dict",
    "apply_peft",
    "load_adapter",
    "load_export",
    "load_export_config",
    "merge_adapter",
    "optimizer_param_groups",
    "save_adapter",
    "save_export",
]
