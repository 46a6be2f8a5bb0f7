"""The unit and the steps of README.md, "Running under systemd".

`systemd-analyze verify` checks the unit as the steps install it, `systemd-sysusers` the account file, and
a check of our own applies the user and group rule of systemd.exec(5), which verify does not look at. The
slow test runs the steps in a real systemd and sends the started service events.
"""

from __future__ import annotations

import json
import os
import queue
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
UNIT = "eventrelay.service"
INSTALL_PREFIX = "/opt/eventrelay"  # the venv of the steps; ExecStart= runs its entry point


# -- the README's steps and the unit, as data ------------------------------------------------------------------

def readme_steps() -> list[str]:
    """The command lines of the shell block in the README's systemd section, in order."""
    text = (REPO / "README.md").read_text()
    section = text.split("\n## Running under systemd\n", 1)[1].split("\n## ", 1)[0]
    block = section.split("```sh\n", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def step_commands() -> Iterator[list[str]]:
    """Each command of the steps as argv, without sudo (`a && b` is two commands)."""
    for line in readme_steps():
        words = shlex.split(line, comments=True)
        while words:
            cut = words.index("&&") if "&&" in words else len(words)
            command, words = words[:cut], words[cut + 1:]
            yield command[1:] if command[:1] == ["sudo"] else command


def installed_files() -> dict[str, str]:
    """{file of this checkout: where the steps install it}, from their `install` and `cp` commands."""
    found = {}
    for argv in step_commands():
        if argv[0] not in ("install", "cp") or "-d" in argv:
            continue
        operands = [word for before, word in zip(argv, argv[1:])
                    if not word.startswith("-") and before not in ("-m", "-o", "-g")]
        source, target = operands[-2], operands[-1]
        if (REPO / source).is_file():
            found[source] = target + Path(source).name if target.endswith("/") else target
    return found


def unit_settings(text: str, section: str) -> dict[str, str]:
    """The last value of each setting in one section of a unit file."""
    settings, current = {}, None
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("[") and line.endswith("]"):
            current = line[1:-1]
        elif current == section and "=" in line and not line.startswith(("#", ";")):
            key, value = line.split("=", 1)
            settings[key.strip()] = value.strip()
    return settings


def _yes(value: str | None) -> bool:
    return (value or "no").lower() in ("1", "yes", "y", "true", "t", "on")


def exec_account_problems(service: dict[str, str], unit: str, users: set[str], groups: set[str]) -> list[str]:
    """Why systemd would refuse to start the service (status 217/USER), given the static users and groups.

    systemd.exec(5): without DynamicUser=, User= and Group= must exist statically when the service starts.
    With it, the user's name is User= or else the unit's name, and a static group of that name without a
    static user of that name is refused (as is a static user without its group for Group=).
    """
    user, group = service.get("User"), service.get("Group")
    problems = []
    if not _yes(service.get("DynamicUser")):
        if user and user not in users:
            problems.append(f"User={user}: no such static user; create it with sysusers.d")
        if group and group not in groups:
            problems.append(f"Group={group}: no such static group; create it with sysusers.d")
        return problems
    user = user or unit.removesuffix(".service")
    if user in groups and user not in users:
        problems.append(f"DynamicUser=yes as {user!r}: a static group of that name exists, but no static user")
    if group and group != user and group in users and group not in groups:
        problems.append(f"DynamicUser=yes with Group={group}: a static user of that name exists, but no static group")
    return problems


def account_entries(root: Path, database: str) -> dict[str, list[str]]:
    """{name: fields} of /etc/passwd or /etc/group under root."""
    path = root / "etc" / database
    lines = path.read_text().splitlines() if path.exists() else []
    return {line.split(":", 1)[0]: line.split(":") for line in lines if line}


# -- a root file system with the files installed where the steps put them ---------------------------------------

def _exec_paths(unit_text: str) -> set[str]:
    service = unit_settings(unit_text, "Service")
    commands = [v for k, v in service.items() if k.startswith("Exec")]
    return {shlex.split(c)[0].lstrip("-@:+!") for c in commands}


@pytest.fixture
def installed_root(tmp_path: Path) -> Path:
    """The checkout's files at the README's destinations, the host's own units (the targets ours names),
    and a stub at each ExecStart path under the install prefix: verify checks that commands are executable."""
    root = tmp_path / "root"
    shutil.copytree("/usr/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True)
    for merged in ("bin", "sbin", "lib"):  # Debian 12 has a merged /usr
        (root / "usr" / merged).mkdir(parents=True, exist_ok=True)
        (root / merged).symlink_to(f"usr/{merged}")
    for source, target in installed_files().items():
        (root / target.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / source, root / target.lstrip("/"))
    for path in _exec_paths((REPO / "systemd" / UNIT).read_text()):
        here = root / path.lstrip("/")
        here.parent.mkdir(parents=True, exist_ok=True)
        if path.startswith(INSTALL_PREFIX + "/"):
            here.write_text("#!/bin/sh\nexit 0\n")
            here.chmod(0o755)
        elif Path(path).exists() and not here.exists():
            shutil.copy(Path(path).resolve(), here)
    return root


def test_readme_steps_install_the_unit_its_account_and_its_documentation() -> None:
    files = installed_files()
    assert files.get(f"systemd/{UNIT}") == f"/etc/systemd/system/{UNIT}", files
    assert re.fullmatch(r"/etc/sysusers\.d/[\w.-]+\.conf", files.get("systemd/eventrelay.sysusers", "")), files
    commands = list(step_commands())
    sysusers = [argv for argv in commands if argv[0] == "systemd-sysusers"]
    assert sysusers, "the steps must create the service's user (systemd-sysusers) before starting it"
    assert not [argv for argv in commands if argv[0] in ("groupadd", "useradd")], \
        "the account comes from the sysusers.d file alone (a package installs the same file)"
    assert any(argv[:4] == ["/usr/bin/python3", "-m", "venv", INSTALL_PREFIX] for argv in commands)


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_unit_file_verifies(installed_root: Path) -> None:
    result = subprocess.run(["systemd-analyze", f"--root={installed_root}", "verify", UNIT],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert UNIT not in result.stderr, result.stderr  # no warnings about our unit either
    unit = (REPO / "systemd" / UNIT).read_text()
    lines = unit.splitlines()  # whole lines, so a directive that is only mentioned in a comment does not count
    for needed in ("RestartPreventExitStatus=78", "StateDirectory=eventrelay", "RuntimeDirectory=eventrelay",
                   "ProtectSystem=strict", "NoNewPrivileges=yes",
                   "Type=notify", "NotifyAccess=main", "ExecReload=/bin/kill -HUP $MAINPID", "WatchdogSec=30s",
                   "EnvironmentFile=-/etc/eventrelay/secrets.env", "User=eventrelay", "Group=eventrelay",
                   "KillMode=mixed"):
        assert needed in lines, needed
    assert any(line.startswith("TimeoutStartSec=") for line in lines)
    # AF_UNIX carries the notifications to systemd: the sandbox must keep allowing it.
    assert "AF_UNIX" in next(line for line in lines if line.startswith("RestrictAddressFamilies="))
    # Producers join the socket's group before the service starts: a dynamic user cannot give them one.
    assert not _yes(unit_settings(unit, "Service").get("DynamicUser"))
    documentation = unit_settings(unit, "Unit")["Documentation"].split()
    for uri in documentation:
        if uri.startswith("file:"):
            path = "/" + uri.removeprefix("file:").lstrip("/")
            assert (installed_root / path.lstrip("/")).is_file(), f"Documentation={uri}: the steps don't install it"


@pytest.mark.skipif(shutil.which("systemd-sysusers") is None, reason="systemd-sysusers is not installed")
def test_sysusers_file_creates_the_service_account(installed_root: Path) -> None:
    dry = subprocess.run(["systemd-sysusers", f"--root={installed_root}", "--dry-run"],
                         capture_output=True, text=True, timeout=60)
    assert dry.returncode == 0, dry.stderr
    assert "eventrelay" in dry.stderr, dry.stderr  # it would create something, not read an empty directory
    subprocess.run(["systemd-sysusers", f"--root={installed_root}"], check=True, capture_output=True, timeout=60)
    passwd, group = account_entries(installed_root, "passwd"), account_entries(installed_root, "group")
    name, _, uid, gid, _, home, shell = passwd["eventrelay"]
    assert group["eventrelay"][2] == gid  # its primary group is the socket's group
    assert int(uid) < 1000 and shell.endswith("nologin"), passwd["eventrelay"]
    assert home == "/var/lib/eventrelay"  # the StateDirectory, which exists while the service runs

    # What the service would run as, under systemd.exec(5)'s rule, with these accounts (verify does not check).
    service = unit_settings((installed_root / "etc/systemd/system" / UNIT).read_text(), "Service")
    assert exec_account_problems(service, UNIT, set(passwd), set(group)) == []


@pytest.mark.parametrize(("service", "users", "groups", "refused"), [
    # The unit and steps before sysusers.d: a static group from groupadd, the user left to DynamicUser=.
    # A real systemd 252 fails it with status=217/USER.
    ({"DynamicUser": "yes", "Group": "eventrelay"}, set(), {"eventrelay"}, True),
    ({"DynamicUser": "yes", "User": "eventrelay"}, set(), {"eventrelay"}, True),
    ({"DynamicUser": "yes", "User": "eventrelay", "Group": "producers"}, {"producers"}, set(), True),
    ({"DynamicUser": "yes"}, set(), set(), False),
    ({"DynamicUser": "yes", "Group": "eventrelay"}, {"eventrelay"}, {"eventrelay"}, False),  # uses the static pair
    ({"User": "eventrelay", "Group": "eventrelay"}, {"eventrelay"}, {"eventrelay"}, False),
    ({"User": "eventrelay", "Group": "eventrelay"}, set(), {"eventrelay"}, True),
])
def test_the_account_rule_refuses_what_systemd_refuses(service, users, groups, refused) -> None:
    assert bool(exec_account_problems(service, UNIT, users, groups)) == refused


# -- the steps in a real systemd ---------------------------------------------------------------------------------

# Runs inside new mount, PID, network, UTS, IPC and cgroup namespaces: a copy-on-write view of this machine's
# root (writes go to a tmpfs and vanish), the API file systems a container gets (/proc/sys and /sys read-only,
# so nothing in it tunes the host's kernel or triggers its devices), and systemd as PID 1 with the capability
# bounding set systemd-nspawn gives a container.
BOOT = r"""
set -eu
work=$1 root=$1/root
mount -t tmpfs -o mode=0755 tmpfs "$work/layers"
mkdir "$work/layers/upper" "$work/layers/work"
mount -t overlay overlay -o "lowerdir=/,upperdir=$work/layers/upper,workdir=$work/layers/work" "$root"
mount -t proc proc "$root/proc"
mount --bind "$root/proc/sys" "$root/proc/sys" && mount -o remount,bind,ro "$root/proc/sys"
mount -t sysfs -o ro sysfs "$root/sys"
mount -t cgroup2 cgroup2 "$root/sys/fs/cgroup"
mount -t tmpfs -o mode=0755,nosuid tmpfs "$root/dev"
for node in null zero full random urandom tty; do
    touch "$root/dev/$node" && mount --bind "/dev/$node" "$root/dev/$node"
done
mkdir "$root/dev/pts" "$root/dev/shm"
mount -t devpts -o newinstance,ptmxmode=0666 devpts "$root/dev/pts" && ln -s pts/ptmx "$root/dev/ptmx"
touch "$root/dev/console" && mount --bind "$work/console.log" "$root/dev/console"
cd "$root" && mkdir -p .host && pivot_root . .host && umount -l /.host && rmdir /.host
export container=eventrelay-test
exec setpriv --bounding-set=-all,+chown,+dac_override,+dac_read_search,+fowner,+fsetid,+ipc_owner,+kill,+lease,\
+linux_immutable,+mknod,+net_bind_service,+net_broadcast,+net_raw,+net_admin,+setfcap,+setgid,+setpcap,+setuid,\
+sys_admin,+sys_boot,+sys_chroot,+sys_nice,+sys_ptrace,+sys_resource,+sys_tty_config,+audit_control,+audit_write \
    /lib/systemd/systemd --unit=basic.target
"""
# sudo's secure_path on Debian: the steps find the system's python3, as they would under sudo.
STEP_ENV = ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME=/root", "LANG=C.UTF-8"]
SOURCE = "/srv/eventrelay"  # the checkout inside the container (the steps' /path/to/eventrelay)
WHEELS = "/srv/wheels"  # the container has no network: pip installs from wheels built here first

RECEIVER = r"""
import http.server, json, sys
class Handler(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.send_response(204)
        self.end_headers()
        print(json.dumps({"path": self.path, "headers": dict(self.headers), "body": body.decode()}), flush=True)
    def log_message(self, *args):
        pass
http.server.HTTPServer((sys.argv[1], int(sys.argv[2])), Handler).serve_forever()
"""


def _cgroup2() -> Path | None:
    """This process's cgroup in the unified hierarchy, where a container gets its own subtree."""
    mounts = [line.split() for line in Path("/proc/self/mountinfo").read_text().splitlines()]
    mount = next((m[4] for m in mounts if m[m.index("-") + 1] == "cgroup2"), None)
    own = next((line[3:] for line in Path("/proc/self/cgroup").read_text().splitlines() if line.startswith("0::")),
               None)
    return Path(mount + own) if mount and own is not None else None


class Container:
    """A real systemd as PID 1 of its own namespaces (BOOT says which), started and stopped by the test."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.cgroup: Path | None = None
        self.process: subprocess.Popen | None = None
        self.pid = 0  # systemd's, as this machine sees it

    def boot(self) -> None:
        base = _cgroup2()
        if base is None:
            pytest.skip("no cgroup2 hierarchy for a container's systemd")
        self.cgroup = base / f"eventrelay-test-{os.getpid()}-{time.monotonic_ns()}"
        try:
            self.cgroup.mkdir()
        except OSError as e:
            pytest.skip(f"cannot create a cgroup for the container's systemd: {e}")
        for sub in ("layers", "root"):
            (self.work / sub).mkdir()
        (self.work / "console.log").touch()
        launch = 'echo $$ > "$1/cgroup.procs" && exec unshare --mount --propagation private --pid --fork ' \
                 '--kill-child --net --uts --ipc --cgroup sh -c "$2" boot "$3"'
        with open(self.work / "boot.log", "wb") as log:
            self.process = subprocess.Popen(["sh", "-c", launch, "launch", str(self.cgroup), BOOT, str(self.work)],
                                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.pid = self._wait_for_systemd()
        state = self.run("systemctl", "is-system-running", "--wait", timeout=90, check=False).stdout.strip()
        assert state in ("running", "degraded"), f"the container's systemd is {state!r}\n{self.diagnose()}"

    def _wait_for_systemd(self) -> int:
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"the container did not boot:\n{(self.work / 'boot.log').read_text()}")
            pids = children.read_text().split() if children.exists() else []
            if pids and os.path.realpath(f"/proc/{pids[0]}/exe").endswith("/systemd"):
                socket = Path(f"/proc/{pids[0]}/root/run/systemd/private")
                if socket.exists():
                    return int(pids[0])
            time.sleep(0.1)
        pytest.fail(f"systemd did not start in the container:\n{(self.work / 'boot.log').read_text()}")

    @property
    def root(self) -> Path:
        return Path(f"/proc/{self.pid}/root")

    def run(self, *argv: str, timeout: float = 60, check: bool = True, env: tuple[str, ...] = ()) \
            -> subprocess.CompletedProcess:
        """A command inside the container, as root, with the environment sudo would give it."""
        result = subprocess.run(["nsenter", f"--target={self.pid}", "--all", "env", "-i", *STEP_ENV, *env, *argv],
                                capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            pytest.fail(f"{shlex.join(argv)} exited {result.returncode}:\n{result.stdout}{result.stderr}\n"
                        f"{self.diagnose()}")
        return result

    def in_network(self, *argv: str, **kwargs) -> subprocess.Popen:
        """A program of this machine in the container's network (its 127.0.0.1)."""
        return subprocess.Popen(["nsenter", f"--net=/proc/{self.pid}/ns/net", "--", *argv], **kwargs)

    def diagnose(self) -> str:
        if not self.pid:
            return ""
        report = f"systemctl status {UNIT} --no-pager --lines=0; journalctl -b --no-pager -n 40 -u {UNIT}"
        status = subprocess.run(["nsenter", f"--target={self.pid}", "--all", "sh", "-c", report],
                                capture_output=True, text=True, timeout=30)
        return status.stdout + status.stderr

    def stop(self) -> None:
        if self.process is not None:
            try:
                if self.pid:
                    os.kill(self.pid, signal.SIGRTMIN + 4)  # systemd: power off
                self.process.wait(timeout=30)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                self.process.kill()  # unshare --kill-child then kills PID 1, and its namespace's end ends the rest
                self.process.wait(timeout=30)
        if self.cgroup is not None and self.cgroup.exists():
            for directory, _, _ in sorted(os.walk(self.cgroup), key=lambda entry: -len(entry[0])):
                Path(directory).rmdir()


def _container_skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "booting a container's systemd needs root"
    missing = [tool for tool in ("unshare", "nsenter", "setpriv", "pivot_root") if shutil.which(tool) is None]
    if missing or not Path("/lib/systemd/systemd").exists():
        return f"missing {', '.join(missing) or '/lib/systemd/systemd'}"
    return None


@pytest.fixture
def container(tmp_path: Path) -> Iterator[Container]:
    reason = _container_skip_reason()
    if reason:
        pytest.skip(reason)
    box = Container(tmp_path / "container")
    box.work.mkdir()
    try:
        box.boot()
        yield box
    finally:
        box.stop()


WHEELHOUSE = REPO / ".venv" / "wheelhouse"


def _checkout_and_wheels(tmp_path: Path) -> tuple[Path, Path]:
    """A copy of this working tree, and the wheels of its dependencies and build backend that `make test`
    fetched beforehand (a test reaches no network, and the container cannot either)."""
    assert (WHEELHOUSE / ".built").exists(), (
        f"{WHEELHOUSE} is missing: `make test` builds it (the wheels the README's pip step installs from)")
    checkout = tmp_path / "eventrelay"
    shutil.copytree(REPO, checkout, ignore=shutil.ignore_patterns(
        ".git", ".venv", "__pycache__", "*.egg-info", "build", "var", ".pytest_cache"))
    return checkout, WHEELHOUSE


def _edit_config(text: str) -> str:
    """The README's "edit it": the database and the socket in the unit's StateDirectory and RuntimeDirectory."""
    wanted = {("storage", "path"): "/var/lib/eventrelay/eventrelay.db",
              ("listen", "socket"): "/run/eventrelay/eventrelay.sock"}
    out, section = [], None
    for line in text.splitlines():
        if re.match(r"[a-z_]+:", line):
            section = line.split(":", 1)[0]
        key = re.match(r"  ([a-z_]+):", line)
        if key and (section, key.group(1)) in wanted:
            line = f"  {key.group(1)}: {wanted.pop((section, key.group(1)))}"
        out.append(line)
    assert not wanted, f"config.example.yaml has no {wanted}"
    return "\n".join(out) + "\n"


HTTP_CLIENT = r"""
import json, sys, urllib.request
body = json.dumps({"type": "order.paid", "data": {"type": "order", "id": "over-http"}}).encode()
request = urllib.request.Request(sys.argv[1], data=body, headers={"Content-Type": "application/json"})
with urllib.request.urlopen(request, timeout=10) as answer:
    print(answer.status, answer.read().decode())
"""

SOCKET_CLIENT = r"""
import json, socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect("/run/eventrelay/eventrelay.sock")
s.sendall(json.dumps({"type": "order.paid", "data": {"type": "order", "id": sys.argv[1]}}).encode() + b"\n")
print(s.makefile().readline(), end="")
"""


def _send_over_socket(box: Container, user: str) -> subprocess.CompletedProcess:
    """One event over the Unix socket, sent by a process of that user with its groups, as a login gives them."""
    as_user = ["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups"]
    return box.run(*as_user, "/usr/bin/python3", "-c", SOCKET_CLIENT, f"from-{user}", check=False)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_readme_steps_start_eventrelay_under_a_real_systemd(tmp_path: Path, container: Container) -> None:
    checkout, wheels = _checkout_and_wheels(tmp_path)
    shutil.copytree(checkout, container.root / SOURCE.lstrip("/"))
    shutil.copytree(wheels, container.root / WHEELS.lstrip("/"))
    example = yaml.safe_load((checkout / "config.example.yaml").read_text())
    url = example["integrations"][0]["configuration"]["url"]  # its receiver runs in the container's network
    host, port = re.match(r"http://([\d.]+):(\d+)/", url).groups()
    received: queue.Queue[dict] = queue.Queue()
    receiver = container.in_network(sys.executable, "-c", RECEIVER, host, port, stdout=subprocess.PIPE, text=True)
    threading.Thread(target=lambda: [received.put(json.loads(line)) for line in receiver.stdout],
                     daemon=True).start()
    try:
        _run_readme_steps(container)
        _check_running_service(container, received, url, listen=example["listen"]["http"])
        container.run("systemctl", "stop", UNIT)
        shown = container.run("systemctl", "show", UNIT, "--property=Result,ExecMainStatus,ActiveState").stdout
        assert shown.split() == ["Result=success", "ExecMainStatus=0", "ActiveState=inactive"], shown
    finally:
        receiver.kill()
        receiver.wait(timeout=10)


def _run_readme_steps(box: Container) -> None:
    """Each line as the README gives it, without sudo, in the container's copy of the checkout; pip uses the
    wheels only. Filled in as an operator would: the config's paths, a secret, the producer's user."""
    pip_offline = ("PIP_NO_INDEX=1", f"PIP_FIND_LINKS={WHEELS}", "PIP_CONFIG_FILE=/dev/null",
                   "PIP_DISABLE_PIP_VERSION_CHECK=1")
    for argv in step_commands():
        if argv[0] == "usermod":
            box.run("useradd", "--system", "--no-create-home", argv[-1])  # the producer exists before joining
    for line in readme_steps():
        if line.startswith("journalctl"):
            continue  # follows the log forever
        line = re.sub(r"\bsudo\s+", "", line).replace("/path/to/eventrelay", SOURCE)
        box.run("sh", "-ec", f"cd {SOURCE}\n{line}", timeout=300, env=pip_offline)
        if "/etc/eventrelay/config.yaml" in line:
            config = box.root / "etc/eventrelay/config.yaml"
            config.write_text(_edit_config(config.read_text()))
        if "/etc/eventrelay/secrets.env" in line:
            (box.root / "etc/eventrelay/secrets.env").write_text("ERP_SECRET=from-secrets-env\n")


def _check_running_service(box: Container, received: queue.Queue, url: str, listen: str) -> None:
    """Started (enable --now waited for READY=1), it takes events over HTTP and, from the socket's group only,
    over the Unix socket, delivers with the secret from the EnvironmentFile, and survives a reload."""
    _wait_until_active(box)
    poster = box.in_network(sys.executable, "-c", HTTP_CLIENT, f"http://{listen}/v1/events",
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    answer = poster.communicate(timeout=30)[0]
    assert answer.startswith("202 ") and json.loads(answer[4:])["data"][0]["jobs"] == 1, answer
    try:
        delivery = received.get(timeout=30)
    except queue.Empty:
        pytest.fail(f"nothing was delivered to {url} within 30 s\n{box.diagnose()}")
    assert url.endswith(delivery["path"]), delivery
    assert delivery["headers"].get("X-MOLTIN-SECRET-KEY") == "from-secrets-env", delivery["headers"]

    producer = next(argv[-1] for argv in step_commands() if argv[0] == "usermod")
    sent = _send_over_socket(box, producer)
    assert json.loads(sent.stdout)["ok"] is True, sent.stdout + sent.stderr
    box.run("useradd", "--system", "--no-create-home", "outsider")
    refused = _send_over_socket(box, "outsider")
    assert refused.returncode != 0 and "PermissionError" in refused.stderr, refused.stdout + refused.stderr

    box.run("systemctl", "reload", UNIT)
    _wait_until_active(box)  # "reloading" from the daemon's RELOADING=1 until its READY=1


def _wait_until_active(box: Container, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while (state := box.run("systemctl", "is-active", UNIT, check=False).stdout.strip()) != "active":
        if state not in ("activating", "reloading") or time.monotonic() > deadline:
            pytest.fail(f"{UNIT} is {state!r}, not active\n{box.diagnose()}")
        time.sleep(0.2)
