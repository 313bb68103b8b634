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
#: Defects stand this many robust standard deviations out of the band-passed residual (at least).
DEFECT_THRESHOLD = 3.0
#: :func:`find_blobs`: the threshold lets about this many noise blobs through per frame.
FALSE_BLOBS_PER_FRAME = 1.0
#: :func:`detect_defects` without references (or without a size rule) searches defects from 0.5 x to
#: 2 x the expected size (the molecule detector's bounds, :func:`agent.detect.detect_objects`); with
#: references, from the smallest / ``match.size_tolerance`` to the largest x it: a defect outside
#: that range is ruled out of every species by the size rule anyway.
SIZE_RANGE = (0.5, 2.0)


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
                   evidence: LatticeEvidence | None = None, size_tolerance: float | None = 1.5):
    """The lattice route of detection: :func:`remove_lattice`, then :func:`find_defects` of both
    polarities at the defect's scale.

    Defects are scale-space blobs (:func:`find_blobs`) at the false-alarm threshold of about one
    noise blob per frame (:func:`false_alarm_threshold`), searched within :data:`SIZE_RANGE` of the
    scale, or with references within ``size_tolerance`` of their sizes.
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
    if source.startswith("references"):  # the species' sizes within the size rule's tolerance
        tol = size_tolerance if size_tolerance is not None else 1.0 / SIZE_RANGE[0]
        lo, hi = min(reference_sizes_nm) / tol, max(reference_sizes_nm) * tol
    else:
        lo, hi = SIZE_RANGE[0] * size_nm, SIZE_RANGE[1] * size_nm
    sig = scale_grid((lo / dx, hi / dx), residual.shape)
    thr = false_alarm_threshold(residual.shape, sig[inner_scales(sig, (lo / dx, hi / dx))],
                                int(np.isfinite(residual).sum()))
    regions = find_blobs(residual, (dx, dy), (lo / dx, hi / dx), threshold=thr)
    rep = DetectionReport(method="lattice", requested=requested, reason=reason, object_size_nm=size_nm,
                          size_source=source, n_regions=len(regions),
                          extra={"lattice": {**ev.to_json(), "removed_peaks": len(info.peaks)},
                                 "polarity": "both", "size_range_nm": [round(lo, 5), round(hi, 5)],
                                 "threshold_sigma": round(thr, 2)})
    if not regions:
        rep.note = "no defect: nothing stands out of the lattice-free frame at the defect's scale"
    return regions, rep, residual


#: Defect extent (box side) per scale-space sigma of its blob: 2 sqrt(2), the diameter of the
#: scale-normalised LoG's blob convention (radius sqrt(2) sigma: Lindeberg 1998; skimage.feature.blob_log);
#: for a Gaussian bump of standard deviation s (selected at sigma = sqrt(2) s) that is 4 s.
EXTENT_PER_SIGMA = 2.0 * np.sqrt(2.0)
#: Elongated extrema (scan-line streaks, step edges, the rim of a larger defect) are not point
#: defects: principal-curvature ratio limit of SIFT (Lowe, IJCV 60, 91 (2004), r = 10).
EDGE_RATIO = 10.0


def _robust_sd(a: np.ndarray) -> float:
    v = a.ravel()
    if v.size > 1 << 18:
        v = v[:: v.size >> 18]
    med = float(np.median(v))
    return 1.4826 * float(np.median(np.abs(v - med))) or float(v.std()) or 1.0


#: The noise of a response is measured around each pixel, over this many blob sigmas (Gaussian
#: window): scan-line noise and tip changes make it vary across a frame.
NOISE_WINDOW_SIGMAS = 8.0


def _local_z(stack: np.ndarray, sig: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Each scale's response in units of its local noise: the Gaussian-weighted RMS of the response
    over :data:`NOISE_WINDOW_SIGMAS` blob sigmas, winsorised at 3 robust standard deviations of the
    frame (a strong defect does not hide its neighbours) and floored at that standard deviation."""
    out = np.empty_like(stack)
    w = valid.astype(np.float32)
    for k, (s, a) in enumerate(zip(sig, stack)):
        sd = _robust_sd(a[valid]) if valid.any() else 1.0
        ny, nx = a.shape
        q = max(1, int(s * NOISE_WINDOW_SIGMAS // 16))  # the window's blur on a reduced frame
        a2 = (np.minimum(a * a, (3.0 * sd) ** 2) * w).astype(np.float32)  # winsorised: defects do not raise it
        if q > 1:
            sm = lambda x: cv2.resize(x, (max(4, nx // q), max(4, ny // q)), interpolation=cv2.INTER_AREA)  # noqa: E731
            num, den = sm(a2), sm(w)
        else:
            num, den = a2, w
        sw = s * NOISE_WINDOW_SIGMAS * num.shape[1] / nx
        num = cv2.GaussianBlur(num, (0, 0), sw, borderType=cv2.BORDER_REFLECT)
        den = cv2.GaussianBlur(den, (0, 0), sw, borderType=cv2.BORDER_REFLECT)
        rms = np.sqrt(num / np.maximum(den, 1e-6))
        if q > 1:
            rms = cv2.resize(rms, (nx, ny), interpolation=cv2.INTER_LINEAR)
        out[k] = a / np.maximum(rms, sd)
    return out


def scale_grid(size_px: tuple[float, float], shape: tuple[int, int], per_octave: int = 4,
               extent_per_sigma: float = EXTENT_PER_SIGMA) -> np.ndarray:
    """The sigmas of :func:`blob_scale_space`: ``per_octave`` per octave from half an octave below the
    smallest to half an octave above the largest extent (capped at a quarter of the frame)."""
    lo = max(0.7, size_px[0] / extent_per_sigma / 2 ** 0.5)
    hi = max(lo * 1.2, size_px[1] / extent_per_sigma * 2 ** 0.5)
    hi = min(hi, max(lo * 1.2, min(shape) / (2 * extent_per_sigma)))
    n = max(3, int(np.ceil(np.log2(hi / lo) * per_octave)) + 1)
    return lo * (hi / lo) ** (np.arange(n) / (n - 1))


def inner_scales(sig: np.ndarray, size_px: tuple[float, float], extent_per_sigma: float = EXTENT_PER_SIGMA) -> np.ndarray:
    """Which sigmas of the grid give extents within ``size_px`` (at least the one closest to them)."""
    inner = (sig * extent_per_sigma >= size_px[0] * 0.999) & (sig * extent_per_sigma <= size_px[1] * 1.001)
    if not inner.any():
        inner[np.argmin(np.abs(np.log(sig * extent_per_sigma / np.sqrt(size_px[0] * size_px[1]))))] = True
    return inner
    return inner


def blob_scale_space(residual: np.ndarray, size_px: tuple[float, float], per_octave: int = 4,
                     extent_per_sigma: float = EXTENT_PER_SIGMA):
    """Scale-normalised Laplacian of Gaussian stack ``-sigma^2 nabla^2 (G_sigma * f)`` (Lindeberg 1998)
    for blob extents ``size_px[0] .. size_px[1]`` (extent = :data:`EXTENT_PER_SIGMA` sigma), one
    octave beyond each end so that the end scales can be local maxima.

    Returns ``(sigmas float64 (S,), stack float32 (S, ny, nx), valid bool (ny, nx))``."""
    r = np.asarray(residual, np.float64)
    valid = np.isfinite(r)
    f = np.where(valid, r, np.median(r[valid]) if valid.any() else 0.0).astype(np.float32)
    sig = scale_grid(size_px, f.shape, per_octave, extent_per_sigma)
    n = len(sig)
    ny, nx = f.shape
    stack = np.empty((n, ny, nx), np.float32)
    for k, s in enumerate(sig):  # large scales on a reduced frame (pyramid): sigma <= 4 px there
        q = max(1, int(s // 4))
        g = f if q == 1 else cv2.resize(f, (max(4, nx // q), max(4, ny // q)), interpolation=cv2.INTER_AREA)
        sq = s * g.shape[1] / nx
        lap = -(sq ** 2) * cv2.Laplacian(cv2.GaussianBlur(g, (0, 0), sq, borderType=cv2.BORDER_REFLECT), cv2.CV_32F,
                                         borderType=cv2.BORDER_REFLECT)
        stack[k] = lap if q == 1 else cv2.resize(lap, (nx, ny), interpolation=cv2.INTER_LINEAR)
    return sig, stack, valid


def false_alarm_threshold(shape: tuple[int, int], sigmas: np.ndarray, n_valid: int | None = None,
                          false_per_frame: float = FALSE_BLOBS_PER_FRAME, per_octave: int = 4) -> float:
    """Response (in noise standard deviations) that pure noise exceeds at about ``false_per_frame``
    blobs per frame: Bonferroni over the frame's independent blob positions, one per (2 sigma)^2
    per octave of scale (``sigmas`` are sampled ``per_octave`` per octave) and polarity,
    ``z = Phi^-1(1 - false_per_frame / N)`` (the logic of source detection in random fields, e.g.
    Worsley et al., Hum. Brain Mapp. 4, 58 (1996)). Never below :data:`DEFECT_THRESHOLD`: larger
    frames and finer scales hold more chances for noise."""
    from scipy.special import ndtri

    area = float(n_valid if n_valid is not None else shape[0] * shape[1])
    n = 2.0 * float(np.sum(area / (2.0 * np.asarray(sigmas, np.float64)) ** 2)) / per_octave
    if n <= false_per_frame:
        return DEFECT_THRESHOLD
    return max(DEFECT_THRESHOLD, float(ndtri(1.0 - false_per_frame / n)))


def find_blobs(residual: np.ndarray, pixel_size_nm: tuple[float, float], size_px: tuple[float, float], *,
               threshold: float | None = None, extent_per_sigma: float = EXTENT_PER_SIGMA,
               edge_ratio: float | None = EDGE_RATIO, return_z: bool = False):
    """Defects of both polarities as scale-space blobs: local extrema of the scale-normalised LoG over
    position and scale (Lindeberg, Int. J. Comput. Vis. 30, 79 (1998)), each with its own size.

    A blob is a 3 x 3 x 3 extremum of the stack (:func:`blob_scale_space`) within the extents
    ``size_px`` whose response stands ``threshold`` robust standard deviations (1.4826 MAD of that
    scale's response) out; overlapping blobs (centres closer than the larger radius) keep the
    strongest. Extrema elongated beyond the principal-curvature ratio ``edge_ratio`` of the
    response's Hessian at the blob's scale are dropped (Lowe's edge test: streaks, step edges).
    Its box is centred on it, ``extent_per_sigma`` x its sigma wide: unlike the component of a
    thresholded frame, the size does not depend on the defect's contrast.

    Parameters
    ----------
    residual : float ``(ny, nx)`` lattice-free frame (NaN = not acquired).
    pixel_size_nm : (dx, dy) nm.
    size_px : (smallest, largest) defect extent searched, pixels.
    threshold : in local noise standard deviations; None = :func:`false_alarm_threshold` (about one
        noise blob per frame).
    extent_per_sigma : box side per blob sigma.

    Returns
    -------
    list[Region] sorted top-to-bottom (contrast +1 / -1; contour = the box's inscribed circle).
    """
    sig, stack, valid = blob_scale_space(residual, size_px, extent_per_sigma=extent_per_sigma)
    ny, nx = valid.shape
    dx, dy = float(pixel_size_nm[0]), float(pixel_size_nm[1])
    inner = inner_scales(sig, size_px, extent_per_sigma)
    z = _local_z(stack, sig, valid)
    if threshold is None:
        threshold = false_alarm_threshold(valid.shape, sig[inner], int(valid.sum()))
    k3 = np.ones((3, 3), np.uint8)
    found = []
    for sign in (1, -1):
        zz = sign * z
        sp = np.stack([cv2.dilate(a, k3) for a in zz])  # spatial 3 x 3 maximum per scale
        nb = sp.copy()
        nb[1:] = np.maximum(nb[1:], sp[:-1])
        nb[:-1] = np.maximum(nb[:-1], sp[1:])
        peak = (zz >= nb) & (zz >= threshold) & inner[:, None, None] & valid[None]
        ks, ys, xs = np.nonzero(peak)
        if edge_ratio and len(ks):  # Lowe's edge test: tr(H)^2 / det(H) < (r + 1)^2 / r at the blob's scale
            keep = np.zeros(len(ks), bool)
            for k in np.unique(ks):
                sel = ks == k
                h = sign * stack[k]
                yy, xx = ys[sel], xs[sel]
                st = max(1, int(round(sig[k] / 2)))  # finite differences at the blob's scale
                y0, y1 = np.clip(yy - st, 0, ny - 1), np.clip(yy + st, 0, ny - 1)
                x0, x1 = np.clip(xx - st, 0, nx - 1), np.clip(xx + st, 0, nx - 1)
                c = h[yy, xx]
                dxx = h[yy, x1] + h[yy, x0] - 2 * c
                dyy = h[y1, xx] + h[y0, xx] - 2 * c
                dxy = (h[y1, x1] - h[y1, x0] - h[y0, x1] + h[y0, x0]) / 4.0
                tr, det = dxx + dyy, dxx * dyy - dxy ** 2
                keep[sel] = (det > 0) & (tr ** 2 < det * (edge_ratio + 1) ** 2 / edge_ratio)
            ks, ys, xs = ks[keep], ys[keep], xs[keep]
        found += list(zip(zz[ks, ys, xs].tolist(), xs.astype(float).tolist(), ys.astype(float).tolist(),
                          (sig[ks] * extent_per_sigma).tolist(), [sign] * len(ks)))
    found.sort(key=lambda t: -t[0])
    kept: list[tuple] = []
    if found:  # non-maximum suppression, strongest first (k-d tree of the centres)
        from scipy.spatial import cKDTree

        c = np.array([(t[1], t[2]) for t in found])
        ext = np.array([t[3] for t in found])
        tree = cKDTree(c)
        alive = np.ones(len(found), bool)
        for i in range(len(found)):
            if not alive[i]:
                continue
            kept.append(found[i])
            nb = np.asarray(tree.query_ball_point(c[i], 0.5 * ext.max()), int)
            d = np.hypot(c[nb, 0] - c[i, 0], c[nb, 1] - c[i, 1])
            alive[nb[d < 0.5 * np.maximum(ext[nb], ext[i])]] = False
    grown_nan = cv2.dilate((~valid).astype(np.uint8), k3).astype(bool)
    out: list[Region] = []
    zs = []
    for label, (zv, x, y, e, sign) in enumerate(kept, start=1):
        zs.append(zv)
        x0, y0 = int(round(x - e / 2)), int(round(y - e / 2))
        w = h = max(2, int(round(e)))
        edge = x0 < 0 or y0 < 0 or x0 + w > nx or y0 + h > ny or bool(
            grown_nan[max(0, y0):y0 + h, max(0, x0):x0 + w].any())
        t = np.linspace(0, 2 * np.pi, 16, endpoint=False)
        contour = np.column_stack([x + e / 2 * np.cos(t), y + e / 2 * np.sin(t)]).round().astype(np.int32)
        out.append(Region(label=label, bbox_px=(x0, y0, w, h), centroid_px=(x, y),
                          area_px=int(round(np.pi * e * e / 4)), area_nm2=float(np.pi * e * e / 4 * dx * dy),
                          extent_nm=float(e * np.sqrt(dx * dy)), touches_edge=edge, contour=contour, contrast=sign))
    order = sorted(range(len(out)), key=lambda i: (out[i].centroid_px[1], out[i].centroid_px[0]))
    out = [out[i] for i in order]
    return (out, np.array([zs[i] for i in order])) if return_z else out


def blob_sigma_at(residual: np.ndarray, centres_px: np.ndarray, size_px, return_z: bool = False):
    """Scale-space sigma and polarity of the blob at each given centre (e.g. a labelled example):
    the scale and sign of the largest ``|response|`` (:func:`blob_scale_space`, in local noise
    units) within 2 px of it, over extents ``size_px``: one ``(smallest, largest)`` pair for all, or
    float ``(N, 2)`` one per centre (each computed on a patch around its centre).

    Returns ``(sigma float64 (N,), sign int (N,))`` (+ ``|z|`` float64 ``(N,)`` with ``return_z``)."""
    r = np.asarray(residual, np.float64)
    c = np.asarray(centres_px, np.float64).reshape(-1, 2)
    out_z = np.zeros(len(c))
    rng = np.broadcast_to(np.asarray(size_px, np.float64).reshape(-1, 2), (len(c), 2))
    ny, nx = r.shape
    out_s, out_c = np.zeros(len(c)), np.zeros(len(c), int)
    for i, ((x, y), (lo, hi)) in enumerate(zip(c, rng)):
        m = int(np.ceil(3 * hi)) + 4
        x0, y0 = int(max(0, round(x) - m)), int(max(0, round(y) - m))
        patch = r[y0:int(min(ny, round(y) + m + 1)), x0:int(min(nx, round(x) + m + 1))]
        if min(patch.shape) < 5:
            continue
        sig, stack, valid = blob_scale_space(patch, (lo, hi))
        z = _local_z(stack, sig, valid)
        xi, yi = int(np.clip(round(x) - x0, 0, patch.shape[1] - 1)), int(np.clip(round(y) - y0, 0, patch.shape[0] - 1))
        win = z[:, max(0, yi - 2):yi + 3, max(0, xi - 2):xi + 3].reshape(len(sig), -1)
        top, bot = win.max(axis=1), win.min(axis=1)
        if top.max() >= -bot.min():
            out_s[i], out_c[i], out_z[i] = sig[int(top.argmax())], 1, top.max()
        else:
            out_s[i], out_c[i], out_z[i] = sig[int(bot.argmin())], -1, -bot.min()
    return (out_s, out_c, out_z) if return_z else (out_s, out_c)


def blob_region_at(residual: np.ndarray, pixel_size_nm: tuple[float, float], x: float, y: float,
                   size_px: tuple[float, float]) -> Region:
    """The defect at a picked point, whatever its strength (a user's click names a defect): the
    scale-space blob of :func:`blob_sigma_at` there, as a :class:`Region` centred on the point,
    :data:`EXTENT_PER_SIGMA` x its sigma wide."""
    sig, sign = blob_sigma_at(residual, np.array([[x, y]]), size_px)
    e = max(2.0, float(sig[0]) * EXTENT_PER_SIGMA)
    dx, dy = float(pixel_size_nm[0]), float(pixel_size_nm[1])
    ny, nx = np.shape(residual)
    x0, y0, w = int(round(x - e / 2)), int(round(y - e / 2)), max(2, int(round(e)))
    t = np.linspace(0, 2 * np.pi, 16, endpoint=False)
    contour = np.column_stack([x + e / 2 * np.cos(t), y + e / 2 * np.sin(t)]).round().astype(np.int32)
    return Region(label=1, bbox_px=(x0, y0, w, w), centroid_px=(float(x), float(y)), area_px=int(round(np.pi * e * e / 4)),
                  area_nm2=float(np.pi * e * e / 4 * dx * dy), extent_nm=float(e * np.sqrt(dx * dy)),
                  touches_edge=x0 < 0 or y0 < 0 or x0 + w > nx or y0 + w > ny, contour=contour,
                  contrast=int(sign[0]) or 1)
