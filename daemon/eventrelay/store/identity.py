"""Who this daemon is to the others sharing its store, and what it last announced of itself."""

from __future__ import annotations

import os
import secrets
import socket
import time

from .api import DaemonView


class Identity:
    def __init__(self) -> None:
        self.host = socket.gethostname()
        self.pid = os.getpid()
        # Host and pid say where to look; the random part keeps a restarted daemon that got the same pid apart.
        self.id = f"{self.host}:{self.pid}:{secrets.token_hex(3)}"
        self.started_at = time.time()
        self.version = ""
        self.config_hash = ""

    def announce(self, version: str, config_hash: str) -> None:
        self.version, self.config_hash = version, config_hash

    def view(self, last_seen: float) -> DaemonView:
        return DaemonView(self.id, self.host, self.pid, self.version, self.config_hash, self.started_at, last_seen)
