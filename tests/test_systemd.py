"""The unit file is valid for the systemd on this machine (systemd-analyze verify)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_unit_file_verifies(tmp_path: Path) -> None:
    unit = (REPO / "systemd" / "eventrelay.service").read_text()
    # verify checks that ExecStart exists: point it at this checkout's entry point.
    entry = Path(sys.executable).parent / "eventrelay"
    (tmp_path / "eventrelay.service").write_text(unit.replace("/opt/eventrelay/bin/eventrelay", str(entry)))
    result = subprocess.run(["systemd-analyze", "verify", str(tmp_path / "eventrelay.service")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "eventrelay.service" not in result.stderr, result.stderr  # no warnings about our unit either
    lines = unit.splitlines()  # whole lines, so a directive that is only mentioned in a comment does not count
    for needed in ("RestartPreventExitStatus=78", "StateDirectory=eventrelay", "RuntimeDirectory=eventrelay",
                   "ProtectSystem=strict", "NoNewPrivileges=yes",
                   "Type=notify", "NotifyAccess=main", "ExecReload=/bin/kill -HUP $MAINPID", "WatchdogSec=30s",
                   "EnvironmentFile=-/etc/eventrelay/secrets.env", "DynamicUser=yes"):
        assert needed in lines, needed
    assert any(line.startswith("TimeoutStartSec=") for line in lines)
    # AF_UNIX carries the notifications to systemd: the sandbox must keep allowing it.
    assert "AF_UNIX" in next(line for line in lines if line.startswith("RestrictAddressFamilies="))
