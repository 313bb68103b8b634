"""The recognition pipeline of one frame (UniMR, training-free): flatten -> segment -> normalise ->
encode -> match against the cached reference pose embeddings -> :class:`agent.domain.FrameResult`.

Pure computation over numpy arrays; it imports no zmq, watchdog or sqlite.
"""

from __future__ import annotations

import logging
import time
from datetime import datetime, timezone
from typing import Any, Literal

from dataclasses import dataclass

import cv2
import numpy as np

from stm_agent.agent.channel import choose_channel, signal_up
from stm_agent.agent.config import AgentConfig
from stm_agent.agent.detect import DetectionReport, detect_objects
from stm_agent.agent.descriptors import descriptor_record, describe_regions, z_unit_of
from stm_agent.agent.domain import OTHER, Detection, FrameResult, Scan
from stm_agent.agent.errors import EmptyScanError, NoObjectError, ReferenceLibraryError
from stm_agent.agent.flatten import blank_constant_lines, fill_nan, flatten
from stm_agent.agent.match import RefEmbeddings, assign, size_gate, species_scores
from stm_agent.agent.normalise import check_window_px, frame_range, normalise_crops
from stm_agent.agent.references import object_extent_nm, window_nm
from stm_agent.agent.segment import Region
from stm_agent.agent.templates import Template
from stm_agent.agent.threshold import ThresholdChoice, auto_threshold, null_scores

log = logging.getLogger(__name__)


@dataclass
class FrameDetection:
    """What detection made of one frame (:func:`detect_frame`).

    Attributes
    ----------
    image : float32 ``(ny, nx)`` flattened frame of ``channel`` (NaN where not acquired).
    regions : the detected objects.
    channel : the channel analysed; ``channel_info`` how it was chosen (:func:`agent.channel.choose_channel`).
    report : :class:`agent.detect.DetectionReport` (detector, object size and its source, note).
    residual : float64 ``(ny, nx)`` lattice-free frame when the lattice route found the objects
        (:mod:`agent.lattice`), else None.
    """

    image: np.ndarray
    regions: list[Region]
    channel: str
    channel_info: dict[str, Any]
    report: DetectionReport
    residual: np.ndarray | None = None


def flattened_channel(scan: Scan, cfg: AgentConfig, library_channel: str | None = None) -> tuple[str, dict, np.ndarray]:
    """Choose the channel of ``scan`` (:func:`agent.channel.choose_channel`), turn it signal-up and
    flatten it: the first step of :func:`detect_frame` and :meth:`Recognizer.recognise`.

    Returns
    -------
    (channel, channel_info, image) : the channel analysed, how it was chosen (a ``warning`` in it is
    logged here), and the flattened float32 ``(ny, nx)`` frame (NaN where not acquired).

    Raises
    ------
    EmptyScanError
        The frame holds no acquired pixel.
    ChannelError
        The channel is absent (message lists what the scan has).
    """
    channel, cinfo = choose_channel(scan, cfg.channel, cfg.channel_candidates, library_channel, cfg.direction)
    if cinfo.get("warning"):
        log.warning("%s: %s", scan.source, cinfo["warning"])
    frame = signal_up(scan.frame(channel, cfg.direction), scan.units.get(channel))
    if not np.isfinite(frame).any():
        raise EmptyScanError(scan.source, f"channel {channel} {cfg.direction} has no acquired pixel")
    frame = blank_constant_lines(frame)  # padded, never scanned lines are not data
    return channel, cinfo, flatten(frame, plane=cfg.flatten.plane, rows=cfg.flatten.rows)


def detect_frame(scan: Scan, cfg: AgentConfig, reference_extents_nm: list[float] | None = None,
                 library_channel: str | None = None, templates: list[Template] | None = None,
                 defect_sizes_nm: list[float] | None = None) -> FrameDetection:
    """Choose the channel, flatten it, and detect the objects of ``scan``.

    Parameters
    ----------
    scan : Scan
    cfg : AgentConfig
        ``channel`` (``auto`` or a name), ``channel_candidates``, ``direction``, ``flatten``, ``segment``.
    reference_extents_nm : list[float] | None
        Extents of the library's references (nm): the object-size prior of the scale detector.
    library_channel : str | None
        The channel the references were recorded on; ``channel: auto`` then uses it.
    templates : list[agent.templates.Template] | None
        The references as crops (template detector on dense frames, :func:`agent.detect.detect_objects`).
    defect_sizes_nm : list[float] | None
        Sizes (nm) of the library's lattice-defect references: the lattice route's scale, and what
        lets ``segment.method: auto`` take it (:func:`find_objects`).

    Raises
    ------
    EmptyScanError
        The frame holds no acquired pixel.
    ChannelError
        The channel is absent (message lists what the scan has).
    """
    channel, cinfo, image = flattened_channel(scan, cfg, library_channel)
    regions, report, residual = find_objects(image, scan.pixel_size_nm, cfg, reference_extents_nm,
                                             scan.units.get(channel) != "a.u.", templates, defect_sizes_nm)
    if cinfo.get("warning") and report.note:
        report.note = f"{report.note}; {cinfo['warning']}"
    return FrameDetection(image, regions, channel, cinfo, report, residual)


