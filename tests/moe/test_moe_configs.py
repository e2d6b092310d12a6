"""moe.configs: one config error, one `require`, one dict -> dataclass reader for every config."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import pytest

from moe import ModelConfig
from moe.configs import ConfigError, coerce, from_dict, require


@dataclass
class Inner:
    top_k: int = 2
    weight: float = 1.0


@dataclass
class Outer:
    name: str
    inner: Inner = field(default_factory=Inner)
    limit: Optional[int] = None
    flag: bool = False
    tags: List[str] = field(default_factory=list)
    shape: Tuple[int, ...] = ()
    positions: Dict[str, Inner] = field(default_factory=dict)

    def __post_init__(self) -> None:
        require(bool(self.name), "outer.name must not be empty")


def test_round_trip_of_nested_dataclasses_through_plain_data():
    outer = Outer(name="x", inner=Inner(3, 0.5), limit=4, flag=True, tags=["a"], shape=(2, 3),
                  positions={"p": Inner(1, 2.0)})
    assert from_dict(Outer, dataclasses.asdict(outer)) == outer
    assert from_dict(Outer, {"name": "x", "shape": [2, 3]}).shape == (2, 3)  # JSON has no tuples
    assert from_dict(Outer, {"name": "x", "inner": {"weight": 1}}).inner.weight == 1.0 and \
        isinstance(from_dict(Outer, {"name": "x", "inner": {"weight": 1}}).inner.weight, float)


@pytest.mark.parametrize(
    "data, message",
    [
        ({"name": "x", "nmae": 1}, "nmae is not a known key (known: flag, inner, limit, name, positions, shape, tags)"),
        ({"name": "x", "inner": {"topk": 1}}, "inner.topk is not a known key"),
        ({}, "name is required"),
        ({"name": "x", "inner": {"top_k": 1.5}}, "inner.top_k takes int values, got 1.5"),
        ({"name": "x", "flag": "yes"}, "flag takes bool values, got 'yes'"),
        ({"name": "x", "limit": True}, "limit takes int values, got True"),
        ({"name": None}, "name cannot be null"),
        ({"name": "x", "tags": "a"}, "tags takes a list, got 'a'"),
        ({"name": "x", "tags": ["a", 2]}, "tags[1] takes str values, got 2"),
        ({"name": "x", "positions": {"p": {"top_k": "2"}}}, "positions.p.top_k takes int values, got '2'"),
        ({"name": "x", "inner": 3}, "inner must be a mapping of keys to values, got 3"),
        ({"name": ""}, "outer.name must not be empty"),
    ],
    ids=["unknown", "unknown-nested", "missing", "float-for-int", "string-for-bool", "bool-for-int", "null",
         "not-a-list", "list-item", "dict-item", "not-a-mapping", "post-init"],
)
def test_every_bad_value_is_one_config_error_naming_the_key(data, message):
    with pytest.raises(ConfigError) as info:
        from_dict(Outer, data, prefix="")
    assert str(info.value).startswith(message)
    assert isinstance(info.value, ValueError)  # callers that catch ValueError keep working


def test_prefix_names_the_section_and_strings_parse_when_asked():
    with pytest.raises(ConfigError, match=r"^model\.inner\.top_k takes int values, got 'two'$"):
        from_dict(Outer, {"name": "x", "inner": {"top_k": "two"}}, prefix="model.", parse_strings=True)
    parsed = from_dict(Outer, {"name": "x", "limit": "null", "flag": "false", "inner": {"top_k": "8", "weight": "0.25"}},
                       parse_strings=True)
    assert (parsed.limit, parsed.flag, parsed.inner) == (None, False, Inner(8, 0.25))
    assert coerce(Optional[float], 3, "lr") == 3.0


def test_model_config_reads_through_it():
    """The nested ModelConfig (moe/config.py) is rebuilt by the same reader, key named in the message."""
    model = ModelConfig()
    assert from_dict(ModelConfig, dataclasses.asdict(model), prefix="model.") == model
    data = dataclasses.asdict(model)
    data["moe"]["topk"] = 2
    with pytest.raises(ConfigError, match="model.moe.topk is not a known key"):
        from_dict(ModelConfig, data, prefix="model.")
