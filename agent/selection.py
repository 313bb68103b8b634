"""Adaptive encoder selection (UniMR step 5, Cao et al., Adv. Sci. 2025).

For each candidate encoder, every query object gets ``s = max cosine similarity to any reference
pose`` (all species pooled). A two-component Gaussian mixture (scikit-learn
``GaussianMixture(2, random_state=42)``) is fitted to the ``s`` of the frame; the peak height of
component k is ``h_k = w_k / (sqrt(2 pi) sigma_k)`` and the score is ``|h0 - h1|``. The encoder
with the larger score is used (its similarity distribution splits into better separated
"matches"/"non-matches" populations). The released UniMR GUI compares a mistyped string and thus
always uses CLIP; here the comparison is numeric and really switches (tests/test_selection.py).

Degenerate frames (documented fallback): with fewer than ``min_queries`` queries or a spread of
``s`` (max - min) below ``min_spread`` the GMM is meaningless; that encoder's score is NaN with a
``reason``. If no candidate has a finite score, the ``fallback`` encoder (default: the first
candidate) is chosen with ``reason = "fallback: ..."``. Ties go to the earlier candidate.

Pipeline wiring (``encoder: auto``)::

    sel = select_encoder({name: (enc.embed(query_crops), ref_embeddings[name]) for name, enc in encs.items()})
    result.encoder = sel.to_json()   # {"chosen": "pixel", "scores": {...}, "reason": ...}
    emb = embeddings[sel.chosen]
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

#: fewest queries the GMM is fitted to (2 components need at least 2 points)
MIN_QUERIES = 2
#: smallest spread (max - min) of the similarities considered non-degenerate
MIN_SPREAD = 1e-6


@dataclass
class PeakSeparation:
    """GMM fit of one encoder's similarity distribution.

    Attributes
    ----------
    score : float
        ``|h0 - h1|`` (1 / similarity unit); NaN when degenerate.
    heights, means, sigmas, weights : tuple[float, float]
        Per component (sorted by mean, low first): peak height ``w/(sqrt(2 pi) sigma)``, mean,
        standard deviation and mixing weight.
    n_queries : int
        Queries in the fit.
    reason : str | None
        Why the score is NaN (degenerate input), else None.
    """

    score: float
    heights: tuple[float, float] = (math.nan, math.nan)
    means: tuple[float, float] = (math.nan, math.nan)
    sigmas: tuple[float, float] = (math.nan, math.nan)
    weights: tuple[float, float] = (math.nan, math.nan)
    n_queries: int = 0
    reason: str | None = None

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict (NaN -> None)."""
        def r(v: float) -> float | None:
            return None if not math.isfinite(v) else round(float(v), 6)

        return {
            "score": r(self.score),
            "heights": [r(v) for v in self.heights],
            "means": [r(v) for v in self.means],
            "sigmas": [r(v) for v in self.sigmas],
            "weights": [r(v) for v in self.weights],
            "n_queries": self.n_queries,
            "reason": self.reason,
        }


