"""The event catalogue: the event types producers are expected to send, so that an `observes` entry with a
typo (`order.payed`) is a configuration error instead of an integration that silently hears nothing.

It holds Elastic Path Commerce's observable events and the types a configuration declares under
`event_types:` (a store's custom flows, `<api_type>.created|updated|deleted`). Ingest still accepts any
well-formed type: the catalogue checks configurations, never producers.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable

_CRUD = ("created", "updated", "deleted")


def _keys(resource: str, *actions: str) -> list[str]:
    return [f"{resource}.{action}" for action in (actions or _CRUD)]


# Elastic Path Commerce's observable events; a resource given without actions has created, updated, deleted.
ELASTIC_PATH: frozenset[str] = frozenset(
    _keys("order", "created", "updated", "paid", "authorized", "fulfilled", "cancelled", "refunded")
    + _keys("customer") + _keys("address") + _keys("account") + _keys("account-member")
    + _keys("account-membership") + _keys("cart", "updated", "deleted") + _keys("currency")
    + _keys("file", "created", "deleted") + _keys("integration") + _keys("payment-gateway", "updated")
    + _keys("catalog-release") + _keys("catalog-rule") + _keys("settings", "created", "updated")
    + _keys("stock-transaction", "created") + _keys("transaction", "created", "updated")
    + _keys("user-authentication-info") + _keys("subscription") + _keys("product") + _keys("brand")
    + _keys("category") + _keys("collection")
    # eventrelay's own: a test event sent to one integration, and a job forwarded to a dead-letter integration.
    + ["eventrelay.test", "eventrelay.dead_letter"])
# Elastic Path's subscription resources (subscription-plan, subscription-offering, …): a family of names.
_SUBSCRIPTION_FAMILY = re.compile(r"subscription-[a-z0-9][a-z0-9_-]*\.(created|updated|deleted)")
SUBSCRIPTION_FAMILY = "subscription-*.created|updated|deleted"


class Catalogue:
    def __init__(self, declared: Iterable[str] = ()):
        self.declared = frozenset(declared)
        self.keys = ELASTIC_PATH | self.declared

    def knows(self, event_type: str) -> bool:
        return event_type in self.keys or _SUBSCRIPTION_FAMILY.fullmatch(event_type) is not None

    def matches_any(self, pattern: str) -> bool:
        """An `observes` entry (a key, `resource.*` or `*`) names at least one known type."""
        if pattern == "*":
            return True
        if pattern.endswith(".*"):
            prefix = pattern[:-1]
            return any(key.startswith(prefix) for key in self.keys) or (
                prefix.startswith("subscription-") and _SUBSCRIPTION_FAMILY.fullmatch(prefix + "created") is not None)
        return self.knows(pattern)

    def suggest(self, pattern: str) -> str | None:
        """The known type (or `resource.*`) closest to a pattern that matched none, if one is close."""
        if pattern.endswith(".*"):
            resources = sorted({key.split(".")[0] + ".*" for key in self.keys})
            close = difflib.get_close_matches(pattern, resources, n=1, cutoff=0.7)
        else:
            close = difflib.get_close_matches(pattern, sorted(self.keys), n=1, cutoff=0.7)
        return close[0] if close else None
