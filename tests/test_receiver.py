"""`eventrelay receive`, driven by the real daemon: it must see what a production receiver sees."""

from __future__ import annotations

import io

from aiohttp import web

from daemon.receiver import DebugReceiver

from .conftest import wait_until, webhook


async def test_receiver_prints_deliveries_and_flags_a_wrong_secret(start_daemon) -> None:
    out = io.StringIO()
    receiver = DebugReceiver(secret_key="right-key", status=204, out=out)
    runner = web.AppRunner(receiver.app())
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}/hooks"
    try:
        d = await start_daemon([
            webhook("good", url, configuration={"url": url, "secret_key": "right-key"}),
            webhook("bad", url, configuration={"url": url, "secret_key": "wrong-key"},
                    delivery={"retry": {"initial": "10s", "max_interval": "10s"}})])
        await d.post({"id": "evt-1", "type": "order.paid", "data": {"id": "o1"}})
        await wait_until(lambda: receiver.received >= 2)
        await wait_until(lambda: d.rows("SELECT integration, state FROM jobs ORDER BY integration") ==
                         [("bad", "pending"), ("good", "delivered")])
        text = out.getvalue()
        assert "order.paid id=evt-1 attempt=1 integration=good" in text
        assert "PROBLEM: X-MOLTIN-SECRET-KEY is wrong" in text
        ((bad_job,),) = d.rows("SELECT id FROM jobs WHERE integration = 'bad'")
        (bad_attempt,) = await d.service.store.attempts(bad_job)
        assert bad_attempt["status_code"] == 401
    finally:
        await runner.cleanup()
