"""The YAML configuration, read into frozen dataclasses.

Every problem is collected with the path of the value it concerns (`integrations[1].configuration.url`),
so an operator fixes the whole file in one pass instead of one error per restart. The common sections live
here; each target type declares its own `configuration` section (delivery/targets/), and defaults are
written once, on the dataclass fields.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import re
import socket
import ssl
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import parse_qsl, urlsplit

from .config_yaml import ConfigError, Reader, default, expand_env, load_yaml, read_text
from .delivery import targets
from .catalogue import Catalogue
from .events import EVENT_KEY, Observes, is_observe_pattern
from .filters import FilterError, Test, compile_filter
from .masking import mask, mask_url
from .text import quoted
from .units import (
    boolean, choice, duration_range, file_mode, fraction, header_pairs, header_value, host_port, http_url, int_range,
    nonempty_string, parse_duration, parse_rate, parse_size, positive_duration, ratio, string, template,
    tls_problem, uri_reference,
)

__all__ = ["AuthConfig", "BreakerConfig", "Config", "ConfigError", "DeliveryConfig", "Integration", "ListenConfig",
           "ListenTls", "LogConfig", "PostgresConfig", "RetryConfig", "StorageConfig", "TracingConfig", "load", "mask",
           "mask_url", "parse"]

_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
DEFAULT_DATABASE = "./var/eventrelay.db"  # relative to the config file's folder


@dataclass(frozen=True, slots=True)
class RetryConfig:
    initial: float = 1.0
    max_interval: float = 600.0
    max_age: float = 86400.0
    max_attempts: int | None = None  # dead after this many attempts, or max_age, whichever comes first


@dataclass(frozen=True, slots=True)
class BreakerConfig:
    """When to stop sending to a failing target, and how long to wait before probing it again."""

    failures: int = 5  # consecutive failed attempts that open the circuit
    failure_rate: float = 0.5  # ...or this share of failures among the last `window` attempts
    window: int = 20
    cooldown: float = 5.0  # first wait before a probe; doubles after each failed probe
    max_cooldown: float = 300.0


@dataclass(frozen=True, slots=True)
class DeliveryConfig:
    timeout: float = 10.0  # one attempt in all: connect, send, and the whole answer
    connect_timeout: float = 5.0
    concurrency: int = 8
    retry: RetryConfig = RetryConfig()
    breaker: BreakerConfig = BreakerConfig()
    rate_limit: float | None = None  # deliveries per second at most (token bucket); None: unlimited
    ordering: str = "none"  # none | per_resource
    ordering_key: str = "{data.id}"  # template of the key whose jobs are delivered one at a time, in order
    dead_letter: str | None = None  # another integration that receives jobs that die here


@dataclass(frozen=True, slots=True)
class Integration:
    name: str
    integration_type: str  # a name in the target registry (delivery/targets/)
    observes: tuple[str, ...]
    configuration: Any  # the target type's configuration dataclass (TargetType.config_class)
    delivery: DeliveryConfig
    description: str = ""
    enabled: bool = True
    # The `filter` as written (filters.py; not hashed: it holds mappings); None: every event of the observed types.
    filter: Any = field(default=None, hash=False)
    matcher: Observes = field(init=False, compare=False, repr=False)
    accepts: Test | None = field(init=False, compare=False, repr=False)  # the filter, compiled

    def __post_init__(self) -> None:
        object.__setattr__(self, "matcher", Observes.compile(list(self.observes)))
        object.__setattr__(self, "accepts", compile_filter(self.filter) if self.filter is not None else None)

    def public(self) -> dict[str, Any]:
        """The integration as the daemon shows it: secrets masked to their last four characters."""
        target = targets.get(self.integration_type)
        conf: dict[str, Any] = {}
        renamed: dict[str, Any] = {}
        for f in fields(target.config_class):
            if f.name in target.shown_fields:
                continue
            value = _shown(getattr(self.configuration, f.name), f.name in target.secret_fields,
                           f.name in target.url_fields)
            if f.name not in target.shown_as:
                conf[f.name] = value
            elif value:
                renamed[target.shown_as[f.name]] = value
        if target.shown is not None:  # fields the target type shows its own way (headers, auth)
            renamed.update(target.shown(self.configuration))
        return {"name": self.name, "description": self.description, "enabled": self.enabled,
                "integration_type": self.integration_type, "observes": list(self.observes),
                "filter": self.filter, "configuration": conf | renamed}


def _shown(value: Any, secret: bool, url: bool) -> Any:
    """A configuration value as JSON shows it: secrets masked (each of a tuple), credentials in URLs masked."""
    if secret and isinstance(value, tuple):
        value = tuple(mask(v) for v in value)
    elif secret and value:
        value = mask(value)
    if url and value:
        value = mask_url(value)
    if isinstance(value, tuple):
        return [str(v) for v in value]
    return str(value) if isinstance(value, Path) else value


@dataclass(frozen=True, slots=True)
class ListenTls:
    """HTTPS for the listener: its certificate, and optionally a CA whose client certificates it requires."""

    cert_file: Path
    key_file: Path | None = None  # None: the key is in cert_file
    client_ca_file: Path | None = None


@dataclass(frozen=True, slots=True)
class AuthConfig:
    """Who may do what on the HTTP listener (access.py). listen.token counts as an admin token."""

    ingest_tokens: tuple[str, ...] = ()  # may send events, nothing else
    admin_tokens: tuple[str, ...] = ()  # everything: events, the admin API, the console, /metrics
    allow_unauthenticated: bool = False  # a listener beyond loopback without any token, on purpose


@dataclass(frozen=True, slots=True)
class ListenConfig:
    http: tuple[str, int] | None = ("127.0.0.1", 8787)
    socket: Path | None = None
    socket_mode: int = 0o660
    token: str | None = None
    tls: ListenTls | None = None
    max_body_size: int = 1024 * 1024  # HTTP body, and socket line
    max_depth: int = 64  # JSON nesting
    max_connections: int = 1024  # open connections, on each listener
    idle_timeout: float = 75.0  # seconds a connection may sit without a request (HTTP) or a line (socket)
    request_timeout: float = 30.0  # seconds an HTTP request may take to arrive, headers and body


@dataclass(frozen=True, slots=True)
class PostgresConfig:
    """Where the PostgreSQL engine's database is, and how this daemon shares it with the others."""

    # A libpq URL; the empty string leaves everything to the PG* environment variables and ~/.pgpass. Never
    # shown as is: `shown_dsn` masks the password.
    dsn: str = field(default="", repr=False)
    schema: str = "eventrelay"  # every table lives in this schema
    pool: int = 10  # connections per daemon, besides the one that listens for wake-ups
    lease: float = 30.0  # a claimed job is another daemon's to take once its lease runs out unrenewed

    @property
    def shown_dsn(self) -> str:
        return mask_url(self.dsn) if self.dsn else "(from the PG* environment variables)"


