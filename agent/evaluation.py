"""Evaluation of recognition against labelled ground truth (issues 5 and 10): pure logic, no CLI, no plots.

Two modes:

* ``end-to-end``: detection + recognition as :class:`agent.pipeline.Recognizer` does it (same
  public functions: :func:`agent.pipeline.detect`, :func:`agent.references.embed_references`,
  :func:`agent.normalise.normalise_crops`, :func:`agent.match.species_scores`,
  :func:`agent.threshold.null_scores`); a detection matches a ground-truth box when IoU >= ``iou``
  (0.5; a lobe inside a box no longer counts as finding the molecule,
  :func:`adapters.labelled.match_boxes` with ``centroid_inside=False``). Objects cut by the image
  edge are left out on both sides (the pipeline does not count them).
* ``recognition``: crops cut at the ground-truth boxes (or class-folder crops), isolating encoder +
  matcher from detection.

References are drawn at their LABELLED boxes in both modes (K per class,
``numpy.random.default_rng(seed)``, never scored; nor the detections matched to them), cut and
embedded by the one reference path of the agent (:func:`agent.references.embed_references`): each
reference windowed from its own extent, ``normalise.mirror: auto``. A reference-guided detector can
thus be evaluated, and a draw whose class has no usable box is reported, not a crash
(``info["no_reference"]``). Or explicit: annotation ids, or a reference library folder.

Decision: the configuration's (``match.threshold: auto`` = conformal threshold of each image's
background windows, :mod:`agent.threshold`; plus the distance-ratio test ``match.ratio``; the size
gate ``match.size_tolerance`` on images whose annotation gives a pixel size, as the pipeline applies
it on frames with physical units): the headline. Also reported: ``argmax`` (no threshold, no ratio test), and the sweep of a fixed threshold
over 0.00..1.00 (no ratio test). ``unimr-as-released`` keeps the released GUI: its segmentation (Otsu,
``THRESH_BINARY_INV``, ``RETR_TREE``, area window mean +- 2 sd), bounding-box crops, no mirror, the
pooled-max GMM encoder choice and the fixed threshold 0.9, whatever our defaults are.

Metrics (UniMR paper, Cao et al., Adv. Sci. 2025: precision, recall, F1 per species), all from the
confusion matrix ``C`` (rows = true class + ``(no object)``, columns = predicted species +
``other`` + ``missed``): TP_c = C[c, c]; FP_c = column c minus TP_c (wrong species and detections
of no object predicted as c); FN_c = row c minus TP_c (other species, ``other``, ``missed``).
Macro = mean of the per-class P, R, F1 over classes with support > 0; micro = P, R, F1 of the
summed TP, FP, FN. ``other`` is never a positive class. End to end also: detection recall and
precision, and the per-frame count error |predicted - true| per species and for ``other`` (true
``other`` count = 0: a detection of no labelled object counted as ``other`` is a count error).
Leave-one-class-out (:func:`leave_one_class_out`, recognition-only, sets with >= 2 classes): the
share of the left-out class's objects that come out ``other``, and the remaining classes' macro F1
at the default decision vs argmax.

Encoder entries: ``pixel``, ``zernike``, ``clip`` (needs ``model_dir``), ``auto`` (UniMR GMM
selection per frame among the candidates that can separate the species,
:func:`agent.selection.species_separation`) and ``unimr-as-released``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from stm_agent.adapters.labelled import LabelledSet, _box_on_border, image_scan, match_boxes, read_grey
from stm_agent.agent.config import AgentConfig, NormaliseConfig
from stm_agent.agent.domain import OTHER
from stm_agent.agent.errors import ConfigError
from stm_agent.agent.match import RefEmbeddings, size_gate, species_scores
from stm_agent.agent.normalise import crop_windows, frame_range, make_poses, normalise_crops, to_grey
from stm_agent.agent.references import Reference, embed_references, object_extent_nm, window_nm
from stm_agent.agent.threshold import auto_threshold, decide, null_scores

NO_OBJECT = "(no object)"
MISSED = "missed"
RELEASED = "unimr-as-released"
SINGLE = ("pixel", "zernike", "clip")
ENTRIES = (*SINGLE, "auto", RELEASED)
#: the threshold sweep: 0.00, 0.01, ..., 1.00
SWEEP = np.round(np.arange(0.0, 1.0001, 0.01), 2)
#: a threshold is on the plateau when its F1 is within this of the best F1
FLAT_TOL = 0.02
#: UniMR's fixed threshold, used by ``unimr-as-released``
RELEASED_THRESHOLD = 0.9


# ---------------------------------------------------------------- metrics
def predict(scores: np.ndarray, missed: np.ndarray, threshold: float | np.ndarray, ratio: float = 1.0) -> np.ndarray:
    """Predicted column of each object: species index ``0..K-1``, ``K`` = other, ``K+1`` = missed.

    Parameters
    ----------
    scores : float32 ``(N, K)`` best cosine similarity to each species (-1: no reference);
    missed : bool ``(N,)``; threshold : float or float ``(N,)`` (``-inf``: argmax);
    ratio : distance-ratio test (:func:`agent.threshold.decide`; 1 = off).
    """
    n, k = scores.shape
    if k == 0:
        return np.where(missed, 1, 0).astype(np.int64)
    best, ok = decide(scores, threshold, ratio)
    return np.where(missed, k + 1, np.where(ok, best, k)).astype(np.int64)
def confusion_matrix(true: np.ndarray, pred: np.ndarray, k: int) -> np.ndarray:
    """int64 ``(K+1, K+2)``: rows = true class (``K`` = no object), columns = :func:`predict`."""
    t = np.where(np.asarray(true) < 0, k, true).astype(np.int64)
    c = np.zeros((k + 1, k + 2), np.int64)
    np.add.at(c, (t, np.asarray(pred, np.int64)), 1)
    return c


def _prf(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Vectorised precision, recall, F1 (0 where undefined)."""
    tp, fp, fn = (np.asarray(a, np.float64) for a in (tp, fp, fn))
    p = np.divide(tp, tp + fp, out=np.zeros_like(tp), where=(tp + fp) > 0)
    r = np.divide(tp, tp + fn, out=np.zeros_like(tp), where=(tp + fn) > 0)
    f = np.divide(2 * p * r, p + r, out=np.zeros_like(tp), where=(p + r) > 0)
    return p, r, f


