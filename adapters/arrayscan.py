"""The controller feed's wire format: ``scan.sxm`` / ``scan.array`` / ``scan.saved`` messages.

A message is multipart ``[topic, header, payload]``: ``topic`` UTF-8 text, ``header`` a UTF-8 JSON
object, ``payload`` raw bytes (absent or empty for ``scan.saved``). See docs/sources.md.

* :func:`validate_array_header` checks a ``scan.array`` header (and the payload length). It is the
  ONE check used both by :class:`adapters.controller.ControllerSource` (on receipt, to reject
  malformed messages) and by :func:`scan_from_array` (when the agent builds the Scan), so the two
  cannot disagree.
* :func:`scan_from_array` turns a ``scan.array`` header + payload into a :class:`agent.domain.Scan`.
* :func:`encode_array_message`, :func:`encode_sxm_message`, :func:`encode_saved_message` build the
  messages (used by :class:`adapters.replay.ReplayFeed` and by tests; a controller written in
  another language follows docs/sources.md). :func:`array_meta_from_scan` makes a header from a Scan.

Orientation: the controller sends a ``scan.array`` frame in DISPLAY orientation, row 0 = the TOP
line of the image as the Nanonis scan window shows it, column 0 = left, backward frames already
un-mirrored (the convention of :mod:`agent.domain`). The agent does not flip anything.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StrictStr, ValidationError

from stm_agent.adapters.sxm import MAX_SIDE_PX
from stm_agent.adapters.zmq_io import encode
from stm_agent.agent.domain import Scan
from stm_agent.agent.errors import EmptyScanError, ScanFormatError

__all__ = [
    "TOPICS",
    "ArrayHeader",
    "ArrayHeaderError",
    "validate_array_header",
    "scan_from_array",
    "array_meta_from_scan",
    "encode_array_message",
    "encode_sxm_message",
    "encode_saved_message",
]

#: The topics of the controller feed.
TOPICS = ("scan.sxm", "scan.array", "scan.saved")

_REL_TOL = 1e-6  # pixel_size_nm and range_nm given together must agree this closely


class ArrayHeaderError(ScanFormatError):
    """A ``scan.array`` header field is missing or invalid, or the payload does not fit it.

    Attributes
    ----------
    field : str
        The offending header field (``"shape"``, ``"dtype"`` ...), or ``"payload"`` when the payload
        length does not match ``shape`` x ``dtype``.
    """

    def __init__(self, source: str | Path, field: str, reason: str):
        self.field = field
        super().__init__(source, reason)


@dataclass(frozen=True)
class ArrayHeader:
    """A validated ``scan.array`` header.

    Attributes
    ----------
    shape : (ny, nx)
        Lines and pixels per line.
    dtype : np.dtype
        Numeric dtype of the payload (byte order as sent).
    channel, direction, unit : str
        Channel name, ``"forward"``/``"backward"``, unit of the values (SI, e.g. ``"m"``).
    pixel_size_nm : (dx, dy)
        Pixel size in nm along x (fast axis) and y (slow axis).
    range_nm : (width, height)
        Scan range in nm (= pixel size x (nx, ny)).
    offset_nm : (x, y)
        Centre of the frame in the controller's coordinates, nm.
    angle_deg : float
        Scan angle, degrees, clockwise positive.
    scan_direction : {"up", "down", "unknown"}
    bias_V, setpoint_A : float | None
    acquired_at : datetime | None
    acquisition_time_s : float | None
    name, comment : str
    """

    shape: tuple[int, int]
    dtype: np.dtype
    channel: str
    direction: str
    unit: str
    pixel_size_nm: tuple[float, float]
    range_nm: tuple[float, float]
    offset_nm: tuple[float, float]
    angle_deg: float
    scan_direction: str
    bias_V: float | None
    setpoint_A: float | None
    acquired_at: datetime | None
    acquisition_time_s: float | None
    name: str
    comment: str

    @property
    def nbytes(self) -> int:
        """Payload length the header announces: ny * nx * itemsize."""
        return self.shape[0] * self.shape[1] * self.dtype.itemsize


_Finite = Annotated[float, Field(strict=True, allow_inf_nan=False)]
_Positive = Annotated[float, Field(strict=True, allow_inf_nan=False, gt=0)]
_Side = Annotated[int, Field(strict=True, gt=0, le=MAX_SIDE_PX)]


class _HeaderFields(BaseModel):
    """The fields of a ``scan.array`` header, typed (pydantic, strict: no "1" for 1, no True for 1,
    no NaN). ``None`` means absent. Cross-field rules (pixel size vs range) are checked after."""

    model_config = ConfigDict(extra="ignore")

    shape: tuple[_Side, _Side]
    dtype: StrictStr
    channel: Annotated[StrictStr, Field(min_length=1)] | None = None
    direction: Literal["forward", "backward"] | None = None
    unit: StrictStr | None = None
    pixel_size_nm: tuple[_Positive, _Positive] | _Positive | None = None
    range_nm: tuple[_Positive, _Positive] | None = None
    offset_nm: tuple[_Finite, _Finite] | None = None
    angle_deg: _Finite | None = None
    scan_direction: Literal["up", "down", "unknown"] | None = None
    bias_V: _Finite | None = None
    setpoint_A: _Finite | None = None
    acquired_at: StrictStr | None = None
    acquisition_time_s: _Finite | None = None
    name: StrictStr | None = None
    comment: StrictStr | None = None


_EXPECTED = {
    "shape": f"[ny, nx], two integers in 1..{MAX_SIDE_PX}",
    "pixel_size_nm": "a number > 0 or a list of two numbers > 0 (nm)",
    "range_nm": "a list of two numbers > 0 (nm)",
    "offset_nm": "a list of two finite numbers (nm)",
    "direction": "'forward' or 'backward'",
    "scan_direction": "up, down or unknown",
    "channel": "non-empty text",
    **{k: "a finite number" for k in ("angle_deg", "bias_V", "setpoint_A", "acquisition_time_s")},
    "dtype": "a numpy dtype string such as '<f4'",
    **{k: "text" for k in ("unit", "acquired_at", "name", "comment")},
}


def validate_array_header(meta: Any, payload_size: int | None = None, *, source: str = "scan.array") -> ArrayHeader:
    """Check a ``scan.array`` header (and the payload length) and return its parsed values.

    The field types are one pydantic model (strict: numbers must be JSON numbers, finite); the
    rules between fields (pixel size or range, and they agree) and the payload length follow.

    Parameters
    ----------
    meta : dict
        The JSON header: ``shape`` [ny, nx] (ints > 0, at most 65536 each), ``dtype`` (numpy dtype
        string, integer or float, e.g. ``"<f4"``, ``">f8"``, ``"<i2"``), ``pixel_size_nm`` (number or
        [dx, dy], nm) and/or ``range_nm`` [w, h] (nm; if both are given they must agree); optional
        ``channel`` (default ``"Z"``), ``direction`` (``"forward"``/``"backward"``, default forward),
        ``unit`` (default ``"m"``), ``bias_V`` (V), ``setpoint_A`` (A), ``angle_deg`` (degrees),
        ``offset_nm`` [x, y] (nm), ``scan_direction`` (up/down/unknown), ``acquired_at`` (ISO 8601),
        ``acquisition_time_s`` (s), ``name``, ``comment``. Unknown fields are ignored.
    payload_size : int, optional
        Length of the payload in bytes; must equal ny * nx * itemsize when given.
    source : str
        Name of the input, used in error messages.

    Returns
    -------
    ArrayHeader

    Raises
    ------
    ArrayHeaderError
        (a :class:`ScanFormatError`) naming ``source`` and the field: missing or invalid field, or
        payload length not matching (``field == "payload"``).
    """
    if not isinstance(meta, dict):
        raise ArrayHeaderError(source, "header", f"header must be a JSON object, got {type(meta).__name__}")
    try:
        f = _HeaderFields.model_validate(meta)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = str(err["loc"][0])
        if err["type"] == "missing" and len(err["loc"]) == 1:
            raise ArrayHeaderError(source, key, f"header field {key!r} is missing") from None
        raise ArrayHeaderError(source, key, f"header field {key!r} must be {_EXPECTED[key]}, got {meta.get(key)!r}") from None
    ny, nx = f.shape
    try:
        dtype = np.dtype(f.dtype)
    except (TypeError, ValueError):
        raise ArrayHeaderError(source, "dtype", f"header field 'dtype' is not a numpy dtype string: {f.dtype!r}") from None
    if dtype.kind not in "iuf" or dtype.itemsize > 8 or dtype.fields is not None or dtype.subdtype is not None:
        raise ArrayHeaderError(source, "dtype", f"header field 'dtype' must be an integer or float type, got {f.dtype!r}")

    px = (f.pixel_size_nm, f.pixel_size_nm) if isinstance(f.pixel_size_nm, float) else f.pixel_size_nm
    rng = f.range_nm
    if px is None and rng is None:
        raise ArrayHeaderError(source, "pixel_size_nm", "header needs 'pixel_size_nm' (nm per pixel) or 'range_nm' [w, h] (nm)")
    if px is not None:
        from_px = (px[0] * nx, px[1] * ny)
        if rng is not None and not all(math.isclose(a, b, rel_tol=_REL_TOL) for a, b in zip(from_px, rng)):
            raise ArrayHeaderError(source, "range_nm", f"header fields 'range_nm' {list(rng)} and 'pixel_size_nm' "
                                   f"{list(px)} x shape {[ny, nx]} = {list(from_px)} disagree")
        rng = from_px
    assert rng is not None
    acquired_at = None
    if f.acquired_at is not None:
        try:
            acquired_at = datetime.fromisoformat(f.acquired_at)
        except ValueError:
            raise ArrayHeaderError(source, "acquired_at",
                                   f"header field 'acquired_at' is not an ISO 8601 time: {f.acquired_at!r}") from None

    header = ArrayHeader(
        shape=(ny, nx),
        dtype=dtype,
        channel=f.channel or "Z",
        direction=f.direction or "forward",
        unit=f.unit if f.unit is not None else "m",
        pixel_size_nm=(rng[0] / nx, rng[1] / ny),
        range_nm=(float(rng[0]), float(rng[1])),
        offset_nm=f.offset_nm or (0.0, 0.0),
        angle_deg=f.angle_deg or 0.0,
        scan_direction=f.scan_direction or "unknown",
        bias_V=f.bias_V,
        setpoint_A=f.setpoint_A,
        acquired_at=acquired_at,
        acquisition_time_s=f.acquisition_time_s,
        name=f.name or "",
        comment=f.comment or "",
    )
    if payload_size is not None and payload_size != header.nbytes:
        raise ArrayHeaderError(
            source, "payload",
            f"payload has {payload_size} bytes, the header announces {header.nbytes} "
            f"({ny} x {nx} x {dtype.itemsize} bytes of {dtype.str})",
        )
    return header


def scan_from_array(meta: dict, payload: bytes, *, source: str, frame_id: str) -> Scan:
    """Build a :class:`Scan` from a ``scan.array`` header and its payload.

    Parameters
    ----------
    meta : dict
        The JSON header (see :func:`validate_array_header`).
    payload : bytes
        ``ny * nx`` values of ``dtype``, C order, DISPLAY orientation (row 0 = top line, backward
        frames un-mirrored). NaN marks lines not acquired.
    source : str
        Name of the input for errors and ``Scan.source`` (e.g. ``"controller:<name>"``).
    frame_id : str
        sha256 (hex) of the payload.

    Returns
    -------
    Scan
        One frame ``channels = {channel: {direction: float32 (ny, nx)}}`` (native byte order, one
        copy; integer payloads are converted to float32 unscaled), ``units = {channel: unit}``,
        ``range_nm`` = pixel size x (nx, ny), offset, angle, bias_V, setpoint_A, scan_direction,
        acquired_at, ``valid_rows`` = bool (ny,) rows with any finite value.

    Raises
    ------
    ArrayHeaderError
        (ScanFormatError) bad header field or payload length, naming ``source`` and the field.
    EmptyScanError
        Every row is NaN (no acquired line), as :func:`adapters.sxm.read_sxm` does.
    """
    h = validate_array_header(meta, len(payload), source=source)
    frame = np.frombuffer(payload, dtype=h.dtype).reshape(h.shape).astype(np.float32)  # copy, native order
    valid = np.isfinite(frame).any(axis=1)
    if not valid.any():
        raise EmptyScanError(source, "no acquired lines (every row of the array is NaN)")
    return Scan(
        source=source,
        frame_id=frame_id,
        channels={h.channel: {h.direction: frame}},
        units={h.channel: h.unit},
        range_nm=h.range_nm,
        offset_nm=h.offset_nm,
        angle_deg=h.angle_deg,
        scan_direction=h.scan_direction,  # type: ignore[arg-type]
        bias_V=h.bias_V,
        setpoint_A=h.setpoint_A,
        acquired_at=h.acquired_at,
        acquisition_time_s=h.acquisition_time_s,
        comment=h.comment,
        valid_rows=valid,
        header={str(k): v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()},
    )


# ----------------------------------------------------------------------------------- encoders
def array_meta_from_scan(scan: Scan, channel: str = "Z", direction: str = "forward") -> dict[str, Any]:
    """A ``scan.array`` header (without shape/dtype) describing ``scan``'s frame ``channel``/``direction``.

    Raises
    ------
    KeyError
        The scan has no such channel/direction (message lists what it has).
    """
    scan.frame(channel, direction)  # KeyError naming what exists
    meta: dict[str, Any] = {
        "channel": channel,
        "direction": direction,
        "unit": scan.units.get(channel, ""),
        "pixel_size_nm": list(scan.pixel_size_nm),
        "offset_nm": list(scan.offset_nm),
        "angle_deg": scan.angle_deg,
        "scan_direction": scan.scan_direction,
        "bias_V": scan.bias_V,
        "setpoint_A": scan.setpoint_A,
        "name": Path(scan.source).name,
    }
    if scan.acquired_at is not None:
        meta["acquired_at"] = scan.acquired_at.isoformat()
    if scan.acquisition_time_s is not None:
        meta["acquisition_time_s"] = scan.acquisition_time_s
    return {k: v for k, v in meta.items() if v is not None}


def encode_array_message(arr: np.ndarray, meta: dict[str, Any]) -> list[bytes]:
    """Encode a frame as a ``scan.array`` message ``[b"scan.array", header, payload]``.

    Parameters
    ----------
    arr : np.ndarray
        2-D ``(ny, nx)`` integer or float array in display orientation (row 0 = top). Sent as is
        (its dtype and byte order; C order).
    meta : dict
        Header fields (pixel_size_nm or range_nm, channel, bias_V ...); ``shape`` and ``dtype`` are
        set from ``arr``. NaN/inf numbers in ``meta`` are sent as null.

    Returns
    -------
    list of bytes
        The multipart frames; frame_id = sha256 of the last one.

    Raises
    ------
    ArrayHeaderError
        The array is not 2-D numeric or the header is invalid (the same check the receiver makes).
    """
    arr = np.asarray(arr)
    if arr.ndim != 2:
        raise ArrayHeaderError("encode_array_message", "shape", f"the array must be 2-D (ny, nx), got shape {arr.shape}")
    header = {**meta, "shape": [int(arr.shape[0]), int(arr.shape[1])], "dtype": arr.dtype.str}
    topic, body = encode("scan.array", header)
    payload = np.ascontiguousarray(arr).tobytes()
    validate_array_header(json.loads(body), len(payload), source=str(meta.get("name") or "encode_array_message"))
    return [topic, body, payload]


def encode_sxm_message(data: bytes, name: str) -> list[bytes]:
    """Encode raw .sxm file bytes as ``[b"scan.sxm", {"name": name}, data]`` (frame_id = sha256(data))."""
    topic, body = encode("scan.sxm", {"name": str(name)})
    return [topic, body, bytes(data)]


def encode_saved_message(path: str | Path) -> list[bytes]:
    """Encode ``[b"scan.saved", {"path": path, "name": file name}]``: the controller saved a file.

    The path must be valid on the agent's computer (absolute paths are best).
    """
    p = str(path)
    topic, body = encode("scan.saved", {"path": p, "name": Path(p).name})
    return [topic, body]
