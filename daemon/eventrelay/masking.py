"""How secrets are shown: masked to their last four characters, as the seed system shows them, and URLs with
their credentials masked. Used by the configuration and by target types that show headers of their own."""

from __future__ import annotations

import re
from urllib.parse import urlsplit, urlunsplit


def mask(secret: str) -> str:
    """`****PSYQ`, as the seed system shows secrets; short secrets are masked whole."""
    return "****" + secret[-4:] if len(secret) > 8 else "****"


# Query parameters whose values are credentials in the URLs people paste (?token=…, ?sig=…, ?api_key=…).
_SECRET_PARAM = re.compile(r"token|key|secret|sig|pass|auth|code|credential|session", re.IGNORECASE)


def mask_url(url: str) -> str:
    """A URL as the daemon shows it: the password of its userinfo and credential-like query values masked."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if parts.password is not None:
        user, _, host = netloc.rpartition("@")
        netloc = f"{user.partition(':')[0]}:{mask(parts.password)}@{host}"
    query = "&".join(_mask_param(p) for p in parts.query.split("&")) if parts.query else ""
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def _mask_param(param: str) -> str:
    name, sep, value = param.partition("=")
    return f"{name}={mask(value)}" if sep and value and _SECRET_PARAM.search(name) else param
