"""Least privilege and transport security: scoped tokens on every route, protected by default beyond
loopback, rotation by reload without a refused request, and HTTPS with a private CA and client certificates."""

from __future__ import annotations

import asyncio
import ssl
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from .conftest import REPO, Receiver, free_port, webhook, write_config
from .pki import Authority

SHOP = "shop-token-0123456789abcdef"
OPS = "ops-token-fedcba9876543210"
OPEN_PATHS = {"/healthz", "/readyz", "/openapi.json", "/favicon.ico"}


def routes(d) -> list[tuple[str, str]]:
    """Every (method, path) the daemon serves but the console's pages, with sample values in the placeholders."""
    found = []
    for route in d.service._http_runner.app.router.routes():  # noqa: SLF001 - the routes as registered
        info = route.resource.get_info() if route.resource else {}
        path = info.get("path") or info.get("formatter")
        if route.method == "HEAD" or path is None or path.startswith("/ui"):
            continue
        found.append((route.method, path.replace("{name}", "erp").replace("{job}", "1").replace("{id}", "e1")))
    return sorted(set(found))


async def call(d, method: str, path: str, token: str | None) -> aiohttp.ClientResponse:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with d.http.request(method, d.url + path, headers=headers, json={} if method == "POST" else None,
                              timeout=aiohttp.ClientTimeout(total=10)) as r:
        await r.read() if path != "/v1/tail" else None
        return r


async def test_each_scope_reaches_what_it_may_and_nothing_else(start_daemon, receiver: Receiver) -> None:
    d = await start_daemon([webhook("erp", receiver.url)],
                           auth={"ingest_tokens": [SHOP], "admin_tokens": [OPS]})
    every = routes(d)
    assert ("POST", "/v1/events") in every and ("POST", "/v1/integrations/erp/pause") in every and len(every) > 20
    for method, path in every:
        if path in OPEN_PATHS:
            assert (await call(d, method, path, None)).status == 200, path
            continue
        assert (await call(d, method, path, None)).status == 401, (method, path)
        assert (await call(d, method, path, "wrong-token-0123456789")).status == 401, (method, path)
        if path == "/v1/events":
            continue
        answer = await call(d, method, path, SHOP)
        assert answer.status == 403, (method, path)
    async with d.http.post(d.url + "/v1/integrations/erp/pause", headers={"Authorization": f"Bearer {SHOP}"}) as r:
        assert "admin token" in (await r.json())["errors"][0]["detail"]
    # The producer's token sends events; the operator's does everything.
    async with d.http.post(d.url + "/v1/events", json={"type": "order.paid", "data": {}},
                           headers={"Authorization": f"Bearer {SHOP}"}) as r:
        assert r.status == 202
    async with d.http.post(d.url + "/v1/events", json={"type": "order.paid", "data": {}},
                           headers={"Authorization": f"Bearer {OPS}"}) as r:
        assert r.status == 202
    async with d.http.get(d.url + "/v1/status", headers={"Authorization": f"Bearer {OPS}"}) as r:
        body = await r.json()
        assert body["data"]["access"] == {"ingest_tokens": 1, "admin_tokens": 1, "tls": False}
        assert SHOP not in str(body) and OPS not in str(body)


def check_config(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "eventrelay", "check-config", "--config", str(path)],
                          capture_output=True, text=True, timeout=60, cwd=REPO)


def test_a_listener_beyond_loopback_without_a_token_is_refused_unless_said_on_purpose(tmp_path: Path) -> None:
    port = free_port()
    exposed = write_config(tmp_path, [], listen={"http": f"0.0.0.0:{port}"})
    done = check_config(exposed)
    assert done.returncode == 1 and "0.0.0.0 is reachable beyond this host and no token is set" in done.stderr
    run = subprocess.run([sys.executable, "-m", "eventrelay", "run", "--config", str(exposed)],
                         capture_output=True, text=True, timeout=60, cwd=REPO)
    assert run.returncode == 78 and "auth.allow_unauthenticated" in run.stderr
    for fixed in ({"auth": {"allow_unauthenticated": True}}, {"auth": {"ingest_tokens": [SHOP]}},
                  {"listen": {"token": "an-admin-token"}}):
        raw = yaml.safe_load(exposed.read_text())
        for key, value in fixed.items():
            raw[key] = {**raw.get(key, {}), **value}
        exposed.write_text(yaml.safe_dump(raw))
        assert check_config(exposed).returncode == 0, fixed
        exposed.write_text(yaml.safe_dump({k: v for k, v in raw.items() if k != "auth"} | {
            "listen": {k: v for k, v in raw["listen"].items() if k != "token"}}))


