"""Real external services for the tests and the benchmarks, run as child processes on 127.0.0.1.

Plain classes (no pytest fixtures here) that each own a fresh temporary directory:

* `MotoServer`  — moto in server mode (SQS and the rest of the fake AWS API).
* `ActiveMQ`    — an ActiveMQ 5.x broker with a STOMP (and optionally STOMP+TLS) connector, an OpenWire one
                  for JMS consumers (`openwire_port`),
                  KahaDB persistence and simple username/password authentication.
* `RabbitMQ`    — a RabbitMQ node with the STOMP plugin (and optionally STOMP over TLS), its own epmd,
                  a `/eventrelay` vhost and an `eventrelay` user.
* `PostgresCluster` — a throwaway PostgreSQL cluster (Debian's binaries, run as the `postgres` user when root)
                  with an `eventrelay` role that logs in with a password over TCP, and a database per test.

Every service starts in its own session/process group with a bounded wait for readiness, and stops with
SIGTERM then, after a bounded wait, SIGKILL of the whole process tree; a failed start kills what it started.
`close()` also removes the temporary directory; an `atexit` hook kills whatever a test run forgot.

    with ActiveMQ(tls=True) as broker:        # start() on enter, close() on exit
        broker.port, broker.tls_port, broker.ca_file, broker.username, broker.password
        broker.restart()                      # same ports, same data: persistent messages survive
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import ipaddress
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import quoteattr

HOST = "127.0.0.1"

ACTIVEMQ_HOME = Path(os.environ.get("ACTIVEMQ_HOME", "/usr/share/activemq"))
RABBITMQ_SERVER = Path(os.environ.get("RABBITMQ_SERVER", "/usr/lib/rabbitmq/bin/rabbitmq-server"))
POSTGRES_BINDIR = os.environ.get("POSTGRES_BINDIR")  # default: the newest /usr/lib/postgresql/<version>/bin


class ServiceError(RuntimeError):
    """A service could not be started (or is not installed)."""


# --------------------------------------------------------------------------------------------------------------
# ports


_handed_out: set[int] = set()


def free_ports(count: int = 1, host: str = HOST) -> list[int]:
    """`count` distinct ports that are free on `host` right now and were never handed out by this process."""
    socks: list[socket.socket] = []
    ports: list[int] = []
    try:
        while len(ports) < count:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            socks.append(s)
            s.bind((host, 0))
            port = s.getsockname()[1]
            if port not in _handed_out:
                ports.append(port)
                _handed_out.add(port)
    finally:
        for s in socks:
            s.close()
    return ports


def free_port(host: str = HOST) -> int:
    return free_ports(1, host)[0]


def port_open(port: int, host: str = HOST, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


# --------------------------------------------------------------------------------------------------------------
# process trees


def _proc_stat(pid: int) -> tuple[int, int] | None:
    """(ppid, start time) of a live process, None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read().decode(errors="replace")
    except OSError:
        return None
    fields = data[data.rfind(")") + 2 :].split()
    # fields[0] is the state (field 3 of stat), so field N of stat is fields[N - 3]
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[1]), int(fields[19])


def _process_tree(root: int) -> list[tuple[int, int]]:
    """(pid, start time) of `root` and all its live descendants."""
    children: dict[int, list[int]] = {}
    starts: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        st = _proc_stat(int(entry))
        if st is None:
            continue
        children.setdefault(st[0], []).append(int(entry))
        starts[int(entry)] = st[1]
    out: list[tuple[int, int]] = []
    todo = [root]
    while todo:
        pid = todo.pop()
        if pid in starts:
            out.append((pid, starts[pid]))
        todo.extend(children.get(pid, []))
    return out


def _process_group(pgid: int) -> list[tuple[int, int]]:
    """(pid, start time) of the live processes in process group `pgid`."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    data = f.read().decode(errors="replace")
            except OSError:
                continue
            fields = data[data.rfind(")") + 2 :].split()
            if fields[0] not in ("Z", "X") and int(fields[2]) == pgid:
                out.append((int(entry), int(fields[19])))
    return out


def _kill_processes(procs: list[tuple[int, int]], sig: int = signal.SIGKILL) -> None:
    """Signal each (pid, start time) that still is that very process (guards against pid reuse)."""
    for pid, start in procs:
        st = _proc_stat(pid)
        if st is not None and st[1] == start:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"(no {path})"
    return "\n".join(text.splitlines()[-lines:])


class _Child:
    """One child process in its own session, output appended to a log file."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], cwd: Path, log_file: Path):
        self.name = name
        self.log_file = log_file
        self._tree: list[tuple[int, int]] = []
        with open(log_file, "ab") as log:
            log.write(f"\n===== {datetime.datetime.now().isoformat()} {' '.join(argv)}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=cwd,
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def remember_tree(self) -> None:
        """Record the descendants now: once their parent dies they are re-parented and can't be found."""
        if self.alive():
            known = dict(self._tree)
            known.update(_process_tree(self.proc.pid))
            self._tree = list(known.items())

    def terminate(self, timeout: float, sig: int = signal.SIGTERM) -> bool:
        """`sig` to the child, wait up to `timeout`, then SIGKILL everything. True if it exited by itself."""
        self.remember_tree()
        graceful = True
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                graceful = False
        self.kill()
        return graceful

    def kill(self) -> None:
        """SIGKILL the process group and every descendant ever seen, then reap the child."""
        self.remember_tree()
        if self.alive():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        _kill_processes(self._tree)
        # members of the group may outlive its leader (their pgid, our child's pid, can't be reused meanwhile)
        _kill_processes(_process_group(self.proc.pid))
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)


# --------------------------------------------------------------------------------------------------------------
# base class


_live: set[_Service] = set()


