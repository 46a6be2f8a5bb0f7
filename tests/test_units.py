"""The shared grammars: durations (config and CLI alike), sizes, rates; the text and clock helpers."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from eventrelay import config as cfg
from eventrelay.admin import commands as admin_commands
from eventrelay.clock import iso_time, parse_datetime, parse_time
from eventrelay.text import first_line, one_line, quoted, shorten
from eventrelay.units import format_duration, parse_duration, parse_rate, parse_size

NOW = datetime(2026, 11, 27, 12, 0, tzinfo=timezone.utc)


@pytest.mark.parametrize("text,seconds", [
    ("250ms", 0.25), ("10s", 10), ("5m", 300), ("24h", 86400), ("7d", 7 * 86400), ("2w", 14 * 86400),
    (30, 30.0), (0.5, 0.5), ("1.5s", 1.5), ("1h30m", 5400), ("1d 6h", 108000), (" 90m ", 5400),
    ("5ms", 0.005), ("1m5s", 65), ("0s", 0.0),
])
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("bad", ["10", "", "s", "ten seconds", "5 minutes", "-1s", "1y", "1.s", "1h 30", True,
                                 None, [1], "1h-30m"])
def test_what_is_not_a_duration(bad: object) -> None:
    with pytest.raises(ValueError, match="is not a duration|must not be negative"):
        parse_duration(bad)


def test_the_config_and_the_cli_read_the_same_durations(tmp_path) -> None:
    for text in ("250ms", "90s", "2h", "1d 6h", "2w"):
        timeout = cfg.parse(f"delivery: {{retry: {{max_age: '{text}'}}}}").delivery.retry.max_age
        ago = admin_commands.parse_time_arg(text, NOW)
        assert NOW - ago == timedelta(seconds=timeout)


@pytest.mark.parametrize("seconds,text", [(0, "0s"), (45, "45s"), (60, "1m"), (125, "2m 5s"), (3600, "1h"),
                                          (4 * 3600 + 12 * 60, "4h 12m"), (3 * 86400 + 4 * 3600, "3d 4h"),
                                          (59.9, "59s")])
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


@given(st.integers(0, 400 * 86400))
def test_formatted_durations_read_back_as_their_two_largest_units(seconds: int) -> None:
    shown = format_duration(seconds)
    back = parse_duration(shown)
    # Only a third unit is dropped: less than the smaller unit shown.
    smallest = {"d": 3600, "h": 60, "m": 1, "s": 1}[shown.split()[0][-1]]
    assert back <= seconds < back + smallest
    assert format_duration(back) == shown


@pytest.mark.parametrize("text,size", [(512, 512), ("512", 512), ("1MiB", 1024**2), ("512 KiB", 512 * 1024),
                                       ("64KB", 64000), ("2GB", 2 * 1000**3), ("10B", 10)])
def test_sizes(text: object, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("bad", [0, "0", -1, "1TiB", "lots", True, "1.5MiB"])
def test_what_is_not_a_size(bad: object) -> None:
    with pytest.raises(ValueError, match="is not a size"):
        parse_size(bad)


@pytest.mark.parametrize("text,rate", [(50, 50.0), (0.5, 0.5), ("50/s", 50.0), ("600/m", 10.0), ("36/h", 0.01),
                                       ("1.5 / s", 1.5)])
def test_rates(text: object, rate: float) -> None:
    assert parse_rate(text) == pytest.approx(rate)


@pytest.mark.parametrize("bad", [0, "0/s", "50/d", "fast", True, -1])
def test_what_is_not_a_rate(bad: object) -> None:
    with pytest.raises(ValueError, match="is not a rate"):
        parse_rate(bad)


# -- text ---------------------------------------------------------------------------------------------------

def test_shortening() -> None:
    assert shorten("abcdef", 6) == "abcdef"
    assert shorten("abcdefg", 6) == "abc..."
    assert shorten("abcdefg", 6, "…") == "abcde…"
    assert first_line("\n  first line  \nsecond") == "first line"
    assert first_line("x" * 200, 10) == "xxxxxxx..."
    assert first_line("  \n ") == ""
    assert one_line("<html>\n  <b>error</b>\n</html>") == "<html> <b>error</b> </html>"
    assert one_line("a  b\tc", 4, "…") == "a b…"
    assert quoted("x" * 100) == "'" + "x" * 76 + "..."
    assert quoted(ValueError("why")) == "why"


def test_quoting_a_number_too_long_to_print() -> None:
    assert quoted(10 ** 5000) == "<too large to show>"


# -- clock --------------------------------------------------------------------------------------------------

def test_times_written_are_times_read() -> None:
    for stamp in (0.0, 1_764_000_000.123, 1_800_000_000.5):
        assert parse_time(iso_time(stamp)) == pytest.approx(stamp, abs=0.0005)
    assert iso_time(1_764_000_000.123) == "2025-11-24T16:00:00.123Z"


def test_parse_time_takes_unix_seconds_or_iso_8601_with_a_zone() -> None:
    assert parse_time(1_764_000_000) == 1_764_000_000.0
    assert parse_time("2026-11-27T12:00:00+01:00") == NOW.timestamp() - 3600
    with pytest.raises(ValueError, match=r"give a time zone, e\.g\. 2026-11-27T12:00:00Z"):
        parse_time("2026-11-27T12:00:00")
    for bad in ("yesterday", True, None, "", [1]):
        with pytest.raises(ValueError, match="is not an ISO 8601 time or unix seconds"):
            parse_time(bad)


def test_a_time_without_a_zone_is_read_as_asked() -> None:
    assert parse_datetime("2026-11-27 12:00", naive="utc") == NOW
    local = datetime(2026, 11, 27, 12, 0).astimezone()
    assert parse_datetime("2026-11-27 12:00", naive="local") == local
    assert parse_datetime("2026-11-27T13:00:00+01:00").tzinfo == timezone.utc
