"""YAML recipe → typed, nested dataclasses, with `key.sub=value` overrides.

Every value is checked against the dataclass field's type; an unknown key is rejected with the
nearest valid key suggested, and errors name the file and line the value came from (or the override
that set it), so a typo costs seconds, not a cluster job.

Shared settings are written once with YAML anchors and merge keys, as in docker-compose: top-level
keys starting with `x-` only hold anchors and are dropped, `<<: *anchor` merges a mapping (keys written
beside it win):

    x-adapter: &adapter {alpha: 16, dropout: 0.0}
    method: {name: lora, rank: 8, <<: *adapter}
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from pathlib import Path
from typing import Any, TypeVar, Union

import yaml

from flexi_workflows.errors import ConfigError, FlexiError
from flexi_workflows.recipes.bounds import bound_for, check_number

T = TypeVar("T")


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads `1e-4` (no dot) as a string; learning rates are written that way, so read it as a number."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


class _Located(dict):
    """A mapping that remembers the source line of each key (from the YAML node tree)."""

    lines: dict[str, int]


def _from_node(node: yaml.Node, source: str) -> Any:
    if isinstance(node, yaml.MappingNode):
        out = _Located()
        out.lines = {}
        merged: dict[str, Any] = {}
        for key_node, value_node in node.value:
            key = key_node.value
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`: the anchor's keys, explicit keys win
                for source_node in (value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node]):
                    value = _from_node(source_node, source)
                    if not isinstance(value, dict):
                        raise ConfigError(f"{source}:{key_node.start_mark.line + 1}: `<<` merges a mapping, "
                                          f"got {type(value).__name__}")
                    merged.update({k: v for k, v in value.items() if k not in merged})
                continue
            if key in out:
                raise ConfigError(f"{source}:{key_node.start_mark.line + 1}: duplicate key {key!r}")
            out[key] = _from_node(value_node, source)
            out.lines[key] = key_node.start_mark.line + 1
        for key, value in merged.items():
            if key not in out:
                out[key] = value
                out.lines[key] = node.start_mark.line + 1
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_from_node(v, source) for v in node.value]
    return yaml.load(yaml.serialize(node), Loader=_Loader)


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"recipe {path}: a folder, not a recipe file (jobs/ holds the shipped ones: jobs/quickstart.yaml)")
    if not path.is_file():
        raise ConfigError(f"recipe {path}: no such file")
    text = path.read_text()
    try:
        node = yaml.compose(text, Loader=_Loader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if node is None:
        raise ConfigError(f"recipe {path}: empty")
    data = _from_node(node, str(path))
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {path}: the top level must be a mapping of keys")
    for key in [k for k in data if str(k).startswith("x-")]:  # anchors' holders (`x-adapter: &adapter {...}`)
        del data[key]
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=value` → (["a", "b", "c"], value parsed as YAML, so 0.1, [2, 8], true, null work)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r}: expected key.sub=value")
    try:
        value = yaml.load(raw, Loader=_Loader) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, str]:
    """Apply overrides in place; return which override set each dotted key (for error messages)."""
    applied: dict[str, str] = {}
    for text in overrides:
        path, value = parse_override(text)
        if path[:2] == ["sweep", "space"] and len(path) > 3:  # the space's keys are dotted recipe keys
            path = path[:2] + [".".join(path[2:])]
        node = data
        for i, part in enumerate(path[:-1]):
            if isinstance(node, list):
                node = node[_index(part, path, text, len(node))]
            else:
                if part not in node or node[part] is None:
                    if path[i + 1].isdigit():  # an index into a list the recipe does not have (it is empty)
                        _index(path[i + 1], path, text, 0)
                    node[part] = {}
                node = node[part]
            if not isinstance(node, (dict, list)):
                raise ConfigError(f"override {text!r}: {'.'.join(path[: i + 1])} is a value ({node!r}), not a section "
                                  f"or list to go into")
        last = path[-1]
        if isinstance(node, list):
            node[_index(last, path, text, len(node))] = value
        else:
            node[last] = value
            if isinstance(node, _Located):
                node.lines.pop(last, None)
        applied[".".join(path)] = text
    return applied


def _index(part: str, path: list[str], text: str, length: int) -> int:
    try:
        index = int(part)
    except ValueError:
        raise ConfigError(f"override {text!r}: {part!r} must be a list index") from None
    if not 0 <= index < length:
        raise ConfigError(f"override {text!r}: index {index} is out of range (the list has {length} item"
                          f"{'' if length == 1 else 's'}; to add one, set the whole list)")
    return index


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _where(ctx: dict, path: str) -> str:
    parts = path.split(".")
    for n in range(len(parts), 0, -1):  # the override that set this key, or a section holding it
        override = ctx["overrides"].get(".".join(parts[:n]))
        if override:
            return f"override {override!r}"
    line = ctx["lines"].get(path)
    return f"{ctx['source']}:{line}" if line else ctx["source"]


def _convert(value: Any, tp: Any, path: str, ctx: dict) -> Any:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, path, ctx)
            except ConfigError as exc:
                errors.append(exc)
        raise errors[0] if len(errors) == 1 else ConfigError(
            f"{_where(ctx, path)}: {path} must be {' or '.join(_type_name(a) for a in args)}, got {value!r}"
        )
    if origin is typing.Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            hint = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
            more = f"; did you mean {hint[0]!r}?" if hint else ""
            raise ConfigError(f"{_where(ctx, path)}: {path} must be one of {list(choices)}, got {value!r}{more}")
        return value
    if origin is list:
        (item_tp,) = typing.get_args(tp) or (Any,)
        if not isinstance(value, list):
            raise ConfigError(f"{_where(ctx, path)}: {path} must be a list, got {value!r}")
        return [_convert(v, item_tp, f"{path}.{i}", ctx) for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{_where(ctx, path)}: {path} must be a section (key: value mapping), got {value!r}")
        if hasattr(tp, "variant"):  # a family of configs told apart by `name` (methods)
            try:
                tp = tp.variant(value.get("name"))
            except FlexiError as exc:
                raise ConfigError(f"{_where(ctx, path + '.name')}: {path}.{exc}") from None
        return _build(tp, value, path, ctx)
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{_where(ctx, path)}: {path} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{_where(ctx, path)}: {path} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{_where(ctx, path)}: {path} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{_where(ctx, path)}: {path} must be a string, got {value!r}")
        return value
    if tp is dict or typing.get_origin(tp) is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{_where(ctx, path)}: {path} must be a mapping, got {value!r}")
        return dict(value)
    raise TypeError(f"unsupported recipe field type {tp!r} at {path}")


def _build(cls: type[T], data: dict, prefix: str, ctx: dict) -> T:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    lines = getattr(data, "lines", {})
    for key, line in lines.items():
        ctx["lines"][f"{prefix}.{key}" if prefix else key] = line
    kwargs = {}
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else key
        if key not in fields:
            hint = difflib.get_close_matches(key, list(fields), n=1, cutoff=0.5)
            more = f"; did you mean {(prefix + '.' if prefix else '') + hint[0]!r}?" if hint else ""
            valid = ", ".join(sorted(fields))
            raise ConfigError(f"{_where(ctx, path)}: unknown key {path!r}{more} (valid here: {valid})")
        kwargs[key] = _convert(value, hints[key], path, ctx)
        _check_range(kwargs[key], cls, key, path, ctx)
    try:
        return cls(**kwargs)
    except FlexiError as exc:
        # __post_init__ checks that span several keys; point at the section
        where = _where(ctx, prefix) if prefix else ctx["source"]
        raise ConfigError(f"{where}: {prefix or 'recipe'}: {exc}") from None
    except TypeError as exc:
        missing = str(exc).split("argument", 1)[-1].strip(": ")
        raise ConfigError(f"{ctx['source']}: section {prefix or '(top level)'} is missing {missing}") from None


def _check_range(value: Any, cls: type, key: str, path: str, ctx: dict) -> None:
    """Every number against its field's bound (recipes/bounds.py); lists item by item; floats finite."""
    bound = bound_for(cls, key)
    for i, item in (enumerate(value) if isinstance(value, list) else [(None, value)]):
        need = check_number(item, bound)
        if need:
            where = path if i is None else f"{path}.{i}"
            raise ConfigError(f"{_where(ctx, path)}: {where} must be {need}, got {item!r}")


def build(cls: type[T], data: dict[str, Any], *, source: str = "recipe", overrides: list[str] | None = None) -> T:
    """Turn a plain mapping into `cls`, applying `key.sub=value` overrides first."""
    applied = apply_overrides(data, overrides or [])
    ctx = {"source": source, "lines": {}, "overrides": applied}
    if hasattr(cls, "variant"):
        cls = cls.variant(data.get("name"))
    return _build(cls, data, "", ctx)


def load(cls: type[T], path: str | Path, overrides: list[str] | None = None) -> T:
    return build(cls, read_yaml(path), source=str(path), overrides=overrides)


def to_dict(obj: Any) -> Any:
    return dataclasses.asdict(obj)


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """`{"a": {"b": 1}}` → `{"a.b": 1}` (lists kept as values), e.g. for MLflow params."""
    out: dict[str, Any] = {}
    if dataclasses.is_dataclass(data):
        data = dataclasses.asdict(data)
    if isinstance(data, dict):
        for key, value in data.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    out[prefix[:-1]] = data
    return out
