"""GET /openapi.json stays true: the document is valid OpenAPI 3.1, names every route of the daemon with its
methods (and nothing else), and Schemathesis finds every answer of a live daemon as the document says it:
no 5xx, every status code documented, the documented content type, bodies and headers that match their
schemas, and the token really required where the document says so."""

from __future__ import annotations

import http.server
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import requests
import schemathesis
from openapi_spec_validator import OpenAPIV31SpecValidator
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    ignored_auth,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from eventrelay import __version__
from eventrelay import config as config_module
from eventrelay.config_yaml import load_yaml

from .conftest import REPO, DaemonProcess, free_port, webhook, write_config

DOCUMENT = REPO / "daemon" / "eventrelay" / "admin" / "openapi.yaml"
TOKEN = "openapi-test-token-PSYQ"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
# Not in the document: the console's pages, its assets and the icon browsers ask for (HTML and files for a
# browser, not an API).
UNDOCUMENTED = ("/ui", "/favicon.ico")
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          response_headers_conformance, ignored_auth]
FUZZ_EXAMPLES = 12  # generated requests per operation, besides the document's examples and the coverage cases


def document() -> dict[str, Any]:
    # Read as the configuration is: YAML that would silently keep the last of two equal keys is refused.
    return load_yaml(DOCUMENT.read_text("utf-8"), str(DOCUMENT))


def schema_of(name: str) -> jsonschema.Draft202012Validator:
    """A validator for one of the document's component schemas, its $refs resolved in the document."""
    return jsonschema.Draft202012Validator({"$ref": f"#/components/schemas/{name}", **document()},
                                           format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)


# -- the document on its own --------------------------------------------------------------------------------


def test_document_is_valid_openapi_31() -> None:
    doc = document()
    assert doc["openapi"].startswith("3.1.")
    OpenAPIV31SpecValidator(doc).validate()  # raises, saying where, when it is not


def test_integration_schema_fits_every_target(tmp_path: Path) -> None:
    """`configuration` of each integration type as the daemon shows it, secrets masked (the live daemon below
    has webhooks only: SQS and STOMP would need their services for nothing)."""
    path = write_config(tmp_path, [
        webhook("hook", "http://127.0.0.1:9/hook", configuration={
            "url": "http://user:pa55word@127.0.0.1:9/hook?token=abcdefghij", "secret_key": "s3cret-PSYQ",
            "signing_secret": ["whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD"]}),
        webhook("plain", "http://127.0.0.1:9/plain", description="no secrets", enabled=False),
        {"name": "queue", "integration_type": "aws_sqs", "observes": ["order.*"],
         "configuration": {"url": "http://127.0.0.1:9/000000000000/q", "region": "eu-west-1",
                           "aws_access_key_id": "AKIAEXAMPLE", "aws_secret_access_key": "secret-key-PSYQ",
                           "endpoint_url": "http://127.0.0.1:9"}},
        {"name": "broker", "integration_type": "stomp", "observes": ["*"],
         "configuration": {"addresses": ["stomp://127.0.0.1:9", "stomp+ssl://127.0.0.1:10"],
                           "destination": "/queue/q", "username": "u", "password": "pass-PSYQ"}},
    ])
    validator = schema_of("Integration")
    for integration in config_module.load(path).integrations:
        shown = integration.public()
        validator.validate(shown)
        assert "PSYQ" not in json.dumps(shown).replace("****PSYQ", "")  # masked, as the document says


# -- a live daemon: a subprocess with a token, a webhook to a real receiver ---------------------------------


