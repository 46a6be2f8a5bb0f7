"""The values an operator writes, in the configuration or on the command line: one grammar for each.

Each converter takes what YAML (or argv) gave and returns the value, or raises ValueError with a message
that says what to write instead; the config reader puts the key's path in front of it.

Durations are the same everywhere: `250ms`, `10s`, `5m`, `24h`, `7d`, `2w`, several of them added up
(`1h30m`, `1d 6h`), or a bare number of seconds (a YAML number, not text: a quoted "10" is more likely
a mistake than a duration).
"""

from __future__ import annotations

import re
import ssl
from typing import Any, Callable
from urllib.parse import urlsplit

from .text import quoted

DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)")  # `ms` before `m`: 5ms is not 5m + s
_DURATION = re.compile(rf"\s*(?:{_DURATION_PART.pattern}\s*)+")
_DURATION_HINT = "write e.g. 250ms, 10s, 5m, 24h, 7d"
_SIZE = re.compile(r"(\d+)\s*(B|KiB|MiB|GiB|KB|MB|GB)?")
_SIZE_UNITS = {None: 1, "B": 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3, "KB": 1000, "MB": 1000**2, "GB": 1000**3}
_RATE = re.compile(r"(\d+(?:\.\d+)?)\s*/\s*(s|m|h)")
_RATE_UNITS = {"s": 1, "m": 60, "h": 3600}


# -- durations, sizes, rates ---------------------------------------------------------------------------------

def parse_duration(value: Any) -> float:
    """Seconds from a duration (see the module's docstring); never negative."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a duration ({_DURATION_HINT})")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError(f"{value!r} must not be negative")
        return float(value)
    text = str(value)
    if not _DURATION.fullmatch(text):
        raise ValueError(f"{value!r} is not a duration ({_DURATION_HINT})")
    return sum(float(number) * DURATION_UNITS[unit] for number, unit in _DURATION_PART.findall(text))


def positive_duration(value: Any) -> float:
    seconds = parse_duration(value)
    if seconds <= 0:
        raise ValueError(f"{value!r} must be greater than zero")
    return seconds


def duration_range(low: float, high: float) -> Callable[[Any], float]:
    def convert(value: Any) -> float:
        seconds = parse_duration(value)
        if not low <= seconds <= high:
            raise ValueError(f"{value!r} must be from {format_duration(low)} to {format_duration(high)}")
        return seconds
    return convert


def format_duration(seconds: float) -> str:
    """A duration in its two largest units, whole: 45s, 2m 5s, 4h 12m, 3d 4h (parse_duration reads it back)."""
    s = int(seconds)
    for unit, size, sub, sub_size in (("d", 86400, "h", 3600), ("h", 3600, "m", 60), ("m", 60, "s", 1)):
        if s >= size:
            rest = (s % size) // sub_size
            return f"{s // size}{unit}" + (f" {rest}{sub}" if rest else "")
    return f"{s}s"


def parse_size(value: Any) -> int:
    """Bytes from `1MiB`, `512KiB`, `64KB` or a whole number of bytes; more than zero."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    m = _SIZE.fullmatch(str(value).strip())
    if not m or int(m.group(1)) == 0:
        raise ValueError(f"{value!r} is not a size (write e.g. 1MiB, 512KiB or a number of bytes)")
    return int(m.group(1)) * _SIZE_UNITS[m.group(2)]


def parse_rate(value: Any) -> float:
    """Per second, from `50/s`, `600/m`, `10000/h`, or a number per second; more than zero."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
        return float(value)
    m = _RATE.fullmatch(str(value).strip())
    if not m or float(m.group(1)) <= 0:
        raise ValueError(f"{value!r} is not a rate (write e.g. 50/s, 600/m or 10000/h)")
    return float(m.group(1)) / _RATE_UNITS[m.group(2)]


# -- scalars ------------------------------------------------------------------------------------------------

def int_range(low: int, high: int) -> Callable[[Any], int]:
    def convert(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ValueError(f"{value!r} must be a whole number from {low} to {high}")
        return value
    return convert


def fraction(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ValueError(f"{value!r} must be a number above 0 and at most 1 (e.g. 0.5)")
    return float(value)


def ratio(value: Any) -> float:
    """A share from 0 (none) to 1 (all)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise ValueError(f"{value!r} must be a number from 0 to 1 (e.g. 0.1 for one in ten)")
    return float(value)


