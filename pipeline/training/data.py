"""Training data: image sources, scikit-image photos, Ray Data loading, patch sampling and
augmentation.

A source is an fsspec prefix (``s3://bucket/clean``, a local folder),
``skimage://name,name,...`` for photographs bundled with scikit-image, or a procedural
generator (``synthetic://dead_leaves?...``, see :mod:`pipeline.training.synthetic`) whose images are
drawn anew for every patch. ``data.train.clean`` is one source or a list of sources, each a
URL or ``{source: URL, weight: W}``: the weights are the shares of patches drawn from each.
Training pairs are either paired prefixes (degraded and clean with matching relative keys,
as in SIDD, LOL or RealSR) or clean images with a synthetic degradation applied per patch.
Sources and images that cannot be used as the config names them raise ``ConfigError``.
"""
from __future__ import annotations

import pickle
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from .. import codecs
from ..imaging import ExposureCurve, as_8bit, resize_bicubic, to_rgb_float
from ..storage import Storage
from . import synthetic
from .config import ConfigError, SourceSpec
from .degrade import Degradation

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
        raise ConfigError(f"unknown scikit-image photo {name!r}; known: {', '.join(SKIMAGE_PHOTOS)}")
    img = getattr(skimage.data, base)()
    if isinstance(img, tuple):
        img = img[int(index or 0)]
    img = np.asarray(img)
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    return np.ascontiguousarray(img[:, :, :3].astype(np.uint8))


@dataclass(frozen=True)
class Source:
    """One training source and its share of the patches."""

    url: str
    weight: float = 1.0

    @property
    def generator(self) -> synthetic.DeadLeaves | None:
        return synthetic.parse(self.url) if synthetic.is_synthetic(self.url) else None


def parse_sources(spec: SourceSpec, paired: bool = False) -> list[Source]:
    """The sources of ``data.train.clean``; bad entries and generator parameters are refused."""
    entries = spec if isinstance(spec, list) else [spec]
    sources = []
    for entry in entries:
        if isinstance(entry, dict):
            extra = sorted(set(entry) - {"source", "weight"})
            if extra or "source" not in entry:
                raise ConfigError(f"data.train.clean entry {entry!r}: needs 'source' (and optional 'weight'), "
                                 f"not {', '.join(extra) or 'nothing'}")
            try:
                source = Source(str(entry["source"]), float(entry.get("weight", 1.0)))
            except (TypeError, ValueError):
                raise ConfigError(f"data.train.clean {entry['source']}: weight must be a number, "
                                  f"not {entry.get('weight')!r}") from None
        elif isinstance(entry, str) and entry:
            source = Source(entry)
        else:
            raise ConfigError(f"data.train.clean entry {entry!r} is not a source URL")
        if not source.weight > 0:
            raise ConfigError(f"data.train.clean {source.url}: weight must be positive, not {source.weight}")
        try:
            _ = source.generator  # a bad generator URL or parameter fails here
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        sources.append(source)
    if not sources:
        raise ConfigError("data.train.clean names no source")
    if paired and (len(sources) > 1 or sources[0].generator is not None):
        raise ConfigError("paired training data (data.train.degraded) needs one clean photo source")
    return sources


def has_photos(spec: SourceSpec) -> bool:
    """Whether any source of ``spec`` is a set of images (not a generator)."""
    return any(s.generator is None for s in parse_sources(spec))


def map_urls(spec: SourceSpec | None, fn: Callable[[str], str]) -> SourceSpec | None:
    """``spec`` with ``fn`` applied to each source URL (e.g. to make local paths absolute)."""
    if not isinstance(spec, list):
        return fn(spec) if spec else spec
    return [dict(e, source=fn(e["source"])) if isinstance(e, dict) else fn(e) for e in spec]


def _no_keys(source: str) -> None:
    if synthetic.is_synthetic(source):
        raise ConfigError(f"{source} is drawn per training patch: it has no fixed images (use photos for validation)")


