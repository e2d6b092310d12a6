"""Exports: a Hugging Face model directory, the one owner of its layout.

    out_dir/config.json              architectures + model_type of the architecture that computes this
                                     model (moe/hf/config.py), and our own settings under "moe_platform"
    out_dir/model.safetensors        that architecture's tensor names (moe/hf/weights.py); sharded as
                                     model-0000i-of-0000N.safetensors + model.safetensors.index.json when large
    out_dir/tokenizer.json           the tokenizer (copied)
    out_dir/tokenizer_config.json    PreTrainedTokenizerFast, eos/pad/bos tokens, optional chat_template
    out_dir/generation_config.json   eos/pad/bos token ids
    out_dir/adapter/                 a LoRA stage's adapters alone (moe/peft.py), next to the merged weights

`transformers.AutoModelForCausalLM.from_pretrained(out_dir)` loads it (no custom code), and
`load_export` loads any local directory of Mixtral, Qwen2-MoE, Qwen3-MoE, ERNIE-4.5-MoE, Llama,
Mistral, Qwen2 or Qwen3, or our format-1 exports (canonical tensors + a dataclass config.json).
Nothing is unpickled. Writing needs no transformers.

Everything that asks "is this an export?", reads its config or its special tokens, or names its
files calls this module.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any, NamedTuple, Optional, Union

import torch
import torch.distributed as dist

from .config import ModelConfig
from .hf.config import ConfigError, choose_layout, from_hf_config, to_hf_config
from .hf.files import INDEX_FILE, WEIGHTS_FILE, WeightsError, has_weights, is_empty, read_weights, write_weights
from .hf.weights import from_hf, to_hf
from .model import MoETransformer
from .safe_json import JSONInputError, load_file
from .state import canonical_shapes

PathLike = Union[str, Path]
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
ADAPTER_DIR = "adapter"
# The special tokens of the tokenizers this platform trains (data.eos_token / data.pad_token).
DEFAULT_EOS, DEFAULT_PAD = "<|endoftext|>", "<|pad|>"
OLD_FORMAT_VERSION = 1  # canonical tensor names + dataclasses.asdict(ModelConfig): still read


class ExportError(ValueError):
    """A directory that is not a usable export; the message is one line naming the file."""


class SpecialTokens(NamedTuple):
    """Token strings (None when the tokenizer has none) and their ids."""

    eos: Optional[str]
    pad: Optional[str]
    bos: Optional[str] = None
    eos_id: Optional[int] = None
    pad_id: Optional[int] = None
    bos_id: Optional[int] = None


# -- what an export is -------------------------------------------------------------------------

def is_export(directory: PathLike) -> bool:
    """A config.json next to safetensors weights (pickled weights do not count)."""
    d = Path(directory)
    return (d / CONFIG_FILE).is_file() and has_weights(d)


def check_export(directory: PathLike, key: str, *, need_tokenizer: bool = True) -> ModelConfig:
    """The export's ModelConfig, or ExportError naming `key` (e.g. "serve.export_dir") and the
    problem in one line. Reads no tensor data beyond the headers' shapes."""
    d = Path(directory)
    if not d.is_dir():
        raise ExportError(f"{key}={str(directory)!r} is not a directory")
    try:
        config, layout = _read_config(d)
        read_weights(d, _file_shapes(config, layout))  # headers only: missing files, pickles, shapes
        if need_tokenizer and not (d / TOKENIZER_FILE).is_file():
            raise ExportError(f"{d} has no {TOKENIZER_FILE}")
        return config
    except ValueError as exc:
        raise ExportError(f"{key}={directory} is not an export: {exc}") from None


def export_tokenizer(export_dir: PathLike) -> Optional[Path]:
    """The export's tokenizer.json, or None when it has none (a transform then writes none)."""
    path = Path(export_dir) / TOKENIZER_FILE
    return path if path.is_file() else None


def export_files(export_dir: PathLike) -> list[str]:
    """The names of the files that make up the export in export_dir (for copying it whole)."""
    d = Path(export_dir)
    names = [CONFIG_FILE, TOKENIZER_FILE, TOKENIZER_CONFIG_FILE, GENERATION_CONFIG_FILE, WEIGHTS_FILE, INDEX_FILE]
    shards = sorted(p.name for p in d.glob("model-*-of-*.safetensors"))
    return [name for name in names + shards if (d / name).is_file()]


