"""``stm-agent batch``: recount whole archives (registered by :mod:`agent.cli`)::

    stm-agent batch FOLDER... --out DIR [--workers N] [--dask tcp://scheduler:8786]

Exit codes: 0 every scan done (bad scans are recorded as errors, not failures); 1 interrupted
(run again to resume); 2 bad input (no scan, --out in use, bad configuration, Dask unreachable).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from stm_agent.agent.config import load_config
from stm_agent.agent.console import console, err_console
from stm_agent.agent.console import fail as _fail
from stm_agent.agent.errors import StmAgentError

__all__ = ["batch"]


def batch(
    inputs: list[Path] = typer.Argument(..., help="Archive folders (searched recursively for .sxm) or scan files; "
                                        "never written to."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder: results.sqlite, and the JSON + PNG of each "
                             "scan under frames/. Run again with the same --out to resume."),
    workers: Optional[int] = typer.Option(None, "--workers", "-j", min=0, help="Worker processes (default: "
                                          "one per CPU; 0 = in this process)."),
    dask: Optional[str] = typer.Option(None, "--dask", help="Run on an existing Dask cluster, e.g. "
                                       "tcp://scheduler:8786 (needs the batch extra: pip install stm-agent\\[batch])."),
    refs: Optional[Path] = typer.Option(None, "--refs", help="Reference library folder (default: "
                                        "references.folder of the config)."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML configuration."),
    pixel_size: Optional[float] = typer.Option(None, "--pixel-size", help="Pixel size in nm of image files "
                                               "(PNG/JPG/TIFF); without it only .sxm files are taken."),
) -> None:
    """Recognise every scan of archive FOLDERs once (sha256), in parallel, resumable; results under --out."""
    from stm_agent.agent.batch import BatchError, run_batch

    overrides = {"references": {"folder": str(refs)}} if refs is not None else None
    try:
        cfg = load_config(config, overrides=overrides)
    except StmAgentError as e:
        _fail(str(e))
    stop = threading.Event()
    progress = Progress(TextColumn("[bold]batch[/]"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                        TextColumn("{task.fields[name]}"), console=console, transient=False)
    task = None

    def on_progress(name: str, done: int, total: int) -> None:
        nonlocal task
        if task is None:
            task = progress.add_task("batch", total=total, name="", rate="")
        el = progress.tasks[0].elapsed or 0.0
        progress.update(task, completed=done, name=escape(name),
                        rate=f"{done / el:.2f} scans/s" if el > 0 else "")

    try:
        with progress:
            report = run_batch(inputs, out, cfg, workers=workers, dask_address=dask, pixel_size_nm=pixel_size,
                               stop=stop, on_progress=on_progress)
    except BatchError as e:
        _fail(str(e))
    except StmAgentError as e:
        _fail(str(e))
    except KeyboardInterrupt:
        err_console.print(f"interrupted: what was recorded stays in {escape(str(out))}; run the same command "
                          "again to resume")
        raise typer.Exit(code=1) from None
    t = Table(title=f"batch into {escape(str(out))}", title_justify="left")
    t.add_column("scans")
    t.add_column("n", justify="right")
    t.add_row("found", str(report.found))
    t.add_row("processed now", str(report.processed))
    t.add_row("  of which errors (recorded)", str(report.errors))
    t.add_row("already done (earlier run)", str(report.already))
    t.add_row("same bytes as another file", str(report.duplicates))
    t.add_row("scans/s", f"{report.frames_per_s:.2f}")
    console.print(t)
    if report.counts:
        c = Table(title="species counted in the scans processed now", title_justify="left")
        c.add_column("species")
        c.add_column("count", justify="right")
        for s, n in sorted(report.counts.items()):
            c.add_row(escape(s), str(n))
        console.print(c)
    if report.interrupted:
        raise typer.Exit(code=1)
