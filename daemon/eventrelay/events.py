"""Events as they enter the daemon: validation of what producers send, and `observes` matching."""

from __future__ import annotations

import functools
import random
import re
import time
from dataclasses import dataclass
from typing import Any, NamedTuple

from . import codec
from .text import quoted
from .tracecontext import traceparent_problem, tracestate_problem

# resource.action, lower case; resources such as `account-member` or `stock-transaction` carry dashes.
EVENT_KEY = re.compile(r"[a-z0-9][a-z0-9_-]*(?:\.[a-z0-9][a-z0-9_-]*)+")
_PATTERN = re.compile(r"\*|[a-z0-9][a-z0-9_-]*(?:\.[a-z0-9][a-z0-9_-]*)*\.\*")
# Ids travel in headers (webhook-id, STOMP `id`, SQS attributes): printable ASCII, no surrounding spaces,
# or HTTP would trim or re-encode them and receivers could not match signatures or de-duplicate.
_EVENT_ID = re.compile(r"[\x21-\x7e](?:[\x20-\x7e]*[\x21-\x7e])?")

MAX_ID_LENGTH = 128
# UUIDv7 layout: 48 bits of milliseconds, version nibble 7 at bits 76-79, variant 0b10 at bits 62-63.
_VERSION_VARIANT = 0x7 << 76 | 0x2 << 62
_KEEP = (1 << 128) - 1 ^ (0xF << 76 | 0x3 << 62)
EVENT_FIELDS = frozenset({"id", "type", "data", "included", "traceparent", "tracestate"})


class EventError(ValueError):
    """An event a producer sent that cannot be accepted; the message names the field."""


class Event(NamedTuple):
    """One accepted event. A named tuple, not a frozen dataclass: as immutable and typed, and made in a
    third of the time (a frozen dataclass sets each field through object.__setattr__), which showed at
    tens of thousands of events a second."""

    id: str
    type: str
    data: dict[str, Any]
    included: dict[str, Any] | None
    id_given: bool  # False when the daemon made the id: such an event can never be a duplicate
    payload: str  # {"data": …, "included": …} as stored and sent: encoded once, here
    traceparent: str | None = None  # the producer's W3C trace context, passed on to targets
    tracestate: str | None = None


def parse_event(obj: Any, max_depth: int | None = None, outer_levels: int = 0) -> Event:
    """Validate one decoded JSON value as an event. Raises EventError naming the offending field.

    `max_depth` bounds the nesting of the document the event sits in, `outer_levels` deep (1 in a batch's
    array); the caller checks it instead when it passes None.
    """
    if not isinstance(obj, dict):
        raise EventError(f"must be a JSON object, got {_json_kind(obj)}")
    if not EVENT_FIELDS.issuperset(obj):
        unknown = sorted(set(obj) - EVENT_FIELDS)
        raise EventError(f"{unknown[0]}: unknown field (allowed: id, type, data, included, traceparent, tracestate)")
    etype = obj.get("type")
    if etype is None:
        raise EventError("type: required (an event key such as order.paid)")
    if type(etype) is not str or not _is_event_key(etype):
        raise EventError(f"type: {quoted(etype, 60)} is not an event key "
                         "(resource.action, lower case, e.g. order.paid)")
    data = obj.get("data")
    if not isinstance(data, dict):
        raise EventError("data: required, must be a JSON object" if data is None else
                         f"data: must be a JSON object, got {_json_kind(data)}")
    included = obj.get("included")
    if included is not None and not isinstance(included, dict):
        raise EventError(f"included: must be a JSON object, got {_json_kind(included)}")
    payload = _payload(data, included, max_depth, outer_levels)
    traceparent, tracestate = obj.get("traceparent"), obj.get("tracestate")
    if traceparent is not None or tracestate is not None:
        _check_trace(traceparent, tracestate)
    eid = obj.get("id")
    if eid is None:
        return Event(new_event_id(), etype, data, included, False, payload, traceparent, tracestate)
    if not isinstance(eid, str):
        raise EventError(f"id: must be a string, got {_json_kind(eid)}")
    if not 1 <= len(eid) <= MAX_ID_LENGTH:
        raise EventError(f"id: must be 1 to {MAX_ID_LENGTH} characters, got {len(eid)}")
    if not _EVENT_ID.fullmatch(eid):
        raise EventError("id: must be printable ASCII without leading or trailing spaces (it is sent in headers)")
    return Event(eid, etype, data, included, True, payload, traceparent, tracestate)


def _check_trace(traceparent: Any, tracestate: Any) -> None:
    if traceparent is None:
        raise EventError("tracestate: goes with a traceparent")
    if problem := traceparent_problem(traceparent):
        raise EventError(f"traceparent: {problem}")
    if tracestate is not None and (problem := tracestate_problem(tracestate)):
        raise EventError(f"tracestate: {problem}")


def _payload(data: dict[str, Any], included: dict[str, Any] | None, max_depth: int | None,
             outer_levels: int) -> str:
    """The stored payload, and the depth check on it: the event nests exactly as deep as its payload (its
    other fields are strings), and brackets in the compact text only over-count (some sit in strings), so
    a low count settles it without walking the values."""
    document = {"data": data} if included is None else {"data": data, "included": included}
    payload = codec.dumps(document)
    if max_depth is not None and outer_levels + payload.count("{") + payload.count("[") > max_depth and \
            outer_levels + codec.depth(document) > max_depth:
        raise EventError(f"JSON nested deeper than listen.max_depth ({max_depth} levels)")
    return payload


# Memoised: a store has a few dozen event types, and the regular expression cost more than the rest of
# validating an event. Bounded, so producers sending random types cannot grow it.
@functools.lru_cache(maxsize=1024)
def _is_event_key(text: str) -> bool:
    return len(text) <= 200 and EVENT_KEY.fullmatch(text) is not None


def new_event_id() -> str:
    """A UUIDv7 (RFC 9562): time-ordered, so ids sort by acceptance and index inserts stay at the b-tree's end.

    Made by hand because Python 3.11's uuid module has no uuid7, and uuid.UUID() costs more than the rest
    of accepting a small event.
    """
    # 74 random bits per millisecond from the (non-cryptographic) module generator: ids need to be unique,
    # not unguessable, and os.urandom is a system call per event.
    bits = (time.time_ns() // 1_000_000) << 80 | random.getrandbits(80)
    h = f"{bits & _KEEP | _VERSION_VARIANT:032x}"  # version 7, RFC 4122 variant
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def is_observe_pattern(pattern: str) -> bool:
    """True for what `observes` accepts: an exact event key, `resource.*`, or `*`."""
    return bool(EVENT_KEY.fullmatch(pattern) or _PATTERN.fullmatch(pattern))


@dataclass(frozen=True, slots=True)
class Observes:
    """A compiled `observes` list: exact keys, prefixes (`order.*` → `order.`) and the catch-all `*`."""

    exact: frozenset[str]
    prefixes: tuple[str, ...]
    everything: bool

    @classmethod
    def compile(cls, patterns: list[str]) -> Observes:
        return cls(
            exact=frozenset(p for p in patterns if not p.endswith("*")),
            prefixes=tuple(p[:-1] for p in patterns if p.endswith(".*")),
            everything="*" in patterns,
        )

    def matches(self, event_type: str) -> bool:
        return self.everything or event_type in self.exact or event_type.startswith(self.prefixes)


def _json_kind(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
            int: "a number", float: "a number", type(None): "null"}.get(type(value), type(value).__name__)
