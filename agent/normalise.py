"""Crop normalisation for matching (UniMR step 3): fixed physical window, 8-bit grey, brightness
correction to a mean grey of 120 (+-20), and the symmetry poses (rotations x mirror).

Queries and references are cut with the SAME physical window (nm) so that an object appears at the
same scale whatever the pixel size of its scan. A circular mask (diameter = crop side) hides the
corners that a rotation would bring in; outside it the crop is filled with the mean grey.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from stm_agent.agent.config import NormaliseConfig
from stm_agent.agent.errors import ScanGeometryError
from stm_agent.agent.flatten import fill_nan

#: Largest crop window side, pixels, cut from a frame before it is resampled to ``size_px``. A
#: larger window means a pixel size far below what the reference window was made for (e.g. a
#: SCAN_RANGE of 1e-11 m): cutting it would take gigabytes for a crop of 64 x 64 pixels.
MAX_WINDOW_PX = 4096


def circular_mask(size_px: int) -> np.ndarray:
    """bool ``(S, S)``: pixel centres within ``S/2`` of the crop centre."""
    c = (size_px - 1) / 2.0
    yy, xx = np.mgrid[0:size_px, 0:size_px]
    return (xx - c) ** 2 + (yy - c) ** 2 <= (size_px / 2.0) ** 2


def crop_windows(
    image: np.ndarray,
    centres_px: np.ndarray,
    window_nm: float,
    pixel_size_nm: tuple[float, float],
    size_px: int,
) -> np.ndarray:
    """Cut square windows of a fixed physical side around centres and resample them.

    Parameters
    ----------
    image : np.ndarray
        ``(ny, nx)`` float frame (flattened, physical units); NaN pixels are replaced by the median
        of the finite pixels (background level) before cropping.
    centres_px : np.ndarray
        ``(N, 2)`` float ``(x, y)`` centres in pixels.
    window_nm : float | np.ndarray
        Side of the square window, nm: one for all, or float ``(N,)`` one per centre (each object
        windowed from its own extent, :func:`agent.references.window_nm`).
    pixel_size_nm : tuple[float, float]
        ``(dx, dy)`` pixel size of ``image``, nm (non-square pixels are resampled to square).
    size_px : int
        Output side S in pixels.

    Returns
    -------
    np.ndarray
        float32 ``(N, S, S)``, same units as ``image``. Parts of a window outside the image repeat
        the border pixels (OpenCV ``getRectSubPix``). Resampled with ``INTER_AREA`` (downscaling)
        or ``INTER_LINEAR`` (upscaling).

    Raises
    ------
    ValueError
        Non-positive window or pixel size, or ``centres_px`` not ``(N, 2)``.
    ScanGeometryError
        The window spans more than :data:`MAX_WINDOW_PX` pixels at this pixel size (checked before
        anything is allocated), or a value is not finite.
    """
    dx, dy = float(pixel_size_nm[0]), float(pixel_size_nm[1])
    cen = np.asarray(centres_px, dtype=np.float64).reshape(-1, 2)
    w = np.asarray(window_nm, np.float64)
    wins = np.full(len(cen), float(w)) if w.ndim == 0 else w.reshape(-1)
    if wins.shape != (len(cen),) or not (np.all(w > 0) and dx > 0 and dy > 0):
        raise ValueError(f"window_nm (one, or one per centre) and pixel size must be positive, got {window_nm}, "
                         f"{pixel_size_nm}")
    if wins.size:
        check_window_px(float(wins.max()), (dx, dy), "crop window")
    if not np.isfinite(cen).all():
        raise ScanGeometryError("crop window", "an object centre is not a finite pixel position")
    img, _ = fill_nan(np.asarray(image, dtype=np.float32))
    out = np.empty((len(cen), size_px, size_px), dtype=np.float32)
    for i, (cx, cy) in enumerate(cen):
        wx, wy = max(2, int(round(wins[i] / dx))), max(2, int(round(wins[i] / dy)))
        patch = cv2.getRectSubPix(img, (wx, wy), (float(cx), float(cy)))
        interp = cv2.INTER_AREA if (wx > size_px or wy > size_px) else cv2.INTER_LINEAR
        out[i] = cv2.resize(patch, (size_px, size_px), interpolation=interp)
    return out


def check_window_px(window_nm: float, pixel_size_nm: tuple[float, float], what: str = "reference window") -> None:
    """Refuse a window that spans more than :data:`MAX_WINDOW_PX` pixels at this pixel size.

    Raises
    ------
    ScanGeometryError
        The window (nm) is more than ``MAX_WINDOW_PX`` pixels wide or tall, or not finite (checked
        before anything is allocated: an absurd scan range in a header must not allocate without bound).
    """
    dx, dy = float(pixel_size_nm[0]), float(pixel_size_nm[1])
    with np.errstate(divide="ignore", over="ignore"):
        side_x, side_y = window_nm / dx, window_nm / dy  # floats: may be inf for absurd pixel sizes
    if not (math.isfinite(side_x) and math.isfinite(side_y)) or max(side_x, side_y) > MAX_WINDOW_PX:
        raise ScanGeometryError(
            "crop window", f"the {window_nm:.3g} nm {what} is {side_x:.3g} x {side_y:.3g} px at a pixel "
            f"size of {dx:.3g} x {dy:.3g} nm: more than {MAX_WINDOW_PX} px (is the scan range in the header right?)")


def frame_range(image: np.ndarray, low_pct: float = 1.0, high_pct: float = 99.0) -> tuple[float, float]:
    """``(lo, hi)``: percentiles of the finite pixels of a frame, the grey range of ``contrast="frame"``.

    Returns ``(0.0, 1.0)`` for a frame without finite pixels.
    """
    v = np.asarray(image)[np.isfinite(image)]
    if v.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(v, [low_pct, high_pct])
    return float(lo), float(hi)


def to_grey(
    crops: np.ndarray,
    cfg: NormaliseConfig,
    value_range: tuple[float, float] | None = None,
    low_pct: float = 1.0,
    high_pct: float = 99.0,
) -> np.ndarray:
    """Map float crops to 8-bit grey and correct their brightness (UniMR).

    With ``value_range=(lo, hi)`` (the frame's grey range, :func:`frame_range`), values map
    linearly ``lo -> 0, hi -> 255`` as in a rendered image, which keeps the height differences
    between objects of one frame (UniMR works on rendered images). Without it, each crop is
    stretched between its own ``low_pct`` and ``high_pct`` percentiles inside the circular mask.
    Values are clipped to 0..255.
    Then, as in UniMR, a crop whose mean grey inside the mask is outside
    ``cfg.mean_grey +- cfg.grey_tolerance`` is scaled by ``mean_grey / mean``. Outside the mask the
    crop is set to ``cfg.mean_grey``.

    Parameters
    ----------
    crops : np.ndarray
        float ``(N, S, S)`` (physical units; NaN-free).
    cfg : NormaliseConfig

    Returns
    -------
    np.ndarray
        uint8 ``(N, S, S)``.
    """
    c = np.asarray(crops, dtype=np.float32)
    n, s, _ = c.shape
    m = circular_mask(s)
    if value_range is not None:
        lo, hi = float(value_range[0]), float(value_range[1])
    else:
        inside = c[:, m]  # (N, K)
        lo = np.percentile(inside, low_pct, axis=1)[:, None, None]
        hi = np.percentile(inside, high_pct, axis=1)[:, None, None]
    g = np.clip((c - lo) / np.maximum(hi - lo, 1e-30) * 255.0, 0.0, 255.0)
    mean = g[:, m].mean(axis=1)
    off = np.abs(mean - cfg.mean_grey) > cfg.grey_tolerance
    gain = np.where(off & (mean > 0), cfg.mean_grey / np.maximum(mean, 1e-6), 1.0)
    g = np.clip(g * gain[:, None, None], 0.0, 255.0)
    g[:, ~m] = cfg.mean_grey
    return np.rint(g).astype(np.uint8)


def pose_grid(cfg: NormaliseConfig) -> tuple[np.ndarray, np.ndarray]:
    """Poses of the references: ``(angle_deg float32 (P,), mirrored bool (P,))``.

    ``cfg.rotations`` angles ``0, 360/R, ...`` (36 -> 10 degree steps), each plain and, if
    ``cfg.mirror``, mirrored (left-right flip applied before the rotation).
    """
    angles = (np.arange(cfg.rotations, dtype=np.float32) * (360.0 / cfg.rotations)).astype(np.float32)
    flips = [False, True] if cfg.mirror else [False]
    a = np.concatenate([angles for _ in flips])
    f = np.concatenate([np.full(len(angles), fl) for fl in flips])
    return a, f


def make_poses(grey: np.ndarray, cfg: NormaliseConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All symmetry poses of grey crops (UniMR: 36 rotations in 10 degree steps, plus mirroring).

    Parameters
    ----------
    grey : np.ndarray
        uint8 ``(N, S, S)`` from :func:`to_grey`.
    cfg : NormaliseConfig
        ``rotations``, ``mirror``, ``mean_grey`` (fill outside the circular mask).

    Returns
    -------
    (poses, angle_deg, mirrored) : uint8 ``(N, P, S, S)``, float32 ``(P,)``, bool ``(P,)``.
        Rotation is counter-clockwise in the displayed image (OpenCV ``getRotationMatrix2D``),
        bilinear, about the crop centre.
    """
    g = np.asarray(grey, dtype=np.uint8)
    n, s, _ = g.shape
    angles, mirrored = pose_grid(cfg)
    m = circular_mask(s)
    centre = ((s - 1) / 2.0, (s - 1) / 2.0)
    out = np.empty((n, len(angles), s, s), dtype=np.uint8)
    fill = int(round(cfg.mean_grey))
    for i in range(n):
        for j, (a, f) in enumerate(zip(angles, mirrored)):
            src = g[i, :, ::-1] if f else g[i]
            rot = cv2.getRotationMatrix2D(centre, float(a), 1.0)
            out[i, j] = cv2.warpAffine(
                np.ascontiguousarray(src), rot, (s, s), flags=cv2.INTER_LINEAR,
                borderMode=cv2.BORDER_CONSTANT, borderValue=fill,
            )
    out[:, :, ~m] = fill
    return out, angles, mirrored


def normalise_crops(
    image: np.ndarray,
    centres_px: np.ndarray,
    window_nm: float | np.ndarray,
    pixel_size_nm: tuple[float, float],
    cfg: NormaliseConfig,
) -> np.ndarray:
    """Query crops: :func:`crop_windows` then :func:`to_grey` -> uint8 ``(N, S, S)``, S = ``cfg.size_px``.

    With ``cfg.contrast == "frame"`` the grey range is :func:`frame_range` of ``image``.
    """
    crops = crop_windows(image, centres_px, window_nm, pixel_size_nm, cfg.size_px)
    if len(crops) == 0:
        return np.empty((0, cfg.size_px, cfg.size_px), dtype=np.uint8)
    return to_grey(crops, cfg, frame_range(image) if cfg.contrast == "frame" else None)
