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
        The largest reference crop window, nm (each reference is windowed from its own extent:
        ``ref_window_nm``).
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
    ref_window_nm : np.ndarray
        float64 ``(R,)`` crop window side of each reference entry, nm.
    ref_extent_nm : np.ndarray
        float64 ``(R,)`` extent of each reference object (:func:`agent.references.object_extent_nm`), nm.
    mirror : bool
        Mirrored poses are among the rows (``normalise.mirror``, or its ``auto`` choice).
    mirror_reason : str
        How ``mirror`` was decided (:func:`agent.references.mirror_decision`).
    enantiomers : bool
        The library holds two species that are mirror images of each other.
    mirror_invariance : float
        Mean cosine between the embedding of each reference and of its mirror image (pose 0): ~1
        for an encoder that cannot see a mirror (Zernike moment magnitudes).
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
    ref_window_nm: np.ndarray = field(default_factory=lambda: np.zeros(0))
    ref_extent_nm: np.ndarray = field(default_factory=lambda: np.zeros(0))
    mirror: bool = True
    mirror_reason: str = ""
    enantiomers: bool = False
    mirror_invariance: float = float("nan")

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


def size_gate(scores: np.ndarray, query_extent_nm: np.ndarray, refs: RefEmbeddings, tolerance: float) -> np.ndarray:
    """Rule out species whose references are of another size than the object (physical units only).

    Windowing every object from its own extent (:mod:`agent.references`) makes the embeddings
    scale-free: a 1 nm blob and a 2 nm blob of the same shape look alike. A species keeps its score
    for an object only when some reference of that species has an extent within a factor
    ``tolerance`` of the object's (``1/t <= e_object / e_ref <= t``); otherwise the score is -1.

    Parameters
    ----------
    scores : float32 ``(N, K)`` from :func:`species_scores`.
    query_extent_nm : float ``(N,)`` objects' extents, nm.
    refs : RefEmbeddings (``ref_extent_nm`` ``(R,)``; without it nothing is gated).
    tolerance : float > 1.

    Returns
    -------
    np.ndarray
        float32 ``(N, K)``: ``scores`` with incompatible (object, species) pairs set to -1.
    """
    ext = np.asarray(refs.ref_extent_nm, np.float64)
    if ext.size == 0 or not len(scores) or tolerance is None:
        return scores
    ref_sp = refs.species_idx[np.unique(refs.ref_idx, return_index=True)[1]]
    if len(ref_sp) != ext.size:
        return scores
    r = np.log(np.asarray(query_extent_nm, np.float64)[:, None] / np.maximum(ext[None, :], 1e-12))  # (N, R)
    ok_ref = np.abs(r) <= np.log(float(tolerance)) + 1e-9
    ok = np.zeros(scores.shape, bool)
    for k in range(scores.shape[1]):
        ok[:, k] = ok_ref[:, ref_sp == k].any(axis=1)
    return np.where(ok, scores, np.float32(-1.0)).astype(np.float32)


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


def decide(scores: np.ndarray, threshold: float | np.ndarray, ratio: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Best species of each object and whether it is accepted (threshold and ratio test).

    Parameters
    ----------
    scores : float ``(N, K)`` best cosine similarity to each species.
    threshold : float or float ``(N,)``
    ratio : float
        Accept only when ``(1 - s_best) <= ratio * (1 - s_second)`` (K >= 2; 1 = off).

    Returns
    -------
    (best, accepted) : int ``(N,)``, bool ``(N,)``.
    """
    s = np.asarray(scores, np.float64)
    n, k = s.shape
    if n == 0 or k == 0:
        return np.zeros(n, np.int64), np.zeros(n, bool)
    best = np.argmax(s, axis=1)
    top = s[np.arange(n), best]
    ok = (top >= np.asarray(threshold, np.float64)) & (top > -1.0 + 1e-6)  # -1: no (size-compatible) reference
    if k >= 2 and ratio < 1.0:
        second = np.partition(s, k - 2, axis=1)[:, k - 2]
        ok &= (1.0 - top) <= ratio * (1.0 - second) + 1e-12
    return best.astype(np.int64), ok


def assign(
    scores: np.ndarray, best: np.ndarray, refs: RefEmbeddings, threshold: float = 0.9, ratio: float = 1.0
) -> tuple[list[str], np.ndarray, list[tuple[float, bool]]]:
    """The decision step of :func:`match`, from :func:`species_scores`' ``(scores, best_row)``:
    the best species when its similarity is at least ``threshold`` and it passes the distance-ratio
    test (:func:`decide`, ``ratio`` 1 = off), else ``other``.

    Returns the same ``(species, similarity, pose)`` as :func:`match`.
    """
    n = len(scores)
    if n == 0 or scores.shape[1] == 0:
        return [OTHER] * n, np.zeros(n, np.float32), [(0.0, False)] * n
    k, ok = decide(scores, threshold, ratio)
    sim = scores[np.arange(n), k]
    row = best[np.arange(n), k]
    names = [refs.species[int(kk)] if a else OTHER for kk, a in zip(k, ok)]
    pose = [(float(refs.angle_deg[r]), bool(refs.mirrored[r])) for r in row]
    return names, sim.astype(np.float32), pose
