"""``stm-agent discover``: propose species before the first reference (registered by :mod:`agent.cli`)::

    stm-agent discover SCANS|FOLDER... --out DIR [--embedding E] [--method M] [--k K] [--autoencoder]
    stm-agent refs add SPECIES --from-cluster N [--discovery DIR]      (in agent.cli, uses adopt_cluster)

Exit codes: 0 done; 2 bad input (no scan, fewer than 3 objects, unknown embedding, torch missing
for --autoencoder).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from stm_agent.agent.config import load_config
from stm_agent.agent.discovery_run import adopt_cluster
from stm_agent.agent.errors import StmAgentError

__all__ = ["discover", "adopt_cluster"]  # adopt_cluster: agent.discovery_run

console = Console()
err_console = Console(stderr=True)


def _fail(msg: str) -> None:
    err_console.print(f"[bold red]error:[/] {escape(msg)}", soft_wrap=True)
    raise typer.Exit(code=2)


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
    from stm_agent.agent import discovery as D
    from stm_agent.agent.discovery_run import run_discovery, scan_paths

    try:
        cfg = load_config(config)
        paths = scan_paths(inputs, images=pixel_size is not None)
    except StmAgentError as e:
        _fail(str(e))
    if not paths:
        _fail(f"no scan found in {', '.join(map(str, inputs))}")
    emb_name = embedding or ("autoencoder" if autoencoder else D.DEFAULT_EMBEDDING)
    meth = method or D.DEFAULT_METHOD

    def progress(stage: str, done: int, total: int) -> None:
        if stage == "training":
            console.print("training the autoencoder on the crops ...")

    try:
        d = run_discovery(paths, cfg, out, embedding=emb_name, method=meth, k=k, pixel_size=pixel_size,
                          progress=progress)
    except StmAgentError as e:
        _fail(str(e))
    except OSError as e:
        _fail(f"{out}: cannot write the gallery ({e.strerror or e})")
    for s in d.get("skipped", []):
        err_console.print(f"[yellow]skipped[/] {escape(s['scan'])}: {escape(s['reason'])}", soft_wrap=True)
    unit = d.get("height_unit", "")
    t = Table(title=f"{d['n_objects']} objects in {len(d['scans'])} scans -> {d['k']} clusters "
                    f"({escape(d['embedding'])} / {d['method']}, silhouette {d['silhouette']:.2f})", title_justify="left")
    for col in ("cluster", "n", "area (nm2)", "extent (nm)", f"height ({unit})", "depressions", "typical object"):
        t.add_column(col, justify="right" if col != "typical object" else "left")
    for c in d["clusters"]:
        m = c["medoids"][0] if c["medoids"] else None
        where = f"{Path(m['scan']).name} @ {m['x_px']:.0f},{m['y_px']:.0f} px" if m else ""
        t.add_row("noise" if c["cluster"] < 0 else str(c["cluster"]), str(c["n"]), f"{c['area_nm2']:.3g}",
                  f"{c['extent_nm']:.3g}", f"{c['height']:.3g}", f"{c['depressions']:.0%}", escape(where))
    console.print(t)
    console.print(f"gallery: {escape(str(Path(out) / 'contact_sheet.png'))} (+ one PNG per cluster); adopt a cluster "
                  f"with `stm-agent refs add SPECIES --from-cluster N --discovery {escape(str(out))}`", soft_wrap=True)
