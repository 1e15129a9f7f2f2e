"""Procedural training images: dead leaves with natural-image statistics.

``synthetic://dead_leaves?alpha=3&rmin=1&...`` names a generator, not a set of files:
the training sampler draws a new image for every patch. The model follows Achddou,
Gousseau and Ladjal ("Synthetic images as a regularity prior for image restoration neural
networks", SSVM 2021) and their VibrantLeaves generator (2025): opaque shapes dropped
one over another, their sizes following a power law (radius density proportional to
``r**-alpha`` between ``rmin`` and ``rmax``; alpha = 3 makes the picture scale-invariant,
with a power spectrum close to the 1/f^2 of photographs), colours drawn from the colour
distribution of photographs, textured fills (1/f noise or sinusoids between two colours),
and a simple acquisition model: out-of-focus background layers (depth of field), a lens
blur, rendering at ``downsample`` times the size and averaging down (anti-aliased edges).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, fields
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import numpy as np

SCHEME = "synthetic://"
SHAPES = ("disc", "rect")
COLOURS = ("photos", "uniform")
# Colour photographs of the training set whose pixels give the fill colours (no held-out photo).
COLOUR_PHOTOS = ("astronaut", "rocket", "stereo_motorcycle:0")
COVERAGE = 6.0  # expected layers of shapes over a pixel: exp(-6) = 0.25 % of it shows the background
MAX_SHAPES = 40000
STENCIL_MAX = 16  # shapes up to this extent (render pixels) are rasterised together; larger ones one by one


@dataclass(frozen=True)
class Shapes:
    """Shapes in depth order (index 0 is the backmost), in render-pixel coordinates."""

    cy: np.ndarray
    cx: np.ndarray
    radius: np.ndarray  # size parameter drawn from the power law (a disc's radius)
    half_u: np.ndarray  # half-axes along and across the orientation (both = radius for a disc)
    half_v: np.ndarray
    angle: np.ndarray
    rect: np.ndarray  # bool: rectangle, else disc (ellipse when the half-axes differ)

    @property
    def extent(self) -> np.ndarray:
        """Radius of a circle around the centre that contains the shape."""
        return np.where(self.rect, np.hypot(self.half_u, self.half_v), np.maximum(self.half_u, self.half_v))

    def inside(self, ids: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
        """Whether pixel centres (y + 0.5, x + 0.5) lie in shapes ``ids`` (arrays broadcast together)."""
        dy, dx = y + 0.5 - self.cy[ids], x + 0.5 - self.cx[ids]
        if not self.rect[ids].any() and np.array_equal(self.half_u[ids], self.half_v[ids]):  # discs only
            return dy * dy + dx * dx <= self.radius[ids] ** 2
        cos, sin = np.cos(self.angle[ids]), np.sin(self.angle[ids])
        u, v = (dx * cos + dy * sin) / self.half_u[ids], (dy * cos - dx * sin) / self.half_v[ids]
        u, v = u * u, v * v
        return np.where(self.rect[ids], np.maximum(u, v), u + v) <= 1.0


def power_law(rng: np.random.Generator, n: int, alpha: float, lo: float, hi: float) -> np.ndarray:
    """``n`` samples of density proportional to ``r**-alpha`` on [lo, hi] (inverse CDF)."""
    u = rng.random(n)
    if abs(alpha - 1.0) < 1e-9:
        return lo * (hi / lo) ** u
    e = 1.0 - alpha
    return (lo ** e + u * (hi ** e - lo ** e)) ** (1.0 / e)


def mean_area(alpha: float, lo: float, hi: float) -> float:
    """E[pi r^2] under the truncated power law (by quadrature, good for every alpha)."""
    r = np.geomspace(lo, hi, 2048)
    density = r ** -alpha
    return float(np.pi * np.trapezoid(density * r * r, r) / np.trapezoid(density, r))


@functools.lru_cache(maxsize=1)
def photo_colours() -> np.ndarray:
    """(N, 3) float32 RGB samples of the colour training photographs (every 3rd pixel)."""
    from .data import skimage_photo

    pixels = [skimage_photo(name)[::3, ::3].reshape(-1, 3) for name in COLOUR_PHOTOS]
    return (np.concatenate(pixels).astype(np.float32) + 0.5) / 256.0


def pink_noise(rng: np.random.Generator, count: int, n: int) -> np.ndarray:
    """``count`` (n, n) fields with a 1/f^2 power spectrum, scaled to [-1, 1]."""
    fy = np.fft.fftfreq(n)[:, None]
    fx = np.fft.rfftfreq(n)[None, :]
    amplitude = 1.0 / np.maximum(np.hypot(fy, fx), 1.0 / n)
    spectrum = (rng.standard_normal((count, n, n // 2 + 1)) + 1j * rng.standard_normal((count, n, n // 2 + 1)))
    fields_ = np.fft.irfft2(spectrum * amplitude, s=(n, n)).astype(np.float32)
    fields_ -= fields_.mean(axis=(1, 2), keepdims=True)
    return fields_ / np.abs(fields_).max(axis=(1, 2), keepdims=True)


def _box_down(img: np.ndarray, factor: int) -> np.ndarray:
    if factor == 1:
        return img
    h, w = img.shape[0] // factor, img.shape[1] // factor
    return img[:h * factor, :w * factor].reshape(h, factor, w, factor, -1).mean(axis=(1, 3))


def _gaussian(img: np.ndarray, sigma: float) -> np.ndarray:
    from skimage.filters import gaussian

    return gaussian(img, sigma=sigma, channel_axis=2, mode="reflect", preserve_range=True).astype(np.float32)


@dataclass(frozen=True)
class DeadLeaves:
    """Dead-leaves generator; every field is a query parameter of ``synthetic://dead_leaves``.

    size: image side in pixels (0: the training patch size). alpha, rmin, rmax: the radius
    power law, in output pixels. shapes: ``disc`` and/or ``rect`` (comma-separated; rectangles
    and ellipses get a random aspect ratio up to ``aspect`` and orientation). colors: ``photos``
    (pixels of the colour training photos) or ``uniform`` (RGB cube). texture: fill texture
    strength in [0, 1] (0: flat shapes, the classic model). dof: probability that the shapes
    behind a random depth are out of focus, with blur up to ``dof_sigma`` pixels. blur: the
    largest lens blur (Gaussian sigma, output pixels; drawn per image). downsample: render at
    this many times the size and average down. grey: probability of a grey image.
    """

    size: int = 0
    alpha: float = 3.0
    rmin: float = 1.0
    rmax: float = 256.0
    shapes: tuple[str, ...] = ("disc",)
    aspect: float = 1.0
    colors: str = "photos"
    texture: float = 0.5
    dof: float = 0.3
    dof_sigma: float = 3.0
    blur: float = 0.6
    downsample: int = 2
    grey: float = 0.0

    def __post_init__(self) -> None:
        problems = [f"{f.name} {getattr(self, f.name)} must be a finite number" for f in fields(self)
                    if isinstance(getattr(self, f.name), float) and not math.isfinite(getattr(self, f.name))]
        if problems:  # NaN and inf pass every comparison below unnoticed
            raise ValueError("synthetic://dead_leaves: " + "; ".join(problems))
        if self.size < 0:
            problems.append(f"size {self.size} is negative")
        if self.alpha <= 0:
            problems.append(f"alpha {self.alpha} must be positive")
        if not 0 < self.rmin < self.rmax:
            problems.append(f"need 0 < rmin < rmax (got rmin {self.rmin}, rmax {self.rmax})")
        if not self.shapes or set(self.shapes) - set(SHAPES):
            problems.append(f"shapes {','.join(self.shapes)!r}: choose from {', '.join(SHAPES)}")
        if self.aspect < 1:
            problems.append(f"aspect {self.aspect} must be at least 1")
        if self.colors not in COLOURS:
            problems.append(f"colors {self.colors!r}: choose one of {', '.join(COLOURS)}")
        for name in ("texture", "dof", "grey"):
            if not 0 <= getattr(self, name) <= 1:
                problems.append(f"{name} {getattr(self, name)} must be in [0, 1]")
        if self.dof_sigma < 0 or self.blur < 0:
            problems.append("dof_sigma and blur must not be negative")
        if not 1 <= self.downsample <= 8:
            problems.append(f"downsample {self.downsample} must be an integer from 1 to 8")
        if problems:
            raise ValueError("synthetic://dead_leaves: " + "; ".join(problems))

    def draw_shapes(self, n: int, rng: np.random.Generator) -> Shapes:
        """The shapes of one (n x n render-pixel) image, back to front."""
        f = self.downsample
        lo, hi = self.rmin * f, self.rmax * f
        count = int(min(MAX_SHAPES, np.ceil(COVERAGE * n * n / mean_area(self.alpha, lo, hi))))
        radius = power_law(rng, count, self.alpha, lo, hi)
        stretch = np.exp(rng.uniform(-0.5, 0.5, count) * np.log(self.aspect))
        rect = (np.array(self.shapes)[rng.integers(len(self.shapes), size=count)] == "rect" if len(self.shapes) > 1
                else np.full(count, self.shapes[0] == "rect"))
        return Shapes(cy=rng.uniform(0, n, count), cx=rng.uniform(0, n, count), radius=radius,
                      half_u=radius * stretch, half_v=radius / stretch, angle=rng.uniform(0, np.pi, count), rect=rect)

    def image(self, size: int, rng: np.random.Generator) -> np.ndarray:
        """A float32 (size, size, 3) image in [0, 1]; the same ``rng`` state gives the same image."""
        f = self.downsample
        n = size * f
        shapes = self.draw_shapes(n, rng)
        count = len(shapes.radius)
        dof = rng.random() < self.dof
        split = int(rng.integers(count // 4, count)) if dof else 0  # shapes in front of it stay sharp
        front, behind = rasterise(shapes, n, split)
        fill = Fills(self, count, n, rng)
        img = fill.render(front)
        if dof:
            background = _gaussian(fill.render(behind), float(rng.uniform(0.5, 1.0)) * self.dof_sigma * f)
            img = np.where((front >= split)[..., None], img, background)
        sigma = float(rng.uniform(0, self.blur)) * f
        if sigma > 0.05:
            img = _gaussian(img, sigma)
        img = _box_down(img, f)
        if rng.random() < self.grey:
            img = np.repeat(img @ np.array([0.299, 0.587, 0.114], np.float32), 3).reshape(img.shape)
        return np.clip(img, 0, 1).astype(np.float32)


class Fills:
    """Colours and textures of one image's shapes; label maps to RGB."""

    def __init__(self, params: DeadLeaves, count: int, n: int, rng: np.random.Generator) -> None:
        total = count + 1  # label -1 (not covered) is the background, the last row
        if params.colors == "photos":
            table = photo_colours()
            pick = lambda: table[rng.integers(len(table), size=total)]  # noqa: E731
        else:
            pick = lambda: rng.random((total, 3), dtype=np.float32)  # noqa: E731
        self.base, self.other = pick(), pick()
        self.strength = (rng.random(total) * params.texture).astype(np.float32)
        self.noise = pink_noise(rng, 2, n)
        self.which = rng.integers(3, size=total)  # 0, 1: a noise field; 2: a sinusoid
        period = np.exp(rng.uniform(np.log(4.0), np.log(n), total))
        theta = rng.uniform(0, 2 * np.pi, total)
        self.freq_y, self.freq_x = 2 * np.pi * np.sin(theta) / period, 2 * np.pi * np.cos(theta) / period
        self.phase = rng.uniform(0, 2 * np.pi, total)

    def render(self, labels: np.ndarray) -> np.ndarray:
        n = labels.shape[0]
        yy, xx = np.mgrid[0:n, 0:n]
        which = self.which[labels]
        wave = np.sin(self.freq_y[labels] * yy + self.freq_x[labels] * xx + self.phase[labels]).astype(np.float32)
        texture = np.where(which == 2, wave, self.noise[np.minimum(which, 1), yy, xx])
        mix = ((0.5 + 0.5 * texture) * self.strength[labels])[..., None]  # between the two colours
        base = self.base[labels]
        return base + (self.other[labels] - base) * mix


