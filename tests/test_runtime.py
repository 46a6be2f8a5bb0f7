"""Runtime files: a ready daemon records where it is (daemon/runtime.py), and commands find it from there.

Daemons here are real: in-process (`start_daemon`, or `serving` for a second one on its own config) and as a
subprocess (`daemon_process`) where the point is a process that dies without cleaning up.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import stat
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import structlog
import yaml

from eventrelay import __version__, runtime
from eventrelay import config as config_module
from eventrelay.admin.client import Target, UsageError, target_from
from eventrelay.admin.commands import add_commands
from eventrelay.service import Service

from .conftest import free_port, wait_until, webhook, write_config


@pytest.fixture(autouse=True)
def _no_config_named(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # Commands here find daemons by their runtime files alone; never the host's config or token.
    monkeypatch.delenv("EVENTRELAY_CONFIG", raising=False)
    monkeypatch.delenv("EVENTRELAY_TOKEN", raising=False)
    monkeypatch.setattr("eventrelay.admin.client.DEFAULT_CONFIG", str(tmp_path / "etc-eventrelay-config.yaml"))


def run_dir() -> Path:
    return Path(os.environ["EVENTRELAY_RUNTIME_DIR"])


def runtime_files() -> list[Path]:
    return sorted(run_dir().glob("daemon-*.json"))


def record_of(config: Path) -> dict[str, Any]:
    return json.loads((run_dir() / runtime.file_name(config)).read_text())


async def cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="eventrelay")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return await asyncio.to_thread(args.func, args)


@contextlib.asynccontextmanager
async def serving(directory: Path, integrations: list[dict[str, Any]], **top: Any) -> AsyncIterator[Service]:
    """A daemon in this process on a config of its own in `directory` (start_daemon has one config per test)."""
    directory.mkdir(exist_ok=True)
    service = Service(config_module.load(write_config(directory, integrations, **top)))
    stop, ready = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(service.serve(stop, ready.set))
    await wait_until(lambda: ready.is_set() or task.done())
    if task.done():
        task.result()
    try:
        yield service
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)


@pytest.fixture
def quiet_daemon() -> Any:
    with structlog.testing.capture_logs() as records:
        yield records


# -- what the daemon writes ---------------------------------------------------------------------------------

async def test_a_ready_daemon_records_itself_and_removes_the_record_when_it_stops(start_daemon, tmp_path) -> None:
    d = await start_daemon([webhook("erp", "http://127.0.0.1:9/")], listen={"token": "s3cret-t0ken"})
    config = tmp_path / "config.yaml"
    (path,) = runtime_files()
    assert path.name == runtime.file_name(config)
    record = json.loads(path.read_text())
    host, port = d.service.http_address
    assert port != 0  # the config says port 0: the file has the port the listener took
    assert record == {"pid": os.getpid(), "config": str(config.resolve()), "url": f"http://127.0.0.1:{port}",
                      "http": f"127.0.0.1:{port}", "socket": str(tmp_path / "er.sock"), "version": __version__,
                      "started_at": record["started_at"], "proc_start": runtime.proc_start(os.getpid())}
    assert "s3cret-t0ken" not in path.read_text()  # commands read the token from the config, never from here
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in run_dir().iterdir()] == [path.name]  # no temp file left behind

    await d.shutdown()
    assert runtime_files() == []


async def test_the_record_follows_the_http_listener_when_a_reload_moves_it(start_daemon, tmp_path) -> None:
    d = await start_daemon([])
    config = tmp_path / "config.yaml"
    before = record_of(config)
    port = free_port()
    raw = yaml.safe_load(config.read_text())
    raw["listen"]["http"] = f"127.0.0.1:{port}"
    config.write_text(yaml.safe_dump(raw))
    assert (await d.service.reload()).ok
    after = record_of(config)
    assert after["url"] == f"http://127.0.0.1:{port}" != before["url"]
    assert target_from(None, None, None).url == f"http://127.0.0.1:{port}"  # commands follow it
    assert {k: v for k, v in after.items() if k not in ("url", "http")} == \
        {k: v for k, v in before.items() if k not in ("url", "http")}


async def test_several_daemons_keep_one_file_each_and_commands_need_to_be_told_which(
        tmp_path, capsys, monkeypatch, quiet_daemon) -> None:
    async with serving(tmp_path / "a", []) as a, serving(tmp_path / "b", []) as b:
        assert len(runtime_files()) == 2
        with pytest.raises(UsageError) as refused:
            target_from(None, None, None)
        message = str(refused.value)
        assert "2 eventrelay daemons run on this host; say which with --config FILE" in message
        for service, name in ((a, "a"), (b, "b")):
            config = str((tmp_path / name / "config.yaml").resolve())
            line = next(line for line in message.splitlines() if config in line)
            assert f"http://127.0.0.1:{service.http_address[1]}" in line and f"pid {os.getpid()}" in line

        assert await cli("status") == 2
        assert "say which with --config" in capsys.readouterr().err
        # --config picks one, even relative to where the command runs, and even on a port-0 config.
        monkeypatch.chdir(tmp_path / "b")
        assert target_from("config.yaml", None, None) == Target(f"http://127.0.0.1:{b.http_address[1]}", None)
        assert await cli("status", "--config", str(tmp_path / "a" / "config.yaml")) == 0
        assert f"config {(tmp_path / 'a' / 'config.yaml').resolve()}" in capsys.readouterr().out


def test_a_record_is_only_as_good_as_its_process(tmp_path) -> None:
    here = runtime.Record(os.getpid(), "/x.yaml", "http://127.0.0.1:1", "127.0.0.1:1", None, "1", "t",
                          runtime.proc_start(os.getpid()))
    assert here.alive()
    # The same pid, started at another time: the daemon died and the kernel gave its pid to something else.
    assert not runtime.Record(os.getpid(), "/x.yaml", None, None, None, "1", "t", here.proc_start + 1).alive()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    assert not runtime.Record(gone.pid, "/x.yaml", None, None, None, "1", "t", None).alive()
    for text in ("", "{}", '{"pid": 0, "config": "/x"}', '{"pid": -1, "config": "/x"}', '[1]',
                 '{"pid": true, "config": "/x"}', '{"pid": 5, "config": 7}'):
        assert runtime.Record.from_json(text) is None, text


async def test_a_record_left_by_kill_9_is_ignored(daemon_process, tmp_path, capsys) -> None:
    d = daemon_process([])
    await asyncio.to_thread(d.start)
    assert target_from(None, None, None).url == d.url
    d.kill9()
    (left,) = runtime_files()  # nothing removed it
    lookup = runtime.find()
    assert lookup.live == [] and [r.pid for r in lookup.stale] == [d.proc.pid]
    # Without the daemon, the command falls back to a config file and says everything it tried.
    assert await cli("status") == 2
    err = capsys.readouterr().err
    assert "cannot find the daemon from" in err and "etc-eventrelay-config.yaml" in err
    assert f"no running daemon recorded in {run_dir()}" in err
    assert f"stale records (their daemon did not stop cleanly): pid {d.proc.pid} for {d.config.resolve()}" in err
    # The next run on the same config takes the file over.
    await asyncio.to_thread(d.start)
    assert json.loads(left.read_text())["pid"] == d.proc.pid
    assert target_from(None, None, None).url == d.url


# -- where the files go ---------------------------------------------------------------------------------

def test_where_a_daemon_writes(monkeypatch, tmp_path) -> None:
    for var in ("EVENTRELAY_RUNTIME_DIR", "RUNTIME_DIRECTORY", "XDG_RUNTIME_DIR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(runtime, "SYSTEM_DIR", tmp_path / "run-eventrelay")
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert runtime.daemon_dir() == tmp_path / "run-eventrelay"  # root
    if os.getuid() != 0:  # the per-user temp directory is checked to be ours: only testable as who we are
        monkeypatch.setattr(os, "geteuid", os.getuid)
        user_tmp = tmp_path / "tmp" / f"eventrelay-{os.getuid()}"
        assert runtime.daemon_dir() == user_tmp and stat.S_IMODE(user_tmp.stat().st_mode) == 0o700
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "xdg"))
    (tmp_path / "xdg").mkdir()
    assert runtime.daemon_dir() == tmp_path / "xdg" / "eventrelay"
    monkeypatch.setenv("RUNTIME_DIRECTORY", f"{tmp_path / 'unit'}:{tmp_path / 'other'}")
    assert runtime.daemon_dir() == tmp_path / "unit"  # systemd's, whoever we are
    monkeypatch.setenv("EVENTRELAY_RUNTIME_DIR", str(tmp_path / "mine" / "run"))
    assert runtime.daemon_dir() == tmp_path / "mine" / "run" and (tmp_path / "mine" / "run").is_dir()
    assert runtime.search_dirs() == [tmp_path / "mine" / "run"]
    monkeypatch.delenv("EVENTRELAY_RUNTIME_DIR")
    assert runtime.search_dirs() == [tmp_path / "unit", tmp_path / "other", tmp_path / "run-eventrelay",
                                     tmp_path / "xdg" / "eventrelay", tmp_path / "tmp" / "eventrelay-1000"]


def test_a_temp_dir_planted_by_someone_else_is_refused(monkeypatch, tmp_path) -> None:
    planted = tmp_path / "eventrelay-1000"
    planted.mkdir()
    if os.getuid() == 0:
        os.chown(planted, 1234, 1234)
        me = 1000
    else:
        me = os.getuid() + 1  # the directory is ours, so pretend to be someone else
    with monkeypatch.context() as m:
        m.setattr(os, "geteuid", lambda: me)
        with pytest.raises(runtime.RuntimeDirError, match="is not a directory of this user"):
            runtime._private_temp_dir(planted)
    # ...and commands do not read a directory others may write to: it could send them, token and all, elsewhere.
    mine = tmp_path / "mine"
    mine.mkdir(mode=0o700)
    assert runtime._trusted(mine)
    mine.chmod(0o777)
    assert not runtime._trusted(mine)


async def test_a_group_readable_runtime_dir_gets_a_group_readable_file(start_daemon, monkeypatch,
                                                                      tmp_path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o750)
    shared.chmod(0o750)  # as systemd's RuntimeDirectoryMode=0750: operators in the unit's group may read
    monkeypatch.setenv("EVENTRELAY_RUNTIME_DIR", str(shared))
    await start_daemon([])
    (path,) = shared.glob("daemon-*.json")
    assert stat.S_IMODE(path.stat().st_mode) == 0o640


async def test_a_daemon_that_cannot_write_its_record_still_runs(start_daemon, monkeypatch, tmp_path,
                                                                quiet_daemon) -> None:
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    monkeypatch.setenv("EVENTRELAY_RUNTIME_DIR", str(blocked / "run"))  # a directory under a file: impossible
    d = await start_daemon([])
    assert d.service.http_address is not None
    (warning,) = [r for r in quiet_daemon if r["event"].startswith("no runtime file written")]
    assert "EVENTRELAY_RUNTIME_DIR" in warning["event"]