async def test_tokens_rotate_by_reload_without_a_refused_request(start_daemon, receiver: Receiver,
                                                                 tmp_path: Path) -> None:
    old, new = "old-shop-token-0123456789", "new-shop-token-0123456789"
    d = await start_daemon([webhook("erp", receiver.url)], auth={"ingest_tokens": [old], "admin_tokens": [OPS]})
    config = tmp_path / "config.yaml"
    using = {"token": old}
    answers: list[int] = []
    stop = asyncio.Event()

    async def producer() -> None:
        for _ in range(2000):  # bounded; the rotation below takes a fraction of it
            if stop.is_set():
                return
            async with d.http.post(d.url + "/v1/events", json={"type": "order.paid", "data": {}},
                                   headers={"Authorization": f"Bearer {using['token']}"}) as r:
                answers.append(r.status)

    def tokens(*ingest: str) -> None:
        raw = yaml.safe_load(config.read_text())
        raw["auth"]["ingest_tokens"] = list(ingest)
        config.write_text(yaml.safe_dump(raw))

    task = asyncio.create_task(producer())
    await asyncio.sleep(0.2)
    tokens(old, new)  # 1. add the new token beside the old one
    assert (await d.service.reload()).ok
    await asyncio.sleep(0.2)
    using["token"] = new  # 2. producers switch to it
    await asyncio.sleep(0.2)
    tokens(new)  # 3. the old one goes
    assert (await d.service.reload()).ok
    await asyncio.sleep(0.2)
    stop.set()
    await task
    assert len(answers) > 20 and set(answers) == {202}
    async with d.http.post(d.url + "/v1/events", json={"type": "order.paid", "data": {}},
                           headers={"Authorization": f"Bearer {old}"}) as r:
        assert r.status == 401


async def test_https_with_a_private_ca_client_certificates_and_certificates_read_again_on_reload(
        start_daemon, receiver: Receiver, tmp_path: Path) -> None:
    ca, clients = Authority(tmp_path / "ca", "listener CA"), Authority(tmp_path / "clients", "producers CA")
    server = ca.issue("127.0.0.1", server=True)
    shop = clients.issue("shop", server=False)
    d = await start_daemon([webhook("erp", receiver.url)], auth={"ingest_tokens": [SHOP]},
                           listen={"tls": {"cert_file": str(server.cert_file), "key_file": str(server.key_file),
                                           "client_ca_file": str(clients.ca_file)}})
    port = d.service.http_address[1]
    url = f"https://127.0.0.1:{port}/v1/events"

    def client(cert: Any = None) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(ca.ca_file))
        if cert is not None:
            context.load_cert_chain(cert.cert_file, cert.key_file)
        return context

    async def post(context: ssl.SSLContext | None, target: str = url) -> int:
        async with d.http.post(target, json={"type": "order.paid", "data": {}}, ssl=context,
                               headers={"Authorization": f"Bearer {SHOP}"}) as r:
            return r.status

    assert await post(client(shop)) == 202
    with pytest.raises(aiohttp.ClientError):  # no client certificate: the handshake (or the request) fails
        await post(client())
    with pytest.raises(aiohttp.ClientError):  # one the listener's client CA did not sign
        await post(client(Authority(tmp_path / "other", "stranger").issue("x", server=False)))
    with pytest.raises(aiohttp.ClientError):  # plain http on the TLS port
        await post(None, f"http://127.0.0.1:{port}/v1/events")
    async with d.http.get(f"https://127.0.0.1:{port}/v1/status", ssl=client(shop),
                          headers={"Authorization": f"Bearer {SHOP}"}) as r:
        assert r.status == 403  # TLS proves the connection, the token the scope

    # A renewed certificate at the same path is read again by a reload; new connections get it.
    def presented() -> int:
        import socket
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
            with client(shop).wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                return x509_serial(tls.getpeercert(binary_form=True))

    before = await asyncio.to_thread(presented)
    renewed = ca.issue("127.0.0.1", server=True)  # same paths: the CA names files by the common name
    assert renewed.cert_file == server.cert_file
    result = await d.service.reload()
    assert result.ok and "listener certificate read again" in result.changes
    assert await asyncio.to_thread(presented) != before
    assert await post(client(shop)) == 202


