"""Mapping stored values (reflectance, Hounsfield units, NIfTI intensities) to a model's [0, 1] and back.

The rule shared by GeoTIFF, DICOM and NIfTI: a value v maps to (v - lo) / (hi - lo), clipped to
[0, 1] for the model; the output is v + (model output - model input) * (hi - lo). Values beyond
lo..hi therefore keep their offset from the range (they are never clipped to it), and a model
that returns its input leaves every value unchanged. Only the stored dtype's limits clip.
"""
from __future__ import annotations

import numpy as np

PERCENTILES = (1.0, 99.0)  # the default lo, hi where the data gives no range of its own


def percentile_range(values: np.ndarray) -> tuple[float, float]:
    """(lo, hi): the 1st and 99th percentiles of ``values`` (hi > lo; (0, 1) when empty)."""
    if values.size == 0:
        return 0.0, 1.0
    lo, hi = (float(v) for v in np.percentile(values, PERCENTILES))
    return lo, (hi if hi > lo else lo + 1.0)


def to_unit(values: np.ndarray, lo: float | np.ndarray, hi: float | np.ndarray) -> np.ndarray:
    """float32 values scaled to the model's [0, 1] and clipped there."""
    scaled = (np.asarray(values, np.float32) - lo) / (np.asarray(hi, np.float32) - lo)
    return np.clip(scaled, 0.0, 1.0, out=scaled)


def from_unit(values: np.ndarray, model_in: np.ndarray, model_out: np.ndarray, lo: float | np.ndarray,
              hi: float | np.ndarray) -> np.ndarray:
    """Restored values: ``values`` plus the model's change (out - in, in [0, 1] units) times (hi - lo)."""
    change = np.clip(model_out, 0.0, 1.0) - model_in
    return np.asarray(values, np.float32) + change * (np.asarray(hi, np.float32) - lo)


def to_stored(values: np.ndarray, dtype: np.dtype | str, limits: tuple[float, float] | None = None) -> np.ndarray:
    """Float values to ``dtype``: rounded and clipped to ``limits`` (default: the dtype's) for integers."""
    kind = np.dtype(dtype)
    if kind.kind not in "ui":
        return values.astype(kind)
    low, high = limits or (np.iinfo(kind).min, np.iinfo(kind).max)
    return np.clip(np.rint(values), low, high).astype(kind)
