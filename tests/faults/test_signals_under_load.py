"""SIGTERM while producers on both listeners are sending and deliveries are in flight.

README: "On SIGTERM or SIGINT the daemon stops accepting, lets deliveries in flight finish for up to
`shutdown_grace`, records their outcomes and exits 0. Deliveries still running after the grace are abandoned
and delivered again after the restart." (SIGHUP storms are covered by tests/test_reload.py.)
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time

import aiohttp
import pytest
from aiohttp import web

from ..conftest import Receiver, wait_until, webhook
from ._load import Load, duplicates, log_lines, nothing_pending, read_stored

CYCLES = 3
GRACE = 1.0


@pytest.mark.timeout(120)
async def test_sigterm_under_load_exits_0_and_loses_nothing(daemon_process, receiver: Receiver) -> None:
    seed = int(os.environ.get("FAULTS_SEED", time.time_ns() % 2**32))
    print(f"\nseed {seed}")
    rng = random.Random(seed)

    hold = False  # set just before each SIGTERM: "slow" deliveries then outlast the grace (not the 5 s timeout)

    async def answer(r):
        await asyncio.sleep(3.0 if hold and r.path.endswith("/slow") else rng.uniform(0, 0.01))
        return web.Response(status=204)

    receiver.respond = answer
    observes = {"hook": ["*"], "slow": ["order.*"]}
    d = daemon_process([webhook("hook", receiver.url, observes["hook"]),
                        webhook("slow", receiver.url + "/slow", observes["slow"])],
                       shutdown_grace=f"{GRACE:g}s", delivery={"concurrency": 4, "timeout": "5s"},
                       log={"level": "info", "format": "json"})
    db = d.config.parent / "er.db"
    load = Load(rng, expected_jobs=lambda t: 2 if t.startswith("order.") else 1)
    stops = []
    running = []  # producers sending when the signal came
    acked_after_signal = []  # acknowledged between the signal and the exit (in requests and connections open then)
    still_sending = []  # producers still running when the daemon had exited
    async with aiohttp.ClientSession() as session:
        for cycle in range(CYCLES):
            await asyncio.to_thread(d.start)
            stop = asyncio.Event()
            producers = load.start(session, d.url, d.config.parent / "er.sock", stop, f"t{cycle}", budget=100_000,
                                   pause=0.05, chunks=(1, 5, 10))  # until the daemon stops them
            await asyncio.sleep(rng.uniform(0.2, 0.8))
            hold = True
            await asyncio.sleep(0.2)
            signalled = time.monotonic()
            running.append(sum(not t.done() for t in producers))
            acked_at_signal = len(load.acked)
            d.signal(signal.SIGTERM)
            exited = asyncio.ensure_future(asyncio.to_thread(d.wait, 30))
            if cycle > 0:
                # These producers finish their work and hang up soon after the signal; in the first cycle they
                # keep their socket connections open and writing, so the daemon's ingest drain (5 s) runs out.
                await asyncio.sleep(rng.uniform(0.1, 0.5))
                stop.set()
            code = await exited
            hold = False
            stops.append((code, time.monotonic() - signalled))
            stop.set()
            still_sending.append(sum(not t.done() for t in producers))
            acked_after_signal.append(len(load.acked) - acked_at_signal)
            await asyncio.wait_for(asyncio.gather(*producers), 30)
            assert code == 0, f"exit code {code} after SIGTERM (cycle {cycle})"

        await asyncio.to_thread(d.start)
        unknown = await load.resubmit(session, d.url)
        await wait_until(lambda: nothing_pending(session, d.url), timeout=60, interval=0.2)

    assert not load.problems, load.problems[:10]
    assert len(load.acked) > 300, f"too light a load: {len(load.acked)} acknowledged"
    await asyncio.to_thread(d.stop)  # the daemon holds its database alone while it runs
    jobs = (await read_stored(db)).jobs
    for event_id, event_type in load.acked.items():
        want = sorted((name, "delivered") for name, keys in observes.items()
                      if "*" in keys or f"{event_type.split('.')[0]}.*" in keys)
        assert sorted(jobs.get(event_id, [])) == want, (event_id, jobs.get(event_id))
    received = {name: [r.json["id"] for r in receiver.requests if r.path.endswith("/slow") == (name == "slow")]
                for name in observes}
    lines = log_lines(d.log_path)
    abandoned = sum(1 for x in lines if x.get("event", "").startswith("grace period over"))
    print(f"{CYCLES} SIGTERMs: exit codes and seconds to exit {[(c, round(s, 1)) for c, s in stops]}; "
          f"{len(load.acked)} acknowledged ({unknown} without an answer sent again, "
          f"{len(load.duplicates)} of them already stored); grace ran out {abandoned} times; "
          f"{len(load.refused)} refused; producers sending at each signal {running}, acknowledged after it "
          f"{acked_after_signal}, still sending at the exit {still_sending}")
    for name, keys in observes.items():
        want = {i for i, t in load.acked.items() if "*" in keys or f"{t.split('.')[0]}.*" in keys}
        dup = duplicates(received[name])
        print(f"  {name}: {len(want)} expected, {len(received[name])} received, {sum(dup.values())} duplicates")
        assert want <= set(received[name]), f"{name} lost {sorted(want - set(received[name]))[:10]}"
        # A graceful stop records every outcome it waited for: only deliveries abandoned after the grace
        # (at most `concurrency` per integration per stop) are sent again.
        assert sum(dup.values()) <= CYCLES * 4, dup
    assert all(n == 4 for n in running), f"the load had ended before the signal: {running}"
    # Stopping is bounded: the ingest drain (5 s) plus the grace, with room for a loaded machine.
    assert all(seconds < 5 + GRACE + 5 for _, seconds in stops), stops


async def test_sigterm_stops_http_ingest_even_while_a_socket_producer_is_connected(daemon_process,
                                                                                   receiver: Receiver) -> None:
    d = daemon_process([webhook("hook", receiver.url, ["*"])])
    await asyncio.to_thread(d.start)
    # A producer keeps its connection open between events, as pooled producers do.
    reader, writer = await asyncio.open_unix_connection(str(d.config.parent / "er.sock"))
    writer.write(b'{"type": "order.paid", "data": {}}\n')
    assert b'"ok":true' in await reader.readline()
    d.signal(signal.SIGTERM)
    await asyncio.sleep(0.5)
    try:
        async with aiohttp.ClientSession() as session:
            async with session.post(f"{d.url}/v1/events", json={"id": "after-sigterm", "type": "order.paid",
                                                                 "data": {}}) as resp:
                status = resp.status
    except aiohttp.ClientConnectionError:
        status = None  # refused: no longer accepting
    finally:
        writer.close()
    assert await asyncio.to_thread(d.wait, 20) == 0
    assert status is None, f"answered {status} 0.5 s after SIGTERM: still accepting events"
