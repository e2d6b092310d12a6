"""The input of a generation job: prompt files cut into deterministic chunks, and a chunk's rows.

On the driver, `plan_chunks` lists the input files (moe_platform.data.sources: the same
file, directory, glob and URI rules as prepare), checks each one (readable, not empty, a
prompt column or field) and cuts it into chunks of `rows_per_part` rows: a .jsonl file by
lines (byte ranges found in one streaming pass, so a replica reads only its slice), a
.parquet file by row ranges (from its metadata). A chunk is named by its file's position and
its own, so a rerun over the same input makes the same chunks and finds their parts.

In a replica, `read_chunk` turns a chunk into `PromptRow`s: the prompt, the optional
reference, the row's own sampling fields, its id (`<file>:<line>` or `<file>#<row>`, as
prepare names records) and, for a row that cannot be used, the reason (kept in the output
rather than dropped).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Iterator, List, Optional

import pyarrow.parquet as pq

from moe_platform.data import storage
from moe_platform.data.config import DataConfig
from moe_platform.data.errors import DataError
from moe_platform.data.records import RecordField, is_string_type, jsonl_values, value_problem
from moe_platform.data.sources import SourceFile, find_corpus

EXTENSIONS = (".jsonl", ".parquet")
# A row's own sampling fields: the server's request fields of the same names.
SAMPLING_FIELDS = ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop")
SCAN_BLOCK_BYTES = 1 << 20


@dataclass(frozen=True)
class Chunk:
    """`num_rows` consecutive rows of one input file: one output part."""

    part: str  # the output file name, e.g. "part-00002-00013.parquet"
    location: str  # the input file
    identity: str  # its path relative to the input root (row ids start with it)
    first_row: int  # .jsonl: the first line number (1-based); .parquet: the first row (0-based)
    num_rows: int
    first_index: int  # the first row's position in the whole input (seed + index)
    byte_start: int = 0  # .jsonl: the slice of the file holding the lines
    byte_end: int = 0

    @property
    def kind(self) -> str:
        return ".parquet" if self.identity.lower().endswith(".parquet") else ".jsonl"

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


@dataclass
class PromptRow:
    id: str
    index: int  # position in the whole input
    prompt: Optional[str]
    reference: Optional[str] = None
    sampling: Dict[str, Any] = field(default_factory=dict)  # the row's own sampling fields
    problem: Optional[str] = None  # why the row cannot be generated (the output keeps it as `error`)


# ---- on the driver ---------------------------------------------------------------------------


def find_input_files(location: str) -> List[SourceFile]:
    """The input's .jsonl/.parquet files in a stable order, or DataError naming generate.input."""
    try:
        corpus = find_corpus(DataConfig(input=location, extensions=list(EXTENSIONS)))
    except DataError as exc:
        raise DataError(str(exc).replace("data.input", "generate.input").replace("data.extensions", "")) from None
    return corpus.files


def plan_chunks(files: List[SourceFile], prompt_field: str, rows_per_part: int) -> List[Chunk]:
    """Every input file cut into chunks, in input order; DataError for an unusable file."""
    chunks: List[Chunk] = []
    index = 0
    for number, file in enumerate(files):
        if file.kind == ".parquet":
            file_chunks = _parquet_chunks(file, number, prompt_field, rows_per_part, index)
        else:
            file_chunks = _jsonl_chunks(file, number, prompt_field, rows_per_part, index)
        chunks += file_chunks
        index += sum(c.num_rows for c in file_chunks)
    return chunks


def _part_name(file_number: int, chunk_number: int) -> str:
    return f"part-{file_number:05d}-{chunk_number:05d}.parquet"


def _parquet_chunks(file: SourceFile, number: int, prompt_field: str, rows: int, index: int) -> List[Chunk]:
    fs, path = storage.filesystem(file.location)
    try:
        with fs.open_input_file(path) as handle:
            parquet = pq.ParquetFile(handle)
            schema, total = parquet.schema_arrow, parquet.metadata.num_rows
    except Exception as exc:  # pyarrow's errors for a file that is not Parquet vary by version
        raise DataError(f"generate.input: {file.location} is not a readable Parquet file ({_one_line(exc)})") from None
    if prompt_field not in schema.names:
        raise DataError(f"generate.input: {file.location} has no column {prompt_field!r} (generate.prompt_field; "
                        f"columns: {', '.join(schema.names)})")
    if not is_string_type(schema.field(prompt_field).type):
        raise DataError(f"generate.input: {file.location} column {prompt_field!r} is "
                        f"{schema.field(prompt_field).type}, not a string")
    if total == 0:
        raise DataError(f"generate.input: {file.location} has no rows")
    return [Chunk(_part_name(number, k), file.location, file.identity, first_row=start,
                  num_rows=min(rows, total - start), first_index=index + start)
            for k, start in enumerate(range(0, total, rows))]


def _jsonl_chunks(file: SourceFile, number: int, prompt_field: str, rows: int, index: int) -> List[Chunk]:
    starts, lines, size = _line_starts(file.location, every=rows)
    _check_first_record(file, prompt_field)
    ends = starts[1:] + [size]
    return [Chunk(_part_name(number, k), file.location, file.identity, first_row=k * rows + 1,
                  num_rows=min(rows, lines - k * rows), first_index=index + k * rows,
                  byte_start=start, byte_end=end)
            for k, (start, end) in enumerate(zip(starts, ends))]