def choice(*choices: str) -> Callable[[Any], str]:
    def convert(value: Any) -> str:
        if value not in choices:
            raise ValueError(f"{value!r} must be one of {', '.join(choices)}")
        return value
    return convert


def boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{value!r} must be true or false")
    return value


def string(value: Any) -> str:
    """Text; a number is taken as its text (YAML reads an unquoted 1234 as a number)."""
    if not isinstance(value, (str, int, float)) or isinstance(value, bool):
        raise ValueError("must be a string")
    return str(value)


def nonempty_string(value: Any) -> str | None:
    return string(value) or None


def header_value(value: Any) -> str:
    """A short printable ASCII value, as message attributes and headers carry it."""
    text = string(value)
    if not 1 <= len(text) <= 256 or not all("\x20" < c < "\x7f" for c in text):
        raise ValueError(f"{quoted(value)} must be 1-256 printable ASCII characters without spaces")
    return text


_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # an HTTP token


def header_pairs(value: Any) -> tuple[tuple[str, str], ...]:
    """A mapping of HTTP header names to values (strings)."""
    if not isinstance(value, dict):
        raise ValueError("must be a mapping of header names to values")
    pairs = []
    for name, text in value.items():
        if not isinstance(name, str) or not _HEADER_NAME.fullmatch(name):
            raise ValueError(f"{name!r} is not an HTTP header name")
        try:
            pairs.append((name, header_value(text)))
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None
    return tuple(pairs)


def file_mode(value: Any) -> int:
    # YAML reads 0660 as the decimal number 660 and 0o660 as a string; accept the forms people write.
    text = str(value)
    try:
        mode = int(text, 8)
    except ValueError:
        raise ValueError(f"{value!r} is not a file mode (write e.g. \"0660\")") from None
    if not 0 <= mode <= 0o777:
        raise ValueError(f"{value!r} is not a file mode (write e.g. \"0660\")")
    return mode


def host_port(value: Any) -> tuple[str, int]:
    text = str(value).strip()
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{value!r} is not host:port (e.g. 127.0.0.1:8787 or [::1]:8787)")
    return host, int(port)


def http_url(value: Any) -> str:
    """The value if it is an http(s) URL with a host (and a valid port), else ValueError."""
    text = value if isinstance(value, str) else ""
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        parts = None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("not an http(s) URL")
    return text


def uri_reference(value: Any) -> str:
    if not isinstance(value, str) or not value or any(c.isspace() for c in value):
        raise ValueError(f"{value!r} is not a URI (e.g. eventrelay://shop-1 or https://shop.example.com)")
    return value


def template(value: Any) -> str:
    """A template over an event's fields, such as `{data.relationships.order.id}` (see formats.render_template)."""
    if not isinstance(value, str) or not value:
        raise ValueError("must be a template such as {data.id} or {data.relationships.order.id}")
    for field_path in re.findall(r"\{([^{}]*)\}", value):
        if not re.fullmatch(r"(id|type|data(\.[A-Za-z0-9_-]+)*|included(\.[A-Za-z0-9_-]+)*)", field_path):
            raise ValueError(f"{{{field_path}}} is not an event field (id, type, data.…, included.…)")
    return value


def tls_problem(make_context: Callable[[], object]) -> str | None:
    """Why TLS files cannot be used (a certificate that does not match its key, a CA file that is not one),
    found by making the context now rather than at the first handshake; None when they can. A key this user may
    not read is not judged: an operator's command reads the daemon's file, not its key, which the daemon checks
    when it starts."""
    try:
        make_context()
    except PermissionError:
        return None
    except (ssl.SSLError, OSError) as e:
        return f"cannot be used: {e.strerror or e}"
    return None
