"""Prints the debian/copyright paragraphs of the Python distributions bundled in the package's virtualenv.

Run by the venv's own interpreter (packaging/build-deb.sh), so that it sees exactly what was installed: one
Files paragraph per distribution, from its metadata (License-Expression, else its License field or
classifiers, as the distribution declares them), naming the license files it ships, and after them a
stand-alone License paragraph for every license named that the copyright template does not spell out.

Usage: python3 bundled_licenses.py /opt/eventrelay
"""

from __future__ import annotations

import re
import sys
import sysconfig
from importlib.metadata import Distribution, distributions
from pathlib import Path

SPELLED_OUT = {"MIT"}  # packaging/debian/copyright.in carries its text
COMMON_LICENSES = Path("/usr/share/common-licenses")
CLASSIFIERS = {  # trove classifiers of the distributions that declare no SPDX expression
    "License :: OSI Approved :: Apache Software License": "Apache-2.0",
    "License :: OSI Approved :: MIT License": "MIT",
    "License :: OSI Approved :: BSD License": "BSD",
    "License :: OSI Approved :: Python Software Foundation License": "PSF-2.0",
    "License :: OSI Approved :: Mozilla Public License 2.0 (MPL 2.0)": "MPL-2.0",
}
SPDX_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9.+-]*")


def license_of(dist: Distribution) -> str:
    """The distribution's license in the copyright format's syntax (lower-case `and`, `or`)."""
    expression = dist.metadata.get("License-Expression")
    if not expression:
        declared = (dist.metadata.get("License") or "").strip()
        classified = [CLASSIFIERS[c] for c in dist.metadata.get_all("Classifier") or [] if c in CLASSIFIERS]
        if SPDX_ID.fullmatch(declared):  # "Apache-2.0", not "Apache 2.0" or "Dual License"
            expression = declared
        elif classified:
            expression = " OR ".join(dict.fromkeys(classified))  # several classifiers: a choice among them
        else:
            expression = "other"
    return re.sub(r"\b(AND|OR|WITH)\b", lambda m: m.group(1).lower(), expression)


def paragraph(dist: Distribution, here: Path, installed: Path) -> str:
    """Its Files paragraph: what it installed in site-packages (`here` now, `installed` in the package)."""
    name, version = dist.metadata["Name"], dist.version
    tops = sorted({Path(f).parts[0] for f in dist.files or [] if not str(f).startswith("..")})
    where = installed.relative_to("/")
    files = [f"{where}/{top}/*" if (here / top).is_dir() else f"{where}/{top}" for top in tops]
    author = dist.metadata.get("Author") or dist.metadata.get("Author-email") or dist.metadata.get("Maintainer")
    holder = f"{author.strip()} and the other authors of {name}" if author else f"the authors of {name}"
    texts = [f for f in dist.files or [] if "licenses/" in str(f) or Path(f).name.upper().startswith(
        ("LICENSE", "LICENCE", "COPYING", "NOTICE"))]
    shipped = ", ".join(f"{installed}/{t}" for t in texts) or "none in the distribution"
    return "\n".join([
        "Files: " + "\n ".join(files),
        f"Copyright: {holder}",
        f"License: {license_of(dist)}",
        f"Comment: {name} {version}. Its license files: {shipped}.",
    ])


def license_paragraph(name: str) -> str:
    if name != "BSD" and (COMMON_LICENSES / name).exists():  # Debian's BSD is one text; classifiers mean any
        return f"License: {name}\n On Debian systems, the full text is in {COMMON_LICENSES / name}."
    return (f"License: {name}\n The text is in the license files of each distribution above that names it"
            " (their Comment says where).")


def main() -> None:
    (prefix,) = sys.argv[1:]
    # The venv's site-packages as installed (under prefix), whatever directory it is being run from.
    here = Path(sysconfig.get_path("purelib"))
    installed = Path(prefix) / here.relative_to(sys.prefix)
    bundled = sorted((d for d in distributions(path=[str(here)]) if d.metadata["Name"] != "eventrelay"),
                     key=lambda d: d.metadata["Name"].lower())
    paragraphs = [paragraph(d, here, installed) for d in bundled]
    named = {n for d in bundled for n in re.split(r"\s+|[()]", license_of(d)) if n and n not in ("and", "or")}
    paragraphs += [license_paragraph(n) for n in sorted(named - SPELLED_OUT)]
    print("\n\n".join(paragraphs) + "\n")


if __name__ == "__main__":
    main()