@dataclass(frozen=True, slots=True)
class StorageConfig:
    path: Path
    backend: str = "sqlite"  # or "postgresql"
    postgresql: PostgresConfig | None = None  # set when backend is postgresql
    synchronous: str = "full"
    retention: float = 7 * 86400.0  # delivered jobs, their attempts and their events are pruned after this
    dead_retention: float = 30 * 86400.0
    prune_interval: float = 60.0
    file_mode: int = 0o600  # the database, its WAL and shared memory hold every payload: never world-readable

    @property
    def shown(self) -> str:
        """Where events are stored, as logs and status show it (never a password)."""
        if self.postgresql is not None:
            return f"{self.postgresql.shown_dsn} (schema {self.postgresql.schema})"
        return str(self.path.resolve())

    @property
    def engine_settings(self) -> tuple[Any, ...]:
        """What the engine was opened with: a reload cannot change it (retention and pruning it can)."""
        return self.backend, self.path, self.postgresql, self.synchronous, self.file_mode


@dataclass(frozen=True, slots=True)
class LogConfig:
    level: str = "info"
    format: str = "auto"  # auto: pretty on a TTY, JSON lines otherwise


@dataclass(frozen=True, slots=True)
class TracingConfig:
    """OpenTelemetry traces (tracing.py). What is not set here comes from the standard OTEL_* variables."""

    enabled: bool = False
    endpoint: str | None = None  # the OTLP/HTTP traces URL; None: OTEL_EXPORTER_OTLP_* or localhost:4318
    sampling_ratio: float | None = None  # of new traces (parent-based); None: OTEL_TRACES_SAMPLER, else all
    service_name: str | None = None  # None: OTEL_SERVICE_NAME, else "eventrelay"
    headers: tuple[tuple[str, str], ...] = ()  # sent to the collector, e.g. an API key (shown masked)
    timeout: float = 10.0  # seconds an export may take


