"""The CLI side of the admin API: finding the running daemon, and the HTTP client that talks to it.

Each command finds the daemon by itself, so on the daemon's host `eventrelay status` needs no arguments: first
from the runtime file every running daemon writes (eventrelay/runtime.py: its pid, its admin address as bound,
its config file), the one for `--config`/$EVENTRELAY_CONFIG or, without either, the only daemon running; then,
when no daemon recorded one, from the YAML file it runs on (`listen.http`). The token is `listen.token` of that
file. `--url` and `--token` override both.

Every failure is an `AdminError` carrying its exit code (see commands.py); `with_daemon` runs a command's body
against the daemon and turns them into a message and that code.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import ssl
import sys
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from .. import config as config_module
from .. import runtime
from ..units import http_url
from .printing import indent, one_line, table

EXIT_OK = 0
EXIT_SERVER_ERROR = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_INTERRUPTED = 130

DEFAULT_CONFIG = "/etc/eventrelay/config.yaml"
CONFIG_ENV = "EVENTRELAY_CONFIG"
CLIENT_CERT_ENV, CLIENT_KEY_ENV = "EVENTRELAY_CLIENT_CERT", "EVENTRELAY_CLIENT_KEY"
# A token on the command line is visible to every local user in `ps`; the environment is not.
TOKEN_ENV = "EVENTRELAY_TOKEN"

# Connecting is local and instant when the daemon runs; reading may wait behind a large replay batch.
_TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=60)


# -- errors, each with its exit code -------------------------------------------------------------------------

class AdminError(Exception):
    exit_code = EXIT_SERVER_ERROR


class UsageError(AdminError):
    exit_code = EXIT_USAGE


class Unreachable(AdminError):
    exit_code = EXIT_UNREACHABLE


class ServerError(AdminError):
    """The daemon answered 4xx/5xx. `details` are the `detail` (or `title`) of each of its errors; `meta` the
    answer's `meta`, what a command may act on (a delivered job's replay range, say)."""

    def __init__(self, status: int, details: list[str], hint: str = "", meta: dict[str, Any] | None = None):
        self.status = status
        self.details = details
        self.hint = hint
        self.meta = meta or {}
        super().__init__("; ".join(details))


# -- finding the daemon ----------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Target:
    url: str  # base URL without a trailing slash, e.g. http://127.0.0.1:8787
    token: str | None
    config: str | None = field(default=None, compare=False)  # the daemon's config file, when known
    # Why the admin token could not be read from that file: said if the daemon then wants a token.
    token_problem: str | None = field(default=None, compare=False)
    tls: config_module.ListenTls | None = field(default=None, compare=False)  # the listener's, when it has TLS


def target_from(config_path: str | None, url: str | None, token: str | None) -> Target:
    """Where the daemon listens and the token it wants.

    The address: `url` if given; else the runtime file of the running daemon (see eventrelay/runtime.py): the one
    for `config_path` (else $EVENTRELAY_CONFIG), or with neither the only daemon running; else the config
    file's `listen.http` (`config_path`, else $EVENTRELAY_CONFIG, else /etc/eventrelay/config.yaml). The
    token is `token`, else $EVENTRELAY_TOKEN, else `listen.token` of that config; an empty token means "send
    none". Raises UsageError with what to do when none of this tells.
    """
    if token is None:
        token = os.environ.get(TOKEN_ENV)
    if url is not None and token is not None:
        return Target(_normalise_url(url), token or None)
    named = config_path or os.environ.get(CONFIG_ENV) or None
    lookup = None
    if url is None:
        lookup = runtime.find(named)
        if lookup.live:
            return _target_of(_one_daemon(lookup.live), token)
    return _target_from_config(config_path, url, token, lookup)


def _one_daemon(live: list[runtime.Record]) -> runtime.Record:
    if len(live) == 1:
        return live[0]
    rows = [[r.config, r.url or "(no HTTP listener)", f"pid {r.pid}"] for r in live]
    raise UsageError(f"{len(live)} eventrelay daemons run on this host; say which with --config FILE "
                     f"(or ${CONFIG_ENV}):\n" + indent(table(["CONFIG", "ADMIN URL", "PID"], rows)))


def _target_of(daemon: runtime.Record, token: str | None) -> Target:
    if daemon.url is None:
        raise UsageError(f"the daemon of {daemon.config} (pid {daemon.pid}) serves no HTTP, and the admin API "
                         "with it: set listen.http (e.g. 127.0.0.1:8787) and reload or restart it")
    problem, tls = None, None
    # The file the daemon runs on, which may have been edited since: only `listen` and `auth` matter, so a broken
    # integration (the reason a reload failed, say) does not stop the command.
    try:
        sections = _access_sections(daemon.config)
        tls = sections.listen.tls
        if token is None:
            token = _admin_token(sections)
    except config_module.ConfigError as e:
        problem = f"the admin token could not be read from {e.source}: {'; '.join(e.errors)}"
    return Target(daemon.url, token or None, daemon.config, problem, tls)


def _target_from_config(config_path: str | None, url: str | None, token: str | None,
                        lookup: runtime.Lookup | None) -> Target:
    """No daemon recorded a runtime file (an older one, another user's, or none running): the config file."""
    explicit = config_path is not None
    path = config_path or os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG
    tried = f"\n{lookup.tried()}" if lookup is not None else ""
    try:
        sections = _access_sections(path)
        listen = sections.listen
    except config_module.ConfigError as e:
        if url is not None and not explicit:
            # --url alone: the file was only consulted for a token, and this host may not have one.
            return Target(_normalise_url(url), None)
        problems = "\n".join(f"  {error}" for error in e.errors)
        raise UsageError(f"cannot find the daemon from {e.source}:\n{problems}{tried}\n"
                         f"start it with `eventrelay run --config FILE`; if it runs, give its file with --config "
                         f"(or ${CONFIG_ENV}), or its address with --url") from None
    if token is None:
        token = _admin_token(sections)
    if url is not None:
        return Target(_normalise_url(url), token or None, path, tls=listen.tls)
    if listen.http is None:
        raise UsageError(f"{path}: listen.http is null, so the daemon serves no HTTP and the admin API with it; "
                         "set listen.http (e.g. 127.0.0.1:8787) and restart it")
    host, port = listen.http
    if port == 0:
        raise UsageError(f"{path}: listen.http has port 0 (any free port) and no running daemon recorded the port "
                         f"it took{tried}\npass --url with the port the daemon logged when it became ready")
    # A daemon listening on every address is reached on loopback: the wildcard is not an address to call.
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    scheme = "https" if listen.tls is not None else "http"
    return Target(f"{scheme}://{_bracket(host)}:{port}", token or None, path, tls=listen.tls)


def _admin_token(config: config_module.Config) -> str | None:
    tokens = config.admin_tokens
    return tokens[0] if tokens else None


def _access_sections(path: str) -> config_module.Config:
    """The config at `path`, for its `listen` and `auth` sections (the address, the TLS and an admin token)."""
    try:
        return config_module.load(path)
    except config_module.ConfigError as e:
        full_error = e
    # The daemon runs with secrets from its unit's EnvironmentFile, which an operator's shell lacks: an
    # integration's ${AWS_SECRET} must not stop `eventrelay status`. Only `listen` and `auth` matter here, so
    # judge those sections alone (with the same validation and ${VAR} expansion) before giving up.
    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f)
        kept = {k: raw.get(k) for k in ("listen", "auth")} if isinstance(raw, dict) else {}
        return config_module.parse(yaml.safe_dump(kept), source=Path(path))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        raise full_error from None
    except config_module.ConfigError as e:
        raise config_module.ConfigError(full_error.source, e.errors) from None


