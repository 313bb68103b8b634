"""The raw-pixel encoder of UniMR ("shallow" features: the preprocessed pixel matrix)."""

from __future__ import annotations

import numpy as np

from stm_agent.agent.normalise import circular_mask
from stm_agent.models.base import l2_normalise


class PixelEncoder:
    """Embeds a crop as its mean-centred pixels inside the circular mask, L2-normalised.

    The cosine similarity of two such embeddings is the Pearson correlation of the two crops' grey
    values inside the mask (UniMR raw-pixel feature; the centring makes it insensitive to a
    uniform brightness offset).

    Parameters
    ----------
    size_px : int
        Side S of the square crops it accepts (``NormaliseConfig.size_px``).

    Attributes
    ----------
    id : str
        ``"pixel/v1/size<S>"``.
    dim : int
        Embedding length D = number of pixels inside the circular mask.
    """

    name = "pixel"

    def __init__(self, size_px: int):
        if size_px < 2:
            raise ValueError(f"size_px must be >= 2, got {size_px}")
        self.size_px = int(size_px)
        self._mask = circular_mask(self.size_px)
        self.dim = int(self._mask.sum())
        self.id = f"pixel/v1/size{self.size_px}"

    def embed(self, crops: np.ndarray) -> np.ndarray:
        """Embed crops.

        Parameters
        ----------
        crops : np.ndarray
            uint8 (or float) ``(N, S, S)``.

        Returns
        -------
        np.ndarray
            float32 ``(N, D)``, rows L2-normalised (a uniform crop gives a zero row).

        Raises
        ------
        ValueError
            The crops are not ``(N, S, S)`` with S = ``size_px``.
        """
        c = np.asarray(crops)
        if c.ndim != 3 or c.shape[1:] != (self.size_px, self.size_px):
            raise ValueError(f"{self.id}: expected crops (N, {self.size_px}, {self.size_px}), got {c.shape}")
        v = c[:, self._mask].astype(np.float32)
        v -= v.mean(axis=1, keepdims=True)
        return l2_normalise(v)
