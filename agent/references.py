"""Reference embeddings: the ONE path from reference crops to cached pose embeddings.

The reference library (:mod:`adapters.references`, files and cache only), the daemon (through
:class:`agent.pipeline.Recognizer`) and the evaluation (:mod:`agent.evaluation`, references drawn
at labelled boxes) all call :func:`embed_references`.

Crop windows (issue 10, item 4): every reference is windowed from ITS OWN extent
(``normalise.window_factor`` x :func:`object_extent_nm`), as every query object is windowed from its
own detected extent (:func:`agent.pipeline.Recognizer.recognise`): one oversized reference no longer
sets the window of every species, and each object is cropped and embedded once. The absolute size
of an object, lost by this scale normalisation, is carried by the physical descriptors
(:mod:`agent.descriptors`, on by default where the frame has physical units).

``normalise.mirror: auto``: mirrored poses are off when two species of the library are mirror
images of each other (enantiomers: a reference of one species matches a mirrored pose of the other
clearly better than any of its plain rotations, :func:`mirror_decision`), on otherwise (UniMR's
default: 36 rotations x mirror).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from stm_agent.agent.config import NormaliseConfig
from stm_agent.agent.match import RefEmbeddings
from stm_agent.agent.normalise import crop_windows, make_poses, to_grey

#: a reference is chiral when no rotation of its mirror image reaches this raw-pixel cosine with it
#: (measured, 1 degree steps: F-HPB L/R 0.62-0.89; sparse M 0.96-0.99; Monoradical 0.88-0.99)
CHIRAL_BELOW = 0.9
#: two chiral species are mirror images of each other when the best mirrored pose of one explains
#: the other at least as well as its best plain rotation, within this tolerance (F-HPB L vs R:
#: mirrored - plain = -0.03..+0.06, measured)
PAIR_TOLERANCE = 0.03
#: rotations of the mirror test (finer than the matching poses: the chiral twist of a propeller is
#: a few degrees)
MIRROR_TEST_ROTATIONS = 360


@dataclass
class Reference:
    """One reference example, in memory.

    Attributes
    ----------
    species : str
    crop : np.ndarray
        float32 ``(h, w)`` flattened crop centred on the object, physical units of the channel.
    pixel_size_nm : tuple[float, float]
        ``(dx, dy)`` of the crop, nm.
    extent_nm : float
        The object's own extent (:func:`object_extent_nm`), nm: sets its crop window.
    grey_range : tuple[float, float] | None
        The 1..99 % value range of the frame it came from (``normalise.contrast: frame``).
    descriptors : dict | None
        :func:`agent.descriptors.descriptor_record` of the object (None: measured on the crop).
    name : str
        Identity for reports (file name, annotation id).
    """

    species: str
    crop: np.ndarray
    pixel_size_nm: tuple[float, float]
    extent_nm: float
    grey_range: tuple[float, float] | None = None
    descriptors: dict | None = None
    name: str = ""
    provenance: dict[str, Any] = field(default_factory=dict)


def object_extent_nm(bbox_px: Any, pixel_size_nm: tuple[float, float]) -> np.ndarray:
    """The extent of objects that sets their crop window: the longer side of the box, nm.

    The same measure for references (labelled or segmented box) and queries (detected box), so a
    species appears at the same scale in both. Within +-6 % over rotations for an elongated object
    (2:1), +-17 % for a square one.

    Parameters
    ----------
    bbox_px : array-like
        ``(4,)`` or ``(N, 4)`` boxes ``(x, y, w, h)`` in pixels.
    pixel_size_nm : tuple[float, float]

    Returns
    -------
    np.ndarray
        float64 ``(N,)`` (``(1,)`` for one box), nm.
    """
    b = np.asarray(bbox_px, np.float64).reshape(-1, 4)
    return np.maximum(b[:, 2] * float(pixel_size_nm[0]), b[:, 3] * float(pixel_size_nm[1]))


def window_nm(extent_nm: Any, cfg: NormaliseConfig) -> np.ndarray:
    """Crop window side(s), nm: ``cfg.window_nm`` when set, else ``cfg.window_factor`` x each extent.

    float64 ``(N,)`` for ``extent_nm`` of shape ``(N,)`` (or a scalar).
    """
    e = np.atleast_1d(np.asarray(extent_nm, np.float64))
    if cfg.window_nm is not None:
        return np.full(e.shape, float(cfg.window_nm))
    return cfg.window_factor * np.maximum(e, 1e-9)


def reference_grey(refs: list[Reference], cfg: NormaliseConfig) -> tuple[np.ndarray, np.ndarray]:
    """Normalised pose-0 grey crops of the references and their windows.

    Returns
    -------
    (grey, windows) : uint8 ``(R, S, S)``; float64 ``(R,)`` window side of each, nm.
    """
    wins = window_nm([r.extent_nm for r in refs], cfg)
    out = []
    for r, win in zip(refs, wins):
        c = np.asarray(r.crop, np.float32)
        centre = np.array([[(c.shape[1] - 1) / 2.0, (c.shape[0] - 1) / 2.0]])
        rng = r.grey_range if (cfg.contrast == "frame" and r.grey_range is not None) else None
        if cfg.contrast == "frame" and rng is None:
            from stm_agent.agent.normalise import frame_range

            rng = frame_range(c)
        out.append(to_grey(crop_windows(c, centre, float(win), r.pixel_size_nm, cfg.size_px), cfg, rng)[0])
    if not out:
        return np.zeros((0, cfg.size_px, cfg.size_px), np.uint8), wins
    return np.stack(out), wins


@dataclass
class MirrorChoice:
    """Outcome of :func:`mirror_decision`: ``mirror`` (poses used), ``reason``, and per species pair
    ``[a, b, plain, mirrored, both_chiral]`` (best cosines of a pose-0 reference of a against b's
    rotations, plain and mirrored)."""

    mirror: bool
    reason: str
    pairs: list[list[Any]] = field(default_factory=list)
    enantiomers: bool = False


def mirror_decision(grey: np.ndarray, species: list[str], setting: Any) -> MirrorChoice:
    """``normalise.mirror``: True/False as set, or ``auto``: off for enantiomer pairs.

    Raw-pixel cosines (mean-centred inside the circular mask, as :class:`models.pixel.PixelEncoder`)
    of pose-0 reference crops against every 1-degree rotation of a crop, plain and mirrored,
    whatever the matching encoder (Zernike moments cannot see a mirror at all):

    * a reference is *chiral* when the best mirrored rotation of itself stays below
      :data:`CHIRAL_BELOW` (an achiral object, or one with a mirror plane, finds its mirror image
      among its rotations);
    * two species are *enantiomers* when both have a chiral reference and the best mirrored pose of
      one explains the other at least as well as its best plain rotation
      (``mirrored >= plain - PAIR_TOLERANCE``).

    Any enantiomer pair turns the mirrored poses off (a mirrored L would be an R); otherwise they
    stay on (UniMR: 36 rotations x mirror).

    Parameters
    ----------
    grey : np.ndarray
        uint8 ``(R, S, S)`` pose-0 reference crops (:func:`reference_grey`).
    species : list[str]
        Species of each crop (R).
    setting : bool | "auto"

    Returns
    -------
    MirrorChoice
    """
    from stm_agent.models.pixel import PixelEncoder

    sp = np.asarray(species)
    if len(set(species)) < 2:
        if setting is True or setting is False:
            return MirrorChoice(bool(setting), "set in the configuration")
        return MirrorChoice(True, "auto: fewer than 2 species, mirrored poses on")
    s = grey.shape[1]
    enc = PixelEncoder(s)
    ncfg = NormaliseConfig(size_px=s, rotations=MIRROR_TEST_ROTATIONS, mirror=True)
    poses, _, mirrored = make_poses(grey, ncfg)  # (R, P, S, S)
    r, p = poses.shape[:2]
    e = enc.embed(poses.reshape(r * p, s, s)).reshape(r, p, -1)
    base = enc.embed(grey)                           # pose 0
    sim = np.einsum("ad,bpd->abp", base, e)          # (R, R, P)
    plain = sim[:, :, ~mirrored].max(axis=2)
    mirr = sim[:, :, mirrored].max(axis=2)
    self_mirror = np.diag(mirr)
    chiral = self_mirror < CHIRAL_BELOW
    pairs, enantio = [], []
    names = sorted(set(species))
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            ia, ib = np.flatnonzero(sp == a), np.flatnonzero(sp == b)
            pl = float(plain[np.ix_(ia, ib)].max())
            mi = float(mirr[np.ix_(ia, ib)].max())
            both = bool(chiral[ia].any() and chiral[ib].any())
            pairs.append([a, b, round(pl, 4), round(mi, 4), both])
            if both and mi >= pl - PAIR_TOLERANCE:
                enantio.append(f"{a}/{b}")
    if setting is True or setting is False:
        return MirrorChoice(bool(setting), "set in the configuration", pairs, enantiomers=bool(enantio))
    if enantio:
        return MirrorChoice(False, f"auto: mirror images of each other ({', '.join(enantio)}), mirrored poses off",
                            pairs, enantiomers=True)
    return MirrorChoice(True, "auto: no pair of chiral species are mirror images, mirrored poses on", pairs)


def embed_references(refs: list[Reference], encoder, cfg: NormaliseConfig, *,
                     descriptors: bool = False) -> RefEmbeddings:
    """Pose embeddings of references: per-reference windows, mirror choice, poses, encoder.

    Parameters
    ----------
    refs : list[Reference]
        At least one.
    encoder : models.base.Encoder
    cfg : NormaliseConfig
        ``rotations``, ``mirror`` (True, False or ``auto``: :func:`mirror_decision`), windows.
    descriptors : bool
        Also the physical descriptors of the references and their reference-fitted scaler
        (:func:`agent.descriptors.fit_reference_scaler`); a reference without a descriptor record is
        measured on its crop (:func:`crop_descriptor_record`).

    Returns
    -------
    RefEmbeddings
        ``emb`` float32 ``(M, D)``, M = R x poses; ``species`` sorted; ``ref_window_nm`` ``(R,)``;
        ``window_nm`` = the largest of them; ``mirror`` / ``mirror_reason``.

    Raises
    ------
    ValueError
        No reference, or descriptors that mix height units.
    """
    if not refs:
        raise ValueError("no reference to embed")
    grey, wins = reference_grey(refs, cfg)
    names = sorted({r.species for r in refs})
    choice = mirror_decision(grey, [r.species for r in refs], cfg.mirror)
    pcfg = cfg.model_copy(update={"mirror": choice.mirror})
    poses, angles, mirrored = make_poses(grey, pcfg)  # (R, P, S, S)
    r, p, s, _ = poses.shape
    emb = encoder.embed(poses.reshape(r * p, s, s)).astype(np.float32)
    out = RefEmbeddings(
        emb=emb,
        species_idx=np.repeat([names.index(x.species) for x in refs], p).astype(np.int64),
        angle_deg=np.tile(angles, r).astype(np.float32),
        mirrored=np.tile(mirrored, r).astype(bool),
        species=names,
        ref_idx=np.repeat(np.arange(r), p).astype(np.int64),
        window_nm=float(wins.max()),
        ref_window_nm=wins.astype(np.float64),
        ref_extent_nm=np.array([x.extent_nm for x in refs], np.float64),
        mirror=choice.mirror,
        mirror_reason=choice.reason,
        enantiomers=choice.enantiomers,
        mirror_invariance=float(np.mean(np.sum(encoder.embed(np.ascontiguousarray(grey[:, :, ::-1])) * emb[::p], axis=1))),
    )
    if descriptors:
        from stm_agent.agent import descriptors as D

        recs = [x.descriptors if (isinstance(x.descriptors, dict)
                                  and x.descriptors.get("version") == D.DESCRIPTOR_VERSION)
                else crop_descriptor_record(x) for x in refs]
        desc = D.descriptors_from_records(recs)
        xm = desc.matrix()
        sc = D.fit_reference_scaler(xm, np.array([names.index(x.species) for x in refs]))
        out.ref_desc, out.desc_std, out.desc_center, out.desc_scale = xm, sc.transform(xm), sc.center_, sc.scale_
        out.height_unit = desc.height_unit
    return out


def crop_descriptor_record(ref: Reference) -> dict:
    """Physical descriptors of a reference measured on its stored crop (older libraries, crops added
    by hand, references drawn at labelled boxes): the provenance box moved into crop coordinates
    when known, else a central box of the object's extent, with the half-maximum mask of
    :func:`agent.descriptors.describe_objects`."""
    from stm_agent.agent import descriptors as D

    c = np.asarray(ref.crop, np.float32)
    dx, dy = ref.pixel_size_nm
    h, w = c.shape
    bb, pos = ref.provenance.get("bbox_px"), ref.provenance.get("position_px")
    if bb and pos:  # frame box -> crop coordinates (getRectSubPix centre = object centroid)
        x0 = int(round(bb[0] - pos[0] + (w - 1) / 2.0))
        y0 = int(round(bb[1] - pos[1] + (h - 1) / 2.0))
        x1, y1 = min(x0 + int(bb[2]), w), min(y0 + int(bb[3]), h)
        x0, y0 = max(x0, 0), max(y0, 0)
    else:  # central box of the object's extent
        bw, bh = max(2, int(round(ref.extent_nm / dx))), max(2, int(round(ref.extent_nm / dy)))
        x0, y0 = max((w - bw) // 2, 0), max((h - bh) // 2, 0)
        x1, y1 = min(x0 + bw, w), min(y0 + bh, h)
    # a topography crop in metres (channel Z, sub-micrometre values) -> pm; else sigma
    z_unit = ref.provenance.get("z_unit")
    if z_unit is None:
        z_unit = "m" if ref.provenance.get("channel", "Z") == "Z" and float(np.ptp(c)) < 1e-6 else None
    d = D.describe_objects(c, np.array([[x0, y0, max(x1 - x0, 1), max(y1 - y0, 1)]]), (dx, dy), z_unit=z_unit)
    return D.descriptor_record(d, 0, method="crop")
