"""Finding corpus files (driver) and reading documents (anywhere), including every bad input."""
import sysconfig

import pyarrow as pa
import pytest
from testkit.datasets import write_jsonl, write_parquet

from moe_platform.data import DataConfig, DataError
from moe_platform.data.config import DEFAULT_CORPUS_MAX_BYTES
from moe_platform.data.manifest import Skip
from moe_platform.data.sources import Document, SourceFile, apply_caps, find_corpus, read_documents


def find(path, **overrides):
    return find_corpus(DataConfig(input=str(path), **overrides))


def read(path, **kwargs):
    file = SourceFile(location=str(path), identity=path.name, size=path.stat().st_size, mtime_ns=0)
    return list(read_documents(file, text_field=kwargs.get("field", "text"), text_column=kwargs.get("column", "text")))


# ---- finding ---------------------------------------------------------------------------------


def test_directory_is_recursive_sorted_by_relative_identity(corpus):
    root, documents = corpus
    found = find(root)
    assert [f.identity for f in found.files] == sorted(documents)
    assert all(f.location == f"{root}/{f.identity}" for f in found.files)
    assert found.skipped == []


def test_hidden_files_are_left_out_and_other_types_are_named_skips(corpus):
    root, documents = corpus
    (root / ".git").mkdir()
    (root / ".git" / "HEAD.txt").write_text("ref")
    (root / "image.png").write_bytes(b"\x89PNG")
    found = find(root)
    assert len(found.files) == len(documents)
    assert found.skipped == [Skip(f"{root}/image.png", "unsupported file type '.png'")]


def test_single_file_and_glob(corpus):
    root, documents = corpus
    assert [f.identity for f in find(root / "doc01.md").files] == ["doc01.md"]
    globbed = find(f"{root}/**/*.txt")
    assert [f.identity for f in globbed.files] == sorted(i for i in documents if i.endswith(".txt"))
    assert [f.identity for f in find(f"{root}/doc0[12].*").files] == ["doc01.md", "doc02.py"]


def test_uri_input_and_uri_glob(corpus):
    """file:// goes through pyarrow.fs like s3:// or gs:// would: same identities, URI locations."""
    root, documents = corpus
    found = find(f"file://{root}")
    assert [f.identity for f in found.files] == sorted(documents)
    assert all(f.location == f"file://{root}/{f.identity}" for f in found.files)
    first = found.files[0]
    assert read_documents(first, text_field="text", text_column="text").__next__() == Document(
        first.identity, documents[first.identity])
    globbed = find(f"file://{root}/sub/*.txt")
    assert [f.identity for f in globbed.files] == sorted(i[4:] for i in documents if i.startswith("sub/") and i.endswith(".txt"))


def test_unknown_uri_scheme_is_a_clear_error():
    with pytest.raises(DataError, match="cannot open foo://bucket/x: Unrecognized filesystem type"):
        find_corpus(DataConfig(input="foo://bucket/x"))


def test_extensions_filter(corpus):
    root, documents = corpus
    found = find(root, extensions=[".py"])
    assert [f.identity for f in found.files] == sorted(i for i in documents if i.endswith(".py"))
    assert len(found.skipped) == len(documents) - len(found.files)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda root: root / "missing", "does not exist"),
        (lambda root: root, "has no files"),
        (lambda root: (root / "a.csv").write_text("x") and root, r"has no .*\.txt.* files"),
        (lambda root: (root / "a.csv").write_text("x") and root / "a.csv", "is a .csv file"),
        (lambda root: f"{root}/*.txt", "no files match"),
        (lambda root: f"{root}/nodir/*.txt", "does not exist"),
    ],
    ids=["missing-path", "empty-dir", "no-supported-files", "unsupported-file", "glob-no-match", "glob-no-dir"],
)
def test_unusable_input_is_a_clear_error(tmp_path, make, message):
    with pytest.raises(DataError, match=f"data.input: .*{message}"):
        find(make(tmp_path))


def test_default_corpus_is_the_stdlib_sorted_and_capped():
    found = find_corpus(DataConfig())
    assert found.is_default and found.input == sysconfig.get_paths()["stdlib"]
    identities = [f.identity for f in found.files]
    assert identities == sorted(identities)
    assert all(i.endswith(".py") and "site-packages" not in i for i in identities)
    assert sum(f.size for f in found.files) <= DEFAULT_CORPUS_MAX_BYTES
    assert len(find_corpus(DataConfig(max_documents=5)).files) == 5


def test_caps_keep_a_prefix_and_count_documents_only_while_exact():
    files = [SourceFile(f"/c/{n}", n, size, 0) for n, size in
             [("a.txt", 10), ("b.txt", 10), ("c.jsonl", 10), ("d.txt", 10), ("e.txt", 10)]]
    assert [f.identity for f in apply_caps(files, max_bytes=25, max_documents=None)] == ["a.txt", "b.txt"]
    assert [f.identity for f in apply_caps(files, max_bytes=None, max_documents=2)] == ["a.txt", "b.txt"]
    # After a multi-document file the count is unknown: later files stay, the stream cap decides.
    assert len(apply_caps(files, max_bytes=None, max_documents=3)) == 5
    assert [f.identity for f in apply_caps(files, max_bytes=1, max_documents=None)] == ["a.txt"]


# ---- reading -----------------------------------------------------------------------------------


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
