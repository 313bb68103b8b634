"""Cosine-similarity matching of query embeddings against reference pose embeddings (UniMR step 6)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from agent.domain import OTHER


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
        from agent.descriptors import descriptor_cosine

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
