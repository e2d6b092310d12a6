"""Finding the corpus' files and reading documents out of them.

Two halves, both deterministic:
- `find_corpus` runs on the driver: it resolves `data.input` (file, directory,
  glob or URI; unset -> the interpreter's standard library) into files sorted
  by *identity* (the path relative to the input root, so the order and the
  train/validation split do not depend on where the corpus lies). Problems that
  make the whole input unusable (missing path, empty directory, no supported
  file) raise DataError here, before Ray starts.
- `read_documents` runs anywhere (Ray tasks, the driver's tokenizer sample, the
  benchmark): one file -> its documents, in file order. A .txt/.md/.rst/.py file
  is one document; each line of a .jsonl and each row of a .parquet is one.
  `read_instructions` is its twin for `data.kind=instruction`: each .jsonl line
  or .parquet row is one `Instruction` (a prompt and a response).
  Per-document problems are yielded as `Skip(path, reason)`, never raised, so a
  bad file costs a named line in the manifest instead of the run.
"""
from __future__ import annotations

import json
import logging
import re
import sysconfig
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Union

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from moe_platform.data import storage
from moe_platform.data.config import DEFAULT_CORPUS_MAX_BYTES, DataConfig
from moe_platform.data.errors import DataError
from moe_platform.data.manifest import Skip

log = logging.getLogger(__name__)

SINGLE_DOCUMENT_KINDS = (".txt", ".md", ".rst", ".py")
GLOB_CHARS = re.compile(r"[*?\[]")
# Binary detection looks at the start of a file, as git and grep do.
BINARY_PROBE_BYTES = 8192
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


@dataclass(frozen=True)
class Document:
    identity: str  # file identity, plus ':<line>' (.jsonl) or '#<row>' (.parquet)
    text: str


@dataclass(frozen=True)
class Instruction:
    """One finetuning example (data.kind=instruction): the loss counts the response only."""

    identity: str  # as Document.identity
    prompt: str  # raw; data.prompt_template renders it before encoding
    response: str


@dataclass(frozen=True)
class RecordFormat:
    """What reading needs of DataConfig: the kind of records and where files keep them.

    Small and picklable, so it travels to Ray tasks as it is.
    """

    kind: str = "text"
    text_field: str = "text"
    text_column: str = "text"
    prompt_field: str = "prompt"
    response_field: str = "response"

    @classmethod
    def of(cls, config: DataConfig) -> RecordFormat:
        return cls(kind=config.kind, text_field=config.text_field, text_column=config.text_column,
                   prompt_field=config.prompt_field, response_field=config.response_field)


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


# ---- finding files (driver) ----------------------------------------------------------------


def default_corpus_location() -> str:
    """The running interpreter's standard library: a real corpus on every machine."""
    return sysconfig.get_paths()["stdlib"]


def find_corpus(config: DataConfig) -> Corpus:
    """Resolve data.input into sorted files, then apply the caps. Raises DataError if unusable."""
    if config.input:
        location = storage.absolute(config.input)
        files, skipped = _find_files(location, config.input_extensions)
        corpus = Corpus(input=location, files=files, skipped=skipped, is_default=False)
    elif config.kind == "instruction":
        from moe_platform.data.instructions import builtin_corpus

        return builtin_corpus(config, resolved_max_bytes(config))
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
    return sorted(files, key=lambda f: f.identity)


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


# ---- reading documents (anywhere) ----------------------------------------------------------


def read_records(file: SourceFile, record_format: RecordFormat) -> Iterator[Union[Document, Instruction, Skip]]:
    """Documents (data.kind=text) or Instructions (data.kind=instruction) of one file, and Skips."""
    if record_format.kind == "instruction":
        return read_instructions(file, prompt_field=record_format.prompt_field,
                                 response_field=record_format.response_field)
    return read_documents(file, text_field=record_format.text_field, text_column=record_format.text_column)


def read_documents(file: SourceFile, *, text_field: str, text_column: str) -> Iterator[Union[Document, Skip]]:
    """Documents of one file in order, with problems as Skips; at least one item per file."""
    if file.kind == ".parquet":
        records = _read_parquet(file, text_column)
    elif file.kind == ".jsonl":
        records = _read_jsonl(file, text_field)
    else:
        records = _read_text(file)
    return _guarded(file, records, empty="no documents")


def read_instructions(file: SourceFile, *, prompt_field: str, response_field: str) -> Iterator[Union[Instruction, Skip]]:
    """Instructions of a .jsonl/.parquet file in order, with problems as Skips; at least one item per file."""
    if file.kind == ".jsonl":
        records = _read_instruction_jsonl(file, prompt_field, response_field)
    elif file.kind == ".parquet":
        records = _read_instruction_parquet(file, prompt_field, response_field)
    else:
        records = iter([Skip(file.location, f"unsupported file type {file.kind or '(none)'!r} for "
                                            "data.kind=instruction (.jsonl or .parquet)")])
    return _guarded(file, records, empty="no records")


def _guarded(file: SourceFile, records: Iterator, *, empty: str) -> Iterator:
    """The records, with an unreadable file or a file without records turned into a Skip."""
    produced = False
    try:
        for record in records:
            produced = True
            yield record
    except (OSError, pa.ArrowException) as exc:
        produced = True
        yield Skip(file.location, f"read error: {_one_line(exc)}")
    if not produced:
        yield Skip(file.location, empty)


