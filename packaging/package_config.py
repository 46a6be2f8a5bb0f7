"""Writes the Debian package's /etc/eventrelay/config.yaml from config.example.yaml.

The documented example, with what an installed service needs: the database and the socket in the unit's
StateDirectory= and RuntimeDirectory=, and the example integration disabled, so that a service started
before the operator points it at a real receiver queues nothing for 127.0.0.1:9000. Each change must apply
exactly once: an example that no longer has the line fails the build instead of shipping it unchanged.

Usage: python3 package_config.py config.example.yaml OUTPUT
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

HEADER = """\
# /etc/eventrelay/config.yaml, installed by the eventrelay package as a conffile: your changes are kept on
# upgrades. It is the documented example (/usr/share/doc/eventrelay/config.example.yaml) with the database and
# the socket where eventrelay.service keeps them, and its example integration disabled: point it at your
# receiver and set `enabled: true`, then `eventrelay check-config` and `systemctl start eventrelay`.
#
"""

# (section, key, the integration it belongs to or None): the new value, and why (the line's comment).
CHANGES = {
    ("listen", "socket", None): ("/run/eventrelay/eventrelay.sock", "the unit's RuntimeDirectory; null disables it"),
    ("storage", "path", None): ("/var/lib/eventrelay/eventrelay.db", "the unit's StateDirectory"),
    ("integrations", "enabled", "erp-orders"): ("false", "set true once url points at your receiver"),
}


def package_config(example: str) -> str:
    pending = dict(CHANGES)
    out, section, integration = [], None, None
    for line in example.splitlines():
        if top := re.match(r"([a-z_]+):", line):
            section, integration = top.group(1), None
        if item := re.match(r"  - name: ([\w-]+)", line):
            integration = item.group(1)
        key = re.match(r"( {2}| {4})([a-z_]+): ", line)
        where = (section, key.group(2), integration) if key else None
        if where in pending:
            value, why = pending.pop(where)
            line = f"{key.group(1)}{key.group(2)}: {value}".ljust(32) + f"  # {why}"  # the example's comment column
        out.append(line)
    if pending:
        sys.exit(f"config.example.yaml no longer has {sorted(pending)}: update packaging/package_config.py")
    return HEADER + "\n".join(out) + "\n"


def main() -> None:
    example, output = sys.argv[1:]
    Path(output).write_text(package_config(Path(example).read_text()))


if __name__ == "__main__":
    main()
