"""A generic, strict YAML-to-dataclass converter: frozen dataclasses built from plain mappings, where an
unknown key or a value of the wrong type raises ConfigError naming its dotted path; and back to plain data."""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any

from pipelines.errors import ConfigError

__all__ = ["build", "plain"]


def plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [plain(item) for item in value]
    return value


def _type_name(annotation: Any) -> str:
    return getattr(annotation, "__name__", str(annotation)).replace("NoneType", "null")


def _convert(value: Any, annotation: Any, path: str) -> Any:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in args:
            if option is type(None):
                continue
            try:
                return _convert(value, option, path)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[0] if errors else f"{path}: null is not allowed here.")
    if dataclasses.is_dataclass(annotation):
        return build(annotation, value, path)
    if origin is tuple:
        if isinstance(value, str | int | float):
            value = [value]
        if not isinstance(value, list | tuple) or not value:
            raise ConfigError(
                f"{path}: expected a non-empty list, got {value!r}. Write e.g. `{path.split('.')[-1]}: [a, b]`."
            )
        return tuple(_convert(item, args[0], f"{path}[{index}]") for index, item in enumerate(value))
    if annotation is dict or origin is dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}.")
        return dict(value)
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {value!r}.")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}.")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{path}: expected a number, got {value!r}.")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}.")
        return value
    raise ConfigError(f"{path}: unsupported type {_type_name(annotation)}")  # pragma: no cover


def build(cls: type, mapping: Any, path: str) -> Any:
    if mapping is None:
        mapping = {}
    if not isinstance(mapping, dict):
        raise ConfigError(f"{path or 'space file'}: expected a mapping of keys, got {mapping!r}.")
    hints = typing.get_type_hints(cls)
    names = [item.name for item in dataclasses.fields(cls)]
    for key in mapping:
        if key not in names:
            where = f"{path}.{key}" if path else str(key)
            raise ConfigError(
                f"{where}: unknown key. Valid keys{' of ' + path if path else ''}: {', '.join(names)}."
            )
    defaults = {item.name: item.default for item in dataclasses.fields(cls)}
    values = {
        # an empty list is allowed where the default is empty (model.exclude: [])
        key: value
        if value == [] and defaults[key] == ()
        else _convert(value, hints[key], f"{path}.{key}" if path else key)
        for key, value in mapping.items()
    }
    values = {key: tuple(value) if value == [] else value for key, value in values.items()}
    return cls(**values)
