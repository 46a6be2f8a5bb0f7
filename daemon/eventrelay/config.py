"""The YAML configuration, read into frozen dataclasses.

Every problem is collected with the path of the value it concerns (`integrations[1].configuration.url`),
so an operator fixes the whole file in one pass instead of one error per restart. Defaults live here and
nowhere else.
"""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping
from urllib.parse import urlsplit, urlunsplit

import yaml

from .events import Observes, is_observe_pattern

INTEGRATION_TYPES = ("webhook", "aws_sqs", "stomp")
SECRET_FIELDS = ("secret_key", "aws_secret_access_key", "password", "signing_secrets")
STOMP_SCHEMES = {"stomp": False, "tcp": False, "stomp+ssl": True, "stomp+tls": True, "ssl": True}
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)")
_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
_SIZE = re.compile(r"(\d+)\s*(B|KiB|MiB|GiB|KB|MB|GB)?")
_SIZE_UNITS = {None: 1, "B": 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3, "KB": 1000, "MB": 1000**2, "GB": 1000**3}
MAX_FILE_SIZE = 1024 * 1024  # bytes; a thousand integrations take a few hundred KiB
MAX_NODES = 200_000  # values in the document once its aliases are expanded
_ENV = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class ConfigError(Exception):
    """The file cannot be used. `errors` holds every problem found, each prefixed by its path."""

    def __init__(self, source: str, errors: list[str]):
        self.source = source
        self.errors = errors
        super().__init__(f"{source}: {len(errors)} error(s):\n" + "\n".join(f"  {e}" for e in errors))


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
class WebhookConfig:
    url: str
    secret_key: str | None = None
    signing_secrets: tuple[str, ...] = ()  # Standard Webhooks `whsec_…` secrets; several while rotating
    # Elastic Path's deprecated `resources` (the payload again, as a JSON string): every receiver written for
    # Elastic Path reads it, so it is sent unless turned off.
    send_resources: bool = True


@dataclass(frozen=True, slots=True)
class SqsConfig:
    url: str
    region: str
    aws_access_key_id: str | None = None  # both keys or neither: without them, the default AWS chain
    aws_secret_access_key: str | None = None
    endpoint_url: str | None = None
    message_group_id: str = "{data.id}"  # FIFO queues only: a template over the event's fields
    max_message_size: int = 256 * 1024  # the seed system's limit; queues made since 2025 may take 1 MiB

    @property
    def fifo(self) -> bool:
        return self.url.endswith(".fifo")


@dataclass(frozen=True, slots=True)
class StompAddress:
    host: str
    port: int
    tls: bool

    def __str__(self) -> str:
        return f"{'stomp+ssl' if self.tls else 'stomp'}://{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class StompConfig:
    addresses: tuple[StompAddress, ...]  # tried in order: the first that answers is used (failover)
    destination: str
    username: str | None = None
    password: str | None = None
    vhost: str | None = None  # the STOMP `host` header; RabbitMQ reads it as the virtual host
    heartbeat: float = 10.0
    ca_file: Path | None = None  # for brokers whose certificate a private CA signed


@dataclass(frozen=True, slots=True)
class Integration:
    name: str
    integration_type: str
    observes: tuple[str, ...]
    configuration: WebhookConfig | SqsConfig | StompConfig
    delivery: DeliveryConfig
    description: str = ""
    enabled: bool = True
    matcher: Observes = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "matcher", Observes.compile(list(self.observes)))

    def public(self) -> dict[str, Any]:
        """The integration as the daemon shows it: secrets masked to their last four characters."""
        conf = {k: getattr(self.configuration, k) for k in self.configuration.__dataclass_fields__}
        for key in SECRET_FIELDS:
            if isinstance(conf.get(key), tuple):
                conf[key] = tuple(mask(v) for v in conf[key])
            elif conf.get(key):
                conf[key] = mask(conf[key])
        for key, value in conf.items():
            if isinstance(value, tuple):
                conf[key] = [str(v) for v in value]
            elif isinstance(value, Path):
                conf[key] = str(value)
        for key in ("url", "endpoint_url"):
            if conf.get(key):
                conf[key] = mask_url(conf[key])
        # Shown under the key the YAML uses for it, and only when set.
        signing = conf.pop("signing_secrets", None)
        if signing:
            conf["signing_secret"] = signing
        return {"name": self.name, "description": self.description, "enabled": self.enabled,
                "integration_type": self.integration_type, "observes": list(self.observes),
                "configuration": conf}


