"""What both engines' job searches share: where a time range's scan starts and where the next page begins.
The engines keep the SQL. Job ids grow with creation time (closely enough across daemons sharing a
database: SLACK covers the difference), so a time range is found as a range of ids, through the primary key."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from .api import JobSearch, JobView, SearchPage

SLACK = 1.0  # seconds: how far creation times may run out of id order


async def scan_start(until: float, bounds: tuple[int, int] | None,
                     created_at_or_after: Callable[[int], Awaitable[float | None]]) -> int:
    """The id below which every job was created before `until` (and a second of slack), found by bisection
    in as many point reads as the id range has bits. `bounds` are the smallest and largest job ids (None when
    there are no jobs); `created_at_or_after(id)` is when the first job with an id at or above `id` was
    created (None when there is none)."""
    if bounds is None:
        return 1
    lo, hi = bounds[0], bounds[1] + 1  # at hi (past the last job) the answer holds by definition
    while lo < hi:
        mid = (lo + hi) // 2
        created = await created_at_or_after(mid)
        if created is None or created >= until + SLACK:
            hi = mid
        else:
            lo = mid + 1
    return lo


def page(rows: list[JobView], limit: int, query: JobSearch, scan: int,
         scanned: tuple[int, int, float | None] | None) -> SearchPage:
    """The page of `rows` (up to limit + 1 matches of one scan, newest first) and the next page's cursor.
    `scanned` is (jobs examined, the smallest id examined, when that job was created); it is needed only when
    the page is not full, to tell an exhausted search from a scan that stopped at its bound (`scan` jobs)."""
    if len(rows) > limit:
        return SearchPage(rows[:limit], rows[limit - 1].id)
    if scanned is None or scanned[0] < scan:
        return SearchPage(rows, None)
    _, floor, floor_created = scanned
    if query.since is not None and floor_created is not None and floor_created < query.since - SLACK:
        return SearchPage(rows, None)  # the scan went past the range's start: nothing older can match
    return SearchPage(rows, floor)