class _Service:
    """Start/stop/kill/restart/close around one main child process; subclasses describe the service."""

    name = "service"
    default_startup_timeout = 60.0
    default_stop_timeout = 30.0

    def __init__(self, *, startup_timeout: float | None = None, stop_timeout: float | None = None):
        self.host = HOST
        self.startup_timeout = startup_timeout or self.default_startup_timeout
        self.stop_timeout = stop_timeout or self.default_stop_timeout
        self.workdir = Path(tempfile.mkdtemp(prefix=f"eventrelay-{self.name}-"))
        self.log_file = self.workdir / f"{self.name}.log"
        self.startup_time: float | None = None  # seconds the last start() took until ready
        self.startup_times: list[float] = []
        self._child: _Child | None = None
        self._closed = False
        _live.add(self)

    # -- to override ---------------------------------------------------------------------------------------------

    def _argv(self) -> list[str]:
        raise NotImplementedError

    def _env(self) -> dict[str, str]:
        return dict(os.environ)

    def _before_start(self) -> None:
        """Write configuration, start helpers."""

    def _after_stop(self) -> None:
        """Stop helpers."""

    def _check_ready(self, timeout: float) -> bool:
        raise NotImplementedError

    def _log_tails(self) -> str:
        return f"--- {self.log_file}\n{_tail(self.log_file)}"

    def log_tail(self) -> str:
        """The end of the service's log file(s), for failure messages."""
        return self._log_tails()

    # -- public --------------------------------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._child is not None and self._child.alive()

    @property
    def pid(self) -> int | None:
        return self._child.pid if self._child is not None else None

    def start(self, timeout: float | None = None) -> None:
        if self._closed:
            raise ServiceError(f"{self.name}: closed")
        if self.running:
            raise ServiceError(f"{self.name}: already running")
        timeout = timeout or self.startup_timeout
        t0 = time.monotonic()
        try:
            self._before_start()
            self._child = _Child(self.name, self._argv(), self._env(), self.workdir, self.log_file)
            self._wait_ready(t0 + timeout, timeout)
        except BaseException:
            self.kill()
            raise
        self._child.remember_tree()
        self.startup_time = time.monotonic() - t0
        self.startup_times.append(self.startup_time)

    def _wait_ready(self, deadline: float, timeout: float) -> None:
        last: BaseException | None = None
        child = self._child
        assert child is not None
        while True:
            if not child.alive():
                raise ServiceError(
                    f"{self.name} exited with status {child.proc.returncode} during start-up\n{self._log_tails()}"
                )
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ServiceError(f"{self.name} not ready within {timeout:.0f}s (last: {last!r})\n{self._log_tails()}")
            try:
                if self._check_ready(min(5.0, max(remaining, 0.1))):
                    return
            except Exception as e:  # noqa: BLE001 - anything means "not ready yet"
                last = e
            child.remember_tree()
            time.sleep(0.1)

    def stop(self, timeout: float | None = None) -> bool:
        """Graceful stop (SIGTERM), SIGKILL of the whole tree after `timeout`. True if it stopped by itself."""
        graceful = True
        if self._child is not None:
            graceful = self._child.terminate(timeout or self.stop_timeout)
            self._child = None
        self._after_stop()
        return graceful

    def kill(self) -> None:
        """SIGKILL now (a crash, as far as the service can tell)."""
        if self._child is not None:
            self._child.kill()
            self._child = None
        self._after_stop()

    def restart(self, timeout: float | None = None) -> None:
        self.stop()
        self.start(timeout)

    def close(self) -> None:
        """Stop and remove the temporary directory. Idempotent."""
        try:
            self.stop()
        finally:
            self._closed = True
            shutil.rmtree(self.workdir, ignore_errors=True)
            _live.discard(self)

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.workdir} running={self.running}>"


@atexit.register
def _kill_leftovers() -> None:
    for service in list(_live):
        with contextlib.suppress(Exception):
            service.kill()
        shutil.rmtree(service.workdir, ignore_errors=True)
        _live.discard(service)


# --------------------------------------------------------------------------------------------------------------
# TLS material


@dataclass(frozen=True)
class TlsFiles:
    ca_file: Path  # PEM, the self-signed CA clients should trust
    cert_file: Path  # PEM, server certificate for 127.0.0.1 / localhost
    key_file: Path  # PEM, unencrypted server key
    p12_file: Path  # PKCS#12 keystore with key + certificate chain (for Java)
    p12_password: str