def _read_text(file: SourceFile) -> Iterator[Union[Document, Skip]]:
    text = _decode(file, storage.read_bytes(file.location))
    if isinstance(text, Skip):
        yield text
    elif not text.strip():
        yield Skip(file.location, "empty document")
    else:
        yield Document(file.identity, text)


def _jsonl_objects(file: SourceFile) -> Iterator[Union[tuple[int, Any], Skip]]:
    """(line number, parsed JSON) per non-blank line, or a Skip for an undecodable file or bad line."""
    content = _decode(file, storage.read_bytes(file.location))
    if isinstance(content, Skip):
        yield content
        return
    for number, line in enumerate(content.splitlines(), start=1):
        if not line.strip():
            continue  # blank lines separate nothing in JSON Lines; not documents
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as exc:
            yield Skip(file.location, f"line {number}: malformed JSON ({exc.msg})")


def _read_jsonl(file: SourceFile, text_field: str) -> Iterator[Union[Document, Skip]]:
    for item in _jsonl_objects(file):
        if isinstance(item, Skip):
            yield item
            continue
        number, record = item
        if not isinstance(record, dict) or text_field not in record:
            yield Skip(file.location, f"line {number}: no {text_field!r} field (data.text_field)")
            continue
        yield _text_document(file, record[text_field], f"{file.identity}:{number}", f"line {number}")


def _read_instruction_jsonl(file: SourceFile, prompt_field: str, response_field: str) -> Iterator[Union[Instruction, Skip]]:
    keys = ((prompt_field, "data.prompt_field"), (response_field, "data.response_field"))
    for item in _jsonl_objects(file):
        if isinstance(item, Skip):
            yield item
            continue
        number, record = item
        missing = [(name, key) for name, key in keys if not isinstance(record, dict) or name not in record]
        if missing:
            name, key = missing[0]
            yield Skip(file.location, f"line {number}: no {name!r} field ({key})")
            continue
        yield _instruction(file, record[prompt_field], record[response_field], keys,
                           f"{file.identity}:{number}", f"line {number}")


def _parquet_rows(file: SourceFile, columns: list[tuple[str, str]], make: Callable) -> Iterator:
    """make(row, *values) per row of the string columns [(name, config key)], or one Skip naming a bad column."""
    fs, path = storage.filesystem(file.location)
    with fs.open_input_file(path) as handle:
        parquet = pq.ParquetFile(handle)
        schema = parquet.schema_arrow
        for name, key in columns:
            if name not in schema.names:
                yield Skip(file.location, f"no column {name!r} ({key}; columns: {', '.join(schema.names)})")
                return
            column_type = schema.field(name).type
            if not (pa.types.is_string(column_type) or pa.types.is_large_string(column_type)):
                yield Skip(file.location, f"column {name!r} is {column_type}, not a string")
                return
        names = [name for name, _ in columns]
        row = 0
        for batch in parquet.iter_batches(columns=names):
            # By name: a batch keeps the file's column order, not the requested one.
            for values in zip(*(batch.column(name).to_pylist() for name in names)):
                yield make(row, *values)
                row += 1


def _read_parquet(file: SourceFile, text_column: str) -> Iterator[Union[Document, Skip]]:
    return _parquet_rows(file, [(text_column, "data.text_column")],
                         lambda row, text: _text_document(file, text, f"{file.identity}#{row}", f"row {row}"))


def _read_instruction_parquet(file: SourceFile, prompt_field: str, response_field: str) -> Iterator[Union[Instruction, Skip]]:
    keys = [(prompt_field, "data.prompt_field"), (response_field, "data.response_field")]
    return _parquet_rows(file, keys, lambda row, prompt, response: _instruction(
        file, prompt, response, keys, f"{file.identity}#{row}", f"row {row}"))


def _instruction(file: SourceFile, prompt: object, response: object, keys, identity: str,
                 where: str) -> Union[Instruction, Skip]:
    """An Instruction, or a Skip naming the first field that is null, not a string, or blank."""
    for (name, _), value in zip(keys, (prompt, response)):
        if value is None:
            return Skip(file.location, f"{where}: null {name!r}")
        if not isinstance(value, str):
            return Skip(file.location, f"{where}: {name!r} is {type(value).__name__}, not a string")
        if not value.strip():
            return Skip(file.location, f"{where}: empty {name!r}")
    return Instruction(identity, prompt, response)


def _text_document(file: SourceFile, value: object, identity: str, where: str) -> Union[Document, Skip]:
    if value is None:
        return Skip(file.location, f"{where}: null text")
    if not isinstance(value, str):
        return Skip(file.location, f"{where}: text is {type(value).__name__}, not a string")
    if not value.strip():
        return Skip(file.location, f"{where}: empty document")
    return Document(identity, value)


def _decode(file: SourceFile, data: bytes) -> Union[str, Skip]:
    """UTF-8 text, or a Skip naming the first bad byte. A NUL byte marks a binary file."""
    nul = data.find(b"\x00", 0, BINARY_PROBE_BYTES)
    if nul >= 0:
        return Skip(file.location, f"binary file (NUL byte at {nul})")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        return Skip(file.location, f"invalid UTF-8 at byte {exc.start}")
    return text.removeprefix("\ufeff")  # a BOM is an encoding mark, not text


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]
