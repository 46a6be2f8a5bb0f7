"""sd_notify against real AF_UNIX datagram sockets standing in for systemd's NOTIFY_SOCKET."""

from __future__ import annotations

import asyncio
import os
import re
import socket
import struct
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from eventrelay.notify import Notifier, watchdog_loop


class FakeSystemd:
    """The receiving end of NOTIFY_SOCKET, as systemd binds it (SO_PASSCRED, so the kernel adds our pid)."""

    def __init__(self, address: str):
        self.address = address  # what NOTIFY_SOCKET says: a path, or "@name" for the abstract namespace
        bind_to = "\0" + address[1:] if address.startswith("@") else address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(bind_to)
        self.sock.setblocking(False)

    def environ(self, **extra: str) -> dict[str, str]:
        return {"NOTIFY_SOCKET": self.address, **extra}

    def messages(self) -> list[str]:
        """Every datagram queued so far, decoded strictly (systemd rejects what is not UTF-8)."""
        out = []
        while True:
            try:
                out.append(self.sock.recv(8192).decode("utf-8"))
            except BlockingIOError:
                return out

    def sender_pid(self) -> int:
        _, ancdata, _, _ = self.sock.recvmsg(8192, socket.CMSG_SPACE(struct.calcsize("3i")))
        for level, kind, data in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                return struct.unpack("3i", data[:struct.calcsize("3i")])[0]
        raise AssertionError("no credentials attached")

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def short_tmp(tmp_path: Path) -> Iterator[Path]:
    # sun_path holds 107 bytes; pytest's tmp_path for a long test name can exceed that.
    if len(str(tmp_path)) < 80:
        yield tmp_path
        return
    with tempfile.TemporaryDirectory(prefix="notify-") as short:
        yield Path(short)


@pytest.fixture
def systemd(short_tmp: Path) -> Iterator[FakeSystemd]:
    fake = FakeSystemd(str(short_tmp / "notify"))
    yield fake
    fake.close()


@pytest.fixture
def notifier(systemd: FakeSystemd) -> Iterator[Notifier]:
    n = Notifier.from_environ(systemd.environ())
    yield n
    n.close()


def test_messages_arrive_exactly_and_in_order(systemd: FakeSystemd, notifier: Notifier) -> None:
    assert notifier.enabled
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert notifier.ready("listening on 127.0.0.1:8080")
    assert notifier.status("3 integrations")
    assert notifier.watchdog()
    assert notifier.reloading()
    assert notifier.ready()
    assert notifier.stopping()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000

    messages = systemd.messages()
    assert len(messages) == 6
    reloading = messages.pop(3)
    assert messages == ["READY=1\nSTATUS=listening on 127.0.0.1:8080", "STATUS=3 integrations", "WATCHDOG=1",
                        "READY=1", "STOPPING=1"]
    # One datagram carrying both lines: Type=notify-reload (systemd >= 253) insists on it.
    match = re.fullmatch(r"RELOADING=1\nMONOTONIC_USEC=(\d+)", reloading)
    assert match, reloading
    assert before <= int(match[1]) <= after
    assert notifier.failures == 0


def test_send_joins_lines_into_one_datagram(systemd: FakeSystemd, notifier: Notifier) -> None:
    assert notifier.send("STATUS=a", "EXTEND_TIMEOUT_USEC=5000000")
    assert systemd.messages() == ["STATUS=a\nEXTEND_TIMEOUT_USEC=5000000"]


def test_non_latin1_status_arrives_intact(systemd: FakeSystemd, notifier: Notifier) -> None:
    text = "Bestellungen: 5 ausstehend — ✓ 注文 🚚"
    assert notifier.status(text)
    assert notifier.ready(text)
    assert systemd.messages() == [f"STATUS={text}", f"READY=1\nSTATUS={text}"]


def test_status_cannot_smuggle_in_other_assignments(systemd: FakeSystemd, notifier: Notifier) -> None:
    notifier.status("line one\nREADY=1\r\nnul\0byte")
    assert systemd.messages() == ["STATUS=line one READY=1  nulbyte"]


def test_long_status_is_cut_on_a_character_boundary(systemd: FakeSystemd, notifier: Notifier) -> None:
    # systemd drops a notification over 4096 bytes whole, READY=1 included.
    notifier.ready("✓" * 5000)
    [message] = systemd.messages()  # decodes strictly: no half character at the cut
    assert message.startswith("READY=1\nSTATUS=✓✓")
    assert len(message.encode()) < 1100


def test_lone_surrogate_does_not_raise(systemd: FakeSystemd, notifier: Notifier) -> None:
    assert notifier.status("bad \udcff byte from a file name")
    assert systemd.messages() == ["STATUS=bad ? byte from a file name"]


