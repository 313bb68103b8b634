"""Cosine-similarity matching of query embeddings against reference pose embeddings (UniMR step 6)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from stm_agent.agent.domain import OTHER


@dataclass
class RefEmbeddings:
    """Embeddings of every pose of every reference.

    Attributes
    ----------
    emb : np.ndarray
        float32 ``(M, D)``, rows L2-normalised.
    species_idx : np.ndarray
        int ``(M,)``: index into ``species`` of each row.
    angle_deg : np.ndarray
        float32 ``(M,)``: rotation of the pose, degrees.
    mirrored : np.ndarray
        bool ``(M,)``: the pose is mirrored.
    species : list[str]
        Species names (sorted).
    ref_idx : np.ndarray
        int ``(M,)``: which reference entry (order of ``ReferenceLibrary.entries()``) each row is.
    window_nm : float
        Physical side of the crop window the embeddings were made with, nm.
    key : str
        Cache key (sha256 hex) of these embeddings.
    ref_desc : np.ndarray | None
        float64 ``(R, 4)`` physical descriptors of each reference entry
        (:meth:`agent.descriptors.Descriptors.matrix`), None when not computed.
    desc_std : np.ndarray | None
        float64 ``(R, 4)`` the same, standardised with the reference-fitted scaler
        (:func:`agent.descriptors.fit_reference_scaler`).
    desc_center, desc_scale : np.ndarray | None
        float64 ``(4,)`` that scaler (apply it to the query descriptors).
    height_unit : str
        Unit of the reference heights (``"pm"`` or ``"sigma"``).
    """

    emb: np.ndarray
    species_idx: np.ndarray
    angle_deg: np.ndarray
    mirrored: np.ndarray
    species: list[str]
    ref_idx: np.ndarray = field(default_factory=lambda: np.zeros(0, int))
    window_nm: float = 0.0
    key: str = ""
    ref_desc: np.ndarray | None = None
    desc_std: np.ndarray | None = None
    desc_center: np.ndarray | None = None
    desc_scale: np.ndarray | None = None
    height_unit: str = ""

    def standardise(self, desc_matrix: np.ndarray) -> np.ndarray:
        """Query descriptors float ``(N, 4)`` -> standardised float64 ``(N, 4)`` with the reference scaler.

        Raises
        ------
        ValueError
            The references carry no descriptors.
        """
        if self.desc_center is None or self.desc_scale is None:
            raise ValueError("these reference embeddings carry no descriptors")
        return (np.asarray(desc_matrix, np.float64) - self.desc_center) / self.desc_scale


def species_scores(
    query_emb: np.ndarray, refs: RefEmbeddings, query_desc: np.ndarray | None = None, weight: float = 0.0
) -> tuple[np.ndarray, np.ndarray]:
    """Best cosine similarity of each query to each species (max over that species' poses).

    With ``weight`` w > 0 and ``query_desc``, the similarity of a query to a pose is the cosine of
    the combined vectors of :func:`agent.descriptors.combine`,
    ``(1 - w) cos(e, e') + w cos(d, d')``: the descriptors of a reference do not depend on the
    pose, so its descriptor block is the same for all its poses (row ``refs.ref_idx``). Computed
    without building the ``(M, D + 4)`` combined matrix. w = 0 is exactly the embedding cosine.

    Parameters
    ----------
    query_emb : np.ndarray
        float32 ``(N, D)`` L2-normalised.
    refs : RefEmbeddings
    query_desc : np.ndarray | None
        float ``(N, 4)`` query descriptors standardised with :meth:`RefEmbeddings.standardise`.
    weight : float
        0..1, the descriptor weight w (``match.descriptor_weight``).

    Returns
    -------
    (scores, best_row) : float32 ``(N, K)`` and int ``(N, K)`` (row of ``refs.emb`` reaching the score).

    Raises
    ------
    ValueError
        Embedding dimensions differ (query made by another encoder than the references); w > 0
        with references without descriptors or ``query_desc`` of the wrong shape; w outside 0..1.
    """
    q = np.asarray(query_emb, dtype=np.float32)
    if q.ndim != 2 or q.shape[1] != refs.emb.shape[1]:
        raise ValueError(f"query embeddings {q.shape} do not match reference embeddings {refs.emb.shape}")
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"descriptor weight must be in 0..1, got {weight}")
    sim = q @ refs.emb.T  # (N, M): cosine similarity as one matrix product
    if weight > 0 and query_desc is not None:
        from stm_agent.agent.descriptors import descriptor_cosine

        qd = np.asarray(query_desc, np.float64)
        if refs.desc_std is None or qd.shape != (len(q), refs.desc_std.shape[1]):
            raise ValueError(f"query descriptors {qd.shape} do not match the references' "
                             f"{None if refs.desc_std is None else refs.desc_std.shape}")
        cd = descriptor_cosine(qd, refs.desc_std)  # (N, R)
        sim = np.float32(1.0 - weight) * sim + np.float32(weight) * cd[:, refs.ref_idx]
    k = len(refs.species)
    scores = np.full((len(q), k), -1.0, dtype=np.float32)
    best = np.zeros((len(q), k), dtype=np.int64)
    for s in range(k):
        rows = np.flatnonzero(refs.species_idx == s)
        if rows.size == 0 or len(q) == 0:
            continue
        j = np.argmax(sim[:, rows], axis=1)
        best[:, s] = rows[j]
        scores[:, s] = sim[np.arange(len(q)), rows[j]]
    return scores, best


def match(
    query_emb: np.ndarray, refs: RefEmbeddings, threshold: float = 0.9,
    query_desc: np.ndarray | None = None, weight: float = 0.0,
) -> tuple[list[str], np.ndarray, list[tuple[float, bool]]]:
    """Assign each query the best species if its similarity is at least ``threshold``, else ``other``.

    Parameters
    ----------
    query_emb : np.ndarray
        float32 ``(N, D)`` L2-normalised.
    refs : RefEmbeddings
    threshold : float
        Cosine similarity threshold (UniMR: 0.9).
    query_desc, weight
        Standardised query descriptors and their weight, as :func:`species_scores`.

    Returns
    -------
    (species, similarity, pose) : list of N names; float32 ``(N,)`` best similarity over all
        species; list of N ``(angle_deg, mirrored)`` of the best reference pose.
    """
    scores, best = species_scores(query_emb, refs, query_desc, weight)
    return assign(scores, best, refs, threshold)


def assign(
    scores: np.ndarray, best: np.ndarray, refs: RefEmbeddings, threshold: float = 0.9
) -> tuple[list[str], np.ndarray, list[tuple[float, bool]]]:
    """The decision step of :func:`match`, from :func:`species_scores`' ``(scores, best_row)``.

    Returns the same ``(species, similarity, pose)`` as :func:`match`.
    """
    n = len(scores)
    if n == 0 or scores.shape[1] == 0:
        return [OTHER] * n, np.zeros(n, np.float32), [(0.0, False)] * n
    k = np.argmax(scores, axis=1)
    sim = scores[np.arange(n), k]
    row = best[np.arange(n), k]
    names = [refs.species[int(kk)] if s >= threshold else OTHER for kk, s in zip(k, sim)]
    pose = [(float(refs.angle_deg[r]), bool(refs.mirrored[r])) for r in row]
    return names, sim.astype(np.float32), pose


# ---------------------------------------------------------------- adaptive threshold (match.threshold_mode: gmm)
#: fewest objects a frame needs for the GMM threshold (fewer: ``match.threshold``)
GMM_MIN_OBJECTS = 6
#: smallest Ashman's D = sqrt(2) |mu1 - mu0| / sqrt(sigma0^2 + sigma1^2) of a usable split
GMM_MIN_SEPARATION = 2.0
#: the adaptive threshold never goes further below ``match.threshold`` than this
GMM_MAX_BELOW = 0.2
#: ... nor above this
GMM_UPPER = 0.99


def posterior_crossing(means: np.ndarray, sigmas: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Where the posterior of the higher-mean component of 1-D two-Gaussian mixtures reaches 0.5.

    With components sorted so that ``mu0 <= mu1``, p(1 | s) = 0.5 where
    ``w1 N(s; mu1, sigma1) = w0 N(s; mu0, sigma0)``; taking logs, ``a s^2 + b s + c = 0`` with::

        a = 1 / (2 sigma0^2) - 1 / (2 sigma1^2)
        b = mu1 / sigma1^2 - mu0 / sigma0^2
        c = mu0^2 / (2 sigma0^2) - mu1^2 / (2 sigma1^2) + ln(w1 sigma0 / (w0 sigma1))

    The root between the two means is returned (``-c / b`` when ``a`` vanishes, equal sigmas). A
    quadratic has at most one sign change of the log posterior ratio in ``[mu0, mu1]``; when there is
    none (the heavier component dominates the whole interval) the result is NaN. Vectorised over
    any number of mixtures.

    Parameters
    ----------
    means, sigmas, weights : np.ndarray
        float ``(..., 2)``: component means, standard deviations (> 0) and mixing weights (> 0),
        in any order (sorted by mean here).

    Returns
    -------
    np.ndarray
        float64 ``(...)``: the crossing, in the units of ``means``; NaN where none lies in [mu0, mu1].
    """
    m, s, w = (np.asarray(a, np.float64) for a in (means, sigmas, weights))
    order = np.argsort(m, axis=-1)
    m, s, w = (np.take_along_axis(a, order, axis=-1) for a in (m, s, w))
    m0, m1, s0, s1, w0, w1 = m[..., 0], m[..., 1], s[..., 0], s[..., 1], w[..., 0], w[..., 1]
    with np.errstate(divide="ignore", invalid="ignore"):
        a = 0.5 / s0**2 - 0.5 / s1**2
        b = m1 / s1**2 - m0 / s0**2
        c = 0.5 * m0**2 / s0**2 - 0.5 * m1**2 / s1**2 + np.log(w1 * s0 / (w0 * s1))
        disc = np.sqrt(np.maximum(b * b - 4 * a * c, 0.0))
        # both roots in the cancellation-free form (q = -(b + sign(b) disc) / 2: roots q/a and c/q)
        q = -0.5 * (b + np.where(b >= 0, 1.0, -1.0) * disc)
        small = np.abs(a) <= 1e-12 * (np.abs(b) + 1e-300)
        r1 = np.where(small, -c / b, q / np.where(small, 1.0, a))
        r2 = np.where(small, np.nan, c / q)
        f = lambda x: (a * x + b) * x + c  # noqa: E731  log posterior ratio hi/lo
        sign_change = (f(m0) < 0) & (f(m1) > 0) & (b * b - 4 * a * c >= 0)
    lo, hi = np.minimum(m0, m1), np.maximum(m0, m1)
    in1 = (r1 >= lo) & (r1 <= hi)
    in2 = (r2 >= lo) & (r2 <= hi)
    out = np.where(in1, r1, np.where(in2, r2, np.nan))
    return np.where(sign_change, out, np.nan)


@dataclass
class AdaptiveThreshold:
    """Outcome of :func:`gmm_threshold` (``FrameResult.encoder["threshold"]`` via :meth:`to_json`).

    Attributes
    ----------
    value : float
        Cosine-similarity threshold to use.
    mode : str
        ``"gmm"`` (or ``"fixed"`` when built by the pipeline in fixed mode).
    fallback : bool
        ``value`` is ``match.threshold`` because the GMM was not usable (see ``reason``).
    reason : str | None
        Why it fell back, or ``"clipped"`` when the crossing lay outside the allowed range.
    crossing : float | None
        The unclipped posterior crossing (None when not computed).
    means, sigmas, weights : tuple[float, float] | None
        The GMM components (low mean first).
    separation : float | None
        Ashman's D of the fit.
    n_objects : int
        Similarities in the fit.
    """

    value: float
    mode: str = "gmm"
    fallback: bool = False
    reason: str | None = None
    crossing: float | None = None
    means: tuple[float, float] | None = None
    sigmas: tuple[float, float] | None = None
    weights: tuple[float, float] | None = None
    separation: float | None = None
    n_objects: int = 0

    def to_json(self) -> dict:
        """JSON-ready dict (floats rounded to 6 digits); ``{"mode": "fixed", "value": t}`` in fixed mode."""
        r = lambda v: None if v is None or not np.isfinite(v) else round(float(v), 6)  # noqa: E731
        t = lambda p: None if p is None else [r(v) for v in p]  # noqa: E731
        if self.mode == "fixed":
            return {"mode": "fixed", "value": r(self.value)}
        return {"mode": self.mode, "value": r(self.value), "fallback": self.fallback, "reason": self.reason,
                "crossing": r(self.crossing), "means": t(self.means), "sigmas": t(self.sigmas),
                "weights": t(self.weights), "separation": r(self.separation), "n_objects": self.n_objects}


def gmm_threshold(similarities: np.ndarray, threshold: float = 0.9, *, min_objects: int = GMM_MIN_OBJECTS,
                  min_separation: float = GMM_MIN_SEPARATION, max_below: float = GMM_MAX_BELOW,
                  upper: float = GMM_UPPER, random_state: int = 42) -> AdaptiveThreshold:
    """Per-frame similarity threshold from a two-component Gaussian mixture (``threshold_mode: gmm``).

    UniMR (Cao et al., Adv. Sci. 2025) fits ``GaussianMixture(2, random_state=42)`` to the objects'
    best similarities to choose the encoder (:mod:`agent.selection`): the two components are the
    "matches" and the "non-matches" of the frame. Here the same fit sets the decision threshold: the
    similarity between the two means where the posterior of the higher-mean component reaches 0.5
    (:func:`posterior_crossing`, the quadratic solved in closed form), clipped to
    ``[threshold - max_below, upper]`` (default [0.7, 0.99] for 0.9).

    Fallback to ``threshold`` (``fallback=True`` with a ``reason``): fewer than ``min_objects``
    finite similarities; no spread; components not separated, Ashman's D =
    ``sqrt(2) |mu1 - mu0| / sqrt(sigma0^2 + sigma1^2) < min_separation`` (D > 2 is the usual
    criterion for a clean bimodal split, Ashman et al., J. Classification 1994); or no posterior
    crossing between the means.

    Parameters
    ----------
    similarities : np.ndarray
        float ``(N,)``: each object's best cosine similarity over all species (``match`` /
        ``assign``'s ``similarity``); non-finite values are ignored.
    threshold : float
        ``match.threshold``: the fallback and the centre of the allowed range.
    min_objects, min_separation, max_below, upper, random_state
        See above; module constants ``GMM_*`` are the defaults.

    Returns
    -------
    AdaptiveThreshold
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.mixture import GaussianMixture
    import warnings

    s = np.asarray(similarities, np.float64).ravel()
    s = s[np.isfinite(s)]
    n = int(s.size)
    if n < min_objects:
        return AdaptiveThreshold(float(threshold), fallback=True, reason=f"{n} objects < {min_objects}", n_objects=n)
    if float(s.max() - s.min()) < 1e-6:
        return AdaptiveThreshold(float(threshold), fallback=True, reason="similarities have no spread", n_objects=n)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        g = GaussianMixture(n_components=2, random_state=random_state).fit(s[:, None])
    m = g.means_.ravel()
    sd = np.sqrt(g.covariances_.reshape(2, -1)[:, 0])
    w = g.weights_.ravel()
    o = np.argsort(m)
    m, sd, w = m[o], sd[o], w[o]
    d = float(np.sqrt(2.0) * (m[1] - m[0]) / np.sqrt(sd[0] ** 2 + sd[1] ** 2))
    x = float(posterior_crossing(m, sd, w))
    base = dict(crossing=x if np.isfinite(x) else None, means=tuple(map(float, m)), sigmas=tuple(map(float, sd)),
                weights=tuple(map(float, w)), separation=d, n_objects=n)
    if d < min_separation:
        return AdaptiveThreshold(float(threshold), fallback=True,
                                 reason=f"components not separated (D {d:.2f} < {min_separation})", **base)
    if not np.isfinite(x):
        return AdaptiveThreshold(float(threshold), fallback=True, reason="no posterior crossing between the means",
                                 **base)
    lo = float(threshold) - max_below
    v = float(np.clip(x, lo, max(lo, upper)))
    return AdaptiveThreshold(v, reason="clipped" if v != x else None, **base)
