"""``match.threshold: auto``: the similarity threshold of each frame, set without labels.

An object is a known species when its best cosine similarity is unlikely for something that is NOT
a species. What is not a species is sampled from the frame itself: windows of the frame's
background (away from every detected object), cut and embedded like the objects, each at the crop
window of each species' references, and scored against that species (:func:`null_scores`). Their
best scores are the null sample Z (n values) of the frame. The decision is a conformal p-value
(Bates, Candes, Lei, Romano, Sesia, "Testing for outliers with conformal p-values", Ann. Stat. 51
(2023) 149):

    p(s) = (1 + #{z in Z : z >= s}) / (n + 1),   accepted as a species when p(s) <= alpha,

i.e. the threshold is the smallest score with at most ``alpha (n + 1) - 1`` null scores at or above it
(:func:`conformal_threshold`); with fewer than ``1/alpha - 1`` null samples, the largest null score.
This calibrates on what really varies in the frame (its noise, texture, contrast, the partial
objects a window of background shows) instead of on self-perturbed copies of a reference, whose
scores are ~1 while real same-species cosines are 0.75-0.9.

Between known species, a distance-ratio test (Lowe, IJCV 60 (2004) 91; for open-set recognition
Mendes Junior et al., Machine Learning 106 (2017) 359) rejects ambiguous objects: the best species
is kept only when ``(1 - s_best) <= ratio * (1 - s_second)`` (cosine distances); ``ratio`` 1 turns it
off. Both are reported in every frame result (:meth:`ThresholdChoice.to_json`).

A dense layer has no background. There the sample is filled with windows centred BETWEEN the
objects (the Voronoi vertices of their centres, :func:`interstitial_centres`): what a detector seed
between molecules would show, fragments of three or more neighbours. Measured on the F-HPB monolayer
(K = 1, 5 draws): end-to-end macro F1 0.958 -> 0.990 (junk detections between molecules rejected),
recognition-only unchanged (0.971 -> 0.972). Such a null does not reject a different molecule:
with the L references left out, 4 % of the L objects come out ``other``.

Without any null sample (no frame, e.g. crops) the threshold is -1 (argmax with the ratio test
only) and the result says so.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from stm_agent.agent.match import RefEmbeddings, decide  # noqa: F401  (decide: the decision step, re-exported)

#: conformal level: the share of background windows allowed to pass as a species
ALPHA = 0.05
#: distance ratio of the best to the second-best species (1 = off)
RATIO = 0.98
#: at most this many background windows per frame
N_NULL = 48
#: below this many background windows (the smallest sample with which a conformal p-value can
#: reach alpha = 0.05) the null sample is filled with interstitial windows
N_MIN = 19


@dataclass
class ThresholdChoice:
    """The threshold of one frame and how it was obtained.

    Attributes
    ----------
    value : float
        Cosine similarity at or above which the best species is accepted (-1: none).
    mode : str
        ``"fixed"`` (``match.threshold`` a number) or ``"auto"``.
    method : str
        How ``value`` was set (``"fixed"``, ``"conformal background"``, ``"conformal background + between objects"``, ``"conformal between objects"``, ``"no null sample"``).
    ratio : float
        Distance ratio of the ratio test (1 = off).
    alpha : float | None
        Conformal level (auto).
    n_null : int
        Background windows scored.
    null_max, null_median : float | None
        Of the null scores.
    reason : str | None
        Why a fallback was taken.
    """

    value: float
    mode: str = "fixed"
    method: str = "fixed"
    ratio: float = 1.0
    alpha: float | None = None
    n_null: int = 0
    null_max: float | None = None
    null_median: float | None = None
    reason: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict (floats rounded to 6 digits)."""
        r = lambda v: None if v is None or not np.isfinite(v) else round(float(v), 6)  # noqa: E731
        out = {"mode": self.mode, "value": r(self.value), "method": self.method, "ratio": r(self.ratio)}
        if self.mode != "fixed":
            out.update({"alpha": r(self.alpha), "n_null": self.n_null, "null_max": r(self.null_max),
                        "null_median": r(self.null_median), "reason": self.reason})
        return {**out, **self.extra}


def conformal_threshold(null: np.ndarray, alpha: float = ALPHA) -> float:
    """Smallest score s with conformal p-value ``(1 + #{z >= s}) / (n + 1) <= alpha`` (Bates et al. 2023).

    Parameters
    ----------
    null : np.ndarray
        float ``(n,)`` null scores (non-finite ignored).
    alpha : float
        Level in (0, 1).

    Returns
    -------
    float
        A score just above the ``(m + 1)``-th largest null score, m = floor(alpha (n + 1) - 1); the
        largest null score (+1e-6) when m < 0; -1 for an empty sample.
    """
    z = np.sort(np.asarray(null, np.float64)[np.isfinite(null)])[::-1]
    if z.size == 0:
        return -1.0
    m = int(np.floor(alpha * (z.size + 1) - 1 + 1e-9))
    return float(z[max(m, 0)] + 1e-6)


