"""`eventrelay receive`: a local webhook receiver for people wiring up an integration.

It prints each delivery and checks what a real receiver should check, so a misconfigured secret or
event filter shows up on the first try rather than in production.
"""

from __future__ import annotations

import hmac
import json
import sys
from datetime import datetime
from typing import TextIO

from aiohttp import web


class DebugReceiver:
    def __init__(self, secret_key: str | None, status: int, out: TextIO = sys.stdout):
        self._secret = secret_key
        self._status = status
        self._out = out
        self.received = 0

    def app(self) -> web.Application:
        app = web.Application(client_max_size=16 * 1024 * 1024)
        app.router.add_post("/{tail:.*}", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.Response:
        self.received += 1
        body = await request.read()
        problems = []
        if request.content_type != "application/json":
            problems.append(f"Content-Type is {request.content_type!r}, expected application/json")
        try:
            envelope = json.loads(body)
        except ValueError as e:
            envelope = {}
            problems.append(f"body is not JSON: {e}")
        trigger = request.headers.get("X-MOLTIN-INTEGRATION-TRIGGER")
        if trigger != envelope.get("triggered_by"):
            problems.append(f"X-MOLTIN-INTEGRATION-TRIGGER {trigger!r} differs from triggered_by "
                            f"{envelope.get('triggered_by')!r}")
        given = request.headers.get("X-MOLTIN-SECRET-KEY")
        if self._secret is not None and not hmac.compare_digest((given or "").encode(), self._secret.encode()):
            problems.append("X-MOLTIN-SECRET-KEY missing" if given is None else "X-MOLTIN-SECRET-KEY is wrong")
        stamp = datetime.now().strftime("%H:%M:%S.%f")[:-3]
        print(f"{stamp} POST {request.path} {envelope.get('triggered_by')} id={envelope.get('id')} "
              f"attempt={envelope.get('attempt')} integration={envelope.get('integration', {}).get('name')} "
              f"{len(body)} bytes", file=self._out)
        print("  " + json.dumps(envelope.get("payload"), ensure_ascii=False)[:500], file=self._out)
        for problem in problems:
            print(f"  PROBLEM: {problem}", file=self._out)
        self._out.flush()
        if problems and self._secret is not None and "X-MOLTIN-SECRET-KEY" in " ".join(problems):
            return web.Response(status=401, text="bad secret key")
        return web.Response(status=self._status)


def serve(host: str, port: int, secret_key: str | None, status: int) -> None:
    receiver = DebugReceiver(secret_key, status)
    print(f"eventrelay test receiver on http://{host}:{port}/ (answering {status}); Ctrl-C to stop", flush=True)
    web.run_app(receiver.app(), host=host, port=port, print=None, access_log=None)
