"""From attenuation line integrals to a radiograph's grey levels: physics, detector and processing.

Steps (each parameter in :class:`RenderParams`, varied per study by the builder):
    1. Beer-Lambert primary signal ``I0 * exp(-L)`` (``i0`` photons per pixel sets exposure and noise).
    2. Scatter: a fraction of the primary, spread by a wide Gaussian (no anti-scatter grid is perfect).
    3. Quantum noise: Poisson, drawn through its Gaussian approximation (counts are large).
    4. Detector blur: Gaussian point spread.
    5. Log transform back to "attenuation" units, as every digital radiography system does.
    6. Clinical image processing: large-scale dynamic-range compression (so the mediastinum and the
       lungs are both readable), unsharp masking for edge detail (ribs, vessels), and a sigmoid tone
       curve (the film-like characteristic curve) with a varied centre and slope.
The output is float32 in [0, 1], higher = more attenuation (bone white, lung dark), i.e. the
MONOCHROME2 display convention.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage


@dataclass(frozen=True)
class RenderParams:
    """Exposure, detector and processing settings of one radiograph (see module docstring)."""

    i0: float = 1.0e4
    scatter: float = 0.2
    scatter_sigma_mm: float = 40.0
    blur_px: float = 0.6
    equalise: float = 0.55
    equalise_sigma_mm: float = 30.0
    edge: float = 0.8
    edge_sigma_mm: float = 1.5
    tone_centre: float = 0.5
    tone_slope: float = 5.0
    gamma: float = 1.0


def render(L: np.ndarray, pixel_mm: float, p: RenderParams, rng: np.random.Generator) -> np.ndarray:
    """Turn line integrals ``L`` (rows, cols) into display values in [0, 1] (see module docstring).

    Args:
        L: Attenuation line integrals (dimensionless), float32 (rows, cols).
        pixel_mm: Detector pixel size, mm (sets the kernel sizes).
        p: Render parameters.
        rng: Random generator for the noise (deterministic for a seed).
    """
    L = L.astype(np.float64)
    primary = p.i0 * np.exp(-L)
    sig = primary + p.scatter * ndimage.gaussian_filter(primary, p.scatter_sigma_mm / pixel_mm,
                                                         mode="nearest")
    sig = sig + np.sqrt(np.maximum(sig, 1.0)) * rng.standard_normal(sig.shape)
    if p.blur_px > 0:
        sig = ndimage.gaussian_filter(sig, p.blur_px, mode="nearest")
    P = -np.log(np.maximum(sig, 0.5) / (p.i0 * (1.0 + p.scatter)))

    body = L > 0.3
    lo = np.percentile(P, 0.5)
    hi = np.percentile(P[body], 99.7) if body.sum() > 100 else P.max()
    x = (P - lo) / max(hi - lo, 1e-6)
    smooth = ndimage.gaussian_filter(x, p.equalise_sigma_mm / pixel_mm, mode="nearest")
    x = x - p.equalise * (smooth - smooth[body].mean() if body.any() else smooth.mean())
    x = x + p.edge * (x - ndimage.gaussian_filter(x, p.edge_sigma_mm / pixel_mm, mode="nearest"))
    # rescale to the body's range before the tone curve
    if body.any():
        b_lo, b_hi = np.percentile(x[body], [1.0, 99.5])
    else:
        b_lo, b_hi = np.percentile(x, [1.0, 99.5])
    x = (x - b_lo) / max(b_hi - b_lo, 1e-6)
    y = 1.0 / (1.0 + np.exp(-p.tone_slope * (x - p.tone_centre)))
    y0 = 1.0 / (1.0 + np.exp(p.tone_slope * p.tone_centre))
    y1 = 1.0 / (1.0 + np.exp(-p.tone_slope * (1.0 - p.tone_centre)))
    y = np.clip((y - y0) / (y1 - y0), 0.0, 1.0)
    if p.gamma != 1.0:
        y = y ** p.gamma
    return y.astype(np.float32)
