"""Several daemons on one PostgreSQL database, as separate processes: each accepts and each delivers; no
job is delivered twice while they are healthy, one killed with kill -9 loses nothing acknowledged, and a
database that goes away for a while costs refusals (503) but no event."""

from __future__ import annotations

import asyncio
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from eventrelay.delivery.dispatcher import UNRECORDED_FACTOR

from .conftest import REPO, DaemonProcess, Receiver, free_port, wait_for, wait_ready, wait_until, webhook, write_config

CONCURRENCY = 4


@pytest.fixture
def cluster_of(tmp_path: Path, postgres_dsn: str):
    """`cluster_of(n, integrations)`: n daemons (not started) on one database, each with its own folder."""
    made: list[DaemonProcess] = []

    def make(n: int, integrations: list[dict[str, Any]], lease: str = "5s") -> list[DaemonProcess]:
        for i in range(n):
            folder = tmp_path / f"daemon-{i}"
            folder.mkdir()
            port = free_port()
            storage = {"backend": "postgresql", "dsn": postgres_dsn, "pool": 4, "lease": lease}
            path = write_config(folder, integrations, engine=storage, listen={"http": f"127.0.0.1:{port}"},
                                delivery={"concurrency": CONCURRENCY})
            made.append(DaemonProcess(path, port, folder / "daemon.log"))
        return made[-n:]

    yield make
    for d in made:
        d.stop()


async def post(session: aiohttp.ClientSession, url: str, events: list[dict]) -> tuple[int, Any]:
    async with session.post(f"{url}/v1/events", json=events, timeout=aiohttp.ClientTimeout(total=10)) as r:
        return r.status, await r.json()


async def start_all(daemons: list[DaemonProcess]) -> None:
    await asyncio.gather(*(asyncio.to_thread(d.start, 30.0) for d in daemons))


async def test_three_healthy_daemons_deliver_every_event_exactly_once(cluster_of, receiver: Receiver) -> None:
    daemons = cluster_of(3, [webhook("erp", receiver.url, ["order.*"]), webhook("crm", receiver.url + "/crm")])
    await start_all(daemons)
    sent: list[str] = []
    async with aiohttp.ClientSession() as session:
        for n in range(60):  # each daemon accepts a share, in batches of 1 to 10
            batch = [{"id": f"e{n}-{i}", "type": "order.paid", "data": {"n": n}} for i in range(n % 10 + 1)]
            status, body = await post(session, daemons[n % 3].url, batch)
            assert status == 202, body
            sent += [b["id"] for b in batch]
    delivered = lambda: Counter((r.path, r.json["id"]) for r in receiver.requests)  # noqa: E731
    await wait_until(lambda: len(delivered()) == 2 * len(sent), timeout=60)
    await asyncio.sleep(1.0)  # a late duplicate would show by now
    counts = delivered()
    assert len(counts) == 2 * len(sent) and set(counts.values()) == {1}, counts.most_common(3)


async def test_the_same_event_sent_to_two_daemons_at_once_is_stored_once(cluster_of, receiver: Receiver) -> None:
    a, b = cluster_of(2, [webhook("erp", receiver.url)])
    await start_all([a, b])
    async with aiohttp.ClientSession() as session:
        for i in range(20):
            event = [{"id": f"twice-{i}", "type": "order.paid", "data": {}}]
            (s1, r1), (s2, r2) = await asyncio.gather(post(session, a.url, event), post(session, b.url, event))
            assert s1 == s2 == 202
            assert sorted([r1["data"][0]["duplicate"], r2["data"][0]["duplicate"]]) == [False, True]
    await wait_until(lambda: len(receiver.requests) >= 20, timeout=30)
    await asyncio.sleep(0.5)
    assert sorted(receiver.ids()) == sorted(f"twice-{i}" for i in range(20))


async def test_kill_9_of_one_daemon_under_load_loses_nothing_acknowledged(cluster_of, receiver: Receiver) -> None:
    async def slowish(r):
        await asyncio.sleep(random.uniform(0, 0.02))  # deliveries in flight when the kill lands
        return web.Response(status=204)

    receiver.respond = slowish
    daemons = cluster_of(3, [webhook("erp", receiver.url)], lease="5s")
    await start_all(daemons)
    acked: set[str] = set()
    stop = asyncio.Event()

    async def produce(d: DaemonProcess, worker: int) -> None:
        async with aiohttp.ClientSession() as session:
            for n in range(300):  # bounded in count, and by `stop` in time
                if stop.is_set():
                    return
                batch = [{"id": f"w{worker}-{n}-{i}", "type": "order.paid", "data": {}} for i in range(5)]
                try:
                    status, body = await post(session, d.url, batch)
                except (aiohttp.ClientError, asyncio.TimeoutError):
                    return  # the daemon died mid-request: never acknowledged
                if status == 202:
                    acked.update(item["id"] for item in body["data"])

    producers = [asyncio.create_task(produce(d, i)) for i, d in enumerate(daemons)]
    await asyncio.sleep(1.5)
    daemons[0].kill9()
    await asyncio.sleep(1.0)
    stop.set()
    await asyncio.gather(*producers)
    assert len(acked) > 300, "the load was too light to prove anything"
    # The dead daemon's claimed jobs come back when their leases run out (5 s): the others deliver them.
    await wait_until(lambda: acked <= set(receiver.ids()), timeout=60)
    received = receiver.ids()
    duplicates = len(received) - len(set(received))
    print(f"\nkill -9 of 1 of 3: {len(acked)} acknowledged, {len(received)} deliveries, {duplicates} duplicates")
    # Duplicates only from what the killed daemon had in flight or unrecorded.
    assert duplicates <= UNRECORDED_FACTOR * CONCURRENCY


