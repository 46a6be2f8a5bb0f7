"""Accepting events: the part both listeners share (routing to integrations, storing, answering)."""

from __future__ import annotations

from collections.abc import Sequence

from ..config import Integration
from ..events import Event
from ..formats import render_template
from ..metrics import Metrics
from ..store import Accepted, Route, Store

_ROUTE_CACHE_LIMIT = 10_000  # distinct event types remembered; producers cannot grow it without bound


class Router:
    """Which enabled integrations observe an event type. Fan-out happens once, at ingest (DESIGN rule 2)."""

    def __init__(self, integrations: Sequence[Integration]):
        self._integrations = tuple(i for i in integrations if i.enabled)
        self._cache: dict[str, tuple[str, ...]] = {}
        # Integrations with per-resource ordering: the template of each job's ordering key.
        self._ordering = {i.name: i.delivery.ordering_key for i in self._integrations
                          if i.delivery.ordering == "per_resource"}
        # Integrations with a filter on the events' content, evaluated for each event of a type they observe.
        self._filters = {i.name: i.accepts for i in self._integrations if i.accepts is not None}

    def routes(self, event: Event) -> list[Route]:
        """(integration, ordering key) for every integration that observes the event and whose filter, if it
        has one, accepts it."""
        names = self.route(event.type)
        if self._filters and names:
            content = {"type": event.type, "data": event.data, "included": event.included}
            filters = self._filters
            names = tuple(n for n in names if n not in filters or filters[n](content))
        if not self._ordering:
            return [(name, None) for name in names]
        fields = {"id": event.id, "type": event.type, "data": event.data, "included": event.included}
        # A missing key field orders the job by the event id alone, i.e. it waits for nothing.
        return [(name, render_template(self._ordering[name], fields) if name in self._ordering else None)
                for name in names]

    def route(self, event_type: str) -> tuple[str, ...]:
        names = self._cache.get(event_type)
        if names is None:
            if len(self._cache) >= _ROUTE_CACHE_LIMIT:
                self._cache.clear()
            names = tuple(i.name for i in self._integrations if i.matcher.matches(event_type))
            self._cache[event_type] = names
        return names


class Ingestor:
    """Stores validated events with their jobs; resolves only after the commit (an ack means durable)."""

    def __init__(self, store: Store, router: Router, metrics: Metrics | None = None):
        self.store = store
        self.router = router  # replaced whole by a reload
        self._accepted = metrics.events_accepted if metrics else None
        self._unrouted = metrics.events_unrouted if metrics else None
        self._refused = metrics.connections_refused if metrics else None

    def refused_connection(self, listener: str) -> None:
        """A listener turned a connection away at listen.max_connections."""
        if self._refused is not None:
            self._refused.labels(listener).inc()

    async def accept(self, events: Sequence[Event], listener: str) -> list[Accepted]:
        router = self.router  # one routing table for the whole request, even if a reload swaps it meanwhile
        routes = [router.routes(e) for e in events]
        accepted = await self.store.ingest(events, routes)
        counts, unrouted = self._accepted, self._unrouted
        if counts is not None and unrouted is not None:
            for event, result, routed in zip(events, accepted, routes):
                if not result.duplicate:
                    key = (event.type, listener)
                    counts[key] = counts.get(key, 0) + 1
                    if not routed:  # stored, and no integration wants it: a producer ahead of the config?
                        unrouted[key] = unrouted.get(key, 0) + 1
        return accepted