def list_keys(source: str, options: dict[str, Any] | None = None) -> list[str]:
    _no_keys(source)
    if source.startswith(SKIMAGE_SCHEME):
        return [n.strip() for n in source[len(SKIMAGE_SCHEME):].split(",") if n.strip()]
    return Storage(source, options or {}).list()


def load_image(source: str, key: str, options: dict[str, Any] | None = None) -> np.ndarray:
    """Float32 RGB [0, 1] image ``key`` of ``source``."""
    _no_keys(source)
    if source.startswith(SKIMAGE_SCHEME):
        return to_rgb_float(skimage_photo(key))
    storage = Storage(source, options or {})
    return codecs.decode_rgb_float(storage.read(key), storage.display(key))


@dataclass
class Pair:
    key: str
    clean: np.ndarray  # float32 (H, W, 3)
    degraded: np.ndarray | None  # same shape, or None for synthetic degradation
    source: int = 0  # index of its source in data.train.clean


def load_pair(clean_src: str, degraded_src: str | None, key: str, options: dict[str, Any] | None,
              source: int = 0) -> Pair:
    clean = load_image(clean_src, key, options)
    degraded = None
    if degraded_src:
        degraded = load_image(degraded_src, key, options)
        if degraded.shape != clean.shape:  # low-resolution input of an SR pair
            degraded = resize_bicubic(degraded, clean.shape[0], clean.shape[1])
    return Pair(key, clean, degraded, source)


def training_keys(clean: SourceSpec, options: dict[str, Any] | None = None) -> list[tuple[int, str]]:
    """(source index, key) of every training image of the photo sources; an error if one has none."""
    keys = []
    for index, source in enumerate(parse_sources(clean)):
        if source.generator is None:
            found = list_keys(source.url, options)
            if not found:
                raise ConfigError(f"no training images found under {source.url}")
            keys += [(index, k) for k in found]
    return keys


def load_training_pairs(clean: SourceSpec, degraded_src: str | None, options: dict[str, Any] | None = None
                        ) -> list[Pair]:
    """Every training image of the photo sources, read in this process."""
    urls = [s.url for s in parse_sources(clean)]
    return [load_pair(urls[i], degraded_src, k, options, i) for i, k in training_keys(clean, options)]


def build_dataset(clean: SourceSpec, degraded_src: str | None, options: dict[str, Any] | None = None):
    """A Ray Dataset of pickled :class:`Pair` rows, read on Ray workers through fsspec; None when every
    source is synthetic (nothing to read)."""
    import ray.data

    keys = training_keys(clean, options)
    if not keys:
        return None
    urls = [s.url for s in parse_sources(clean)]

    def read(batch: dict[str, Any]) -> dict[str, Any]:
        column = np.empty(len(batch["key"]), dtype=object)
        column[:] = [pickle.dumps(load_pair(urls[int(i)], degraded_src, str(k), options, int(i)), protocol=5)
                     for i, k in zip(batch["source"], batch["key"])]
        return {"pair": column}

    # Materialised up front, so reading never competes with the training workers for CPUs.
    rows = [{"source": i, "key": k} for i, k in keys]
    return ray.data.from_items(rows).map_batches(read, batch_size=1, num_cpus=0.25).materialize()


def pairs_from_rows(rows: list[dict[str, Any]]) -> list[Pair]:
    return [pickle.loads(r["pair"]) for r in rows]


def augment(patch: np.ndarray, mode: int) -> np.ndarray:
    """One of the 8 dihedral transforms (flips and 90-degree rotations)."""
    out = np.rot90(patch, k=mode % 4, axes=(0, 1))
    return np.flip(out, axis=1) if mode >= 4 else out


