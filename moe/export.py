"""Exports: the trained model as safetensors + config.json (+ tokenizer.json), no pickle.

    out_dir/model.safetensors   canonical state dict (moe/state.py), EP- and backend-independent
    out_dir/config.json         dataclasses.asdict(ModelConfig) plus "format_version"
    out_dir/tokenizer.json      copied from tokenizer_file when given
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Optional, Union

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from .config import ModelConfig
from .model import MoETransformer

FORMAT_VERSION = 1
PathLike = Union[str, Path]


def save_export(model: MoETransformer, out_dir: PathLike, tokenizer_file: Optional[PathLike] = None) -> Path:
    """Write the export. With EP > 1 this is collective (every rank must call it: the experts
    are gathered over the EP group); only global rank 0 writes."""
    sd = model.canonical_state_dict()
    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        return Path(out_dir)
    return write_export(sd, model.config, out_dir, tokenizer_file)


def write_export(sd: dict[str, torch.Tensor], config: ModelConfig, out_dir: PathLike,
                 tokenizer_file: Optional[PathLike] = None) -> Path:
    """A canonical state dict + its config as an export (what transforms on exports write),
    after checking every tensor against the config's canonical shapes."""
    from .state import canonical_shapes

    expected = canonical_shapes(config)
    wrong = sorted(k for k in set(expected) | set(sd) if k not in sd or tuple(sd[k].shape) != expected.get(k))
    if wrong:
        raise ValueError(f"the state dict does not match the config at {wrong[:3]}.")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().to("cpu").contiguous() for k, v in sd.items()}, str(out / "model.safetensors"),
              metadata={"format_version": str(FORMAT_VERSION)})
    (out / "config.json").write_text(json.dumps({**dataclasses.asdict(config), "format_version": FORMAT_VERSION},
                                                indent=2) + "\n")
    if tokenizer_file is not None:
        shutil.copyfile(tokenizer_file, out / "tokenizer.json")
    return out


def export_tokenizer(export_dir: PathLike) -> Optional[Path]:
    """The export's tokenizer.json, or None when it has none (a transform then writes none)."""
    path = Path(export_dir) / "tokenizer.json"
    return path if path.is_file() else None


def load_export_config(export_dir: PathLike) -> ModelConfig:
    d = json.loads((Path(export_dir) / "config.json").read_text())
    version = d.pop("format_version", None)
    if version != FORMAT_VERSION:
        raise ValueError(f"{export_dir}/config.json has format_version={version}; this code reads {FORMAT_VERSION}.")
    return ModelConfig.from_dict(d)


def load_export(export_dir: PathLike, *, expert_parallel_size: int = 1, backend: Optional[str] = None,
                device: Union[str, torch.device] = "cpu") -> MoETransformer:
    """Build the model from config.json and load model.safetensors, in eval mode. `backend`
    overrides model.moe.backend (e.g. load a deepspeed-trained export on the native backend)."""
    config = load_export_config(export_dir)
    if backend is not None:
        config = dataclasses.replace(config, moe=dataclasses.replace(config.moe, backend=backend))
    model = MoETransformer(config, expert_parallel_size=expert_parallel_size)
    model.load_canonical_state_dict(load_file(str(Path(export_dir) / "model.safetensors")))
    return model.to(device).eval()
