"""A damaged database file: the daemon refuses it at start with one sentence, never serves it.

The damage is what a failing disk or a careless copy does: a block of random bytes in the middle of the
file, zeros over a page, a clobbered header, a file cut short. Every variant must stop the start-up with
exit code 1 and one line that says what to do, without a traceback anywhere in the output.
"""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from ..conftest import REPO, webhook

EVENTS = 2000


def damage_middle_random(db: Path) -> None:
    size = db.stat().st_size
    with open(db, "r+b") as f:
        f.seek(size // 2 // 4096 * 4096)
        f.write(random.Random(7).randbytes(64 * 1024))


def damage_page_zeros(db: Path) -> None:
    with open(db, "r+b") as f:
        f.seek(db.stat().st_size // 3 // 4096 * 4096)
        f.write(b"\0" * 4096)


def damage_header(db: Path) -> None:
    with open(db, "r+b") as f:
        f.write(b"this is not a database file, whatever it was" * 2)


def damage_truncated(db: Path) -> None:
    os.truncate(db, db.stat().st_size // 2 // 4096 * 4096)


@pytest.fixture
async def filled_database(daemon_process, tmp_path: Path) -> Path:
    """A database with a few thousand pending jobs (their target refuses connections), the daemon stopped."""
    d = daemon_process([webhook("erp", "http://127.0.0.1:9/refused")])
    await asyncio.to_thread(d.start)
    async with aiohttp.ClientSession() as http:
        for start in range(0, EVENTS, 500):
            batch = [{"id": f"e{i}", "type": "order.paid", "data": {"id": f"o{i}", "note": "x" * 200}}
                     for i in range(start, start + 500)]
            async with http.post(d.url + "/v1/events", json=batch) as resp:
                assert resp.status == 202
    await asyncio.to_thread(d.stop)
    return d.config


@pytest.mark.parametrize("damage", [damage_middle_random, damage_page_zeros, damage_header, damage_truncated])
async def test_a_damaged_database_is_refused_at_start_with_one_sentence(filled_database: Path, damage) -> None:
    db = filled_database.parent / "er.db"
    for extra in ("er.db-wal", "er.db-shm"):  # a clean stop checkpointed the WAL; the damage is in the file
        (filled_database.parent / extra).unlink(missing_ok=True)
    damage(db)
    result = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "eventrelay", "run", "--config", str(filled_database)],
        capture_output=True, text=True, timeout=60, cwd=REPO)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "Traceback" not in output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    (line,) = lines
    assert line.startswith("eventrelay: cannot run: the database ") and "is damaged" in line, line
    assert "restore a backup" in line
