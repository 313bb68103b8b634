"""Read any supported scan file: dispatch on the file suffix."""

from __future__ import annotations

from pathlib import Path

from stm_agent.adapters.files import Roots
from stm_agent.adapters.images import IMAGE_SUFFIXES, read_image
from stm_agent.adapters.sxm import read_sxm
from stm_agent.agent.domain import Scan
from stm_agent.agent.errors import ImageFormatError, ScanFormatError

__all__ = ["read_scan", "SUPPORTED_SUFFIXES"]

SUPPORTED_SUFFIXES = (".sxm",) + IMAGE_SUFFIXES


def read_scan(path: str | Path, pixel_size_nm: float | tuple[float, float] | None = None, *,
              roots: Roots | None = None, frame_id: str | None = None, data: bytes | None = None) -> Scan:
    """Read a scan file: ``.sxm`` with :func:`adapters.sxm.read_sxm`, images with :func:`adapters.images.read_image`.

    Parameters
    ----------
    path : str | Path
        The file; the suffix (case-insensitive) picks the reader.
    pixel_size_nm : float | (float, float) | None
        Pixel size in nm, required for images (they carry no scan metadata), ignored for .sxm.
    roots : Roots, optional
        Folders the file must resolve into (symlinks leading out, FIFOs and devices are refused).
    frame_id, data : optional
        The .sxm bytes and their sha256 when the caller already read them through
        :func:`adapters.files.read_regular` (the file is then not read or hashed again).

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
        if data is not None:
            return read_sxm(data, name=str(path), frame_id=frame_id)
        return read_sxm(path, roots=roots)
    if suffix in IMAGE_SUFFIXES:
        if pixel_size_nm is None:
            raise ImageFormatError(path, "an image carries no scan size: give pixel_size_nm (nm per pixel)")
        return read_image(path, pixel_size_nm, roots=roots)
    raise ScanFormatError(path, f"unsupported file type {suffix or '(no suffix)'!r}; supported: {', '.join(SUPPORTED_SUFFIXES)}")