def _normalise_url(url: str) -> str:
    url = url.strip().rstrip("/")
    if "://" not in url:
        url = f"http://{url}"  # `--url 127.0.0.1:8787` is what people type
    try:
        return http_url(url)
    except ValueError:
        raise UsageError(f"--url {url!r} is not an http(s) URL (e.g. http://127.0.0.1:8787)") from None


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host else host


# -- the HTTP client ---------------------------------------------------------------------------------------------

def _tls_context(target: Target) -> ssl.SSLContext:
    """For a daemon with listen.tls: its own certificate is what is trusted (the command reads the same file),
    so a private CA or a self-signed certificate needs nothing more, and the name in it need not be the
    loopback address called. A listener that requires client certificates gets the one in
    $EVENTRELAY_CLIENT_CERT (and $EVENTRELAY_CLIENT_KEY)."""
    if target.tls is None:
        return ssl.create_default_context()  # --url https://…: the system's CAs
    # The first certificate of the file is the daemon's own; a chain after it (fullchain.pem) is not trusted,
    # or any certificate its public intermediate issued would be.
    with open(target.tls.cert_file, encoding="ascii", errors="replace") as f:
        pem = f.read()
    end = pem.find("-----END CERTIFICATE-----")
    start = pem.rfind("-----BEGIN CERTIFICATE-----", 0, end)
    if start < 0 or end < 0:
        raise UsageError(f"{target.tls.cert_file}: no PEM certificate to trust the daemon by")
    context = ssl.create_default_context(cadata=pem[start:end + len("-----END CERTIFICATE-----")])
    context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN  # the daemon's certificate itself is the anchor
    context.check_hostname = False  # exactly that certificate, whatever name it carries (we call loopback)
    cert = os.environ.get(CLIENT_CERT_ENV)
    if cert:
        context.load_cert_chain(cert, os.environ.get(CLIENT_KEY_ENV) or None)
    return context


