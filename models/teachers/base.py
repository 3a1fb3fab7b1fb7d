"""The teacher contract shared by training, caching and evaluation."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class Teacher(Protocol):
    """An LR → SR model used as a distillation target.

    ``__call__`` takes ``[B, 3, h, w]`` floats in [0, 1] on the teacher's device and returns
    ``[B, 3, h*scale, w*scale]`` clamped to [0, 1]; it runs without gradients.
    """

    name: str
    scale: int

    def __call__(self, lr: torch.Tensor) -> torch.Tensor: ...

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> Teacher: ...
