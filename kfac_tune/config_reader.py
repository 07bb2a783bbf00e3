"""Reading YAML safely, for model YAMLs, recipes and ``--set`` values alike, and the one-paragraph errors a bad one
gets: the reader half of the config (:mod:`kfac_tune.config` holds the schema and applies overrides).

A study runs for hours, so a typo must stop it before any training: every failure becomes a ``ConfigError``
naming the file (or the ``--set`` item), the line, the field path (``search.space.lr.low``), what was expected
and what was found. The CLI prints that message and exits with code 2, never a traceback.

YAML is read by a ``yaml.SafeLoader`` subclass that also reads ``1e-4`` as a float (YAML 1.2 does; PyYAML's YAML
1.1 resolver reads it as a string, and a learning-rate range written ``low: 1e-4`` would be rejected). It
constructs plain scalars, lists and mappings only, exactly as ``yaml.safe_load``. Every text goes through the
same guards (:func:`read_document`): at most ``files.MAX_YAML_BYTES``, no alias bomb, no key given twice. A
``--set`` value read with a plain ``yaml.load`` skipped them, and a 441-byte value grew to 4 GB (issue 23).

This module knows no schema: the error wording walks whichever pydantic model it is given, so the schema can
import it and not the other way round.
"""
from __future__ import annotations

import difflib
import re
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Union

import yaml
from pydantic import BaseModel, ValidationError

MAX_NODES = 100_000  # scalars, lists and mappings after alias expansion; a real config has a few hundred
MAX_QUOTED = 80  # characters of a --set item quoted back in an error


class ConfigError(ValueError):
    """A model YAML that cannot be used; ``str(error)`` is the whole user-facing paragraph."""


class _Loader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that also reads YAML 1.2 floats without a dot (``1e-4``, ``3E5``)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+][0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def parse_value(text: str, source: str = "--set") -> Any:
    """One value as the YAML file would read it (``1e-4`` a float, ``true`` a bool, ``[32, 32]`` a list), through
    the file reader's guards; a ``ConfigError`` naming ``source`` for text that is not YAML or is too large."""
    from kfac_tune.files import MAX_YAML_BYTES

    if len(text.encode("utf-8", errors="replace")) > MAX_YAML_BYTES:
        raise ConfigError(f"{source}: expected a YAML value of at most {MAX_YAML_BYTES:,} bytes; found "
                          f"{len(text):,} characters.")
    return read_document(text, source)[0]


def read_yaml(path: str | Path) -> tuple[Any, dict[str, int]]:
    """The document in the YAML file ``path`` and its field -> line map, read safely.

    Refuses (``ConfigError``, one paragraph naming the file) what cannot be a config or recipe: a special file or
    one over ``files.MAX_YAML_BYTES``, binary content, a syntax error, a key given twice in one mapping (YAML
    would silently keep the second ``training:`` section), an alias bomb.
    """
    from kfac_tune.files import FileError, read_text

    source = str(path)
    try:
        text = read_text(path)
    except FileError as error:
        raise ConfigError(f"{error}.") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"{source}: cannot read the file ({type(error).__name__}: {error}).") from None
    raw, node = read_document(text, source)
    return raw, _line_map(node)


def read_document(text: str, source: str) -> tuple[Any, yaml.Node | None]:
    """The YAML document in ``text`` and its node graph, refused (``ConfigError`` naming ``source``) when it is
    not YAML, holds an alias bomb or a key given twice, or cannot be constructed."""
    try:
        node = yaml.compose(text, Loader=_Loader)
        nodes = _expanded_size(node, {})
        if nodes > MAX_NODES:
            raise ConfigError(f"{source}: expected a config of at most {MAX_NODES:,} values once YAML aliases are "
                              f"expanded; found {nodes:,} (an alias bomb?).")
        _check_unique_keys(source, node, set())
        raw = yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader
    except yaml.YAMLError as error:
        raise ConfigError(_yaml_problem(source, error)) from None
    except (ValueError, OverflowError, RecursionError) as error:  # e.g. a timestamp PyYAML cannot represent
        if isinstance(error, ConfigError):
            raise
        raise ConfigError(f"{source}: the YAML could not be read ({type(error).__name__}: {error}).") from None
    return raw, node


def _check_unique_keys(source: str, node: yaml.Node | None, seen: set[int]) -> None:
    """Refuse a mapping that names a key twice, with both lines (merge keys ``<<`` excepted)."""
    if node is None or id(node) in seen:
        return
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        first: dict[Any, int] = {}
        for key, value in node.value:
            if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
                line = key.start_mark.line + 1
                if key.value in first:
                    raise ConfigError(f"{source} line {line}: key {key.value!r} is given twice (first on line "
                                      f"{first[key.value]}); expected each key once (YAML would silently keep only "
                                      f"the second).")
                first[key.value] = line
            _check_unique_keys(source, value, seen)
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _check_unique_keys(source, item, seen)


def _expanded_size(node: yaml.Node | None, memo: dict[int, int]) -> int:
    """How many nodes the document holds once every alias is expanded, counted without expanding them.

    ``&a [*b, *b, ...]`` chains (the "billion laughs") compose into a small graph that every later walk (the line
    map, validation, hashing) would expand exponentially; refusing them here keeps a malicious or broken file
    from hanging the CLI.
    """
    if node is None:
        return 0
    key = id(node)
    if key not in memo:
        if isinstance(node, yaml.MappingNode):
            children = [child for pair in node.value for child in pair]
        elif isinstance(node, yaml.SequenceNode):
            children = list(node.value)
        else:
            children = []
        memo[key] = 1 + sum(_expanded_size(child, memo) for child in children)
    return memo[key]


