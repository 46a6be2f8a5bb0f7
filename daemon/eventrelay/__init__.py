"""eventrelay: a single-host event delivery daemon."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("eventrelay")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+source"
