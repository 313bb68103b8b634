"""Command line of stm-agent (typer).

    stm-agent recognize SCAN... --refs DIR     count species in scans, write JSON + overlay PNG
    stm-agent refs add SPECIES --scan F --at X,Y   pick a reference (one example per species)
    stm-agent refs show                        show the reference library (refs remove REF deletes one)
    stm-agent run [--config FILE]              the daemon: watch the acquisition folder, publish
    stm-agent listen                           print live counts published by a running agent
    stm-agent config init                      print the commented default configuration
    stm-agent models export ...                export an open_clip image encoder to ONNX
    stm-agent replay DIR                       play real scans on the controller feed (simulated controller)
    stm-agent evaluate DATA --compare ...      precision / recall / F1 against labelled data
    stm-agent status                           what a running agent is doing
    stm-agent results export                   per-frame / per-object tables (csv, json, parquet)
    stm-agent batch FOLDER... --out DIR        recount whole archives in parallel (resumable)
    stm-agent discover SCANS|FOLDER... --out D propose species by clustering (gallery + tables)
    stm-agent dashboard                        the live page in the browser (127.0.0.1:8765)
    stm-agent --version                        the installed version

A plausible mistake (wrong path, endpoint, value, missing extra) prints one line ``error: ...`` on
stderr and exits with 2 (1: some scans were skipped, or no agent answered); never a traceback.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
import typer
from rich.table import Table

from stm_agent.agent.cli_batch import batch
from stm_agent.agent.cli_discover import discover
from stm_agent.agent.cli_models import models_app
from stm_agent.agent.cli_evaluate import evaluate
from stm_agent.agent.cli_dashboard import dashboard
from stm_agent.agent.cli_feed import replay
from stm_agent.agent.cli_service import results_app, status
from stm_agent.agent.config import default_yaml_text
from stm_agent.agent.console import cli_config as _config, console, err_console, esc, fail, typer_app
from stm_agent.agent.errors import StmAgentError

app = typer_app(
    help="stm-agent: recognise and count molecules in STM scans as the microscope scans, "
    "training-free (UniMR), and publish the counts live on ZeroMQ.",
    add_completion=False,
)
refs_app = typer_app(help="The reference library: one example per species you want counted.")
config_app = typer_app(help="Configuration files.")
app.add_typer(refs_app, name="refs")
app.add_typer(config_app, name="config")
app.add_typer(models_app, name="models")
app.add_typer(results_app, name="results")
app.command()(status)
app.command()(replay)
app.command()(evaluate)
app.command()(batch)
app.command()(dashboard)
app.command()(discover)


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            v = version("stm-agent")
        except PackageNotFoundError:  # pragma: no cover - running from a checkout without install
            v = "unknown (not installed)"
        typer.echo(f"stm-agent {v}")
        raise typer.Exit()


@app.callback()
def _main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the installed version and exit."),
) -> None:
    """stm-agent: recognise and count molecules in STM scans as the microscope scans, training-free
    (UniMR), and publish the counts live on ZeroMQ."""


ConfigOpt = typer.Option(None, "--config", "-c", help="YAML configuration (see `stm-agent config init`).")
RefsOpt = typer.Option(None, "--refs", help="Reference library folder (default: references.folder of the config).")



def _parse_xy(text: str) -> tuple[float, float]:
    try:
        x, y = (float(v) for v in text.split(","))
    except ValueError:
        raise typer.BadParameter(f"expected X,Y (two numbers separated by a comma), got {text!r}") from None
    return x, y


def _counts_table(counts: dict[str, int], n_edge: int) -> Table:
    t = Table()
    t.add_column("species")
    t.add_column("count", justify="right")
    for s, n in counts.items():
        t.add_row(esc(s), str(n))
    t.add_row("[dim]cut by the edge (not counted)[/]", f"[dim]{n_edge}[/]")
    return t


def _expand_scans(paths: list[Path], images: bool) -> list[Path]:
    """Files as given; folders replaced by their scans (recursive; .sxm, and images with --pixel-size)."""
    from stm_agent.adapters.scanfile import SUPPORTED_SUFFIXES

    suffixes = SUPPORTED_SUFFIXES if images else (".sxm",)
    out: list[Path] = []
    for p in paths:
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in suffixes)
            if not found:
                err_console.print(f"[yellow]no scan ({', '.join(suffixes)}) in folder[/] {esc(p)}")
            out += found
        else:
            out.append(p)
    return out


@app.command()
def recognize(
    scans: list[Path] = typer.Argument(..., help="Nanonis .sxm scans or folders of them (searched recursively), "
                                       "or PNG/JPG/TIFF images with --pixel-size."),
    refs: Optional[Path] = RefsOpt,
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Folder for the JSON and PNG results "
                                       "(default: next to each scan)."),
    config: Optional[Path] = ConfigOpt,
    pixel_size: Optional[float] = typer.Option(None, "--pixel-size", help="Pixel size in nm, for images "
                                               "(a .sxm knows its own)."),
    threshold: Optional[float] = typer.Option(None, "--threshold", help="Similarity threshold (0..1) "
                                              "below which an object is `other`."),
    channel: Optional[str] = typer.Option(None, "--channel", help="Channel to analyse (default Z)."),
) -> None:
    """Count the species in SCANS (files or folders) against the reference library; write JSON +
    annotated PNG; end with a summary table (one row per scan). For whole archives see `batch`."""
    from stm_agent.adapters.outputs import write_result_files
    from stm_agent.adapters.scanfile import read_scan
    from stm_agent.agent.pipeline import Recognizer

    cfg = _config(config, refs, **{"match.threshold": threshold, "channel": channel})
    if out is not None:
        _writable_folder(out, "--out")
    try:
        rec = Recognizer.from_config(cfg, allow_empty=True)
    except StmAgentError as e:
        fail(e)
    paths = _expand_scans(scans, images=pixel_size is not None)
    failed = 0
    rows: list[tuple[str, dict[str, int] | None, str]] = []
    for path in paths:
        try:
            scan = read_scan(path, pixel_size_nm=pixel_size)
            result = rec.recognise(scan)
        except StmAgentError as e:
            err_console.print(f"[red]skipped[/] {esc((e))}")
            rows.append((path.name, None, getattr(e, "reason", None) or str(e)))
            failed += 1
            continue
        n_edge = sum(1 for d in result.detections if d.touches_edge)
        det = result.detection
        note = f"\n  [yellow]note:[/] {esc(det['note'])}" if det.get("note") else ""
        console.print(f"[bold]{esc(path.name)}[/]  [dim]channel {esc((result.channel))}, "
                      f"detector {esc((det.get('method')))}, encoder {esc(result.encoder_label)}, "
                      f"{result.timings_ms.get('total', 0):.0f} ms, {result.scan.get('completeness', 1):.0%} of lines[/]{note}")
        console.print(_counts_table(result.counts, n_edge))
        try:  # one unwritable folder does not stop the rest of the list
            files = write_result_files(result, out if out is not None else path.parent, path.stem,
                                       write_json=True, write_overlay=True)
        except (OSError, StmAgentError) as e:
            why = f"{e.filename or out or path.parent}: {e.strerror}" if isinstance(e, OSError) and e.strerror else str(e)
            err_console.print(f"[red]not written[/] {esc(why)}", soft_wrap=True)
            failed += 1
            continue
        for f in files:
            console.print(f"  wrote {esc((f))}")
        rows.append((path.name, dict(result.counts), ""))
    if len(paths) > 1:
        console.print(_summary_table(rows))
    if failed or not paths:
        raise typer.Exit(code=1)


def _summary_table(rows: list[tuple[str, dict[str, int] | None, str]]) -> Table:
    """One row per scan: counts per species, total; unreadable scans with their reason; a total row."""
    species: list[str] = []
    for _, counts, _ in rows:
        for s in counts or {}:
            if s not in species:
                species.append(s)
    t = Table(title=f"{len(rows)} scans", title_justify="left")
    t.add_column("scan")
    for s in species:
        t.add_column(esc(s), justify="right")
    t.add_column("total", justify="right")
    total = {s: 0 for s in species}
    for name, counts, reason in rows:
        if counts is None:
            t.add_row(esc(name), *([""] * len(species)), f"[red]error: {esc(reason)}[/]")
            continue
        for s in species:
            total[s] += counts.get(s, 0)
        t.add_row(esc(name), *(str(counts.get(s, 0)) for s in species), str(sum(counts.values())))
    t.add_row("[bold]all[/]", *(str(total[s]) for s in species), str(sum(total.values())))
    return t


def _writable_folder(folder: Path, option: str) -> None:
    """Create ``folder`` if needed and check that a file can be written in it (else one-line error)."""
    import tempfile

    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".stm-agent-write-test-"):
            pass
    except OSError as e:
        fail(f"{folder}: {option} is not a writable folder ({e.strerror or e})")


@refs_app.command("add")
def refs_add(
    species: str = typer.Argument(..., help="Species name, e.g. TCNE or L (one folder per species)."),
    scan: Optional[Path] = typer.Option(None, "--scan", help="Scan holding an example of the species."),
    at: Optional[str] = typer.Option(None, "--at", help="X,Y of the example: nm in the controller's frame "
                                     "(as `recognize` prints in centroid_nm), or pixels with --px."),
    px: bool = typer.Option(False, "--px", help="--at is in pixels (column,row; row 0 = top)."),
    image: Optional[Path] = typer.Option(None, "--image", help="A ready crop (PNG/TIFF) of the example "
                                         "instead of --scan/--at."),
    pixel_size: Optional[float] = typer.Option(None, "--pixel-size", help="Pixel size in nm of --image "
                                               "or of an image --scan."),
    from_cluster: Optional[int] = typer.Option(None, "--from-cluster", help="Adopt the medoids (most typical "
                                               "objects) of cluster N of `stm-agent discover` as references."),
    discovery: Path = typer.Option(Path("discovery"), "--discovery", help="The --out folder of `stm-agent "
                                   "discover` (with --from-cluster)."),
    medoids: int = typer.Option(3, "--medoids", help="How many medoids to adopt, 1..5 (with --from-cluster)."),
    refs: Optional[Path] = RefsOpt,
    config: Optional[Path] = ConfigOpt,
) -> None:
    """Add one example of SPECIES to the reference library (or a discovered cluster's medoids)."""
    from stm_agent.adapters.references import ReferenceLibrary
    from stm_agent.adapters.scanfile import read_scan
    from stm_agent.agent.pipeline import library_defect_sizes, reference_crop_at

    cfg = _config(config, refs)
    lib = ReferenceLibrary(cfg.references.folder)
    try:
        if from_cluster is not None:
            from stm_agent.agent.discovery_run import adopt_cluster

            if not 1 <= medoids <= 5:
                raise typer.BadParameter(f"--medoids {medoids}: give 1..5 (discovery keeps 5 medoids per cluster)")
            for path in adopt_cluster(species, from_cluster, discovery, cfg, n=medoids, pixel_size=pixel_size):
                console.print(f"added reference of [bold]{esc(species)}[/] from cluster {from_cluster}: "
                              f"{esc(str(path))}", soft_wrap=True)
            return
        if image is not None:
            from stm_agent.adapters.images import read_image

            if pixel_size is None:
                raise typer.BadParameter("--image needs --pixel-size (nm per pixel of the crop)")
            im = read_image(image, pixel_size)
            channel = next(iter(im.channels))
            crop = im.frame(channel, "forward")
            prov = {"image": str(image), "frame_id": im.frame_id, "channel": channel}
            path = lib.add(species, crop, pixel_size, prov)
        else:
            if scan is None or at is None:
                raise typer.BadParameter("give --scan FILE --at X,Y (or --image CROP.png --pixel-size NM)")
            x, y = _parse_xy(at)
            s = read_scan(scan, pixel_size_nm=pixel_size)
            # a library of lattice defects: the lattice route (segment.method auto) at their size
            sizes = library_defect_sizes([(e.pixel_size_nm, e.provenance, e.extent_nm) for e in lib.entries(require=False)])
            crop, psize, prov = reference_crop_at(s, x, y, units="px" if px else "nm", cfg=cfg, defect_sizes_nm=sizes)
            path = lib.add(species, crop, psize, prov)
    except StmAgentError as e:
        fail(e)
    n = sum(1 for e in lib.entries() if e.species == species)
    console.print(f"added reference {n} of [bold]{esc(species)}[/]: {esc(path)}", soft_wrap=True)
    if prov.get("detector") == "lattice":
        kind = "protrusion" if prov.get("contrast", 0) > 0 else "depression"
        console.print(f"  a lattice defect ({kind}), cut from the lattice-free frame", highlight=False)
    if "position_nm" in prov:  # which object was taken (the nearest segmented one)
        (xn, yn), (xp, yp) = prov["position_nm"], prov["position_px"]
        console.print(f"  the object at {xn:.3f}, {yn:.3f} nm ({xp:.0f}, {yp:.0f} px), "
                      f"{prov.get('area_nm2', float('nan')):.3g} nm^2, {prov.get('extent_nm', float('nan')):.3g} nm across; "
                      "a running agent uses it from its next frame", soft_wrap=True, highlight=False)


@refs_app.command("remove")
def refs_remove(
    ref: str = typer.Argument(..., help="The reference to remove: its file name or stem (see `refs show`), "
                              "or SPECIES/N (the N-th reference of SPECIES, from 1)."),
    refs: Optional[Path] = RefsOpt,
    config: Optional[Path] = ConfigOpt,
) -> None:
    """Remove one reference from the library."""
    from stm_agent.adapters.references import ReferenceLibrary

    cfg = _config(config, refs)
    try:
        gone = ReferenceLibrary(cfg.references.folder).remove(ref)
    except StmAgentError as e:
        fail(e)
    console.print(f"removed {esc(ref)}: " + ", ".join(esc(p.name) for p in gone), soft_wrap=True)


@refs_app.command("show")
def refs_show(refs: Optional[Path] = RefsOpt, config: Optional[Path] = ConfigOpt) -> None:
    """Show every reference (species, file, source, position, size, crop window) and whether mirrored
    poses are used (``normalise.mirror: auto``)."""
    from stm_agent.adapters.references import ReferenceLibrary
    from stm_agent.agent.references import mirror_decision, reference_grey, window_nm

    cfg = _config(config, refs)
    lib = ReferenceLibrary(cfg.references.folder)
    try:
        rs = lib.references()
        entries = lib.entries()
    except StmAgentError as e:
        fail(e)
    t = Table(title=f"references in {esc((cfg.references.folder))}", title_justify="left")
    for c in ("species", "#", "file", "from", "position (nm)", "extent (nm)", "window (nm)", "pixel size (nm)"):
        t.add_column(c, justify="right" if c in ("#", "extent (nm)", "window (nm)") else "left")
    wins = window_nm([r.extent_nm for r in rs], cfg.normalise)
    seen: dict[str, int] = {}
    for e, r, w in zip(entries, rs, wins):
        seen[e.species] = seen.get(e.species, 0) + 1
        src = e.provenance.get("scan") or e.provenance.get("image") or ""
        pos = e.provenance.get("position_nm")
        t.add_row(esc(e.species), str(seen[e.species]), esc(e.path.stem), esc(Path(str(src)).name) if src else "",
                  f"{pos[0]:.2f}, {pos[1]:.2f}" if pos else "", f"{r.extent_nm:.3g}", f"{w:.3g}",
                  " x ".join(f"{float(v):.4g}" for v in np.atleast_1d(e.pixel_size_nm)))
    console.print(t)
    ch = mirror_decision(reference_grey(rs, cfg.normalise)[0], [r.species for r in rs], cfg.normalise.mirror)
    console.print(f"mirrored poses: {'on' if ch.mirror else 'off'} ({ch.reason})", markup=False, soft_wrap=True)


@refs_app.command("list")
def refs_list(refs: Optional[Path] = RefsOpt, config: Optional[Path] = ConfigOpt) -> None:
    """List the species and examples in the reference library."""
    from stm_agent.adapters.references import ReferenceLibrary

    cfg = _config(config, refs)
    lib = ReferenceLibrary(cfg.references.folder)
    t = Table(title=f"references in {esc(cfg.references.folder)}", title_justify="left")
    t.add_column("species")
    t.add_column("example")
    t.add_column("from")
    t.add_column("pixel size (nm)", justify="right")
    try:
        entries = lib.entries()
    except StmAgentError as e:
        fail(e)
    for e in entries:
        prov = e.provenance if hasattr(e, "provenance") else {}
        src = prov.get("scan") or prov.get("image") or ""
        t.add_row(esc(e.species), esc(Path(str(e.path)).name), esc(Path(str(src)).name) if src else "",
                  " x ".join(f"{float(v):.4g}" for v in np.atleast_1d(e.pixel_size_nm)))
    console.print(t)


@app.command()
def run(
    config: Optional[Path] = ConfigOpt,
    folder: Optional[Path] = typer.Option(None, "--folder", help="Acquisition folder to watch "
                                          "(default acquisition.folder of the config, ./acquisition). "
                                          "It must exist."),
    refs: Optional[Path] = RefsOpt,
    endpoint: Optional[str] = typer.Option(None, "--endpoint", help="ZeroMQ PUB endpoint "
                                           "(default tcp://127.0.0.1:5556)."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging."),
) -> None:
    """Run the agent: take each new scan from its sources (acquisition folder, controller feed,
    Nanonis TCP), recognise it, record it, publish the counts."""
    from stm_agent.agent.daemon import Agent, install_signal_handlers

    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if folder is not None and not folder.is_dir():
        fail(f"{folder}: --folder " + ("is not a folder" if folder.exists() else
                                        "does not exist (create it first, or fix the path)"))
    if endpoint is not None:
        _check_endpoint(endpoint, "--endpoint")
    cfg = _config(config, refs, **{"acquisition.folder": str(folder) if folder else None,
                                   "publish.endpoint": endpoint})
    created = cfg.acquisition.enabled and not cfg.acquisition.folder.exists()
    try:
        agent = Agent(cfg)
    except StmAgentError as e:
        fail(e)
    install_signal_handlers(agent)
    where = []
    if cfg.acquisition.enabled:
        where.append(f"watching [bold]{esc(cfg.acquisition.folder.resolve())}[/]"
                     + (" (created: it did not exist)" if created else ""))
    if cfg.controller.enabled:
        where.append(f"subscribed to the controller feed [bold]{esc(cfg.controller.endpoint)}[/]")
    if cfg.nanonis.enabled:
        where.append(f"waiting on Nanonis TCP [bold]{esc(cfg.nanonis.host)}:{cfg.nanonis.port}[/]")
    if cfg.dashboard.enabled:
        host = "127.0.0.1" if cfg.dashboard.host in ("0.0.0.0", "") else cfg.dashboard.host
        where.append(f"dashboard on [bold]http://{esc(host)}:{cfg.dashboard.port}/[/]")
    console.print(f"stm-agent {', '.join(where) or 'with no source enabled'}; publishing on "
                  f"[bold]{esc(cfg.publish.endpoint)}[/]; encoder {esc(agent._encoder_id() or cfg.encoder.name)} "
                  f"on {esc(_provider_words(agent.provider()))} (Ctrl-C stops)", soft_wrap=True)
    try:
        agent.run()
    except StmAgentError as e:
        fail(e)


def _provider_words(provider: Optional[str]) -> str:
    if provider is None:
        return "the CPU (numpy; no onnxruntime model)"
    return {"CUDAExecutionProvider": "the GPU (onnxruntime CUDA)",
            "CPUExecutionProvider": "the CPU (onnxruntime)"}.get(provider, f"onnxruntime {provider}")


def _check_endpoint(endpoint: str, option: str) -> None:
    """One-line error for an endpoint ZeroMQ cannot use (``localhost:5556`` instead of
    ``tcp://localhost:5556``)."""
    scheme, sep, rest = endpoint.partition("://")
    if not sep or scheme not in ("tcp", "ipc", "inproc") or not rest:
        hint = f" (did you mean tcp://{endpoint}?)" if not sep else ""
        fail(f"{endpoint}: {option} must be a ZeroMQ endpoint such as tcp://127.0.0.1:5556{hint}")


@app.command()
def listen(
    endpoint: Optional[str] = typer.Option(None, "--endpoint", help="The agent's PUB endpoint "
                                           "(default: publish.endpoint of the config, tcp://127.0.0.1:5556)."),
    config: Optional[Path] = ConfigOpt,
    query_endpoint: Optional[str] = typer.Option(None, "--query-endpoint",
                                                 help="Agent's query endpoint, used to fetch frames missed "
                                                 "(a gap in frame_seq); default: publish.query_endpoint of the "
                                                 "config (tcp://127.0.0.1:5557); 'none' = do not fetch."),
    server_key: Optional[str] = typer.Option(None, "--server-key", help="The agent's CURVE public key (Z85, "
                                             "40 characters) when it publishes with publish.curve_secret_file."),
    client_cert: Optional[Path] = typer.Option(None, "--client-cert", help="This listener's zmq.auth secret "
                                               "certificate, when the agent admits listed clients only "
                                               "(publish.curve_clients_dir)."),
    count: int = typer.Option(0, "--count", "-n", help="Stop after N frames (0 = run until Ctrl-C)."),
    timeout: float = typer.Option(0.0, "--timeout", help="Give up after this many seconds without a frame "
                                  "(0 = wait forever)."),
    as_json: bool = typer.Option(False, "--json", help="Print every message as one JSON line."),
) -> None:
    """Print the species counts of each frame as a running agent publishes them.

    Frames carry a gap-free frame_seq: when one is missed (a jump in frame_seq, or a heartbeat
    ahead of the last frame seen) it is fetched from the query endpoint (`since <frame_seq>`) and
    printed, marked "recovered". A frame published again after a restart is printed once.
    """
    from stm_agent.adapters.query import GapFiller
    from stm_agent.adapters.zmq_io import Subscriber

    if endpoint is None or query_endpoint is None:
        pub = _config(config).publish
        if endpoint is None:
            endpoint = pub.endpoint
            if "*" in endpoint or "0.0.0.0" in endpoint:  # a bind address: connect to this machine
                endpoint = endpoint.replace("*", "127.0.0.1").replace("0.0.0.0", "127.0.0.1")
        if query_endpoint is None:
            query_endpoint = (pub.query_endpoint or "none").replace("0.0.0.0", "127.0.0.1")
            if "*" in query_endpoint:  # a free port chosen at start: not known here
                query_endpoint = "none"
    _check_endpoint(endpoint, "--endpoint")
    try:
        sub = Subscriber(endpoint, ["frame.counts", "agent.status", "agent.heartbeat"], curve_server_key=server_key,
                         curve_secret_file=client_cert)
    except StmAgentError as e:
        fail(e)
    gaps = GapFiller(None if (query_endpoint or "").lower() in ("", "none") else query_endpoint,
                     curve_server_key=server_key, curve_secret_file=client_cert)
    err_console.print(f"[dim]listening on {esc(endpoint)} for frame.counts (Ctrl-C stops) ...[/]", soft_wrap=True)
    seen = 0
    last = time.monotonic()

    def show(topic: str, msg: dict, recovered: bool = False) -> None:
        if as_json:
            print(json.dumps({"topic": topic, **msg, **({"recovered": True} if recovered else {})}), flush=True)
        elif topic == "agent.status":
            console.print(f"[dim]{esc(msg.get('agent_id'))}: {esc(msg.get('state'))} "
                          f"(config {esc(msg.get('config_digest'))})[/]", soft_wrap=True)
        elif msg.get("status") == "error":
            console.print(f"[red]{esc(msg.get('name') or msg.get('frame_id'))}: error: {esc(msg.get('reason'))}[/]",
                          soft_wrap=True)
        else:
            counts = esc("  ".join(f"{k}={v}" for k, v in (msg.get("counts") or {}).items()))
            note = " [yellow](recovered)[/]" if recovered else (" [yellow](redelivered)[/]" if msg.get("redelivered")
                                                               else "")
            console.print(f"[bold]{esc(msg.get('name') or msg.get('frame_id'))}[/]  {counts}{note}  "
                          f"[dim]({msg.get('latency_ms', 0):.0f} ms, frame_seq {msg.get('frame_seq')})[/]", soft_wrap=True)

    try:
        while count == 0 or seen < count:
            got = sub.recv(timeout_ms=500)
            if got is None:
                if timeout and time.monotonic() - last > timeout:
                    err_console.print(f"no frame from {esc(endpoint)} in {timeout:g} s", soft_wrap=True)
                    raise typer.Exit(code=1)
                continue
            topic, msg = got
            if topic == "agent.status":
                show(topic, msg)
                continue
            out = gaps.on_frame(msg) if topic == "frame.counts" else gaps.on_heartbeat(msg)
            for m, recovered in out:
                last = time.monotonic()
                show("frame.counts", m, recovered)
                seen += 1
                if count and seen >= count:
                    break
    except KeyboardInterrupt:
        pass
    finally:
        sub.close()
        if gaps.recovered or gaps.missed:
            err_console.print(f"{gaps.recovered} frame(s) recovered from the query endpoint, {gaps.missed} missed")


@config_app.command("init")
def config_init() -> None:
    """Print the commented default configuration (redirect it into a file and edit it)."""
    sys.stdout.write(default_yaml_text())


@config_app.command("show")
def config_show(config: Optional[Path] = ConfigOpt) -> None:
    """Validate a configuration and print the effective values with their digest."""
    cfg = _config(config)
    console.print_json(json.dumps(cfg.model_dump(mode="json")))
    console.print(f"digest {cfg.digest()}")


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