def _default_event_source() -> str:
    return f"eventrelay://{socket.gethostname()}"


@dataclass(frozen=True, slots=True)
class Config:
    listen: ListenConfig
    storage: StorageConfig
    delivery: DeliveryConfig
    integrations: tuple[Integration, ...]
    shutdown_grace: float = 10.0
    log: LogConfig = LogConfig()
    auth: AuthConfig = AuthConfig()
    tracing: TracingConfig = TracingConfig()
    event_types: tuple[str, ...] = ()  # declared beside Elastic Path's (catalogue.py)
    event_source: str = field(default_factory=_default_event_source)  # CloudEvents `source` of queue messages
    store_id: str | None = None  # Elastic Path's `storeid` on queue messages, when set
    source: Path | None = None  # the file this was read from

    def integration(self, name: str) -> Integration | None:
        return next((i for i in self.integrations if i.name == name), None)

    @property
    def catalogue(self) -> Catalogue:
        return Catalogue(self.event_types)

    @property
    def admin_tokens(self) -> tuple[str, ...]:
        """auth.admin_tokens, and listen.token (the short form of one admin token)."""
        return self.auth.admin_tokens + ((self.listen.token,) if self.listen.token else ())

    def fingerprint(self) -> str:
        """A short hash of what daemons sharing a store must agree on (integrations, delivery, the queue
        messages' store id), for status to flag a daemon that runs another configuration."""
        shared = repr((self.delivery, self.integrations, self.store_id))
        return hashlib.sha256(shared.encode("utf-8", "surrogatepass")).hexdigest()[:12]


def load(path: str | os.PathLike[str], environ: Mapping[str, str] | None = None) -> Config:
    """Read and validate a config file. Raises ConfigError listing every problem.

    Parsing a large file takes seconds of CPU: the running daemon calls this in a thread, never on its loop.
    """
    path = Path(path)
    return parse(read_text(path), source=path, environ=os.environ if environ is None else environ)


def parse(text: str, source: Path | None = None, environ: Mapping[str, str] | None = None) -> Config:
    name = str(source) if source else "<config>"
    raw = load_yaml(text, name)
    errors: list[str] = []
    base = source.parent if source else Path.cwd()
    try:
        raw = expand_env(raw, "", environ or {}, errors)
        config = _Parser(errors, base).config(raw)
    except (RecursionError, ValueError, TypeError, OverflowError) as e:
        # What no check above names (a list that contains itself, a key too large to print): still an error
        # for the operator, never a traceback.
        raise ConfigError(name, errors + [f"the configuration cannot be read: {type(e).__name__}: {quoted(e)}"]
                          ) from None
    if errors or config is None:
        raise ConfigError(name, errors)
    return replace(config, source=source)


