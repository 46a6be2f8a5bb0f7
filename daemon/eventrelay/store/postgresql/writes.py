"""Every write of the PostgreSQL engine: group commits of ingests and outcomes, claims with leases, and the
admin writes. Each function takes a connection (or the pool) and runs one transaction; most are one statement,
so one round trip, committed on its own."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ...events import new_event_id
from ...jobs import AttemptRecord, Job
from ..api import DEAD_LETTER_TYPE
from ..dead_letter import dead_letter_payload
from ..rows import EventRow
from .schema import NOW

_NEXT_DUE_WINDOW = 1000  # jobs next_due looks at, at most
# PostgreSQL refuses a NOTIFY payload of 8000 bytes or more: past this, the payload is WAKE_ALL instead of the
# integrations' names (which cannot contain it), and every daemon looks at all its integrations.
_NOTIFY_MAX = 7900
WAKE_ALL = "*"



class Statements:
    """The engine's SQL for one schema, written once per store."""

    def __init__(self, schema: str):
        s = schema
        self.channel = f"eventrelay_{s}"  # NOTIFY: integrations with new jobs, comma-separated
        # New events and their jobs in one statement. Events whose id is stored already (by any daemon, even
        # in a transaction still open: the insert waits for it) are skipped, and so are their jobs. Jobs go in
        # as their events came, not by event id: job ids order a key's jobs.
        self.ingest = f"""
            WITH new AS (
                INSERT INTO {s}.events (id, type, payload, accepted_at, traceparent, tracestate)
                SELECT id, type, payload, $4, traceparent, tracestate
                FROM unnest($1::text[], $2::text[], $3::text[], $8::text[], $9::text[])
                     AS e (id, type, payload, traceparent, tracestate)
                ON CONFLICT (id) DO NOTHING
                RETURNING seq, id),
            queued AS (
                INSERT INTO {s}.jobs (event_seq, integration, next_at, created_at, updated_at, ordering_key)
                SELECT new.seq, r.integration, $4, $4, $4, r.key
                FROM unnest($5::text[], $6::text[], $7::text[]) WITH ORDINALITY AS r (event_id, integration, key, n)
                JOIN new ON new.id = r.event_id
                ORDER BY r.n
                RETURNING integration)
            SELECT (SELECT array_agg(id) FROM new),
                   (SELECT pg_notify('{self.channel}', CASE WHEN octet_length(names) < {_NOTIFY_MAX} THEN names
                                                            ELSE '{WAKE_ALL}' END)
                    FROM (SELECT string_agg(DISTINCT integration, ',') AS names FROM queued HAVING count(*) > 0) q)"""
        self.known_jobs = f"""
            SELECT e.id, (SELECT count(*) FROM {s}.jobs j WHERE j.event_seq = e.seq)
            FROM {s}.events e WHERE e.id = ANY($1::text[])"""
        claimable = f"(j.claimed_by IS NULL OR j.claimed_by = $3 OR j.lease_until < {NOW})"
        self.claim_head = f"""
            WITH chosen AS (
                SELECT j.id FROM {s}.jobs j
                WHERE j.integration = $1 AND j.state = 'pending' AND j.next_at <= $2 AND {claimable}
                  AND NOT (j.id = ANY($5::bigint[]))"""
        self.claim_only = " AND j.id = ANY($7::bigint[])"
        self.claim_heads = f"""
                  AND (j.ordering_key IS NULL OR NOT EXISTS (
                      SELECT 1 FROM {s}.jobs k WHERE k.integration = j.integration AND k.state = 'pending'
                        AND k.ordering_key = j.ordering_key AND k.id < j.id))"""
        self.claim_tail = f"""
                ORDER BY j.next_at, j.id LIMIT $4 FOR UPDATE OF j SKIP LOCKED)
            UPDATE {s}.jobs j SET claimed_by = $3, lease_until = {NOW} + $6
            FROM chosen, {s}.events e WHERE j.id = chosen.id AND e.seq = j.event_seq
            RETURNING j.id, j.attempts, e.id, e.type, e.payload, e.accepted_at,
                      coalesce(j.requeued_at, e.accepted_at), j.next_at, e.traceparent, e.tracestate"""
        # The earliest a job of the integration may be claimed by this daemon: when it falls due, or when
        # another daemon's lease on it runs out. Among the first jobs by due time only, so the cost stays
        # bounded whatever the backlog: past them, the others are busy, and the lease or a wake-up comes first.
        # With ordering ($4), a job behind its key's head is not due, whatever its time: the head's time counts.
        self.next_due = f"""
            SELECT min(CASE WHEN claimed_by IS NOT NULL AND claimed_by <> $3 AND lease_until > {NOW}
                            THEN greatest(next_at, lease_until) ELSE next_at END)
            FROM (SELECT next_at, claimed_by, lease_until FROM {s}.jobs j
                  WHERE integration = $1 AND state = 'pending' AND NOT (id = ANY($2::bigint[]))
                    AND (NOT $4 OR j.ordering_key IS NULL OR NOT EXISTS (
                        SELECT 1 FROM {s}.jobs k WHERE k.integration = j.integration AND k.state = 'pending'
                          AND k.ordering_key = j.ordering_key AND k.id < j.id))
                  ORDER BY next_at, id LIMIT {_NEXT_DUE_WINDOW}) first"""
        # Rows another transaction holds (an outcome being written, an operator's retry) are skipped, not
        # waited for: a renewal never takes part in a deadlock, and the next one, a third of a lease later,
        # renews them.
        self.renew = f"""
            UPDATE {s}.jobs SET lease_until = {NOW} + $3 WHERE id IN (
                SELECT id FROM {s}.jobs WHERE id = ANY($1::bigint[]) AND claimed_by = $2
                ORDER BY id FOR UPDATE SKIP LOCKED)"""
        # Handed back jobs are announced as new ones are: the other daemons may be asleep until the lease.
        self.release = f"""
            WITH released AS (
                UPDATE {s}.jobs SET claimed_by = NULL, lease_until = NULL
                WHERE id = ANY($1::bigint[]) AND claimed_by = $2
                RETURNING integration)
            SELECT pg_notify('{self.channel}', string_agg(DISTINCT integration, ',')) FROM released
            HAVING count(*) > 0"""
        # A batch of outcomes: each job's new state (only while this daemon's claim stands: if its lease ran
        # out while it was sending, another daemon may have taken the job, and that one's outcome stands), its
        # line in the attempt log, and the per-minute counts, all in one statement.
        self.record = f"""
            WITH o AS (
                SELECT * FROM unnest($1::bigint[], $2::text[], $3::text[], $4::int[], $5::float8[], $6::text[],
                                     $7::bool[], $8::float8[], $9::float8[], $10::int[], $11::text[])
                    AS o (job_id, integration, state, attempt, next_at, error, succeeded, started_at, duration,
                          status_code, body)),
            updated AS (
                UPDATE {s}.jobs j SET state = o.state, attempts = o.attempt,
                       next_at = coalesce(o.next_at, j.next_at), updated_at = $12, last_error = o.error,
                       claimed_by = NULL, lease_until = NULL
                FROM o WHERE j.id = o.job_id AND j.claimed_by = $13),
            log AS (
                INSERT INTO {s}.attempts (job_id, integration, attempt, succeeded, created_at, duration,
                                          status_code, error_detail, body)
                SELECT job_id, integration, attempt, succeeded, started_at, duration, status_code, error, body
                FROM o)
            INSERT INTO {s}.outcome_minutes AS m (integration, minute, daemon, delivered, failed, dead)
            SELECT integration, floor(started_at / 60)::bigint, $13, count(*) FILTER (WHERE state = 'delivered'),
                   count(*) FILTER (WHERE state = 'pending'), count(*) FILTER (WHERE state = 'dead')
            FROM o GROUP BY 1, 2 ORDER BY 2, 1
            ON CONFLICT (minute, integration, daemon) DO UPDATE SET delivered = m.delivered + excluded.delivered,
                failed = m.failed + excluded.failed, dead = m.dead + excluded.dead"""
        self.payload_of = f"SELECT payload FROM {s}.events WHERE id = $1"
        self.still_claimed = f"SELECT id FROM {s}.jobs WHERE id = ANY($1::bigint[]) AND claimed_by = $2 FOR UPDATE"
        self.add_event = f"""
            WITH new AS (INSERT INTO {s}.events (id, type, payload, accepted_at) VALUES ($1, $2, $3, $4)
                         RETURNING seq)
            INSERT INTO {s}.jobs (event_seq, integration, next_at, created_at, updated_at)
            SELECT seq, $5, $4, $4, $4 FROM new"""
        self.set_disabled = f"""
            INSERT INTO {s}.integration_state (name, disabled_at, disabled_reason) VALUES ($1, $2, $3)
            ON CONFLICT (name) DO UPDATE SET disabled_at = excluded.disabled_at,
                                             disabled_reason = excluded.disabled_reason"""
        self.set_paused = f"""
            INSERT INTO {s}.integration_state (name, paused_at) VALUES ($1, $2)
            ON CONFLICT (name) DO UPDATE SET paused_at = excluded.paused_at"""
        self.retry = f"""
            WITH old AS (SELECT id, state FROM {s}.jobs WHERE id = $1 AND integration = $2 FOR UPDATE),
            new AS (UPDATE {s}.jobs j SET state = 'pending', next_at = $3, requeued_at = $3, updated_at = $3
                    FROM old WHERE j.id = old.id AND old.state <> 'delivered')
            SELECT state FROM old"""
        requeue = f"UPDATE {s}.jobs SET state = 'pending', next_at = $2, requeued_at = $2, updated_at = $2"
        skip = "AND (requeued_at IS NULL OR requeued_at < $3)"
        self.replay_dead = f"""
            {requeue} WHERE id IN (SELECT id FROM {s}.jobs WHERE integration = $1 AND state = 'dead' {skip}
                                     AND created_at >= $5 AND created_at < $6
                                   LIMIT $4 FOR UPDATE SKIP LOCKED)"""
        self.replay_range = f"""
            {requeue} WHERE id IN (SELECT id FROM {s}.jobs WHERE integration = $1 AND created_at >= $5
                                     AND created_at < $6 AND state <> 'pending' {skip}
                                   LIMIT $4 FOR UPDATE SKIP LOCKED)"""
        self.prune_jobs = f"""
            WITH gone AS (
                DELETE FROM {s}.jobs j WHERE id IN (SELECT id FROM (
                    (SELECT id FROM {s}.jobs WHERE state = 'delivered' AND updated_at < $1 LIMIT $3)
                    UNION ALL
                    (SELECT id FROM {s}.jobs WHERE state = 'dead' AND updated_at < $2 LIMIT $3)) finished LIMIT $3)
                  -- Again on the row itself: a retry or replay committed while this waited for the row made
                  -- it pending, and the subquery's rows are not read again.
                  AND ((j.state = 'delivered' AND j.updated_at < $1) OR (j.state = 'dead' AND j.updated_at < $2))
                RETURNING id, event_seq),
            log AS (DELETE FROM {s}.attempts WHERE job_id IN (SELECT id FROM gone) RETURNING 1)
            SELECT (SELECT count(*) FROM gone) + (SELECT count(*) FROM log),
                   (SELECT array_agg(DISTINCT event_seq) FROM gone)"""
        self.prune_events = f"""
            DELETE FROM {s}.events e WHERE seq = ANY($1::bigint[])
              AND NOT EXISTS (SELECT 1 FROM {s}.jobs WHERE event_seq = e.seq)"""
        self.prune_unobserved = f"""
            DELETE FROM {s}.events WHERE seq IN (
                SELECT seq FROM {s}.events e WHERE accepted_at < $1
                  AND NOT EXISTS (SELECT 1 FROM {s}.jobs WHERE event_seq = e.seq) ORDER BY seq LIMIT $2)"""
        self.audit = f"""
            INSERT INTO {s}.audit (at, action, target, scope, fingerprint, address, detail)
            VALUES ($1, $2, $3, $4, $5, $6, $7)"""
        self.prune_audit = f"DELETE FROM {s}.audit WHERE id IN (SELECT id FROM {s}.audit WHERE at < $1 LIMIT $2)"
        self.prune_minutes = f"""
            DELETE FROM {s}.outcome_minutes WHERE (minute, integration) IN (
                SELECT minute, integration FROM {s}.outcome_minutes WHERE minute < $1 LIMIT $2)"""

        self.heartbeat = f"""
            INSERT INTO {s}.daemons (id, host, pid, version, config_hash, started_at, last_seen)
            VALUES ($1, $2, $3, $4, $5, $6, {NOW})
            ON CONFLICT (id) DO UPDATE SET version = excluded.version, config_hash = excluded.config_hash,
                                           last_seen = excluded.last_seen"""
        # Rows of daemons gone for an hour go: a crashed daemon's row says nothing after that.
        self.forget_daemons = f"DELETE FROM {s}.daemons WHERE last_seen < {NOW} - 3600 OR id = $1"
        self.daemons = f"""
            SELECT id, host, pid, version, config_hash, started_at, last_seen FROM {s}.daemons
            WHERE last_seen >= {NOW} - $1 ORDER BY started_at, id"""

        # A token bucket per integration that all the daemons draw from: refilled at $2 per second up to $3,
        # up to $4 tokens granted at once. `granted` keeps what this call took, for RETURNING.
        available = f"least($3, b.tokens + greatest(0, {NOW} - b.updated_at) * $2)"
        self.take_tokens = f"""
            INSERT INTO {s}.rate_limits AS b (integration, tokens, granted, updated_at)
            VALUES ($1, $3 - least($4, floor($3)), least($4, floor($3)), {NOW})
            ON CONFLICT (integration) DO UPDATE SET
                granted = least($4, floor({available})),
                tokens = {available} - least($4, floor({available})),
                updated_at = {NOW}
            RETURNING granted::int, tokens"""

    def claim(self, ordered: bool, only: bool) -> str:
        return (self.claim_head + (self.claim_only if only else "") + (self.claim_heads if ordered else "")
                + self.claim_tail)


