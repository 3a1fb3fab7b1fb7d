"""Pipeline defaults and option names, importable without torch (the CLI's help and the
torch-free gateway read them)."""

DEFAULT_TILE = 192  # LR pixels per tile edge
DEFAULT_OVERLAP = 32  # LR pixels neighbouring tiles share (capped at tile/4)
DEFAULT_ALPHA = 0.5
COLOR_FIXES = ("wavelet", "adain", "none")
