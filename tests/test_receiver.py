"""`eventrelay receive`, driven by the real daemon: it must see what a production receiver sees."""

from __future__ import annotations

import base64
import contextlib
import io
import re
import subprocess
import sys
import time
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from eventrelay.receiver import DebugReceiver, SigningSecretError
from eventrelay.store import AttemptView

from .conftest import REPO, wait_for, wait_until, webhook


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
        await wait_for(lambda: integration_states(d), [("bad", "pending"), ("good", "delivered")])
        text = out.getvalue()
        assert "order.paid id=evt-1 attempt=1 integration=good" in text
        assert "PROBLEM: X-MOLTIN-SECRET-KEY is wrong" in text
        (bad_job,) = await d.jobs("bad")
        (bad_attempt,) = await d.store.attempts(bad_job.id)
        assert bad_attempt.status_code == 401
    finally:
        await runner.cleanup()


# -- `--secret`: Standard Webhooks signatures, verified on deliveries from the daemon ---------------------------

SECRET = "whsec_" + base64.b64encode(b"k" * 32).decode()
OTHER = "whsec_" + base64.b64encode(b"o" * 32).decode()
NO_RETRY_SOON = {"retry": {"initial": "10s", "max_interval": "10s"}}


@contextlib.asynccontextmanager
async def listening(receiver: DebugReceiver) -> AsyncIterator[str]:
    runner = web.AppRunner(receiver.app())
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}/hooks"
    finally:
        await runner.cleanup()


def signed(name: str, url: str, secret: str | None, **extra) -> dict:
    configuration = {"url": url} if secret is None else {"url": url, "signing_secret": secret}
    return webhook(name, url, configuration=configuration, **extra)


async def attempt_of(d, integration: str) -> AttemptView:
    (job,) = await d.jobs(integration)
    attempts = await d.store.attempts(job.id)
    return attempts[0]


async def integration_states(d) -> list[tuple[str, str]]:
    """(integration, state) of every job, by integration."""
    return sorted((job.integration, job.state.value) for job in await d.jobs())


async def test_secret_accepts_the_daemons_signatures_and_refuses_any_other(start_daemon) -> None:
    out = io.StringIO()
    receiver = DebugReceiver(None, 204, out, signing_secret=SECRET)
    async with listening(receiver) as url:
        d = await start_daemon([signed("good", url + "/good", SECRET),
                                signed("rotating", url + "/rotating", [OTHER, SECRET]),
                                signed("other", url + "/other", OTHER, delivery=NO_RETRY_SOON),
                                signed("unsigned", url + "/unsigned", None, delivery=NO_RETRY_SOON)])
        await d.post({"id": "evt-signed", "type": "order.paid", "data": {"id": "o1", "note": "crème brûlée"}})
        await wait_for(lambda: integration_states(d), [("good", "delivered"), ("other", "pending"),
                                                       ("rotating", "delivered"), ("unsigned", "pending")])
        await wait_until(lambda: receiver.received >= 4)
    blocks = deliveries(out.getvalue())
    assert blocks["/hooks/good"][-1] == "  signature verified"
    assert blocks["/hooks/rotating"][-1] == "  signature verified"  # one of two signatures is enough
    assert blocks["/hooks/other"][-1] == (
        "  PROBLEM: webhook-signature does not match: the integration signs with another signing_secret than "
        "--secret, or the body was changed on the way")
    assert blocks["/hooks/unsigned"][-1] == (
        "  PROBLEM: webhook-id, webhook-timestamp, webhook-signature missing: the integration has no "
        "signing_secret, or something on the way dropped the header")
    for name in ("other", "unsigned"):  # the daemon records a failed attempt, and will retry
        attempt = await attempt_of(d, name)
        assert (attempt.succeeded, attempt.status_code) == (False, 401)
    assert (await attempt_of(d, "good")).status_code == 204


@pytest.mark.parametrize("skew, words", [(+330, "old"), (-400, "in the future")])
async def test_secret_refuses_a_timestamp_more_than_five_minutes_off(start_daemon, skew, words) -> None:
    # The daemon signs with the time it sends: a receiver whose clock is that far ahead (or behind) sees a
    # request sent again later (or a clock out of sync).
    out = io.StringIO()
    receiver = DebugReceiver(None, 204, out, signing_secret=SECRET, clock=lambda: time.time() + skew)
    async with listening(receiver) as url:
        d = await start_daemon([signed("erp", url, SECRET, delivery=NO_RETRY_SOON)])
        await d.post({"id": "evt-late", "type": "order.paid", "data": {}})
        await wait_until(lambda: receiver.received >= 1)
        await wait_for(d.jobs, lambda jobs: [job.attempts for job in jobs] == [1])
    # The header has whole seconds, the clock fractions: the age printed is the skew, give or take a second.
    seconds = "|".join(str(abs(skew) + d) for d in (-1, 0, 1))
    assert re.search(rf"PROBLEM: webhook-timestamp is (?:{seconds})s {words} \(more than 5 minutes\)",
                     out.getvalue()), out.getvalue()
    attempt = await attempt_of(d, "erp")
    assert (attempt.succeeded, attempt.status_code) == (False, 401)


def deliveries(text: str) -> dict[str, list[str]]:
    """The receiver's output, one list of lines per request path (each request prints a block)."""
    blocks: dict[str, list[str]] = {}
    current: list[str] = []
    for line in text.splitlines():
        if not line.startswith("  "):
            current = blocks.setdefault(line.split()[2], [])
        current.append(line)
    return blocks


@pytest.mark.parametrize("secret", ["k" * 32, "whsec_", "whsec_not base64!"])
def test_a_secret_that_is_not_one_is_refused_before_listening(secret) -> None:
    with pytest.raises(SigningSecretError):
        DebugReceiver(None, 204, signing_secret=secret)


def test_receive_with_a_bad_secret_exits_2() -> None:
    # A subprocess with a time limit: were the secret taken, the receiver would listen until stopped.
    result = subprocess.run([sys.executable, "-m", "eventrelay", "receive", "--port", "0", "--secret", "whsec_!"],
                            capture_output=True, text=True, timeout=30, cwd=REPO)
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == "eventrelay: --secret is not whsec_ followed by base64: copy the integration's " \
                            "signing_secret whole\n"
