"""Typed process configuration from defaults, a TOML file, the environment and
flags, in that order of precedence (flags win).

Each process declares one frozen dataclass; every field gets a flag
(``--field-name``) and an environment variable (``PREFIX_FIELD_NAME``) with
the help text from the field's metadata. Nothing is read at import time.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import json
import os
import tomllib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def field(default: Any, help: str, **kw: Any) -> Any:
    if isinstance(default, (dict, list)):
        return dataclasses.field(default_factory=lambda: type(default)(default),
                                 metadata={"help": help, **kw})
    return dataclasses.field(default=default, metadata={"help": help, **kw})


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_arguments(parser: argparse.ArgumentParser, cls: type[Any]) -> None:
    parser.add_argument("--config", type=Path, default=None,
                        help="TOML file with any of the options below (flags override it)")
    for f in dataclasses.fields(cls):
        default = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
        shown = json.dumps(_plain(default)) if isinstance(default, (dict, list)) else default
        parser.add_argument(_flag(f.name), dest=f.name, default=None, metavar="VALUE",
                            help=f"{f.metadata.get('help', '')} (default: {shown})")


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {k: _plain(v) for k, v in dataclasses.asdict(value).items()}
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, enum.Enum):
        return value.value
    return value


def _coerce(tp: Any, value: Any, name: str) -> Any:
    origin = typing.get_origin(tp)
    if isinstance(tp, types.UnionType) or origin is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value in (None, "", "none"):
            return None
        return _coerce(args[0], value, name)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("1", "true", "yes", "on"):
            return True
        if str(value).lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{name}: expected a boolean, got {value!r}")
    if tp in (int, float, str):
        try:
            return tp(value)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{name}: expected {tp.__name__}, got {value!r}") from e
    if tp is Path:
        return Path(value)
    if origin is dict:
        if isinstance(value, str):
            value = json.loads(value)
        _, vt = typing.get_args(tp)
        return {str(k): _coerce(vt, v, name) for k, v in dict(value).items()}
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if isinstance(value, str):
            value = json.loads(value)
        known = {f.name for f in dataclasses.fields(tp)}
        unknown = set(dict(value)) - known
        if unknown:
            raise ValueError(f"{name}: unknown option(s) {sorted(unknown)}; known: {sorted(known)}")
        hints = typing.get_type_hints(tp)
        return tp(**{k: _coerce(hints[k], v, f"{name}.{k}") for k, v in dict(value).items()})
    if origin is list:
        if isinstance(value, str):
            value = json.loads(value) if value.startswith("[") else value.split(",")
        (et,) = typing.get_args(tp)
        return [_coerce(et, v, name) for v in value]
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        try:
            return tp(value)
        except ValueError as e:
            choices = ", ".join(str(m.value) for m in list(tp))
            raise ValueError(f"{name}: {value!r} is not one of {choices}") from e
    return value


def load(cls: type[T], *, args: argparse.Namespace | None = None, env_prefix: str = "",
         env: Mapping[str, str] | None = None, overrides: Mapping[str, Any] | None = None) -> T:
    env = os.environ if env is None else env
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    file_path = getattr(args, "config", None) if args is not None else None
    if file_path is not None:
        with open(file_path, "rb") as fh:
            data = tomllib.load(fh)
        known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"{file_path}: unknown option(s) {sorted(unknown)}")
        values.update(data)
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        key = f"{env_prefix}{f.name.upper()}"
        if env_prefix and key in env:
            values[f.name] = env[key]
        if args is not None and getattr(args, f.name, None) is not None:
            values[f.name] = getattr(args, f.name)
    values.update(overrides or {})
    return cls(**{k: _coerce(hints[k], v, k) for k, v in values.items()})
