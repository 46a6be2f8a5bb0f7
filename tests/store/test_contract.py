"""The storage API's contract, through the API alone: every engine (tests/store/conftest.py ENGINES) must pass
it. No SQL and no engine internals here; what only SQLite does is in test_sqlite.py."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time

import pytest

from eventrelay.events import Event, parse_event
from eventrelay.jobs import AttemptRecord, Job, JobState, Outcome
from eventrelay.store import DEAD_LETTER_TYPE, AuditEntry, JobSearch, LastAttempts, OutcomeCounts, Store, StoreError

from ..conftest import wait_until
from .conftest import FAR, R, Stores, ev


def outcome(job: Job, state: JobState, next_at: float | None = None, *, started_at: float = 1.0,
            dead_letter: str | None = None, **fields) -> AttemptRecord:
    fields.setdefault("succeeded", state is JobState.DELIVERED)
    return AttemptRecord(job, Outcome(job.id, duration=0.01, **fields), started_at, state, next_at,
                         dead_letter=dead_letter)


async def finish(store: Store, state: JobState, n: int, integration: str = "a") -> list[Job]:
    """Claim `n` due jobs and record them as delivered or dead."""
    jobs = await store.claim(integration, FAR, limit=n)
    await store.record([outcome(j, state) for j in jobs])
    return jobs


# -- ingest -----------------------------------------------------------------------------------------------

async def test_ingest_answers_each_event_with_its_jobs_once_committed(store: Store) -> None:
    woken: list[set[str]] = []
    store.on_jobs_added = woken.append
    answers = await store.ingest([ev(1), ev(2), ev(None)], [R("a"), R("a", "b"), R()])
    assert [(a.id, a.jobs, a.duplicate) for a in answers[:2]] == [("evt-1", 1, False), ("evt-2", 2, False)]
    assert answers[2].jobs == 0 and not answers[2].duplicate and answers[2].id  # an id made by the daemon
    assert set().union(*woken) == {"a", "b"}
    assert await store.job_counts() == {("a", JobState.PENDING): 2, ("b", JobState.PENDING): 1}
    # An event no integration observes is stored all the same.
    (unobserved,) = [e for e in (await store.events())[0] if e.id == answers[2].id]
    assert unobserved.type == "order.paid" and json.loads(unobserved.payload) == {"data": {"id": "None"}}


async def test_duplicates_across_and_within_calls_queue_nothing(store: Store) -> None:
    first = await store.ingest([ev(1), ev(2)], [R("a"), R("a", "b")])
    assert [(a.jobs, a.duplicate) for a in first] == [(1, False), (2, False)]
    again = await store.ingest([ev(2), ev(3), ev(3)], [R("a"), R("a"), R("a")])
    assert [(a.id, a.jobs, a.duplicate) for a in again] == [("evt-2", 2, True), ("evt-3", 1, False),
                                                             ("evt-3", 1, True)]
    assert sum((await store.job_counts()).values()) == 4
    assert (await store.events())[1] == 3
    # Events without a producer id are never duplicates of one another.
    anon = await store.ingest([ev(None), ev(None)], [R(), R()])
    assert anon[0].id != anon[1].id and not any(a.duplicate for a in anon)


async def test_concurrent_ingests_share_commits(store: Store) -> None:
    results = await asyncio.gather(*(store.ingest([ev(i)], [R("a", "b")]) for i in range(300)))
    assert [r[0].id for r in results] == [f"evt-{i}" for i in range(300)]
    assert all(r[0].jobs == 2 and not r[0].duplicate for r in results)
    assert store.commits < 300 / 5, f"{store.commits} commits for 300 concurrent ingests: no group commit"
    assert await store.job_counts() == {("a", JobState.PENDING): 300, ("b", JobState.PENDING): 300}


async def test_an_ingest_that_cannot_be_stored_stores_none_of_its_events_and_fails_no_other(store: Store) -> None:
    # A lone surrogate is not Unicode: no engine can store it. The whole call fails, and nothing of it stays;
    # an ingest committed beside it is not affected.
    unstorable = Event("bad", "order.paid", {}, None, True, '{"data":{"x":"\ud800"}}')
    failed, fine = await asyncio.gather(store.ingest([ev(1), unstorable, ev(2)], [R("a")] * 3),
                                        store.ingest([ev(3)], [R("a")]), return_exceptions=True)
    assert isinstance(failed, StoreError), failed
    assert [(a.id, a.duplicate) for a in fine] == [("evt-3", False)]
    events, total = await store.events()
    assert total == 1 and [e.id for e in events] == ["evt-3"]
    assert await store.job_counts() == {("a", JobState.PENDING): 1}
    # Nothing was taken by the failed call: its events are new when they come again.
    assert [(a.id, a.jobs, a.duplicate) for a in await store.ingest([ev(1), ev(2)], [R("a")] * 2)] == [
        ("evt-1", 1, False), ("evt-2", 1, False)]


async def test_what_was_acknowledged_is_there_after_a_reopen(stores: Stores) -> None:
    store = await stores.open()
    await store.ingest([ev(i) for i in range(5)], [R("a")] * 5)
    store = await stores.reopen(store)
    assert [j.event_id for j in await store.claim("a", FAR, limit=10)] == [f"evt-{i}" for i in range(5)]
    # Ids are not handed out twice after a reopen either.
    more = await store.ingest([ev(None)], [R("a")])
    assert more[0].jobs == 1 and len({j.id for j in await store.claim("a", FAR, limit=10)}) == 6


async def test_writes_after_stop_fail_and_store_nothing(stores: Stores) -> None:
    store = await stores.open()
    assert await store.ping()
    store.stop()
    with pytest.raises(StoreError):
        await store.ingest([ev(1)], [R("a")])
    store = await stores.reopen(store)
    assert await store.event("evt-1") is None


# -- claims -----------------------------------------------------------------------------------------------

async def test_claims_page_oldest_first_skip_held_jobs_and_other_integrations(store: Store) -> None:
    await store.ingest([ev(i) for i in range(10)], [R("a")] * 10)
    await store.ingest([ev(99)], [R("b")])
    page = await store.claim("a", FAR, limit=4)
    assert [j.event_id for j in page] == [f"evt-{i}" for i in range(4)]
    assert all(j.attempt == 1 and j.integration == "a" and j.event_type == "order.paid" for j in page)
    nxt = await store.claim("a", FAR, limit=4, exclude=[j.id for j in page])
    assert [j.event_id for j in nxt] == [f"evt-{i}" for i in range(4, 8)]
    assert await store.claim("a", 0, limit=4) == []  # nothing is due before it was accepted
    assert [j.event_id for j in await store.claim("b", FAR, limit=4)] == ["evt-99"]
    held = [j.id for j in page + nxt]
    assert [j.event_id for j in await store.claim("a", FAR, limit=10, exclude=held)] == ["evt-8", "evt-9"]


async def test_only_claims_among_the_jobs_named(store: Store) -> None:
    await store.ingest([ev(i) for i in range(5)], [R("a")] * 5)
    ids = [j.id for j in await store.claim("a", FAR, limit=5)]
    assert [j.id for j in await store.claim("a", FAR, limit=5, only=[ids[3], ids[1]])] == [ids[1], ids[3]]
    assert await store.claim("a", FAR, limit=5, only=[]) == []
    assert await store.claim("a", FAR, limit=5, exclude=[ids[1]], only=[ids[1]]) == []
    assert await store.claim("a", 0, limit=5, only=[ids[0]]) == []  # named, but not due


async def test_an_ordered_claim_hands_out_only_the_head_of_each_key(store: Store) -> None:
    keyed = [("a", "k1"), ("a", "k1"), ("a", "k2"), ("a", None), ("a", "k2")]
    await store.ingest([ev(i) for i in range(5)], [[route] for route in keyed])
    heads = await store.claim("a", FAR, limit=10, ordered=True)
    assert [j.event_id for j in heads] == ["evt-0", "evt-2", "evt-3"]
    assert len(await store.claim("a", FAR, limit=10)) == 5  # unordered: everything due
    first, second, _ = heads
    # A head waiting for its retry still holds its key back; once it is done, the next one is the head.
    await store.record([outcome(first, JobState.PENDING, FAR + 100), outcome(second, JobState.DELIVERED)])
    assert [j.event_id for j in await store.claim("a", FAR, limit=10, exclude=[heads[2].id], ordered=True)] == [
        "evt-4"]
    (retried,) = await store.claim("a", FAR + 100, limit=1, ordered=True, only=[first.id])
    await store.record([outcome(retried, JobState.DEAD)])
    assert [j.event_id for j in await store.claim("a", FAR, limit=10, exclude=[heads[2].id], ordered=True)] == [
        "evt-1", "evt-4"]


async def test_a_claimed_job_carries_what_was_stored_exactly(store: Store) -> None:
    # Strings with quotes, escapes, NULs and non-ASCII, big integers, and the acceptance time must come back
    # from a claim unchanged.
    data = {"id": "1", "note": 'quote " backslash \\ nul \u0000 tab \t é 😀', "big": 2**70, "neg": -1.5e-300}
    odd = parse_event({"id": "odd", "type": "customer.updated", "data": data, "included": {"x": [1]}})
    await store.ingest([odd], [R("a")])
    await store.ingest([ev(2), ev(3)], [R("a"), R("a")])
    first = await store.claim("a", FAR, limit=10)
    assert [j.event_id for j in first] == ["odd", "evt-2", "evt-3"]
    # Due first, then by job id.
    await store.record([outcome(j, JobState.PENDING, 1.0 if j.event_id == "evt-3" else 2.0) for j in first])
    page = await store.claim("a", FAR, limit=10)
    assert [j.event_id for j in page] == ["evt-3", "odd", "evt-2"]
    assert all(j.attempt == 2 for j in page)
    stored = {j.event_id: await store.event(j.event_id) for j in page}
    assert page[1].payload == stored["odd"].payload == odd.payload and page[1].event_type == "customer.updated"
    assert json.loads(page[1].payload) == {"data": data, "included": {"x": [1]}}
    assert all(j.accepted_at == j.age_from == stored[j.event_id].accepted_at for j in page)
    assert abs(page[0].accepted_at - time.time()) < 60


# -- outcomes -----------------------------------------------------------------------------------------------

async def test_outcomes_move_jobs_and_log_attempts(store: Store) -> None:
    await store.ingest([ev(1), ev(2), ev(3)], [R("a")] * 3)
    j1, j2, j3 = await store.claim("a", FAR, limit=3)
    await store.record([
        outcome(j1, JobState.DELIVERED, status_code=200, body="ok"),
        outcome(j2, JobState.PENDING, 10**9 * 5.0, succeeded=False, status_code=500, error="boom"),
        outcome(j3, JobState.DEAD, succeeded=False, error="never"),
    ])
    assert await store.job_counts() == {("a", JobState.PENDING): 1, ("a", JobState.DEAD): 1}
    assert await store.job_counts(tuple(JobState)) == {
        ("a", JobState.PENDING): 1, ("a", JobState.DEAD): 1, ("a", JobState.DELIVERED): 1}
    assert await store.claim("a", 10**9 * 4.0, limit=5) == []  # j2 is not due before its retry time
    (again,) = await store.claim("a", FAR, limit=5)
    assert again.id == j2.id and again.attempt == 2
    assert await store.next_due("a") == 10**9 * 5.0
    assert await store.next_due("a", exclude=[j2.id]) is None
    (attempt,) = await store.attempts(j2.id)
    assert (attempt.job_id, attempt.integration, attempt.attempt, attempt.succeeded, attempt.status_code,
            attempt.error_detail, attempt.created_at, attempt.duration) == (j2.id, "a", 1, False, 500, "boom", 1.0,
                                                                            0.01)
    (delivered,) = await store.attempts(j1.id)
    assert delivered.succeeded and delivered.body == "ok" and delivered.error_detail is None
    views = {j.id: j for j in (await store.jobs("a"))[0]}
    assert (views[j2.id].state, views[j2.id].attempts, views[j2.id].last_error,
            views[j2.id].next_attempt_at) == (JobState.PENDING, 1, "boom", 10**9 * 5.0)
    assert (views[j3.id].state, views[j3.id].last_error, views[j3.id].next_attempt_at) == (JobState.DEAD, "never",
                                                                                           None)
    assert views[j1.id].state is JobState.DELIVERED and views[j1.id].next_attempt_at is None


async def test_outcomes_written_behind_all_resolve_once_committed(store: Store) -> None:
    await store.ingest([ev(i) for i in range(200)], [R("a")] * 200)
    jobs = await store.claim("a", FAR, limit=200)
    written = []
    for job in jobs:  # one outcome per turn of the loop, as deliveries end
        written.append(store.record_later([outcome(job, JobState.DELIVERED)]))
        await asyncio.sleep(0)
    async with asyncio.timeout(10):
        await asyncio.gather(*written)
    assert await store.job_counts(tuple(JobState)) == {("a", JobState.DELIVERED): 200}


async def test_a_job_that_dies_is_forwarded_to_its_dead_letter_integration(store: Store) -> None:
    woken: list[set[str]] = []
    store.on_jobs_added = woken.append
    await store.ingest([parse_event({"id": "lost", "type": "order.paid", "data": {"n": 1}})], [R("a")])
    (job,) = await store.claim("a", FAR, limit=1)
    await store.record([outcome(job, JobState.DEAD, succeeded=False, status_code=400, error="refused",
                                dead_letter="dlq")])
    assert {"dlq"} <= set().union(*woken)
    (letter,) = await store.claim("dlq", FAR, limit=5)
    assert letter.event_type == DEAD_LETTER_TYPE and letter.event_id != "lost"
    assert json.loads(letter.payload) == {"data": {
        "type": "dead_letter", "integration": "a", "job_id": str(job.id), "attempts": 1, "error": "refused",
        "status_code": 400, "event": {"id": "lost", "type": "order.paid", "data": {"n": 1}}}}
    (view,), total = await store.jobs("dlq")
    assert total == 1 and view.event_type == DEAD_LETTER_TYPE and view.state is JobState.PENDING
    assert (await store.event(letter.event_id)).type == DEAD_LETTER_TYPE


# -- integration state ------------------------------------------------------------------------------------------

async def test_a_disabled_integration_stays_disabled_across_a_reopen(stores: Stores) -> None:
    store = await stores.open()
    assert await store.disabled() == {}
    before = time.time()
    await store.set_disabled("a", "the target answered 410 Gone")
    await store.set_disabled("b", "gone too")
    store = await stores.reopen(store)
    disabled = await store.disabled()
    assert {name: reason for name, (_, reason) in disabled.items()} == {
        "a": "the target answered 410 Gone", "b": "gone too"}
    assert all(before - 1 <= at <= time.time() + 1 for at, _ in disabled.values())
    await store.set_disabled("a", None)
    store = await stores.reopen(store)
    assert list(await store.disabled()) == ["b"]


async def test_a_paused_integration_stays_paused_across_a_reopen_apart_from_its_410(stores: Stores) -> None:
    store = await stores.open()
    assert await store.paused() == {}
    before = time.time()
    await store.set_paused("a", True)
    await store.set_disabled("a", "gone")  # a 410 and a pause are separate states of one integration
    await store.set_paused("b", True)
    store = await stores.reopen(store)
    paused = await store.paused()
    assert sorted(paused) == ["a", "b"] and all(before - 1 <= at <= time.time() + 1 for at in paused.values())
    assert list(await store.disabled()) == ["a"]
    woken: list[set[str]] = []
    store.on_jobs_added = woken.append
    await store.set_paused("a", False)  # resumed: its dispatchers look again for its jobs
    assert any("a" in names for names in woken)
    await store.set_disabled("a", None)
    store = await stores.reopen(store)
    assert list(await store.paused()) == ["b"] and await store.disabled() == {}


# -- admin writes ------------------------------------------------------------------------------------------------

async def test_retry_and_replay(store: Store) -> None:
    await store.ingest([ev(i) for i in range(6)], [R("a")] * 6)
    dead = await finish(store, JobState.DEAD, 2)
    delivered = await finish(store, JobState.DELIVERED, 2)
    assert await store.retry("a", dead[0].id) is JobState.DEAD
    assert await store.retry("a", delivered[0].id) is JobState.DELIVERED  # refused: replay is for that
    assert await store.retry("b", dead[1].id) is None and await store.retry("a", 999) is None
    assert await store.job_counts() == {("a", JobState.PENDING): 3, ("a", JobState.DEAD): 1}
    (again,) = [j for j in await store.claim("a", FAR, limit=10) if j.id == dead[0].id]
    assert again.attempt == 2 and again.age_from > again.accepted_at - 1  # a fresh max_age window
    assert (await store.job("a", delivered[0].id)).state is JobState.DELIVERED

    assert await store.replay("a", dead=True, since=FAR) == 0  # dead, but created before that
    assert await store.replay("a", dead=True, since=0, until=FAR) == 1
    assert await store.replay("a", dead=True) == 0
    # A time range re-queues delivered jobs too; pending ones are left alone.
    assert await store.replay("a", since=0, until=FAR, limit=1) == 1
    assert await store.replay("a", since=0, until=FAR) == 1
    assert await store.job_counts() == {("a", JobState.PENDING): 6}
    assert await store.replay("a", since=FAR, until=FAR + 1) == 0


async def test_a_replay_in_batches_skips_what_it_already_requeued(store: Store) -> None:
    await store.ingest([ev(i) for i in range(5)], [R("a")] * 5)
    await finish(store, JobState.DELIVERED, 5)
    started = time.time()
    assert await store.replay("a", since=0, until=FAR, not_requeued_since=started, limit=3) == 3
    await finish(store, JobState.DELIVERED, 3)  # delivered again before the next batch
    assert await store.replay("a", since=0, until=FAR, not_requeued_since=started, limit=3) == 2
    await finish(store, JobState.DELIVERED, 2)
    assert await store.replay("a", since=0, until=FAR, not_requeued_since=started, limit=3) == 0


async def test_pruning_removes_only_what_retention_allows(store: Store) -> None:
    await store.ingest([ev(i) for i in range(5)], [R("a")] * 4 + [R()])
    await finish(store, JobState.DELIVERED, 2)
    await finish(store, JobState.DEAD, 1)
    # Nothing is old enough yet.
    assert await store.prune(delivered_before=0, dead_before=0) == 0
    total = 0
    while (n := await store.prune(delivered_before=FAR, dead_before=0, batch=1)) > 0:
        total += n
    assert total > 0
    jobs, _ = await store.jobs()
    assert sorted((j.event_id, j.state) for j in jobs) == [("evt-2", JobState.DEAD), ("evt-3", JobState.PENDING)]
    events, _ = await store.events()
    assert {e.id for e in events} == {"evt-2", "evt-3"}  # delivered ones and the event nobody observed are gone
    _, attempts = await store.logs()
    assert attempts == 1  # the dead job's attempt stays with it
    assert await store.outcomes_since(0) == {}  # counts older than the retention went with the attempts
    assert await store.prune(delivered_before=FAR, dead_before=FAR) > 0
    assert [(j.event_id, j.state) for j in (await store.jobs())[0]] == [("evt-3", JobState.PENDING)]
    assert await store.logs() == ([], 0)


# -- reads for status and the admin API ------------------------------------------------------------------------

async def test_outcome_counts_and_the_last_attempts(store: Store) -> None:
    now = time.time()
    await store.ingest([ev(i) for i in range(4)], [R("a")] * 3 + [R("b")])
    j1, j2, j3 = await store.claim("a", FAR, limit=3)
    assert await store.last_attempts("a") == LastAttempts(None, None, None)
    await store.record([outcome(j2, JobState.PENDING, FAR, succeeded=False, error="first", started_at=now - 5)])
    await store.record([outcome(j1, JobState.DELIVERED, started_at=now - 2)])
    await store.record([outcome(j3, JobState.DEAD, succeeded=False, error="last", started_at=now - 7200)])
    # The last failure is kept after a success, and "last" means latest recorded.
    assert await store.last_attempts("a") == LastAttempts(now - 2, now - 7200, "last")
    assert await store.last_attempts("b") == LastAttempts(None, None, None)
    want = {"a": OutcomeCounts(delivered=1, failed=1, dead=0)}

    async def counted() -> bool:
        return await store.outcomes_since(now - 3600) == want

    await wait_until(counted, timeout=5)  # counts may lag the outcomes by a second
    assert await store.outcomes_since(now - 3 * 3600) == {"a": OutcomeCounts(delivered=1, failed=1, dead=1)}
    # Per minute, for a chart: the minutes with attempts, oldest first, each at its start.
    minute = lambda at: at // 60 * 60.0  # noqa: E731
    by_minute = await store.outcomes_by_minute("a", now - 3 * 3600)
    assert {at: c for at, c in by_minute if at == minute(now - 7200)} == {minute(now - 7200): OutcomeCounts(dead=1)}
    assert [at for at, _ in by_minute] == sorted({minute(now - 7200), minute(now - 5), minute(now - 2)})
    assert sum(c.delivered for _, c in by_minute) == 1 and sum(c.failed for _, c in by_minute) == 1
    assert await store.outcomes_by_minute("a", now + 60) == [] and await store.outcomes_by_minute("b", 0) == []
    oldest = await store.oldest_pending()
    assert set(oldest) == {"a", "b"} and all(abs(at - now) < 60 for at in oldest.values())


async def test_jobs_pages_newest_first_with_filters(store: Store) -> None:
    await store.ingest([ev(i) for i in range(7)], [R("a")] * 7)
    await store.ingest([ev(i) for i in range(7, 10)], [R("a", "b")] * 3)
    page, total = await store.jobs("a", limit=3)
    assert total == 10 and [j.event_id for j in page] == ["evt-9", "evt-8", "evt-7"]
    page, total = await store.jobs("a", limit=3, offset=9)
    assert total == 10 and [j.event_id for j in page] == ["evt-0"]
    assert (await store.jobs("a", limit=3, offset=10)) == ([], 10)
    assert (await store.jobs())[1] == 13
    assert sorted(j.integration for j in (await store.jobs(event_id="evt-8"))[0]) == ["a", "b"]
    assert (await store.jobs("b", event_id="evt-8"))[1] == 1 and (await store.jobs(event_id="nope")) == ([], 0)
    done = await finish(store, JobState.DELIVERED, 2)
    delivered, total = await store.jobs("a", JobState.DELIVERED)
    assert total == 2 and {j.id for j in delivered} == {j.id for j in done}
    assert (await store.jobs(None, JobState.DELIVERED))[1] == 2 and (await store.jobs("b", JobState.DELIVERED))[1] == 0
    view = await store.job("a", done[0].id)
    assert (view.id, view.integration, view.event_id, view.event_type, view.attempts) == (
        done[0].id, "a", done[0].event_id, "order.paid", 1)
    assert view.updated_at >= view.created_at
    assert await store.job("b", done[0].id) is None and await store.job("a", 10**6) is None


async def test_logs_and_attempts_page_the_attempt_log(store: Store) -> None:
    await store.ingest([ev(i) for i in range(3)], [R("a", "b")] * 3)
    for integration in ("a", "b"):
        jobs = await store.claim(integration, FAR, limit=3)
        await store.record([outcome(j, JobState.PENDING, 0.0, succeeded=False, error="e1") for j in jobs])
        jobs = await store.claim(integration, FAR, limit=3)
        await store.record([outcome(j, JobState.DELIVERED) for j in jobs])
    entries, total = await store.logs()
    assert total == 12 and len(entries) == 12 and [e.id for e in entries] == sorted((e.id for e in entries),
                                                                                    reverse=True)
    page, total = await store.logs("a", limit=4, offset=4)
    assert total == 6 and len(page) == 2 and all(e.integration == "a" for e in page)
    job_id = page[0].job_id
    log, total = await store.logs("a", job_id)
    assert total == 2 and [(e.attempt, e.succeeded) for e in log] == [(2, True), (1, False)]
    assert await store.logs("b", job_id) == ([], 0)
    assert [(a.attempt, a.error_detail) for a in await store.attempts(job_id)] == [(1, "e1"), (2, None)]
    assert await store.attempts(10**6) == []


async def test_events_page_newest_first(store: Store) -> None:
    await store.ingest([ev(i) for i in range(5)], [R("a"), R(), R("a"), R(), R("a")])
    page, total = await store.events(limit=2)
    assert total == 5 and [e.id for e in page] == ["evt-4", "evt-3"]
    page, _ = await store.events(limit=2, offset=4)
    assert [e.id for e in page] == ["evt-0"]
    stored = await store.event("evt-1")
    assert (stored.id, stored.type, json.loads(stored.payload)) == ("evt-1", "order.paid", {"data": {"id": "1"}})
    assert await store.event("nope") is None


# -- search, the live tail, latency samples ------------------------------------------------------------------

async def all_pages(store: Store, query: JobSearch, limit: int, scan: int = 20_000) -> tuple[list[str], int]:
    """Every job a search finds, page after page (bounded), as "integration/event id"; and how many pages."""
    found, pages = [], 0
    while pages < 100:
        page = await store.search(query, limit, scan)
        pages += 1
        assert len(page.jobs) <= limit
        found += [f"{j.integration}/{j.event_id}" for j in page.jobs]
        if page.next is None:
            return found, pages
        query = dataclasses.replace(query, before=page.next)
    raise AssertionError("the search never ended")


def by_event(found: list[str] | tuple[list[str], int]) -> list[set[str]]:
    """Jobs found, newest event first; an event's jobs (one per integration) in any order."""
    found = found[0] if isinstance(found, tuple) else found
    groups: list[set[str]] = []
    for job in found:
        if groups and next(iter(groups[-1])).split("/")[1] == job.split("/")[1]:
            groups[-1].add(job)
        else:
            groups.append({job})
    return groups


