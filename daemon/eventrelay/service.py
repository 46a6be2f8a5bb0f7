"""Wires the parts together and owns every task: start, serve, reload on SIGHUP, drain on stop."""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import structlog
from aiohttp import web

from . import __version__
from . import config as config_module
from . import log as log_setup
from .admin.api import AdminApi
from .admin.view import IntegrationState
from .aio import wait_event
from .config import Config, Integration, is_loopback, server_context
from .console import Console
from .delivery import targets
from .delivery.dispatcher import Dispatcher
from .delivery.policy import CircuitBreaker
from .ingest import Ingestor, Router
from .ingest.http import ConnectionCap, HttpIngest
from .ingest.socket import SocketIngest
from .ingest.starting import StartingListener
from .jobs import JobState
from .limits import ensure_descriptors
from .metrics import Metrics
from .notify import Notifier, watchdog_loop
from .runtime import RuntimeFile
from .events import Event
from .store import Accepted, Store, StoreError, open_store

if TYPE_CHECKING:
    from .tracing import Tracing

log = structlog.get_logger(component="service")

USER_AGENT = f"eventrelay/{__version__}"
_INGEST_DRAIN = 5.0  # seconds open requests get to finish once we stop listening
_STATUS_EVERY = 30.0
_SHARED_STATE_EVERY = 2.0  # seconds; how soon a daemon follows a 410 or an enable recorded by another
# Seconds systemd's start timeout is pushed past each wait for the database: the next try, then this much.
_START_WAIT_MARGIN = 30.0
_SETTLE_MARGIN = 5.0  # seconds an operator's retry waits, past the delivery timeout, for an outcome's write


@dataclass(frozen=True, slots=True)
class ReloadResult:
    at: float
    ok: bool
    errors: tuple[str, ...] = ()
    changes: tuple[str, ...] = ()  # what the reload did, e.g. "added crm"


