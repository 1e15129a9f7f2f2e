"""Training data: image sources, Ray Data loading, patch sampling and augmentation.

A source is an fsspec prefix (``s3://bucket/clean``, a local folder) or
``skimage://name,name,...`` for photographs bundled with scikit-image. Training pairs
are either paired prefixes (degraded and clean with matching relative keys, as in
SIDD, LOL or RealSR) or clean images with a synthetic degradation applied per patch.
"""
from __future__ import annotations

import pickle
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import codecs
from .degrade import Degradation
from .engine import resize_bicubic
from .storage import Storage

SKIMAGE_SCHEME = "skimage://"
# Real photographs bundled with scikit-image (no download needed).
SKIMAGE_PHOTOS = ("astronaut", "brick", "camera", "chelsea", "clock", "coffee", "coins", "grass", "gravel",
                  "hubble_deep_field", "immunohistochemistry", "moon", "page", "retina", "rocket",
                  "stereo_motorcycle")


def skimage_photo(name: str) -> np.ndarray:
    """A bundled photograph as uint8 (H, W, 3); stereo_motorcycle:1 is the right view."""
    import skimage.data

    base, _, index = name.partition(":")
    if base not in SKIMAGE_PHOTOS:
        raise ValueError(f"unknown scikit-image photo {name!r}; known: {', '.join(SKIMAGE_PHOTOS)}")
    img = getattr(skimage.data, base)()
    if isinstance(img, tuple):
        img = img[int(index or 0)]
    img = np.asarray(img)
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    return np.ascontiguousarray(img[:, :, :3].astype(np.uint8))


def to_rgb_float(samples: np.ndarray) -> np.ndarray:
    """Integer samples (H, W, 1|3) to float32 RGB in [0, 1]."""
    peak = 65535.0 if samples.dtype == np.uint16 else 255.0
    img = samples.astype(np.float32) / peak
    return np.repeat(img, 3, axis=2) if img.shape[2] == 1 else img


def list_keys(source: str, options: dict[str, Any] | None = None) -> list[str]:
    if source.startswith(SKIMAGE_SCHEME):
        return [n.strip() for n in source[len(SKIMAGE_SCHEME):].split(",") if n.strip()]
    return Storage(source, options or {}).list()


def load_image(source: str, key: str, options: dict[str, Any] | None = None) -> np.ndarray:
    """Float32 RGB [0, 1] image ``key`` of ``source``."""
    if source.startswith(SKIMAGE_SCHEME):
        return to_rgb_float(skimage_photo(key))
    storage = Storage(source, options or {})
    image = codecs.decode(storage.read(key), storage.display(key))
    return to_rgb_float(image.pages[0].samples)


@dataclass
class Pair:
    key: str
    clean: np.ndarray  # float32 (H, W, 3)
    degraded: np.ndarray | None  # same shape, or None for synthetic degradation


def load_pair(clean_src: str, degraded_src: str | None, key: str, options: dict[str, Any] | None) -> Pair:
    clean = load_image(clean_src, key, options)
    degraded = None
    if degraded_src:
        degraded = load_image(degraded_src, key, options)
        if degraded.shape != clean.shape:  # low-resolution input of an SR pair
            degraded = resize_bicubic(degraded, clean.shape[0], clean.shape[1])
    return Pair(key, clean, degraded)


def training_keys(clean_src: str, options: dict[str, Any] | None = None) -> list[str]:
    """The training images' keys; an error if there are none."""
    keys = list_keys(clean_src, options)
    if not keys:
        raise ValueError(f"no training images found under {clean_src}")
    return keys


def build_dataset(clean_src: str, degraded_src: str | None, options: dict[str, Any] | None = None):
    """A Ray Dataset of pickled :class:`Pair` rows, read on Ray workers through fsspec."""
    import ray.data

    keys = training_keys(clean_src, options)

    def read(batch: dict[str, Any]) -> dict[str, Any]:
        column = np.empty(len(batch["key"]), dtype=object)
        column[:] = [pickle.dumps(load_pair(clean_src, degraded_src, str(k), options), protocol=5)
                     for k in batch["key"]]
        return {"pair": column}

    # Materialised up front, so reading never competes with the training workers for CPUs.
    return ray.data.from_items([{"key": k} for k in keys]).map_batches(read, batch_size=1, num_cpus=0.25).materialize()


