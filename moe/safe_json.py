"""One JSON loader for input from outside: request bodies, .jsonl records, config.json files.

`json.loads` trusts its input in three ways that a hostile or broken file exploits:
- nesting: the C scanner recurses once per bracket, so 50,000 '[' raise RecursionError
  (not JSONDecodeError, which callers catch), and a result nested 900 deep still
  overflows the first recursive walk over it;
- constants: NaN, Infinity and -Infinity are accepted although JSON has no such values;
- size and encoding: bytes that are not UTF-8 raise UnicodeDecodeError.
Here every one of those becomes a `JSONInputError` (a ValueError) whose message is one
line naming the problem, and the caller adds where the input came from.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Union

# Deeper than any config, record or request a person writes; far below Python's recursion limit.
MAX_DEPTH = 64


class JSONInputError(ValueError):
    """The input is not acceptable JSON; the message says why in one line.

    `problem` is the same without a position (for callers that name the position themselves,
    such as a .jsonl reader naming the line).
    """

    def __init__(self, message: str, problem: Optional[str] = None):
        super().__init__(message)
        self.problem = problem or message


def _reject_constant(name: str) -> Any:
    raise JSONInputError(f"{name} is not a JSON value")


def loads(data: Union[str, bytes, bytearray], *, max_depth: int = MAX_DEPTH,
          max_bytes: Optional[int] = None, allow_nan: bool = False) -> Any:
    """Parse one JSON document; raise JSONInputError for anything json.loads would crash on,
    for nesting deeper than `max_depth`, for input longer than `max_bytes`, and for
    NaN/Infinity unless `allow_nan`."""
    if max_bytes is not None and len(data) > max_bytes:
        raise JSONInputError(f"the JSON input is {len(data)} bytes, more than the limit of {max_bytes}")
    if isinstance(data, (bytes, bytearray)):
        try:
            data = bytes(data).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise JSONInputError(f"the JSON input is not valid UTF-8 (byte {exc.start})") from None
    try:
        value = json.loads(data, parse_constant=None if allow_nan else _reject_constant)
    except RecursionError:
        raise JSONInputError(f"the JSON input is nested more than {max_depth} levels deep") from None
    except json.JSONDecodeError as exc:
        raise JSONInputError(f"invalid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}", exc.msg) from None
    if _depth_exceeds(value, max_depth):
        raise JSONInputError(f"the JSON input is nested more than {max_depth} levels deep")
    return value


def load_file(path: Union[str, Path], *, max_depth: int = MAX_DEPTH, max_bytes: Optional[int] = None) -> Any:
    """loads() of a file; the error names the file (and a missing file is a JSONInputError too)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise JSONInputError(f"{path}: cannot be read ({exc.strerror or type(exc).__name__})") from None
    try:
        return loads(data, max_depth=max_depth, max_bytes=max_bytes)
    except JSONInputError as exc:
        raise JSONInputError(f"{path}: {exc}") from None


def _depth_exceeds(value: Any, max_depth: int) -> bool:
    """Iterative (a recursive walk is what deep input would break)."""
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            children = node.values()
        elif isinstance(node, list):
            children = node
        else:
            continue
        if depth > max_depth:
            return True
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return False
