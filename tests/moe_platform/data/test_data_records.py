"""Reading records out of files (anywhere): every bad file or record is a named Skip, never a crash."""
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from testkit.datasets import write_jsonl, write_parquet

from moe_platform.data.manifest import Skip
from moe_platform.data.records import Document, Instruction, RecordFormat, read_records
from moe_platform.data.sources import SourceFile


def read(path, record_format=None, **kwargs):
    file = SourceFile(location=str(path), identity=path.name, size=path.stat().st_size, mtime_ns=0)
    record_format = record_format or RecordFormat.text(kwargs.get("field", "text"), kwargs.get("column", "text"))
    return list(read_records(file, record_format))


def test_text_file_is_one_document_and_bom_is_dropped(tmp_path):
    path = tmp_path / "a.md"
    path.write_bytes("\ufeffhello\nworld\n".encode("utf-8"))
    assert read(path) == [Document("a.md", "hello\nworld\n")]


@pytest.mark.parametrize(
    "content, reason",
    [
        (b"abc\x00def", "binary file (NUL byte at 3)"),
        (b"ok" * 617 + b"\xff\xfe", "invalid UTF-8 at byte 1234"),
        (b"  \n\t\n", "empty document"),
    ],
    ids=["binary", "invalid-utf8", "empty"],
)
def test_bad_text_files_become_named_skips(tmp_path, content, reason):
    path = tmp_path / "bad.txt"
    path.write_bytes(content)
    assert read(path) == [Skip(str(path), reason)]


def test_jsonl_lines_are_documents_and_bad_lines_are_skips(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text(
        '{"text": "first"}\n'
        "\n"  # blank lines are not documents
        '{"text": "second", "meta": 1}\n'
        "{not json\n"
        '{"body": "wrong field"}\n'
        '{"text": 5}\n'
        '{"text": ""}\n',
        encoding="utf-8",
    )
    assert read(path) == [
        Document("docs.jsonl:1", "first"),
        Document("docs.jsonl:3", "second"),
        Skip(str(path), "line 4: malformed JSON (Expecting property name enclosed in double quotes)"),
        Skip(str(path), "line 5: no 'text' field (data.text_field)"),
        Skip(str(path), "line 6: text is int, not a string"),
        Skip(str(path), "line 7: empty document"),
    ]
    write_jsonl(path, ["a body"], field="body")
    assert read(path, field="body") == [Document("docs.jsonl:1", "a body")]


def test_parquet_rows_are_documents(tmp_path):
    path = tmp_path / "docs.parquet"
    write_parquet(path, "content", ["one", None, "three"])
    assert read(path, column="content") == [
        Document("docs.parquet#0", "one"),
        Skip(str(path), "row 1: null text"),
        Document("docs.parquet#2", "three"),
    ]


def test_parquet_without_text_column_or_with_wrong_type(tmp_path):
    path = tmp_path / "docs.parquet"
    write_parquet(path, "body", ["x"])
    assert read(path) == [Skip(str(path), "no column 'text' (data.text_column; columns: body)")]
    write_parquet(path, "text", [1, 2], type=pa.int64())
    assert read(path) == [Skip(str(path), "column 'text' is int64, not a string")]


def test_corrupt_parquet_and_empty_jsonl_are_skips(tmp_path):
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"PAR1 not really")
    [skip] = read(broken)
    assert isinstance(skip, Skip) and skip.reason.startswith("read error:")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    assert read(empty) == [Skip(str(empty), "no documents")]


# ---- what a new user's files look like -------------------------------------------------------


def test_a_line_nested_50000_deep_is_one_skip_not_a_crash(tmp_path):
    path = tmp_path / "deep.jsonl"
    path.write_text('{"text": "before"}\n' + "[" * 50_000 + "]" * 50_000 + '\n{"text": "after"}\n' + "[" * 50_000 + "\n")
    assert read(path) == [
        Document("deep.jsonl:1", "before"),
        Skip(str(path), "line 2: malformed JSON (the JSON input is nested more than 64 levels deep)"),
        Document("deep.jsonl:3", "after"),
        Skip(str(path), "line 4: malformed JSON (the JSON input is nested more than 64 levels deep)"),
    ]