def background_centres(shape: tuple[int, int], boxes_px: np.ndarray, window_px: float,
                        valid: np.ndarray | None = None, n_max: int = N_NULL) -> np.ndarray:
    """Centres of background windows: grid points whose window's central half avoids every object box.

    Parameters
    ----------
    shape : (ny, nx)
    boxes_px : float ``(N, 4)`` object boxes ``(x, y, w, h)``.
    window_px : float
        Window side, pixels.
    valid : bool ``(ny, nx)`` acquired pixels (None: all).
    n_max : int
        At most this many centres (evenly thinned, deterministic).

    Returns
    -------
    np.ndarray
        float64 ``(M, 2)`` ``(x, y)`` pixels (M may be 0: a frame covered by objects).
    """
    ny, nx = shape
    half = max(1.0, window_px / 2.0)
    pad = half / 2.0  # the window's central half avoids every object (its rim may show parts of some)
    blocked = np.zeros((ny, nx), bool)
    for x, y, w, h in np.asarray(boxes_px, np.float64).reshape(-1, 4):
        x0, y0 = int(max(0, np.floor(x - pad))), int(max(0, np.floor(y - pad)))
        x1, y1 = int(min(nx, np.ceil(x + w + pad))), int(min(ny, np.ceil(y + h + pad)))
        blocked[y0:y1, x0:x1] = True
    if valid is not None:
        # a window must lie on acquired pixels: block within half a window of any NaN pixel
        import cv2

        k = int(2 * half) | 1
        blocked |= cv2.dilate((~valid).astype(np.uint8), np.ones((k, k), np.uint8)).astype(bool)
    step = max(2.0, window_px / 3.0)
    xs = np.arange(half, nx - half + 1e-9, step)
    ys = np.arange(half, ny - half + 1e-9, step)
    if xs.size == 0 or ys.size == 0:
        return np.zeros((0, 2))
    gx, gy = np.meshgrid(xs, ys)
    ok = ~blocked[np.clip(gy.astype(int), 0, ny - 1), np.clip(gx.astype(int), 0, nx - 1)]
    c = np.stack([gx[ok], gy[ok]], axis=1)
    if len(c) > n_max:
        c = c[np.linspace(0, len(c) - 1, n_max).round().astype(int)]
    return c


def interstitial_centres(shape: tuple[int, int], boxes_px: np.ndarray, window_px: float,
                         valid: np.ndarray | None = None, n_max: int = N_NULL) -> np.ndarray:
    """Centres of windows that sit BETWEEN objects: the Voronoi vertices of the object centres.

    In a dense layer there is no background; the windows a detector could wrongly take for an
    object there are those centred between molecules, showing fragments of three or more of them.
    They are the local maxima of the distance to the nearest object centre (a distance transform,
    Borgefors 1986), kept where that distance is at least a quarter of the window (a window
    centred on an object is never one of them).

    Parameters
    ----------
    shape : (ny, nx); boxes_px : float ``(N, 4)`` object boxes ``(x, y, w, h)``; window_px : float;
    valid : bool ``(ny, nx)`` acquired pixels (None: all); n_max : int

    Returns
    -------
    np.ndarray
        float64 ``(M, 2)`` ``(x, y)`` pixels, farthest-from-objects first (M may be 0).
    """
    import cv2

    ny, nx = shape
    b = np.asarray(boxes_px, np.float64).reshape(-1, 4)
    half = max(1.0, window_px / 2.0)
    if len(b) < 3 or nx < 2 * half or ny < 2 * half:
        return np.zeros((0, 2))
    seeds = np.full((ny, nx), 255, np.uint8)
    cx = np.clip(np.rint(b[:, 0] + b[:, 2] / 2).astype(int), 0, nx - 1)
    cy = np.clip(np.rint(b[:, 1] + b[:, 3] / 2).astype(int), 0, ny - 1)
    seeds[cy, cx] = 0
    dist = cv2.distanceTransform(seeds, cv2.DIST_L2, 5)
    k = max(3, int(half) | 1)
    peak = (dist >= cv2.dilate(dist, np.ones((k, k), np.uint8))) & (dist >= half / 2.0)
    # the whole window on the frame (and on acquired pixels)
    peak[: int(np.ceil(half)), :] = peak[ny - int(np.ceil(half)):, :] = False
    peak[:, : int(np.ceil(half))] = peak[:, nx - int(np.ceil(half)):] = False
    if valid is not None:
        kk = int(2 * half) | 1
        peak &= ~cv2.dilate((~valid).astype(np.uint8), np.ones((kk, kk), np.uint8)).astype(bool)
    ys, xs = np.nonzero(peak)
    order = np.argsort(-dist[ys, xs], kind="stable")[:n_max]
    return np.stack([xs[order], ys[order]], axis=1).astype(np.float64)


