"""What webhook receivers that check their callers get: static headers, Basic and Bearer auth, a private CA and
mutual TLS, each against a real receiver on 127.0.0.1 that refuses what it should refuse."""

from __future__ import annotations

import base64
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from eventrelay import config as cfg

from .conftest import wait_for, webhook
from .pki import Authority


@dataclass
class Checking:
    """A receiver that answers 204 when `check(request)` passes, 401 otherwise, and keeps what it saw."""

    url: str = ""
    seen: list[dict[str, Any]] = field(default_factory=list)


async def serve(check: Callable[[web.Request], bool], context: ssl.SSLContext | None = None
                ) -> tuple[Checking, web.AppRunner]:
    got = Checking()

    async def handle(request: web.Request) -> web.Response:
        peer = request.transport.get_extra_info("peercert") if request.transport else None
        got.seen.append({"headers": dict(request.headers), "peer": peer, "body": await request.read()})
        return web.Response(status=204 if check(request) else 401)

    app = web.Application()
    app.router.add_post("/{tail:.*}", handle)
    runner = web.AppRunner(app, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    got.url = f"{'https' if context else 'http'}://127.0.0.1:{runner.addresses[0][1]}/hook"
    return got, runner


@pytest.fixture
async def receivers() -> AsyncIterator[Callable[..., Any]]:
    runners: list[web.AppRunner] = []

    async def make(check: Callable[[web.Request], bool], context: ssl.SSLContext | None = None) -> Checking:
        got, runner = await serve(check, context)
        runners.append(runner)
        return got

    yield make
    for runner in runners:
        await runner.cleanup()


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


async def test_basic_bearer_and_static_headers_reach_receivers_that_check_them(start_daemon, receivers) -> None:
    by_auth = await receivers(lambda r: r.headers.get("Authorization") == basic("shop", "s3cret:pass"))
    by_url = await receivers(lambda r: r.headers.get("Authorization") == basic("erp", "hunter2-long"))
    by_bearer = await receivers(lambda r: r.headers.get("Authorization") == "Bearer tok-0123456789")
    by_key = await receivers(lambda r: r.headers.get("X-Api-Key") == "key-abcdef123456" and
                             r.headers.get("X-Tenant") == "store-7")
    d = await start_daemon([
        webhook("a", by_auth.url, configuration={"url": by_auth.url, "auth": {
            "basic": {"username": "shop", "password": "s3cret:pass"}}}),
        webhook("b", by_url.url, configuration={"url": by_url.url.replace("://", "://erp:hunter2-long@")}),
        webhook("c", by_bearer.url, configuration={"url": by_bearer.url, "auth": {"bearer": "tok-0123456789"}}),
        webhook("d", by_key.url, configuration={"url": by_key.url, "headers": {
            "X-Api-Key": "key-abcdef123456", "X-Tenant": "store-7"}})])
    await d.post({"id": "o-1", "type": "order.paid", "data": {}})
    await wait_for(d.states, {"delivered": 4}, timeout=10)
    # Shown masked, never whole.
    shown = (await (await d.http.get(d.url + "/v1/integrations")).json())["data"]
    text = str(shown)
    for secret in ("s3cret:pass", "hunter2-long", "tok-0123456789", "key-abcdef123456"):
        assert secret not in text, secret
    a, b, c, dd = (i["configuration"] for i in shown)
    assert a["auth"] == {"basic": {"username": "shop", "password": "****pass"}}
    assert b["url"].startswith("http://erp:****long@") and b["auth"] is None
    assert c["auth"] == {"bearer": "****6789"}
    assert dd["headers"] == {"X-Api-Key": "****3456", "X-Tenant": "store-7"}


async def test_a_receiver_refusing_the_credentials_fails_the_attempt_with_its_answer(start_daemon,
                                                                                    receivers) -> None:
    strict = await receivers(lambda r: r.headers.get("Authorization") == "Bearer right")
    d = await start_daemon([webhook("a", strict.url, configuration={"url": strict.url, "auth": {"bearer": "wrong"}},
                                    delivery={"retry": {"max_attempts": 1}})])
    await d.post({"id": "o-2", "type": "order.paid", "data": {}})
    await wait_for(d.states, {"dead": 1}, timeout=10)
    (log,) = await d.store.attempts((await d.jobs("a"))[0].id)
    assert log.status_code == 401


def test_headers_and_auth_errors_name_their_path(tmp_path: Path) -> None:
    def errors(configuration: dict[str, Any]) -> list[str]:
        import yaml
        text = yaml.safe_dump({"integrations": [{"name": "a", "integration_type": "webhook", "observes": ["order.paid"],
                                                 "configuration": configuration}]})
        with pytest.raises(cfg.ConfigError) as info:
            cfg.parse(text, source=tmp_path / "c.yaml", environ={})
        return info.value.errors

    url = "https://127.0.0.1:9/h"
    assert errors({"url": url, "headers": {"Content-Type": "text/plain", "webhook-signature": "x"}}) == [
        "integrations[0].configuration.headers.Content-Type: is set by eventrelay itself and cannot be replaced",
        "integrations[0].configuration.headers.webhook-signature: is set by eventrelay itself and cannot be replaced"]
    assert errors({"url": url, "auth": {"bearer": "t"}, "headers": {"Authorization": "x"}}) == [
        "integrations[0].configuration.headers.Authorization: auth sets Authorization already: keep one of them"]
    assert errors({"url": "https://u:p@127.0.0.1/h", "auth": {"bearer": "t"}}) == [
        "integrations[0].configuration.url: has a user and password, and auth is set too: keep one of them"]
    assert errors({"url": url, "auth": {"basic": {"password": "p"}}}) == [
        "integrations[0].configuration.auth.basic.username: required, without a colon"]
    assert errors({"url": url, "auth": {"basic": {"username": "u"}, "bearer": "t"}}) == [
        "integrations[0].configuration.auth: set one of basic: {username, password} or bearer: TOKEN"]
    ca = Authority(tmp_path / "pki")
    assert errors({"url": "http://127.0.0.1/h", "tls": {"ca_file": str(ca.ca_file)}}) == [
        "integrations[0].configuration.tls: applies to https:// URLs only"]
    assert errors({"url": url, "tls": {"cert_file": str(tmp_path / "nope.pem")}})[0].startswith(
        "integrations[0].configuration.tls.cert_file:")
    assert "cannot be used" in errors({"url": url, "tls": {"ca_file": __file__}})[0]  # not a certificate
    one, other = ca.issue("one", server=False), ca.issue("other", server=False)
    assert "cannot be used" in errors({"url": url, "tls": {"cert_file": str(one.cert_file),
                                                           "key_file": str(other.key_file)}})[0]


async def test_a_private_ca_and_a_client_certificate_for_a_receiver_that_requires_one(start_daemon, receivers,
                                                                                     tmp_path: Path) -> None:
    server_ca, client_ca, stranger_ca = (Authority(tmp_path / n, n) for n in ("server-ca", "client-ca", "stranger"))
    shop, impostor = client_ca.issue("shop-relay", server=False), stranger_ca.issue("impostor", server=False)
    mtls = await receivers(lambda r: True, server_ca.server_context(client_ca=client_ca.ca_file))
    never = {"retry": {"max_attempts": 1}, "breaker": {"failures": 100, "window": 100}}
    d = await start_daemon([
        webhook("trusted", mtls.url, configuration={"url": mtls.url, "tls": {
            "ca_file": str(server_ca.ca_file), "cert_file": str(shop.cert_file), "key_file": str(shop.key_file)}}),
        webhook("no-client-cert", mtls.url, configuration={"url": mtls.url, "tls": {"ca_file": str(server_ca.ca_file)}},
                delivery=never),
        webhook("wrong-client-cert", mtls.url, configuration={"url": mtls.url, "tls": {
            "ca_file": str(server_ca.ca_file), "cert_file": str(impostor.cert_file),
            "key_file": str(impostor.key_file)}}, delivery=never),
        webhook("untrusted-server", mtls.url, delivery=never)])
    await d.post({"id": "o-3", "type": "order.paid", "data": {}})
    await wait_for(d.states, {"delivered": 1, "dead": 3}, timeout=15)
    assert [dict(x[0] for x in s["peer"]["subject"])["commonName"] for s in mtls.seen] == ["shop-relay"]

    async def error_of(name: str) -> str:
        (job,) = await d.jobs(name)
        (attempt,) = await d.store.attempts(job.id)
        return attempt.error_detail or ""

    assert "if the receiver requires a client certificate, set configuration.tls.cert_file" in await error_of(
        "no-client-cert")
    assert "may not trust the client certificate" in await error_of("wrong-client-cert")
    error = await error_of("untrusted-server")
    assert "not trusted" in error and "tls.ca_file" in error
    shown = (await (await d.http.get(d.url + "/v1/integrations/trusted")).json())["data"]["configuration"]
    assert shown["tls"] == {"ca_file": str(server_ca.ca_file), "cert_file": str(shop.cert_file),
                            "key_file": str(shop.key_file)}
