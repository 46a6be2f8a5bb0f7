"""Shared helpers for the eventrelay benchmarks (bench/ingest.py, bench/deliver.py).

What lives here and why:

* Process management: the daemon runs as a real subprocess from a generated config
  (fresh tempdir, free ports), exactly as an operator would start it, and is stopped
  with SIGTERM so a slow or failed shutdown shows up in the report.
* Load generation: every load generator runs in its *own* process (multiprocessing,
  "spawn").  On a 2-core box the client and the server must not share one event loop,
  or the benchmark measures the client.  Each generator also samples its own CPU time
  and the server's, so a saturated client is visible in the output instead of silently
  capping the numbers.
* Small utilities: percentiles, /proc readers (RSS, CPU), the header every script prints.

Every loop below is bounded both in count and in wall-clock time, and every wait on a
child process has a timeout after which the child is terminated.
"""

from __future__ import annotations

import asyncio
import datetime as _dt
import json
import multiprocessing
import multiprocessing.connection
import os
import platform
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.error
import urllib.request
import uuid
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable, Coroutine, TypeVar

import yaml

from eventrelay.cli import event_loop_factory

T = TypeVar("T")

ROOT = Path(__file__).resolve().parent.parent
VENV_PYTHON = ROOT / ".venv" / "bin" / "python"

# "spawn" rather than fork: children start from a clean interpreter, so they never
# inherit an event loop, aiohttp sessions or sockets from the orchestrating process.
_MP = multiprocessing.get_context("spawn")

JSON_HEADERS = {"Content-Type": "application/json"}


# --------------------------------------------------------------------------- header


def environment() -> dict[str, Any]:
    """Facts that make a benchmark number interpretable later."""
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "sqlite": sqlite3.sqlite_version,
        "aiohttp": _version("aiohttp"),
        "loop": "uvloop" if event_loop_factory() else "asyncio",
        "commit": _git_commit(),
        # Other work on the box (a test suite, a build) skews every number below.
        "loadavg_1m": round(os.getloadavg()[0], 2),
        "cpu_probe_ms": cpu_probe_ms(),
    }


def cpu_probe_ms() -> dict[str, float]:
    """Milliseconds (best of three) for a fixed pure-Python loop and for JSON round trips of a batch of 100
    events: how fast this machine ran today. The same VM measured 0.5 s to 1.8 s for ten million additions
    at different hours of one day, and on a day when the loop ran at its usual speed the bare handlers
    still served a third of their usual rate: the JSON probe, which touches more memory, tracks that
    better. Ratios measured in one run survive such drift; absolute rates do not."""
    batch = json.dumps([{"type": "order.paid", "data": {"id": str(i), "items": list(range(20)), "note": "x" * 200}}
                        for i in range(100)])

    def loop() -> None:
        total = 0
        for i in range(1_000_000):
            total += i

    def round_trips() -> None:
        for _ in range(200):
            json.dumps(json.loads(batch))

    probes = {}
    for name, fn in (("loop", loop), ("json", round_trips)):
        best = float("inf")
        for _ in range(3):
            started = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - started)
        probes[name] = round(best * 1000, 1)
    return probes


