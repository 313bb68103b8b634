"""Read rendered STM images (PNG/JPG/TIFF/BMP) as a one-channel :class:`agent.domain.Scan`.

Rendered images carry no scan metadata, so the caller supplies the pixel size in nm. Grey images
(8/16-bit integer or float TIFF) are used as they are; colour-mapped RGB(A) images are reduced to
luminance with the ITU-R BT.601 weights ``Y = 0.299 R + 0.587 G + 0.114 B`` (OpenCV
``cvtColor(..., COLOR_BGR2GRAY)``; alpha is dropped). Integer images are scaled to 0..1 by the
largest value of their dtype (255 or 65535) so 8- and 16-bit renders of the same scan compare.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import cv2
import numpy as np

from stm_agent.adapters.files import Roots, read_regular
from stm_agent.agent.domain import Scan
from stm_agent.agent.errors import ImageFormatError, RefusedPathError

__all__ = ["read_image", "IMAGE_SUFFIXES"]

#: Suffixes (lower case) read by :func:`read_image`.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
#: Largest image file accepted, bytes (a render of a scan is a few MB).
MAX_IMAGE_BYTES = 256 << 20


def _pixel_size(pixel_size_nm: float | tuple[float, float], source: str) -> tuple[float, float]:
    try:
        if isinstance(pixel_size_nm, (int, float, np.floating, np.integer)):
            dx = dy = float(pixel_size_nm)
        else:
            dx, dy = (float(v) for v in pixel_size_nm)
    except (TypeError, ValueError):
        raise ImageFormatError(source, f"pixel size must be a number or (dx, dy) in nm, got {pixel_size_nm!r}") from None
    if not (math.isfinite(dx) and math.isfinite(dy) and dx > 0 and dy > 0):
        raise ImageFormatError(source, f"pixel size must be positive and finite (nm), got {(dx, dy)}")
    return dx, dy


def _luminance(img: np.ndarray, source: str) -> np.ndarray:
    """``(ny, nx)`` float32 luminance of a decoded OpenCV image (BGR channel order)."""
    if img.dtype == np.uint8 or img.dtype == np.uint16:
        scale = 1.0 / float(np.iinfo(img.dtype).max)
    elif img.dtype in (np.float32, np.float64):
        scale = 1.0
    else:
        raise ImageFormatError(source, f"unsupported pixel type {img.dtype} (expected 8/16-bit integer or float)")
    f = img.astype(np.float32) * np.float32(scale)
    if f.ndim == 2:
        return f
    if f.ndim != 3:
        raise ImageFormatError(source, f"unsupported image shape {img.shape}")
    c = f.shape[2]
    if c == 1 or c == 2:  # grey (+ alpha)
        return np.ascontiguousarray(f[:, :, 0])
    if c == 3:
        return cv2.cvtColor(f, cv2.COLOR_BGR2GRAY)
    if c == 4:
        return cv2.cvtColor(f, cv2.COLOR_BGRA2GRAY)
    raise ImageFormatError(source, f"unsupported number of colour channels: {c}")


def read_image(path: str | Path, pixel_size_nm: float | tuple[float, float], *, channel: str = "Z",
               roots: Roots | None = None) -> Scan:
    """Read a PNG/JPG/TIFF/BMP render of a scan as a :class:`Scan` with one forward frame.

    Parameters
    ----------
    path : str | Path
        Image file. The first page of a multi-page TIFF is used.
    pixel_size_nm : float | (float, float)
        Pixel size in nm, square or ``(dx, dy)``.
    channel : str
        Name given to the single channel (default ``"Z"``).
    roots : Roots, optional
        Folders the file must resolve into (:func:`adapters.files.read_regular`: regular files
        only, at most :data:`MAX_IMAGE_BYTES`).

    Returns
    -------
    Scan
        ``channels[channel]["forward"]``: ``(ny, nx)`` float32 luminance (0..1 for integer images),
        units ``"a.u."``; ``range_nm = (nx * dx, ny * dy)``; ``scan_direction = "unknown"``;
        ``frame_id`` = sha256 hex of the file bytes; ``valid_rows`` all True where a row has a
        finite value.

    Raises
    ------
    ImageFormatError
        The file cannot be read or decoded, has an unsupported pixel type, or the pixel size is
        not positive and finite (the message names the file and the reason).
    """
    path = Path(path)
    source = str(path)
    dx, dy = _pixel_size(pixel_size_nm, source)
    try:
        data, _ = read_regular(path, roots, MAX_IMAGE_BYTES)
    except RefusedPathError as exc:
        raise ImageFormatError(source, exc.reason) from exc
    except OSError as exc:
        raise ImageFormatError(source, f"cannot read the file ({exc.strerror or exc})") from exc
    if not data:
        raise ImageFormatError(source, "empty file")
    try:
        img = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    except cv2.error as exc:
        raise ImageFormatError(source, f"cannot decode the image ({exc.err or exc})") from exc
    if img is None or img.size == 0:
        raise ImageFormatError(source, "not a readable PNG/JPG/TIFF/BMP image (OpenCV could not decode it)")
    frame = _luminance(img, source)
    ny, nx = frame.shape
    valid = np.isfinite(frame).any(axis=1)
    return Scan(
        source=source,
        frame_id=hashlib.sha256(data).hexdigest(),
        channels={channel: {"forward": frame}},
        units={channel: "a.u."},
        range_nm=(nx * dx, ny * dy),
        scan_direction="unknown",
        valid_rows=valid,
        header={"format": path.suffix.lower().lstrip("."), "dtype": str(img.dtype), "colour_channels": str(1 if img.ndim == 2 else img.shape[2])},
    )