@dataclass(frozen=True, slots=True)
class ListenConfig:
    http: tuple[str, int] | None = ("127.0.0.1", 8787)
    socket: Path | None = None
    socket_mode: int = 0o660
    token: str | None = None
    max_body_size: int = 1024 * 1024  # HTTP body, and socket line
    max_depth: int = 64  # JSON nesting
    max_connections: int = 1024  # open connections, on each listener
    idle_timeout: float = 75.0  # seconds a connection may sit without a request (HTTP) or a line (socket)
    request_timeout: float = 30.0  # seconds an HTTP request may take to arrive, headers and body


@dataclass(frozen=True, slots=True)
class StorageConfig:
    path: Path
    synchronous: str = "full"
    retention: float = 7 * 86400.0  # delivered jobs, their attempts and their events are pruned after this
    dead_retention: float = 30 * 86400.0
    prune_interval: float = 60.0
    file_mode: int = 0o600  # the database, its WAL and shared memory hold every payload: never world-readable


@dataclass(frozen=True, slots=True)
class LogConfig:
    level: str = "info"
    format: str = "auto"  # auto: pretty on a TTY, JSON lines otherwise


@dataclass(frozen=True, slots=True)
class Config:
    listen: ListenConfig
    storage: StorageConfig
    delivery: DeliveryConfig
    integrations: tuple[Integration, ...]
    shutdown_grace: float = 10.0
    log: LogConfig = LogConfig()
    event_source: str = "eventrelay://localhost"  # CloudEvents `source` of queue messages
    store_id: str | None = None  # Elastic Path's `storeid` on queue messages, when set
    source: Path | None = None  # the file this was read from

    def integration(self, name: str) -> Integration | None:
        return next((i for i in self.integrations if i.name == name), None)


def mask(secret: str) -> str:
    """`****PSYQ`, as the seed system shows secrets; short secrets are masked whole."""
    return "****" + secret[-4:] if len(secret) > 8 else "****"


# Query parameters whose values are credentials in the URLs people paste (?token=…, ?sig=…, ?api_key=…).
_SECRET_PARAM = re.compile(r"token|key|secret|sig|pass|auth|code|credential|session", re.IGNORECASE)