def make_tls_files(directory: Path, password: str = "changeit") -> TlsFiles:
    """A fresh self-signed CA and a server certificate for 127.0.0.1/localhost signed by it."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.hazmat.primitives.serialization import pkcs12
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    not_before, not_after = now - datetime.timedelta(days=1), now + datetime.timedelta(days=30)

    ca_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "eventrelay test CA")])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, key_cert_sign=True, crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ca_ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=True, data_encipherment=False,
                key_agreement=False, key_cert_sign=False, crl_sign=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    files = TlsFiles(
        ca_file=directory / "ca.pem",
        cert_file=directory / "server.pem",
        key_file=directory / "server.key",
        p12_file=directory / "server.p12",
        p12_password=password,
    )
    files.ca_file.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    files.cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files.key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    files.key_file.chmod(0o600)
    files.p12_file.write_bytes(
        pkcs12.serialize_key_and_certificates(
            b"server", key, cert, [ca_cert], serialization.BestAvailableEncryption(password.encode())
        )
    )
    return files


# --------------------------------------------------------------------------------------------------------------
# STOMP probe


@dataclass
class StompFrame:
    command: str
    headers: dict[str, str]
    body: bytes


def stomp_probe(
    port: int,
    *,
    login: str,
    passcode: str,
    host: str = HOST,
    vhost: str | None = None,
    ca_file: str | os.PathLike[str] | None = None,
    timeout: float = 5.0,
) -> StompFrame:
    """Open a connection (TLS when `ca_file` is given), send a STOMP 1.2 CONNECT, return the answer frame
    (CONNECTED or ERROR) and disconnect. Every step is bounded by `timeout`; raises OSError/TimeoutError."""
    deadline = time.monotonic() + timeout
    sock = socket.create_connection((host, port), timeout=timeout)
    try:
        if ca_file is not None:
            ctx = ssl.create_default_context(cafile=str(ca_file))
            sock = ctx.wrap_socket(sock, server_hostname=host)
        headers = {
            "accept-version": "1.2",
            "host": vhost if vhost is not None else host,
            "login": login,
            "passcode": passcode,
            "heart-beat": "0,0",
        }
        frame = "CONNECT\n" + "".join(f"{k}:{v}\n" for k, v in headers.items()) + "\n"
        sock.sendall(frame.encode() + b"\x00")
        buf = b""
        while b"\x00" not in buf.lstrip(b"\r\n"):
            sock.settimeout(max(deadline - time.monotonic(), 0.01))
            chunk = sock.recv(4096)
            if not chunk:
                raise ConnectionError(f"connection closed after {buf!r}")
            buf += chunk
        raw = buf.lstrip(b"\r\n").split(b"\x00", 1)[0]
        head, _, body = raw.partition(b"\n\n")
        lines = head.decode(errors="replace").replace("\r\n", "\n").split("\n")
        answer = StompFrame(lines[0], dict(line.split(":", 1) for line in lines[1:] if ":" in line), body)
        if answer.command == "CONNECTED":
            with contextlib.suppress(OSError):
                sock.sendall(b"DISCONNECT\n\n\x00")
        return answer
    finally:
        with contextlib.suppress(OSError):
            sock.close()


class _StompBroker(_Service):
    """Shared by the STOMP brokers: credentials, ports, TLS files, a readiness probe."""

    def __init__(self, tls: bool, username: str, password: str, **kw):
        super().__init__(**kw)
        self.tls = tls
        self.username = username
        self.password = password
        self.vhost: str | None = None
        ports = free_ports(2 if tls else 1)
        self.port: int = ports[0]
        self.tls_port: int | None = ports[1] if tls else None
        self.tls_files: TlsFiles | None = make_tls_files(self.workdir / "tls") if tls else None
        self.ca_file: str | None = str(self.tls_files.ca_file) if self.tls_files else None

    @property
    def host_and_ports(self) -> list[tuple[str, int]]:
        return [(self.host, self.port)]

    def probe(self, *, username: str | None = None, password: str | None = None, tls: bool = False,
              timeout: float = 5.0) -> StompFrame:
        """A bounded STOMP CONNECT against the plain (or TLS) listener; returns CONNECTED or ERROR."""
        if tls and self.tls_port is None:
            raise ServiceError(f"{self.name} was created without tls=True")
        return stomp_probe(
            self.tls_port if tls else self.port,  # type: ignore[arg-type]
            login=self.username if username is None else username,
            passcode=self.password if password is None else password,
            host=self.host,
            vhost=self.vhost,
            ca_file=self.ca_file if tls else None,
            timeout=timeout,
        )

    def _check_ready(self, timeout: float) -> bool:
        if not port_open(self.port, timeout=min(timeout, 1.0)):
            return False
        frame = self.probe(timeout=timeout)
        if frame.command != "CONNECTED":
            raise ServiceError(f"STOMP CONNECT answered {frame.command} {frame.headers} {frame.body[:200]!r}")
        if self.tls_port is not None:
            frame = self.probe(tls=True, timeout=timeout)
            if frame.command != "CONNECTED":
                raise ServiceError(f"STOMP+TLS CONNECT answered {frame.command} {frame.headers}")
        return True


# --------------------------------------------------------------------------------------------------------------
# moto


class MotoServer(_Service):
    """`python -m moto.server` on 127.0.0.1. State lives in memory: restart() comes back empty."""

    name = "moto"
    default_startup_timeout = 30.0
    default_stop_timeout = 10.0
    region = "us-east-1"
    access_key_id = "testing"
    secret_access_key = "testing"

    def __init__(self, port: int | None = None, **kw):
        super().__init__(**kw)
        self.port: int = port or free_port()

    @property
    def endpoint_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def client_kwargs(self) -> dict[str, str]:
        """Keyword arguments for boto3/aiobotocore `client("sqs", **kw)`."""
        return {
            "endpoint_url": self.endpoint_url,
            "region_name": self.region,
            "aws_access_key_id": self.access_key_id,
            "aws_secret_access_key": self.secret_access_key,
        }

    def reset(self, timeout: float = 5.0) -> None:
        """Drop every resource (cheaper than restart())."""
        req = urllib.request.Request(f"{self.endpoint_url}/moto-api/reset", method="POST", data=b"")
        with urllib.request.urlopen(req, timeout=timeout):
            pass

    def _argv(self) -> list[str]:
        return [sys.executable, "-m", "moto.server", "-H", self.host, "-p", str(self.port)]

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            AWS_ACCESS_KEY_ID=self.access_key_id,
            AWS_SECRET_ACCESS_KEY=self.secret_access_key,
            AWS_SESSION_TOKEN="testing",
            AWS_SECURITY_TOKEN="testing",
            AWS_DEFAULT_REGION=self.region,
            AWS_REGION=self.region,
            PYTHONUNBUFFERED="1",
        )
        return env

    def _check_ready(self, timeout: float) -> bool:
        try:
            with urllib.request.urlopen(f"{self.endpoint_url}/moto-api/", timeout=min(timeout, 2.0)):
                return True
        except urllib.error.HTTPError:
            return True  # it answered HTTP: it is up


# --------------------------------------------------------------------------------------------------------------
# ActiveMQ


_LOG4J = """\
log4j.rootLogger=INFO, out
log4j.logger.org.springframework=WARN
log4j.logger.org.apache.xbean=WARN
log4j.logger.org.apache.activemq.spring=WARN
log4j.appender.out=org.apache.log4j.ConsoleAppender
log4j.appender.out.layout=org.apache.log4j.PatternLayout
log4j.appender.out.layout.ConversionPattern=%d{ISO8601} %-5p [%t] %c{1} - %m%n
"""


class ActiveMQ(_StompBroker):
    """ActiveMQ 5.x (Debian's /usr/share/activemq) with one STOMP connector (+ STOMP over TLS with tls=True),
    KahaDB persistence in the temp dir, simpleAuthenticationPlugin (one user, allowed everything),
    an OpenWire connector on `openwire_port` (tests read with a real JMS client), no JMX, no web console."""

    name = "activemq"
    default_startup_timeout = 90.0
    default_stop_timeout = 30.0

    def __init__(self, tls: bool = False, *, username: str = "eventrelay", password: str = "secret",
                 heap: str = "256m", **kw):
        super().__init__(tls, username, password, **kw)
        self.heap = heap
        self.conf_dir = self.workdir / "conf"
        self.data_dir = self.workdir / "data"
        self.tmp_dir = self.workdir / "tmp"
        self.config_file = self.conf_dir / "activemq.xml"
        self.openwire_port: int = free_port()

    def _java(self) -> str:
        java_home = os.environ.get("JAVA_HOME")
        if java_home and (Path(java_home) / "bin" / "java").exists():
            return str(Path(java_home) / "bin" / "java")
        java = shutil.which("java")
        if not java:
            raise ServiceError("java not found (apt-get install default-jre-headless)")
        return java

    def _before_start(self) -> None:
        if not (ACTIVEMQ_HOME / "bin" / "activemq.jar").exists():
            raise ServiceError(f"{ACTIVEMQ_HOME}/bin/activemq.jar not found (run .ci/install-services.sh)")
        for d in (self.conf_dir, self.data_dir, self.tmp_dir):
            d.mkdir(parents=True, exist_ok=True)
        (self.conf_dir / "log4j.properties").write_text(_LOG4J)
        self.config_file.write_text(self._config_xml())

    def _config_xml(self) -> str:
        user = quoteattr(self.username)
        # OpenWire first: connectors start in order, so a STOMP answer (the readiness probe) means both are up.
        connectors = [f'<transportConnector name="openwire" uri="tcp://{self.host}:{self.openwire_port}"/>',
                      f'<transportConnector name="stomp" uri="stomp://{self.host}:{self.port}"/>']
        ssl_context = ""
        if self.tls_files is not None:
            connectors.append(f'<transportConnector name="stomp+ssl" uri="stomp+ssl://{self.host}:{self.tls_port}"/>')
            ssl_context = f"""
        <sslContext>
            <sslContext keyStore={quoteattr(str(self.tls_files.p12_file))}
                        keyStorePassword={quoteattr(self.tls_files.p12_password)}
                        keyStoreType="pkcs12"/>
        </sslContext>"""
        connectors_xml = "\n            ".join(connectors)
        return f"""<?xml version="1.0" encoding="UTF-8"?>
<!-- Generated by bench/services.py; based on Debian's /etc/activemq/instances-available/main/activemq.xml
     and /usr/share/doc/activemq/examples/conf/activemq-security.xml -->
<beans
  xmlns="http://www.springframework.org/schema/beans"
  xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"
  xsi:schemaLocation="http://www.springframework.org/schema/beans http://www.springframework.org/schema/beans/spring-beans-2.0.xsd
  http://activemq.apache.org/schema/core http://activemq.apache.org/schema/core/activemq-core.xsd">

    <broker xmlns="http://activemq.apache.org/schema/core"
            brokerName="eventrelay-test"
            useJmx="false"
            persistent="true"
            schedulerSupport="false"
            useShutdownHook="true"
            dataDirectory={quoteattr(str(self.data_dir))}
            tmpDataDirectory={quoteattr(str(self.tmp_dir / "broker"))}>

        <managementContext>
            <managementContext createConnector="false"/>
        </managementContext>

        <persistenceAdapter>
            <kahaDB directory={quoteattr(str(self.data_dir / "kahadb"))} journalMaxFileLength="8mb"/>
        </persistenceAdapter>

        <plugins>
            <simpleAuthenticationPlugin anonymousAccessAllowed="false">
                <users>
                    <authenticationUser username={user} password={quoteattr(self.password)} groups="admins,users"/>
                </users>
            </simpleAuthenticationPlugin>
            <authorizationPlugin>
                <map>
                    <authorizationMap>
                        <authorizationEntries>
                            <authorizationEntry queue="&gt;" read="admins" write="admins" admin="admins"/>
                            <authorizationEntry topic="&gt;" read="admins" write="admins" admin="admins"/>
                        </authorizationEntries>
                        <tempDestinationAuthorizationEntry>
                            <tempDestinationAuthorizationEntry read="admins" write="admins" admin="admins"/>
                        </tempDestinationAuthorizationEntry>
                    </authorizationMap>
                </map>
            </authorizationPlugin>
        </plugins>
{ssl_context}
        <systemUsage>
            <systemUsage>
                <memoryUsage><memoryUsage percentOfJvmHeap="50"/></memoryUsage>
                <storeUsage><storeUsage limit="1 gb"/></storeUsage>
                <tempUsage><tempUsage limit="512 mb"/></tempUsage>
            </systemUsage>
        </systemUsage>

        <transportConnectors>
            {connectors_xml}
        </transportConnectors>
    </broker>
</beans>
"""

    def _argv(self) -> list[str]:
        return [
            self._java(),
            "-Xms64m",
            f"-Xmx{self.heap}",
            "-XX:+UseSerialGC",
            "-XX:TieredStopAtLevel=1",  # C1 only: faster start-up, plenty for tests
            "-Xshare:auto",
            "-Djava.awt.headless=true",
            "-Djava.net.preferIPv4Stack=true",
            f"-Djava.io.tmpdir={self.tmp_dir}",
            f"-Dlog4j.configuration=file:{self.conf_dir / 'log4j.properties'}",
            f"-Dactivemq.classpath={self.conf_dir}",
            f"-Dactivemq.home={ACTIVEMQ_HOME}",
            f"-Dactivemq.base={self.workdir}",
            f"-Dactivemq.conf={self.conf_dir}",
            f"-Dactivemq.data={self.data_dir}",
            "-jar",
            str(ACTIVEMQ_HOME / "bin" / "activemq.jar"),
            "start",
            f"xbean:file:{self.config_file}",
        ]

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("ACTIVEMQ_")}
        env.update(
            ACTIVEMQ_HOME=str(ACTIVEMQ_HOME),
            ACTIVEMQ_BASE=str(self.workdir),
            ACTIVEMQ_CONF=str(self.conf_dir),
            ACTIVEMQ_DATA=str(self.data_dir),
            ACTIVEMQ_TMP=str(self.tmp_dir),
        )
        env.pop("JAVA_TOOL_OPTIONS", None)
        env.pop("_JAVA_OPTIONS", None)
        return env


# --------------------------------------------------------------------------------------------------------------
# RabbitMQ


class RabbitMQ(_StompBroker):
    """A RabbitMQ node (Debian's /usr/lib/rabbitmq) with the STOMP plugin: STOMP on `port` (+ STOMP over TLS on
    `tls_port` with tls=True), AMQP on `amqp_port`, all on 127.0.0.1; vhost `/eventrelay` and one user with
    full permissions on it (created at first boot: there is no guest user). Runs its own epmd."""

    name = "rabbitmq"
    default_startup_timeout = 90.0
    default_stop_timeout = 30.0

    def __init__(self, tls: bool = False, *, username: str = "eventrelay", password: str = "secret",
                 vhost: str = "/eventrelay", **kw):
        super().__init__(tls, username, password, **kw)
        self.vhost = vhost
        self.amqp_port: int = free_port()
        self.nodename = f"rabbit-test-{self.port}@localhost"
        self.home_dir = self.workdir / "home"
        self.mnesia_dir = self.workdir / "mnesia"
        self.log_dir = self.workdir / "log"
        self.config_file = self.workdir / "rabbitmq.conf"
        self.epmd_port: int | None = None
        self.dist_port: int | None = None
        self._epmd: _Child | None = None

    def _config(self) -> str:
        lines = [
            f"listeners.tcp.1 = {self.host}:{self.amqp_port}",
            f"stomp.listeners.tcp.1 = {self.host}:{self.port}",
            f"default_vhost = {self.vhost}",
            f"default_user = {self.username}",
            f"default_pass = {self.password}",
            "default_permissions.configure = .*",
            "default_permissions.read = .*",
            "default_permissions.write = .*",
            "default_user_tags.administrator = true",
            f"stomp.default_vhost = {self.vhost}",
            "loopback_users = none",
            "disk_free_limit.absolute = 50MB",
            "log.console = false",
            "log.file.level = info",
        ]
        if self.tls_files is not None:
            lines += [
                f"stomp.listeners.ssl.1 = {self.host}:{self.tls_port}",
                f"ssl_options.cacertfile = {self.tls_files.ca_file}",
                f"ssl_options.certfile = {self.tls_files.cert_file}",
                f"ssl_options.keyfile = {self.tls_files.key_file}",
                "ssl_options.verify = verify_none",
                "ssl_options.fail_if_no_peer_cert = false",
            ]
        return "\n".join(lines) + "\n"

    def _before_start(self) -> None:
        if not RABBITMQ_SERVER.exists():
            raise ServiceError(f"{RABBITMQ_SERVER} not found (run .ci/install-services.sh)")
        epmd = shutil.which("epmd") or next(iter(sorted(Path("/usr/lib/erlang").glob("erts-*/bin/epmd"))), None)
        if not epmd:
            raise ServiceError("epmd not found (is erlang-base installed?)")
        for d in (self.home_dir, self.mnesia_dir, self.log_dir):
            d.mkdir(parents=True, exist_ok=True)
        self.config_file.write_text(self._config())
        (self.workdir / "enabled_plugins").write_text("[rabbitmq_stomp].\n")
        (self.workdir / "rabbitmq-env.conf").write_text("")
        # epmd and the distribution port are internal: fresh ones each start (the node name stays the same).
        self.epmd_port, self.dist_port = free_ports(2)
        self._epmd = _Child(
            "epmd",
            [str(epmd), "-port", str(self.epmd_port), "-address", self.host],
            self._env(),
            self.workdir,
            self.workdir / "epmd.log",
        )
        deadline = time.monotonic() + 10
        while not port_open(self.epmd_port, timeout=0.5):
            if not self._epmd.alive() or time.monotonic() > deadline:
                raise ServiceError(f"epmd did not start\n{_tail(self.workdir / 'epmd.log')}")
            time.sleep(0.05)

    def _after_stop(self) -> None:
        if self._epmd is not None:
            self._epmd.terminate(5)
            self._epmd = None

    def _argv(self) -> list[str]:
        return [str(RABBITMQ_SERVER)]

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))}
        w = self.workdir
        env.update(
            HOME=str(self.home_dir),  # .erlang.cookie
            LANG="C.UTF-8",
            LC_ALL="C.UTF-8",
            RABBITMQ_NODENAME=self.nodename,
            RABBITMQ_USE_LONGNAME="false",
            RABBITMQ_NODE_IP_ADDRESS=self.host,
            RABBITMQ_NODE_PORT=str(self.amqp_port),
            RABBITMQ_DIST_PORT=str(self.dist_port),
            ERL_EPMD_PORT=str(self.epmd_port),
            ERL_EPMD_ADDRESS=self.host,
            RABBITMQ_CONF_ENV_FILE=str(w / "rabbitmq-env.conf"),
            RABBITMQ_CONFIG_FILE=str(self.config_file),
            RABBITMQ_ADVANCED_CONFIG_FILE=str(w / "advanced.config"),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(w / "enabled_plugins"),
            RABBITMQ_MNESIA_BASE=str(self.mnesia_dir),
            RABBITMQ_LOG_BASE=str(self.log_dir),
            RABBITMQ_PID_FILE=str(w / "rabbitmq.pid"),
            RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}",
        )
        return env

    def ctl(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """Run `rabbitmqctl ARGS` against this node (e.g. "list_queues", "-p", vhost, "name", "messages");
        raises CalledProcessError on failure, TimeoutExpired after `timeout`."""
        if not self.running:
            raise ServiceError("rabbitmq is not running")
        ctl = RABBITMQ_SERVER.with_name("rabbitmqctl")
        return subprocess.run(
            [str(ctl), "--node", self.nodename, *args],
            env=self._env(),
            cwd=self.workdir,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=True,
            start_new_session=True,
        )

    def queue_depths(self, timeout: float = 60.0) -> dict[str, int]:
        """{queue name: ready + unacked messages} in the vhost, through rabbitmqctl."""
        out = self.ctl("list_queues", "-q", "--no-table-headers", "-p", self.vhost or "/", "name", "messages",
                       timeout=timeout).stdout
        depths = {}
        for line in out.splitlines():
            name, _, count = line.rpartition("\t")
            if name:
                depths[name] = int(count)
        return depths

    def sync_metadata(self, timeout: float = 60.0) -> None:
        """Force Mnesia's transaction log to disk. RabbitMQ 3.x writes it asynchronously, so after a SIGKILL
        a queue declared a moment earlier can be missing (together with its confirmed messages)."""
        self.ctl("eval", "ok = mnesia:sync_log().", timeout=timeout)

    def _log_tails(self) -> str:
        out = [super()._log_tails()]
        for f in sorted(self.log_dir.glob("*.log")):
            out.append(f"--- {f}\n{_tail(f)}")
        return "\n".join(out)


# --------------------------------------------------------------------------------------------------------------
# PostgreSQL


_POSTGRES_INSTALL_HINT = (
    "`make test` installs Debian's postgresql package (.ci/install-services.sh, as root; it keeps the distro's "
    "own cluster from starting)"
)

# postgres's shutdown modes are chosen by signal: smart waits for every client to leave (a connection pool
# would hold it up until the timeout), fast disconnects them, immediate quits without a checkpoint (a crash).
_POSTGRES_STOP_SIGNALS = {"smart": signal.SIGTERM, "fast": signal.SIGINT, "immediate": signal.SIGQUIT}


def postgres_bindir() -> Path:
    """$POSTGRES_BINDIR, or the newest /usr/lib/postgresql/<version>/bin that has the server binaries."""
    if POSTGRES_BINDIR:
        candidates = [Path(POSTGRES_BINDIR)]
    else:
        found = Path("/usr/lib/postgresql").glob("*/bin")
        candidates = sorted(found, key=lambda d: [int(n) for n in re.findall(r"\d+", d.parent.name)], reverse=True)
    for bindir in candidates:
        if all(os.access(bindir / tool, os.X_OK) for tool in ("initdb", "postgres", "psql")):
            return bindir
    where = POSTGRES_BINDIR or "/usr/lib/postgresql/*/bin"
    raise ServiceError(f"PostgreSQL's initdb, postgres and psql not found in {where}: {_POSTGRES_INSTALL_HINT}")


def _sql_ident(name: str) -> str:
    if not name or "\0" in name or len(name.encode()) > 63:
        raise ValueError(f"not a usable PostgreSQL name: {name!r}")
    return '"' + name.replace('"', '""') + '"'


def _sql_literal(text: str) -> str:
    if "\0" in text:
        raise ValueError("a PostgreSQL string cannot hold NUL")
    return "'" + text.replace("'", "''") + "'"


def _cpu_ticks(pid: int) -> int:
    """utime + stime of a process plus those of the children it has reaped (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read().decode(errors="replace")
    except OSError:
        return 0
    fields = data[data.rfind(")") + 2 :].split()
    # field N of stat is fields[N - 3]: utime 14, stime 15, cutime 16, cstime 17
    return sum(int(x) for x in fields[11:15])


class PostgresCluster(_Service):
    """A throwaway PostgreSQL cluster made with `initdb` (Debian's /usr/lib/postgresql/<newest>/bin) in the temp
    dir, listening on 127.0.0.1:`port` and on a Unix socket in `socket_dir`. PostgreSQL refuses to run as root,
    so when root the data belongs to the `postgres` OS user and the binaries run as it; otherwise they run as
    the current user.

    Role `username` (password `password`, scram-sha-256 over TCP: a wrong password is refused) owns database
    `database`; tests get databases of their own with create_database(). Admin SQL runs through `psql` as the
    superuser `postgres` over the Unix socket (peer authentication), so the infrastructure needs no driver.

        with PostgresCluster() as pg:
            dsn = pg.create_database("t1")        # postgresql://eventrelay:PW@127.0.0.1:PORT/t1
            pg.restart()                          # fast shutdown, same port and data
            pg.stop(mode="immediate"); pg.start() # a crash: recovery from the WAL
            pg.server_cpu_seconds()
    """

    name = "postgres"
    default_startup_timeout = 60.0
    default_stop_timeout = 30.0
    superuser = "postgres"

    def __init__(self, *, fsync: bool = True, username: str = "eventrelay", password: str | None = None,
                 database: str = "eventrelay", max_connections: int = 200, shared_buffers: str = "128MB",
                 port: int | None = None, **kw):
        self.bindir = postgres_bindir()  # before the temp dir exists: nothing to clean up when this fails
        self._os_user = self._server_os_user()
        super().__init__(**kw)
        self.fsync = fsync
        self.username = username
        self.password = password or secrets.token_urlsafe(18)
        self.database = database
        self.max_connections = max_connections
        self.shared_buffers = shared_buffers
        self.port: int = port or free_port()
        self.data_dir = self.workdir / "data"
        self.socket_dir = self.workdir / "sock"
        self.initdb_time: float | None = None  # seconds initdb took (the first start only)
        self._initialized = False
        self._bootstrapped = False
        self._cpu_ticks_before = 0  # of the server processes of earlier starts, taken as they were stopped

    @staticmethod
    def _server_os_user() -> pwd.struct_passwd | None:
        """The OS user the server runs as: `postgres` when we are root, None (ourselves) otherwise."""
        if os.geteuid() != 0:
            return None
        try:
            return pwd.getpwnam("postgres")
        except KeyError:
            raise ServiceError(f"running as root, but there is no `postgres` OS user to run PostgreSQL as: "
                               f"{_POSTGRES_INSTALL_HINT}") from None

    def _as_server_user(self, argv: list[str]) -> list[str]:
        # setpriv execs in place (runuser forks and waits), so the child's pid is the postmaster's and our
        # signals reach it directly.
        if self._os_user is None:
            return argv
        return ["setpriv", f"--reuid={self._os_user.pw_uid}", f"--regid={self._os_user.pw_gid}", "--init-groups",
                "--", *argv]

    def _chown_to_server_user(self, path: Path) -> None:
        if self._os_user is not None:
            os.chown(path, self._os_user.pw_uid, self._os_user.pw_gid)

    # -- set-up --------------------------------------------------------------------------------------------------

    def _before_start(self) -> None:
        if not self._initialized:
            self._initdb()
            self._initialized = True

    def _initdb(self) -> None:
        shutil.rmtree(self.data_dir, ignore_errors=True)  # what a failed earlier attempt left
        self.socket_dir.mkdir(exist_ok=True)
        self._chown_to_server_user(self.workdir)
        self._chown_to_server_user(self.socket_dir)
        argv = self._as_server_user([
            str(self.bindir / "initdb"), "-D", str(self.data_dir), "-U", self.superuser,
            "--encoding=UTF8", "--locale=C", "--auth-local=peer", "--auth-host=scram-sha-256",
            "--no-sync",  # a throwaway cluster: nothing to make durable before it first starts
        ])
        t0 = time.monotonic()
        with open(self.log_file, "ab") as log:
            log.write(f"\n===== {datetime.datetime.now().isoformat()} {' '.join(argv)}\n".encode())
            log.flush()
            try:
                done = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                      env=self._env(), cwd=self.workdir, timeout=self.startup_timeout,
                                      start_new_session=True)
            except subprocess.TimeoutExpired:
                raise ServiceError(f"initdb did not finish within {self.startup_timeout:.0f}s\n"
                                   f"{self._log_tails()}") from None
        if done.returncode != 0:
            raise ServiceError(f"initdb exited with status {done.returncode}\n{self._log_tails()}")
        self.initdb_time = time.monotonic() - t0
        with open(self.data_dir / "postgresql.conf", "a") as conf:
            conf.write(self._settings())
        (self.data_dir / "pg_hba.conf").write_text(self._hba())
        (self.data_dir / "pg_ident.conf").write_text(self._ident())

    def _settings(self) -> str:
        settings = {
            "listen_addresses": f"'{self.host}'",
            "port": str(self.port),
            "unix_socket_directories": _sql_literal(str(self.socket_dir)),
            "max_connections": str(self.max_connections),  # several daemons, each with a pool, plus the tests
            "shared_buffers": _sql_literal(self.shared_buffers),
            "fsync": "on" if self.fsync else "off",
            "password_encryption": "'scram-sha-256'",
            "timezone": "'UTC'",
            "log_timezone": "'UTC'",
            "lc_messages": "'C'",  # English errors, whatever the host's locale
            "log_line_prefix": "'%m [%p] %q%u@%d '",
        }
        return "\n# bench/services.py PostgresCluster\n" + "".join(f"{k} = {v}\n" for k, v in settings.items())

    def _hba(self) -> str:
        # Passwords everywhere except the superuser on the Unix socket (peer, mapped in pg_ident.conf): the
        # tests check that a wrong password is refused, which `trust` would hide.
        return (
            "# TYPE  DATABASE  USER      ADDRESS        METHOD\n"
            f"local   all       {self.superuser:<9} {'':<14} peer map=admin\n"
            "local   all       all                      scram-sha-256\n"
            f"host    all       all       {self.host}/32   scram-sha-256\n"
        )

    def _ident(self) -> str:
        """Who may be the superuser over the Unix socket: the user running the tests, and the server's."""
        me = pwd.getpwuid(os.geteuid()).pw_name
        server = self._os_user.pw_name if self._os_user is not None else me
        return "".join(f"admin  {os_user}  {self.superuser}\n" for os_user in sorted({me, server}))

    def _bootstrap(self) -> None:
        self.psql(
            f"CREATE ROLE {_sql_ident(self.username)} LOGIN PASSWORD {_sql_literal(self.password)}",
            f"CREATE DATABASE {_sql_ident(self.database)} OWNER {_sql_ident(self.username)} TEMPLATE template0",
        )

    # -- the process ---------------------------------------------------------------------------------------------

    def _argv(self) -> list[str]:
        return self._as_server_user([str(self.bindir / "postgres"), "-D", str(self.data_dir)])

    def _env(self) -> dict[str, str]:
        # PG* variables of the caller (PGPASSWORD, PGHOST, ...) would steer psql and libpq elsewhere.
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env.update(LC_ALL="C", HOME=str(self.workdir))
        return env

    def _check_ready(self, timeout: float) -> bool:
        # postmaster.pid's 8th line turns "ready" once connections are accepted; the pid in it tells our server
        # from another one that holds the port.
        try:
            lines = (self.data_dir / "postmaster.pid").read_text().splitlines()
        except FileNotFoundError:
            return False
        if len(lines) < 8 or lines[0].strip() != str(self.pid) or lines[7].strip() != "ready":
            return False
        return port_open(self.port, timeout=min(timeout, 1.0))

    def start(self, timeout: float | None = None) -> None:
        super().start(timeout)
        if not self._bootstrapped:
            try:
                self._bootstrap()
            except BaseException:
                self.kill()
                raise
            self._bootstrapped = True

    def stop(self, timeout: float | None = None, mode: str = "fast") -> bool:
        """Shut down (`mode`: "fast" by default, "smart" or "immediate", the latter a crash that the next
        start recovers from); SIGKILL of every process after `timeout`. True if it stopped by itself."""
        if mode not in _POSTGRES_STOP_SIGNALS:
            raise ValueError(f"mode must be one of {sorted(_POSTGRES_STOP_SIGNALS)}, not {mode!r}")
        graceful = True
        if self._child is not None:
            self._cpu_ticks_before += self._cpu_ticks_now()
            graceful = self._child.terminate(timeout or self.stop_timeout, _POSTGRES_STOP_SIGNALS[mode])
            self._child = None
        self._after_stop()
        return graceful

    def kill(self) -> None:
        """SIGKILL of the postmaster and every backend at once: the next start recovers from the WAL."""
        if self._child is not None:
            self._cpu_ticks_before += self._cpu_ticks_now()
        super().kill()

    def restart(self, timeout: float | None = None, mode: str = "fast") -> None:
        """Stop (`mode` as in stop()) and start again: same port, same data, same role and password."""
        self.stop(mode=mode)
        self.start(timeout)

    # -- for the tests and the benchmarks ------------------------------------------------------------------------

    def dsn(self, database: str | None = None, password: str | None = None, *, username: str | None = None) -> str:
        """A libpq URL for `database` (default: the role's own) over TCP, with the role's password unless
        another one is given."""
        user = urllib.parse.quote(username or self.username, safe="")
        secret = urllib.parse.quote(self.password if password is None else password, safe="")
        name = urllib.parse.quote(database or self.database, safe="")
        return f"postgresql://{user}:{secret}@{self.host}:{self.port}/{name}"

    def psql(self, *statements: str, database: str = "postgres", timeout: float = 60.0) -> str:
        """Run each statement (in its own transaction, so CREATE DATABASE works) as the superuser over the Unix
        socket; returns what they printed, unaligned and without headers (`a|b` per row)."""
        argv = [str(self.bindir / "psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
                "-h", str(self.socket_dir), "-p", str(self.port), "-U", self.superuser, "-d", database]
        for sql in statements:
            argv += ["-c", sql]
        try:
            done = subprocess.run(argv, env=self._env(), cwd=self.workdir, stdin=subprocess.DEVNULL,
                                  capture_output=True, text=True, timeout=timeout, start_new_session=True)
        except subprocess.TimeoutExpired:
            raise ServiceError(f"psql did not finish within {timeout:.0f}s: {statements}") from None
        if done.returncode != 0:
            raise ServiceError(f"psql on {database} failed ({done.returncode}): {done.stderr.strip()}\n"
                               f"statements: {statements}")
        return done.stdout

    def create_database(self, name: str) -> str:
        """A fresh, empty database owned by the role; returns its dsn()."""
        self.psql(f"CREATE DATABASE {_sql_ident(name)} OWNER {_sql_ident(self.username)} TEMPLATE template0")
        return self.dsn(name)

    def drop_database(self, name: str) -> None:
        """Drop it (if it exists), disconnecting whoever is still connected to it."""
        self.psql(f"DROP DATABASE IF EXISTS {_sql_ident(name)} WITH (FORCE)")

    def server_cpu_seconds(self) -> float:
        """User + system CPU of this cluster's processes (postmaster, backends, background workers, and the
        exited ones the postmaster reaped), summed over every start of this object; the clients' is not in it.
        Take differences: e.g. around a benchmark run, for PostgreSQL's own CPU per delivery."""
        return (self._cpu_ticks_before + self._cpu_ticks_now()) / os.sysconf("SC_CLK_TCK")

    def _cpu_ticks_now(self) -> int:
        if not self.running:
            return 0
        # the postmaster first: a backend that exits meanwhile then goes uncounted until the next reading
        # rather than counted twice (once alive, once in the postmaster's cutime).
        return sum(_cpu_ticks(pid) for pid, _ in _process_tree(self.pid))  # type: ignore[arg-type]
