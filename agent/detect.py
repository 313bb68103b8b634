"""Object detection at the molecule's scale: one molecule = one object.

Three detectors share one output, a list of :class:`agent.segment.Region` plus a per-frame report
(:class:`DetectionReport`):

``scale`` (:func:`scale_detect`)
    A scale-aware detector. With the object size ``s`` (extent, nm) - ``segment.object_size_nm``,
    or estimated per frame (within 0.5-2x the references' extents when there are references) by
    automatic scale selection in a scale-normalised Laplacian-of-Gaussian scale space (Lindeberg, Int. J. Comput. Vis. 30, 79
    (1998); :func:`estimate_object_size`) - it

    1. removes the background at a scale well above the object: a grey-level opening with a flat
       square of side ``3 s`` (rolling-ball / white top-hat background, Sternberg, Computer 16, 22
       (1983)). Terraces and steps (wider than the square) are kept by the opening and vanish from
       the top-hat; a plane is kept exactly;
    2. smooths at the molecule's scale (Gaussian, sigma ``s / 4``) and takes the local maxima at
       least ``0.4 s`` apart that stand out of the frame's noise as seeds, one per molecule (the
       lobes of one molecule merge at this scale, touching molecules do not). When the size is the
       scale-space blob size itself (objects are single blobs, not made of parts), the seeds are
       the maxima of the blob detector at that scale (``-s^2`` Laplacian at sigma ``s / 3.5``),
       whose negative surround keeps touching blobs apart (clusters in a chain on a step edge, the
       dim and bright molecules of a dense layer), their significance judged as above;
    3. grows each seed by marker-controlled watershed (Beucher & Meyer, "The morphological approach
       to segmentation: the watershed transformation", 1993; ``skimage.segmentation.watershed``) on
       the lightly smoothed top-hat: touching molecules are split along the valley between them,
       the lobes of one molecule join its seed;
    4. trims each object to the pixels at or above 25 % of its own height above the background
       and within 0.75 object sizes of its seed, and outlines it by the convex hull of those pixels (a molecule seen as separate lobes is
       one object).

    Objects inside the holes of a connected foreground are found like any other (the labels come
    from the watershed, not from outer contours).

``template`` (:mod:`agent.templates`)
    Reference poses correlated with the frame (normalised cross-correlation), for dense layers of
    known species, plus the scale detector's objects that no reference explains.

``otsu`` / ``value``
    The released UniMR threshold segmentation (:func:`agent.segment.segment`), kept selectable
    (the evaluation's ``unimr-as-released`` baseline uses it).

``auto`` (default)
    Chooses per frame (:func:`detect_objects`): the scale detector, and the template detector on
    dense frames when there are references; the choice and the reason are in the report.

Every function works in pixels of the frame; sizes given in nm are converted with the pixel size
``(dx, dy)``, which may differ along x and y. Images without a known pixel size (rendered images,
1 "nm" per pixel by convention) get their scale per image from :func:`estimate_object_size`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import cv2
import numpy as np
from scipy import ndimage as ndi
from skimage.segmentation import watershed

from stm_agent.agent.config import SegmentConfig
from stm_agent.agent.flatten import fill_nan
from stm_agent.agent.segment import MIN_SPECK_PX, Region, checked_frame, segment
from stm_agent.agent.templates import Template, match_templates, template_labels

#: Per-object support: pixels at or above this fraction of the object's own height (top-hat peak).
SUPPORT_FRACTION = 0.25
#: An object's pixels lie within this many object sizes of its seed (a radius: 0.75 = 1.5 x the size).
REACH = 0.75
#: An object is cut by the frame edge when its core (pixels >= this fraction of its height) touches it.
CORE_FRACTION = 0.5
#: Background removal: side of the flat square of the opening, in object sizes.
BACKGROUND_FACTOR = 3.0
#: Seeds: Gaussian sigma of the seed image and minimum seed distance, in object sizes.
SEED_SIGMA = 0.25
SEED_DISTANCE = 0.4
#: Seeds must stand this many noise standard deviations (pixel noise of the frame) above the background.
NOISE_K = 4.0
#: Seeds lower than this fraction of the typical object height (top-hat) are substrate bumps.
PEAK_FRACTION = 0.3
#: Objects smaller than this fraction of the expected area (pi s^2 / 4) are specks.
MIN_AREA_FRACTION = 0.08
#: ``auto``: a frame is dense (template detector when there are references) when the scale
#: detector finds 3 objects or more that cover at least DENSE_COVER of it, or whose median
#: nearest-neighbour distance is at most DENSE_SPACING x their median extent (they touch;
#: :func:`packing`). Measured: fhpb 0.47-0.62 / 0.79-0.91, TCNE monolayer 0.62 / 0.76; sparse
#: 0.06-0.11 / 1.29-1.89, isolated Au(111) adsorbates 0.28 / 1.15.
DENSE_COVER = 0.5
DENSE_SPACING = 1.1
#: ... and in either case the objects cover at least DENSE_MIN_COVER of the frame: touching
#: objects that cover little of it are a chain (e.g. clusters decorating a step edge: 9 %), not a
#: layer, and the template detector would match the bare terraces between them.
DENSE_MIN_COVER = 0.3
#: Blob seeds: Lowe's edge-response bound tr^2 / det < (r + 1)^2 / r with r = 10 (a ridge fails it).
EDGE_RATIO = 11.0 ** 2 / 10.0
#: An object spans at least this many scan lines and pixels (fewer cannot be told from line noise).
MIN_LINES = 3
#: Automatic size search range, pixels of extent (before the image-size cap).
AUTO_MIN_EXTENT_PX = 4.0
#: Object extent per scale-space sigma of its blob (see :func:`estimate_object_size`).
EXTENT_PER_SIGMA = 3.5


@dataclass
class DetectionReport:
    """How the objects of one frame were detected (``FrameResult.detection``).

    Attributes
    ----------
    method : str
        Detector used: ``scale``, ``template`` (with the scale detector's unexplained objects),
        ``otsu`` or ``value``.
    requested : str
        ``segment.method`` as configured (``auto`` or a detector name).
    reason : str
        Why ``auto`` chose ``method`` (or ``"configured"``).
    object_size_nm : float | None
        Object extent used (nm, in the frame's pixel-size units), None for the threshold detectors.
    size_source : str | None
        ``config`` (``segment.object_size_nm``), ``auto`` (scale-space estimate of this frame) or
        ``auto within 0.5-2x the references``.
    n_regions : int
        Objects found (edge objects included).
    note : str | None
        Set when the result deserves a look: nothing found, or one region covering most of the frame
        (and why).
    """

    method: str
    requested: str
    reason: str = "configured"
    object_size_nm: float | None = None
    size_source: str | None = None
    n_regions: int = 0
    note: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict (floats rounded)."""
        d = asdict(self)
        if d["object_size_nm"] is not None:
            d["object_size_nm"] = round(float(d["object_size_nm"]), 5)
        extra = d.pop("extra")
        return {**d, **extra}


# --------------------------------------------------------------------------- helpers
def pixel_noise(image: np.ndarray, valid: np.ndarray | None = None) -> float:
    """Robust pixel noise of a frame: 1.4826 MAD of the fast-axis differences / sqrt(2).

    Differences of neighbouring pixels cancel everything smoother than a pixel (objects, steps,
    tilt), so their robust spread measures the white part of the noise (the estimator of
    Immerkaer, CVIU 64, 300 (1996) in its MAD form). Units of ``image``; 0 for a constant frame.
    """
    d = np.diff(image, axis=1)
    if valid is not None:
        d = d[valid[:, 1:] & valid[:, :-1]]
    d = d[np.isfinite(d)]
    if d.size == 0:
        return 0.0
    if d.size > 1 << 16:  # a robust spread needs no more samples (and medians cost O(N))
        d = d[:: d.size >> 16]
    return float(1.4826 * np.median(np.abs(d - np.median(d))) / np.sqrt(2.0))


def _median3_rows(img: np.ndarray) -> np.ndarray:
    if img.shape[0] < 3:
        return img
    a, b, c = img[:-2], img[1:-1], img[2:]
    out = img.copy()
    out[1:-1] = np.maximum(np.minimum(a, b), np.minimum(np.maximum(a, b), c))
    return out


def line_median(img: np.ndarray) -> np.ndarray:
    """3-line median along the slow scan axis, then 3-pixel median along the fast axis.

    A tip glitch or a streak is recorded on one line, a spike on one pixel; an object is 2-D and
    covers several consecutive lines and pixels, which these medians keep whole (a feature 2 lines
    or 2 pixels wide survives). The border rows and columns are kept. float32 ``(ny, nx)``.
    """
    return np.ascontiguousarray(_median3_rows(np.ascontiguousarray(_median3_rows(img).T)).T)


def _disc_max(img: np.ndarray, rx: int, ry: int) -> np.ndarray:
    """Grey dilation of ``img`` by an elliptical disc of radii ``(rx, ry)`` px (replicated border).

    Small discs use their exact kernel; from radii of 8 px the disc is the union of 6 centred
    rectangles inscribed in it (a staircase that fills it to within 1 %), each dilation O(1) per
    pixel with OpenCV's rectangular kernels (van Herk / Gil-Werman), instead of O(r^2).
    """
    if min(rx, ry) < 8:
        yy, xx = np.ogrid[-ry:ry + 1, -rx:rx + 1]
        disc = ((yy / ry) ** 2 + (xx / rx) ** 2 <= 1.0).astype(np.uint8)
        return cv2.dilate(img, disc, borderType=cv2.BORDER_REPLICATE)
    out = None
    for t in (np.arange(6) + 0.5) * (np.pi / 12):
        k = cv2.getStructuringElement(cv2.MORPH_RECT, (2 * int(rx * np.cos(t)) + 1, 2 * int(ry * np.sin(t)) + 1))
        d = cv2.dilate(img, k, borderType=cv2.BORDER_REPLICATE)
        out = d if out is None else np.maximum(out, d, out=out)
    return out


def _gauss(img: np.ndarray, sx: float, sy: float) -> np.ndarray:
    if sx <= 0.3 and sy <= 0.3:
        return img
    return cv2.GaussianBlur(img, (0, 0), sigmaX=max(sx, 0.3), sigmaY=max(sy, 0.3), borderType=cv2.BORDER_REFLECT)


def _opening(img: np.ndarray, kx: int, ky: int) -> np.ndarray:
    """Grey opening with a flat ``ky x kx`` rectangle (OpenCV, van Herk / Gil-Werman O(1) per pixel)."""
    kx, ky = max(1, kx) | 1, max(1, ky) | 1
    k = cv2.getStructuringElement(cv2.MORPH_RECT, (kx, ky))
    return cv2.morphologyEx(img, cv2.MORPH_OPEN, k, borderType=cv2.BORDER_REPLICATE)


def top_hat(img: np.ndarray, size_px: tuple[float, float]) -> np.ndarray:
    """White top-hat ``img - opening(img)`` with a flat square of ``BACKGROUND_FACTOR`` x the object size.

    ``size_px`` = object extent ``(x, y)`` in pixels. float32 ``(ny, nx)``, >= 0.
    """
    kx = int(round(BACKGROUND_FACTOR * size_px[0]))
    ky = int(round(BACKGROUND_FACTOR * size_px[1]))
    kx, ky = min(kx, 2 * img.shape[1] + 1), min(ky, 2 * img.shape[0] + 1)
    return img - _opening(img, kx, ky)


def estimate_object_size(image: np.ndarray, pixel_size_nm: tuple[float, float],
                         lo_nm: float | None = None, hi_nm: float | None = None,
                         valid: np.ndarray | None = None) -> float:
    """Typical object extent of a frame by automatic scale selection (Lindeberg 1998).

    The frame (bright objects up) is first freed of structures larger than a quarter of the frame
    (top-hat: steps and terraces), reduced to at most 256 px on its long side (area average), and
    the scale-normalised determinant of the Hessian ``D(sigma) = sigma^4 det H(G_sigma * f)`` is
    computed on a geometric grid of sigma (4 per octave); the response is ``sqrt(D)`` where both
    curvatures are negative (a bright blob), else 0. Blobs are the local maxima of the response over
    position and scale (3 x 3 x 3 neighbourhood, inner scales only; Lindeberg's scale-space blob
    detector, the DoH variant: it selects the scale of a blob like the Laplacian does, but answers
    ~0 on ridges and step edges, where one curvature vanishes, so that clusters sitting on a
    decorated step or touching in a chain do not pull the scale up). Blobs whose disc is cut by the
    frame edge or by unacquired (NaN) rows are not counted (their size is not seen). The object
    extent is the response-weighted median scale of the strong blobs (response >= 25 % of the
    strongest), each blob counted once whatever its area, converted as extent = 3.5 sigma (between
    a flat disc, 2 sqrt(2) sigma, and a Gaussian at 10 % of its height, 4.3 sigma).

    Parameters
    ----------
    image : float ``(ny, nx)``, finite (fill NaN first). pixel_size_nm : ``(dx, dy)`` nm.
    lo_nm, hi_nm : search range of the extent, nm (default: 4 px to a quarter of the shorter side).
    valid : bool ``(ny, nx)`` acquired pixels (blobs elsewhere are ignored).

    Returns
    -------
    float
        Object extent, nm (``dx`` units along x). The lower bound when no blob is found.
    """
    dx, dy = pixel_size_nm
    ny, nx = image.shape
    ratio = dy / dx
    f, valid, k = _reduced(np.asarray(image, np.float32), valid)
    f = f - _opening(f, max(3, f.shape[1] // 4), max(3, f.shape[0] // 4))
    cap = max(AUTO_MIN_EXTENT_PX, min(nx, ny * ratio) / 4.0)  # no object larger than a quarter frame
    # an object spans at least MIN_LINES scan lines: with coarse lines (dy >> dx) smaller ones are
    # not resolved along the slow axis
    lo_px = min(max(AUTO_MIN_EXTENT_PX, MIN_LINES * ratio, (lo_nm / dx) if lo_nm else 0.0), cap)
    hi_px = min(max(cap, 2 * lo_px) if not hi_nm else hi_nm / dx, cap)
    hi_px = max(hi_px, lo_px)
    ext = lo_px * 2.0 ** (np.arange(-1, 41) / 4.0)
    ext = ext[ext <= hi_px * 2 ** 0.25 * 1.0001]
    if len(ext) < 3:
        return float(lo_px * dx)
    stack = []
    kxx = np.array([[1.0, -2.0, 1.0]], np.float32)
    kxy = np.array([[1.0, 0.0, -1.0], [0.0, 0.0, 0.0], [-1.0, 0.0, 1.0]], np.float32) / 4.0
    for e in ext:
        s = e / EXTENT_PER_SIGMA / k  # sigma in reduced pixels along x
        g = _gauss(f, s, s / ratio)
        # Hessian in units of x pixels (rows are `ratio` x pixels apart), scale-normalised by s^2
        lxx = cv2.filter2D(g, -1, kxx, borderType=cv2.BORDER_REFLECT) * np.float32(s * s)
        lyy = cv2.filter2D(g, -1, kxx.T, borderType=cv2.BORDER_REFLECT) * np.float32(s * s / ratio ** 2)
        lxy = cv2.filter2D(g, -1, kxy, borderType=cv2.BORDER_REFLECT) * np.float32(s * s / ratio)
        det = lxx * lyy - lxy * lxy
        # sqrt(det H) of a bright blob (both curvatures negative): a height, like -s^2 Laplacian, but
        # ~0 on a ridge or a step edge (one curvature ~0), so clusters lined up along a decorated step
        # do not pull the scale up as one elongated blob
        stack.append(np.where((lxx < 0) & (det > 0), np.sqrt(np.maximum(det, 0.0)), 0.0).astype(np.float32))
    r = np.stack(stack)
    k3 = np.ones((3, 3), np.uint8)
    d2 = np.stack([cv2.dilate(x, k3, borderType=cv2.BORDER_REPLICATE) for x in r])
    mx = np.maximum(d2, np.maximum(np.concatenate([d2[:1], d2[:-1]]), np.concatenate([d2[1:], d2[-1:]])))
    pk = (r >= mx) & (r > 0)
    pk[0] = pk[-1] = False
    inside = np.ones(f.shape, np.uint8) if valid is None else valid.astype(np.uint8)
    whole = np.zeros_like(pk)
    for i, e in enumerate(ext):
        # a blob whose disc (extent e) is cut by the frame edge or the NaN rows has no measurable size
        rx = int(np.ceil(e / 2 / k))
        ry = int(np.ceil(e / 2 / k / ratio))
        whole[i] = cv2.erode(inside, np.ones((2 * ry + 1, 2 * rx + 1), np.uint8), borderType=cv2.BORDER_CONSTANT,
                             borderValue=0) > 0
    if (pk & whole).any():
        pk &= whole
    elif valid is not None:
        pk &= valid[None]
    si, yi, xi = np.nonzero(pk)
    v = r[pk]
    if v.size == 0:
        return float(lo_px * dx)
    # sub-step scale of each blob: the parabola through its response at the scales below, at and
    # above (in log scale, as SIFT's scale refinement), so that the median moves smoothly
    rm, rp = r[si - 1, yi, xi], r[si + 1, yi, xi]
    curv = rm - 2.0 * v + rp
    off = np.clip(np.where(curv < 0, 0.5 * (rm - rp) / np.where(curv < 0, curv, -1.0), 0.0), -0.5, 0.5)
    e_all = ext[si] * 2.0 ** (off / 4.0)
    sel = v >= 0.25 * v.max()
    w, e = v[sel], e_all[sel]
    o = np.argsort(e)
    cw = np.cumsum(w[o])
    return float(e[o][np.searchsorted(cw, 0.5 * cw[-1])] * dx)


def _reduced(f: np.ndarray, valid: np.ndarray | None, side: int = 256):
    """``(f, valid, k)``: ``f`` area-averaged by the integer factor ``k`` that brings it to <= ``side`` px."""
    ny, nx = f.shape
    k = max(1, int(np.ceil(max(ny, nx) / side)))
    if k == 1:
        return f, valid, 1
    g = cv2.resize(f, (max(1, nx // k), max(1, ny // k)), interpolation=cv2.INTER_AREA)
    if valid is not None:
        valid = cv2.resize(valid.astype(np.uint8), (g.shape[1], g.shape[0]), interpolation=cv2.INTER_NEAREST) > 0
    return g, valid, k


def foreground_components(image: np.ndarray, noise: float,
                          valid: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray] | None:
    """Connected foreground of a frame whose objects stand apart, else None.

    The frame is freed of structures larger than a quarter of it (top-hat), thresholded at 15 % of
    the typical object height (median of the strongest tenth of its local maxima, and at least
    :data:`NOISE_K` pixel-noise standard deviations); the 8-connected components of at least
    16 px are returned when together they cover under 30 % of the frame (objects apart), None for
    a connected network (dense layer, lattice).

    Frames over 256 px are first reduced by an integer factor ``k`` (area average).

    Returns
    -------
    (labels, stats, k) | None : int32 component labels (0 = background) of the reduced frame, the
        OpenCV ``(n, 5)`` stats (x, y, w, h, area, reduced pixels) of labels 0..n-1 (small ones
        relabelled 0), and ``k``.
    """
    f, valid, k = _reduced(np.asarray(image, np.float32), valid)
    ny, nx = f.shape
    th = _gauss(f - _opening(f, max(3, nx // 4), max(3, ny // 4)), 1.0, 1.0)
    if valid is not None:
        th = np.where(valid, th, 0).astype(np.float32)
    mx = cv2.dilate(th, np.ones((5, 5), np.uint8))
    pk = th[(th >= mx) & (th > NOISE_K * noise)]
    if pk.size == 0:
        return None
    top = np.sort(pk)[::-1][: max(3, pk.size // 10)]
    t = max(0.15 * float(np.median(top)), NOISE_K * noise)
    n, lab, st, _ = cv2.connectedComponentsWithStats((th > t).astype(np.uint8), connectivity=8)
    small = st[:, 4] < 16
    small[0] = False
    n_valid = int(valid.sum()) if valid is not None else nx * ny
    if small.all() or st[1:, 4][~small[1:]].sum() > 0.3 * n_valid:
        return None
    lab[small[lab]] = 0
    return lab.astype(np.int32), st, k


def whole_object_size(image: np.ndarray, pixel_size_nm: tuple[float, float], noise: float, seeds: np.ndarray,
                      size_nm: float, valid: np.ndarray | None = None) -> float | None:
    """Extent of objects larger than the scale-space size (made of parts), or None.

    A molecule imaged with internal structure (lobes, bonds, a porphyrin in constant-height
    current) gives scale-space blobs at the scale of its parts; what makes it one object is that
    its parts are joined by signal above the background while separate molecules are not. Among
    the frame's :func:`foreground_components` (objects apart) under 0.4 x the frame across and of
    at least a quarter of the median such one's area that hold a seed of the scale detector (``seeds``, bool ``(ny, nx)``, found at
    ``size_nm``), a component is *composite* when it holds two seeds or more or is at least
    1.8 x ``size_nm`` across (longer side of its bounding box). When composites are the majority,
    their median extent (nm) is returned. Sparse molecules seen as single blobs (touching pairs a
    minority) and dense layers (no separate components) give None.
    """
    comp = foreground_components(image, noise, valid)
    if comp is None:
        return None
    lab, st, k = comp
    sy, sx = np.nonzero(seeds)
    per = np.bincount(lab[np.minimum(sy // k, lab.shape[0] - 1), np.minimum(sx // k, lab.shape[1] - 1)],
                      minlength=len(st))
    ext = np.maximum(st[:, 2] * k * pixel_size_nm[0], st[:, 3] * k * pixel_size_nm[1])
    ny, nx = image.shape
    # objects, not a network: under 0.75 x the frame and 8 x the scale-space size across
    small = (ext <= 0.75 * min(nx * pixel_size_nm[0], ny * pixel_size_nm[1])) & (ext <= 8.0 * size_nm)
    cand = (per >= 1) & small
    cand[0] = False
    if not cand.any():
        return None
    composite = cand & ((per >= 2) | (ext >= 1.8 * size_nm))
    # vote by seeds: the specks between the lobes of a molecule hold few
    if per[composite].sum() <= 0.5 * per[cand].sum():
        return None
    return float(np.median(ext[composite]))


def _edge_flags(labels: np.ndarray, n: int, valid: np.ndarray) -> np.ndarray:
    """bool ``(n + 1,)``: label touches the image border or the NaN boundary."""
    edge = np.zeros(n + 1, bool)
    border = np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])
    edge[np.unique(border)] = True
    if not valid.all():
        grown = cv2.dilate((~valid).astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
        edge[np.unique(labels[grown])] = True
    edge[0] = False
    return edge


def regions_from_labels(labels: np.ndarray, valid: np.ndarray, pixel_size_nm: tuple[float, float],
                        contrast: int = 1, label_offset: int = 0,
                        edge_labels: np.ndarray | None = None) -> list[Region]:
    """One :class:`Region` per label of a label image (0 = background).

    ``touches_edge`` is set when the label (or, given ``edge_labels``, its part there: the core of
    the object) touches the image border or the NaN boundary of a partial scan.

    A label may be several separate pieces (the lobes of one molecule): its outline is the convex
    hull of all its pixels (``cv2.convexHull``), its ``extent_nm`` the diameter of the minimum
    enclosing circle of that hull plus one pixel, ``bbox_px`` / ``centroid_px`` / ``area_px`` those
    of its pixels. Labels smaller than :data:`agent.segment.MIN_SPECK_PX` pixels are dropped.
    """
    dx, dy = pixel_size_nm
    n = int(labels.max())
    if n == 0:
        return []
    edge = _edge_flags(labels if edge_labels is None else edge_labels, n, valid)
    flat = np.flatnonzero(labels)
    lab = labels.ravel()[flat]
    areas = np.bincount(lab, minlength=n + 1)
    slices = ndi.find_objects(labels)
    cy = np.bincount(lab, weights=flat // labels.shape[1], minlength=n + 1) / np.maximum(areas, 1)
    cx = np.bincount(lab, weights=flat % labels.shape[1], minlength=n + 1) / np.maximum(areas, 1)
    scale = np.array([dx, dy], np.float32)
    out = []
    for i, sl in enumerate(slices, start=1):
        if sl is None or areas[i] < MIN_SPECK_PX:
            continue
        sub = labels[sl] == i
        py, px = np.nonzero(sub)
        pts = np.stack([px + sl[1].start, py + sl[0].start], 1).astype(np.int32)
        hull = cv2.convexHull(pts.reshape(-1, 1, 2)).reshape(-1, 2)
        (_, _), r = cv2.minEnclosingCircle((hull.astype(np.float32) * scale).reshape(-1, 1, 2))
        out.append(Region(
            label=i + label_offset,
            bbox_px=(int(sl[1].start), int(sl[0].start), int(sl[1].stop - sl[1].start), int(sl[0].stop - sl[0].start)),
            centroid_px=(float(cx[i]), float(cy[i])),
            area_px=int(areas[i]),
            area_nm2=float(areas[i]) * dx * dy,
            extent_nm=float(2 * r + max(dx, dy)),
            touches_edge=bool(edge[i]),
            contour=hull.astype(np.int32),
            contrast=contrast,
        ))
    return out


# --------------------------------------------------------------------------- scale detector
def scale_labels(f: np.ndarray, valid: np.ndarray, size_px: tuple[float, float], noise: float,
                 blob_seeds: bool = False, seeds_only: bool = False) -> tuple[np.ndarray, dict]:
    """Label image of the bright objects of ``f`` at object extent ``size_px`` = ``(x, y)`` pixels.

    Steps 1-4 of the module docstring. ``f`` float32 finite ``(ny, nx)``; ``noise`` the pixel noise
    (:func:`pixel_noise`); ``blob_seeds``: seeds at the scale-space blob maxima (step 2);
    ``seeds_only``: stop after the seeds (empty labels, ``seeds`` and ``seed_mask`` set). Returns int32 ``(ny, nx)`` labels (0 = background) and diagnostics
    (``threshold``: the seed significance level on the top-hat; ``cover``: foreground fraction).
    """
    sx, sy_px = size_px
    detail = _gauss(f, max(0.5, sx / 16), max(0.5, sy_px / 16))
    th = top_hat(detail, size_px)
    th[~valid] = 0
    seed_img = _gauss(th, SEED_SIGMA * sx, SEED_SIGMA * sy_px)
    t_noise = NOISE_K * noise
    ry, rx = max(1, int(round(SEED_DISTANCE * sy_px))), max(1, int(round(SEED_DISTANCE * sx)))
    where = seed_img
    if blob_seeds:
        # the objects are scale-space blobs of this extent: seeds at the blob detector's maxima at the
        # blob scale (-sigma^2 Laplacian), whose negative surround splits touching blobs that the
        # smoothed image merges (clusters in a chain along a step); significance still on seed_img
        sb = 1.0 / EXTENT_PER_SIGMA
        g = _gauss(th, sb * sx, sb * sy_px)
        lxx = cv2.Sobel(g, cv2.CV_32F, 2, 0, ksize=3) * np.float32(sx * sx)
        lyy = cv2.Sobel(g, cv2.CV_32F, 0, 2, ksize=3) * np.float32(sy_px * sy_px)
        lxy = cv2.Sobel(g, cv2.CV_32F, 1, 1, ksize=3) * np.float32(sx * sy_px)
        where = -(lxx + lyy)
        # a blob is 2-D: a streak, a scan line or a drawn line is a ridge, one curvature ~0. Lowe's
        # edge-response test (IJCV 60, 91 (2004), r = 10): tr^2 / det < (r + 1)^2 / r, det > 0
        det = lxx * lyy - lxy * lxy
        blob = (det > 0) & (where * where < EDGE_RATIO * det)
    mx = _disc_max(where, rx, ry)
    peaks = (where >= mx) & (where > 0) & (seed_img > t_noise) & valid
    if blob_seeds:
        peaks &= blob
    t = t_noise
    heights = np.sort(seed_img[peaks])[::-1]
    if heights.size:
        # typical object height: median of the strongest tenth of the peaks (at least 3)
        top = heights[: max(3, heights.size // 10)]
        t = max(t_noise, PEAK_FRACTION * float(np.median(top)))
        peaks &= seed_img > t
    markers, n_seeds = ndi.label(peaks, structure=np.ones((3, 3)))
    if n_seeds == 0 or seeds_only:
        return np.zeros(f.shape, np.int32), {"threshold": t, "cover": 0.0, "seeds": int(n_seeds), "core": None,
                                             "seed_mask": peaks}
    # basins of the seeds, down to the noise level of the top-hat; the watershed runs only on the
    # connected pieces of the foreground that hold several seeds (the others are one object each)
    low = max(t_noise * 0.5, 1e-30)
    mask = (th > low) & valid
    n_cc, cc = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
    sp = markers > 0
    pairs = np.unique(cc[sp].astype(np.int64) * (n_seeds + 1) + markers[sp])
    pc, pm = pairs // (n_seeds + 1), pairs % (n_seeds + 1)
    per_cc = np.bincount(pc, minlength=n_cc)
    per_cc[0] = 0
    lut = np.zeros(n_cc, np.int32)
    one = per_cc[pc] == 1
    lut[pc[one]] = pm[one]
    labels = lut[cc]
    multi = per_cc >= 2
    if multi.any():
        ws = watershed(-th, markers, mask=mask & multi[cc])
        labels = np.where(multi[cc], ws, labels).astype(np.int32)
    # per-object support: >= SUPPORT_FRACTION of the object's own peak, within REACH sizes of its seed
    ny, nx = labels.shape
    idx = np.flatnonzero(labels)
    lab = labels.ravel()[idx]
    val = th.ravel()[idx]
    peak = np.zeros(n_seeds + 1, np.float32)
    np.maximum.at(peak, lab, val)
    sy, sx_ = np.nonzero(sp)
    cnt = np.maximum(np.bincount(markers[sp], minlength=n_seeds + 1), 1)
    cy = np.bincount(markers[sp], weights=sy, minlength=n_seeds + 1) / cnt
    cx = np.bincount(markers[sp], weights=sx_, minlength=n_seeds + 1) / cnt
    px, py = idx % nx, idx // nx
    near = ((px - cx[lab]) / (REACH * sx)) ** 2 + ((py - cy[lab]) / (REACH * sy_px)) ** 2 <= 1.0
    keep = (val >= SUPPORT_FRACTION * peak[lab]) & near
    # drop specks (relative to the expected area)
    areas = np.bincount(lab[keep], minlength=n_seeds + 1)
    min_area = max(MIN_SPECK_PX, MIN_AREA_FRACTION * np.pi * sx * sy_px / 4.0)
    keep &= areas[lab] >= min_area
    labels = np.zeros(ny * nx, np.int32)
    labels[idx[keep]] = lab[keep]
    labels = labels.reshape(ny, nx)
    cover = float(np.count_nonzero(keep)) / max(int(valid.sum()), 1)
    # core (>= half the object's height): an object is cut by the frame edge only if its core is
    core = np.zeros(ny * nx, np.int32)
    in_core = keep & (val >= CORE_FRACTION * peak[lab])
    core[idx[in_core]] = lab[in_core]
    return labels, {"threshold": t, "cover": cover, "seeds": int(n_seeds), "core": core.reshape(ny, nx),
                    "seed_mask": sp}


def scale_detect(image: np.ndarray, pixel_size_nm: tuple[float, float], cfg: SegmentConfig,
                 size_nm: float | None = None,
                 size_range_nm: tuple[float, float] | None = None) -> tuple[list[Region], dict]:
    """Scale-aware detection (module docstring).

    ``size_nm`` = object extent, nm, used as given; None: estimated per frame
    (:func:`estimate_object_size`), within ``size_range_nm`` (nm) when given.

    ``polarity`` ``dark`` detects depressions (the frame negated), ``both`` protrusions and
    depressions in two passes (labels kept unique, ``Region.contrast`` +1 / -1).

    Returns
    -------
    (regions, info) : regions sorted top-to-bottom, left-to-right; info has ``object_size_nm``,
    ``size_source`` (``given`` or ``auto``), ``threshold``, ``cover``, ``seeds``.
    """
    dx, dy = float(pixel_size_nm[0]), float(pixel_size_nm[1])
    f, valid = fill_nan(np.asarray(image, np.float32))
    # the noise a seed must stand out of: along the fast axis (pixel noise) and across lines, where
    # line-to-line noise (tip changes, streaks, feedback jitter) adds to it
    a = np.asarray(image, np.float32)
    noise = max(pixel_noise(a, valid), pixel_noise(np.ascontiguousarray(a.T), np.ascontiguousarray(valid.T)))
    # scan-line glitches and spikes (one line, one pixel) are not objects: an object spans several
    # lines and pixels
    f = line_median(f)
    signs = {"bright": [1], "dark": [-1], "both": [1, -1]}[cfg.polarity]
    source = "given" if size_nm else "auto"
    if not size_nm:
        lo, hi = size_range_nm if size_range_nm else (None, None)
        g = f if signs[0] > 0 else -f
        size_nm = estimate_object_size(g, (dx, dy), lo, hi, valid=valid)
        sx = min(size_nm, max(f.shape[1] * dx, f.shape[0] * dy))
        # seeds of the smoothed image (no watershed) to test whether the blobs are parts of objects
        d0 = scale_labels(g, valid, (max(sx / dx, 1.0), max(sx / dy, 1.0)), noise, seeds_only=True)[1]
        whole = whole_object_size(g, (dx, dy), noise, d0["seed_mask"], sx, valid) if d0["seeds"] else None
        if whole is not None and whole > 1.25 * size_nm:
            # the scale-space blobs are parts (lobes) of objects that stand apart: take the objects
            size_nm = float(np.clip(whole, lo or 0.0, hi or np.inf))
            source = "auto: objects made of parts"
    # an object is at most the frame (a wrong pixel size in the header must not allocate without bound)
    ny, nx = f.shape
    size_nm = float(min(size_nm, max(nx * dx, ny * dy)))
    size_px = (max(size_nm / dx, 1.0), max(size_nm / dy, 1.0))
    regions: list[Region] = []
    info: dict[str, Any] = {"object_size_nm": float(size_nm), "size_source": source}
    if min(size_px) < MIN_LINES:
        # what lives on fewer than 3 lines (or columns) cannot be told from line noise: not an object
        info["unresolved"] = (f"no object: objects of {size_nm:.3g} nm span {size_nm / dy:.1f} scan lines "
                              f"({dy:.3g} nm per line) and {size_nm / dx:.1f} pixels; at least {MIN_LINES} "
                              "of each are needed to tell an object from line noise")
        signs = []
    offset = 0
    for k, sgn in enumerate(signs):
        labels, diag = scale_labels(f if sgn > 0 else -f, valid, size_px, noise, blob_seeds=source == "auto")
        core = diag.pop("core")
        diag.pop("seed_mask")
        regions += regions_from_labels(labels, valid, (dx, dy), contrast=sgn, label_offset=offset, edge_labels=core)
        offset += int(labels.max())
        for k, v in diag.items():
            info[k if sgn > 0 else f"{k}_dark"] = v
    regions.sort(key=lambda r: (r.centroid_px[1], r.centroid_px[0]))
    return regions, info


# --------------------------------------------------------------------------- entry point
def detect_objects(image: np.ndarray, pixel_size_nm: tuple[float, float], cfg: SegmentConfig,
                   reference_extents_nm: list[float] | None = None,
                   pixel_size_known: bool = True,
                   templates: list[Template] | None = None) -> tuple[list[Region], DetectionReport]:
    """Detect the objects of a flattened frame with the configured detector (``segment.method``).

    ``auto`` (default) runs the scale detector; when references are given as ``templates`` and the
    frame is dense (>= 3 scale-detector objects that cover >= :data:`DENSE_COVER` of the frame, or
    touch: :func:`packing` <= :data:`DENSE_SPACING`; a monolayer, a lattice, molecules seen as
    lobes), the reference-template detector
    (:mod:`agent.templates`) finds the objects the references explain, and the scale detector's
    objects that no template detection explains and that are at least half the references'
    extent are added (they are counted as ``other``; smaller ones are taken for the lobes of a
    molecule the references missed).
    Sparse frames keep the scale detector alone (it finds every object, whatever its species, and
    costs less). ``template`` forces that combination whenever there are references.

    Parameters
    ----------
    image : np.ndarray
        float ``(ny, nx)`` flattened frame (:func:`agent.flatten.flatten`), NaN = not acquired.
    pixel_size_nm : (dx, dy)
        Pixel size, nm (1 "nm" per pixel for images without one).
    cfg : SegmentConfig
        ``method`` (``auto``, ``scale``, ``template``, ``otsu``, ``value``), ``object_size_nm``,
        polarity ...
    reference_extents_nm : list[float] | None
        Extents (nm) of the library's references: the scale detector estimates the object size
        of the frame within 0.5 x the smallest to 2 x the largest of them (an exact
        ``segment.object_size_nm`` takes precedence). Taken from ``templates`` when None.
    pixel_size_known : bool
        False for rendered images without a physical pixel size (1 "nm" per pixel): a size in nm
        means nothing there, so the scale detector estimates the object size per image, the
        references' extents and ``object_size_nm`` are not used, and the template detector
        searches the scale (0.35-2.8x the references).
    templates : list[agent.templates.Template] | None
        The references as crops, for the template detector.

    Returns
    -------
    (regions, report) : the :class:`Region` list and the :class:`DetectionReport` of the frame.

    Raises
    ------
    ValueError
        ``image`` is not 2-D or the pixel size is not positive.
    """
    img, dx, dy = checked_frame(image, pixel_size_nm, "detection")
    if reference_extents_nm is None and templates:
        reference_extents_nm = [t.extent_nm for t in templates]
    method = cfg.method
    if method in ("otsu", "value"):
        regions = segment(img, (dx, dy), cfg)
        rep = DetectionReport(method=method, requested=cfg.method, n_regions=len(regions))
        rep.note = _note(regions, img)
        return regions, rep
    size_nm, source, rng = None, "auto", None
    if not pixel_size_known:
        pass
    elif cfg.object_size_nm is not None:
        size_nm, source = float(cfg.object_size_nm), "config"
    elif reference_extents_nm:
        # estimated on the frame, within a factor 2 of the references' extents: other objects
        # (counted as `other`) may differ in size, the library only bounds the search
        rng = (0.5 * min(reference_extents_nm), 2.0 * max(reference_extents_nm))
        source = "auto within 0.5-2x the references"
    regions, info = scale_detect(img, (dx, dy), cfg, size_nm, rng)
    extra = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in info.items()
             if k not in ("size_source", "object_size_nm", "threshold", "threshold_dark", "unresolved")}
    if info.get("size_source", "").startswith("auto:"):
        source = info["size_source"]
    rep = DetectionReport(method="scale", requested=cfg.method, reason="configured" if method == "scale" else
                          "sparse frame: scale-space detector", object_size_nm=info["object_size_nm"],
                          size_source=source, n_regions=len(regions), extra=extra)
    if method != "scale" and templates:
        cover = float(info.get("cover", 0.0))
        spacing = packing(regions, (dx, dy))
        dense = len(regions) >= 3 and cover >= DENSE_MIN_COVER and (cover >= DENSE_COVER or spacing <= DENSE_SPACING)
        why = f"objects cover {cover:.0%}, nearest-neighbour distance {spacing:.2f} x their extent"
        if method == "template" or dense:
            regions, tinfo = _with_templates(img, (dx, dy), templates, regions, pixel_size_known)
            rep.method = "template"
            rep.reason = ("configured" if method == "template" else
                          f"dense frame ({why}) and references: template matching, plus the scale "
                          "detector's objects no reference explains")
            rep.n_regions = len(regions)
            rep.extra.update(tinfo)
        elif method == "auto":
            rep.reason = f"sparse frame ({why}): scale-space detector"
    elif method == "template":
        rep.reason = "template requested but no reference: scale-space detector"
    rep.note = info.get("unresolved") or _note(regions, img)
    return regions, rep


def packing(regions: list[Region], pixel_size_nm: tuple[float, float]) -> float:
    """Median nearest-neighbour centroid distance over the median object extent (inf for < 3 objects).

    ~0.7-1.0 where objects touch (monolayers, lattices, a molecule seen as lobes), >= 1.5 for
    sparse adsorbates (measured on the shared scans and labelled images).
    """
    if len(regions) < 3:
        return float("inf")
    c = np.array([r.centroid_px for r in regions], np.float64) * np.asarray(pixel_size_nm, np.float64)
    d2 = ((c[:, None, :] - c[None, :, :]) ** 2).sum(-1) if len(c) <= 2000 else None
    if d2 is None:  # very many objects: a k-d tree instead of the N^2 matrix
        from scipy.spatial import cKDTree

        nn = cKDTree(c).query(c, k=2)[0][:, 1]
    else:
        np.fill_diagonal(d2, np.inf)
        nn = np.sqrt(d2.min(axis=1))
    ext = float(np.median([r.extent_nm for r in regions]))
    return float(np.median(nn) / ext) if ext > 0 else float("inf")


def _with_templates(img: np.ndarray, ps: tuple[float, float], templates: list[Template],
                    scale_regions: list[Region], pixel_size_known: bool) -> tuple[list[Region], dict]:
    """Template detections + the scale detector's regions farther than half an extent from all of them
    and at least half the references' extent in size."""
    f, valid = fill_nan(np.asarray(img, np.float32))
    centres, radii, scores, info = match_templates(f, ps, templates, pixel_size_known)
    labels = template_labels(f.shape, centres, radii, scores, aspect=ps[1] / ps[0])
    labels[~valid] = 0
    regions = regions_from_labels(labels, valid, ps)
    n_t = len(regions)
    if len(centres):
        sc = np.array([r.centroid_px for r in scale_regions], np.float64).reshape(-1, 2)
        d = np.hypot(sc[:, None, 0] - centres[None, :, 0], (sc[:, None, 1] - centres[None, :, 1]) * ps[1] / ps[0])
        alone = (d > radii[None, :]).all(axis=1) if len(sc) else np.zeros(0, bool)
        # in a dense layer the scale detector may see the lobes of a molecule the references missed:
        # only objects of at least half the references' extent are added
        big = np.array([r.extent_nm for r in scale_regions]) >= ps[0] * float(np.median(radii)) if len(sc) else alone
        alone &= big
        offset = int(labels.max())
        extra = [r for r, a in zip(scale_regions, alone) if a]
        for r in extra:
            r.label += offset
        regions += extra
    else:
        regions += scale_regions
    regions.sort(key=lambda r: (r.centroid_px[1], r.centroid_px[0]))
    return regions, {**info, "template_objects": n_t, "scale_objects_added": len(regions) - n_t}


def _note(regions: list[Region], image: np.ndarray) -> str | None:
    """Why a frame's detection deserves a look: nothing found, or one region over most of the frame."""
    n_valid = int(np.isfinite(image).sum())
    if not regions:
        fin = image[np.isfinite(image)]
        if fin.size == 0 or float(np.ptp(fin)) == 0.0:
            return "no object: the frame is flat (constant channel)"
        return "no object: nothing stands out of the frame's noise at the object scale"
    big = max(r.area_px for r in regions)
    if n_valid and big > 0.5 * n_valid:
        return (f"one region covers {big / n_valid:.0%} of the frame: the surface is likely covered "
                "(dense layer) or the object size is wrong")
    return None
