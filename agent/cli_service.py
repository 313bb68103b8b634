"""Command line for a running agent and its results (registered by :mod:`agent.cli`)::

    stm-agent status [--config FILE] [--endpoint EP] [--json]   ask the running agent (or its store)
    stm-agent results export --format csv|json|parquet --table frames|objects [--out FILE]

Exit codes: 0 done; 1 ``status`` got no answer from an agent (the store summary is still shown)
or found no store; 2 bad configuration, unreadable store, or export error.
"""

from __future__ import annotations

import json
import sqlite3
import sys
from enum import Enum
from pathlib import Path
from typing import Any, Optional

import typer
from rich.table import Table

from stm_agent.agent.config import AgentConfig, load_config
from stm_agent.agent.console import console, err_console, esc, fail, typer_app
from stm_agent.agent.errors import StmAgentError

__all__ = ["results_app", "status", "store_summary"]

results_app = typer_app(help="Results recorded by the agent (the SQLite store).")

ConfigOpt = typer.Option(None, "--config", "-c", help="YAML configuration (see `stm-agent config init`).")


class ExportFormat(str, Enum):
    csv = "csv"
    json = "json"
    parquet = "parquet"


class ExportTable(str, Enum):
    frames = "frames"
    objects = "objects"


def _load(path: Optional[Path]) -> AgentConfig:
    try:
        return load_config(path)
    except StmAgentError as e:
        fail(e)


