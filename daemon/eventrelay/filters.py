"""Integration filters: which events an integration gets, beyond the types it observes, by their content.

A filter is a small JSON-match language over the event's `type`, `data` and `included`, compiled once into a
function, so ingest pays a few dictionary lookups per filtered integration:

    filter:
      data.status: paid                                        # equality (any JSON value)
      data.meta.display_price.with_tax.amount: {$gte: 10000}   # $gt $gte $lt $lte: numbers, or strings
      data.currency: {$in: [EUR, GBP]}                         # $in / $nin: one of a list, none of it
      data.coupon: {$exists: false}
      $or: [{data.channel: web}, {data.channel: app}]          # $and / $or: lists of filters
      $not: {data.test: true}                                  # $not: a filter, or an operator mapping

Paths are dotted keys; a number indexes a list (`included.items.0.sku`). A missing path equals nothing,
compares as nothing, is `$in` no list and is `$nin` every list. Numbers compare with numbers and strings with
strings (true and false are not numbers); anything else does not match. A path's mapping of operators must
hold as a whole; a mapping without operators is a value to equal.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

Test = Callable[[Mapping[str, Any]], bool]  # over {"type", "data", "included"}
_MISSING = object()
_ORDER = {"$gt": lambda a, b: a > b, "$gte": lambda a, b: a >= b, "$lt": lambda a, b: a < b,
          "$lte": lambda a, b: a <= b}
FIELD_OPERATORS = ("$in", "$nin", "$exists", "$not", *_ORDER)
ROOTS = ("type", "data", "included")


class FilterError(ValueError):
    """A filter that cannot be compiled: `path` says where in it (relative to the filter)."""

    def __init__(self, path: str, message: str):
        super().__init__(f"{path}: {message}" if path else message)
        self.path = path
        self.message = message


def compile_filter(spec: Any) -> Test:
    """A filter's test function; raises FilterError naming what is wrong and where."""
    return _filter(spec, "")


def _filter(spec: Any, at: str) -> Test:
    if not isinstance(spec, Mapping) or not spec:
        raise FilterError(at, "must be a mapping of paths (data.status) or $and/$or/$not to conditions")
    tests = [_clause(key, value, _join(at, str(key))) for key, value in spec.items()]
    if len(tests) == 1:
        return tests[0]
    return lambda event: all(test(event) for test in tests)


def _clause(key: Any, value: Any, at: str) -> Test:
    if not isinstance(key, str) or not key:
        raise FilterError(at, "a key must be a path (data.status) or $and, $or, $not")
    if key in ("$and", "$or"):
        if not isinstance(value, list) or not value:
            raise FilterError(at, f"{key} takes a non-empty list of filters")
        parts = [_filter(item, f"{at}[{i}]") for i, item in enumerate(value)]
        if key == "$and":
            return lambda event: all(part(event) for part in parts)
        return lambda event: any(part(event) for part in parts)
    if key == "$not":
        inner = _filter(value, at)
        return lambda event: not inner(event)
    if key.startswith("$"):
        raise FilterError(at, f"unknown operator {key} here (at the top: $and, $or, $not)")
    steps = _path(key, at)
    condition = _condition(value, at)
    return lambda event: condition(_lookup(event, steps))


def _path(key: str, at: str) -> tuple[str, ...]:
    parts = key.split(".")
    if parts[0] not in ROOTS:
        raise FilterError(at, f"a path starts with type, data or included, not {parts[0]!r}")
    if any(p == "" for p in parts):
        raise FilterError(at, "a path has no empty parts (data.status, not data..status)")
    return tuple(parts)


def _lookup(event: Mapping[str, Any], steps: tuple[str, ...]) -> Any:
    value: Any = event
    for step in steps:
        if isinstance(value, Mapping):
            value = value.get(step, _MISSING)
            if value is _MISSING:
                return _MISSING
        elif isinstance(value, list) and step.isascii() and step.isdigit() and int(step) < len(value):
            value = value[int(step)]
        else:
            return _MISSING
    return value


def _condition(value: Any, at: str) -> Callable[[Any], bool]:
    """A test of the value found at a path: equality, or a mapping of operators that must all hold."""
    if isinstance(value, Mapping) and any(isinstance(k, str) and k.startswith("$") for k in value):
        unknown = [k for k in value if k not in FIELD_OPERATORS]
        if unknown:
            raise FilterError(_join(at, str(unknown[0])), f"unknown operator (use one of {', '.join(FIELD_OPERATORS)})")
        tests = [_operator(op, arg, _join(at, op)) for op, arg in value.items()]
        return tests[0] if len(tests) == 1 else (lambda found: all(test(found) for test in tests))
    return lambda found: found is not _MISSING and _equal(found, value)


def _operator(op: str, arg: Any, at: str) -> Callable[[Any], bool]:
    if op in ("$in", "$nin"):
        if not isinstance(arg, list):
            raise FilterError(at, f"{op} takes a list of values")
        choices = list(arg)
        if op == "$in":
            return lambda found: found is not _MISSING and any(_equal(found, c) for c in choices)
        return lambda found: found is _MISSING or not any(_equal(found, c) for c in choices)
    if op == "$exists":
        if not isinstance(arg, bool):
            raise FilterError(at, "$exists takes true or false")
        return (lambda found: found is not _MISSING) if arg else (lambda found: found is _MISSING)
    if op == "$not":
        inner = _condition(arg, at)
        return lambda found: not inner(found)
    if not (_is_number(arg) or isinstance(arg, str)):
        raise FilterError(at, f"{op} compares with a number or a string, not {_kind(arg)}")
    compare = _ORDER[op]
    if isinstance(arg, str):
        return lambda found: isinstance(found, str) and compare(found, arg)
    return lambda found: _is_number(found) and compare(found, arg)


def _equal(a: Any, b: Any) -> bool:
    """JSON equality: 1 equals 1.0, true does not equal 1, objects and lists compare member by member."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if _is_number(a) and _is_number(b):
        return a == b
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not (
        isinstance(value, float) and math.isnan(value))


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", bool: "a boolean", type(None): "null"}.get(type(value), "that")


def _join(at: str, key: str) -> str:
    return f"{at}.{key}" if at else key
