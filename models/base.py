"""The encoder protocol every embedding model follows."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class Encoder(Protocol):
    """Embeds normalised crops into unit vectors for cosine-similarity matching.

    Attributes
    ----------
    id : str
        Identity of the encoder *and* every setting that changes its output (e.g.
        ``"pixel/v1/size64"``, ``"clip-onnx/<model sha256[:12]>"``). Cached reference embeddings
        are keyed by it.

    Methods
    -------
    embed(crops) -> np.ndarray
        ``crops``: uint8 array ``(N, S, S)`` of brightness-normalised grey crops (mean grey ~120,
        UniMR). Returns float32 ``(N, D)``, each row L2-normalised (a zero crop gives a zero row).
    """

    id: str

    def embed(self, crops: np.ndarray) -> np.ndarray:  # pragma: no cover - protocol
        ...


def l2_normalise(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Row-wise L2 normalisation of a float array ``(N, D)`` -> float32 ``(N, D)``."""
    x = np.asarray(x, dtype=np.float32)
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(n, eps)).astype(np.float32, copy=False)