def metrics(conf: np.ndarray, classes: list[str]) -> dict[str, Any]:
    """Per-class and averaged metrics from a confusion matrix (:func:`confusion_matrix`).

    Returns
    -------
    dict
        ``per_class`` {class: {precision, recall, f1, support, tp, fp, fn}}, ``macro`` (mean over
        classes with support > 0) and ``micro`` (from summed TP/FP/FN) {precision, recall, f1},
        ``n_classes_macro``.
    """
    k = len(classes)
    c = np.asarray(conf, np.int64)
    tp = np.diag(c[:k, :k])
    fp = c[:, :k].sum(axis=0) - tp
    support = c[:k].sum(axis=1)
    fn = support - tp
    p, r, f = _prf(tp, fp, fn)
    per = {cl: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(support[i]),
                "tp": int(tp[i]), "fp": int(fp[i]), "fn": int(fn[i])} for i, cl in enumerate(classes)}
    on = support > 0
    macro = {n: float(v[on].mean()) if on.any() else 0.0 for n, v in (("precision", p), ("recall", r), ("f1", f))}
    mp, mr, mf = _prf(tp.sum(), fp.sum(), fn.sum())
    micro = {"precision": float(mp), "recall": float(mr), "f1": float(mf),
             "tp": int(tp.sum()), "fp": int(fp.sum()), "fn": int(fn.sum())}
    return {"per_class": per, "macro": macro, "micro": micro, "n_classes_macro": int(on.sum())}


def sweep(true: np.ndarray, scores: np.ndarray, missed: np.ndarray,
          thresholds: np.ndarray = SWEEP) -> dict[str, np.ndarray]:
    """Micro and macro F1 against the similarity threshold, from fixed per-object scores.

    Vectorised over thresholds ``(T,)`` x objects ``(N,)``; equal to :func:`metrics` of
    :func:`confusion_matrix` of :func:`predict` at each threshold.

    Returns
    -------
    dict
        ``thresholds`` ``(T,)``, ``micro_f1``, ``macro_f1``, ``micro_precision``, ``micro_recall``
        float64 ``(T,)``.
    """
    t = np.asarray(thresholds, np.float64)
    n, k = scores.shape
    true = np.asarray(true, np.int64)
    if n == 0 or k == 0:
        z = np.zeros(len(t))
        return {"thresholds": t, "micro_f1": z, "macro_f1": z, "micro_precision": z, "micro_recall": z}
    best = np.argmax(scores, axis=1)
    top = scores[np.arange(n), best].astype(np.float64)
    above = (top[None, :] >= t[:, None]) & ~missed[None, :]            # (T, N) predicted a species
    onehot_best = np.eye(k)[best]                                         # (N, K)
    correct = (best == true)[:, None] * onehot_best
    tp = above.astype(np.float64) @ correct                               # (T, K)
    fp = above.astype(np.float64) @ (onehot_best - correct)
    support = np.bincount(true[true >= 0], minlength=k).astype(np.float64)
    fn = support[None, :] - tp
    p, r, f = _prf(tp, fp, fn)
    on = support > 0
    mp, mr, mf = _prf(tp.sum(1), fp.sum(1), fn.sum(1))
    macro = f[:, on].mean(axis=1) if on.any() else np.zeros(len(t))
    return {"thresholds": t, "micro_f1": mf, "macro_f1": macro, "micro_precision": mp, "micro_recall": mr}


def flatness(thresholds: np.ndarray, f1: np.ndarray, tol: float = FLAT_TOL) -> dict[str, float]:
    """Best threshold and how flat the F1 curve is around it.

    Returns
    -------
    dict
        ``best_threshold`` (first argmax), ``best_f1``, ``plateau`` [lo, hi] = the contiguous range
        around the best where F1 >= best - ``tol``, ``plateau_width``, ``drop_at_pm005`` = best F1
        minus the lower of the F1 values 0.05 below and above the best threshold (clipped to the grid).
    """
    t, f = np.asarray(thresholds, np.float64), np.asarray(f1, np.float64)
    i = int(np.argmax(f))
    ok = f >= f[i] - tol
    lo = i
    while lo > 0 and ok[lo - 1]:
        lo -= 1
    hi = i
    while hi < len(f) - 1 and ok[hi + 1]:
        hi += 1
    near = [int(np.argmin(np.abs(t - (t[i] + d)))) for d in (-0.05, 0.05)]
    return {"best_threshold": float(t[i]), "best_f1": float(f[i]), "plateau": [float(t[lo]), float(t[hi])],
            "plateau_width": float(t[hi] - t[lo]), "drop_at_pm005": float(f[i] - min(f[j] for j in near))}


# ---------------------------------------------------------------- settings and data
@dataclass
class EvalSettings:
    """Everything that defines an evaluation run (recorded verbatim in the JSON).

    Attributes
    ----------
    mode : ``"end-to-end"`` | ``"recognition"`` (crop sets are always recognition-only).
    entries : encoder entries (:data:`ENTRIES`).
    k : references drawn per class.
    seeds : seeds of the reference draws (one draw per seed).
    threshold : ``match.threshold`` of the headline figures: ``"auto"`` or a number.
    ratio : ``match.ratio`` (distance-ratio test of the headline; 1 = off).
    alpha : ``match.alpha`` (conformal level of ``auto``).
    iou : IoU at or above which a detection matches a box.
    thresholds : the sweep grid.
    pixel_size_nm : pixel size given to rendered images without one (1 "nm" per pixel by default);
        an image entry's own ``pixel_size_nm`` (COCO) wins.
    reference_ids : explicit references (annotation ids); one draw, ``seeds`` ignored.
    references : explicit reference library folder (``stm-agent refs`` format); one draw.
    max_images : use only the first N images of a set (subsampling; None = all).
    loco : also run leave-one-class-out for the first entry (recognition-only, sets with >= 2
        classes).
    """

    mode: str = "end-to-end"
    entries: list[str] = field(default_factory=lambda: ["pixel"])
    k: int = 1
    seeds: list[int] = field(default_factory=lambda: [0])
    threshold: float | str = "auto"
    ratio: float = 0.98
    alpha: float = 0.05
    iou: float = 0.5
    thresholds: np.ndarray = field(default_factory=lambda: SWEEP.copy())
    pixel_size_nm: float = 1.0
    reference_ids: list[int] | None = None
    references: Path | None = None
    max_images: int | None = None
    loco: bool = True

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return {"mode": self.mode, "entries": list(self.entries), "k": self.k, "seeds": list(self.seeds),
                "threshold": self.threshold, "ratio": self.ratio, "alpha": self.alpha, "iou": self.iou,
                "thresholds": [float(t) for t in self.thresholds], "pixel_size_nm": self.pixel_size_nm,
                "reference_ids": self.reference_ids,
                "references": str(self.references) if self.references else None, "max_images": self.max_images,
                "loco": self.loco}


