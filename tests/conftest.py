"""Real components for the tests: HTTP receivers on 127.0.0.1, the daemon in-process or as a subprocess."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import pytest
import yaml
from aiohttp import web

from eventrelay import config as config_module
from eventrelay.jobs import JobState
from eventrelay.service import Service
from eventrelay.store import AttemptView, JobView, Store, StoredEvent, open_store

REPO = Path(__file__).resolve().parent.parent
_ALL = 10**9  # a page size that takes everything a test stores
T = TypeVar("T")


async def wait_until(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02) -> None:
    """Poll `predicate` (sync or async) until truthy; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(interval)


async def wait_for(read: Callable[[], Awaitable[T]], want: Any, timeout: float = 10.0, interval: float = 0.02) -> T:
    """Poll `await read()` until it equals `want` (or, `want` being a function, until `want(value)` is truthy);
    returns that value. Fails the test after `timeout` seconds, showing the last value read."""
    deadline = time.monotonic() + timeout
    while True:
        value = await read()
        if want(value) if callable(want) else value == want:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s; last read: {value!r}")
        await asyncio.sleep(interval)


@contextlib.asynccontextmanager
async def stored(path: Path) -> AsyncIterator[Store]:
    """The store a stopped (or killed) daemon left at `path`, opened through the storage API to read it."""
    store = await open_store(config_module.StorageConfig(path))
    try:
        yield store
    finally:
        await store.close()


async def states_of(store: Store) -> dict[str, int]:
    """Jobs by state over every integration, e.g. {"delivered": 3, "pending": 1}; states without jobs left out."""
    counts: dict[str, int] = {}
    for (_, state), n in (await store.job_counts(tuple(JobState))).items():
        counts[state.value] = counts.get(state.value, 0) + n
    return counts


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float

    @property
    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Receiver:
    """A real aiohttp server that records every request; `respond` decides each answer."""

    url: str = ""
    requests: list[Received] = field(default_factory=list)
    respond: Callable[[Received], Awaitable[web.StreamResponse] | web.StreamResponse] | None = None

    def ids(self) -> list[str]:
        return [r.json["id"] for r in self.requests]


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    rec = Receiver()

    async def handle(request: web.Request) -> web.StreamResponse:
        got = Received(request.path, dict(request.headers), await request.read(), time.time())
        rec.requests.append(got)
        if rec.respond is None:
            return web.Response(status=204)
        answer = rec.respond(got)
        return await answer if asyncio.iscoroutine(answer) else answer

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    rec.url = f"http://127.0.0.1:{port}/hook"
    yield rec
    await runner.cleanup()


def webhook(name: str, url: str, observes: list[str] | None = None, **extra: Any) -> dict[str, Any]:
    item = {"name": name, "integration_type": "webhook", "observes": observes or ["order.paid"],
            "configuration": {"url": url}}
    item.update(extra)
    return item


