"""Times as the daemon writes and reads them: ISO 8601 in UTC with a `Z`, or unix seconds.

The admin API answers in `iso_time`, and both it and the CLI read times with `parse_time` (or, where a
datetime is wanted, `parse_datetime`), so what one side writes the other reads.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Literal

Naive = Literal["refuse", "local", "utc"]


def iso_time(timestamp: float) -> str:
    """Unix seconds as ISO 8601 in UTC, to the millisecond: `2026-11-27T14:00:00.123Z`."""
    return datetime.fromtimestamp(timestamp, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_time(value: Any, naive: Naive = "refuse") -> float:
    """Unix seconds from unix seconds (a number) or ISO 8601 text (see parse_datetime); else ValueError."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return parse_datetime(value, naive).timestamp()


def parse_datetime(value: Any, naive: Naive = "refuse") -> datetime:
    """An aware datetime, in UTC, from ISO 8601 text (a trailing `Z` allowed); else ValueError.

    A time written without a zone is ambiguous: refused by default (the error says to add one), read as
    the local time where a person typed it (`local`), or as UTC.
    """
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            pass
        else:
            if parsed.tzinfo is None:
                if naive == "refuse":
                    raise ValueError(f"give a time zone, e.g. {value}Z")
                # astimezone() reads a naive time as the machine's local time, daylight saving included.
                parsed = parsed.astimezone() if naive == "local" else parsed.replace(tzinfo=timezone.utc)
            return parsed.astimezone(timezone.utc)
    raise ValueError(f"{value!r} is not an ISO 8601 time or unix seconds")
