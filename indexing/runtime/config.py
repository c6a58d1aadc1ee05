"""Job configuration: one frozen dataclass per job, merged default → YAML file → ``key=value`` overrides.

Every key is declared once, as a field made by :func:`key`: its type (the annotation), its default and a
one-line help in the field's metadata. ``copyscan CMD --help`` and the README's key reference are both
rendered from those declarations (:func:`key_rows`, :func:`keys_text`, :func:`keys_markdown`).

Values on the command line are parsed as YAML scalars (``k=20``, ``nprobe=64``, ``weights=null``,
``storage_options={endpoint_url: http://...}``), checked against the dataclass field types, then the
config's own checks (its ``problems()``) run, and every problem of both kinds is reported at once with the
list of valid keys. The resolved config is written next to the job's outputs so a run can be reproduced
exactly.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import yaml

from copyscan.indexing.errors import CopyscanError

C = TypeVar("C")


class _Raw(str):
    """A command-line value not yet parsed: parsed as YAML unless its field is a string."""


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """``["k=10", "storage_options.endpoint_url=http://x"]`` → ``{"k": "10", "storage_options": {...}}``.

    Values stay raw strings here; :func:`resolve` parses them with the type of their field, so a string
    field keeps ``007`` as written while an integer field reads ``10`` as 10.
    """
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise CopyscanError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise CopyscanError(f"override {item!r} has an empty key")
        target = out
        parts = key.split(".")
        for part in parts[:-1]:
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                raise CopyscanError(f"override {item!r} conflicts with an earlier override of {part!r}")
        target[parts[-1]] = _Raw(raw)
    return out


def _parse_raw(value: _Raw, name: str) -> Any:
    try:
        return yaml.safe_load(value) if value != "" else ""
    except yaml.YAMLError as exc:
        raise CopyscanError(f"{name}={value}: value is not valid YAML ({exc})") from None


def load_yaml_file(path: str | None) -> dict[str, Any]:
    if not path:
        return {}
    from copyscan.indexing.store import storage

    try:
        text = storage.read_bytes(path).decode("utf-8")
    except FileNotFoundError:
        raise CopyscanError(f"config file {path} does not exist") from None
    data = yaml.safe_load(text) or {}
    if not isinstance(data, dict):
        raise CopyscanError(
            f"config file {path} must hold a mapping of key: value, not {type(data).__name__}"
        )
    return data


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(dict(out[key]), value)
        else:
            out[key] = value
    return out


def resolve(cls: type[C], *layers: Mapping[str, Any]) -> C:
    """Build ``cls`` from defaults overlaid by ``layers`` (later wins): every value parsed and checked against
    its field's type, then the config's own ``problems()``; raises one CopyscanError naming every problem.

    The config's checks run even when some values did not parse: those keys keep their defaults and missing
    required keys are None for them (``problems()`` never reads the required keys, which are URLs), so a
    run reports unknown keys, bad types and bad values together.
    """
    merged: dict[str, Any] = {}
    for layer in layers:
        merged = _merge(merged, {k: v for k, v in layer.items() if v is not None or k in merged})
    fields = {f.name: f for f in dataclasses.fields(cls)}
    errors = [_unknown(name, fields) for name in sorted(set(merged) - set(fields))]
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for name in fields:
        if name not in merged:
            continue
        try:
            values[name] = _coerce(merged[name], hints[name], name)
        except CopyscanError as exc:
            errors.append(str(exc))
    missing = [n for n, f in fields.items() if n not in values and _default(f) is dataclasses.MISSING]
    if missing:
        errors.append(f"missing required key(s): {', '.join(missing)}")
    config = cls(**dict.fromkeys(missing), **values)
    errors += problems(config)
    if errors:
        listed = errors[0] if len(errors) == 1 else "".join(f"\n  - {e}" for e in errors)
        raise CopyscanError(f"invalid {cls.__name__}: {listed}")
    return config


def problems(config: Any) -> list[str]:
    """What is wrong with ``config`` by its own checks (its ``problems()`` method; none without one)."""
    check = getattr(config, "problems", None)
    return list(check()) if check is not None else []


def validate(config: Any) -> None:
    """Raise a CopyscanError naming every problem of a config built without :func:`resolve`."""
    found = problems(config)
    if found:
        raise CopyscanError(f"invalid {type(config).__name__}: " + "; ".join(found))


def _unknown(name: str, fields: Mapping[str, Any]) -> str:
    close = difflib.get_close_matches(name, fields, n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return f"unknown key {name}{hint}; valid keys: {', '.join(sorted(fields))}"


def _default(f: dataclasses.Field) -> Any:
    """The default of field ``f`` (its factory's value for a mutable one), MISSING for a required key."""
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


_NULLS = ("null", "none", "~")


def _coerce(value: Any, hint: Any, name: str) -> Any:
    """``value`` (from YAML, or a raw command-line string) as field ``name`` of type ``hint`` wants it."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return _coerce_union(value, args, name)
    if isinstance(value, _Raw):
        if hint is str:
            return str(value)
        value = _parse_raw(value, name)
    if hint is Any:
        return value
    if origin in (dict, Mapping) or hint is dict:
        if not isinstance(value, Mapping):
            raise CopyscanError(f"{name} must be a mapping, got {value!r}")
        return {k: _parse_raw(v, f"{name}.{k}") if isinstance(v, _Raw) else v for k, v in value.items()}
    if origin in (tuple, Sequence, list) or hint in (tuple, list):
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise CopyscanError(f"{name} must be a list, got {value!r}")
        inner = args[0] if args else Any
        return tuple(_coerce(v, inner, name) for v in value)
    if hint in (bool, int, float, str):
        return _SCALARS[hint](value, name)
    return value


def _coerce_union(value: Any, args: tuple[Any, ...], name: str) -> Any:
    """``value`` as a union of ``args`` wants it: None where the union allows it; in a union with ``str`` a
    number where it takes one (``threshold=0.5`` is 0.5) and otherwise the text as written (``p90``, ``007``);
    else the first of the other types that takes it."""
    nullable = type(None) in args
    members = [arg for arg in args if arg is not type(None)]
    if nullable and (value is None or (isinstance(value, _Raw) and value.lower() in _NULLS)):
        return None
    if str in members:
        if _is_number(value):
            for number in (arg for arg in members if arg in (int, float)):
                try:
                    return _SCALARS[number](value, name)
                except CopyscanError:  # "0.5" is no int: the next number type, else the text
                    pass
        return _to_str(value, name)
    if isinstance(value, _Raw):
        value = _parse_raw(value, name)
        if value is None and nullable:
            return None
    last: CopyscanError | None = None
    for arg in members:
        try:
            return _coerce(value, arg, name)
        except CopyscanError as exc:
            last = exc
    raise last or CopyscanError(f"{name}: bad value {value!r}")


def _is_number(value: Any) -> bool:
    """A finite number, or text that reads as one (``0.5``, ``1e-3``); not a bool."""
    if isinstance(value, bool):
        return False
    if isinstance(value, (int, float)):
        return math.isfinite(value)
    if isinstance(value, str):
        try:
            return math.isfinite(float(value))
        except ValueError:
            return False
    return False


def _to_bool(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
        return value.lower() in ("true", "yes", "1")
    raise CopyscanError(f"{name} must be true or false, got {value!r}")


def _to_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise CopyscanError(f"{name} must be an integer, got {value!r}")
    try:
        return int(value)
    except ValueError:
        raise CopyscanError(f"{name} must be an integer, got {value!r}") from None


def _to_float(value: Any, name: str) -> float:
    if isinstance(value, bool):
        raise CopyscanError(f"{name} must be a number, got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise CopyscanError(f"{name} must be a number, got {value!r}") from None


def _to_str(value: Any, name: str) -> str:
    if isinstance(value, (dict, list)):
        raise CopyscanError(f"{name} must be a string, got {value!r}")
    return str(value)


_SCALARS: dict[type, Callable[[Any, str], Any]] = {
    bool: _to_bool,
    int: _to_int,
    float: _to_float,
    str: _to_str,
}


def to_dict(config: Any) -> dict[str, Any]:
    """Plain dict of a config dataclass (tuples become lists), for YAML/JSON: what is written next to the
    outputs and into manifests, so the credentials of its ``storage_options`` are redacted
    (``storage.redact``); ``config`` itself keeps them for use."""
    from copyscan.indexing.store import storage

    return storage.redact_config({k: _plain(v) for k, v in dataclasses.asdict(config).items()})


def _plain(v: Any) -> Any:
    if isinstance(v, (tuple, list)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    return v


def to_yaml(config: Any) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=True)


# ---------------------------------------------------------------------------------------------------------
# Declaring keys, and listing them (copyscan CMD --help, the README's key reference)

HELP = "help"  # the field metadata entry holding a key's one-line meaning


def key(
    default: Any = dataclasses.MISSING,
    help: str = "",
    *,
    factory: Callable[[], Any] | None = None,
    shown: bool = True,
) -> Any:
    """A config key: a dataclass field with its ``default`` (``factory`` makes a mutable one; neither: a
    required key) and ``help``, its meaning in one line, listed by ``copyscan CMD --help`` and the README.
    ``shown=False`` leaves it out of the config's repr (``storage_options``: credentials)."""
    if not help.strip() or "\n" in help:
        raise ValueError(f"a config key needs a one-line help, got {help!r}")
    if factory is not None:
        return dataclasses.field(default_factory=factory, repr=shown, metadata={HELP: help})
    return dataclasses.field(default=default, repr=shown, metadata={HELP: help})


class KeyRow(typing.NamedTuple):
    """One key of a config as listed: ``default`` as written on the command line, None when required."""

    name: str
    type: str
    default: str | None
    help: str


def key_rows(cls: type) -> list[KeyRow]:
    """The keys of config dataclass ``cls`` in declaration order."""
    hints = typing.get_type_hints(cls)
    rows = []
    for f in dataclasses.fields(cls):
        default = _default(f)
        shown = None if default is dataclasses.MISSING else default_text(default)
        rows.append(KeyRow(f.name, type_text(hints[f.name]), shown, f.metadata.get(HELP, "")))
    return rows


def type_text(hint: Any) -> str:
    """A field type as a user reads it: ``int``, ``str | float``, ``str | None``, ``list[float]``, ``dict``."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_text(arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return "None"
    if hint is Any:
        return "any"
    if hint is dict or origin in (dict, Mapping):
        return "dict"
    if origin is not None:
        args = ", ".join("..." if arg is Ellipsis else type_text(arg) for arg in typing.get_args(hint))
        return f"{getattr(origin, '__name__', str(origin))}[{args}]"
    return getattr(hint, "__name__", str(hint))


def default_text(value: Any) -> str:
    """A value as ``key=value`` on the command line would give it: ``null``, ``true``, ``""``, ``[0.5]``."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value or '""'
    if isinstance(value, (int, float)):
        return repr(value)
    return yaml.safe_dump(_plain(value), default_flow_style=True, sort_keys=False, width=1 << 20).strip()


KEYS_INTRO = (
    "Keys: key=value after the flags, or key: value in the --config YAML file (key=value wins over it)."
)


def keys_text(cls: type, flags: Mapping[str, str] | None = None) -> str:
    """The keys of ``cls`` for ``--help``: ``name: type = default`` (or ``(required)``), then the help.
    ``flags``: the command's flags that set a key too (``{"index": "--index"}``), named with it."""
    flags = flags or {}
    lines = [KEYS_INTRO]
    for row in key_rows(cls):
        flag = flags.get(row.name)
        if row.default is None:
            shown = f" (required, or {flag})" if flag else " (required)"
        else:
            shown = f" = {row.default} (or {flag})" if flag else f" = {row.default}"
        lines += [f"  {row.name}: {row.type}{shown}", f"      {row.help}"]
    return "\n".join(lines)


def keys_markdown(cls: type) -> str:
    """The keys of ``cls`` as a Markdown table (the README's key reference)."""
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for row in key_rows(cls):
        default = "required" if row.default is None else f"`{_cell(row.default)}`"
        lines.append(f"| `{row.name}` | `{_cell(row.type)}` | {default} | {_markdown_text(row.help)} |")
    return "\n".join(lines)


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _markdown_text(text: str) -> str:
    """``text`` shown as written in a Markdown table: no emphasis from ``__key__`` or ``*``, no tags."""
    text = re.sub(r"(?<![A-Za-z0-9])_|_(?![A-Za-z0-9])", r"\\_", text)
    return _cell(text.replace("*", "\\*").replace("<", "&lt;"))
