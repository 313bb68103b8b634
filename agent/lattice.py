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

__all__ = ["LatticeInfo", "LatticeEvidence", "lattice_evidence", "remove_lattice", "find_defects",
           "detect_defects", "DEFECT_THRESHOLD"]

#: ``auto``: a frame is a resolved lattice when sharp Bragg reflections carry at least this share of
#: its band-passed power (the lattice dominates the contrast; molecule and adsorbate scans: <= 0.1,
#: Si(111)-7x7 0.61, see :func:`lattice_evidence`) ...
LATTICE_POWER_SHARE = 0.3
#: ... in at least two non-collinear directions (a 2-D lattice; one direction = stripes, rows, a
#: scan-line artefact), with periods of at least this many pixels (shorter: pixel noise) ...
LATTICE_MIN_PERIOD_PX = 4.0
#: ... and at most 1/this of the frame's shorter side (several unit cells across).
LATTICE_MIN_CELLS = 4.0
#: Defects stand this many robust standard deviations out of the band-passed residual.
DEFECT_THRESHOLD = 3.0


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


@dataclass
class LatticeEvidence:
    """Whether a frame shows a resolved periodic 2-D lattice (:func:`lattice_evidence`).

    Attributes
    ----------
    resolved : bool
        ``power_share >= LATTICE_POWER_SHARE`` and ``n_directions >= 2``.
    power_share : float
        Share of the band-passed power (periods from ``LATTICE_MIN_PERIOD_PX`` to the frame's
        shorter side / ``LATTICE_MIN_CELLS``) in sharp reflections (3 x 3 frequency pixels around
        each local maximum standing 10x above the radial median).
    n_peaks : int
        Sharp reflections (each +- pair counts twice).
    n_directions : int
        Distinct directions (10 degree bins, modulo 180) of the reflections with >= 10 % of the
        strongest one's power.
    period_px : float
        Period of the fundamental: the lowest-frequency reflection with >= 10 % of the strongest
        one's power, pixels (NaN when none).
    """

    resolved: bool
    power_share: float = 0.0
    n_peaks: int = 0
    n_directions: int = 0
    period_px: float = float("nan")

    def to_json(self) -> dict:
        p = self.period_px
        return {"resolved": self.resolved, "power_share": round(self.power_share, 3), "n_peaks": self.n_peaks,
                "n_directions": self.n_directions, "period_px": round(p, 2) if np.isfinite(p) else None}


