"""Scalar draws from an explicit ``torch.Generator``.

Every random decision of the degradation model goes through these helpers, so one seeded
generator reproduces a batch exactly and nothing touches Python's or NumPy's global RNG.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import torch

T = TypeVar("T")


def uniform(generator: torch.Generator, low: float = 0.0, high: float = 1.0) -> float:
    """One float drawn uniformly from ``[low, high)`` (float64, so narrow ranges keep their resolution)."""
    u = torch.rand((), generator=generator, device=generator.device, dtype=torch.float64).item()
    return low + (high - low) * u


def chance(generator: torch.Generator, prob: float) -> bool:
    """True with probability ``prob``; always consumes one draw so the stream stays aligned."""
    return uniform(generator) < prob


def choice(generator: torch.Generator, items: Sequence[T], probs: Sequence[float] | None = None) -> T:
    """One of ``items``, uniformly or with (not necessarily normalised) weights ``probs``."""
    if not items:
        raise ValueError("choice from an empty sequence")
    weights = [1.0] * len(items) if probs is None else [float(p) for p in probs]
    target = uniform(generator) * sum(weights)
    acc = 0.0
    for item, weight in zip(items, weights, strict=True):
        acc += weight
        if target < acc:
            return item
    # Only reachable through float rounding at the very top of the range: take the last possible item.
    return next(item for item, weight in zip(reversed(items), reversed(weights), strict=True) if weight > 0)


def randint(generator: torch.Generator, low: int, high: int) -> int:
    """One integer drawn uniformly from ``[low, high]`` (both ends included)."""
    return int(torch.randint(low, high + 1, (), generator=generator, device=generator.device).item())
