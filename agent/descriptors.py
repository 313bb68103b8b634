"""Physical per-object descriptors and their weighted combination with an encoder embedding.

Descriptors (per object, from the flattened frame):

- ``area_nm2``: pixels of the object mask x ``dx * dy`` (nm^2);
- ``feret_nm``: largest Feret diameter of the mask (scikit-image ``regionprops``), nm (not the
  segmentation's ``Region.extent_nm``, the diameter of the enclosing circle);
- ``height``: apparent height relative to the local background, i.e. the extreme value of the
  object (in the direction of its contrast) minus the median of a ring around its box. In pm when
  the frame is a topography in metres (``z_unit="m"``); for rendered images (no physical unit) in
  units of the local roughness (1.4826 x MAD of the ring), ``height_unit = "sigma"``;
- ``contrast_sign``: +1 for a protrusion (peak), -1 for a depression (trough).

The mask is given (segmentation) or, for boxes only, the pixels beyond half the extreme
deviation (half maximum) in the direction of the contrast, largest connected component.

Combination (documented weighting): descriptors are standardised with a robust scaler (median,
1.4826 MAD) fitted on the references (or the frame), L2-normalised, and concatenated with the
L2-normalised embedding as ``[sqrt(1 - w) e, sqrt(w) d]``. The cosine of two combined vectors is
then exactly ``(1 - w) cos(e, e') + w cos(d, d')``: ``w`` is the weight of the physical descriptors.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from skimage.measure import label as _cc_label
from skimage.measure import regionprops

from stm_agent.models.base import l2_normalise

FEATURES = ("log_area_nm2", "log_feret_nm", "height", "contrast_sign")


@dataclass
class Descriptors:
    """Physical descriptors of N objects (arrays of shape ``(N,)``).

    Attributes
    ----------
    area_nm2, feret_nm, height : np.ndarray
        float64; see the module docstring. ``height`` is signed (negative for troughs).
    contrast_sign : np.ndarray
        int8, +1 peak / -1 trough.
    height_unit : str
        ``"pm"`` or ``"sigma"`` (local roughness units).
    """

    area_nm2: np.ndarray
    feret_nm: np.ndarray
    height: np.ndarray
    contrast_sign: np.ndarray
    height_unit: str

    def matrix(self) -> np.ndarray:
        """float64 ``(N, 4)``: log area, log Feret diameter, |height|, contrast sign (see ``FEATURES``).

        Logs make sizes multiplicative (a 2x larger object is the same step at any scale).
        """
        return np.column_stack([
            np.log(np.maximum(self.area_nm2, 1e-12)),
            np.log(np.maximum(self.feret_nm, 1e-12)),
            np.abs(self.height),
            self.contrast_sign.astype(np.float64),
        ])


def describe_objects(
    image: np.ndarray,
    bboxes_px: np.ndarray,
    pixel_size_nm: tuple[float, float],
    masks: list[np.ndarray] | None = None,
    z_unit: str | None = "m",
    ring_px: int | None = None,
) -> Descriptors:
    """Measure the physical descriptors of objects in one frame.

    Parameters
    ----------
    image : np.ndarray
        ``(ny, nx)`` float frame (flattened topography in m, or a rendered grey image); NaN allowed.
    bboxes_px : np.ndarray
        ``(N, 4)`` int ``(x, y, w, h)`` boxes, pixels.
    pixel_size_nm : (dx, dy)
        Pixel size, nm.
    masks : list of bool arrays | None
        Per object a bool ``(h, w)`` mask inside its box (e.g. from segmentation); None: half-maximum
        mask (module docstring).
    z_unit : {"m", None}
        ``"m"``: heights in pm; ``None``: heights in units of the local roughness.
    ring_px : int | None
        Width of the background ring around each box; default ``max(3, box size / 2)``.

    Returns
    -------
    Descriptors

    Raises
    ------
    ValueError
        Bad shapes, non-positive pixel size, or ``masks`` of the wrong length/shape.
    """
    img = np.asarray(image, dtype=np.float64)
    if img.ndim != 2:
        raise ValueError(f"image must be 2-D, got {img.shape}")
    dx, dy = map(float, pixel_size_nm)
    if not (dx > 0 and dy > 0):
        raise ValueError(f"pixel size must be positive, got {pixel_size_nm}")
    if z_unit not in ("m", None):
        raise ValueError(f"z_unit must be 'm' or None, got {z_unit!r}")
    b = np.asarray(bboxes_px, dtype=np.int64).reshape(-1, 4)
    if masks is not None and len(masks) != len(b):
        raise ValueError(f"{len(masks)} masks for {len(b)} boxes")
    ny, nx = img.shape
    n = len(b)
    area = np.zeros(n)
    feret = np.zeros(n)
    height = np.zeros(n)
    sign = np.ones(n, dtype=np.int8)
    for i, (x, y, w, h) in enumerate(b):  # one vectorised measurement per object
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, nx), min(y + h, ny)
        if x1 <= x0 or y1 <= y0:
            raise ValueError(f"box {i} {tuple(b[i])} lies outside the {nx}x{ny} image")
        r = ring_px if ring_px is not None else max(3, int(round(max(w, h) / 2)))
        X0, Y0, X1, Y1 = max(x0 - r, 0), max(y0 - r, 0), min(x1 + r, nx), min(y1 + r, ny)
        win = img[Y0:Y1, X0:X1]
        inner = np.zeros(win.shape, bool)
        inner[y0 - Y0:y1 - Y0, x0 - X0:x1 - X0] = True
        ring = win[~inner & np.isfinite(win)]
        box = img[y0:y1, x0:x1]
        bg = float(np.median(ring)) if ring.size else float(np.nanmedian(box))
        d = box - bg
        if masks is not None:
            m = np.asarray(masks[i], bool)
            if m.shape != (h, w):
                raise ValueError(f"mask {i} has shape {m.shape}, box is {(h, w)}")
            m = m[y0 - y:y1 - y, x0 - x:x1 - x]
            vals = d[m & np.isfinite(d)]
            s = 1 if (vals.size == 0 or np.mean(vals) >= 0) else -1
        else:
            hi, lo = np.nanmax(d), np.nanmin(d)
            s = 1 if hi >= -lo else -1
            m = (s * d) >= 0.5 * (s * (hi if s > 0 else lo))
            lab = _cc_label(m, connectivity=2)
            if lab.max() > 1:
                counts = np.bincount(lab.ravel())[1:]
                m = lab == (int(np.argmax(counts)) + 1)
        sign[i] = s
        peak = float(np.nanmax(s * d[m])) * s if m.any() else 0.0
        if z_unit == "m":
            height[i] = peak * 1e12
        else:
            mad = 1.4826 * float(np.median(np.abs(ring - bg))) if ring.size else 0.0
            height[i] = peak / mad if mad > 0 else 0.0
        area[i] = float(m.sum()) * dx * dy
        if m.any():
            props = regionprops(m.astype(np.uint8))[0]
            # Feret diameter in pixels; scale by the mean pixel size (non-square pixels approximated)
            feret[i] = float(props.feret_diameter_max) * np.sqrt(dx * dy)
    return Descriptors(area, feret, height, sign, "pm" if z_unit == "m" else "sigma")


class MedianMadScaler:
    """Standardise descriptor matrices: ``(X - median) / (1.4826 MAD)`` per column.

    Fit on the references (or on a frame). Columns with zero spread get scale 1. (Not
    scikit-learn's ``RobustScaler``, which divides by the interquartile range.)
    """

    def fit(self, x: np.ndarray) -> "MedianMadScaler":
        """Fit on float ``(N, K)``; returns self. Raises ``ValueError`` for an empty matrix."""
        a = np.asarray(x, dtype=np.float64)
        if a.ndim != 2 or len(a) == 0:
            raise ValueError(f"need a non-empty (N, K) matrix, got {a.shape}")
        self.center_ = np.median(a, axis=0)
        mad = 1.4826 * np.median(np.abs(a - self.center_), axis=0)
        self.scale_ = np.where(mad > 0, mad, 1.0)
        return self

    def transform(self, x: np.ndarray) -> np.ndarray:
        """float ``(N, K)`` -> standardised float64 ``(N, K)``."""
        return (np.asarray(x, dtype=np.float64) - self.center_) / self.scale_


def combine(embedding: np.ndarray, descriptors_std: np.ndarray, weight: float) -> np.ndarray:
    """Weighted combination of an encoder embedding and standardised descriptors.

    Parameters
    ----------
    embedding : np.ndarray
        float ``(N, D)`` (L2-normalised here again).
    descriptors_std : np.ndarray
        float ``(N, K)`` standardised descriptors (:class:`MedianMadScaler`).
    weight : float
        0..1, weight ``w`` of the descriptors in the cosine similarity.

    Returns
    -------
    np.ndarray
        float32 ``(N, D + K)`` = ``[sqrt(1-w) e, sqrt(w) d]``, unit rows when both parts are
        non-zero; ``cos = (1-w) cos_e + w cos_d``.

    Raises
    ------
    ValueError
        ``weight`` outside 0..1 or row counts differ.
    """
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"weight must be in 0..1, got {weight}")
    e = l2_normalise(embedding)
    d = l2_normalise(descriptors_std)
    if len(e) != len(d):
        raise ValueError(f"{len(e)} embeddings vs {len(d)} descriptor rows")
    return np.concatenate([np.sqrt(1.0 - weight) * e, np.sqrt(weight) * d], axis=1).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Descriptors inside the pipeline: segmented regions, reference records, reference-fitted scaler
# ---------------------------------------------------------------------------------------------

#: Version of the descriptor measurement and standardisation; part of the reference cache key
#: (bump it when :func:`describe_objects`, :func:`describe_regions` or :func:`fit_reference_scaler`
#: change what they compute).
DESCRIPTOR_VERSION = "desc/v1"

#: Smallest standardisation scale per feature (``FEATURES`` order), used when the references
#: spread less than this (or there is one species): a factor 2 in area, a factor sqrt(2) in
#: extent, ``HEIGHT_MIN_REL`` x the median |height| of the references, and the contrast sign
#: (+-1) as is.
MIN_SCALE = (float(np.log(2.0)), float(np.log(np.sqrt(2.0))), None, 1.0)
HEIGHT_MIN_REL = 0.2

#: The settings that decide the reference descriptors (hashed into the pose cache key).
DESCRIPTOR_SETTINGS = {"version": DESCRIPTOR_VERSION, "features": list(FEATURES),
                       "min_scale": [None if s is None else round(s, 6) for s in MIN_SCALE],
                       "height_min_rel": HEIGHT_MIN_REL}


def z_unit_of(unit: str | None) -> str | None:
    """``"m"`` for a channel in metres (topography: heights in pm), else None (roughness units)."""
    return "m" if unit == "m" else None


def region_masks(regions) -> list[np.ndarray]:
    """Filled outer contours of segmented regions as bool masks inside their boxes.

    Parameters
    ----------
    regions : list[agent.segment.Region]

    Returns
    -------
    list of bool ``(h, w)`` arrays, one per region (``bbox_px = (x, y, w, h)``); holes are filled
    (the object is its outer contour, as OpenCV ``findContours`` outlined it in UniMR step 1).
    """
    import cv2

    out = []
    for r in regions:
        x, y, w, h = r.bbox_px
        m = np.zeros((h, w), np.uint8)
        cv2.drawContours(m, [np.asarray(r.contour, np.int32).reshape(-1, 1, 2) - np.array([x, y], np.int32)],
                         -1, 1, thickness=cv2.FILLED)
        out.append(m.astype(bool))
    return out


def describe_regions(image: np.ndarray, regions, pixel_size_nm: tuple[float, float],
                     z_unit: str | None = "m") -> Descriptors:
    """:func:`describe_objects` of segmented regions (their boxes and filled-contour masks).

    Queries of a frame and references picked with :func:`agent.pipeline.reference_crop_at` are
    both described with this function on the flattened frame, so they are measured alike.
    Returns empty ``(0,)`` arrays for no region.
    """
    if not regions:
        z = np.zeros(0)
        return Descriptors(z, z.copy(), z.copy(), np.zeros(0, np.int8), "pm" if z_unit == "m" else "sigma")
    boxes = np.array([r.bbox_px for r in regions], dtype=np.int64)
    return describe_objects(image, boxes, pixel_size_nm, masks=region_masks(regions), z_unit=z_unit)


def descriptor_record(d: Descriptors, i: int = 0, method: str = "segment") -> dict:
    """Object ``i`` of ``d`` as a JSON-able dict (stored in a reference's provenance)."""
    return {"version": DESCRIPTOR_VERSION, "method": method, "area_nm2": float(d.area_nm2[i]),
            "feret_nm": float(d.feret_nm[i]), "height": float(d.height[i]), "height_unit": d.height_unit,
            "contrast_sign": int(d.contrast_sign[i])}


def descriptors_from_records(records: list[dict]) -> Descriptors:
    """Inverse of :func:`descriptor_record` for a list of records (one height unit).

    Raises
    ------
    ValueError
        Records with different height units, or a missing field.
    """
    units = {r["height_unit"] for r in records}
    if len(units) > 1:
        raise ValueError(f"reference descriptors mix height units {sorted(units)}")
    f = lambda k: np.array([float(r[k]) for r in records])  # noqa: E731
    feret = np.array([float(r["feret_nm"] if "feret_nm" in r else r["extent_nm"]) for r in records])  # older records
    return Descriptors(f("area_nm2"), feret, f("height"),
                       np.array([int(r["contrast_sign"]) for r in records], np.int8),
                       units.pop() if units else "pm")


def fit_reference_scaler(x: np.ndarray, species_idx: np.ndarray) -> MedianMadScaler:
    """A :class:`MedianMadScaler` fitted on the references, balanced over species, with floors.

    Each species is first reduced to the median of its references, so a species with many
    references does not pull the centre. Centre = median of the species medians; scale =
    ``max(1.4826 MAD of the species medians, MIN_SCALE)`` per feature (``HEIGHT_MIN_REL`` x median
    |height| for the height). With one reference per species this is the spread between species;
    with a single species every reference sits at the centre (descriptor part of the references
    = 0, so the descriptor cosine is 0 and only scales the embedding cosine: the pipeline then
    turns the descriptors off, see :meth:`agent.pipeline.Recognizer.recognise`).

    Parameters
    ----------
    x : np.ndarray
        float ``(R, 4)`` :meth:`Descriptors.matrix` of the references.
    species_idx : np.ndarray
        int ``(R,)`` species of each reference.

    Returns
    -------
    MedianMadScaler
        With ``center_`` and ``scale_`` float64 ``(4,)``.

    Raises
    ------
    ValueError
        Empty matrix or length mismatch.
    """
    a = np.asarray(x, np.float64)
    s = np.asarray(species_idx)
    if a.ndim != 2 or len(a) == 0 or len(s) != len(a):
        raise ValueError(f"need (R, K) descriptors and R species indices, got {a.shape}, {s.shape}")
    med = np.stack([np.median(a[s == k], axis=0) for k in np.unique(s)])  # (K_species, F)
    sc = MedianMadScaler().fit(med)
    floor = np.array([m if m is not None else HEIGHT_MIN_REL * max(float(np.median(np.abs(a[:, 2]))), 1e-12)
                      for m in MIN_SCALE])
    spread = 1.4826 * np.median(np.abs(med - sc.center_), axis=0)
    sc.scale_ = np.maximum(spread, floor)
    return sc


def descriptor_cosine(query_std: np.ndarray, ref_std: np.ndarray) -> np.ndarray:
    """Cosine similarity of standardised descriptors: float32 ``(N, R)`` (0 for a zero vector).

    Equal to the cosine of the descriptor blocks that :func:`combine` appends, so that
    ``(1 - w) cos_e + w * descriptor_cosine`` is the cosine of the combined vectors.
    """
    return l2_normalise(query_std) @ l2_normalise(ref_std).T
