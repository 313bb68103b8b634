"""Point defects on a crystal lattice: remove the periodic lattice, then find the defects as
residuals of both polarities at the defect's scale.

1. **Lattice removal** (:func:`remove_lattice`): FFT Bragg-peak filtering. The power spectrum of
   the (Hann-windowed) frame is divided by its radial median (the smooth background of a
   non-periodic image); local maxima standing ``snr`` times above it, at periods between
   ``min_period_px`` and a third of the frame, off the kx = 0 axis (scan-line noise), are the Bragg peaks of the lattice (and its
   harmonics). They are notched out with Gaussian holes (``notch_px`` wide in frequency) in the
   spectrum of the unwindowed frame; the inverse FFT is the lattice-free residual. The lattice
   period is that of the strongest peak. Where no peak stands out (lattice not resolved) the frame
   is returned unchanged (``LatticeInfo.found`` false). Standard in STM/TEM image processing
   (e.g. Gwyddion's "FFT filtering", Necas & Klapetek 2012).
2. **Defects** (:func:`find_defects`): difference of Gaussians of the residual at the defect's
   scale (sigma = ``scale_px / 2`` minus sigma x 3: a band-pass around one defect's size), in
   units of its robust standard deviation (1.4826 MAD); protrusions above ``+threshold`` and
   depressions below ``-threshold`` are connected components (OpenCV); each becomes an
   :class:`agent.segment.Region` (contrast +1 / -1), so physical size (nm) and apparent height
   are measured as for any object (:func:`agent.descriptors.describe_regions`).
   The defect's scale is the size of the labelled examples (few-shot,
   :mod:`agent.fewshot`), or, without examples, the lattice period (a point defect spans about
   one unit cell).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np

from stm_agent.agent.segment import Region

__all__ = ["LatticeInfo", "remove_lattice", "find_defects"]


@dataclass
class LatticeInfo:
    """What :func:`remove_lattice` found.

    Attributes
    ----------
    found : bool
        At least one Bragg peak pair stood out.
    peaks : list[tuple[float, float]]
        ``(kx, ky)`` of each notched peak, cycles per pixel (both members of each +- pair).
    period_px : float
        Period of the strongest peak, pixels (NaN when none).
    snr : list[float]
        Peak power over the radial-median background, per peak.
    """

    found: bool
    peaks: list[tuple[float, float]] = field(default_factory=list)
    period_px: float = float("nan")
    snr: list[float] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"found": self.found, "n_peaks": len(self.peaks), "period_px": self.period_px,
                "peaks": [[round(a, 5), round(b, 5)] for a, b in self.peaks], "snr": [round(s, 1) for s in self.snr]}


def _filled(image: np.ndarray) -> np.ndarray:
    img = np.asarray(image, np.float64)
    fin = np.isfinite(img)
    med = float(np.median(img[fin])) if fin.any() else 0.0
    return np.where(fin, img, med) - med


def remove_lattice(image: np.ndarray, *, snr: float = 10.0, min_period_px: float = 3.0, max_peaks: int = 60,
                   notch_px: float = 2.5) -> tuple[np.ndarray, LatticeInfo]:
    """Remove the periodic lattice of a flattened frame by notching its Bragg peaks.

    Parameters
    ----------
    image : np.ndarray
        float ``(ny, nx)`` flattened frame; NaN = not acquired (filled with the median first, and
        NaN again in the result).
    snr : float
        A peak must stand this many times above the radial median of the power spectrum.
    min_period_px : float
        Shortest period considered, pixels (above the Nyquist limit of 2 px: noise).
    max_peaks : int
        At most this many peaks (strongest first; symmetric +- pairs count twice).
    notch_px : float
        Gaussian sigma of each notch, frequency pixels.

    Returns
    -------
    (residual, info) : float64 ``(ny, nx)`` lattice-free frame (the frame itself when no peak was
        found), :class:`LatticeInfo`.

    Raises
    ------
    ValueError
        ``image`` is not 2-D or smaller than 8 x 8.
    """
    img = np.asarray(image)
    if img.ndim != 2 or min(img.shape) < 8:
        raise ValueError(f"remove_lattice needs a 2-D frame of at least 8 x 8 pixels, got {img.shape}")
    nan = ~np.isfinite(img)
    f = _filled(img)
    ny, nx = f.shape
    win = np.outer(np.hanning(ny), np.hanning(nx))
    power = np.abs(np.fft.fftshift(np.fft.fft2(f * win))) ** 2
    ky = (np.arange(ny) - ny // 2)[:, None] / ny
    kx = (np.arange(nx) - nx // 2)[None, :] / nx
    kr = np.hypot(kx, ky)  # cycles / px
    rbin = np.rint(kr * max(nx, ny)).astype(int)
    med = np.zeros(rbin.max() + 1)
    order = np.argsort(rbin, axis=None)
    rs = rbin.ravel()[order]
    ps = power.ravel()[order]
    cuts = np.flatnonzero(np.diff(rs)) + 1
    for grp_r, grp_p in zip(np.split(rs, cuts), np.split(ps, cuts)):
        med[grp_r[0]] = np.median(grp_p)
    ratio = power / np.maximum(med[rbin], 1e-300)
    # kx = 0 holds only line-to-line variation (scan-line noise, tip changes), never a lattice alone
    band = (kr >= 3.0 / min(nx, ny)) & (kr <= 1.0 / min_period_px) & (np.abs(kx) * nx >= 1)
    local_max = power >= cv2.dilate(power.astype(np.float32), np.ones((3, 3), np.uint8)).astype(np.float64) * (1 - 1e-6)
    cand = np.flatnonzero((band & local_max & (ratio >= snr)).ravel())
    if cand.size == 0:
        return np.asarray(image, np.float64).copy(), LatticeInfo(False)
    cand = cand[np.argsort(-ratio.ravel()[cand])][:max_peaks]
    iy, ix = np.unravel_index(cand, power.shape)
    peaks = [(float(kx[0, x]), float(ky[y, 0])) for y, x in zip(iy, ix)]
    # notch every peak and its mirror (the spectrum of a real frame is symmetric)
    yy, xx = np.mgrid[:ny, :nx]
    keep = np.ones((ny, nx))
    for y, x in zip(iy, ix):
        for cy, cx in ((y, x), ((2 * (ny // 2) - y) % ny, (2 * (nx // 2) - x) % nx)):
            keep *= 1.0 - np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * notch_px ** 2))
    spec = np.fft.fftshift(np.fft.fft2(f))
    resid = np.real(np.fft.ifft2(np.fft.ifftshift(spec * keep)))
    resid[nan] = np.nan
    best = 0
    period = 1.0 / float(np.hypot(*peaks[best])) if np.hypot(*peaks[best]) > 0 else float("nan")
    return resid, LatticeInfo(True, peaks, period, [float(ratio[y, x]) for y, x in zip(iy, ix)])


def find_defects(residual: np.ndarray, pixel_size_nm: tuple[float, float], scale_px: float, *,
                 threshold: float = 3.0, min_area_frac: float = 0.15) -> list[Region]:
    """Protrusions and depressions of a lattice-free frame at one scale.

    Parameters
    ----------
    residual : np.ndarray
        float ``(ny, nx)`` (NaN = not acquired), e.g. from :func:`remove_lattice`.
    pixel_size_nm : (dx, dy)
        nm per pixel.
    scale_px : float
        Size (diameter) of one defect, pixels.
    threshold : float
        In robust standard deviations of the band-passed frame.
    min_area_frac : float
        Components smaller than this fraction of a disc of diameter ``scale_px`` are noise.

    Returns
    -------
    list[Region]
        Sorted top-to-bottom; ``contrast`` +1 protrusion, -1 depression; ``touches_edge`` for
        components on the border or the NaN boundary.

    Raises
    ------
    ValueError
        ``scale_px`` not positive.
    """
    if not scale_px > 0:
        raise ValueError(f"scale_px must be positive, got {scale_px}")
    r = np.asarray(residual, np.float64)
    valid = np.isfinite(r)
    f = np.where(valid, r, np.median(r[valid]) if valid.any() else 0.0).astype(np.float32)
    s = max(scale_px / 4.0, 0.7)
    dog = cv2.GaussianBlur(f, (0, 0), s, borderType=cv2.BORDER_REFLECT) - \
        cv2.GaussianBlur(f, (0, 0), 3 * s, borderType=cv2.BORDER_REFLECT)
    v = dog[valid]
    med = float(np.median(v))
    mad = 1.4826 * float(np.median(np.abs(v - med))) or float(v.std()) or 1.0
    z = (dog - med) / mad
    dx, dy = float(pixel_size_nm[0]), float(pixel_size_nm[1])
    min_area = max(3, int(min_area_frac * np.pi * (scale_px / 2) ** 2))
    grown_nan = cv2.dilate((~valid).astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
    out: list[Region] = []
    label = 0
    for sign in (1, -1):
        mask = ((sign * z) > threshold) & valid
        n, lab, stats, cents = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
        for i in range(1, n):
            x, y, w, h, area = (int(v) for v in stats[i])
            if area < min_area:
                continue
            comp = (lab[y:y + h, x:x + w] == i).astype(np.uint8)
            cs, _ = cv2.findContours(comp, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
            contour = max(cs, key=len).reshape(-1, 2) + np.array([x, y])
            (_, _), rad = cv2.minEnclosingCircle(contour.astype(np.float32))
            edge = x == 0 or y == 0 or x + w >= r.shape[1] or y + h >= r.shape[0] or bool(
                grown_nan[y:y + h, x:x + w][comp.astype(bool)].any())
            label += 1
            out.append(Region(label=label, bbox_px=(x, y, w, h), centroid_px=(float(cents[i][0]), float(cents[i][1])),
                              area_px=area, area_nm2=area * dx * dy, extent_nm=2.0 * float(rad) * float(np.sqrt(dx * dy)),
                              touches_edge=edge, contour=contour.astype(np.int32), contrast=sign))
    out.sort(key=lambda g: (g.centroid_px[1], g.centroid_px[0]))
    return out
