"""Overlapping LR tiles and the feathered weights that blend their SR outputs.

Every tile of a grid has the same size, so tiles of *different images* can share one batch.
Along an edge shared with a neighbour, a tile's weight is zero for the first ``margin`` LR pixels
(where its output is contaminated by the missing context), then ramps linearly up across the rest
of the overlap. Image borders get no ramp: there the whole image has no context either. The
weights are normalised so that all tiles' weights sum to one at every pixel (also where the last
tile, pushed back to fit, overlaps its neighbour by more than ``overlap``): blending is then a
plain weighted sum, seamless, with no whole-image buffer of weights, and as long as the margin
covers the model's receptive field a tiled result equals the whole-image result. The ramps are
separable, so the normalisation is one sum per axis.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from .errors import ConfigError


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _starts(length: int, tile: int, stride: int) -> list[int]:
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile, stride))
    return [*starts, length - tile]


@dataclass(frozen=True)
class TileGrid:
    """Where the tiles of one ``height × width`` LR image go (LR pixel units)."""

    height: int
    width: int
    tile_h: int
    tile_w: int
    overlap: int
    ys: tuple[int, ...]
    xs: tuple[int, ...]

    @classmethod
    def plan(cls, height: int, width: int, tile: int, overlap: int, multiple: int = 1) -> TileGrid:
        """``tile=0`` means one tile holding the whole image (padded up to ``multiple``)."""
        if tile < 0 or overlap < 0:
            raise ConfigError("tile and overlap must be >= 0")
        if tile == 0:
            th, tw = round_up(height, multiple), round_up(width, multiple)
            return cls(height, width, th, tw, 0, (0,), (0,))
        t = round_up(tile, multiple)
        if 2 * overlap >= t:
            raise ConfigError(f"overlap {overlap} must be less than half the tile ({t})")
        stride = t - overlap
        # A side shorter than the tile gets a tile of its own length: padding it out to a whole
        # tile would cost pixels that are thrown away (a 32×32 input priced as 128×128) and would
        # change what the model sees at the border, so the result would differ from whole-image
        # inference. Tiles of such images batch with other images of the same side.
        th = round_up(height, multiple) if height <= t else t
        tw = round_up(width, multiple) if width <= t else t
        return cls(
            height, width, th, tw, overlap, tuple(_starts(height, th, stride)), tuple(_starts(width, tw, stride))
        )

    @property
    def padded(self) -> tuple[int, int]:
        """The LR canvas the tiles cover: the image, padded where it is smaller than a tile."""
        return max(self.height, self.tile_h), max(self.width, self.tile_w)

    @property
    def boxes(self) -> list[tuple[int, int]]:
        return [(y, x) for y in self.ys for x in self.xs]

    def __len__(self) -> int:
        return len(self.ys) * len(self.xs)

    def weight(self, y: int, x: int, scale: int) -> torch.Tensor:
        """``[1, tile_h*scale, tile_w*scale]`` blend weight of the tile at LR ``(y, x)``; the
        weights of all tiles sum to one at every SR pixel of the padded canvas."""
        # Not cached: one per tile position would hold megabytes each; the 1D factors are cached.
        return _tile_weight(self, y, x, scale)


def _tile_weight(grid: TileGrid, y: int, x: int, scale: int) -> torch.Tensor:
    ph, pw = grid.padded
    wy = _axis_weights(grid.ys, grid.tile_h, ph, grid.overlap, scale)[grid.ys.index(y)]
    wx = _axis_weights(grid.xs, grid.tile_w, pw, grid.overlap, scale)[grid.xs.index(x)]
    return (wy[:, None] * wx[None, :])[None]


@lru_cache(maxsize=64)
def _axis_weights(starts: tuple[int, ...], tile: int, length: int, overlap: int, scale: int) -> list[torch.Tensor]:
    """Each tile's ramp along one axis, divided by the sum of all tiles' ramps there."""
    ramps = [_ramp(tile, overlap, scale, start > 0, start + tile < length) for start in starts]
    total = torch.zeros(length * scale)
    for start, ramp in zip(starts, ramps, strict=True):
        total[start * scale : (start + tile) * scale] += ramp
    total.clamp_min_(1e-8)
    return [ramp / total[start * scale : (start + tile) * scale] for start, ramp in zip(starts, ramps, strict=True)]


def _ramp(length: int, overlap: int, scale: int, start_inner: bool, end_inner: bool) -> torch.Tensor:
    pos = torch.arange(length * scale, dtype=torch.float32) + 0.5
    margin = overlap // 4
    width = max(overlap - 2 * margin, 1) * scale
    w = torch.ones_like(pos)
    if overlap and start_inner:
        w = w * ((pos - margin * scale) / width).clamp(0, 1)
    if overlap and end_inner:
        w = w * ((length * scale - pos - margin * scale) / width).clamp(0, 1)
    return w