class _Parser(Reader):
    """The common sections; each integration's `configuration` is read by its target type."""

    def config(self, raw: Any) -> Config | None:
        top = self.section(raw, "", ("listen", "storage", "delivery", "integrations", "shutdown_grace", "log",
                                     "auth", "tracing", "event_source", "store_id", "event_types"))
        if raw is not None and not isinstance(raw, dict):
            return None
        listen = self.listen(top.get("listen"))
        storage = self.storage(top.get("storage"))
        grace = self.value(top, "shutdown_grace", "", parse_duration, default(Config, "shutdown_grace"))
        log = self.log(top.get("log"))
        tracing = self.tracing(top.get("tracing"))
        auth = self.auth(top.get("auth"), listen)
        delivery = self.delivery(top.get("delivery"), "delivery", DeliveryConfig())
        event_types = self.event_types(top.get("event_types"))
        integrations = self.integrations(top.get("integrations"), delivery, Catalogue(event_types))
        event_source = self.value(top, "event_source", "", uri_reference, default(Config, "event_source"))
        store_id = self.value(top, "store_id", "", header_value, default(Config, "store_id"), nullable=True)
        return Config(listen=listen, storage=storage, delivery=delivery, integrations=integrations,
                      shutdown_grace=grace, log=log, auth=auth, tracing=tracing, event_source=event_source,
                      store_id=store_id, event_types=event_types)

    def listen(self, raw: Any) -> ListenConfig:
        s = self.section(raw, "listen", ("http", "socket", "socket_mode", "token", "max_body_size", "max_depth",
                                         "max_connections", "idle_timeout", "request_timeout", "tls"))
        d = ListenConfig()
        http = self.value(s, "http", "listen", host_port, d.http, nullable=True)
        sock = self.value(s, "socket", "listen", self.path, d.socket, nullable=True)
        token = self.value(s, "token", "listen", nonempty_string, d.token, nullable=True)
        if http is None and sock is None:
            self.error("listen", "both http and socket are disabled: producers could not reach the daemon")
        tls = self.listen_tls(s.get("tls")) if s.get("tls") is not None else None
        if tls is not None and http is None:
            self.error("listen.tls", "goes with listen.http (it is for the HTTP listener)")
        return ListenConfig(
            http=http, socket=sock, token=token, tls=tls,
            socket_mode=self.value(s, "socket_mode", "listen", file_mode, d.socket_mode),
            max_body_size=self.value(s, "max_body_size", "listen", parse_size, d.max_body_size),
            max_depth=self.value(s, "max_depth", "listen", int_range(2, 10_000), d.max_depth),
            max_connections=self.value(s, "max_connections", "listen", int_range(1, 1_000_000), d.max_connections),
            idle_timeout=self.value(s, "idle_timeout", "listen", positive_duration, d.idle_timeout),
            request_timeout=self.value(s, "request_timeout", "listen", positive_duration, d.request_timeout),
        )

    def storage(self, raw: Any) -> StorageConfig:
        s = self.section(raw, "storage", ("backend", "path", "synchronous", "retention", "dead_retention",
                                          "prune_interval", "file_mode", *_POSTGRES_KEYS))
        backend = self.value(s, "backend", "storage", choice("sqlite", "postgresql"), default(StorageConfig, "backend"))
        if backend == "postgresql":
            self._refuse(s, _SQLITE_KEYS, "sqlite")
            postgresql: PostgresConfig | None = self.postgresql(s)
        else:
            self._refuse(s, _POSTGRES_KEYS, "postgresql")
            postgresql = None
        path = self.value(s, "path", "storage", self.path, None)
        if path is None:
            path = self.path(DEFAULT_DATABASE)
        d = StorageConfig(path)
        return StorageConfig(
            path=path, backend=backend, postgresql=postgresql,
            synchronous=self.value(s, "synchronous", "storage", choice("full", "normal"), d.synchronous),
            retention=self.value(s, "retention", "storage", positive_duration, d.retention),
            dead_retention=self.value(s, "dead_retention", "storage", positive_duration, d.dead_retention),
            prune_interval=self.value(s, "prune_interval", "storage", positive_duration, d.prune_interval),
            file_mode=self.value(s, "file_mode", "storage", _private_file_mode, d.file_mode))

    def postgresql(self, s: dict[str, Any]) -> PostgresConfig:
        d = PostgresConfig()
        return PostgresConfig(
            dsn=self.value(s, "dsn", "storage", postgres_dsn, d.dsn),
            schema=self.value(s, "schema", "storage", sql_identifier, d.schema),
            pool=self.value(s, "pool", "storage", int_range(2, 1000), d.pool),
            lease=self.value(s, "lease", "storage", duration_range(5.0, 3600.0), d.lease))

    def _refuse(self, section: dict[str, Any], keys: tuple[str, ...], backend: str) -> None:
        """Keys of the other engine: a mistake the operator should hear of, not a setting silently ignored."""
        for key in keys:
            if key in section:
                self.error(f"storage.{key}", f"is only for storage.backend: {backend}")

    def log(self, raw: Any) -> LogConfig:
        s = self.section(raw, "log", ("level", "format"))
        d = LogConfig()
        return LogConfig(
            level=self.value(s, "level", "log", choice("debug", "info", "warning", "error"), d.level),
            format=self.value(s, "format", "log", choice("auto", "json", "console"), d.format),
        )

    def listen_tls(self, raw: Any) -> ListenTls | None:
        s = self.section(raw, "listen.tls", ("cert_file", "key_file", "client_ca_file"))
        cert = self.value(s, "cert_file", "listen.tls", self.existing_file, None)
        if "cert_file" not in s:
            self.error("listen.tls.cert_file", "required: the listener's certificate (PEM)")
        tls = ListenTls(cert_file=cert, key_file=self.value(s, "key_file", "listen.tls", self.existing_file, None),
                        client_ca_file=self.value(s, "client_ca_file", "listen.tls", self.existing_file, None)) \
            if cert is not None else None
        if tls is not None and (problem := tls_problem(lambda: server_context(tls))):
            self.error("listen.tls", problem)
            return None
        return tls

    def auth(self, raw: Any, listen: ListenConfig) -> AuthConfig:
        s = self.section(raw, "auth", ("ingest_tokens", "admin_tokens", "allow_unauthenticated"))
        d = AuthConfig()
        auth = AuthConfig(ingest_tokens=self.value(s, "ingest_tokens", "auth", _tokens, d.ingest_tokens),
                          admin_tokens=self.value(s, "admin_tokens", "auth", _tokens, d.admin_tokens),
                          allow_unauthenticated=self.value(s, "allow_unauthenticated", "auth", boolean,
                                                           d.allow_unauthenticated))
        every = auth.ingest_tokens + auth.admin_tokens + ((listen.token,) if listen.token else ())
        if len(set(every)) < len(every):
            self.error("auth", "a token is listed twice (or is both an ingest and an admin token): each token "
                               "has one scope")
        if listen.http is not None and not every and not auth.allow_unauthenticated and \
                not is_loopback(listen.http[0]):
            # Anyone who can reach that address could read payloads and replay: refuse unless said on purpose.
            self.error("listen.http", f"{listen.http[0]} is reachable beyond this host and no token is set: set "
                                      "auth.admin_tokens (and auth.ingest_tokens for producers), or "
                                      "auth.allow_unauthenticated: true if that is really meant")
        return auth

    def tracing(self, raw: Any) -> TracingConfig:
        s = self.section(raw, "tracing", ("enabled", "endpoint", "sampling_ratio", "service_name", "headers",
                                          "timeout"))
        d = TracingConfig()
        return TracingConfig(
            enabled=self.value(s, "enabled", "tracing", boolean, d.enabled),
            endpoint=self.value(s, "endpoint", "tracing", http_url, d.endpoint, nullable=True),
            sampling_ratio=self.value(s, "sampling_ratio", "tracing", ratio, d.sampling_ratio, nullable=True),
            service_name=self.value(s, "service_name", "tracing", nonempty_string, d.service_name, nullable=True),
            headers=self.value(s, "headers", "tracing", header_pairs, d.headers),
            timeout=self.value(s, "timeout", "tracing", duration_range(0.1, 300.0), d.timeout))

    def delivery(self, raw: Any, path: str, base: DeliveryConfig) -> DeliveryConfig:
        """A delivery section over `base`: the top level's over the defaults, an integration's over the top's."""
        s = self.section(raw, path, ("timeout", "connect_timeout", "concurrency", "retry", "breaker", "rate_limit",
                                     "ordering", "ordering_key", "dead_letter"))
        retry = self.retry(s.get("retry"), f"{path}.retry", base.retry)
        breaker = self.breaker(s.get("breaker"), f"{path}.breaker", base.breaker)
        timeout = self.value(s, "timeout", path, positive_duration, base.timeout)
        connect = self.value(s, "connect_timeout", path, positive_duration, min(base.connect_timeout, timeout))
        if connect > timeout:
            self.error(f"{path}.connect_timeout", f"must not exceed timeout ({timeout:g}s)")
        return DeliveryConfig(
            timeout=timeout, connect_timeout=connect,
            concurrency=self.value(s, "concurrency", path, int_range(1, 1000), base.concurrency),
            retry=retry, breaker=breaker,
            rate_limit=self.value(s, "rate_limit", path, parse_rate, base.rate_limit, nullable=True),
            ordering=self.value(s, "ordering", path, choice("none", "per_resource"), base.ordering),
            ordering_key=self.value(s, "ordering_key", path, template, base.ordering_key),
            dead_letter=self.value(s, "dead_letter", path, string, base.dead_letter, nullable=True),
        )

    def retry(self, raw: Any, path: str, base: RetryConfig) -> RetryConfig:
        r = self.section(raw, path, ("initial", "max_interval", "max_age", "max_attempts"))
        retry = RetryConfig(
            initial=self.value(r, "initial", path, positive_duration, base.initial),
            max_interval=self.value(r, "max_interval", path, positive_duration, base.max_interval),
            max_age=self.value(r, "max_age", path, positive_duration, base.max_age),
            max_attempts=self.value(r, "max_attempts", path, int_range(1, 1_000_000), base.max_attempts,
                                    nullable=True),
        )
        if ("initial" in r or "max_interval" in r) and retry.max_interval < retry.initial:
            self.error(f"{path}.max_interval", f"must be at least retry.initial ({retry.initial:g}s)")
        return retry

    def breaker(self, raw: Any, path: str, base: BreakerConfig) -> BreakerConfig:
        b = self.section(raw, path, ("failures", "failure_rate", "window", "cooldown", "max_cooldown"))
        return BreakerConfig(
            failures=self.value(b, "failures", path, int_range(1, 1_000_000), base.failures),
            failure_rate=self.value(b, "failure_rate", path, fraction, base.failure_rate),
            window=self.value(b, "window", path, int_range(2, 100_000), base.window),
            cooldown=self.value(b, "cooldown", path, positive_duration, base.cooldown),
            max_cooldown=self.value(b, "max_cooldown", path, positive_duration, base.max_cooldown),
        )

    def event_types(self, raw: Any) -> tuple[str, ...]:
        if raw is None:
            return ()
        if not isinstance(raw, list):
            self.error("event_types", "must be a list of event keys, e.g. [loyalty-points.created]")
            return ()
        for i, key in enumerate(raw):
            if not isinstance(key, str) or not EVENT_KEY.fullmatch(key):
                self.error(f"event_types[{i}]", f"{key!r} is not an event key (resource.action, lower case)")
        return tuple(k for k in raw if isinstance(k, str))

    def integrations(self, raw: Any, delivery: DeliveryConfig, catalogue: Catalogue) -> tuple[Integration, ...]:
        if raw is None:
            return ()
        if not isinstance(raw, list):
            self.error("integrations", "must be a list of integrations")
            return ()
        result: list[Integration] = []
        seen: dict[str, int] = {}
        for i, item in enumerate(raw):
            integration = self.integration(item, f"integrations[{i}]", delivery, catalogue)
            if integration is None:
                continue
            if integration.name in seen:
                self.error(f"integrations[{i}].name",
                           f"{integration.name!r} is already used by integrations[{seen[integration.name]}]")
            seen.setdefault(integration.name, i)
            result.append(integration)
        for i, integration in enumerate(result):
            target = integration.delivery.dead_letter
            if target is not None and (target == integration.name or target not in seen):
                self.error(f"integrations[{seen[integration.name]}].delivery.dead_letter",
                           f"{target!r} must name another integration of this file")
        return tuple(result)

    def integration(self, raw: Any, path: str, delivery: DeliveryConfig, catalogue: Catalogue
                    ) -> Integration | None:
        if not isinstance(raw, dict):
            self.error(path, "must be a mapping with name, integration_type, observes and configuration")
            return None
        s = self.section(raw, path, ("name", "description", "enabled", "integration_type", "observes", "filter",
                                     "configuration", "delivery"))
        errors_before = len(self.errors)
        name = s.get("name")
        if name is None:
            self.error(f"{path}.name", "required")
        elif not isinstance(name, str) or not _NAME.fullmatch(name):
            self.error(f"{path}.name", f"{name!r} must be 1-64 letters, digits, - or _")
        itype = s.get("integration_type")
        target = targets.REGISTRY.get(itype) if isinstance(itype, str) else None
        if target is None:
            self.error(f"{path}.integration_type",
                       "required" if itype is None else f"{itype!r} is not one of {', '.join(targets.names())}")
        observes = self.observes(s.get("observes"), f"{path}.observes", catalogue)
        spec = s.get("filter")
        if spec is not None:
            try:
                compile_filter(spec)
            except FilterError as e:
                self.error(f"{path}.filter" + (f".{e.path}" if e.path else ""), e.message)
        configuration = target.parse(self, s.get("configuration"), f"{path}.configuration") if target else None
        own_delivery = self.delivery(s.get("delivery"), f"{path}.delivery", delivery)
        description = self.value(s, "description", path, string, default(Integration, "description"))
        enabled = self.value(s, "enabled", path, boolean, default(Integration, "enabled"))
        if len(self.errors) > errors_before or configuration is None:
            return None
        return Integration(name=name, integration_type=itype, observes=observes, configuration=configuration,
                           delivery=own_delivery, description=description, enabled=enabled, filter=spec)

    def observes(self, raw: Any, path: str, catalogue: Catalogue) -> tuple[str, ...]:
        if not isinstance(raw, list) or not raw:
            self.error(path, "required: a non-empty list of event keys, e.g. [order.paid, \"customer.*\"]")
            return ()
        for i, pattern in enumerate(raw):
            if not isinstance(pattern, str) or not is_observe_pattern(pattern):
                self.error(f"{path}[{i}]", f"{pattern!r} is not an event key (order.paid), a wildcard "
                                           "(order.*) or *")
            elif not catalogue.matches_any(pattern):
                # A typo would match nothing, forever: say so now, with the closest known type.
                suggestion = catalogue.suggest(pattern)
                self.error(f"{path}[{i}]", f"{pattern!r} matches no known event type"
                           + (f" (did you mean {suggestion}?)" if suggestion else "")
                           + "; a type of your own goes under event_types: at the top of the file")
        return tuple(p for p in raw if isinstance(p, str))


