"""The admin API against a running daemon: status, integrations, jobs, logs, retry, replay, metrics, pruning."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest
from aiohttp import web

from eventrelay.clock import parse_time

from .conftest import Receiver, wait_for, wait_until, webhook

# Behaviour that must hold on either storage engine (tests/conftest.py).
pytestmark = pytest.mark.engines("sqlite", "postgresql")

FAST = {"retry": {"initial": "50ms", "max_interval": "100ms", "max_age": "1h"}}
# For tests whose receiver fails many jobs on purpose: a breaker that never opens (tested on its own).
NO_BREAKER = {"failures": 1000, "window": 1000}


async def get(d, path: str, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    async with d.http.get(d.url + path, headers=headers) as r:
        return r.status, (await r.json() if r.content_type == "application/json" else await r.text())


async def post(d, path: str, body: Any = None, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    async with d.http.post(d.url + path, json=body, headers=headers) as r:
        return r.status, await r.json()


async def test_status_and_integrations(start_daemon, receiver: Receiver) -> None:
    receiver.respond = lambda r: web.Response(status=500 if r.json["id"] == "bad" else 204)
    d = await start_daemon([webhook("erp", receiver.url, configuration={"url": receiver.url,
                                                                        "secret_key": "s3cret-PSYQ"},
                                    delivery={"retry": {"initial": "10s", "max_interval": "10s"}}),
                            webhook("off", receiver.url, enabled=False)])
    await d.post([{"id": "ok1", "type": "order.paid", "data": {}}, {"id": "bad", "type": "order.paid", "data": {}}])
    await wait_until(lambda: len(receiver.requests) == 2)
    await wait_for(d.attempts, lambda attempts: len(attempts) == 2)
    status, body = await get(d, "/v1/status")
    assert status == 200
    data = body["data"]
    assert data["version"] and data["uptime_s"] >= 0 and data["config"]["last_reload"] is None
    erp, off = data["integrations"]
    assert (erp["name"], erp["enabled"], erp["pending"], erp["dead"], erp["delivered_last_hour"]) == (
        "erp", True, 1, 0, 1)
    assert erp["last_success_at"].endswith("Z") and erp["last_failure_at"].endswith("Z")
    assert erp["last_error"] == "Received a status code outside of 2xx range (500)"
    assert (off["name"], off["enabled"], off["pending"]) == ("off", False, 0)

    status, body = await get(d, "/v1/integrations/erp")
    assert status == 200 and body["data"]["configuration"] == {"url": receiver.url, "secret_key": "****PSYQ",
                                                               "send_resources": True, "headers": {}, "auth": None,
                                                               "tls": None}
    status, body = await get(d, "/v1/integrations")
    assert [i["name"] for i in body["data"]] == ["erp", "off"] and "s3cret" not in str(body)
    status, body = await get(d, "/v1/integrations/nope")
    assert status == 404 and "no integration named 'nope'" in body["errors"][0]["detail"]


async def test_jobs_and_logs_are_paginated_like_the_seed_system(start_daemon, receiver: Receiver) -> None:
    receiver.respond = lambda r: web.Response(status=500, text="nope") if r.json["attempt"] == 1 else \
        web.Response(status=204)
    # Every job fails once: keep the circuit breaker out of this test (it would rightly hold deliveries back).
    d = await start_daemon([webhook("erp", receiver.url, delivery={**FAST, "breaker": NO_BREAKER})])
    await d.post([{"id": f"e{i:02}", "type": "order.paid", "data": {}} for i in range(30)])
    await wait_for(d.states, lambda states: states.get("delivered") == 30)

    status, body = await get(d, "/v1/integrations/erp/jobs?page[limit]=10&page[offset]=20&state=delivered")
    assert status == 200
    assert len(body["data"]) == 10
    assert body["meta"] == {"page": {"limit": 10, "offset": 20, "current": 3, "total": 3},
                            "results": {"total": 30}}
    assert body["links"]["next"] is None and "page%5Boffset%5D=10" in body["links"]["prev"]
    assert "state=delivered" in body["links"]["first"]
    job = body["data"][-1]  # newest first: the last of the third page is the oldest job
    assert (job["type"], job["event_id"], job["state"], job["attempts"]) == ("job", "e00", "delivered", 2)
    assert job["next_attempt_at"] is None and job["last_error"] is None

    status, body = await get(d, f"/v1/integrations/erp/jobs/{job['id']}/logs")
    assert [(x["attempt"], x["succeeded"], x["status_code"]) for x in body["data"]] == [(2, True, 204),
                                                                                     (1, False, 500)]
    entry = body["data"][1]
    assert entry["type"] == "integration-log" and entry["body"] == "nope"
    assert entry["error_detail"] == "Received a status code outside of 2xx range (500)"
    assert entry["relationships"] == {"integration": {"data": {"type": "integration", "id": "erp"}},
                                      "job": {"data": {"type": "job", "id": job["id"]}}}
    assert entry["meta"]["timestamps"]["created_at"].endswith("Z") and entry["processing_time"] >= 0

    status, body = await get(d, "/v1/integrations/erp/logs?page[limit]=100")
    assert body["meta"]["results"]["total"] == 60 and len(body["data"]) == 60
    status, body = await get(d, "/v1/logs?page[limit]=5")
    assert len(body["data"]) == 5 and body["meta"]["page"]["total"] == 12

    for bad in ("page[limit]=101", "page[limit]=0", "page[offset]=-1", "state=lost"):
        status, body = await get(d, f"/v1/integrations/erp/jobs?{bad}")
        assert status == 400, bad
    assert (await get(d, "/v1/integrations/nope/jobs"))[0] == 404


async def test_retry_and_replay(start_daemon, receiver: Receiver) -> None:
    failing = True
    receiver.respond = lambda r: web.Response(status=500 if failing else 204)
    d = await start_daemon([webhook("erp", receiver.url, delivery={
        "retry": {"initial": "50ms", "max_interval": "50ms", "max_age": "200ms"}, "breaker": NO_BREAKER})])
    await d.post([{"id": f"r{i}", "type": "order.paid", "data": {}} for i in range(3)])
    await wait_for(d.states, lambda states: states.get("dead") == 3, timeout=10)
    failing = False

    status, body = await post(d, "/v1/integrations/erp/jobs/1/retry")
    assert status == 200 and body["data"]["state"] == "pending"
    await wait_for(lambda: d.store.job("erp", 1), lambda job: job.state == "delivered")
    status, body = await post(d, "/v1/integrations/erp/jobs/1/retry")
    assert status == 409 and "replay" in body["errors"][0]["detail"]
    # ...and the range to replay to send just that one again (the CLI prints it as a command).
    created = (await d.store.job("erp", 1)).created_at
    since, until = parse_time(body["meta"]["replay"]["since"]), parse_time(body["meta"]["replay"]["until"])
    assert since < created < until and until - since <= 0.003
    assert (await post(d, "/v1/integrations/erp/jobs/999/retry"))[0] == 404

    status, body = await post(d, "/v1/integrations/erp/replay", {"state": "dead", "until": "2000-01-01T00:00:00Z"})
    assert status == 200 and body["data"] == {"queued": 0}  # dead jobs of a time range (the console's filter)
    status, body = await post(d, "/v1/integrations/erp/replay", {"state": "dead"})
    assert status == 200 and body["data"] == {"queued": 2}
    await wait_for(d.states, lambda states: states.get("delivered") == 3)

    before = len(receiver.requests)
    since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 3600))
    status, body = await post(d, "/v1/integrations/erp/replay", {"since": since, "until": time.time() + 1})
    assert status == 200 and body["data"] == {"queued": 3}  # delivered ones too
    await wait_until(lambda: len(receiver.requests) == before + 3)

    for bad in ({"state": "delivered"}, {}, {"state": "pending", "since": 0}, {"since": "yesterday"}, {"state": "dead", "limit": 0}, [1],
                {"since": "2026-01-01T00:00:00"}):
        status, body = await post(d, "/v1/integrations/erp/replay", bad)
        assert status == 400, bad
    assert (await post(d, "/v1/integrations/nope/replay", {"state": "dead"}))[0] == 404


async def test_metrics(start_daemon, receiver: Receiver) -> None:
    d = await start_daemon([webhook("erp", receiver.url)], listen={"token": "t"})
    auth = {"Authorization": "Bearer t"}
    await d.post([{"type": "order.paid", "data": {}}] * 3, headers=auth)
    await wait_for(d.states, lambda states: states.get("delivered") == 3)
    assert (await get(d, "/metrics"))[0] == 401  # same token as the rest of the API
    status, text = await get(d, "/metrics", auth)
    assert status == 200
    lines = text.splitlines()
    for expected in ('eventrelay_events_accepted_total{listener="http",type="order.paid"} 3.0',
                     'eventrelay_delivery_attempts_total{integration="erp",result="delivered"} 3.0',
                     'eventrelay_jobs_pending{integration="erp"} 0.0',
                     'eventrelay_delivery_duration_seconds_count{integration="erp"} 3.0'):
        assert expected in lines, expected
    assert any(line.startswith("eventrelay_store_commit_operations_bucket") for line in lines)
    assert any(line.startswith("eventrelay_oldest_pending_age_seconds") for line in lines)


async def test_retention_prunes_delivered_and_keeps_what_is_needed(start_daemon, receiver: Receiver) -> None:
    receiver.respond = lambda r: web.Response(status=500 if r.json["id"] == "dead" else 204)
    d = await start_daemon([webhook("erp", receiver.url, delivery={
        "retry": {"initial": "50ms", "max_interval": "50ms", "max_age": "100ms"}})],
        storage={"retention": "300ms", "dead_retention": "1h", "prune_interval": "200ms"})
    await d.post([{"id": "done", "type": "order.paid", "data": {}}, {"id": "dead", "type": "order.paid", "data": {}},
                  {"id": "nobody", "type": "customer.created", "data": {}}])
    await wait_for(d.events, lambda events: [e.id for e in events] == ["dead"], timeout=10)
    (job,) = await d.jobs()
    assert job.state == "dead"
    assert len(await d.attempts(job_id=job.id)) >= 1
    # A pruned id is a new event again: its dedup window was the retention.
    assert (await d.post({"id": "done", "type": "order.paid", "data": {}}))[1]["data"][0]["duplicate"] is False
    await asyncio.sleep(0)


async def test_status_figures_come_from_the_records_and_survive_a_reload(start_daemon, receiver: Receiver,
                                                                        tmp_path) -> None:
    fail = {"bad"}
    receiver.respond = lambda r: web.Response(status=500 if r.json["id"] in fail else 204)
    d = await start_daemon([webhook("erp", receiver.url, delivery={"retry": {"initial": "10s", "max_interval": "10s"}})])
    await d.post([{"id": f"ok{i}", "type": "order.paid", "data": {}} for i in range(20)] +
                 [{"id": "bad", "type": "order.paid", "data": {}}])
    await wait_for(d.attempts, lambda attempts: len(attempts) == 21)
    # A reload that changes the integration starts a new dispatcher: the figures must not start again at 0.
    config = tmp_path / "config.yaml"
    config.write_text(config.read_text().replace("max_interval: 10s", "max_interval: 20s"))
    assert (await d.service.reload()).changes == ("changed erp",)
    await d.post({"id": "ok-after", "type": "order.paid", "data": {}})
    await wait_for(d.attempts, lambda attempts: len(attempts) == 22)
    async def erp_status() -> dict:
        return (await get(d, "/v1/status"))[1]["data"]["integrations"][0]

    async def counted() -> bool:
        erp = await erp_status()
        return (erp["delivered_last_hour"], erp["failed_last_hour"]) == (21, 1)

    await wait_until(counted, timeout=5)  # counted in the database, within a second of the attempts
    erp = await erp_status()
    assert erp["success_rate_last_hour"] == round(21 / 22, 4)
    # A success after the failure: the failure and its error are still there to read.
    assert erp["last_success_at"] > erp["last_failure_at"]
    assert erp["last_error"] == "Received a status code outside of 2xx range (500)"


async def test_a_paused_integration_keeps_its_jobs_sends_nothing_and_stays_paused_across_a_restart(
        start_daemon, receiver: Receiver) -> None:
    integrations = [webhook("erp", receiver.url), webhook("crm", receiver.url + "/crm")]
    d = await start_daemon(integrations)
    status, body = await post(d, "/v1/integrations/erp/pause")
    assert (status, body["data"]) == (200, {"name": "erp", "paused": True, "was_paused": False})
    assert (await post(d, "/v1/integrations/erp/pause"))[1]["data"]["was_paused"] is True
    await d.post([{"id": f"p{i}", "type": "order.paid", "data": {}} for i in range(5)])
    await wait_until(lambda: len([r for r in receiver.requests if r.path == "/hook/crm"]) == 5)  # crm goes on
    await asyncio.sleep(0.5)
    assert not [r for r in receiver.requests if r.path == "/hook"]  # erp sends nothing
    _, status_body = await get(d, "/v1/status")
    erp = {row["name"]: row for row in status_body["data"]["integrations"]}["erp"]
    assert erp["pending"] == 5 and erp["paused"]["at"]
    _, metrics = await get(d, "/metrics")
    assert 'eventrelay_integration_paused{integration="erp"} 1.0' in metrics
    assert 'eventrelay_integration_paused{integration="crm"} 0.0' in metrics

    await d.shutdown()
    d = await start_daemon(integrations)  # the same database: the pause outlives the restart
    await asyncio.sleep(0.5)
    assert not [r for r in receiver.requests if r.path == "/hook"]
    status, body = await post(d, "/v1/integrations/erp/resume")
    assert (status, body["data"]["was_paused"]) == (200, True)
    await wait_until(lambda: len([r for r in receiver.requests if r.path == "/hook"]) == 5)
    assert (await post(d, "/v1/integrations/nope/pause"))[0] == 404


async def test_a_test_event_goes_to_one_integration_whatever_it_observes(start_daemon, receiver: Receiver) -> None:
    d = await start_daemon([webhook("erp", receiver.url, ["order.paid"]), webhook("crm", receiver.url + "/crm",
                                                                                   ["*"])])
    status, body = await post(d, "/v1/integrations/erp/test")
    assert status == 202 and body["data"]["jobs"] == 1 and not body["data"]["duplicate"]
    await wait_until(lambda: len(receiver.requests) == 1)
    (got,) = receiver.requests
    assert got.path == "/hook" and got.json["triggered_by"] == "eventrelay.test"  # crm observes "*" and got none
    assert got.json["payload"]["data"] == {"message": "a test event for erp"}
    status, body = await post(d, "/v1/integrations/erp/test", {"type": "order.created", "data": {"id": "o-1"},
                                                               "id": "t-1"})
    assert status == 202
    await wait_until(lambda: [r.json["id"] for r in receiver.requests][-1:] == ["t-1"])
    assert (await post(d, "/v1/integrations/erp/test", {"typo": 1}))[0] == 400
    assert (await post(d, "/v1/integrations/nope/test"))[0] == 404


async def test_the_chart_counts_deliveries_and_failures_per_minute(start_daemon, receiver: Receiver) -> None:
    receiver.respond = lambda r: web.Response(status=500 if r.json["id"].startswith("bad") else 204)
    d = await start_daemon([webhook("erp", receiver.url, delivery={**FAST, "breaker": NO_BREAKER,
                                                                  "retry": {"max_attempts": 1}})])
    await d.post([{"id": f"ok-{i}", "type": "order.paid", "data": {}} for i in range(3)]
                 + [{"id": "bad-1", "type": "order.paid", "data": {}}])

    async def totals() -> dict[str, int]:
        _, body = await get(d, "/v1/integrations/erp/chart?hours=1")
        return {k: sum(m[k] for m in body["data"]) for k in ("delivered", "failed", "dead")}

    await wait_for(totals, {"delivered": 3, "failed": 0, "dead": 1}, timeout=10)  # counts lag up to a second
    _, body = await get(d, "/v1/integrations/erp/chart?hours=2")
    minutes = [m["minute"] for m in body["data"]]
    assert len(minutes) == 120 and minutes == sorted(minutes)  # every minute, empty ones too
    assert (await get(d, "/v1/integrations/erp/chart?hours=0"))[0] == 400
    assert (await get(d, "/v1/integrations/erp/chart?hours=49"))[0] == 400
    assert (await get(d, "/v1/integrations/nope/chart"))[0] == 404


async def test_an_event_with_its_jobs_and_every_attempt(start_daemon, receiver: Receiver) -> None:
    failures = {"/hook": 1}

    def answer(r):
        if failures.get(r.path, 0) > 0:
            failures[r.path] -= 1
            return web.Response(status=502, text="bad gateway")
        return web.Response(status=204)

    receiver.respond = answer
    d = await start_daemon([webhook("erp", receiver.url, delivery=FAST), webhook("crm", receiver.url + "/crm")])
    await d.post({"id": "o-77", "type": "order.paid", "data": {"id": "77", "total": 12.5}})
    await wait_for(lambda: d.states(), {"delivered": 2}, timeout=10)
    status, body = await get(d, "/v1/events/o-77")
    assert status == 200
    event = body["data"]
    assert (event["id"], event["type"], event["payload"]) == ("o-77", "order.paid",
                                                              {"data": {"id": "77", "total": 12.5}})
    assert [(j["integration"], j["state"]) for j in event["jobs"]] == [("crm", "delivered"), ("erp", "delivered")]
    crm, erp = event["jobs"]
    assert [(a["attempt"], a["status_code"], a["succeeded"]) for a in erp["log"]] == [(1, 502, False),
                                                                                     (2, 204, True)]
    assert erp["log"][0]["body"] == "bad gateway" and len(crm["log"]) == 1
    status, body = await get(d, "/v1/events/never-sent")
    assert status == 404 and "never-sent" in body["errors"][0]["detail"]


async def test_search_pages_jobs_of_every_integration_with_filters(start_daemon, receiver: Receiver) -> None:
    receiver.respond = lambda r: web.Response(status=500 if r.json["id"].startswith("bad") else 204)
    d = await start_daemon([webhook("erp", receiver.url, delivery={**FAST, "breaker": NO_BREAKER,
                                                                  "retry": {"max_attempts": 1}}),
                            webhook("crm", receiver.url + "/crm", observes=["customer.updated"])])
    await d.post([{"id": f"o-{i}", "type": "order.paid", "data": {}} for i in range(5)]
                 + [{"id": "bad-1", "type": "order.paid", "data": {}},
                    {"id": "c-1", "type": "customer.updated", "data": {}}])
    await wait_for(lambda: d.states(), {"delivered": 6, "dead": 1}, timeout=10)

    status, body = await get(d, "/v1/jobs?state=dead")
    assert status == 200 and [(j["integration"], j["event_id"], j["state"]) for j in body["data"]] == [
        ("erp", "bad-1", "dead")]
    assert body["meta"]["next"] is None and body["links"]["next"] is None
    _, body = await get(d, "/v1/jobs?type=customer.updated")
    assert [(j["integration"], j["event_id"]) for j in body["data"]] == [("crm", "c-1")]
    # Pages newest first, the next page's link keeping the filters.
    seen, path = [], "/v1/jobs?integration=erp&limit=4"
    for _ in range(5):
        _, body = await get(d, path)
        seen += [j["event_id"] for j in body["data"]]
        if body["links"]["next"] is None:
            break
        path = body["links"]["next"]
        assert "integration=erp" in path and "limit=4" in path
    assert seen == ["bad-1", "o-4", "o-3", "o-2", "o-1", "o-0"]
    _, body = await get(d, "/v1/jobs?since=2000-01-01T00:00:00Z&until=2001-01-01T00:00:00Z")
    assert body["data"] == []
    for bad, words in [("state=gone", "state must be"), ("limit=0", "limit must be"), ("limit=101", "limit must be"),
                       ("before=x", "before must be"), ("since=yesterday", "since:")]:
        status, body = await get(d, f"/v1/jobs?{bad}")
        assert status == 400 and words in body["errors"][0]["detail"], bad


async def test_status_shows_latency_percentiles_of_the_last_hour(start_daemon, receiver: Receiver) -> None:
    async def slow(r):
        await asyncio.sleep(0.2 if r.json["id"] == "slow" else 0)
        return web.Response(status=204)

    receiver.respond = slow
    d = await start_daemon([webhook("erp", receiver.url), webhook("idle", receiver.url, observes=["order.refunded"])])
    await d.post([{"id": f"o-{i}", "type": "order.paid", "data": {}} for i in range(9)])
    await d.post({"id": "slow", "type": "order.paid", "data": {}})
    await wait_for(lambda: d.states(), {"delivered": 10}, timeout=10)
    _, body = await get(d, "/v1/status")
    erp, idle = body["data"]["integrations"]
    latency = erp["latency_last_hour"]
    assert latency["sample"] == 10 and latency["p50"] < 0.1 and 0.2 <= latency["p99"] < 2
    assert idle["latency_last_hour"] is None


async def read_events(response, count: int, timeout: float = 10) -> list[tuple[str, dict]]:
    """The next `count` Server-Sent Events of a stream, as (id, data)."""
    events, fields = [], {}
    async with asyncio.timeout(timeout):
        while len(events) < count:
            line = (await response.content.readline()).decode().rstrip("\n")
            if line == "":
                if "data" in fields:
                    assert fields["event"] == "attempt"
                    events.append((fields["id"], json.loads(fields["data"])))
                fields = {}
            elif not line.startswith(":"):
                key, _, value = line.partition(": ")
                fields[key] = value
    return events


async def test_the_live_tail_streams_new_attempts_and_resumes_after_the_last_seen(start_daemon,
                                                                                   receiver: Receiver) -> None:
    receiver.respond = lambda r: web.Response(status=503 if r.json["id"] == "bad" else 204)
    d = await start_daemon([webhook("erp", receiver.url, delivery={"retry": {"initial": "1h", "max_interval": "1h"}})])
    await d.post({"id": "earlier", "type": "order.paid", "data": {}})
    await wait_for(lambda: d.states(), {"delivered": 1}, timeout=10)
    await d.post({"id": "before", "type": "order.paid", "data": {}})
    await wait_for(lambda: d.states(), {"delivered": 2}, timeout=10)
    async with d.http.get(d.url + "/v1/tail") as r:
        assert r.status == 200 and r.content_type == "text/event-stream"
        (_, earlier), (first_id, first) = await read_events(r, 2)  # the latest attempts come first, oldest first
        assert (first["event_id"], first["integration"], first["succeeded"]) == ("before", "erp", True)
        assert earlier["event_id"] == "earlier"
        await d.post([{"id": "new", "type": "order.paid", "data": {}}, {"id": "bad", "type": "order.paid",
                                                                      "data": {}}])
        lines = await read_events(r, 2)  # and then what is new, each once
        assert sorted((e["event_id"], e["succeeded"], e["status_code"]) for _, e in lines) == [
            ("bad", False, 503), ("new", True, 204)]
    # A browser reconnecting sends the last id it saw, and gets what followed.
    async with d.http.get(d.url + "/v1/tail", headers={"Last-Event-ID": first_id}) as r:
        assert sorted(e["event_id"] for _, e in await read_events(r, 2)) == ["bad", "new"]
    assert (await get(d, "/v1/tail?after=x"))[0] == 400
    # An open tail does not hold up the daemon's shutdown (aiohttp would wait for its handler).
    async with d.http.get(d.url + "/v1/tail") as r:
        await read_events(r, 1)
        started = time.monotonic()
        d.stop.set()
        await asyncio.wait_for(asyncio.shield(d.task), 10)
        assert time.monotonic() - started < 5
        assert await r.content.read() is not None  # the stream ended


async def test_the_attempt_log_of_every_integration_pages_back_with_each_event(start_daemon,
                                                                              receiver: Receiver) -> None:
    d = await start_daemon([webhook("erp", receiver.url), webhook("crm", receiver.url + "/crm")])
    for i in range(3):  # one request each: attempts logged in this order
        await d.post({"id": f"o-{i}", "type": "order.paid", "data": {}})
        await wait_for(lambda: d.states(), {"delivered": 2 * (i + 1)}, timeout=10)
    seen, path = [], "/v1/attempts?integration=erp&limit=2"
    for _ in range(4):
        status, body = await get(d, path)
        assert status == 200
        seen += [(a["event_id"], a["integration"], a["status_code"]) for a in body["data"]]
        if body["links"]["next"] is None:
            break
        path = body["links"]["next"]
    assert seen == [("o-2", "erp", 204), ("o-1", "erp", 204), ("o-0", "erp", 204)]
    _, body = await get(d, "/v1/attempts")
    assert len(body["data"]) == 6 and body["data"][0]["event_type"] == "order.paid"
    assert (await get(d, "/v1/attempts?before=x"))[0] == 400 and (await get(d, "/v1/attempts?limit=0"))[0] == 400