async def test_search_filters_newest_first_and_pages_with_a_cursor(store: Store) -> None:
    await store.ingest([ev(i, "order.paid") for i in range(6)], [R("a")] * 6)
    middle = time.time()
    await asyncio.sleep(0.05)
    await store.ingest([ev(i, "cart.updated") for i in range(6, 9)], [R("a", "b")] * 3)
    await finish(store, JobState.DEAD, 2)  # evt-0 and evt-1 on a
    newest_a = [f"a/evt-{i}" for i in range(8, -1, -1)]

    assert await all_pages(store, JobSearch(integration="a"), 4) == (newest_a, 3)
    assert by_event(await all_pages(store, JobSearch(), 100)) == by_event(
        ["a/evt-8", "b/evt-8", "a/evt-7", "b/evt-7", "a/evt-6", "b/evt-6"] + newest_a[3:])
    assert (await all_pages(store, JobSearch(state=JobState.DEAD), 1)) == (["a/evt-1", "a/evt-0"], 2)
    assert (await all_pages(store, JobSearch(integration="a", state=JobState.PENDING), 25))[0] == newest_a[:-2]
    assert (await all_pages(store, JobSearch(integration="b", event_type="order.paid"), 25)) == ([], 1)
    assert (await all_pages(store, JobSearch(event_type="cart.updated", integration="b"), 2))[0] == [
        "b/evt-8", "b/evt-7", "b/evt-6"]
    # A time range: jobs created at or after `since` and before `until`.
    assert (await all_pages(store, JobSearch(integration="a", until=middle), 25))[0] == newest_a[3:]
    assert by_event(await all_pages(store, JobSearch(since=middle), 25)) == by_event(
        ["a/evt-8", "b/evt-8", "a/evt-7", "b/evt-7", "a/evt-6", "b/evt-6"])
    assert (await all_pages(store, JobSearch(since=middle, until=middle + 3600, state=JobState.DEAD), 25))[0] == []
    assert (await all_pages(store, JobSearch(until=0.0), 25)) == ([], 1)
    assert (await all_pages(store, JobSearch(integration="nobody"), 25)) == ([], 1)
    page = await store.search(JobSearch(integration="a"), 2)
    assert [j.event_id for j in page.jobs] == ["evt-8", "evt-7"] and page.jobs[0].event_type == "cart.updated"