def rasterise(shapes: Shapes, n: int, split: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(n, n) int label maps: the frontmost shape at each pixel (-1: none), of all shapes and of
    those behind ``split`` (index < split)."""
    front = np.full(n * n, -1, np.int64)
    behind = np.full(n * n, -1, np.int64)
    extent = shapes.extent
    small = extent <= STENCIL_MAX
    lower = 0.0
    for upper in (2.0, 4.0, 8.0, float(STENCIL_MAX)):  # stencils sized to each band of shapes
        ids = np.flatnonzero(small & (extent > lower) & (extent <= upper))
        lower = upper
        if not len(ids):
            continue
        reach = int(np.ceil(upper)) + 1
        offsets = np.arange(-reach, reach + 1)
        y = np.floor(shapes.cy[ids]).astype(np.int64)[:, None, None] + offsets[None, :, None]
        x = np.floor(shapes.cx[ids]).astype(np.int64)[:, None, None] + offsets[None, None, :]
        hit = shapes.inside(ids[:, None, None], y, x) & (y >= 0) & (y < n) & (x >= 0) & (x < n)
        which, flat = np.broadcast_to(ids[:, None, None], hit.shape)[hit], (y * n + x)[hit]
        np.maximum.at(front, flat, which)
        if split:
            keep = which < split
            np.maximum.at(behind, flat[keep], which[keep])
    front, behind = front.reshape(n, n), behind.reshape(n, n)
    for i in np.flatnonzero(~small):
        r = int(np.ceil(extent[i])) + 1
        y0, y1 = max(int(shapes.cy[i]) - r, 0), min(int(shapes.cy[i]) + r + 1, n)
        x0, x1 = max(int(shapes.cx[i]) - r, 0), min(int(shapes.cx[i]) + r + 1, n)
        if y0 >= y1 or x0 >= x1:
            continue
        mask = shapes.inside(i, *np.ogrid[y0:y1, x0:x1])  # ids ascend: the later shape is in front
        front[y0:y1, x0:x1][mask] = i
        if i < split:
            behind[y0:y1, x0:x1][mask] = i
    return front, behind


GENERATORS = {"dead_leaves": DeadLeaves}


def is_synthetic(source: str) -> bool:
    """Whether ``source`` names a generator (``synthetic://...``) rather than images."""
    return source.startswith(SCHEME)


def _value(field_type: Any, name: str, text: str) -> Any:
    kind = str(field_type)
    try:
        if "tuple" in kind:
            return tuple(s.strip() for s in text.split(",") if s.strip())
        if kind == "int":
            return int(text)
        if kind == "float":
            return float(text)
        return text
    except ValueError:
        raise ValueError(f"synthetic source: parameter {name}={text!r} is not a valid {kind}") from None


def parse(source: str) -> DeadLeaves:
    """The generator named by a ``synthetic://NAME?key=value&...`` URL; unknown names and
    parameters are refused."""
    parts = urlsplit(source)
    generator = GENERATORS.get(parts.netloc + parts.path.rstrip("/"))
    if not is_synthetic(source) or generator is None:
        raise ValueError(f"unknown synthetic source {source!r}; known: "
                         + ", ".join(f"{SCHEME}{name}" for name in GENERATORS))
    known = {f.name: f.type for f in fields(generator)}
    pairs = parse_qsl(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query))
    unknown = sorted({k for k, _ in pairs} - set(known))
    if unknown:
        raise ValueError(f"{source}: unknown parameter(s) {', '.join(unknown)}; known: {', '.join(known)}")
    return generator(**{k: _value(known[k], k, v) for k, v in pairs})
