"""``stm-agent dashboard``: the live page in the browser, for a running or a stopped agent."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import typer

from stm_agent.agent.console import cli_config as _config, console, esc, fail
from stm_agent.agent.errors import StmAgentError


def dashboard(
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="The agent's YAML configuration "
                                          "(its store, references, publish endpoint)."),
    host: Optional[str] = typer.Option(None, "--host", help="Address to serve on (default dashboard.host, "
                                       "127.0.0.1 = this computer only; 0.0.0.0 = the lab network)."),
    port: Optional[int] = typer.Option(None, "--port", help="Port (default dashboard.port, 8765)."),
    endpoint: Optional[str] = typer.Option(None, "--endpoint", help="The agent's PUB endpoint for live "
                                           "updates (default publish.endpoint)."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging."),
) -> None:
    """Serve the dashboard: latest frame with its overlay, counts over time, triggers, references.

    Works against a running agent (live updates from its PUB socket) and a stopped one (history
    from its store). Read-only unless dashboard.token (or $STM_AGENT_DASHBOARD_TOKEN) is set."""

    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = _config(config)
    try:
        from stm_agent.adapters.dashboard.server import DashboardServer, require_extra

        require_extra()
        from stm_agent.adapters.dashboard.app import dashboard_token

        srv = DashboardServer(cfg, endpoint=endpoint, host=host, port=port)
    except StmAgentError as e:
        fail(e)
    where = srv.host if srv.host not in ("0.0.0.0", "") else "0.0.0.0 (the lab network)"
    mode = "references can be edited with the token" if dashboard_token(cfg) else "read-only (no dashboard.token)"
    console.print(f"dashboard of [bold]{esc(cfg.agent_id)}[/] on http://{'127.0.0.1' if srv.host in ('0.0.0.0', '') else srv.host}:"
                  f"{srv._config.port}/ (serving {where}); store {esc(cfg.results.store)}; {mode}; Ctrl-C stops",
                  soft_wrap=True, highlight=False)
    try:
        srv.run()
    except StmAgentError as e:
        fail(e)
