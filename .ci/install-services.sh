#!/bin/sh
# Installs the system packages the tests need on Debian 12: ActiveMQ, RabbitMQ (with Erlang and epmd), a
# headless JDK (the brokers, and the JMS consumer the tests compile), systemd's tools (the unit file is
# checked with systemd-analyze), PostgreSQL's server binaries (the tests initdb clusters of their own) and
# Chromium with its WebDriver (the console's browser tests drive Debian's own build: no browser download),
# and dpkg-dev and lintian (the Debian package is built and checked).
# Idempotent, and silent when everything is already there.
#
# The tests start their own brokers and databases in temp dirs, so apt must NOT start the packages' own
# services (the postgresql package makes a `main` cluster; it stays stopped): while apt
# runs, /usr/sbin/policy-rc.d answers 101 ("action forbidden"), which invoke-rc.d and deb-systemd-invoke obey;
# any pre-existing policy-rc.d is put back afterwards.
#
# Usage: .ci/install-services.sh   (as root; otherwise it prints the command to run and exits 1)
set -eu

missing=""
[ -f /usr/share/activemq/bin/activemq.jar ] || missing="$missing activemq"
[ -x /usr/lib/rabbitmq/bin/rabbitmq-server ] || missing="$missing rabbitmq-server"
command -v javac >/dev/null 2>&1 || missing="$missing default-jdk-headless"
command -v systemd-analyze >/dev/null 2>&1 || missing="$missing systemd"
command -v node >/dev/null 2>&1 || missing="$missing nodejs"  # a receiver written like Elastic Path's examples
have_initdb() {  # any version: the tests use the newest /usr/lib/postgresql/<version>/bin
    for initdb in /usr/lib/postgresql/*/bin/initdb; do
        [ -x "$initdb" ] && return 0
    done
    return 1
}
have_initdb || missing="$missing postgresql"
command -v chromium >/dev/null 2>&1 || missing="$missing chromium"
command -v chromedriver >/dev/null 2>&1 || missing="$missing chromium-driver"
# The Debian package's build and check (packaging/build-deb.sh, tests/test_packaging.py).
command -v dpkg-shlibdeps >/dev/null 2>&1 || missing="$missing dpkg-dev"
command -v lintian >/dev/null 2>&1 || missing="$missing lintian"

[ -z "$missing" ] && exit 0

if [ "$(id -u)" -ne 0 ]; then
    echo "The service tests need these Debian packages:$missing" >&2
    echo "Install them (without starting their services) with:" >&2
    echo "  sudo sh $0" >&2
    exit 1
fi

policy=/usr/sbin/policy-rc.d
backup=""
if [ -e "$policy" ]; then
    backup="$(mktemp)"
    cp -p "$policy" "$backup"
fi
restore_policy() {
    if [ -n "$backup" ]; then
        mv -f "$backup" "$policy"
    else
        rm -f "$policy"
    fi
}
trap restore_policy EXIT
trap 'exit 130' INT TERM
printf '#!/bin/sh\n# temporary, from %s: do not start services while installing\nexit 101\n' "$0" >"$policy"
chmod 0755 "$policy"

echo "Installing:$missing" >&2
apt-get update -qq
# shellcheck disable=SC2086 # word splitting of $missing is intended
DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $missing

# On a systemd machine, also keep them from starting at the next boot (the tests never use them).
if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
    systemctl disable --quiet activemq.service rabbitmq-server.service epmd.socket epmd.service 2>/dev/null || true
    # a call of its own, so that a unit unknown to one call cannot keep the other from being disabled
    systemctl disable --quiet postgresql.service 2>/dev/null || true
fi
