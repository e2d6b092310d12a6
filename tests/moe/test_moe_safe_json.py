"""moe.safe_json: hostile JSON becomes one JSONInputError line, never a crash."""
import json

import pytest

from moe.safe_json import JSONInputError, load_file, loads


def test_plain_documents_parse_as_json_loads_does():
    text = '{"a": [1, 2.5, "x\u2028y"], "b": null, "c": {"d": true}}'
    assert loads(text) == json.loads(text)
    assert loads(text.encode()) == json.loads(text)


@pytest.mark.parametrize("depth", [65, 900, 50_000])
def test_deep_nesting_is_refused_not_a_recursion_error(depth):
    with pytest.raises(JSONInputError, match="nested more than 64"):
        loads("[" * depth + "]" * depth)


def test_depth_limit_is_exact():
    assert loads("[" * 64 + "]" * 64) is not None
    with pytest.raises(JSONInputError):
        loads('{"a":' * 65 + "1" + "}" * 65)


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_non_json_constants_are_refused(constant):
    with pytest.raises(JSONInputError, match="not a JSON value"):
        loads(f'{{"temperature": {constant}}}')
    assert loads(f"[{constant}]", allow_nan=True)[0] != 0


def test_invalid_utf8_size_and_syntax_name_the_problem(tmp_path):
    with pytest.raises(JSONInputError, match="not valid UTF-8"):
        loads(b'{"a": "\xff"}')
    with pytest.raises(JSONInputError, match="more than the limit of 10"):
        loads(b"[" + b"1," * 20 + b"1]", max_bytes=10)
    with pytest.raises(JSONInputError, match="invalid JSON: Expecting value at line 1 column 7"):
        loads('{"a": }')
    bad = tmp_path / "config.json"
    bad.write_text("[" * 100 + "]" * 100)
    with pytest.raises(JSONInputError, match=r"config.json: the JSON input is nested"):
        load_file(bad)
    with pytest.raises(JSONInputError, match="missing.json: cannot be read"):
        load_file(tmp_path / "missing.json")
