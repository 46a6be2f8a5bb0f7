"""The real services of tests/services.py work: moto (SQS), ActiveMQ and RabbitMQ over STOMP (+TLS)."""

from __future__ import annotations

import contextlib
import queue
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import boto3
import pytest
import stomp
from botocore.exceptions import ClientError
from stomp.exception import ConnectFailedException

from bench.services import ActiveMQ, MotoServer, RabbitMQ, _process_tree, _proc_stat

WAIT = 10.0  # every wait in these tests is bounded by this many seconds


def bounded(fn: Callable[[], Any], timeout: float = WAIT) -> Any:
    """Run a blocking call in a thread; fail the test if it does not return within `timeout`."""
    result: list[Any] = []
    error: list[BaseException] = []

    def run() -> None:
        try:
            result.append(fn())
        except BaseException as e:  # noqa: BLE001
            error.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise AssertionError(f"{fn} did not return within {timeout}s")
    if error:
        raise error[0]
    return result[0] if result else None


# ---------------------------------------------------------------------------------------------------------------- moto


@pytest.fixture
def moto() -> Iterator[MotoServer]:
    server = MotoServer()
    server.start()
    try:
        yield server
    finally:
        server.close()


def sqs_client(server: MotoServer):
    return boto3.client("sqs", **server.client_kwargs())


def test_moto_sqs_send_and_receive(moto: MotoServer) -> None:
    sqs = sqs_client(moto)
    url = sqs.create_queue(QueueName="events")["QueueUrl"]
    sqs.send_message(QueueUrl=url, MessageBody='{"hello": "world"}')
    got = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=1, WaitTimeSeconds=2)["Messages"]
    assert [m["Body"] for m in got] == ['{"hello": "world"}']


def test_moto_restart_same_port_loses_state(moto: MotoServer) -> None:
    sqs = sqs_client(moto)
    sqs.create_queue(QueueName="gone")
    endpoint = moto.endpoint_url
    moto.restart()
    assert moto.endpoint_url == endpoint
    with pytest.raises(ClientError):
        sqs.get_queue_url(QueueName="gone")
    assert sqs.create_queue(QueueName="gone")["QueueUrl"]


# ------------------------------------------------------------------------------------------------------------- brokers


@pytest.fixture(scope="module", params=["activemq", "rabbitmq"])
def broker(request) -> Iterator[ActiveMQ | RabbitMQ]:
    service = ActiveMQ(tls=True) if request.param == "activemq" else RabbitMQ(tls=True)
    service.start()
    try:
        yield service
    finally:
        service.close()


class Collector(stomp.ConnectionListener):
    def __init__(self) -> None:
        self.messages: queue.Queue[stomp.utils.Frame] = queue.Queue()
        self.errors: queue.Queue[stomp.utils.Frame] = queue.Queue()
        self.receipts: set[str] = set()
        self.cond = threading.Condition()

    def on_message(self, frame) -> None:
        self.messages.put(frame)

    def on_error(self, frame) -> None:
        self.errors.put(frame)

    def on_receipt(self, frame) -> None:
        with self.cond:
            self.receipts.add(frame.headers["receipt-id"])
            self.cond.notify_all()

    def wait_receipt(self, receipt: str, timeout: float = WAIT) -> None:
        with self.cond:
            assert self.cond.wait_for(lambda: receipt in self.receipts, timeout), f"no RECEIPT {receipt}"

    def next_message(self, timeout: float = WAIT):
        try:
            return self.messages.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no MESSAGE within {timeout}s") from None


def connect(broker: ActiveMQ | RabbitMQ, *, tls: bool = False, password: str | None = None):
    port = broker.tls_port if tls else broker.port
    conn = stomp.Connection12(
        [(broker.host, port)], vhost=broker.vhost, heartbeats=(0, 0), reconnect_attempts_max=1, timeout=WAIT
    )
    if tls:
        conn.set_ssl(for_hosts=[(broker.host, port)], ca_certs=broker.ca_file)
    collector = Collector()
    conn.set_listener("collector", collector)
    bounded(lambda: conn.connect(broker.username, broker.password if password is None else password, wait=True))
    return conn, collector


def send_persistent(broker, destination: str, body: str, *, tls: bool = False) -> None:
    conn, got = connect(broker, tls=tls)
    try:
        receipt = f"r-{uuid.uuid4()}"
        conn.send(destination, body, content_type="text/plain", headers={"persistent": "true", "receipt": receipt})
        got.wait_receipt(receipt)
    finally:
        bounded(conn.disconnect)


def receive_one(broker, destination: str, *, tls: bool = False) -> str:
    conn, got = connect(broker, tls=tls)
    try:
        conn.subscribe(destination, id="1", ack="client-individual")
        frame = got.next_message()
        conn.ack(frame.headers["message-id"] if "ack" not in frame.headers else frame.headers["ack"], "1")
        return frame.body
    finally:
        bounded(conn.disconnect)


