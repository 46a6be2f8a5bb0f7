"""Two asyncio idioms the daemon needs in many places, written once."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any


async def wait_event(event: asyncio.Event, timeout: float | None) -> bool:
    """Wait until `event` is set or `timeout` seconds pass (None: no limit); True if it was set.

    asyncio.timeout, not wait_for: on Python 3.11 wait_for may return normally when it is cancelled just as
    the event fires, and a task that missed its cancellation kept the daemon from stopping.
    """
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout):
            await event.wait()
    return event.is_set()


async def cancel(task: asyncio.Task[Any] | None) -> None:
    """Cancel a task we own and wait until it has ended (its CancelledError stays here)."""
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


class Backoff:
    """Delays that double from `first` to `most`: for reconnecting, which may take hours of a target being
    down, without hammering it or waiting long once it is back (`reset` after a success)."""

    def __init__(self, first: float = 1.0, most: float = 30.0):
        self._first, self._most = first, most
        self.delay = first

    def next(self) -> float:
        """The delay to wait now; the following one is twice as long, up to `most`."""
        delay, self.delay = self.delay, min(self.delay * 2, self._most)
        return delay

    def reset(self) -> None:
        self.delay = self._first