def _line_map(node: yaml.Node | None, prefix: str = "") -> dict[str, int]:
    """Dotted field path -> 1-based line, so errors can point into the file."""
    lines: dict[str, int] = {}
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            path = f"{prefix}.{key.value}" if prefix else str(key.value)
            lines[path] = key.start_mark.line + 1
            lines.update(_line_map(value, path))
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            path = f"{prefix}[{i}]"
            lines[path] = item.start_mark.line + 1
            lines.update(_line_map(item, path))
    return lines


def _yaml_problem(source: str, error: yaml.YAMLError) -> str:
    mark = getattr(error, "problem_mark", None)
    where = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    context = getattr(error, "context", None)
    detail = f"{problem} ({context})" if context else problem
    return f"{source}{where}: expected valid YAML, found a syntax error: {detail}."


def _describe(value: Any) -> str:
    if isinstance(value, dict):
        keys = ", ".join(str(k) for k in list(value)[:6])
        return f"a mapping with keys {keys}" if value else "an empty mapping"
    if isinstance(value, list):
        return f"a list of {len(value)} item{'s' * (len(value) != 1)}"
    if value is None:
        return "nothing (null)"
    text = repr(value)
    if isinstance(value, str):  # a storage or tracking URL refused: its password masked before it is cut short
        from kfac_tune.secrets import mask

        text = mask(text, value)
    return text if len(text) <= 60 else text[:57] + "..."


def field_error(source: str | None, path: str, expected: str, found: Any, lines: Mapping[str, int]) -> ConfigError:
    line = lines.get(path)
    where = f"{source or '<config>'}{f' line {line}' if line else ''}"
    found_text = found if isinstance(found, Phrase) else _describe(found)
    return ConfigError(f"{where}: {path}: {expected}; found {found_text}.")


class Phrase(str):
    """An already-phrased 'found' clause (not to be repr'd)."""


_EXPECTED = {"int_type": "an integer", "int_parsing": "an integer", "int_from_float": "a whole number",
             "float_type": "a number", "float_parsing": "a number", "finite_number": "a finite number",
             "bool_type": "true or false", "string_type": "a string", "dict_type": "a mapping",
             "model_type": "a mapping", "model_attributes_type": "a mapping", "list_type": "a list",
             "missing": "a value (the field is required)", "too_short": "a non-empty list"}
_BOUNDS = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}


def pydantic_problem(source: str, error: ValidationError, lines: Mapping[str, int],
                     root: type[BaseModel]) -> ConfigError:
    """The first (most specific) pydantic error of validating ``root`` as one paragraph; others follow in a
    count."""
    errors = error.errors()
    first = errors[0]
    loc = list(first["loc"])
    path = _dotted(loc) or "(top level)"
    kind, ctx = first["type"], first.get("ctx") or {}
    if kind == "extra_forbidden":
        valid = _valid_keys(root, loc[:-1])
        hint = difflib.get_close_matches(str(loc[-1]), valid, n=1)
        expected = f"one of the keys {', '.join(valid)}" + (f" (did you mean {hint[0]!r}?)" if hint else "")
        found_clause: Any = Phrase(f"unknown key {str(loc[-1])!r}")
    else:
        expected = _expected(kind, first["msg"], ctx)
        found_clause = first.get("input")
        if kind == "missing":
            found_clause = Phrase("nothing")
    problem = field_error(source, path, f"expected {expected}", found_clause, lines)
    more = len(errors) - 1
    if more:
        return ConfigError(f"{problem} ({more} more problem{'s' * (more > 1)} in the file after fixing this one.)")
    return problem


def _expected(kind: str, message: str, ctx: Mapping[str, Any]) -> str:
    if kind == "value_error":
        text = message.removeprefix("Value error, ")
        return text.removeprefix("expected ")
    if kind == "literal_error":
        return f"one of {ctx.get('expected')}"
    bound = next((k for k in _BOUNDS if k in ctx), None)
    if bound:
        return f"a number {_BOUNDS[bound]} {ctx[bound]}"
    return _EXPECTED.get(kind, message[0].lower() + message[1:])


def _dotted(loc: list[Any]) -> str:
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path


def _valid_keys(root: type[BaseModel], loc: list[Any]) -> list[str]:
    """The keys accepted at ``loc`` (walking the schema from ``root``), for 'did you mean' hints."""
    annotation: Any = root
    for part in loc:
        annotation = _unwrap_optional(annotation)
        if typing.get_origin(annotation) in (dict, list):
            annotation = typing.get_args(annotation)[-1]
        elif _is_section(annotation):
            field = next((f for n, f in annotation.model_fields.items() if (f.alias or n) == part), None)
            if field is None:
                return []
            annotation = field.annotation
        else:
            return []
    annotation = _unwrap_optional(annotation)
    return [f.alias or n for n, f in annotation.model_fields.items()] if _is_section(annotation) else []


def _unwrap_optional(annotation: Any) -> Any:
    if typing.get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0] if len(args) == 1 else annotation
    return annotation


def _is_section(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)