@contextlib.contextmanager
def logs_on_failure(service) -> Iterator[None]:
    """Append the end of the service's logs to any failure inside the block."""
    try:
        yield
    except Exception as e:
        raise AssertionError(f"{type(e).__name__}: {e}\n{service.log_tail()}") from e


def queue_name() -> str:
    return f"/queue/x-{uuid.uuid4().hex[:8]}"


def test_broker_send_with_receipt_then_subscribe(broker) -> None:
    destination = queue_name()
    with logs_on_failure(broker):
        send_persistent(broker, destination, "hello")
        if isinstance(broker, RabbitMQ):
            assert broker.queue_depths()[destination.removeprefix("/queue/")] == 1
        assert receive_one(broker, destination) == "hello"


@pytest.mark.parametrize("how", ["restart", "kill"])
def test_broker_persistent_message_survives_restart(broker, how: str) -> None:
    destination = queue_name()
    with logs_on_failure(broker):
        send_persistent(broker, destination, f"survives {how}")
        ports = (broker.port, broker.tls_port)
        if how == "restart":
            assert broker.stop(), "broker needed SIGKILL to stop"
            broker.start()
        else:
            if isinstance(broker, RabbitMQ):
                # RabbitMQ 3.x keeps queue metadata in Mnesia, whose log is written asynchronously: a SIGKILL
                # right after the queue's first declaration can lose the queue itself (seen ~1 in 15 here).
                # The message was fsynced before its RECEIPT; make the queue's declaration durable too.
                broker.sync_metadata()
            broker.kill()
            broker.start()
        assert (broker.port, broker.tls_port) == ports
        assert receive_one(broker, destination) == f"survives {how}"


def test_broker_bad_password_is_refused(broker) -> None:
    with pytest.raises(ConnectFailedException):
        connect(broker, password="wrong")
    assert broker.probe(password="wrong").command == "ERROR"
    assert broker.probe(username="guest", password="guest").command == "ERROR"  # no default guest account
    assert broker.probe().command == "CONNECTED"


def test_broker_tls_with_ca_file(broker) -> None:
    destination = queue_name()
    with logs_on_failure(broker):
        send_persistent(broker, destination, "over tls", tls=True)
        assert receive_one(broker, destination, tls=True) == "over tls"
        assert broker.probe(tls=True).command == "CONNECTED"


def test_broker_tls_certificate_is_not_publicly_trusted(broker) -> None:
    ctx = ssl.create_default_context()  # system CAs only: our self-signed CA must not verify
    with socket.create_connection((broker.host, broker.tls_port), timeout=WAIT) as sock:
        with pytest.raises(ssl.SSLCertVerificationError):
            ctx.wrap_socket(sock, server_hostname=broker.host)


# ------------------------------------------------------------------------------------------------------ no leftovers


def survivors(tree: list[tuple[int, int]]) -> list[int]:
    """The processes of `tree` (pid, start time) still alive after waiting up to WAIT for them to end."""
    deadline = time.monotonic() + WAIT
    while True:
        alive = [pid for pid, start in tree if (_proc_stat(pid) or (0, None))[1] == start]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.1)


@pytest.mark.parametrize("cls", [MotoServer, ActiveMQ, RabbitMQ], ids=lambda c: c.__name__)
def test_close_leaves_no_process_and_no_directory(cls) -> None:
    service = cls()
    service.start()
    assert service.running
    tree = _process_tree(service.pid)
    if cls is RabbitMQ:
        tree += _process_tree(service._epmd.pid)
    assert tree
    service.close()
    assert survivors(tree) == []
    assert not service.workdir.exists()
    assert not service.running


def test_a_sigterm_to_pytest_stops_the_session_services(tmp_path) -> None:
    """A pytest run stopped with SIGTERM (a CI timeout) tears its session down: moto does not outlive it."""
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    pid_file = tmp_path / "moto.pid"
    probe = repo / "tests" / f"test_zz_sigterm_probe_{os.getpid()}.py"  # inside tests/: it needs the conftest
    probe.write_text(
        "import os, time\n"
        "def test_wait(moto_server):\n"
        f"    open({str(pid_file)!r}, 'w').write(str(moto_server.pid))\n"
        "    time.sleep(60)\n")
    try:
        run = subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(probe)],
                               cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 30
            while not (pid_file.exists() and pid_file.read_text()) and time.monotonic() < deadline:
                assert run.poll() is None, run.stdout.read().decode()
                time.sleep(0.1)
            moto = _process_tree(int(pid_file.read_text()))
            assert moto
            run.send_signal(signal.SIGTERM)
            out, _ = run.communicate(timeout=30)
        finally:
            if run.poll() is None:
                run.kill()
                run.wait()
    finally:
        probe.unlink()
    alive = survivors(moto)
    for pid in alive:  # this test's failure must not leave an orphan behind either
        os.kill(pid, signal.SIGKILL)
    assert alive == [], out.decode()[-2000:]
