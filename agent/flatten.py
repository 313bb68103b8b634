"""Background removal of one STM frame: least-squares plane, then per-line offsets.

The two standard levelling steps of SPM software (Gwyddion "plane level" + "align rows";
TopoStats ``Filters``): a plane ``z = a + b*x + c*y`` fitted by linear least squares removes the
sample tilt, and subtracting each scan line's median (or mean) removes the line-to-line offsets
caused by tip changes, drift and piezo creep. The median is robust to objects on the line.

Rows that were not acquired (all NaN, incomplete scan) stay NaN: nothing is invented for them.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

RowMode = Literal["none", "median", "mean"]


def plane_fit(frame: np.ndarray) -> np.ndarray:
    """Least-squares plane of the finite pixels of ``frame``.

    Parameters
    ----------
    frame : np.ndarray
        ``(ny, nx)`` float array (any unit, e.g. m); NaN pixels are ignored in the fit.

    Returns
    -------
    np.ndarray
        ``(ny, nx)`` float64 plane ``a + b*x + c*y`` (x = column, y = row index) evaluated on the
        full grid (also under the NaN pixels). Zeros if fewer than 3 finite pixels.
    """
    ny, nx = frame.shape
    ok = np.isfinite(frame)
    if np.count_nonzero(ok) < 3:
        return np.zeros((ny, nx), dtype=np.float64)
    yy, xx = np.nonzero(ok)
    z = frame[ok].astype(np.float64)
    # centre coordinates for conditioning
    xc, yc = (nx - 1) / 2.0, (ny - 1) / 2.0
    A = np.column_stack([np.ones_like(z), xx - xc, yy - yc])
    coef, *_ = np.linalg.lstsq(A, z, rcond=None)
    gy, gx = np.mgrid[0:ny, 0:nx]
    return coef[0] + coef[1] * (gx - xc) + coef[2] * (gy - yc)


def flatten(frame: np.ndarray, plane: bool = True, rows: RowMode = "median") -> np.ndarray:
    """Level a frame: subtract a least-squares plane, then align the scan lines.

    Parameters
    ----------
    frame : np.ndarray
        ``(ny, nx)`` float array in SI units (Z in m, Current in A ...). NaN = not acquired.
    plane : bool
        Subtract the least-squares plane of the finite pixels (sample tilt).
    rows : {"none", "median", "mean"}
        Per-line offset correction: subtract each row's median (robust to objects) or mean of its
        finite pixels.

    Returns
    -------
    np.ndarray
        ``(ny, nx)`` float32, same units as the input, relative heights. Pixels that are NaN in the
        input stay NaN; no other pixel becomes NaN.

    Raises
    ------
    ValueError
        ``frame`` is not 2-D, or ``rows`` is not one of the allowed modes.
    """
    a = np.asarray(frame, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"flatten expects a 2-D frame (ny, nx), got shape {a.shape}")
    if rows not in ("none", "median", "mean"):
        raise ValueError(f"rows must be 'none', 'median' or 'mean', got {rows!r}")
    out = a.copy()
    if plane:
        out = out - plane_fit(out)
    if rows != "none":
        finite_rows = np.isfinite(out).any(axis=1)
        off = np.zeros(out.shape[0], dtype=np.float64)
        if finite_rows.any():
            sub = out[finite_rows]
            off[finite_rows] = np.nanmedian(sub, axis=1) if rows == "median" else np.nanmean(sub, axis=1)
        out = out - off[:, None]
    if np.isfinite(out).any():
        out = out - np.nanmedian(out)
    return out.astype(np.float32)