class _Hooks(http.server.BaseHTTPRequestHandler):
    """The webhook receiver: /hook takes everything, /failing answers 503 (failed attempts, an open circuit)."""

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.send_response(204 if self.path == "/hook" else 503)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@dataclass
class Live:
    url: str
    http: requests.Session  # ignores proxies from the environment: 127.0.0.1 only


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    receiver = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hooks)
    thread = threading.Thread(target=receiver.serve_forever, name="openapi-test-receiver", daemon=True)
    thread.start()
    hooks = f"http://127.0.0.1:{receiver.server_address[1]}"
    tmp = tmp_path_factory.mktemp("openapi")
    port = free_port()
    path = write_config(tmp, [
        webhook("orders", f"{hooks}/hook", ["order.*"], configuration={
            "url": f"{hooks}/hook", "secret_key": "s3cret-PSYQ",
            "signing_secret": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"}),
        webhook("refunds", f"{hooks}/failing", ["order.refunded"], description="always failing",
                delivery={"retry": {"initial": "1s", "max_interval": "5s", "max_age": "1h"},
                          "breaker": {"failures": 2, "cooldown": "1h", "max_cooldown": "1h"}}),
        webhook("archive", f"{hooks}/hook", ["*"], enabled=False),
    ], listen={"http": f"127.0.0.1:{port}", "token": TOKEN})
    daemon = DaemonProcess(path, port, tmp / "daemon.log")
    with pytest.MonkeyPatch.context() as env:
        # The daemon records itself here, not in the host's /run/eventrelay (tests/conftest.py _runtime_dir).
        env.setenv("EVENTRELAY_RUNTIME_DIR", str(tmp_path_factory.mktemp("run")))
        daemon.start()
    session = requests.Session()
    session.trust_env = False
    live = Live(daemon.url, session)
    try:
        _seed(live)
        yield live
    finally:
        session.close()
        daemon.stop()
        receiver.shutdown()
        receiver.server_close()


def _seed(live: Live) -> None:
    """Events whose jobs deliver (orders) and fail (refunds), so that the lists, logs, status figures and
    the event the document's examples name (evt-1001, job 1) hold something."""
    events = [{"id": "evt-1001", "type": "order.paid", "data": {"type": "order", "id": "ord-1"}},
              {"id": "evt-1002", "type": "order.refunded", "data": {"type": "order", "id": "ord-1"},
               "included": {"items": [{"sku": "A-1", "quantity": 1}]}},
              {"type": "order.fulfilled", "data": {"type": "order", "id": "ord-2"}}]
    answer = live.http.post(f"{live.url}/v1/events", json=events, headers=AUTH, timeout=10)
    assert answer.status_code == 202, answer.text
    deadline = time.monotonic() + 10
    while True:
        logs = live.http.get(f"{live.url}/v1/logs", headers=AUTH, timeout=10).json()["data"]
        if {e["relationships"]["integration"]["data"]["id"] for e in logs} == {"orders", "refunds"}:
            return
        assert time.monotonic() < deadline, f"the seeded events were not attempted within 10 s: {logs}"
        time.sleep(0.05)


def test_document_is_served_without_token(live: Live) -> None:
    answer = live.http.get(f"{live.url}/openapi.json", timeout=10)
    assert answer.status_code == 200
    assert answer.headers["Content-Type"].startswith("application/json")
    served = answer.json()
    assert served["info"]["version"] == __version__
    assert served == {**document(), "info": {**document()["info"], "version": __version__}}


async def test_every_route_is_documented(start_daemon) -> None:
    """The daemon's own router against the document's paths, both ways: a new route without its description
    fails here, and so does a described path the daemon does not serve."""
    d = await start_daemon([webhook("orders", "http://127.0.0.1:9/hook")])
    app = d.service._http_runner.app  # the application the listener serves
    served: dict[str, set[str]] = {}
    for resource in app.router.resources():
        path = resource.canonical
        if path.startswith(UNDOCUMENTED):
            continue
        # aiohttp adds a HEAD route beside each GET; the document's GET stands for both.
        served.setdefault(path, set()).update(r.method for r in resource if r.method != "HEAD")
    methods = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}
    documented = {path: {m.upper() for m in item if m in methods} for path, item in document()["paths"].items()}
    assert served == documented


@pytest.mark.parametrize(("path", "status"), [
    # Digits that str.isdigit takes and int() refuses, and numbers past a database integer: Schemathesis does
    # not try the first, and tries the second only at the bounds the document gives.
    ("/v1/logs?page[limit]=\u00b2", 400),
    ("/v1/logs?page[offset]=9223372036854775808", 400),
    ("/v1/integrations/orders/jobs?page[offset]=" + "9" * 5000, 400),
    ("/v1/attempts?limit=\u00b2", 400),
    ("/v1/attempts?before=9223372036854775808", 400),
    ("/v1/jobs?before=99999999999999999999999", 400),
    ("/v1/integrations/orders/chart?hours=\u00b2", 400),
    ("/v1/integrations/orders/jobs/9223372036854775808/logs", 404),
    ("/v1/tail?after=9223372036854775808", 400),
    # Unix seconds in a query, as the document and the README say they may be given.
    ("/v1/jobs?since=1700000000&until=4102444800.5", 200),
])
def test_numbers_are_read_as_documented(live: Live, path: str, status: int) -> None:
    answer = live.http.get(f"{live.url}{path}", headers=AUTH, timeout=10)
    assert answer.status_code == status, answer.text
    if status != 200:
        schema_of("Error").validate(answer.json())


def test_numbers_past_a_database_integer_are_refused_in_posts(live: Live) -> None:
    for path, body, status in [("/v1/integrations/orders/jobs/9223372036854775808/retry", None, 404),
                               ("/v1/integrations/orders/replay", {"state": "dead", "limit": 2**63}, 400)]:
        answer = live.http.post(f"{live.url}{path}", json=body, headers=AUTH, timeout=10)
        assert answer.status_code == status, answer.text
        schema_of("Error").validate(answer.json())


def test_console_session_and_origin_rules_are_as_documented(live: Live) -> None:
    """The document's other security scheme (the console's session cookie, with X-CSRF-Token on state
    changes) and the cross-origin refusal, which Schemathesis does not try."""
    reload = f"{live.url}/v1/reload"
    foreign = live.http.post(reload, headers={**AUTH, "Origin": "http://elsewhere.example"}, timeout=10)
    assert foreign.status_code == 403
    schema_of("Error").validate(foreign.json())
    with requests.Session() as browser:  # its own cookie jar: the Schemathesis cases must carry no session
        browser.trust_env = False
        login = browser.post(f"{live.url}/ui/login", data={"token": TOKEN}, allow_redirects=False, timeout=10)
        assert login.status_code == 303 and "eventrelay_session" in browser.cookies
        assert browser.get(f"{live.url}/v1/status", timeout=10).status_code == 200
        no_csrf = browser.post(reload, timeout=10)
        assert no_csrf.status_code == 403
        schema_of("Error").validate(no_csrf.json())
        csrf = browser.get(f"{live.url}/ui/session", timeout=10).json()["data"]["csrf"]
        assert browser.post(reload, headers={"X-CSRF-Token": csrf}, timeout=10).status_code == 200


def test_tail_streams_documented_lines(live: Live) -> None:
    """/v1/tail is a stream that ends only with the daemon, so Schemathesis leaves it alone (a request of its
    would wait for its whole timeout): read its first attempt here and check it against the document."""
    assert live.http.get(f"{live.url}/v1/tail", timeout=10).status_code == 401
    refused = live.http.get(f"{live.url}/v1/tail?after=x", headers=AUTH, timeout=10)
    assert refused.status_code == 400
    schema_of("Error").validate(refused.json())
    with live.http.get(f"{live.url}/v1/tail?after=0", headers=AUTH, stream=True, timeout=10) as stream:
        assert stream.status_code == 200
        assert stream.headers["Content-Type"] == "text/event-stream"
        fields: dict[str, str] = {}
        for line in stream.iter_lines(decode_unicode=True):
            if not line:
                break
            name, _, value = line.partition(": ")
            fields[name] = value
    assert fields["event"] == "attempt"
    line = json.loads(fields["data"])
    schema_of("TailLine").validate(line)
    assert line["id"] == fields["id"]


# -- Schemathesis ------------------------------------------------------------------------------------------
#
# Cases are made from the file at collection (schemathesis.pytest.from_fixture, which would take them from the
# live daemon's /openapi.json, fails on pytest 9: it sets Function._nodeid, which pytest 9 no longer has);
# test_document_is_served_without_token checks that the daemon serves that same document.

SCHEMA = schemathesis.openapi.from_path(DOCUMENT, config=schemathesis.Config.from_dict({
    "request-timeout": 10,
    "generation": {"max-examples": FUZZ_EXAMPLES, "deterministic": True, "database": "none",
                   # Each case carries the token (below); a made-up session cookie or CSRF token would only be
                   # refused, which ignored_auth tries on its own.
                   "with-security-parameters": False},
    "phases": {"stateful": {"enabled": False}},
})).exclude(path="/v1/tail")  # a stream that ends only with the daemon: test_tail_streams_documented_lines


@SCHEMA.parametrize()
def test_daemon_answers_as_documented(case: schemathesis.Case, live: Live) -> None:
    # The token as the caller's own header: ignored_auth then sends the request without it, and with a wrong
    # credential, and expects a refusal.
    case.call_and_validate(base_url=live.url, session=live.http, headers=AUTH, checks=CHECKS)
