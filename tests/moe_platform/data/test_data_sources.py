"""Finding corpus files (driver), including every unusable input; reading them is test_data_records.py."""
import sysconfig

import pytest
from testkit.datasets import write_jsonl, write_parquet

from moe_platform.data import DataConfig, DataError
from moe_platform.data.config import DEFAULT_CORPUS_MAX_BYTES
from moe_platform.data.manifest import Skip
from moe_platform.data.records import Document, RecordFormat, read_records
from moe_platform.data.sources import SourceFile, apply_caps, find_corpus


def find(path, **overrides):
    return find_corpus(DataConfig(input=str(path), **overrides))


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
    assert read_records(first, RecordFormat.text()).__next__() == Document(
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


def test_a_symlink_loop_lists_each_file_once(corpus):
    """`current -> .` inside a corpus must not repeat every file below it at each level of the loop."""
    root, documents = corpus
    (root / "sub" / "current").symlink_to(root / "sub")
    (root / "alias.txt").symlink_to(root / "doc01.md")
    found = find(root)
    assert [f.identity for f in found.files] == sorted(documents)
