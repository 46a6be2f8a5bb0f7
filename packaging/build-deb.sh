#!/bin/sh
# Builds dist/eventrelay_<version>-<revision>_<arch>.deb from this source tree (`make deb` runs it).
#
# The daemon and its dependencies go into a virtualenv of Debian's own python3 at /opt/eventrelay, the path
# the unit's ExecStart= names. The venv is made in a staging root and then relocated, as dh-virtualenv does:
# the paths a venv records (entry points' #! lines, activate scripts, pyvenv.cfg) are rewritten to
# /opt/eventrelay, and the build fails if any file still names the staging root. Building at /opt/eventrelay
# itself would need root and would touch (or clobber) an installed copy on the build machine. No bytecode is
# packaged (lintian forbids it): postinst compiles it in place, prerm removes it.
#
# Offline: pip installs only from the wheels given, eventrelay's own wheel (built from this tree by
# `python -m build`, or --wheel) and the wheelhouse of its dependencies that `make deb` fills from PyPI
# (.venv/wheelhouse, as for `make test`), so the package holds exactly the versions the tests ran with.
#
# Usage: packaging/build-deb.sh [--wheel eventrelay-VERSION-py3-none-any.whl] [--outdir DIR] [--no-lintian]
# Environment: BUILD_PYTHON (a Python with `build` and `shtab`; default .venv/bin/python), WHEELHOUSE,
# DEB_REVISION (default 1), DEBFULLNAME and DEBEMAIL (the Maintainer field), SOURCE_DATE_EPOCH.
set -eu

repo=$(cd "$(dirname "$0")/.." && pwd)
here=$repo/packaging
build_python=${BUILD_PYTHON:-$repo/.venv/bin/python}
wheelhouse=${WHEELHOUSE:-$repo/.venv/wheelhouse}
revision=${DEB_REVISION:-1}
prefix=/opt/eventrelay
unit=eventrelay.service

wheel=""
outdir=$repo/dist
lint=yes
while [ $# -gt 0 ]; do
    case $1 in
        --wheel) wheel=$(cd "$(dirname "$2")" && pwd)/$(basename "$2"); shift 2 ;;
        --outdir) outdir=$2; shift 2 ;;
        --no-lintian) lint=no; shift ;;
        *) echo "usage: $0 [--wheel FILE] [--outdir DIR] [--no-lintian]" >&2; exit 2 ;;
    esac
done

fail() {
    echo "build-deb: $*" >&2
    exit 1
}

# -- the tools ---------------------------------------------------------------------------------------------------

# Debian's tools: dpkg-deb comes with dpkg; dpkg-shlibdeps (dpkg-dev) finds what the compiled modules link to.
tools=""
command -v dpkg-shlibdeps >/dev/null 2>&1 || tools="$tools dpkg-dev"
[ $lint = no ] || command -v lintian >/dev/null 2>&1 || tools="$tools lintian"
if [ -n "$tools" ]; then
    if [ "$(id -u)" -ne 0 ]; then
        fail "building the package needs these Debian packages:$tools; install them with: sudo apt-get install$tools"
    fi
    echo "Installing:$tools" >&2
    apt-get update -qq
    # shellcheck disable=SC2086 # word splitting of $tools is intended
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $tools
fi

# The interpreter the venv runs on is Debian's own, resolved to its versioned name (/usr/bin/python3.11 on
# Debian 12): the venv's modules are built for that minor version, and the package depends on exactly it.
target_python=$(readlink -f /usr/bin/python3) || fail "no /usr/bin/python3: apt-get install python3"
python_package=$(basename "$target_python")
case $python_package in
    python3.[0-9]*) ;;
    *) fail "/usr/bin/python3 resolves to $target_python, not a Debian python3.X" ;;
esac
"$target_python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || fail "$target_python is older than 3.11"
[ -x "$build_python" ] || fail "$build_python is missing: run \`make deb\`, or set BUILD_PYTHON"
"$build_python" -c 'import build, shtab' 2>/dev/null ||
    fail "$build_python lacks build or shtab: $build_python -m pip install -e '${repo}[deb]'"
[ -f "$wheelhouse/.built" ] || fail "$wheelhouse is missing: \`make deb\` builds it (the dependencies' wheels)"
wheelhouse=$(cd "$wheelhouse" && pwd)  # the wheels are linked from another directory

version=$("$build_python" -c 'import sys, tomllib; print(tomllib.load(open(sys.argv[1], "rb"))["project"]["version"])' \
    "$repo/pyproject.toml")