class Client:
    """The daemon's admin API, one session for a command: `data` documents back, failures as AdminErrors."""

    def __init__(self, target: Target):
        self.target = target
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Client:
        headers = {"Accept": "application/json"}
        if self.target.token:
            headers["Authorization"] = f"Bearer {self.target.token}"
        # trust_env stays off: the daemon is local, and an HTTP proxy from the environment must not see the token.
        connector = aiohttp.TCPConnector(ssl=_tls_context(self.target)) if self.target.url.startswith("https") else None
        self._session = aiohttp.ClientSession(timeout=_TIMEOUT, headers=headers, connector=connector)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._session is not None
        await self._session.close()

    async def get(self, path: str, params: dict[str, str] | None = None) -> dict[str, Any]:
        return await self._request("GET", path, params=params)

    async def post(self, path: str, body: Any) -> dict[str, Any]:
        return await self._request("POST", path, body=body)

    async def _request(self, method: str, path: str, *, params: dict[str, str] | None = None,
                       body: Any = None) -> dict[str, Any]:
        assert self._session is not None
        url = self.target.url + path
        try:
            async with self._session.request(method, url, params=params,
                                             json=body if method == "POST" else None) as resp:
                text = await resp.text(errors="replace")
                status = resp.status
        except aiohttp.ClientConnectorError as e:
            raise Unreachable(_unreachable(self.target.url, _reason(e.os_error) or str(e))) from None
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as e:
            raise Unreachable(_unreachable(self.target.url, str(e) or type(e).__name__)) from None
        except TimeoutError:
            raise Unreachable(_unreachable(self.target.url, "no answer in time")) from None
        try:
            document = json.loads(text) if text else None
        except ValueError:
            document = None
        if status >= 400:
            raise self._error(status, document, text)
        if not isinstance(document, dict) or "data" not in document:
            raise ServerError(status, [f"{method} {url} answered {status} without a JSON `data` member: "
                                       "is that eventrelay, and recent enough to have the admin API?"])
        return document

    def _error(self, status: int, document: Any, text: str) -> ServerError:
        errors = document.get("errors") if isinstance(document, dict) else None
        if not isinstance(errors, list):
            errors = []
        details = [str(e.get("detail") or e.get("title") or status) for e in errors if isinstance(e, dict)]
        if not details:
            details = [f"HTTP {status}: {one_line(text, 200) or 'no details'}"]
        hint = ""
        if status == 401:
            hint = (f"the token comes from --token, ${TOKEN_ENV} or listen.token in the config; "
                    "it must equal the running daemon's listen.token")
            if self.target.token_problem:
                hint += f" ({self.target.token_problem})"
        elif status == 404 and details == ["Not Found"]:
            hint = "the daemon does not know this path: is it older than this eventrelay command?"
        meta = document.get("meta") if isinstance(document, dict) else None
        return ServerError(status, details, hint, meta if isinstance(meta, dict) else None)


def _reason(error: OSError | None) -> str | None:
    # asyncio's strerror is "Connect call failed ('127.0.0.1', 8787)"; the errno's text says why it failed.
    if error is None:
        return None
    if isinstance(error.errno, int) and error.errno > 0:
        return os.strerror(error.errno)
    return error.strerror or None


def _unreachable(url: str, reason: str) -> str:
    return f"cannot reach the daemon ({reason}): is eventrelay running? tried {url}"


# -- running a command ----------------------------------------------------------------------------------------

Body = Callable[[Client, argparse.Namespace], Coroutine[Any, Any, int]]


def with_daemon(args: argparse.Namespace, body: Body) -> int:
    """Find the daemon, run `body` against it, and turn every failure into its message and exit code."""
    try:
        target = target_from(args.config, args.url, args.token)

        async def main() -> int:
            async with Client(target) as client:
                return await body(client, args)

        return asyncio.run(main())
    except ServerError as e:
        for detail in e.details:
            print(f"eventrelay: {detail}", file=sys.stderr)
        if e.hint:
            print(f"eventrelay: {e.hint}", file=sys.stderr)
        return e.exit_code
    except AdminError as e:
        print(f"eventrelay: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("eventrelay: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