def lower_median(items: list[T], key: Callable[[T], float | None]) -> T:
    """The item at the (lower) median of `key`, for --rounds. A failed round (key None) sorts lowest, so
    failures show when they are the majority."""
    def rank(item: T) -> float:
        value = key(item)
        return -1.0 if value is None else value

    ranked = sorted(items, key=rank)
    return ranked[(len(ranked) - 1) // 2]


def _git_commit() -> str:
    """The daemon code being measured: short commit, '+dirty' if daemon/ has local edits."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=5
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "daemon"], cwd=ROOT, capture_output=True, text=True, timeout=5
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "?"
    return (head or "none") + ("+dirty" if dirty else "")


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "?"


def print_header(title: str, env: dict[str, Any], settings: dict[str, Any]) -> None:
    print(f"== {title} ==")
    print(
        f"date {env['date']} | python {env['python']} ({env['implementation']}) | "
        f"cpus {env['cpu_count']} | sqlite {env['sqlite']} | aiohttp {env['aiohttp']} | loop {env['loop']}"
    )
    print(f"platform {env['platform']} | commit {env['commit']} | loadavg(1m) at start {env['loadavg_1m']} | "
          f"cpu probe: 1M additions {env['cpu_probe_ms']['loop']} ms, 200 JSON round trips of 100 events "
          f"{env['cpu_probe_ms']['json']} ms (lower is faster)")
    print("settings " + " ".join(f"{k}={v}" for k, v in settings.items()))
    print(flush=True)


def run_on_daemon_loop(main: Coroutine[Any, Any, T]) -> T:
    """Run a baseline on the event loop the daemon uses (uvloop when installed): a ratio between the two
    then measures eventrelay's own work, not a difference of loops."""
    with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
        return runner.run(main)


def log(msg: str) -> None:
    """Progress goes to stderr so that --json output on stdout stays clean."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- stats


def percentile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolated percentile (q in 0..100) of an already sorted list."""
    if not sorted_values:
        return float("nan")
    if len(sorted_values) == 1:
        return sorted_values[0]
    pos = (len(sorted_values) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def latency_summary_ms(seconds: list[float]) -> dict[str, float]:
    """p50/p90/p99/max in milliseconds from a list of durations in seconds."""
    vals = sorted(seconds)
    return {
        "n": len(vals),
        "p50_ms": percentile(vals, 50) * 1e3,
        "p90_ms": percentile(vals, 90) * 1e3,
        "p99_ms": percentile(vals, 99) * 1e3,
        "max_ms": (vals[-1] * 1e3) if vals else float("nan"),
    }


# --------------------------------------------------------------------------- /proc


def _children(pid: int) -> list[int]:
    """Direct children of a process (the daemon's database writer), from /proc/PID/task/*/children."""
    found: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children", encoding="ascii") as fh:
                found.extend(int(c) for c in fh.read().split())
    except (FileNotFoundError, ProcessLookupError):
        pass
    return found


def _own_rss_kib(pid: int) -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    key, value = line.split(":", 1)
                    out[key.lower()] = int(value.split()[0])
    except (FileNotFoundError, ProcessLookupError, ValueError):
        pass
    return out


def read_rss_kib(pid: int) -> dict[str, int]:
    """Current (VmRSS) and peak (VmHWM) resident set size of a process and its children (eventrelay's
    writer process counts as eventrelay), in KiB; the peak is the sum of each process's own peak."""
    out = _own_rss_kib(pid)
    for child in _children(pid):
        for key, value in _own_rss_kib(child).items():
            out[key] = out.get(key, 0) + value
    return out


_CLK_TCK = os.sysconf("SC_CLK_TCK")


def _own_cpu_seconds(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            raw = fh.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name (field 2) may contain spaces: split after its closing paren.
    fields = raw[raw.rindex(")") + 2 :].split()
    utime, stime = int(fields[11]), int(fields[12])
    return (utime + stime) / _CLK_TCK


def cpu_seconds(pid: int) -> float | None:
    """User+system CPU time of a process (all its threads) and of its living children (eventrelay's writer
    process counts as eventrelay) from /proc/PID/stat."""
    own = _own_cpu_seconds(pid)
    if own is None:
        return None
    return own + sum(_own_cpu_seconds(child) or 0.0 for child in _children(pid))


def machine_busy_seconds() -> float:
    """CPU time all cores spent not idle since boot, from the first line of /proc/stat."""
    with open("/proc/stat", encoding="ascii") as fh:
        f = [int(x) for x in fh.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal (guest is already inside user)
    return (f[0] + f[1] + f[2] + f[5] + f[6] + (f[7] if len(f) > 7 else 0)) / _CLK_TCK


class CpuMeter:
    """CPU used by one process (or, with pid=None, the whole machine) since creation.

    percent(): 100% = one core fully busy over the elapsed wall time.
    """

    def __init__(self, pid: int | None) -> None:
        self.pid = pid
        self._cpu0 = self._read()
        self._t0 = time.monotonic()

    def _read(self) -> float | None:
        return machine_busy_seconds() if self.pid is None else cpu_seconds(self.pid)

    def seconds(self) -> float | None:
        cpu1 = self._read()
        if cpu1 is None or self._cpu0 is None:
            return None
        return cpu1 - self._cpu0

    def elapsed(self) -> float:
        return max(time.monotonic() - self._t0, 1e-9)

    def percent(self) -> float | None:
        used = self.seconds()
        return None if used is None else 100.0 * used / self.elapsed()


def other_cpu_pct(machine: CpuMeter, known_seconds: list[float | None]) -> float | None:
    """Machine-wide CPU% not accounted for by the benchmark's own processes."""
    total = machine.seconds()
    if total is None or any(k is None for k in known_seconds):
        return None
    # Clamped at 0: per-process and machine-wide tick accounting round differently.
    return max(0.0, 100.0 * (total - sum(k for k in known_seconds if k is not None)) / machine.elapsed())


BUSY_OTHER_PCT = 25.0  # above this, warn that something outside the benchmark competed for CPU


# --------------------------------------------------------------------------- ports / http


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_get_json(url: str, timeout: float = 5.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 (loopback only)
        return json.loads(resp.read())


def http_post(url: str, body: bytes = b"", timeout: float = 5.0) -> int:
    req = urllib.request.Request(url, data=body, method="POST", headers=JSON_HEADERS)
    with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310
        return int(resp.status)


def wait_http_ok(url: str, timeout: float, alive: Callable[[], bool]) -> float:
    """Poll GET url until it answers 200; return seconds waited.

    Raises TimeoutError after `timeout` s and RuntimeError as soon as `alive()` is
    false (the server process died), so a broken server never hangs the benchmark.
    """
    t0 = time.monotonic()
    deadline = t0 + timeout
    last_err = "no answer yet"
    while time.monotonic() < deadline:
        if not alive():
            raise RuntimeError(f"process exited before {url} answered 200 ({last_err})")
        try:
            with urllib.request.urlopen(url, timeout=1.0) as resp:  # noqa: S310
                if resp.status == 200:
                    return time.monotonic() - t0
                last_err = f"HTTP {resp.status}"
        except urllib.error.HTTPError as exc:
            last_err = f"HTTP {exc.code}"
        except (OSError, urllib.error.URLError) as exc:
            last_err = repr(exc)
        time.sleep(0.05)
    raise TimeoutError(f"{url} did not answer 200 within {timeout:.0f}s ({last_err})")


# --------------------------------------------------------------------------- child processes


class ChildError(RuntimeError):
    pass


def _child_entry(conn: multiprocessing.connection.Connection, fn: Callable[..., Any], args: tuple) -> None:
    try:
        result = fn(*args)
        conn.send(("ok", result))
    except BaseException:  # noqa: BLE001 - report anything to the parent
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


class ChildCall:
    """Run `fn(*args)` in a spawned process and collect its (picklable) return value.

    Non-blocking: start it, do other work (e.g. poll a receiver), then `.result()`.
    """

    def __init__(self, fn: Callable[..., Any], *args: Any) -> None:
        self._parent, child = _MP.Pipe(duplex=False)
        self._proc = _MP.Process(target=_child_entry, args=(child, fn, args), daemon=True)
        self._proc.start()
        child.close()

    @property
    def pid(self) -> int:
        assert self._proc.pid is not None
        return self._proc.pid

    def result(self, timeout: float) -> Any:
        try:
            if not self._parent.poll(timeout):
                raise ChildError(f"child {self._proc.pid} gave no result within {timeout:.0f}s")
            status, payload = self._parent.recv()
        except EOFError:
            raise ChildError(f"child {self._proc.pid} died (exit code {self._proc.exitcode})") from None
        finally:
            self._proc.join(timeout=5)
            if self._proc.is_alive():
                self._proc.terminate()
                self._proc.join(timeout=5)
        if status != "ok":
            raise ChildError(f"child failed:\n{payload}")
        return payload


def run_in_child(fn: Callable[..., Any], *args: Any, timeout: float) -> Any:
    return ChildCall(fn, *args).result(timeout)


class ServerChild:
    """A long-lived server function (e.g. the bare baseline handler) in its own process.

    `fn(*args)` must run until SIGTERM and exit cleanly on it.
    """

    def __init__(self, name: str, fn: Callable[..., Any], *args: Any) -> None:
        self.name = name
        self._proc = _MP.Process(target=fn, args=args, daemon=True, name=name)
        self._proc.start()

    @property
    def pid(self) -> int:
        assert self._proc.pid is not None
        return self._proc.pid

    def alive(self) -> bool:
        return self._proc.is_alive()

    def stop(self, timeout: float = 10.0) -> None:
        if self._proc.is_alive():
            self._proc.terminate()  # SIGTERM
            self._proc.join(timeout)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(5)

    def __enter__(self) -> "ServerChild":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def install_stop_signals(stop: asyncio.Event) -> None:
    """Make SIGTERM/SIGINT set `stop` in a child's event loop (clean shutdown)."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)


# --------------------------------------------------------------------------- daemon


def webhook_integration(url: str, name: str = "bench-hook") -> dict[str, Any]:
    return {
        "name": name,
        "integration_type": "webhook",
        "observes": ["order.paid"],
        "configuration": {"url": url},
    }


def daemon_config(
    workdir: Path,
    http_port: int,
    synchronous: str,
    integrations: list[dict[str, Any]],
    concurrency: int = 8,
    storage: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The daemon's YAML config as a dict, following the fixed contract. `storage` replaces the SQLite
    section (e.g. the PostgreSQL engine's), whose `synchronous` then does not apply."""
    return {
        "listen": {
            "http": f"127.0.0.1:{http_port}",
            "socket": str(workdir / "eventrelay.sock"),
            "token": None,
        },
        "storage": storage or {"path": str(workdir / "eventrelay.db"), "synchronous": synchronous},
        "delivery": {
            "timeout": "10s",
            "concurrency": concurrency,
            "retry": {"initial": "1s", "max_interval": "10m", "max_age": "24h"},
        },
        # warning: a per-request log line would make the benchmark measure logging.
        "log": {"level": "warning"},
        "integrations": integrations,
    }


@dataclass
class StopInfo:
    exit_code: int | None
    stop_seconds: float
    killed: bool  # True if SIGTERM was not enough within the grace period
    rss_kib: dict[str, int] = field(default_factory=dict)


class Daemon:
    """eventrelay as a subprocess, in a private tempdir, with free ports.

    Use as a context manager: start + wait for /readyz on enter, SIGTERM on exit.
    """

    def __init__(
        self,
        synchronous: str = "full",
        integrations: list[dict[str, Any]] | None = None,
        concurrency: int = 8,
        ready_timeout: float = 30.0,
        storage: dict[str, Any] | None = None,
    ) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="erbench-")
        self.workdir = Path(self._tmp.name)
        self.http_port = free_port()
        self.http_url = f"http://127.0.0.1:{self.http_port}"
        self.events_url = f"{self.http_url}/v1/events"
        self.socket_path = str(self.workdir / "eventrelay.sock")
        self.config_path = self.workdir / "eventrelay.yaml"
        self.log_path = self.workdir / "daemon.log"
        cfg = daemon_config(self.workdir, self.http_port, synchronous, integrations or [], concurrency, storage)
        self.db_path = Path(cfg["storage"]["path"]) if "path" in cfg["storage"] else None  # None: not SQLite
        self.config_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        self.ready_timeout = ready_timeout
        self.ready_seconds: float | None = None
        self.stop_info: StopInfo | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    @staticmethod
    def command(config_path: Path) -> list[str]:
        # `python -m daemon` works whether or not the console script was installed.
        python = str(VENV_PYTHON) if VENV_PYTHON.exists() else sys.executable
        return [python, "-m", "eventrelay", "run", "--config", str(config_path)]

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> "Daemon":
        logf = open(self.log_path, "wb")  # noqa: SIM115 - handed to the child
        try:
            self._proc = subprocess.Popen(
                self.command(self.config_path),
                cwd=ROOT,
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C on the bench does not hit it twice
            )
        finally:
            logf.close()
        try:
            self.ready_seconds = wait_http_ok(f"{self.http_url}/readyz", self.ready_timeout, self.alive)
        except Exception as exc:
            self.stop()
            raise RuntimeError(f"daemon did not become ready: {exc}\n--- daemon log tail ---\n{self.log_tail()}") from exc
        return self

    def rss(self) -> dict[str, int]:
        return read_rss_kib(self.pid) if self.alive() else {}

    def stop(self, grace: float = 15.0) -> StopInfo:
        if self.stop_info is not None:
            return self.stop_info
        if self._proc is None:
            self.stop_info = StopInfo(None, 0.0, False)
            return self.stop_info
        rss = self.rss()
        t0 = time.monotonic()
        killed = False
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(grace)
            except subprocess.TimeoutExpired:
                killed = True
                self._proc.kill()
                self._proc.wait(5)
        self.stop_info = StopInfo(self._proc.returncode, time.monotonic() - t0, killed, rss)
        return self.stop_info

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except FileNotFoundError:
            return "(no log)"

    def cleanup(self) -> None:
        self._tmp.cleanup()

    def __enter__(self) -> "Daemon":
        try:
            return self.start()
        except BaseException:
            self.cleanup()
            raise

    def __exit__(self, *exc: object) -> None:
        try:
            self.stop()
        finally:
            self.cleanup()


def daemon_problems(d: Daemon, expected: Callable[[str], bool] | None = None) -> list[str]:
    """Anything odd about how the daemon ran and stopped, for the report.

    `expected(line)` true: a log line the benchmark provoked on purpose (a failing target's
    warnings), left out here; the caller counts those itself.
    """
    notes: list[str] = []
    info = d.stop_info
    if info is not None:
        if info.killed:
            notes.append(f"did not exit within the SIGTERM grace period ({info.stop_seconds:.1f}s); killed")
        elif info.exit_code not in (0, None):
            notes.append(f"exit code {info.exit_code} after SIGTERM")
        elif info.stop_seconds > 5:
            notes.append(f"took {info.stop_seconds:.1f}s to exit after SIGTERM")
    # The daemon runs with log.level: warning, so every line it wrote is worth a look.
    try:
        lines = [ln for ln in d.log_path.read_text(errors="replace").splitlines() if ln.strip()]
    except FileNotFoundError:
        lines = []
    if expected is not None:
        lines = [ln for ln in lines if not expected(ln)]
    if lines:
        first = " | ".join(ln[:300] for ln in lines[:2])
        notes.append(f"{len(lines)} log line(s) at warning or above, first: {first}")
    return notes


# --------------------------------------------------------------------------- events


def order_data(i: int) -> dict[str, Any]:
    """A Moltin-like paid order (~0.5 KB JSON), the typical order.paid payload."""
    return {
        "type": "order",
        "id": f"9b3a1e4c-5d2f-4a6b-8c7d-{i:012d}",
        "status": "complete",
        "payment": "paid",
        "shipping": "unfulfilled",
        "customer": {"name": "Ron Swanson", "email": "ron@swanson.com"},
        "billing_address": {
            "first_name": "Ron",
            "last_name": "Swanson",
            "line_1": "1 Sunny Street",
            "city": "Pawnee",
            "postcode": "NE1 1AA",
            "country": "US",
        },
        "meta": {
            "display_price": {
                "with_tax": {"amount": 47500, "currency": "USD", "formatted": "$475.00"},
                "without_tax": {"amount": 47500, "currency": "USD", "formatted": "$475.00"},
            },
            "timestamps": {"created_at": "2024-05-01T10:00:00Z", "updated_at": "2024-05-01T10:00:05Z"},
        },
    }


def event_obj(i: int, event_id: str | None = None) -> dict[str, Any]:
    ev: dict[str, Any] = {"type": "order.paid", "data": order_data(i)}
    if event_id is not None:
        ev["id"] = event_id
    return ev


def http_body(batch: int) -> bytes:
    """Request body: one event object, or a JSON array of `batch` events.

    No ids: the daemon assigns them, so a body can be reused for every request
    without hitting the duplicate (idempotency) fast path.
    """
    if batch == 1:
        return json.dumps(event_obj(0)).encode()
    return json.dumps([event_obj(i) for i in range(batch)]).encode()


def ndjson_line() -> bytes:
    return json.dumps(event_obj(0)).encode() + b"\n"


# --------------------------------------------------------------------------- load generators


@dataclass
class HttpLoadSpec:
    url: str
    connections: int
    batch: int  # events per request
    warmup: float  # seconds run but not measured
    seconds: float  # measured window
    server_pid: int  # sampled for CPU% during the measured window
    max_requests: int = 5_000_000  # hard bound on the loop count
    request_timeout: float = 30.0
    validate_every: int = 64  # fully parse every Nth answer (plus each connection's first)
    client: str = "aiohttp"  # "aiohttp" | "raw" (see _RawHttpConnection)


@dataclass
class SocketLoadSpec:
    path: str
    connections: int
    window: int  # max unanswered lines per connection
    chunk: int  # lines written per write() call
    warmup: float
    seconds: float
    server_pid: int
    max_lines: int = 50_000_000
    drain_timeout: float = 10.0  # after the window: wait this long for outstanding answers


@dataclass
class LoadResult:
    events: int  # events acknowledged inside the measured window
    requests: int  # requests (HTTP) or lines (socket) completed inside the window
    seconds: float
    events_per_s: float
    latency: dict[str, float]
    errors: int
    error_samples: list[str]
    client_cpu_pct: float | None
    server_cpu_pct: float | None
    other_cpu_pct: float | None
    server_rss_kib: dict[str, int]
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Counters:
    """Per-run counters shared by the workers of one load-generator process."""

    def __init__(self) -> None:
        self.events = 0
        self.requests = 0
        self.total_requests = 0
        self.errors = 0
        self.error_samples: list[str] = []
        self.latencies: list[float] = []

    def error(self, msg: str) -> None:
        self.errors += 1
        if len(self.error_samples) < 5:
            self.error_samples.append(msg[:300])

    def result(self, seconds: float, server_pid: int, cpu: dict[str, float | None],
               extra: dict[str, Any]) -> LoadResult:
        return LoadResult(
            events=self.events, requests=self.requests, seconds=seconds, events_per_s=self.events / seconds,
            latency=latency_summary_ms(self.latencies), errors=self.errors, error_samples=self.error_samples,
            client_cpu_pct=cpu["client_cpu_pct"], server_cpu_pct=cpu["server_cpu_pct"],
            other_cpu_pct=cpu["other_cpu_pct"], server_rss_kib=read_rss_kib(server_pid), extra=extra)


async def _window_sampler(t_measure: float, t_end: float, server_pid: int, out: dict[str, float | None]) -> None:
    """Sample client and server CPU time exactly at the measured window's edges."""
    await asyncio.sleep(max(0.0, t_measure - time.monotonic()))
    c0, s0, m0, t0 = time.process_time(), cpu_seconds(server_pid), machine_busy_seconds(), time.monotonic()
    await asyncio.sleep(max(0.0, t_end - time.monotonic()))
    c1, s1, m1, t1 = time.process_time(), cpu_seconds(server_pid), machine_busy_seconds(), time.monotonic()
    dt = max(t1 - t0, 1e-9)
    out["client_cpu_pct"] = 100.0 * (c1 - c0) / dt
    if s0 is not None and s1 is not None:
        out["server_cpu_pct"] = 100.0 * (s1 - s0) / dt
        # Whatever else ran during the window (kernel, other processes): a high figure
        # means the numbers were taken on a busy machine.
        # Clamped at 0: per-process and machine-wide tick accounting round differently.
        out["other_cpu_pct"] = max(0.0, 100.0 * ((m1 - m0) - (c1 - c0) - (s1 - s0)) / dt)


def _check_http_answer(raw: bytes, batch: int) -> str | None:
    try:
        doc = json.loads(raw)
        data = doc["data"]
        if len(data) != batch or not all(isinstance(x.get("id"), str) for x in data):
            return f"answer has {len(data)} entries for {batch} events: {raw[:200]!r}"
    except Exception as exc:  # noqa: BLE001
        return f"unparsable answer ({exc!r}): {raw[:200]!r}"
    return None


class _RawHttpConnection(asyncio.Protocol):
    """A minimal HTTP/1.1 keep-alive client connection, one request in flight.

    Why it exists: aiohttp's client costs roughly as much CPU per request as aiohttp's
    server, so with one client process on a 2-core box it saturates first and caps the
    bare-handler baseline of scenario (a).  This protocol writes pre-built request
    bytes and parses just the status line, Content-Length or chunked framing, and
    Connection: close, which is a small fraction of that cost.
    """

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.fut: asyncio.Future[tuple[int, bytes, bool]] | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.fut is not None and not self.fut.done():
            self.fut.set_exception(ConnectionError(f"connection lost: {exc!r}"))

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.fut is None or self.fut.done():
            return
        try:
            parsed = self._parse()
        except Exception as exc:  # noqa: BLE001 - surface as a request error
            self.fut.set_exception(exc)
            return
        if parsed is not None:
            self.fut.set_result(parsed)

    def _parse(self) -> tuple[int, bytes, bool] | None:
        buf = self.buf
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            return None
        lines = bytes(buf[:end]).decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = {}
        for line in lines[1:]:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip().lower()
        start = end + 4
        if "content-length" in headers:
            total = start + int(headers["content-length"])
            if len(buf) < total:
                return None
            body = bytes(buf[start:total])
        elif headers.get("transfer-encoding") == "chunked":
            parts: list[bytes] = []
            pos = start
            while True:
                eol = buf.find(b"\r\n", pos)
                if eol < 0:
                    return None
                size = int(bytes(buf[pos:eol]).split(b";", 1)[0], 16)
                if size == 0:
                    if len(buf) < eol + 4:  # no trailers supported: "0\r\n\r\n"
                        return None
                    total = eol + 4
                    break
                if len(buf) < eol + 2 + size + 2:
                    return None
                parts.append(bytes(buf[eol + 2 : eol + 2 + size]))
                pos = eol + 2 + size + 2
            body = b"".join(parts)
        else:
            raise ValueError("response has neither Content-Length nor chunked framing")
        del buf[:total]
        return status, body, headers.get("connection") != "close"

    async def request(self, payload: bytes, timeout: float) -> tuple[int, bytes, bool]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[tuple[int, bytes, bool]] = loop.create_future()
        self.fut = fut
        assert self.transport is not None
        self.transport.write(payload)
        # call_later instead of wait_for: no extra task per request.
        timer = loop.call_later(timeout, lambda: fut.done() or fut.set_exception(TimeoutError("request timed out")))
        try:
            return await fut
        finally:
            timer.cancel()


def _raw_request_bytes(url: str, body: bytes, extra_headers: dict[str, str] | None = None) -> tuple[str, int, bytes]:
    from urllib.parse import urlsplit

    u = urlsplit(url)
    assert u.hostname is not None and u.port is not None
    head = f"POST {u.path or '/'} HTTP/1.1\r\nHost: {u.hostname}:{u.port}\r\nContent-Type: application/json\r\n"
    for k, v in (extra_headers or {}).items():
        head += f"{k}: {v}\r\n"
    head += f"Content-Length: {len(body)}\r\n\r\n"
    return u.hostname, u.port, head.encode("latin-1") + body


class _Poster:
    """`await poster.post()` -> (status, body) over one of two client implementations."""

    async def post(self) -> tuple[int, bytes]:
        raise NotImplementedError

    async def close(self) -> None:
        pass


class _AiohttpPoster(_Poster):
    def __init__(self, session: Any, url: str, body: bytes) -> None:
        self.session, self.url, self.body = session, url, body

    async def post(self) -> tuple[int, bytes]:
        async with self.session.post(self.url, data=self.body, headers=JSON_HEADERS) as resp:
            return resp.status, await resp.read()


class _RawPoster(_Poster):
    def __init__(self, url: str, body: bytes, timeout: float) -> None:
        self.host, self.port, self.payload = _raw_request_bytes(url, body)
        self.timeout = timeout
        self.conn: _RawHttpConnection | None = None

    async def post(self) -> tuple[int, bytes]:
        if self.conn is None or self.conn.closed:
            loop = asyncio.get_running_loop()
            _, self.conn = await loop.create_connection(_RawHttpConnection, self.host, self.port)
        status, body, keep_alive = await self.conn.request(self.payload, self.timeout)
        if not keep_alive:
            await self.close()
        return status, body

    async def close(self) -> None:
        if self.conn is not None and self.conn.transport is not None:
            self.conn.transport.close()
        self.conn = None


async def _http_load(spec: HttpLoadSpec) -> LoadResult:
    import aiohttp

    body = http_body(spec.batch)
    c = _Counters()
    cpu: dict[str, float | None] = {"client_cpu_pct": None, "server_cpu_pct": None, "other_cpu_pct": None}
    if spec.client == "raw":
        posters: list[_Poster] = [_RawPoster(spec.url, body, spec.request_timeout) for _ in range(spec.connections)]
        try:
            await drive_http_load(spec, posters, c, cpu)
        finally:
            for p in posters:
                await p.close()
    else:
        connector = aiohttp.TCPConnector(limit=spec.connections, limit_per_host=spec.connections)
        timeout = aiohttp.ClientTimeout(total=spec.request_timeout)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            await drive_http_load(spec, [_AiohttpPoster(session, spec.url, body) for _ in range(spec.connections)],
                                  c, cpu)
    return c.result(spec.seconds, spec.server_pid, cpu, {"body_bytes": len(body), "client": spec.client})


async def drive_http_load(spec: Any, posters: list[Any], c: _Counters, cpu: dict[str, float | None]) -> None:
    """One worker per poster posting until the warm-up and the measured window are over (or max_requests),
    counting in `c` what answered within the window, and the CPU of the window in `cpu`. `spec` has batch,
    warmup, seconds, server_pid, max_requests and validate_every (HttpLoadSpec, bench/tracing.py's IngestSpec)."""
    t_measure = time.monotonic() + spec.warmup
    t_end = t_measure + spec.seconds

    async def worker(poster: Any) -> None:
        n = 0
        while c.total_requests < spec.max_requests:
            t0 = time.monotonic()
            if t0 >= t_end:
                return
            c.total_requests += 1
            try:
                status, raw = await poster.post()
            except Exception as exc:  # noqa: BLE001 - count and keep going (bounded)
                c.error(f"{type(exc).__name__}: {exc}")
                await poster.close()
                await asyncio.sleep(0.05)  # do not spin on a dead server
                continue
            t1 = time.monotonic()
            if status != 202:
                c.error(f"HTTP {status}: {raw[:200]!r}")
                continue
            if n % spec.validate_every == 0:
                problem = _check_http_answer(raw, spec.batch)
                if problem:
                    c.error(problem)
                    continue
            n += 1
            if t0 >= t_measure and t1 <= t_end:
                c.requests += 1
                c.events += spec.batch
                c.latencies.append(t1 - t0)

    sampler = asyncio.create_task(_window_sampler(t_measure, t_end, spec.server_pid, cpu))
    await asyncio.gather(*(worker(p) for p in posters))
    await sampler


def http_load(spec: HttpLoadSpec) -> LoadResult:
    """Closed-loop HTTP load: `connections` workers, each posting back-to-back."""
    return asyncio.run(_http_load(spec))


async def _socket_connection(spec: SocketLoadSpec, c: _Counters, t_measure: float, t_end: float) -> None:
    """One pipelined NDJSON connection: keep up to `window` lines unanswered.

    Answers come back in order, so a FIFO of (send time, lines) gives every line's
    latency without ids.  Answers are read in large chunks and split locally because
    per-line readline() would make the client the bottleneck.
    """
    chunk = ndjson_line() * spec.chunk
    reader, writer = await asyncio.open_unix_connection(spec.path, limit=1 << 22)
    sent_fifo: deque[list[float]] = deque()  # [send_time, lines_left_in_chunk]
    state = {"sent": 0, "answered": 0, "sending": True}
    room = asyncio.Event()
    room.set()

    async def send() -> None:
        try:
            while time.monotonic() < t_end and state["sent"] + spec.chunk <= spec.max_lines:
                while state["sent"] - state["answered"] + spec.chunk > spec.window:
                    room.clear()
                    left = t_end - time.monotonic()
                    if left <= 0:
                        return
                    try:
                        await asyncio.wait_for(room.wait(), timeout=left)
                    except asyncio.TimeoutError:
                        return
                sent_fifo.append([time.monotonic(), spec.chunk])
                state["sent"] += spec.chunk
                writer.write(chunk)
                await writer.drain()
        finally:
            state["sending"] = False

    async def receive() -> None:
        buf = b""
        deadline = t_end + spec.drain_timeout
        while state["sending"] or state["answered"] < state["sent"]:
            left = deadline - time.monotonic()
            if left <= 0:
                c.error(f"{state['sent'] - state['answered']} lines unanswered {spec.drain_timeout}s after the window")
                return
            try:
                data = await asyncio.wait_for(reader.read(1 << 18), timeout=left)
            except asyncio.TimeoutError:
                continue
            if not data:
                if state["answered"] < state["sent"]:
                    c.error(f"server closed the connection with {state['sent'] - state['answered']} lines unanswered")
                return
            now = time.monotonic()
            lines = (buf + data).split(b"\n")
            buf = lines.pop()
            in_window = t_measure <= now <= t_end
            for line in lines:
                if not sent_fifo:
                    c.error(f"answer without a request: {line[:200]!r}")
                    continue
                head = sent_fifo[0]
                head[1] -= 1
                if head[1] == 0:
                    sent_fifo.popleft()
                state["answered"] += 1
                try:
                    ans = json.loads(line)
                    ok = isinstance(ans, dict) and ans.get("ok") is True
                except ValueError:
                    ok = False
                if not ok:
                    c.error(f"bad answer line: {line[:200]!r}")
                    continue
                if in_window and head[0] >= t_measure:
                    c.events += 1
                    c.requests += 1
                    c.latencies.append(now - head[0])
            room.set()

    try:
        await asyncio.gather(send(), receive())
    finally:
        writer.close()
        try:
            await asyncio.wait_for(writer.wait_closed(), 5)
        except (asyncio.TimeoutError, OSError):
            pass


async def _socket_load(spec: SocketLoadSpec) -> LoadResult:
    c = _Counters()
    cpu: dict[str, float | None] = {"client_cpu_pct": None, "server_cpu_pct": None, "other_cpu_pct": None}
    t_measure = time.monotonic() + spec.warmup
    t_end = t_measure + spec.seconds
    sampler = asyncio.create_task(_window_sampler(t_measure, t_end, spec.server_pid, cpu))
    results = await asyncio.gather(
        *(_socket_connection(spec, c, t_measure, t_end) for _ in range(spec.connections)),
        return_exceptions=True,
    )
    for r in results:
        if isinstance(r, BaseException):
            c.error(f"connection failed: {type(r).__name__}: {r}")
    await sampler
    return c.result(spec.seconds, spec.server_pid, cpu, {"line_bytes": len(ndjson_line())})


def socket_load(spec: SocketLoadSpec) -> LoadResult:
    """Pipelined NDJSON load over the Unix socket."""
    return asyncio.run(_socket_load(spec))


# --------------------------------------------------------------------------- ingest scenarios


@dataclass(frozen=True)
class IngestScenario:
    """One ingest scenario of bench/ingest.py (also run by bench/postgres.py on each storage engine)."""


    key: str
    title: str
    transport: str  # "http" | "socket"
    connections: int
    batch: int = 1  # events per HTTP request
    window: int = 1000  # socket: unanswered lines per connection
    chunk: int = 100  # socket: lines per write
    target_ratio: float | None = None  # vs bare handler
    target_rate: float | None = None  # absolute events/s

    def target_text(self) -> str:
        if self.target_ratio is not None:
            return f">= {self.target_ratio:.0%} of bare"
        return f">= {self.target_rate:,.0f} ev/s"

    def met(self, rate: float, ratio: float | None) -> bool | None:
        if self.target_ratio is not None:
            return None if ratio is None else ratio >= self.target_ratio
        assert self.target_rate is not None
        return rate >= self.target_rate


INGEST_SCENARIOS = (
    IngestScenario("a", "(a) http 1 ev/req x32 conns", "http", 32, batch=1, target_ratio=0.75),
    IngestScenario("b", "(b) http 100 ev/req x32 conns", "http", 32, batch=100, target_rate=50_000),
    IngestScenario("c", "(c) socket ndjson x4, window 1000", "socket", 4, window=1000, chunk=100, target_rate=40_000),
)


def run_ingest_load(sc: IngestScenario, http_base: str, socket_path: str, server_pid: int, args: Any) -> LoadResult:
    """One ingest scenario against one server, load generator in a separate process; `args` has the
    command line's warmup, seconds and client."""
    budget = args.warmup + args.seconds + 60  # generous, but bounded
    if sc.transport == "http":
        spec_h = HttpLoadSpec(
            url=f"{http_base}/v1/events",
            connections=sc.connections,
            batch=sc.batch,
            warmup=args.warmup,
            seconds=args.seconds,
            server_pid=server_pid,
            client=args.client,
        )
        return run_in_child(http_load, spec_h, timeout=budget)
    spec_s = SocketLoadSpec(
        path=socket_path,
        connections=sc.connections,
        window=sc.window,
        chunk=sc.chunk,
        warmup=args.warmup,
        seconds=args.seconds,
        server_pid=server_pid,
    )
    return run_in_child(socket_load, spec_s, timeout=budget)


# --------------------------------------------------------------------------- webhook receiver

TRIGGER_HEADER = "X-MOLTIN-INTEGRATION-TRIGGER"


def serve_receiver(port: int, hang: float = 10.0) -> None:
    """Child entry: a webhook receiver that counts deliveries and answers 204.

    POST /hook      record the envelope id's first arrival (time.monotonic(), which on
                    Linux is one system-wide clock, so it compares across processes)
    POST /hook/NAME the same, counted per NAME as well (one NAME per integration: the
                    envelope id is the event's, the same for every integration, so ids
                    are told apart per path); the totals in /stats count distinct
                    (path, id) pairs
    POST /fail500/NAME  count the attempt per path and answer 500 (a broken target)
    POST /hang/NAME     count the attempt, then answer 204 only after `hang` seconds
                    (a target slower than the daemon's delivery timeout)
    GET  /stats     counters, incl. the arrival time of the newest distinct id
    GET  /paths     per-path counters of the /hook/NAME, /fail500/NAME, /hang/NAME routes
    GET  /arrivals  {envelope id: first arrival time} (POST /hook only)
    POST /reset     forget everything (between runs)
    """
    asyncio.run(_serve_receiver(port, hang))


async def _serve_receiver(port: int, hang: float) -> None:
    from aiohttp import web

    def fresh() -> dict[str, Any]:
        return {
            "posts": 0,  # every POST, duplicates included
            "unique": 0,  # distinct envelope ids
            "duplicates": 0,  # at-least-once redeliveries of an id already seen
            "retries": 0,  # envelopes whose "attempt" is > 1
            "bad": 0,  # body not a JSON envelope with an id
            "missing_header": 0,
            "bytes": 0,
            "t_first": None,
            "t_last_new": None,
        }

    stats = fresh()
    arrivals: dict[str, float] = {}
    # Per-path counters of the /hook/NAME, /fail500/NAME and /hang/NAME routes; the ids seen per
    # path are kept apart (in `path_ids`) so that /paths stays a small answer.
    paths: dict[str, dict[str, Any]] = {}
    path_ids: dict[str, set[str]] = {}

    def path_stats(path: str) -> dict[str, Any]:
        st = paths.get(path)
        if st is None:
            st = paths[path] = {"posts": 0, "unique": 0, "duplicates": 0, "retries": 0, "t_first": None,
                                "t_last": None, "t_last_new": None}
            path_ids[path] = set()
        return st

    async def hook(request: web.Request) -> web.Response:
        """POST /hook counts distinct ids overall (and their first arrival, for /arrivals); POST /hook/NAME
        counts them per path as well (the envelope id is the event's, the same for every integration)."""
        now = time.monotonic()
        raw = await request.read()
        stats["posts"] += 1
        stats["bytes"] += len(raw)
        if TRIGGER_HEADER not in request.headers:
            stats["missing_header"] += 1
        pst = path_stats(request.path) if request.path != "/hook" else None
        if pst is not None:
            pst["posts"] += 1
            pst["t_last"] = now
        try:
            env = json.loads(raw)
            eid = str(env["id"])
            attempt = env.get("attempt", 1)
        except Exception:  # noqa: BLE001 - count it; answering 204 avoids retry storms
            stats["bad"] += 1
            return web.Response(status=204)
        retry = isinstance(attempt, int) and attempt > 1
        stats["retries"] += retry
        if stats["t_first"] is None:
            stats["t_first"] = now
        if pst is None:
            seen, counters = arrivals, (stats,)
        else:
            seen, counters = path_ids[request.path], (stats, pst)
            pst["retries"] += retry
            if pst["t_first"] is None:
                pst["t_first"] = now
        if eid in seen:
            for c in counters:
                c["duplicates"] += 1
            return web.Response(status=204)
        if pst is None:
            arrivals[eid] = now
        else:
            path_ids[request.path].add(eid)
        for c in counters:
            c["unique"] += 1
            c["t_last_new"] = now
        return web.Response(status=204)

    def failing(status: int, delay: float) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def handler(request: web.Request) -> web.Response:
            now = time.monotonic()
            await request.read()
            pst = path_stats(request.path)
            pst["posts"] += 1
            if pst["t_first"] is None:
                pst["t_first"] = now
            pst["t_last"] = now
            if delay:
                await asyncio.sleep(delay)  # bounded: the daemon gave up long before
            return web.Response(status=status)

        return handler

    async def get_stats(_: web.Request) -> web.Response:
        return web.json_response(stats)

    async def get_paths(_: web.Request) -> web.Response:
        return web.json_response(paths)

    async def get_arrivals(_: web.Request) -> web.Response:
        return web.json_response(arrivals)

    async def reset(_: web.Request) -> web.Response:
        stats.clear()
        stats.update(fresh())
        arrivals.clear()
        paths.clear()
        path_ids.clear()
        return web.Response(status=204)

    async def readyz(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application(client_max_size=16 << 20)
    app.router.add_post("/hook", hook)
    app.router.add_post("/hook/{name}", hook)
    app.router.add_post("/fail500/{name}", failing(500, 0.0))
    app.router.add_post("/hang/{name}", failing(204, hang))
    app.router.add_get("/stats", get_stats)
    app.router.add_get("/paths", get_paths)
    app.router.add_get("/arrivals", get_arrivals)
    app.router.add_post("/reset", reset)
    app.router.add_get("/readyz", readyz)
    await serve_until_stopped(app, port)


async def serve_until_stopped(app: Any, port: int) -> None:
    """Serve `app` (an aiohttp Application) on 127.0.0.1:`port` until SIGTERM or SIGINT: the whole life of a
    server child."""
    from aiohttp import web

    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, backlog=1024).start()
    stop = asyncio.Event()
    install_stop_signals(stop)
    await stop.wait()
    await runner.cleanup()


class Receiver(ServerChild):
    """The webhook receiver in its own process, plus a small sync client for it."""

    def __init__(self, ready_timeout: float = 20.0, hang: float = 10.0) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.hook_url = f"{self.base}/hook"
        super().__init__("receiver", serve_receiver, self.port, hang)
        try:
            wait_http_ok(f"{self.base}/readyz", ready_timeout, self.alive)
        except BaseException:
            self.stop()
            raise

    def stats(self) -> dict[str, Any]:
        return dict(http_get_json(f"{self.base}/stats"))

    def arrivals(self) -> dict[str, float]:
        return dict(http_get_json(f"{self.base}/arrivals", timeout=30))

    def paths(self) -> dict[str, dict[str, Any]]:
        """Per-path counters of /hook/NAME, /fail500/NAME and /hang/NAME, keyed by the path."""
        return dict(http_get_json(f"{self.base}/paths", timeout=30))

    def reset(self) -> None:
        http_post(f"{self.base}/reset")

    def wait_unique(self, n: int, timeout: float, poll: float = 0.05) -> dict[str, Any]:
        """Poll until `n` distinct ids arrived or `timeout` s passed; return the last stats."""
        deadline = time.monotonic() + timeout
        st = self.stats()
        while st["unique"] < n and time.monotonic() < deadline:
            time.sleep(poll)
            st = self.stats()
        return st


# -- pre-loading events into a daemon (a child entry point) ------------------------------------------------

def preload(events_url: str, n: int, batch: int, timeout: float) -> dict[str, Any]:
    """Child entry: post `n` events (no ids: the daemon assigns them) in batches of `batch`."""
    return asyncio.run(_preload(events_url, n, batch, timeout))


async def _preload(events_url: str, n: int, batch: int, timeout: float) -> dict[str, Any]:
    import aiohttp

    # Bodies built up front, so the loader spends as little CPU as possible while the daemon delivers.
    bodies = [json.dumps([event_obj(s + k) for k in range(min(batch, n - s))]).encode() for s in range(0, n, batch)]
    out: dict[str, Any] = {"accepted": 0, "jobs": 0, "duplicates": 0, "errors": [], "t_first_accept": None}
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        out["t_first_send"] = time.monotonic()
        for body in bodies:
            if time.monotonic() >= deadline:
                out["errors"].append("pre-load deadline reached")
                break
            try:
                async with session.post(events_url, data=body, headers={"Content-Type": "application/json"}) as resp:
                    raw = await resp.read()
                    status = resp.status
            except Exception as exc:  # noqa: BLE001
                out["errors"].append(repr(exc))
                continue
            now = time.monotonic()
            if status != 202:
                out["errors"].append(f"HTTP {status}: {raw[:200]!r}")
                continue
            if out["t_first_accept"] is None:
                out["t_first_accept"] = now
            out["t_last_accept"] = now
            for item in json.loads(raw)["data"]:
                out["accepted"] += 1
                out["jobs"] += int(item.get("jobs", 0))
                out["duplicates"] += bool(item.get("duplicate"))
    out["errors"] = out["errors"][:5] + ([f"... {len(out['errors']) - 5} more"] if len(out["errors"]) > 5 else [])
    out["client_cpu_s"] = time.process_time()
    return out


# -- paced single events, for accept -> delivered latency --------------------------------------------------

def paced(events_url: str | list[str], rate: float, warmup: float, seconds: float, max_inflight: int
          ) -> dict[str, Any]:
    """Child entry: open-loop single-event POSTs at `rate`/s with bench-chosen ids; several URLs (daemons
    sharing one database) take the events in turn."""
    return asyncio.run(_paced(events_url, rate, warmup, seconds, max_inflight))


async def _paced(events_url: str | list[str], rate: float, warmup: float, seconds: float, max_inflight: int
                 ) -> dict[str, Any]:
    import aiohttp

    urls = [events_url] if isinstance(events_url, str) else list(events_url)

    n_warm = int(rate * warmup)
    n_total = n_warm + int(rate * seconds)
    ids = [str(uuid.uuid4()) for _ in range(n_total)]
    bodies = [json.dumps(event_obj(i, ids[i])).encode() for i in range(n_total)]
    records: dict[str, tuple[float, float]] = {}  # id -> (sent, accepted), measured part only
    errors: list[str] = []
    state = {"max_lag": 0.0, "skipped": 0}
    inflight = asyncio.Semaphore(max_inflight)
    headers = {"Content-Type": "application/json"}

    async def send(session: aiohttp.ClientSession, i: int) -> None:
        async with inflight:
            t_send = time.monotonic()
            try:
                async with session.post(urls[i % len(urls)], data=bodies[i], headers=headers) as resp:
                    raw = await resp.read()
                    status = resp.status
            except Exception as exc:  # noqa: BLE001
                errors.append(repr(exc))
                return
            t_acc = time.monotonic()
        if status != 202:
            errors.append(f"HTTP {status}: {raw[:200]!r}")
        elif i >= n_warm:
            records[ids[i]] = (t_send, t_acc)

    connector = aiohttp.TCPConnector(limit=max_inflight)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=30)) as session:
        tasks = []
        t0 = time.monotonic()
        for i in range(n_total):
            target = t0 + i / rate
            delay = target - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            else:
                state["max_lag"] = max(state["max_lag"], -delay)
            tasks.append(asyncio.create_task(send(session, i)))
        t_paced_end = time.monotonic()
        await asyncio.wait(tasks, timeout=60)
    return {
        "records": records,
        "measured_ids": ids[n_warm:],
        "errors": errors[:5],
        "error_count": len(errors),
        "max_schedule_lag_ms": state["max_lag"] * 1e3,
        "achieved_rate": n_total / max(t_paced_end - t0, 1e-9),
        "client_cpu_s": time.process_time(),
    }

def delivery_latency(res: dict[str, Any], arrivals: dict[str, float]) -> dict[str, Any]:
    """Accept -> delivered and send -> delivered of a paced() run, from the receiver's first arrivals."""
    acc_lat, e2e_lat, missing = [], [], 0
    for eid in res["measured_ids"]:
        rec, arr = res["records"].get(eid), arrivals.get(eid)
        if rec is None:
            continue  # not accepted: counted in the client's errors
        if arr is None:
            missing += 1
            continue
        acc_lat.append(arr - rec[1])
        e2e_lat.append(arr - rec[0])
    return {
        "accepted": len(res["records"]),
        "measured": len(res["measured_ids"]),
        "missing": missing,
        "negative": sum(1 for x in acc_lat if x < 0),
        "accept_to_delivered": latency_summary_ms(acc_lat),
        "send_to_delivered": latency_summary_ms(e2e_lat),
    }


# -- a stored backlog, released by a reload ----------------------------------------------------------------


def held_webhook(url: str) -> dict[str, Any]:
    """A webhook integration held back by a rate limit of 1/s: its events pile up as pending jobs until
    release_backlog() lifts the limit."""
    hook = webhook_integration(url)
    hook["delivery"] = {"rate_limit": "1/s"}
    return hook


def release_backlog(daemons: list[Daemon], receiver: Receiver, events: int, timeout: float, batch: int = 1000,
                    server_cpu: Callable[[], float] | None = None) -> dict[str, Any]:
    """Delivery alone: `events` are stored through the first daemon while held_webhook()'s rate limit holds
    them back, then a reload (SIGHUP) of every daemon lifts it; measured from the SIGHUP until the receiver
    has seen every id still waiting. Daemons that share one database drain it together. `server_cpu()`:
    the database server's CPU seconds so far, taken around the drain as well."""
    out: dict[str, Any] = {"load": run_in_child(preload, daemons[0].events_url, events, batch, timeout,
                                                timeout=timeout + 30)}
    for d in daemons:
        config = yaml.safe_load(d.config_path.read_text())
        for integration in config["integrations"]:
            integration.pop("delivery", None)
        d.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    time.sleep(1.2)  # a delivery the rate limit let through just now has finished
    out["before"] = before = receiver.stats()["unique"]
    receiver.reset()
    machine, r_meter = CpuMeter(None), CpuMeter(receiver.pid)
    d_meters = [CpuMeter(d.pid) for d in daemons]
    server0 = server_cpu() if server_cpu else None
    t_release = time.monotonic()
    for d in daemons:
        os.kill(d.pid, signal.SIGHUP)
    st = receiver.wait_unique(events - before, timeout=timeout)
    if server_cpu is not None and server0 is not None:
        out["server_cpu_s"] = server_cpu() - server0
    d_cpu = [m.seconds() for m in d_meters]
    out["daemon_cpu_s"] = d_cpu
    out["daemon_cpu_pct"] = None if None in d_cpu else 100.0 * sum(d_cpu) / d_meters[0].elapsed()  # type: ignore
    out["receiver_cpu_pct"], out["receiver_cpu_s"] = r_meter.percent(), r_meter.seconds()
    server = [out["server_cpu_s"]] if "server_cpu_s" in out else []
    out["other_cpu_pct"] = other_cpu_pct(machine, [*d_cpu, out["receiver_cpu_s"], *server])
    out["receiver"] = st
    out["delivered"] = st["unique"]
    if st["unique"] >= events - before:
        out["seconds"] = st["t_last_new"] - t_release
        out["rate"] = st["unique"] / out["seconds"]
    return out