def mask_url(url: str) -> str:
    """A URL as the daemon shows it: the password of its userinfo and credential-like query values masked."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if parts.password is not None:
        user, _, host = netloc.rpartition("@")
        netloc = f"{user.partition(':')[0]}:{mask(parts.password)}@{host}"
    query = "&".join(_mask_param(p) for p in parts.query.split("&")) if parts.query else ""
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def _mask_param(param: str) -> str:
    name, sep, value = param.partition("=")
    return f"{name}={mask(value)}" if sep and value and _SECRET_PARAM.search(name) else param


def load(path: str | os.PathLike[str], environ: Mapping[str, str] | None = None) -> Config:
    """Read and validate a config file. Raises ConfigError listing every problem.

    Parsing a large file takes seconds of CPU: the running daemon calls this in a thread, never on its loop.
    """
    path = Path(path)
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_FILE_SIZE + 1)
        text = raw.decode("utf-8")
    except OSError as e:
        raise ConfigError(str(path), [f"cannot read the file: {e.strerror or e}"]) from None
    except UnicodeDecodeError as e:
        raise ConfigError(str(path), [f"not UTF-8 text ({e.reason} at byte {e.start})"]) from None
    if len(raw) > MAX_FILE_SIZE:
        raise ConfigError(str(path), [f"larger than {MAX_FILE_SIZE // 1024 ** 2} MiB: that is not a configuration "
                                      "file eventrelay should read (is it the right file?)"])
    return parse(text, source=path, environ=os.environ if environ is None else environ)


def parse(text: str, source: Path | None = None, environ: Mapping[str, str] | None = None) -> Config:
    name = str(source) if source else "<config>"
    try:
        raw = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        raise ConfigError(name, [_yaml_message(e)]) from None
    except (ValueError, TypeError, KeyError, AttributeError, IndexError, RecursionError) as e:
        # PyYAML's constructors let these out for bad tagged scalars (!!int abc, 2001-13-45) and deep nesting.
        raise ConfigError(name, [f"invalid YAML: a value cannot be read ({type(e).__name__}: {_short(e)})"]) from None
    errors: list[str] = []
    base = source.parent if source else Path.cwd()
    try:
        raw = _expand_env(raw, "", environ or {}, errors)
        config = _Parser(errors, base).config(raw)
    except (RecursionError, ValueError, TypeError, OverflowError) as e:
        # What no check above names (a list that contains itself, a key too large to print): still an error
        # for the operator, never a traceback.
        raise ConfigError(name, errors + [f"the configuration cannot be read: {type(e).__name__}: {_short(e)}"]
                          ) from None
    if errors or config is None:
        raise ConfigError(name, errors)
    return replace(config, source=source)


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (YAML would silently keep the last, hiding a typo) and documents
    whose aliases expand past MAX_NODES: a few hundred bytes of nested aliases can stand for billions of
    values, which everything that walks the result would visit one by one."""

    def get_single_node(self) -> yaml.Node | None:
        node = super().get_single_node()
        if node is not None:
            _check_expansion(node)
        return node

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        if not isinstance(node, yaml.MappingNode):
            return super().construct_mapping(node, deep=deep)  # raises PyYAML's own "expected a mapping" error
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                hash(key)
            except TypeError:
                raise yaml.constructor.ConstructorError(
                    None, None, "a list or mapping cannot be a key", key_node.start_mark) from None
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _check_expansion(root: yaml.Node) -> None:
    """Raise a YAMLError when `root` would expand to more than MAX_NODES values or refers to itself."""
    sizes: dict[int, int] = {}  # id(node) -> its values once every alias is expanded
    in_progress: set[int] = set()

    def size(node: yaml.Node) -> int:
        known = sizes.get(id(node))
        if known is not None:
            return known
        if id(node) in in_progress:
            raise yaml.composer.ComposerError(None, None, "an alias refers to the value that contains it",
                                              node.start_mark)
        in_progress.add(id(node))
        if isinstance(node, yaml.MappingNode):
            children = [child for pair in node.value for child in pair]
        elif isinstance(node, yaml.SequenceNode):
            children = node.value
        else:
            children = []
        total = 1
        for child in children:
            total += size(child)
            if total > MAX_NODES:
                raise yaml.composer.ComposerError(
                    None, None, f"the document expands to more than {MAX_NODES:,} values (aliases nested "
                    "too deep or used too often)", node.start_mark)
        in_progress.discard(id(node))
        sizes[id(node)] = total
        return total

    size(root)


