"""Reference-template detector: find the known species of a dense layer by correlation.

Each reference crop is resampled to the frame's pixel size, turned into poses (rotations x mirror),
and correlated with the frame by normalised cross-correlation (OpenCV ``matchTemplate`` with
``TM_CCOEFF_NORMED``: the zero-mean NCC of Lewis, "Fast normalized cross-correlation", Vision
Interface 1995). The score of a position is the best NCC over all poses of all references; peaks
are picked by non-maximum suppression at 0.4 x the reference extent, and each accepted peak is
an object of the reference's extent (a disc; overlaps go to the stronger peak).

Budget: a full 72-pose correlation per species at the frame's resolution costs ~1.5-1.9 s for a
512^2 frame on 2 cores. The correlation therefore runs on a pyramid level where the reference
extent is :data:`WORK_EXTENT_PX` pixels (area-averaged frame) with :data:`ROTATIONS` rotations x
mirror (30 degree steps: NCC at 16 px tolerates the +-15 degree error), which is ~50x cheaper.

Frames without a physical pixel size (rendered images) search the scale: the references'
extents x 2^(i/2), i = -3..3 (0.35-2.8x), with a reduced pose set; the scale with the highest
mean of the strongest peaks is refined by quarter octaves, then matched with every pose.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

#: Reference extent on the working pyramid level, pixels.
WORK_EXTENT_PX = 16.0
#: Rotations of each reference (x mirror).
ROTATIONS = 12
#: Peaks closer than this many extents are one object (non-maximum suppression).
NMS_DISTANCE = 0.4
#: Lowest NCC of an accepted peak (the accepted level is set per frame, never below this).
MIN_NCC = 0.3


@dataclass
class Template:
    """One reference as the template detector uses it.

    Attributes
    ----------
    species : str
    crop : np.ndarray
        float32 ``(h, w)`` crop centred on the object, in the units of the flattened frame (as the
        reference library stores it: side ~2 x the extent).
    pixel_size_nm : (dx, dy)
        Pixel size of the crop, nm (1 "nm" per pixel for rendered images).
    extent_nm : float
        The object's largest size, nm.
    """

    species: str
    crop: np.ndarray
    pixel_size_nm: tuple[float, float]
    extent_nm: float


def _poses(t: Template, frame_px_nm: tuple[float, float], scale: float, k: float, rotations: int,
           mirror: bool) -> list[np.ndarray]:
    """Pose windows of ``t`` at working resolution (frame pixel size x ``k``), object scaled by ``scale``.

    The whole crop is resampled and rotated, then its central square of side ~1.0 extent is cut,
    so rotation never brings in padding. float32 windows, odd side.
    """
    c = np.asarray(t.crop, np.float32)
    fin = np.isfinite(c)
    c = np.where(fin, c, np.median(c[fin]) if fin.any() else 0.0).astype(np.float32)
    c = _unit_scale(c)
    fx = t.pixel_size_nm[0] * scale / (frame_px_nm[0] * k)
    fy = t.pixel_size_nm[1] * scale / (frame_px_nm[1] * k)
    w = max(3, int(round(c.shape[1] * fx)))
    h = max(3, int(round(c.shape[0] * fy)))
    c = cv2.resize(c, (w, h), interpolation=cv2.INTER_AREA if fx < 1 else cv2.INTER_LINEAR)
    side = int(round(t.extent_nm * scale / (frame_px_nm[0] * k))) | 1
    side = max(5, min(side, min(h, w) - (1 - min(h, w) % 2)))
    centre = ((w - 1) / 2.0, (h - 1) / 2.0)
    out = []
    for m in ([False, True] if mirror else [False]):
        src = c[:, ::-1].copy() if m else c
        for a in np.arange(rotations) * (360.0 / rotations):
            rot = cv2.warpAffine(src, cv2.getRotationMatrix2D(centre, float(a), 1.0), (w, h),
                                 flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
            out.append(cv2.getRectSubPix(rot, (side, side), centre))
    return out


def _unit_scale(a: np.ndarray) -> np.ndarray:
    """``a`` shifted and scaled to zero median and unit standard deviation (float32).

    NCC does not depend on the scale, but OpenCV's ``matchTemplate`` does: it treats window
    variances below ~1e-7 as zero, so a frame in SI units (Z in m, ~1e-10) gives a score of 1
    everywhere. Both the frame and the templates are brought to unit scale first.
    """
    a = np.asarray(a, np.float32)
    sd = float(a.std())
    if not np.isfinite(sd) or sd == 0.0:
        return np.zeros_like(a)
    return ((a - np.float32(np.median(a))) / np.float32(sd)).astype(np.float32)


def score_map(frame_w: np.ndarray, poses: list[np.ndarray]) -> np.ndarray:
    """Best NCC over ``poses`` at every position of ``frame_w`` (window centre), -1 where no window fits."""
    out = np.full(frame_w.shape, -1.0, np.float32)
    padded: dict[tuple[int, int], np.ndarray] = {}
    for p in poses:
        h, w = p.shape
        if h > 2 * frame_w.shape[0] or w > 2 * frame_w.shape[1] or float(p.std()) == 0.0:
            continue
        # mirrored border: windows centred near the edge (cut objects) get a score too
        fp = padded.get((h, w))
        if fp is None:
            fp = padded[(h, w)] = cv2.copyMakeBorder(frame_w, h // 2, h // 2, w // 2, w // 2, cv2.BORDER_REFLECT)
        np.maximum(out, cv2.matchTemplate(fp, p, cv2.TM_CCOEFF_NORMED), out=out)
    return out


def _peaks(score: np.ndarray, radius: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Local maxima of ``score`` within a disc of ``radius`` px: (y, x, value), strongest first."""
    r = max(1, int(round(radius)))
    yy, xx = np.ogrid[-r:r + 1, -r:r + 1]
    disk = ((yy * yy + xx * xx) <= r * r).astype(np.uint8)
    mx = cv2.dilate(score, disk, borderType=cv2.BORDER_REPLICATE)
    py, px = np.nonzero((score >= mx) & (score > MIN_NCC))
    v = score[py, px]
    o = np.argsort(-v)
    return py[o], px[o], v[o]