# PEP 440 pre-releases sort before the release in Debian only with a tilde: 1.0rc1 becomes 1.0~rc1.
deb_version=$(echo "$version" | sed -E 's/^([0-9.]*[0-9])(a|b|rc|\.dev)/\1~\2/')-$revision
arch=$(dpkg --print-architecture)
maintainer="${DEBFULLNAME:-eventrelay maintainers} <${DEBEMAIL:-maintainers@users.noreply.r-seed-66768f75.example}>"
epoch=${SOURCE_DATE_EPOCH:-$(date +%s)}

work=$(mktemp -d "${TMPDIR:-/tmp}/eventrelay-deb.XXXXXX")
trap 'rm -rf "$work"' EXIT
trap 'exit 130' INT TERM
root=$work/root
venv=$root$prefix

# pip reads no configuration of this machine and reaches no index: the wheels given are the whole input.
export PIP_CONFIG_FILE=/dev/null PIP_NO_INDEX=1 PIP_FIND_LINKS="$wheelhouse" PIP_DISABLE_PIP_VERSION_CHECK=1

# -- the virtualenv ----------------------------------------------------------------------------------------------

mkdir "$work/wheels"
if [ -z "$wheel" ]; then
    # The sdist, then the wheel from it: what PyPI would get (the build backend comes from the wheelhouse).
    "$build_python" -m build --outdir "$work/dist" "$repo" >"$work/build.log" 2>&1 ||
        { cat "$work/build.log" >&2; fail "python -m build failed"; }
    wheel=$(ls "$work"/dist/eventrelay-*.whl)
fi
[ -f "$wheel" ] || fail "no wheel $wheel"
case $(basename "$wheel") in
    "eventrelay-$version-"*.whl) ;;
    *) fail "$wheel is not eventrelay $version (pyproject.toml's version)" ;;
