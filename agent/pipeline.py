"""The recognition pipeline of one frame (UniMR, training-free): flatten -> segment -> normalise ->
encode -> match against the cached reference pose embeddings -> :class:`agent.domain.FrameResult`.

Pure computation over numpy arrays; it imports no zmq, watchdog or sqlite.
"""

from __future__ import annotations

import logging
import time
from datetime import datetime, timezone
from typing import Any, Literal

import cv2
import numpy as np

from agent.config import AgentConfig
from agent.domain import OTHER, Detection, FrameResult, Scan
from agent.errors import EmptyScanError, NoObjectError, ReferenceLibraryError
from agent.flatten import flatten
from agent.match import RefEmbeddings, match, species_scores
from agent.normalise import frame_range, normalise_crops
from agent.segment import Region, segment

log = logging.getLogger(__name__)


def detect(scan: Scan, cfg: AgentConfig) -> tuple[np.ndarray, list[Region]]:
    """Flatten the configured channel/direction of ``scan`` and segment it.

    Returns
    -------
    (image, regions) : float32 ``(ny, nx)`` flattened frame (NaN where not acquired), regions.

    Raises
    ------
    EmptyScanError
        The frame holds no acquired pixel.
    KeyError
        The configured channel/direction is absent (message lists what the scan has).
    """
    frame = scan.frame(cfg.channel, cfg.direction)
    if not np.isfinite(frame).any():
        raise EmptyScanError(scan.source, f"channel {cfg.channel} {cfg.direction} has no acquired pixel")
    image = flatten(frame, plane=cfg.flatten.plane, rows=cfg.flatten.rows)
    return image, segment(image, scan.pixel_size_nm, cfg.segment)


def reference_crop_at(
    scan: Scan, x: float, y: float, cfg: AgentConfig, units: Literal["nm", "px"] = "nm"
) -> tuple[np.ndarray, tuple[float, float], dict[str, Any]]:
    """Cut a reference crop of the segmented object at (or nearest to) a picked position.

    Parameters
    ----------
    scan : Scan
    x, y : float
        The picked position: controller coordinates in nm (``units="nm"``, as ``Scan.px_to_nm``)
        or column/row in pixels (``units="px"``).
    cfg : AgentConfig
    units : {"nm", "px"}

    Returns
    -------
    (crop, pixel_size_nm, provenance) : float32 ``(h, w)`` flattened crop centred on the object's
        centroid, side 2 x the object's extent (physical units of the channel); ``(dx, dy)`` nm;
        provenance dict (scan, frame_id, channel, direction, position_nm, position_px, bbox_px,
        area_nm2, extent_nm, pixel_size_nm, grey_range = the frame's 1..99 % value range used by
        ``contrast="frame"``).

    Raises
    ------
    NoObjectError
        No object contains the point and none has its centroid within its own extent (nm) of it.
    """
    image, regions = detect(scan, cfg)
    if units == "nm":
        px, py = (float(v) for v in scan.nm_to_px(x, y))
    elif units == "px":
        px, py = float(x), float(y)
    else:
        raise ValueError(f"units must be 'nm' or 'px', got {units!r}")
    dx, dy = scan.pixel_size_nm
    if not regions:
        raise NoObjectError(f"{scan.source}: no object segmented in the frame (picked {x}, {y} {units})")
    inside = [r for r in regions if r.contains(px, py)]
    if inside:
        reg = inside[0]
    else:
        dist = np.array([np.hypot((r.centroid_px[0] - px) * dx, (r.centroid_px[1] - py) * dy) for r in regions])
        i = int(np.argmin(dist))
        reg = regions[i]
        if dist[i] > reg.extent_nm:
            raise NoObjectError(
                f"{scan.source}: no object at ({x}, {y}) {units}; nearest is {dist[i]:.2f} nm away "
                f"(object size {reg.extent_nm:.2f} nm)"
            )
    side_nm = 2.0 * reg.extent_nm
    finite = np.isfinite(image)
    filled = np.where(finite, image, np.median(image[finite])).astype(np.float32)
    w, h = max(4, int(round(side_nm / dx))), max(4, int(round(side_nm / dy)))
    crop = cv2.getRectSubPix(filled, (w, h), reg.centroid_px)
    cx_nm, cy_nm = scan.px_to_nm(*reg.centroid_px)
    prov = {
        "scan": scan.source,
        "frame_id": scan.frame_id,
        "channel": cfg.channel,
        "direction": cfg.direction,
        "position_nm": [float(cx_nm), float(cy_nm)],
        "position_px": [float(reg.centroid_px[0]), float(reg.centroid_px[1])],
        "bbox_px": list(reg.bbox_px),
        "area_nm2": reg.area_nm2,
        "extent_nm": reg.extent_nm,
        "pixel_size_nm": [dx, dy],
        "touches_edge": reg.touches_edge,
        "grey_range": list(frame_range(image)),
    }
    return crop.astype(np.float32), (dx, dy), prov