async def test_a_database_away_for_a_while_costs_refusals_not_events(cluster_of, postgres_cluster,
                                                                   receiver: Receiver) -> None:
    a, b = cluster_of(2, [webhook("erp", receiver.url)])
    await start_all([a, b])
    acked: set[str] = set()
    refused = 0
    async with aiohttp.ClientSession() as session:
        async def send(d: DaemonProcess, name: str) -> None:
            nonlocal refused
            status, body = await post(session, d.url, [{"id": name, "type": "order.paid", "data": {}}])
            if status == 202:
                acked.add(name)
            else:
                assert status == 503, body  # "not stored", and says so
                refused += 1

        for i in range(20):
            await send((a, b)[i % 2], f"before-{i}")
        await asyncio.to_thread(postgres_cluster.stop, None, "immediate")
        try:
            for i in range(10):
                await send((a, b)[i % 2], f"during-{i}")
        finally:
            await asyncio.to_thread(postgres_cluster.start)
        # Both daemons come back by themselves: no restart.
        for i in range(20):
            await wait_until(lambda: _accepts(session, (a, b)[i % 2]), timeout=30)
            await send((a, b)[i % 2], f"after-{i}")
    assert refused >= 10 and {f"during-{i}" for i in range(10)}.isdisjoint(acked)
    assert len(acked) == 40
    await wait_until(lambda: acked <= set(receiver.ids()), timeout=60)


async def _accepts(session: aiohttp.ClientSession, d: DaemonProcess) -> bool:
    async with session.get(f"{d.url}/readyz") as r:
        return r.status == 200


async def test_a_daemon_started_before_its_database_waits_and_says_why(cluster_of, postgres_cluster) -> None:
    (d,) = cluster_of(1, [])
    await asyncio.to_thread(postgres_cluster.stop, None, "fast")
    try:
        d.log = open(d.log_path, "ab")
        d.proc = subprocess.Popen([sys.executable, "-m", "eventrelay", "run", "--config", str(d.config)],
                                  stdout=d.log, stderr=subprocess.STDOUT, cwd=REPO)
        async with aiohttp.ClientSession() as session:
            async def answer(path: str) -> tuple[int, str]:
                try:
                    async with session.get(f"{d.url}{path}") as r:
                        return r.status, await r.text()
                except aiohttp.ClientConnectionError:
                    return 0, ""

            status, body = await wait_for(lambda: answer("/readyz"), lambda a: a[0] == 503, timeout=15)
            assert "waiting for the database" in body and postgres_cluster.password not in body, body
            assert (await answer("/healthz"))[0] == 200
            status, body = await answer("/v1/events")
            assert status == 503
    finally:
        await asyncio.to_thread(postgres_cluster.start)
    await asyncio.to_thread(wait_ready, d.port, d.proc, d.log_path, 30.0)
    log = d.log_path.read_text()
    assert "cannot reach the database; retrying" in log and postgres_cluster.password not in log


async def test_status_lists_the_daemons_and_flags_one_whose_configuration_differs(cluster_of,
                                                                                 receiver: Receiver) -> None:
    a, b = cluster_of(2, [webhook("erp", receiver.url)])
    b.config.write_text(b.config.read_text().replace("order.paid", "order.created"))  # b observes another type
    await start_all([a, b])
    async with aiohttp.ClientSession() as session:
        async def daemons() -> list[dict]:
            async with session.get(f"{a.url}/v1/status") as r:
                return (await r.json())["data"]["daemons"]

        seen = await wait_for(daemons, lambda ds: len(ds) == 2, timeout=15)
    assert [d["this"] for d in seen] == [True, False]
    assert [d["config_differs"] for d in seen] == [False, True]
    assert seen[1]["pid"] == b.proc.pid
    shown = subprocess.run([sys.executable, "-m", "eventrelay", "status", "--url", a.url], capture_output=True,
                           text=True, timeout=30, cwd=REPO)
    assert shown.returncode == 0, shown.stderr
    assert "2 daemons share the database" in shown.stdout and "CONFIGURATION DIFFERS" in shown.stdout


