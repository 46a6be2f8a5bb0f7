"""One timer for the timeouts of many requests in flight."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from .. import aio


class Deadlines:
    """Cancels a task still inside an armed section once the section's deadline has passed.

    aiohttp's per-request `total` timeout arms a timer context, a timeout handle and a loop timer for every
    request and cancels them after, a tenth of what a webhook post costs the event loop (the figures are in
    docs/performance-notes.md). Here a request costs a dict entry, and one task per
    sender checks the entries `resolution` seconds apart, so a timeout fires between its deadline and one
    resolution later. The check sleeps while nothing is armed.

    The cancellation is the one asyncio.timeout uses: the task gets CancelledError at the await it is
    suspended in. `expired` tells the armed code whether it was this deadline's (and takes it back from
    the task's count), so that any other cancellation, such as a shutdown, goes on as it came.

        key = deadlines.arm(seconds)
        try:
            await ...
        except asyncio.CancelledError:
            if not deadlines.expired(key):
                raise
            ...  # timed out
        finally:
            deadlines.disarm(key)
    """

    def __init__(self, resolution: float):
        self._resolution = resolution
        # key → (task, deadline on time.monotonic(), the task's cancellation count when armed)
        self._armed: dict[int, tuple[asyncio.Task[Any], float, int]] = {}
        self._expired: set[int] = set()
        self._next_key = 0
        self._work = asyncio.Event()
        self._watcher: asyncio.Task[None] | None = None

    def start(self, name: str) -> None:
        if self._watcher is None:  # a sender's start() is tried again after it failed
            self._watcher = asyncio.create_task(self._watch(), name=name)

    async def close(self) -> None:
        """Stop checking; call once no section is armed any more."""
        await aio.cancel(self._watcher)
        self._watcher = None

    def arm(self, seconds: float) -> int:
        task = asyncio.current_task()
        assert task is not None, "arm() from a task"
        if not self._armed:
            self._work.set()
        key = self._next_key
        self._next_key += 1
        self._armed[key] = (task, time.monotonic() + seconds, task.cancelling())
        return key

    def expired(self, key: int) -> bool:
        """In an `except CancelledError` of the section: True if the deadline cancelled it and nothing else
        did (the task is no longer cancelled: go on), False if the cancellation is someone else's (re-raise)."""
        if key not in self._expired:
            return False
        self._expired.discard(key)
        task, _, cancelling = self._armed[key]
        return task.uncancel() <= cancelling

    def disarm(self, key: int) -> None:
        task, _, _ = self._armed.pop(key)
        if key in self._expired:
            # Cancelled, but the section ended without the CancelledError reaching `expired` (a library
            # swallowed it): take the request back, or the task would stay marked as being cancelled.
            self._expired.discard(key)
            task.uncancel()

    async def _watch(self) -> None:
        while True:
            if not self._armed:
                self._work.clear()
                await self._work.wait()
            await asyncio.sleep(self._resolution)
            now = time.monotonic()
            for key, (task, deadline, _) in self._armed.items():
                # Nothing else runs during this loop: every task here is suspended inside its section, so
                # the CancelledError lands there, never in code after it.
                if deadline <= now and key not in self._expired:
                    self._expired.add(key)
                    task.cancel()
