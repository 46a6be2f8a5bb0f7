"""What the HTTP address answers while the daemon waits at start-up for its database: 503 with the reason,
so a producer, a load balancer's /readyz and an operator's curl all learn why, instead of a refused
connection. /healthz answers 200: the process is alive."""

from __future__ import annotations

from aiohttp import web

from .errors import error_response


class StartingListener:
    def __init__(self) -> None:
        self.reason = "starting: opening the database"
        self._runner: web.AppRunner | None = None

    async def start(self, address: tuple[str, int]) -> None:
        app = web.Application()
        app.router.add_route("*", "/healthz", self._alive)
        app.router.add_route("*", "/{tail:.*}", self._starting)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
        await self._runner.setup()
        await web.TCPSite(self._runner, *address).start()

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _alive(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "starting", "detail": self.reason})

    async def _starting(self, request: web.Request) -> web.Response:
        return error_response(503, self.reason, headers={"Retry-After": "5"})