async def test_a_410_heard_by_one_daemon_stops_them_all_and_an_enable_on_any_resumes_all(
        cluster_of, receiver: Receiver) -> None:
    gone = True
    receiver.respond = lambda r: web.Response(status=410 if gone else 204)
    a, b = cluster_of(2, [webhook("erp", receiver.url)])
    await start_all([a, b])
    async with aiohttp.ClientSession() as session:
        async def disabled(d: DaemonProcess) -> bool:
            async with session.get(f"{d.url}/v1/status") as r:
                (row,) = (await r.json())["data"]["integrations"]
                return isinstance(row.get("disabled"), dict)

        await post(session, a.url, [{"id": "first", "type": "order.paid", "data": {}}])
        await wait_until(lambda: disabled(a) if receiver.requests else False, timeout=15)
        await wait_until(lambda: disabled(b), timeout=15)  # b heard no 410 itself
        for i in range(6):
            await post(session, (a, b)[i % 2].url, [{"id": f"held-{i}", "type": "order.paid", "data": {}}])
        await asyncio.sleep(1.0)
        assert all(r.json["id"] == "first" for r in receiver.requests)  # nothing more was sent
        gone = False
        async with session.post(f"{b.url}/v1/integrations/erp/enable") as r:
            assert r.status == 200, await r.text()
        await wait_until(lambda: {f"held-{i}" for i in range(6)} <= set(receiver.ids()), timeout=20)
        await wait_until(lambda: _not(disabled(a)), timeout=5)  # a follows the enable within 2 s


async def test_the_rate_limit_holds_for_all_the_daemons_together(cluster_of, receiver: Receiver) -> None:
    daemons = cluster_of(3, [webhook("erp", receiver.url, delivery={"rate_limit": "20/s", "concurrency": 8})])
    await start_all(daemons)
    async with aiohttp.ClientSession() as session:
        for i, d in enumerate(daemons):  # every daemon holds a share of the backlog
            status, _ = await post(session, d.url, [{"id": f"r{i}-{n}", "type": "order.paid", "data": {}}
                                                   for n in range(30)])
            assert status == 202
    await wait_until(lambda: len(receiver.requests) >= 90, timeout=30)
    times = sorted(r.at for r in receiver.requests)
    # One bucket of 20 per second for the three: a burst of 20, then 20 a second; three daemons each with a
    # bucket of their own would have sent the 90 in about a second.
    assert times[-1] - times[0] >= 3.0, times[-1] - times[0]
    for i, start in enumerate(times):
        assert sum(1 for t in times[i:] if t < start + 1.0) <= 42


async def test_per_resource_ordering_holds_across_daemons(cluster_of, receiver: Receiver) -> None:
    failures = {"o1-a": 2}  # o1's head fails twice: its later events must wait, on every daemon

    def answer(r):
        if failures.get(r.json["id"], 0) > 0:
            failures[r.json["id"]] -= 1
            return web.Response(status=500)
        return web.Response(status=204)

    receiver.respond = answer
    daemons = cluster_of(3, [webhook("erp", receiver.url, ["order.*"], delivery={
        "ordering": "per_resource", "concurrency": 8,
        "retry": {"initial": "200ms", "max_interval": "200ms", "max_age": "1h"}})])
    await start_all(daemons)
    async with aiohttp.ClientSession() as session:
        for step in "abcdef":  # each step accepted by another daemon
            status, _ = await post(session, daemons["abcdef".index(step) % 3].url, [
                {"id": f"{order}-{step}", "type": "order.updated", "data": {"id": order}}
                for order in ("o1", "o2", "o3", "o4")])
            assert status == 202
    await wait_until(lambda: len({r.json["id"] for r in receiver.requests}) == 24, timeout=30)
    delivered = [r.json["id"] for r in receiver.requests]  # the failed attempts at o1-a included
    for order in ("o1", "o2", "o3", "o4"):
        sequence = [e for e in delivered if e.startswith(order)]
        assert sequence == sorted(sequence) and sequence[-1] == f"{order}-f", sequence


async def test_a_pause_on_one_daemon_holds_them_all_until_resumed_on_any(cluster_of, receiver: Receiver) -> None:
    a, b = cluster_of(2, [webhook("erp", receiver.url)])
    await start_all([a, b])
    async with aiohttp.ClientSession() as session:
        async def paused(d: DaemonProcess) -> bool:
            async with session.get(f"{d.url}/v1/status") as r:
                (row,) = (await r.json())["data"]["integrations"]
                return isinstance(row.get("paused"), dict)

        async with session.post(f"{a.url}/v1/integrations/erp/pause") as r:
            assert r.status == 200
        await wait_until(lambda: paused(b), timeout=15)
        for i in range(6):
            await post(session, (a, b)[i % 2].url, [{"id": f"held-{i}", "type": "order.paid", "data": {}}])
        await asyncio.sleep(1.0)
        assert receiver.requests == []
        async with session.post(f"{b.url}/v1/integrations/erp/resume") as r:
            assert r.status == 200
        await wait_until(lambda: sorted(receiver.ids()) == [f"held-{i}" for i in range(6)], timeout=20)
        assert not await paused(a)


async def _not(awaitable) -> bool:  # noqa: ANN001 - a coroutine of a bool
    return not await awaitable
