"""The open-file limit: enough descriptors for what the configuration allows at once."""

from __future__ import annotations

import resource

import structlog

from .config import Config

log = structlog.get_logger(component="limits")

_SLACK = 64  # the database and its WAL, the lock file, the journal, the event loop's own descriptors


def descriptors_needed(config: Config) -> int:
    """Both listeners full, every enabled integration's connections in use, and some slack."""
    listeners = (config.listen.http is not None) + (config.listen.socket is not None)
    deliveries = sum(i.delivery.concurrency for i in config.integrations if i.enabled)
    return listeners * config.listen.max_connections + deliveries + _SLACK


def ensure_descriptors(config: Config) -> int:
    """Raise the soft RLIMIT_NOFILE towards what `config` needs, up to the hard limit; returns the soft limit.

    A shell, or a unit without LimitNOFILE=, often gives a soft limit of 1024, which two full listeners (1024
    connections each by default) would exceed: accept() would then fail with EMFILE, and so would opening
    the database.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = descriptors_needed(config)
    if soft == resource.RLIM_INFINITY or soft >= need:
        return soft
    new = need if hard == resource.RLIM_INFINITY else min(need, hard)
    if new > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
    if new < need:
        log.warning("the open-file limit is lower than listen.max_connections and the integrations' concurrency "
                    "need; raise LimitNOFILE= in the unit (or ulimit -n), or lower listen.max_connections",
                    limit=new, needed=need)
    return new