def _level(f: np.ndarray, k: float) -> np.ndarray:
    if k <= 1.0:
        return f
    ny, nx = f.shape
    return cv2.resize(f, (max(8, int(round(nx / k))), max(8, int(round(ny / k)))), interpolation=cv2.INTER_AREA)


def _strength(score: np.ndarray, radius: float) -> float:
    """Mean of the strongest peaks (top quarter, at least 3): how well a scale fits the frame."""
    _, _, v = _peaks(score, radius)
    if v.size == 0:
        return -1.0
    return float(v[: max(3, v.size // 4)].mean())


def match_templates(f: np.ndarray, pixel_size_nm: tuple[float, float], templates: list[Template],
                    pixel_size_known: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """Detect the objects a reference explains.

    Parameters
    ----------
    f : float32 ``(ny, nx)`` flattened frame, finite (NaN filled).
    pixel_size_nm : ``(dx, dy)`` of the frame, nm.
    templates : the references (at least one).
    pixel_size_known : False for rendered images: the scale is searched (module docstring).

    Returns
    -------
    (centres, radii, scores, info) : float ``(N, 2)`` ``(x, y)`` pixels of the frame, float ``(N,)``
        object radius along x in pixels, float ``(N,)`` NCC, and ``{scale, ncc_threshold, level}``.
    """
    dx, dy = pixel_size_nm
    f = _unit_scale(f)
    ext_px = float(np.median([t.extent_nm for t in templates])) / dx  # at scale 1, frame pixels
    scales = [1.0]
    if not pixel_size_known:
        coarse = [2.0 ** (i / 2.0) for i in range(-3, 4)]
        best = max(coarse, key=lambda s: _fit(f, pixel_size_nm, templates, ext_px, s, 4, False))
        fine = [best * 2.0 ** (i / 4.0) for i in (-1, 0, 1)]
        scales = [max(fine, key=lambda s: _fit(f, pixel_size_nm, templates, ext_px, s, 6, True))]
    s = scales[0]
    k = max(1.0, ext_px * s / WORK_EXTENT_PX)
    fw = _level(f, k)
    kx, ky = f.shape[1] / fw.shape[1], f.shape[0] / fw.shape[0]
    score = score_map(fw, [p for t in templates for p in _poses(t, pixel_size_nm, s, k, ROTATIONS, True)])
    py, px, v = _peaks(score, NMS_DISTANCE * ext_px * s / kx)
    t_acc = MIN_NCC
    if v.size >= 4:
        # accepted level: half-way between the typical strong match and the NCC floor
        top = float(np.median(v[: max(3, v.size // 4)]))
        t_acc = max(MIN_NCC, 0.5 * (top + MIN_NCC) - 0.1)
    keep = v >= t_acc
    centres = np.column_stack([(px[keep] + 0.5) * kx - 0.5, (py[keep] + 0.5) * ky - 0.5]).astype(np.float64)
    radii = np.full(int(keep.sum()), 0.5 * ext_px * s)
    return centres, radii, v[keep].astype(np.float64), {"scale": round(s, 4), "ncc_threshold": round(t_acc, 3),
                                                         "level": round(k, 3)}


def _fit(f, ps, templates, ext_px, s, rotations, mirror) -> float:
    k = max(1.0, ext_px * s / WORK_EXTENT_PX)
    if ext_px * s > 0.6 * min(f.shape) or ext_px * s < 4:
        return -1.0
    fw = _level(f, k)
    score = score_map(fw, [p for t in templates for p in _poses(t, ps, s, k, rotations, mirror)])
    return _strength(score, NMS_DISTANCE * ext_px * s / (f.shape[1] / fw.shape[1]))


def template_labels(shape: tuple[int, int], centres: np.ndarray, radii: np.ndarray, scores: np.ndarray,
                    aspect: float = 1.0) -> np.ndarray:
    """int32 label image: a disc per detection (label i + 1), overlaps to the higher score.

    ``aspect`` = dy / dx of the frame's pixels (the disc is round in nm).
    """
    labels = np.zeros(shape, np.int32)
    order = np.argsort(-scores)
    for i in order:
        cx, cy = centres[i]
        r = radii[i]
        x0, x1 = max(0, int(np.floor(cx - r))), min(shape[1], int(np.ceil(cx + r)) + 1)
        y0, y1 = max(0, int(np.floor(cy - r / aspect))), min(shape[0], int(np.ceil(cy + r / aspect)) + 1)
        if x0 >= x1 or y0 >= y1:
            continue
        yy, xx = np.ogrid[y0:y1, x0:x1]
        disc = ((xx - cx) / r) ** 2 + ((yy - cy) * aspect / r) ** 2 <= 1.0
        sub = labels[y0:y1, x0:x1]
        sub[disc & (sub == 0)] = i + 1
    return labels