def find_objects(image: np.ndarray, pixel_size_nm: tuple[float, float], cfg: AgentConfig,
                 reference_extents_nm: list[float] | None = None, pixel_size_known: bool = True,
                 templates: list[Template] | None = None, defect_sizes_nm: list[float] | None = None,
                 ) -> tuple[list[Region], DetectionReport, np.ndarray | None]:
    """Detect the objects of a flattened frame: the molecule detectors (:func:`agent.detect.detect_objects`)
    or the lattice route (:func:`agent.lattice.detect_defects`).

    The lattice route is taken with ``segment.method: lattice``, or with ``auto`` when the library's
    references are all lattice defects (``defect_sizes_nm``: their sizes) and the frame is a
    resolved periodic lattice (:func:`agent.lattice.lattice_evidence`: sharp Bragg reflections
    carry a large share of its power along two directions). A resolved lattice alone is not enough:
    a molecular monolayer is one too, and there the molecules, not the deviations from the
    lattice, are the objects; the references say which is counted.

    Returns
    -------
    (regions, report, residual) : residual = the lattice-free frame on the lattice route, else None.
    """
    from stm_agent.agent.lattice import detect_defects, lattice_evidence

    method = cfg.segment.method
    if method == "lattice":
        return detect_defects(image, pixel_size_nm, cfg.segment, method, "configured", defect_sizes_nm,
                              pixel_size_known, size_tolerance=cfg.match.size_tolerance)
    if method == "auto" and defect_sizes_nm:
        ev = lattice_evidence(image)
        if ev.resolved:
            why = (f"resolved lattice ({ev.power_share:.0%} of the power in Bragg reflections, "
                   f"{ev.n_directions} directions) and lattice-defect references: lattice removal + defects")
            return detect_defects(image, pixel_size_nm, cfg.segment, method, why, defect_sizes_nm,
                                  pixel_size_known, ev, cfg.match.size_tolerance)
        regions, report = detect_objects(image, pixel_size_nm, cfg.segment, reference_extents_nm,
                                         pixel_size_known=pixel_size_known, templates=templates)
        report.extra["lattice"] = ev.to_json()
        report.reason = f"{report.reason}; no resolved lattice ({ev.power_share:.0%} of the power in Bragg " \
                        f"reflections, {ev.n_directions} directions)"
        return regions, report, None
    regions, report = detect_objects(image, pixel_size_nm, cfg.segment, reference_extents_nm,
                                     pixel_size_known=pixel_size_known, templates=templates)
    return regions, report, None


def detect(scan: Scan, cfg: AgentConfig, reference_extents_nm: list[float] | None = None,
           library_channel: str | None = None, templates: list[Template] | None = None) -> tuple[np.ndarray, list[Region]]:
    """Flatten the channel of ``scan`` and detect its objects (:func:`detect_frame`).

    Returns
    -------
    (image, regions) : float32 ``(ny, nx)`` flattened frame (NaN where not acquired), regions.

    Raises
    ------
    EmptyScanError, ChannelError
        As :func:`detect_frame`.
    """
    d = detect_frame(scan, cfg, reference_extents_nm, library_channel, templates)
    return d.image, d.regions