def weights_bytes(export_dir: PathLike) -> int:
    """Bytes on disk of the export's safetensors (every shard)."""
    d = Path(export_dir)
    return sum((d / name).stat().st_size for name in export_files(d) if name.endswith(".safetensors"))


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = load_file(path)
    except (JSONInputError, UnicodeDecodeError, OSError) as exc:
        raise ExportError(f"{path}: {exc}") from None
    if not isinstance(data, dict):
        raise ExportError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _read_config(export_dir: PathLike) -> tuple[ModelConfig, Optional[str]]:
    """(config, layout); layout None for a format-1 export (canonical tensor names)."""
    path = Path(export_dir) / CONFIG_FILE
    if not path.is_file():
        raise ExportError(f"{path} is missing")
    d = _read_json(path)
    if "format_version" in d and "model_type" not in d:
        if d["format_version"] != OLD_FORMAT_VERSION:
            raise ExportError(f"{path} has format_version={d['format_version']}; this code reads "
                              f"{OLD_FORMAT_VERSION} (old exports) or a transformers config.json")
        try:
            old = {k: v for k, v in d.items() if k != "format_version"}
            # Format-1 exports predate model.moe.routed_scale: their experts were combined unscaled.
            old["moe"] = {"routed_scale": 1.0, **(old.get("moe") or {})}
            return ModelConfig.from_dict(old), None
        except (ValueError, TypeError) as exc:
            raise ExportError(f"{path}: {exc}") from None
    return from_hf_config(d, str(path))


def load_export_config(export_dir: PathLike) -> ModelConfig:
    """The ModelConfig of an export or of a transformers directory (reads config.json only)."""
    return _read_config(export_dir)[0]


# -- special tokens ----------------------------------------------------------------------------

def _token_text(value: Any) -> Optional[str]:
    """tokenizer_config.json writes a token as a string or as {"content": ...} (an AddedToken);
    "" (some exports write bos_token "") means no such token, like null."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _token_ids(tokenizer_file: Path) -> dict[str, int]:
    tok = _read_json(tokenizer_file)
    ids = {}
    vocab = (tok.get("model") or {}).get("vocab")
    if isinstance(vocab, dict):
        ids.update({k: v for k, v in vocab.items() if isinstance(v, int)})
    for added in tok.get("added_tokens") or []:
        if isinstance(added, dict) and isinstance(added.get("content"), str) and isinstance(added.get("id"), int):
            ids[added["content"]] = added["id"]
    return ids


def special_tokens(directory: PathLike) -> SpecialTokens:
    """eos/pad/bos of a directory holding tokenizer.json: tokenizer_config.json's when present
    (an imported model's "</s>"), else the platform's own "<|endoftext|>"/"<|pad|>" if the tokenizer
    has them. Ids come from tokenizer.json; a token it does not know is an ExportError."""
    d = Path(directory)
    if (d / TOKENIZER_CONFIG_FILE).is_file():
        tc = _read_json(d / TOKENIZER_CONFIG_FILE)
        names = {n: _token_text(tc.get(f"{n}_token")) for n in ("eos", "pad", "bos")}
    else:
        names = {"eos": DEFAULT_EOS, "pad": DEFAULT_PAD, "bos": None}
    if not (d / TOKENIZER_FILE).is_file():
        return SpecialTokens(**names)
    ids = _token_ids(d / TOKENIZER_FILE)
    if not (d / TOKENIZER_CONFIG_FILE).is_file():
        names = {n: t if t in ids else None for n, t in names.items()}
    for n, t in names.items():
        if t is not None and t not in ids:
            raise ExportError(f"{d / TOKENIZER_CONFIG_FILE}: {n}_token {t!r} is not in {TOKENIZER_FILE}")
    return SpecialTokens(**names, **{f"{n}_id": ids.get(t) if t else None for n, t in names.items()})


def read_chat_template(directory: PathLike) -> Optional[str]:
    """The Jinja source of a directory's chat template (tokenizer_config.json's "chat_template"),
    or None when it has none. The named-templates form, [{"name": "default", "template": ...}, ...],
    gives its "default" template; anything else that is not a string is an ExportError."""
    path = Path(directory) / TOKENIZER_CONFIG_FILE
    source = _read_json(path).get("chat_template") if path.is_file() else None
    if isinstance(source, list):
        named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
        source = named.get("default")
        if source is None:
            raise ExportError(f"{path}: chat_template is a list of named templates without a 'default' one")
    if source is not None and not isinstance(source, str):
        raise ExportError(f"{path}: chat_template must be a string (or a list with a 'default' template)")
    return source


# -- writing -----------------------------------------------------------------------------------

def save_export(model: MoETransformer, out_dir: PathLike, tokenizer_file: Optional[PathLike] = None, *,
                chat_template: Optional[str] = None) -> Path:
    """Write the export. With EP > 1 this is collective (every rank must call it: the experts
    are gathered over the EP group); only global rank 0 writes."""
    sd = model.canonical_state_dict()
    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        return Path(out_dir)
    return write_export(sd, model.config, out_dir, tokenizer_file, chat_template=chat_template)


def export_blocker(config: ModelConfig) -> Optional[str]:
    """Why transformers cannot load this model's export (the setting), or None when it can."""
    return choose_layout(config)[1]


