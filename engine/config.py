"""Layered configuration: defaults < workspace ``vlselect.yaml`` < ``--config`` file < CLI flags.

Every layer is a mapping of stage name -> that stage's fields (the format of
``<ws>/vlselect.yaml``), so one file can configure the whole pipeline. Each stage
validates its section with a pydantic model that forbids unknown keys.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from engine.errors import InputError

ModelT = TypeVar("ModelT", bound=BaseModel)


def load_yaml_file(path: str | Path, sections: Iterable[str] | None = None) -> dict[str, Any]:
    """Read a YAML mapping of stage sections (refusing any not in ``sections``, when
    given); refuse anything else with the reason."""
    path = Path(path)
    if not path.is_file():
        found = "a directory" if path.is_dir() else "nothing"
        raise InputError(
            f"config file not found: {path} holds {found} (pass an existing YAML file to --config)"
        )
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise InputError(
            f"config file {path} is not UTF-8 text ({err}); save it as UTF-8 YAML"
        ) from None
    except (yaml.YAMLError, RecursionError) as err:
        raise InputError(f"config file {path} is not valid YAML: {_yaml_problem(err)}") from None
    if data is None:
        return {}
    known = list(sections) if sections is not None else None
    if not isinstance(data, dict):
        listed = f" ({', '.join(known)})" if known else ""
        raise InputError(
            f"config file {path} must hold a mapping of stage sections{listed}; "
            f"found a {type(data).__name__}"
        )
    unknown = sorted(str(k) for k in data if known is not None and k not in known)
    if unknown:
        raise InputError(
            f"config file {path}: unknown section(s) {', '.join(unknown)}; "
            f"known sections are {', '.join(known)}"
        )
    return data


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Return ``base`` updated by ``override``; nested mappings merge, other values replace."""
    merged = copy.deepcopy(dict(base))
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def parse_set_overrides(items: list[str]) -> dict[str, Any]:
    """Turn ``["a.b=3", "c=[1, 2]"]`` into ``{"a": {"b": 3}, "c": [1, 2]}``; values parse as YAML."""
    result: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        parts = key.strip().split(".")
        if not sep or not all(p.strip() for p in parts):
            raise InputError(
                f"--set expects KEY=VALUE with a dotted KEY such as openai.timeout_s (no empty "
                f"parts); got {item!r}"
            )
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except (yaml.YAMLError, RecursionError) as err:
            raise InputError(
                f"--set {item!r}: value is not valid YAML: {_yaml_problem(err)}"
            ) from None
        node = result
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise InputError(f"--set {item!r} conflicts with another --set for {part!r}")
        node[parts[-1]] = value
    return result


def _yaml_problem(err: Exception) -> str:
    # PyYAML composes nested collections recursively: thousands of '[' exhaust the stack.
    if isinstance(err, RecursionError):
        return "it nests too deeply"
    return str(err)


def describe_validation_error(stage: str, model: type[BaseModel], err: ValidationError) -> str:
    """One line per problem, naming the key, what was there, and the allowed keys for typos."""
    lines = [f"invalid {stage} config:"]
    for problem in err.errors():
        where = ".".join(str(p) for p in problem["loc"]) or "(top level)"
        if problem["type"] == "extra_forbidden":
            parent = _model_at(model, problem["loc"][:-1])
            allowed = ", ".join(sorted(parent.model_fields)) if parent else "see the docs"
            lines.append(f"  unknown key '{where}' (allowed here: {allowed})")
        else:
            lines.append(f"  {where}: {problem['msg']} (got {problem.get('input')!r})")
    return "\n".join(lines)


def _model_at(model: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    current: Any = model
    for part in loc:
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return None
        field = current.model_fields.get(str(part))
        if field is None:
            return None
        current = field.annotation
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def build_config(stage: str, model: type[ModelT], *layers: Mapping[str, Any] | None) -> ModelT:
    """Merge the ``stage`` section of each layer (later wins) and validate it with ``model``.

    Raises:
        InputError: a section is not a mapping, a key is unknown, or a value is invalid.
    """
    merged: dict[str, Any] = {}
    for layer in layers:
        if not layer:
            continue
        section = layer.get(stage, {}) or {}
        if not isinstance(section, Mapping):
            raise InputError(f"config section '{stage}' must be a mapping; found {section!r}")
        merged = deep_merge(merged, section)
    try:
        return model.model_validate(merged)
    except ValidationError as err:
        raise InputError(describe_validation_error(stage, model, err)) from None