esac
# eventrelay from this tree, never the wheelhouse's copy (built when the wheelhouse was).
cp "$wheel" "$work/wheels/"
for dependency in "$wheelhouse"/*.whl; do
    case $(basename "$dependency") in eventrelay-*) ;; *) ln -s "$dependency" "$work/wheels/" ;; esac
done

"$target_python" -m venv --without-pip "$venv"
"$build_python" -m pip --python "$venv/bin/python" install --quiet --no-compile --find-links "$work/wheels" \
    "eventrelay==$version"
# As dh_strip does: the wheels' compiled modules come with symbol tables nobody debugs with here.
find "$venv" -type f -name '*.so' -exec strip --remove-section=.comment --remove-section=.note --strip-unneeded {} +
# As dh_fixperms does: nothing under lib/ is run as a program (some wheels mark their modules executable).
find "$venv/lib" -type f -exec chmod 0644 {} +

# The shell completions, from the parser of the code just installed (shtab is copied in for this run only).
mkdir -p "$work/tools" "$root/usr/share/bash-completion/completions" "$root/usr/share/zsh/vendor-completions"
cp -r "$("$build_python" -c 'import os, shtab; print(os.path.dirname(shtab.__file__))')" "$work/tools/shtab"
completion() {  # in $work: `python -m` puts the current directory first on sys.path
    (cd "$work" && PYTHONPATH=$work/tools PYTHONDONTWRITEBYTECODE=1 \
        "$venv/bin/python" -m shtab --shell="$1" eventrelay.cli.build_parser)
}
completion bash >"$root/usr/share/bash-completion/completions/eventrelay"
completion zsh >"$root/usr/share/zsh/vendor-completions/_eventrelay"

# Relocation: every text file naming the staging venv names /opt/eventrelay instead.
grep -rlIF "$venv" "$venv" | while IFS= read -r file; do
    sed -i "s|$venv|$prefix|g" "$file"
done
find "$venv" -depth \( -name __pycache__ -o -name '*.pyc' \) -exec rm -rf {} +
if grep -rlF "$work" "$root" >"$work/leftover"; then
    fail "these files still name the staging directory $work: $(cat "$work/leftover")"
fi

# -- the rest of the file system ---------------------------------------------------------------------------------

install -d "$root/usr/bin"
ln -s "$prefix/bin/eventrelay" "$root/usr/bin/eventrelay"
grep -qx "ExecStart=$prefix/bin/eventrelay run .*" "$repo/systemd/$unit" ||
    fail "systemd/$unit no longer starts $prefix/bin/eventrelay: update the package's prefix"
install -D -m 0644 "$repo/systemd/$unit" "$root/usr/lib/systemd/system/$unit"
install -D -m 0644 "$repo/systemd/eventrelay.sysusers" "$root/usr/lib/sysusers.d/eventrelay.conf"
install -D -m 0644 "$here/debian/eventrelay.tmpfiles" "$root/usr/lib/tmpfiles.d/eventrelay.conf"
install -d -m 0755 "$root/etc/eventrelay"
python3 "$here/package_config.py" "$repo/config.example.yaml" "$root/etc/eventrelay/config.yaml"
chmod 0644 "$root/etc/eventrelay/config.yaml"

doc=$root/usr/share/doc/eventrelay
install -D -m 0644 "$repo/README.md" "$doc/README.md"  # uncompressed: the unit's Documentation= names it
install -m 0644 "$repo/config.example.yaml" "$doc/config.example.yaml"
sed -e "s|@DEB_VERSION@|$deb_version|" -e "s|@VERSION@|$version|" -e "s|@MAINTAINER@|$maintainer|" \
    -e "s|@DATE@|$(LC_ALL=C date -R -u -d "@$epoch")|" "$here/debian/changelog.in" |
    gzip -9n >"$doc/changelog.Debian.gz"
"$venv/bin/python" -B "$here/bundled_licenses.py" "$prefix" >"$work/bundled"
awk -v year="$(date -u -d "@$epoch" +%Y)" -v bundled="$work/bundled" '
    /^@BUNDLED@$/ { while ((getline line < bundled) > 0) print line; next }
    { gsub(/@YEAR@/, year); print }' "$here/debian/copyright.in" >"$doc/copyright"
install -D -m 0644 "$here/debian/lintian-overrides" "$root/usr/share/lintian/overrides/eventrelay"

# -- the control files -------------------------------------------------------------------------------------------

install -d "$root/DEBIAN"
for script in postinst prerm postrm; do
    install -m 0755 "$here/debian/$script" "$root/DEBIAN/$script"
done
echo /etc/eventrelay/config.yaml >"$root/DEBIAN/conffiles"

# What the compiled modules link to (libc6, libgcc-s1, ...), as dh_shlibdeps finds it; dpkg-shlibdeps reads
# the package's name from a debian/control, which a binary-only build has none of.
mkdir -p "$work/shlibdeps/debian"
printf 'Source: eventrelay\n\nPackage: eventrelay\nArchitecture: any\n' >"$work/shlibdeps/debian/control"
find "$venv" -type f -name '*.so*' >"$work/objects"
shlibs=$(cd "$work/shlibdeps" && xargs dpkg-shlibdeps -O --warnings=0 <"$work/objects" | sed -n 's/^shlibs:Depends=//p')
[ -n "$shlibs" ] || fail "dpkg-shlibdeps found no library dependency of the compiled modules"

chmod -R u+rwX,go+rX,go-w "$root"
installed_size=$(du -sk --exclude=DEBIAN "$root" | cut -f1)
sed -e "s|@DEB_VERSION@|$deb_version|" -e "s|@ARCH@|$arch|" -e "s|@MAINTAINER@|$maintainer|" \
    -e "s|@INSTALLED_SIZE@|$installed_size|" -e "s|@PYTHON_PACKAGE@|$python_package|" \
    -e "s|@SHLIBS_DEPENDS@|$shlibs|" "$here/debian/control.in" >"$root/DEBIAN/control"
(cd "$root" && find . -path ./DEBIAN -prune -o -type f -printf '%P\0' | LC_ALL=C sort -z | xargs -0 md5sum) \
    >"$root/DEBIAN/md5sums"
chmod 0644 "$root/DEBIAN/control" "$root/DEBIAN/conffiles" "$root/DEBIAN/md5sums"

mkdir -p "$outdir"
deb=$(cd "$outdir" && pwd)/eventrelay_${deb_version}_$arch.deb
# gzip: xz takes ten times as long for a tenth less (lintian refuses zstd). Ownership root:root, no fakeroot.
SOURCE_DATE_EPOCH=$epoch dpkg-deb --root-owner-group -Zgzip --build "$root" "$deb" >/dev/null
echo "$deb"

if [ $lint = yes ]; then
    # Errors fail the build; warnings are printed (the README's "Debian package" says which are expected).
    lintian --fail-on error "$deb" >&2
fi