def _spectrum(image: np.ndarray):
    """Hann-windowed power spectrum (fftshifted), frequencies (cycles / px) and the ratio of each
    frequency pixel's power to the radial median at its |k|."""
    f = _filled(image)
    ny, nx = f.shape
    win = np.outer(np.hanning(ny), np.hanning(nx))
    power = np.abs(np.fft.fftshift(np.fft.fft2(f * win))) ** 2
    ky = (np.arange(ny) - ny // 2)[:, None] / ny
    kx = (np.arange(nx) - nx // 2)[None, :] / nx
    kr = np.hypot(kx, ky)
    rbin = np.rint(kr * max(nx, ny)).astype(int)
    med = np.zeros(rbin.max() + 1)
    order = np.argsort(rbin, axis=None)
    rs = rbin.ravel()[order]
    ps = power.ravel()[order]
    cuts = np.flatnonzero(np.diff(rs)) + 1
    for grp_r, grp_p in zip(np.split(rs, cuts), np.split(ps, cuts)):
        med[grp_r[0]] = np.median(grp_p)
    return power, kx, ky, kr, power / np.maximum(med[rbin], 1e-300)


def lattice_evidence(image: np.ndarray, snr: float = 10.0) -> LatticeEvidence:
    """Is ``image`` a resolved periodic 2-D lattice (the ``auto`` choice of the lattice route)?

    The (Hann-windowed) power spectrum's sharp reflections - local maxima standing ``snr`` times
    above the radial median (the smooth spectrum of a non-periodic image), off the kx = 0 axis
    (scan-line noise) - are summed over 3 x 3 frequency pixels each. A resolved lattice puts a large
    share of the frame's power into them (:data:`LATTICE_POWER_SHARE`) along at least two
    directions. Frames larger than 512 px are reduced (area average) first: a lattice resolved at
    that sampling is what the route needs.

    Parameters
    ----------
    image : float ``(ny, nx)`` flattened frame (NaN = not acquired); snr : float.

    Returns
    -------
    LatticeEvidence (``resolved`` false for frames under 16 x 16 pixels).
    """
    img = np.asarray(image, np.float64)
    if img.ndim != 2 or min(img.shape) < 16:
        return LatticeEvidence(False)
    big = max(img.shape) / 512.0
    if big > 1:
        f = np.where(np.isfinite(img), img, np.nanmedian(img) if np.isfinite(img).any() else 0.0)
        img = cv2.resize(f, (max(16, int(img.shape[1] / big)), max(16, int(img.shape[0] / big))),
                         interpolation=cv2.INTER_AREA)
    ny, nx = img.shape
    power, kx, ky, kr, ratio = _spectrum(img)
    band = (kr >= LATTICE_MIN_CELLS / min(nx, ny)) & (kr <= 1.0 / LATTICE_MIN_PERIOD_PX) & (np.abs(kx) * nx >= 1)
    local_max = power >= cv2.dilate(power.astype(np.float32), np.ones((3, 3), np.uint8)).astype(np.float64) * (1 - 1e-6)
    peaks = band & local_max & (ratio >= snr)
    total = float(power[band].sum())
    if not peaks.any() or total <= 0:
        return LatticeEvidence(False)
    near = cv2.dilate(peaks.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool) & band
    share = float(power[near].sum()) / total
    iy, ix = np.nonzero(peaks)
    w = power[iy, ix]
    strong = w >= 0.1 * w.max()
    ang = np.degrees(np.arctan2(ky[iy, 0], kx[0, ix])) % 180.0
    dirs = int(np.unique(np.floor(ang[strong] / 10.0)).size)
    k_fund = float(kr[iy[strong], ix[strong]].min())
    period = (1.0 / k_fund) * (big if big > 1 else 1.0)
    return LatticeEvidence(bool(share >= LATTICE_POWER_SHARE and dirs >= 2), share, int(peaks.sum()), dirs, period)


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
    keep = np.ones((ny, nx))
    r = int(np.ceil(4 * notch_px))  # each notch acts on a patch of +- 4 sigma (exp(-8) beyond)
    for y, x in zip(iy, ix):
        for cy, cx in ((y, x), ((2 * (ny // 2) - y) % ny, (2 * (nx // 2) - x) % nx)):
            y0, y1, x0, x1 = max(0, cy - r), min(ny, cy + r + 1), max(0, cx - r), min(nx, cx + r + 1)
            py, px = np.ogrid[y0:y1, x0:x1]
            keep[y0:y1, x0:x1] *= 1.0 - np.exp(-((py - cy) ** 2 + (px - cx) ** 2) / (2 * notch_px ** 2))
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


def detect_defects(image: np.ndarray, pixel_size_nm: tuple[float, float], cfg, requested: str, reason: str,
                   reference_sizes_nm: list[float] | None = None, pixel_size_known: bool = True,
                   evidence: LatticeEvidence | None = None):
    """The lattice route of detection: :func:`remove_lattice`, then :func:`find_defects` of both
    polarities at the defect's scale.

    The scale (defect size) is ``segment.object_size_nm`` when set (and the pixel size is known), else
    the median size of the library's references (the user's examples: K shots), else the typical
    blob size of the lattice-free frame (Lindeberg scale selection,
    :func:`agent.detect.estimate_object_size`; a point defect is the blob that remains).

    Parameters
    ----------
    image : float ``(ny, nx)`` flattened frame (NaN = not acquired).
    pixel_size_nm : (dx, dy) nm.
    cfg : agent.config.SegmentConfig
    requested, reason : ``segment.method`` as configured and why this route was taken (report).
    reference_sizes_nm : sizes (nm, box side) of the references, or None.
    pixel_size_known : False for images without a physical pixel size (``object_size_nm`` ignored).
    evidence : :func:`lattice_evidence` of the frame when already computed.

    Returns
    -------
    (regions, report, residual) : ``list[Region]``, :class:`agent.detect.DetectionReport` (method
    ``lattice``; ``lattice`` = the evidence and the removal's peaks and period), float64 ``(ny, nx)``
    lattice-free frame.
    """
    from stm_agent.agent.detect import DetectionReport

    dx, dy = float(pixel_size_nm[0]), float(pixel_size_nm[1])
    ev = evidence if evidence is not None else lattice_evidence(image)
    residual, info = remove_lattice(image)
    if cfg.object_size_nm is not None and pixel_size_known:
        size_nm, source = float(cfg.object_size_nm), "config"
    elif reference_sizes_nm:
        size_nm, source = float(np.median(reference_sizes_nm)), "references (median size)"
    else:  # no example yet: the typical blob size of the lattice-free frame (both polarities)
        from stm_agent.agent.detect import estimate_object_size
        from stm_agent.agent.flatten import fill_nan

        f, valid = fill_nan(np.asarray(residual, np.float32))
        size_nm = max(estimate_object_size(f, (dx, dy), valid=valid), estimate_object_size(-f, (dx, dy), valid=valid))
        source = "auto: scale-space estimate on the lattice-free frame"
    regions = find_defects(residual, (dx, dy), size_nm / dx, threshold=DEFECT_THRESHOLD)
    rep = DetectionReport(method="lattice", requested=requested, reason=reason, object_size_nm=size_nm,
                          size_source=source, n_regions=len(regions),
                          extra={"lattice": {**ev.to_json(), "removed_peaks": len(info.peaks)},
                                 "polarity": "both", "threshold_sigma": DEFECT_THRESHOLD})
    if not regions:
        rep.note = "no defect: nothing stands out of the lattice-free frame at the defect's scale"
    return regions, rep, residual
