"""Few-shot classification of lattice defects from K labelled examples per class (SimpleShot).

SimpleShot (Wang, Chao, Weinberger, van der Maaten, arXiv 1911.04623, 2019): nearest class mean
after **centering** the features on the mean of the session's features and **L2-normalising**
them ("CL2N"); a class prototype is the mean of its K normalised examples. Here the features are
measured, not learned (no training):

* ``pixels``: the defect's window (side ``window_factor`` x the examples' median size) resampled
  to 16 x 16, in robust standard deviations of the frame (1.4826 MAD around its median): the
  apparent height and the polarity stay in the values (no per-crop stretch);
* ``radial``: the rotation-invariant radial profile of that window (mean over 8 rings);
* ``descriptors``: log area (nm^2), log Feret diameter (nm), apparent height, contrast sign
  (:func:`agent.descriptors.describe_objects`) - the quantities that name the WSe2 classes
  (Large/Small, Bright/Dim, Peak/Trough).

Each block is centred and scaled to unit mean squared norm over the session, weighted, and the
concatenation is centred and L2-normalised (CL2N). Physical units are kept where the pixel size is
known; without it sizes are in pixels (``pixel_size_nm = 1``).
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

__all__ = ["DefectFeatures", "defect_features", "robust_stats", "SimpleShot", "BLOCK_WEIGHTS", "DefectReference",
           "classify_defects", "physical_rules", "WINDOW_FACTOR", "REFERENCE_CROP_FACTOR"]

#: Block weights (pixels, radial profile, descriptors): equal.
BLOCK_WEIGHTS = {"pixels": 1.0, "radial": 1.0, "descriptors": 1.0}
SIDE = 16
#: Feature window side, in the examples' median defect size (the defect and its lattice surround).
WINDOW_FACTOR = 2.0
#: A defect reference is cut this many times its own size wide, so that the window of a library
#: whose median size is up to twice this reference's fits in it.
REFERENCE_CROP_FACTOR = 2.0 * WINDOW_FACTOR


@dataclass
class DefectFeatures:
    """Raw feature blocks of N objects (before SimpleShot's centering).

    Attributes
    ----------
    pixels : float64 ``(N, 256)``; radial : float64 ``(N, 8)``; descriptors : float64 ``(N, 4)``.
    """

    pixels: np.ndarray
    radial: np.ndarray
    descriptors: np.ndarray

    def __len__(self) -> int:
        return len(self.pixels)

    @staticmethod
    def concat(parts: list["DefectFeatures"]) -> "DefectFeatures":
        return DefectFeatures(*(np.concatenate([getattr(p, k) for p in parts]) if parts else np.zeros((0, n))
                                for k, n in (("pixels", SIDE * SIDE), ("radial", 8), ("descriptors", 4))))

    def take(self, idx) -> "DefectFeatures":
        return DefectFeatures(self.pixels[idx], self.radial[idx], self.descriptors[idx])


def _rings() -> np.ndarray:
    yy, xx = np.mgrid[:SIDE, :SIDE] - (SIDE - 1) / 2.0
    r = np.hypot(xx, yy) / (SIDE / 2.0)
    return np.minimum((r * 8).astype(int), 8)  # 8 = outside the disc


_RING = _rings()


def robust_stats(image: np.ndarray) -> tuple[float, float]:
    """``(median, 1.4826 MAD)`` of the finite pixels of a frame (the unit of the ``pixels`` block)."""
    img = np.asarray(image, np.float64)
    v = img[np.isfinite(img)]
    if v.size == 0:
        return 0.0, 1.0
    med = float(np.median(v))
    return med, 1.4826 * float(np.median(np.abs(v - med))) or float(v.std()) or 1.0


def defect_features(image: np.ndarray, boxes_px: np.ndarray, pixel_size_nm: tuple[float, float],
                    window_px: float, masks: list[np.ndarray] | None = None,
                    stats: tuple[float, float] | None = None) -> DefectFeatures:
    """Feature blocks of the objects in ``boxes_px`` of one frame.

    Parameters
    ----------
    image : np.ndarray
        float ``(ny, nx)`` flattened (or lattice-free) frame; NaN allowed.
    boxes_px : np.ndarray
        ``(N, 4)`` ``(x, y, w, h)`` pixels.
    pixel_size_nm : (dx, dy)
        nm per pixel (``(1, 1)`` when unknown: sizes are then in pixels).
    window_px : float
        Side of the square window around each box centre, pixels.
    masks : list of bool arrays | None
        Object masks inside the boxes (segmented defects); None = half-maximum masks.
    stats : (median, sigma) | None
        The frame's robust statistics (:func:`robust_stats`) when ``image`` is a crop of it (a
        reference); None = measured on ``image``.

    Returns
    -------
    DefectFeatures
    """
    from stm_agent.agent.descriptors import describe_objects

    img = np.asarray(image, np.float64)
    fin = np.isfinite(img)
    med, mad = stats if stats is not None else robust_stats(img)
    z = np.where(fin, (img - med) / mad, 0.0).astype(np.float32)
    b = np.asarray(boxes_px, np.float64).reshape(-1, 4)
    n = len(b)
    pix = np.zeros((n, SIDE * SIDE))
    half = window_px / 2.0
    scale = SIDE / window_px
    for i, (x, y, w, h) in enumerate(b):  # one affine warp per object (OpenCV)
        cx, cy = x + w / 2.0, y + h / 2.0
        m = np.array([[scale, 0, -(cx - half) * scale], [0, scale, -(cy - half) * scale]], np.float32)
        pix[i] = cv2.warpAffine(z, m, (SIDE, SIDE), flags=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR,
                                borderMode=cv2.BORDER_REFLECT).ravel()
    rad = np.zeros((n, 8))
    ring = _RING.ravel()
    for k in range(8):
        rad[:, k] = pix[:, ring == k].mean(axis=1)
    d = describe_objects(img, np.rint(b).astype(np.int64), pixel_size_nm, masks=masks, z_unit=None)
    desc = np.column_stack([np.log(np.maximum(d.area_nm2, 1e-12)), np.log(np.maximum(d.feret_nm, 1e-12)),
                            d.height, d.contrast_sign.astype(np.float64)])
    return DefectFeatures(pix, rad, desc)


def _block(x: np.ndarray, mean: np.ndarray, rms: float) -> np.ndarray:
    return (x - mean) / rms


class SimpleShot:
    """Nearest prototype after centering and L2 normalisation (SimpleShot CL2N).

    Parameters
    ----------
    session : DefectFeatures
        Every object of the session (examples and queries): the centering means and block scales.
    weights : dict | None
        Block weights (default :data:`BLOCK_WEIGHTS`).
    """

    def __init__(self, session: DefectFeatures, weights: dict[str, float] | None = None):
        self.weights = dict(weights or BLOCK_WEIGHTS)
        self._stats = {}
        for k in ("pixels", "radial", "descriptors"):
            x = getattr(session, k)
            mu = x.mean(axis=0)
            rms = float(np.sqrt(((x - mu) ** 2).sum(axis=1).mean())) or 1.0
            self._stats[k] = (mu, rms)
        self._centre = None
        self._centre = self.transform(session, normalise=False).mean(axis=0)
        self.classes: list[str] = []
        self.prototypes = np.zeros((0, 0))

    def transform(self, f: DefectFeatures, normalise: bool = True) -> np.ndarray:
        """float64 ``(N, d)`` weighted blocks, centred on the session mean, L2-normalised."""
        parts = [self.weights[k] * _block(getattr(f, k), *self._stats[k]) for k in ("pixels", "radial", "descriptors")
                 if self.weights.get(k, 0) > 0]
        x = np.hstack(parts)
        if self._centre is not None:
            x = x - self._centre
        if normalise:
            x = x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-12)
        return x

    def fit(self, f: DefectFeatures, labels: list[str]) -> "SimpleShot":
        """Prototypes from the K examples per class (``labels`` per row of ``f``)."""
        x = self.transform(f)
        lab = np.asarray(labels)
        self.classes = sorted(set(labels))
        p = np.stack([x[lab == c].mean(axis=0) for c in self.classes])
        self.prototypes = p / (np.linalg.norm(p, axis=1, keepdims=True) + 1e-12)
        return self

    def rejection_threshold(self, f: DefectFeatures, labels: list[str]) -> float | None:
        """Cosine below which an object matches no class: the lowest leave-one-out similarity of an
        example to its own class prototype (the examples calibrate what "this class" looks like;
        cf. conformal calibration, Bates et al. 2023). None when a class has a single example.
        """
        x = self.transform(f)
        lab = np.asarray(labels)
        sims = []
        for c in self.classes:
            idx = np.flatnonzero(lab == c)
            if len(idx) < 2:
                return None
            for i in idx:
                p = x[idx[idx != i]].mean(axis=0)
                sims.append(float(x[i] @ (p / (np.linalg.norm(p) + 1e-12))))
        return float(min(sims))

    def scores(self, f: DefectFeatures) -> np.ndarray:
        """Cosine similarity of each object to each prototype, float64 ``(N, n_classes)``."""
        return self.transform(f) @ self.prototypes.T

    def predict(self, f: DefectFeatures) -> list[str]:
        """The class of the nearest prototype, per object."""
        if len(f) == 0:
            return []
        return [self.classes[i] for i in self.scores(f).argmax(axis=1)]


@dataclass
class DefectReference:
    """One labelled example of a defect species (a reference of the library, K per species).

    Attributes
    ----------
    species : str
    crop : float ``(h, w)`` lattice-free crop centred on the defect (physical units of the frame).
    pixel_size_nm : (dx, dy) of the crop, nm.
    box_px : (w, h) of the defect's box, pixels of the crop.
    stats : (median, sigma) of the frame the crop was cut from (:func:`robust_stats`).
    contrast : +1 protrusion, -1 depression, 0 unknown.
    """

    species: str
    crop: np.ndarray
    pixel_size_nm: tuple[float, float]
    box_px: tuple[float, float]
    stats: tuple[float, float]
    contrast: int = 0

    @property
    def size_nm(self) -> float:
        """Mean side of the defect's box, nm."""
        return 0.5 * (self.box_px[0] * self.pixel_size_nm[0] + self.box_px[1] * self.pixel_size_nm[1])

    def features(self, window_nm: float) -> DefectFeatures:
        h, w = self.crop.shape
        bw, bh = self.box_px
        box = np.array([[(w - bw) / 2.0, (h - bh) / 2.0, bw, bh]])
        return defect_features(self.crop, box, self.pixel_size_nm, window_nm / self.pixel_size_nm[0],
                               stats=self.stats)


