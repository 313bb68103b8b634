"""The reference library on disk: one sub-folder per species, user-picked example crops.

Layout::

    <folder>/<species>/<ref_id>.npy    float32 (h, w) flattened crop in physical units (m, A ...)
    <folder>/<species>/<ref_id>.png    16-bit preview (min-max stretched) for people
    <folder>/<species>/<ref_id>.json   provenance: scan file, frame_id, position nm and px,
                                       pixel_size_nm, channel, extent_nm, created (UTC ISO time)
    <folder>/.cache/<key>.npz          embeddings of every pose of every reference

This module only stores and loads files and the cache: the pose embeddings themselves (per-reference
crop windows, ``normalise.mirror: auto``, descriptors) are computed by
:func:`agent.references.embed_references`, the one function the daemon and the evaluation use too.
The cache key is the sha256 of the encoder id, the normalisation settings and the sha256 of every
reference file, so the pose embeddings are recomputed exactly when one of them changes (UniMR
embeds the references once and compares every query against them).

Physical descriptors (``match.descriptor_weight`` > 0, :mod:`agent.descriptors`): each reference's
descriptors are the ``descriptors`` record of its provenance, written by
:func:`agent.pipeline.reference_crop_at` from the segmented object on the flattened frame (the
same measurement as the queries). References without it (older libraries, crops added by hand)
are measured on the stored crop: the provenance box moved into crop coordinates (or a central box
of the object's extent) with the half-maximum mask of :func:`agent.descriptors.describe_objects`.
They are stored in the cache next to the pose embeddings; the key then also holds
``agent.descriptors.DESCRIPTOR_SETTINGS``. The weight itself is applied at matching time, so
changing it does not re-embed the poses.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from stm_agent.adapters.files import write_new
from stm_agent.agent import descriptors as D
from stm_agent.agent.config import NormaliseConfig
from stm_agent.agent.errors import DuplicateReferenceError, ReferenceLibraryError
from stm_agent.agent.match import RefEmbeddings
from stm_agent.agent.references import (CHIRAL_BELOW, PAIR_TOLERANCE, Reference, crop_descriptor_record, embed_references,
                                        object_extent_nm, reference_grey, window_nm)
from stm_agent.models.base import Encoder

#: Largest reference crop file loaded, bytes (a crop is a few KB to a few MB).
MAX_REFERENCE_BYTES = 64 << 20
_SPECIES_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}$")


@dataclass
class ReferenceEntry:
    """One reference crop.

    Attributes
    ----------
    species : str
    path : Path
        The ``.npy`` crop file.
    pixel_size_nm : tuple[float, float]
        ``(dx, dy)`` of the crop, nm.
    extent_nm : float
        Largest size of the object (minimum enclosing circle diameter), nm.
    provenance : dict
        The JSON provenance record.
    """

    species: str
    path: Path
    pixel_size_nm: tuple[float, float]
    extent_nm: float
    provenance: dict[str, Any]

    def load(self) -> np.ndarray:
        """The crop, float32 ``(h, w)``, physical units.

        Raises
        ------
        ReferenceLibraryError
            The file is not a plain numeric 2-D ``.npy`` (a pickled object array is never loaded:
            ``allow_pickle=False``), is damaged, or is larger than :data:`MAX_REFERENCE_BYTES`.
        """
        try:
            if self.path.stat().st_size > MAX_REFERENCE_BYTES:
                raise ReferenceLibraryError(f"{self.path}: reference crop file is larger than {MAX_REFERENCE_BYTES} bytes")
            a = np.load(self.path, allow_pickle=False)
        except ValueError as exc:  # numpy: "Object arrays cannot be loaded when allow_pickle=False", bad header
            why = "it holds pickled Python objects, which are never loaded" if "pickle" in str(exc) else f"not a valid .npy ({exc})"
            raise ReferenceLibraryError(f"{self.path}: reference crop refused: {why}; add the reference again "
                                        "with `stm-agent refs add`") from None
        except (OSError, EOFError) as exc:
            raise ReferenceLibraryError(f"{self.path}: cannot read the reference crop ({exc})") from None
        if not isinstance(a, np.ndarray) or a.ndim != 2 or a.dtype.kind not in "fiu":
            raise ReferenceLibraryError(f"{self.path}: reference crop must be a numeric 2-D array, got "
                                        f"{getattr(a, 'dtype', type(a).__name__)} {getattr(a, 'shape', '')}")
        return a.astype(np.float32)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class ReferenceLibrary:
    """A folder of reference crops, one sub-folder per species.

    Parameters
    ----------
    folder : str | Path
        The library folder (created by :meth:`add` if missing).
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.last_cache_hit: bool | None = None

    # ------------------------------------------------------------------ writing
    def add(
        self,
        species: str,
        crop: np.ndarray,
        pixel_size_nm: tuple[float, float],
        provenance: dict[str, Any] | None = None,
    ) -> Path:
        """Store a reference crop of ``species``.

        Parameters
        ----------
        species : str
            Species name (letters, digits, ``_ . + -``; not ``other``).
        crop : np.ndarray
            float ``(h, w)`` flattened crop centred on the object, physical units, finite.
        pixel_size_nm : tuple[float, float]
            ``(dx, dy)`` of the crop, nm.
        provenance : dict, optional
            Where it came from (scan, frame_id, position_nm, position_px, channel, ...). Should hold
            ``extent_nm`` (object size, nm); else half the shorter crop side is assumed.

        Returns
        -------
        Path
            The ``.npy`` file written (``.png`` and ``.json`` next to it).

        Raises
        ------
        ReferenceLibraryError
            Invalid species name, crop not 2-D/finite or too small, bad pixel size.
        DuplicateReferenceError
            The same crop (same sha256) is already a reference, of this species or another: a
            duplicate would weigh one object twice, and one object cannot be two species.
        """
        if not _SPECIES_RE.match(species) or species.lower() == "other":
            raise ReferenceLibraryError(
                f"{self.folder}: invalid species name {species!r} (letters, digits, _ . + -; not 'other')"
            )
        c = np.asarray(crop, dtype=np.float32)
        if c.ndim != 2 or min(c.shape) < 4 or not np.isfinite(c).all():
            raise ReferenceLibraryError(f"{self.folder}: reference crop must be a finite 2-D array >= 4x4, got {c.shape}")
        dx, dy = float(pixel_size_nm[0]), float(pixel_size_nm[1])
        if not (dx > 0 and dy > 0):
            raise ReferenceLibraryError(f"{self.folder}: pixel size must be positive, got {pixel_size_nm}")
        prov = dict(provenance or {})
        prov.setdefault("created", datetime.now(timezone.utc).isoformat())
        prov["pixel_size_nm"] = [dx, dy]
        prov["shape_px"] = [int(c.shape[1]), int(c.shape[0])]
        prov.setdefault("extent_nm", 0.5 * min(c.shape[1] * dx, c.shape[0] * dy))
        prov["species"] = species
        digest = hashlib.sha256(c.tobytes()).hexdigest()[:10]
        have = self.holds(c)
        if have is not None:
            raise DuplicateReferenceError(f"{self.folder}: this object is already reference {have}; nothing added"
                                          + ("" if have.split("/")[0] == species else
                                             f" (remove it first to make it a reference of {species})"))
        d = self.folder / species
        d.mkdir(parents=True, exist_ok=True)
        stem = f"ref_{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%S')}_{digest}"
        npy = d / f"{stem}.npy"
        np.save(npy, c)
        lo, hi = float(c.min()), float(c.max())
        prev = np.round((c - lo) / (hi - lo if hi > lo else 1.0) * 65535).astype(np.uint16)
        cv2.imwrite(str(d / f"{stem}.png"), prev)
        (d / f"{stem}.json").write_text(json.dumps(prov, indent=2, default=str), encoding="utf-8")
        return npy

    # ------------------------------------------------------------------ reading
    def holds(self, crop: np.ndarray) -> str | None:
        """``"species/ref_id"`` of the reference whose crop is ``crop`` (float32 bytes, sha256), or None."""
        if not self.folder.is_dir():
            return None
        digest = hashlib.sha256(np.asarray(crop, dtype=np.float32).tobytes()).hexdigest()[:10]
        same = sorted(self.folder.glob(f"*/ref_*_{digest}.npy"))
        return f"{same[0].parent.name}/{same[0].stem}" if same else None

    def species(self) -> list[str]:
        """Sorted species names that hold at least one reference."""
        return sorted({e.species for e in self.entries(require=False)})

    def entries(self, require: bool = True) -> list[ReferenceEntry]:
        """All reference entries, sorted by species then file name.

        Raises
        ------
        ReferenceLibraryError
            (``require``) the folder is missing or holds no reference; a provenance file is unreadable.
        """
        if not self.folder.is_dir():
            if require:
                raise ReferenceLibraryError(f"{self.folder}: reference library folder not found")
            return []
        out = []
        for npy in sorted(self.folder.glob("*/*.npy")):
            if npy.parent.name.startswith("."):
                continue
            meta_path = npy.with_suffix(".json")
            try:
                meta = json.loads(meta_path.read_text(encoding="utf-8"))
                ps = meta["pixel_size_nm"]
                out.append(
                    ReferenceEntry(
                        species=npy.parent.name,
                        path=npy,
                        pixel_size_nm=(float(ps[0]), float(ps[1])),
                        extent_nm=float(meta["extent_nm"]),
                        provenance=meta,
                    )
                )
            except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
                raise ReferenceLibraryError(f"{meta_path}: unreadable reference provenance ({e})") from None
        if require and not out:
            raise ReferenceLibraryError(f"{self.folder}: the reference library holds no reference (add some with `stm-agent refs add`)")
        return out

    def references(self) -> list[Reference]:
        """Every entry as an in-memory :class:`agent.references.Reference` (crop loaded).

        The window extent is the longer side of the object's box (provenance ``bbox_px``, as
        :func:`agent.references.object_extent_nm` measures queries), else the stored ``extent_nm``.
        """
        out = []
        for e in self.entries():
            bb = e.provenance.get("bbox_px")
            ext = float(object_extent_nm(bb, e.pixel_size_nm)[0]) if bb else e.extent_nm
            gr = e.provenance.get("grey_range")
            out.append(Reference(species=e.species, crop=e.load(), pixel_size_nm=e.pixel_size_nm, extent_nm=ext,
                                 grey_range=(float(gr[0]), float(gr[1])) if gr else None,
                                 descriptors=e.provenance.get("descriptors"), name=e.path.name,
                                 provenance=e.provenance))
        return out

    def window_nm(self, cfg: NormaliseConfig) -> float:
        """The largest reference crop window, nm (each reference is windowed from its own extent)."""
        return float(window_nm([r.extent_nm for r in self.references()], cfg).max())

    def reference_crops(self, cfg: NormaliseConfig) -> tuple[list[ReferenceEntry], np.ndarray]:
        """Normalised grey reference crops (pose 0): ``(entries, uint8 (R, S, S))``
        (:func:`agent.references.reference_grey`)."""
        return self.entries(), reference_grey(self.references(), cfg)[0]

    def cache_key(self, encoder: Encoder, cfg: NormaliseConfig, descriptors: bool = False) -> str:
        """sha256 hex of encoder id + normalisation settings + every reference file's hash
        (+ ``agent.descriptors.DESCRIPTOR_SETTINGS`` with ``descriptors``)."""
        entries = self.entries()
        files = [
            [e.species, e.path.name, _sha256(e.path), _sha256(e.path.with_suffix(".json"))] for e in entries
        ]
        content = {"encoder": encoder.id, "normalise": cfg.model_dump(mode="json"), "windows": "own-extent/v1",
                   "mirror_test": [CHIRAL_BELOW, PAIR_TOLERANCE], "files": files}
        if descriptors:
            content["descriptors"] = D.DESCRIPTOR_SETTINGS
        blob = json.dumps(content, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()

    def reference_descriptors(self) -> tuple[list[ReferenceEntry], D.Descriptors, list[str]]:
        """Physical descriptors of every reference (provenance record, or measured on the crop by
        :func:`agent.references.crop_descriptor_record`).

        Returns
        -------
        (entries, descriptors, methods) : entries in :meth:`entries` order; :class:`Descriptors`
            with arrays ``(R,)``; per entry ``"segment"`` (provenance record) or ``"crop"``.

        Raises
        ------
        ReferenceLibraryError
            Empty library, or references whose heights are in different units (pm vs sigma).
        """
        refs = self.references()
        recs = [r.descriptors if isinstance(r.descriptors, dict) and r.descriptors.get("version") == D.DESCRIPTOR_VERSION
                else crop_descriptor_record(r) for r in refs]
        try:
            desc = D.descriptors_from_records(recs)
        except (ValueError, KeyError, TypeError) as exc:
            raise ReferenceLibraryError(f"{self.folder}: reference descriptors unusable ({exc})") from None
        return self.entries(), desc, [r.get("method", "segment") for r in recs]

    def remove(self, ref: str) -> list[Path]:
        """Delete a reference: ``ref`` is its file name or stem (as :meth:`entries` lists it), or
        ``SPECIES/INDEX`` (1-based, in :meth:`entries` order of that species).

        Returns
        -------
        list[Path]
            The files removed (``.npy``, ``.png``, ``.json``).

        Raises
        ------
        ReferenceLibraryError
            No such reference.
        """
        entries = self.entries()
        hit = [e for e in entries if ref in (e.path.name, e.path.stem, f"{e.species}/{e.path.stem}")]
        if not hit and "/" in ref:
            sp, _, idx = ref.partition("/")
            of = [e for e in entries if e.species == sp]
            if idx.isdigit() and 1 <= int(idx) <= len(of):
                hit = [of[int(idx) - 1]]
        if not hit:
            raise ReferenceLibraryError(f"{self.folder}: no reference {ref!r} (see `stm-agent refs show`)")
        gone = []
        for suf in (".npy", ".png", ".json"):
            f = hit[0].path.with_suffix(suf)
            if f.exists():
                f.unlink()
                gone.append(f)
        return gone

    def pose_embeddings(self, encoder: Encoder, cfg: NormaliseConfig, descriptors: bool = False) -> RefEmbeddings:
        """Embeddings of every pose of every reference, from the on-disk cache when valid.

        Parameters
        ----------
        encoder : Encoder
        cfg : NormaliseConfig
        descriptors : bool
            Also the physical descriptors of the references (:meth:`reference_descriptors`) and
            their reference-fitted scaler (:func:`agent.descriptors.fit_reference_scaler`):
            ``ref_desc``, ``desc_std``, ``desc_center``, ``desc_scale``, ``height_unit``.

        Returns
        -------
        RefEmbeddings
            ``emb`` float32 ``(M, D)`` with M = references x poses (``cfg.rotations`` x
            (2 if ``cfg.mirror`` else 1)), ``species_idx``, ``angle_deg``, ``mirrored``, ``ref_idx``.
            Sets ``self.last_cache_hit``.

        Raises
        ------
        ReferenceLibraryError
            Missing or empty library.
        """
        key = self.cache_key(encoder, cfg, descriptors)
        cache = self.folder / ".cache" / f"{key}.npz"
        if cache.is_file():
            try:
                z = np.load(cache, allow_pickle=False)
                out = RefEmbeddings(
                    emb=z["emb"], species_idx=z["species_idx"], angle_deg=z["angle_deg"], mirrored=z["mirrored"],
                    species=[str(s) for s in z["species"]], ref_idx=z["ref_idx"], window_nm=float(z["window_nm"]), key=key,
                    ref_window_nm=z["ref_window_nm"], ref_extent_nm=z["ref_extent_nm"], mirror=bool(z["mirror"]), mirror_reason=str(z["mirror_reason"]),
                    enantiomers=bool(z["enantiomers"]), mirror_invariance=float(z["mirror_invariance"]),
                )
                if descriptors:
                    out.ref_desc, out.desc_std = z["ref_desc"], z["desc_std"]
                    out.desc_center, out.desc_scale = z["desc_center"], z["desc_scale"]
                    out.height_unit = str(z["height_unit"])
                self.last_cache_hit = True
                return out
            except (OSError, ValueError, KeyError):
                pass  # damaged cache: recompute
        self.last_cache_hit = False
        try:
            out = embed_references(self.references(), encoder, cfg, descriptors=descriptors)
        except ValueError as exc:
            raise ReferenceLibraryError(f"{self.folder}: reference descriptors unusable ({exc})") from None
        out.key = key
        names = out.species
        extra = {}
        if descriptors:
            extra = dict(ref_desc=out.ref_desc, desc_std=out.desc_std, desc_center=out.desc_center,
                         desc_scale=out.desc_scale, height_unit=np.array(out.height_unit))
        buf = io.BytesIO()
        np.savez(buf, emb=out.emb, species_idx=out.species_idx, angle_deg=out.angle_deg, mirrored=out.mirrored,
                 species=np.array(names), ref_idx=out.ref_idx, window_nm=np.float64(out.window_nm),
                 ref_window_nm=out.ref_window_nm, ref_extent_nm=out.ref_extent_nm, mirror=np.bool_(out.mirror),
                 mirror_reason=np.array(out.mirror_reason), enantiomers=np.bool_(out.enantiomers),
                 mirror_invariance=np.float64(out.mirror_invariance), **extra)
        # atomically, never through a symlink planted in the cache folder (adapters/files.py)
        write_new(cache.parent, cache.name, buf.getvalue(), make_dirs=True)
        return out