def null_scores(image: np.ndarray, pixel_size_nm: tuple[float, float], boxes_px: np.ndarray,
                encoder, refs: RefEmbeddings, cfg, n_max: int = N_NULL, sample: dict | None = None) -> np.ndarray:
    """Best similarity of each background window of the frame to the species (the null sample).

    Positions: background windows (:func:`background_centres`); when there are fewer than
    :data:`N_MIN` (a dense layer), the sample is filled with windows between the objects
    (:func:`interstitial_centres`). ``sample``, when given, receives ``n_background`` and
    ``n_interstitial``.

    Each species k is scored on windows of the side of its own references (median of
    ``refs.ref_window_nm``), normalised as the objects are (:func:`agent.normalise.normalise_crops`);
    the null score of a position is the maximum over species.

    Parameters
    ----------
    image : float ``(ny, nx)`` flattened frame (NaN where not acquired).
    pixel_size_nm : (dx, dy)
    boxes_px : float ``(N, 4)`` every detected object's box.
    encoder : models.base.Encoder (the one that made ``refs``)
    refs : RefEmbeddings
    cfg : NormaliseConfig

    Returns
    -------
    np.ndarray
        float64 ``(M,)`` (empty without references or background).
    """
    from stm_agent.agent.normalise import normalise_crops

    k = len(refs.species)
    if k == 0 or refs.emb.size == 0:
        return np.zeros(0)
    dx = float(pixel_size_nm[0])
    valid = np.isfinite(image)
    ref_sp = refs.species_idx[np.unique(refs.ref_idx, return_index=True)[1]] if len(refs.ref_idx) else np.zeros(0, int)
    wins = np.asarray(refs.ref_window_nm, np.float64)
    per = [float(np.median(wins[ref_sp == s])) if wins.size == len(ref_sp) and (ref_sp == s).any()
           else float(refs.window_nm) for s in range(k)]
    # the same positions for every species: windows of the largest species window avoid every object
    win_px = max(per) / dx
    cen = background_centres(image.shape, boxes_px, win_px, None if valid.all() else valid, n_max)
    n_bg = len(cen)
    if n_bg < N_MIN:  # a dense layer: windows between its objects
        more = interstitial_centres(image.shape, boxes_px, win_px, None if valid.all() else valid, n_max - n_bg)
        cen = np.concatenate([cen.reshape(-1, 2), more]) if len(more) else cen
    if sample is not None:
        sample.update(n_background=int(n_bg), n_interstitial=int(len(cen) - n_bg))
    if len(cen) == 0:
        return np.zeros(0)
    best = np.full(len(cen), -1.0)
    for s in range(k):
        e = encoder.embed(normalise_crops(image, cen, per[s], pixel_size_nm, cfg))
        sc = (e @ refs.emb[refs.species_idx == s].T).max(axis=1).astype(np.float64)
        best = np.maximum(best, sc)
    return best


def auto_threshold(null: np.ndarray, alpha: float = ALPHA, ratio: float = RATIO,
                   sample: dict | None = None) -> ThresholdChoice:
    """:class:`ThresholdChoice` of ``match.threshold: auto`` from a frame's null scores (``sample``:
    what :func:`null_scores` reported about its windows)."""
    z = np.asarray(null, np.float64)
    z = z[np.isfinite(z)]
    if z.size == 0:
        return ThresholdChoice(-1.0, mode="auto", method="no null sample", ratio=ratio, alpha=alpha,
                               reason="no window free of objects, none between them: ratio test only")
    n_int = int((sample or {}).get("n_interstitial", 0))
    method, extra = "conformal background", {}
    if n_int:
        method = "conformal background + between objects" if n_int < z.size else "conformal between objects"
        extra = {"n_background": int(z.size) - n_int, "n_interstitial": n_int}
    return ThresholdChoice(conformal_threshold(z, alpha), mode="auto", method=method, ratio=ratio,
                           alpha=alpha, n_null=int(z.size), null_max=float(z.max()), null_median=float(np.median(z)),
                           extra=extra)