@dataclass
class Selection:
    """Outcome of :func:`select_encoder`.

    Attributes
    ----------
    chosen : str
        Name of the chosen encoder.
    scores : dict[str, PeakSeparation]
        Every candidate's fit.
    reason : str
        ``"max peak separation"`` or ``"fallback: <why>"``.
    """

    chosen: str
    scores: dict[str, PeakSeparation] = field(default_factory=dict)
    reason: str = "max peak separation"

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict for ``FrameResult.encoder``."""
        return {"chosen": self.chosen, "reason": self.reason,
                "scores": {k: v.to_json() for k, v in self.scores.items()}}


def max_similarity(query_emb: np.ndarray, ref_emb: np.ndarray) -> np.ndarray:
    """Best cosine similarity of each query to any reference pose.

    Parameters
    ----------
    query_emb : np.ndarray
        float ``(N, D)`` L2-normalised query embeddings.
    ref_emb : np.ndarray
        float ``(M, D)`` L2-normalised embeddings of all poses of all reference species
        (or ``(n_refs, P, D)``, flattened).

    Returns
    -------
    np.ndarray
        float64 ``(N,)`` in -1..1.

    Raises
    ------
    ValueError
        No reference, or embedding lengths differ.
    """
    q = np.asarray(query_emb, dtype=np.float32)
    r = np.asarray(ref_emb, dtype=np.float32)
    r = r.reshape(-1, r.shape[-1])
    if r.shape[0] == 0:
        raise ValueError("no reference embedding")
    if q.ndim != 2 or q.shape[1] != r.shape[1]:
        raise ValueError(f"query embeddings {q.shape} do not match reference embeddings {r.shape}")
    if len(q) == 0:
        return np.zeros(0, dtype=np.float64)
    return (q @ r.T).max(axis=1).astype(np.float64)


def peak_separation(similarities: np.ndarray, min_queries: int = MIN_QUERIES,
                    min_spread: float = MIN_SPREAD, random_state: int = 42) -> PeakSeparation:
    """Fit GMM(2) to similarities and return the UniMR peak-height difference.

    Parameters
    ----------
    similarities : np.ndarray
        float ``(N,)``: each query's max similarity (:func:`max_similarity`).
    min_queries, min_spread : see the module docstring (degenerate input -> NaN score).
    random_state : int
        GMM seed (42, as UniMR).

    Returns
    -------
    PeakSeparation
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.mixture import GaussianMixture

    s = np.asarray(similarities, dtype=np.float64).ravel()
    s = s[np.isfinite(s)]
    n = int(len(s))
    if n < min_queries:
        return PeakSeparation(math.nan, n_queries=n, reason=f"{n} queries < {min_queries}")
    if float(s.max() - s.min()) < min_spread:
        return PeakSeparation(math.nan, n_queries=n, reason="similarities have no spread")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        gmm = GaussianMixture(n_components=2, random_state=random_state).fit(s[:, None])
    means = gmm.means_.ravel()
    sig = np.sqrt(gmm.covariances_.reshape(2, -1)[:, 0])
    w = gmm.weights_.ravel()
    order = np.argsort(means)
    h = w / (math.sqrt(2 * math.pi) * sig)
    h, means, sig, w = h[order], means[order], sig[order], w[order]
    return PeakSeparation(float(abs(h[0] - h[1])), tuple(map(float, h)), tuple(map(float, means)),
                          tuple(map(float, sig)), tuple(map(float, w)), n)


def select_encoder(candidates: Mapping[str, tuple[np.ndarray, np.ndarray]], fallback: str | None = None,
                   **kwargs: Any) -> Selection:
    """Choose the encoder whose similarity distribution has the better separated GMM peaks.

    Parameters
    ----------
    candidates : Mapping[str, (query_emb, ref_emb)]
        Encoder name -> (``(N, D)`` query embeddings, ``(M, D)`` reference-pose embeddings), both
        L2-normalised; N must be the same objects for every encoder. At least one candidate.
    fallback : str | None
        Encoder used when every score is NaN (default: the first candidate).
    **kwargs
        Passed to :func:`peak_separation` (``min_queries``, ``min_spread``, ``random_state``).

    Returns
    -------
    Selection

    Raises
    ------
    ValueError
        No candidate, ``fallback`` not a candidate, or mismatching embeddings.
    """
    names = list(candidates)
    if not names:
        raise ValueError("no candidate encoder")
    fb = fallback if fallback is not None else names[0]
    if fb not in candidates:
        raise ValueError(f"fallback {fb!r} is not a candidate ({names})")
    scores = {name: peak_separation(max_similarity(q, r), **kwargs) for name, (q, r) in candidates.items()}
    finite = [(v.score, -i, k) for i, (k, v) in enumerate(scores.items()) if math.isfinite(v.score)]
    if not finite:
        why = "; ".join(f"{k}: {v.reason}" for k, v in scores.items())
        return Selection(fb, scores, f"fallback: {why}")
    return Selection(max(finite)[2], scores)