async def test_a_search_page_examines_a_bounded_number_of_jobs_and_goes_on_from_there(store: Store) -> None:
    await store.ingest([ev(i) for i in range(20)], [R("a")] * 20)
    await finish(store, JobState.DEAD, 1)  # evt-0: the only dead job, behind 19 pending ones
    # Examining 5 jobs a page, the search for it walks back page by page, empty ones included (the fifth
    # page finds that nothing is older).
    found, pages = await all_pages(store, JobSearch(state=JobState.DEAD), 10, scan=5)
    assert found == ["a/evt-0"] and pages == 5
    found, pages = await all_pages(store, JobSearch(integration="a", state=JobState.DEAD), 10, scan=5)
    assert found == ["a/evt-0"] and pages == 1  # through the index of a's dead jobs: one page
    found, pages = await all_pages(store, JobSearch(), 3, scan=5)
    assert len(found) == 20 and pages == 7


async def test_the_attempt_log_pages_back_and_the_live_tail_reads_on_with_each_event(store: Store) -> None:
    assert await store.attempts_before(None, None, 10) == []
    await store.ingest([ev(i, "customer.updated") for i in range(5)], [R("a")] * 5 + [R("b")])
    await store.ingest([ev("b0")], [R("b")])
    jobs = await store.claim("a", FAR, limit=5)
    await store.record([outcome(j, JobState.DELIVERED) for j in jobs[:3]])
    await store.record([outcome(j, JobState.DELIVERED) for j in await store.claim("b", FAR, limit=1)])
    latest = await store.attempts_before(None, None, 2)
    assert [(a.integration, a.event_id, a.event_type) for a in latest] == [
        ("b", "evt-b0", "order.paid"), ("a", "evt-2", "customer.updated")]
    older = await store.attempts_before(None, latest[-1].id, 10)
    assert [a.event_id for a in older] == ["evt-1", "evt-0"]
    assert [a.event_id for a in await store.attempts_before("a", None, 10)] == ["evt-2", "evt-1", "evt-0"]
    assert await store.attempts_before("c", None, 10) == []
    # The tail: what was logged after the last line seen, oldest first.
    assert await store.attempts_after(latest[0].id, 10) == []
    await store.record([outcome(j, JobState.PENDING, FAR, succeeded=False, status_code=500) for j in jobs[3:]])
    after = await store.attempts_after(latest[0].id, 10)
    assert [(a.event_id, a.succeeded, a.status_code) for a in after] == [("evt-3", False, 500), ("evt-4", False, 500)]
    assert [a.event_id for a in await store.attempts_after(latest[1].id, 2)] == ["evt-b0", "evt-3"]


