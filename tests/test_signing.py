"""Standard Webhooks signing, checked as a receiver checks it: with the official `standardwebhooks` library.

Every request here comes from the real daemon (`start_daemon`) to a real aiohttp receiver; nothing is
signed by the test itself, so these tests fail if the daemon's signatures stop verifying anywhere else.
"""

from __future__ import annotations

import base64
import json
import os
import time

import pytest
from aiohttp import web
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from eventrelay import config as cfg

from .conftest import Receiver, wait_for, wait_until, webhook

FAST_RETRY = {"retry": {"initial": "50ms", "max_interval": "100ms", "max_age": "1h"}}
# Two shapes of secret a provider hands out: 24 bytes (base64 without padding) and 32 bytes (padded).
OLD = "whsec_" + base64.b64encode(os.urandom(24)).decode()
NEW = "whsec_" + base64.b64encode(os.urandom(32)).decode()
WRONG = "whsec_" + base64.b64encode(os.urandom(24)).decode()
EVENT = {"id": "evt-sig-1", "type": "order.paid", "data": {"type": "order", "id": "o1", "note": "crème brûlée"}}


def signed(url: str, secret: str | list[str], name: str = "erp", **extra) -> dict:
    return webhook(name, url, ["order.*"], configuration={"url": url, "signing_secret": secret}, **extra)


def webhook_headers(r) -> dict[str, str]:
    return {k.lower(): v for k, v in r.headers.items() if k.lower().startswith("webhook-")}


async def states(d) -> dict[str, str]:
    """job id -> its state."""
    return {str(job.id): job.state.value for job in await d.jobs()}


async def one_request(d, receiver: Receiver, event: dict = EVENT):
    assert (await d.post(event))[0] == 202
    await wait_until(lambda: receiver.requests)
    (got,) = receiver.requests
    return got


async def test_a_valid_signature_verifies_and_the_headers_are_standard(start_daemon, receiver: Receiver) -> None:
    d = await start_daemon([signed(receiver.url, OLD)])
    got = await one_request(d, receiver)
    # The receiver's view: raw body bytes + headers in, the parsed envelope out.
    assert Webhook(OLD).verify(got.body, got.headers) == got.json
    h = webhook_headers(got)
    assert set(h) == {"webhook-id", "webhook-timestamp", "webhook-signature"}
    assert h["webhook-id"] == got.json["id"] == EVENT["id"]
    assert h["webhook-timestamp"].isdigit()  # unix seconds, no fraction
    (sig,) = h["webhook-signature"].split(" ")
    assert sig.startswith("v1,") and len(base64.b64decode(sig[3:], validate=True)) == 32  # HMAC-SHA256


async def test_timestamp_is_now_within_the_five_minute_tolerance(start_daemon, receiver: Receiver) -> None:
    d = await start_daemon([signed(receiver.url, OLD)])
    got = await one_request(d, receiver)
    sent = int(got.headers["webhook-timestamp"])
    assert abs(sent - time.time()) <= 300
    assert abs(sent - got.at) <= 2  # and in fact the time of sending, not of acceptance or of the first attempt


async def test_rotation_signs_with_every_secret(start_daemon, receiver: Receiver) -> None:
    d = await start_daemon([signed(receiver.url, [OLD, NEW])])
    got = await one_request(d, receiver)
    signatures = got.headers["webhook-signature"].split(" ")
    assert len(signatures) == 2 and all(s.startswith("v1,") for s in signatures)
    # A receiver that has not switched yet, and one that already has: both accept the same request.
    assert Webhook(OLD).verify(got.body, got.headers) == got.json
    assert Webhook(NEW).verify(got.body, got.headers) == got.json
    with pytest.raises(WebhookVerificationError):
        Webhook(WRONG).verify(got.body, got.headers)


