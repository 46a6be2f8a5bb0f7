"""JSON in and out, the same everywhere in the daemon.

The standard library's json, not a faster one: it keeps integers of any size and floats exactly, and a
relay must not turn an order number into 1.2345678901234568e+29. The encoder and decoder are built once:
json.dumps/json.loads with non-default arguments build a new one per call, which cost more than the work.
"""

from __future__ import annotations

import json
import re
from typing import Any


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        # 1e400 is JSON, but as a float it is infinite, and re-encoded it would be `Infinity`: not JSON.
        raise ValueError(f"number {text[:40]} is out of range for a double")
    return value


_DECODER = json.JSONDecoder(parse_constant=_reject_constant, parse_float=_finite_float)
# A \uD800-\uDFFF escape that is not half of a pair decodes to a lone surrogate: not Unicode, cannot be stored.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89abcdefABCDEF]")
_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))


def dumps(value: Any) -> str:
    """Compact JSON text, non-ASCII kept as is."""
    return _ENCODER.encode(value)


def loads(raw: bytes, max_depth: int | None = None) -> Any:
    """Strict JSON from UTF-8 bytes; every failure is a ValueError with a message for the producer.

    `max_depth` bounds nesting (objects and arrays): deep documents cost stack and time all the way to the
    receivers, and no event needs them.
    """
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
    # Counting brackets is cheap and settles the common case without walking the document.
    if max_depth is not None and raw.count(b"[") + raw.count(b"{") > max_depth and _depth(value) > max_depth:
        raise ValueError(f"JSON nested deeper than listen.max_depth ({max_depth} levels)")
    return value


def _depth(value: Any) -> int:
    """Nesting depth of objects and arrays, level by level (a list comprehension per level, no recursion)."""
    depth, level = 0, [value]
    while containers := [node for node in level if type(node) in (dict, list)]:
        depth += 1
        level = [child for node in containers for child in (node.values() if type(node) is dict else node)]
    return depth