async def test_durations_are_a_bounded_sample_of_the_latest_attempts(store: Store) -> None:
    now = time.time()
    await store.ingest([ev(i) for i in range(5)], [R("a")] * 5)
    jobs = await store.claim("a", FAR, limit=5)
    await store.record([AttemptRecord(j, Outcome(j.id, duration=0.1 * (i + 1), succeeded=True),
                                      now - 7200 if i == 0 else now, JobState.DELIVERED, None)
                        for i, j in enumerate(jobs)])
    assert sorted(await store.durations("a", now - 3600)) == pytest.approx([0.2, 0.3, 0.4, 0.5])
    assert sorted(await store.durations("a", now - 3600, limit=2)) == pytest.approx([0.4, 0.5])
    assert await store.durations("b", 0) == []


async def test_the_producers_trace_context_comes_back_with_each_claimed_job(store: Store) -> None:
    traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    traced = parse_event({"id": "t1", "type": "order.paid", "data": {}, "traceparent": traceparent,
                          "tracestate": "shop=7,rojo=00f067aa0ba902b7"})
    await store.ingest([traced, ev(2)], [R("a", "b"), R("a")])
    jobs = await store.claim("a", FAR, limit=10)
    assert [(j.event_id, j.traceparent, j.tracestate) for j in jobs] == [
        ("t1", traceparent, "shop=7,rojo=00f067aa0ba902b7"), ("evt-2", None, None)]
    assert [j.traceparent for j in await store.claim("b", FAR, limit=10)] == [traceparent]


