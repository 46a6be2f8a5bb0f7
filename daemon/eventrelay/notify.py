"""Tell systemd how we are doing: the sd_notify(3) protocol, written by hand.

The protocol is one AF_UNIX datagram of newline-separated KEY=VALUE lines sent to $NOTIFY_SOCKET, which is
small enough to own. The PyPI wrappers either need libsystemd headers to build or encode as Latin-1 and drop
a STATUS line they cannot encode; systemd reads UTF-8, and our status lines name integrations in any language.

Nothing here is module state: the daemon (and each test) builds a Notifier from the environment it is given.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Awaitable, Callable, Mapping

import structlog

from .aio import wait_event

log = structlog.get_logger(component="notify")

# systemd ignores a whole notification bigger than its 4096-byte buffer, so an over-long STATUS would take the
# READY=1 it travels with down too. Nobody reads a status line this long in `systemctl status` anyway.
_STATUS_MAX_BYTES = 1024


class Notifier:
    """Sends notifications to systemd; every method is a cheap no-op when not started by systemd.

    Never raises on a failed send: systemd being restarted or gone must not take the daemon down with it.
    Failures are counted in `failures` and the first one is logged. Use from one thread (the event loop's).
    """

    def __init__(self, address: str | None, watchdog_usec: int | None = None,
                 watchdog_pid: int | None = None) -> None:
        self._address = _socket_address(address)
        if address and self._address is None:
            # e.g. systemd >= 254's "vsock:" addresses, meant for VMs: we never run there, so just say so.
            log.warning("NOTIFY_SOCKET not supported, notifications disabled", notify_socket=address)
        self._watchdog_usec = watchdog_usec
        self._watchdog_pid = watchdog_pid
        self._socket: socket.socket | None = None
        self.failures = 0

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] = os.environ) -> Notifier:
        """The notifier systemd configured for this process; a disabled one outside systemd."""
        usec, pid = _int(environ.get("WATCHDOG_USEC")), _int(environ.get("WATCHDOG_PID"))
        if environ.get("WATCHDOG_PID") and pid is None:
            usec = None  # a PID we cannot read cannot be shown to be ours: no watchdog, like sd_watchdog_enabled
        return cls(environ.get("NOTIFY_SOCKET"), usec, pid)

    @property
    def enabled(self) -> bool:
        return self._address is not None

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds within which systemd wants WATCHDOG=1, or None if it wants none from this process.

        Checked on every access rather than once: WATCHDOG_PID names the process the watchdog is meant for,
        and a forked child that inherited this object must not keep its parent's watchdog fed.
        """
        if not self.enabled or not self._watchdog_usec or self._watchdog_pid not in (None, os.getpid()):
            return None
        return self._watchdog_usec / 1_000_000 if self._watchdog_usec > 0 else None

    def send(self, *lines: str) -> bool:
        """Send KEY=VALUE lines as one datagram; True if the kernel took it (not that systemd acted on it)."""
        if self._address is None or not lines:
            return False
        # "replace", not "strict": a lone surrogate must not make us crash, and systemd refuses non-UTF-8.
        payload = "\n".join(lines).encode("utf-8", "replace")
        try:
            if self._socket is None:
                # Lazily, so a daemon outside systemd never holds one. CLOEXEC: children we spawn must not
                # speak for us. Non-blocking: we run on the event loop, and if systemd stops reading, a full
                # queue must cost a dropped message, never a stalled daemon.
                self._socket = socket.socket(
                    socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
            # sendto rather than connect: the address is resolved per send, so a socket systemd recreates
            # (daemon-reexec, a restarted manager) is found again instead of staying bound to a dead inode.
            self._socket.sendto(payload, self._address)
            return True
        except OSError as error:  # ENOENT, ECONNREFUSED, EAGAIN, EACCES, ...
            self.failures += 1
            if self.failures == 1:
                log.warning("cannot notify systemd; continuing without (logged once)",
                            error=str(error), notify_socket=os.fsdecode(self._address))
            return False

    def ready(self, status: str | None = None) -> bool:
        """Start-up (or a reload) is complete. Both in one datagram, so the status is never stale when ready."""
        return self.send("READY=1", *([_status_line(status)] if status is not None else []))

    def reloading(self) -> bool:
        """A reload has begun; follow with ready() even if it fails, or systemd waits for the reload timeout.

        MONOTONIC_USEC travels in the same datagram: Type=notify-reload (systemd >= 253) uses it to tell our
        answer to its SIGHUP from an older one; systemd 252 ignores it.
        """
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.send("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def stopping(self) -> bool:
        return self.send("STOPPING=1")

    def status(self, text: str) -> bool:
        return self.send(_status_line(text))

    def waiting(self, text: str, seconds: float) -> bool:
        """Start-up waits for something (the database): say why, and push systemd's start timeout (its
        TimeoutStartSec) `seconds` further, so a wait that is expected does not end in a kill."""
        return self.send(_status_line(text), f"EXTEND_TIMEOUT_USEC={int(seconds * 1_000_000)}")

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None


def _int(value: str | None) -> int | None:
    try:
        return int(value) if value else None
    except ValueError:
        return None


def _socket_address(value: str | None) -> bytes | None:
    # Bytes, because "@name" means the abstract namespace: a leading NUL that a str address could not carry
    # through the filesystem encoding unchanged, and whose length (no trailing NUL) is part of the name.
    if value and value[0] == "@" and len(value) > 1:
        return b"\0" + os.fsencode(value[1:])
    if value and value[0] == "/":
        return os.fsencode(value)
    return None


def _status_line(text: str) -> str:
    # A newline would start a new assignment (a STATUS could say READY=1), and systemd drops messages with NUL.
    text = text.replace("\r", " ").replace("\n", " ").replace("\0", "")
    return "STATUS=" + text.encode("utf-8", "replace")[:_STATUS_MAX_BYTES].decode("utf-8", "ignore")


async def watchdog_loop(notifier: Notifier, healthy: Callable[[], Awaitable[bool]], stop: asyncio.Event) -> None:
    """Feed the systemd watchdog while `healthy()` says so; return once `stop` is set.

    Returns at once when systemd asked for no watchdog. Pings at half the interval, the margin sd_watchdog_enabled(3)
    recommends. A health check that hangs counts as unhealthy: a wedged store is exactly what the watchdog is for.
    It gets a quarter of the interval, so a late ping still lands within 3/4 of it.
    """
    interval = notifier.watchdog_interval
    if interval is None:
        return
    period = interval / 2
    loop = asyncio.get_running_loop()
    was_healthy = True
    while not stop.is_set():
        started = loop.time()
        reason = None
        try:
            async with asyncio.timeout(period / 2):
                ok = bool(await healthy())
        except Exception as error:  # TimeoutError included; CancelledError is not, so cancelling still works
            ok, reason = False, repr(error)
        if ok != was_healthy:  # transitions only: one line per incident, not one per tick
            if ok:
                log.info("watchdog: healthy again, pinging systemd")
            else:
                log.warning("watchdog: unhealthy, not pinging; systemd restarts us unless this clears",
                            reason=reason, watchdog_s=interval)
            was_healthy = ok
        if ok and not stop.is_set():
            notifier.watchdog()
        await wait_event(stop, max(period - (loop.time() - started), 0.0))
