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
    """

    emb: np.ndarray
    species_idx: np.ndarray
    angle_deg: np.ndarray
    mirrored: np.ndarray
    species: list[str]
    ref_idx: np.ndarray = field(default_factory=lambda: np.zeros(0, int))
    window_nm: float = 0.0
    key: str = ""


def species_scores(query_emb: np.ndarray, refs: RefEmbeddings) -> tuple[np.ndarray, np.ndarray]:
    """Best cosine similarity of each query to each species (max over that species' poses).

    Parameters
    ----------
    query_emb : np.ndarray
        float32 ``(N, D)`` L2-normalised.
    refs : RefEmbeddings

    Returns
    -------
    (scores, best_row) : float32 ``(N, K)`` and int ``(N, K)`` (row of ``refs.emb`` reaching the score).

    Raises
    ------
    ValueError
        Embedding dimensions differ (query made by another encoder than the references).
    """
    q = np.asarray(query_emb, dtype=np.float32)
    if q.ndim != 2 or q.shape[1] != refs.emb.shape[1]:
        raise ValueError(f"query embeddings {q.shape} do not match reference embeddings {refs.emb.shape}")
    sim = q @ refs.emb.T  # (N, M): cosine similarity as one matrix product
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
    query_emb: np.ndarray, refs: RefEmbeddings, threshold: float = 0.9
) -> tuple[list[str], np.ndarray, list[tuple[float, bool]]]:
    """Assign each query the best species if its similarity is at least ``threshold``, else ``other``.

    Parameters
    ----------
    query_emb : np.ndarray
        float32 ``(N, D)`` L2-normalised.
    refs : RefEmbeddings
    threshold : float
        Cosine similarity threshold (UniMR: 0.9).

    Returns
    -------
    (species, similarity, pose) : list of N names; float32 ``(N,)`` best similarity over all
        species; list of N ``(angle_deg, mirrored)`` of the best reference pose.
    """
    scores, best = species_scores(query_emb, refs)
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
