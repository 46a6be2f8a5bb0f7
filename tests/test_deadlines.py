"""Deadlines: one periodic check that times out many sections, and leaves every other cancellation alone."""

from __future__ import annotations

import asyncio
import time

import pytest

from eventrelay.delivery.deadlines import Deadlines

RESOLUTION = 0.02


@pytest.fixture
async def deadlines():
    d = Deadlines(resolution=RESOLUTION)
    d.start(name="deadlines:test")
    yield d
    await d.close()


async def section(d: Deadlines, seconds: float, work: float) -> tuple[str, float]:
    """Sleep `work` seconds under a deadline of `seconds`: ("done" | "timed out", seconds taken)."""
    started = time.monotonic()
    key = d.arm(seconds)
    try:
        await asyncio.sleep(work)
        return "done", time.monotonic() - started
    except asyncio.CancelledError:
        if not d.expired(key):
            raise
        return "timed out", time.monotonic() - started
    finally:
        d.disarm(key)


async def test_a_section_past_its_deadline_times_out_within_one_resolution(deadlines: Deadlines) -> None:
    results = await asyncio.wait_for(asyncio.gather(*(section(deadlines, 0.1, 5.0) for _ in range(8))), 3)
    assert {r for r, _ in results} == {"timed out"}
    assert all(0.1 <= took < 0.1 + RESOLUTION + 0.1 for _, took in results), results


async def test_the_task_goes_on_uncancelled_after_a_timeout(deadlines: Deadlines) -> None:
    async def two_sections() -> tuple[str, str, int]:
        first, _ = await section(deadlines, 0.05, 5.0)
        # The task's cancellation was taken back: a later await is not cancelled, and asyncio.timeout,
        # which reads the task's cancellation count, still works in it.
        await asyncio.sleep(2 * RESOLUTION)
        async with asyncio.timeout(1):
            second, _ = await section(deadlines, 5.0, 0.01)
        return first, second, asyncio.current_task().cancelling()

    assert await asyncio.wait_for(two_sections(), 3) == ("timed out", "done", 0)


async def test_sections_that_end_in_time_are_not_touched(deadlines: Deadlines) -> None:
    results = await asyncio.wait_for(asyncio.gather(*(section(deadlines, 0.3, 0.01 * i) for i in range(10))), 3)
    assert {r for r, _ in results} == {"done"}
    await asyncio.sleep(0.3 + 2 * RESOLUTION)  # past every deadline: nothing armed is left to cancel


async def test_a_shutdown_cancel_is_not_mistaken_for_a_timeout(deadlines: Deadlines) -> None:
    task = asyncio.create_task(section(deadlines, 0.05, 5.0))
    await asyncio.sleep(0.01)
    task.cancel()  # e.g. the daemon stopping, before the deadline
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 3)


async def test_a_shutdown_cancel_that_meets_a_timeout_still_cancels(deadlines: Deadlines) -> None:
    task = asyncio.create_task(section(deadlines, 0.05, 5.0))
    # Wait for the check to cancel the task (its count goes to 1), and cancel it too before it runs again:
    # the task is then cancelled twice, and taking back the deadline's cancellation must leave ours.
    async with asyncio.timeout(3):
        while task.cancelling() == 0:
            await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 3)


async def test_a_swallowed_cancellation_is_taken_back_on_disarm(deadlines: Deadlines) -> None:
    async def swallowing() -> int:
        key = deadlines.arm(0.05)
        try:
            try:
                await asyncio.sleep(5)
            except asyncio.CancelledError:
                pass  # a library that eats the CancelledError: the section just ends
        finally:
            deadlines.disarm(key)
        return asyncio.current_task().cancelling()

    assert await asyncio.wait_for(swallowing(), 3) == 0