def write_config(tmp_path: Path, integrations: list[dict[str, Any]], engine: dict[str, Any] | None = None,
                 **top: Any) -> Path:
    """A config with fast retries and both listeners on free local addresses, written to tmp_path. `engine`:
    the storage section of the engine (the `storage` fixture's), SQLite in tmp_path by default; a `storage`
    in `top` adds to it."""
    raw: dict[str, Any] = {
        "listen": {"http": "127.0.0.1:0", "socket": str(tmp_path / "er.sock")},
        "storage": engine or {"path": str(tmp_path / "er.db")},
        "delivery": {"timeout": "2s", "concurrency": 4,
                     "retry": {"initial": "50ms", "max_interval": "200ms", "max_age": "1h"}},
        "shutdown_grace": "3s",
        "log": {"level": "warning", "format": "json"},
        "integrations": integrations,
    }
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(raw.get(key), dict):
            raw[key] = {**raw[key], **value}
        else:
            raw[key] = value
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@dataclass
class RunningDaemon:
    service: Service
    stop: asyncio.Event
    task: asyncio.Task[None]
    http: aiohttp.ClientSession
    db_path: Path
    socket_path: Path | None

    @property
    def url(self) -> str:
        host, port = self.service.http_address  # type: ignore[misc]
        return f"http://{host}:{port}"

    async def post(self, body: Any, headers: dict[str, str] | None = None, raw: bytes | None = None
                   ) -> tuple[int, Any]:
        data = raw if raw is not None else json.dumps(body).encode()
        hdrs = {"Content-Type": "application/json", **(headers or {})}
        async with self.http.post(f"{self.url}/v1/events", data=data, headers=hdrs) as resp:
            text = await resp.text()
            return resp.status, (json.loads(text) if text else None)

    # -- what the daemon stored, through the storage API (store/api.py) --------------------------------------

    @property
    def store(self) -> Store:
        assert self.service.store is not None, "the daemon's store is not open"
        return self.service.store

    async def states(self, integration: str | None = None) -> dict[str, int]:
        """Jobs by state, e.g. {"delivered": 3, "pending": 1}: of every integration, or of one. States without
        jobs are left out."""
        if integration is None:
            return await states_of(self.store)
        counts = await self.store.job_counts(tuple(JobState))
        return {state.value: n for (name, state), n in counts.items() if name == integration}

    async def jobs(self, integration: str | None = None, state: JobState | None = None,
                   event_id: str | None = None) -> list[JobView]:
        """Every job (of one integration, in one state, of one event), oldest first."""
        jobs, _ = await self.store.jobs(integration, state, limit=_ALL, offset=0, event_id=event_id)
        return jobs[::-1]

    async def job(self, event_id: str, integration: str | None = None) -> JobView:
        """The one job of an event (for one integration)."""
        (job,) = await self.jobs(integration, event_id=event_id)
        return job

    async def attempts(self, integration: str | None = None, job_id: int | None = None) -> list[AttemptView]:
        """The attempt log (of one integration, of one job), oldest first."""
        entries, _ = await self.store.logs(integration, job_id, limit=_ALL, offset=0)
        return entries[::-1]

    async def events(self) -> list[StoredEvent]:
        """Every stored event, in the order they were accepted."""
        events, _ = await self.store.events(limit=_ALL)
        return events[::-1]

    async def shutdown(self) -> None:
        self.stop.set()
        await asyncio.wait_for(self.task, 15)


# -- the storage engine a daemon under test runs on --------------------------------------------------------
#
# Daemons started by `start_daemon` and `daemon_process` store in SQLite, unless the test (or its module) is
# marked `@pytest.mark.engines("sqlite", "postgresql")`: then it runs once on each engine, PostgreSQL in a
# database of the test's own on the suite's cluster.

def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    marker = metafunc.definition.get_closest_marker("engines")
    if marker is not None and "storage_engine" in metafunc.fixturenames:
        metafunc.parametrize("storage_engine", marker.args, indirect=True)


@pytest.fixture
def storage_engine(request: pytest.FixtureRequest) -> str:
    return getattr(request, "param", "sqlite")


@pytest.fixture
def storage(storage_engine: str, request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, Any]:
    """The `storage` section of the daemon's config, for the engine the test runs on."""
    if storage_engine == "postgresql":
        return {"backend": "postgresql", "dsn": request.getfixturevalue("postgres_dsn"), "pool": 4, "lease": "5s"}
    return {"path": str(tmp_path / "er.db")}


