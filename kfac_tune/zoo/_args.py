"""Argument checking shared by the architecture and dataset registries.

Both registries take user-written keyword arguments straight from a YAML config, so a typo or a bad value must
come back as a ``ValueError`` that names the entry, the argument and what is accepted: the CLI shows these
messages verbatim.
"""
from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any


class BadArgument(Exception):
    """Raised by a builder or loader for a bad argument value; the registry adds its own name to the message."""

    def __init__(self, argument: str, expected: str, value: Any) -> None:
        super().__init__(f"argument {argument!r} must be {expected}, got {value!r}")
        self.argument = argument


def keyword_defaults(func: Callable[..., Any]) -> dict[str, Any]:
    """The keyword-only parameters of ``func`` with their defaults: the arguments a user may set."""
    return {p.name: p.default
            for p in inspect.signature(func).parameters.values()
            if p.kind is inspect.Parameter.KEYWORD_ONLY}


def check_known(kind: str, name: str, known: Iterable[str]) -> None:
    """Reject a name that is not in the registry, listing the names that are."""
    known = sorted(known)
    if name not in known:
        raise ValueError(f"unknown {kind} {name!r}; known: {', '.join(known)}")


def check_kwargs(kind: str, name: str, accepted: Sequence[str], kwargs: Mapping[str, Any]) -> None:
    """Reject keyword arguments that the entry does not take, listing the ones it does."""
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ValueError(
            f"{kind} {name!r} got unknown argument{'s' if len(unknown) > 1 else ''} "
            f"{', '.join(repr(u) for u in unknown)}; accepted arguments: {', '.join(accepted) or '(none)'}")


def bad_value(kind: str, name: str, error: BadArgument, accepted: Sequence[str]) -> ValueError:
    """Turn a builder's ``BadArgument`` into the user-facing ``ValueError``."""
    return ValueError(f"{kind} {name!r}: {error}; accepted arguments: {', '.join(accepted) or '(none)'}")


def positive_int(argument: str, value: Any) -> int:
    """An int > 0 (bools are rejected: YAML ``true`` is not a width)."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise BadArgument(argument, "a positive integer", value)
    return value


def positive_ints(argument: str, value: Any) -> tuple[int, ...]:
    """A non-empty list of ints > 0, returned as a tuple."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or not value or any(
            isinstance(v, bool) or not isinstance(v, int) or v <= 0 for v in value):
        raise BadArgument(argument, "a non-empty list of positive integers", value)
    return tuple(value)


def choice(argument: str, value: Any, options: Iterable[Any]) -> Any:
    """One of ``options``."""
    options = tuple(options)
    if value not in options:
        raise BadArgument(argument, f"one of {', '.join(repr(o) for o in options)}", value)
    return value


def boolean(argument: str, value: Any) -> bool:
    """A real bool (not 0/1 or a string such as ``"false"``)."""
    if not isinstance(value, bool):
        raise BadArgument(argument, "true or false", value)
    return value