def ingest_arguments(rows: Sequence[EventRow], now: float) -> tuple[Any, ...]:
    """The arrays `Statements.ingest` takes, for events already free of repeats."""
    ids, types, payloads, route_events, route_names, route_keys = [], [], [], [], [], []
    traceparents, tracestates = [], []
    for event_id, event_type, payload, _, routes, traceparent, tracestate in rows:
        ids.append(event_id)
        types.append(event_type)
        payloads.append(payload)
        traceparents.append(traceparent)
        tracestates.append(tracestate)
        for name, key in routes:
            route_events.append(event_id)
            route_names.append(name)
            route_keys.append(key)
    return ids, types, payloads, now, route_events, route_names, route_keys, traceparents, tracestates


def record_arguments(records: Sequence[AttemptRecord], now: float, me: str) -> tuple[Any, ...]:
    columns: tuple[list[Any], ...] = tuple([] for _ in range(11))
    for r in records:
        o = r.outcome
        for column, value in zip(columns, (r.job.id, r.job.integration, r.state.value, r.job.attempt, r.next_at,
                                           o.error, o.succeeded, r.started_at, o.duration, o.status_code, o.body)):
            column.append(value)
    return (*columns, now, me)


def dead_letter_rows(records: Sequence[AttemptRecord]) -> list[AttemptRecord]:
    return [r for r in records if r.state.value == "dead" and r.dead_letter]


async def forward_dead(db: Any, sql: Statements, record: AttemptRecord, now: float) -> None:
    """A job that died becomes an event for its dead-letter integration, in the caller's transaction."""
    job, o = record.job, record.outcome
    original = await db.fetchval(sql.payload_of, job.event_id)
    payload = dead_letter_payload(job.integration, job.id, job.attempt, o.error, o.status_code, job.event_id,
                                  job.event_type, original)
    await db.execute(sql.add_event, new_event_id(), DEAD_LETTER_TYPE, payload, now, record.dead_letter)


def job_from_row(integration: str, r: Any) -> Job:
    return Job(id=r[0], integration=integration, attempt=r[1] + 1, event_id=r[2], event_type=r[3], payload=r[4],
               accepted_at=r[5], age_from=r[6], traceparent=r[8], tracestate=r[9])
