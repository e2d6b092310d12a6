"""The model on a worker: build it, initialise it from an export, write its export.

Exports (moe/export.py) hold the canonical (expert-parallel- and backend-independent)
state dict of moe/state.py in a Hugging Face layout, so a model trained at EP=2 loads in one process, and an
export can start a later stage at any EP size.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from moe import ModelConfig, MoETransformer, save_export
from moe.export import ADAPTER_DIR, load_export_state


def build_model(config: ModelConfig, *, expert_parallel_size: int, device: torch.device) -> MoETransformer:
    """Weights come from the global torch RNG in canonical order: a seed gives the same model at any EP."""
    model = MoETransformer(config, expert_parallel_size=expert_parallel_size)
    return model.to(device)


def load_export_weights(model: MoETransformer, export_dir: str) -> None:
    """init.export_dir: start from an export's weights (each rank keeps its slice of the experts)."""
    state, exported = load_export_state(export_dir)
    if exported.moe.num_experts != model.config.moe.num_experts or exported.d_model != model.config.d_model:
        # plan.check_init_export already compared the architectures on the driver; this guards direct use.
        raise ValueError(f"the export {export_dir} has a different architecture than the model being trained")
    model.load_canonical_state_dict(state)


def write_model_export(model: MoETransformer, directory: str, *, tokenizer_path: str, rank: int,
                       peft=None, base_export_dir: Optional[str] = None) -> None:
    """Collective: every rank joins the expert all-gather; global rank 0 writes the files.

    A LoRA stage writes the merged model (what serving and later stages load) and, in
    `adapter/`, the adapters alone with the base export they apply to.
    """
    save_export(model, directory, tokenizer_file=tokenizer_path if rank == 0 else None)
    if peft is not None and peft.lora_rank > 0:
        from moe.peft import save_adapter

        save_adapter(model, os.path.join(directory, ADAPTER_DIR), peft, base_export_dir)
