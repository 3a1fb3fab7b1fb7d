"""The ``ctsr`` command line. The heavy packages are imported by the sub-command that needs them."""

__version__ = "0.1.0"
