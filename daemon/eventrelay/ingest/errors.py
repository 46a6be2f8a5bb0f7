"""The listener's error answers, in one shape everywhere."""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

from aiohttp import web


def error_response(status: int, detail: str | list[str], headers: dict[str, str] | None = None,
                   meta: dict[str, Any] | None = None) -> web.Response:
    """JSON:API-style errors, as the seed system answers them; `meta` for what a client can act on."""
    details = [detail] if isinstance(detail, str) else detail
    title = HTTPStatus(status).phrase
    document: dict[str, Any] = {"errors": [{"status": str(status), "title": title, "detail": d} for d in details]}
    if meta is not None:
        document["meta"] = meta
    return web.json_response(document, status=status, headers=headers)