_SQLITE_KEYS = ("path", "synchronous", "file_mode")
_MIN_TOKEN = 16  # characters: a token shorter than this can be guessed


def _tokens(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(t, str) for t in value):
        raise ValueError("must be a list of tokens (strings)")
    tokens = tuple(t for t in value if t)  # an unset ${VAR} leaves an empty entry: not a token
    for token in tokens:
        if len(token) < _MIN_TOKEN or not token.isprintable() or token != token.strip():
            raise ValueError(f"each token must be at least {_MIN_TOKEN} printable characters, without surrounding "
                             "spaces (e.g. `openssl rand -hex 24`)")
    return tokens


def is_loopback(host: str) -> bool:
    """An address only this host can reach: 127.0.0.0/8, ::1 or localhost (not 0.0.0.0, which is every address)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def server_context(tls: ListenTls) -> ssl.SSLContext:
    """The listener's TLS context; with client_ca_file, it requires a client certificate that CA signed."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(str(tls.cert_file), str(tls.key_file) if tls.key_file else None)
    if tls.client_ca_file is not None:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(str(tls.client_ca_file))
    return context

_POSTGRES_KEYS = ("dsn", "schema", "pool", "lease")
_IDENTIFIER = re.compile(r"[a-z_][a-z0-9_]{0,62}")


