"""Layered configuration: defaults < workspace ``vlselect.yaml`` < ``--config`` file < CLI flags.

Every layer is a mapping of stage name -> that stage's fields (the format of
``<ws>/vlselect.yaml``), so one file can configure the whole pipeline. Each stage
validates its section with a pydantic model that forbids unknown keys.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import UnionType
from typing import Any, TypeVar, Union, get_args, get_origin

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


def _sub_model(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model a field holds (``Model`` or ``Model | None``), else None."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if get_origin(annotation) not in (Union, UnionType):  # dict[str, Model], list[Model]: no
        return None
    models = [a for a in get_args(annotation) if isinstance(a, type) and issubclass(a, BaseModel)]
    return models[0] if len(models) == 1 else None


def with_defaults(
    model: type[BaseModel], values: Mapping[str, Any], default: BaseModel | None = None
) -> dict[str, Any]:
    """``values`` with each sub-config that adjusts a default filled in from that default.

    A sub-config's default can set fields of its own (an embedding space's encoder, an
    actor's half CPU). A mapping that names none of those fields adjusts the default
    (``--set clip.max_actors=8`` keeps the default encoder, ``--set
    text.encoder.torch_threads=2`` its model, ``clip.actor.num_gpus=1`` its half CPU);
    one that names any of them is a new value and replaces it (``clip.encoder={kind:
    open_clip, model: tiny-clip, weights: random}`` does not inherit ``pretrained:
    openai``). Without this, a partial mapping lost the default: a missing encoder was
    refused, a missing num_cpus took the class's 1 instead of the default's 0.5.
    ``default``: the instance whose fields are the defaults here (None: the fields' own).
    """
    out = dict(values)
    for name, field in model.model_fields.items():
        given, sub = out.get(name), _sub_model(field.annotation)
        if sub is None or not isinstance(given, Mapping):
            continue
        base = (
            getattr(default, name)
            if default is not None
            else field.get_default(call_default_factory=True)
        )
        given = dict(given)
        if isinstance(base, BaseModel) and _adjusts(sub, given, base):
            kept = base.model_dump(exclude_unset=True)
            given = {**{k: v for k, v in kept.items() if k not in given}, **given}
        else:
            base = None  # a new value: its own fields' defaults below, not the old one's
        out[name] = with_defaults(sub, given, base)
    return out


def _adjusts(model: type[BaseModel], given: Mapping[str, Any], base: BaseModel) -> bool:
    """Whether ``given`` names none of the plain fields ``base`` sets; a sub-config it
    names with a mapping adjusts or replaces that one in turn."""
    for key in set(given) & base.model_fields_set:
        field = model.model_fields.get(key)
        if field is None or _sub_model(field.annotation) is None:
            return False
        if not isinstance(given[key], Mapping):
            return False
    return True


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
        return model.model_validate(with_defaults(model, merged))
    except ValidationError as err:
        raise InputError(describe_validation_error(stage, model, err)) from None
