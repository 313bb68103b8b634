"""Species discovery before the first reference: segment every object of a set of frames, embed it,
cluster the embeddings, and propose each cluster as a species (its medoids as references).

The unsupervised route of the method (METHOD.md: "Autoencoder + clustering", UCL review of
Si(001); Kolev et al., arXiv 2506.01678; counting-molecules' clustering of Zernike features):

1. **Objects**: the agent's own detection (channel choice, flatten, detect) on
   every frame (:func:`agent.pipeline.detect_frame`); objects cut by the edge are left out. Every object is cut in one square window of
   ``window_factor`` x the median object extent (nm) of the whole set, resampled to ``size_px``
   and stretched to 8-bit grey (:func:`agent.normalise.normalise_crops`).
2. **Embeddings** (:func:`embed`; rows L2-normalised blocks):

   * ``pixels``: rotation-canonicalised pixels (:func:`canonical_pixels`): 24 x 24 crops, each
     turned to the one of 36 poses that best matches a common template re-estimated from the
     turned crops; mirror images are NOT folded together (enantiomers stay apart). (Turning each
     crop to its own principal axis, Hu 1962 moments, was tried first: on near-isotropic molecules
     such as F-HPB the axis is ill-defined and ARI fell to 0.13 on crops/FHPB.)
   * ``rawpixels``: the crops as they are (no pose change): right when the objects share one
     orientation (a monolayer on a substrate lattice).
   * ``zernike``: the 27 counting-molecules features (:class:`models.zernike.ZernikeEncoder`;
     rotation and mirror invariant).
   * ``descriptors``: log area (nm^2), log extent (nm), apparent height, contrast sign
     (:func:`agent.descriptors.describe_objects`), robust-standardised over the set.
   * ``autoencoder``: the latent vector of a small convolutional autoencoder trained on the
     session's own crops (:mod:`models.autoencoder`; torch to train, onnxruntime to run).
   * ``A+B``: blocks concatenated, each block scaled to unit mean squared norm (equal weight).
3. **Clustering** (:func:`cluster`; scikit-learn): ``kmeans`` with k chosen by the silhouette
   (Rousseeuw 1987) over k = 2..``k_max`` (not the elbow, as the review recommends), then
   clusters that one Gaussian explains merged (:func:`merge_gaussian`, the G-means test run
   backwards: the silhouette over-splits one species into tight groups),
   ``agglomerative`` (Ward linkage, k likewise), ``hdbscan`` (Campello et al. 2013;
   noise = cluster -1). Pixel blocks are reduced by PCA (16 components) first.
4. **Medoids**: per cluster, the objects closest to the cluster mean in the embedding space; they
   are shown first in the gallery and become the references of ``refs add --from-cluster``.

Pure computation; the files (gallery PNGs, tables, discovery.json) are written by
:mod:`adapters.gallery`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Sequence

import cv2
import numpy as np

__all__ = ["Objects", "collect_objects", "objects_from_boxes", "canonical_pixels", "embed", "cluster", "merge_gaussian",
           "Clustering", "medoids", "EMBEDDINGS", "METHODS", "DEFAULT_EMBEDDING", "DEFAULT_METHOD",
           "cluster_scores"]

log = logging.getLogger(__name__)

EMBEDDINGS = ("pixels", "rawpixels", "zernike", "descriptors", "pixels+descriptors", "rawpixels+descriptors",
              "zernike+descriptors")
METHODS = ("kmeans", "agglomerative", "hdbscan")
#: The default, measured on the shared labelled sets (docs/discovery.md).
DEFAULT_EMBEDDING = "pixels"
DEFAULT_METHOD = "kmeans"
CANON_PX = 24
#: crops posed at once by :func:`canonical_pixels` (about 130 MB of poses at the defaults)
CANON_CHUNK = 2048


@dataclass
class Objects:
    """The objects of a set of frames, ready to embed.

    Attributes
    ----------
    grey : np.ndarray
        uint8 ``(N, S, S)`` crops (one window for the whole set, stretched per crop).
    desc : np.ndarray
        float64 ``(N, 4)``: area (nm^2), Feret diameter (nm), apparent height (pm for Z in m, else units of
        the local roughness), contrast sign (+1 protrusion, -1 depression).
    frame : list[str]
        Source (scan path) of each object.
    height_unit : str
        ``pm`` when every frame is a height channel in m, else ``sigma`` (robust local roughness).
    centroid_px : np.ndarray
        float64 ``(N, 2)`` ``(x, y)`` pixels in its frame (display orientation).
    bbox_px : np.ndarray
        int ``(N, 4)`` ``(x, y, w, h)``.
    window_nm : float
        Side of the crop window, nm.
    labels : list[str] | None
        True class of each object (evaluation only).
    """

    grey: np.ndarray
    desc: np.ndarray
    frame: list[str]
    centroid_px: np.ndarray
    bbox_px: np.ndarray
    window_nm: float
    labels: list[str] | None = None
    frames: list[str] = field(default_factory=list)
    height_unit: str = "sigma"

    def __len__(self) -> int:
        return len(self.grey)


def _desc_matrix(d) -> np.ndarray:
    return np.column_stack([d.area_nm2, d.feret_nm, d.height, d.contrast_sign]).astype(np.float64)


def collect_objects(scans: Sequence[Any], cfg, window_factor: float | None = None,
                    on_error: Any | None = None, progress: Any | None = None) -> Objects:
    """Segment every frame and cut every whole object (not touching the edge) in one window.

    Parameters
    ----------
    scans : sequence of agent.domain.Scan
    cfg : AgentConfig
        ``channel``, ``direction``, ``flatten``, ``segment``, ``normalise`` (``size_px``,
        ``window_factor`` unless given).
    window_factor : float | None
        Window side = factor x the median extent of all objects (nm).
    on_error : callable(scan, exception) | None
        Called for a frame that cannot be segmented (no acquired pixel, channel absent), which is
        then skipped; None = raise.
    progress : callable(done, total) | None
        Called before each frame with (frames done, total).

    Returns
    -------
    Objects
        Possibly empty (no object found).

    Raises
    ------
    EmptyScanError, KeyError
        As :func:`agent.pipeline.detect` (the caller skips such frames).
    """
    from stm_agent.agent.descriptors import describe_regions, z_unit_of
    from stm_agent.agent.errors import StmAgentError
    from stm_agent.agent.normalise import normalise_crops
    from stm_agent.agent.pipeline import detect_frame

    per = []
    units = set()
    for i, scan in enumerate(scans):
        if progress is not None:
            progress(i, len(scans))
        try:
            fd = detect_frame(scan, cfg)
        except (StmAgentError, KeyError) as exc:
            if on_error is None:
                raise
            on_error(scan, exc)
            continue
        regions = [r for r in fd.regions if not r.touches_edge]
        if regions:
            per.append((scan, fd.image, regions))
            units.add(z_unit_of(scan.units.get(fd.channel)))
    # heights in pm only when every frame is a height channel in m; else all in robust sigma
    z_unit = "m" if units == {"m"} else None
    s = cfg.normalise.size_px
    if not per:
        return Objects(np.zeros((0, s, s), np.uint8), np.zeros((0, 4)), [], np.zeros((0, 2)),
                       np.zeros((0, 4), int), 0.0, frames=[])
    extents = np.concatenate([[r.extent_nm for r in regs] for _, _, regs in per])
    window = float((window_factor or cfg.normalise.window_factor) * np.median(extents))
    greys, descs, frames, cents, boxes = [], [], [], [], []
    for scan, image, regs in per:
        c = np.array([r.centroid_px for r in regs], np.float64)
        greys.append(normalise_crops(image, c, window, scan.pixel_size_nm, cfg.normalise))
        descs.append(_desc_matrix(describe_regions(image, regs, scan.pixel_size_nm, z_unit)))
        frames += [scan.source] * len(regs)
        cents.append(c)
        boxes.append(np.array([r.bbox_px for r in regs], int))
    return Objects(np.concatenate(greys), np.concatenate(descs), frames, np.concatenate(cents),
                   np.concatenate(boxes), window, frames=[sc.source for sc, _, _ in per],
                   height_unit="pm" if z_unit == "m" else "sigma")


def objects_from_boxes(images: Sequence[tuple[np.ndarray, np.ndarray, tuple[float, float], str]], cfg,
                       labels: list[str] | None = None, window_factor: float = 1.3) -> Objects:
    """Objects given by boxes (labelled data: evaluation of the clustering on the true objects).

    Parameters
    ----------
    images : sequence of (image, boxes, pixel_size_nm, name)
        ``image`` float ``(ny, nx)`` (flattened or rendered grey), ``boxes`` ``(K, 4)`` ``(x, y, w, h)``
        px, pixel size (nm), a name.
    cfg : AgentConfig
    labels : list[str] | None
        True class per box, all images concatenated.
    window_factor : float
        Window side = factor x the median box diagonal (nm) of the set.
    """
    from stm_agent.agent.descriptors import describe_objects
    from stm_agent.agent.normalise import normalise_crops

    diag = np.concatenate([np.hypot(b[:, 2], b[:, 3]) * ps[0] for _, b, ps, _ in images])
    window = float(window_factor * np.median(diag))
    greys, descs, frames, cents, boxes = [], [], [], [], []
    for image, b, ps, name in images:
        b = np.asarray(b, np.float64).reshape(-1, 4)
        c = b[:, :2] + b[:, 2:] / 2
        greys.append(normalise_crops(image, c, window, ps, cfg.normalise))
        descs.append(_desc_matrix(describe_objects(image, np.rint(b).astype(np.int64), ps, z_unit=None)))
        frames += [name] * len(b)
        cents.append(c)
        boxes.append(np.rint(b).astype(int))
    return Objects(np.concatenate(greys), np.concatenate(descs), frames, np.concatenate(cents),
                   np.concatenate(boxes), window, labels=labels, frames=[n for *_, n in images])


# ---------------------------------------------------------------------------- embeddings
def canonical_pixels(grey: np.ndarray, size: int = CANON_PX, mean_grey: float = 120.0, steps: int = 36,
                     iterations: int = 3) -> np.ndarray:
    """Rotation-canonicalised crops: every crop turned to the pose that best matches a common
    template, the template re-estimated from the turned crops (generalised Procrustes alignment over
    ``steps`` rotations; no mirroring, so enantiomers stay apart).

    Parameters
    ----------
    grey : np.ndarray
        uint8 ``(N, S, S)`` crops (object centred, background ``mean_grey`` outside the disc).
    size : int
        Output side, pixels.
    steps : int
        Rotations tried, ``360 / steps`` degrees apart (36: UniMR's 10 degree poses).
    iterations : int
        Template updates. The first template is the crop with the highest summed correlation to
        all others at their best poses (the set's most typical object).

    Returns
    -------
    np.ndarray
        float32 ``(N, size, size)``, zero-mean and unit-norm inside the disc, each at its chosen pose.
    """
    g = np.asarray(grey, np.float32)
    n, s, _ = g.shape
    yy, xx = np.mgrid[:size, :size].astype(np.float32) - (size - 1) / 2.0
    disc = (xx ** 2 + yy ** 2) <= (size / 2.0) ** 2
    centre = ((size - 1) / 2.0, (size - 1) / 2.0)
    turn = [cv2.getRotationMatrix2D(centre, 360.0 * r / steps, 1.0) for r in range(steps)]

    def posed(idx: np.ndarray) -> np.ndarray:
        """Unit pose vectors (len(idx), steps, disc pixels) of some crops; one warp per crop and pose
        (OpenCV), no per-pixel Python."""
        small = [cv2.resize(c, (size, size), interpolation=cv2.INTER_AREA) if s != size else c for c in g[idx]]
        v = np.empty((len(idx), steps, int(disc.sum())), np.float32)
        for i, c in enumerate(small):
            for r in range(steps):
                v[i, r] = cv2.warpAffine(c, turn[r], (size, size), flags=cv2.INTER_LINEAR,
                                         borderValue=float(mean_grey))[disc]
        v -= v.mean(axis=2, keepdims=True)
        v /= np.linalg.norm(v, axis=2, keepdims=True) + 1e-9
        return v

    # the poses of every crop at once cost 4 * steps * disc bytes per crop (65 kB at the defaults):
    # archives are processed in chunks, the poses recomputed per pass, so memory stays bounded
    chunks = [np.arange(a, min(a + CANON_CHUNK, n)) for a in range(0, n, CANON_CHUNK)]
    whole = posed(chunks[0]) if len(chunks) == 1 else None
    each = (lambda: [(chunks[0], whole)]) if whole is not None else (lambda: ((c, posed(c)) for c in chunks))
    if n == 1:
        chosen = whole[:, 0]
    else:
        # most typical object: best-pose correlation summed over a sample of the others
        pick = np.sort(np.random.default_rng(0).choice(n, size=min(n, 200), replace=False))
        sample = posed(pick)[:, 0]  # (M, P)
        score = np.concatenate([np.einsum("nrp,mp->nrm", v, sample).max(axis=1).sum(axis=1) for _, v in each()])
        template = posed(np.array([int(np.argmax(score))]))[0, 0]
        for _ in range(iterations):
            chosen = np.empty((n, int(disc.sum())), np.float32)
            for c, v in each():
                chosen[c] = v[np.arange(len(c)), np.einsum("nrp,p->nr", v, template).argmax(axis=1)]
            template = chosen.mean(axis=0)
            template /= np.linalg.norm(template) + 1e-9
    out = np.zeros((n, size, size), np.float32)
    out[:, disc] = chosen
    return out


def _unit_block(x: np.ndarray) -> np.ndarray:
    """Centre columns, scale the block to unit mean squared row norm."""
    x = np.asarray(x, np.float64)
    x = x - x.mean(axis=0)
    return x / (np.sqrt((x ** 2).sum(axis=1).mean()) + 1e-12)


def _pca(x: np.ndarray, n: int = 16) -> np.ndarray:
    from sklearn.decomposition import PCA

    k = int(min(n, x.shape[0] - 1, x.shape[1]))
    if k < 1:
        return x
    return PCA(n_components=k, random_state=0).fit_transform(x)


def _descriptor_block(desc: np.ndarray) -> np.ndarray:
    d = np.asarray(desc, np.float64).copy()
    d[:, 0] = np.log(np.maximum(d[:, 0], 1e-12))
    d[:, 1] = np.log(np.maximum(d[:, 1], 1e-12))
    med = np.median(d, axis=0)
    mad = 1.4826 * np.median(np.abs(d - med), axis=0)
    sd = d.std(axis=0)
    scale = np.where(mad > 1e-12, mad, np.where(sd > 1e-12, sd, 1.0))
    return (d - med) / scale


def embed(objs: Objects, name: str, *, autoencoder: Any | None = None) -> np.ndarray:
    """Embedding ``name`` (see :data:`EMBEDDINGS`, or ``autoencoder`` / ``autoencoder+descriptors``)
    of every object -> float64 ``(N, d)``.

    Raises
    ------
    ValueError
        Unknown name, or ``autoencoder`` without a trained ``autoencoder`` (an object with
        ``embed(grey uint8 (N, S, S)) -> (N, d)``, :class:`models.autoencoder.AutoencoderEncoder`).
    """
    blocks = []
    for part in name.split("+"):
        if part == "pixels":
            c = canonical_pixels(objs.grey).reshape(len(objs), -1)
            blocks.append(_unit_block(_pca(c)))
        elif part == "zernike":
            from stm_agent.models.zernike import ZernikeEncoder

            enc = ZernikeEncoder(size_px=objs.grey.shape[1])
            blocks.append(_unit_block(enc.embed(objs.grey)))
        elif part == "descriptors":
            blocks.append(_unit_block(_descriptor_block(objs.desc)))
        elif part == "autoencoder":
            if autoencoder is None:
                raise ValueError("the autoencoder embedding needs a trained autoencoder (models.autoencoder)")
            blocks.append(_unit_block(autoencoder.embed(objs.grey)))
        elif part == "rawpixels":  # the crops as they are, no canonical pose
            c = objs.grey.reshape(len(objs), -1).astype(np.float64)
            blocks.append(_unit_block(_pca(c)))
        else:
            raise ValueError(f"unknown embedding {part!r}; choose from {', '.join(EMBEDDINGS)} or autoencoder")
    return np.hstack(blocks)


# ---------------------------------------------------------------------------- clustering
@dataclass
class Clustering:
    """Cluster labels and how they were chosen.

    Attributes
    ----------
    labels : np.ndarray
        int ``(N,)`` cluster per object, 0..k-1 (HDBSCAN noise: -1).
    method : str
    k : int
        Clusters (noise excluded).
    silhouette : float
        Of the chosen partition (NaN when undefined).
    tried : dict[int, float]
        Silhouette per k tried (kmeans / agglomerative).
    k_silhouette : int | None
        The k the silhouette chose, before :func:`merge_gaussian` (None when k was given).
    """

    labels: np.ndarray
    method: str
    k: int
    silhouette: float
    tried: dict[int, float] = field(default_factory=dict)
    k_silhouette: int | None = None


def _silhouette(x: np.ndarray, labels: np.ndarray) -> float:
    from sklearn.metrics import silhouette_score

    ok = labels >= 0
    if len(set(labels[ok].tolist())) < 2 or ok.sum() < 3:
        return float("nan")
    n = int(ok.sum())
    return float(silhouette_score(x[ok], labels[ok], sample_size=min(n, 2000), random_state=0))


#: Anderson-Darling critical value at significance 1e-4 (Stephens' corrected A*^2), as in G-means.
AD_CRITICAL = 1.8692


def _anderson_darling_normal(p: np.ndarray) -> float:
    """Anderson-Darling ``A*^2`` of a 1-D sample against a normal law of its own mean and standard
    deviation (D'Agostino & Stephens 1986, case 3, with the small-sample factor ``1 + 4/n - 25/n^2``)."""
    from scipy.special import log_ndtr

    n = len(p)
    sd = p.std(ddof=1) if n > 1 else 0.0
    if n < 3 or sd < 1e-12:  # nothing to test against: one Gaussian explains it
        return 0.0
    z = np.sort((p - p.mean()) / sd)
    i = np.arange(1, n + 1)
    a2 = -n - np.mean((2 * i - 1) * (log_ndtr(z) + log_ndtr(-z[::-1])))
    return float(a2 * (1 + 4 / n - 25 / n ** 2))


def merge_gaussian(x: np.ndarray, labels: np.ndarray, critical: float = AD_CRITICAL, min_k: int = 2) -> np.ndarray:
    """Merge clusters that one Gaussian explains: the G-means test (Hamerly & Elkan, NIPS 2003) run
    backwards, on pairs.

    For every pair of clusters, the union's embeddings are projected on the line joining the two
    centroids and standardised; the Anderson-Darling statistic with Stephens' small-sample
    correction, ``A*^2 = A^2 (1 + 4/n - 25/n^2)``, measures how far the projection is from one
    Gaussian. The pair most consistent with one Gaussian is merged while its ``A*^2`` is below
    ``critical`` (1.8692: significance 1e-4, G-means' setting); so over-split clusters of one
    species (the silhouette favours several tight groups) are joined, while two species, whose
    projection is bimodal, stay apart.

    Parameters
    ----------
    x : np.ndarray
        float ``(N, d)`` embeddings.
    labels : np.ndarray
        int ``(N,)`` clusters 0..k-1 (no noise label).
    critical : float
        ``A*^2`` below which a pair is merged.
    min_k : int
        Never fewer clusters (2: the silhouette's own range; whether a set holds a single species
        is left to the physicist looking at the gallery).

    Returns
    -------
    np.ndarray
        int ``(N,)`` merged clusters renumbered 0..k'-1 (k' <= k), in the order of their first label.
    """
    x = np.asarray(x, np.float64)
    lab = np.asarray(labels).copy()
    while len(set(lab.tolist())) > min_k:
        cs = sorted(set(lab.tolist()))
        best = None
        for i, a in enumerate(cs):
            for b in cs[i + 1:]:
                m = (lab == a) | (lab == b)
                v = x[lab == b].mean(axis=0) - x[lab == a].mean(axis=0)
                p = x[m] @ (v / (np.linalg.norm(v) + 1e-12))
                a2 = _anderson_darling_normal(p)
                if best is None or a2 < best[0]:
                    best = (a2, a, b)
        if best is None or best[0] >= critical:
            break
        lab[lab == best[2]] = best[1]
    order = {c: i for i, c in enumerate(sorted(set(lab.tolist())))}
    return np.array([order[c] for c in lab.tolist()], dtype=int)


def cluster(x: np.ndarray, method: str = DEFAULT_METHOD, *, k: int | None = None, k_max: int = 8,
            min_cluster_size: int | None = None, seed: int = 0, merge: bool = True) -> Clustering:
    """Cluster embeddings ``x`` float ``(N, d)``.

    Parameters
    ----------
    method : {"kmeans", "agglomerative", "hdbscan"}
    k : int | None
        Fixed number of clusters (kmeans / agglomerative); None = by silhouette over 2..k_max.
    k_max : int
        Largest k tried (also bounded by N // 3).
    min_cluster_size : int | None
        HDBSCAN; default max(5, N // 25).
    seed : int
        k-means initialisation.
    merge : bool
        With k chosen by silhouette, then merge clusters that one Gaussian explains
        (:func:`merge_gaussian`; the silhouette over-splits a species into tight groups).

    Raises
    ------
    ValueError
        Unknown method, or fewer than 3 objects.
    """
    from sklearn.cluster import HDBSCAN, AgglomerativeClustering, KMeans

    x = np.asarray(x, np.float64)
    n = len(x)
    if n < 3:
        raise ValueError(f"need at least 3 objects to cluster, got {n}")
    if method == "hdbscan":
        mcs = min_cluster_size or max(5, n // 25)
        lab = HDBSCAN(min_cluster_size=min(mcs, n), copy=True).fit_predict(x)
        return Clustering(lab, method, int(lab.max() + 1), _silhouette(x, lab))
    if method not in ("kmeans", "agglomerative"):
        raise ValueError(f"unknown clustering {method!r}; choose from {', '.join(METHODS)}")

    def fit(kk: int) -> np.ndarray:
        if method == "kmeans":
            return KMeans(n_clusters=kk, n_init=10, random_state=seed).fit_predict(x)
        return AgglomerativeClustering(n_clusters=kk, linkage="ward").fit_predict(x)

    if k is not None:
        lab = fit(k)
        return Clustering(lab, method, k, _silhouette(x, lab))
    tried: dict[int, float] = {}
    best = None
    for kk in range(2, max(2, min(k_max, n // 3)) + 1):
        lab = fit(kk)
        s = _silhouette(x, lab)
        tried[kk] = s
        if best is None or s > best[0]:
            best = (s, kk, lab)
    s, kk, lab = best  # type: ignore[misc]
    if not merge:
        return Clustering(lab, method, kk, s, tried, kk)
    merged = merge_gaussian(x, lab)
    k2 = int(merged.max() + 1)
    return Clustering(merged, method, k2, s if k2 == kk else _silhouette(x, merged), tried, kk)


def medoids(x: np.ndarray, labels: np.ndarray, n: int = 5) -> dict[int, list[int]]:
    """Per cluster (noise excluded), the indices of the ``n`` objects nearest the cluster mean
    (Euclidean in the embedding), nearest first."""
    out = {}
    for c in sorted(set(labels.tolist()) - {-1}):
        idx = np.flatnonzero(labels == c)
        d = np.linalg.norm(x[idx] - x[idx].mean(axis=0), axis=1)
        out[int(c)] = [int(i) for i in idx[np.argsort(d)][:n]]
    return out


def cluster_scores(true: Sequence[str], labels: np.ndarray) -> dict[str, float]:
    """ARI (Hubert & Arabie 1985), NMI and purity of a clustering against true classes.

    HDBSCAN noise (-1) counts as one more cluster. Purity = sum over clusters of the largest
    class count / N.
    """
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score
    from sklearn.metrics.cluster import contingency_matrix

    t = np.asarray(list(true))
    cm = contingency_matrix(t, labels)
    return {"ari": float(adjusted_rand_score(t, labels)), "nmi": float(normalized_mutual_info_score(t, labels)),
            "purity": float(cm.max(axis=0).sum() / cm.sum()), "k": int(len(set(labels.tolist())))}
