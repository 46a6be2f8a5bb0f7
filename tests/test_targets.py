"""The target registry: a new target type is one module and one registry line.

`line` below is such a module, registered for these tests only: a TCP target that writes one line per event
to a real server on 127.0.0.1. The configuration parses, validates and masks it, and the daemon delivers
through it, without either knowing it by name.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import pytest
import yaml

from eventrelay import config as cfg
from eventrelay.config_yaml import Reader, default
from eventrelay.delivery import targets
from eventrelay.delivery.targets import SenderContext, SpanShape, TargetType
from eventrelay.jobs import Job, Outcome
from eventrelay.units import host_port, positive_duration, string

from .conftest import wait_until, webhook

# -- the target type: what a module under delivery/targets/ holds ------------------------------------------


@dataclass(frozen=True, slots=True)
class LineConfig:
    address: tuple[str, int]
    token: str | None = None  # sent first on each connection
    pause: float = 0.0


def parse_line(reader: Reader, raw: Any, path: str) -> LineConfig | None:
    if raw is None:
        reader.error(path, "required for line: at least address")
        return None
    s = reader.section(raw, path, ("address", "token", "pause"))
    address = reader.value(s, "address", path, host_port, None)
    if "address" not in s:
        reader.error(f"{path}.address", "required")
    token = reader.value(s, "token", path, string, None, nullable=True)
    pause = reader.value(s, "pause", path, positive_duration, default(LineConfig, "pause"))
    return LineConfig(address, token, pause) if address else None


class LineSender:
    max_batch = 1

    def __init__(self, integration: cfg.Integration, context: SenderContext):
        self._conf: LineConfig = integration.configuration
        self._source = context.event_source
        self._streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def start(self) -> None:
        reader, writer = await asyncio.open_connection(*self._conf.address)
        writer.write(f"token {self._conf.token}\n".encode())
        self._streams = reader, writer

    async def deliver(self, jobs: Sequence[Job]) -> list[Outcome]:
        assert self._streams is not None
        reader, writer = self._streams
        outcomes = []
        for job in jobs:
            writer.write(f"{job.event_id} {job.event_type} {self._source}\n".encode())
            answer = await asyncio.wait_for(reader.readline(), 5)
            outcomes.append(Outcome(job.id, answer == b"ok\n", 0.0, error=None if answer == b"ok\n" else "refused"))
        return outcomes

    async def close(self) -> None:
        if self._streams is not None:
            self._streams[1].close()


def line_spans(integration: cfg.Integration) -> SpanShape:
    address = integration.configuration.address
    return SpanShape("send line", "producer", {"messaging.system": "line", "server.address": address[0]})


LINE = TargetType(name="line", config_class=LineConfig, parse=parse_line, sender=LineSender, span_shape=line_spans,
                  secret_fields=("token",), uses_event_source=True)


@pytest.fixture
def line_type(monkeypatch: pytest.MonkeyPatch) -> TargetType:
    """`line` registered for one test (the registry line a real module would add, undone afterwards)."""
    monkeypatch.setitem(targets.REGISTRY, LINE.name, LINE)
    return LINE


@dataclass
class LineServer:
    address: str = ""
    lines: list[str] = field(default_factory=list)


@pytest.fixture
async def line_server() -> AsyncIterator[LineServer]:
    """A real TCP server on 127.0.0.1 that records each line and answers `ok`."""
    got = LineServer()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for _ in range(1000):  # bounded: a test sends a handful
            line = await reader.readline()
            if not line:
                break
            got.lines.append(line.decode().rstrip("\n"))
            if not line.startswith(b"token "):
                writer.write(b"ok\n")
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    got.address = f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
    yield got
    server.close()
    await server.wait_closed()


def line_integration(name: str, address: str, **conf: Any) -> dict[str, Any]:
    return {"name": name, "integration_type": "line", "observes": ["order.*"],
            "configuration": {"address": address, **conf}}


def errors_of(text: str) -> list[str]:
    with pytest.raises(cfg.ConfigError) as e:
        cfg.parse(text, environ={})
    return e.value.errors


# -- the configuration asks the registry ---------------------------------------------------------------------

def test_a_registered_type_is_parsed_with_its_defaults_and_masked(line_type: TargetType) -> None:
    text = yaml.safe_dump({"integrations": [line_integration("ledger", "127.0.0.1:7000", token="t0ken-PSYQ")]})
    (integration,) = cfg.parse(text, environ={}).integrations
    assert integration.configuration == LineConfig(("127.0.0.1", 7000), "t0ken-PSYQ", 0.0)
    shown = integration.public()
    assert shown["configuration"] == {"address": ["127.0.0.1", "7000"], "token": "****PSYQ", "pause": 0.0}
    assert "t0ken" not in json.dumps(shown)


def test_a_registered_types_errors_carry_their_paths(line_type: TargetType) -> None:
    text = yaml.safe_dump({"integrations": [
        line_integration("a", "nowhere", tokn="x"),
        {"name": "b", "integration_type": "line", "observes": ["order.paid"]},
    ]})
    assert errors_of(text) == [
        "integrations[0].configuration.tokn: unknown key (did you mean 'token'?)",
        "integrations[0].configuration.address: 'nowhere' is not host:port (e.g. 127.0.0.1:8787 or [::1]:8787)",
        "integrations[1].configuration: required for line: at least address",
    ]


def test_integration_type_is_checked_against_the_registry(line_type: TargetType) -> None:
    text = yaml.safe_dump({"integrations": [line_integration("a", "127.0.0.1:1") | {"integration_type": "lines"}]})
    assert errors_of(text) == ["integrations[0].integration_type: 'lines' is not one of webhook, aws_sqs, stomp, line"]


def test_without_its_registry_line_a_type_is_unknown() -> None:
    text = yaml.safe_dump({"integrations": [line_integration("a", "127.0.0.1:1")]})
    assert errors_of(text) == ["integrations[0].integration_type: 'line' is not one of webhook, aws_sqs, stomp"]


# -- the registry itself -------------------------------------------------------------------------------------

def test_the_registry_holds_the_three_types_each_consistent_with_its_dataclass() -> None:
    assert targets.names() == ("webhook", "aws_sqs", "stomp")
    for target in targets.REGISTRY.values():
        declared = {f.name for f in fields(target.config_class)}
        named = set(target.secret_fields) | set(target.url_fields) | set(target.shown_as)
        assert named <= declared, f"{target.name}: {named - declared} are not fields of {target.config_class}"
    assert [t.name for t in targets.REGISTRY.values() if t.uses_event_source] == ["aws_sqs", "stomp"]


def test_a_name_is_registered_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(targets, "REGISTRY", dict(targets.REGISTRY))
    with pytest.raises(ValueError, match="'webhook' is registered already"):
        targets.register(targets.get("webhook"))


def test_every_secret_of_the_three_types_is_masked() -> None:
    text = yaml.safe_dump({"integrations": [
        webhook("w", "https://user:hook-password@erp.example/h?token=hook-token-1",
                configuration={"url": "https://user:hook-password@erp.example/h?token=hook-token-1",
                               "secret_key": "secret-key-1",
                               "signing_secret": "whsec_" + "QUJDREVGR0hJSktMTU5PUFFSU1RVVldY"}),
        {"name": "q", "integration_type": "aws_sqs", "observes": ["order.paid"],
         "configuration": {"url": "https://sqs.eu-west-1.amazonaws.com/1/q", "aws_access_key_id": "AKIA",
                           "aws_secret_access_key": "aws-secret-1",
                           "endpoint_url": "http://u:endpoint-password@127.0.0.1:1/"}},
        {"name": "s", "integration_type": "stomp", "observes": ["order.paid"],
         "configuration": {"addresses": ["stomp://127.0.0.1:61613"], "destination": "/queue/q",
                           "password": "broker-password-1"}},
    ]})
    shown = json.dumps([i.public() for i in cfg.parse(text, environ={}).integrations])
    for secret in ("hook-password", "hook-token-1", "secret-key-1", "QUJDREVGR0hJSktMTU5PUFFS", "aws-secret-1",
                   "endpoint-password", "broker-password-1"):
        assert secret not in shown


# -- the service asks the registry ---------------------------------------------------------------------------

async def test_the_daemon_delivers_through_a_registered_type(line_type, line_server, start_daemon) -> None:
    d = await start_daemon([line_integration("ledger", line_server.address, token="t0ken-PSYQ")],
                           event_source="eventrelay://shop-1")
    status, _ = await d.post({"id": "e1", "type": "order.paid", "data": {"type": "order", "id": "o1"}})
    assert status in (200, 201, 202)
    await wait_until(lambda: "e1 order.paid eventrelay://shop-1" in line_server.lines)
    assert line_server.lines[0] == "token t0ken-PSYQ"


async def test_a_new_event_source_restarts_the_types_that_use_it_and_no_other(
        line_type, line_server, receiver, start_daemon, tmp_path: Path) -> None:
    integrations = [line_integration("ledger", line_server.address), webhook("erp", receiver.url)]
    d = await start_daemon(integrations, event_source="eventrelay://shop-1")
    webhook_dispatcher = d.service.dispatchers["erp"]
    config = tmp_path / "config.yaml"
    raw = yaml.safe_load(config.read_text())
    config.write_text(yaml.safe_dump({**raw, "event_source": "eventrelay://shop-2"}))
    result = await d.service.reload()
    assert result.ok and result.changes == ("changed ledger",), result
    assert d.service.dispatchers["erp"] is webhook_dispatcher  # a webhook body has no event_source
    await d.post({"id": "e2", "type": "order.paid", "data": {"type": "order", "id": "o2"}})
    await wait_until(lambda: "e2 order.paid eventrelay://shop-2" in line_server.lines)
    await wait_until(lambda: "e2" in receiver.ids())


# -- heavy client libraries load with their sender, not with the daemon ---------------------------------------

def test_queue_client_libraries_load_only_when_their_sender_is_made(tmp_path: Path) -> None:
    script = textwrap.dedent("""
        import asyncio, sys
        from eventrelay import cli, config, service
        from eventrelay.delivery import targets

        def loaded():
            return sorted(m for m in ("botocore", "aiobotocore", "stompman") if m in sys.modules)

        conf = config.parse('''
        integrations:
          - {name: q, integration_type: aws_sqs, observes: ["*"],
             configuration: {url: "http://127.0.0.1:9/1/q", region: eu-west-1, endpoint_url: "http://127.0.0.1:9",
                             aws_access_key_id: a, aws_secret_access_key: b}}
          - {name: s, integration_type: stomp, observes: ["*"],
             configuration: {addresses: ["stomp://127.0.0.1:9"], destination: /queue/q}}
        ''', environ={})
        print(loaded())
        context = targets.SenderContext("ua", "eventrelay://x")
        sqs, stomp = (targets.get(i.integration_type).sender(i, context) for i in conf.integrations)
        print(loaded())

        async def start_sqs():
            await sqs.start()
            await sqs.close()

        asyncio.run(start_sqs())
        print(loaded())
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["[]", "['stompman']", "['aiobotocore', 'botocore', 'stompman']"]
