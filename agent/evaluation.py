"""Evaluation of recognition against labelled ground truth (issue 5): pure logic, no CLI, no plots.

Two modes:

* ``end-to-end``: segmentation + recognition as :class:`agent.pipeline.Recognizer` does it (same
  public functions: :func:`agent.pipeline.detect`, :func:`agent.normalise.normalise_crops`,
  :func:`agent.match.species_scores`); a detection matches a ground-truth box when IoU >=
  ``iou`` (0.5) or its centroid lies inside the box (:func:`adapters.labelled.match_boxes`).
  Objects cut by the image edge are left out on both sides (as the pipeline does not count them).
* ``recognition``: crops cut at the ground-truth boxes (or class-folder crops), isolating encoder +
  matcher from segmentation.

Metrics (UniMR paper, Cao et al., Adv. Sci. 2025: precision, recall, F1 per species), all from the
confusion matrix ``C`` (rows = true class + ``(no object)``, columns = predicted species +
``other`` + ``missed``): TP_c = C[c, c]; FP_c = column c minus TP_c (wrong species and detections
of no object predicted as c); FN_c = row c minus TP_c (other species, ``other``, ``missed``).
Macro = mean of the per-class P, R, F1 over classes with support > 0; micro = P, R, F1 of the
summed TP, FP, FN. ``other`` is never a positive class.

References: explicit (annotation ids, or a reference library folder) or drawn: K per class,
``numpy.random.default_rng(seed)``; drawn reference boxes are never scored (nor the detections
matched to them). The threshold sweep re-thresholds the per-object best-species scores, no
re-embedding; embeddings are cached per (encoder, crop geometry) across seeds.

Encoder entries: ``pixel``, ``zernike``, ``clip`` (needs ``model_dir``), ``auto`` (UniMR GMM
selection per frame, :func:`agent.selection.select_encoder`), ``pixel+descriptors`` (pixel with
``match.descriptor_weight`` 0.3, end-to-end only) and ``unimr-as-released`` (the released GUI's
choices: no mirror poses, query/reference crops = the object's bounding box stretched to the crop
size instead of a fixed physical window, pooled-max GMM selection between the auto candidates).

Adaptive threshold (``match.threshold_mode: gmm``, :func:`agent.match.gmm_threshold`): every run
also scores the per-frame GMM threshold (``summary["gmm"]``), fitted to the best similarities of the
scored (non-missed, non-reference) objects of a *group*: one image end-to-end (as the pipeline fits
it per frame), the whole set recognition-only (crops of a set are not frames; per-image groups of a
few boxes would mostly fall back). ``EvalSettings.threshold_mode = "gmm"`` makes it the headline.
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
from stm_agent.agent.match import RefEmbeddings, gmm_threshold, species_scores
from stm_agent.agent.normalise import crop_windows, frame_range, make_poses, normalise_crops, to_grey

NO_OBJECT = "(no object)"
MISSED = "missed"
RELEASED = "unimr-as-released"
SINGLE = ("pixel", "zernike", "clip")
ENTRIES = (*SINGLE, "auto", "pixel+descriptors", RELEASED)
#: default threshold sweep: 0.50, 0.51, ..., 0.99
SWEEP = np.round(np.arange(0.50, 0.995, 0.01), 2)
#: a threshold is on the plateau when its F1 is within this of the best F1
FLAT_TOL = 0.02
DESCRIPTOR_WEIGHT = 0.3


# ---------------------------------------------------------------- metrics
def predict(scores: np.ndarray, missed: np.ndarray, threshold: float) -> np.ndarray:
    """Predicted column of each object: species index ``0..K-1``, ``K`` = other, ``K+1`` = missed.

    Parameters
    ----------
    scores : float32 ``(N, K)`` best cosine similarity to each species; missed : bool ``(N,)``.
    """
    n, k = scores.shape
    if k == 0:
        return np.where(missed, 1, 0).astype(np.int64)
    best = np.argmax(scores, axis=1)
    top = scores[np.arange(n), best]
    return np.where(missed, k + 1, np.where(top >= threshold, best, k)).astype(np.int64)


def adaptive_thresholds(scores: np.ndarray, missed: np.ndarray, group: np.ndarray | None,
                        threshold: float) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Per-object threshold of ``match.threshold_mode: gmm``: one :func:`agent.match.gmm_threshold`
    per group, fitted to the best similarity of that group's non-missed objects.

    Parameters
    ----------
    scores : float32 ``(N, K)``; missed : bool ``(N,)``; group : int ``(N,)`` (None: one group).
    threshold : ``match.threshold`` (fallback and centre of the clipping range).

    Returns
    -------
    (thr, records) : float64 ``(N,)`` threshold of each object (for :func:`predict`); one
        ``{"group": g, **AdaptiveThreshold.to_json()}`` per group.
    """
    n, k = scores.shape
    g = np.zeros(n, np.int64) if group is None else np.asarray(group, np.int64)
    thr = np.full(n, float(threshold))
    if n == 0 or k == 0:
        return thr, []
    top = scores.max(axis=1).astype(np.float64)
    recs = []
    for gid in np.unique(g):
        rows = g == gid
        at = gmm_threshold(top[rows & ~missed], threshold)
        thr[rows] = at.value
        recs.append({"group": int(gid), **at.to_json()})
    return thr, recs


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
    threshold : cosine-similarity threshold of the headline figures (``match.threshold``).
    iou : IoU at or above which a detection matches a box (or its centroid is inside it).
    thresholds : the sweep grid.
    pixel_size_nm : pixel size given to rendered images (unknown: 1 "nm" per pixel by default).
    reference_ids : explicit references (annotation ids); one draw, ``seeds`` ignored.
    references : explicit reference library folder (``stm-agent refs`` format); one draw.
    max_images : use only the first N images of a set (subsampling; None = all).
    threshold_mode : ``"fixed"`` (headline at ``threshold``) or ``"gmm"`` (headline at the per-group
        adaptive threshold, :func:`adaptive_thresholds`); both are always reported.
    """

    mode: str = "end-to-end"
    entries: list[str] = field(default_factory=lambda: ["pixel"])
    k: int = 1
    seeds: list[int] = field(default_factory=lambda: [0])
    threshold: float = 0.9
    iou: float = 0.5
    thresholds: np.ndarray = field(default_factory=lambda: SWEEP.copy())
    pixel_size_nm: float = 1.0
    threshold_mode: str = "fixed"
    reference_ids: list[int] | None = None
    references: Path | None = None
    max_images: int | None = None

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return {"mode": self.mode, "entries": list(self.entries), "k": self.k, "seeds": list(self.seeds),
                "threshold": self.threshold, "iou": self.iou,
                "thresholds": [float(t) for t in self.thresholds], "pixel_size_nm": self.pixel_size_nm,
                "reference_ids": self.reference_ids,
                "references": str(self.references) if self.references else None, "max_images": self.max_images,
                "threshold_mode": self.threshold_mode}


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
    info : window_nm, encoder choices (auto), detection counts.
    group : int ``(N,)`` group of the adaptive threshold (image index end-to-end, 0 otherwise).
    """

    classes: list[str]
    true: np.ndarray
    scores: np.ndarray
    missed: np.ndarray
    objects: list[dict[str, Any]]
    references: list[dict[str, Any]]
    info: dict[str, Any] = field(default_factory=dict)
    group: np.ndarray | None = None

    def confusion(self, threshold: float | np.ndarray) -> np.ndarray:
        """:func:`confusion_matrix` at ``threshold`` (scalar or float ``(N,)`` per object)."""
        return confusion_matrix(self.true, predict(self.scores, self.missed, threshold), len(self.classes))


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
        return f"UniMR as released (no mirror, bbox crops, pooled-max GMM: {' vs '.join(cands)})"
    if entry == "pixel+descriptors":
        return f"pixel + descriptors (w={DESCRIPTOR_WEIGHT})"
    return entry


