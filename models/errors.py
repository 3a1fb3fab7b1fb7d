"""Errors a user can act on.

Everything the CLI (and later the service) should report as a one-line reason rather than a
traceback derives from :class:`CTSRError`.
"""


class CTSRError(Exception):
    """Base class for user-facing failures: bad input, bad checkpoint, bad configuration."""


class ImageError(CTSRError):
    """An input image cannot be read or is outside the supported limits."""


class CheckpointError(CTSRError):
    """A checkpoint folder is missing, corrupt, or incompatible with this version."""


class ConfigError(CTSRError):
    """A model or pipeline option is invalid."""