def physical_rules(scores: np.ndarray, species: list[str], sizes: np.ndarray, contrasts: np.ndarray,
                   ex_labels: list[str], ex_sizes: list[float], ex_contrasts: list[int],
                   size_tolerance: float | None = 1.5) -> np.ndarray:
    """Rule species out (score -1) by the physical quantities that define defect classes.

    A species is ruled out for an object of the other polarity than all its examples (protrusion /
    depression, the Peak / Trough of the WSe2 classes; examples of unknown polarity, 0, rule
    nothing out), and, with ``size_tolerance``, for an object whose size differs from every example
    of that species by more than that factor (as :func:`agent.match.size_gate` does for molecules).

    Parameters
    ----------
    scores : float ``(N, S)`` cosine per object and species (``species`` order); a copy is returned.
    sizes : float ``(N,)`` object sizes; contrasts : int ``(N,)`` +1 / -1.
    ex_labels, ex_sizes, ex_contrasts : species, size (same unit) and polarity of each example.
    """
    out = np.array(scores, np.float64, copy=True)
    if not len(out):
        return out
    lab = np.asarray(ex_labels)
    exs = np.asarray(ex_sizes, np.float64)
    exc = np.asarray(ex_contrasts)
    sizes = np.asarray(sizes, np.float64)
    for k, sp in enumerate(species):
        mine = lab == sp
        pol = set(exc[mine].tolist()) - {0}
        if pol:
            out[~np.isin(contrasts, list(pol)), k] = -1.0
        if size_tolerance is not None:
            rs = exs[mine]
            ratio = np.maximum(sizes[:, None] / rs[None, :], rs[None, :] / sizes[:, None]).min(axis=1)
            out[ratio > size_tolerance, k] = -1.0
    return out


