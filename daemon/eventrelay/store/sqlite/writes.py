"""The writer's connection and every transaction it runs: group commits of ingests and outcomes, the admin
writes, and the attempt counts. Runs in the writer process (writer.py), the database's only writer."""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from ... import codec
from ...events import new_event_id
from ..api import DEAD_LETTER_TYPE
from ..dead_letter import dead_letter_payload
from . import schema
from .errors import Failed, damaged, explain, is_storage_failure, looks_damaged
from .schema import INGEST, OUTCOME, Insert, Log
from .wire import (ADMIN_WRITES, Audit, Done, Op, Operation, OutcomeRow, Prune, Replay, Retry, SetDisabled,
                   SetPaused)

COUNTS_LINGER = 1.0  # seconds attempt counts may wait for a transaction to go with (Writer.write_counts)
_ROWS_PER_STATEMENT = 500  # x at most 12 columns: well under SQLite's 32,766 bound parameters

# Where an OutcomeRow's fields are: outcomes are read by position on the hot path, not made NamedTuples.
_INTEGRATION, _STATE, _STARTED_AT, _DEAD_LETTER = map(
    OutcomeRow._fields.index, ("integration", "state", "started_at", "dead_letter"))
_COUNTED = {"delivered": 0, "pending": 1, "dead": 2}  # an outcome's state -> its column in outcome_minutes

AdminResult = tuple[Any, Iterable[str]]  # (the result, integrations whose dispatchers should look again)


