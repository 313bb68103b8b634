"""CLIP image preprocessing identical to open_clip's transform, without torch or PIL.

open_clip (``open_clip.image_transform``, ``resize_mode="shortest"``) applies to a PIL image:
``Resize(image_size, BICUBIC)`` (shortest side to ``image_size``; torchvision on a PIL image calls
``PIL.Image.resize``), ``CenterCrop(image_size)``, ``convert("RGB")``, ``ToTensor()`` (/255) and
``Normalize(mean, std)``.

The resize here reproduces Pillow's separable resampling (``libImaging/Resample.c``): the same
filter (bicubic a = -0.5, or triangle), widened by the scale factor when downscaling (antialias),
the same 22-bit fixed-point coefficients and the same rounding/clipping to 8 bit after the
horizontal pass and after the vertical pass. Each pass is one matrix product over the whole batch
(numpy ``matmul``), so a batch of crops is resized at once. OpenCV's ``INTER_CUBIC`` is NOT used:
it has a = -0.75 and no antialiasing, and differs from open_clip's input by up to ~20 grey levels
on STM crops (see ``docs/encoders.md``).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Sequence

import numpy as np

#: open_clip's OPENAI_DATASET_MEAN / OPENAI_DATASET_STD (used by ViT-B-32 for every tag).
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

_PRECISION_BITS = 32 - 8 - 2  # Pillow: fixed-point coefficient precision for 8-bit images


def _bicubic(x: np.ndarray, a: float = -0.5) -> np.ndarray:
    x = np.abs(x)
    return np.where(
        x < 1.0,
        ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0,
        np.where(x < 2.0, (((x - 5.0) * x + 8.0) * x - 4.0) * a, 0.0),
    )


def _triangle(x: np.ndarray) -> np.ndarray:
    x = np.abs(x)
    return np.where(x < 1.0, 1.0 - x, 0.0)


_FILTERS = {"bicubic": (_bicubic, 2.0), "bilinear": (_triangle, 1.0)}


@lru_cache(maxsize=64)
def resample_matrix(in_size: int, out_size: int, interpolation: str = "bicubic") -> np.ndarray:
    """Pillow's resampling weights as a dense matrix.

    Parameters
    ----------
    in_size, out_size : int
        Input and output length of one axis, pixels.
    interpolation : {"bicubic", "bilinear"}

    Returns
    -------
    np.ndarray
        float64 ``(out_size, in_size)``; row i holds the weights of output pixel i, quantised to
        Pillow's 22-bit fixed point and divided by 2^22 (``precompute_coeffs`` + ``normalize_coeffs_8bpc``
        in Pillow ``Resample.c``).

    Raises
    ------
    ValueError
        Unknown interpolation or non-positive sizes.
    """
    if interpolation not in _FILTERS:
        raise ValueError(f"interpolation {interpolation!r} unsupported; allowed: {sorted(_FILTERS)}")
    if in_size < 1 or out_size < 1:
        raise ValueError(f"sizes must be positive, got {in_size} -> {out_size}")
    filt, support0 = _FILTERS[interpolation]
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = support0 * filterscale
    centre = (np.arange(out_size) + 0.5) * scale
    # C casts to int (truncation toward zero) before clipping at 0
    xmin = np.maximum(np.trunc(centre - support + 0.5).astype(int), 0)
    xmax = np.minimum(np.trunc(centre + support + 0.5).astype(int), in_size)
    x = np.arange(in_size)[None, :]
    inside = (x >= xmin[:, None]) & (x < xmax[:, None])
    w = np.where(inside, filt((x - centre[:, None] + 0.5) / filterscale), 0.0)
    w /= np.where(inside, w, 0.0).sum(axis=1, keepdims=True)
    one = float(1 << _PRECISION_BITS)
    wq = np.where(w < 0, np.trunc(-0.5 + w * one), np.trunc(0.5 + w * one))
    return wq / one


def _round_clip8(x: np.ndarray) -> np.ndarray:
    # Pillow: (ss + 2^21) >> 22 then clip to 0..255 == floor(x + 0.5) clipped
    return np.clip(np.floor(x + 0.5), 0.0, 255.0)


def pil_resize(images: np.ndarray, out_hw: tuple[int, int], interpolation: str = "bicubic") -> np.ndarray:
    """Resize a batch of 8-bit grey images exactly as ``PIL.Image.resize`` does (mode ``L``).

    Parameters
    ----------
    images : np.ndarray
        uint8 ``(N, H, W)``.
    out_hw : tuple[int, int]
        ``(H_out, W_out)``.

    Returns
    -------
    np.ndarray
        float64 ``(N, H_out, W_out)`` holding integer grey values 0..255.
    """
    x = np.asarray(images, dtype=np.float64)
    n, h, w = x.shape
    ho, wo = out_hw
    # Each pass is ONE 2-D matrix product over the whole batch (numpy's stacked ``M @ x`` with a
    # 2-D ``M`` runs ~30x slower). Exact whatever the summation order: the weights are multiples of
    # 2^-22 and the pixels integers 0..255, so every product and partial sum is exact in float64.
    if wo != w:  # horizontal pass first, as Pillow
        x = _round_clip8((x.reshape(n * h, w) @ resample_matrix(w, wo, interpolation).T).reshape(n, h, wo))
    if ho != h:
        wc = x.shape[2]
        y = resample_matrix(h, ho, interpolation) @ x.transpose(1, 0, 2).reshape(h, n * wc)
        x = _round_clip8(y.reshape(ho, n, wc).transpose(1, 0, 2))
    return x


def _shortest_side_size(h: int, w: int, size: int) -> tuple[int, int]:
    # torchvision _compute_resized_output_size with an int size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    return (new_long, new_short) if w <= h else (new_short, new_long)


def clip_preprocess(
    crops: np.ndarray | Sequence[np.ndarray],
    image_size: int = 224,
    mean: Sequence[float] = OPENAI_MEAN,
    std: Sequence[float] = OPENAI_STD,
    interpolation: str = "bicubic",
) -> np.ndarray:
    """Turn grey crops into the CLIP network input, as open_clip's preprocess does.

    Parameters
    ----------
    crops : np.ndarray | sequence of np.ndarray
        uint8 grey crops: an array ``(N, H, W)`` or a sequence of ``(H_i, W_i)`` arrays (crops of
        different sizes are processed in groups of equal size). Other integer/float dtypes are
        rounded and clipped to 0..255 first.
    image_size : int
        Network input side, pixels (224 for ViT-B-32).
    mean, std : sequence of 3 floats
        Per-channel normalisation after scaling to 0..1 (``model.json``).
    interpolation : {"bicubic", "bilinear"}

    Returns
    -------
    np.ndarray
        float32 ``(N, 3, image_size, image_size)``: the grey value copied to R, G and B, then
        ``(v / 255 - mean_c) / std_c``.

    Raises
    ------
    ValueError
        Crops that are not 2-D, or an empty crop.
    """
    if isinstance(crops, np.ndarray) and crops.ndim == 3:
        groups = {crops.shape[1:]: (np.arange(len(crops)), crops)}
        n = len(crops)
    else:
        items = [np.asarray(c) for c in crops]
        n = len(items)
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for i, c in enumerate(items):
            if c.ndim != 2 or c.size == 0:
                raise ValueError(f"crop {i}: expected a non-empty 2-D grey array, got shape {c.shape}")
            by_shape.setdefault(c.shape, []).append(i)
        groups = {s: (np.array(idx), np.stack([items[i] for i in idx])) for s, idx in by_shape.items()}
    m = np.asarray(mean, dtype=np.float32).reshape(1, 3, 1, 1)
    sd = np.asarray(std, dtype=np.float32).reshape(1, 3, 1, 1)
    out = np.empty((n, 3, image_size, image_size), dtype=np.float32)
    for (h, w), (idx, batch) in groups.items():
        if h < 1 or w < 1:
            raise ValueError(f"empty crop of shape {(h, w)}")
        if batch.dtype != np.uint8:
            batch = np.clip(np.rint(batch.astype(np.float64)), 0, 255)
        rh, rw = _shortest_side_size(h, w, image_size)
        r = pil_resize(batch, (rh, rw), interpolation)
        top = int(round((rh - image_size) / 2.0))
        left = int(round((rw - image_size) / 2.0))
        if top < 0 or left < 0:  # cannot happen with "shortest"; kept for safety
            raise ValueError(f"resized crop {(rh, rw)} smaller than {image_size}")
        g = (r[:, top:top + image_size, left:left + image_size] / 255.0).astype(np.float32)
        out[idx] = (g[:, None, :, :] - m) / sd
    return out
