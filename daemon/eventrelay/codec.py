"""JSON in and out, the same everywhere in the daemon.

orjson does the work (the standard library's decoder and encoder were the largest part of ingest's CPU),
with the standard library as the reference behind it:

* orjson turns an integer beyond 64 bits into a float, and a relay must not turn an order number into
  1.2345678901234568e+29. A body with a run of 19 or more digits anywhere (a cheap C-speed check) is
  decoded by the standard library, which keeps integers of any size; orjson refuses to encode such an
  integer, and the standard library encodes it.
* Whatever orjson rejects is decoded again by the standard library, so a producer's error message (and
  what counts as valid) is the standard library's, word for word: orjson accepts nothing the strict
  standard decoder below rejects (NaN, 1e400, lone surrogates, control characters), and decodes every
  number the same way (both round floats correctly; tests/test_codec.py checks this with hypothesis).
* A key repeated in one object is refused: decoders keep the last, others (a proxy, a receiver) the first,
  and the two would see different events. orjson cannot tell, so `loads` counts: see `_duplicate_keys`.
"""

from __future__ import annotations

import json
import re
from typing import Any

import orjson


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        # 1e400 is JSON, but as a float it is infinite, and re-encoded it would be `Infinity`: not JSON.
        raise ValueError(f"number {text[:40]} is out of range for a double")
    return value


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        seen: set[str] = set()
        key = next(k for k, _ in pairs if k in seen or seen.add(k))  # type: ignore[func-returns-value]
        raise ValueError(f"duplicate key {_ENCODER.encode(key)[:80]} in an object: each key may appear once")
    return result


_DECODER = json.JSONDecoder(parse_constant=_reject_constant, parse_float=_finite_float,
                            object_pairs_hook=_unique_pairs)
# A \uD800-\uDFFF escape that is not half of a pair decodes to a lone surrogate: not Unicode, cannot be stored.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89abcdefABCDEF]")
_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))
# Every digit becomes "0" and everything else a space, so a long digit run is one substring search away.
_DIGITS = bytes(ord("0") if ord("0") <= b <= ord("9") else ord(" ") for b in range(256))
_LONG_RUN = b"0" * 19  # 18 digits always fit in 64 bits; 19 may not (2**63 has 19)
_CONTAINERS = frozenset((dict, list))


def dumps(value: Any) -> str:
    """Compact JSON text, non-ASCII kept as is."""
    try:
        return orjson.dumps(value).decode()
    except orjson.JSONEncodeError:
        return _ENCODER.encode(value)  # integers beyond 64 bits (or a TypeError worth its own message)


def loads(raw: bytes, max_depth: int | None = None, objects_in_array: bool = True) -> Any:
    """Strict JSON from UTF-8 bytes; every failure is a ValueError with a message for the producer.

    `max_depth` bounds nesting (objects and arrays): deep documents cost stack and time all the way to the
    receivers, and no event needs them. `objects_in_array=False` leaves the objects of a top-level array to
    the caller (ingest checks each event's depth on its encoded payload, which it makes anyway).
    """
    # The standard library decodes what orjson cannot (integers beyond 64 bits) or refuses (with its message).
    exact = _LONG_RUN in raw.translate(_DIGITS)
    if not exact:
        try:
            value = orjson.loads(raw)
        except orjson.JSONDecodeError:
            exact = True
    if exact:
        value = _loads_exactly(raw)  # raises with the standard library's message (or accepts what it does)
    if max_depth is not None and _too_deep_quick(raw, value, max_depth, objects_in_array):
        raise ValueError(f"JSON nested deeper than listen.max_depth ({max_depth} levels)")
    if not exact and _duplicate_keys(raw, value):
        _loads_exactly(raw)  # raises, naming the key
    return value


def _too_deep_quick(raw: bytes, value: Any, max_depth: int, objects_in_array: bool) -> bool:
    if type(value) is list and not objects_in_array:
        # A batch whose events the caller checks: only items that are arrays are walked here, and a batch of
        # objects has none. Counting its brackets would always exceed the limit (each event has some) and
        # cost two passes over the body for nothing.
        return _too_deep(value, max_depth, objects_in_array)
    # Counting brackets is cheap and settles the common case without walking the document.
    return raw.count(b"[") + raw.count(b"{") > max_depth and _too_deep(value, max_depth, objects_in_array)


def _too_deep(value: Any, max_depth: int, objects_in_array: bool) -> bool:
    if type(value) is not list:
        return depth(value) > max_depth
    # An array of events: each item is one level down.
    return any(1 + depth(item) > max_depth for item in value
               if type(item) is list or (objects_in_array and type(item) is dict))


def _duplicate_keys(raw: bytes, value: Any) -> bool:
    """Whether `value`, decoded from `raw`, lost a repeated key: False only when that is certain.

    Every key brings a colon, and so may a string. A lost key takes its colon (and those of its value) out
    of `value`; only an escaped colon (`\\u003a`) could put one back. So without such an escape, `value`
    encoded again has as many colons as `raw` exactly when no key was lost. Otherwise the exact decoder,
    which sees every key, decides (`True`).
    """
    if b"\\" in raw and b"\\u003" in raw:
        return True
    try:
        encoded = orjson.dumps(value)
    except orjson.JSONEncodeError:  # nested deeper than orjson encodes (a caller without max_depth)
        return True
    return raw.count(b":") != encoded.count(b":")


def _loads_exactly(raw: bytes) -> Any:
    try:
        # Decode explicitly: json.loads(bytes) would guess UTF-16/32 from the first bytes; the contract is UTF-8.
        value = _DECODER.decode(raw.decode("utf-8"))
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"body is not UTF-8 ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"malformed JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    if _SURROGATE_ESCAPE.search(raw):
        try:
            _ENCODER.encode(value).encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("JSON contains a lone surrogate escape (\\ud800-\\udfff not in a pair): "
                             "not valid Unicode") from None
    return value


def depth(value: Any) -> int:
    """Nesting depth of objects and arrays (0 for a scalar), level by level: one list comprehension per
    level, no recursion."""
    levels, level = 0, [value] if type(value) in _CONTAINERS else []
    while level:
        levels += 1
        level = [child for node in level for child in (node.values() if type(node) is dict else node)
                 if type(child) in _CONTAINERS]
    return levels