class Writer:
    """The writer's connection and the transactions it runs."""

    def __init__(self, db: sqlite3.Connection, path: str, synchronous: str, log: Log):
        self._db = db
        self.path = path
        self._ingest_sync = "FULL" if synchronous == "full" else "NORMAL"
        self._sync = ""
        self._log = log
        self._next_event_seq = 1
        self._next_job_id = 1
        self._minutes: dict[tuple[str, int], list[int]] = {}  # (integration, minute) -> attempts not yet written
        self._counts_written = 0.0
        self._counts_failing = False
        self._admin: dict[Op, Callable[[float, Any], AdminResult]] = {
            Op.SET_DISABLED: self._set_disabled, Op.SET_PAUSED: self._set_paused, Op.AUDIT: self._audit,
            Op.RETRY: self._retry,
            Op.REPLAY: self._replay, Op.PRUNE: self._prune}
        assert self._admin.keys() == ADMIN_WRITES.keys()

    def prepare(self) -> None:
        """WAL, the schema, and the next ids. Raises Failed with what the operator should do."""
        try:
            schema.use_wal(self._db, self.path)
            self._set_sync(self._ingest_sync)
            schema.check_integrity(self._db, self.path, self._log)
            schema.migrate(self._db, self.path, self._log)
            schema.check_statements(self._db)
            schema.enable_incremental_vacuum(self._db, self.path, self._log)
            self._next_event_seq = schema.value(self._db, "SELECT coalesce(max(seq), 0) + 1 FROM events")
            self._next_job_id = schema.value(self._db, "SELECT coalesce(max(id), 0) + 1 FROM jobs")
        except sqlite3.DatabaseError as e:
            if looks_damaged(e):
                raise Failed(damaged(self.path, f"SQLite: {e}")) from e
            raise Failed(f"cannot use the database {self.path}: {e}") from e

    # -- transactions -------------------------------------------------------------------------------------

    def commit(self, batch: list[Operation]) -> list[Done]:
        """One transaction for the batch, or, if one operation in it is bad, one each. Returns what each
        transaction came to."""
        started = time.monotonic()
        try:
            results, woken = self.transaction(batch)
        except Exception as e:  # noqa: BLE001 - every failure must reach the waiting producers
            if len(batch) > 1 and not is_storage_failure(e):
                # One bad operation must not fail its neighbours: retry them one transaction each.
                return [done for op in batch for done in self.commit([op])]
            return [Done([op.id for op in batch], None, [], time.monotonic() - started, explain(e), str(e))]
        return [Done([op.id for op in batch], results, sorted(woken), time.monotonic() - started, None, None)]

    def _set_sync(self, mode: str) -> None:
        if mode != self._sync:
            self._db.execute(f"PRAGMA synchronous={mode}")
            self._sync = mode

    def transaction(self, batch: list[Operation]) -> tuple[list[Any], set[str]]:
        """One group commit.

        A batch of ingests alone is one INSERT statement into the `ingest` view, committed on its own
        (autocommit), not BEGIN, INSERT events, INSERT jobs, COMMIT; so is a batch of delivery outcomes alone
        (the `outcome` view): fewer statements to step. A statement is atomic: its rows are all written, or
        none.
        """
        seq0, job0 = self._next_event_seq, self._next_job_id
        minutes0 = {key: counts[:] for key, counts in self._minutes.items()}
        # Only acknowledgements need the fsync. A transaction of delivery outcomes alone commits without it:
        # WAL keeps commits in order, so power loss can only forget the last outcomes, and a forgotten
        # "delivered" means one more delivery (at least once), never a lost event. The next ingest commit
        # syncs them along with itself.
        self._set_sync(self._ingest_sync if any(op.kind is Op.INGEST for op in batch) else "NORMAL")
        now = time.time()
        results: list[Any] = [None] * len(batch)
        woken: set[str] = set()
        rows: list[tuple[Any, ...]] = []
        try:
            # A read outside the transaction is safe: this connection is the database's only writer.
            known = self._known_events(event_id for op in batch if op.kind is Op.INGEST
                                       for event_id, _, _, id_given, *_ in op.items if id_given)
            for i, op in enumerate(batch):
                if op.kind is Op.INGEST:
                    results[i] = self._plan_ingest(op.items, now, known, rows, woken)
            records = [r for op in batch if op.kind is Op.RECORD for r in op.items]
            kinds = {op.kind for op in batch}
            if kinds == {Op.RECORD} and len(records) <= _ROWS_PER_STATEMENT and not _dead_letters(records):
                self._write_records(records, now)
                if time.monotonic() - self._counts_written >= COUNTS_LINGER:
                    self.write_counts()
                return results, woken
            # One statement commits itself (autocommit).
            if kinds == {Op.INGEST} and len(rows) <= _ROWS_PER_STATEMENT:
                _many(self._db, INGEST, rows)  # no rows at all if every event was a duplicate
                return results, woken
            self._db.execute("BEGIN IMMEDIATE")
            for i, op in enumerate(batch):
                admin = self._admin.get(op.kind)
                if admin is not None:
                    results[i], also_woken = admin(now, op.items)
                    woken.update(also_woken)
            _many(self._db, INGEST, rows)
            if records:
                self._write_records(records, now)
                self._forward_dead(records, now, woken)
            self.write_counts()
            self._db.execute("COMMIT")
        except BaseException:
            self._next_event_seq, self._next_job_id = seq0, job0
            self._minutes = minutes0
            if self._db.in_transaction:  # a failed single statement has rolled itself back
                try:
                    self._db.execute("ROLLBACK")
                except sqlite3.Error:
                    pass  # SQLite already rolled back (e.g. on SQLITE_FULL); the transaction is gone either way
            raise
        for op in batch:
            if op.kind is Op.VACUUM:
                # The transaction is committed: a failure here must not fail (and so repeat) its operations.
                try:
                    self._incremental_vacuum()
                except sqlite3.Error as e:
                    self._log("warning", "housekeeping after a commit failed", {"error": str(e)})
        return results, woken

    def _known_events(self, ids: Iterable[str]) -> dict[str, int]:
        """Producer-given ids already stored, with how many jobs each got: they are answered as duplicates."""
        wanted = list(dict.fromkeys(ids))
        known: dict[str, int] = {}
        for i in range(0, len(wanted), 500):  # stay under SQLite's bound-parameter limit
            chunk = wanted[i:i + 500]
            rows = self._db.execute(
                f"SELECT e.id, (SELECT count(*) FROM jobs WHERE event_seq = e.seq) FROM events e "
                f"WHERE e.id IN ({','.join('?' * len(chunk))})", chunk).fetchall()
            known.update((r[0], r[1]) for r in rows)
        return known

    def _plan_ingest(self, events: list[tuple[Any, ...]], now: float, known: dict[str, int],
                     rows: list[tuple[Any, ...]], woken: set[str]) -> list[tuple[int, int]]:
        """Rows for the `ingest` view: the event, and its jobs as a JSON array of routes. The answer names
        only the duplicates, as (index, jobs they got then): every other event got one job per route, which
        the daemon knows without being told (engine._accepted)."""
        duplicates = []
        for i, (event_id, event_type, payload, _, routes, traceparent, tracestate) in enumerate(events):  # EventRow
            if event_id in known:
                duplicates.append((i, known[event_id]))
                continue
            rows.append((self._next_event_seq, event_id, event_type, payload, now, self._next_job_id,
                         codec.dumps(routes) if routes else "[]", traceparent, tracestate))
            self._next_event_seq += 1
            self._next_job_id += len(routes)
            woken.update(name for name, _ in routes)
            known[event_id] = len(routes)  # a repeat later in the same transaction is a duplicate too
        return duplicates

    def _write_records(self, records: Sequence[tuple[Any, ...]], now: float) -> None:
        _many(self._db, OUTCOME, [(*r[:_DEAD_LETTER], now) for r in records])
        minutes = self._minutes
        for r in records:
            counts = minutes.get(key := (r[_INTEGRATION], int(r[_STARTED_AT] // 60)))
            if counts is None:
                counts = minutes[key] = [0, 0, 0]
            counts[_COUNTED[r[_STATE]]] += 1

    def write_counts(self) -> None:
        """Add the attempts counted since the last call to outcome_minutes. They wait for a transaction that
        is open anyway, or a second at most: a statement of their own in every commit of outcomes would cost
        that commit its single-statement form. A crash loses at most that second of counts, not outcomes."""
        if self._minutes:
            rows = [(name, minute, *counts) for (name, minute), counts in self._minutes.items()]
            alone = not self._db.in_transaction
            if alone:
                self._set_sync("NORMAL")
                self._db.execute("BEGIN IMMEDIATE")
            self._db.executemany(
                "INSERT INTO outcome_minutes (integration, minute, delivered, failed, dead) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (minute, integration) DO UPDATE SET delivered = delivered + excluded.delivered, "
                "failed = failed + excluded.failed, dead = dead + excluded.dead", rows)
            if alone:
                self._db.execute("COMMIT")
            self._minutes = {}
        self._counts_written = time.monotonic()
        self._counts_failing = False

    @property
    def counts_waiting(self) -> bool:
        return bool(self._minutes)

    def counts_failed(self, e: sqlite3.Error) -> None:
        """Counts that could not be written alone (a full disk): kept for the next try."""
        if self._db.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                self._db.execute("ROLLBACK")
        if not self._counts_failing:
            self._log("warning", "attempt counts not written yet; will try again", {"error": str(e)})
        self._counts_failing = True
        self._counts_written = time.monotonic()

    def _forward_dead(self, records: Sequence[tuple[Any, ...]], now: float, woken: set[str]) -> None:
        """A job that died here becomes an event for its dead-letter integration, in the same transaction."""
        for r in map(OutcomeRow._make, _dead_letters(records)):
            rows = self._db.execute("SELECT payload FROM events WHERE id = ?", (r.event_id,)).fetchall()
            payload = dead_letter_payload(r.integration, r.job_id, r.attempt, r.error, r.status_code, r.event_id,
                                          r.event_type, rows[0][0] if rows else None)
            seq, new_job = self._next_event_seq, self._next_job_id
            self._next_event_seq += 1
            self._next_job_id += 1
            self._db.execute("INSERT INTO events (seq, id, type, payload, accepted_at) VALUES (?, ?, ?, ?, ?)",
                             (seq, new_event_id(), DEAD_LETTER_TYPE, payload, now))
            self._db.execute("INSERT INTO jobs (id, event_seq, integration, next_at, created_at, updated_at) "
                             "VALUES (?, ?, ?, ?, ?, ?)", (new_job, seq, r.dead_letter, now, now, now))
            woken.add(r.dead_letter)

    # -- admin writes, inside the transaction ---------------------------------------------------------------

    def _set_disabled(self, now: float, args: SetDisabled) -> AdminResult:
        self._db.execute(
            "INSERT INTO integration_state (name, disabled_at, disabled_reason) VALUES (?, ?, ?) "
            "ON CONFLICT (name) DO UPDATE SET disabled_at = excluded.disabled_at, "
            "disabled_reason = excluded.disabled_reason",
            (args.name, now if args.reason is not None else None, args.reason))
        return None, ()

    def _set_paused(self, now: float, args: SetPaused) -> AdminResult:
        self._db.execute(
            "INSERT INTO integration_state (name, paused_at) VALUES (?, ?) "
            "ON CONFLICT (name) DO UPDATE SET paused_at = excluded.paused_at",
            (args.name, now if args.paused else None))
        return None, ([] if args.paused else [args.name])

    def _audit(self, now: float, args: Audit) -> AdminResult:
        self._db.execute("INSERT INTO audit (at, action, target, scope, fingerprint, address, detail) "
                         "VALUES (?, ?, ?, ?, ?, ?, ?)", tuple(args))
        return None, ()

    def _retry(self, now: float, args: Retry) -> AdminResult:
        rows = self._db.execute("SELECT state FROM jobs WHERE id = ? AND integration = ?",
                                (args.job_id, args.integration)).fetchall()
        if not rows:
            return None, ()
        if rows[0][0] != "delivered":
            self._db.execute("UPDATE jobs SET state = 'pending', next_at = ?, requeued_at = ?, updated_at = ? "
                             "WHERE id = ?", (now, now, now, args.job_id))
        return rows[0][0], (args.integration,)

    def _replay(self, now: float, args: Replay) -> AdminResult:
        skip = "AND (requeued_at IS NULL OR requeued_at < ?)"
        fence = [args.not_requeued_since if args.not_requeued_since is not None else 1e18]
        state = "state = 'dead'" if args.dead else "state <> 'pending'"
        select = (f"SELECT id FROM jobs WHERE integration = ? AND {state} AND created_at >= ? AND created_at < ? "
                  f"{skip} LIMIT ?")
        params = [args.integration, args.since if args.since is not None else 0.0,
                  args.until if args.until is not None else 1e18, *fence]
        cursor = self._db.execute(
            f"UPDATE jobs SET state = 'pending', next_at = ?, requeued_at = ?, updated_at = ? "
            f"WHERE id IN ({select})", (now, now, now, *params, args.limit))
        return cursor.rowcount, (args.integration,)

    def _prune(self, now: float, args: Prune) -> AdminResult:
        db, batch = self._db, args.batch
        rows = db.execute(
            "SELECT id, event_seq FROM jobs WHERE state = 'delivered' AND updated_at < ? "
            "UNION ALL SELECT id, event_seq FROM (SELECT id, event_seq FROM jobs "
            "WHERE state = 'dead' AND updated_at < ? LIMIT ?) LIMIT ?",
            (args.delivered_before, args.dead_before, batch, batch)).fetchall()
        job_ids = [r[0] for r in rows]
        seqs = sorted({r[1] for r in rows})
        deleted = 0
        for chunk in _chunks(job_ids, 500):
            marks = ",".join("?" * len(chunk))
            deleted += db.execute(f"DELETE FROM attempts WHERE job_id IN ({marks})", chunk).rowcount
            deleted += db.execute(f"DELETE FROM jobs WHERE id IN ({marks})", chunk).rowcount
        for chunk in _chunks(seqs, 500):
            deleted += db.execute(
                f"DELETE FROM events WHERE seq IN ({','.join('?' * len(chunk))}) "
                "AND NOT EXISTS (SELECT 1 FROM jobs WHERE event_seq = events.seq)", chunk).rowcount
        deleted += db.execute(
            "DELETE FROM outcome_minutes WHERE (minute, integration) IN (SELECT minute, integration "
            "FROM outcome_minutes WHERE minute < ? LIMIT ?)", (int(args.delivered_before // 60), batch)).rowcount
        deleted += db.execute("DELETE FROM audit WHERE id IN (SELECT id FROM audit WHERE at < ? LIMIT ?)",
                              (args.delivered_before, batch)).rowcount
        # Events no integration observed have no job to lead us to them: oldest first, by age.
        deleted += db.execute(
            "DELETE FROM events WHERE seq IN (SELECT seq FROM events e WHERE accepted_at < ? AND NOT EXISTS "
            "(SELECT 1 FROM jobs WHERE event_seq = e.seq) ORDER BY seq LIMIT ?)",
            (args.delivered_before, batch)).rowcount
        return deleted, ()

    def _incremental_vacuum(self) -> None:
        # The pragma frees one page per step, and the sqlite3 module's execute() steps a statement that returns
        # no columns only once: one page per call. executescript() steps it to the end, but commits whatever
        # transaction is open first, hence an operation run after the commit (Op.VACUUM).
        self._db.executescript("PRAGMA incremental_vacuum(2000);")


def _many(db: sqlite3.Connection, insert: Insert, rows: Sequence[tuple[Any, ...]]) -> None:
    """Insert `rows`, up to _ROWS_PER_STATEMENT of them per statement: one statement for many rows, not
    executemany's one step per row."""
    for chunk in _chunks(list(rows), _ROWS_PER_STATEMENT):
        db.execute(insert.statement(len(chunk)), [value for row in chunk for value in row])


def _chunks(items: list[Any], size: int) -> Iterable[list[Any]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def _dead_letters(records: Sequence[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """Outcomes of jobs that died with a dead-letter integration to forward them to."""
    return [r for r in records if r[_STATE] == "dead" and r[_DEAD_LETTER]]
