"""Runtime files: how `eventrelay` commands find the daemons running on this host.

A daemon that is ready writes one small JSON file naming its pid, the address its admin API is bound to (the
real port when the config says port 0), its socket, its config file and its version; it rewrites the file
when a reload moves a listener and removes it when it stops cleanly. The file never holds the token.

One file per daemon, named from a hash of its resolved config path, so several daemons coexist and a
command given `--config` finds its daemon without listing the others. Where the files go:

    $EVENTRELAY_RUNTIME_DIR        when set (tests, or to keep several setups apart)
    $RUNTIME_DIRECTORY             systemd sets it from the unit's RuntimeDirectory= (/run/eventrelay)
    /run/eventrelay                when running as root
    $XDG_RUNTIME_DIR/eventrelay    a user's session
    <tmp>/eventrelay-<uid>         otherwise (mode 0700; refused when someone else owns it)

Commands send the token to the address a file names, so they read only directories that nobody else could
have written to (see `_trusted`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import structlog

from . import __version__
from .clock import iso_time

if TYPE_CHECKING:
    from .config import Config

log = structlog.get_logger(component="runtime")

RUNTIME_DIR_ENV = "EVENTRELAY_RUNTIME_DIR"
SYSTEMD_DIR_ENV = "RUNTIME_DIRECTORY"
SYSTEM_DIR = Path("/run/eventrelay")
_SUFFIX = ".json"
_PREFIX = "daemon-"


class RuntimeDirError(Exception):
    """No directory this process may safely write its runtime file to; the message says why."""


# -- where ------------------------------------------------------------------------------------------------

def file_name(config_path: str | os.PathLike[str]) -> str:
    """`daemon-<hash>.json`: the same for every spelling of the same config file (relative, via symlinks)."""
    digest = hashlib.sha256(str(resolve(config_path)).encode()).hexdigest()[:16]
    return f"{_PREFIX}{digest}{_SUFFIX}"


def resolve(config_path: str | os.PathLike[str]) -> Path:
    return Path(config_path).expanduser().resolve()


def user_temp_dir() -> Path:
    return Path(tempfile.gettempdir()) / f"eventrelay-{os.geteuid()}"


def daemon_dir() -> Path:
    """The directory this daemon writes its runtime file to, created if missing. Raises RuntimeDirError."""
    explicit = os.environ.get(RUNTIME_DIR_ENV)
    if explicit:
        return _make_dir(Path(explicit), parents=True)
    systemd = _systemd_dirs()
    if systemd:
        return systemd[0]  # systemd made it, with the unit's owner and mode
    if os.geteuid() == 0:
        return _make_dir(SYSTEM_DIR)
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and Path(xdg).is_dir():
        return _make_dir(Path(xdg) / "eventrelay")
    return _private_temp_dir(user_temp_dir())


def search_dirs() -> list[Path]:
    """Where commands look for daemons, in order: every place a daemon of this host may have written to."""
    explicit = os.environ.get(RUNTIME_DIR_ENV)
    if explicit:
        return [Path(explicit)]
    dirs = [*_systemd_dirs(), SYSTEM_DIR]
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        dirs.append(Path(xdg) / "eventrelay")
    dirs.append(user_temp_dir())
    return list(dict.fromkeys(dirs))


def _systemd_dirs() -> list[Path]:
    # systemd joins several RuntimeDirectory= entries with ':'; the first is the unit's own.
    return [Path(p) for p in os.environ.get(SYSTEMD_DIR_ENV, "").split(":") if p]


def _make_dir(path: Path, parents: bool = False) -> Path:
    try:
        path.mkdir(mode=0o700, parents=parents, exist_ok=True)
    except OSError as e:
        raise RuntimeDirError(f"cannot create {path}: {e.strerror or e}") from None
    if not path.is_dir():
        raise RuntimeDirError(f"{path} is not a directory")
    return path


def _private_temp_dir(path: Path) -> Path:
    # Anyone may create names in the temp directory: a directory planted there by someone else, or a symlink,
    # would let them swap the file that tells commands where to send the token.
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=0o700)
    st = path.lstat()
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
        raise RuntimeDirError(f"{path} is not a directory of this user (uid {os.geteuid()}): remove it, or set "
                              f"${RUNTIME_DIR_ENV} to a directory of your own")
    if stat.S_IMODE(st.st_mode) != 0o700:
        path.chmod(0o700)
    return path


def _trusted(directory: Path) -> bool:
    """Only this user, root, or the service user systemd (root) gave the directory to can have written there."""
    try:
        st = directory.stat()
    except OSError:
        return False
    if not stat.S_ISDIR(st.st_mode) or st.st_mode & 0o022:
        return False
    if st.st_uid in (os.geteuid(), 0):
        return True
    try:
        parent = directory.parent.stat()
    except OSError:
        return False
    # /run/eventrelay belongs to a unit's (dynamic) user, but only root can create names in /run.
    return parent.st_uid == 0 and not parent.st_mode & 0o022


# -- what: one daemon's record -------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Record:
    pid: int
    config: str  # the resolved path of the daemon's config file
    url: str | None  # where to call the admin API (None: listen.http is null)
    http: str | None  # the HTTP listener's address as bound, e.g. 0.0.0.0:8787
    socket: str | None
    version: str
    started_at: str
    proc_start: int | None = None  # the kernel's start time of `pid`: tells a recycled pid from the daemon
    path: Path | None = field(default=None, compare=False)  # the file it was read from

    @classmethod
    def from_json(cls, text: str, path: Path | None = None) -> Record | None:
        """None when the file is not a runtime record (partly written by something else, or garbage)."""
        try:
            raw = json.loads(text)
            pid, config = raw["pid"], raw["config"]
            if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0 or not isinstance(config, str):
                return None  # pid 0 or -1 would make `kill(pid, 0)` ask about whole process groups
            proc_start = raw.get("proc_start")
            return cls(pid, config, _opt_str(raw.get("url")), _opt_str(raw.get("http")),
                       _opt_str(raw.get("socket")), str(raw.get("version", "?")), str(raw.get("started_at", "?")),
                       proc_start if isinstance(proc_start, int) else None, path)
        except (ValueError, KeyError, TypeError, AttributeError):
            return None

    def to_json(self) -> str:
        return json.dumps({"pid": self.pid, "config": self.config, "url": self.url, "http": self.http,
                           "socket": self.socket, "version": self.version, "started_at": self.started_at,
                           "proc_start": self.proc_start}, indent=2) + "\n"

    def alive(self) -> bool:
        """The process that wrote this still runs: a file left by a kill -9 (or a reboot) is stale."""
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass  # another user's process (a systemd service user): it exists
        now = proc_start(self.pid)
        # Without /proc (not Linux, or hidepid) the pid alone must do.
        return self.proc_start is None or now is None or now == self.proc_start


def _opt_str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def proc_start(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat, the process's start time in clock ticks after boot; None without /proc."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            text = f.read().decode("ascii", "replace")
        # The command name (field 2) is in parentheses and may hold spaces and parentheses itself.
        return int(text[text.rindex(")") + 2:].split()[19])
    except (OSError, ValueError, IndexError):
        return None


# -- the commands' side: finding daemons ------------------------------------------------------------------------

@dataclass
class Lookup:
    """What a search found: live daemons, and what was looked at (for an error that says what it tried)."""
    live: list[Record] = field(default_factory=list)
    stale: list[Record] = field(default_factory=list)
    searched: list[Path] = field(default_factory=list)
    untrusted: list[Path] = field(default_factory=list)

    def tried(self) -> str:
        places = ", ".join(str(d) for d in self.searched) or "nowhere"
        text = f"no running daemon recorded in {places}"
        if self.stale:
            text += "; stale records (their daemon did not stop cleanly): " + ", ".join(
                f"pid {r.pid} for {r.config}" for r in self.stale)
        if self.untrusted:
            text += "; not read, as others may write there: " + ", ".join(str(d) for d in self.untrusted)
        return text


def find(config_path: str | os.PathLike[str] | None = None) -> Lookup:
    """The daemons this host runs: the one for `config_path`, or every one when it is None."""
    lookup = Lookup()
    name = file_name(config_path) if config_path is not None else None
    seen: set[tuple[int, str]] = set()
    for directory in search_dirs():
        if not directory.is_dir():
            continue
        if not _trusted(directory):
            lookup.untrusted.append(directory)
            continue
        lookup.searched.append(directory)
        for record in _records(directory, name):
            if (record.pid, record.config) in seen:
                continue
            seen.add((record.pid, record.config))
            (lookup.live if record.alive() else lookup.stale).append(record)
    return lookup


def _records(directory: Path, name: str | None) -> list[Record]:
    paths = [directory / name] if name else sorted(directory.glob(f"{_PREFIX}*{_SUFFIX}"))
    records = []
    for path in paths:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue  # absent, or another user's file we may not read: as if not there
        record = Record.from_json(text, path)
        if record is not None:
            records.append(record)
    return records


# -- the daemon's side: writing its own file --------------------------------------------------------------------

class Running(Protocol):
    """What a runtime file says of the daemon (the service is one): no import of the service, so no circle."""

    @property
    def config(self) -> Config: ...
    @property
    def http_address(self) -> tuple[str, int] | None: ...  # as bound: port 0 became a real port
    @property
    def started_at(self) -> float: ...


class RuntimeFile:
    """This daemon's runtime file. Writes are a few hundred bytes without fsync: the file describes a process,
    which a power loss would not outlive either, so it costs the event loop next to nothing."""

    def __init__(self, path: Path, config: Path):
        self.path = path
        self._config = config
        self._written: Record | None = None

    @classmethod
    def publish(cls, service: Running) -> RuntimeFile | None:
        """Write the file for a daemon that is ready. None (and a warning) if it cannot: commands then find the
        daemon from its config file as before, so this never stops the daemon."""
        source = service.config.source
        if source is None:
            return None  # nothing to name it by, and nothing a command could be pointed at
        try:
            config = resolve(source)
            runtime = cls(daemon_dir() / file_name(config), config)
            runtime.update(service)
        except (RuntimeDirError, OSError) as e:
            log.warning("no runtime file written: `eventrelay` commands will find this daemon only from its "
                        f"config file; set ${RUNTIME_DIR_ENV} to a writable directory to fix that", error=str(e))
            return None
        return runtime

    def update(self, service: Running) -> None:
        """Rewrite the file if what it says changed (a reload moved a listener). Raises OSError."""
        record = self._record(service)
        if record == self._written:
            return
        _write_atomically(self.path, record.to_json())
        self._written = record

    def refresh(self, service: Running) -> None:
        """`update` for a running daemon: a failure is logged, never raised into a reload."""
        try:
            self.update(service)
        except OSError as e:
            log.warning("runtime file not updated: commands may call the old address", path=str(self.path),
                        error=str(e))

    def remove(self) -> None:
        """At a clean stop. Only while the file is still ours: a daemon started since on the same config owns it."""
        try:
            if Record.from_json(self.path.read_text(encoding="utf-8")) == self._written:
                self.path.unlink()
        except (OSError, UnicodeDecodeError):
            pass

    def _record(self, service: Running) -> Record:
        http = service.http_address
        socket = service.config.listen.socket
        return Record(pid=os.getpid(), config=str(self._config),
                      url=_callable_url(http, service.config.listen.tls is not None),
                      http=_address(http), socket=os.path.abspath(socket) if socket else None, version=__version__,
                      started_at=iso_time(service.started_at), proc_start=proc_start(os.getpid()))


def _write_atomically(path: Path, text: str) -> None:
    # Readers see the old file or the new one, never half of one. Group-readable only where the directory is
    # (systemd's RuntimeDirectoryMode=0750): the operators in the unit's group then find the daemon too.
    mode = 0o640 if path.parent.stat().st_mode & 0o040 else 0o600
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            os.fchmod(fd, mode)  # the umask may have taken bits away, or a crash left the temp file behind
            f.write(text)
        os.replace(temp, path)
    except OSError:
        with contextlib.suppress(OSError):
            temp.unlink()
        raise


def _address(address: tuple[str, int] | None) -> str | None:
    if address is None:
        return None
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _callable_url(address: tuple[str, int] | None, tls: bool = False) -> str | None:
    if address is None:
        return None
    host, port = address
    # A wildcard is where the daemon listens, not an address to call: its loopback is.
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    scheme = "https" if tls else "http"
    return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"