class Recognizer:
    """Recognises and counts the species of a reference library in scans.

    Parameters
    ----------
    cfg : AgentConfig
    encoder : models.base.Encoder
    refs : RefEmbeddings
        Pose embeddings of the references (made with ``encoder`` and ``cfg.normalise``).
    """

    def __init__(self, cfg: AgentConfig, encoder, refs: RefEmbeddings):
        self.cfg = cfg
        self.encoder = encoder
        self.refs = refs

    @classmethod
    def from_config(cls, cfg: AgentConfig, *, allow_empty: bool = False) -> "Recognizer":
        """Load the library at ``cfg.references.folder`` and the encoder ``cfg.encoder``.

        With ``allow_empty`` a missing or empty library is not an error: every object is then
        counted as ``other`` (segmentation and counting still work; a warning says how to add
        references).

        Raises
        ------
        ReferenceLibraryError
            Missing or empty library (unless ``allow_empty``).
        ConfigError
            Unknown encoder.
        """
        from adapters.references import ReferenceLibrary
        from models.registry import make_encoder

        encoder = make_encoder(cfg.encoder, cfg.normalise)
        try:
            refs = ReferenceLibrary(cfg.references.folder).pose_embeddings(encoder, cfg.normalise)
        except ReferenceLibraryError as e:
            if not allow_empty:
                raise
            log.warning("%s; every object is counted as %r until you add references with "
                        "`stm-agent refs add`", e, OTHER)
            refs = RefEmbeddings(emb=np.zeros((0, 0), np.float32), species_idx=np.zeros(0, int),
                                 angle_deg=np.zeros(0, np.float32), mirrored=np.zeros(0, bool), species=[])
        return cls(cfg, encoder, refs)

    def detect(self, scan: Scan) -> tuple[np.ndarray, list[Region]]:
        """See :func:`detect`."""
        return detect(scan, self.cfg)

    def reference_crop_at(self, scan: Scan, x: float, y: float, units: Literal["nm", "px"] = "nm"):
        """See :func:`reference_crop_at`."""
        return reference_crop_at(scan, x, y, self.cfg, units)

    def recognise(self, scan: Scan) -> FrameResult:
        """Recognise every object of one frame.

        Returns
        -------
        FrameResult
            ``counts`` for every species + ``other`` (objects touching the edge excluded when
            ``cfg.segment.exclude_edge``), one :class:`Detection` per segmented object (centroid in
            controller nm, area nm^2, species, similarity, pose, per-species scores), ``timings_ms``
            (flatten, segment, normalise, encode, match, total), ``encoder`` {name, id},
            ``scan`` summary and ``image`` (the flattened frame).

        Raises
        ------
        EmptyScanError, KeyError
            As :func:`detect`.
        """
        cfg = self.cfg
        t0 = time.perf_counter()
        frame = scan.frame(cfg.channel, cfg.direction)
        if not np.isfinite(frame).any():
            raise EmptyScanError(scan.source, f"channel {cfg.channel} {cfg.direction} has no acquired pixel")
        image = flatten(frame, plane=cfg.flatten.plane, rows=cfg.flatten.rows)
        t1 = time.perf_counter()
        regions = segment(image, scan.pixel_size_nm, cfg.segment)
        t2 = time.perf_counter()
        centres = np.array([r.centroid_px for r in regions], dtype=np.float64).reshape(-1, 2)
        if self.refs.species:
            grey = normalise_crops(image, centres, self.refs.window_nm, scan.pixel_size_nm, cfg.normalise)
        else:  # no references: nothing to compare with, every object is `other`
            grey = np.zeros((0, cfg.normalise.size_px, cfg.normalise.size_px), np.uint8)
        t3 = time.perf_counter()
        if len(grey):
            emb = self.encoder.embed(grey)
        else:
            emb = np.zeros((len(regions), self.refs.emb.shape[1]), np.float32)
        t4 = time.perf_counter()
        names, sim, pose = match(emb, self.refs, cfg.match.threshold)
        scores, _ = species_scores(emb, self.refs)
        t5 = time.perf_counter()
        xs, ys = scan.px_to_nm(centres[:, 0], centres[:, 1])
        counts = {s: 0 for s in self.refs.species}
        counts[OTHER] = 0
        dets = []
        for i, r in enumerate(regions):
            dets.append(
                Detection(
                    bbox_px=r.bbox_px,
                    centroid_px=r.centroid_px,
                    centroid_nm=(float(xs[i]), float(ys[i])),
                    area_nm2=r.area_nm2,
                    touches_edge=r.touches_edge,
                    species=names[i],
                    similarity=float(sim[i]),
                    pose=pose[i],
                    scores={s: float(scores[i, k]) for k, s in enumerate(self.refs.species)},
                )
            )
            if not (r.touches_edge and cfg.segment.exclude_edge):
                counts[names[i]] += 1
        ms = lambda a, b: (b - a) * 1000.0  # noqa: E731
        return FrameResult(
            frame_id=scan.frame_id,
            source=scan.source,
            scan=scan.summary(),
            counts=counts,
            detections=dets,
            encoder={"name": getattr(self.encoder, "name", type(self.encoder).__name__), "id": self.encoder.id},
            timings_ms={
                "flatten": ms(t0, t1), "segment": ms(t1, t2), "normalise": ms(t2, t3),
                "encode": ms(t3, t4), "match": ms(t4, t5), "total": ms(t0, t5),
            },
            processed_at=datetime.now(timezone.utc),
            image=image,
        )
