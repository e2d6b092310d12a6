"""moe: a Mixture-of-Experts decoder-only transformer in PyTorch + DeepSpeed.

Never imports ray or hydra. See moe/README.md.

The names below load on first use (PEP 562): `from moe import ModelConfig` imports the
torch-free config module only, so a job checks its config before it pays for torch.
"""
import importlib

_EXPORTS = {
    "ModelConfig": ".config",
    "MoEConfig": ".config",
    "PeftConfig": ".peft_config",
    "MoETransformer": ".model",
    "load_export": ".export",
    "load_export_config": ".export",
    "save_export": ".export",
    "optimizer_param_groups": ".parallel",
    "adapter_state_dict": ".peft",
    "apply_peft": ".peft",
    "load_adapter": ".peft",
    "merge_adapter": ".peft",
    "save_adapter": ".peft",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'moe' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