def _yaml_message(e: yaml.YAMLError) -> str:
    mark = getattr(e, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
    problem = getattr(e, "problem", None) or str(e)
    return f"{where}invalid YAML: {problem}"


def _expand_env(value: Any, path: str, environ: Mapping[str, str], errors: list[str]) -> Any:
    """Expand ${VAR} and ${VAR:-default} in string values (not keys); `$$` is a literal `$`."""
    if isinstance(value, dict):
        return {k: _expand_env(v, _join(path, k), environ, errors) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand_env(v, f"{path}[{i}]", environ, errors) for i, v in enumerate(value)]
    if not isinstance(value, str) or "$" not in value:
        return value

    def substitute(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        var, default = m.group(1), m.group(2)
        if var in environ:
            return environ[var]
        if default is not None:
            return default
        errors.append(f"{path}: environment variable {var} is not set "
                      f"(set it, or write ${{{var}:-}} to allow it to be empty)")
        return ""

    return _ENV.sub(substitute, value)


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


class _Parser:
    """Turns the decoded YAML into dataclasses, appending `path: problem` to `errors` as it goes."""

    def __init__(self, errors: list[str], base: Path):
        self.errors = errors
        self.base = base

    def error(self, path: str, message: str) -> None:
        self.errors.append(f"{path}: {message}")

    def section(self, value: Any, path: str, allowed: tuple[str, ...]) -> dict[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.error(path or "<top level>", "must be a mapping")
            return {}
        for key in value:
            if key not in allowed:
                hint = _closest(str(key), allowed)
                self.error(_join(path, key), "unknown key" + (f" (did you mean {hint!r}?)" if hint else
                                                              f" (allowed: {', '.join(allowed)})"))
        return value

    def config(self, raw: Any) -> Config | None:
        top = self.section(raw, "", ("listen", "storage", "delivery", "integrations", "shutdown_grace", "log",
                                     "event_source", "store_id"))
        if raw is not None and not isinstance(raw, dict):
            return None
        listen = self.listen(top.get("listen"))
        storage = self.storage(top.get("storage"))
        grace = self.value(top, "shutdown_grace", "", _duration, 10.0)
        log = self.log(top.get("log"))
        delivery = self.delivery(top.get("delivery"), "delivery", DeliveryConfig())
        integrations = self.integrations(top.get("integrations"), delivery)
        event_source = self.value(top, "event_source", "", _uri_reference, f"eventrelay://{socket.gethostname()}")
        store_id = self.value(top, "store_id", "", _header_value, None, nullable=True)
        return Config(listen=listen, storage=storage, delivery=delivery, integrations=integrations,
                      shutdown_grace=grace, log=log, event_source=event_source, store_id=store_id)

    def value(self, section: dict[str, Any], key: str, path: str, convert: Callable[[Any], Any], default: Any,
              nullable: bool = False) -> Any:
        """Convert section[key]; missing → default; null → None where null means "off", else default."""
        if key not in section:
            return default
        if section[key] is None:
            return None if nullable else default
        try:
            return convert(section[key])
        except (ValueError, OverflowError) as e:
            self.error(_join(path, key), str(e) if isinstance(e, ValueError) else f"{_short(section[key])} is too large")
            return default

    def listen(self, raw: Any) -> ListenConfig:
        s = self.section(raw, "listen", ("http", "socket", "socket_mode", "token", "max_body_size", "max_depth",
                                         "max_connections", "idle_timeout", "request_timeout"))
        d = ListenConfig()
        http = self.value(s, "http", "listen", _host_port, d.http, nullable=True)
        sock = self.value(s, "socket", "listen", self.path, None, nullable=True)
        token = self.value(s, "token", "listen", _nonempty_str, None, nullable=True)
        if http is None and sock is None:
            self.error("listen", "both http and socket are disabled: producers could not reach the daemon")
        return ListenConfig(
            http=http, socket=sock, token=token,
            socket_mode=self.value(s, "socket_mode", "listen", _file_mode, d.socket_mode),
            max_body_size=self.value(s, "max_body_size", "listen", _size, d.max_body_size),
            max_depth=self.value(s, "max_depth", "listen", _int_range(2, 10_000), d.max_depth),
            max_connections=self.value(s, "max_connections", "listen", _int_range(1, 1_000_000), d.max_connections),
            idle_timeout=self.value(s, "idle_timeout", "listen", _positive_duration, d.idle_timeout),
            request_timeout=self.value(s, "request_timeout", "listen", _positive_duration, d.request_timeout),
        )

    def storage(self, raw: Any) -> StorageConfig:
        s = self.section(raw, "storage", ("path", "synchronous", "retention", "dead_retention", "prune_interval",
                                          "file_mode"))
        path = self.value(s, "path", "storage", self.path, None)
        if path is None:
            path = self.path("./var/eventrelay.db")
        d = StorageConfig(path)
        return StorageConfig(
            path=path, synchronous=self.value(s, "synchronous", "storage", _choice("full", "normal"), d.synchronous),
            retention=self.value(s, "retention", "storage", _positive_duration, d.retention),
            dead_retention=self.value(s, "dead_retention", "storage", _positive_duration, d.dead_retention),
            prune_interval=self.value(s, "prune_interval", "storage", _positive_duration, d.prune_interval),
            file_mode=self.value(s, "file_mode", "storage", _private_file_mode, d.file_mode))

    def log(self, raw: Any) -> LogConfig:
        s = self.section(raw, "log", ("level", "format"))
        return LogConfig(
            level=self.value(s, "level", "log", _choice("debug", "info", "warning", "error"), "info"),
            format=self.value(s, "format", "log", _choice("auto", "json", "console"), "auto"),
        )

    def delivery(self, raw: Any, path: str, base: DeliveryConfig) -> DeliveryConfig:
        s = self.section(raw, path, ("timeout", "connect_timeout", "concurrency", "retry", "breaker", "rate_limit",
                                     "ordering", "ordering_key", "dead_letter"))
        r = self.section(s.get("retry"), f"{path}.retry", ("initial", "max_interval", "max_age", "max_attempts"))
        rp = f"{path}.retry"
        retry = RetryConfig(
            initial=self.value(r, "initial", rp, _positive_duration, base.retry.initial),
            max_interval=self.value(r, "max_interval", rp, _positive_duration, base.retry.max_interval),
            max_age=self.value(r, "max_age", rp, _positive_duration, base.retry.max_age),
            max_attempts=self.value(r, "max_attempts", rp, _int_range(1, 1_000_000), base.retry.max_attempts,
                                    nullable=True),
        )
        if ("initial" in r or "max_interval" in r) and retry.max_interval < retry.initial:
            self.error(f"{rp}.max_interval", f"must be at least retry.initial ({retry.initial:g}s)")
        b = self.section(s.get("breaker"), f"{path}.breaker",
                         ("failures", "failure_rate", "window", "cooldown", "max_cooldown"))
        bp, bb = f"{path}.breaker", base.breaker
        breaker = BreakerConfig(
            failures=self.value(b, "failures", bp, _int_range(1, 1_000_000), bb.failures),
            failure_rate=self.value(b, "failure_rate", bp, _fraction, bb.failure_rate),
            window=self.value(b, "window", bp, _int_range(2, 100_000), bb.window),
            cooldown=self.value(b, "cooldown", bp, _positive_duration, bb.cooldown),
            max_cooldown=self.value(b, "max_cooldown", bp, _positive_duration, bb.max_cooldown),
        )
        timeout = self.value(s, "timeout", path, _positive_duration, base.timeout)
        connect = self.value(s, "connect_timeout", path, _positive_duration, min(base.connect_timeout, timeout))
        if connect > timeout:
            self.error(f"{path}.connect_timeout", f"must not exceed timeout ({timeout:g}s)")
        return DeliveryConfig(
            timeout=timeout, connect_timeout=connect,
            concurrency=self.value(s, "concurrency", path, _int_range(1, 1000), base.concurrency),
            retry=retry, breaker=breaker,
            rate_limit=self.value(s, "rate_limit", path, _rate, base.rate_limit, nullable=True),
            ordering=self.value(s, "ordering", path, _choice("none", "per_resource"), base.ordering),
            ordering_key=self.value(s, "ordering_key", path, _template, base.ordering_key),
            dead_letter=self.value(s, "dead_letter", path, _str, base.dead_letter, nullable=True),
        )

    def integrations(self, raw: Any, delivery: DeliveryConfig) -> tuple[Integration, ...]:
        if raw is None:
            return ()
        if not isinstance(raw, list):
            self.error("integrations", "must be a list of integrations")
            return ()
        result: list[Integration] = []
        seen: dict[str, int] = {}
        for i, item in enumerate(raw):
            integration = self.integration(item, f"integrations[{i}]", delivery)
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

    def integration(self, raw: Any, path: str, delivery: DeliveryConfig) -> Integration | None:
        if not isinstance(raw, dict):
            self.error(path, "must be a mapping with name, integration_type, observes and configuration")
            return None
        s = self.section(raw, path, ("name", "description", "enabled", "integration_type", "observes",
                                     "configuration", "delivery"))
        errors_before = len(self.errors)
        name = s.get("name")
        if name is None:
            self.error(f"{path}.name", "required")
        elif not isinstance(name, str) or not _NAME.fullmatch(name):
            self.error(f"{path}.name", f"{name!r} must be 1-64 letters, digits, - or _")
        itype = s.get("integration_type")
        if not isinstance(itype, str) or itype not in INTEGRATION_TYPES:
            self.error(f"{path}.integration_type",
                       "required" if itype is None else f"{itype!r} is not one of {', '.join(INTEGRATION_TYPES)}")
        observes = self.observes(s.get("observes"), f"{path}.observes")
        conf_parser = {"webhook": self.webhook, "aws_sqs": self.sqs, "stomp": self.stomp}.get(itype)
        configuration = conf_parser(s.get("configuration"), f"{path}.configuration") if conf_parser else None
        own_delivery = self.delivery(s.get("delivery"), f"{path}.delivery", delivery)
        description = self.value(s, "description", path, _str, "")
        enabled = self.value(s, "enabled", path, _bool, True)
        if len(self.errors) > errors_before or configuration is None:
            return None
        return Integration(name=name, integration_type=itype, observes=observes, configuration=configuration,
                           delivery=own_delivery, description=description, enabled=enabled)

    def observes(self, raw: Any, path: str) -> tuple[str, ...]:
        if not isinstance(raw, list) or not raw:
            self.error(path, "required: a non-empty list of event keys, e.g. [order.paid, \"customer.*\"]")
            return ()
        for i, pattern in enumerate(raw):
            if not isinstance(pattern, str) or not is_observe_pattern(pattern):
                self.error(f"{path}[{i}]", f"{pattern!r} is not an event key (order.paid), a wildcard "
                                           "(order.*) or *")
        return tuple(p for p in raw if isinstance(p, str))

    def webhook(self, raw: Any, path: str) -> WebhookConfig | None:
        if raw is None:
            self.error(path, "required for a webhook: at least url")
            return None
        s = self.section(raw, path, ("url", "secret_key", "signing_secret", "send_resources"))
        url = self.value(s, "url", path, http_url, None)
        if "url" not in s:
            self.error(f"{path}.url", "required")
        secret = self.value(s, "secret_key", path, _str, None) or None
        signing = self.value(s, "signing_secret", path, _signing_secrets, (), nullable=True) or ()
        resources = self.value(s, "send_resources", path, _bool, True)
        return WebhookConfig(url=url, secret_key=secret, signing_secrets=signing,
                             send_resources=resources) if url else None

    def sqs(self, raw: Any, path: str) -> SqsConfig | None:
        if raw is None:
            self.error(path, "required for aws_sqs: at least url")
            return None
        s = self.section(raw, path, ("url", "region", "aws_access_key_id", "aws_secret_access_key", "endpoint_url",
                                     "message_group_id", "max_message_size"))
        if "url" not in s:
            self.error(f"{path}.url", "required: the queue URL")
        url = self.value(s, "url", path, http_url, None)
        endpoint = self.value(s, "endpoint_url", path, http_url, None, nullable=True)
        key_id = self.value(s, "aws_access_key_id", path, _str, None, nullable=True) or None
        secret = self.value(s, "aws_secret_access_key", path, _str, None, nullable=True) or None
        if (key_id is None) != (secret is None):
            self.error(path, "give both aws_access_key_id and aws_secret_access_key, or neither "
                             "(then the default AWS credential chain is used)")
        region = self.value(s, "region", path, _str, None, nullable=True) or (url and _sqs_region(url))
        if url and not region:
            self.error(f"{path}.region", "required: the queue URL does not name a region")
        group = self.value(s, "message_group_id", path, _template, "{data.id}")
        max_size = self.value(s, "max_message_size", path, _size, 256 * 1024)
        if max_size > 1024 * 1024:
            self.error(f"{path}.max_message_size", "SQS takes at most 1MiB per message")
        if not url or not region:
            return None
        return SqsConfig(url=url, region=region, aws_access_key_id=key_id, aws_secret_access_key=secret,
                         endpoint_url=endpoint, message_group_id=group, max_message_size=max_size)

    def stomp(self, raw: Any, path: str) -> StompConfig | None:
        if raw is None:
            self.error(path, "required for stomp: at least addresses and destination")
            return None
        s = self.section(raw, path, ("addresses", "destination", "username", "password", "vhost", "heartbeat",
                                     "ca_file"))
        addresses = s.get("addresses")
        if isinstance(addresses, str):
            addresses = [addresses]
        parsed: list[StompAddress] = []
        if not isinstance(addresses, list) or not addresses:
            self.error(f"{path}.addresses", "required: a list of broker URIs, e.g. [stomp+ssl://b-1.mq.example:61614]")
        else:
            for i, address in enumerate(addresses):
                try:
                    parsed.append(_stomp_address(address))
                except ValueError as e:
                    self.error(f"{path}.addresses[{i}]", str(e))
        destination = self.value(s, "destination", path, _str, None)
        if not destination:
            self.error(f"{path}.destination", "required, e.g. /queue/orders")
        config = StompConfig(
            addresses=tuple(parsed), destination=destination or "",
            username=self.value(s, "username", path, _str, None, nullable=True) or None,
            password=self.value(s, "password", path, _str, None, nullable=True) or None,
            vhost=self.value(s, "vhost", path, _str, None, nullable=True) or None,
            heartbeat=self.value(s, "heartbeat", path, _positive_duration, 10.0),
            ca_file=self.value(s, "ca_file", path, self.existing_file, None, nullable=True),
        )
        return config if parsed and destination and len(parsed) == len(addresses) else None

    def existing_file(self, value: Any) -> Path:
        p = self.path(value)
        if not p.is_file():
            raise ValueError(f"{str(p)!r} is not a readable file")
        return p

    def path(self, value: Any) -> Path:
        if not isinstance(value, str) or not value:
            raise ValueError("must be a file path")
        try:
            p = Path(value).expanduser()
        except RuntimeError as e:  # ~user of an unknown user
            raise ValueError(f"{value!r}: {e}") from None
        return p if p.is_absolute() else (self.base / p)


def _short(value: Any, limit: int = 80) -> str:
    try:
        text = repr(value) if not isinstance(value, BaseException) else str(value)
    except ValueError:  # an int too long to print
        return "<too large to show>"
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _closest(key: str, allowed: tuple[str, ...]) -> str | None:
    import difflib

    match = difflib.get_close_matches(key, allowed, n=1, cutoff=0.7)
    return match[0] if match else None


def _duration(value: Any) -> float:
    """`250ms`, `10s`, `5m`, `24h`, `7d`, or a bare number of seconds."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a duration (write e.g. 250ms, 10s, 5m, 24h, 7d)")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError(f"{value!r} must not be negative")
        return float(value)
    m = _DURATION.fullmatch(str(value).strip())
    if not m:
        raise ValueError(f"{value!r} is not a duration (write e.g. 250ms, 10s, 5m, 24h, 7d)")
    return float(m.group(1)) * _DURATION_UNITS[m.group(2)]


def _positive_duration(value: Any) -> float:
    seconds = _duration(value)
    if seconds <= 0:
        raise ValueError(f"{value!r} must be greater than zero")
    return seconds


def _size(value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    m = _SIZE.fullmatch(str(value).strip())
    if not m or int(m.group(1)) == 0:
        raise ValueError(f"{value!r} is not a size (write e.g. 1MiB, 512KiB or a number of bytes)")
    return int(m.group(1)) * _SIZE_UNITS[m.group(2)]


def _int_range(low: int, high: int) -> Callable[[Any], int]:
    def convert(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ValueError(f"{value!r} must be a whole number from {low} to {high}")
        return value
    return convert


def _choice(*choices: str) -> Callable[[Any], str]:
    def convert(value: Any) -> str:
        if value not in choices:
            raise ValueError(f"{value!r} must be one of {', '.join(choices)}")
        return value
    return convert


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{value!r} must be true or false")
    return value


def _str(value: Any) -> str:
    if not isinstance(value, (str, int, float)) or isinstance(value, bool):
        raise ValueError("must be a string")
    return str(value)


def _nonempty_str(value: Any) -> str | None:
    return _str(value) or None


def _file_mode(value: Any) -> int:
    # YAML reads 0660 as the decimal number 660 and 0o660 as a string; accept the forms people write.
    text = str(value)
    try:
        mode = int(text, 8)
    except ValueError:
        raise ValueError(f"{value!r} is not a file mode (write e.g. \"0660\")") from None
    if not 0 <= mode <= 0o777:
        raise ValueError(f"{value!r} is not a file mode (write e.g. \"0660\")")
    return mode


def _private_file_mode(value: Any) -> int:
    mode = _file_mode(value)
    if mode & 0o600 != 0o600 or mode & 0o117:
        raise ValueError(f"{value!r}: the database must be readable and writable by its owner and never by "
                         "others (write \"0600\", or \"0640\" to let the group read it, for backups)")
    return mode


def _host_port(value: Any) -> tuple[str, int]:
    text = str(value).strip()
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{value!r} is not host:port (e.g. 127.0.0.1:8787 or [::1]:8787)")
    return host, int(port)


def _fraction(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ValueError(f"{value!r} must be a number above 0 and at most 1 (e.g. 0.5)")
    return float(value)


def _rate(value: Any) -> float:
    """`50/s`, `600/m`, `10000/h`, or a number per second."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
        return float(value)
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*/\s*(s|m|h)", str(value).strip())
    if not m or float(m.group(1)) <= 0:
        raise ValueError(f"{value!r} is not a rate (write e.g. 50/s, 600/m or 10000/h)")
    return float(m.group(1)) / {"s": 1, "m": 60, "h": 3600}[m.group(2)]


def _signing_secrets(value: Any) -> tuple[str, ...]:
    """Standard Webhooks secrets: `whsec_` + base64; a list signs with each (key rotation)."""
    import base64
    import binascii

    values = value if isinstance(value, list) else [value]
    for secret in values:
        if not isinstance(secret, str) or not secret.startswith("whsec_"):
            raise ValueError("must be a Standard Webhooks secret, whsec_ followed by base64 (or a list of them)")
        try:
            if len(base64.b64decode(secret[6:], validate=True)) < 16:
                raise ValueError("too short")
        except (binascii.Error, ValueError):
            raise ValueError("must be whsec_ followed by the base64 of at least 16 random bytes") from None
    return tuple(values)


def _header_value(value: Any) -> str:
    """A short printable ASCII value, as message attributes and headers carry it."""
    text = _str(value)
    if not 1 <= len(text) <= 256 or not all("\x20" < c < "\x7f" for c in text):
        raise ValueError(f"{_short(value)} must be 1-256 printable ASCII characters without spaces")
    return text


def _uri_reference(value: Any) -> str:
    if not isinstance(value, str) or not value or any(c.isspace() for c in value):
        raise ValueError(f"{value!r} is not a URI (e.g. eventrelay://shop-1 or https://shop.example.com)")
    return value


def _template(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError("must be a template such as {data.id} or {data.relationships.order.id}")
    for field_path in re.findall(r"\{([^{}]*)\}", value):
        if not re.fullmatch(r"(id|type|data(\.[A-Za-z0-9_-]+)*|included(\.[A-Za-z0-9_-]+)*)", field_path):
            raise ValueError(f"{{{field_path}}} is not an event field (id, type, data.…, included.…)")
    return value


def _sqs_region(url: str) -> str | None:
    m = re.match(r"https://sqs[.-]([a-z0-9-]+)\.amazonaws\.com", url)
    return m.group(1) if m else None


def _stomp_address(value: Any) -> StompAddress:
    hint = "is not a broker URI (e.g. stomp+ssl://b-1.mq.eu-west-1.amazonaws.com:61614 or stomp://127.0.0.1:61613)"
    try:
        parts = urlsplit(value if isinstance(value, str) else "")
        port = parts.port
    except ValueError:
        raise ValueError(f"{value!r} {hint}") from None
    if parts.scheme not in STOMP_SCHEMES or not parts.hostname or port is None:
        raise ValueError(f"{value!r} {hint}")
    return StompAddress(parts.hostname, port, STOMP_SCHEMES[parts.scheme])


def http_url(value: Any) -> str:
    """The value if it is an http(s) URL with a host (and a valid port), else ValueError."""
    text = value if isinstance(value, str) else ""
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        parts = None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("not an http(s) URL")
    return text
