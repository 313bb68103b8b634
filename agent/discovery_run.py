"""One discovery run and the adoption of a cluster, wired to the outside: scans read from files,
the gallery written by :mod:`adapters.gallery`, references added to the library on disk.

Shared by ``stm-agent discover`` / ``refs add --from-cluster`` (:mod:`agent.cli_discover`,
:mod:`agent.cli`) and the dashboard (:mod:`adapters.dashboard.discovery`), so the page and the
command line find the same clusters and adopt them the same way. The computation itself is
:mod:`agent.discovery`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from typing import Any, Callable, Sequence

from stm_agent.agent.config import AgentConfig
from stm_agent.agent.errors import DiscoveryError, ReferenceLibraryError, StmAgentError

__all__ = ["scan_paths", "run_discovery", "adopt_cluster", "MEDOIDS_KEPT"]

#: Medoids written per cluster (``refs add --from-cluster --medoids`` takes 1..this many).
MEDOIDS_KEPT = 5

Progress = Callable[[str, int, int], None]


def scan_paths(inputs: Sequence[str | Path], images: bool = False) -> list[Path]:
    """The scan files named by ``inputs`` (files, or folders searched recursively), sorted per folder.

    Parameters
    ----------
    inputs : sequence of str | Path
    images : bool
        Also take image files (PNG/JPG/TIFF; they need a pixel size); else ``.sxm`` only.

    Raises
    ------
    DiscoveryError
        An input does not exist.
    """
    from stm_agent.adapters.scanfile import SUPPORTED_SUFFIXES

    suffixes = SUPPORTED_SUFFIXES if images else (".sxm",)
    out: list[Path] = []
    for p in map(Path, inputs):
        if not p.exists():
            raise DiscoveryError(f"{p}: no such file or folder")
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in suffixes)
        else:
            out.append(p)
    return out


def run_discovery(paths: Sequence[str | Path], cfg: AgentConfig, out: str | Path, *, embedding: str | None = None,
                  method: str | None = None, k: int | None = None, pixel_size: float | None = None,
                  roots: Any | None = None, progress: Progress | None = None) -> dict[str, Any]:
    """Read the scans, segment and cut every whole object, embed, cluster, and write the gallery.

    Parameters
    ----------
    paths : sequence of str | Path
        Scan files (``.sxm``; images with ``pixel_size``).
    cfg : AgentConfig
        Channel, direction, flatten, segment, normalise.
    out : str | Path
        Output folder (:func:`adapters.gallery.write_discovery`).
    embedding, method : str | None
        Default :data:`agent.discovery.DEFAULT_EMBEDDING` / ``DEFAULT_METHOD`` (docs/discovery.md);
        ``autoencoder`` trains the torch autoencoder on these crops first.
    k : int | None
        Number of clusters; None = by silhouette.
    pixel_size : float | None
        nm per pixel of image files.
    roots : adapters.files.Roots | None
        Folders the scans must lie in (a scan elsewhere is skipped with its reason).
    progress : callable(stage, done, total) | None
        Stages ``reading``, ``segmenting`` (per scan), ``embedding``, ``clustering``, ``writing``.

    Returns
    -------
    dict
        The contents of ``discovery.json`` (k, silhouette, clusters with their medoids, ...) plus
        ``skipped``: ``[{"scan", "reason"}]`` for scans that could not be read or segmented.

    Raises
    ------
    DiscoveryError
        No scan, fewer than 3 whole objects, unknown embedding or clustering, torch missing for
        the autoencoder.
    OSError
        ``out`` cannot be written.
    """
    from stm_agent.adapters.gallery import write_discovery
    from stm_agent.adapters.scanfile import read_scan
    from stm_agent.agent import discovery as D

    step = progress or (lambda stage, done, total: None)
    emb_name = embedding or D.DEFAULT_EMBEDDING
    meth = method or D.DEFAULT_METHOD
    if meth not in D.METHODS:
        raise DiscoveryError(f"clustering {meth!r}: choose from {', '.join(D.METHODS)}")
    if "autoencoder" in emb_name:
        try:
            import torch  # noqa: F401
        except ImportError:
            raise DiscoveryError("the autoencoder needs torch to train (pip install 'stm-agent[export]'); the other "
                                 "embeddings work without it") from None
    paths = [Path(p).absolute() for p in paths]  # discovery.json names them for adoption from anywhere
    if not paths:
        raise DiscoveryError("no scan to discover species in")
    skipped: list[dict[str, str]] = []
    scans = []
    for i, p in enumerate(paths):
        step("reading", i, len(paths))
        try:
            scans.append(read_scan(p, pixel_size_nm=pixel_size, roots=roots))
        except StmAgentError as e:
            skipped.append({"scan": str(p), "reason": getattr(e, "reason", None) or str(e)})

    def skip(scan, exc) -> None:
        skipped.append({"scan": scan.source, "reason": str(exc)})

    objs = D.collect_objects(scans, cfg, on_error=skip, progress=lambda i, n: step("segmenting", i, n))
    if len(objs) < 3:
        raise DiscoveryError(f"found {len(objs)} whole objects in {len(scans)} scans: need at least 3 "
                             "to cluster (check the channel and the segmentation settings)")
    ae = None
    if "autoencoder" in emb_name:
        from stm_agent.models.autoencoder import train_autoencoder

        step("training", 0, 1)
        ae = train_autoencoder(objs.grey, Path(out) / "autoencoder")
    step("embedding", 0, 1)
    try:
        x = D.embed(objs, emb_name, autoencoder=ae)
        step("clustering", 0, 1)
        cl = D.cluster(x, meth, k=k)
    except ValueError as e:
        raise DiscoveryError(str(e)) from None
    meds = D.medoids(x, cl.labels, n=MEDOIDS_KEPT)
    step("writing", 0, 1)
    info: dict[str, Any] = {"embedding": emb_name, "method": meth, "k_given": k, "channel": cfg.channel,
                            "direction": cfg.direction, "config_digest": cfg.digest(), "skipped": skipped}
    write_discovery(out, objs, x, cl, meds, info, height_unit=objs.height_unit)
    from stm_agent.adapters.gallery import read_discovery

    return read_discovery(out)


def adopt_cluster(species: str, cluster: int, folder: str | Path, cfg: AgentConfig, n: int = 3,
                  pixel_size: float | None = None) -> list[Path]:
    """Add the ``n`` medoids of ``cluster`` of a discovery run as references of ``species``.

    Medoids are taken most typical first; one whose crop equals an earlier one (the same object in
    a copy of a scan) or that is already a reference is passed over for the next (up to
    :data:`MEDOIDS_KEPT`). Each medoid is cut from its scan with :func:`agent.pipeline.reference_crop_at` at its pixel
    position, exactly as ``refs add --scan --at X,Y --px`` would. A running agent notices the
    changed reference folder and counts the species from its next frame.

    Returns
    -------
    list[Path]
        The reference files written.

    Raises
    ------
    ReferenceLibraryError
        No discovery results in ``folder``, no such cluster, a bad species name, a medoid's scan
        is unreadable, or every medoid is already a reference.
    NoObjectError
        A medoid is no longer found in its scan (the segmentation settings changed since).
    """
    from stm_agent.adapters.gallery import read_discovery
    from stm_agent.adapters.references import ReferenceLibrary
    from stm_agent.adapters.scanfile import read_scan
    from stm_agent.agent.pipeline import reference_crop_at

    d = read_discovery(folder)
    row = next((c for c in d["clusters"] if c["cluster"] == cluster), None)
    if row is None or cluster < 0:
        raise ReferenceLibraryError(f"{folder}: no cluster {cluster}; clusters are "
                                    f"{', '.join(str(c['cluster']) for c in d['clusters'] if c['cluster'] >= 0)}")
    lib = ReferenceLibrary(cfg.references.folder)
    cut, seen, held = [], set(), []  # every medoid cut before the first is added: all or none
    for m in row["medoids"]:
        if len(cut) == n:
            break
        try:
            scan = read_scan(m["scan"], pixel_size_nm=pixel_size)
        except StmAgentError as e:
            raise ReferenceLibraryError(f"medoid of cluster {cluster}: {e}") from None
        crop, psize, prov = reference_crop_at(scan, m["x_px"], m["y_px"], cfg, units="px")
        key = np.ascontiguousarray(crop).tobytes()
        known = lib.holds(crop)
        if key in seen or known:  # the same object in a copy of a scan, or already a reference
            held += [known] if known else []
            continue
        seen.add(key)
        prov = {**prov, "discovery": {"folder": str(folder), "cluster": cluster, "embedding": d.get("embedding"),
                                      "method": d.get("method")}}
        cut.append((crop, psize, prov))
    if not cut and held:
        raise ReferenceLibraryError(f"{folder}: every medoid of cluster {cluster} is already a reference "
                                    f"({', '.join(held)}); nothing added")
    return [lib.add(species, crop, psize, prov) for crop, psize, prov in cut]
