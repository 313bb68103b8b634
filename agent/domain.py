"""Domain objects: what flows through the pipeline. Plain data, no I/O.

Orientation convention (used everywhere in stm-agent): arrays are shaped ``(ny, nx)`` and
oriented as the Nanonis viewer shows the scan: row 0 is the TOP of the image, column 0 is the
LEFT; backward (retrace) frames are un-mirrored so that they overlay the forward frame.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

import numpy as np

from stm_agent.agent.errors import MissingChannelError

Direction = Literal["forward", "backward"]
ScanDirection = Literal["up", "down", "unknown"]
OTHER = "other"  # species name of objects that match no reference above the threshold


@dataclass
class Scan:
    """One STM frame in SI units, oriented as the Nanonis viewer shows it.

    Attributes
    ----------
    source : str
        Where it came from (file path, or ``zmq:<topic>``).
    frame_id : str
        sha256 (hex) of the file bytes: the identity of the frame.
    channels : dict[str, dict[str, np.ndarray]]
        ``channels[name][direction]`` with direction ``"forward"`` / ``"backward"``: float32 arrays of
        shape ``(ny, nx)`` in SI units (Z in m, Current in A, Bias in V ...). Rows not acquired are NaN.
    units : dict[str, str]
        Unit of each channel (``"m"``, ``"A"``, ``"V"``, ``"Hz"`` ...).
    range_nm : tuple[float, float]
        Scan range (width x, height y) in nm.
    offset_nm : tuple[float, float]
        Centre of the scan frame in the controller's coordinates, nm.
    angle_deg : float
        Scan angle in degrees (Nanonis ``SCAN_ANGLE``, rotation of the frame, clockwise positive).
    scan_direction : {"up", "down", "unknown"}
        Slow-scan direction: ``up`` = the first line acquired is the bottom line.
    bias_V, setpoint_A : float | None
        Sample bias (V) and current setpoint (A), None where the header lacks them.
    acquired_at : datetime | None
        Start of the acquisition (header REC_DATE + REC_TIME, local time).
    acquisition_time_s : float | None
        Duration of the acquisition (header ACQ_TIME), s.
    comment : str
        Header comment (may span several lines).
    valid_rows : np.ndarray
        bool, shape ``(ny,)``: rows (in display orientation) that were acquired in the main channel.
    header : dict[str, str]
        Raw header entries (key -> text) for provenance.
    """

    source: str
    frame_id: str
    channels: dict[str, dict[str, np.ndarray]]
    units: dict[str, str]
    range_nm: tuple[float, float]
    offset_nm: tuple[float, float] = (0.0, 0.0)
    angle_deg: float = 0.0
    scan_direction: ScanDirection = "unknown"
    bias_V: float | None = None
    setpoint_A: float | None = None
    acquired_at: datetime | None = None
    acquisition_time_s: float | None = None
    comment: str = ""
    valid_rows: np.ndarray | None = None
    header: dict[str, str] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int]:
        """``(ny, nx)``: rows and columns of every frame."""
        first = next(iter(self.channels.values()))
        return next(iter(first.values())).shape  # type: ignore[return-value]

    @property
    def pixels(self) -> tuple[int, int]:
        """``(nx, ny)``: pixels per line and lines, as the header's SCAN_PIXELS."""
        ny, nx = self.shape
        return nx, ny

    @property
    def pixel_size_nm(self) -> tuple[float, float]:
        """``(dx, dy)``: pixel size in nm along x (fast) and y (slow). May differ (non-square pixels)."""
        nx, ny = self.pixels
        return self.range_nm[0] / nx, self.range_nm[1] / ny

    @property
    def completeness(self) -> float:
        """Fraction of lines acquired, 0..1."""
        if self.valid_rows is None:
            return 1.0
        return float(np.count_nonzero(self.valid_rows)) / max(len(self.valid_rows), 1)

    @property
    def acquired_lines(self) -> int:
        """Number of lines acquired."""
        return int(self.shape[0] if self.valid_rows is None else np.count_nonzero(self.valid_rows))

    def frame(self, channel: str = "Z", direction: Direction = "forward") -> np.ndarray:
        """The ``(ny, nx)`` float32 frame of ``channel`` in ``direction`` (SI units, NaN = not acquired).

        Raises
        ------
        MissingChannelError
            (a ScanFormatError and a KeyError) with the list of available channels, if
            ``channel``/``direction`` is absent.
        """
        try:
            return self.channels[channel][direction]
        except KeyError:
            have = {k: sorted(v) for k, v in self.channels.items()}
            raise MissingChannelError(self.source, f"no channel {channel!r} {direction}; the scan has {have}") from None

    def px_to_nm(self, x_px: np.ndarray | float, y_px: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
        """Convert pixel coordinates to the controller's frame in nm (where to send the tip).

        ``x_px``, ``y_px`` are column and row in display orientation (row 0 = top), pixel centres at
        integer positions. The local position relative to the frame centre (x right, y up) is rotated
        by the scan angle (clockwise positive, Nanonis convention) and shifted by the scan offset.

        Returns
        -------
        (x_nm, y_nm) : arrays of float64, same shape as the inputs.
        """
        dx, dy = self.pixel_size_nm
        nx, ny = self.pixels
        u = (np.asarray(x_px, dtype=np.float64) + 0.5) * dx - self.range_nm[0] / 2
        v = self.range_nm[1] / 2 - (np.asarray(y_px, dtype=np.float64) + 0.5) * dy
        t = math.radians(self.angle_deg)
        c, s = math.cos(t), math.sin(t)
        x = self.offset_nm[0] + c * u + s * v
        y = self.offset_nm[1] - s * u + c * v
        return x, y

    def nm_to_px(self, x_nm: np.ndarray | float, y_nm: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
        """Inverse of :meth:`px_to_nm`: controller nm -> (column, row) pixel coordinates (float64)."""
        dx, dy = self.pixel_size_nm
        t = math.radians(self.angle_deg)
        c, s = math.cos(t), math.sin(t)
        a = np.asarray(x_nm, dtype=np.float64) - self.offset_nm[0]
        b = np.asarray(y_nm, dtype=np.float64) - self.offset_nm[1]
        u = c * a - s * b
        v = s * a + c * b
        x_px = (u + self.range_nm[0] / 2) / dx - 0.5
        y_px = (self.range_nm[1] / 2 - v) / dy - 0.5
        return x_px, y_px

    def summary(self) -> dict[str, Any]:
        """JSON-ready scan parameters for results and messages."""
        nx, ny = self.pixels
        return {
            "pixels": [nx, ny],
            "range_nm": list(self.range_nm),
            "pixel_size_nm": list(self.pixel_size_nm),
            "offset_nm": list(self.offset_nm),
            "angle_deg": self.angle_deg,
            "direction": self.scan_direction,
            "bias_V": self.bias_V,
            "setpoint_A": self.setpoint_A,
            "acquired_at": self.acquired_at.isoformat() if self.acquired_at else None,
            "completeness": round(self.completeness, 4),
            "channels": sorted(self.channels),
        }


@dataclass
class Detection:
    """One segmented object and what it was recognised as.

    Attributes
    ----------
    bbox_px : tuple[int, int, int, int]
        ``(x, y, w, h)`` in pixels, display orientation (x = column, y = row from the top).
    centroid_px : tuple[float, float]
        ``(x, y)`` area centroid of the segmented region, pixels (display orientation).
    centroid_nm : tuple[float, float]
        Centroid in the controller's frame, nm (offset and scan angle applied; see ``Scan.px_to_nm``).
    area_nm2 : float
        Area of the segmented region, nm^2.
    touches_edge : bool
        The object is cut by the image edge (it is reported but not counted).
    species : str
        Best-matching species, or ``"other"``.
    similarity : float
        Cosine similarity to the best reference pose (-1..1).
    pose : tuple[float, bool]
        ``(angle_deg, mirrored)`` of the best-matching reference pose.
    scores : dict[str, float]
        Best similarity per species.
    """

    bbox_px: tuple[int, int, int, int]
    centroid_px: tuple[float, float]
    centroid_nm: tuple[float, float]
    area_nm2: float
    touches_edge: bool = False
    species: str = OTHER
    similarity: float = 0.0
    pose: tuple[float, bool] = (0.0, False)
    scores: dict[str, float] = field(default_factory=dict)
    features: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict (floats rounded to sensible precision)."""
        return {
            "bbox_px": [int(v) for v in self.bbox_px],
            "centroid_px": [round(float(v), 2) for v in self.centroid_px],
            "centroid_nm": [round(float(v), 4) for v in self.centroid_nm],
            "area_nm2": round(float(self.area_nm2), 5),
            "touches_edge": bool(self.touches_edge),
            "species": self.species,
            "similarity": round(float(self.similarity), 4),
            "pose": {"angle_deg": float(self.pose[0]), "mirrored": bool(self.pose[1])},
            "scores": {k: round(float(v), 4) for k, v in self.scores.items()},
        }


@dataclass
class FrameResult:
    """What the agent found in one frame.

    ``counts`` holds every reference species plus ``"other"``; objects touching the edge are
    listed in ``detections`` but not counted. ``scan["channel"]`` is the channel analysed;
    ``detection`` says how the objects were found (see the attribute comment). ``status`` is ``"ok"`` or ``"error"`` (then
    ``reason`` says why, and ``counts``/``detections`` are empty).
    """

    frame_id: str
    source: str
    status: Literal["ok", "error"] = "ok"
    reason: str | None = None
    scan: dict[str, Any] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    detections: list[Detection] = field(default_factory=list)
    encoder: dict[str, Any] = field(default_factory=dict)
    timings_ms: dict[str, float] = field(default_factory=dict)
    processed_at: datetime | None = None
    # How the objects were found: detector (method, requested, reason), object size and its source,
    # note (nothing found / one giant region, and why), channel choice {channel, reason, structure}.
    detection: dict[str, Any] = field(default_factory=dict)
    # Flattened (ny, nx) float32 image the detections refer to, for overlays; never serialised.
    image: np.ndarray | None = field(default=None, repr=False, compare=False)

    @property
    def encoder_label(self) -> str:
        """Encoder name for people: ``pixel``, or ``auto -> zernike`` when UniMR selection chose."""
        name = str(self.encoder.get("name", "?"))
        chosen = self.encoder.get("chosen")
        return f"{name} -> {chosen}" if chosen and chosen != name else name

    @property
    def channel(self) -> str | None:
        """The channel analysed (``scan["channel"]``), None when unknown (error results)."""
        return self.scan.get("channel") if self.scan else None

    @property
    def n_objects(self) -> int:
        """Number of counted objects (not touching the edge)."""
        return int(sum(self.counts.values()))

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict of the whole result."""
        return {
            "frame_id": self.frame_id,
            "source": self.source,
            "status": self.status,
            "reason": self.reason,
            "scan": self.scan,
            "counts": dict(self.counts),
            "n_objects": self.n_objects,
            "detections": [d.to_json() for d in self.detections],
            "encoder": self.encoder,
            "timings_ms": {k: round(float(v), 3) for k, v in self.timings_ms.items()},
            "processed_at": self.processed_at.isoformat() if self.processed_at else None,
            "detection": self.detection,
        }
