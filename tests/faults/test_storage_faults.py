"""The disk under the database fills up while the daemon runs, then space comes back.

Technique: the database lives on a small tmpfs mounted for the test (the tests run as root in their sandbox;
without the right to mount, the test is skipped). A filler file takes every free block; deleting it gives the
space back. Not chattr +i nor a read-only remount: both leave writes through already open descriptors
working (and the remount is refused while the daemon holds the file open).

README: "503: the database could not store the events (disk full, unwritable): the detail says why, nothing
was stored, retry later"; an acknowledgement means durable.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import random
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from ..conftest import REPO, Receiver, wait_until, webhook
from ..store.sqlite_faults import integrity
from ._load import Load, log_lines, nothing_pending, read_stored


class SmallDisk:
    def __init__(self, path: Path):
        self.path = path
        self.filler = path / "filler"

    def free_bytes(self) -> int:
        st = os.statvfs(self.path)
        return st.f_bavail * st.f_frsize

    def fill(self) -> int:
        """Take every free block; returns the bytes taken."""
        taken = 0
        chunk = b"\0" * (256 * 1024)
        with open(self.filler, "ab", buffering=0) as f:
            for size in (len(chunk), 4096, 512, 1):
                while True:
                    try:
                        taken += f.write(chunk[:size])
                    except OSError as e:
                        if e.errno != errno.ENOSPC:
                            raise
                        break
        return taken

    def release(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.filler.unlink()


@pytest.fixture
def small_disk(tmp_path: Path):
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m,mode=0755", "eventrelay-faults",
                             str(mount_point)], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root/CAP_SYS_ADMIN): {result.stderr.strip()}")
    try:
        yield SmallDisk(mount_point)
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], capture_output=True)


@pytest.mark.timeout(120)
async def test_disk_full_refuses_with_503_stores_nothing_unacknowledged_and_recovers(
        small_disk: SmallDisk, daemon_process, receiver: Receiver) -> None:
    healthy = False
    answered: list[str] = []  # event ids the receiver answered 2xx, duplicates included

    def respond(r):
        if not healthy:
            return web.Response(status=500)
        answered.append(r.json["id"])
        return web.Response(status=204)

    receiver.respond = respond
    db = small_disk.path / "er.db"
    d = daemon_process([webhook("erp", receiver.url, ["*"])], storage={"path": str(db)},
                       delivery={"retry": {"initial": "100ms", "max_interval": "300ms", "max_age": "1h"},
                                 "breaker": {"failures": 5, "cooldown": "200ms", "max_cooldown": "500ms"}},
                       log={"level": "info", "format": "json"})
    await asyncio.to_thread(d.start)
    socket_path = d.config.parent / "er.sock"
    load = Load(random.Random(7), expected_jobs=lambda t: 1, pad=4096)
    async with aiohttp.ClientSession() as session:
        # Before: accepted while the receiver fails, so jobs are pending when the disk fills.
        await load.http(session, d.url, asyncio.Event(), 40, "before", sizes=(10,))
        assert len(load.acked) == 40 and not load.refused
        before = set(load.acked)

        taken = await asyncio.to_thread(small_disk.fill)
        print(f"\ndisk filled: {taken} bytes taken, {small_disk.free_bytes()} free; database files: "
              f"{ {p.name: p.stat().st_size for p in small_disk.path.iterdir()} }")
        # Producers on both listeners keep sending until both have been refused (bounded).
        stop = asyncio.Event()
        producers = [asyncio.create_task(load.http(session, d.url, stop, 2000, "fullh", sizes=(1, 5, 20),
                                                   keep_going=True)),
                     asyncio.create_task(keep_socket_producing(load, socket_path, stop))]
        try:
            await wait_until(lambda: refused_on(load, "fullh") and refused_on(load, "fulls"), timeout=20)
            healthy = True  # the receiver behaves while the disk is still full
            await asyncio.sleep(1.5)
        finally:
            stop.set()
            await asyncio.gather(*producers)
        during_acked = set(load.acked) - before
        refused = dict(load.refused)
        answered_while_full = list(answered)
        assert 503 in load.statuses and set(load.statuses) == {503}, load.statuses
        details = {text for text in refused.values()}
        print(f"refused: {len(refused)} events; acknowledged while full: {len(during_acked)}; answers: "
              f"{sorted(details)[:3]}")
        for text in details:
            assert "not stored" in text and "disk" in text and "full" in text, text
        readyz = await (await session.get(f"{d.url}/readyz")).text()

        # kill -9 while the disk is still full, and a restart on the full disk (systemd would do just that):
        # the daemon starts, and answers 503 until there is space again.
        await asyncio.to_thread(d.kill9)
        assert integrity(db) == [("ok",)]
        await asyncio.to_thread(d.start)
        async with session.post(f"{d.url}/v1/events", json={"id": "restarted-full", "type": "order.paid",
                                                            "data": {}}) as resp:
            assert resp.status == 503, await resp.text()
            assert "disk holding the database is full" in await resp.text()
        refused["restarted-full"] = "503"

        small_disk.release()
        print(f"space back: {small_disk.free_bytes()} bytes free")
        # Events are accepted again, at once (the next request after the space came back).
        await load.http(session, d.url, asyncio.Event(), 20, "after", sizes=(10,))
        after = set(load.acked) - before - during_acked
        assert len(after) == 20, load.refused
        await wait_until(lambda: nothing_pending(session, d.url), timeout=30)

    # Nothing acknowledged is missing, nothing refused was stored; everything acknowledged was delivered.
    await asyncio.to_thread(d.stop)  # the daemon holds its database alone while it runs
    assert integrity(db) == [("ok",)]
    stored = (await read_stored(db)).events
    assert set(load.acked) <= stored, f"acknowledged, not stored: {sorted(set(load.acked) - stored)[:10]}"
    assert not stored & set(refused), f"answered 'not stored', yet stored: {sorted(stored & set(refused))[:10]}"
    assert stored <= set(load.acked), f"stored without an acknowledgement: {sorted(stored - set(load.acked))[:10]}"
    assert set(load.acked) <= set(answered), f"never delivered: {sorted(set(load.acked) - set(answered))[:10]}"

    errors = [x for x in log_lines(d.log_path) if x.get("level") == "error"]
    copies = {i: answered.count(i) for i in set(answered)}
    print(f"delivered {len(answered)} times for {len(stored)} events: {len(answered_while_full)} deliveries of "
          f"{len(set(answered_while_full))} events while the disk was full, most copies of one event "
          f"{max(copies.values())}; /readyz while full: {readyz}; "
          f"error log lines: {sorted({x['event'] for x in errors})}")
    # Outcomes that cannot be written hold deliveries back instead of sending the same jobs again and again:
    # while the disk was full no event went out twice, and overall the only copies are those of the kill -9
    # (README: at most 16 x concurrency per integration per crash).
    assert len(answered_while_full) == len(set(answered_while_full)), answered_while_full
    assert max(copies.values()) <= 2 and len(answered) - len(copies) <= 16 * 4, copies


def refused_on(load: Load, tag: str) -> bool:
    return any(i.startswith(tag) for i in load.refused)


async def keep_socket_producing(load: Load, socket_path: Path, stop: asyncio.Event) -> None:
    """Pipelined lines, new connections as needed, until `stop`."""
    while not stop.is_set():
        await load.socket(socket_path, stop, 200, "fulls", chunks=(1, 5, 10))
        await asyncio.sleep(0.05)


async def test_start_on_a_full_disk_fails_clearly_then_starts_once_space_returns(
        small_disk: SmallDisk, daemon_process, receiver: Receiver) -> None:
    """A fresh database on a disk with no space: exit 1 (a start-up failure, README) with the reason, then a
    normal start once there is space."""
    d = daemon_process([webhook("erp", receiver.url)], storage={"path": str(small_disk.path / "er.db")})
    await asyncio.to_thread(small_disk.fill)
    result = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "eventrelay", "run", "--config", str(d.config)],
        capture_output=True, text=True, timeout=30, cwd=REPO)
    assert result.returncode == 1, (result.returncode, result.stderr[-2000:])
    assert "No space left on device" in result.stderr or "disk" in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    small_disk.release()
    await asyncio.to_thread(d.start)
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{d.url}/v1/events", json={"id": "e1", "type": "order.paid", "data": {}}) as resp:
            assert resp.status == 202, await resp.text()
    await wait_until(lambda: [r.json["id"] for r in receiver.requests] == ["e1"])
