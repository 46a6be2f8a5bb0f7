"""Fuzzing Unix socket ingest: streams cut anywhere, the connection cap, and the bugs fuzzing found there.

Part of the fuzzing of what strangers can send; tests/fuzz/oracle.py holds the oracle written from the README's
ingest contract, the strategies and the bridge between hypothesis and the daemon's loop.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from typing import Any

from hypothesis import given, note, settings
from hypothesis import strategies as st

from ..conftest import Receiver, wait_until
from .oracle import (
    REQUEST_TIMEOUT,
    SOCKET_LIMIT,
    TOO_LONG,
    Bridge,
    Model,
    assert_alive,
    bug,
    check_stored,
    counts,
    encode,
    event_dicts,
    examples,
    exchange_lines,
    expected_socket,
    integrations,
    nested_event,
    padded_event,
    refused_connections,
    run_property,
)

# -- property 2: socket ingest ------------------------------------------------------------------------------------

SENTINEL = b'{"type":"order.paid","data":{"sentinel":true}}'


@st.composite
def socket_lines(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["event"] * 6 + ["garbage", "utf8", "nul", "long", "exact", "blank", "truncated",
                                                 "deep", "array"]))
    if kind == "event":
        return encode(draw(event_dicts()), draw(st.booleans()), draw(st.booleans()))
    if kind == "garbage":
        return draw(st.binary(max_size=300))
    if kind in ("utf8", "nul", "truncated"):
        line = encode(draw(event_dicts()), False, True)
        at = draw(st.integers(0, len(line)))
        if kind == "truncated":
            return line[:at]
        insert = b"\x00" if kind == "nul" else draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x80"]))
        return line[:at] + insert + line[at:]
    if kind == "long":  # longer than the limit, some longer than one 64 KiB read
        size = draw(st.sampled_from([SOCKET_LIMIT + 1, 3 * SOCKET_LIMIT, 65536 + 17, 140_000]))
        return padded_event(size)
    if kind == "exact":  # the longest line accepted, or one byte more
        return padded_event(SOCKET_LIMIT + draw(st.sampled_from([-1, 0, 1])))
    if kind == "blank":
        return draw(st.sampled_from([b"", b" ", b"\t", b"\r", b"  \r", b"\x0b", b"\x0c "]))
    if kind == "deep":
        levels = draw(st.integers(55, 140) | st.sampled_from([62, 63, 1000]))
        return nested_event(levels, draw(st.sampled_from(["a", "ao"])))
    return encode(draw(st.lists(event_dicts(), max_size=2)), False, True)


def check_socket_answers(expected: list[tuple[str, Any]], answers: list[bytes], model: Model
                         ) -> dict[str, dict[str, Any]]:
    assert len(answers) == len(expected), f"{len(expected)} answers expected, got {len(answers)}: {answers[:20]}"
    new: dict[str, dict[str, Any]] = {}
    for (kind, item), raw in zip(expected, answers):
        assert raw.endswith(b"\n"), raw
        answer = json.loads(raw)
        if kind == "ok":
            assert set(answer) == {"id", "ok", "jobs", "duplicate"} and answer["ok"] is True, (item, answer)
            model.check_answer(item, answer, new)
        else:
            assert set(answer) == {"ok", "error"} and answer["ok"] is False, answer
            assert isinstance(answer["error"], str) and answer["error"], answer
            if kind == "too_long":
                assert answer["error"] == TOO_LONG, answer
    return new


async def test_socket_ingest_answers_each_line_in_order_and_ok_means_stored(receiver: Receiver, start_daemon) -> None:
    d = await start_daemon(integrations(receiver.url), listen={"max_body_size": SOCKET_LIMIT})
    bridge, model, seen = Bridge(asyncio.get_running_loop()), Model(), Counter[str]()

    @settings(max_examples=examples(300))
    @given(lines=st.lists(socket_lines(), max_size=10), newline_at_end=st.booleans(), data=st.data())
    def prop(lines: list[bytes], newline_at_end: bool, data: st.DataObject) -> None:
        # The sentinel comes last, after the fuzzed lines, maybe without a newline: the connection must still
        # be usable after whatever came before it.
        stream = b"\n".join([*lines, SENTINEL]) + (b"\n" if newline_at_end else b"")
        cuts = sorted(data.draw(st.lists(st.integers(1, max(1, len(stream) - 1)), max_size=8, unique=True),
                                label="cuts"))
        chunks = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)]) if stream[a:b]]
        pause = data.draw(st.sampled_from([0, 0, 0.002]), label="pause")
        expected = expected_socket(stream)
        assert expected[-1] == ("ok", json.loads(SENTINEL))
        seen.update(kind for kind, _ in expected)
        seen["connections"] += 1
        seen["chunks"] += len(chunks)
        before = counts(d, bridge)
        answers = bridge(lambda: exchange_lines(d.socket_path, chunks, pause), 3 * REQUEST_TIMEOUT)
        note(f"answers: {answers}")
        new = check_socket_answers(expected, answers, model)
        stored = [json.loads(a) for a in answers if json.loads(a)["ok"]]
        jobs = sum(a["jobs"] for a in stored if not a["duplicate"])
        assert counts(d, bridge) == (before[0] + len(new), before[1] + jobs), "stored events/jobs differ from the ok answers"
        check_stored(d, bridge, new)
        assert_alive(d, bridge)

    started = time.monotonic()
    await run_property(prop)
    print(f"socket fuzz: {dict(seen)}, {model.duplicates} duplicates, in {time.monotonic() - started:.1f}s")
    assert {"ok", "error", "too_long"} <= set(seen), f"the generators no longer reach every answer: {seen}"


async def test_max_connections_refuses_with_one_line_and_frees_slots(start_daemon) -> None:
    d = await start_daemon([], listen={"max_connections": 3})
    held = [await asyncio.open_unix_connection(str(d.socket_path)) for _ in range(3)]
    for _ in range(3):  # each extra connection: exactly one error line, then the end of the stream
        # (Nothing is written first: the daemon closes without reading, so a line already sent would make the
        # kernel reset the connection, and asyncio reports the reset before the buffered refusal line.)
        reader, writer = await asyncio.open_unix_connection(str(d.socket_path))
        assert json.loads(await asyncio.wait_for(reader.readline(), 5)) == {
            "ok": False, "error": "too many connections (listen.max_connections = 3); try again later"}
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
    held[0][1].close()

    async def accepted() -> bool:
        reader, writer = await asyncio.open_unix_connection(str(d.socket_path))
        writer.write(b'{"type": "order.paid", "data": {}}\n')
        ok = json.loads(await asyncio.wait_for(reader.readline(), 5))["ok"]
        writer.close()
        return ok is True

    await wait_until(accepted, timeout=5)
    # Three refusals above, and maybe more while the freed slot was being released.
    assert await refused_connections(d, "socket") >= 3
    for _, writer in held[1:]:
        writer.close()


@bug("the error message for an unknown field echoes its name; a name with a lone surrogate cannot be encoded as "
     "UTF-8, _handle raises UnicodeEncodeError, and the connection is closed with no answer for that line nor "
     "the lines after it")
async def test_bug_socket_lone_surrogate_in_a_field_name_kills_the_connection(start_daemon) -> None:
    d = await start_daemon([])
    answers = await asyncio.wait_for(
        exchange_lines(d.socket_path, [b'{"\\ud800": 1}\n{"type": "order.paid", "data": {}}\n'], 0), REQUEST_TIMEOUT)
    assert len(answers) == 2, answers
    assert json.loads(answers[0])["ok"] is False and json.loads(answers[1])["ok"] is True


@bug("SocketIngest.update(), which a reload calls on the running listener, also resets _server and _connections: "
     "open connections stop counting toward listen.max_connections (and stop() no longer closes the server nor "
     "waits for them)")
async def test_bug_reload_forgets_open_socket_connections(start_daemon) -> None:
    d = await start_daemon([], listen={"max_connections": 1})
    reader, writer = await asyncio.open_unix_connection(str(d.socket_path))
    writer.write(b'{"type": "order.paid", "data": {}}\n')
    assert json.loads(await asyncio.wait_for(reader.readline(), 5))["ok"] is True
    assert (await d.service.reload()).ok
    reader2, writer2 = await asyncio.open_unix_connection(str(d.socket_path))
    writer2.write(b'{"type": "order.paid", "data": {}}\n')
    answer = json.loads(await asyncio.wait_for(reader2.readline(), 5))
    writer.close()
    writer2.close()
    assert answer["ok"] is False and "too many connections" in answer["error"], answer