def select_from_encoders(encoders: Mapping[str, Any], query_crops: np.ndarray,
                         ref_embeddings: Mapping[str, np.ndarray], **kwargs: Any) -> tuple[Selection, dict[str, np.ndarray]]:
    """Embed the frame's queries with every encoder and select one.

    Parameters
    ----------
    encoders : Mapping[str, Encoder]
        Name -> encoder (``models.base.Encoder``).
    query_crops : np.ndarray
        uint8 ``(N, S, S)`` normalised query crops.
    ref_embeddings : Mapping[str, np.ndarray]
        Name -> ``(M, D)`` cached reference-pose embeddings of that encoder.

    Returns
    -------
    (Selection, {name: (N, D) query embeddings})
        The embeddings are returned so the pipeline matches with the chosen one without
        embedding twice.
    """
    q = {k: e.embed(query_crops) for k, e in encoders.items()}
    return select_encoder({k: (q[k], ref_embeddings[k]) for k in encoders}, **kwargs), q


#: an encoder whose closest pair of different species reaches this cosine cannot tell them apart
SEPARABLE_BELOW = 0.995
#: an encoder whose embedding of a crop and of its mirror image reach this cosine cannot see a mirror
MIRROR_INVARIANT_ABOVE = 0.99


def species_separation(refs, limit: float = SEPARABLE_BELOW) -> dict[str, Any]:
    """Can an encoder tell the library's species apart? Measured on the references themselves.

    Two tests (issue 10, item 7: ``encoder: auto`` must not pick an encoder that cannot):

    * ``closest``: for every reference (its pose-0 row: angle 0, not mirrored) the best cosine to
      any pose of any OTHER species; at ``closest >= limit`` two species are indistinguishable;
    * ``mirror_invariance`` (:attr:`agent.match.RefEmbeddings.mirror_invariance`): when the library
      holds enantiomers (:func:`agent.references.mirror_decision`), an encoder whose embedding of a
      reference and of its mirror image coincide (>= :data:`MIRROR_INVARIANT_ABOVE`; Zernike moment
      magnitudes: ~1.0 by construction) cannot tell them apart, whatever ``closest`` says (real L
      and R crops are not exact mirror images: Zernike gives 0.98-0.99 between them).

    Parameters
    ----------
    refs : agent.match.RefEmbeddings
    limit : float

    Returns
    -------
    dict
        ``{"closest": float | None, "pair": [a, b] | None, "mirror_invariance": float | None,
        "separable": bool, "reason": str | None}`` (one species: closest None, separable True).
    """
    mi = float(refs.mirror_invariance)
    out: dict[str, Any] = {"closest": None, "pair": None, "mirror_invariance": round(mi, 6) if np.isfinite(mi) else None,
                           "separable": True, "reason": None}
    if len(refs.species) < 2 or refs.emb.size == 0:
        return out
    base = np.flatnonzero((np.asarray(refs.angle_deg) == 0) & ~np.asarray(refs.mirrored, bool))
    sim = refs.emb[base] @ refs.emb.T                                     # (R, M)
    other = refs.species_idx[base][:, None] != refs.species_idx[None, :]  # (R, M)
    sim = np.where(other, sim, -np.inf)
    i, j = np.unravel_index(int(np.argmax(sim)), sim.shape)
    c = float(sim[i, j])
    out["closest"] = round(c, 6)
    out["pair"] = [refs.species[int(refs.species_idx[base[i]])], refs.species[int(refs.species_idx[j])]]
    if c >= limit:
        out.update(separable=False, reason=f"species {out['pair'][0]} and {out['pair'][1]} reach cosine {c:.3f}")
    elif refs.enantiomers and np.isfinite(mi) and mi >= MIRROR_INVARIANT_ABOVE:
        out.update(separable=False, reason=f"enantiomers in the library and the encoder cannot see a mirror "
                                           f"(mirror invariance {mi:.3f})")
    return out
