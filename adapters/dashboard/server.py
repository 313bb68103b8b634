"""Run the dashboard application with uvicorn, in the foreground (``stm-agent dashboard``) or in
a background thread of the agent (``dashboard.enabled``)."""

from __future__ import annotations

import logging
import threading
import time

from stm_agent.agent.config import AgentConfig
from stm_agent.agent.errors import ConfigError

__all__ = ["DashboardServer", "require_extra"]

log = logging.getLogger(__name__)


def require_extra() -> None:
    """Raise ConfigError with the install line when the dashboard's packages are missing."""
    missing = []
    for mod in ("fastapi", "uvicorn", "sse_starlette"):
        try:
            __import__(mod)
        except ImportError:
            missing.append(mod.replace("_", "-"))
    if missing:
        raise ConfigError(f"the dashboard needs {', '.join(missing)}: pip install \"stm-agent[dashboard]\"")


class DashboardServer:
    """The dashboard on ``host:port`` (``cfg.dashboard`` unless given; port 0 = any free port).

    Parameters
    ----------
    cfg : AgentConfig
    endpoint : str, optional
        The agent's bound PUB endpoint (default ``cfg.publish.endpoint``).
    host, port : optional
        Override ``cfg.dashboard.host`` / ``port``.

    Raises
    ------
    ConfigError
        The dashboard extra is not installed; the port cannot be bound (:meth:`start`).
    """

    def __init__(self, cfg: AgentConfig, endpoint: str | None = None, host: str | None = None,
                 port: int | None = None, token: str | None = None):
        require_extra()
        import uvicorn

        from stm_agent.adapters.dashboard.app import create_app

        self.cfg = cfg
        self.host = host or cfg.dashboard.host
        self.app = create_app(cfg, endpoint=endpoint, token=token)
        self._config = uvicorn.Config(self.app, host=self.host, port=cfg.dashboard.port if port is None else port,
                                      log_level="warning", access_log=False, lifespan="on",
                                      timeout_graceful_shutdown=2)
        hub = self.app.state.hub

        class _Server(uvicorn.Server):
            def handle_exit(self, sig, frame):  # Ctrl-C / SIGTERM: end the pages' streams first
                hub.close_clients()
                super().handle_exit(sig, frame)

        self.server = _Server(self._config)
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The bound port (after :meth:`start`)."""
        for s in getattr(self.server, "servers", []) or []:
            for sock in s.sockets:
                return int(sock.getsockname()[1])
        return int(self._config.port)

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return f"http://{host}:{self.port}/"

    def start(self, timeout_s: float = 10.0) -> "DashboardServer":
        """Serve in a background thread; returns once listening."""
        self._thread = threading.Thread(target=self.server.run, daemon=True, name="dashboard")
        self._thread.start()
        end = time.monotonic() + timeout_s
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > end:
                raise ConfigError(f"dashboard: cannot serve on {self.host}:{self._config.port} "
                                  "(port in use? set dashboard.port)")
            time.sleep(0.02)
        return self

    def run(self) -> None:
        """Serve in the foreground until Ctrl-C / SIGTERM (uvicorn handles the signals)."""
        try:
            self.server.run()
        except SystemExit:  # uvicorn exits when it cannot bind
            pass
        if not self.server.started:
            raise ConfigError(f"dashboard: cannot serve on {self.host}:{self._config.port} "
                              "(port in use? set dashboard.port)")

    def stop(self, timeout_s: float = 5.0) -> None:
        """End the pages' event streams, stop serving, wait for the thread (at most ``timeout_s``)."""
        self.app.state.hub.close_clients()
        time.sleep(0.05)
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout_s)
