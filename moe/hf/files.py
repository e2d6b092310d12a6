"""Weights on disk: safetensors only, sharded with an index when large; nothing is unpickled.

    model.safetensors                         one file, or
    model-00001-of-0000N.safetensors ...      shards of at most max_shard_bytes each, and
    model.safetensors.index.json              {"metadata": {"total_size"}, "weight_map": {key: shard}}

Reading checks each file's header (a file that is not safetensors, a shard the index names but
that is missing) and every tensor's shape against what the config needs before loading any
data, with one line naming the file and the problem.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from ..safe_json import JSONInputError, load_file

WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
MAX_SHARD_BYTES = 5 * 1024 ** 3  # transformers' default shard size


class WeightsError(ValueError):
    """A weights file that cannot be read as this model's weights (the message names the file)."""


def has_weights(directory: Path) -> bool:
    return (directory / WEIGHTS_FILE).is_file() or (directory / INDEX_FILE).is_file()


def write_weights(tensors: dict[str, Tensor], directory: Path, metadata: dict[str, str],
                  max_shard_bytes: int = MAX_SHARD_BYTES) -> list[str]:
    """Write the tensors (one file, or shards + index); returns the file names written."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    for key in sorted(tensors):
        nbytes = tensors[key].numel() * tensors[key].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensors[key]
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(directory / WEIGHTS_FILE), metadata={"format": "pt", **metadata})
        return [WEIGHTS_FILE]
    names = [f"model-{n + 1:05d}-of-{len(shards):05d}.safetensors" for n in range(len(shards))]
    for name, shard in zip(names, shards):
        save_file(shard, str(directory / name), metadata={"format": "pt", **metadata})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total},
             "weight_map": {key: name for name, shard in zip(names, shards) for key in shard}}
    (directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return [*names, INDEX_FILE]


def weight_files(directory: Path) -> dict[str, Path]:
    """key -> the file holding it (one file, or the shards an index names)."""
    if (directory / INDEX_FILE).is_file():
        index_file = directory / INDEX_FILE
        try:
            weight_map = load_file(index_file).get("weight_map")
        except JSONInputError as exc:
            raise WeightsError(f"{index_file}: {exc}") from None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise WeightsError(f"{index_file}: weight_map is missing or not an object of file names")
        files = {k: directory / Path(v).name for k, v in weight_map.items()}  # a shard never leaves the directory
        for path in set(files.values()):
            if not path.is_file():
                raise WeightsError(f"{index_file} names the shard {path.name}, which is missing")
        return files
    if (directory / WEIGHTS_FILE).is_file():
        return {key: directory / WEIGHTS_FILE for key in _header(directory / WEIGHTS_FILE)}
    pickled = sorted(p.name for p in directory.glob("*.bin")) + sorted(p.name for p in directory.glob("*.pt"))
    if pickled:
        raise WeightsError(f"{directory} holds only pickled weights ({pickled[0]}); they are never unpickled: "
                           "convert them to safetensors first (transformers: save_pretrained(dir))")
    raise WeightsError(f"{directory} has no {WEIGHTS_FILE} (nor {INDEX_FILE})")


def _header(path: Path) -> dict[str, tuple[int, ...]]:
    """key -> shape from a safetensors header (reads no tensor data)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise WeightsError(f"{path}: not a readable safetensors file ({exc})") from None


def read_weights(directory: Path, expected: dict[str, tuple[int, ...]]) -> tuple[Callable[[str], Tensor], set[str]]:
    """(get(key) -> tensor, every key present), after checking that each expected key is present
    with the expected shape. Tensors are read lazily, one at a time."""
    files = weight_files(directory)
    shapes: dict[str, tuple[int, ...]] = {}
    for path in sorted(set(files.values())):
        shapes.update(_header(path))
    for key, shape in expected.items():
        where = files.get(key, directory / WEIGHTS_FILE)
        if key not in shapes:
            raise WeightsError(f"{where}: tensor {key} is missing")
        if shapes[key] != shape:
            raise WeightsError(f"{where}: tensor {key} has shape {list(shapes[key])}; config.json needs {list(shape)}")
    handles: dict[Path, object] = {}

    def get(key: str) -> Tensor:
        path = files[key]
        if path not in handles:
            handles[path] = safe_open(str(path), framework="pt")
        return handles[path].get_tensor(key)

    return get, set(shapes)


def is_empty(t: Optional[Tensor]) -> bool:
    return t is None or t.numel() == 0 or not bool(t.any())
