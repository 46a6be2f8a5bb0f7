"""The wheel and sdist (`python -m build`), and the Debian package (packaging/build-deb.sh, `make deb`).

The distributions must carry every module and the package data (the console's files): the wheel is built from
the sdist, as PyPI's users would build it. The package test installs the .deb on this machine with dpkg, as
an operator would, checks what it put where and that the daemon runs from /opt/eventrelay, removes and
purges it, and checks that nothing is left. It needs root, and will not run where eventrelay is installed
already (it would replace that copy and purge its configuration and database); its teardown purges the
package, deletes the account it created and puts a runtime directory that was there back as it was.

Like tests/test_systemd.py, everything is built offline from the wheels `make test` fetched beforehand.
"""

from __future__ import annotations

import glob
import grp
import gzip
import os
import pwd
import shutil
import stat
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.test_systemd import unit_settings

REPO = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
VERSION = PYPROJECT["project"]["version"]
WHEELHOUSE = REPO / ".venv" / "wheelhouse"
# pip reads no configuration of this machine and reaches no index: the build backend comes from the wheelhouse.
OFFLINE = {"PIP_CONFIG_FILE": "/dev/null", "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(WHEELHOUSE),
           "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
# sudo's secure_path: `eventrelay` is found where an operator's shell finds it, never in this venv.
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

PACKAGE = "eventrelay"
PREFIX = Path("/opt/eventrelay")
UNIT = "eventrelay.service"
UNIT_PATH = Path("/usr/lib/systemd/system") / UNIT
CONFIG = Path("/etc/eventrelay/config.yaml")
DOC = Path("/usr/share/doc/eventrelay")
BASH_COMPLETION = Path("/usr/share/bash-completion/completions/eventrelay")
ZSH_COMPLETION = Path("/usr/share/zsh/vendor-completions/_eventrelay")
MASK = Path("/etc/systemd/system") / UNIT
WANTS = Path("/etc/systemd/system/multi-user.target.wants") / UNIT
# deb-systemd-helper's records of the unit's links, which purge deletes.
HELPER_STATE = (Path("/var/lib/systemd/deb-systemd-helper-enabled") / f"{UNIT}.dsh-also",
                Path("/var/lib/systemd/deb-systemd-helper-enabled/multi-user.target.wants") / UNIT,
                Path("/var/lib/systemd/deb-systemd-helper-masked") / UNIT)
# An installation's state that must not exist beforehand: the test would take it over and purge it.
OPERATOR_STATE = (PREFIX, Path("/etc/eventrelay"), Path("/var/lib/eventrelay"))


def _wheelhouse_built() -> None:
    assert (WHEELHOUSE / ".built").exists(), (
        f"{WHEELHOUSE} is missing: `make test` (or `make deb`) builds it (the dependencies' wheels)")


def _run(argv: list[str], timeout: float = 120, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(argv, check=False, capture_output=True, text=True, timeout=timeout, **kwargs)


def _expect(result: subprocess.CompletedProcess, code: int = 0) -> subprocess.CompletedProcess:
    assert result.returncode == code, \
        f"{' '.join(map(str, result.args))} exited {result.returncode}:\n{result.stdout}{result.stderr}"
    return result


# -- the wheel and the sdist -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dists(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """`python -m build`: the sdist, then the wheel built from it."""
    _wheelhouse_built()
    out = tmp_path_factory.mktemp("dist")
    _expect(_run([sys.executable, "-m", "build", "--outdir", str(out), str(REPO)], timeout=300,
                 env={**os.environ, **OFFLINE}))
    wheels, sdists = list(out.glob("eventrelay-*.whl")), list(out.glob("eventrelay-*.tar.gz"))
    assert len(wheels) == len(sdists) == 1, sorted(out.iterdir())
    return {"wheel": wheels[0], "sdist": sdists[0]}


def _source_files() -> set[str]:
    """What the wheel must hold, relative to daemon/: every module, and the files package-data names."""
    source = REPO / "daemon"
    files = {str(p.relative_to(source)) for p in (source / "eventrelay").rglob("*.py") if "__pycache__" not in p.parts}
    for package, patterns in PYPROJECT["tool"]["setuptools"]["package-data"].items():
        directory = source / package.replace(".", "/")
        for pattern in patterns:
            matched = [Path(p) for p in glob.glob(str(directory / pattern)) if Path(p).is_file()]
            assert matched, f"package-data {package}: {pattern} matches no file"
            files |= {str(p.relative_to(source)) for p in matched}
    return files


def test_wheel_and_sdist_carry_every_module_and_the_package_data(dists: dict[str, Path]) -> None:
    expected = _source_files()
    assert any(f.startswith("eventrelay/console/static/") for f in expected), expected

    with zipfile.ZipFile(dists["wheel"]) as wheel:
        in_wheel = set(wheel.namelist())
        metadata = wheel.read(f"eventrelay-{VERSION}.dist-info/METADATA").decode()
    assert expected <= in_wheel, f"missing from the wheel: {sorted(expected - in_wheel)}"
    assert f"\nVersion: {VERSION}\n" in metadata
    # The build-time tools stay extras: nothing installs shtab or build along with the daemon.
    runtime = [line for line in metadata.splitlines() if line.startswith("Requires-Dist:") and "extra ==" not in line]
    assert not [line for line in runtime if any(tool in line for tool in ("shtab", "build"))], runtime

    top = f"eventrelay-{VERSION}/"
    with tarfile.open(dists["sdist"]) as sdist:
        in_sdist = {m.name.removeprefix(top) for m in sdist.getmembers()}
    assert {f"daemon/{f}" for f in expected} <= in_sdist, \
        f"missing from the sdist: {sorted({f'daemon/{f}' for f in expected} - in_sdist)}"
    assert {"pyproject.toml", "README.md"} <= in_sdist


# -- the Debian package ------------------------------------------------------------------------------------------

def _installed_status() -> str:
    """dpkg's status of the package ("" when dpkg knows nothing of it)."""
    result = _run(["dpkg-query", "-W", "-f=${db:Status-Status}", PACKAGE])
    return result.stdout.strip() if result.returncode == 0 else ""


def _safe_to_install() -> None:
    if _installed_status() not in ("", "not-installed"):
        pytest.skip(f"the {PACKAGE} package is on this machine already ({_installed_status()}): the test "
                    f"would replace it and purge its configuration (dpkg --purge {PACKAGE} to let it run)")
    if taken := [str(p) for p in OPERATOR_STATE if p.exists()]:
        pytest.skip(f"{', '.join(taken)}: already there (an installation by hand?), which the package would take "
                    "over and its purge delete")
    missing = [tool for tool in ("dpkg-shlibdeps", "lintian", "systemd-sysusers", "systemd-tmpfiles")
               if shutil.which(tool) is None]
    assert not missing, f"missing {', '.join(missing)}: `make services` installs them (.ci/install-services.sh)"


def _account(name: str) -> tuple[bool, bool]:
    def exists(lookup) -> bool:
        try:
            lookup(name)
        except KeyError:
            return False
        return True
    return exists(pwd.getpwnam), exists(grp.getgrnam)


@pytest.fixture
def host() -> Iterator[None]:
    """Puts back what the package changes beyond its own files, even when the test fails halfway: purges it,
    removes what a faulty purge would leave, deletes the system user and group if they were made here, and
    restores a runtime directory that existed (systemd-tmpfiles gave it to the service's user)."""
    _safe_to_install()
    had_user, had_group = _account("eventrelay")
    run_dir = Path("/run/eventrelay")
    run_stat = run_dir.stat() if run_dir.exists() else None
    links = [p for p in (WANTS, MASK, *HELPER_STATE) if not os.path.lexists(p)]
    try:
        yield
    finally:
        if _installed_status() not in ("", "not-installed"):
            _run(["dpkg", "--purge", PACKAGE])
        for path in OPERATOR_STATE:  # none existed before: what is there now, a faulty purge left behind
            shutil.rmtree(path, ignore_errors=True)
        for link in links:
            if os.path.lexists(link):
                link.unlink()
        if run_stat is not None and run_dir.is_dir():
            os.chown(run_dir, run_stat.st_uid, run_stat.st_gid)
            run_dir.chmod(stat.S_IMODE(run_stat.st_mode))
        if _account("eventrelay")[0] and not had_user:
            _run(["userdel", "eventrelay"])
        if _account("eventrelay")[1] and not had_group:  # userdel deletes the user's own group, usually
            _run(["groupdel", "eventrelay"])


def _build_deb(wheel: Path, out: Path) -> Path:
    """packaging/build-deb.sh with the wheel built above (the same as `make deb` builds from this tree)."""
    env = {**os.environ, "BUILD_PYTHON": sys.executable, "WHEELHOUSE": str(WHEELHOUSE)}
    result = _expect(_run(["sh", str(REPO / "packaging/build-deb.sh"), "--wheel", str(wheel), "--outdir", str(out),
                           "--no-lintian"], timeout=300, env=env))
    deb = Path(result.stdout.strip().splitlines()[-1])
    assert deb.name == f"eventrelay_{VERSION}-1_{_run(['dpkg', '--print-architecture']).stdout.strip()}.deb", deb
    return deb


def _lintian(deb: Path) -> None:
    """No error; the warnings are the ones the README's "Debian package" lists."""
    result = _run(["lintian", "--fail-on", "error", str(deb)], timeout=300)
    errors = [line for line in result.stdout.splitlines() if line.startswith("E:")]
    assert result.returncode == 0 and not errors, result.stdout + result.stderr


def _dpkg(*args: str) -> subprocess.CompletedProcess:
    return _expect(_run(["dpkg", *args], timeout=300, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"}))


def _unit() -> tuple[dict[str, str], dict[str, str], dict[str, str]]:
    text = (REPO / "systemd" / UNIT).read_text()
    return unit_settings(text, "Unit"), unit_settings(text, "Service"), unit_settings(text, "Install")


def _service_dirs() -> dict[Path, tuple[str, str, str]]:
    """{directory: (mode, user, group)} of the unit's StateDirectory= and RuntimeDirectory=."""
    _, service, _ = _unit()
    owner = (service["User"], service["Group"])
    return {Path("/var/lib") / service["StateDirectory"]: (service["StateDirectoryMode"], *owner),
            Path("/run") / service["RuntimeDirectory"]: (service["RuntimeDirectoryMode"], *owner)}


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.skipif(os.geteuid() != 0, reason="installing a Debian package needs root")
def test_debian_package_installs_runs_and_purges(host: None, dists: dict[str, Path], tmp_path: Path) -> None:
    deb = _build_deb(dists["wheel"], tmp_path)
    _lintian(deb)
    listing = _expect(_run(["dpkg-deb", "--contents", str(deb)])).stdout.splitlines()
    packaged = [line.split(maxsplit=5)[5].split(" -> ")[0].removeprefix(".") for line in listing
                if not line.startswith("d")]  # files and links; directories like /opt stay when others use them

    installed = _dpkg("--install", str(deb))
    assert "enabled, but not started" in installed.stdout, installed.stdout
    _check_the_daemon_runs_from_the_venv()
    _check_the_unit_its_account_and_directories()
    _check_the_configuration_documentation_and_completions()

    _dpkg("--remove", PACKAGE)
    assert not PREFIX.exists(), f"{PREFIX} is left (bytecode that prerm did not remove?)"
    assert not Path("/usr/bin/eventrelay").exists() and not UNIT_PATH.exists()
    assert CONFIG.is_file(), "removal (not purge) keeps the configuration"
    assert MASK.is_symlink() and os.readlink(MASK) == "/dev/null", "removal leaves the unit masked: nothing starts"

    _dpkg("--purge", PACKAGE)
    assert _installed_status() in ("", "not-installed")
    left = [p for p in packaged if os.path.lexists(p)]
    assert not left, f"left after the purge: {left}"
    for path in (*OPERATOR_STATE, WANTS, MASK, *HELPER_STATE):
        assert not os.path.lexists(path), f"{path} is left after the purge"


def _check_the_daemon_runs_from_the_venv() -> None:
    env = {"PATH": SYSTEM_PATH, "LANG": "C.UTF-8"}
    assert shutil.which("eventrelay", path=SYSTEM_PATH) == "/usr/bin/eventrelay"
    assert _expect(_run(["/usr/bin/eventrelay", "--version"], env=env)).stdout.strip() == f"eventrelay {VERSION}"
    checked = _expect(_run(["eventrelay", "check-config", "--config", str(CONFIG)], env=env))
    assert checked.stdout.startswith(f"{CONFIG}: OK, ") and ", 0 enabled" in checked.stdout, checked.stdout
    # Every module imports from the relocated venv: its dependencies are there, built for its interpreter.
    imports = ("import importlib, pkgutil, eventrelay\n"
               "for m in pkgutil.walk_packages(eventrelay.__path__, 'eventrelay.'):\n"
               "    if not m.name.endswith('__main__'): importlib.import_module(m.name)\n"
               "import uvloop; print(eventrelay.__file__)")
    where = _expect(_run([str(PREFIX / "bin/python"), "-I", "-c", imports], env=env)).stdout.strip()
    assert where.startswith(f"{PREFIX}/lib/python3"), where
    assert list((Path(where).parent / "__pycache__").glob("*.pyc")), "postinst compiled no bytecode"


def _check_the_unit_its_account_and_directories() -> None:
    assert UNIT_PATH.read_text() == (REPO / "systemd" / UNIT).read_text()
    assert Path("/usr/lib/sysusers.d/eventrelay.conf").read_text() == (REPO / "systemd/eventrelay.sysusers").read_text()
    _, service, install = _unit()
    assert service["ExecStart"].startswith(f"{PREFIX}/bin/eventrelay run ")
    if shutil.which("systemd-analyze"):
        verified = _expect(_run(["systemd-analyze", "verify", str(UNIT_PATH)], timeout=60))
        assert UNIT not in verified.stderr, verified.stderr

    account = pwd.getpwnam(service["User"])
    assert account.pw_uid < 1000 and account.pw_shell.endswith("nologin"), account
    assert grp.getgrgid(account.pw_gid).gr_name == service["Group"]

    tmpfiles = Path("/usr/lib/tmpfiles.d/eventrelay.conf").read_text().splitlines()
    entries = {Path(f[1]): (f[2], f[3], f[4]) for f in (line.split() for line in tmpfiles)
               if f and not f[0].startswith("#")}
    assert entries == {path: (mode.zfill(4), user, group) for path, (mode, user, group) in _service_dirs().items()}
    for path, (mode, user, group) in entries.items():
        st = path.stat()
        assert (oct(stat.S_IMODE(st.st_mode))[2:].zfill(4), pwd.getpwuid(st.st_uid).pw_name,
                grp.getgrgid(st.st_gid).gr_name) == (mode, user, group), path

    # Enabled (deb-systemd-helper's link, as `systemctl enable` makes it), but not started.
    assert install["WantedBy"] == WANTS.parent.name.removesuffix(".wants"), install
    assert WANTS.is_symlink() and WANTS.resolve() == UNIT_PATH.resolve(), WANTS
    if Path("/run/systemd/system").exists():
        assert _run(["systemctl", "is-active", UNIT]).stdout.strip() != "active"
    assert _run(["pgrep", "-u", service["User"]]).returncode == 1, "a process of the service's user runs"


def _check_the_configuration_documentation_and_completions() -> None:
    conffiles = _expect(_run(["dpkg-query", "-W", "-f=${Conffiles}", PACKAGE])).stdout
    assert f" {CONFIG} " in conffiles, conffiles
    config = yaml.safe_load(CONFIG.read_text())
    state_dir, runtime_dir = _service_dirs()
    assert Path(config["storage"]["path"]).parent == state_dir
    assert Path(config["listen"]["socket"]).parent == runtime_dir
    assert not [i["name"] for i in config["integrations"] if i["enabled"]], "the example integrations are installed off"

    unit, _, _ = _unit()
    for uri in unit["Documentation"].split():
        if uri.startswith("file:"):
            assert Path(uri.removeprefix("file:")).is_file(), f"Documentation={uri} is not installed"
    # Not compared with this tree's copies, which others may be editing while the test runs.
    assert "\n## Running under systemd\n" in (DOC / "README.md").read_text()
    assert yaml.safe_load((DOC / "config.example.yaml").read_text())["integrations"]
    assert "License: MIT" in (DOC / "copyright").read_text()
    changelog = gzip.decompress((DOC / "changelog.Debian.gz").read_bytes()).decode()
    assert changelog.startswith(f"eventrelay ({VERSION}-1) "), changelog

    assert ZSH_COMPLETION.read_text().startswith("#compdef eventrelay")
    # Bash completes the subcommands and the options of one, from the file the package installed.
    complete = ('source "$1"; COMP_WORDS=(eventrelay "$2"); COMP_CWORD=1; COMP_LINE="eventrelay $2"; '
                'COMP_POINT=${#COMP_LINE}; _shtab_eventrelay; printf "%s\\n" "${COMPREPLY[@]}"')
    commands = _expect(_run(["bash", "-c", complete, "bash", str(BASH_COMPLETION), "check"])).stdout.split()
    assert commands == ["check-config"], commands
