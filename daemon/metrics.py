"""Prometheus metrics: one registry per running service (no process-global state)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.events_accepted = Counter("eventrelay_events_accepted", "Events accepted (stored and acknowledged)",
                                       ["type", "listener"], registry=r)
        self.connections_refused = Counter("eventrelay_connections_refused", "Connections turned away at "
                                           "listen.max_connections", ["listener"], registry=r)
        self.deliveries = Counter("eventrelay_delivery_attempts", "Delivery attempts by result: delivered, "
                                  "failed (will retry) or dead (final)", ["integration", "result"], registry=r)
        self.delivery_seconds = Histogram("eventrelay_delivery_duration_seconds", "Time one attempt took",
                                          ["integration"], registry=r,
                                          buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30))
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
        self.reloads = Counter("eventrelay_config_reloads", "Configuration reloads by result", ["result"],
                               registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