class PatchSampler:
    """Random training patches: pick a source by weight, crop a photo or generate a synthetic
    image, degrade (if unpaired), 8-way augment, optional MixUp.

    ``sources`` (default: one photo source) are those of ``data.train.clean``; ``pairs`` this
    worker's images of its photo sources. All randomness comes from the ``rng`` of
    :meth:`batch`, so a batch is a function of that generator's seed alone.
    """

    EXPOSURE_CONTEXT = 256  # with normalise_exposure: the side of the region the curve is measured on

    def __init__(self, pairs: list[Pair], patch: int, degradation: Degradation | None, mixup: bool = False,
                 mixup_alpha: float = 1.2, sources: list[Source] | None = None,
                 normalise_exposure: bool = False) -> None:
        sources = sources or [Source("photos")]
        self.generators = {i: s.generator for i, s in enumerate(sources) if s.generator is not None}
        if degradation is None and (self.generators or any(p.degraded is None for p in pairs)):
            raise ConfigError("unpaired training data needs a degradation")
        # Sorted: a worker draws the same patches however its shard's rows arrived.
        self.pairs = sorted(pairs, key=lambda p: (p.source, p.key))
        self.by_source = {i: [p for p in self.pairs if p.source == i] for i in range(len(sources))}
        # A photo source with no image in this worker's shard gives its share to the others.
        self.choices = [i for i in range(len(sources)) if i in self.generators or self.by_source[i]]
        if not self.choices:
            raise ConfigError("no training pairs on this worker")
        weights = np.array([sources[i].weight for i in self.choices])
        self.cumulative = np.cumsum(weights / weights.sum())
        self.patch, self.degradation = patch, degradation
        self.mixup, self.mixup_alpha = mixup, mixup_alpha
        self.normalise_exposure = normalise_exposure

    def _draw(self, rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray | None]:
        """One (clean, degraded or None) ``size``-square crop from a source chosen by weight."""
        source = self.choices[0]
        if len(self.choices) > 1:  # one source draws exactly as before sources could be mixed
            source = self.choices[min(int(np.searchsorted(self.cumulative, rng.random(), side="right")),
                                      len(self.choices) - 1)]
        generator = self.generators.get(source)
        if generator is None:
            pool = self.by_source[source]
            return self._crop(pool[int(rng.integers(len(pool)))], rng, size)
        image = generator.image(generator.size or size, np.random.default_rng(int(rng.integers(2 ** 63))))
        return self._crop(Pair("synthetic", image, None), rng, size) if image.shape[0] != size else (image, None)

    @staticmethod
    def _crop(pair: Pair, rng: np.random.Generator, p: int) -> tuple[np.ndarray, np.ndarray | None]:
        h, w = pair.clean.shape[:2]
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
            if self.normalise_exposure:
                clean, degraded = self._exposure_normalised(rng)
            else:
                clean, degraded = self._draw(rng, self.patch)
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

    def _exposure_normalised(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """A (target, input) patch for a model behind the exposure curve.

        The curve is measured, as the engine does on a whole image, on the larger region
        around the patch, degraded and stored as 8 bits. With a synthetic degradation the
        target is the noise-free darkened region through the same curve: the curve sets the
        tone, which a patch cannot tell, and the network learns the noise, the 8-bit steps
        and the colour the curve leaves. Paired data keeps its clean target.
        """
        clean, degraded = self._draw(rng, self.EXPOSURE_CONTEXT)
        if degraded is None:
            toned, degraded = self.degradation.toned_pair(np.ascontiguousarray(clean), rng)  # type: ignore[union-attr]
            degraded = as_8bit(degraded)
            curve = ExposureCurve.measure(degraded)
            clean = curve(toned)
        else:
            curve = ExposureCurve.measure(degraded)
        crop = self._crop(Pair("context", clean, curve(degraded)), rng, self.patch)
        return crop[0], crop[1]  # type: ignore[return-value]


def validation_pairs(pairs: list[Pair], degradation: Degradation | None, seed: int) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """Fixed (key, degraded, clean) validation pairs; synthetic ones use a fixed seed per image."""
    out = []
    for i, pair in enumerate(pairs):
        degraded = pair.degraded
        if degraded is None:
            if degradation is None:
                raise ConfigError("unpaired validation data needs a degradation")
            degraded = degradation(pair.clean, np.random.default_rng(seed + i))
        out.append((pair.key, degraded.astype(np.float32), pair.clean))
    return out