def pairs_from_rows(rows: list[dict[str, Any]]) -> list[Pair]:
    return [pickle.loads(r["pair"]) for r in rows]


def augment(patch: np.ndarray, mode: int) -> np.ndarray:
    """One of the 8 dihedral transforms (flips and 90-degree rotations)."""
    out = np.rot90(patch, k=mode % 4, axes=(0, 1))
    return np.flip(out, axis=1) if mode >= 4 else out


class PatchSampler:
    """Random training patches: crop, degrade (if unpaired), 8-way augment, optional MixUp."""

    def __init__(self, pairs: list[Pair], patch: int, degradation: Degradation | None, mixup: bool = False,
                 mixup_alpha: float = 1.2) -> None:
        if not pairs:
            raise ValueError("no training pairs on this worker")
        if degradation is None and any(p.degraded is None for p in pairs):
            raise ValueError("unpaired training data needs a degradation")
        # Sorted: a worker draws the same patches however its shard's rows arrived.
        self.pairs, self.patch, self.degradation = sorted(pairs, key=lambda p: p.key), patch, degradation
        self.mixup, self.mixup_alpha = mixup, mixup_alpha

    def _crop(self, pair: Pair, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray | None]:
        h, w = pair.clean.shape[:2]
        p = self.patch
        if h < p or w < p:
            pad = ((0, max(p - h, 0)), (0, max(p - w, 0)), (0, 0))
            clean = np.pad(pair.clean, pad, mode="reflect")
            degraded = None if pair.degraded is None else np.pad(pair.degraded, pad, mode="reflect")
            pair, (h, w) = Pair(pair.key, clean, degraded), clean.shape[:2]
        y, x = int(rng.integers(0, h - p + 1)), int(rng.integers(0, w - p + 1))
        clean = pair.clean[y:y + p, x:x + p]
        degraded = None if pair.degraded is None else pair.degraded[y:y + p, x:x + p]
        return clean, degraded

    def batch(self, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """(degraded, clean) float32 arrays of shape (size, 3, patch, patch)."""
        inputs, targets = [], []
        for _ in range(size):
            clean, degraded = self._crop(self.pairs[int(rng.integers(len(self.pairs)))], rng)
            if degraded is None:
                degraded = self.degradation(np.ascontiguousarray(clean), rng)  # type: ignore[misc]
            mode = int(rng.integers(8))
            inputs.append(augment(degraded, mode))
            targets.append(augment(clean, mode))
        inp = np.stack(inputs).transpose(0, 3, 1, 2).astype(np.float32)
        tgt = np.stack(targets).transpose(0, 3, 1, 2).astype(np.float32)
        if self.mixup and size > 1:
            lam = rng.beta(self.mixup_alpha, self.mixup_alpha, size=(size, 1, 1, 1)).astype(np.float32)
            perm = rng.permutation(size)
            inp = lam * inp + (1 - lam) * inp[perm]
            tgt = lam * tgt + (1 - lam) * tgt[perm]
        return np.ascontiguousarray(inp), np.ascontiguousarray(tgt)


def validation_pairs(pairs: list[Pair], degradation: Degradation | None, seed: int) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """Fixed (key, degraded, clean) validation pairs; synthetic ones use a fixed seed per image."""
    out = []
    for i, pair in enumerate(pairs):
        degraded = pair.degraded
        if degraded is None:
            if degradation is None:
                raise ValueError("unpaired validation data needs a degradation")
            degraded = degradation(pair.clean, np.random.default_rng(seed + i))
        out.append((pair.key, degraded.astype(np.float32), pair.clean))
    return out