@dataclass
class Scored:
    """Per-object scores of one entry and one reference draw.

    Attributes
    ----------
    classes : class names (K).
    true : int ``(N,)`` true class index, -1 = no object (a detection matching no box).
    scores : float32 ``(N, K)`` best cosine similarity to each species (-1 = no reference).
    missed : bool ``(N,)`` ground-truth object without a detection (end-to-end).
    objects : per-object records (image, ann_id, bbox) in the same order.
    references : the references used ({class, ann_id, image}).
    info : encoder choices (auto), detection counts, thresholds, classes without a reference.
    group : int ``(N,)`` image of each object (0 for crop sets).
    thr : float64 ``(N,)`` the decision threshold of each object (its image's).
    ratio : the distance-ratio test of the decision.
    """

    classes: list[str]
    true: np.ndarray
    scores: np.ndarray
    missed: np.ndarray
    objects: list[dict[str, Any]]
    references: list[dict[str, Any]]
    info: dict[str, Any] = field(default_factory=dict)
    group: np.ndarray | None = None
    thr: np.ndarray | None = None
    ratio: float = 1.0

    def predict(self, threshold: float | np.ndarray | None = None, ratio: float | None = None) -> np.ndarray:
        """:func:`predict` at the decision of the run (default) or at ``threshold`` / ``ratio``."""
        t = self.thr if threshold is None else threshold
        r = self.ratio if (ratio is None and threshold is None) else (1.0 if ratio is None else ratio)
        return predict(self.scores, self.missed, -np.inf if t is None else t, r)

    def confusion(self, threshold: float | np.ndarray | None = None, ratio: float | None = None) -> np.ndarray:
        """:func:`confusion_matrix` at the run's decision, or at ``threshold`` (scalar or ``(N,)``)."""
        return confusion_matrix(self.true, self.predict(threshold, ratio), len(self.classes))


def count_errors(sc: Scored, pred: np.ndarray) -> dict[str, Any]:
    """Per-frame count error |predicted - true| per species and for ``other`` (end-to-end).

    True counts: the scored labelled objects of each class in the frame (``other``: 0); predicted:
    the frame's scored detections counted as each species / ``other``. Returns ``{class: mean
    absolute error over frames}`` + ``"other"`` + ``"n_frames"`` + ``"total"`` (sum over classes and
    other, mean over frames).
    """
    k = len(sc.classes)
    g = np.zeros(len(sc.true), np.int64) if sc.group is None else sc.group
    frames = np.unique(g)
    err = np.zeros((len(frames), k + 1))
    for n, f in enumerate(frames):
        rows = g == f
        t = np.bincount(sc.true[rows & (sc.true >= 0)], minlength=k)[:k]
        det = rows & ~sc.missed
        p = np.bincount(pred[det], minlength=k + 2)
        err[n, :k] = np.abs(p[:k] - t)
        err[n, k] = p[k]
    out = {c: float(err[:, i].mean()) if len(frames) else 0.0 for i, c in enumerate(sc.classes)}
    out[OTHER] = float(err[:, k].mean()) if len(frames) else 0.0
    out["total"] = float(err.sum(axis=1).mean()) if len(frames) else 0.0
    out["n_frames"] = int(len(frames))
    return out


def clip_label(model_dir: str | Path | None) -> str:
    """``"CLIP (random weights, path check only)"`` when model.json says ``pretrained`` is none,
    else ``"CLIP (<pretrained>)"``."""
    if model_dir is None:
        return "CLIP"
    try:
        pre = json.loads((Path(model_dir) / "model.json").read_text(encoding="utf-8")).get("pretrained")
    except (OSError, ValueError):
        pre = None
    if pre is None or str(pre).lower() in ("none", "", "random"):
        return "CLIP (random weights, path check only)"
    return f"CLIP ({pre})"


def entry_label(entry: str, cfg: AgentConfig) -> str:
    """Human label of an entry (CLIP says when its weights are random)."""
    cands = _candidates(cfg)
    if entry == "clip":
        return clip_label(cfg.encoder.model_dir)
    if entry == "auto":
        return f"auto (GMM: {' vs '.join(clip_label(cfg.encoder.model_dir) if c == 'clip' else c for c in cands)})"
    if entry == RELEASED:
        return (f"UniMR as released (Otsu INV/RETR_TREE segmentation, bbox crops, no mirror, t={RELEASED_THRESHOLD}, "
                f"pooled-max GMM: {' vs '.join(cands)})")
    return entry


def _candidates(cfg: AgentConfig) -> list[str]:
    """Auto candidates, as :func:`models.registry.make_encoders`: pixel + (clip with model_dir, else zernike)."""
    return ["pixel", "clip" if cfg.encoder.model_dir is not None else "zernike"]


def ref_recs_key(objs: list[tuple[int, int]]) -> tuple:
    """Cache key of a draw's references (their (image, box) indices)."""
    return tuple((int(a), int(b)) for a, b in objs)


