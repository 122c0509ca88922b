"""The configuration's JSON files read strictly: bounded, never blocking, no duplicate keys, no
NaN, no integers past 64 bits, and every conversion error naming the field by its JSON path and
showing the value. Everything wrong is one ConfigError line."""

import json
import math
import re
from typing import Any

import msgspec

from gpu_orchestrator.loaders.files import NotAFile, read_regular

MAX_CONFIG_BYTES = 4 * 1024 * 1024  # both files are a few KB; anything near this is not a config


class ConfigError(Exception):
    """One line: where, which field, what is wrong."""


def read_config_file(path: str, what: str) -> bytes:
    """The file's bytes, bounded and without ever blocking (see loaders/files.py)."""
    try:
        raw, whole = read_regular(path, MAX_CONFIG_BYTES)
    except NotAFile as exc:
        raise ConfigError(f"{path}: cannot read {what}: it is {exc.kind}, not a regular file; "
                          "point it at the JSON file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read {what}: {exc.strerror}") from None
    if not whole:
        raise ConfigError(f"{path}: {what} is larger than {MAX_CONFIG_BYTES} bytes; this is not a configuration file")
    return raw


class _DuplicateKey(ValueError):
    pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict:
    """JSON keeps the last of two equal keys and drops the first without a word: refuse instead."""
    document = {}
    for key, value in pairs:
        if key in document:
            raise _DuplicateKey(key)
        document[key] = value
    return document


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def read_json(path: str, what: str) -> Any:
    raw = read_config_file(path, what)
    try:
        document = json.loads(raw, object_pairs_hook=_unique_keys, parse_constant=_refuse_constant)
    except _DuplicateKey as exc:
        raise ConfigError(f"{path}: key {json.dumps(exc.args[0])} is given twice in one object; "
                          "JSON would silently keep the last one: merge them") from None
    except (ValueError, RecursionError) as exc:
        raise ConfigError(f"{path}: not valid JSON: {exc}") from None
    _refuse_huge_integers(path, document)
    return document


def _refuse_huge_integers(path: str, document: Any) -> None:
    """No number in these files means anything past 64 bits, and msgspec before 0.22 fails
    with a SystemError converting such an integer to a float: refuse it by its path."""
    pending = [("$", document)]
    while pending:  # iterative: the document may be nested as deep as the parser allows
        where, value = pending.pop()
        if isinstance(value, dict):
            pending.extend((field_path(where, key), item) for key, item in value.items())
        elif isinstance(value, list):
            pending.extend((f"{where}[{index}]", item) for index, item in enumerate(value))
        elif isinstance(value, int) and not -2**63 <= value < 2**64:
            raise ConfigError(f"{path}: {where}: {shown(value)} is larger than any number this file can mean")


def field_path(base: str, key: str) -> str:
    """A JSON path that stays on one line whatever the key holds: $.analyst or $["odd\\nname"]."""
    if key and all(c.isalnum() or c in "_-" for c in key):
        return f"{base}.{key}"
    return f"{base}[{json.dumps(key)}]"  # ASCII: \x85 or \u2028 would break the line for some readers


_STEP = re.compile(r"\.(\w+)|\[(\d+)\]")


def _value_at(value: Any, where: str) -> str | None:
    """The JSON text of what msgspec's `$.devices[1]`-style path points at inside `value`."""
    for key, index in _STEP.findall(where):
        try:
            value = value[key] if key else value[int(index)]
        except (KeyError, IndexError, TypeError):
            return None
    text = json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."


def convert(value: Any, kind: Any, path: str, field: str) -> Any:
    """msgspec.convert with the error rewritten to name the field by its JSON path, and the value."""
    try:
        return msgspec.convert(value, kind)
    except msgspec.ValidationError as exc:
        message, _, where = str(exc).partition(" - at `")
        where = where.rstrip("`") or "$"
        found = _value_at(value, where) if message.startswith(("Expected", "Number")) else None
        got = f", value {found}" if found is not None else ""
        raise ConfigError(f"{path}: {message} - at `{field}{where[1:]}`{got}") from None


def shown(value: float | int) -> str:
    """A number as the file most likely wrote it: 0 not 0.0, 1e+308 as is, 400 digits cut short."""
    if isinstance(value, float) and math.isfinite(value) and value.is_integer() and abs(value) < 1e15:
        value = int(value)
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
