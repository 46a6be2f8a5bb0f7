"""Live reload: by difference, invalid files refused, listeners re-bound, SIGHUP under load, sd_notify."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from .conftest import Receiver, free_port, wait_for, wait_until, webhook

# Behaviour that must hold on either storage engine (tests/conftest.py).
pytestmark = pytest.mark.engines("sqlite", "postgresql")


def rewrite(path: Path, change) -> None:  # noqa: ANN001 - a function editing the decoded YAML in place
    raw = yaml.safe_load(path.read_text())
    change(raw)
    path.write_text(yaml.safe_dump(raw))


async def test_reload_applies_the_difference_by_name(start_daemon, receiver: Receiver, tmp_path: Path) -> None:
    d = await start_daemon([webhook("keep", receiver.url + "/keep"), webhook("drop", receiver.url + "/drop"),
                            webhook("move", receiver.url + "/move-old")])
    keep_before = d.service.dispatchers["keep"]
    config = tmp_path / "config.yaml"

    def change(raw: dict[str, Any]) -> None:
        raw["integrations"] = [i for i in raw["integrations"] if i["name"] != "drop"]
        next(i for i in raw["integrations"] if i["name"] == "move")["configuration"]["url"] = receiver.url + "/move-new"
        raw["integrations"].append(webhook("new", receiver.url + "/new"))

    rewrite(config, change)
    result = await d.service.reload()
    assert result.ok and result.changes == ("added new", "removed drop", "changed move")
    assert d.service.dispatchers["keep"] is keep_before  # untouched: same object, same connections
    assert sorted(d.service.dispatchers) == ["keep", "move", "new"]

    await d.post({"id": "after", "type": "order.paid", "data": {}})
    await wait_until(lambda: len(receiver.requests) == 3)
    await asyncio.sleep(0.2)
    assert sorted(r.path for r in receiver.requests) == ["/hook/keep", "/hook/move-new", "/hook/new"]
    assert await d.jobs("drop") == []
    status = await (await d.http.get(d.url + "/v1/status")).json()
    assert status["data"]["config"]["last_reload"]["ok"] is True


async def test_pending_jobs_of_a_removed_integration_wait_for_its_return(start_daemon, receiver: Receiver,
                                                                        tmp_path: Path) -> None:
    up = False
    receiver.respond = lambda r: aiohttp.web.Response(status=204 if up else 503)
    d = await start_daemon([webhook("erp", receiver.url, delivery={
        "retry": {"initial": "50ms", "max_interval": "50ms", "max_age": "1h"}})])
    await d.post({"id": "waiting", "type": "order.paid", "data": {}})
    await wait_until(lambda: receiver.requests)
    config = tmp_path / "config.yaml"
    original = config.read_text()
    rewrite(config, lambda raw: raw.update(integrations=[]))
    assert (await d.service.reload()).changes == ("removed erp",)
    up = True
    await asyncio.sleep(0.3)
    assert [job.state for job in await d.jobs()] == ["pending"]  # kept, not delivered, not lost
    orphaned = await (await d.http.get(d.url + "/v1/jobs/orphaned")).json()
    assert orphaned == {"data": [{"integration": "erp", "pending": 1, "dead": 0}]}
    from eventrelay.cli import main as cli_main

    code = await asyncio.to_thread(cli_main, ["jobs", "--orphaned", "--url", d.url])
    assert code == 0
    config.write_text(original)
    assert (await d.service.reload()).changes == ("added erp",)
    await wait_for(d.jobs, lambda jobs: [job.state for job in jobs] == ["delivered"])


async def test_an_invalid_file_is_refused_and_the_old_config_keeps_running(start_daemon, receiver: Receiver,
                                                                           tmp_path: Path) -> None:
    d = await start_daemon([webhook("erp", receiver.url)])
    config = tmp_path / "config.yaml"
    rewrite(config, lambda raw: raw["integrations"][0]["configuration"].update(url="not a url"))
    result = await d.service.reload()
    assert not result.ok and result.errors == ("integrations[0].configuration.url: not an http(s) URL",)
    config.write_text("listen: [unclosed\n")
    assert "invalid YAML" in (await d.service.reload()).errors[0]
    await d.post({"type": "order.paid", "data": {}})
    await wait_until(lambda: len(receiver.requests) == 1)
    status = await (await d.http.get(d.url + "/v1/status")).json()
    assert status["data"]["config"]["last_reload"]["ok"] is False
    assert "invalid YAML" in status["data"]["config"]["last_reload"]["errors"][0]


async def test_listeners_are_rebound_and_limits_change_in_place(start_daemon, tmp_path: Path) -> None:
    d = await start_daemon([])
    old_url = d.url
    port = free_port()
    config = tmp_path / "config.yaml"
    rewrite(config, lambda raw: raw["listen"].update(http=f"127.0.0.1:{port}", socket=str(tmp_path / "new.sock"),
                                                     token="tok", max_body_size="1KiB"))
    result = await d.service.reload()
    assert result.ok and "http listener 127.0.0.1:%d" % port in result.changes
    assert d.url == f"http://127.0.0.1:{port}"
    try:
        async with d.http.get(old_url + "/healthz") as r:
            raise AssertionError(f"old address still answers: {r.status}")
    except aiohttp.ClientConnectionError:
        pass
    assert (await d.post({"type": "order.paid", "data": {}}))[0] == 401
    auth = {"Authorization": "Bearer tok"}
    assert (await d.post({"type": "order.paid", "data": {"x": "y" * 2000}}, headers=auth))[0] == 413
    assert (await d.post({"type": "order.paid", "data": {}}, headers=auth))[0] == 202
    assert not (tmp_path / "er.sock").exists() and (tmp_path / "new.sock").exists()
    reader, writer = await asyncio.open_unix_connection(str(tmp_path / "new.sock"))
    writer.write(b'{"type": "order.paid", "data": {}}\n')
    assert json.loads(await asyncio.wait_for(reader.readline(), 5))["ok"] is True
    writer.close()


async def test_sighup_storm_under_load_loses_nothing(daemon_process, receiver: Receiver) -> None:
    """The daemon as a process: events flow while the file changes and SIGHUPs arrive in bursts."""
    d = daemon_process([webhook("a", receiver.url + "/a", ["order.*"]), webhook("b", receiver.url + "/b", ["*"])])
    await asyncio.to_thread(d.start)
    acked: list[str] = []
    async with aiohttp.ClientSession() as session:
        async def produce() -> None:
            for i in range(150):
                async with session.post(f"{d.url}/v1/events", json={"id": f"e{i}", "type": "order.paid",
                                                                     "data": {}}) as r:
                    assert r.status == 202, await r.text()
                    acked.append(f"e{i}")
                await asyncio.sleep(0.01)

        producer = asyncio.create_task(produce())
        for round_ in range(6):
            # Toggle b's concurrency (a change) and add/remove c, then a burst of SIGHUPs.
            rewrite(d.config, lambda raw: (raw["integrations"][1].setdefault("delivery", {}).update(
                concurrency=2 + round_ % 2),
                raw["integrations"].append(webhook("c", receiver.url + "/c", ["nothing.ever"]))
                if round_ % 2 == 0 else raw.update(integrations=raw["integrations"][:2])))
            for _ in range(5):
                d.signal(signal.SIGHUP)
            await asyncio.sleep(0.2)
        await producer
        await wait_until(lambda: {r.json["id"] for r in receiver.requests if r.path == "/hook/a"} >= set(acked)
                         and {r.json["id"] for r in receiver.requests if r.path == "/hook/b"} >= set(acked),
                         timeout=30)
        status = await (await session.get(f"{d.url}/v1/status")).json()
    assert status["data"]["config"]["last_reload"]["ok"] is True
    assert d.proc.poll() is None


async def test_sd_notify_messages_in_order(daemon_process, tmp_path: Path) -> None:
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify_path = tmp_path / "notify.sock"
    notify.bind(str(notify_path))
    notify.settimeout(10)
    d = daemon_process([])
    os.environ["NOTIFY_SOCKET"] = str(notify_path)
    try:
        await asyncio.to_thread(d.start)
    finally:
        del os.environ["NOTIFY_SOCKET"]

    def receive() -> str:
        return notify.recv(4096).decode()

    ready = await asyncio.to_thread(receive)
    assert ready.startswith("READY=1\nSTATUS=0 integrations, 0 jobs pending, 0 dead")
    d.signal(signal.SIGHUP)
    reloading = await asyncio.to_thread(receive)
    assert reloading.startswith("RELOADING=1\nMONOTONIC_USEC=")
    assert (await asyncio.to_thread(receive)).startswith("READY=1")
    d.signal(signal.SIGTERM)
    assert (await asyncio.to_thread(receive)) == "STOPPING=1"
    assert await asyncio.to_thread(d.wait) == 0
    notify.close()


async def test_reload_changes_the_http_connection_cap(start_daemon, tmp_path: Path) -> None:
    d = await start_daemon([], listen={"max_connections": 2})
    host, port = d.service.http_address

    async def answers_503() -> bool:
        """A fresh connection is refused at once (the cap is full)."""
        reader, writer = await asyncio.open_connection(host, port)
        try:
            return (await asyncio.wait_for(reader.readline(), 0.5)).startswith(b"HTTP/1.1 503")
        except TimeoutError:
            return False  # accepted: aiohttp waits for a request
        finally:
            writer.close()

    held = [await asyncio.open_connection(host, port) for _ in range(2)]
    await asyncio.sleep(0.1)
    assert await answers_503()

    rewrite(tmp_path / "config.yaml", lambda raw: raw["listen"].update(max_connections=4))
    result = await d.service.reload()
    assert result.ok, result
    assert not await answers_503()  # room now for a third (closed again at once) and a fourth
    for _, writer in held:
        writer.close()


@pytest.mark.engines("sqlite")  # it moves the SQLite file
async def test_settings_that_need_a_restart_keep_their_running_values(start_daemon, tmp_path: Path) -> None:
    d = await start_daemon([], listen={"idle_timeout": "30s"})
    before = d.service.config

    def change(raw: dict[str, Any]) -> None:
        raw["storage"]["path"] = str(tmp_path / "elsewhere.db")
        raw["listen"]["idle_timeout"] = "90s"

    rewrite(tmp_path / "config.yaml", change)
    result = await d.service.reload()
    assert result.ok, result
    # The database in use and the idle timeout aiohttp was started with are what the config now says runs.
    assert d.service.config.storage.path == before.storage.path
    assert d.service.config.listen.idle_timeout == 30.0
    assert not (tmp_path / "elsewhere.db").exists()


async def test_a_reload_changes_the_log_level_of_running_components(daemon_process, receiver: Receiver) -> None:
    """Raising log.level by SIGHUP must show at once, also from a dispatcher that kept running (it was
    unchanged): loggers that cached their configuration kept the old level until a restart."""
    d = daemon_process([webhook("erp", receiver.url)])
    await asyncio.to_thread(d.start)

    def lines() -> list[dict[str, Any]]:
        return [json.loads(line) for line in d.log_path.read_text().splitlines() if line.startswith("{")]

    async with aiohttp.ClientSession() as session:
        async def deliver(event_id: str) -> None:
            async with session.post(f"{d.url}/v1/events", json={"id": event_id, "type": "order.paid",
                                                                 "data": {}}) as r:
                assert r.status == 202, await r.text()
            await wait_until(lambda: any(r.json["id"] == event_id for r in receiver.requests))

        await deliver("quiet")
        await asyncio.sleep(0.3)  # the outcome is logged once its write commits
        assert not [x for x in lines() if x.get("level") == "info"]  # level warning
        rewrite(d.config, lambda raw: raw["log"].update(level="info"))
        d.signal(signal.SIGHUP)
        await wait_until(lambda: any(x.get("event") == "configuration reloaded" for x in lines()))
        await deliver("loud")
        await wait_until(lambda: any(x.get("event") == "delivered" and x.get("event_id") == "loud"
                                     for x in lines()))
    assert not any(x.get("event_id") == "quiet" for x in lines())


def _alias_layer(n: int) -> str:
    item = f"*l{n - 1}" if n else '"x"'
    return f"l{n}: &l{n} [{', '.join([item] * 9)}]\n"


# 9 ** 9 values in a few hundred bytes.
ALIAS_BOMB = "".join(_alias_layer(n) for n in range(9))


async def _post_while(d, busy: asyncio.Future) -> list[float]:  # noqa: ANN001
    """Post one event after another until `busy` is done; the time each answer took."""
    took: list[float] = []
    loop = asyncio.get_running_loop()
    for n in range(100_000):
        if busy.done():
            break
        started = loop.time()
        status, _ = await d.post({"id": f"during-{n}", "type": "order.paid", "data": {}})
        assert status == 202
        took.append(loop.time() - started)
    return took


async def test_a_large_file_is_parsed_while_ingest_goes_on(start_daemon, receiver: Receiver, tmp_path: Path) -> None:
    d = await start_daemon([webhook("erp", receiver.url)])
    config = tmp_path / "config.yaml"
    raw = yaml.safe_load(config.read_text())
    # Just under the size limit: about a second or two of parsing on this kind of machine.
    raw["integrations"] += [dict(webhook(f"h{i}", receiver.url, ["order.fulfilled"]), enabled=False,
                                 description="x" * 120) for i in range(2500)]
    config.write_text(yaml.safe_dump(raw))
    assert 500_000 < config.stat().st_size < 1024 * 1024
    reload = asyncio.ensure_future(d.service.reload())
    took = await _post_while(d, reload)
    assert (await reload).ok
    # Events kept being acknowledged all through the reload, none waiting behind the parse.
    assert len(took) >= 10 and max(took) < 1.0, (len(took), max(took))


async def test_an_alias_bomb_or_a_huge_file_is_refused_at_once(start_daemon, receiver: Receiver,
                                                               tmp_path: Path) -> None:
    d = await start_daemon([webhook("erp", receiver.url)])
    config = tmp_path / "config.yaml"
    good = config.read_text()
    config.write_text(good + ALIAS_BOMB)
    loop = asyncio.get_running_loop()
    started = loop.time()
    result = await d.service.reload()
    assert not result.ok and loop.time() - started < 2
    assert "expands to more than 200,000 values" in result.errors[0]

    config.write_text(good + "# padding\n" * 200_000)
    result = await d.service.reload()
    assert not result.ok and "larger than 1 MiB" in result.errors[0]
    # The previous configuration still runs.
    assert (await d.post({"id": "after", "type": "order.paid", "data": {}}))[0] == 202
    await wait_until(lambda: receiver.requests)
