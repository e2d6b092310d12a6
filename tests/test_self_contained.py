"""The repository stands alone: nothing in it cites a document that lives outside it,
and every docs/ file it cites exists."""
import re
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
TEXT_SUFFIXES = {".py", ".md", ".toml", ".yaml", ".yml", ".cfg", ".txt", ""}
SKIPPED_DIRS = {".git", ".venv", "outputs", "build", "dist", "__pycache__", ".pytest_cache"}
# Documents that once lived beside the repository (spelled in pieces so this file does not cite them).
OUTSIDE = ["DESIGN" + ".md", "RAY_NOTES" + ".md", "STYLE" + ".md", "../" + "shared", "benchmarks/" + "README.md"]
DOCS_CITATION = re.compile(r"docs/[\w./-]+\.md")


def repository_text_files():
    for path in REPO_ROOT.rglob("*"):
        relative = path.relative_to(REPO_ROOT)
        if path.is_file() and path.suffix in TEXT_SUFFIXES and not SKIPPED_DIRS.intersection(relative.parts) \
                and not any(part.endswith(".egg-info") for part in relative.parts):
            yield relative, path.read_text(encoding="utf-8", errors="replace")


def test_no_citation_of_a_document_outside_the_repository():
    found = [f"{relative}: {name}" for relative, text in repository_text_files() for name in OUTSIDE if name in text]
    assert found == []


def test_every_cited_docs_file_exists():
    cited = {match for _, text in repository_text_files() for match in DOCS_CITATION.findall(text)}
    assert {"docs/architecture.md", "docs/ray-notes.md", "docs/benchmarking.md"} <= cited
    assert sorted(c for c in cited if not (REPO_ROOT / c).is_file()) == []
