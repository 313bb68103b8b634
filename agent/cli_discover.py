"""``stm-agent discover``: propose species before the first reference (registered by :mod:`agent.cli`)::

    stm-agent discover SCANS|FOLDER... --out DIR [--embedding E] [--method M] [--k K] [--autoencoder]
    stm-agent refs add SPECIES --from-cluster N [--discovery DIR]      (in agent.cli, uses adopt_cluster)

Exit codes: 0 done; 2 bad input (no scan, fewer than 3 objects, unknown embedding, torch missing
for --autoencoder).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import numpy as np
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from stm_agent.agent.config import AgentConfig, load_config
from stm_agent.agent.errors import StmAgentError

__all__ = ["discover", "adopt_cluster"]

console = Console()
err_console = Console(stderr=True)


def _fail(msg: str) -> None:
    err_console.print(f"[bold red]error:[/] {escape(msg)}", soft_wrap=True)
    raise typer.Exit(code=2)


def _scan_paths(inputs: list[Path], images: bool) -> list[Path]:
    from stm_agent.adapters.scanfile import SUPPORTED_SUFFIXES

    suffixes = SUPPORTED_SUFFIXES if images else (".sxm",)
    out: list[Path] = []
    for p in inputs:
        if not p.exists():
            _fail(f"{p}: no such file or folder")
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in suffixes)
        else:
            out.append(p)
    return out


def discover(
    inputs: list[Path] = typer.Argument(..., help="Scans (.sxm; images with --pixel-size) or folders of them."),
    out: Path = typer.Option(Path("discovery"), "--out", "-o", help="Folder for the gallery, the tables and "
                             "discovery.json."),
    embedding: Optional[str] = typer.Option(None, "--embedding", "-e", help="pixels | rawpixels | zernike | "
                                            "descriptors | A+B (e.g. pixels+descriptors) | autoencoder (default: "
                                            "the measured winner, docs/discovery.md)."),
    method: Optional[str] = typer.Option(None, "--method", "-m", help="kmeans | agglomerative | hdbscan."),
    k: Optional[int] = typer.Option(None, "--k", min=2, help="Number of clusters (default: by silhouette)."),
    autoencoder: bool = typer.Option(False, "--autoencoder", help="Train the convolutional autoencoder on "
                                     "these crops (needs torch: the export extra) and cluster its latent vectors."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML configuration (segmentation, "
                                          "channel)."),
    pixel_size: Optional[float] = typer.Option(None, "--pixel-size", help="Pixel size in nm of image files."),
) -> None:
    """Segment every object of the scans, embed, cluster, and write a gallery (one PNG per cluster +
    a contact sheet) and tables: the species the scans hold, before any reference."""
    from stm_agent.adapters.gallery import write_discovery
    from stm_agent.adapters.scanfile import read_scan
    from stm_agent.agent import discovery as D

    try:
        cfg = load_config(config)
    except StmAgentError as e:
        _fail(str(e))
    emb_name = embedding or ("autoencoder" if autoencoder else D.DEFAULT_EMBEDDING)
    meth = method or D.DEFAULT_METHOD
    if meth not in D.METHODS:
        _fail(f"--method {meth!r}: choose from {', '.join(D.METHODS)}")
    if "autoencoder" in emb_name:
        try:
            import torch  # noqa: F401
        except ImportError:
            _fail("--autoencoder needs torch to train (pip install 'stm-agent[export]'); the other embeddings "
                  "work without it")
    paths = _scan_paths(inputs, images=pixel_size is not None)
    if not paths:
        _fail(f"no scan found in {', '.join(map(str, inputs))}")
    scans = []
    for p in paths:
        try:
            scans.append(read_scan(p, pixel_size_nm=pixel_size))
        except StmAgentError as e:
            err_console.print(f"[yellow]skipped[/] {escape(str(e))}", soft_wrap=True)

    def skipped(scan, exc) -> None:
        err_console.print(f"[yellow]skipped[/] {escape(scan.source)}: {escape(str(exc))}", soft_wrap=True)

    objs = D.collect_objects(scans, cfg, on_error=skipped)
    if len(objs) < 3:
        _fail(f"found {len(objs)} whole objects in {len(scans)} scans: need at least 3 "
              "to cluster (check the channel and the segmentation settings)")
    ae = None
    if "autoencoder" in emb_name:
        console.print(f"training the autoencoder on {len(objs)} crops ...")
        from stm_agent.models.autoencoder import train_autoencoder

        ae = train_autoencoder(objs.grey, out / "autoencoder")
    try:
        x = D.embed(objs, emb_name, autoencoder=ae)
        cl = D.cluster(x, meth, k=k)
    except ValueError as e:
        _fail(str(e))
    meds = D.medoids(x, cl.labels, n=5)
    unit = objs.height_unit
    info: dict[str, Any] = {"embedding": emb_name, "method": meth, "k_given": k, "channel": cfg.channel,
                            "direction": cfg.direction, "config_digest": cfg.digest()}
    files = write_discovery(out, objs, x, cl, meds, info, height_unit=unit)
    t = Table(title=f"{len(objs)} objects in {len(set(objs.frame))} scans -> {cl.k} clusters "
                    f"({escape(emb_name)} / {meth}, silhouette {cl.silhouette:.2f})", title_justify="left")
    for col in ("cluster", "n", "area (nm2)", "extent (nm)", f"height ({unit})", "depressions", "typical object"):
        t.add_column(col, justify="right" if col != "typical object" else "left")
    for c in sorted(set(cl.labels.tolist())):
        idx = np.flatnonzero(cl.labels == c)
        d = objs.desc[idx]
        m = meds.get(int(c), [None])[0]
        where = f"{Path(objs.frame[m]).name} @ {objs.centroid_px[m, 0]:.0f},{objs.centroid_px[m, 1]:.0f} px" if m is not None else ""
        t.add_row("noise" if c < 0 else str(c), str(len(idx)), f"{np.median(d[:, 0]):.3g}", f"{np.median(d[:, 1]):.3g}",
                  f"{np.median(d[:, 2]):.3g}", f"{np.mean(d[:, 3] < 0):.0%}", escape(where))
    console.print(t)
    console.print(f"gallery: {escape(str(files[0]))} (+ one PNG per cluster); adopt a cluster with "
                  f"`stm-agent refs add SPECIES --from-cluster N --discovery {escape(str(out))}`", soft_wrap=True)


def adopt_cluster(species: str, cluster: int, folder: Path, cfg: AgentConfig, n: int = 3,
                  pixel_size: float | None = None) -> list[Path]:
    """Add the ``n`` medoids of ``cluster`` of a discovery run as references of ``species``.

    Each medoid is cut from its scan with :func:`agent.pipeline.reference_crop_at` at its pixel
    position, exactly as ``refs add --scan --at X,Y --px`` would.

    Returns
    -------
    list[Path]
        The reference files written.

    Raises
    ------
    ReferenceLibraryError
        No discovery results in ``folder``, no such cluster, or a medoid's scan is unreadable.
    """
    from stm_agent.adapters.gallery import read_discovery
    from stm_agent.adapters.references import ReferenceLibrary
    from stm_agent.adapters.scanfile import read_scan
    from stm_agent.agent.errors import ReferenceLibraryError
    from stm_agent.agent.pipeline import reference_crop_at

    d = read_discovery(folder)
    row = next((c for c in d["clusters"] if c["cluster"] == cluster), None)
    if row is None or cluster < 0:
        raise ReferenceLibraryError(f"{folder}: no cluster {cluster}; clusters are "
                                    f"{', '.join(str(c['cluster']) for c in d['clusters'] if c['cluster'] >= 0)}")
    lib = ReferenceLibrary(cfg.references.folder)
    written = []
    for m in row["medoids"][:n]:
        try:
            scan = read_scan(m["scan"], pixel_size_nm=pixel_size)
        except StmAgentError as e:
            raise ReferenceLibraryError(f"medoid of cluster {cluster}: {e}") from None
        crop, psize, prov = reference_crop_at(scan, m["x_px"], m["y_px"], cfg, units="px")
        prov = {**prov, "discovery": {"folder": str(folder), "cluster": cluster, "embedding": d.get("embedding"),
                                      "method": d.get("method")}}
        written.append(lib.add(species, crop, psize, prov))
    return written