@pytest.mark.parametrize("separator", ["\u2028", "\u2029", "\u0085", "\x0b", "\x0c", "\x1c", "\r"])
def test_records_end_at_newline_only(tmp_path, separator):
    """str.splitlines() also splits at these; raw inside a JSON string they are text (\\r is escaped by JSON,
    but a CRLF file ends each line with one, which is JSON whitespace)."""
    text = f"one{separator}two"
    path = tmp_path / "docs.jsonl"
    line = json.dumps({"text": text}, ensure_ascii=False)
    if separator == "\r":
        line = json.dumps({"text": "one two"}) + "\r"  # a raw CR inside a string is invalid JSON
        text = "one two"
    elif separator in "\x0b\x0c\x1c":
        line = json.dumps({"text": text})  # control characters are escaped in JSON
    path.write_bytes((line + "\n" + json.dumps({"text": "next"}) + "\n").encode("utf-8"))
    assert read(path) == [Document("docs.jsonl:1", text), Document("docs.jsonl:2", "next")]


def test_a_bad_utf8_line_costs_that_line_only(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"text": "bom first"}\n{"text": "caf\xe9"}\n{"text": "\xc3\xa9t\xc3\xa9"}\n')
    assert read(path) == [
        Document("docs.jsonl:1", "bom first"),
        Skip(str(path), "line 2: invalid UTF-8 at byte 38"),
        Document("docs.jsonl:3", "\u00e9t\u00e9"),
    ]


@pytest.mark.parametrize(
    "line, reason",
    [
        ('["text", "a list"]', "no 'text' field (data.text_field)"),
        ('"text"', "no 'text' field (data.text_field)"),
        ("null", "no 'text' field (data.text_field)"),
        ("12", "no 'text' field (data.text_field)"),
        ('{"text": {"nested": "object"}}', "text is dict, not a string"),
        ('{"text": ["a", "b"]}', "text is list, not a string"),
        ('{"text": null}', "null text"),
        ('{"text": NaN}', "malformed JSON (NaN is not a JSON value)"),
        ('{"text": "\\ud800 lone surrogate"}', "text holds an unpaired surrogate (character 0)"),
        ('{"text": "a"} {"text": "b"}', "malformed JSON (Extra data)"),
    ],
    ids=["list", "string", "null", "number", "object-text", "list-text", "null-text", "nan", "surrogate", "two-objects"],
)
def test_wrong_types_are_named_skips(tmp_path, line, reason):
    path = tmp_path / "docs.jsonl"
    path.write_text(line + "\n", encoding="utf-8")
    assert read(path) == [Skip(str(path), f"line 1: {reason}")]


@pytest.mark.parametrize("name, content, reason", [
    ("empty.jsonl", b"", "no documents"),
    ("empty.txt", b"", "empty document"),
    ("empty.parquet", b"", "read error"),
    ("image.jsonl", b"\x89PNG\r\n\x1a\n\x00\x00", "binary file (NUL byte at 8)"),
    ("huge_line.jsonl", b"[" * 10_000_000, "line 1: malformed JSON"),
])
def test_odd_files_are_skips(tmp_path, name, content, reason):
    path = tmp_path / name
    path.write_bytes(content)
    [skip] = read(path)
    assert isinstance(skip, Skip) and skip.path == str(path) and skip.reason.startswith(reason)


def test_one_field_description_reads_instructions_from_every_file_type(tmp_path):
    jsonl, text = tmp_path / "r.jsonl", tmp_path / "r.txt"
    jsonl.write_text('{"q": "p0", "a": "r0"}\n{"q": "p1"}\n{"q": "p2", "a": "\\ud800"}\n', encoding="utf-8")
    text.write_text("not an instruction")
    record_format = RecordFormat.instruction("q", "a")
    assert read(jsonl, record_format) == [
        Instruction("r.jsonl:1", "p0", "r0"),
        Skip(str(jsonl), "line 2: no 'a' field (data.response_field)"),
        Skip(str(jsonl), "line 3: 'a' holds an unpaired surrogate (character 0)"),
    ]
    assert read(text, record_format) == [
        Skip(str(text), "unsupported file type '.txt' for data.kind=instruction (.jsonl or .parquet)")]


def test_dictionary_encoded_parquet_strings_are_read(tmp_path):
    path = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"text": pa.array(["a", "b", "a"]).dictionary_encode()}), path)
    assert [d.text for d in read(path)] == ["a", "b", "a"]


def test_the_summary_counts_skips_by_kind_without_positions_or_library_sentences():
    from moe_platform.data.prepare import summarize_skips

    skips = [Skip("a", "line 3: malformed JSON (Expecting value)"), Skip("a", "line 9: malformed JSON (Extra data)"),
             Skip("b", "read error: Parquet magic bytes not found in footer. Either the file is corrupted"),
             Skip("c", "read error: Permission denied"), Skip("d", "invalid UTF-8 at byte 5")]
    assert summarize_skips(skips) == "5 skipped: 2 malformed JSON, 2 read error, 1 invalid UTF-8"
