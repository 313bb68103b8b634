"""Prometheus ``/metrics`` of one agent (optional; needs prometheus-client).

Metrics (each agent has its OWN registry, so several agents, or tests, coexist in one process)::

    stm_agent_frames_processed_total{status="ok"|"error"}   counter, frames recorded
    stm_agent_frame_errors_total                            counter, frames that failed
    stm_agent_frame_latency_seconds                         histogram, received complete -> published, s
    stm_agent_queue_depth                                   gauge, frames waiting in the inbox

An :class:`AgentMetrics` made with ``enabled=False``, or when prometheus-client is not installed,
is a no-op with the same methods (``enabled`` False, ``port`` None), so callers never test for it.

The HTTP server is bounded (issue 15, finding 13): at most :data:`MAX_CONNECTIONS` requests are
served at once, one thread each; a connection beyond that is closed at once (counted in
``refused``), and a client that sends nothing for :data:`REQUEST_TIMEOUT_S` is dropped.
prometheus-client's own ``start_http_server`` opens one thread per connection without bound.
"""

from __future__ import annotations

import logging
import threading
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

__all__ = ["AgentMetrics", "NullMetrics", "build_metrics", "LATENCY_BUCKETS_S", "MAX_CONNECTIONS",
           "REQUEST_TIMEOUT_S"]

log = logging.getLogger(__name__)

#: Requests served at once (one thread each); more connections are closed unanswered.
MAX_CONNECTIONS = 4
#: A connection idle this long (s) is dropped (a client that opens and sends nothing).
REQUEST_TIMEOUT_S = 5.0


class _BoundedServer(ThreadingMixIn, WSGIServer):
    """A WSGI server with at most MAX_CONNECTIONS request threads."""

    daemon_threads = True
    block_on_close = False
    request_queue_size = 64  # listen backlog

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self.refused = 0

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.refused += 1
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("metrics: request from %s failed", client_address, exc_info=True)  # timeouts, resets


class _QuietHandler(WSGIRequestHandler):
    timeout = REQUEST_TIMEOUT_S  # socket timeout of each connection (StreamRequestHandler.setup)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        pass

# 10 ms .. 60 s, roughly x2-x2.5 per step
LATENCY_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0)


class AgentMetrics:
    """The agent's Prometheus metrics in a private ``CollectorRegistry``, served on ``/metrics``.

    Parameters
    ----------
    enabled : bool
        False gives a no-op object (so does a missing prometheus-client, with a warning).
    host : str
        Address to serve on (``127.0.0.1``: this computer only).
    port : int
        TCP port; 0 picks a free one (read :attr:`port` after :meth:`start`).

    Attributes
    ----------
    enabled : bool
        Whether metrics are really collected and served.
    port : int | None
        The port served on, after :meth:`start`; None before, or when disabled.
    registry : prometheus_client.CollectorRegistry | None
        This agent's registry (None when disabled).
    """

    def __init__(self, enabled: bool = True, host: str = "127.0.0.1", port: int = 9464):
        self.host = host
        self.requested_port = int(port)
        self.port: int | None = None
        self.registry: Any = None
        self._server: Any = None
        self._thread: Any = None
        self.enabled = bool(enabled)
        if not self.enabled:
            return
        try:
            from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
        except ImportError:
            log.warning("metrics.enabled is true but prometheus-client is not installed "
                        "(pip install prometheus-client): no /metrics endpoint")
            self.enabled = False
            return
        self.registry = CollectorRegistry(auto_describe=True)
        self._frames = Counter("stm_agent_frames_processed", "Frames recorded, by status (ok | error).",
                               ["status"], registry=self.registry)
        self._errors = Counter("stm_agent_frame_errors", "Frames that could not be processed.",
                               registry=self.registry)
        self._latency = Histogram("stm_agent_frame_latency_seconds",
                                  "From the frame received complete to its result published, s.",
                                  buckets=LATENCY_BUCKETS_S, registry=self.registry)
        self._queue = Gauge("stm_agent_queue_depth", "Frames waiting in the store's inbox.",
                            registry=self.registry)
        for status in ("ok", "error"):  # export both series from the start (0), not on first use
            self._frames.labels(status=status)

    def frame_done(self, status: str, latency_s: float | None = None) -> None:
        """Count one recorded frame.

        Parameters
        ----------
        status : {"ok", "error"}
            ``error`` also increments ``stm_agent_frame_errors_total``.
        latency_s : float, optional
            Received complete -> published, seconds (observed in the histogram when given).
        """
        if not self.enabled:
            return
        self._frames.labels(status=status).inc()
        if status == "error":
            self._errors.inc()
        if latency_s is not None and latency_s >= 0:
            self._latency.observe(latency_s)

    def set_queue_depth(self, n: int) -> None:
        """Set the number of frames waiting in the inbox."""
        if self.enabled:
            self._queue.set(n)

    def start(self) -> "AgentMetrics":
        """Serve ``http://host:port/metrics`` in a background thread (no-op when disabled).

        Returns
        -------
        AgentMetrics
            self, with :attr:`port` resolved.

        Raises
        ------
        OSError
            The address cannot be bound (port in use ...).
        """
        if not self.enabled or self._server is not None:
            return self
        from prometheus_client import make_wsgi_app

        self._server = make_server(self.host, self.requested_port, make_wsgi_app(self.registry),
                                   server_class=_BoundedServer, handler_class=_QuietHandler)
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="stm-agent-metrics", daemon=True)
        self._thread.start()
        self.port = int(self._server.server_address[1])
        log.info("Prometheus metrics on http://%s:%d/metrics", self.host, self.port)
        return self

    def stop(self) -> None:
        """Stop serving and release the port (idempotent; returns within a second)."""
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(5)
        self._server = self._thread = None
        self.port = None


def NullMetrics() -> AgentMetrics:  # noqa: N802 - reads like a class at the call site
    """A no-op :class:`AgentMetrics`."""
    return AgentMetrics(enabled=False)


def build_metrics(cfg: Any) -> AgentMetrics:
    """Metrics for ``cfg`` (an :class:`agent.config.MetricsConfig`): really collected when
    ``cfg.enabled`` and prometheus-client is installed, else a no-op. Not started: call
    :meth:`AgentMetrics.start`."""
    return AgentMetrics(enabled=bool(getattr(cfg, "enabled", False)), host=cfg.host, port=cfg.port)
