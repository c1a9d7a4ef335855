"""Command-line flags derived from a stage's config model: one flag per top-level field.

``--field-name`` for every field of a scalar, ``Literal``, optional or list type (lists
take comma-separated values and the flag may repeat; booleans get ``--x/--no-x``); nested
models are set with ``--set a.b=VALUE``. A stage may add other spellings in its ``FLAGS``
(``{"workers": "num_workers", "metric": "selection.metric"}``: flag -> dotted field).
A field marked ``path_field`` takes a local path relative to where the command runs (made
absolute here), or a URI as given. A flag left out leaves the field to the config layers.
"""

from __future__ import annotations

import argparse
import os
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, Field


def path_field(default: Any = None, *, description: str, **kwargs: Any) -> Any:
    """A config field holding a path or URI: on the command line a relative path is taken
    relative to the current directory (in a config file, relative to the workspace)."""
    extra = {**kwargs.pop("json_schema_extra", {}), "path": True}
    if "default_factory" not in kwargs:
        kwargs["default"] = default
    return Field(description=description, json_schema_extra=extra, **kwargs)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-").replace(".", "-")


def _unwrap(annotation: Any) -> Any:
    """``X | None`` -> ``X``."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def _field_at(model: type[BaseModel], dotted: str):
    current: Any = model
    for part in dotted.split("."):
        field = current.model_fields[part]
        current = _unwrap(field.annotation)
    return field, current


class _Extend(argparse.Action):
    """A list flag: comma-separated values, and the flag may repeat."""

    def __call__(self, parser, namespace, values, option_string=None):
        items = list(getattr(namespace, self.dest, None) or [])
        items += [v for v in str(values).split(",") if v]
        setattr(namespace, self.dest, items)


def _add(parser: argparse.ArgumentParser, flags: list[str], dest: str, field, annotation) -> bool:
    """Add one flag for ``field``; False when its type has no flag (a nested model, a dict)."""
    help_text = (field.description or "").replace("%", "%%")
    origin = typing.get_origin(annotation)
    kwargs: dict[str, Any] = {"dest": dest, "default": None, "help": help_text}
    if annotation is bool:
        parser.add_argument(*flags, action=argparse.BooleanOptionalAction, **kwargs)
    elif origin is Literal:
        choices = typing.get_args(annotation)
        parser.add_argument(*flags, choices=choices, type=type(choices[0]), **kwargs)
    elif origin is list:
        parser.add_argument(*flags, action=_Extend, metavar="A,B", **kwargs)
    elif annotation in (int, float, str):
        parser.add_argument(*flags, type=annotation, **kwargs)
    else:
        return False
    return True


def add_config_flags(
    parser: argparse.ArgumentParser, model: type[BaseModel], aliases: Mapping[str, str]
) -> None:
    """A flag per top-level field of ``model``, then the stage's extra spellings."""
    taken = {s for a in parser._actions for s in a.option_strings}  # noqa: SLF001
    for name, field in model.model_fields.items():
        flag = _flag(name)
        if flag not in taken:
            _add(parser, [flag], f"cfg:{name}", field, _unwrap(field.annotation))
    for flag, dotted in aliases.items():
        field, annotation = _field_at(model, dotted)
        spellings = [f"-{flag}"] if len(flag) == 1 else [f"--{flag}"]
        _add(parser, spellings, f"cfg:{dotted}", field, annotation)


def overrides(args: argparse.Namespace, model: type[BaseModel]) -> dict[str, Any]:
    """The config layer the flags given make: ``{"a": 1, "b": {"c": 2}}``."""
    out: dict[str, Any] = {}
    for dest, value in vars(args).items():
        if not dest.startswith("cfg:") or value is None:
            continue
        dotted = dest.removeprefix("cfg:")
        field, _ = _field_at(model, dotted)
        extra = field.json_schema_extra
        if isinstance(extra, Mapping) and extra.get("path"):
            value = _absolute(value)
        node = out
        *parents, last = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return out


def _absolute(value: Any) -> Any:
    if isinstance(value, list):
        return [_absolute(v) for v in value]
    if isinstance(value, str) and "://" not in value:
        return os.path.abspath(value)
    return value
