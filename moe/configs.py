"""Config plumbing, written once: the config error, `require`, and the dict -> dataclass reader.

Every config of moe/ and moe_platform/ is a dataclass whose `__post_init__` checks its values
with `require(condition, "<key>=<value> <what is wrong>")`; a bad value is a `ConfigError` (a
ValueError) whose message is one sentence naming the key, and a job prints it as
`config error: <sentence>`. `from_dict` rebuilds a (nested) dataclass from plain data - JSON,
`dataclasses.asdict` output, a sweep's trial values, `serve run` arguments - refusing unknown
keys and coercing each value to its declared type, naming the key in every message.
"""
from __future__ import annotations

import dataclasses
import typing
from typing import Any, Mapping, Type, TypeVar, Union

T = TypeVar("T")
SCALARS = (bool, int, float, str)
_NULL_WORDS = ("none", "null")
_BOOL_WORDS = {"true": True, "1": True, "false": False, "0": False}


class ConfigError(ValueError):
    """A config value is wrong; the message is one sentence naming the key."""


def require(condition: bool, message: str) -> None:
    """Raise ConfigError(message) unless `condition` holds."""
    if not condition:
        raise ConfigError(message)


def from_dict(cls: Type[T], data: Mapping[str, Any], *, prefix: str = "", parse_strings: bool = False) -> T:
    """The dataclass `cls` built from `data`, nested dataclasses included.

    Unknown keys are refused, missing required ones named, and every value coerced to its declared
    type (an int is a valid float; a list becomes a tuple where one is declared). `prefix` is the
    section's dotted name for messages ("model."). `parse_strings`: values may arrive as text
    ("8", "false", "null"), as `serve run key=value` passes them.
    """
    section = prefix.rstrip(".") or cls.__name__
    if not isinstance(data, Mapping):
        raise ConfigError(f"{section} must be a mapping of keys to values, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = [f for f in dataclasses.fields(cls) if f.init]
    known = sorted(f.name for f in fields)
    unknown = sorted(str(key) for key in data if key not in known)
    if unknown:
        raise ConfigError(f"{prefix}{unknown[0]} is not a known key (known: {', '.join(known)})")
    missing = [f.name for f in fields if f.name not in data
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{prefix}{missing[0]} is required")
    values = {name: coerce(hints[name], value, f"{prefix}{name}", parse_strings=parse_strings)
              for name, value in data.items()}
    return cls(**values)


def coerce(hint: Any, value: Any, key: str, *, parse_strings: bool = False) -> Any:
    """`value` as the declared type `hint`; ConfigError naming `key` if it is not one."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if origin is Union:
        options = [arg for arg in args if arg is not type(None)]
        if value is None or (parse_strings and isinstance(value, str) and value.lower() in _NULL_WORDS):
            if len(options) < len(args):
                return None
            raise ConfigError(f"{key} cannot be null")
        return coerce(options[0], value, key, parse_strings=parse_strings) if len(options) == 1 else value
    if value is None:
        raise ConfigError(f"{key} cannot be null")
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, prefix=f"{key}.", parse_strings=parse_strings)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} takes a list, got {value!r}")
        item = args[0] if args else Any
        items = [coerce(item, v, f"{key}[{i}]", parse_strings=parse_strings) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key} takes a mapping, got {value!r}")
        item = args[1] if args else Any
        return {k: coerce(item, v, f"{key}.{k}", parse_strings=parse_strings) for k, v in value.items()}
    if hint in SCALARS:
        return _scalar(hint, value, key, parse_strings)
    return value  # other declared types (Literal, classes): as given; __post_init__ checks them


def _scalar(hint: type, value: Any, key: str, parse_strings: bool) -> Any:
    if parse_strings and isinstance(value, str) and hint is not str:
        value = _parsed(hint, value)
    if hint is bool:
        ok = isinstance(value, bool)
    elif hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    else:
        ok = isinstance(value, str)
    if not ok:
        raise ConfigError(f"{key} takes {hint.__name__} values, got {value!r}")
    return value


def _parsed(hint: type, text: str) -> Any:
    """The number or bool a text spells, or the text itself (which the type check then refuses)."""
    try:
        if hint is bool:
            return _BOOL_WORDS.get(text.strip().lower(), text)
        return hint(text.strip())
    except ValueError:
        return text
