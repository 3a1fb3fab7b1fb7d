"""Pipeline defaults and option names, importable without torch (the CLI's help and, through
``ctsr.contract``, the torch-free gateway read them).

This module imports nothing: ``ctsr/contract.py`` re-exports the values the queue contract shares
with the model (the colour fixes, the default alpha and colour fix), so they are defined once, here,
without ``models`` ever importing ``ctsr``.
"""

DEFAULT_TILE = 192  # LR pixels per tile edge
DEFAULT_OVERLAP = 32  # LR pixels neighbouring tiles share (capped at tile/4)
DEFAULT_ALPHA = 0.5
COLOR_FIXES = ("wavelet", "adain", "none")
DEFAULT_COLOR_FIX = "wavelet"
