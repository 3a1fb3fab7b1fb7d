"""Evaluation of SR outputs: fidelity (PSNR, SSIM), realness (NIQE, LPIPS) and the trade-off report.

PSNR/SSIM/NIQE follow the SR literature's MATLAB protocol (Y channel, border crop) and need only
numpy; LPIPS needs torch and user-supplied weights. Names load on first use, so importing this
package stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "psnr": "metrics",
    "ssim": "metrics",
    "rgb_to_y": "metrics",
    "to_uint8": "metrics",
    "NIQEParams": "niqe",
    "fetch_niqe_params": "niqe",
    "imresize": "niqe",
    "load_niqe_params": "niqe",
    "niqe": "niqe",
    "LPIPS": "lpips",
    "load_lpips": "lpips",
    "lpips_distance": "lpips",
    "Row": "report",
    "TargetCheck": "report",
    "check_targets": "report",
    "markdown_table": "report",
    "plot_tradeoff": "report",
    "read_csv": "report",
    "targets_markdown": "report",
    "STUDENT": "report",
    "BLEND": "report",
    "REALNESS_TEACHER": "report",
    "FIDELITY_TEACHER": "report",
    "BICUBIC": "report",
    "write_csv": "report",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
