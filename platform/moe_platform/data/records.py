"""Reading records out of corpus files: one description of a record's fields drives every reader.

A record is a `Document` (data.kind=text: a text) or an `Instruction` (data.kind=instruction:
a prompt and a response). A `RecordFormat` lists a record's fields and where each file type
keeps them; the readers below know file types, not kinds of data:
- .txt/.md/.rst/.py: the whole file is one record (formats with a single field only);
- .jsonl: each line is one record, a JSON object holding the fields;
- .parquet: each row is one record, one string column per field.
Runs anywhere (Ray tasks, the driver's tokenizer sample, the benchmark). Every problem with a
file or a record is yielded as `Skip(path, reason)` naming its line or row, never raised: no
input file stops the prepare job, and a bad record costs one line in the manifest.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional, Sequence, Union

import pyarrow as pa
import pyarrow.parquet as pq

from moe.safe_json import JSONInputError, loads
from moe_platform.data import storage
from moe_platform.data.config import DataConfig
from moe_platform.data.manifest import Skip
from moe_platform.data.sources import SINGLE_DOCUMENT_KINDS, SourceFile

# Binary detection looks at the start of a file, as git and grep do.
BINARY_PROBE_BYTES = 8192
UTF8_BOM = b"\xef\xbb\xbf"
# JSON's whitespace. str.strip() would also strip U+2028/U+0085, which are text inside a record.
JSON_WHITESPACE = b" \t\r"


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


Record = Union[Document, Instruction]


@dataclass(frozen=True)
class RecordField:
    """One string field of a record: its .jsonl key and .parquet column, and how reasons name it."""

    name: str  # .jsonl: key of each line's JSON object
    name_key: str  # the config key that sets `name`, e.g. 'data.text_field'
    column: str  # .parquet: string column
    column_key: str
    noun: str  # a value in a reason: "text" -> 'line 3: null text'; "'prompt'" -> "line 3: null 'prompt'"
    empty: str  # the reason for a blank value


@dataclass(frozen=True)
class RecordFormat:
    """What reading needs of DataConfig: the record type and its fields, in constructor order.

    Small and picklable, so it travels to Ray tasks as it is.
    """

    kind: str  # data.kind
    record_type: type  # Document or Instruction, built as record_type(identity, *field values)
    fields: tuple[RecordField, ...]
    empty_file: str  # the reason for a file without any record

    @classmethod
    def text(cls, text_field: str = "text", text_column: str = "text") -> RecordFormat:
        field = RecordField(text_field, "data.text_field", text_column, "data.text_column", "text", "empty document")
        return cls("text", Document, (field,), "no documents")

    @classmethod
    def instruction(cls, prompt_field: str = "prompt", response_field: str = "response") -> RecordFormat:
        fields = tuple(RecordField(name, key, name, key, repr(name), f"empty {name!r}")
                       for name, key in ((prompt_field, "data.prompt_field"), (response_field, "data.response_field")))
        return cls("instruction", Instruction, fields, "no records")

    @classmethod
    def of(cls, config: DataConfig) -> RecordFormat:
        if config.kind == "instruction":
            return cls.instruction(config.prompt_field, config.response_field)
        return cls.text(config.text_field, config.text_column)


def read_records(file: SourceFile, record_format: RecordFormat) -> Iterator[Union[Record, Skip]]:
    """The records of one file in order, with problems as Skips; at least one item per file."""
    if file.kind == ".jsonl":
        records = _read_jsonl(file, record_format)
    elif file.kind == ".parquet":
        records = _read_parquet(file, record_format)
    elif file.kind in SINGLE_DOCUMENT_KINDS and len(record_format.fields) == 1:
        records = _read_whole_file(file, record_format)
    else:
        records = iter([Skip(file.location, f"unsupported file type {file.kind or '(none)'!r} for "
                                            f"data.kind={record_format.kind} (.jsonl or .parquet)")])
    return _guarded(file, records, empty=record_format.empty_file)


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


def _read_whole_file(file: SourceFile, record_format: RecordFormat) -> Iterator[Union[Record, Skip]]:
    data = storage.read_bytes(file.location)
    binary = _binary_reason(data)
    if binary:
        yield Skip(file.location, binary)
        return
    try:
        text = data.removeprefix(UTF8_BOM).decode("utf-8")  # a BOM is an encoding mark, not text
    except UnicodeDecodeError as exc:
        yield Skip(file.location, f"invalid UTF-8 at byte {exc.start + _bom_length(data)}")
        return
    yield _record(file, record_format, file.identity, "", [text])


def _read_jsonl(file: SourceFile, record_format: RecordFormat) -> Iterator[Union[Record, Skip]]:
    """One record per line; a bad line is one Skip."""
    data = storage.read_bytes(file.location)
    binary = _binary_reason(data)
    if binary:
        yield Skip(file.location, binary)
        return
    for number, value, problem in jsonl_values(data):
        where = f"line {number}"
        if problem:
            yield Skip(file.location, f"{where}: {problem}")
            continue
        missing = next((f for f in record_format.fields if not isinstance(value, dict) or f.name not in value), None)
        if missing is not None:
            yield Skip(file.location, f"{where}: no {missing.name!r} field ({missing.name_key})")
            continue
        values = [value[f.name] for f in record_format.fields]
        yield _record(file, record_format, f"{file.identity}:{number}", f"{where}: ", values)


def jsonl_values(data: bytes, first_line: int = 1, first_byte: int = 0) -> Iterator[tuple[int, object, Optional[str]]]:
    """(line number, JSON value, None) for each non-blank line of JSON Lines bytes, or
    (line number, None, problem) for a line that is not UTF-8 or not JSON.

    `data` may be a slice of a file that starts at a line boundary: `first_line` and `first_byte`
    are its position, so numbers and byte offsets name the whole file's. Lines end at '\\n' only:
    JSON strings may hold U+2028, U+2029 and U+0085 raw, so str.splitlines() would cut valid
    records apart.
    """
    offset = first_byte
    for number, line in enumerate(data.split(b"\n"), start=first_line):
        start, offset = offset, offset + len(line) + 1
        if number == 1 and line.startswith(UTF8_BOM):
            line, start = line[len(UTF8_BOM):], start + len(UTF8_BOM)
        if not line.strip(JSON_WHITESPACE):
            continue  # blank lines separate nothing in JSON Lines; not records
        try:
            yield number, loads(line.decode("utf-8")), None
        except UnicodeDecodeError as exc:
            yield number, None, f"invalid UTF-8 at byte {start + exc.start}"
        except JSONInputError as exc:
            yield number, None, f"malformed JSON ({exc.problem})"


def _read_parquet(file: SourceFile, record_format: RecordFormat) -> Iterator[Union[Record, Skip]]:
    """One record per row of the fields' string columns, or one Skip naming a missing or non-string column."""
    fs, path = storage.filesystem(file.location)
    with fs.open_input_file(path) as handle:
        parquet = pq.ParquetFile(handle)
        schema = parquet.schema_arrow
        for field in record_format.fields:
            if field.column not in schema.names:
                yield Skip(file.location, f"no column {field.column!r} ({field.column_key}; "
                                          f"columns: {', '.join(schema.names)})")
                return
            column_type = schema.field(field.column).type
            if not is_string_type(column_type):
                yield Skip(file.location, f"column {field.column!r} is {column_type}, not a string")
                return
        columns = [f.column for f in record_format.fields]
        row = 0
        for batch in parquet.iter_batches(columns=columns):
            # By name: a batch keeps the file's column order, not the requested one.
            for values in zip(*(batch.column(name).to_pylist() for name in columns)):
                yield _record(file, record_format, f"{file.identity}#{row}", f"row {row}: ", values)
                row += 1


