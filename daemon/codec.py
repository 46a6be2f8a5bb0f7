"""JSON in and out, the same everywhere in the daemon.

The standard library's json, not a faster one: it keeps integers of any size and floats exactly, and a
relay must not turn an order number into 1.2345678901234568e+29. The encoder and decoder are built once:
json.dumps/json.loads with non-default arguments build a new one per call, which cost more than the work.
"""

from __future__ import annotations

import json
from typing import Any


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


_DECODER = json.JSONDecoder(parse_constant=_reject_constant)
_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))


def dumps(value: Any) -> str:
    """Compact JSON text, non-ASCII kept as is."""
    return _ENCODER.encode(value)


def loads(raw: bytes) -> Any:
    """Strict JSON from UTF-8 bytes; every failure is a ValueError with a message for the producer."""
    try:
        # Decode explicitly: json.loads(bytes) would guess UTF-16/32 from the first bytes; the contract is UTF-8.
        return _DECODER.decode(raw.decode("utf-8"))
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"body is not UTF-8 ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"malformed JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