def postgres_dsn(value: Any) -> str:
    """A libpq URL (postgresql://user:password@host:port/database?options). The password is not shown in the
    error, whatever is wrong."""
    if not isinstance(value, str):
        raise ValueError("must be a postgresql:// URL")
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises on a port that is not a number
    except ValueError:
        raise ValueError("is not a valid URL (is the port a number?)") from None
    if parts.scheme not in ("postgresql", "postgres"):
        raise ValueError("must be a postgresql:// URL (libpq's URL form; PG* environment variables and "
                         "~/.pgpass fill in what it leaves out)")
    for name, number in parse_qsl(parts.query):
        if name == "connect_timeout" and not re.fullmatch(r"\d+(\.\d+)?", number):
            raise ValueError(f"connect_timeout={number!r} must be a number of seconds")
    return value


def sql_identifier(value: Any) -> str:
    if not isinstance(value, str) or not _IDENTIFIER.fullmatch(value):
        raise ValueError("must be a lower-case SQL name: letters, digits and _, not starting with a digit, "
                         "at most 63 characters")
    return value


def _private_file_mode(value: Any) -> int:
    mode = file_mode(value)
    if mode & 0o600 != 0o600 or mode & 0o117:
        raise ValueError(f"{value!r}: the database must be readable and writable by its owner and never by "
                         "others (write \"0600\", or \"0640\" to let the group read it, for backups)")
    return mode