def _candidates(cfg: AgentConfig) -> list[str]:
    """Auto candidates, as :func:`models.registry.make_encoders`: pixel + (clip with model_dir, else zernike)."""
    return ["pixel", "clip" if cfg.encoder.model_dir is not None else "zernike"]


class Evaluator:
    """Scores one labelled set with several entries and reference draws, caching what does not
    depend on the draw (segmentation per image, encoders, embeddings per crop geometry).

    Parameters
    ----------
    lset : LabelledSet
    cfg : AgentConfig
        Effective configuration (segmentation, normalisation, encoder model_dir, threshold).
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
        self._det: dict[int, tuple] = {}
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

    def _ncfg(self, released: bool) -> NormaliseConfig:
        return self.cfg.normalise.model_copy(update={"mirror": False}) if released else self.cfg.normalise

    # -- per-image segmentation (draw-independent)
    def detections(self, i: int) -> tuple:
        """``(image, regions, det_boxes (N,4), centroids (N,2), edge (N,), match (N,), gt_border (K,))``."""
        if i not in self._det:
            from stm_agent.agent.pipeline import detect

            im = self.images[i]
            scan = image_scan(im.path, self.s.pixel_size_nm)
            image, regions = detect(scan, self.cfg)
            db = np.array([r.bbox_px for r in regions], np.float64).reshape(-1, 4)
            dc = np.array([r.centroid_px for r in regions], np.float64).reshape(-1, 2)
            edge = np.array([r.touches_edge for r in regions], bool)
            m = match_boxes(db, dc, im.boxes, self.s.iou)
            self._det[i] = (image, regions, db, dc, edge, m, _box_on_border(im.boxes, im.width, im.height))
        return self._det[i]

    def _region_at(self, i: int, box: np.ndarray) -> int | None:
        """Region index at the centre of ``box`` as :func:`agent.pipeline.reference_crop_at` picks it
        (containing region, else nearest centroid within its own extent), None if none."""
        _, regions, _, dc, _, _, _ = self.detections(i)
        if not regions:
            return None
        px, py = box[0] + box[2] / 2, box[1] + box[3] / 2
        for j, r in enumerate(regions):
            if r.contains(px, py):
                return j
        ps = self.s.pixel_size_nm
        d = np.hypot(dc[:, 0] - px, dc[:, 1] - py) * ps
        j = int(np.argmin(d))
        return j if d[j] <= regions[j].extent_nm else None

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
        """K references per class: explicit ``reference_ids`` or drawn with ``default_rng(seed)``.

        End-to-end, a drawn box must not touch the image border and must yield a segmented object at
        its centre (as a user's click); candidates are tried in the drawn order.

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
                if self.mode == "end-to-end" and not self.crops_mode:
                    if self.detections(o[0])[6][o[1]] or self._region_at(o[0], self.images[o[0]].boxes[o[1]]) is None:
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

    def _window_grey(self, i: int, centres: np.ndarray, window: float) -> np.ndarray:
        image = self.detections(i)[0] if self.mode == "end-to-end" else self._plain(i)
        ps = (self.s.pixel_size_nm,) * 2
        return normalise_crops(image, centres, window, ps, self.cfg.normalise)

    def _plain(self, i: int) -> np.ndarray:
        """Recognition-only on boxes: the flattened frame (no segmentation needed)."""
        key = ("plain", i)
        if key not in self._det:
            from stm_agent.agent.flatten import flatten

            from stm_agent.agent.channel import choose_channel

            scan = image_scan(self.images[i].path, self.s.pixel_size_nm)
            ch, _ = choose_channel(scan, self.cfg.channel, self.cfg.channel_candidates, direction=self.cfg.direction)
            self._det[key] = flatten(scan.frame(ch, self.cfg.direction),
                                     plane=self.cfg.flatten.plane, rows=self.cfg.flatten.rows)
        return self._det[key]

    def reference_grey(self, refs: list[tuple[int, int]], released: bool) -> tuple[np.ndarray, float]:
        """Normalised pose-0 reference crops uint8 ``(R, S, S)`` and the crop window (nm; 0 for bbox crops).

        Ours: the window is ``window_factor`` x the largest reference extent (end-to-end: the
        segmented object's minimum enclosing circle; recognition: the box's longer side) or
        ``normalise.window_nm``; the reference is first cut as ``reference_crop_at`` stores it (2 x its
        extent) and then windowed, as :class:`adapters.references.ReferenceLibrary` does.
        """
        ncfg = self.cfg.normalise
        if self.crops_mode:
            g = self._crops_grey()
            flat = {o: n for n, o in enumerate(self._objects())}
            return g[[flat[o] for o in refs]], 0.0
        ps = self.s.pixel_size_nm
        ext, crops, rngs, bbs = [], [], [], []
        for i, j in refs:
            box = self.images[i].boxes[j]
            if self.mode == "end-to-end":
                image, regions = self.detections(i)[:2]
                reg = regions[self._region_at(i, box)]
                e, centre, bb = reg.extent_nm, reg.centroid_px, reg.bbox_px
            else:
                image = self._plain(i)
                e, centre, bb = float(max(box[2], box[3])) * ps, (box[0] + box[2] / 2, box[1] + box[3] / 2), box
            fin = np.isfinite(image)
            filled = np.where(fin, image, np.median(image[fin])).astype(np.float32)
            side = max(4, int(round(2.0 * e / ps)))
            crops.append(cv2.getRectSubPix(filled, (side, side), (float(centre[0]), float(centre[1]))))
            ext.append(e)
            rngs.append(frame_range(image))
            bbs.append((image, bb))
        if released:
            return np.concatenate([self._bbox_grey(im, np.array([bb])) for im, bb in bbs]), 0.0
        win = float(ncfg.window_nm) if ncfg.window_nm is not None else float(ncfg.window_factor * max(ext))
        out = []
        for c, rng in zip(crops, rngs):
            centre = np.array([[(c.shape[1] - 1) / 2.0, (c.shape[0] - 1) / 2.0]])
            out.append(to_grey(crop_windows(c, centre, win, (ps, ps), ncfg.size_px), ncfg,
                               rng if ncfg.contrast == "frame" else None)[0])
        return np.stack(out), win

    def _ref_embeddings(self, name: str, grey: np.ndarray, species: list[int], released: bool) -> RefEmbeddings:
        poses, angles, mirrored = make_poses(grey, self._ncfg(released))
        r, p, s, _ = poses.shape
        return RefEmbeddings(emb=self.encoder(name).embed(poses.reshape(r * p, s, s)),
                             species_idx=np.repeat(species, p), angle_deg=np.tile(angles, r),
                             mirrored=np.tile(mirrored, r), species=list(self.classes),
                             ref_idx=np.repeat(np.arange(r), p))

    # -- one entry, one draw
    def score(self, entry: str, seed: int) -> Scored:
        """Per-object best-species scores of ``entry`` with the references of draw ``seed``."""
        from stm_agent.agent.selection import select_encoder

        released = entry == RELEASED
        names = _candidates(self.cfg) if entry in ("auto", RELEASED) else ["pixel" if entry == "pixel+descriptors" else entry]
        if entry == "pixel+descriptors" and self.mode != "end-to-end":
            raise ConfigError("pixel+descriptors needs end-to-end mode (descriptors come from the segmented regions)")
        if self.s.references is not None:  # explicit library: its own crops and window
            refs, ref_species, rgrey, win, ref_recs = self._library_references()
            if released:
                win = 0.0
        else:
            refs = self.draw_references(seed)
            ref_species = [self._label(o) for o in refs]
            rgrey, win = self.reference_grey(refs, released)
            ref_recs = [self._ref_record(o) for o in refs]
        ref_emb = {n: self._ref_embeddings(n, rgrey, ref_species, released) for n in names}
        if entry == "pixel+descriptors":
            if self.s.references is not None:
                raise ConfigError("pixel+descriptors with --references is not supported (use drawn references)")
            ref_emb["pixel"] = self._with_descriptors(ref_emb["pixel"], refs)
        ref_set = set(refs)
        true, scores, missed, objects, chosen, group = [], [], [], [], {}, []
        k = len(self.classes)
        groups = [None] if self.crops_mode else range(len(self.images))
        for i in groups:
            q_idx, q_true, q_obj, miss_rows = self._queries(i, ref_set)
            if self.crops_mode:
                grey_all = self._crops_grey()
                key: tuple = ("crops", released)
            elif released:
                boxes = self.detections(i)[2] if self.mode == "end-to-end" else self.images[i].boxes
                grey_all = self._bbox_grey(self.detections(i)[0] if self.mode == "end-to-end" else self._plain(i), boxes)
                key = ("bbox", i)
            else:
                cen = self._centres(i)
                grey_all = self._window_grey(i, cen, win)
                key = ("win", i, round(win, 6))
            if len(grey_all) == 0:  # no object in the frame: nothing to embed, only missed boxes
                emb, pick = {}, names[0]
            else:
                emb = {n: self._embed(n, key, grey_all) for n in names}
            if emb and len(names) > 1:  # UniMR selection on every object of the frame
                sel = select_encoder({n: (emb[n], ref_emb[n].emb) for n in names})
                pick = sel.chosen
                chosen[pick] = chosen.get(pick, 0) + 1
            else:
                pick = names[0]
            if emb and len(q_idx):
                if entry == "pixel+descriptors":
                    sc = self._descriptor_scores(i, emb[pick], ref_emb[pick])[q_idx]
                else:
                    sc, _ = species_scores(emb[pick][q_idx], ref_emb[pick])
            else:
                sc = np.full((len(q_idx), k), -1.0, np.float32)
            scores.append(sc)
            true += q_true
            missed += [False] * len(q_idx)
            objects += q_obj
            gid = i if (self.mode == "end-to-end" and i is not None) else 0  # recognition: the whole set
            group += [gid] * (len(q_idx) + len(miss_rows))
            for lab, rec in miss_rows:
                scores.append(np.full((1, k), -1.0, np.float32))
                true.append(lab)
                missed.append(True)
                objects.append(rec)
        info: dict[str, Any] = {"window_nm": win if not released else None, "n_references": len(refs)}
        if chosen:
            info["encoder_chosen"] = chosen
        m = np.array(missed, bool)
        t = np.array(true, np.int64)
        if self.mode == "end-to-end":
            gt = int((t >= 0).sum())
            info.update({"gt_scored": gt, "gt_detected": int(((t >= 0) & ~m).sum()),
                         "detection_recall": float(((t >= 0) & ~m).sum() / gt) if gt else 0.0,
                         "detections_scored": int((~m).sum()), "detections_no_object": int(((t < 0) & ~m).sum())})
        return Scored(self.classes, t, np.concatenate(scores).astype(np.float32).reshape(-1, k) if scores
                      else np.zeros((0, k), np.float32), m, objects, ref_recs, info, np.array(group, np.int64))

    def _library_references(self) -> tuple[list[tuple[int, int]], list[int], np.ndarray, float, list[dict]]:
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

        lib = ReferenceLibrary(self.s.references)
        entries, grey = lib.reference_crops(self.cfg.normalise)
        win = lib.window_nm(self.cfg.normalise)
        species, objs, recs = [], [], []
        for e in entries:
            name = e.species if e.species in self.classes else e.species.replace("_", " ")
            if name not in self.classes:
                raise ConfigError(f"{e.path}: species {e.species!r} is not a class of {self.lset.name} ({self.classes})")
            species.append(self.classes.index(name))
            recs.append({"class": name, "file": str(e.path)})
            src, pos = Path(str(e.provenance.get("scan", ""))).name, e.provenance.get("position_px")
            for i, im in enumerate(self.images if not self.crops_mode else []):
                if im.path.name == src and pos is not None:
                    b = im.boxes
                    inside = np.flatnonzero((b[:, 0] <= pos[0]) & (pos[0] <= b[:, 0] + b[:, 2])
                                            & (b[:, 1] <= pos[1]) & (pos[1] <= b[:, 1] + b[:, 3]))
                    objs += [(i, int(j)) for j in inside[:1]]
        return objs, species, grey, win, recs

    def _centres(self, i: int) -> np.ndarray:
        if self.mode == "end-to-end":
            return self.detections(i)[3]
        b = self.images[i].boxes
        return b[:, :2] + b[:, 2:] / 2

    def _queries(self, i, ref_set) -> tuple[np.ndarray, list[int], list[dict], list[tuple[int, dict]]]:
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
        _, regions, db, dc, edge, m, border = self.detections(i)
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

    # -- physical descriptors (pixel+descriptors)
    def _with_descriptors(self, refs: RefEmbeddings, objs: list[tuple[int, int]]) -> RefEmbeddings:
        from stm_agent.agent.descriptors import describe_regions, fit_reference_scaler

        rows = []
        for i, j in objs:
            image, regions = self.detections(i)[:2]
            reg = regions[self._region_at(i, self.images[i].boxes[j])]
            rows.append(describe_regions(image, [reg], (self.s.pixel_size_nm,) * 2, None).matrix()[0])
        x = np.array(rows, np.float64)
        sp = np.array([self._label(o) for o in objs])
        sc = fit_reference_scaler(x, sp)
        refs.ref_desc, refs.desc_center, refs.desc_scale = x, sc.center_, sc.scale_
        refs.desc_std = (x - sc.center_) / sc.scale_
        refs.height_unit = "sigma"
        return refs

    def _descriptor_scores(self, i: int, emb: np.ndarray, refs: RefEmbeddings) -> np.ndarray:
        from stm_agent.agent.descriptors import describe_regions

        image, regions = self.detections(i)[:2]
        qd = refs.standardise(describe_regions(image, regions, (self.s.pixel_size_nm,) * 2, None).matrix())
        w = DESCRIPTOR_WEIGHT if len(set(refs.species_idx.tolist())) >= 2 else 0.0
        return species_scores(emb, refs, qd, w)[0]


# ---------------------------------------------------------------- whole runs
def _mean_std(values: list[float]) -> dict[str, float]:
    a = np.asarray(values, np.float64)
    return {"mean": float(a.mean()) if a.size else 0.0, "std": float(a.std(ddof=0)) if a.size else 0.0,
            "min": float(a.min()) if a.size else 0.0, "max": float(a.max()) if a.size else 0.0}


def evaluate_entry(ev: Evaluator, entry: str) -> tuple[dict[str, Any], list[Scored]]:
    """All draws of one entry: per-seed metrics and sweep, and their summary (mean, spread).

    Returns
    -------
    (result, scored) : JSON-ready dict; the per-seed :class:`Scored` (for the per-object CSV).
    """
    s = ev.s
    seeds = [s.seeds[0]] if (s.reference_ids or s.references) else list(s.seeds)
    per_seed, scored = [], []
    conf_sum = None
    if s.threshold_mode not in ("fixed", "gmm"):
        raise ConfigError(f"threshold_mode: {s.threshold_mode!r}; allowed: fixed, gmm")
    for seed in seeds:
        sc = ev.score(entry, seed)
        thr_gmm, thr_recs = adaptive_thresholds(sc.scores, sc.missed, sc.group, s.threshold)
        conf_gmm = sc.confusion(thr_gmm)
        conf_fixed = sc.confusion(s.threshold)
        conf = conf_gmm if s.threshold_mode == "gmm" else conf_fixed
        conf_sum = conf if conf_sum is None else conf_sum + conf
        sw = sweep(sc.true, sc.scores, sc.missed, s.thresholds)
        fl = flatness(sw["thresholds"], sw["micro_f1"])
        mg = metrics(conf_gmm, ev.classes)
        per_seed.append({"seed": seed, "references": sc.references, **sc.info, **metrics(conf, ev.classes),
                         "confusion": conf.tolist(), "sweep": {k: [round(float(x), 5) for x in v] for k, v in sw.items()},
                         "best": fl,
                         "gmm": {"micro": mg["micro"], "macro": mg["macro"], "thresholds": thr_recs,
                                 "fixed_micro_f1": metrics(conf_fixed, ev.classes)["micro"]["f1"]}})
        scored.append(sc)
    mf = np.array([p["sweep"]["micro_f1"] for p in per_seed])
    maf = np.array([p["sweep"]["macro_f1"] for p in per_seed])
    fl = flatness(s.thresholds, mf.mean(axis=0))
    summary: dict[str, Any] = {
        "threshold": s.threshold, "n_draws": len(seeds),
        "micro": {m: _mean_std([p["micro"][m] for p in per_seed]) for m in ("precision", "recall", "f1")},
        "macro": {m: _mean_std([p["macro"][m] for p in per_seed]) for m in ("precision", "recall", "f1")},
        "per_class": {c: {m: _mean_std([p["per_class"][c][m] for p in per_seed]) for m in ("precision", "recall", "f1")}
                      | {"support": _mean_std([p["per_class"][c]["support"] for p in per_seed])} for c in ev.classes},
        "confusion_summed": conf_sum.tolist(),
        "sweep_mean": {"thresholds": [float(t) for t in s.thresholds], "micro_f1": mf.mean(0).round(5).tolist(),
                       "micro_f1_std": mf.std(0).round(5).tolist(), "macro_f1": maf.mean(0).round(5).tolist()},
        "best": fl,
        "best_threshold_per_seed": _mean_std([p["best"]["best_threshold"] for p in per_seed]),
    }
    vals = [r["value"] for p in per_seed for r in p["gmm"]["thresholds"]]
    summary["gmm"] = {
        "threshold_mode": s.threshold_mode,
        "group": "image" if ev.mode == "end-to-end" else "set",
        "micro": {m: _mean_std([p["gmm"]["micro"][m] for p in per_seed]) for m in ("precision", "recall", "f1")},
        "macro_f1": _mean_std([p["gmm"]["macro"]["f1"] for p in per_seed]),
        "fixed_micro_f1": _mean_std([p["gmm"]["fixed_micro_f1"] for p in per_seed]),
        "threshold": _mean_std(vals),
        "n_groups": len(vals),
        "n_fallback": sum(bool(r["fallback"]) for p in per_seed for r in p["gmm"]["thresholds"]),
    }
    if ev.mode == "end-to-end":
        summary["detection_recall"] = _mean_std([p["detection_recall"] for p in per_seed])
    ch: dict[str, int] = {}
    for p in per_seed:
        for k, v in p.get("encoder_chosen", {}).items():
            ch[k] = ch.get(k, 0) + v
    if ch:
        summary["encoder_chosen"] = ch
    return {"entry": entry, "label": entry_label(entry, ev.cfg), "summary": summary, "seeds": per_seed}, scored


def evaluate(lset: LabelledSet, cfg: AgentConfig, settings: EvalSettings) -> tuple[dict[str, Any], dict[str, list[Scored]]]:
    """Evaluate every entry of ``settings`` on ``lset``.

    Returns
    -------
    (report, scored) : JSON-ready report {set, settings, config, classes, rows, cols, results};
        ``{entry: [Scored per draw]}``.
    """
    ev = Evaluator(lset, cfg, settings)
    results, scored = {}, {}
    for e in settings.entries:
        results[e], scored[e] = evaluate_entry(ev, e)
    k = ev.classes
    report = {
        "set": {"name": lset.name, "format": lset.format, "classes": k, "n_images": len(ev.images),
                "n_images_total": len(lset.images), "n_objects": lset.n_objects,
                "pixel_size_note": ("crops resized whole to normalise.size_px" if ev.crops_mode else
                                    f"rendered images without physical size: {settings.pixel_size_nm} nm per pixel "
                                    "(adapters.labelled.image_scan)")},
        "mode": ev.mode,
        "settings": settings.to_json(),
        "config": cfg.model_dump(mode="json"),
        "config_digest": cfg.digest(),
        "confusion_rows": [*k, NO_OBJECT],
        "confusion_cols": [*k, OTHER, MISSED],
        "results": results,
    }
    return report, scored


def object_rows(lset_name: str, entry: str, scored: list[Scored], seeds: list[int], threshold: float) -> list[dict]:
    """Per-object rows for the CSV: set, entry, seed, image, ann_id, bbox, true, predicted, similarity, best."""
    rows = []
    for seed, sc in zip(seeds, scored):
        pred = predict(sc.scores, sc.missed, threshold)
        k = len(sc.classes)
        cols = [*sc.classes, OTHER, MISSED]
        for n, o in enumerate(sc.objects):
            best = int(np.argmax(sc.scores[n])) if k else 0
            rows.append({"set": lset_name, "entry": entry, "seed": seed, "image": o.get("image"),
                         "ann_id": o.get("ann_id"), "bbox": " ".join(f"{v:g}" for v in o.get("bbox", [])),
                         "true": sc.classes[sc.true[n]] if sc.true[n] >= 0 else NO_OBJECT,
                         "predicted": cols[pred[n]],
                         "similarity": None if sc.missed[n] or not k else round(float(sc.scores[n, best]), 5),
                         "best_species": None if sc.missed[n] or not k else sc.classes[best]})
    return rows
