"""The ``ctsr`` command line. The heavy packages are imported by the sub-command that needs them."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("ctsr")  # the one version string is pyproject.toml's
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"