async def test_wrong_secret_and_any_tampering_are_rejected(start_daemon, receiver: Receiver) -> None:
    d = await start_daemon([signed(receiver.url, OLD)])
    got = await one_request(d, receiver)
    Webhook(OLD).verify(got.body, got.headers)
    with pytest.raises(WebhookVerificationError, match="No matching signature"):
        Webhook(WRONG).verify(got.body, got.headers)
    tampered_bodies = [
        got.body.replace(b'"o1"', b'"o2"'),  # another order
        got.body + b" ",  # even insignificant whitespace: the raw bytes are signed, not the JSON value
        json.dumps(got.json).encode(),  # re-serialised: same value, different bytes
    ]
    for body in tampered_bodies:
        assert body != got.body
        with pytest.raises(WebhookVerificationError, match="No matching signature"):
            Webhook(OLD).verify(body, got.headers)
    for header, value in [("webhook-id", "evt-other"), ("webhook-timestamp", str(int(got.headers["webhook-timestamp"]) - 1))]:
        with pytest.raises(WebhookVerificationError):
            Webhook(OLD).verify(got.body, {**got.headers, header: value})
    for missing in ["webhook-id", "webhook-timestamp", "webhook-signature"]:
        with pytest.raises(WebhookVerificationError, match="Missing required headers"):
            Webhook(OLD).verify(got.body, {k: v for k, v in got.headers.items() if k.lower() != missing})


async def test_webhook_id_is_stable_across_retries_and_each_attempt_is_signed_afresh(
        start_daemon, receiver: Receiver) -> None:
    answers = iter([web.Response(status=500, text="database down"), web.Response(status=204)])
    receiver.respond = lambda r: next(answers)
    d = await start_daemon([signed(receiver.url, [OLD, NEW], delivery=FAST_RETRY)])
    await d.post(EVENT)
    await wait_for(lambda: states(d), {"1": "delivered"})
    first, retry = receiver.requests
    assert [r.json["attempt"] for r in (first, retry)] == [1, 2]
    # Same message for the receiver's de-duplication: same webhook-id, equal to the envelope id.
    assert first.headers["webhook-id"] == retry.headers["webhook-id"] == retry.json["id"] == EVENT["id"]
    # The body differs (attempt 2), so the retry carries its own signature, which verifies on its own body...
    assert first.headers["webhook-signature"] != retry.headers["webhook-signature"]
    for secret in (OLD, NEW):
        assert Webhook(secret).verify(retry.body, retry.headers)["attempt"] == 2
        assert Webhook(secret).verify(first.body, first.headers)["attempt"] == 1
        # ...and the first attempt's signature does not cover the retry's body.
        with pytest.raises(WebhookVerificationError):
            Webhook(secret).verify(retry.body, {**retry.headers, "webhook-signature": first.headers["webhook-signature"]})
    assert int(retry.headers["webhook-timestamp"]) >= int(first.headers["webhook-timestamp"])


