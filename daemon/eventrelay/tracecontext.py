"""W3C Trace Context (https://www.w3.org/TR/trace-context/): the `traceparent` and `tracestate` values a
producer may send with its events, which eventrelay stores and passes on to targets. Read and checked here
without OpenTelemetry, which is imported only when tracing is on (tracing.py)."""

from __future__ import annotations

import re

# version-trace_id-parent_id-flags, lower-case hex; a later version may append fields after a dash.
_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-[\x21-\x7e]*)?")
_ZERO_TRACE, _ZERO_SPAN = "0" * 32, "0" * 16
MAX_TRACESTATE = 512  # the recommendation's limit, in characters
# Printable ASCII: list members are key=value pairs separated by commas, with optional spaces and tabs.
_TRACESTATE = re.compile(r"[\x20-\x7e\t]*")


def traceparent_problem(value: object) -> str | None:
    """Why `value` is not a traceparent a receiver would accept, or None when it is one."""
    if not isinstance(value, str):
        return "must be a string"
    match = _TRACEPARENT.fullmatch(value)
    if match is None:
        return "must be a W3C traceparent: 00-<32 hex digits>-<16 hex digits>-<2 hex digits>, lower case"
    version, trace_id, parent_id, _, rest = match.groups()
    if version == "ff" or (version == "00" and rest):
        return f"version {version} is not allowed with this layout"
    if trace_id == _ZERO_TRACE or parent_id == _ZERO_SPAN:
        return "the trace id and the parent id must not be all zeros"
    return None


def tracestate_problem(value: object) -> str | None:
    if not isinstance(value, str):
        return "must be a string"
    if len(value) > MAX_TRACESTATE or not _TRACESTATE.fullmatch(value):
        return f"must be printable ASCII of at most {MAX_TRACESTATE} characters (key=value pairs, comma-separated)"
    return None


def from_headers(traceparent: str | None, tracestate: str | None) -> tuple[str, str | None] | None:
    """The trace context of request headers, or None when there is none. An invalid traceparent is ignored,
    as the recommendation asks (with its tracestate); an invalid tracestate alone is dropped."""
    if traceparent is None:
        return None
    traceparent = traceparent.strip()
    if traceparent_problem(traceparent) is not None:
        return None
    if tracestate is not None and (tracestate := tracestate.strip()) and tracestate_problem(tracestate) is None:
        return traceparent, tracestate
    return traceparent, None
