"""Finding the corpus' files, on the driver, deterministically.

`find_corpus` resolves `data.input` (file, directory, glob or URI; unset -> the
interpreter's standard library .py files) into files sorted by *identity* (the
path relative to the input root, so the order and the train/validation split do
not depend on where the corpus lies). Problems that make the whole input
unusable (missing path, empty directory, no supported file) raise DataError
here, before Ray starts. Reading records out of the files is records.py; the
built-in instruction set (data.kind=instruction, no input) is instructions.py,
chosen by the caller (prepare.find_input).
"""
from __future__ import annotations

import logging
import os
import re
import sysconfig
from dataclasses import dataclass, field
from typing import Any

import pyarrow.fs as pafs

from moe_platform.data import storage
from moe_platform.data.config import DEFAULT_CORPUS_MAX_BYTES, DataConfig
from moe_platform.data.errors import DataError
from moe_platform.data.manifest import Skip

log = logging.getLogger(__name__)

SINGLE_DOCUMENT_KINDS = (".txt", ".md", ".rst", ".py")
GLOB_CHARS = re.compile(r"[*?\[]")
# Directories the default corpus leaves out: third-party code is not the standard library.
STDLIB_EXCLUDED_DIRS = {"site-packages", "dist-packages", "__pycache__"}


@dataclass(frozen=True)
class SourceFile:
    location: str  # absolute local path or URI, readable from any node
    identity: str  # path relative to the input root: sort key and split hash input
    size: int
    mtime_ns: int

    @property
    def kind(self) -> str:
        """The extension, lower-cased: '.py', '.jsonl', ..."""
        name = self.identity.rsplit("/", 1)[-1]
        return "." + name.rsplit(".", 1)[-1].lower() if "." in name else ""


@dataclass
class Corpus:
    input: str  # the resolved input: location, glob, or the stdlib directory
    files: list[SourceFile]
    # Files found but not read (unsupported type), recorded in the manifest.
    skipped: list[Skip]
    is_default: bool
    # A corpus written by the job itself (the built-in instruction set): what made it and its
    # content sha256. Recorded in the manifest and fingerprinted in place of the file's mtime.
    generated: dict[str, Any] = field(default_factory=dict)


def default_corpus_location() -> str:
    """The running interpreter's standard library: a real corpus on every machine."""
    return sysconfig.get_paths()["stdlib"]


def find_corpus(config: DataConfig) -> Corpus:
    """Resolve data.input into sorted files, then apply the caps. Raises DataError if unusable."""
    if config.input:
        location = storage.absolute(config.input)
        files, skipped = _find_files(location, config.input_extensions)
        corpus = Corpus(input=location, files=files, skipped=skipped, is_default=False)
    else:
        location = default_corpus_location()
        files = list_stdlib(location)
        corpus = Corpus(input=location, files=files, skipped=[], is_default=True)
    corpus.files = apply_caps(corpus.files, max_bytes=resolved_max_bytes(config), max_documents=config.max_documents)
    return corpus


def resolved_max_bytes(config: DataConfig) -> int | None:
    """The byte cap in force: the built-in corpus gets DEFAULT_CORPUS_MAX_BYTES unless one is set."""
    if config.max_bytes is None and not config.input:
        return DEFAULT_CORPUS_MAX_BYTES
    return config.max_bytes or None


def _find_files(location: str, extensions: tuple[str, ...]) -> tuple[list[SourceFile], list[Skip]]:
    if GLOB_CHARS.search(location.split("://", 1)[-1]):
        return _split_by_extension(_glob(location), extensions, location)
    info = storage.file_info(location)
    if info.type == pafs.FileType.NotFound:
        raise DataError(f"data.input: {location} does not exist")
    if info.type == pafs.FileType.File:
        found = _source_file(location, info, identity=info.base_name)
        if found.kind not in extensions:
            raise DataError(
                f"data.input: {location} is a {found.kind or 'extension-less'} file; "
                f"supported: {', '.join(extensions)} (data.extensions)"
            )
        return [found], []
    files = _list_directory(location)
    if not files:
        raise DataError(f"data.input: directory {location} has no files")
    return _split_by_extension(files, extensions, location)


def _split_by_extension(
    files: list[SourceFile], extensions: tuple[str, ...], location: str
) -> tuple[list[SourceFile], list[Skip]]:
    usable = [f for f in files if f.kind in extensions]
    skipped = [Skip(f.location, f"unsupported file type {f.kind or '(none)'!r}") for f in files if f.kind not in extensions]
    if not usable:
        raise DataError(
            f"data.input: {location} has no {', '.join(extensions)} files "
            f"({len(files)} file(s) of other types; see data.extensions)"
        )
    return usable, skipped