def released_regions(image: np.ndarray, k_sd: float = 2.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The released UniMR GUI's segmentation (kept as released whatever our default becomes).

    The flattened frame mapped to 8-bit grey (its 1..99 % range), Otsu threshold with
    ``THRESH_BINARY_INV``, ``findContours(RETR_TREE)`` (every contour of the tree, holes included),
    area window mean +- ``k_sd`` sd of the contour areas (OpenCV ``contourArea``).

    Returns
    -------
    (boxes, centroids, touches_edge) : float64 ``(N, 4)`` ``(x, y, w, h)``, float64 ``(N, 2)``, bool ``(N,)``.
    """
    fin = np.isfinite(image)
    lo, hi = frame_range(image)
    g = np.clip((np.where(fin, image, lo) - lo) / max(hi - lo, 1e-30) * 255.0, 0, 255).astype(np.uint8)
    _, mask = cv2.threshold(g, 0, 255, cv2.THRESH_BINARY_INV + cv2.THRESH_OTSU)
    contours, _ = cv2.findContours(mask, cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE)
    areas = np.array([cv2.contourArea(c) for c in contours], np.float64)
    if not len(contours) or not (areas > 0).any():
        return np.zeros((0, 4)), np.zeros((0, 2)), np.zeros(0, bool)
    a = areas[areas > 0]
    lo_a, hi_a = a.mean() - k_sd * a.std(), a.mean() + k_sd * a.std()
    keep = [i for i in range(len(contours)) if areas[i] > 0 and lo_a <= areas[i] <= hi_a]
    ny, nx = image.shape
    boxes, cents, edge = [], [], []
    for i in keep:
        x, y, w, h = cv2.boundingRect(contours[i])
        mo = cv2.moments(contours[i])
        cents.append((mo["m10"] / mo["m00"], mo["m01"] / mo["m00"]) if mo["m00"] else (x + w / 2, y + h / 2))
        boxes.append((x, y, w, h))
        edge.append(x <= 0 or y <= 0 or x + w >= nx or y + h >= ny)
    return np.array(boxes, np.float64).reshape(-1, 4), np.array(cents, np.float64).reshape(-1, 2), np.array(edge, bool)


class Evaluator:
    """Scores one labelled set with several entries and reference draws, caching what does not
    depend on the draw (detections per image, encoders, query embeddings).

    Parameters
    ----------
    lset : LabelledSet
    cfg : AgentConfig
        Effective configuration (detection, normalisation, encoder model_dir).
    settings : EvalSettings

    Raises
    ------
    ConfigError
        Unknown entry, ``clip`` without ``encoder.model_dir``, explicit annotation ids not in the
        set, or end-to-end on a crops set.
    """

    def __init__(self, lset: LabelledSet, cfg: AgentConfig, settings: EvalSettings):
        for e in settings.entries:
            if e not in ENTRIES:
                raise ConfigError(f"--compare: unknown entry {e!r}; allowed: {', '.join(ENTRIES)}")
        if "clip" in settings.entries and cfg.encoder.model_dir is None:
            raise ConfigError("--compare clip needs --model-dir (a folder written by `stm-agent models export`)")
        self.lset, self.cfg, self.s = lset, cfg, settings
        self.crops_mode = lset.format == "crops"
        self.mode = "recognition" if self.crops_mode else settings.mode
        if self.mode not in ("end-to-end", "recognition"):
            raise ConfigError(f"mode: {self.mode!r}; allowed: end-to-end, recognition")
        self.images = lset.images[: settings.max_images] if settings.max_images else lset.images
        self.classes = list(lset.classes)
        self._enc: dict[str, Any] = {}
        self._emb: dict[tuple, np.ndarray] = {}
        self._det: dict[Any, tuple] = {}
        self._crop_grey: np.ndarray | None = None

    # -- encoders and embeddings
    def encoder(self, name: str):
        """The encoder ``name`` (built once)."""
        if name not in self._enc:
            from stm_agent.models.registry import make_encoder

            self._enc[name] = make_encoder(self.cfg.encoder.model_copy(update={"name": name}), self.cfg.normalise)
        return self._enc[name]

    def _embed(self, name: str, key: tuple, grey: np.ndarray) -> np.ndarray:
        """Embeddings of ``grey`` uint8 ``(N, S, S)`` with ``name``, cached under ``key``."""
        k = (name, *key)
        if k not in self._emb:
            enc = self.encoder(name)
            self._emb[k] = enc.embed(grey) if len(grey) else np.zeros((0, 1), np.float32)
        return self._emb[k]

    def pixel_size(self, i: int) -> float:
        """nm per pixel of image ``i``: its COCO ``pixel_size_nm`` when given, else the setting."""
        ps = getattr(self.images[i], "pixel_size_nm", None)
        if ps is not None:
            return float(np.atleast_1d(ps)[0])
        return float(self.s.pixel_size_nm)

    # -- per-image detection (draw-independent)
    def _plain(self, i: int) -> np.ndarray:
        """The flattened frame of image ``i`` (as :func:`agent.pipeline.detect` flattens it)."""
        key = ("plain", i)
        if key not in self._det:
            from stm_agent.agent.flatten import flatten

            from stm_agent.agent.channel import choose_channel

            scan = image_scan(self.images[i].path, self.pixel_size(i))
            ch, _ = choose_channel(scan, self.cfg.channel, self.cfg.channel_candidates, direction=self.cfg.direction)
            self._det[key] = flatten(scan.frame(ch, self.cfg.direction),
                                     plane=self.cfg.flatten.plane, rows=self.cfg.flatten.rows)
        return self._det[key]

    def detections(self, i: int, released: bool = False, refs: tuple | None = None) -> tuple:
        """``(image, det_boxes (N,4), centroids (N,2), edge (N,), match (N,), gt_border (K,))``:
        our detection (:func:`agent.pipeline.detect`, given the draw's references as the pipeline
        gives its library's: their extents (the object-size prior) and crops (the template
        detector)) or, ``released``, :func:`released_regions`. Cached per image (and draw).

        ``refs``: ``(key, list[Reference])`` of the draw, None without references."""
        ext = None if (released or not refs) else refs[0]
        key = ("released", i) if released else (i, ext)
        if key not in self._det:
            im = self.images[i]
            if released:
                image = self._plain(i)
                db, dc, edge = released_regions(image)
            else:
                from stm_agent.agent.pipeline import detect

                scan = image_scan(im.path, self.pixel_size(i))
                if ext:
                    from stm_agent.agent.templates import Template

                    rs = refs[1]
                    image, regions = detect(scan, self.cfg, [r.extent_nm for r in rs], None,
                                            [Template(r.species, r.crop, r.pixel_size_nm, r.extent_nm) for r in rs])
                else:
                    image, regions = detect(scan, self.cfg)
                db = np.array([r.bbox_px for r in regions], np.float64).reshape(-1, 4)
                dc = np.array([r.centroid_px for r in regions], np.float64).reshape(-1, 2)
                edge = np.array([r.touches_edge for r in regions], bool)
            m = match_boxes(db, dc, im.boxes, self.s.iou, centroid_inside=False)
            self._det[key] = (image, db, dc, edge, m, _box_on_border(im.boxes, im.width, im.height))
        return self._det[key]

    # -- references
    def _objects(self) -> list[tuple[int, int]]:
        """All ground-truth objects as (image index, box index) (crops: (class index, file index))."""
        if self.crops_mode:
            return [(c, j) for c, cl in enumerate(self.classes) for j in range(len(self.lset.crops[cl]))]
        return [(i, j) for i, im in enumerate(self.images) for j in range(len(im.labels))]

    def _label(self, o: tuple[int, int]) -> int:
        if self.crops_mode:
            return o[0]
        return self.classes.index(self.images[o[0]].labels[o[1]])

    def draw_references(self, seed: int) -> list[tuple[int, int]]:
        """K references per class at labelled boxes: explicit ``reference_ids`` or drawn with
        ``default_rng(seed)`` among the boxes that do not touch the image border (a cut object is
        no example). A class without such a box gets none (reported by :meth:`score`).

        Raises
        ------
        ConfigError
            An explicit annotation id is not in the set.
        """
        objs = self._objects()
        if self.s.reference_ids:
            ids = {}
            for o in objs:
                if not self.crops_mode and self.images[o[0]].ann_ids:
                    ids[self.images[o[0]].ann_ids[o[1]]] = o
            missing = [a for a in self.s.reference_ids if a not in ids]
            if missing:
                raise ConfigError(f"--reference-ids: annotation ids {missing} are not in {self.lset.name}")
            return [ids[a] for a in self.s.reference_ids]
        rng = np.random.default_rng(seed)
        labels = np.array([self._label(o) for o in objs])
        out = []
        for c in range(len(self.classes)):
            cand = np.flatnonzero(labels == c)
            got = 0
            for j in rng.permutation(cand):
                o = objs[int(j)]
                if not self.crops_mode:
                    im = self.images[o[0]]
                    if _box_on_border(im.boxes[o[1]][None], im.width, im.height)[0]:
                        continue
                out.append(o)
                got += 1
                if got == self.s.k:
                    break
        return out

    def _ref_record(self, o: tuple[int, int]) -> dict[str, Any]:
        if self.crops_mode:
            cl = self.classes[o[0]]
            return {"class": cl, "file": self.lset.crops[cl][o[1]].name}
        im = self.images[o[0]]
        return {"class": im.labels[o[1]], "ann_id": im.ann_ids[o[1]] if im.ann_ids else o[1], "image": im.path.name}

    def references_at_boxes(self, objs: list[tuple[int, int]]) -> list[Reference]:
        """:class:`agent.references.Reference` of each drawn object, cut at its labelled box.

        Image sets: a crop of 2 x the box's extent (:func:`agent.references.object_extent_nm`)
        centred on the box, from the flattened frame, as ``stm-agent refs add`` stores one. Crop
        sets: the crop file resized whole to ``normalise.size_px`` over a window of 1 / window_factor
        of it (so the reference window is the whole crop).
        """
        out = []
        for o in objs:
            name = self.classes[self._label(o)]
            if self.crops_mode:
                s = self.cfg.normalise.size_px
                c = cv2.resize(read_grey(self.lset.crops[name][o[1]]), (s, s), interpolation=cv2.INTER_AREA)
                ext = s / max(self.cfg.normalise.window_factor, 1e-9)
                out.append(Reference(name, c.astype(np.float32), (1.0, 1.0), float(ext), name=str(o)))
                continue
            i, j = o
            box = self.images[i].boxes[j]
            ps = self.pixel_size(i)
            image = self._plain(i)
            ext = float(object_extent_nm(box, (ps, ps))[0])
            fin = np.isfinite(image)
            filled = np.where(fin, image, np.median(image[fin])).astype(np.float32)
            side = max(4, int(round(2.0 * ext / ps)))
            crop = cv2.getRectSubPix(filled, (side, side), (float(box[0] + box[2] / 2), float(box[1] + box[3] / 2)))
            out.append(Reference(name, crop, (ps, ps), ext, grey_range=frame_range(image), name=str(o)))
        return out

    # -- crops
    def _crops_grey(self) -> np.ndarray:
        """Crops set: every crop file resized whole to ``size_px`` and normalised, uint8 ``(N, S, S)``."""
        if self._crop_grey is None:
            s = self.cfg.normalise.size_px
            arr = [cv2.resize(read_grey(p), (s, s), interpolation=cv2.INTER_AREA)
                   for cl in self.classes for p in self.lset.crops[cl]]
            self._crop_grey = to_grey(np.stack(arr), self.cfg.normalise)
        return self._crop_grey

    def _bbox_grey(self, image: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        """UniMR as released: each bounding box ``(x, y, w, h)`` cut out and stretched to S x S."""
        s = self.cfg.normalise.size_px
        fin = np.isfinite(image)
        img = np.where(fin, image, np.median(image[fin])).astype(np.float32)
        out = np.empty((len(boxes), s, s), np.float32)
        for n, (x, y, w, h) in enumerate(np.asarray(boxes, np.float64)):
            x0, y0 = int(max(0, np.floor(x))), int(max(0, np.floor(y)))
            x1, y1 = int(min(img.shape[1], np.ceil(x + w))), int(min(img.shape[0], np.ceil(y + h)))
            patch = img[y0:max(y1, y0 + 1), x0:max(x1, x0 + 1)]
            out[n] = cv2.resize(patch, (s, s), interpolation=cv2.INTER_AREA if patch.shape[0] > s else cv2.INTER_LINEAR)
        if not len(out):
            return np.zeros((0, s, s), np.uint8)
        return to_grey(out, self.cfg.normalise)

    def _released_refs(self, name: str, objs: list[tuple[int, int]], species: list[str]) -> RefEmbeddings:
        """Reference pose embeddings as released: bbox crops, 36 rotations, no mirror."""
        if self.crops_mode:
            flat = {o: n for n, o in enumerate(self._objects())}
            grey = self._crops_grey()[[flat[o] for o in objs]]
        else:
            grey = np.concatenate([self._bbox_grey(self._plain(i), self.images[i].boxes[j][None]) for i, j in objs])
        ncfg = self.cfg.normalise.model_copy(update={"mirror": False})
        poses, angles, mirrored = make_poses(grey, ncfg)
        r, p, s, _ = poses.shape
        names = sorted(set(species))
        return RefEmbeddings(emb=self.encoder(name).embed(poses.reshape(r * p, s, s)),
                             species_idx=np.repeat([names.index(x) for x in species], p), angle_deg=np.tile(angles, r),
                             mirrored=np.tile(mirrored, r), species=names, ref_idx=np.repeat(np.arange(r), p),
                             mirror=False, mirror_reason="as released: no mirror")

    def _library_references(self) -> tuple[list[Reference], list[tuple[int, int]]]:
        """References from a :class:`adapters.references.ReferenceLibrary` folder.

        Species map to classes by name (``_`` read as a space where that names a class). A ground-truth
        box of an evaluated image that contains a reference's picked position (provenance ``scan``
        file name and ``position_px``) is treated as that reference: never scored.

        Raises
        ------
        ConfigError
            A library species is not a class of the set.
        """
        from stm_agent.adapters.references import ReferenceLibrary

        refs = ReferenceLibrary(self.s.references).references()
        objs = []
        for r in refs:
            name = r.species if r.species in self.classes else r.species.replace("_", " ")
            if name not in self.classes:
                raise ConfigError(f"{self.s.references}: species {r.species!r} is not a class of {self.lset.name} "
                                  f"({self.classes})")
            r.species = name
            src, pos = Path(str(r.provenance.get("scan", ""))).name, r.provenance.get("position_px")
            for i, im in enumerate(self.images if not self.crops_mode else []):
                if im.path.name == src and pos is not None:
                    b = im.boxes
                    inside = np.flatnonzero((b[:, 0] <= pos[0]) & (pos[0] <= b[:, 0] + b[:, 2])
                                            & (b[:, 1] <= pos[1]) & (pos[1] <= b[:, 1] + b[:, 3]))
                    objs += [(i, int(j)) for j in inside[:1]]
        return refs, objs

    # -- queries of one group
    def _queries(self, i, ref_set, released: bool, ext=None) -> tuple[np.ndarray, list[int], list[dict], list[tuple[int, dict]]]:
        """Scored queries of group ``i``: (row indices into the group's crops, true labels, records,
        missed ground truth [(label, record)])."""
        if self.crops_mode:
            objs = self._objects()
            keep = [n for n, o in enumerate(objs) if o not in ref_set]
            recs = [{"image": self.lset.crops[self.classes[objs[n][0]]][objs[n][1]].name} for n in keep]
            return np.array(keep, np.int64), [objs[n][0] for n in keep], recs, []
        im = self.images[i]
        lab = np.array([self.classes.index(x) for x in im.labels], np.int64)
        refs_here = np.zeros(len(im.labels), bool)
        for (a, b) in ref_set:
            if a == i:
                refs_here[b] = True
        aid = lambda j: im.ann_ids[j] if im.ann_ids else int(j)  # noqa: E731
        if self.mode == "recognition":
            keep = np.flatnonzero(~refs_here)
            recs = [{"image": im.path.name, "ann_id": aid(j), "bbox": [float(v) for v in im.boxes[j]]} for j in keep]
            return keep, lab[keep].tolist(), recs, []
        _, db, dc, edge, m, border = self.detections(i, released, ext)
        ignored = border | refs_here
        ignored[m[(m >= 0) & edge]] = True                          # boxes matched by cut objects
        kept = ~edge & ~((m >= 0) & ignored[np.maximum(m, 0)])
        q = np.flatnonzero(kept)
        q_true = np.where(m[q] >= 0, lab[np.maximum(m[q], 0)], -1).tolist()
        recs = [{"image": im.path.name, "ann_id": aid(int(m[j])) if m[j] >= 0 else None,
                 "bbox": [float(v) for v in db[j]]} for j in q]
        found = np.zeros(len(lab), bool)
        found[m[q][m[q] >= 0]] = True
        miss = [(int(lab[j]), {"image": im.path.name, "ann_id": aid(j), "bbox": [float(v) for v in im.boxes[j]]})
                for j in np.flatnonzero(~ignored & ~found)]
        return q, q_true, recs, miss

    def _group_grey(self, i, released: bool, ext=None) -> tuple[np.ndarray, tuple, np.ndarray, np.ndarray]:
        """All crops of group ``i`` (every detection end-to-end, every box recognition-only):
        ``(grey uint8 (N, S, S), cache key, image, object boxes (N, 4))``."""
        if self.crops_mode:
            return self._crops_grey(), ("crops",), None, np.zeros((0, 4))
        if self.mode == "end-to-end":
            image, boxes, cen = self.detections(i, released, ext)[:3]
        else:
            image = self._plain(i)
            boxes = np.asarray(self.images[i].boxes, np.float64).reshape(-1, 4)
            cen = boxes[:, :2] + boxes[:, 2:] / 2
        if released:
            return self._bbox_grey(image, boxes), ("bbox", i), image, boxes
        ps = self.pixel_size(i)
        wins = window_nm(object_extent_nm(boxes, (ps, ps)), self.cfg.normalise)
        key = ("own", i) if self.mode != "end-to-end" else ("own", i, ext[0] if ext else None)
        return normalise_crops(image, cen, wins, (ps, ps), self.cfg.normalise), key, image, boxes

    # -- one entry, one draw
    def score(self, entry: str, seed: int, exclude_class: int | None = None) -> Scored:
        """Per-object best-species scores of ``entry`` with the references of draw ``seed``, and the
        decision threshold of each object's image (``match.threshold``; ``unimr-as-released``: 0.9).

        ``exclude_class``: leave that class's references out (leave-one-class-out); its objects
        are still scored (they should come out ``other``).
        """
        from stm_agent.agent.selection import select_encoder, species_separation

        released = entry == RELEASED
        names = _candidates(self.cfg) if entry in ("auto", RELEASED) else [entry]
        if self.s.references is not None:  # explicit library: its own crops
            refs, ref_objs = self._library_references()
            ref_species = [r.species for r in refs]
            ref_recs = [{"class": r.species, "file": r.name} for r in refs]
        else:
            ref_objs = self.draw_references(seed)
            if exclude_class is not None:
                ref_objs = [o for o in ref_objs if self._label(o) != exclude_class]
            ref_species = [self.classes[self._label(o)] for o in ref_objs]
            ref_recs = [self._ref_record(o) for o in ref_objs]
            refs = None
        k = len(self.classes)
        info: dict[str, Any] = {"n_references": len(ref_species)}
        missing_cls = [c for c in self.classes if c not in ref_species
                       and (exclude_class is None or c != self.classes[exclude_class])]
        if missing_cls:
            info["no_reference"] = missing_cls
        ref_emb: dict[str, RefEmbeddings] = {}
        if ref_species:
            for n in names:
                if released:
                    ref_emb[n] = self._released_refs(n, ref_objs, ref_species)
                else:
                    if refs is None:
                        refs = self.references_at_boxes(ref_objs)
                    ref_emb[n] = embed_references(refs, self.encoder(n), self.cfg.normalise)
            first = ref_emb[names[0]]
            info["mirror"] = {"used": first.mirror, "reason": first.mirror_reason}
            if entry == "auto" and len(names) > 1:  # item 7: never an encoder that cannot separate the species
                sep = {n: species_separation(ref_emb[n]) for n in names}
                info["separation"] = sep
                ok = [n for n in names if sep[n]["separable"]]
                if ok and len(ok) < len(names):
                    names = ok
        cols = {c: self.classes.index(c) for c in (ref_emb[names[0]].species if ref_emb else [])}
        ref_set = set(ref_objs)
        gate = (not released and not self.crops_mode and self.cfg.match.size_tolerance is not None)
        true, scores, missed, objects, chosen, group, thr_obj = [], [], [], [], {}, [], []
        thr_recs = []
        groups = [None] if self.crops_mode else range(len(self.images))
        ext = None
        if not released and ref_species and not self.crops_mode:  # the size prior of the detector
            if refs is None:
                refs = self.references_at_boxes(ref_objs)
            ext = (("library",) if self.s.references is not None else ref_recs_key(ref_objs), refs)
        for i in groups:
            q_idx, q_true, q_obj, miss_rows = self._queries(i, ref_set, released, ext)
            grey_all, key, image, boxes = self._group_grey(i, released, ext)
            pick = names[0]
            sc = np.full((len(q_idx), k), -1.0, np.float32)
            t_here = -1.0
            if ref_emb and len(grey_all):
                emb = {n: self._embed(n, key, grey_all) for n in names}
                if len(names) > 1:  # UniMR selection on every object of the frame
                    pick = select_encoder({n: (emb[n], ref_emb[n].emb) for n in names}).chosen
                    chosen[pick] = chosen.get(pick, 0) + 1
                if len(q_idx):
                    s_ref, _ = species_scores(emb[pick][q_idx], ref_emb[pick])
                    if gate and i is not None and self.images[i].pixel_size_nm is not None:  # as the pipeline
                        ps = self.pixel_size(i)
                        s_ref = size_gate(s_ref, object_extent_nm(boxes[q_idx], (ps, ps)), ref_emb[pick],
                                          self.cfg.match.size_tolerance)
                    for c, col in cols.items():
                        sc[:, col] = s_ref[:, ref_emb[pick].species.index(c)]
            if released:
                t_here = RELEASED_THRESHOLD
            elif self.s.threshold != "auto":
                t_here = float(self.s.threshold)
            elif ref_emb and image is not None:
                ps = self.pixel_size(i)
                sample: dict = {}
                z = null_scores(image, (ps, ps), boxes, self.encoder(pick), ref_emb[pick], self.cfg.normalise,
                                sample=sample)
                tc = auto_threshold(z, self.s.alpha, self.s.ratio, sample)
                t_here = tc.value
                thr_recs.append({"group": -1 if i is None else int(i), **tc.to_json()})
            else:
                thr_recs.append({"group": -1, "mode": "auto", "value": -1.0, "method": "no null sample",
                                 "reason": "crops without a frame: ratio test only"})
            scores.append(sc)
            true += q_true
            missed += [False] * len(q_idx)
            objects += q_obj
            gid = i if i is not None else 0
            group += [gid] * (len(q_idx) + len(miss_rows))
            thr_obj += [t_here] * (len(q_idx) + len(miss_rows))
            for lab, rec in miss_rows:
                scores.append(np.full((1, k), -1.0, np.float32))
                true.append(lab)
                missed.append(True)
                objects.append(rec)
        if chosen:
            info["encoder_chosen"] = chosen
        info["thresholds"] = thr_recs
        m = np.array(missed, bool)
        t = np.array(true, np.int64)
        if self.mode == "end-to-end":
            gt = int((t >= 0).sum())
            nd = int((~m).sum())
            info.update({"gt_scored": gt, "gt_detected": int(((t >= 0) & ~m).sum()),
                         "detection_recall": float(((t >= 0) & ~m).sum() / gt) if gt else 0.0,
                         "detections_scored": nd, "detections_no_object": int(((t < 0) & ~m).sum()),
                         "detection_precision": float(((t >= 0) & ~m).sum() / nd) if nd else 0.0})
        return Scored(self.classes, t, np.concatenate(scores).astype(np.float32).reshape(-1, k) if scores
                      else np.zeros((0, k), np.float32), m, objects, ref_recs, info, np.array(group, np.int64),
                      np.array(thr_obj, np.float64), 1.0 if released else float(self.s.ratio))


# ---------------------------------------------------------------- whole runs
def _mean_std(values: list[float]) -> dict[str, float]:
    a = np.asarray(values, np.float64)
    return {"mean": float(a.mean()) if a.size else 0.0, "std": float(a.std(ddof=0)) if a.size else 0.0,
            "min": float(a.min()) if a.size else 0.0, "max": float(a.max()) if a.size else 0.0}


def evaluate_entry(ev: Evaluator, entry: str) -> tuple[dict[str, Any], list[Scored]]:
    """All draws of one entry: per-seed metrics (default decision and argmax) and sweep, and their
    summary (mean, spread).

    Returns
    -------
    (result, scored) : JSON-ready dict; the per-seed :class:`Scored` (for the per-object CSV).
    """
    s = ev.s
    seeds = [s.seeds[0]] if (s.reference_ids or s.references) else list(s.seeds)
    per_seed, scored = [], []
    conf_sum = None
    for seed in seeds:
        sc = ev.score(entry, seed)
        conf = sc.confusion()
        conf_sum = conf if conf_sum is None else conf_sum + conf
        am = metrics(sc.confusion(-np.inf, 1.0), ev.classes)
        sw = sweep(sc.true, sc.scores, sc.missed, s.thresholds)
        fl = flatness(sw["thresholds"], sw["macro_f1"])
        rec = {"seed": seed, "references": sc.references, **sc.info, **metrics(conf, ev.classes),
               "argmax": {"micro": am["micro"], "macro": am["macro"]},
               "confusion": conf.tolist(), "sweep": {k: [round(float(x), 5) for x in v] for k, v in sw.items()},
               "best": fl}
        if ev.mode == "end-to-end":
            rec["count_error"] = count_errors(sc, sc.predict())
        per_seed.append(rec)
        scored.append(sc)
    mf = np.array([p["sweep"]["micro_f1"] for p in per_seed])
    maf = np.array([p["sweep"]["macro_f1"] for p in per_seed])
    fl = flatness(s.thresholds, maf.mean(axis=0))
    vals = [r["value"] for p in per_seed for r in p.get("thresholds", []) if r.get("value") is not None]
    summary: dict[str, Any] = {
        "threshold": s.threshold if entry != RELEASED else RELEASED_THRESHOLD,
        "ratio": s.ratio if entry != RELEASED else 1.0, "n_draws": len(seeds),
        "micro": {m: _mean_std([p["micro"][m] for p in per_seed]) for m in ("precision", "recall", "f1")},
        "macro": {m: _mean_std([p["macro"][m] for p in per_seed]) for m in ("precision", "recall", "f1")},
        "argmax": {"micro_f1": _mean_std([p["argmax"]["micro"]["f1"] for p in per_seed]),
                   "macro_f1": _mean_std([p["argmax"]["macro"]["f1"] for p in per_seed])},
        "per_class": {c: {m: _mean_std([p["per_class"][c][m] for p in per_seed]) for m in ("precision", "recall", "f1")}
                      | {"support": _mean_std([p["per_class"][c]["support"] for p in per_seed])} for c in ev.classes},
        "confusion_summed": conf_sum.tolist(),
        "sweep_mean": {"thresholds": [float(t) for t in s.thresholds], "micro_f1": mf.mean(0).round(5).tolist(),
                       "micro_f1_std": mf.std(0).round(5).tolist(), "macro_f1": maf.mean(0).round(5).tolist()},
        "best": fl,
        "best_threshold_per_seed": _mean_std([p["best"]["best_threshold"] for p in per_seed]),
        "auto_threshold": _mean_std(vals) | {"n": len(vals)},
        "no_reference_draws": sum(1 for p in per_seed if p.get("no_reference")),
    }
    if ev.mode == "end-to-end":
        summary["detection_recall"] = _mean_std([p["detection_recall"] for p in per_seed])
        summary["detection_precision"] = _mean_std([p["detection_precision"] for p in per_seed])
        keys = [*ev.classes, OTHER, "total"]
        summary["count_error"] = {c: _mean_std([p["count_error"][c] for p in per_seed]) for c in keys}
    ch: dict[str, int] = {}
    for p in per_seed:
        for k, v in p.get("encoder_chosen", {}).items():
            ch[k] = ch.get(k, 0) + v
    if ch:
        summary["encoder_chosen"] = ch
    mirror = [p["mirror"]["used"] for p in per_seed if "mirror" in p]
    if mirror:
        summary["mirror_used"] = f"{sum(mirror)}/{len(mirror)}"
    return {"entry": entry, "label": entry_label(entry, ev.cfg), "summary": summary, "seeds": per_seed}, scored


def leave_one_class_out(ev: Evaluator, entry: str) -> dict[str, Any] | None:
    """Leave-one-class-out on a recognition-only evaluator (None with < 2 classes or explicit refs).

    For each class c and draw: the references of c are left out; every other object is scored as
    usual. Reported per left-out class: the share of c's objects that come out ``other`` (target
    >= 0.8), and the remaining classes' macro F1 at the default decision and at argmax (c's
    objects count as objects of no class: any species given to them is a false positive).
    """
    if len(ev.classes) < 2 or ev.s.references is not None or ev.s.reference_ids or ev.mode != "recognition":
        return None
    out: dict[str, Any] = {}
    for c, name in enumerate(ev.classes):
        rej, f_def, f_arg = [], [], []
        for seed in ev.s.seeds:
            sc = ev.score(entry, seed, exclude_class=c)
            k = len(ev.classes)
            pred = sc.predict()
            left = sc.true == c
            if left.any():
                rej.append(float(np.mean(pred[left] == k)))
            t2 = np.where(left, -1, sc.true)
            keep_cls = [x for x in range(k) if x != c]
            for arr, p in ((f_def, pred), (f_arg, sc.predict(-np.inf, 1.0))):
                conf = confusion_matrix(t2, p, k)
                mm = metrics(conf, ev.classes)
                arr.append(float(np.mean([mm["per_class"][ev.classes[x]]["f1"] for x in keep_cls
                                          if mm["per_class"][ev.classes[x]]["support"] > 0] or [0.0])))
        out[name] = {"other_share": _mean_std(rej), "remaining_macro_f1": _mean_std(f_def),
                     "remaining_macro_f1_argmax": _mean_std(f_arg)}
    return out


def evaluate(lset: LabelledSet, cfg: AgentConfig, settings: EvalSettings) -> tuple[dict[str, Any], dict[str, list[Scored]]]:
    """Evaluate every entry of ``settings`` on ``lset`` (and leave-one-class-out, recognition-only).

    Returns
    -------
    (report, scored) : JSON-ready report {set, settings, config, classes, rows, cols, results, loco};
        ``{entry: [Scored per draw]}``.
    """
    ev = Evaluator(lset, cfg, settings)
    results, scored = {}, {}
    for e in settings.entries:
        results[e], scored[e] = evaluate_entry(ev, e)
    loco = {}
    if settings.loco:  # for the first entry (the configuration's encoder in `stm-agent evaluate`)
        for e in settings.entries[:1]:
            if e == RELEASED:
                continue
            r = leave_one_class_out(ev, e)
            if r is not None:
                loco[e] = r
    k = ev.classes
    ps = sorted({float(np.atleast_1d(getattr(im, "pixel_size_nm", None))[0]) for im in ev.images
                 if getattr(im, "pixel_size_nm", None) is not None})
    report = {
        "set": {"name": lset.name, "format": lset.format, "classes": k, "n_images": len(ev.images),
                "n_images_total": len(lset.images), "n_objects": lset.n_objects,
                "pixel_size_note": ("crops resized whole to normalise.size_px" if ev.crops_mode else
                                    (f"pixel_size_nm from the COCO image entries: {ps[0]:g}..{ps[-1]:g} nm" if ps else
                                     f"rendered images without physical size: {settings.pixel_size_nm} nm per pixel "
                                     "(adapters.labelled.image_scan)"))},
        "mode": ev.mode,
        "settings": settings.to_json(),
        "config": cfg.model_dump(mode="json"),
        "config_digest": cfg.digest(),
        "confusion_rows": [*k, NO_OBJECT],
        "confusion_cols": [*k, OTHER, MISSED],
        "results": results,
        "loco": loco,
    }
    return report, scored


def object_rows(lset_name: str, entry: str, scored: list[Scored], seeds: list[int]) -> list[dict]:
    """Per-object rows for the CSV: set, entry, seed, image, ann_id, bbox, true, predicted (default
    decision), threshold, similarity, best."""
    rows = []
    for seed, sc in zip(seeds, scored):
        pred = sc.predict()
        k = len(sc.classes)
        cols = [*sc.classes, OTHER, MISSED]
        for n, o in enumerate(sc.objects):
            best = int(np.argmax(sc.scores[n])) if k else 0
            rows.append({"set": lset_name, "entry": entry, "seed": seed, "image": o.get("image"),
                         "ann_id": o.get("ann_id"), "bbox": " ".join(f"{v:g}" for v in o.get("bbox", [])),
                         "true": sc.classes[sc.true[n]] if sc.true[n] >= 0 else NO_OBJECT,
                         "predicted": cols[pred[n]],
                         "threshold": None if sc.thr is None else round(float(sc.thr[n]), 5),
                         "similarity": None if sc.missed[n] or not k else round(float(sc.scores[n, best]), 5),
                         "best_species": None if sc.missed[n] or not k else sc.classes[best]})
    return rows
