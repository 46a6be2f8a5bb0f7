"""Wires the parts together and owns every task: start, serve, drain on stop."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

import structlog
from aiohttp import web

from . import __version__
from .config import Config
from .delivery.dispatcher import Dispatcher
from .delivery.senders import make_sender
from .ingest import Ingestor, Router
from .ingest.http import HttpIngest
from .ingest.socket import SocketIngest
from .store import Store

log = structlog.get_logger(component="service")

USER_AGENT = f"eventrelay/{__version__}"
_INGEST_DRAIN = 5.0  # seconds open requests get to finish once we stop listening


class Service:
    """One running daemon. `serve` returns when `stop` has been set and everything has drained."""

    def __init__(self, config: Config):
        self.config = config
        self.store: Store | None = None
        self.dispatchers: dict[str, Dispatcher] = {}
        self.http_address: tuple[str, int] | None = None
        self._ready = False
        self._http_runner: web.AppRunner | None = None
        self._socket: SocketIngest | None = None

    async def is_ready(self) -> bool:
        return self._ready and self.store is not None and await self.store.ping()

    async def serve(self, stop: asyncio.Event, on_ready: Callable[[], None] = lambda: None) -> None:
        config = self.config
        self.store = store = await Store.open(config.storage.path, config.storage.synchronous)
        store.on_jobs_added = self._wake
        try:
            async with asyncio.TaskGroup() as tasks:
                writer = tasks.create_task(store.run_writer(), name="store-writer")
                running = {}
                for integration in config.integrations:
                    if integration.enabled:
                        d = Dispatcher(integration, store, make_sender(integration, USER_AGENT, config.event_source))
                        self.dispatchers[d.name] = d
                        running[d.name] = tasks.create_task(d.run(), name=f"dispatcher:{d.name}")
                ingestor = Ingestor(store, Router(config.integrations))
                await self._listen(ingestor)
                self._ready = True
                log.info("ready", version=__version__, http=_fmt_addr(self.http_address),
                         socket=str(config.listen.socket) if config.listen.socket else None,
                         integrations=len(self.dispatchers), database=str(config.storage.path))
                on_ready()
                await stop.wait()
                self._ready = False
                log.info("stopping: no new events accepted; draining deliveries",
                         grace_s=config.shutdown_grace)
                await self._stop_listening()
                await self._drain(list(running.values()), config.shutdown_grace)
                store.stop_writer()
                await writer
        finally:
            self._ready = False
            await self._stop_listening()
            await store.close()
        log.info("stopped")

    def _wake(self, names: set[str]) -> None:
        for name in names:
            dispatcher = self.dispatchers.get(name)
            if dispatcher is not None:
                dispatcher.wake()

    async def _listen(self, ingestor: Ingestor) -> None:
        listen = self.config.listen
        if listen.socket is not None:
            self._socket = SocketIngest(ingestor, listen.socket, listen.socket_mode, listen.max_body_size)
            await self._socket.start()
        if listen.http is not None:
            app = HttpIngest(ingestor, listen.token, listen.max_body_size, self.is_ready).app()
            self._http_runner = web.AppRunner(app, access_log=None, shutdown_timeout=_INGEST_DRAIN)
            await self._http_runner.setup()
            host, port = listen.http
            await web.TCPSite(self._http_runner, host, port).start()
            address = self._http_runner.addresses[0]
            self.http_address = (address[0], address[1])

    async def _stop_listening(self) -> None:
        # Requests already inside get to finish (their events may be committing right now); new ones are refused.
        if self._socket is not None:
            socket, self._socket = self._socket, None
            await socket.stop(_INGEST_DRAIN)
        if self._http_runner is not None:
            runner, self._http_runner = self._http_runner, None
            await runner.cleanup()

    async def _drain(self, dispatcher_tasks: list[asyncio.Task[None]], grace: float) -> None:
        for dispatcher in self.dispatchers.values():
            dispatcher.stop()
        if not dispatcher_tasks:
            return
        _, late = await asyncio.wait(dispatcher_tasks, timeout=grace)
        if late:
            in_flight = sum(d.in_flight for d in self.dispatchers.values())
            log.warning("grace period over: abandoning deliveries in flight; they stay pending and are "
                        "delivered again after the restart", jobs=in_flight)
            for task in late:
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.gather(*late, return_exceptions=True)


def _fmt_addr(address: tuple[str, int] | None) -> str | None:
    if address is None:
        return None
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
