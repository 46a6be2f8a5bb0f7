"""Prometheus metrics: one registry per running service (no process-global state)."""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.utils import floatToGoString

CONTENT_TYPE = CONTENT_TYPE_LATEST
DELIVERY_BUCKETS = (.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30)  # seconds


class DeliveryCounts:
    """One integration's delivery attempts, as plain numbers that /metrics reads when it renders.

    Counted on every delivery: a prometheus_client Counter and Histogram take a lock for each update; these
    are additions on the event loop's thread, which also renders /metrics, so they need none.
    """

    __slots__ = ("results", "buckets", "seconds")

    def __init__(self) -> None:
        # Exported at 0 from the start: a rate() over a counter that appears with its first event misses it.
        self.results: dict[str, int] = {"delivered": 0, "failed": 0, "dead": 0}  # -> attempts
        self.buckets = [0] * (len(DELIVERY_BUCKETS) + 1)  # attempts per duration bucket, the last is +Inf
        self.seconds = 0.0

    def add(self, result: str, seconds: float) -> None:
        self.results[result] = self.results.get(result, 0) + 1
        self.buckets[bisect_left(DELIVERY_BUCKETS, seconds)] += 1  # le: a bucket counts durations <= its bound
        self.seconds += seconds


class _DeliveryCollector:
    """eventrelay_delivery_attempts and eventrelay_delivery_duration_seconds, from the DeliveryCounts."""

    _LE = [floatToGoString(b) for b in DELIVERY_BUCKETS] + ["+Inf"]

    def __init__(self, counts: dict[str, DeliveryCounts]):
        self._counts = counts

    def collect(self) -> Iterator[Metric]:
        attempts = CounterMetricFamily("eventrelay_delivery_attempts", "Delivery attempts by result: delivered, "
                                       "failed (will retry) or dead (final)", labels=["integration", "result"])
        duration = HistogramMetricFamily("eventrelay_delivery_duration_seconds", "Time one attempt took",
                                         labels=["integration"])
        for name, counts in self._counts.items():
            for result, n in counts.results.items():
                attempts.add_metric([name, result], n)
            cumulative, total = [], 0
            for le, n in zip(self._LE, counts.buckets):
                total += n
                cumulative.append((le, total))
            duration.add_metric([name], cumulative, counts.seconds)
        yield attempts
        yield duration


class _EventCounts:
    """A counter of events by type and listener from plain counts, which ingest adds to for every request
    without the lock a prometheus_client Counter takes for each."""

    def __init__(self, name: str, documentation: str, counts: dict[tuple[str, str], int]):
        self._name, self._documentation = name, documentation
        self._counts = counts

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(self._name, self._documentation, labels=["type", "listener"])
        for (event_type, listener), n in self._counts.items():
            family.add_metric([event_type, listener], n)
        yield family


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        # (event type, listener) -> events accepted; added to on the event loop's thread, which renders /metrics
        self.events_accepted: dict[tuple[str, str], int] = {}
        r.register(_EventCounts("eventrelay_events_accepted", "Events accepted (stored and acknowledged)",
                                self.events_accepted))
        self.events_unrouted: dict[tuple[str, str], int] = {}  # of those, the ones no integration took
        r.register(_EventCounts("eventrelay_events_unrouted", "Events accepted that no integration observes (or "
                                "whose filters all refused them)", self.events_unrouted))
        self.connections_refused = Counter("eventrelay_connections_refused", "Connections turned away at "
                                           "listen.max_connections", ["listener"], registry=r)
        # By integration; kept across reloads, so the counters only ever grow.
        self._deliveries: dict[str, DeliveryCounts] = {}
        r.register(_DeliveryCollector(self._deliveries))
        self.backlog = Gauge("eventrelay_jobs_pending", "Jobs waiting for delivery", ["integration"], registry=r)
        self.dead = Gauge("eventrelay_jobs_dead", "Jobs that failed for good (kept, re-triable)", ["integration"],
                          registry=r)
        self.in_flight = Gauge("eventrelay_deliveries_in_flight", "Deliveries under way", ["integration"],
                               registry=r)
        self.oldest_pending = Gauge("eventrelay_oldest_pending_age_seconds", "Age of the oldest pending job",
                                    ["integration"], registry=r)
        self.commit_batch = Histogram("eventrelay_store_commit_operations", "Operations sharing one commit "
                                      "(group commit)", registry=r, buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 1024))
        self.commit_seconds = Histogram("eventrelay_store_commit_duration_seconds", "Time one write transaction "
                                        "took, fsync included", registry=r,
                                        buckets=(.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1))
        self.breaker_state = Gauge("eventrelay_circuit_state", "Circuit breaker: 0 closed, 1 half-open (probing), "
                                   "2 open", ["integration"], registry=r)
        self.breaker_transitions = Counter("eventrelay_circuit_transitions", "Circuit breaker state changes",
                                           ["integration", "to"], registry=r)
        self.disabled = Gauge("eventrelay_integration_disabled", "1 while the target's 410 Gone keeps the "
                              "integration disabled", ["integration"], registry=r)
        self.paused = Gauge("eventrelay_integration_paused", "1 while an operator keeps the integration paused",
                            ["integration"], registry=r)
        self.reloads = Counter("eventrelay_config_reloads", "Configuration reloads by result", ["result"],
                               registry=r)
        # Counters with known labels exist at 0 from the start, so alerts on their increase see the first one.
        for result in ("ok", "failed"):
            self.reloads.labels(result)
        for listener in ("http", "socket"):
            self.connections_refused.labels(listener)
        ProcessCollector(registry=r)  # process_*: memory, open descriptors, CPU of the daemon

    def deliveries(self, integration: str) -> DeliveryCounts:
        """Where a dispatcher counts its attempts."""
        counts = self._deliveries.get(integration)
        if counts is None:
            counts = self._deliveries[integration] = DeliveryCounts()
            for state in ("open", "closed"):
                self.breaker_transitions.labels(integration, state)
        return counts

    def render(self) -> bytes:
        return generate_latest(self.registry)
