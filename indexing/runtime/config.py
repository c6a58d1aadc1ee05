"""Job configuration: one frozen dataclass per job, merged default → YAML file → ``key=value`` overrides.

Values on the command line are parsed as YAML scalars (``k=20``, ``nprobe=64``, ``weights=null``,
``storage_options={endpoint_url: http://...}``), checked against the dataclass field types, and every
problem is reported at once with the list of valid keys. The resolved config is written next to the
job's outputs so a run can be reproduced exactly.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import yaml

from indexing.errors import CopyscanError

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
    from indexing.store import storage

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
    """Build ``cls`` from defaults overlaid by ``layers`` (later wins); validate every field."""
    merged: dict[str, Any] = {}
    for layer in layers:
        merged = _merge(merged, {k: v for k, v in layer.items() if v is not None or k in merged})
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(merged) - set(fields))
    errors = []
    if unknown:
        errors.append(f"unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(sorted(fields))}")
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for name in fields:
        if name not in merged:
            continue
        try:
            values[name] = _coerce(merged[name], hints[name], name)
        except CopyscanError as exc:
            errors.append(str(exc))
    missing = [
        n
        for n, f in fields.items()
        if n not in values and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        errors.append(f"missing required key(s): {', '.join(missing)}")
    if errors:
        raise CopyscanError(f"invalid {cls.__name__}: " + "; ".join(errors))
    config = cls(**values)
    validate = getattr(config, "validate", None)
    if validate is not None:
        validate()
    return config


def _coerce(value: Any, hint: Any, name: str) -> Any:
    """``value`` (from YAML, or a raw command-line string) as field ``name`` of type ``hint`` wants it."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if isinstance(value, _Raw):
        wants_str = hint is str or (origin in (typing.Union, types.UnionType) and str in args)
        if wants_str and value.lower() not in ("null", "none", "~"):
            return str(value)
        value = _parse_raw(value, name)
    if origin in (typing.Union, types.UnionType):
        return _coerce_union(value, args, name)
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
    """The first of the union's types ``args`` that takes ``value``; None where the union allows it."""
    if value is None and type(None) in args:
        return None
    last: CopyscanError | None = None
    for arg in args:
        if arg is type(None):
            continue
        try:
            return _coerce(value, arg, name)
        except CopyscanError as exc:
            last = exc
    raise last or CopyscanError(f"{name}: bad value {value!r}")


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
    """Plain dict of a config dataclass (tuples become lists), for YAML/JSON."""

    def plain(v: Any) -> Any:
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return {k: plain(v) for k, v in dataclasses.asdict(config).items()}


def to_yaml(config: Any) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=True)
