"""Cutting text down for messages, logs and tables, written once.

An error message quotes what it refuses; a target's answer can be a whole HTML page. These keep such text
to one readable line of bounded length.
"""

from __future__ import annotations

from typing import Any


def shorten(text: str, limit: int, ellipsis: str = "...") -> str:
    """`text` itself if it has at most `limit` characters, else its start and `ellipsis`, `limit` in all."""
    return text if len(text) <= limit else text[:max(0, limit - len(ellipsis))] + ellipsis


def first_line(text: str, limit: int = 120, ellipsis: str = "...") -> str:
    """The first line of `text` (leading blank lines skipped), shortened; "" for blank text."""
    stripped = text.strip()
    return shorten(stripped.splitlines()[0].rstrip(), limit, ellipsis) if stripped else ""


def one_line(text: str, limit: int | None = None, ellipsis: str = "...") -> str:
    """Every run of whitespace (the newlines of an HTML error page, say) made one space, then shortened."""
    flat = " ".join(text.split())
    return flat if limit is None else shorten(flat, limit, ellipsis)


def quoted(value: Any, limit: int = 80) -> str:
    """A value as an error message quotes it: its repr (an exception's text), shortened. Never raises."""
    try:
        text = str(value) if isinstance(value, BaseException) else repr(value)
    except ValueError:  # an int of more digits than Python agrees to print
        return "<too large to show>"
    return shorten(text, limit)