@results_app.command("export")
def results_export(
    config: Optional[Path] = ConfigOpt,
    store: Optional[Path] = typer.Option(None, "--store", help="Results store (default: results.store of the config)."),
    fmt: ExportFormat = typer.Option(ExportFormat.csv, "--format", "-f", help="Output format."),
    table: ExportTable = typer.Option(ExportTable.frames, "--table", "-t",
                                      help="frames: one row per frame (counts, densities per nm^2); "
                                           "objects: one row per detected object."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output file (default: stdout for csv/json; "
                                       "parquet needs a file)."),
) -> None:
    """Export the recorded results as a table (CSV, JSON or Parquet)."""
    from stm_agent.adapters.tables import export_results

    path = store if store is not None else _load(config).results.store
    try:
        n = export_results(path, out if out is not None else sys.stdout, fmt.value, table.value)
        if out is None:
            sys.stdout.flush()
    except BrokenPipeError:
        # `results export | head`: the reader closed the pipe. Not an error; point stdout at
        # devnull so that Python's flush at exit does not complain either.
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise typer.Exit(code=0)
    except StmAgentError as e:
        fail(e)
    if out is not None:
        err_console.print(f"exported {n} {table.value} rows to {esc(out)}", soft_wrap=True)


def store_summary(path: Path, last: int = 5) -> dict[str, Any] | None:
    """What the store says, read-only: frames ok / error, the ``last`` newest frames, and the
    frames still waiting (rows of table ``inbox``; None when the store has no inbox).

    Returns
    -------
    dict or None
        None when there is no file at ``path``.

    Raises
    ------
    StoreError
        The file is not a readable results store.
    """
    from stm_agent.adapters.tables import _connect
    from stm_agent.agent.errors import StoreError

    if not Path(path).is_file():
        return None
    db = _connect(Path(path))
    try:
        ok, err = (db.execute("SELECT COUNT(*) FROM frames WHERE status = ?", (s,)).fetchone()[0]
                   for s in ("ok", "error"))
        has_inbox = db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='inbox'").fetchone()
        pending = db.execute("SELECT COUNT(*) FROM inbox").fetchone()[0] if has_inbox else None
        rows = db.execute("SELECT frame_id, path, processed_at, status, reason, counts, n_objects FROM frames "
                          "ORDER BY processed_at DESC, rowid DESC LIMIT ?", (int(last),)).fetchall()
    except sqlite3.Error as exc:
        raise StoreError(path, f"cannot read the results database ({exc})") from exc
    finally:
        db.close()
    frames = [{"frame_id": r["frame_id"], "path": r["path"], "processed_at": r["processed_at"],
               "status": r["status"], "reason": r["reason"], "counts": json.loads(r["counts"] or "{}"),
               "n_objects": r["n_objects"]} for r in rows]
    return {"store": str(path), "frames_ok": ok, "frames_error": err, "pending": pending, "last_frames": frames}


def _uptime(s: float | None) -> str:
    if s is None:
        return "?"
    s = int(s)
    return f"{s // 86400}d {s % 86400 // 3600:02d}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 86400 else \
        f"{s // 3600:02d}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _print_agent(reply: dict[str, Any], endpoint: str) -> None:
    st = reply.get("status") or {}
    model = st.get("model") or {}
    refs = st.get("reference_set") or {}
    t = Table(title=f"agent {esc(reply.get('agent_id'))} answering on {esc(endpoint)}", title_justify="left",
              show_header=False)
    t.add_column("", style="bold")
    t.add_column("")
    t.add_row("uptime", _uptime(st.get("uptime_s")))
    t.add_row("frames done", str(st.get("frames_done")))
    t.add_row("errors", str(st.get("errors")))
    t.add_row("queue depth", str(st.get("queue_depth")))
    pending = st.get("pending_files") or []
    if st.get("pending"):
        more = st["pending"] - len(pending)
        t.add_row("waiting to complete", esc(", ".join(pending) + (f" and {more} more" if more > 0 else ""))
                  or str(st["pending"]))
    last = st.get("last_frame_id")
    name = st.get("last_frame_name")
    t.add_row("last frame", esc(f"{name or last[:12]} at {st.get('last_frame_at')}") if last else "none yet")
    t.add_row("encoder", esc(model.get("id") or model.get("name") or "none"))
    if model.get("provider"):
        t.add_row("runs on", esc(model["provider"]))
    t.add_row("species", esc(", ".join(refs.get("species") or []) or "none"))
    for name, stats in (st.get("sources") or {}).items():
        t.add_row(f"source {esc(name)}", esc(", ".join(f"{k}={v}" for k, v in stats.items())))
    console.print(t)


def _print_store(summary: dict[str, Any]) -> None:
    pend = summary["pending"]
    console.print(f"store {esc(summary['store'])}: [bold]{summary['frames_ok']}[/] frames ok, "
                  f"[bold]{summary['frames_error']}[/] errors"
                  + (f", [bold]{pend}[/] pending" if pend is not None else ""), soft_wrap=True)
    if not summary["last_frames"]:
        return
    t = Table(title="last frames", title_justify="left")
    for c in ("processed at", "frame", "file", "status", "counts / reason"):
        t.add_column(c)
    for f in summary["last_frames"]:
        what = f["reason"] if f["status"] == "error" else "  ".join(f"{k}={v}" for k, v in f["counts"].items())
        t.add_row(esc(f["processed_at"]), f["frame_id"][:12], esc(Path(str(f["path"] or "")).name),
                  "[red]error[/]" if f["status"] == "error" else "ok", esc(what))
    console.print(t)


def status(
    config: Optional[Path] = ConfigOpt,
    endpoint: Optional[str] = typer.Option(None, "--endpoint", help="The agent's query endpoint "
                                           "(default: publish.query_endpoint of the config)."),
    timeout: float = typer.Option(2.0, "--timeout", help="Seconds to wait for the agent's answer."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object instead of tables."),
    client_cert: Optional[Path] = typer.Option(None, "--client-cert", help="This client's zmq.auth secret "
                                               "certificate, when the agent serves with CURVE and admits listed "
                                               "clients only (publish.curve_clients_dir)."),
) -> None:
    """Show how the running agent is doing; without an agent, what its results store says.

    An agent that publishes with CURVE (publish.curve_secret_file) answers its query endpoint with
    CURVE too: its public key is read from that certificate."""
    from stm_agent.adapters.query import query
    from stm_agent.adapters.zmq_io import load_curve_secret
    from stm_agent.agent.errors import PublishError

    cfg = _load(config)
    ep = endpoint or cfg.publish.query_endpoint
    reply: dict[str, Any] | None = None
    why = ""
    if not ep:
        why = "publish.query_endpoint is off (null) and no --endpoint given"
    elif "*" in ep:
        why = f"{ep} has no fixed port; give --endpoint"
    else:
        try:
            key = (load_curve_secret(cfg.publish.curve_secret_file)[0].decode("ascii")
                   if cfg.publish.curve_secret_file else None)
            reply = query(ep, "status", timeout_ms=int(timeout * 1000), curve_server_key=key,
                          curve_secret_file=client_cert)
        except PublishError as e:
            why = e.reason
        else:
            if "status" not in reply:
                why, reply = f"the agent answered with an error: {reply.get('error')}", None
    summary: dict[str, Any] | None = None
    if reply is None:
        try:
            summary = store_summary(cfg.results.store)
        except StmAgentError as e:
            fail(e)
    if json_out:
        print(json.dumps({"endpoint": ep, "agent": reply, "no_answer": why or None, "store": summary}))
    else:
        if reply is not None:
            _print_agent(reply, str(ep))
        else:
            console.print(f"[yellow]no agent answered[/] on {esc(ep or '(no query endpoint)')}: {esc(why)}",
                          soft_wrap=True)
            if summary is None:
                console.print(f"and no results store at {esc(cfg.results.store)}", soft_wrap=True)
            else:
                _print_store(summary)
    if reply is None:
        raise typer.Exit(code=1)