def test_abstract_socket(systemd: FakeSystemd) -> None:
    abstract = FakeSystemd(f"@eventrelay-test/{uuid.uuid4()}")
    try:
        n = Notifier.from_environ(abstract.environ())
        assert n.ready("abstract ✓")
        assert abstract.messages() == ["READY=1\nSTATUS=abstract ✓"]
        assert systemd.messages() == []
        n.close()
    finally:
        abstract.close()


def test_kernel_attaches_our_pid_for_notify_access_main(systemd: FakeSystemd, notifier: Notifier) -> None:
    notifier.ready()
    assert systemd.sender_pid() == os.getpid()


def test_socket_is_cloexec_and_non_blocking(systemd: FakeSystemd, notifier: Notifier) -> None:
    assert notifier._socket is None  # nothing opened until there is something to say
    notifier.watchdog()
    assert notifier._socket is not None
    assert not os.get_inheritable(notifier._socket.fileno())
    assert notifier._socket.getblocking() is False


@pytest.mark.parametrize("environ", [{}, {"NOTIFY_SOCKET": ""}, {"NOTIFY_SOCKET": "relative/path"},
                                     {"NOTIFY_SOCKET": "vsock:2:1234"}, {"NOTIFY_SOCKET": "@"},
                                     {"WATCHDOG_USEC": "30000000"}])
def test_without_notify_socket_everything_is_a_no_op(environ: dict[str, str]) -> None:
    n = Notifier.from_environ(environ)
    assert not n.enabled
    assert n.watchdog_interval is None  # nobody to ping
    assert [n.ready("x"), n.reloading(), n.stopping(), n.status("x"), n.watchdog(), n.send("A=1")] == [False] * 6
    assert n._socket is None and n.failures == 0
    n.close()


def test_default_environ_is_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert not Notifier.from_environ().enabled
    monkeypatch.setenv("NOTIFY_SOCKET", "@eventrelay-unused")
    assert Notifier.from_environ().enabled


@pytest.mark.parametrize("unlink", [True, False], ids=["ENOENT", "ECONNREFUSED"])
def test_vanished_socket_does_not_raise_and_logs_once(short_tmp: Path, unlink: bool) -> None:
    gone = FakeSystemd(str(short_tmp / "notify"))
    n = Notifier.from_environ(gone.environ())
    assert n.ready()
    gone.close()
    if unlink:
        os.unlink(gone.address)
    with capture_logs() as logs:
        assert [n.watchdog(), n.status("still here"), n.stopping()] == [False] * 3
    assert n.failures == 3
    assert len(logs) == 1 and logs[0]["log_level"] == "warning", logs
    # systemd back (a restarted manager recreates the socket): the next send finds it without reconnecting.
    back = FakeSystemd(gone.address) if unlink else None
    try:
        if back is not None:
            assert n.watchdog()
            assert back.messages() == ["WATCHDOG=1"]
    finally:
        if back is not None:
            back.close()
        n.close()


def test_full_queue_drops_instead_of_blocking(systemd: FakeSystemd, notifier: Notifier) -> None:
    # Nobody reads: the kernel's per-socket datagram queue (net.unix.max_dgram_qlen) fills up.
    started = time.monotonic()
    results = [notifier.watchdog() for _ in range(2000)]
    assert time.monotonic() - started < 5
    assert results[0] is True and False in results
    assert notifier.failures == results.count(False)


def test_close_is_idempotent_and_send_reopens(systemd: FakeSystemd, notifier: Notifier) -> None:
    notifier.close()
    notifier.ready()
    notifier.close()
    notifier.close()
    assert notifier.status("again")
    assert systemd.messages() == ["READY=1", "STATUS=again"]


@pytest.mark.parametrize(("extra", "interval"), [
    ({}, None),
    ({"WATCHDOG_USEC": "30000000"}, 30.0),
    ({"WATCHDOG_USEC": "200000"}, 0.2),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "<self>"}, 30.0),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "<other>"}, None),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "not-a-pid"}, None),
    ({"WATCHDOG_USEC": "0"}, None),
    ({"WATCHDOG_USEC": "-5"}, None),
    ({"WATCHDOG_USEC": "30s"}, None),
    ({"WATCHDOG_USEC": ""}, None),
])
def test_watchdog_interval(systemd: FakeSystemd, extra: dict[str, str], interval: float | None) -> None:
    pids = {"<self>": str(os.getpid()), "<other>": str(os.getpid() + 1)}
    extra = {k: pids.get(v, v) for k, v in extra.items()}
    assert Notifier.from_environ(systemd.environ(**extra)).watchdog_interval == interval


