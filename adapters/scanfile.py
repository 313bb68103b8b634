"""Read any supported scan file: dispatch on the file suffix."""

from __future__ import annotations

from pathlib import Path

from stm_agent.adapters.images import IMAGE_SUFFIXES, read_image
from stm_agent.adapters.sxm import read_sxm
from stm_agent.agent.domain import Scan
from stm_agent.agent.errors import ImageFormatError, ScanFormatError

__all__ = ["read_scan", "SUPPORTED_SUFFIXES"]

SUPPORTED_SUFFIXES = (".sxm",) + IMAGE_SUFFIXES


def read_scan(path: str | Path, pixel_size_nm: float | tuple[float, float] | None = None) -> Scan:
    """Read a scan file: ``.sxm`` with :func:`adapters.sxm.read_sxm`, images with :func:`adapters.images.read_image`.

    Parameters
    ----------
    path : str | Path
        The file; the suffix (case-insensitive) picks the reader.
    pixel_size_nm : float | (float, float) | None
        Pixel size in nm, required for images (they carry no scan metadata), ignored for .sxm.

    Raises
    ------
    ScanFormatError
        Unknown suffix, or the .sxm reader's errors.
    ImageFormatError
        An image without ``pixel_size_nm``, or the image reader's errors.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".sxm":
        return read_sxm(path)
    if suffix in IMAGE_SUFFIXES:
        if pixel_size_nm is None:
            raise ImageFormatError(path, "an image carries no scan size: give pixel_size_nm (nm per pixel)")
        return read_image(path, pixel_size_nm)
    raise ScanFormatError(path, f"unsupported file type {suffix or '(no suffix)'!r}; supported: {', '.join(SUPPORTED_SUFFIXES)}")