def classify_defects(residual: np.ndarray, boxes_px: np.ndarray, contrasts: np.ndarray,
                     pixel_size_nm: tuple[float, float], refs: list[DefectReference],
                     threshold: float | str = "auto", alpha: float = 0.05,
                     size_tolerance: float | None = 1.5) -> dict:
    """Classify the defects of a lattice-free frame against the library's examples (SimpleShot).

    Each species' prototype is the CL2N mean of its K references (:class:`SimpleShot`; the session
    = this frame's defects + the references). A species is ruled out for a defect of the other
    polarity than all its references (protrusion vs depression: the Peak/Trough of the WSe2
    classes), and, with ``size_tolerance``, for a defect whose size differs from every reference of
    that species by more than that factor (:func:`physical_rules`). The best remaining species is
    kept when its cosine reaches the threshold: a number, or ``auto``: any (nearest prototype), since
    every defect already passed the detector's false-alarm test against the frame's noise
    (:func:`agent.lattice.false_alarm_threshold`). A second, background-window test (the conformal
    null of :mod:`agent.threshold`) was measured on the WSe2 set and rejected most true defects
    (end-to-end macro-F1 0.26 -> 0.09): faint lattice defects make the background look like them.
    ``alpha`` is kept for the interface (unused with ``auto``). A defect ruled out of every species
    is ``other``.

    Parameters
    ----------
    residual : float ``(ny, nx)`` lattice-free frame (NaN allowed).
    boxes_px : float ``(N, 4)`` defect boxes; contrasts : int ``(N,)`` +1 / -1.
    pixel_size_nm : (dx, dy) nm.
    refs : the library's references (at least one).
    threshold, alpha, size_tolerance : as ``match.threshold``, ``match.alpha``, ``match.size_tolerance``.

    Returns
    -------
    dict with ``species`` (sorted names), ``names`` (N best species or ``other``), ``similarity``
    float ``(N,)``, ``scores`` float ``(N, S)`` (-1 where ruled out), ``threshold``
    (:class:`agent.threshold.ThresholdChoice`), ``window_nm``, ``k`` (references per species).
    """
    from stm_agent.agent.domain import OTHER
    from stm_agent.agent.threshold import ThresholdChoice

    if not refs:
        raise ValueError("classify_defects needs at least one reference")
    boxes = np.asarray(boxes_px, np.float64).reshape(-1, 4)
    dx = float(pixel_size_nm[0])
    win_nm = WINDOW_FACTOR * float(np.median([r.size_nm for r in refs]))
    stats = robust_stats(residual)
    q = defect_features(residual, boxes, pixel_size_nm, win_nm / dx, stats=stats)
    rf = DefectFeatures.concat([r.features(win_nm) for r in refs])
    labels = [r.species for r in refs]
    clf = SimpleShot(DefectFeatures.concat([q, rf])).fit(rf, labels)
    species = clf.classes
    scores = clf.scores(q) if len(q) else np.zeros((0, len(species)))
    qs = 0.5 * (boxes[:, 2] * dx + boxes[:, 3] * float(pixel_size_nm[1]))
    scores = physical_rules(scores, species, qs, np.asarray(contrasts).reshape(-1), labels,
                            [r.size_nm for r in refs], [r.contrast for r in refs], size_tolerance)
    if threshold != "auto":
        thr = ThresholdChoice(float(threshold), ratio=1.0)
    else:  # the detector already tested each defect against the frame's noise (false-alarm threshold)
        thr = ThresholdChoice(-1.0, mode="auto", method="nearest prototype", ratio=1.0,
                              reason="lattice route: each defect already stands out of the frame's noise "
                                     "(detection false-alarm threshold); nearest prototype within the physical rules")
    best = scores.argmax(axis=1) if len(q) else np.zeros(0, int)
    sim = scores[np.arange(len(best)), best] if len(q) else np.zeros(0)
    names = [species[b] if s > -1.0 and s >= thr.value else OTHER for b, s in zip(best, sim)]
    return {"species": species, "names": names, "similarity": sim, "scores": scores, "threshold": thr,
            "window_nm": win_nm, "k": {sp: labels.count(sp) for sp in species}}