def x509_serial(der: bytes) -> int:
    from cryptography import x509
    return x509.load_der_x509_certificate(der).serial_number


async def test_the_cli_reaches_a_tls_listener_with_the_admin_token_of_its_config(start_daemon, receiver: Receiver,
                                                                                 tmp_path: Path) -> None:
    ca = Authority(tmp_path / "ca", "listener CA")
    server = ca.issue("127.0.0.1", server=True)
    d = await start_daemon([webhook("erp", receiver.url)], auth={"admin_tokens": [OPS]},
                           listen={"tls": {"cert_file": str(server.cert_file), "key_file": str(server.key_file)}})
    done = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "eventrelay", "status", "--config",
                                                    str(tmp_path / "config.yaml")],
                                   capture_output=True, text=True, timeout=60, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert "erp" in done.stdout
    assert d.service.http_address is not None


async def test_every_operator_action_is_in_the_audit_log_with_who_did_it(start_daemon, receiver: Receiver) -> None:
    from eventrelay.access import fingerprint

    d = await start_daemon([webhook("erp", receiver.url)], auth={"ingest_tokens": [SHOP], "admin_tokens": [OPS]})
    ops = {"Authorization": f"Bearer {OPS}"}
    async with d.http.post(d.url + "/v1/events", json={"id": "o-1", "type": "order.paid", "data": {}},
                           headers={"Authorization": f"Bearer {SHOP}"}) as r:
        assert r.status == 202
    job = (await d.jobs("erp"))[0].id
    actions = [("pause", "/v1/integrations/erp/pause", None), ("resume", "/v1/integrations/erp/resume", None),
               ("enable", "/v1/integrations/erp/enable", None),
               ("close-circuit", "/v1/integrations/erp/close-circuit", None),
               ("test", "/v1/integrations/erp/test", {}), ("retry", f"/v1/integrations/erp/jobs/{job}/retry", None),
               ("replay", "/v1/integrations/erp/replay", {"state": "dead"}), ("reload", "/v1/reload", None)]
    for _, path, body in actions:
        async with d.http.post(d.url + path, json=body, headers=ops) as r:
            assert r.status in (200, 202, 409), path  # retry of a delivered job is a 409: not done, not logged
    async with d.http.post(d.url + "/v1/integrations/erp/pause", headers={"Authorization": f"Bearer {SHOP}"}) as r:
        assert r.status == 403  # refused: nothing happened, nothing is logged
    async with d.http.get(d.url + "/v1/audit?limit=100", headers=ops) as r:
        entries = (await r.json())["data"]
    done = [a for a, path, _ in actions if not (a == "retry" and (await d.job("o-1", "erp")).state == "delivered")]
    assert [e["action"] for e in entries] == done[::-1]
    pause = entries[-1]
    assert (pause["target"], pause["scope"], pause["token"], pause["address"]) == (
        "erp", "admin", fingerprint(OPS), "127.0.0.1")
    assert OPS not in str(entries) and SHOP not in str(entries)
    replay = next(e for e in entries if e["action"] == "replay")
    assert replay["detail"].startswith('{"state": "dead"}') or '"state":"dead"' in replay["detail"]
    async with d.http.get(d.url + "/v1/audit?limit=2", headers=ops) as r:
        page = await r.json()
    assert [e["action"] for e in page["data"]] == done[::-1][:2] and page["links"]["next"]
    async with d.http.get(d.url + "/v1/audit", headers={"Authorization": f"Bearer {SHOP}"}) as r:
        assert r.status == 403