@pytest.fixture
async def start_daemon(tmp_path: Path, storage: dict[str, Any]
                       ) -> AsyncIterator[Callable[..., Awaitable[RunningDaemon]]]:
    """Start the daemon in this event loop: `await start_daemon(integrations, **top_level_overrides)`."""
    running: list[RunningDaemon] = []
    session = aiohttp.ClientSession()

    async def start(integrations: list[dict[str, Any]], **top: Any) -> RunningDaemon:
        config = config_module.load(write_config(tmp_path, integrations, engine=storage, **top))
        service = Service(config)
        stop = asyncio.Event()
        ready = asyncio.Event()
        task = asyncio.create_task(service.serve(stop, ready.set))
        done, _ = await asyncio.wait([task, asyncio.create_task(ready.wait())], timeout=10,
                                     return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            task.result()  # raises the start-up error
        assert ready.is_set(), "daemon did not become ready within 10s"
        d = RunningDaemon(service, stop, task, session, config.storage.path, config.listen.socket)
        running.append(d)
        return d

    yield start
    for d in running:
        if not d.task.done():
            await d.shutdown()
    await session.close()


# -- the daemon as a subprocess, for what is about processes: signals, kill -9, restarts -----------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(port: int, proc: subprocess.Popen[bytes], log: Path, timeout: float = 15.0) -> None:
    """Until the daemon on `port` answers /readyz with 200; fail with its log if it exits or takes too long."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"daemon exited with {proc.returncode}:\n{log.read_text()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2) as s:
                s.sendall(b"GET /readyz HTTP/1.0\r\n\r\n")
                if b" 200 " in s.recv(100):
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"daemon not ready within {timeout}s:\n{log.read_text()}")


@dataclass
class DaemonProcess:
    config: Path
    port: int
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 15.0) -> None:
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "eventrelay", "run", "--config", str(self.config)],
                                     stdout=self.log, stderr=subprocess.STDOUT, cwd=REPO)
        wait_ready(self.port, self.proc, self.log_path, timeout)

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def wait(self, timeout: float = 20.0) -> int:
        assert self.proc is not None
        code = self.proc.wait(timeout)
        self.log.close()
        return code

    def kill9(self) -> None:
        self.signal(signal.SIGKILL)
        self.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.signal(signal.SIGTERM)
            try:
                self.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.wait()


@pytest.fixture
def daemon_process(tmp_path: Path, storage: dict[str, Any]) -> Callable[..., DaemonProcess]:
    made: list[DaemonProcess] = []

    def make(integrations: list[dict[str, Any]], **top: Any) -> DaemonProcess:
        port = free_port()
        top.setdefault("listen", {})["http"] = f"127.0.0.1:{port}"
        path = write_config(tmp_path, integrations, engine=storage, **top)
        d = DaemonProcess(path, port, tmp_path / "daemon.log")
        made.append(d)
        return d

    yield make
    for d in made:
        d.stop()


@pytest.fixture(autouse=True)
def _runtime_dir(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    # Daemons started by a test record themselves here (daemon/runtime.py), not in the host's /run/eventrelay,
    # and the commands a test runs find only those.
    monkeypatch.setenv("EVENTRELAY_RUNTIME_DIR", str(tmp_path_factory.mktemp("run")))


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    # Tests talk to 127.0.0.1 only; a proxy from the environment must never be used.
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    os.environ.setdefault("NO_PROXY", "127.0.0.1,localhost")


# -- real services: an SQS API (moto) and STOMP brokers, one of each per test session --------------------------

def pytest_configure(config: pytest.Config) -> None:
    # CI runners and timeouts stop a job with SIGTERM, whose default action ends pytest before any teardown:
    # the session's moto and brokers then lived on as orphans and skewed what ran next. Taken like Ctrl-C,
    # it lets pytest tear the session down, and the services stop with it.
    signal.signal(signal.SIGTERM, signal.default_int_handler)


def _session_service(factory: Callable[[], Any]) -> Any:
    service = factory()
    service.start()
    return service


def _running(service: Any) -> Any:
    """The session's service, started again if a test stopped or killed it and did not restart it."""
    if not service.running:
        service.start()
    return service


@pytest.fixture(scope="session")
def _moto_session() -> Any:
    from bench.services import MotoServer

    server = _session_service(MotoServer)
    yield server
    server.close()


@pytest.fixture
def moto_server(_moto_session: Any) -> Any:
    return _running(_moto_session)


@pytest.fixture(scope="session")
def _activemq_session() -> Any:
    from bench.services import ActiveMQ

    broker = _session_service(ActiveMQ)
    yield broker
    broker.close()


@pytest.fixture
def activemq(_activemq_session: Any) -> Any:
    return _running(_activemq_session)


@pytest.fixture(scope="session")
def activemq_tls() -> Any:
    from bench.services import ActiveMQ

    broker = _session_service(lambda: ActiveMQ(tls=True))
    yield broker
    broker.close()


@pytest.fixture(scope="session")
def rabbitmq() -> Any:
    from bench.services import RabbitMQ

    broker = _session_service(RabbitMQ)
    yield broker
    broker.close()


@pytest.fixture(scope="session")
def postgres_cluster() -> Any:
    """One PostgreSQL cluster for the whole run (bench.services.PostgresCluster). A test that stops or kills it
    starts it again; postgres_dsn does so for the next test otherwise."""
    from bench.services import PostgresCluster, ServiceError

    try:
        cluster = _session_service(PostgresCluster)
    except ServiceError as e:
        # a failure, not a skip: CI must run the PostgreSQL tests, and the message says how to install them
        pytest.fail(str(e), pytrace=False)
    yield cluster
    cluster.close()


@pytest.fixture
def postgres_dsn(postgres_cluster: Any, request: pytest.FixtureRequest) -> Any:
    """A libpq URL to a fresh, empty database of this test's own, owned by the `eventrelay` role; dropped after
    the test (with whatever connections it left)."""
    name = "t_" + re.sub(r"[^a-z0-9_]+", "_", request.node.name.lower())[:40] + "_" + uuid.uuid4().hex[:8]
    dsn = _running(postgres_cluster).create_database(name)
    yield dsn
    _running(postgres_cluster).drop_database(name)