def reference_crop_at(
    scan: Scan, x: float, y: float, cfg: AgentConfig, units: Literal["nm", "px"] = "nm",
    defect_sizes_nm: list[float] | None = None,
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
        ``contrast="frame"``, descriptors = the object's physical descriptors measured on the
        flattened frame as the queries are, :func:`agent.descriptors.descriptor_record`).
        On the lattice route (:func:`find_objects`; ``defect_sizes_nm`` = the library's lattice-defect
        references) the crop is cut from the lattice-free frame, :data:`agent.fewshot.REFERENCE_CROP_FACTOR`
        x the defect's box wide, and the provenance adds ``detector: "lattice"``, ``stats``
        (robust median and sigma of the lattice-free frame), ``contrast`` (+1 protrusion, -1
        depression) and ``lattice`` (the lattice evidence).

    Raises
    ------
    NoObjectError
        No object contains the point and none has its centroid within its own extent (nm) of it.
    """
    d = detect_frame(scan, cfg, defect_sizes_nm=defect_sizes_nm)
    image, regions, channel = d.image, d.regions, d.channel
    if units == "nm":
        px, py = (float(v) for v in scan.nm_to_px(x, y))
    elif units == "px":
        px, py = float(x), float(y)
    else:
        raise ValueError(f"units must be 'nm' or 'px', got {units!r}")
    dx, dy = scan.pixel_size_nm
    inside = [r for r in regions if r.contains(px, py)]
    if d.residual is not None and not inside:  # a lattice defect too faint for detection: the click names it
        from stm_agent.agent.lattice import blob_region_at

        lo, hi = d.report.extra["size_range_nm"]
        if not (0 <= px < image.shape[1] and 0 <= py < image.shape[0]):
            raise NoObjectError(f"{scan.source}: ({x}, {y}) {units} is outside the frame")
        inside = [blob_region_at(d.residual, (dx, dy), px, py, (lo / dx, hi / dx))]
    if not regions and not inside:
        raise NoObjectError(f"{scan.source}: no object segmented in the frame (picked {x}, {y} {units})")
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
    source = image
    if d.residual is not None:  # a lattice defect: cut from the lattice-free frame, with its surround
        from stm_agent.agent.fewshot import REFERENCE_CROP_FACTOR

        side_nm = REFERENCE_CROP_FACTOR * max(reg.bbox_px[2] * dx, reg.bbox_px[3] * dy)
        source = d.residual
    filled, _ = fill_nan(np.asarray(source, dtype=np.float32))
    w, h = max(4, int(round(side_nm / dx))), max(4, int(round(side_nm / dy)))
    crop = cv2.getRectSubPix(filled, (w, h), reg.centroid_px)
    cx_nm, cy_nm = scan.px_to_nm(*reg.centroid_px)
    prov = {
        "scan": scan.source,
        "frame_id": scan.frame_id,
        "channel": channel,
        "direction": cfg.direction,
        "position_nm": [float(cx_nm), float(cy_nm)],
        "position_px": [float(reg.centroid_px[0]), float(reg.centroid_px[1])],
        "bbox_px": list(reg.bbox_px),
        "area_nm2": reg.area_nm2,
        "extent_nm": reg.extent_nm,
        "pixel_size_nm": [dx, dy],
        "touches_edge": reg.touches_edge,
        "grey_range": list(frame_range(image)),
        "descriptors": descriptor_record(
            describe_regions(image, [reg], (dx, dy), z_unit_of(scan.units.get(channel)))),
    }
    if d.residual is not None:
        from stm_agent.agent.fewshot import robust_stats

        prov.update({"detector": "lattice", "stats": list(robust_stats(d.residual)), "contrast": int(reg.contrast),
                     "lattice": d.report.extra.get("lattice")})
    return crop.astype(np.float32), (dx, dy), prov


def defect_reference(species: str, crop: np.ndarray, pixel_size_nm: tuple[float, float], provenance: dict[str, Any],
                     extent_nm: float):
    """A library reference as a lattice-defect example (:class:`agent.fewshot.DefectReference`).

    The defect's box is the provenance ``bbox_px`` (else a square of ``extent_nm``); the robust
    statistics are the frame's (provenance ``stats``, recorded on the lattice route) or, for a
    reference recorded otherwise, the crop's own; the contrast is the provenance ``contrast`` (0 =
    unknown: no polarity rule).
    """
    from stm_agent.agent.fewshot import DefectReference, robust_stats

    bb = provenance.get("bbox_px")
    box = (float(bb[2]), float(bb[3])) if bb else (extent_nm / pixel_size_nm[0], extent_nm / pixel_size_nm[1])
    st = provenance.get("stats")
    stats = (float(st[0]), float(st[1])) if st else robust_stats(crop)
    return DefectReference(species, crop, (float(pixel_size_nm[0]), float(pixel_size_nm[1])), box, stats,
                           int(provenance.get("contrast", 0) or 0))


def library_defect_sizes(entries: list[tuple[tuple[float, float], dict[str, Any], float]]) -> list[float] | None:
    """Sizes (nm, mean box side) of a library's references when every one was recorded on the
    lattice route (provenance ``detector: "lattice"``), else None. ``entries``: ``(pixel_size_nm,
    provenance, extent_nm)`` per reference."""
    if not entries or any(p.get("detector") != "lattice" for _, p, _ in entries):
        return None
    out = []
    for ps, p, ext in entries:
        bb = p.get("bbox_px")
        out.append(0.5 * (bb[2] * ps[0] + bb[3] * ps[1]) if bb else float(ext))
    return out


_BLAS = None


def _one_blas_thread():
    """Context: the BLAS library (numpy's matrix products) on one thread while a frame is processed.

    Matching is many small products (objects x embedding x reference poses, and the null sample);
    BLAS worker threads cost more in wake-up and contention than they gain there. Measured on 2
    cores with another process busy (scripts/bench_frame.py, 512^2, 150 objects, pixel encoder):
    match stage 196 -> 73 ms, frame 277 -> 163 ms. ONNX Runtime keeps its own threads.
    """
    global _BLAS
    if _BLAS is None:
        from threadpoolctl import ThreadpoolController

        _BLAS = ThreadpoolController()
    return _BLAS.limit(limits=1, user_api="blas")


class Recognizer:
    """Recognises and counts the species of a reference library in scans.

    Parameters
    ----------
    cfg : AgentConfig
    encoder : models.base.Encoder
        The encoder (for ``encoder.name: auto`` the fallback candidate, i.e. the first).
    refs : RefEmbeddings
        Pose embeddings of the references (made with ``encoder`` and ``cfg.normalise``).
    candidates : dict[str, tuple[Encoder, RefEmbeddings]] | None
        ``encoder.name: auto`` only: every candidate encoder with its own cached reference pose
        embeddings, ``{name: (encoder, refs)}`` in candidate order (first = fallback). The encoder
        of each frame is then chosen with UniMR's adaptive selection (step 5, Cao et al., Adv. Sci.
        2025; :func:`agent.selection.select_from_encoders`), per frame or once per session as
        ``cfg.encoder.select`` says.
    """

    def __init__(self, cfg: AgentConfig, encoder, refs: RefEmbeddings,
                 candidates: dict[str, tuple[Any, RefEmbeddings]] | None = None):
        self.cfg = cfg
        self.encoder = encoder
        self.refs = refs
        self.candidates = dict(candidates) if candidates else None
        #: ``select: once``: the selection that fixed the encoder and the frame it was made on
        self.locked: tuple[str, dict[str, Any]] | None = None
        self._desc_warned = False
        #: extents (nm) of the library's references: the object-size prior of detection
        self.reference_extents_nm: list[float] | None = None
        #: the channel the references were recorded on (``channel: auto`` follows it), None if unknown
        self.library_channel: str | None = None
        #: the references as crops, for the template detector (dense frames)
        self.templates: list[Template] | None = None
        #: ``encoder: auto``: how well each candidate separates the library's species
        self.separation: dict[str, dict[str, Any]] = {}
        #: the references as lattice-defect examples (few-shot prototypes on the lattice route)
        self.defect_refs: list = []
        #: sizes (nm) of the references when every one is a lattice defect (``auto`` may then take
        #: the lattice route), else None
        self.defect_sizes_nm: list[float] | None = None

    def descriptor_weight(self, refs: RefEmbeddings, height_unit: str, physical: bool = True) -> float:
        """The descriptor weight w in effect for ``refs`` (``cfg.match.descriptor_weight`` or 0).

        ``auto``: :data:`agent.config.AUTO_DESCRIPTOR_WEIGHT` on frames with physical units
        (``physical``: an .sxm frame), 0 on images without a pixel size. 0 when the references carry
        no descriptors, hold fewer than 2 species (nothing to tell apart: every reference sits at the
        scaler centre, :func:`agent.descriptors.fit_reference_scaler`), or their heights are in
        another unit than the frame's (``pm`` vs ``sigma``); a warning is logged once (not for
        ``auto``).
        """
        from stm_agent.agent.config import AUTO_DESCRIPTOR_WEIGHT

        auto = self.cfg.match.descriptor_weight == "auto"
        w = (AUTO_DESCRIPTOR_WEIGHT if physical else 0.0) if auto else float(self.cfg.match.descriptor_weight)
        if w <= 0:
            return 0.0
        why = None
        if refs.desc_std is None:
            why = "the references carry no descriptors"
        elif len(refs.species) < 2:
            why = "fewer than 2 species"
        elif refs.height_unit != height_unit:
            why = f"reference heights in {refs.height_unit}, frame heights in {height_unit}"
        if why is None:
            return w
        if not self._desc_warned and not auto:
            log.warning("descriptor_weight %.2f ignored: %s", w, why)
            self._desc_warned = True
        return 0.0

    @classmethod
    def from_config(cls, cfg: AgentConfig, *, allow_empty: bool = False) -> "Recognizer":
        """Load the library at ``cfg.references.folder`` and the encoder(s) ``cfg.encoder``.

        For ``encoder.name: auto`` every candidate of :func:`models.registry.make_encoders` is built
        and the reference pose embeddings are loaded (or computed and cached; the cache is keyed by
        encoder id) for each of them.

        With ``allow_empty`` a missing or empty library is not an error: every object is then
        counted as ``other`` (segmentation and counting still work; a warning says how to add
        references).

        Raises
        ------
        ReferenceLibraryError
            Missing or empty library (unless ``allow_empty``).
        ConfigError
            Unknown encoder.
        ModelError
            The CLIP model folder is invalid (``clip``, or ``auto`` with ``model_dir``).
        """
        from stm_agent.adapters.references import ReferenceLibrary
        from stm_agent.models.registry import make_encoders

        encoders = make_encoders(cfg.encoder, cfg.normalise)
        lib = ReferenceLibrary(cfg.references.folder)
        ref_sets: dict[str, RefEmbeddings] = {}
        with_desc = cfg.match.descriptor_weight != 0
        try:
            for name, enc in encoders.items():
                ref_sets[name] = lib.pose_embeddings(enc, cfg.normalise, descriptors=with_desc)
        except ReferenceLibraryError as e:
            if not allow_empty:
                raise
            log.warning("%s; every object is counted as %r until you add references with "
                        "`stm-agent refs add`", e, OTHER)
            ref_sets = {
                name: RefEmbeddings(emb=np.zeros((0, 0), np.float32), species_idx=np.zeros(0, int),
                                    angle_deg=np.zeros(0, np.float32), mirrored=np.zeros(0, bool), species=[])
                for name in encoders
            }
        first = next(iter(encoders))
        candidates = {n: (encoders[n], ref_sets[n]) for n in encoders} if cfg.encoder.name == "auto" else None
        rec = cls(cfg, encoders[first], ref_sets[first], candidates)
        entries = lib.entries(require=False) if ref_sets[first].species else []
        if entries:
            rec.reference_extents_nm = [float(e.extent_nm) for e in entries]
            crops = [e.load() for e in entries]
            rec.templates = [Template(e.species, c, e.pixel_size_nm, float(e.extent_nm)) for e, c in zip(entries, crops)]
            rec.defect_refs = [defect_reference(e.species, c, e.pixel_size_nm, e.provenance, e.extent_nm)
                               for e, c in zip(entries, crops)]
            rec.defect_sizes_nm = library_defect_sizes([(e.pixel_size_nm, e.provenance, e.extent_nm) for e in entries])
            chans = {e.provenance.get("channel") for e in entries}
            if len(chans) == 1 and None not in chans:
                rec.library_channel = str(chans.pop())
            elif len(chans) > 1:
                log.warning("%s: references recorded on several channels %s; channel follows the config",
                            lib.folder, sorted(str(c) for c in chans))
        if candidates:
            rec.exclude_inseparable()
        return rec

    def exclude_inseparable(self) -> None:
        """``encoder: auto``: drop candidates that cannot tell the library's species apart (issue 10,
        item 7), e.g. mirror-invariant Zernike moments for enantiomers: see
        :func:`agent.selection.species_separation`. Kept when every candidate fails (reported)."""
        from stm_agent.agent.selection import species_separation

        sep = {n: species_separation(r) for n, (_, r) in self.candidates.items()}
        self.separation = sep
        ok = {n: v for n, v in self.candidates.items() if sep[n]["separable"]}
        if ok and len(ok) < len(self.candidates):
            self.candidates = ok
            first = next(iter(ok))
            self.encoder, self.refs = ok[first]

    def detect(self, scan: Scan) -> tuple[np.ndarray, list[Region]]:
        """See :func:`detect`."""
        return detect(scan, self.cfg)

    def reference_crop_at(self, scan: Scan, x: float, y: float, units: Literal["nm", "px"] = "nm"):
        """See :func:`reference_crop_at`."""
        return reference_crop_at(scan, x, y, self.cfg, units, self.defect_sizes_nm)

    def _encode(self, grey: np.ndarray, frame_id: str) -> tuple[np.ndarray, RefEmbeddings, dict[str, Any]]:
        """Embed the query crops and pick the encoder (adaptive selection for ``auto``).

        ``auto``: the crops are embedded with every candidate, the UniMR selection (GMM(2) peak
        separation of each candidate's max-similarity distribution, Cao et al., Adv. Sci. 2025)
        picks one, and its embeddings are returned. ``select: once``: the first frame with >= 2
        queries and at least one finite score fixes the encoder; later frames are embedded with
        that encoder only.

        Parameters
        ----------
        grey : np.ndarray
            uint8 ``(N, S, S)`` normalised query crops (N may be 0).
        frame_id : str
            Identity of the frame (recorded when ``select: once`` fixes the encoder).

        Returns
        -------
        (emb, refs, encoder_json)
            float32 ``(N, D)`` query embeddings of the chosen encoder; that encoder's reference
            pose embeddings; the ``FrameResult.encoder`` record.
        """
        if self.candidates is None:
            info = {"name": getattr(self.encoder, "name", type(self.encoder).__name__), "id": self.encoder.id}
            return self._embed(self.encoder, self.refs, grey), self.refs, info

        from stm_agent.agent.selection import PeakSeparation, Selection, select_encoder, select_from_encoders

        mode = self.cfg.encoder.select
        if self.locked is not None:  # select: once, already chosen: one embedding pass only
            name, sel_json = self.locked
            enc, refs = self.candidates[name]
            return self._embed(enc, refs, grey), refs, self._auto_json(name, sel_json, mode)
        encs = {n: e for n, (e, _) in self.candidates.items()}
        refs_emb = {n: r.emb for n, (_, r) in self.candidates.items()}
        if not self.refs.species:  # empty library: nothing to compare with, every object `other`
            fallback = next(iter(encs))
            sel = Selection(fallback, {n: PeakSeparation(float("nan"), reason="no references") for n in encs},
                            "fallback: no references")
            emb = {fallback: self._embed(encs[fallback], self.candidates[fallback][1], grey)}
        elif len(grey):
            sel, emb = select_from_encoders(encs, grey, refs_emb)
        else:  # no object: every score NaN ("0 queries"), fallback encoder
            emb = {n: np.zeros((0, r.shape[1]), np.float32) for n, r in refs_emb.items()}
            sel = select_encoder({n: (emb[n], refs_emb[n]) for n in encs})
        sel_json = sel.to_json()
        if (mode == "once" and len(grey) >= 2
                and any(v.get("score") is not None for v in sel_json["scores"].values())):
            sel_json = {**sel_json, "selected_on": frame_id}
            self.locked = (sel.chosen, sel_json)
        return emb[sel.chosen], self.candidates[sel.chosen][1], self._auto_json(sel.chosen, sel_json, mode)

    def _auto_json(self, chosen: str, sel_json: dict[str, Any], mode: str) -> dict[str, Any]:
        """``FrameResult.encoder`` for ``auto``: ``Selection.to_json()`` + name, chosen id, select mode."""
        out = {"name": "auto", "id": self.candidates[chosen][0].id, "select": mode, **sel_json}
        if self.separation:
            out["separation"] = self.separation
        if self.locked is not None and mode == "once":
            out["locked"] = True
        return out

    @staticmethod
    def _embed(encoder, refs: RefEmbeddings, grey: np.ndarray) -> np.ndarray:
        """float32 ``(N, D)`` embeddings of ``grey`` (``(0, D)`` without crops)."""
        if len(grey):
            return encoder.embed(grey)
        return np.zeros((0, refs.emb.shape[1]), np.float32)

    def threshold(self, image: np.ndarray, pixel_size_nm: tuple[float, float], boxes_px: np.ndarray,
                  encoder, refs: RefEmbeddings) -> ThresholdChoice:
        """Similarity threshold of this frame and how it was obtained (``match.threshold``).

        A number: that number. ``auto``: :func:`agent.threshold.auto_threshold` of the frame's null
        sample (:func:`agent.threshold.null_scores`: background windows away from every detected
        object, embedded with ``encoder`` and scored against ``refs``). Both carry the ratio test
        setting (``match.ratio``).

        Parameters
        ----------
        image : float ``(ny, nx)`` flattened frame; pixel_size_nm : (dx, dy);
        boxes_px : float ``(N, 4)`` every object's box; encoder, refs : the chosen encoder and its
        reference pose embeddings.
        """
        m = self.cfg.match
        if m.threshold != "auto":
            return ThresholdChoice(float(m.threshold), ratio=m.ratio)
        if not refs.species:
            return ThresholdChoice(-1.0, mode="auto", method="no references", ratio=m.ratio, alpha=m.alpha)
        sample: dict = {}
        z = null_scores(image, pixel_size_nm, boxes_px, encoder, refs, self.cfg.normalise, sample=sample)
        return auto_threshold(z, m.alpha, m.ratio, sample)

    def _encoder_of(self, refs: RefEmbeddings):
        """The encoder that made ``refs`` (the chosen candidate for ``auto``)."""
        if self.candidates:
            for enc, r in self.candidates.values():
                if r is refs:
                    return enc
        return self.encoder

    def recognise(self, scan: Scan) -> FrameResult:
        """Recognise every object of one frame.

        Returns
        -------
        FrameResult
            ``counts`` for every species + ``other`` (objects touching the edge excluded when
            ``cfg.segment.exclude_edge``), one :class:`Detection` per segmented object (centroid in
            controller nm, area nm^2, species, similarity, pose, per-species scores), ``timings_ms``
            (flatten, segment, normalise, encode (+ selection for ``auto``), match, total; with
            ``match.descriptor_weight`` > 0 also ``describe``, inside ``match``: the physical
            descriptors of every object, :func:`agent.descriptors.describe_regions`, combined with the
            embedding as ``(1 - w) cos_e + w cos_d``, see :func:`agent.match.species_scores`),
            ``encoder``, ``scan`` summary and ``image`` (the flattened frame). ``encoder`` is
            ``{name, id}`` for a fixed encoder; for ``auto`` it is ``Selection.to_json()``
            (``chosen``, ``reason``, ``scores`` of every candidate) + ``name: "auto"``, ``id`` of
            the chosen encoder, ``select`` mode, and with ``select: once`` ``selected_on`` (frame
            id the choice was made on) and ``locked: true`` once fixed. ``encoder["threshold"]`` is
            the threshold used and how it was obtained (:meth:`threshold`,
            :meth:`agent.threshold.ThresholdChoice.to_json`); ``encoder["mirror"]`` whether mirrored
            poses were used and why (``normalise.mirror: auto``); ``encoder["descriptor_weight"]``
            the descriptor weight in effect. Each object is cropped once, its window from its own
            extent (:func:`agent.references.window_nm`); on frames with physical units a species is
            ruled out for objects of another size (:func:`agent.match.size_gate`).

        Raises
        ------
        EmptyScanError, KeyError
            As :func:`detect`.
        """
        with _one_blas_thread():
            return self._recognise(scan)

    def _recognise(self, scan: Scan) -> FrameResult:
        """The body of :meth:`recognise`."""
        cfg = self.cfg
        t0 = time.perf_counter()
        channel, cinfo, image = flattened_channel(scan, cfg, self.library_channel)
        t1 = time.perf_counter()
        regions, report, residual = find_objects(image, scan.pixel_size_nm, cfg, self.reference_extents_nm,
                                                 scan.units.get(channel) != "a.u.", self.templates,
                                                 self.defect_sizes_nm if cfg.segment.method != "lattice"
                                                 else [r.size_nm for r in self.defect_refs] or None)
        if cinfo.get("warning"):
            report.note = f"{report.note}; {cinfo['warning']}" if report.note else cinfo["warning"]
        t2 = time.perf_counter()
        if residual is not None:
            names, sim, pose, scores, species, encoder_info = self._classify_defects(residual, regions, scan)
            t5 = time.perf_counter()
            return self._result(scan, channel, cinfo, image, report, regions, names, sim, pose, scores, species,
                                encoder_info, {"flatten": (t1 - t0) * 1e3, "segment": (t2 - t1) * 1e3,
                                               "match": (t5 - t2) * 1e3, "total": (t5 - t0) * 1e3})
        if self.refs.species:  # the references' windows (background null) must fit this frame's pixels
            check_window_px(float(self.refs.window_nm), scan.pixel_size_nm, "reference window")
        centres = np.array([r.centroid_px for r in regions], dtype=np.float64).reshape(-1, 2)
        boxes = np.array([r.bbox_px for r in regions], dtype=np.float64).reshape(-1, 4)
        if self.refs.species:  # each object cropped once, its window from its own extent
            wins = window_nm(object_extent_nm(boxes, scan.pixel_size_nm), cfg.normalise)
            grey = normalise_crops(image, centres, wins, scan.pixel_size_nm, cfg.normalise)
        else:  # no references: nothing to compare with, every object is `other`
            grey = np.zeros((0, cfg.normalise.size_px, cfg.normalise.size_px), np.uint8)
        t3 = time.perf_counter()
        emb, refs, encoder_info = self._encode(grey, scan.frame_id)
        if len(emb) != len(regions):  # no references: zero rows, every object `other`
            emb = np.zeros((len(regions), refs.emb.shape[1]), np.float32)
        t4 = time.perf_counter()
        z_unit = z_unit_of(scan.units.get(channel))
        physical = scan.units.get(channel, "a.u.") != "a.u."
        w = self.descriptor_weight(refs, "pm" if z_unit == "m" else "sigma", physical) if regions else 0.0
        extra_ms: dict[str, float] = {}
        if w > 0:
            qd = refs.standardise(describe_regions(image, regions, scan.pixel_size_nm, z_unit).matrix())
            extra_ms["describe"] = (time.perf_counter() - t4) * 1000.0
            scores, best = species_scores(emb, refs, qd, w)
        else:
            scores, best = species_scores(emb, refs)
        if physical and cfg.match.size_tolerance is not None and regions:
            scores = size_gate(scores, object_extent_nm(boxes, scan.pixel_size_nm), refs, cfg.match.size_tolerance)
        thr = self.threshold(image, scan.pixel_size_nm, boxes, self._encoder_of(refs), refs)
        names, sim, pose = assign(scores, best, refs, thr.value, thr.ratio)
        encoder_info = {**encoder_info, "threshold": thr.to_json(), "descriptor_weight": w,
                        "mirror": {"used": refs.mirror, "reason": refs.mirror_reason}}
        t5 = time.perf_counter()
        ms = lambda a, b: (b - a) * 1000.0  # noqa: E731
        return self._result(scan, channel, cinfo, image, report, regions, names, sim, pose, scores, refs.species,
                            encoder_info, {"flatten": ms(t0, t1), "segment": ms(t1, t2), "normalise": ms(t2, t3),
                                           "encode": ms(t3, t4), "match": ms(t4, t5), "total": ms(t0, t5), **extra_ms})

    def _result(self, scan: Scan, channel: str, cinfo: dict, image: np.ndarray, report: DetectionReport,
                regions: list[Region], names: list[str], sim, pose, scores: np.ndarray, species: list[str],
                encoder_info: dict[str, Any], timings_ms: dict[str, float]) -> FrameResult:
        """The :class:`FrameResult` of one frame: one :class:`Detection` per region, the counts."""
        centres = np.array([r.centroid_px for r in regions], dtype=np.float64).reshape(-1, 2)
        xs, ys = scan.px_to_nm(centres[:, 0], centres[:, 1])
        counts = {s: 0 for s in species}
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
                    scores={s: float(scores[i, k]) for k, s in enumerate(species)},
                )
            )
            if not (r.touches_edge and self.cfg.segment.exclude_edge):
                counts[names[i]] += 1
        return FrameResult(
            frame_id=scan.frame_id,
            source=scan.source,
            scan={**scan.summary(), "channel": channel},
            counts=counts,
            detections=dets,
            encoder=encoder_info,
            timings_ms=timings_ms,
            processed_at=datetime.now(timezone.utc),
            image=image,
            detection={**report.to_json(), "channel": cinfo},
        )

    def _classify_defects(self, residual: np.ndarray, regions: list[Region], scan: Scan):
        """Lattice route: SimpleShot prototypes of the library's references (K per species,
        :func:`agent.fewshot.classify_defects`). Without references every defect is ``other``.

        Returns ``(names, similarity, poses, scores (N, S), species, encoder_info)``.
        """
        from stm_agent.agent.fewshot import classify_defects
        from stm_agent.agent.threshold import ThresholdChoice

        n = len(regions)
        info: dict[str, Any] = {"name": "simpleshot", "id": "simpleshot-cl2n/v1"}
        if not self.defect_refs or not n:
            thr = ThresholdChoice(-1.0, mode="auto", method="no references" if not self.defect_refs else "no defect")
            species = sorted({r.species for r in self.defect_refs})
            return ([OTHER] * n, np.zeros(n), [(0.0, False)] * n, np.zeros((n, len(species))), species,
                    {**info, "threshold": thr.to_json()})
        m = self.cfg.match
        boxes = np.array([r.bbox_px for r in regions], np.float64).reshape(-1, 4)
        out = classify_defects(residual, boxes, np.array([r.contrast for r in regions]), scan.pixel_size_nm,
                               self.defect_refs, m.threshold, m.alpha, m.size_tolerance)
        info.update({"k": out["k"], "window_nm": round(out["window_nm"], 5), "threshold": out["threshold"].to_json()})
        return (out["names"], out["similarity"], [(0.0, False)] * n, out["scores"], out["species"], info)
