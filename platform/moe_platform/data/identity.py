"""A dataset directory's identity: the fingerprint of what decides its bytes, and what to do
with a directory that already holds something (reuse, rewrite an unfinished run, or refuse).

Split from prepare.py: the prepare pipeline asks `check_dataset_dir` once, before any work.
"""
from __future__ import annotations

import hashlib
import json
import logging
from typing import Optional

import pyarrow as pa
import pyarrow.fs as pafs

from moe_platform.data import storage
from moe_platform.data.config import INSTRUCTION_KEYS, DataConfig
from moe_platform.data.errors import DataError, ManifestError
from moe_platform.data.manifest import MANIFEST_FILE, SPLITS, TOKENIZER_CONFIG_FILE, TOKENIZER_FILE, Manifest
from moe_platform.data.sources import Corpus, resolved_max_bytes
from moe_platform.data.tokenizer import tokenizer_file

log = logging.getLogger(__name__)

# Bump when the bytes written for the same inputs change; part of the fingerprint.
PIPELINE_VERSION = 1
# Present while a run writes; holds its fingerprint, so an interrupted run is recognised.
IN_PROGRESS_FILE = ".prepare-in-progress.json"
OUTPUT_NAMES = (MANIFEST_FILE, TOKENIZER_FILE, TOKENIZER_CONFIG_FILE, *SPLITS, IN_PROGRESS_FILE)
# Config keys that change no output byte: where it goes and how the work is cut into tasks.
NOT_FINGERPRINTED = {"dataset_dir", "overwrite", "files_per_task", "num_cpus_per_task", "tokenizer"}



def compute_fingerprint(config: DataConfig, corpus: Corpus) -> str:
    """Hash of everything that decides the output bytes: config, file list, tokenizer, library versions."""
    import tokenizers

    # Instruction-only keys change no byte of a text dataset (and text fingerprints predate them).
    ignored = NOT_FINGERPRINTED | (set(INSTRUCTION_KEYS) if config.kind == "text" else set())
    settings = {k: v for k, v in config.to_dict().items() if k not in ignored}
    settings["max_bytes"] = resolved_max_bytes(config)
    identity = {
        "pipeline": PIPELINE_VERSION,
        "config": settings,
        "input": corpus.input,
        "files": [[f.identity, f.size, f.mtime_ns] for f in corpus.files],
        "tokenizer_sha256": _file_sha256(tokenizer_file(config.tokenizer)) if config.tokenizer else None,
        "versions": {"tokenizers": tokenizers.__version__, "pyarrow": pa.__version__},
    }
    if corpus.generated:
        identity["generated"] = corpus.generated  # the built-in set: its content, not its temp file's mtime
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode("utf-8")).hexdigest()


def _file_sha256(location: str) -> Optional[str]:
    if storage.file_info(location).type != pafs.FileType.File:
        return None  # reported as a missing tokenizer when it is loaded
    return hashlib.sha256(storage.read_bytes(location)).hexdigest()


def check_dataset_dir(
    dataset_dir: str, fingerprint: str, *, overwrite: bool, config: Optional[DataConfig] = None
) -> Optional[Manifest]:
    """The complete dataset to reuse, or None to write; DataError if writing would clobber another run."""
    info = storage.file_info(dataset_dir)
    if info.type == pafs.FileType.NotFound:
        return None
    if info.type != pafs.FileType.Directory:
        raise DataError(f"data.dataset_dir: {dataset_dir} exists and is not a directory")
    found = _describe_existing(dataset_dir, fingerprint, config)
    if found is None:
        return None  # empty
    if isinstance(found, Manifest):
        if not overwrite:
            return found
        log.info("data.overwrite=true: rewriting %s", dataset_dir)
        return None
    if found == "same run":
        log.info("%s holds an unfinished run of this same dataset: rewriting it", dataset_dir)
        return None
    if not overwrite:
        raise DataError(
            f"data.dataset_dir: {dataset_dir} holds {found}; choose another data.dataset_dir "
            "or pass data.overwrite=true to replace it"
        )
    log.warning("data.overwrite=true: replacing %s in %s", found, dataset_dir)
    return None


def _describe_existing(dataset_dir: str, fingerprint: str, config: Optional[DataConfig] = None):
    """None (empty), a reusable Manifest, 'same run' (safe to rewrite), or a description of what is there."""
    fs, path = storage.filesystem(dataset_dir)
    names = {info.base_name for info in fs.get_file_info(pafs.FileSelector(path))}
    if not names:
        return None
    if MANIFEST_FILE in names:
        try:
            manifest = Manifest.load(dataset_dir, check_files=False)
        except ManifestError as exc:
            return f"an unreadable dataset ({exc})"
        if manifest.fingerprint != fingerprint:
            return (f"a different dataset ({_what_differs(manifest, config)}; "
                    f"fingerprint {manifest.fingerprint[:12]}, this run {fingerprint[:12]})")
        try:
            manifest.check_files()
        except ManifestError:
            return "same run"
        return manifest
    if IN_PROGRESS_FILE in names:
        marker = json.loads(storage.read_bytes(storage.join(dataset_dir, IN_PROGRESS_FILE)) or b"{}")
        if marker.get("fingerprint") == fingerprint:
            return "same run"
        return "an unfinished run of a different dataset"
    return f"files that are not a prepared dataset ({', '.join(sorted(names)[:3])}{', ...' if len(names) > 3 else ''})"


def _what_differs(manifest: Manifest, config: Optional[DataConfig]) -> str:
    """'data.seq_len differs' or 'same config, other input files': tells the user what to change."""
    if config is None:
        return "other config or input"
    current, defaults = config.to_dict(), DataConfig().to_dict()
    # A key missing from an older manifest had its default value then.
    changed = sorted(key for key, value in current.items()
                     if key not in NOT_FINGERPRINTED and manifest.config.get(key, defaults.get(key, value)) != value)
    if changed:
        return ", ".join(f"data.{key}" for key in changed) + (" differs" if len(changed) == 1 else " differ")
    return "same config, but the input files or library versions changed"


def clear_outputs(dataset_dir: str) -> None:
    """Delete what prepare writes, and nothing else a user may keep in the directory."""
    for name in OUTPUT_NAMES:
        storage.delete(storage.join(dataset_dir, name))
