"""What a Java application on ActiveMQ 5.x sees of eventrelay's STOMP messages, read with a real JMS consumer.

tests/jms/JmsRead.java is compiled once per session against Debian's ActiveMQ client jars and run with
`java`: it connects over OpenWire, reads with TextMessage.getText(), and prints one JSON line per message.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from .conftest import wait_for
from bench.services import ACTIVEMQ_HOME
from .test_stomp import FAST, queue, stomp_integration

_SOURCE = Path(__file__).parent / "jms" / "JmsRead.java"
_JARS = ["activemq-client", "geronimo-jms_1.1_spec", "geronimo-j2ee-management-1.1-spec", "hawtbuf", "slf4j-api"]


@pytest.fixture(scope="session")
def jms_classpath(tmp_path_factory: pytest.TempPathFactory) -> str:
    javac = shutil.which("javac")
    jars = [ACTIVEMQ_HOME / "lib" / f"{name}.jar" for name in _JARS]
    missing = [str(j) for j in jars if not j.exists()]
    if javac is None or missing:
        pytest.fail(f"the JMS tests need javac and ActiveMQ's client jars (missing: {missing or 'javac'}); "
                    "run .ci/install-services.sh")
    out = tmp_path_factory.mktemp("jms")
    classpath = ":".join(map(str, jars))
    subprocess.run([javac, "-d", str(out), "-cp", classpath, str(_SOURCE)], check=True, timeout=120,
                   stdin=subprocess.DEVNULL)
    return f"{classpath}:{out}"


def jms_read(classpath: str, broker: Any, destination: str, count: int, timeout: float = 15.0,
             selector: str | None = None) -> list[dict[str, Any]]:
    """Run the JMS consumer: up to `count` messages from the queue within `timeout` seconds, one dict each."""
    assert destination.startswith("/queue/")
    argv = [shutil.which("java") or "java", "-Xshare:auto", "-XX:TieredStopAtLevel=1", "-cp", classpath, "JmsRead",
            f"tcp://{broker.host}:{broker.openwire_port}", broker.username, broker.password,
            destination.removeprefix("/queue/"), str(count), str(int(timeout * 1000))]
    done = subprocess.run(argv + ([selector] if selector else []), capture_output=True, text=True,
                          timeout=timeout + 60, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, f"JmsRead exited with {done.returncode}:\n{done.stderr[-3000:]}"
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


# Characters outside the Basic Multilingual Plane (4 bytes in UTF-8), next to BMP ones and to JSON escapes.
ASTRAL = ["😀", "𝄞 clef", "🇫🇷", "𠜎 ext-B", "\U00010000", "\U0010fffd", "a😀b", 'quote"😀\\😀', "👩‍👩‍👧 family"]
BMP = ["é", "中文", "Zoë Ångström", "€ ‰ ﬁ", "\uffff\ud7ff"]


def sample_data(i: int) -> dict[str, Any]:
    if i % 4 == 3:
        return {"type": "customer", "id": f"c{i}", "name": BMP[i % len(BMP)], "plain": "ascii only"}
    text = ASTRAL[i % len(ASTRAL)]
    data: dict[str, Any] = {"type": "customer", "id": f"c{i}", "name": text, "tags": [text, "é", i]}
    if i % 5 == 0:
        data[f"key {text}"] = {"nested": text + "中"}  # in an object key too: any JSON string may hold one
    return data


async def test_a_jms_consumer_reads_astral_characters(start_daemon, activemq, jms_classpath: str) -> None:
    dest = queue()
    sent = {f"j{i}": sample_data(i) for i in range(20)}
    d = await start_daemon([stomp_integration("crm", activemq, dest)], delivery=FAST)
    await d.post([{"id": event_id, "type": "customer.updated", "data": data} for event_id, data in sent.items()])
    await wait_for(d.states, {"delivered": 20}, timeout=30)
    messages = await asyncio.to_thread(jms_read, jms_classpath, activemq, dest, 20)
    errors = [m for m in messages if "error" in m]
    # ActiveMQ's AMQ-8398: getText() throws UTFDataFormatException for a 4-byte UTF-8 sequence in a STOMP body.
    assert not errors, f"{len(errors)} of {len(messages)} messages unreadable with getText(): {errors[0]}"
    assert len(messages) == 20
    assert all(m["class"] == "ActiveMQTextMessage" for m in messages), {m["class"] for m in messages}
    received = {m["id"]: json.loads(m["text"]) for m in messages}
    assert received.keys() == sent.keys()
    for event_id, body in received.items():
        assert body["id"] == event_id and body["data"] == sent[event_id], event_id


async def test_jms_sees_type_as_jmstype_and_id_as_a_property(start_daemon, activemq, jms_classpath: str) -> None:
    dest = queue()
    types = ["order.paid", "order.created", "customer.updated", "order.paid"] * 4
    d = await start_daemon([stomp_integration("crm", activemq, dest)], delivery=FAST)
    traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    await d.post([{"id": f"t{i}", "type": t, "data": {"i": i}} for i, t in enumerate(types)],
                 headers={"traceparent": traceparent})
    await wait_for(d.states, {"delivered": 16}, timeout=30)
    paid = {f"t{i}" for i, t in enumerate(types) if t == "order.paid"}

    # Asks for all 16: only the selector can stop it at the 8 order.paid ones.
    selected = await asyncio.to_thread(jms_read, jms_classpath, activemq, dest, 16, 5.0, "JMSType = 'order.paid'")
    assert {m["id"] for m in selected} == paid
    for m in selected:
        assert m["jms_type"] == "order.paid" and json.loads(m["text"])["id"] == m["id"]
        assert m["properties"]["id"] == f"String:{m['id']}"  # getStringProperty("id")
        # The producer's trace context, as a string property a JMS tracing library reads (tracing is off).
        assert m["properties"]["traceparent"] == f"String:{traceparent}"
        assert "type" not in m["properties"], m["properties"]  # the STOMP header became JMSType, not a property

    # The others were left on the queue for consumers without that selector.
    rest = await asyncio.to_thread(jms_read, jms_classpath, activemq, dest, 16, 5.0)
    assert {m["id"] for m in rest} == {f"t{i}" for i in range(16)} - paid
    assert {m["jms_type"] for m in rest} == {"order.created", "customer.updated"}