def _line_starts(location: str, every: int) -> tuple[List[int], int, int]:
    """One streaming pass: byte offsets of lines 1, every+1, 2*every+1, ...; the line count; the size."""
    fs, path = storage.filesystem(location)
    starts, lines, size, last = [0], 0, 0, b""
    with fs.open_input_stream(path) as stream:
        while block := stream.read(SCAN_BLOCK_BYTES):
            position = block.find(b"\n")
            while position >= 0:
                lines += 1
                if lines % every == 0:
                    starts.append(size + position + 1)
                position = block.find(b"\n", position + 1)
            size, last = size + len(block), block[-1:]
    if size and last != b"\n":
        lines += 1  # a last line without its newline
    if starts and starts[-1] >= size:
        starts.pop()  # a chunk boundary at the very end starts nothing
    return starts or [0], lines, size


def _check_first_record(file: SourceFile, prompt_field: str) -> None:
    """The first record decides whether the file is prompts at all: a file of other records is
    one clear error here, not a part full of per-row errors later."""
    first = _first_value(file.location)
    if first is None:
        raise DataError(f"generate.input: {file.location} has no records")
    number, value, problem = first
    if problem is None and isinstance(value, dict) and prompt_field not in value:
        raise DataError(f"generate.input: {file.location} line {number} has no {prompt_field!r} field "
                        f"(generate.prompt_field; its fields: {', '.join(map(str, value)) or 'none'})")
    # A first line that is not JSON is that row's problem, reported in the output.


def _first_value(location: str) -> Optional[tuple[int, Any, Optional[str]]]:
    """(line number, value, problem) of the first non-blank line, reading blocks until it is
    complete; None for a file without one."""
    fs, path = storage.filesystem(location)
    data = b""
    with fs.open_input_stream(path) as stream:
        while True:
            block = stream.read(SCAN_BLOCK_BYTES)
            data += block
            complete = data.rpartition(b"\n")[0] if block else data
            first = next(jsonl_values(complete), None)
            if first is not None or not block:
                return first


# ---- in a replica ----------------------------------------------------------------------------


def read_chunk(chunk: Chunk, prompt_field: str, reference_field: str) -> List[PromptRow]:
    """The chunk's rows in order (a blank .jsonl line is no row)."""
    if chunk.kind == ".parquet":
        records = _parquet_records(chunk, [prompt_field, reference_field, *SAMPLING_FIELDS])
    else:
        records = _jsonl_records(chunk)
    prompt = RecordField(prompt_field, "generate.prompt_field", prompt_field, "generate.prompt_field",
                         repr(prompt_field), f"empty {prompt_field!r}")
    rows = []
    for offset, where, value, problem in records:
        row = PromptRow(id=f"{chunk.identity}{where}", index=chunk.first_index + offset, prompt=None,
                        problem=problem)
        if problem is None:
            _fill(row, value, prompt_field, reference_field, prompt)
        rows.append(row)
    return rows


def _fill(row: PromptRow, value: Any, prompt_field: str, reference_field: str, prompt: RecordField) -> None:
    if not isinstance(value, dict):
        row.problem = f"a record must be a JSON object, got {type(value).__name__}"
        return
    if prompt_field not in value:
        row.problem = f"no {prompt_field!r} field (generate.prompt_field)"
        return
    row.problem = value_problem(prompt, value[prompt_field])
    row.prompt = value[prompt_field] if row.problem is None else None
    reference = value.get(reference_field)
    row.reference = reference if isinstance(reference, str) else None
    row.sampling = {name: value[name] for name in SAMPLING_FIELDS if value.get(name) is not None}


def _jsonl_records(chunk: Chunk) -> Iterator[tuple[int, str, Any, Optional[str]]]:
    """(offset in the chunk, ':<line>', value, problem) per non-blank line of the chunk's slice."""
    fs, path = storage.filesystem(chunk.location)
    with fs.open_input_file(path) as handle:
        handle.seek(chunk.byte_start)
        data = handle.read(chunk.byte_end - chunk.byte_start)
    for number, value, problem in jsonl_values(data.removesuffix(b"\n"), chunk.first_row, chunk.byte_start):
        yield number - chunk.first_row, f":{number}", value, problem


def _parquet_records(chunk: Chunk, wanted: List[str]) -> Iterator[tuple[int, str, Any, Optional[str]]]:
    """(offset, '#<row>', {column: value}, None) per row of the chunk: only its row groups are read."""
    fs, path = storage.filesystem(chunk.location)
    with fs.open_input_file(path) as handle:
        parquet = pq.ParquetFile(handle)
        columns = [name for name in dict.fromkeys(wanted) if name in parquet.schema_arrow.names]
        groups, first = [], 0  # the row groups overlapping the chunk, and the first one's first row
        start, end, position = chunk.first_row, chunk.first_row + chunk.num_rows, 0
        for g in range(parquet.metadata.num_row_groups):
            count = parquet.metadata.row_group(g).num_rows
            if position < end and position + count > start:
                first = position if not groups else first
                groups.append(g)
            position += count
        table = parquet.read_row_groups(groups, columns=columns).slice(start - first, chunk.num_rows)
    for offset, record in enumerate(table.to_pylist()):
        yield offset, f"#{start + offset}", record, None


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]
