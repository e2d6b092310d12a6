"""Prompt files -> deterministic chunks (driver) -> rows (replica), without Ray."""
from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from moe_platform.data import DataError
from moe_platform.generate.inputs import find_input_files, plan_chunks, read_chunk


def write_lines(path, lines) -> str:
    path.write_bytes(b"".join(line.encode() + b"\n" for line in lines))
    return str(path)


def rows_of(location: str, rows_per_part: int):
    chunks = plan_chunks(find_input_files(location), "prompt", rows_per_part)
    return chunks, [row for chunk in chunks for row in read_chunk(chunk, "prompt", "response")]


def test_a_jsonl_file_is_cut_by_lines_and_every_row_is_read_once(tmp_path):
    lines = [json.dumps({"prompt": f"p{i}", "response": f"r{i}", "seed": i}) for i in range(7)]
    lines.insert(3, "")  # a blank line is no row but keeps line numbers
    chunks, rows = rows_of(write_lines(tmp_path / "a.jsonl", lines), rows_per_part=3)
    assert [(c.part, c.first_row, c.num_rows, c.first_index) for c in chunks] == [
        ("part-00000-00000.parquet", 1, 3, 0), ("part-00000-00001.parquet", 4, 3, 3),
        ("part-00000-00002.parquet", 7, 2, 6)]
    assert [r.prompt for r in rows] == [f"p{i}" for i in range(7)]
    assert [r.id for r in rows] == ["a.jsonl:1", "a.jsonl:2", "a.jsonl:3", "a.jsonl:5", "a.jsonl:6",
                                    "a.jsonl:7", "a.jsonl:8"]
    assert [r.index for r in rows] == [0, 1, 2, 4, 5, 6, 7]
    assert rows[4].reference == "r4" and rows[4].sampling == {"seed": 4}


def test_a_last_line_without_newline_is_a_row(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"prompt": "x"}\n{"prompt": "y"}')
    assert [r.prompt for r in rows_of(str(path), rows_per_part=1)[1]] == ["x", "y"]


def test_bad_rows_keep_their_place_with_the_reason(tmp_path):
    lines = ['{"prompt": "ok"}', "{not json", '{"prompt": null}', '{"question": "q"}', '["a"]', '{"prompt": " "}']
    _, rows = rows_of(write_lines(tmp_path / "a.jsonl", lines), rows_per_part=4)
    assert [r.problem for r in rows] == [
        None, "malformed JSON (Expecting property name enclosed in double quotes)", "null 'prompt'",
        "no 'prompt' field (generate.prompt_field)", "a record must be a JSON object, got list", "empty 'prompt'"]


@pytest.mark.parametrize("content, message", [
    (b"", "has no records"),
    (b"\n\n", "has no records"),
    (b'{"question": "q", "answer": "a"}\n', "line 1 has no 'prompt' field (generate.prompt_field; its fields: "
                                            "question, answer)"),
])
def test_an_unusable_jsonl_file_is_one_clear_error(tmp_path, content, message):
    (tmp_path / "a.jsonl").write_bytes(content)
    with pytest.raises(DataError, match="generate.input: .*" + message.replace("(", r"\(").replace(")", r"\)")):
        rows_of(str(tmp_path / "a.jsonl"), 4)


def test_parquet_is_cut_by_row_ranges_reading_only_the_row_groups_it_needs(tmp_path):
    table = pa.table({"prompt": [f"p{i}" for i in range(10)], "temperature": [0.5] * 10})
    pq.write_table(table, tmp_path / "b.parquet", row_group_size=3)
    chunks, rows = rows_of(str(tmp_path / "b.parquet"), rows_per_part=4)
    assert [(c.first_row, c.num_rows) for c in chunks] == [(0, 4), (4, 4), (8, 2)]
    assert [r.prompt for r in rows] == [f"p{i}" for i in range(10)]
    assert [r.id for r in rows][4:6] == ["b.parquet#4", "b.parquet#5"]
    assert rows[0].sampling == {"temperature": 0.5} and rows[0].reference is None


def test_a_directory_gives_files_in_order_with_positions_running_on(tmp_path):
    write_lines(tmp_path / "b.jsonl", ['{"prompt": "b0"}'])
    pq.write_table(pa.table({"prompt": ["a0", "a1"]}), tmp_path / "a.parquet")
    chunks, rows = rows_of(str(tmp_path), rows_per_part=8)
    assert [c.part for c in chunks] == ["part-00000-00000.parquet", "part-00001-00000.parquet"]
    assert [(r.prompt, r.index) for r in rows] == [("a0", 0), ("a1", 1), ("b0", 2)]


@pytest.mark.parametrize("make, message", [
    (lambda p: pq.write_table(pa.table({"text": ["x"]}), p / "a.parquet"), "has no column 'prompt'"),
    (lambda p: pq.write_table(pa.table({"prompt": [1]}), p / "a.parquet"), "column 'prompt' is int64, not a string"),
    (lambda p: pq.write_table(pa.table({"prompt": pa.array([], pa.string())}), p / "a.parquet"), "has no rows"),
    (lambda p: (p / "a.parquet").write_bytes(b"not parquet"), "is not a readable Parquet file"),
    (lambda p: (p / "a.txt").write_text("x"), "has no .jsonl, .parquet files"),
])
def test_an_unusable_input_is_one_clear_error_naming_generate_input(tmp_path, make, message):
    make(tmp_path)
    with pytest.raises(DataError, match="generate.input") as error:
        rows_of(str(tmp_path), 4)
    assert message in str(error.value)
    with pytest.raises(DataError, match=r"generate.input: .*missing.jsonl does not exist"):
        rows_of(str(tmp_path / "missing.jsonl"), 4)