def _list_directory(location: str, excluded_dirs: frozenset[str] = frozenset()) -> list[SourceFile]:
    """All files under a directory, recursively, sorted by identity.

    Hidden files and directories (.git, .DS_Store, ...) are not corpus files; they are left out.
    """
    fs, root = storage.filesystem(location)
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    files, hidden = [], 0
    for info in infos:
        if info.type != pafs.FileType.File:
            continue
        relative = info.path[len(root.rstrip("/")) + 1:]
        parts = relative.split("/")
        if any(part.startswith(".") for part in parts):
            hidden += 1
            continue
        if excluded_dirs.intersection(parts[:-1]):
            continue
        files.append(_source_file(storage.join(location, relative), info, identity=relative))
    if hidden:
        log.info("left out %d hidden file(s) under %s", hidden, location)
    files.sort(key=lambda f: f.identity)
    return _without_symlinked_copies(files, location) if isinstance(fs, pafs.LocalFileSystem) else files


def _without_symlinked_copies(files: list[SourceFile], location: str) -> list[SourceFile]:
    """Each local file once: under its own path if that is listed, else its first identity. A
    directory symlink to an ancestor (`current -> .`) would otherwise list every file below it
    again at each level of the loop."""
    chosen: dict[str, SourceFile] = {}
    for file in files:
        path = storage.filesystem(file.location)[1]
        real = os.path.realpath(path)
        if real not in chosen or (path == real and storage.filesystem(chosen[real].location)[1] != real):
            chosen[real] = file
    kept = sorted(chosen.values(), key=lambda f: f.identity)
    if len(kept) < len(files):
        log.info("left out %d path(s) under %s that reach an already listed file through a symlink",
                 len(files) - len(kept), location)
    return kept


def _glob(pattern: str) -> list[SourceFile]:
    """Files matching a glob ('*' within a name, '**' across directories), sorted by identity.

    pyarrow.fs has no glob, so: list the longest directory prefix without wildcards, then match.
    """
    scheme, _, path = pattern.rpartition("://")
    prefix = f"{scheme}://" if scheme else ""
    parts = path.split("/")
    fixed = next(i for i, part in enumerate(parts) if GLOB_CHARS.search(part))
    base = prefix + ("/".join(parts[:fixed]) or "/")
    if storage.file_info(base).type != pafs.FileType.Directory:
        raise DataError(f"data.input: {base} (the directory of the glob {pattern}) does not exist")
    matcher = _glob_regex(parts[fixed:])
    files = [f for f in _list_directory(base) if matcher.fullmatch(f.identity)]
    if not files:
        raise DataError(f"data.input: no files match {pattern}")
    return files


def _glob_regex(parts: list[str]) -> re.Pattern:
    regex = ""
    for index, part in enumerate(parts):
        last = index == len(parts) - 1
        if part == "**":
            regex += ".*" if last else "(?:[^/]+/)*"
        else:
            regex += _segment_regex(part) + ("" if last else "/")
    return re.compile(regex)


def _segment_regex(segment: str) -> str:
    """One path segment of a glob: '*' and '?' never cross '/', '[...]' is a class."""
    out, i = [], 0
    while i < len(segment):
        char = segment[i]
        close = segment.find("]", i + 2) if char == "[" else -1
        if char == "*":
            out.append("[^/]*")
        elif char == "?":
            out.append("[^/]")
        elif close > 0:
            body = segment[i + 1:close]
            out.append("[" + ("^" + body[1:] if body.startswith("!") else body) + "]")
            i = close
        else:
            out.append(re.escape(char))
        i += 1
    return "".join(out)


def list_stdlib(location: str) -> list[SourceFile]:
    """The standard library's .py files (no third-party packages), sorted by identity."""
    files = [f for f in _list_directory(location, frozenset(STDLIB_EXCLUDED_DIRS)) if f.kind == ".py"]
    if not files:
        raise DataError(f"the default corpus (standard library at {location}) has no .py files; set data.input")
    return files


def _source_file(location: str, info: pafs.FileInfo, *, identity: str) -> SourceFile:
    return SourceFile(location=location, identity=identity, size=info.size or 0, mtime_ns=info.mtime_ns or 0)


def apply_caps(files: list[SourceFile], *, max_bytes: int | None, max_documents: int | None) -> list[SourceFile]:
    """Keep a prefix of the sorted files within the caps (always at least one file).

    max_bytes counts whole files. max_documents can prune here only while every file is one
    document; a .jsonl/.parquet file holds an unknown number, so the exact document cap is
    enforced again where documents are counted (the prepare stream).
    """
    kept, total_bytes, documents, exact = [], 0, 0, True
    for f in files:
        if kept and max_bytes and total_bytes + f.size > max_bytes:
            break
        if kept and max_documents and exact and documents >= max_documents:
            break
        kept.append(f)
        total_bytes += f.size
        documents += 1
        exact = exact and f.kind in SINGLE_DOCUMENT_KINDS
    if len(kept) < len(files):
        log.info("caps keep %d of %d files (%d bytes)", len(kept), len(files), total_bytes)
    return kept