class Pings:
    """Times at which WATCHDOG=1 datagrams arrive, read by a task as they come."""

    def __init__(self, systemd: FakeSystemd):
        self.systemd = systemd
        self.times: list[float] = []
        self.other: list[str] = []
        self._task = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            data = (await loop.sock_recv(self.systemd.sock, 8192)).decode()
            (self.times.append(loop.time()) if data == "WATCHDOG=1" else self.other.append(data))

    def count_between(self, start: float, end: float) -> int:
        return sum(start <= t < end for t in self.times)

    async def close(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


@pytest.fixture
async def pings(systemd: FakeSystemd) -> Pings:
    p = Pings(systemd)
    yield p
    await p.close()


async def test_watchdog_loop_pings_at_half_the_interval_while_healthy(systemd: FakeSystemd, pings: Pings) -> None:
    n = Notifier.from_environ(systemd.environ(WATCHDOG_USEC="200000"))
    stop = asyncio.Event()
    health = {"ok": True}

    async def healthy() -> bool:
        return health["ok"]

    loop = asyncio.get_running_loop()
    task = asyncio.create_task(watchdog_loop(n, healthy, stop))
    t0 = loop.time()
    await asyncio.sleep(0.65)
    health["ok"] = False
    t_unhealthy = loop.time()
    await asyncio.sleep(0.5)
    t_healthy = loop.time()
    health["ok"] = True
    await asyncio.sleep(0.35)
    stop.set()
    await asyncio.wait_for(task, 0.5)  # stop is honoured promptly, not after a sleep runs out
    await asyncio.sleep(0.05)

    healthy_pings = [t for t in pings.times if t < t_unhealthy]
    assert 5 <= len(healthy_pings) <= 8, healthy_pings  # ~every 0.1 s over 0.65 s, the first one at once
    assert healthy_pings[0] - t0 < 0.05
    gaps = [b - a for a, b in zip(healthy_pings, healthy_pings[1:])]
    assert max(gaps) < 0.2 and min(gaps) > 0.05, gaps  # inside the interval, without flooding
    # Unhealthy: at most one ping that was already decided on when health flipped.
    assert pings.count_between(t_unhealthy, t_healthy) <= 1
    assert pings.count_between(t_unhealthy + 0.1, t_healthy) == 0
    assert pings.count_between(t_healthy, t_healthy + 0.35) >= 2  # and back once healthy again
    assert pings.other == []
    n.close()


async def test_watchdog_loop_treats_hanging_or_failing_checks_as_unhealthy(systemd: FakeSystemd,
                                                                          pings: Pings) -> None:
    n = Notifier.from_environ(systemd.environ(WATCHDOG_USEC="200000"))
    stop = asyncio.Event()
    calls = []

    async def hangs() -> bool:
        calls.append("hang")
        await asyncio.Event().wait()
        return True

    async def fails() -> bool:
        calls.append("fail")
        raise RuntimeError("store is gone")

    with capture_logs() as logs:
        for check in (hangs, fails):
            stop.clear()
            task = asyncio.create_task(watchdog_loop(n, check, stop))
            await asyncio.sleep(0.45)
            stop.set()
            await asyncio.wait_for(task, 0.5)
    assert pings.times == []
    assert calls.count("hang") >= 3 and calls.count("fail") >= 3  # kept checking: no crash, no busy loop
    assert calls.count("fail") <= 6
    # One warning per incident, not one per tick.
    assert [e["log_level"] for e in logs] == ["warning", "warning"], logs
    n.close()


async def test_watchdog_loop_without_watchdog_returns_at_once(systemd: FakeSystemd) -> None:
    async def healthy() -> bool:
        raise AssertionError("no watchdog configured: nothing to check")

    stop = asyncio.Event()
    for environ in (systemd.environ(), {}, systemd.environ(WATCHDOG_USEC="200000",
                                                           WATCHDOG_PID=str(os.getpid() + 1))):
        await asyncio.wait_for(watchdog_loop(Notifier.from_environ(environ), healthy, stop), 0.1)
    assert systemd.messages() == []


async def test_watchdog_loop_returns_when_stop_is_already_set(systemd: FakeSystemd) -> None:
    n = Notifier.from_environ(systemd.environ(WATCHDOG_USEC="30000000"))
    stop = asyncio.Event()
    stop.set()

    async def healthy() -> bool:
        return True

    await asyncio.wait_for(watchdog_loop(n, healthy, stop), 0.1)
    assert systemd.messages() == []
    n.close()