async def test_plain_http_beyond_loopback_is_warned_about_at_start(start_daemon, receiver: Receiver,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    d = await start_daemon([webhook("erp", receiver.url)], listen={"http": f"0.0.0.0:{free_port()}"},
                           auth={"admin_tokens": [OPS]})
    assert "the HTTP listener takes plain http:// beyond this host" in capsys.readouterr().out
    d.stop.set()
    await d.task
    await start_daemon([webhook("erp", receiver.url)])  # 127.0.0.1: nothing to warn about
    assert "plain http://" not in capsys.readouterr().out


async def test_an_ingest_token_may_send_a_body_announced_with_expect_100_continue(start_daemon,
                                                                                  receiver: Receiver) -> None:
    d = await start_daemon([webhook("erp", receiver.url)], auth={"ingest_tokens": [SHOP], "admin_tokens": [OPS]})
    # curl sends "Expect: 100-continue" above 1 KiB; those requests take the application's route.
    big = {"type": "order.paid", "data": {"note": "x" * 4000}}
    async with d.http.post(d.url + "/v1/events", json=big, expect100=True,
                           headers={"Authorization": f"Bearer {SHOP}"}) as r:
        assert r.status == 202, await r.text()


async def test_a_login_form_larger_than_a_token_is_refused_before_it_is_read(start_daemon,
                                                                            receiver: Receiver) -> None:
    d = await start_daemon([webhook("erp", receiver.url)], auth={"admin_tokens": [OPS]})
    async with d.http.post(d.url + "/ui/login", data={"token": "x" * 100_000}, allow_redirects=False) as r:
        assert r.status == 413


async def test_an_open_listener_answers_only_to_its_own_names(start_daemon, receiver: Receiver) -> None:
    # Without a token, a page whose host name was re-pointed at 127.0.0.1 (DNS rebinding) passes an origin
    # check, so the Host must be one of the listener's.
    d = await start_daemon([webhook("erp", receiver.url)])
    port = d.service.http_address[1]
    for host in (f"127.0.0.1:{port}", f"localhost:{port}"):
        async with d.http.get(d.url + "/v1/status", headers={"Host": host}) as r:
            assert r.status == 200, host
    browser = {"Host": f"evil.example:{port}", "Sec-Fetch-Site": "same-origin"}
    async with d.http.get(d.url + "/v1/events/x", headers=browser) as r:
        assert r.status == 403 and "does not name this listener" in (await r.json())["errors"][0]["detail"]
    # A producer that is not a browser may call the daemon by whatever name its hosts file gives it.
    async with d.http.post(d.url + "/v1/events", json={"type": "order.paid", "data": {}},
                           headers={"Host": f"relay.internal:{port}"}) as r:
        assert r.status == 202
    async with d.http.post(d.url + "/v1/integrations/erp/pause", headers={
            "Host": f"evil.example:{port}", "Origin": f"http://evil.example:{port}"}) as r:
        assert r.status == 403


async def test_a_live_tail_ends_when_its_session_does(start_daemon, receiver: Receiver) -> None:
    d = await start_daemon([webhook("erp", receiver.url)], auth={"admin_tokens": [OPS]})
    jar = aiohttp.DummyCookieJar()
    async with aiohttp.ClientSession(cookie_jar=jar) as http:
        async with http.post(d.url + "/ui/login", data={"token": OPS}, allow_redirects=False) as r:
            cookie = {"Cookie": r.headers["Set-Cookie"].split(";")[0]}
        async with http.get(d.url + "/v1/tail", headers=cookie) as tail:
            assert tail.status == 200
            async with http.post(d.url + "/ui/logout", headers=cookie, allow_redirects=False) as r:
                assert r.status == 303
            async with asyncio.timeout(5):
                await tail.content.read()  # the stream ends: the session did