async def test_the_audit_log_keeps_actions_newest_first_and_is_pruned_with_the_attempts(store: Store) -> None:
    now = time.time()
    for i, action in enumerate(["pause", "resume", "replay"]):
        await store.audit(AuditEntry(at=now - 10 + i, action=action, target="erp", scope="admin",
                                     fingerprint="0123456789ab", address="127.0.0.1", detail=f"step {i}"))
    await store.audit(AuditEntry(at=now - 7200, action="retry", target="erp/job 7", scope="open", fingerprint=None,
                                 address=None))
    log = await store.audit_log(None, 10)
    assert [e.action for e in log] == ["retry", "replay", "resume", "pause"]  # by id: as they were written
    replay = log[1]
    assert (replay.target, replay.scope, replay.fingerprint, replay.address, replay.detail) == (
        "erp", "admin", "0123456789ab", "127.0.0.1", "step 2")
    assert [e.action for e in await store.audit_log(log[1].id, 10)] == ["resume", "pause"]
    assert [e.action for e in await store.audit_log(None, 1)] == ["retry"]
    while await store.prune(now - 3600, now - 3600):
        pass
    assert [e.action for e in await store.audit_log(None, 10)] == ["replay", "resume", "pause"]


async def test_the_backlog_is_counted_up_to_a_cap(store: Store) -> None:
    await store.ingest([ev(i) for i in range(7)], [R("a")] * 6 + [R("b")])
    await finish(store, JobState.DEAD, 2)
    assert await store.backlog(["a", "b", "c"], cap=100) == {
        ("a", JobState.PENDING): 4, ("a", JobState.DEAD): 2, ("b", JobState.PENDING): 1, ("b", JobState.DEAD): 0,
        ("c", JobState.PENDING): 0, ("c", JobState.DEAD): 0}
    capped = await store.backlog(["a"], cap=3)
    assert capped == {("a", JobState.PENDING): 4, ("a", JobState.DEAD): 2}  # more than 3 reads as 4