def _record(file: SourceFile, record_format: RecordFormat, identity: str, where: str,
            values: Sequence[object]) -> Union[Record, Skip]:
    """The record, or a Skip naming the first field whose value is unusable."""
    for field, value in zip(record_format.fields, values):
        problem = value_problem(field, value)
        if problem:
            return Skip(file.location, where + problem)
    return record_format.record_type(identity, *values)


def value_problem(field: RecordField, value: object) -> Optional[str]:
    """Why a field's value cannot be used (null, not a string, blank, unencodable), or None."""
    if value is None:
        return f"null {field.noun}"
    if not isinstance(value, str):
        return f"{field.noun} is {type(value).__name__}, not a string"
    if not value.strip():
        return field.empty
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        # JSON escapes can spell a lone surrogate ("\ud800"); no tokenizer can encode one.
        return f"{field.noun} holds an unpaired surrogate (character {exc.start})"
    return None


def is_string_type(column_type: pa.DataType) -> bool:
    if pa.types.is_dictionary(column_type):  # dictionary-encoded strings read back as strings
        column_type = column_type.value_type
    return pa.types.is_string(column_type) or pa.types.is_large_string(column_type)


def _binary_reason(data: bytes) -> Optional[str]:
    """A NUL byte at the start marks a binary file (raw NUL is never valid text or JSON)."""
    nul = data.find(b"\x00", 0, BINARY_PROBE_BYTES)
    return f"binary file (NUL byte at {nul})" if nul >= 0 else None


def _bom_length(data: bytes) -> int:
    return len(UTF8_BOM) if data.startswith(UTF8_BOM) else 0


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]
