"""An exponential moving average of the trained weights: what checkpoints and ``final/`` hold.

The compact student's fidelity end, trained on a CPU, wandered: its held-out alpha = 1 PSNR swung
by up to half a dB between checkpoints 250 steps apart. With the weights averaged over the last
thousand or so steps (Real-ESRGAN keeps such an average, decay 0.999) it moved by 0.14 dB at most
(the compact card has both runs). Training itself always continues from the live weights; only
what is saved is averaged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


class WeightAverage:
    """The average of ``named`` (name → trained parameter); live weights are saved by name, so a
    resume can tell whether it trains the same parameters."""

    def __init__(self, named: dict[str, nn.Parameter], decay: float) -> None:
        self.names, self.params, self.decay = list(named), list(named.values()), decay
        self.average = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Move the average toward the live weights; early steps use a shorter memory, so the
        average does not stay anchored to the initial weights (``step`` counts from 1)."""
        decay = min(self.decay, (1 + step) / (10 + step))
        torch._foreach_lerp_(self.average, [p.detach() for p in self.params], 1 - decay)

    @torch.no_grad()
    def reset_from_model(self) -> None:
        """Take the model's current weights as the average (a resumed checkpoint holds it)."""
        for a, p in zip(self.average, self.params, strict=True):
            a.copy_(p)

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """Within the block the model holds the averaged weights; the live ones come back after."""
        live = self.live_weights()
        with torch.no_grad():
            for p, a in zip(self.params, self.average, strict=True):
                p.copy_(a)
        try:
            yield
        finally:
            self.load_live_weights(live)

    def live_weights(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in zip(self.names, self.params, strict=True)}

    @torch.no_grad()
    def load_live_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Copy saved live weights in (the caller has checked they name the same parameters)."""
        for n, p in zip(self.names, self.params, strict=True):
            p.copy_(weights[n])
