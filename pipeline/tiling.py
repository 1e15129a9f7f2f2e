"""Overlapping tiles and their seamless recombination.

Tiles are laid in rows. Each tile is weighted by a separable raised-cosine window
that fades towards tile edges shared with a neighbour (edges on the image border keep
full weight), and overlapping contributions are normalised by the summed weights.
Output rows are finished stripe by stripe, so the float accumulator never holds
more than one tile row plus the overlap.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np


def axis_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Evenly spaced start offsets of tiles of size ``tile`` covering ``length``, overlapping by at least ``overlap``."""
    if tile >= length:
        return [0]
    count = -(-(length - overlap) // max(tile - overlap, 1))
    count = max(count, 2)
    span = length - tile
    return [round(i * span / (count - 1)) for i in range(count)]


def ramp(size: int, fade_start: int, fade_end: int) -> np.ndarray:
    """1-D window: raised-cosine fade-in over ``fade_start`` samples and fade-out over ``fade_end``."""
    window = np.ones(size, dtype=np.float32)
    for n, sl in ((fade_start, slice(0, fade_start)), (fade_end, slice(size - fade_end, size))):
        if n > 0:
            t = (np.arange(n, dtype=np.float32) + 0.5) / n
            fade = 0.5 - 0.5 * np.cos(np.pi * t)
            window[sl] = fade if sl.start == 0 else fade[::-1]
    return window


@dataclass(frozen=True)
class Tile:
    y: int
    x: int
    h: int
    w: int
    window: np.ndarray  # (h, w) float32


@dataclass(frozen=True)
class TileGrid:
    height: int
    width: int
    tile: int
    overlap: int

    def rows(self) -> list[list[Tile]]:
        ys = axis_starts(self.height, self.tile, self.overlap)
        xs = axis_starts(self.width, self.tile, self.overlap)
        th, tw = min(self.tile, self.height), min(self.tile, self.width)

        def fades(starts: list[int], i: int, size: int) -> tuple[int, int]:
            # Fade across the shared strip, at most half a tile so both fades fit.
            before = starts[i - 1] + size - starts[i] if i > 0 else 0
            after = starts[i] + size - starts[i + 1] if i + 1 < len(starts) else 0
            return min(before, size // 2), min(after, size // 2)

        fy = [fades(ys, i, th) for i in range(len(ys))]
        fx = [fades(xs, j, tw) for j in range(len(xs))]
        windows: dict[tuple[tuple[int, int], tuple[int, int]], np.ndarray] = {}  # shared: a big grid has few kinds

        def window(i: int, j: int) -> np.ndarray:
            if (fy[i], fx[j]) not in windows:
                windows[fy[i], fx[j]] = np.outer(ramp(th, *fy[i]), ramp(tw, *fx[j]))
            return windows[fy[i], fx[j]]

        return [[Tile(y, x, th, tw, window(i, j)) for j, x in enumerate(xs)] for i, y in enumerate(ys)]

    def __len__(self) -> int:
        return len(axis_starts(self.height, self.tile, self.overlap)) * len(axis_starts(self.width, self.tile, self.overlap))


class StripeBlender:
    """Accumulates weighted tiles row by row and hands finished rows to ``emit``."""

    def __init__(self, width: int, channels: int, emit: Callable[[int, np.ndarray], None]) -> None:
        self.width, self.channels, self.emit = width, channels, emit
        self.top = 0  # first image row held in the accumulator
        self.acc = np.zeros((0, width, channels), dtype=np.float32)
        self.weight = np.zeros((0, width), dtype=np.float32)

    def add(self, tile: Tile, values: np.ndarray) -> None:
        """Add a restored tile (h, w, C) float32."""
        bottom = tile.y + tile.h
        if bottom - self.top > self.acc.shape[0]:
            extra = bottom - self.top - self.acc.shape[0]
            self.acc = np.concatenate([self.acc, np.zeros((extra, self.width, self.channels), np.float32)])
            self.weight = np.concatenate([self.weight, np.zeros((extra, self.width), np.float32)])
        rows = slice(tile.y - self.top, bottom - self.top)
        cols = slice(tile.x, tile.x + tile.w)
        self.acc[rows, cols] += values * tile.window[:, :, None]
        self.weight[rows, cols] += tile.window

    def flush(self, until: int) -> None:
        """Emit rows above ``until`` (no later tile touches them)."""
        n = until - self.top
        if n <= 0:
            return
        done = self.acc[:n] / np.maximum(self.weight[:n], 1e-8)[:, :, None]
        self.emit(self.top, done)
        self.acc, self.weight = self.acc[n:].copy(), self.weight[n:].copy()
        self.top = until