def write_export(sd: dict[str, torch.Tensor], config: ModelConfig, out_dir: PathLike,
                 tokenizer_file: Optional[PathLike] = None, *, chat_template: Optional[str] = None,
                 max_shard_bytes: Optional[int] = None) -> Path:
    """A canonical state dict + its config as an export (what transforms on exports write), after
    checking every tensor against the config's canonical shapes. Special tokens (and a chat
    template) come from tokenizer_file's directory when it is an export's."""
    expected = canonical_shapes(config)
    wrong = sorted(k for k in set(expected) | set(sd) if k not in sd or tuple(sd[k].shape) != expected.get(k))
    if wrong:
        raise ValueError(f"the state dict does not match the config at {wrong[:3]}.")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stale in export_files(out):  # a previous export's weights here (other shard count) must not mix in
        if stale.endswith((".safetensors", ".index.json")):
            (out / stale).unlink()
    layout, blocker = choose_layout(config)
    tokens = SpecialTokens(None, None)
    if tokenizer_file is not None:
        source = Path(tokenizer_file).parent
        if Path(tokenizer_file).resolve() != (out / TOKENIZER_FILE).resolve():
            shutil.copyfile(tokenizer_file, out / TOKENIZER_FILE)
        if (source / TOKENIZER_CONFIG_FILE).is_file() and source.resolve() != out.resolve():
            shutil.copyfile(source / TOKENIZER_CONFIG_FILE, out / TOKENIZER_CONFIG_FILE)
            chat_template = chat_template or read_chat_template(source)
        tokens = special_tokens(out)
        _write_tokenizer_config(out, tokens, chat_template)
    dtype = str(sd["tok_emb.weight"].dtype).removeprefix("torch.")
    kwargs = {} if max_shard_bytes is None else {"max_shard_bytes": max_shard_bytes}
    write_weights(to_hf(sd, config, layout), out, {"moe_platform_layout": layout}, **kwargs)
    ids = {"bos": tokens.bos_id, "eos": tokens.eos_id, "pad": tokens.pad_id}
    _write_json(out / CONFIG_FILE, to_hf_config(config, layout, blocker, ids, dtype))
    _write_json(out / GENERATION_CONFIG_FILE, {f"{n}_token_id": i for n, i in ids.items() if i is not None})
    return out


def _write_tokenizer_config(out: Path, tokens: SpecialTokens, template: Optional[str]) -> None:
    path = out / TOKENIZER_CONFIG_FILE
    tc = _read_json(path) if path.is_file() else {}
    tc.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
    tc.setdefault("model_max_length", 1_000_000_000)
    for name in ("eos", "pad", "bos"):
        value = getattr(tokens, name)
        if value is not None:
            tc[f"{name}_token"] = value
    if template is not None:
        tc["chat_template"] = template
    _write_json(path, tc)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


# -- reading -----------------------------------------------------------------------------------

def _file_shapes(config: ModelConfig, layout: Optional[str]) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape that the files must hold (layout None: format 1, canonical names)."""
    expected = canonical_shapes(config)
    if layout is None:
        return expected
    meta = {k: torch.empty(s, device="meta") for k, s in expected.items()}  # shapes only, no memory
    return {k: tuple(t.shape) for k, t in to_hf(meta, config, layout).items()}


def _weights_of(export_dir: Path, config: ModelConfig, layout: Optional[str] = None) -> dict[str, torch.Tensor]:
    """The canonical state dict of an export, every tensor's presence and shape checked first."""
    expected = canonical_shapes(config)
    get, keys = read_weights(export_dir, _file_shapes(config, layout))
    if layout is None:
        unused = keys - set(expected)
        sd = {k: get(k) for k in expected}
    else:
        sd, unused = from_hf(get, keys, config, layout, expected)
    for key in sorted(unused):
        if not (key.endswith("rotary_emb.inv_freq") or is_empty(get(key))):
            raise WeightsError(f"{export_dir}: tensor {key} is not used by the model config.json describes")
    return sd


def load_export_state(export_dir: PathLike) -> tuple[dict[str, torch.Tensor], ModelConfig]:
    """(canonical state dict, ModelConfig) of an export, without building a model: what the
    transforms on exports (prune, upcycle, merge_adapter) start from."""
    config, layout = _read_config(export_dir)
    return _weights_of(Path(export_dir), config, layout), config


def load_export(export_dir: PathLike, *, expert_parallel_size: int = 1, backend: Optional[str] = None,
                device: Union[str, torch.device] = "cpu") -> MoETransformer:
    """Build the model from config.json and load its safetensors, in eval mode. `backend`
    overrides model.moe.backend (e.g. load a deepspeed-trained export on the native backend)."""
    sd, config = load_export_state(export_dir)
    if backend is not None:
        config = config.resolved()  # the state has a router bias or not, whichever backend loads it
        config = dataclasses.replace(config, moe=dataclasses.replace(config.moe, backend=backend))
    model = MoETransformer(config, expert_parallel_size=expert_parallel_size)
    model.load_canonical_state_dict(sd)
    return model.to(device).eval()


__all__ = ["ADAPTER_DIR", "CONFIG_FILE", "ConfigError", "ExportError", "SpecialTokens", "TOKENIZER_FILE",
           "WeightsError", "check_export", "export_blocker", "export_files", "export_tokenizer",
           "is_export", "load_export", "load_export_config", "load_export_state", "read_chat_template", "save_export", "special_tokens", "weights_bytes", "write_export"]
