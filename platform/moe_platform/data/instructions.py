"""A built-in instruction set of our own making: "what does this function do?" from the stdlib.

Nothing can be downloaded, yet finetuning needs prompt/response pairs, so -
like the default text corpus - they come from the running interpreter's
standard library sources. Every public function or method with a docstring
becomes one record:

    prompt:   # json.encoder.JSONEncoder.encode
              def encode(self, o):
    response: Return a JSON string representation of a Python data structure.

(the response is the docstring's first paragraph, its lines joined). Files are
visited in sorted order and definitions in source order, so the same
interpreter always gives the same records. `write_stdlib_instructions` writes
them as JSON Lines; `builtin_corpus` is what prepare uses when
`data.kind=instruction` and `data.input` is unset (prepare.find_input): the
records go to a .jsonl file that is then read like any user's file.
"""
from __future__ import annotations

import ast
import hashlib
import json
import logging
import os
import tempfile
from typing import Iterator, Optional

from moe_platform.data import storage
from moe_platform.data.config import DataConfig
from moe_platform.data.errors import DataError
from moe_platform.data.sources import Corpus, SourceFile, default_corpus_location, list_stdlib

log = logging.getLogger(__name__)

# "A few thousand" records: enough to see a finetuning loss fall, seconds to generate and prepare.
DEFAULT_INSTRUCTION_RECORDS = 4000
BUILTIN_IDENTITY = "stdlib_instructions.jsonl"
# Test suites document tests, not an API; a record per test_* function would be noise.
EXCLUDED_DIRS = {"test", "tests", "idle_test"}
# Keep records short enough that a few of them fit a row at small seq_len.
MAX_PROMPT_CHARS = 300
MAX_RESPONSE_CHARS = 600
MIN_RESPONSE_CHARS = 12


def stdlib_records(location: Optional[str] = None) -> Iterator[dict[str, str]]:
    """{"prompt", "response", "source"} for each documented public function, in a fixed order."""
    for file in list_stdlib(location or default_corpus_location()):
        module = _module_name(file.identity)
        if module is None:
            continue
        try:
            tree = ast.parse(storage.read_bytes(file.location).decode("utf-8"))
        except (SyntaxError, ValueError, UnicodeDecodeError):
            continue  # a few stdlib files are deliberately broken (test data); not an API
        for qualname, node in _documented_functions(tree.body, prefix=""):
            record = _record(module, qualname, node)
            if record is not None:
                record["source"] = f"{file.identity}:{node.lineno}"
                yield record


def instruction_lines(
    *, max_records: Optional[int] = None, max_bytes: Optional[int] = None,
    prompt_field: str = "prompt", response_field: str = "response",
) -> list[str]:
    """The records as JSON Lines (each ending in a newline), within both caps (None = no cap)."""
    lines, total = [], 0
    for record in stdlib_records():
        if max_records and len(lines) >= max_records:
            break
        line = json.dumps({prompt_field: record["prompt"], response_field: record["response"],
                           "source": record["source"]}, ensure_ascii=False) + "\n"
        size = len(line.encode("utf-8"))
        if max_bytes and lines and total + size > max_bytes:
            break
        lines.append(line)
        total += size
    return lines


def write_stdlib_instructions(
    path: str, max_records: Optional[int] = None, *, prompt_field: str = "prompt", response_field: str = "response",
) -> int:
    """Write the built-in instruction set to `path` (local path or URI) as JSON Lines; returns the record count.

    max_records=None writes every record the standard library gives (well over the
    DEFAULT_INSTRUCTION_RECORDS that prepare uses by default).
    """
    lines = instruction_lines(max_records=max_records, prompt_field=prompt_field, response_field=response_field)
    location = storage.absolute(path)
    storage.write_bytes_atomically(location, "".join(lines).encode("utf-8"))
    return len(lines)


def builtin_corpus(config: DataConfig, max_bytes: Optional[int]) -> Corpus:
    """The built-in set as a one-file Corpus (`data.kind=instruction`, `data.input` unset).

    The file is written to a content-addressed name in the temp directory, so reruns find the same
    bytes; the fingerprint covers its sha256 (via `Corpus.generated`), not its path or mtime.
    Ray tasks read it from there, so on a multi-node cluster write the set to shared storage with
    write_stdlib_instructions and pass it as data.input (README).
    """
    lines = instruction_lines(max_records=config.max_documents or DEFAULT_INSTRUCTION_RECORDS, max_bytes=max_bytes,
                              prompt_field=config.prompt_field, response_field=config.response_field)
    if not lines:
        raise DataError(f"the standard library at {default_corpus_location()} gave no instruction records; "
                        "set data.input")
    data = "".join(lines).encode("utf-8")
    sha256 = hashlib.sha256(data).hexdigest()
    location = _cached_file(data, sha256)
    log.info("built-in instruction set: %d records from the standard library in %s", len(lines), location)
    # mtime 0: the file is rewritten whenever the cache is cleared, but its identity is its content.
    file = SourceFile(location=location, identity=BUILTIN_IDENTITY, size=len(data), mtime_ns=0)
    generated = {"generator": "stdlib_instructions", "records": len(lines), "sha256": sha256}
    return Corpus(input=default_corpus_location(), files=[file], skipped=[], is_default=True, generated=generated)


def _cached_file(data: bytes, sha256: str) -> str:
    directory = os.path.join(tempfile.gettempdir(), f"moe_platform-{os.getuid()}")
    os.makedirs(directory, exist_ok=True)
    location = os.path.join(directory, f"stdlib_instructions-{sha256[:16]}.jsonl")
    if not os.path.exists(location):
        # A unique temporary name, then an atomic rename: concurrent runs never read half a file.
        handle, temporary = tempfile.mkstemp(dir=directory, suffix=".tmp")
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
        os.replace(temporary, location)
    return location


def _module_name(identity: str) -> Optional[str]:
    """'json/encoder.py' -> 'json.encoder'; None for private modules and test suites."""
    parts = identity[: -len(".py")].split("/")
    if parts[-1] == "__init__":
        parts = parts[:-1]
    if not parts or EXCLUDED_DIRS.intersection(parts) or any(p.startswith("_") for p in parts):
        return None
    return ".".join(parts)


def _documented_functions(body: list[ast.stmt], prefix: str) -> Iterator[tuple[str, ast.AST]]:
    """(qualified name, node) of public functions with docstrings, classes walked; first definition wins."""
    seen = set()
    for node in body:
        if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
            yield from _documented_functions(node.body, f"{prefix}{node.name}.")
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not node.name.startswith("_"):
            if node.name not in seen and ast.get_docstring(node):
                seen.add(node.name)
                yield prefix + node.name, node


def _record(module: str, qualname: str, node: ast.AST) -> Optional[dict[str, str]]:
    returns = f" -> {ast.unparse(node.returns)}" if node.returns else ""
    keyword = "async def" if isinstance(node, ast.AsyncFunctionDef) else "def"
    prompt = f"# {module}.{qualname}\n{keyword} {node.name}({ast.unparse(node.args)}){returns}:"
    paragraph = ast.get_docstring(node, clean=True).split("\n\n", 1)[0]
    response = " ".join(line.strip() for line in paragraph.splitlines()).strip()
    if not (MIN_RESPONSE_CHARS <= len(response) <= MAX_RESPONSE_CHARS) or len(prompt) > MAX_PROMPT_CHARS:
        return None
    return {"prompt": prompt, "response": response}