class Service:
    """One running daemon. `serve` returns when `stop` has been set and everything has drained."""

    def __init__(self, config: Config, notifier: Notifier | None = None):
        self.config = config
        self.notifier = notifier or Notifier(None)
        self.metrics = Metrics()
        self.started_at = time.time()
        self.store: Store | None = None
        self.dispatchers: dict[str, Dispatcher] = {}
        self.http_address: tuple[str, int] | None = None
        self.last_reload: ReloadResult | None = None
        self._dispatcher_tasks: dict[str, asyncio.Task[None]] = {}
        self._tasks: asyncio.TaskGroup | None = None
        self._ingestor: Ingestor | None = None
        self._http: HttpIngest | None = None
        self._http_runner: web.AppRunner | None = None
        self._http_server: asyncio.Server | None = None  # the listening socket; aiohttp serves what it accepts
        self._http_cap: ConnectionCap | None = None
        self._socket: SocketIngest | None = None
        self._disabled: dict[str, tuple[float, str]] = {}  # integrations a 410 disabled, as stored
        self._paused: dict[str, float] = {}  # integrations an operator paused: since when, as stored
        self._operator_actions = 0  # pauses and resumes made here, so a read of the shared state can tell
        self._reload_lock = asyncio.Lock()
        self._reload_requested = asyncio.Event()
        self._ready = False
        self._runtime: RuntimeFile | None = None  # how `eventrelay` commands find this daemon
        self._tracing: Tracing | None = None  # OpenTelemetry, when the config turns it on
        self._tls_context: ssl.SSLContext | None = None  # the HTTP listener's, while it serves HTTPS

    def request_reload(self) -> None:
        """SIGHUP: reload soon, in the service's own task. Requests arriving during a reload coalesce."""
        self._reload_requested.set()

    async def is_ready(self) -> bool:
        return self._ready and self.store is not None and await self.store.ping()

    # -- the whole life ------------------------------------------------------------------------------------

    async def serve(self, stop: asyncio.Event, on_ready: Callable[[], None] = lambda: None) -> None:
        config = self.config
        if config.tracing.enabled:
            from .tracing import Tracing  # imported only when on: OpenTelemetry costs nothing otherwise

            self._tracing = Tracing(config.tracing)
        self.store = store = await self._open_store(config)
        store.announce(__version__, config.fingerprint())
        store.on_jobs_added = self._wake
        store.on_commit = self._observe_commit
        try:
            async with asyncio.TaskGroup() as tasks:
                self._tasks = tasks
                writer = tasks.create_task(store.run(), name="store-writer")
                self._disabled = await store.disabled()
                self._paused = await store.paused()
                for integration in config.integrations:
                    if integration.enabled:
                        self._start_dispatcher(integration)
                self._ingestor = Ingestor(store, Router(config.integrations), self.metrics)
                await self._listen(config)
                housekeeping = [tasks.create_task(self._follow_shared_state(stop), name="shared-state"),
                                tasks.create_task(self._reload_on_request(stop), name="reloader"),
                                tasks.create_task(self._prune_forever(stop), name="pruner"),
                                tasks.create_task(self._report_status(stop), name="status"),
                                tasks.create_task(watchdog_loop(self.notifier, self.is_ready, stop), name="watchdog")]
                # Before readiness: whoever saw /readyz answer 200 finds the runtime file too.
                self._runtime = RuntimeFile.publish(self)
                self._ready = True
                log.info("ready", version=__version__, pid=os.getpid(), http=_fmt_addr(self.http_address),
                         socket=str(config.listen.socket.resolve()) if config.listen.socket else None,
                         integrations=len(self.dispatchers), database=config.storage.shown)
                self.notifier.ready(await self._status_line())
                on_ready()
                await stop.wait()
                self._ready = False
                self.notifier.stopping()
                log.info("stopping: no new events accepted; draining deliveries", grace_s=self.config.shutdown_grace)
                await self._stop_listening()
                await self._stop_dispatchers(list(self.dispatchers), self.config.shutdown_grace)
                await asyncio.gather(*housekeeping)
                store.stop()
                await writer
        finally:
            self._ready = False
            if self._runtime is not None:
                self._runtime.remove()
            await self._stop_listening()
            await store.close()
            if self._tracing is not None:
                await self._tracing.shutdown()
        log.info("stopped")

    async def _open_store(self, config: Config) -> Store:
        """The store. A database server may keep the daemon waiting (it is down, or still starting): meanwhile
        the HTTP address answers 503 saying why, and systemd's status says it too."""
        if config.storage.backend == "sqlite" or config.listen.http is None:
            return await open_store(config.storage)
        starting = StartingListener()

        def waiting(why: str, seconds: float) -> None:
            starting.reason = f"starting: {why}"
            self.notifier.waiting(why, seconds + _START_WAIT_MARGIN)

        await starting.start(config.listen.http)  # an address in use fails here as it would below
        try:
            return await open_store(config.storage, waiting)
        finally:
            await starting.close()

    def _wake(self, names: set[str]) -> None:
        for name in names:
            dispatcher = self.dispatchers.get(name)
            if dispatcher is not None:
                dispatcher.wake()

    def _observe_commit(self, operations: int, seconds: float) -> None:
        self.metrics.commit_batch.observe(operations)
        self.metrics.commit_seconds.observe(seconds)

    # -- dispatchers ---------------------------------------------------------------------------------------

    def _start_dispatcher(self, integration: Integration) -> None:
        assert self._tasks is not None and self.store is not None
        context = targets.SenderContext(USER_AGENT, self.config.event_source, self.config.store_id)
        target = targets.get(integration.integration_type)
        sender = target.sender(integration, context)
        spans = (self._tracing.attempts(integration.name, target.span_shape(integration))
                 if self._tracing is not None else None)
        dispatcher = Dispatcher(integration, self.store, sender, self.metrics, self._disabled.get(integration.name),
                                self._paused.get(integration.name), spans)
        self.dispatchers[dispatcher.name] = dispatcher
        self._dispatcher_tasks[dispatcher.name] = self._tasks.create_task(
            dispatcher.run(), name=f"dispatcher:{dispatcher.name}")

    async def _stop_dispatchers(self, names: list[str], grace: float) -> None:
        """Stop claiming, let deliveries in flight finish for `grace` seconds, then abandon the rest.

        Abandoned deliveries stay pending in the database: they are delivered again later (at least once).
        """
        tasks = []
        for name in names:
            dispatcher = self.dispatchers.pop(name)
            dispatcher.stop()
            tasks.append(self._dispatcher_tasks.pop(name))
        if not tasks:
            return
        _, late = await asyncio.wait(tasks, timeout=grace)
        if late:
            log.warning("grace period over: abandoning deliveries in flight; they stay pending and are "
                        "delivered again", integrations=names)
            for task in late:
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.gather(*late, return_exceptions=True)

    async def enable(self, name: str) -> bool:
        """Turn an integration a 410 disabled back on. False if it was not disabled."""
        assert self.store is not None
        was = self.dispatchers[name].gate.disabled if name in self.dispatchers else self._disabled.get(name)
        await self.store.set_disabled(name, None)
        self._disabled.pop(name, None)
        if name in self.dispatchers:
            self.dispatchers[name].enable()
        if was is not None:
            log.info("integration enabled again", integration=name)
        return was is not None

    async def send_test(self, name: str, event: Event) -> Accepted:
        """An operator's test event for one integration (whatever it observes): stored like any event, and
        sent now, ahead of a slow-down pause or an open circuit's cool-down, as an operator's retry is."""
        assert self.store is not None
        (accepted,) = await self.store.ingest([event], [[(name, None)]])
        if name in self.dispatchers:
            self.dispatchers[name].send_now()
        return accepted

    async def pause(self, name: str) -> bool:
        """Hold an integration's deliveries until resumed; its jobs stay. False if it was paused already."""
        assert self.store is not None
        if name in self._paused:
            return False
        await self.store.set_paused(name, True)
        self._operator_actions += 1
        self._paused[name] = since = time.time()
        if name in self.dispatchers:
            self.dispatchers[name].pause(since)
        log.info("integration paused by an operator", integration=name)
        return True

    async def resume(self, name: str) -> bool:
        """Let a paused integration deliver again. False if it was not paused."""
        assert self.store is not None
        if name not in self._paused:
            return False
        await self.store.set_paused(name, False)
        self._operator_actions += 1
        del self._paused[name]
        if name in self.dispatchers:
            self.dispatchers[name].resume()
        log.info("integration resumed by an operator", integration=name)
        return True

    # -- operators' actions: they go now (DESIGN: "an operator's explicit action goes now") -------------------

    async def retry(self, name: str, job_id: int) -> JobState | None:
        """Make a pending or dead job due now and send it ahead of the rest. Returns the state it had."""
        assert self.store is not None
        dispatcher = self.dispatchers.get(name)
        if dispatcher is not None:
            with contextlib.suppress(TimeoutError):  # a delivery under way ends within its timeout
                async with asyncio.timeout(dispatcher.integration.delivery.timeout + _SETTLE_MARGIN):
                    await dispatcher.settled(job_id)
        previous = await self.store.retry(name, job_id)
        if previous in (JobState.PENDING, JobState.DEAD) and dispatcher is not None:
            dispatcher.send_now([job_id])
        return previous

    async def replay(self, name: str, **selection: Any) -> int:
        """Re-queue jobs (see Store.replay); they go now, whatever an open circuit or a slow-down pause."""
        assert self.store is not None
        queued = await self.store.replay(name, **selection)
        if queued and name in self.dispatchers:
            self.dispatchers[name].send_now()
        return queued

    def close_circuit(self, name: str) -> str | None:
        """Close an integration's circuit by hand. Returns the state it had, None if it is not running."""
        dispatcher = self.dispatchers.get(name)
        return dispatcher.close_circuit() if dispatcher is not None else None

    def held_by(self, name: str) -> str | None:
        """Why the jobs of an integration cannot go now, or None when they can."""
        integration = self.config.integration(name)
        if integration is None:
            return "the integration is not in the configuration: its jobs wait until it returns"
        if not integration.enabled:
            return "the integration is disabled in the configuration (enabled: false)"
        dispatcher = self.dispatchers.get(name)
        if dispatcher is None:
            return "the integration is not running"
        gate = dispatcher.gate
        if gate.disabled is not None:
            return f"the integration is disabled: {gate.disabled[1]}; `eventrelay enable {name}` turns it on"
        if gate.paused_at is not None:
            return f"the integration is paused by an operator; `eventrelay resume {name}` lets it deliver again"
        if gate.unwritable:
            return "delivery outcomes cannot be written to the database (see the daemon's log)"
        return None

    def integration_state(self, name: str) -> IntegrationState | None:
        """What the admin API shows of a running integration's delivery (admin.view.ServiceView)."""
        dispatcher = self.dispatchers.get(name)
        if dispatcher is None:
            return None
        gate, now = dispatcher.gate, time.time()
        circuit = gate.breaker.state
        return IntegrationState(circuit, gate.breaker.opened_until if circuit == CircuitBreaker.OPEN else None,
                                gate.paused_until if gate.paused_until > now else None, gate.disabled,
                                dispatcher.in_flight, gate.unwritable, gate.paused_at)

    # -- listeners -----------------------------------------------------------------------------------------

    async def _listen(self, config: Config) -> None:
        listen = config.listen
        assert self._ingestor is not None and self.store is not None
        if listen.socket is not None:
            self._socket = SocketIngest(self._ingestor, listen)
            await self._socket.start()
        self._http = HttpIngest(self._ingestor, config, self.is_ready, self._tracing)
        # aiohttp's keep-alive timeout also closes a connection that never sends a request.
        admin, console = AdminApi(self, self.store, self._http.access), Console(self._http.access)

        def routes(app: web.Application) -> None:
            admin.add_routes(app)
            console.add_routes(app)

        self._http_runner = web.AppRunner(self._http.app(routes), access_log=None, shutdown_timeout=_INGEST_DRAIN,
                                          keepalive_timeout=listen.idle_timeout)
        await self._http_runner.setup()
        assert self._http_runner.server is not None
        self._http.serve_events_first(self._http_runner.server)
        ingestor = self._ingestor
        self._http_cap = ConnectionCap(self._http_runner.server, listen.max_connections, listen.request_timeout,
                                       lambda: ingestor.refused_connection("http"))
        self._http_cap.start()
        if listen.http is not None:
            await self._bind_http(listen.http)
            if listen.tls is None and not is_loopback(listen.http[0]):
                log.warning("the HTTP listener takes plain http:// beyond this host: tokens and events cross the "
                            "network readable; set listen.tls (or put a TLS proxy in front)",
                            http=_fmt_addr(listen.http))

    async def _bind_http(self, address: tuple[str, int]) -> None:
        # aiohttp's Server is the protocol factory, as its low-level server docs show; a site would not let
        # the connection cap stand in front of it.
        assert self._http_cap is not None
        tls = self.config.listen.tls
        context = server_context(tls) if tls is not None else None
        # A TLS connection reaches the connection cap only once its handshake is done: bound the handshake
        # by the time a whole request may take, so silent connections cannot hold descriptors for a minute.
        server = await asyncio.get_running_loop().create_server(
            self._http_cap, *address, backlog=128, ssl=context,
            ssl_handshake_timeout=self.config.listen.request_timeout if context is not None else None)
        self._tls_context = context
        old, self._http_server = self._http_server, server
        if old is not None:
            old.close()  # stops accepting there; requests already inside are answered
        bound = server.sockets[0].getsockname()  # port 0 became a real port
        self.http_address = (bound[0], bound[1])

    async def _stop_listening(self) -> None:
        # Both listeners stop accepting at once; requests already inside get to finish (their events may be
        # committing right now) while new ones are refused.
        stopping = []
        if self._socket is not None:
            socket, self._socket = self._socket, None
            stopping.append(socket.stop(_INGEST_DRAIN))
        if self._http_server is not None:
            self._http_server.close()
            self._http_server = None
        if self._http_runner is not None:
            runner, self._http_runner = self._http_runner, None
            stopping.append(runner.cleanup())
        await asyncio.gather(*stopping)
        if self._http_cap is not None:  # its request timeouts held while the open requests drained
            cap, self._http_cap = self._http_cap, None
            await cap.close()

    # -- reload --------------------------------------------------------------------------------------------

    async def _reload_on_request(self, stop: asyncio.Event) -> None:
        while True:
            stopping = asyncio.ensure_future(stop.wait())
            requested = asyncio.ensure_future(self._reload_requested.wait())
            await asyncio.wait([stopping, requested], return_when=asyncio.FIRST_COMPLETED)
            stopping.cancel()
            requested.cancel()
            if stop.is_set():
                return
            self._reload_requested.clear()
            await self.reload()

    async def reload(self) -> ReloadResult:
        """Read the file again; apply it by difference if valid, else keep serving the old configuration."""
        async with self._reload_lock:  # a storm of SIGHUPs reloads one at a time
            self.notifier.reloading()
            result = ReloadResult(time.time(), False, ("reload did not finish",))
            try:
                result = await self._reload()
            finally:
                # READY=1 must follow RELOADING=1 whatever happened, or systemd waits out its timeout.
                self.last_reload = result
                self.metrics.reloads.labels("ok" if result.ok else "failed").inc()
                try:
                    status = await self._status_line()
                except StoreError as e:
                    status = f"database unavailable: {e}"
                if not result.ok:
                    status = f"reload failed ({len(result.errors)} error(s)), previous configuration kept; {status}"
                self.notifier.ready(status)
            if self._runtime is not None:
                self._runtime.refresh(self)  # a listener may have moved (or a failed apply moved it halfway)
            return result

    async def _reload(self) -> ReloadResult:
        path = self.config.source
        try:
            if path is None:
                raise config_module.ConfigError("<config>", ["the configuration was not read from a file"])
            new = await asyncio.to_thread(config_module.load, path)  # seconds of CPU for a large file
        except config_module.ConfigError as e:
            for error in e.errors:
                log.error("reload refused: invalid configuration; still running the previous one", error=error)
            return ReloadResult(time.time(), False, tuple(e.errors))
        try:
            ensure_descriptors(new)  # before binding anything the new configuration allows
            changes = await self._apply(new)
        except OSError as e:  # e.g. a new listen address already in use
            log.error("reload failed; still running the previous configuration where it could", error=str(e))
            return ReloadResult(time.time(), False, (str(e),))
        if self.store is not None:
            self.store.announce(__version__, self.config.fingerprint())
        log.info("configuration reloaded", changes=list(changes) or "none")
        return ReloadResult(time.time(), True, changes=tuple(changes))

    async def _apply(self, new: Config) -> list[str]:
        old = self.config
        changes: list[str] = []
        o, n = old.storage, new.storage
        if n.engine_settings != o.engine_settings:
            log.warning("storage settings other than retention take effect at the next restart (backend, path, "
                        "synchronous, file_mode, dsn, schema, pool, lease)")
            new = replace(new, storage=replace(n, path=o.path, backend=o.backend, postgresql=o.postgresql,
                                               synchronous=o.synchronous, file_mode=o.file_mode))
        if new.tracing != old.tracing:
            log.warning("tracing settings take effect at the next restart")
            new = replace(new, tracing=old.tracing)
        o_tls, n_tls = old.listen.tls, new.listen.tls
        if (o_tls is None) != (n_tls is None) or (o_tls and n_tls and o_tls.client_ca_file != n_tls.client_ca_file):
            # The listening socket keeps its TLS setup: binding a second one on the same address would fail.
            log.warning("listen.tls switched on or off, or a new client_ca_file, takes effect at the next restart "
                        "(certificates renewed at the same paths are read again now)")
            new = replace(new, listen=replace(new.listen, tls=replace(n_tls, client_ca_file=o_tls.client_ca_file)
                                              if o_tls and n_tls else o_tls))
        if new.listen.idle_timeout != old.listen.idle_timeout:
            # Like storage: the running value stays the one in force (and the one the status shows).
            log.warning("listen.idle_timeout takes effect at the next restart")
            new = replace(new, listen=replace(new.listen, idle_timeout=old.listen.idle_timeout))
        await self._apply_listen(old, new, changes)
        if new.log != old.log:
            log_setup.setup(new.log)
            for dispatcher in self.dispatchers.values():
                dispatcher.refresh_logger()
            changes.append("log settings")

        # Integrations, by name: unchanged ones keep running untouched.
        def running(config: Config) -> dict[str, Integration]:
            return {i.name: i for i in config.integrations if i.enabled}

        before, after = running(old), running(new)
        queue_source_changed = (new.event_source, new.store_id) != (old.event_source, old.store_id)
        changed = [n for n in before.keys() & after.keys() if before[n] != after[n] or
                   (queue_source_changed and targets.get(after[n].integration_type).uses_event_source)]
        removed = [n for n in before if n not in after]
        added = [n for n in after if n not in before]
        # Route new events by the new table first: from here on nothing is queued for a removed integration.
        assert self._ingestor is not None
        self._ingestor.router = Router(new.integrations)
        self.config = new
        await self._stop_dispatchers(sorted(removed + changed), new.shutdown_grace)
        for name in sorted(added + changed):
            if name in changed and name in self._disabled:
                await self.enable(name)  # the operator changed it, presumably fixing what the 410 was about
            self._start_dispatcher(after[name])
        changes += [f"added {n}" for n in sorted(added)] + [f"removed {n}" for n in sorted(removed)]
        changes += [f"changed {n}" for n in sorted(changed)]
        return changes

    async def _apply_listen(self, old: Config, new: Config, changes: list[str]) -> None:
        o, n = old.listen, new.listen
        assert self._http is not None and self._ingestor is not None
        self._http.update(new)
        if self._http_cap is not None:
            self._http_cap.limit = n.max_connections
            self._http_cap.request_timeout = n.request_timeout
        if n.tls is not None and self._tls_context is not None and n.http == o.http:
            # Certificates renewed in place (certbot, say) are read again; new handshakes use them.
            try:
                self._tls_context.load_cert_chain(str(n.tls.cert_file), str(n.tls.key_file) if n.tls.key_file else None)
                changes.append("listener certificate read again")
            except (ssl.SSLError, OSError) as e:
                log.error("cannot read the listener's certificate again; the one loaded before stays in use",
                          error=str(e))
        if n.http != o.http:
            if n.http is None:
                if self._http_server is not None:
                    self._http_server.close()
                self._http_server, self.http_address = None, None
            else:
                await self._bind_http(n.http)
            changes.append(f"http listener {_fmt_addr(n.http) or 'off'}{' (TLS)' if n.tls else ''}")
        if n.socket != o.socket:
            # Bind the new socket before closing the old one: producers always have somewhere to send.
            fresh = None
            if n.socket is not None:
                fresh = SocketIngest(self._ingestor, n)
                await fresh.start()
            if self._socket is not None:
                await self._socket.stop(_INGEST_DRAIN)
            self._socket = fresh
            changes.append(f"socket listener {n.socket or 'off'}")
        elif self._socket is not None:
            self._socket.update(n)
            if n.socket_mode != o.socket_mode and n.socket is not None:
                n.socket.chmod(n.socket_mode)

    # -- housekeeping --------------------------------------------------------------------------------------

    async def _prune_forever(self, stop: asyncio.Event) -> None:
        """Delete what retention no longer keeps, in small batches, so the database stops growing."""
        assert self.store is not None
        while not stop.is_set():
            # First wait: start-up is for recovering deliveries, not for cleaning.
            if await wait_event(stop, self.config.storage.prune_interval):
                return
            now = time.time()
            storage = self.config.storage
            try:
                pruned = 0
                while not stop.is_set():
                    n = await self.store.prune(now - storage.retention, now - storage.dead_retention)
                    if n == 0:
                        break
                    pruned += n
                    await asyncio.sleep(0.01)  # let ingest and outcomes through between batches
                if pruned:
                    log.info("pruned past retention", rows=pruned)
            except StoreError as e:
                log.error("pruning failed; will try again", error=str(e))

    async def _follow_shared_state(self, stop: asyncio.Event) -> None:
        """With daemons sharing the store: follow the 410-disabled states the others record, and enables by an
        operator on any of them, so every daemon stops (or resumes) sending, not only the one that heard it."""
        assert self.store is not None
        if not self.store.shared:
            return  # this daemon is the store's only one: its own dispatchers changed the state
        while not await wait_event(stop, _SHARED_STATE_EVERY):
            read_at, actions = time.time(), self._operator_actions
            try:
                stored = await self.store.disabled()
                paused = await self.store.paused()
            except StoreError:
                continue  # the dispatchers say it when the database is away
            if actions == self._operator_actions:  # else this daemon's own pause or resume outran the read
                self._follow_pauses(paused)
            for name, dispatcher in self.dispatchers.items():
                local = dispatcher.gate.disabled
                if name in stored and local is None:
                    log.warning("integration disabled by another daemon: its target answered 410 Gone",
                                integration=name, reason=stored[name][1])
                    dispatcher.disable(stored[name])
                elif name not in stored and local is not None and 0 < dispatcher.disabled_recorded_at < read_at:
                    # An enable elsewhere, not this daemon's own 410 whose record is still on its way.
                    log.info("integration enabled again on another daemon", integration=name)
                    dispatcher.enable()
            self._disabled = stored

    def _follow_pauses(self, paused: dict[str, float]) -> None:
        """Pauses and resumes an operator made on another daemon."""
        for name, dispatcher in self.dispatchers.items():
            if name in paused and dispatcher.gate.paused_at is None:
                log.info("integration paused by an operator on another daemon", integration=name)
                dispatcher.pause(paused[name])
            elif name not in paused and dispatcher.gate.paused_at is not None:
                log.info("integration resumed by an operator on another daemon", integration=name)
                dispatcher.resume()
        self._paused = paused

    async def _report_status(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            if not await wait_event(stop, _STATUS_EVERY) and self.notifier.enabled:
                with contextlib.suppress(StoreError):
                    self.notifier.status(await self._status_line())

    async def _status_line(self) -> str:
        assert self.store is not None
        counts = await self.store.job_counts()
        pending = sum(n for (_, state), n in counts.items() if state == JobState.PENDING)
        dead = sum(n for (_, state), n in counts.items() if state == JobState.DEAD)
        return f"{len(self.dispatchers)} integrations, {pending} jobs pending, {dead} dead"

    async def refresh_gauges(self) -> None:
        """Read the backlog gauges from the database, just before /metrics renders them."""
        assert self.store is not None
        counts = await self.store.job_counts()
        oldest = await self.store.oldest_pending()
        now = time.time()
        m = self.metrics
        for integration in self.config.integrations:
            name = integration.name
            m.backlog.labels(name).set(counts.get((name, JobState.PENDING), 0))
            m.dead.labels(name).set(counts.get((name, JobState.DEAD), 0))
            dispatcher = self.dispatchers.get(name)
            m.in_flight.labels(name).set(dispatcher.in_flight if dispatcher else 0)
            m.oldest_pending.labels(name).set(now - oldest[name] if name in oldest else 0)


def _fmt_addr(address: tuple[str, int] | None) -> str | None:
    if address is None:
        return None
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