async def test_each_integration_signs_with_its_own_secret(start_daemon, receiver: Receiver) -> None:
    d = await start_daemon([signed(receiver.url + "/a", OLD, name="a"), signed(receiver.url + "/b", NEW, name="b")])
    await d.post(EVENT)
    await wait_until(lambda: len(receiver.requests) == 2)
    by_path = {r.path: r for r in receiver.requests}
    a, b = by_path["/hook/a"], by_path["/hook/b"]
    Webhook(OLD).verify(a.body, a.headers)
    Webhook(NEW).verify(b.body, b.headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(NEW).verify(a.body, a.headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(OLD).verify(b.body, b.headers)


async def test_no_webhook_headers_without_a_signing_secret(start_daemon, receiver: Receiver) -> None:
    d = await start_daemon([webhook("plain", receiver.url + "/plain", ["order.*"]),
                            webhook("off", receiver.url + "/off", ["order.*"],
                                    configuration={"url": receiver.url + "/off", "signing_secret": None,
                                                   "secret_key": "s3cret-PSYQ"})])
    await d.post(EVENT)
    await wait_until(lambda: len(receiver.requests) == 2)
    for r in receiver.requests:
        assert webhook_headers(r) == {}, r.path
    # The old shared-secret header is independent of signing, and still sent where configured.
    by_path = {r.path: r for r in receiver.requests}
    assert by_path["/hook/off"].headers["X-MOLTIN-SECRET-KEY"] == "s3cret-PSYQ"
    assert "X-MOLTIN-SECRET-KEY" not in by_path["/hook/plain"].headers


async def test_signing_keeps_the_old_secret_header(start_daemon, receiver: Receiver) -> None:
    d = await start_daemon([webhook("erp", receiver.url, ["order.*"],
                                    configuration={"url": receiver.url, "secret_key": "s3cret-PSYQ",
                                                   "signing_secret": OLD})])
    got = await one_request(d, receiver)
    assert got.headers["X-MOLTIN-SECRET-KEY"] == "s3cret-PSYQ"
    Webhook(OLD).verify(got.body, got.headers)


async def test_ids_that_headers_would_mangle_are_refused_at_ingest(start_daemon, receiver: Receiver) -> None:
    # HTTP trims header values and many servers read them as Latin-1: such an id could never be verified.
    d = await start_daemon([signed(receiver.url, OLD)])
    for bad in (" evt-spaced ", "évt-ü-1"):
        status, body = await d.post({**EVENT, "id": bad})
        assert status == 400 and "printable ASCII" in body["errors"][0]["detail"]
    got = await one_request(d, receiver, {**EVENT, "id": "evt with inner spaces"})
    assert got.headers["webhook-id"] == got.json["id"] == "evt with inner spaces"
    Webhook(OLD).verify(got.body, got.headers)


# -- configuration ----------------------------------------------------------------------------------------

def config_with(signing_secret) -> str:
    return json.dumps({"integrations": [{
        "name": "erp", "integration_type": "webhook", "observes": ["order.paid"],
        "configuration": {"url": "https://erp.example.com/hook", "signing_secret": signing_secret}}]})


def errors_of(signing_secret) -> list[str]:
    with pytest.raises(cfg.ConfigError) as info:
        cfg.parse(config_with(signing_secret), environ={})
    return info.value.errors


def test_a_secret_or_a_list_of_secrets_is_read() -> None:
    (one,) = cfg.parse(config_with(OLD), environ={}).integrations
    assert one.configuration.signing_secrets == (OLD,)
    (two,) = cfg.parse(config_with([OLD, NEW]), environ={}).integrations
    assert two.configuration.signing_secrets == (OLD, NEW)
    (off,) = cfg.parse(config_with(None), environ={}).integrations
    assert off.configuration.signing_secrets == ()


@pytest.mark.parametrize("bad", ["nope", "whsec_!!!", "whsec_", "whsec_c2hvcnQ=", 42, [OLD, "nope"], {"k": OLD}])
def test_a_bad_secret_is_a_clear_error_at_its_path(bad) -> None:
    (error,) = errors_of(bad)
    assert error.startswith("integrations[0].configuration.signing_secret: ")
    assert "whsec_ followed by" in error and "base64" in error
    assert OLD not in error  # a good secret next to a bad one is not echoed into logs


def test_the_yaml_errors_named_in_the_docs() -> None:
    with pytest.raises(cfg.ConfigError) as info:
        cfg.parse("""
integrations:
  - name: erp
    integration_type: webhook
    observes: [order.paid]
    configuration: {url: "https://erp.example.com/hook", signing_secret: nope}
  - name: crm
    integration_type: webhook
    observes: [order.paid]
    configuration: {url: "https://crm.example.com/hook", signing_secret: whsec_!!!}
""", environ={})
    assert info.value.errors == [
        "integrations[0].configuration.signing_secret: must be a Standard Webhooks secret, whsec_ followed by "
        "base64 (or a list of them)",
        "integrations[1].configuration.signing_secret: must be whsec_ followed by the base64 of at least 16 "
        "random bytes",
    ]


def test_secrets_are_masked_in_public() -> None:
    (integration,) = cfg.parse(config_with([OLD, NEW]), environ={}).integrations
    public = integration.public()
    shown = json.dumps(public)
    for secret in (OLD, NEW):
        assert secret not in shown and secret[6:] not in shown and secret[6:-4] not in shown
    conf = public["configuration"]
    masked = conf.get("signing_secret", conf.get("signing_secrets"))
    assert masked == [cfg.mask(OLD), cfg.mask(NEW)] == ["****" + OLD[-4:], "****" + NEW[-4:]]
    json.dumps(public)  # still plain JSON for the admin API
